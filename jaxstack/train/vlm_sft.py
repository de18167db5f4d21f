"""Chain-of-thought SFT of the NVILA VLM on video multiple-choice QA (`jaxstack sft`).

`run_vlm_sft(cfg)` writes into `cfg.output_dir` (default `runs/<name>`): config.yaml,
metrics.jsonl, loss.png, checkpoints/<step>/ (exact resume), model/ (NVILA checkpoint layout,
loadable with `jaxstack.hf.load_nvila`), eval.json (held-out greedy answers and accuracy) and
summary.json. With `data.synth_num > 0` and no `train.jsonl` in `data.dir`, the synthetic
long-video QA set is generated there first.

The LLM and projector are trained; the vision tower too unless `model.freeze_vision` (then its
optimizer updates are zeroed, so weight decay does not touch it either).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxstack.config import config_to_dict, save_config
from jaxstack.models.llm import REMAT_POLICIES
from jaxstack.models.vlm import NVILA, VLMConfig
from jaxstack.parallel.mesh import init_sharded, make_mesh, use_mesh
from jaxstack.train import metrics as metrics_lib
from jaxstack.train import step as step_lib
from jaxstack.train.checkpoint import Checkpointer, abstract_state
from jaxstack.train.step import OptimConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
BATCH_KEYS = ("input_ids", "targets", "loss_mask", "frames")


@dataclasses.dataclass
class VLMModelSection:
    """name: a VLM preset ("tiny-video", "tiny", "nvila-8b": random init, for the byte tokenizer
    or shapes) or an NVILA checkpoint directory (`jaxstack.hf.load_nvila` layout)."""

    name: str = "tiny-video"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    freeze_vision: bool = False

    def __post_init__(self):
        for key, ok in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMAT_POLICIES)):
            if getattr(self, key) not in ok:
                raise ValueError(f"{key} must be one of {list(ok)}, got {getattr(self, key)!r}")


@dataclasses.dataclass
class VideoDataSection:
    """dir: folder with train.jsonl and eval.jsonl (video-QA records). synth_num: generate that
    many synthetic clips there when train.jsonl is absent (0 = never). Clips are read as
    num_frames frames of image_size^2; batch_size clips per step, seq_len tokens per row."""

    dir: str = "data/synth_video"
    synth_num: int = 800
    synth_frames: int = 16
    num_frames: int = 16
    image_size: int = 56
    tokenizer: str = "byte"
    batch_size: int = 16
    seq_len: int = 208
    seed: int = 0


@dataclasses.dataclass
class VLMSFTConfig:
    """A VLM SFT job. optim.total_steps = 0 means "= steps"; eval: held-out records answered
    (greedy) at the end, 0 = skip; mesh e.g. "data=2" ("" = data parallel over all devices)."""

    name: str = "vlm_sft_tiny"
    output_dir: str = ""
    model: VLMModelSection = dataclasses.field(default_factory=VLMModelSection)
    data: VideoDataSection = dataclasses.field(default_factory=VideoDataSection)
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=20, total_steps=0)
    )
    steps: int = 300
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 5
    mesh: str = ""
    seed: int = 0
    eval: int = 160
    eval_batch: int = 80
    max_new_tokens: int = 88

    def __post_init__(self):
        for key in ("steps", "checkpoint_every", "log_every", "keep_checkpoints", "eval_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

    def resolved(self) -> VLMSFTConfig:
        return dataclasses.replace(
            self,
            output_dir=self.output_dir or os.path.join("runs", self.name),
            optim=dataclasses.replace(self.optim, total_steps=self.optim.total_steps or self.steps),
        )


# -- model -------------------------------------------------------------------------------------


def build_vlm(cfg: VLMModelSection, vocab_size: int, mesh, seed: int) -> NVILA:
    """NVILA created (or loaded) with every parameter placed in its sharding on `mesh`."""
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    if os.path.isdir(cfg.name):
        from jaxstack.hf import load_nvila

        model = load_nvila(cfg.name, dtype=dtype, mesh=mesh)
        vcfg = model.cfg
    else:
        vcfg = VLMConfig.preset(cfg.name)
        if vcfg.llm.vocab_size < vocab_size:
            raise ValueError(
                f"tokenizer has {vocab_size} tokens but preset {cfg.name!r} only "
                f"{vcfg.llm.vocab_size}"
            )
        make = lambda: NVILA(
            vcfg, dtype=dtype, param_dtype=param_dtype, remat=cfg.remat, rngs=nnx.Rngs(seed)
        )
        model = init_sharded(make, mesh)
    if cfg.freeze_vision != vcfg.freeze_vision:
        model.cfg = dataclasses.replace(vcfg, freeze_vision=cfg.freeze_vision)
    return model


def vlm_loss_sums(model: NVILA, batch: dict, *, logits_chunk: int = 1024):
    """(sum of masked token NLL, loss-token count): clips -> video rows spliced at placeholders.

    batch: input_ids/targets int32 [B, T], loss_mask bool [B, T], frames float [B, F, S, S, 3].
    """
    media = model.encode_videos(batch["frames"])
    embeds = model.embed_prompt(batch["input_ids"], media.reshape(-1, media.shape[-1]))
    hidden = model.llm.hidden_states(inputs_embeds=embeds)
    nll = step_lib.chunked_token_nll(model.llm.logits, hidden, batch["targets"], logits_chunk)
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def freeze_mask_optimizer(
    optimizer: optax.GradientTransformation, params: dict, frozen_prefix: str
) -> optax.GradientTransformation:
    """`optimizer` on every parameter except the subtree `params[frozen_prefix]` (no update)."""
    labels = {
        k: jax.tree.map(lambda _, tag="frozen" if k == frozen_prefix else "train": tag, v)
        for k, v in params.items()
    }
    return optax.multi_transform({"train": optimizer, "frozen": optax.set_to_zero()}, labels)


# -- data --------------------------------------------------------------------------------------


def ensure_dataset(cfg: VideoDataSection) -> tuple[str, str]:
    """(train.jsonl, eval.jsonl) paths in cfg.dir, generating the synthetic set if needed."""
    train, held = (os.path.join(cfg.dir, f) for f in ("train.jsonl", "eval.jsonl"))
    if not os.path.isfile(train):
        if cfg.synth_num <= 0:
            raise FileNotFoundError(f"{train} not found (data.synth_num=0: nothing generated)")
        from jaxstack.data.synth_video import synth_video_dataset

        if jax.process_index() == 0:
            print(f"generating {cfg.synth_num} synthetic clips in {cfg.dir}")
            synth_video_dataset(cfg.dir, cfg.synth_num, frames=cfg.synth_frames, seed=cfg.seed)
    return train, held


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, bucket: int = 16):
    """Left-pad id lists to a multiple of `bucket`: (ids int32 [B, T], mask bool [B, T])."""
    t = -(-max(len(r) for r in rows) // bucket) * bucket
    ids = np.full((len(rows), t), pad_id, np.int32)
    mask = np.zeros((len(rows), t), bool)
    for i, r in enumerate(rows):
        ids[i, t - len(r) :] = r
        mask[i, t - len(r) :] = True
    return ids, mask


def decode_response(tok: Any, ids: Sequence[int]) -> str:
    """Text of generated ids; ids beyond the tokenizer's vocabulary (a model vocabulary padded
    past the tokenizer's, sampled by an untrained policy) are dropped."""
    return tok.decode([int(i) for i in ids if 0 <= int(i) < tok.vocab_size])


