"""Pallas-Triton ReLU linear attention (SANA LiteLA) vs XLA vs the HBM roofline on one GPU.

Shapes: Sana-1.6B self-attention (H = 70 heads, d = e = 32) at N = 1024 (1024^2 image),
4096 (2048^2) and 16384 (4096^2) tokens, B = 1 and 4, bf16 inputs. For each shape, in the same
process:

* ``pallas``: `pallas_kernels.linear_attention.pallas_triton.relu_linear_attention`, default
  tiles (`default_config`);
* ``xla``: the pure-JAX reference (`pallas_kernels.linear_attention.reference`) under jit;
* ``roofline``: the bytes that must move divided by the copy bandwidth measured in this run
  (a jitted ``x * 2`` over 1 GiB bf16, read + write). Forward bytes = read q, k, v + write o
  (4 arrays); forward + backward bytes = forward + read q, k, v, do + write dq, dk, dv (11 arrays).

Phases: ``fwd`` (o) and ``fwd_bwd`` (o and dq, dk, dv for a random cotangent, one program).
Timing: `experiments/timing.py` (`timed`: warm-up, block_until_ready, median). Small shapes
take a few microseconds, below the per-call dispatch cost, so each timed call runs the op on R
distinct input sets in one jitted program (R up to 8, inputs <= 512 MiB in all, distinct
buffers, so L2 does not serve repeats) and the median is divided by R. Inputs are random
normal, never zeros. Every pallas result is checked against XLA's before timing (relative
Frobenius error, recorded).

Also: a sweep of tile/launch settings (block_n, num_warps, num_stages) at the largest shape;
if one beats the default, the pallas rows are re-timed with it (``pallas_tuned``), time
permitting (``--budget-s``, default 240 s; the whole run stays under 5 minutes on an H200).

Writes experiments/results/linear_attention.json (device, jax version, shapes, medians, GB/s,
ratios, the sweep) and prints a table last. ``--quick`` runs tiny shapes in the Pallas
interpreter on the CPU as a smoke check and writes runs/bench_linear_attention_quick/.

Usage:
    python experiments/bench_linear_attention.py            # GPU
    python experiments/bench_linear_attention.py --quick    # CPU smoke check
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
from timing import timed  # the benchmarks' one timing helper

from pallas_kernels.linear_attention import pallas_triton, reference

ROOT = Path(__file__).resolve().parents[1]
SET_BYTES_BUDGET = 1 << 29  # bytes of distinct input sets per timed call
MAX_SETS = 8
SWEEP = [  # (block_n, num_warps, num_stages)
    (64, 4, 2),
    (128, 4, 2),
    (128, 4, 3),
    (128, 8, 2),
    (256, 4, 2),
    (256, 8, 2),
    (256, 8, 3),
    (512, 8, 2),
]


def attention_fn(impl: str, cfg: dict | None, interpret: bool | None):
    """attn(q, k, v) -> o for one implementation."""
    if impl == "xla":
        return reference.relu_linear_attention
    return functools.partial(
        pallas_triton.relu_linear_attention, interpret=interpret, **(cfg or {})
    )


def phase_fn(attn, phase: str):
    """A jitted function of a list of input sets (q, k, v, do) running `phase` on each."""

    def one(q, k, v, do):
        if phase == "fwd":
            return attn(q, k, v)
        o, vjp = jax.vjp(attn, q, k, v)
        return (o, *vjp(do))

    return jax.jit(lambda sets: [one(*s) for s in sets])


def make_sets(b: int, n: int, h: int, d: int, reps: int, seed: int) -> list[tuple]:
    """`reps` distinct buffers of random bf16 (q, k, v, do), each [B, N, H, d]."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    base = [jax.random.normal(kk, (b, n, h, d), jnp.float32).astype(jnp.bfloat16) for kk in keys]
    sets = [tuple(base)]
    for _ in range(1, reps):  # same values in new buffers
        sets.append(tuple(jnp.array(x, copy=True) for x in base))
    jax.block_until_ready(sets)
    return sets


def rel_err(a, b) -> float:
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    return float(jnp.linalg.norm((a - b).ravel()) / jnp.linalg.norm(b.ravel()))


def copy_bandwidth(warmup: int, iters: int, quick: bool) -> float:
    """Bytes/s of a jitted x * 2 over 1 GiB of bf16 (read + write)."""
    n = (1 << 20) if quick else (1 << 29)
    x = jax.random.normal(jax.random.PRNGKey(0), (n,), jnp.float32).astype(jnp.bfloat16)
    f = jax.jit(lambda x: x * 2)
    t = timed(f, x, warmup=warmup, repeats=iters)
    return 2 * x.nbytes / t


