"""RL step time against video frames, with and without MR-SP embedding reuse (Long-RL's table).

jaxstack's version of Long-RL's "time per RL step vs frames, w/o MR-SP / stage 1" figure
(specs/rl.md §5), on ONE GPU: a VLM with the so400m SigLIP tower at 448 px (26 of 27 layers
run, 1024 patches -> 256 tokens after the NVILA 2x2 projector), temporal pooling of 8 frames per
group (video rows = frames / 8 * 257, the "\\n" separator included) and a Qwen2.5-1.5B-shape LLM.
bf16 compute, float32 LLM master weights + AdamW (as `jaxstack rl`), random weights.

One RL step: P prompts (default 1), G samples each (default 4), responses of exactly N tokens
(default 64; no stop token), prompt = video rows + 32 text tokens, no left padding
(`prompt_mask=None` / `input_mask=None` where jaxstack supports it, else an all-True mask: see
"mask_none" in the results). Phases, each jitted and timed to completion (block_until_ready):

  encode    the rollout side encodes each prompt's clip once: frames go through the tower +
            projector in chunks of 64 frames (`frame_tokens`, frozen), each chunk is temporally
            pooled, then the separators are interleaved ([V, D] per clip).
  rollout   prompt embeddings (text embeds + video rows, `merge_multimodal`), then
            `jaxstack.generate.rollout` (one prefill per prompt, KV shared by its G samples,
            `prefill_chunk` if RolloutConfig has it) -> G * N tokens per prompt.
  old_logp  `jaxstack.rl.trainer.response_logprobs` of the P*G rows under the current params.
  ref_logp  the same under the frozen reference params (a float32 copy, as `jaxstack rl`).
  update    one clipped policy-gradient step of the LLM (`policy_loss` with the old / ref
            log-probs, KL k3 coefficient 1e-3), forward + backward with remat="full",
            micro-batched over the rows (gradients summed in a lax.scan), AdamW.

Modes:
  on   (MR-SP stage 1) the encode phase's embeddings are reused by the rollout and all three
       training-side passes (each row reads its prompt's cached [V, D], by reference).
  off  (baseline without embedding reuse) the rollout encodes the clip once as above, and each
       training-side pass (old_logp, ref_logp, update) re-encodes the clip for EACH of its P*G
       rows (vision tower forward only, frozen) before its LLM forward; those re-encodes are
       inside the pass's time (also reported alone as <pass>_reencode_s).
Both modes run the same compiled programs (the LLM passes take per-row video [P*G, V, D]), so
the difference is exactly the re-encoding. Compilation is ahead of time (`lower().compile()`,
reported as compile_s) plus one warm run of the encode chunk and of the rollout per frame count;
then `--iters` timed steps per mode (median; the "on" mode's first step is a discarded warm-up;
a single timed step once a step takes more than `--long-s`). Frame counts run in increasing
order; a mode that runs out of memory (XLA RESOURCE_EXHAUSTED) records "oom" and stops (an OOM
in a program both modes share marks the other mode "oom" too, with "inferred"); frame counts
whose predicted cost (previous frame count's times scaled by (tokens ratio)^1.5) would end past
`--budget-s` seconds from the start are recorded as skipped.

Writes experiments/results/mrsp.json (after every frame count; "complete": true at the end) only
on a GPU backend without --tiny. --append keeps an existing file's rows (same device) for frame
counts not run now, e.g. a second call for the long clips:
    python experiments/bench_mrsp.py                        # 8..1024 (+2048, 3600 if in budget)
    python experiments/bench_mrsp.py --frames 2048,3600 --iters 1 --append --budget-s 1e9
    python experiments/bench_mrsp.py --tiny    # tiny VLM on CPU (frames 8,16,32), writes nothing
Other flags: --samples G, --prompts P, --new-tokens N, --modes on,off, --compile-cache DIR
(persistent XLA cache: a rerun skips compiling), --micro-tokens / --logp-micro-tokens (rows per
micro-batch: the largest divisor of P*G with rows * (T + N) <= that).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxstack.generate.rollout import RolloutConfig, rollout, sequence_logprobs
from jaxstack.models.llm import LLM, LLMConfig
from jaxstack.models.nvila_connector import (
    Projector2x2,
    interleave_separators,
    merge_multimodal,
    temporal_pool,
)
from jaxstack.models.siglip import SiglipVisionTower, siglip_config
from jaxstack.models.vlm import VLMConfig, frame_tokens
from jaxstack.rl.losses import policy_loss
from jaxstack.rl.trainer import AlgoSection, policy_cfg, response_logprobs
from jaxstack.train import step as step_lib
from jaxstack.train.step import OptimConfig, TrainState

PHASES = ("encode", "rollout", "old_logp", "ref_logp", "update")
T0 = time.perf_counter()


def log(msg: str) -> None:
    el = time.perf_counter() - T0
    print(
        f"[bench_mrsp {time.strftime('%H:%M:%S')} +{el:6.0f}s] {msg}", file=sys.stderr, flush=True
    )


def _error(e: BaseException) -> str:
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "oom"
    first = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {first[:300]}"


# -- "no padding" support probes ---------------------------------------------------------------


def probe_mask_none() -> dict:
    """Whether rollout(input_mask=None) and sequence_logprobs(prompt_mask=None) work (the
    "None = no padding" path); where not, the benchmark passes an all-True mask instead (a
    dense [B, 1, T, T] attention mask: expect earlier OOM at long prompts)."""
    llm = LLM(LLMConfig.preset("tiny"), rngs=nnx.Rngs(0))
    embeds = jnp.zeros((1, 8, llm.cfg.hidden_size), jnp.float32)
    out = {}
    # rollout: by signature (input_mask optional, default None); a real tiny rollout would
    # cost a compile.
    param = inspect.signature(rollout).parameters.get("input_mask")
    out["rollout"] = bool(param is not None and param.default is None)
    try:
        jax.eval_shape(
            lambda e: sequence_logprobs(
                llm,
                prompt_embeds=e,
                prompt_mask=None,
                response_tokens=jnp.zeros((2, 3), jnp.int32),
                response_mask=jnp.ones((2, 3), bool),
                prompt_index=jnp.zeros((2,), jnp.int32),
            ),
            embeds,
        )
        out["logprobs"] = True
    except Exception as e:
        out["logprobs"] = False
        out["logprobs_error"] = _error(e)
    return out


def prompt_mask_arg(supported: bool, rows: int, length: int):
    """None (no padding) where supported, else an all-True [rows, length] mask."""
    return None if supported else jnp.ones((rows, length), bool)


# -- the benchmark -----------------------------------------------------------------------------


def aot(fn, *args):
    """(compiled executable, compile seconds) for jitted `fn` at these arguments."""
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    return compiled, time.perf_counter() - t0


def divisor_rows(total_rows: int, length: int, token_budget: int) -> int:
    """Rows per micro-batch: the largest divisor of total_rows with rows * length <= budget
    (at least 1)."""
    best = 1
    for r in range(1, total_rows + 1):
        if total_rows % r == 0 and r * length <= token_budget:
            best = r
    return best


class Bench:
    def __init__(self, vcfg: VLMConfig, args, mask_none: dict):
        self.vcfg, self.args, self.mask_none = vcfg, args, mask_none
        bf16 = jnp.dtype(args.dtype)
        rngs = nnx.Rngs(0)
        # Frozen vision side: bf16 params (the tower is never trained on the MR-SP path).
        tower = SiglipVisionTower(
            vcfg.vision, select_layer=vcfg.select_layer, dtype=bf16, param_dtype=bf16, rngs=rngs
        )
        projector = Projector2x2(
            vcfg.vision.hidden_size, vcfg.llm.hidden_size, dtype=bf16, param_dtype=bf16, rngs=rngs
        )
        self.vgraph, self.vstate = nnx.split((tower, projector))
        del tower, projector
        # Trained LLM: float32 master weights, bf16 compute, full remat for the update.
        llm = LLM(vcfg.llm, dtype=bf16, param_dtype=jnp.float32, remat=args.remat, rngs=rngs)
        self.sep = jnp.array(
            llm.embed(jnp.asarray([[vcfg.separator_token_id]], jnp.int32))[0], copy=True
        )
        self.optimizer = step_lib.make_optimizer(
            OptimConfig(lr=1e-6, warmup_steps=1, total_steps=1000, weight_decay=0.0)
        )
        self.state, _ = step_lib.init_train_state(llm, self.optimizer)
        self.graphdef, _, self.rest = nnx.split(llm, nnx.Param, ...)
        del llm
        self.ref_params = jax.tree.map(jnp.copy, self.state.params)
        self.algo = AlgoSection(kl_coef=1e-3)
        self.pcfg = policy_cfg(self.algo, args.new_tokens)
        self.temperature = 1.0
        kw = {}
        names = {f.name for f in dataclasses.fields(RolloutConfig)}
        if "prefill_chunk" in names and args.prefill_chunk > 0:
            kw["prefill_chunk"] = args.prefill_chunk
        self.prefill_chunk = kw.get("prefill_chunk")
        self.rcfg = RolloutConfig(
            num_samples=args.samples,
            max_new_tokens=args.new_tokens,
            temperature=self.temperature,
            stop_token_ids=(),  # exactly N tokens per row
            length_bucket=1,  # no left padding
            **kw,
        )
        self._build_fns()

    # jitted programs (compiled ahead of time per frame count in `prepare`)
    def _build_fns(self):
        vgraph, group = self.vgraph, self.vcfg.frames_per_group
        graphdef, rest = self.graphdef, self.rest
        media_id, temp, pcfg = self.vcfg.media_token_id, self.temperature, self.pcfg

        def encode_chunk(vstate, frames):  # [c, S, S, 3] -> pooled [c / group, n, D]
            tower, projector = nnx.merge(vgraph, vstate)
            tokens = frame_tokens(tower, projector, frames, freeze=True)
            return temporal_pool(tokens, group)

        def finish(pooled, sep):  # chunks of pooled groups -> [V, D] with separators
            return interleave_separators(jnp.concatenate(pooled, axis=0), sep)

        def prompt_fn(params, ids, video):  # ids [P, T], video [P, V, D] -> [P, T, D]
            llm = nnx.merge(graphdef, params, rest)
            return merge_multimodal(
                llm.embed(ids), ids, video.reshape(-1, video.shape[-1]), media_id
            )

        def micro(batch, n):
            return jax.tree.map(lambda x: x.reshape(n, x.shape[0] // n, *x.shape[1:]), batch)

        def with_index(mb):  # rows carry their own prompt row (per-row video layout)
            rows = mb["tokens"].shape[0]
            return {**mb, "prompt_index": jnp.arange(rows, dtype=jnp.int32)}

        def logp_fn(params, batch, n_micro):
            def one(mb):  # the module is built inside the mapped function (nnx trace levels)
                llm = nnx.merge(graphdef, params, rest)
                return response_logprobs(llm, with_index(mb), media_id, temp)

            if n_micro == 1:
                return one(batch)
            out = jax.lax.map(one, micro(batch, n_micro))
            return out.reshape(-1, out.shape[-1])

        def loss_fn(params, mb):
            llm = nnx.merge(graphdef, params, rest)
            logp = response_logprobs(llm, with_index(mb), media_id, temp)
            loss, _ = policy_loss(
                logp, mb["old_logp"], mb["advantages"], mb["mask"], pcfg, ref_logp=mb["ref_logp"]
            )
            return loss

        grad_fn = jax.value_and_grad(loss_fn)
        optimizer = self.optimizer

        def update(state: TrainState, batch, n_micro):
            # Equal-length rows: token_mean over all rows == mean of the micro-batch means.
            if n_micro == 1:
                loss, grads = grad_fn(state.params, batch)
            else:
                zeros = jax.tree.map(jnp.zeros_like, state.params)

                def body(carry, mb):
                    g_acc, l_acc = carry
                    loss, g = grad_fn(state.params, mb)
                    return (jax.tree.map(jnp.add, g_acc, g), l_acc + loss), None

                (grads, loss), _ = jax.lax.scan(
                    body, (zeros, jnp.zeros((), jnp.float32)), micro(batch, n_micro)
                )
                grads = jax.tree.map(lambda g: g / n_micro, grads)
                loss = loss / n_micro
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
            return TrainState(state.step + 1, params, opt_state), loss

        self.encode_chunk_jit = jax.jit(encode_chunk)
        self.finish_jit = jax.jit(finish)
        self.prompt_jit = jax.jit(prompt_fn)
        self.logp_jit = jax.jit(logp_fn, static_argnums=2)
        self.update_jit = jax.jit(update, static_argnums=2, donate_argnums=0)
        self.stack_jit = jax.jit(lambda xs: jnp.stack(xs))

    def llm(self, params):
        return nnx.merge(self.graphdef, params, self.rest)

    # -- per frame count ---------------------------------------------------------------------

    def prepare(self, frames: int) -> dict:
        """Clips, prompt ids and the compiled programs for `frames`; returns compile seconds."""
        a, v = self.args, self.vcfg
        p, g = a.prompts, a.samples
        r = p * g
        s = v.vision.image_size
        chunk = min(a.chunk, frames)
        if chunk % v.frames_per_group and chunk != frames:
            raise ValueError(f"chunk {chunk} must be a multiple of frames_per_group")
        n_video = v.video_length(frames)
        length = n_video + a.text
        self.frames, self.length, self.n_video = frames, length, n_video
        key = jax.random.key(frames)
        # One clip per prompt, kept on device as frame chunks (never materialised twice).
        self.clips = []
        for i in range(p):
            clip = []
            for j, lo in enumerate(range(0, frames, chunk)):
                n = min(chunk, frames - lo)
                k = jax.random.fold_in(jax.random.fold_in(key, i), j)
                clip.append(jax.random.normal(k, (n, s, s, 3), jnp.dtype(a.dtype)))
            self.clips.append(clip)
        rng = np.random.default_rng(frames)
        vocab = min(v.llm.vocab_size, 100000)
        text = rng.integers(min(1000, vocab // 2), vocab, (p, a.text))
        text = np.where(text == v.media_token_id, 1, text)
        ids = np.concatenate([np.full((p, n_video), v.media_token_id), text], axis=1)
        self.ids_p = jnp.asarray(ids, jnp.int32)
        self.ids_r = jnp.asarray(np.repeat(ids, g, axis=0), jnp.int32)
        self.pmask_p = prompt_mask_arg(self.mask_none.get("rollout", False), p, length)
        self.pmask_r = prompt_mask_arg(self.mask_none.get("logprobs", False), r, length)
        self.adv = jnp.asarray(rng.standard_normal(r), jnp.float32)
        self.resp_mask = jnp.ones((r, a.new_tokens), bool)
        seq = length + a.new_tokens
        self.update_micro = r // divisor_rows(r, seq, a.micro_tokens)
        self.logp_micro = r // divisor_rows(r, seq, a.logp_micro_tokens)

        comp = {}
        # Warm the encode (one chunk compile + run per chunk shape) and the finish program.
        t0 = time.perf_counter()
        emb = self.encode_clip(self.clips[0])
        jax.block_until_ready(emb)
        comp["encode_warm_s"] = time.perf_counter() - t0
        video_p = self.stack_jit(tuple(emb for _ in range(p)))
        video_r = self.stack_jit(tuple(emb for _ in range(r)))
        self.prompt_c, comp["prompt_s"] = aot(
            self.prompt_jit, self.state.params, self.ids_p, video_p
        )
        # Warm the rollout (the engine compiles its prefill and decode programs on first use).
        t0 = time.perf_counter()
        res = self.run_rollout(video_p, jax.random.key(1))
        jax.block_until_ready(res.tokens)
        comp["rollout_warm_s"] = time.perf_counter() - t0
        batch = self.batch(video_r, res.tokens)
        self.logp_c, comp["logp_s"] = aot(self.logp_jit, self.state.params, batch, self.logp_micro)
        # Sanity: the training-side log-probs (per-row video layout) match the rollout's.
        logp = self.logp_c(self.state.params, batch)
        comp["logp_vs_rollout_max_abs_diff"] = float(jnp.max(jnp.abs(logp - res.logprobs)))
        old = jnp.zeros((r, a.new_tokens), jnp.float32)
        ub = dict(batch, old_logp=old, ref_logp=old, advantages=self.adv)
        self.update_c, comp["update_s"] = aot(self.update_jit, self.state, ub, self.update_micro)
        del emb, video_p, video_r, res, batch, ub
        return comp

    def release(self):
        for name in ("clips", "prompt_c", "logp_c", "update_c", "ids_p", "ids_r"):
            if hasattr(self, name):
                delattr(self, name)
        gc.collect()

    def encode_clip(self, clip):
        pooled = tuple(self.encode_chunk_jit(self.vstate, c) for c in clip)
        return self.finish_jit(pooled, self.sep)

    def run_rollout(self, video_p, rng):
        embeds = self.prompt_c(self.state.params, self.ids_p, video_p)
        return rollout(
            self.llm(self.state.params),
            inputs_embeds=embeds,
            input_mask=self.pmask_p,
            cfg=self.rcfg,
            rng=rng,
        )

    def batch(self, video_r, tokens):
        return dict(
            prompt_ids=self.ids_r,
            prompt_mask=self.pmask_r,
            video=video_r,
            tokens=tokens,
            mask=self.resp_mask,
        )

    def reencode_rows(self):
        """Baseline: every row re-encodes its prompt's clip -> [P*G, V, D]."""
        g = self.args.samples
        embs = [self.encode_clip(self.clips[i // g]) for i in range(len(self.clips) * g)]
        return jax.block_until_ready(self.stack_jit(tuple(embs)))

    def step(self, mode: str, it: int) -> dict:
        """One RL step in `mode` ("on" / "off"); phase seconds."""
        g = self.args.samples
        t = {}
        phase = "encode"
        try:
            t0 = time.perf_counter()
            embs = [self.encode_clip(c) for c in self.clips]
            video_p = self.stack_jit(tuple(embs))
            video_r = (
                self.stack_jit(tuple(embs[i // g] for i in range(len(embs) * g)))
                if mode == "on"
                else None
            )
            jax.block_until_ready((video_p, video_r))
            t["encode"] = time.perf_counter() - t0

            phase = "rollout"
            t0 = time.perf_counter()
            res = self.run_rollout(video_p, jax.random.key(100 + it))
            tokens = jax.block_until_ready(res.tokens)
            t["rollout"] = time.perf_counter() - t0
            del res

            logps = {}
            for phase, params in (("old_logp", self.state.params), ("ref_logp", self.ref_params)):
                t0 = time.perf_counter()
                if mode == "off":
                    video_r = self.reencode_rows()
                    t[f"{phase}_reencode"] = time.perf_counter() - t0
                logps[phase] = jax.block_until_ready(
                    self.logp_c(params, self.batch(video_r, tokens))
                )
                t[phase] = time.perf_counter() - t0

            phase = "update"
            t0 = time.perf_counter()
            if mode == "off":
                video_r = self.reencode_rows()
                t["update_reencode"] = time.perf_counter() - t0
            ub = dict(
                self.batch(video_r, tokens),
                old_logp=logps["old_logp"],
                ref_logp=logps["ref_logp"],
                advantages=self.adv,
            )
            self.state, loss = self.update_c(self.state, ub)
            loss = float(jax.block_until_ready(loss))
            t["update"] = time.perf_counter() - t0
            if not np.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {loss}")
        except Exception as e:
            try:
                e.phase = phase  # type: ignore[attr-defined]
            except Exception:
                pass
            raise
        t["total"] = sum(t[p] for p in PHASES)
        return t


def measure(bench: Bench, mode: str, iters: int, long_s: float, discard_first: bool) -> dict:
    times = []
    first = bench.step(mode, 0)
    n = 1 if first["total"] > long_s else iters
    drop = discard_first and n > 1
    log(f"  {mode} step 0{' (warm-up, discarded)' if drop else ''}: {fmt(first)}")
    if not drop:
        times.append(first)
    while len(times) < n:
        times.append(bench.step(mode, len(times) + 1))
        log(f"  {mode} step {len(times) - (0 if drop else 1)}: {fmt(times[-1])}")
    keys = times[0].keys()
    med = {f"{k}_s": statistics.median(t[k] for t in times) for k in keys}
    return {
        **med,
        "iters": len(times),
        "first_step_discarded": bool(discard_first and n > 1),
        "total_s_all": [t["total"] for t in times],
    }


def fmt(t: dict) -> str:
    return " ".join(f"{k}={v:.3f}" for k, v in t.items())


def peak_bytes() -> int | None:
    try:
        stats = jax.devices()[0].memory_stats() or {}
        return stats.get("peak_bytes_in_use")
    except Exception:
        return None


def summarize(result: dict, modes: list[str]) -> None:
    """Fill result["ratios"] (off/on total step time per frame count) and result["max_frames"]
    (largest frame count that ran, per mode) from result["rows"] (+ appended old rows)."""
    rows = sorted(result.get("old_rows", []) + result["rows"], key=lambda r: r["frames"])
    by = {(r["frames"], r["mode"]): r for r in rows}
    ratios = []
    for frames in sorted({r["frames"] for r in rows}):
        on, off = by.get((frames, "on")), by.get((frames, "off"))
        if on and off and on.get("status") == "ok" and off.get("status") == "ok":
            ratios.append(
                {
                    "frames": frames,
                    "off_over_on": off["total_s"] / on["total_s"],
                    "on_s": on["total_s"],
                    "off_s": off["total_s"],
                    "reencode_s": sum(
                        off.get(f"{p}_reencode_s", 0.0) for p in ("old_logp", "ref_logp", "update")
                    ),
                }
            )
    result["ratios"] = ratios
    result["max_frames"] = {
        m: max(
            (r["frames"] for r in rows if r["mode"] == m and r.get("status") == "ok"), default=None
        )
        for m in modes
    }


def save(result: dict, modes: list[str], args, *, final: bool) -> None:
    """Summarise and (GPU, not --tiny) write the results file; called after every frame count
    so an interrupted run keeps what it measured."""
    summarize(result, modes)
    result["wall_s"] = time.perf_counter() - T0
    result["complete"] = final
    if jax.default_backend() == "gpu" and not args.tiny:
        out = dict(result)
        old = out.pop("old_rows", [])
        out["rows"] = sorted(old + out["rows"], key=lambda r: (r["frames"], r["mode"] != "on"))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
        if final:
            log(f"wrote {args.out}")
    elif final:
        log(f"not writing {args.out} (backend {jax.default_backend()}, tiny={args.tiny})")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", default="8,64,256,512,1024,2048,3600")
    ap.add_argument("--modes", default="on,off")
    ap.add_argument("--prompts", type=int, default=1, help="P prompts per step")
    ap.add_argument("--samples", type=int, default=4, help="G samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=64, help="N response tokens (forced)")
    ap.add_argument("--text", type=int, default=32, help="text tokens after the video rows")
    ap.add_argument("--chunk", type=int, default=64, help="frames per vision-tower call")
    ap.add_argument("--prefill-chunk", type=int, default=4096, help="if RolloutConfig has it")
    ap.add_argument("--remat", default="full", choices=("full", "dots", "none"))
    ap.add_argument("--dtype", default="bfloat16", help="compute dtype (--tiny: float32)")
    ap.add_argument(
        "--micro-tokens", type=int, default=32768, help="update micro-batch: rows * (T+N) <= this"
    )
    ap.add_argument(
        "--logp-micro-tokens", type=int, default=131072, help="log-prob pass micro-batch size"
    )
    ap.add_argument("--iters", type=int, default=3, help="timed steps per mode (median)")
    ap.add_argument("--long-s", type=float, default=8.0, help="steps longer than this: 1 timed")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="skip frame counts predicted to end past this many seconds from the start",
    )
    ap.add_argument("--compile-cache", default="", help="persistent XLA compilation cache dir")
    ap.add_argument("--tiny", action="store_true", help="tiny VLM on CPU (smoke test)")
    ap.add_argument("--out", default="experiments/results/mrsp.json")
    ap.add_argument(
        "--append",
        action="store_true",
        help="keep the rows of an existing --out (same device) for frame counts not run now",
    )
    args = ap.parse_args(argv)
    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
    if args.tiny:
        vcfg = VLMConfig.preset("tiny")
        if args.frames == ap.get_default("frames"):
            args.frames = "8,16,32"
        args.text, args.new_tokens, args.chunk = 8, 8, 8
        args.iters = min(args.iters, 2)
        args.dtype = "float32"  # XLA:CPU compiles and runs bf16 slowly
        args.micro_tokens = 2 * (vcfg.video_length(32) + args.text + args.new_tokens)
        llm_name = "tiny"
    else:
        vcfg = VLMConfig(
            vision=siglip_config("so400m-patch14-448"),
            llm=LLMConfig.preset("qwen2.5-1.5b"),
            frames_per_group=8,
            media_token_id=151649,
            separator_token_id=198,
        )
        llm_name = "qwen2.5-1.5b"
    frames_list = [int(f) for f in args.frames.split(",") if f]
    modes = [m for m in args.modes.split(",") if m]
    for m in modes:
        if m not in ("on", "off"):
            raise SystemExit(f"unknown mode {m!r}")
    dev = jax.devices()[0]
    log(f"device {dev.device_kind}, jax {jax.__version__}, frames {frames_list}, modes {modes}")

    mask_none = probe_mask_none()
    log(f"mask=None support: {mask_none}")
    bench = Bench(vcfg, args, mask_none)
    log(
        f"models ready (LLM {vcfg.llm.num_params() / 1e9:.2f}B params, prefill_chunk "
        f"{bench.prefill_chunk})"
    )
    result = {
        "benchmark": "mrsp",
        "device": dev.device_kind,
        "backend": jax.default_backend(),
        "jax_version": jax.__version__,
        "tiny": args.tiny,
        "config": {
            "llm": llm_name,
            "llm_params": vcfg.llm.num_params(),
            "vision": "tiny" if args.tiny else "so400m-patch14-448",
            "image_size": vcfg.vision.image_size,
            "vision_layers_run": vcfg.vision.num_layers - 1,
            "tokens_per_frame": vcfg.tokens_per_frame,
            "frames_per_group": vcfg.frames_per_group,
            "video_rows": "ceil(frames / frames_per_group) * (tokens_per_frame + 1)",
            "prompts": args.prompts,
            "samples": args.samples,
            "new_tokens": args.new_tokens,
            "text_tokens": args.text,
            "encode_chunk_frames": args.chunk,
            "prefill_chunk": bench.prefill_chunk,
            "remat": args.remat,
            "update_micro_tokens": args.micro_tokens,
            "logp_micro_tokens": args.logp_micro_tokens,
            "dtype": f"{args.dtype} compute; LLM float32 master weights + AdamW, vision "
            f"{args.dtype} params (frozen)",
            "weights": "random",
            "kl_coef": 1e-3,
            "positions": "0 .. T+N-2; past Qwen2.5's 32768 from 1024 frames up (timing only)",
            "loss_agg": bench.algo.loss_agg,
            "iters": args.iters,
            "long_s": args.long_s,
            "budget_s": args.budget_s,
        },
        "mask_none": mask_none,
        "definition": (
            "one RL step = encode (rollout side, once per prompt) + rollout (G samples, N "
            "tokens) + old_logp + ref_logp + update (fwd+bwd, AdamW); mode on reuses the "
            "encoded clip everywhere (MR-SP stage 1), mode off re-encodes the clip for each "
            "row in each training-side pass; seconds, median over timed steps"
        ),
        "rows": [],
        "compile": [],
    }
    if args.append and Path(args.out).is_file():
        old = json.loads(Path(args.out).read_text())
        if old.get("device") == dev.device_kind:
            result["old_rows"] = [r for r in old.get("rows", []) if r["frames"] not in frames_list]
            result["compile"] = [
                c for c in old.get("compile", []) if c["frames"] not in frames_list
            ]
            log(f"appending to {args.out}: kept {len(result['old_rows'])} rows")
    rows = result["rows"]
    stopped: dict[str, str] = {}  # mode -> reason
    prev = None  # (length, {mode: total_s}, compile_s)
    for frames in frames_list:
        n_video = vcfg.video_length(frames)
        length = n_video + args.text
        base = {"frames": frames, "video_tokens": n_video, "prompt_tokens": length}
        live = [m for m in modes if m not in stopped]
        for m in modes:
            if m in stopped:
                rows.append({**base, "mode": m, "status": "skipped", "reason": stopped[m]})
        if not live:
            continue
        elapsed = time.perf_counter() - T0
        if prev is not None:
            scale = (length / prev[0]) ** 1.5
            pred = prev[2]
            for m in live:
                step = prev[1].get(m, 0.0) * scale
                n = 1 if step > args.long_s else args.iters + (1 if m == live[0] else 0)
                pred += step * n
            if elapsed + pred > args.budget_s:
                log(f"frames {frames}: predicted {pred:.0f}s, over the budget; skipping the rest")
                for m in live:
                    reason = f"time budget ({args.budget_s:.0f}s): predicted {pred:.0f}s at {elapsed:.0f}s"
                    rows.append({**base, "mode": m, "status": "skipped", "reason": reason})
                    stopped[m] = "time budget"
                continue
        log(f"frames {frames}: prompt {length} tokens ({n_video} video rows)")
        t0 = time.perf_counter()
        try:
            comp = bench.prepare(frames)
        except Exception as e:
            err = _error(e)
            log(f"frames {frames}: prepare failed: {err}")
            if err != "oom":
                traceback.print_exc()
            for m in live:
                rows.append({**base, "mode": m, "status": err, "phase": "compile/warmup"})
                stopped[m] = f"{err} at {frames} frames"
            bench.release()
            continue
        comp_total = time.perf_counter() - t0
        result["compile"].append(
            {
                "frames": frames,
                **comp,
                "total_s": comp_total,
                "update_micro_batches": bench.update_micro,
                "logp_micro_batches": bench.logp_micro,
            }
        )
        log(
            f"frames {frames}: compiled/warmed in {comp_total:.1f}s {fmt(comp)}; update micro "
            f"{bench.update_micro}, logp micro {bench.logp_micro}"
        )
        totals = {}
        shared_oom = None
        for i, m in enumerate(live):
            if shared_oom is not None:
                rows.append(
                    {
                        **base,
                        "mode": m,
                        "status": "oom",
                        "phase": shared_oom,
                        "inferred": "the shared program already ran out of memory",
                    }
                )
                stopped[m] = f"oom at {frames} frames"
                continue
            try:
                r = measure(bench, m, args.iters, args.long_s, discard_first=(i == 0))
                r = {
                    **base,
                    "mode": m,
                    "status": "ok",
                    **r,
                    "peak_bytes_in_use_so_far": peak_bytes(),
                }
                totals[m] = r["total_s"]
            except Exception as e:
                err = _error(e)
                phase = getattr(e, "phase", None)
                log(f"frames {frames} mode {m}: {err} in {phase}")
                if err != "oom":
                    traceback.print_exc()
                r = {**base, "mode": m, "status": err, "phase": phase}
                stopped[m] = f"{err} at {frames} frames"
                if err == "oom" and phase != "encode":
                    shared_oom = phase
            rows.append(r)
            log(
                json.dumps(
                    {
                        k: (round(v, 4) if isinstance(v, float) else v)
                        for k, v in r.items()
                        if k != "total_s_all"
                    }
                )
            )
        bench.release()
        prev = (length, totals, comp_total)
        save(result, modes, args, final=False)

    save(result, modes, args, final=True)
    rows = sorted(
        result.get("old_rows", []) + result["rows"], key=lambda r: (r["frames"], r["mode"] != "on")
    )
    ratios = result["ratios"]

    print(
        f"\n== RL step time vs frames ({dev.device_kind}, jax {jax.__version__}, "
        f"{llm_name}, P={args.prompts} G={args.samples} N={args.new_tokens}) =="
    )
    hdr = "frames  tokens  mode  " + "  ".join(f"{p:>8s}" for p in PHASES) + "     total  status"
    print(hdr)
    for r in rows:
        head = f"{r['frames']:6d} {r['prompt_tokens']:7d}  {r['mode']:4s}  "
        if r.get("status") == "ok":
            cells = "  ".join(f"{r[p + '_s']:8.3f}" for p in PHASES)
            print(f"{head}{cells}  {r['total_s']:8.3f}  ok")
        else:
            print(
                f"{head}{'':>{10 * len(PHASES)}}  {'':>8s}  {r.get('status')}"
                + (f" ({r['reason']})" if r.get("reason") else "")
            )
    for q in ratios:
        print(
            f"frames {q['frames']:5d}: off/on = {q['off_over_on']:.2f}x "
            f"({q['off_s']:.2f}s / {q['on_s']:.2f}s; re-encoding {q['reencode_s']:.2f}s)"
        )
    print(f"max frames: {result['max_frames']}   (wall {result['wall_s']:.0f}s)")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.95")
    sys.exit(main())