# -- evaluation --------------------------------------------------------------------------------


@nnx.jit
def _prompt_embeds(model: NVILA, frames, input_ids):
    media = model.encode_videos(frames)
    return model.embed_prompt(input_ids, media.reshape(-1, media.shape[-1]))


def evaluate_video_qa(
    model: NVILA,
    tok: Any,
    records: Sequence[dict],
    video: Any,
    *,
    batch: int = 80,
    max_new_tokens: int = 88,
    loader: Any = None,
) -> dict:
    """Greedy answers to multiple-choice video questions -> accuracy (and format rate).

    The answer is the letter inside <answer>...</answer> (`rewards.parse_choice_from_response`);
    a missing or malformed tag counts as wrong. Records whose video fails to decode are skipped
    and counted. Returns {"accuracy", "format_rate", "num", "skipped", "samples"}.
    """
    from jaxstack.data.video import VideoError
    from jaxstack.data.video_qa import FrameLoader, prompt_ids
    from jaxstack.generate import generate_tokens
    from jaxstack.rl.rewards import format_reward, parse_choice_from_response

    loader = loader or FrameLoader(video)
    vcfg, n_media = model.cfg, model.cfg.video_length(video.num_frames)
    samples, skipped = [], 0
    for start in range(0, len(records), batch):
        recs, clips = [], []
        for r in records[start : start + batch]:
            try:
                clips.append(loader(r["video_path"]))
                recs.append(r)
            except VideoError as e:
                skipped += 1
                print(f"warning: skipping eval record {r['id']!r}: {e}")
        if not recs:
            continue
        prompts = [
            prompt_ids(r, tok, media_token_id=vcfg.media_token_id, num_media=n_media) for r in recs
        ]
        # Fixed batch shape (pad with copies of the first row) so every chunk shares one program.
        fill = batch - len(recs)
        ids, mask = left_pad(prompts + [prompts[0]] * fill, tok.pad_id)
        frames = np.stack(clips + [clips[0]] * fill)
        embeds = _prompt_embeds(model, jnp.asarray(frames), jnp.asarray(ids))
        out = generate_tokens(
            model.llm,
            None,
            jnp.asarray(mask),
            inputs_embeds=embeds,
            max_new_tokens=max_new_tokens,
            stop_tokens=[tok.eos_id],
            pad_id=tok.pad_id,
        )
        tokens, lengths = jax.device_get((out.tokens, out.lengths))
        for r, row, n in zip(recs, tokens, lengths):
            text = decode_response(tok, row[:n])
            pick = parse_choice_from_response(text)
            samples.append(
                dict(
                    id=r["id"],
                    task=r.get("task"),
                    answer=r["answer"],
                    generated=text,
                    picked=pick,
                    correct=pick is not None and pick.upper() == r["answer"].upper(),
                    formatted=format_reward(text, r) > 0,
                )
            )
    num = len(samples)
    acc = sum(s["correct"] for s in samples) / num if num else None
    fmt = sum(s["formatted"] for s in samples) / num if num else None
    by_task: dict[str, list[bool]] = {}
    for s in samples:
        by_task.setdefault(s["task"] or "all", []).append(s["correct"])
    per_task = {k: sum(v) / len(v) for k, v in sorted(by_task.items())}
    return dict(
        accuracy=acc, format_rate=fmt, num=num, skipped=skipped, per_task=per_task, samples=samples
    )


