"""Video multiple-choice QA pieces shared by the VLM SFT job (`jaxstack.train.vlm_sft`) and the
RL job (`jaxstack.rl.trainer`): dataset preparation, response decoding and the greedy held-out
evaluation (accuracy, format rate, per task)."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.models.vlm import NVILA


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

    def __post_init__(self):
        if self.synth_num < 0:
            raise ValueError(f"data.synth_num must be >= 0, got {self.synth_num}")
        for key in ("synth_frames", "num_frames", "image_size", "batch_size", "seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self, key)}")


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

    The answer is the letter inside <answer>...</answer> (`jaxstack.data.answers.parse_choice_from_response`);
    a missing or malformed tag counts as wrong. Records whose video fails to decode are skipped
    and counted. Returns {"accuracy", "format_rate", "num", "skipped", "samples"}.
    """
    from jaxstack.data.answers import is_formatted, parse_choice_from_response
    from jaxstack.data.video import VideoError
    from jaxstack.data.video_qa import FrameLoader, prompt_ids
    from jaxstack.generate import generate_tokens
    from jaxstack.generate.engine import pad_prompts

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
        ids, mask = pad_prompts(prompts + [prompts[0]] * fill, pad_id=tok.pad_id, bucket=16)
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
                    formatted=is_formatted(text),
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