def dispatch_floor(warmup: int, iters: int) -> float:
    """Seconds of one tiny jitted call (the per-call overhead floor of `timed`)."""
    x = jnp.ones((8,), jnp.float32)
    return timed(jax.jit(lambda x: x + 1), x, warmup=warmup, repeats=iters)


def time_case(attn, sets, phase: str, warmup: int, iters: int) -> dict:
    """Median ms per op of `phase` (the timed call covers len(sets) ops); error dict on failure."""
    try:
        fn = phase_fn(attn, phase)
        t0 = time.perf_counter()
        jax.block_until_ready(fn(sets))
        compile_s = time.perf_counter() - t0
        med = timed(fn, sets, warmup=warmup, repeats=iters)
    except Exception as e:  # compile failure, OOM: record and go on
        traceback.print_exc(limit=2)
        return {"error": f"{type(e).__name__}: {str(e)[:400]}"}
    return {"median_ms": med / len(sets) * 1e3, "reps": len(sets), "first_call_s": compile_s}


def check(attn, ref_attn, s) -> dict:
    """Relative Frobenius errors of the pallas fwd and fwd_bwd outputs vs XLA's."""
    try:
        got = phase_fn(attn, "fwd_bwd")([s])[0]
        want = phase_fn(ref_attn, "fwd_bwd")([s])[0]
        return {n: rel_err(g, w) for n, g, w in zip(("o", "dq", "dk", "dv"), got, want)}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {str(e)[:400]}"}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--heads", type=int, default=70)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--budget-s", type=float, default=240.0, help="skip optional work after this")
    p.add_argument("--quick", action="store_true", help="tiny shapes, CPU interpreter smoke run")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    start = time.perf_counter()
    elapsed = lambda: time.perf_counter() - start  # noqa: E731

    on_gpu = jax.default_backend() == "gpu"
    interpret = None
    sweep = [] if args.no_sweep else list(SWEEP)
    if args.quick:
        args.seqs, args.batches, args.heads, args.head_dim = [64, 200], [1], 2, 16
        args.warmup, args.iters = 1, 2
        interpret = not on_gpu
        sweep = sweep[:2]
    elif not on_gpu:
        print("warning: no GPU; timings are not meaningful (use --quick for a smoke check)")
    out_path = args.out or (
        ROOT / "runs" / "bench_linear_attention_quick" / "linear_attention.json"
        if args.quick
        else ROOT / "experiments" / "results" / "linear_attention.json"
    )
    h, d = args.heads, args.head_dim
    device = jax.devices()[0]
    print(f"device {device.device_kind}, jax {jax.__version__}", flush=True)

    bw = copy_bandwidth(args.warmup, args.iters, args.quick)
    floor = dispatch_floor(args.warmup, args.iters)
    print(f"copy bandwidth {bw / 1e12:.3f} TB/s, dispatch floor {floor * 1e6:.1f} us", flush=True)
    default_cfg = pallas_triton.default_config(d, d, jnp.bfloat16)

    rows = []
    shapes = [(b, n) for n in args.seqs for b in args.batches]
    inputs = {}
    for b, n in shapes:
        array_bytes = b * n * h * d * 2
        reps = max(1, min(MAX_SETS, SET_BYTES_BUDGET // (4 * array_bytes)))
        sets = make_sets(b, n, h, d, reps, seed=b * 7 + n)
        inputs[(b, n)] = sets
        roof = {"fwd": 4 * array_bytes, "fwd_bwd": 11 * array_bytes}
        row = {
            "batch": b,
            "seq": n,
            "heads": h,
            "head_dim": d,
            "dtype": "bfloat16",
            "bytes": roof,
            "roofline_ms": {k: v / bw * 1e3 for k, v in roof.items()},
            "impls": {},
        }
        pallas = attention_fn("pallas", None, interpret)
        xla = attention_fn("xla", None, interpret)
        row["pallas_vs_xla_rel_err"] = check(pallas, xla, sets[0])
        print(f"B={b} N={n}: reps {reps}, errors {row['pallas_vs_xla_rel_err']}", flush=True)
        for impl, attn in (("pallas", pallas), ("xla", xla)):
            row["impls"][impl] = {
                ph: time_case(attn, sets, ph, args.warmup, args.iters) for ph in ("fwd", "fwd_bwd")
            }
            for ph in ("fwd", "fwd_bwd"):
                r = row["impls"][impl][ph]
                if "median_ms" in r:
                    r["GB_per_s"] = roof[ph] / (r["median_ms"] * 1e-3) / 1e9
                    r["fraction_of_roofline"] = row["roofline_ms"][ph] / r["median_ms"]
                print(f"  {impl:6s} {ph:7s} {r}", flush=True)
        rows.append(row)

    # Tile sweep at the largest shape.
    sweep_rows, best = [], None
    big = max(shapes, key=lambda s: s[0] * s[1])
    for block_n, warps, stages in sweep:
        if elapsed() > args.budget_s:
            sweep_rows.append({"skipped": "time budget"})
            break
        cfg = dict(block_n=block_n, num_warps=warps, num_stages=stages)
        attn = attention_fn("pallas", cfg, interpret)
        res = {
            "config": cfg,
            **{
                ph: time_case(attn, inputs[big], ph, args.warmup, args.iters)
                for ph in ("fwd", "fwd_bwd")
            },
        }
        print(f"  sweep {cfg}: {res['fwd'].get('median_ms')} / {res['fwd_bwd'].get('median_ms')}")
        sweep_rows.append(res)
        score = res["fwd"].get("median_ms", 1e9) + res["fwd_bwd"].get("median_ms", 1e9)
        if best is None or score < best[0]:
            best = (score, cfg)
    best_cfg = best[1] if best else None
    default_key = {k: default_cfg[k] for k in ("block_n", "num_warps", "num_stages")}
    if best_cfg and best_cfg != default_key:
        attn = attention_fn("pallas", best_cfg, interpret)
        for row in rows:
            if elapsed() > args.budget_s:
                break
            sets = inputs[(row["batch"], row["seq"])]
            row["impls"]["pallas_tuned"] = {
                "config": best_cfg,
                **{
                    ph: time_case(attn, sets, ph, args.warmup, args.iters)
                    for ph in ("fwd", "fwd_bwd")
                },
            }

    for row in rows:
        ratios = {}
        for ph in ("fwd", "fwd_bwd"):
            pal = row["impls"]["pallas"][ph].get("median_ms")
            xla = row["impls"]["xla"][ph].get("median_ms")
            tuned = row["impls"].get("pallas_tuned", {}).get(ph, {}).get("median_ms")
            ratios[ph] = {
                "xla_over_pallas": xla / pal if pal and xla else None,
                "pallas_over_roofline": pal / row["roofline_ms"][ph] if pal else None,
                "tuned_over_roofline": tuned / row["roofline_ms"][ph] if tuned else None,
            }
        row["ratios"] = ratios

    report = {
        "benchmark": "linear_attention",
        "device": device.device_kind,
        "platform": device.platform,
        "jax_version": jax.__version__,
        "python": sys.version.split()[0],
        "quick": args.quick,
        "interpret": bool(interpret),
        "warmup": args.warmup,
        "iters": args.iters,
        "copy_bandwidth_TB_per_s": bw / 1e12,
        "dispatch_floor_us": floor * 1e6,
        "bytes_note": "fwd: q,k,v read + o write; fwd_bwd: + q,k,v,do read + dq,dk,dv write",
        "pallas_default_config": default_cfg,
        "sweep_shape": {"batch": big[0], "seq": big[1]},
        "sweep": sweep_rows,
        "best_config": best_cfg,
        "results": rows,
        "wall_s": elapsed(),
    }
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(report, indent=2) + "\n")

    def ms(row, impl, ph):
        v = row["impls"].get(impl, {}).get(ph, {}).get("median_ms")
        return f"{v:9.4f}" if v else f"{'-':>9s}"

    print(
        f"\nReLU linear attention, H={h}, d=e={d}, bf16, {device.device_kind}, "
        f"copy BW {bw / 1e12:.2f} TB/s (ms per call; xla/pal = speed-up; roof = pallas / "
        f"roofline time)"
    )
    hdr = f"{'B':>2} {'N':>6} {'phase':8} {'pallas':>9} {'tuned':>9} {'xla':>9} {'roofline':>9}"
    print(hdr + f" {'xla/pal':>8} {'roof':>6}")
    for row in rows:
        for ph in ("fwd", "fwd_bwd"):
            r = row["ratios"][ph]
            sp = f"{r['xla_over_pallas']:8.2f}" if r["xla_over_pallas"] else f"{'-':>8s}"
            rf = f"{r['pallas_over_roofline']:6.2f}" if r["pallas_over_roofline"] else f"{'-':>6s}"
            print(
                f"{row['batch']:>2} {row['seq']:>6} {ph:8} {ms(row, 'pallas', ph)} "
                f"{ms(row, 'pallas_tuned', ph)} {ms(row, 'xla', ph)} "
                f"{row['roofline_ms'][ph]:9.4f} {sp} {rf}"
            )
    print(
        f"best sweep config {best_cfg} (default {default_key}); wrote {out_path}; {elapsed():.0f} s"
    )
    return report


if __name__ == "__main__":
    main()
