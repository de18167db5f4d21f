"""Sequence-parallel attention step time across the GPUs of one host (attention only).

Times forward + backward (gradients of sum(out * dout) w.r.t. q, k, v) of causal attention on
one sequence sharded over every local device, for Ulysses, ring (contiguous and zigzag) and,
on 4+ devices, 2D; plus single-device cuDNN attention on the whole sequence as the baseline.
bf16, head dim 128, medians after warm-up. Writes experiments/results/sequence_parallel.json.
Model-level numbers (longest trainable sequence, tokens/s) are not measured here.

    python experiments/bench_sequence_parallel.py [--seqs 32768,65536] [--quick]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from timing import timed  # the benchmarks' one timing helper

from jaxstack.nn.attention import dot_product_attention
from jaxstack.parallel import make_mesh, sequence_parallel_attention, to_zigzag


def median_time(fn, args, iters: int) -> float:
    return timed(fn, *args, warmup=2, repeats=iters)


def grad_fn(attn):
    def loss(q, k, v, dout):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * dout)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seqs", default="32768,65536")
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=16)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="tiny shapes, float32 (CPU check)")
    ap.add_argument("--out", default="experiments/results/sequence_parallel.json")
    args = ap.parse_args(argv)
    dtype, h = (jnp.float32, 16) if args.quick else (jnp.bfloat16, 128)
    if args.quick:
        args.seqs, args.heads, args.kv_heads, args.iters = "256", 4, 4, 2
    n = jax.device_count()
    mesh = make_mesh(f"sequence={n}")
    seq_sharding = NamedSharding(mesh, P(None, "sequence", None, None))
    modes = [("ulysses", "contiguous"), ("ring", "contiguous"), ("ring", "zigzag")]
    if n >= 4:
        modes.append(("2d", "zigzag"))
    result = {
        "benchmark": "sequence_parallel_attention",
        "device": jax.devices()[0].device_kind,
        "num_devices": n,
        "jax_version": jax.__version__,
        "heads": args.heads,
        "kv_heads": args.kv_heads,
        "head_dim": h,
        "dtype": jnp.dtype(dtype).name,
        "causal": True,
        "runs": [],
    }
    for seq in (int(s) for s in args.seqs.split(",")):
        keys = jax.random.split(jax.random.key(seq), 4)
        shape_q, shape_kv = (1, seq, args.heads, h), (1, seq, args.kv_heads, h)
        q = jax.random.normal(keys[0], shape_q, dtype)
        k = jax.random.normal(keys[1], shape_kv, dtype)
        v = jax.random.normal(keys[2], shape_kv, dtype)
        dout = jax.random.normal(keys[3], shape_q, jnp.float32)
        row = {"seq": seq, "tokens_per_device": seq // n}
        try:
            single = grad_fn(lambda q, k, v: dot_product_attention(q, k, v, causal=True))
            row["single_device_s"] = median_time(single, (q, k, v, dout), args.iters)
        except Exception as e:  # out of memory at long sequences
            row["single_device_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        for mode, layout in modes:
            name = f"{mode}_{layout}"
            try:
                args_in = [q, k, v, dout]
                if layout == "zigzag":
                    args_in = [to_zigzag(x, 1, n) for x in args_in]
                args_in = [jax.device_put(x, seq_sharding) for x in args_in]
                kw = dict(mesh=mesh, mode=mode, causal=True, layout=layout)
                if mode == "2d":
                    kw["ulysses_size"] = 2
                fn = grad_fn(lambda q, k, v, kw=kw: sequence_parallel_attention(q, k, v, **kw))
                row[f"{name}_s"] = median_time(fn, args_in, args.iters)
            except Exception as e:
                row[f"{name}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        result["runs"].append(row)
        print(json.dumps(row), flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
