"""RL step time against video frames, MR-SP embedding cache on vs off, on the product's step.

Times `jaxstack rl`'s own step (`jaxstack.rl.trainer.build_rl` + `rl_step`) on ONE device, with
the job config of configs/rl_nvila_qwen2.5-1.5b.yaml (so400m-448 tower, 2x2 projector, 8-frame
temporal pooling: video rows = frames / 8 * 257; Qwen2.5-1.5B-shape LLM; bf16 compute over
float32 master weights + AdamW; remat full; k3 KL to the reference policy) and these overrides:
P prompts per step (default 1), G samples (4), N new tokens (64), F frames, `--set key=value`
for any other key. The policy is a random NVILA checkpoint written with `jaxstack.hf.save_nvila`
and loaded by `build_rl` as a real start checkpoint; the data set is P synthetic mp4 clips
(`jaxstack.data.synth_video`, eval split 0), so every step sees the same P prompts.

Modes (one `build_rl` per frame count; the mode sets `setup.cache.enabled`, which is exactly what
`cache_embeddings` passes to `VideoEmbeddingCache`):
  on   MR-SP stage 1: each clip is encoded once (in the warm-up step); the timed steps read the
       cached embeddings.
  off  `cache_embeddings=false`: every step re-encodes its P clips (host frames -> device ->
       tower + projector + pooling). Within a step the product encodes each clip ONCE and the
       rollout, old log-prob pass and update all reuse it in both modes; so "off" costs one
       encode per prompt per step, not one per pass or per row.
Phases (seconds of one step; each wrapped call ends in `block_until_ready`: host syncs that the
job's own step does not have):
  video     `setup.prompts.step` (cache lookup, or clip load + encode on a miss)
  rollout   the rest of `rl_batch`: prompt embeddings, `jaxstack.generate.rollout` (G samples,
            one prefill per prompt), decoding, rewards, advantages
  old_logp  `setup.logp_fn` (only when algo.update_epochs * algo.minibatches > 1)
  update    `setup.update` calls (the sharded policy update; the reference log-probs for the KL
            term run inside it)
  total     the whole `rl_step`
Medians of --iters steps per mode (experiments/timing.py); the first mode of a frame count runs
--warmup untimed steps first (they compile every program; the other mode reuses them).

Known limits of the product at long clips (reported in the JSON, not worked around here): the
rollout prefills the whole prompt in one call (build_rl sets no RolloutConfig.prefill_chunk),
and the update has no row micro-batching
(`trainer.make_update` passes no grad_accum: all P*G rows of a minibatch in one
forward/backward). A phase that runs out of memory is recorded as
"oom" with its phase.

    python experiments/bench_mrsp.py            # GPU: 256,1024 frames -> results/mrsp.json
    python experiments/bench_mrsp.py --frames 1024 --append --work-dir /tmp/mrsp  # one more
    python experiments/bench_mrsp.py --tiny     # CPU smoke test (tiny-video VLM), writes nothing
--work-dir keeps the start checkpoint and clips for the next call (default: a temp dir).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
from flax import nnx
from timing import timed  # the benchmarks' one timing helper

from jaxstack.config import load_config
from jaxstack.data.synth_video import synth_video_dataset
from jaxstack.hf import save_nvila
from jaxstack.models.vlm import NVILA, VLMConfig
from jaxstack.parallel.mesh import make_mesh
from jaxstack.rl import trainer

ROOT = Path(__file__).resolve().parent.parent
PHASES = ("video", "rollout", "old_logp", "update")


def log(msg: str) -> None:
    print(f"[bench_mrsp {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def error_text(e: BaseException) -> str:
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "oom"
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:300]}"


class PhaseClock:
    """Seconds per phase of the current step, from wrapped step pieces."""

    def __init__(self):
        self.t: dict[str, float] = collections.defaultdict(float)
        self.current = "build"

    def wrap(self, phase: str, fn):
        def run(*args, **kwargs):
            self.current = phase
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn(*args, **kwargs))
            self.t[phase] += time.perf_counter() - t0
            self.current = "rollout"  # what runs between the wrapped pieces
            return out

        return run


class TimedPrompts:
    """`setup.prompts` with its `step` timed as the video phase (other attributes delegated)."""

    def __init__(self, inner, clock: PhaseClock):
        self.inner, self.step = inner, clock.wrap("video", inner.step)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def job_config(args, frames: int, work: str) -> trainer.RLJobConfig:
    """The job's config: the real job file plus the benchmark's sizes and paths."""
    base = "rl_tiny.yaml" if args.tiny else "rl_nvila_qwen2.5-1.5b.yaml"
    overrides = [
        f"output_dir={work}/run",
        f"sft.data.dir={work}/data_p{args.prompts}",
        "sft.data.synth_num=0",
        "sft.data.tokenizer=byte",
        f"sft.data.num_frames={frames}",
        f"prompts_per_step={args.prompts}",
        f"rollout.num_samples={args.samples}",
        f"rollout.max_new_tokens={args.new_tokens}",
        "algo.minibatches=1",
        f"algo.overlong_buffer={args.new_tokens // 4}",
        "eval=0",
        *args.set,
    ]
    cfg = load_config(trainer.RLJobConfig, ROOT / "configs" / base, overrides)
    # the start checkpoint: random weights in the shapes of the job's model preset
    return dataclasses.replace(cfg, init_from=f"{work}/ckpt_{cfg.sft.model.name}").resolved()


def prepare(args, work: str) -> VLMConfig:
    """The random NVILA start checkpoint and the P synthetic clips (kept if already in work)."""
    cfg = job_config(args, 8, work)
    vcfg = VLMConfig.preset(cfg.sft.model.name)
    if not os.path.isfile(os.path.join(cfg.init_from, "config.json")):
        dtype = cfg.policy.compute_dtype
        model = NVILA(vcfg, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))
        save_nvila(model, cfg.init_from)
        del model
        gc.collect()
    data = cfg.sft.data
    if not os.path.isfile(os.path.join(data.dir, "train.jsonl")):
        synth_video_dataset(
            data.dir, args.prompts, frames=64, size=data.image_size, eval_fraction=0
        )
    return vcfg


def measure(setup, clock: PhaseClock, mode: str, warmup: int, iters: int) -> dict:
    """Median phase seconds of `iters` steps in `mode` after `warmup` untimed steps."""
    setup.cache.enabled = mode == "on"
    cache, holder, per_step = setup.cache, {"state": setup.state, "i": 0}, []
    setup.state = None  # donated step by step

    def step():
        clock.t.clear()
        calls, hits, t0 = cache.encoder_calls, cache.hits, time.perf_counter()
        holder["state"], row, _ = trainer.rl_step(setup, holder["state"], holder["i"])
        total = time.perf_counter() - t0
        holder["i"] += 1
        t = {p: clock.t.get(p, 0.0) for p in PHASES if p != "rollout"}
        t["rollout"] = total - sum(t.values())
        per_step.append(
            {**t, "total": total, "loss": row["loss"], "encodes": cache.encoder_calls - calls}
        )
        per_step[-1]["hits"] = cache.hits - hits
        return holder["state"].step

    try:
        timed(step, warmup=warmup, repeats=iters)
    finally:
        setup.state = holder["state"]
    warm, steps = per_step[:warmup], per_step[warmup:]
    out = {f"{k}_s": statistics.median(s[k] for s in steps) for k in (*PHASES, "total")}
    out["total_s_all"] = [s["total"] for s in steps]
    out["warmup_s_all"] = [s["total"] for s in warm]
    for k in ("encodes", "hits"):  # encoder calls / cache hits per timed step (and warm-up)
        out[f"{k}_per_step"] = [s[k] for s in steps]
        out[f"warmup_{k}"] = sum(s[k] for s in warm)
    out["loss"] = per_step[-1]["loss"]
    return out


def peak_bytes() -> int | None:
    try:
        return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:
        return None


def run_frames(args, frames: int, work: str, modes: list[str]) -> list[dict]:
    cfg = job_config(args, frames, work)
    clock = PhaseClock()
    rows, base = [], {"frames": frames}
    try:
        t0 = time.perf_counter()
        setup = trainer.build_rl(cfg, cfg.init_from, make_mesh(cfg.mesh or None))
        base.update(video_rows=setup.n_media, build_s=time.perf_counter() - t0)
    except Exception as e:
        return [{**base, "mode": m, "status": error_text(e), "phase": "build"} for m in modes]
    setup.prompts = TimedPrompts(setup.prompts, clock)
    setup.update = clock.wrap("update", setup.update)
    setup.logp_fn = clock.wrap("old_logp", setup.logp_fn)
    shared_error = None
    for mode in modes:
        if shared_error is not None:
            rows.append({**base, "mode": mode, **shared_error, "inferred": True})
            continue
        log(f"frames {frames} ({setup.n_media} video rows): mode {mode}")
        warmup = args.warmup if mode == modes[0] else 0  # the first mode compiled everything
        try:
            r = {**base, "mode": mode, "status": "ok"}
            r.update(measure(setup, clock, mode, warmup, args.iters), warmup=warmup)
            r["peak_bytes_in_use_so_far"] = peak_bytes()
        except Exception as e:
            r = {**base, "mode": mode, "status": error_text(e), "phase": clock.current}
            if clock.current != "video":  # a program both modes run (state may be donated)
                shared_error = {"status": r["status"], "phase": clock.current}
        log(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}))
        rows.append(r)
    del setup
    gc.collect()
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", default="256,1024", help="comma-separated frame counts")
    ap.add_argument("--modes", default="on,off")
    ap.add_argument("--prompts", type=int, default=1, help="P prompts per step")
    ap.add_argument("--samples", type=int, default=4, help="G samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="N max new tokens")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per mode")
    ap.add_argument("--iters", type=int, default=3, help="timed steps per mode (median)")
    ap.add_argument("--set", action="append", default=[], help="extra job override key=value")
    ap.add_argument("--work-dir", default="", help="checkpoint + clips (default: a temp dir)")
    ap.add_argument("--tiny", action="store_true", help="tiny-video VLM, CPU smoke test")
    ap.add_argument("--out", default=str(ROOT / "experiments/results/mrsp.json"))
    ap.add_argument("--append", action="store_true", help="keep --out's other frame counts")
    ap.add_argument("--compile-cache", default="", help="persistent XLA compilation cache dir")
    args = ap.parse_args(argv)
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    if args.tiny:
        if args.frames == ap.get_default("frames"):
            args.frames = "16,32"
        args.new_tokens = min(args.new_tokens, 8)
        args.iters = min(args.iters, 2)
    frames_list = [int(f) for f in args.frames.split(",") if f]
    modes = sorted((m for m in args.modes.split(",") if m), key=lambda m: m != "on")  # on first
    if not set(modes) <= {"on", "off"}:
        raise SystemExit(f"--modes: on and/or off, got {args.modes!r}")
    dev = jax.devices()[0]
    log(f"device {dev.device_kind}, jax {jax.__version__}, frames {frames_list}, modes {modes}")
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_mrsp_")
    t0 = time.perf_counter()
    rows, stopped = [], set()
    try:
        vcfg = prepare(args, work)
        log(f"start checkpoint and {args.prompts} clips ready in {time.perf_counter() - t0:.0f}s")
        for frames in frames_list:
            live = [m for m in modes if m not in stopped]
            rows += [{"frames": frames, "mode": m, "status": "skipped"} for m in stopped]
            if live:
                new = run_frames(args, frames, work, live)
                stopped |= {r["mode"] for r in new if r["status"] != "ok"}
                rows += new
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    out = Path(args.out)
    if args.append and out.is_file():  # keep the other frame counts of an earlier run
        old = json.loads(out.read_text())
        if old.get("device") == dev.device_kind:
            rows = [r for r in old["rows"] if r["frames"] not in frames_list] + rows
            rows.sort(key=lambda r: (r["frames"], r["mode"] != "on"))
    by = {(r["frames"], r["mode"]): r for r in rows}
    ratios = [
        {"frames": f, "off_over_on": by[f, "off"]["total_s"] / by[f, "on"]["total_s"]}
        for f in sorted({r["frames"] for r in rows})
        if by.get((f, "on"), {}).get("status") == by.get((f, "off"), {}).get("status") == "ok"
    ]
    cfg = job_config(args, frames_list[0], work)
    result = {
        "benchmark": "mrsp",
        "code_path": "jaxstack.rl.trainer.build_rl + rl_step (the `jaxstack rl` step)",
        "device": dev.device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "config": {
            "job_config": "rl_tiny.yaml" if args.tiny else "rl_nvila_qwen2.5-1.5b.yaml",
            "model": cfg.sft.model.name,
            "llm_params": vcfg.llm.num_params(),
            "image_size": cfg.sft.data.image_size,
            "tokens_per_frame": vcfg.tokens_per_frame,
            "frames_per_group": vcfg.frames_per_group,
            "prompts": args.prompts,
            "samples": args.samples,
            "new_tokens": args.new_tokens,
            "policy": dataclasses.asdict(cfg.policy),
            "kl_coef": cfg.algo.kl_coef,
            "overrides": args.set,
            "warmup": args.warmup,
            "iters": args.iters,
            "weights": "random (save_nvila, loaded by build_rl)",
        },
        "product_limits": [
            "rollout prefill in one call (build_rl sets no RolloutConfig.prefill_chunk)",
            "no row micro-batching in the update: trainer.make_update passes no grad_accum to"
            " step.make_update (all P*G rows of a minibatch in one forward/backward)",
        ],
        "rows": rows,
        "ratios": ratios,
        "wall_s": time.perf_counter() - t0,
    }
    if jax.default_backend() == "gpu" and not args.tiny:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {out}")
    cols = (*PHASES, "total")
    print(
        f"\n== RL step, seconds ({dev.device_kind}, P={args.prompts} G={args.samples} "
        f"N={args.new_tokens}) =="
    )
    print("frames  mode  " + "".join(f"{p:>10s}" for p in cols) + "  status")
    for r in rows:
        ok = r["status"] == "ok"
        cells = "".join(f"{r[p + '_s']:10.3f}" for p in cols) if ok else " " * 10 * len(cols)
        print(f"{r['frames']:6d}  {r['mode']:4s}  {cells}  {r['status']} {r.get('phase', '')}")
    for q in ratios:
        print(f"frames {q['frames']}: off/on = {q['off_over_on']:.2f}x")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    sys.exit(main())
