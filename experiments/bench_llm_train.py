"""LLM training and decode throughput on one GPU (jaxstack's foundation benchmark).

Training: tokens/s and MFU of `jaxstack.train.step` for a Qwen2.5-1.5B-shape model at sequence
4096, bf16 compute over float32 master weights, AdamW. Decode: tokens/s of the KV-cache decode
step at batch 1, 16 and 64, against the bound set by reading the bf16 weights once per token at
the measured device copy bandwidth.

FLOPs per trained token (stated formula):
    6 * N_matmul + 6 * L * T * Nq * H          (causal attention: half of 12 * L * T * Nq * H)
    N_matmul = L * (D * H * (2 Nq + 2 Nkv) + 3 * D * F) + D * V   (the LM head counts once)
MFU = FLOPs per token * tokens/s / 989e12 (H100/H200 dense bf16 peak).

Writes experiments/results/llm_train.json. Usage:
    python experiments/bench_llm_train.py [--preset qwen2.5-1.5b] [--seq 4096] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from timing import timed  # the benchmarks' one timing helper

from jaxstack.generate import generate
from jaxstack.models.llm import LLMConfig, init_llm
from jaxstack.quant import apply_precision
from jaxstack.train.step import OptimConfig, init_train_state, make_optimizer, make_train_step

PEAK_BF16 = 989e12


def flops_per_token(cfg: LLMConfig, seq: int) -> float:
    d, f, h, nq, nkv = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.head_dim,
        cfg.num_heads,
        cfg.num_kv_heads,
    )
    n_matmul = cfg.num_layers * (d * h * (2 * nq + 2 * nkv) + 3 * d * f) + d * cfg.vocab_size
    return 6 * n_matmul + 6 * cfg.num_layers * seq * nq * h


def measure_ceilings(small: bool = False) -> dict:
    """Device copy bandwidth (bytes read + written) and bf16 n^3 matmul rate (n = 8192)."""
    key = jax.random.key(0)
    x = jax.random.normal(key, (1 << (20 if small else 30),), jnp.bfloat16)  # 2 GiB on GPU
    copy = jax.jit(lambda a: a * 1.0001)
    t = timed(copy, x, warmup=3, repeats=20)
    bw = 2 * x.nbytes / t
    n = 512 if small else 8192
    a = jax.random.normal(key, (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    mm = jax.jit(lambda a, b: a @ b)
    tm = timed(mm, a, b, warmup=3, repeats=20)
    return {"copy_bytes_per_s": bw, "bf16_matmul_flops_per_s": 2 * n**3 / tm, "matmul_n": n}


def bench_train(
    cfg: LLMConfig, seq: int, micro: int, accum: int, remat: str, iters: int, precision="bf16"
):
    """One training configuration through `jaxstack.train.step`; `precision` as the training
    jobs' `model.precision` (`jaxstack.quant.apply_precision` + `make_optimizer`)."""
    model = init_llm(cfg, seed=0, dtype=jnp.bfloat16, param_dtype=jnp.float32, remat=remat)
    apply_precision(model, precision)
    opt = make_optimizer(OptimConfig(lr=1e-4, warmup_steps=10, total_steps=1000), precision)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    state, _ = init_train_state(model, opt)
    del model
    step = make_train_step(graphdef, rest, opt, grad_accum=accum)
    rng = np.random.default_rng(0)
    gb = micro * accum
    batches = []
    for _ in range(2):  # rotate two random batches (never zeros)
        ids = rng.integers(0, cfg.vocab_size, (gb, seq + 1)).astype(np.int32)
        batches.append(
            {
                "input_ids": jnp.asarray(ids[:, :-1]),
                "targets": jnp.asarray(ids[:, 1:]),
                "loss_mask": jnp.ones((gb, seq), jnp.float32),
            }
        )
    holder = {"state": state, "i": 0}

    def run():
        holder["state"], m = step(holder["state"], batches[holder["i"] % 2])
        holder["i"] += 1
        return m["loss"]

    t0 = time.perf_counter()
    jax.block_until_ready(run())
    compile_s = time.perf_counter() - t0
    times: list[float] = []
    med = timed(run, warmup=2, repeats=iters, times=times)
    loss = float(run())
    tokens = gb * seq
    tps = tokens / med
    fpt = flops_per_token(cfg, seq)
    return {
        "precision": precision,
        "micro_batch": micro,
        "grad_accum": accum,
        "remat": remat,
        "global_batch": gb,
        "tokens_per_step": tokens,
        "step_ms_median": med * 1e3,
        "step_ms_all": [t * 1e3 for t in times],
        "tokens_per_s": tps,
        "flops_per_token": fpt,
        "model_tflops_per_s": fpt * tps / 1e12,
        "mfu": fpt * tps / PEAK_BF16,
        "compile_s": compile_s,
        "final_loss": loss,
    }


