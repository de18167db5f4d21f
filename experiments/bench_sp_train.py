"""Sequence-parallel LLM training across the GPUs of one host (model level).

One training step of `jaxstack.train.step` (Qwen2.5-1.5B shape, bf16 compute over float32
master weights, AdamW, full remat, batch 1, one long sequence) with the mesh's `sequence` axis
over the local GPUs, attention routed by `use_sequence_parallel(mode)`:

* modes: Ulysses, ring and 2D (ring groups x Ulysses 2) at one length (--compare-seq);
* scaling: 1 GPU at --base-seq tokens vs N GPUs at N x base-seq (fixed tokens per GPU), as
  tokens/s and as model FLOP/s per GPU (the attention FLOPs per token grow with the length, so
  tokens/s alone understates the scaling);
* long: tokens/s at each of --long-seqs on N GPUs (default mode);
* fit: the largest of --fit-seqs whose step compiles within the device memory, on 1 GPU and on
  N GPUs (XLA's memory analysis of the compiled step; not run).

FLOPs per token: 6 * N_matmul + 6 * L * T * Nq * H (causal attention, forward + backward; remat
recompute not counted). Every configuration is appended to the JSON as it finishes, so a run cut
short keeps what it measured. Writes experiments/results/sp_train.json.

    python experiments/bench_sp_train.py [--compare-seq 65536] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from bench_llm_train import flops_per_token  # same formula as the single-GPU benchmark
from flax import nnx

from jaxstack.models.llm import LLMConfig, init_llm
from jaxstack.parallel import make_mesh, use_sequence_parallel
from jaxstack.parallel.mesh import shard_model
from jaxstack.train.step import (
    OptimConfig,
    init_train_state,
    make_optimizer,
    make_train_step,
    place_batch,
)


class Bench:
    def __init__(
        self,
        cfg: LLMConfig,
        dtype,
        remat: str,
        iters: int,
        out: Path,
        meta: dict,
        layout: str = "contiguous",
    ):
        self.cfg, self.iters, self.out, self.layout = cfg, iters, out, layout
        model = init_llm(cfg, seed=0, dtype=dtype, param_dtype=jnp.float32, remat=remat)
        # Host copy: the train step donates its state, so every configuration starts from fresh
        # device buffers of the same initial weights.
        self.graphdef, state = nnx.split(model)
        self.state0 = jax.device_get(state)
        del model, state
        self.opt = make_optimizer(OptimConfig(lr=1e-5, warmup_steps=10, total_steps=1000))
        self.result = {**meta, "runs": []}

    def _setup(self, n_dev: int, seq: int):
        mesh = make_mesh(f"sequence={n_dev}", jax.devices()[:n_dev]) if n_dev > 1 else None
        model = nnx.merge(self.graphdef, jax.device_put(self.state0))
        if mesh is not None:
            model = shard_model(model, mesh)
        state, shardings = init_train_state(model, self.opt, mesh)
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        step = make_train_step(graphdef, rest, self.opt, mesh=mesh, state_sh=shardings)
        ids = np.random.default_rng(seq).integers(0, self.cfg.vocab_size, (1, seq + 1))
        batch = place_batch(
            mesh,
            {
                "input_ids": ids[:, :-1].astype(np.int32),
                "targets": ids[:, 1:].astype(np.int32),
                "loss_mask": np.ones((1, seq), np.float32),
            },
        )
        return step, state, batch

    def record(self, row: dict) -> dict:
        self.result["runs"].append(row)
        self.out.write_text(json.dumps(self.result, indent=2) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "step_s_all"}), flush=True)
        return row

    def time_step(self, group: str, n_dev: int, seq: int, mode: str, ulysses: int | None):
        row = dict(group=group, devices=n_dev, seq=seq, mode=mode if n_dev > 1 else "none")
        if ulysses:
            row["ulysses_size"] = ulysses
        try:
            with use_sequence_parallel(
                "auto" if n_dev == 1 else mode, ulysses_size=ulysses, layout=self.layout
            ):
                step, state, batch = self._setup(n_dev, seq)
                t0 = time.perf_counter()
                state, m = step(state, batch)
                jax.block_until_ready(m["loss"])
                row["compile_and_first_s"] = time.perf_counter() - t0
                state, m = step(state, batch)  # one untimed step more
                times = []
                for _ in range(self.iters):
                    t0 = time.perf_counter()
                    state, m = step(state, batch)
                    jax.block_until_ready(m["loss"])
                    times.append(time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 -- an out-of-memory step is a result here
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
            return self.record(row)
        finally:
            gc.collect()
        med = statistics.median(times)
        fpt = flops_per_token(self.cfg, seq)
        row.update(
            step_s_median=med,
            step_s_all=times,
            loss=float(m["loss"]),
            tokens_per_s=seq / med,
            model_tflops_per_s_per_gpu=fpt * seq / med / n_dev / 1e12,
        )
        return self.record(row)

    def fits(self, n_dev: int, seq: int, mode: str) -> dict:
        """Compile (not run) one step; XLA's memory analysis against the device's memory."""
        row = dict(group="fit", devices=n_dev, seq=seq, mode=mode if n_dev > 1 else "none")
        try:
            with use_sequence_parallel("auto" if n_dev == 1 else mode, layout=self.layout):
                step, state, batch = self._setup(n_dev, seq)
                compiled = step.lower(state, batch).compile()
            mem = compiled.memory_analysis()
            need = sum(
                getattr(mem, k, 0) or 0
                for k in (
                    "argument_size_in_bytes",
                    "output_size_in_bytes",
                    "temp_size_in_bytes",
                    "generated_code_size_in_bytes",
                )
            ) - (getattr(mem, "alias_size_in_bytes", 0) or 0)
            limit = (jax.devices()[0].memory_stats() or {}).get("bytes_limit")
            row.update(bytes_needed=int(need), bytes_limit=limit)
            row["fits"] = bool(limit and need <= limit)
        except Exception as e:  # noqa: BLE001
            row.update(fits=False, error=f"{type(e).__name__}: {str(e).splitlines()[0][:300]}")
        finally:
            gc.collect()
        return self.record(row)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="qwen2.5-1.5b")
    ap.add_argument("--compare-seq", type=int, default=65536)
    ap.add_argument("--modes", default="ulysses,ring,2d")
    ap.add_argument("--base-seq", type=int, default=16384, help="tokens per GPU for scaling")
    ap.add_argument("--long-seqs", default="131072,262144")
    ap.add_argument("--fit-seqs", default="", help="e.g. 131072,262144,524288 (compile only)")
    ap.add_argument("--fit-max-one", type=int, default=1 << 30, help="longest fit probe on 1 GPU")
    ap.add_argument("--layout", default="contiguous", choices=["contiguous", "zigzag"])
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny model, float32 (CPU check)")
    ap.add_argument("--out", default="experiments/results/sp_train.json")
    args = ap.parse_args(argv)
    n = jax.device_count() if not args.quick else min(4, jax.device_count())
    if args.quick:
        cfg, dtype = LLMConfig.preset("tiny"), jnp.float32
        args.compare_seq, args.base_seq, args.long_seqs, args.iters = 256, 64, "512", 1
        args.fit_seqs = args.fit_seqs and "256"
    else:
        cfg, dtype = LLMConfig.preset(args.preset), jnp.bfloat16
    ints = lambda s: [int(x) for x in s.split(",") if x]
    meta = dict(
        benchmark="sequence_parallel_train",
        device=jax.devices()[0].device_kind,
        num_devices=n,
        jax_version=jax.__version__,
        preset="tiny" if args.quick else args.preset,
        layers=cfg.num_layers,
        heads=cfg.num_heads,
        kv_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim,
        dtype=jnp.dtype(dtype).name,
        remat="full",
        batch=1,
        layout=args.layout,
        note="ring and 2d blocks: cuDNN with external softmax statistics where available",
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    bench = Bench(cfg, dtype, "full", args.iters, Path(args.out), meta, args.layout)
    rows = {}
    for mode in [m for m in args.modes.split(",") if m]:
        uly = 2 if mode == "2d" else None
        if mode == "2d" and (n < 4 or n % 2):
            continue
        rows[mode] = bench.time_step("modes", n, args.compare_seq, mode, uly)
    one = many = {"error": "skipped"}
    if args.base_seq > 0:
        one = bench.time_step("scaling", 1, args.base_seq, "auto", None)
    ok = {k: r for k, r in rows.items() if "error" not in r}
    if args.base_seq * n == args.compare_seq and ok:  # already measured: the fastest mode
        many = min(ok.values(), key=lambda r: r["step_s_median"])
    elif args.base_seq > 0:
        many = bench.time_step("scaling", n, args.base_seq * n, "auto", None)
    if "error" not in one and "error" not in many:
        bench.result["scaling"] = dict(
            tokens_per_gpu=args.base_seq,
            tokens_per_s_efficiency=many["tokens_per_s"] / (n * one["tokens_per_s"]),
            flops_efficiency=many["model_tflops_per_s_per_gpu"] / one["model_tflops_per_s_per_gpu"],
            multi_gpu_mode=many["mode"],
        )
    if {"ring", "2d"} <= ok.keys():
        bench.result["2d_over_ring"] = ok["ring"]["step_s_median"] / ok["2d"]["step_s_median"]
    if {"ring", "ulysses"} <= ok.keys():
        bench.result["ulysses_over_ring"] = (
            ok["ring"]["step_s_median"] / ok["ulysses"]["step_s_median"]
        )
    for seq in ints(args.long_seqs):
        bench.time_step("long", n, seq, "auto", None)
    for devs in sorted({1, n}):
        for seq in [x for x in ints(args.fit_seqs) if devs > 1 or x <= args.fit_max_one]:
            if not bench.fits(devs, seq, "auto")["fits"]:
                break
    bench.out.write_text(json.dumps(bench.result, indent=2) + "\n")
    print("\n== summary ==")
    for r in bench.result["runs"]:
        extra = r.get("error", "")[:60] or (
            f"{r['step_s_median'] * 1e3:9.1f} ms {r['tokens_per_s']:9.0f} tok/s "
            f"{r['model_tflops_per_s_per_gpu']:6.1f} TF/s/GPU"
            if "step_s_median" in r
            else f"fits={r.get('fits')} need {r.get('bytes_needed', 0) / 2**30:.1f} GiB"
        )
        print(f"{r['group']:<8}{r['devices']:>3} GPU {r['seq']:>8} {r['mode']:<8} {extra}")
    for k in ("scaling", "2d_over_ring", "ulysses_over_ring"):
        if k in bench.result:
            print(k, bench.result[k])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
