"""Pallas-Triton flash-attention block kernel vs cuDNN and XLA attention on one GPU.

For each sequence length (8k, 16k, 32k), mask (causal, full) and implementation, times in the
same process, bf16, head_dim 128:

* forward: ``out`` (Pallas: ``block_attention_fwd`` returning (out, lse));
* forward + backward: forward then the gradients of (q, k, v) for a random output cotangent
  (Pallas: ``block_attention_fwd`` then ``block_attention_bwd`` with the forward's out/lse,
  i.e. one ring step of a single block; cuDNN/XLA: ``jax.vjp`` of
  ``jax.nn.dot_product_attention(implementation=...)``).

FLOPs: forward 4 * B * Nq * T * S * H, halved when causal; forward + backward counted as 3.5x the
forward (the convention of the project spec kernels.md, ../shared/specs/kernels.md). The batch
shrinks with the sequence so B * T stays 32k tokens. Medians over ``--iters`` timed calls after
``--warmup`` calls, each ending in ``block_until_ready``; inputs are random normal (never zeros).
An implementation that fails (e.g. XLA out of memory at 32k) is recorded with its error instead of
a time.

Writes experiments/results/flash_attention.json (device, jax version, shapes, medians, TFLOP/s,
Pallas/cuDNN time ratios). ``--quick`` runs tiny shapes (Pallas in interpret mode off-GPU, cuDNN
only on a GPU) as a smoke check and writes runs/bench_flash_attention_quick/ instead.

Usage:
    python experiments/bench_flash_attention.py                    # GPU, full sweep
    python experiments/bench_flash_attention.py --seqs 8192 --kv-heads 4
    python experiments/bench_flash_attention.py --quick            # CPU smoke check
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from timing import timed  # the benchmarks' one timing helper

from pallas_kernels.flash_attention import pallas_triton

ROOT = Path(__file__).resolve().parents[1]
TOKENS = 32768  # B * T per measurement


def attention_flops(b: int, t: int, s: int, nq: int, h: int, causal: bool) -> float:
    """Forward FLOPs of attention: two matmuls of 2 * B * Nq * T * S * H, halved if causal."""
    f = 4.0 * b * nq * t * s * h
    return f / 2 if causal else f


def make_fns(
    impl: str, *, causal: bool, seq: int, interpret: bool | None
) -> tuple[Callable, Callable]:
    """(forward, forward+backward) jitted functions of (q, k, v, dout) for one implementation.

    q, dout: [B, T, Nq, H]; k, v: [B, S, Nkv, H], all bf16.
    """
    if impl == "pallas":
        pos = jnp.arange(seq, dtype=jnp.int32)
        kw = dict(q_positions=pos, kv_positions=pos, causal=causal, interpret=interpret)

        def fwd(q, k, v, dout):
            del dout
            return pallas_triton.block_attention_fwd(q, k, v, **kw)

        def fwd_bwd(q, k, v, dout):
            out, lse = pallas_triton.block_attention_fwd(q, k, v, **kw)
            return pallas_triton.block_attention_bwd(q, k, v, out, lse, dout, **kw)

    else:
        implementation = {"cudnn": "cudnn", "xla": "xla"}[impl]

        def attn(q, k, v):
            return jax.nn.dot_product_attention(
                q, k, v, is_causal=causal, implementation=implementation
            )

        def fwd(q, k, v, dout):
            del dout
            return attn(q, k, v)

        def fwd_bwd(q, k, v, dout):
            out, vjp = jax.vjp(attn, q, k, v)
            return vjp(dout)

    return jax.jit(fwd), jax.jit(fwd_bwd)


def bench_case(
    impl: str,
    *,
    b: int,
    seq: int,
    nq: int,
    nkv: int,
    h: int,
    causal: bool,
    warmup: int,
    iters: int,
    interpret: bool | None,
) -> dict:
    """Median ms and TFLOP/s of forward and forward+backward; {'error': ...} on failure."""
    keys = jax.random.split(jax.random.key(seq + nkv + int(causal)), 4)
    q = jax.random.normal(keys[0], (b, seq, nq, h), jnp.bfloat16)
    k = jax.random.normal(keys[1], (b, seq, nkv, h), jnp.bfloat16)
    v = jax.random.normal(keys[2], (b, seq, nkv, h), jnp.bfloat16)
    dout = jax.random.normal(keys[3], (b, seq, nq, h), jnp.bfloat16)
    flops = attention_flops(b, seq, seq, nq, h, causal)
    res: dict = {}
    fwd, fwd_bwd = make_fns(impl, causal=causal, seq=seq, interpret=interpret)
    for name, fn, f in (("fwd", fwd, flops), ("fwd_bwd", fwd_bwd, 3.5 * flops)):
        try:
            med = timed(fn, q, k, v, dout, warmup=warmup, repeats=iters)
        except Exception as e:  # OOM, unsupported config: record and go on
            res[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
            print(f"  {impl:6s} {name:8s} FAILED {type(e).__name__}", flush=True)
            continue
        res[name] = {"median_ms": med * 1e3, "tflops": f / med / 1e12, "iters": iters}
        print(
            f"  {impl:6s} {name:8s} {med * 1e3:9.3f} ms  {f / med / 1e12:7.1f} TFLOP/s", flush=True
        )
    return res


def main(argv: list[str] | None = None) -> dict:
    """Run the sweep, print a table, write the JSON; returns the result dict."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[8192, 16384, 32768])
    p.add_argument("--heads", type=int, default=16, help="query heads Nq")
    p.add_argument("--kv-heads", type=int, default=16, help="KV heads Nkv (GQA if < Nq)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--tokens", type=int, default=TOKENS, help="B * T per measurement")
    p.add_argument("--impls", nargs="+", default=["pallas", "cudnn", "xla"])
    p.add_argument("--xla-max-seq", type=int, default=16384, help="skip XLA above this length")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--quick", action="store_true", help="tiny shapes: CPU smoke check")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    on_gpu = jax.default_backend() == "gpu"
    interpret = None
    if args.quick:
        args.seqs, args.heads, args.kv_heads, args.head_dim = [128, 256], 2, 1, 32
        args.tokens, args.warmup, args.iters = 256, 1, 2
        interpret = not on_gpu
    impls = [i for i in args.impls if on_gpu or i != "cudnn"]  # cuDNN needs a GPU
    if not on_gpu and not args.quick:
        print("warning: no GPU; timings are not meaningful (use --quick for a smoke check)")
    out_path = args.out or (
        ROOT / "runs" / "bench_flash_attention_quick" / "flash_attention.json"
        if args.quick
        else ROOT / "experiments" / "results" / "flash_attention.json"
    )

    device = jax.devices()[0]
    results = []
    for seq in args.seqs:
        b = max(1, args.tokens // seq)
        for causal in (True, False):
            print(f"seq {seq} batch {b} {'causal' if causal else 'full'}", flush=True)
            row: dict = {
                "batch": b,
                "seq": seq,
                "q_heads": args.heads,
                "kv_heads": args.kv_heads,
                "head_dim": args.head_dim,
                "causal": causal,
                "dtype": "bfloat16",
                "fwd_flops": attention_flops(b, seq, seq, args.heads, args.head_dim, causal),
                "impls": {},
            }
            for impl in impls:
                if impl == "xla" and seq > args.xla_max_seq:
                    row["impls"][impl] = {"skipped": f"seq > --xla-max-seq {args.xla_max_seq}"}
                    continue
                row["impls"][impl] = bench_case(
                    impl,
                    b=b,
                    seq=seq,
                    nq=args.heads,
                    nkv=args.kv_heads,
                    h=args.head_dim,
                    causal=causal,
                    warmup=args.warmup,
                    iters=args.iters,
                    interpret=interpret,
                )
            ratios = {}
            for phase in ("fwd", "fwd_bwd"):
                pal = row["impls"].get("pallas", {}).get(phase, {}).get("median_ms")
                cud = row["impls"].get("cudnn", {}).get(phase, {}).get("median_ms")
                if pal and cud:
                    ratios[phase] = pal / cud
            row["pallas_over_cudnn_time"] = ratios
            results.append(row)

    report = {
        "benchmark": "flash_attention",
        "device": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "python": sys.version.split()[0],
        "quick": args.quick,
        "interpret": bool(interpret),
        "warmup": args.warmup,
        "iters": args.iters,
        "flops_note": "fwd 4*B*Nq*T*S*H (x0.5 causal); fwd_bwd = 3.5 x fwd",
        "pallas_block_sizes": pallas_triton.default_block_sizes(args.head_dim, jnp.bfloat16),
        "results": results,
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out_path}")
    return report


if __name__ == "__main__":
    main()