# -- job ---------------------------------------------------------------------------------------


def _write_json(path: str, obj: Any) -> None:
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)


def run_vlm_sft(cfg: VLMSFTConfig, *, resume: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) the SFT job; returns a summary dict (also summary.json).

    stop_after: stop right after that global step as if killed (tests resumption).
    """
    from jaxstack.data.tokenizer import load_tokenizer
    from jaxstack.data.video_qa import VideoQABatches, VideoSpec, read_video_qa
    from jaxstack.hf import save_nvila
    from jaxstack.parallel.distributed import initialize

    initialize()
    cfg = cfg.resolved()
    out, main = cfg.output_dir, jax.process_index() == 0
    os.makedirs(out, exist_ok=True)
    mesh = make_mesh(cfg.mesh or None)
    tok = load_tokenizer(cfg.data.tokenizer)
    model = build_vlm(cfg.model, tok.vocab_size, mesh, cfg.seed)
    train_path, eval_path = ensure_dataset(cfg.data)
    records = read_video_qa(train_path)
    video = VideoSpec(num_frames=cfg.data.num_frames, image_size=cfg.data.image_size)
    n_media = model.cfg.video_length(video.num_frames)
    data = VideoQABatches(
        records,
        tok,
        media_token_id=model.cfg.media_token_id,
        num_media=n_media,
        video=video,
        batch_size=cfg.data.batch_size,
        seq_len=cfg.data.seq_len,
        seed=cfg.data.seed,
    )
    optimizer = step_lib.make_optimizer(cfg.optim)
    if cfg.model.freeze_vision:
        params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
        optimizer = freeze_mask_optimizer(optimizer, params, "vision_tower")
    state, shardings = step_lib.init_train_state(model, optimizer, mesh)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    train_step = step_lib.make_train_step(
        graphdef, rest, optimizer, loss_sums=vlm_loss_sums, mesh=mesh, state_sh=shardings
    )
    ckpt = Checkpointer(os.path.join(out, "checkpoints"), keep=cfg.keep_checkpoints)
    start = ckpt.latest_step()
    if start is not None and not resume:
        ckpt.close()
        raise FileExistsError(f"{ckpt.directory} has checkpoints (step {start}); resume=True?")
    if start is not None:
        state, _ = ckpt.restore(start, abstract_state(state, shardings))
    start = start or 0
    if main:
        save_config(cfg, os.path.join(out, "config.yaml"))
    metrics_path = os.path.join(out, "metrics.jsonl")
    logger = metrics_lib.MetricsLogger(metrics_path, resume_step=start)
    lr_at = step_lib.learning_rate_schedule(cfg.optim)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = metrics_lib.progress_bar(cfg.steps, initial=start, desc=cfg.name)
    t0 = time.perf_counter()
    try:
        for i in range(start, end):
            host = data.batch(i)
            batch = step_lib.place_batch(mesh, {k: host[k] for k in BATCH_KEYS})
            state, metrics = train_step(state, batch)
            bar.update(1)
            if (i + 1) % cfg.log_every == 0 or i + 1 == cfg.steps:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                if not math.isfinite(m["loss"]):
                    raise FloatingPointError(f"loss is {m['loss']} at step {i + 1}; stopped")
                row = dict(loss=m["loss"], grad_norm=m["grad_norm"], lr=float(lr_at(i)))
                logger.log(i + 1, **row, skipped_videos=data.skipped)
                bar.set_postfix(loss=f"{m['loss']:.4f}")
            if (i + 1) % cfg.checkpoint_every == 0 or i + 1 == cfg.steps:
                ckpt.save(i + 1, state, {"step": i + 1, "config": config_to_dict(cfg)})
    finally:
        bar.close()
        logger.close()
        ckpt.close()
    summary: dict[str, Any] = {"output_dir": out, "start_step": start, "step": max(start, end)}
    summary["train_seconds"] = time.perf_counter() - t0
    if end < cfg.steps:
        return {**summary, "stopped_at": end}
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, state.params)
    nnx.update(model, params)
    summary.update(metrics_lib.summarize(metrics_lib.read_metrics(metrics_path)))
    summary["plot"] = metrics_lib.plot_metrics(
        metrics_path, os.path.join(out, "loss.png"), ("loss", "lr")
    )
    save_nvila(model, model_dir := os.path.join(out, "model"))
    summary["model_dir"] = model_dir
    summary["skipped_videos"] = data.skipped
    if cfg.eval > 0 and os.path.isfile(eval_path):
        held = read_video_qa(eval_path)[: cfg.eval]
        with use_mesh(None):
            result = evaluate_video_qa(
                model, tok, held, video, batch=cfg.eval_batch, max_new_tokens=cfg.max_new_tokens
            )
        _write_json(os.path.join(out, "eval.json"), result)
        summary["eval_accuracy"] = result["accuracy"]
        summary["eval_format_rate"] = result["format_rate"]
        summary["eval_per_task"] = result["per_task"]
        if main:
            print(
                f"held-out accuracy {result['accuracy']:.3f} on {result['num']} questions "
                f"(chance {1 / len(held[0]['options']):.2f}), per task {result['per_task']}"
            )
    _write_json(os.path.join(out, "summary.json"), summary)
    return summary
