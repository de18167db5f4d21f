"""FP8 vs bf16 on one GPU, in one run: GEMMs by shape and LLM training steps.

GEMMs (y = x @ w, x [M, K] bf16, w [K, N] float32 master weights, as `jaxstack.nn.layers.Dense`
holds them):
  bf16        `jnp.dot(x, w.astype(bf16))` (Dense's plain path)
  fp8         `jaxstack.quant.fp8_matmul(x, w)`: per-tensor current scaling, quantization of both
              operands included (the product path of precision=fp8)
  fp8_raw     `lax.dot_general` of operands already e4m3 with w stored (N, K): the ceiling
  fwd_bwd     value and gradients of sum(y * g) w.r.t. x and w, bf16 vs fp8 (three products)
TFLOP/s = 2 M K N (x 3 for fwd_bwd) / median seconds.

Training (`bench_llm_train.bench_train`, the product's `jaxstack.train.step` with
`apply_precision` + `make_optimizer(precision)`): tokens/s and peak device memory per precision
(bf16, fp8, fp8_coat), each configuration in its own process so `peak_bytes_in_use` is its own.

    python experiments/bench_fp8.py --part gemm --out results/fp8.json
    python experiments/bench_fp8.py --part train --presets qwen2.5-1.5b --out results/fp8.json
Results merge into --out by part and case. --quick: small shapes (CPU smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from timing import timed  # the benchmarks' one timing helper

from jaxstack.quant import E4M3, fp8_matmul, quantize_tensor

GEMM_SHAPES = [  # (M, K, N): square, then Qwen2.5-1.5B / 7B MLP and attention shapes, 16k tokens
    (8192, 8192, 8192),
    (16384, 1536, 8960),
    (16384, 8960, 1536),
    (16384, 1536, 1536),
    (16384, 3584, 18944),
    (16384, 18944, 3584),
    (16384, 3584, 3584),
]
QUICK_SHAPES = [(256, 256, 512)]


def gemm_case(m: int, k: int, n: int, repeats: int) -> dict:
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = 0.02 * jax.random.normal(kw, (k, n), jnp.float32)
    g = jax.random.normal(kg, (m, n), jnp.bfloat16)
    qx, sx = quantize_tensor(x, E4M3)
    qw_nk, sw = quantize_tensor(w.T, E4M3)
    dims = (((1,), (1,)), ((), ()))

    fns = {
        "bf16": jax.jit(lambda x, w: jnp.dot(x, w.astype(jnp.bfloat16))),
        "fp8": jax.jit(lambda x, w: fp8_matmul(x, w)),
    }
    raw = jax.jit(
        lambda a, b, s: (
            jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32) * s
        ).astype(jnp.bfloat16)
    )

    def fwd_bwd(matmul):
        def loss(x, w, g):  # g an argument: a closed-over array would become an HLO constant
            return jnp.sum(matmul(x, w).astype(jnp.float32) * g.astype(jnp.float32))

        return jax.jit(jax.grad(loss, argnums=(0, 1)))

    bwd = {
        "bf16": fwd_bwd(lambda x, w: jnp.dot(x, w.astype(jnp.bfloat16))),
        "fp8": fwd_bwd(lambda x, w: fp8_matmul(x, w)),
    }
    flops = 2 * m * k * n
    out = {"shape": [m, k, n]}
    for name, f in fns.items():
        out[f"{name}_ms"] = 1e3 * timed(f, x, w, warmup=3, repeats=repeats)
    out["fp8_raw_ms"] = 1e3 * timed(raw, qx, qw_nk, sx * sw, warmup=3, repeats=repeats)
    for name, f in bwd.items():
        out[f"{name}_fwd_bwd_ms"] = 1e3 * timed(f, x, w, g, warmup=3, repeats=repeats)
    for key in [k_ for k_ in out if k_.endswith("_ms")]:
        mult = 3 if "fwd_bwd" in key else 1
        out[key.replace("_ms", "_tflops")] = mult * flops / (out[key] * 1e-3) / 1e12
    out["fp8_over_bf16"] = out["bf16_ms"] / out["fp8_ms"]
    out["fp8_over_bf16_fwd_bwd"] = out["bf16_fwd_bwd_ms"] / out["fp8_fwd_bwd_ms"]
    return out


def train_one(preset: str, precision: str, seq: int, micro: int, remat: str, layers: int,
              iters: int) -> dict:  # fmt: skip
    from bench_llm_train import bench_train

    from jaxstack.models.llm import LLMConfig

    over = {"num_layers": layers} if layers else {}
    cfg = LLMConfig.preset(preset, **over)
    try:
        row = bench_train(cfg, seq, micro, 1, remat, iters, precision=precision)
        row["status"] = "ok"
    except Exception as e:  # OOM is a result here
        text = str(e)
        oom = "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()
        row = {"status": ("oom: " if oom else f"{type(e).__name__}: ") + text.splitlines()[0][:200]}
    stats = jax.devices()[0].memory_stats() or {}
    row.update(
        preset=preset, precision=precision, seq=seq, num_layers=cfg.num_layers,
        peak_bytes_in_use=stats.get("peak_bytes_in_use"), bytes_limit=stats.get("bytes_limit"),
    )  # fmt: skip
    return row


def merge(path: Path, part: str, rows: list[dict], meta: dict) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update({k: v for k, v in meta.items()})
    data.setdefault(part, [])
    key = (lambda r: (r.get("preset"), r.get("precision"), r.get("num_layers"), r.get("seq"))) if (
        part == "train"
    ) else (lambda r: tuple(r["shape"]))  # fmt: skip
    keep = {key(r): r for r in data[part]}
    keep.update({key(r): r for r in rows})
    data[part] = list(keep.values())
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", choices=["gemm", "train"], required=True)
    ap.add_argument("--out", default="experiments/results/fp8.json")
    ap.add_argument("--presets", default="qwen2.5-1.5b")
    ap.add_argument("--precisions", default="bf16,fp8,fp8_coat")
    ap.add_argument("--layers", type=int, default=0, help="override num_layers (0 = preset)")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument("--micro", type=int, default=2)
    ap.add_argument("--remat", default="dots")
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--one", action="store_true", help="internal: one training case, JSON out")
    args = ap.parse_args()
    dev = jax.devices()[0]
    meta = {
        "benchmark": "fp8", "device": dev.device_kind, "platform": dev.platform,
        "jax_version": jax.__version__, "python": sys.version.split()[0],
    }  # fmt: skip
    out = Path(args.out)
    if args.one:
        row = train_one(args.presets, args.precisions, args.seq, args.micro, args.remat,
                        args.layers, args.iters)  # fmt: skip
        out.write_text(json.dumps(row) + "\n")
        return 0
    if args.part == "gemm":
        for m, k, n in QUICK_SHAPES if args.quick else GEMM_SHAPES:
            row = gemm_case(m, k, n, 3 if args.quick else args.repeats)
            merge(out, "gemm", [row], meta)  # after every case: a time limit keeps what ran
            print(json.dumps({k_: (round(v, 3) if isinstance(v, float) else v)
                              for k_, v in row.items() if not k_.endswith("_ms")}), flush=True)  # fmt: skip
        return 0
    for preset in args.presets.split(","):
        for precision in args.precisions.split(","):
            tmp = out.with_suffix(f".{preset}.{precision}.tmp")
            cmd = [sys.executable, __file__, "--part", "train", "--one", "--presets", preset,
                   "--precisions", precision, "--seq", str(args.seq), "--micro", str(args.micro),
                   "--remat", args.remat, "--layers", str(args.layers), "--iters",
                   str(args.iters), "--out", str(tmp)]  # fmt: skip
            t0 = time.perf_counter()
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode == 0 and tmp.exists():
                row = json.loads(tmp.read_text())
                tmp.unlink()
            else:
                row = {"preset": preset, "precision": precision, "status": "crashed",
                       "stderr_tail": res.stderr[-600:]}  # fmt: skip
            row["wall_s"] = time.perf_counter() - t0
            merge(out, "train", [row], meta)
            time.sleep(5)  # let the finished process's device memory go back
            short = ("status", "tokens_per_s", "mfu", "peak_bytes_in_use", "step_ms_median")
            print(preset, precision, json.dumps({k: row.get(k) for k in short}), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    sys.exit(main())
