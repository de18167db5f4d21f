"""Tile / launch-parameter sweep of the Pallas-Triton flash-attention block kernels on one GPU.

For each shape (bf16, head_dim 128, B * T = 32k tokens) times, in one process:

* cuDNN forward and forward + backward (``jax.nn.dot_product_attention``), the yardstick;
* the Pallas forward for every (block_q, block_k, num_warps, num_stages) in the grid;
* the Pallas backward (dq and dk/dv kernels) for every backward configuration.

Every configuration is first checked against cuDNN on the same inputs (relative L2 error of the
output, and of dq/dk/dv for the backward, must stay under 2e-2); a configuration that fails to
compile, runs out of shared memory or is wrong is recorded with its error and not timed.

Writes experiments/results/flash_attention_tiles.json (device, jax version, shapes, medians,
best configuration per shape and its time relative to cuDNN).

Usage:
    python experiments/sweep_flash_tiles.py                      # GPU
    python experiments/sweep_flash_tiles.py --quick              # CPU smoke check (interpret)
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from bench_flash_attention import attention_flops  # same FLOPs as the bench
from timing import timed  # the benchmarks' one timing helper

from pallas_kernels.flash_attention import pallas_triton

ROOT = Path(__file__).resolve().parents[1]

FWD_GRID = dict(block_q=(128,), block_k=(64, 128), num_warps=(4, 8), num_stages=(2, 3))
BWD_GRID = dict(block_q=(64, 128), block_k=(64, 128), num_warps=(4, 8), num_stages=(1, 2, 3))


def rel_err(a: jax.Array, b: jax.Array) -> float:
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.linalg.norm(a - b) / jnp.maximum(jnp.linalg.norm(b), 1e-30))


def configs(grid: dict) -> list[dict]:
    keys = list(grid)
    return [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*grid.values())]


def sweep_shape(
    b: int, seq: int, nq: int, nkv: int, h: int, causal: bool, args: argparse.Namespace
) -> dict:
    keys = jax.random.split(jax.random.key(seq * 7 + int(causal)), 4)
    q = jax.random.normal(keys[0], (b, seq, nq, h), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, seq, nkv, h), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, seq, nkv, h), jnp.bfloat16)
    dout = jax.random.normal(keys[3], (b, seq, nq, h), jnp.bfloat16)
    pos = jnp.arange(seq, dtype=jnp.int32)
    flops = attention_flops(b, seq, seq, nq, h, causal)
    row: dict = dict(batch=b, seq=seq, q_heads=nq, kv_heads=nkv, head_dim=h, causal=causal)

    impl = "cudnn" if jax.default_backend() == "gpu" else "xla"

    def ref_attn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=impl)

    ref_fwd = jax.jit(ref_attn)

    @jax.jit
    def ref_fwd_bwd(q, k, v, dout):
        out, vjp = jax.vjp(ref_attn, q, k, v)
        return vjp(dout)

    ref_out = ref_fwd(q, k, v)
    ref_grads = ref_fwd_bwd(q, k, v, dout)
    for name, fn, f in (("fwd", ref_fwd, flops), ("fwd_bwd", ref_fwd_bwd, 3.5 * flops)):
        a = (q, k, v) if name == "fwd" else (q, k, v, dout)
        med = timed(fn, *a, warmup=2, repeats=args.iters)
        row[f"{impl}_{name}_ms"] = med * 1e3
        print(f"  {impl} {name}: {med * 1e3:.3f} ms ({f / med / 1e12:.0f} TF/s)", flush=True)

    kw = dict(q_positions=pos, kv_positions=pos, causal=causal, interpret=args.interpret)
    fwd_rows = []
    for cfg in configs(FWD_GRID) if "fwd" in args.phases else []:
        fn = jax.jit(
            lambda q, k, v, cfg=cfg: pallas_triton.block_attention_fwd(q, k, v, **kw, **cfg)
        )
        entry = dict(cfg)
        try:
            out, lse = fn(q, k, v)
            entry["rel_err"] = rel_err(out, ref_out)
            if not entry["rel_err"] < 2e-2:
                raise ValueError(f"wrong output: rel err {entry['rel_err']:.3g}")
            med = timed(fn, q, k, v, warmup=2, repeats=args.iters)
            entry.update(median_ms=med * 1e3, tflops=flops / med / 1e12)
            entry["vs_cudnn"] = row[f"{impl}_fwd_ms"] / entry["median_ms"]
            print(f"  fwd {cfg}: {med * 1e3:.3f} ms  x{entry['vs_cudnn']:.2f}", flush=True)
        except Exception as e:  # shared-memory overflow, compile failure, wrong result
            entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"  fwd {cfg}: FAILED {entry['error'][:100]}", flush=True)
        fwd_rows.append(entry)
    row["fwd"] = fwd_rows

    # Backward: the forward at its default tiles supplies out/lse; time the backward alone.
    out, lse = jax.jit(lambda q, k, v: pallas_triton.block_attention_fwd(q, k, v, **kw))(q, k, v)
    bwd_rows = []
    for cfg in configs(BWD_GRID) if "bwd" in args.phases else []:
        fn = jax.jit(
            lambda q, k, v, out, lse, dout, cfg=cfg: pallas_triton.block_attention_bwd(
                q, k, v, out, lse, dout, **kw, **cfg
            )
        )
        entry = dict(cfg)
        try:
            grads = fn(q, k, v, out, lse, dout)
            entry["rel_err"] = max(rel_err(g, r) for g, r in zip(grads, ref_grads, strict=True))
            if not entry["rel_err"] < 2e-2:
                raise ValueError(f"wrong gradients: rel err {entry['rel_err']:.3g}")
            med = timed(fn, q, k, v, out, lse, dout, warmup=2, repeats=args.iters)
            entry.update(median_ms=med * 1e3, tflops=2.5 * flops / med / 1e12)
            print(f"  bwd {cfg}: {med * 1e3:.3f} ms", flush=True)
        except Exception as e:
            entry["error"] = f"{type(e).__name__}: {str(e)[:200]}"
            print(f"  bwd {cfg}: FAILED {entry['error'][:100]}", flush=True)
        bwd_rows.append(entry)
    row["bwd"] = bwd_rows
    for phase in ("fwd", "bwd"):
        ok = [e for e in row[phase] if "median_ms" in e]
        if ok:
            row[f"best_{phase}"] = min(ok, key=lambda e: e["median_ms"])
    return row


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--phases", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    p.add_argument("--quick", action="store_true", help="tiny shapes, two configs: smoke check")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    args.interpret = None
    if args.quick:
        args.seqs, args.heads, args.kv_heads, args.head_dim, args.tokens = [128], 2, 1, 32, 128
        args.iters = 1
        args.interpret = jax.default_backend() != "gpu"
        for grid in (FWD_GRID, BWD_GRID):
            for key in grid:
                grid[key] = grid[key][:1]
    out_path = args.out or (
        ROOT / "runs" / "sweep_flash_tiles_quick.json"
        if args.quick
        else ROOT / "experiments" / "results" / "flash_attention_tiles.json"
    )
    rows = []
    for seq in args.seqs:
        for causal in (True, False):
            b = max(1, args.tokens // seq)
            print(f"seq {seq} batch {b} {'causal' if causal else 'full'}", flush=True)
            rows.append(sweep_shape(b, seq, args.heads, args.kv_heads, args.head_dim, causal, args))
            write_report(out_path, rows, args)  # after every shape: a cut-off run keeps its rows
    print("\nshape                     best fwd (ms, x cuDNN)            best bwd (ms)")
    for r in rows:
        bf, bb = r.get("best_fwd", {}), r.get("best_bwd", {})
        name = f"{r['batch']}x{r['seq']} {'causal' if r['causal'] else 'full'}"
        fcfg = {k: bf[k] for k in FWD_GRID if k in bf}
        bcfg = {k: bb[k] for k in BWD_GRID if k in bb}
        print(
            f"{name:18s} {bf.get('median_ms', float('nan')):8.3f} x{bf.get('vs_cudnn', 0):.2f} "
            f"{fcfg}  {bb.get('median_ms', float('nan')):8.3f} {bcfg}"
        )
    print(f"wrote {out_path}")
    return rows


def write_report(out_path: Path, rows: list[dict], args: argparse.Namespace) -> None:
    report = dict(
        benchmark="flash_attention_tiles",
        device=jax.devices()[0].device_kind,
        jax_version=jax.__version__,
        python=sys.version.split()[0],
        quick=args.quick,
        dtype="bfloat16",
        flops_note="fwd 4*B*Nq*T*S*H (x0.5 causal); bwd 2.5 x fwd",
        results=rows,
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
