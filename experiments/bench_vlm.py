"""NVILA inference on one GPU: vision-tower throughput, LLM prefill with/without compression.

1. Vision: frames/s of SigLIP so400m-patch14-448 (27 layers, features = hidden_states[-2], so 26
   run) + the 2x2 projector (1024 -> 256 tokens, D = 3584), bf16, jitted, per batch size.
2. Prefill: latency of a Qwen2.5-7B-shape LLM (bf16, random weights) on a video prompt given
   as inputs_embeds [1, L, D]; hidden states of the whole prompt, logits of the last position
   only (`hidden_states` + `logits(h[:, -1:])`), jitted, cuDNN attention on GPU. Prompt
   lengths (T frames, n tokens/frame, G = groups after temporal pooling, + text tokens):
     nvila          2x2 + temporal pool 8: G = T/8 groups * (256 + 1 "\\n")  (8224 @ T=256)
     spatial_only   2x2, no temporal pool: T * (256 + 1)                      (65792 @ T=256)
     uncompressed   no 2x2, no pooling:    T * (1024 + 1)                     (262400 @ T=256)
   uncompressed (and nvila, for the ratio) also run at fewer frames (default 64). Cases
   that do not fit record "oom" (XLA RESOURCE_EXHAUSTED), other failures the error's first
   line; once a length runs out of memory, longer ones are skipped. Ratios are prefill latency
   relative to `nvila` at the same frame count. An end-to-end estimate adds
   the vision time for T frames (identical for all variants: every frame is encoded).

Writes experiments/results/vlm.json only when running on a GPU (not with --tiny).
    python experiments/bench_vlm.py [--frames 256] [--text 64] [--vision-batches 32,64]
    python experiments/bench_vlm.py --tiny      # tiny configs, CPU smoke test, writes nothing
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx
from timing import timed  # the benchmarks' one timing helper

from jaxstack.models.llm import LLMConfig, init_llm
from jaxstack.models.nvila_connector import Projector2x2, tokens_to_map
from jaxstack.models.siglip import SiglipConfig, SiglipVisionTower
from jaxstack.models.vlm import VLMConfig


def log(msg: str) -> None:
    print(f"[bench_vlm {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _error(e: Exception) -> str:
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "oom"
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}"


class VisionStack(nnx.Module):
    """SigLIP tower (features = hidden_states[-2]) + 2x2 projector, as NVILA runs per frame."""

    def __init__(self, vision: SiglipConfig, llm_dim: int, *, rngs: nnx.Rngs):
        kw = dict(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, rngs=rngs)
        self.tower = SiglipVisionTower(vision, select_layer=-2, **kw)
        self.projector = Projector2x2(vision.hidden_size, llm_dim, **kw)

    def __call__(self, pixels_bhwc: jax.Array) -> jax.Array:
        return self.projector(tokens_to_map(self.tower(pixels_bhwc)))


def bench_vision(vcfg: VLMConfig, batches: list[int], iters: int) -> list[dict]:
    stack = VisionStack(vcfg.vision, vcfg.llm.hidden_size, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(stack)
    fwd = jax.jit(lambda st, x: nnx.merge(graphdef, st)(x))
    s = vcfg.vision.image_size
    out = []
    for b in batches:
        log(f"vision: batch {b} at {s}px")
        try:
            x = jax.random.normal(jax.random.key(b), (b, s, s, 3), jnp.bfloat16)
            t0 = time.perf_counter()
            y = jax.block_until_ready(fwd(state, x))
            first = time.perf_counter() - t0
            assert y.shape == (b, vcfg.tokens_per_frame, vcfg.llm.hidden_size), y.shape
            times: list[float] = []
            med = timed(fwd, state, x, warmup=1, repeats=iters, times=times)
            r = {
                "batch": b,
                "ms_median": 1e3 * med,
                "ms_all": [1e3 * t for t in times],
                "frames_per_s": b / med,
                "first_call_s": first,
                "tokens_per_frame_out": vcfg.tokens_per_frame,
            }
            del x, y
        except Exception as e:  # OOM and the like: record and go on
            r = {"batch": b, "error": _error(e)}
        log(json.dumps({k: v for k, v in r.items() if k != "ms_all"}))
        out.append(r)
    return out


def prompt_cases(vcfg: VLMConfig, frames: int, text: int, extra_frames: list[int]) -> list[dict]:
    """Prompt lengths of the compared token layouts (see the module docstring)."""
    n2 = vcfg.tokens_per_frame  # after 2x2
    n1 = vcfg.vision.num_patches  # no spatial compression
    fpg = vcfg.frames_per_group
    groups = -(-frames // fpg)
    cases = [
        dict(name="nvila", frames=frames, video_tokens=groups * (n2 + 1)),
        dict(name="spatial_only", frames=frames, video_tokens=frames * (n2 + 1)),
    ]
    for t in sorted(set(extra_frames + [frames])):
        cases.append(dict(name="uncompressed", frames=t, video_tokens=t * (n1 + 1)))
    for t in extra_frames:  # the NVILA reference point at the same frame count
        if t != frames:
            cases.append(dict(name="nvila", frames=t, video_tokens=-(-t // fpg) * (n2 + 1)))
    for c in cases:
        c["text_tokens"] = text
        c["length"] = c["video_tokens"] + text
    return sorted(cases, key=lambda c: c["length"])


def bench_prefill(llm_cfg: LLMConfig, cases: list[dict], iters: int, long_s: float) -> list[dict]:
    model = init_llm(llm_cfg, seed=0, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    graphdef, state = nnx.split(model)
    del model

    def prefill(st, x):
        m = nnx.merge(graphdef, st)
        h = m.hidden_states(inputs_embeds=x)
        return m.logits(h[:, -1:])[:, 0]  # [B, V]: next-token logits only

    fn = jax.jit(prefill)
    out = []
    oom_from = None  # once a length OOMs, longer ones are not tried
    for c in cases:
        r = dict(c)
        if oom_from is not None and c["length"] >= oom_from:
            r["error"] = "oom"
            r["skipped"] = f"not run: length {oom_from} already ran out of memory"
            log(f"prefill {c['name']} T={c['frames']} L={c['length']}: skipped (oom below)")
            out.append(r)
            continue
        log(f"prefill {c['name']} T={c['frames']} L={c['length']}")
        try:
            x = jax.random.normal(
                jax.random.key(c["length"]), (1, c["length"], llm_cfg.hidden_size), jnp.bfloat16
            )
            t0 = time.perf_counter()
            y = jax.block_until_ready(fn(state, x))
            first = time.perf_counter() - t0
            assert y.shape == (1, llm_cfg.vocab_size), y.shape
            r["logits_finite"] = bool(jnp.isfinite(y).all())
            n = 1 if first > long_s else iters  # long prompts: one timed call after the compile
            times: list[float] = []
            med = timed(fn, state, x, warmup=0 if n == 1 else 1, repeats=n, times=times)
            r.update(
                ms_median=1e3 * med,
                ms_all=[1e3 * t for t in times],
                tokens_per_s=c["length"] / med,
                first_call_s=first,
            )
            del x, y
        except Exception as e:
            r["error"] = _error(e)
            if r["error"] == "oom":
                oom_from = c["length"]
        log(json.dumps({k: v for k, v in r.items() if k != "ms_all"}))
        out.append(r)
    return out


def add_ratios(runs: list[dict], vision: list[dict]) -> None:
    """Prefill ratio vs `nvila` at the same frame count, and vision + prefill estimates."""
    fps = max((v["frames_per_s"] for v in vision if "frames_per_s" in v), default=None)
    ref = {r["frames"]: r["ms_median"] for r in runs if r["name"] == "nvila" and "ms_median" in r}
    for r in runs:
        if "ms_median" not in r:
            continue
        if r["frames"] in ref:
            r["prefill_ratio_vs_nvila"] = r["ms_median"] / ref[r["frames"]]
        if fps:
            r["vision_ms_est"] = 1e3 * r["frames"] / fps
            r["vision_plus_prefill_ms_est"] = r["vision_ms_est"] + r["ms_median"]
    for r in runs:
        base = next((b for b in runs if b["name"] == "nvila" and b["frames"] == r["frames"]), None)
        if base and "vision_plus_prefill_ms_est" in r and "vision_plus_prefill_ms_est" in base:
            r["end_to_end_ratio_vs_nvila"] = (
                r["vision_plus_prefill_ms_est"] / base["vision_plus_prefill_ms_est"]
            )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=256, help="video frames (NVILA: 256)")
    ap.add_argument("--extra-frames", default="64", help="also run uncompressed at these T")
    ap.add_argument("--text", type=int, default=64, help="text tokens added to each prompt")
    ap.add_argument("--vision-batches", default="32,64")
    ap.add_argument("--iters", type=int, default=3, help="timed repetitions per case")
    ap.add_argument(
        "--long-s",
        type=float,
        default=20.0,
        help="cases whose first (compiling) call exceeds this get 1 timed call",
    )
    ap.add_argument("--skip-vision", action="store_true")
    ap.add_argument("--skip-prefill", action="store_true")
    ap.add_argument("--tiny", action="store_true", help="tiny configs for a CPU smoke test")
    ap.add_argument("--out", default="experiments/results/vlm.json")
    args = ap.parse_args(argv)
    if args.tiny:
        vcfg = VLMConfig.preset("tiny")
        args.frames, args.extra_frames, args.text = 16, "8", 8
        args.vision_batches, args.iters = "4,8", 2
    else:
        vcfg = VLMConfig(
            vision=SiglipConfig.preset("so400m-patch14-448"),
            llm=LLMConfig.preset("qwen2.5-7b"),
            frames_per_group=8,
            media_token_id=151649,
            separator_token_id=198,
        )
    extra = [int(t) for t in args.extra_frames.split(",") if t]
    dev = jax.devices()[0]
    gpu = jax.default_backend() == "gpu"
    result = {
        "benchmark": "vlm",
        "device": dev.device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "tiny": args.tiny,
        "dtype": "bfloat16 (params and compute), random weights",
        "vision": {
            "hidden_size": vcfg.vision.hidden_size,
            "num_layers": vcfg.vision.num_layers,
            "layers_run": vcfg.vision.num_layers - 1,
            "image_size": vcfg.vision.image_size,
            "patch_size": vcfg.vision.patch_size,
            "tokens_per_frame_in": vcfg.vision.num_patches,
            "tokens_per_frame_out": vcfg.tokens_per_frame,
        },
        "llm": {
            "preset": "tiny" if args.tiny else "qwen2.5-7b",
            "hidden_size": vcfg.llm.hidden_size,
            "num_layers": vcfg.llm.num_layers,
            "num_params": vcfg.llm.num_params(),
        },
        "frames": args.frames,
        "frames_per_group": vcfg.frames_per_group,
        "text_tokens": args.text,
        "prefill_definition": "jit(hidden_states(inputs_embeds) -> logits of last position), "
        "batch 1, causal, cuDNN attention on GPU; median over repeats after a compiling call",
        "reference": "NVILA (arXiv 2412.04468) reports 1.6-2.2x lower pre-filling latency",
    }
    vision = []
    if not args.skip_vision:
        batches = [int(b) for b in args.vision_batches.split(",")]
        vision = bench_vision(vcfg, batches, args.iters)
    result["vision_runs"] = vision
    runs = []
    if not args.skip_prefill:
        cases = prompt_cases(vcfg, args.frames, args.text, extra)
        runs = bench_prefill(vcfg.llm, cases, args.iters, args.long_s)
        add_ratios(runs, vision)
    result["prefill_runs"] = runs
    if gpu and not args.tiny:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        log(f"wrote {args.out}")
    else:
        log(f"not writing {args.out} (backend {jax.default_backend()}, tiny={args.tiny})")

    print(f"\n== summary ({dev.device_kind}, jax {jax.__version__}) ==")
    for v in vision:
        if "error" in v:
            print(f"vision b={v['batch']:3d}: {v['error']}")
        else:
            print(
                f"vision b={v['batch']:3d} {v['ms_median']:9.1f} ms  "
                f"{v['frames_per_s']:8.1f} frames/s"
            )
    for r in runs:
        head = f"prefill {r['name']:13s} T={r['frames']:4d} L={r['length']:7d}"
        if "error" in r:
            print(f"{head}: {r['error']}")
            continue
        ratio = r.get("prefill_ratio_vs_nvila")
        e2e = r.get("end_to_end_ratio_vs_nvila")
        print(
            f"{head} {r['ms_median']:10.1f} ms {r['tokens_per_s']:9.0f} tok/s"
            + (f"  {ratio:6.2f}x vs nvila" if ratio else "")
            + (f"  (+vision {e2e:5.2f}x)" if e2e else "")
        )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    sys.exit(main())