def bench_decode(cfg: LLMConfig, batch: int, prompt: int, new: int, copy_bw: float):
    """Greedy decode through `jaxstack.generate.generate` (bf16 weights and KV cache)."""
    model = init_llm(cfg, seed=0, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, prompt).tolist() for _ in range(batch)]
    step_s, prefill_s = [], []
    for i in range(4):  # the first call compiles
        out = generate(model, prompts, max_new_tokens=new, prompt_bucket=prompt)
        assert out.num_steps == new and len(out.tokens) == batch
        if i:
            step_s.append(out.decode_seconds / out.num_steps)
            prefill_s.append(out.prefill_seconds)
    per_step = statistics.median(step_s)
    bound = copy_bw / weight_bytes  # decode steps/s if each step reads the weights once
    return {
        "batch": batch,
        "prompt_len": prompt,
        "new_tokens": new,
        "prefill_ms_median": 1e3 * statistics.median(prefill_s),
        "ms_per_step": per_step * 1e3,
        "ms_per_step_all": [t * 1e3 for t in step_s],
        "tokens_per_s": batch / per_step,
        "weight_bytes": weight_bytes,
        "weight_read_bound_steps_per_s": bound,
        "fraction_of_bound": (1 / per_step) / bound,
    }


def write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2.5-1.5b")
    ap.add_argument("--seq", type=int, default=4096)
    ap.add_argument(
        "--train",
        default="2x1:none,4x1:dots,1x4:none",
        help="comma list of MICROxACCUM:REMAT training configs to try",
    )
    ap.add_argument("--decode-batches", default="1,16,64")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--quick", action="store_true", help="one train config, 3 iters, batch 1")
    ap.add_argument("--out", default="experiments/results/llm_train.json")
    args = ap.parse_args(argv)
    if args.quick:
        args.train, args.iters, args.decode_batches = "1x1:none", 3, "1"
    cfg = LLMConfig.preset(args.preset)
    dev = jax.devices()[0]
    result = {
        "benchmark": "llm_train",
        "device": dev.device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "preset": args.preset,
        "seq_len": args.seq,
        "num_params": cfg.num_params(),
        "peak_bf16_flops_per_s": PEAK_BF16,
        "flops_formula": "6*N_matmul + 6*L*T*Nq*H per token; N_matmul = L*(D*H*(2Nq+2Nkv) + "
        "3*D*F) + D*V",
    }
    result["ceilings"] = measure_ceilings(small=jax.default_backend() == "cpu")
    print(json.dumps(result["ceilings"]), flush=True)
    result["train"] = []
    for spec in args.train.split(","):
        shape, remat = spec.split(":")
        micro, accum = (int(v) for v in shape.split("x"))
        try:
            r = bench_train(cfg, args.seq, micro, accum, remat, args.iters)
        except Exception as e:  # OOM and the like: record and go on
            r = {
                "micro_batch": micro,
                "grad_accum": accum,
                "remat": remat,
                "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}",
            }
        print(json.dumps({k: v for k, v in r.items() if k != "step_ms_all"}), flush=True)
        result["train"].append(r)
        write(args.out, result)
    result["decode"] = []
    for b in (int(v) for v in args.decode_batches.split(",")):
        try:
            r = bench_decode(cfg, b, 128, 256, result["ceilings"]["copy_bytes_per_s"])
        except Exception as e:
            r = {"batch": b, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
        print(json.dumps(r), flush=True)
        result["decode"].append(r)
        write(args.out, result)
    ok = [r for r in result["train"] if "mfu" in r]
    if ok:
        best = max(ok, key=lambda r: r["mfu"])
        result["best_train"] = {
            k: best[k] for k in ("micro_batch", "grad_accum", "remat", "tokens_per_s", "mfu")
        }
    write(args.out, result)
    print("\n== summary ==")
    for r in result["train"]:
        if "mfu" in r:
            print(
                f"train {r['micro_batch']}x{r['grad_accum']} remat={r['remat']:5s} "
                f"{r['step_ms_median']:8.1f} ms  {r['tokens_per_s']:9.0f} tok/s  "
                f"MFU {100 * r['mfu']:.1f}%"
            )
        else:
            print(f"train {r['micro_batch']}x{r['grad_accum']} remat={r['remat']}: {r['error']}")
    for r in result["decode"]:
        if "error" in r:
            print(f"decode b={r['batch']}: {r['error']}")
        else:
            print(
                f"decode b={r['batch']:3d} {r['ms_per_step']:.2f} ms/step "
                f"{r['tokens_per_s']:8.0f} tok/s  {100 * r['fraction_of_bound']:.0f}% of bound"
            )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    sys.exit(main())
