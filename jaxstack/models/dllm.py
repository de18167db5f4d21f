"""Diffusion LLMs (LLaDA, Dream) on the bidirectional `LLM` backbone.

A diffusion LLM is the jaxstack decoder with `causal=False` plus two facts: the id of the
[MASK] token and whether logits are shifted by one (Dream: position i is predicted from the
logits at i - 1, position 0 keeps its own; LLaDA: no shift). The masked-diffusion training
objective is `jaxstack.train.losses.diffusion_loss_sums`; sampling is
`jaxstack.generate.dllm.dllm_generate`.

Shapes: B batch, L sequence length, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxstack.models.llm import LLM, LLMConfig, init_llm

Array = jax.Array

KINDS = ("llada", "dream")
LLADA_MASK_ID = 126336
DREAM_MASK_ID = 151666


@dataclasses.dataclass(frozen=True)
class DLLMConfig:
    """A diffusion LLM: the backbone config, its kind and its special token ids.

    kind: "llada" (no logit shift) or "dream" (logits shifted by one).
    mask_id: id of [MASK]; eos_id / pad_id: end of sequence and padding (may be equal).
    """

    llm: LLMConfig
    kind: str = "llada"
    mask_id: int = LLADA_MASK_ID
    eos_id: int | None = None
    pad_id: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown diffusion LLM kind {self.kind!r}; supported: {KINDS}")
        if not 0 <= self.mask_id < self.llm.vocab_size:
            raise ValueError(f"mask_id {self.mask_id} outside the vocabulary {self.llm.vocab_size}")

    @property
    def shift_logits(self) -> bool:
        return self.kind == "dream"

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DLLMConfig:
        """The config of preset `name` (see PRESETS; case-insensitive), fields replaced by
        `overrides`: "llada-8b", "dream-7b" (published sizes), "llada-100m", "llada-small"
        (trainable here with the byte tokenizer), "tiny-llada", "tiny-dream" (tests).
        Unknown names raise ValueError listing the known ones."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r} for DLLMConfig; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[key](), **overrides)


def _tiny(kind: str) -> DLLMConfig:
    llm = LLMConfig(
        architecture="llama" if kind == "llada" else "qwen2",
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4 if kind == "llada" else 2,
        head_dim=8,
        rope_theta=500000.0 if kind == "llada" else 10000.0,
        rms_norm_eps=1e-5 if kind == "llada" else 1e-6,
        tie_word_embeddings=False,
        attention_bias=kind == "dream",
        causal=False,
        max_position_embeddings=1024,
    )
    return DLLMConfig(llm=llm, kind=kind, mask_id=127, eos_id=126, pad_id=126)


def _llada_8b() -> DLLMConfig:
    # LLaDA-8B: MHA 32 heads, SwiGLU 12288, RoPE 5e5, RMSNorm 1e-5, untied, no biases.
    return DLLMConfig(
        LLMConfig.preset("llada-8b"),
        kind="llada",
        mask_id=LLADA_MASK_ID,
        eos_id=126081,
        pad_id=126081,
    )


def _llada_byte(d: int, layers: int, heads: int, ffn: int) -> DLLMConfig:
    # LLaDA-architecture models for training here on synthetic tasks with the byte tokenizer
    # (ids 0..262) plus [MASK] = 263.
    llm = LLMConfig(
        architecture="llama",
        vocab_size=264,
        hidden_size=d,
        intermediate_size=ffn,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=d // heads,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        attention_bias=False,
        causal=False,
        max_position_embeddings=4096,
    )
    return DLLMConfig(llm=llm, kind="llada", mask_id=263, eos_id=258, pad_id=258)


def _dream_7b() -> DLLMConfig:
    # Dream-v0-7B is Qwen2.5-7B-derived (dims assumed to be Qwen2.5-7B's; rope_theta taken
    # from Qwen2.5-7B, unverified: a real checkpoint's config.json wins when loaded).
    llm = dataclasses.replace(LLMConfig.preset("qwen2.5-7b"), causal=False)
    return DLLMConfig(llm, kind="dream", mask_id=DREAM_MASK_ID, eos_id=151643, pad_id=151643)


PRESETS: dict[str, Callable[[], DLLMConfig]] = {
    "llada-8b": _llada_8b,
    "dream-7b": _dream_7b,
    "llada-100m": functools.partial(_llada_byte, 768, 12, 12, 2560),  # 99M parameters
    "llada-small": functools.partial(_llada_byte, 128, 4, 4, 384),  # 0.9M, CPU minutes
    "tiny-llada": functools.partial(_tiny, "llada"),
    "tiny-dream": functools.partial(_tiny, "dream"),
}


def init_dllm(cfg: DLLMConfig, *, seed: int = 0, dtype=jnp.float32, param_dtype=jnp.float32) -> LLM:
    """Randomly initialised bidirectional backbone of `cfg` (tests, benchmarks, training)."""
    if cfg.llm.causal:
        raise ValueError("a diffusion LLM needs a bidirectional backbone (LLMConfig.causal=False)")
    return init_llm(cfg.llm, seed=seed, dtype=dtype, param_dtype=param_dtype)


def shift_logits(logits_blv: Array) -> Array:
    """Dream's shift: out[:, i] = logits[:, i - 1] for i >= 1, out[:, 0] = logits[:, 0]."""
    return jnp.concatenate([logits_blv[:, :1], logits_blv[:, :-1]], axis=1)


def dllm_logits(model: LLM, input_ids_bl: Array, kind: str = "llada", **kwargs: Any) -> Array:
    """Per-position prediction logits [B, L, V] of a diffusion LLM (Dream's shift applied).

    input_ids_bl int [B, L] (with [MASK] ids where tokens are hidden); kwargs go to `model`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown diffusion LLM kind {kind!r}; supported: {KINDS}")
    logits = model(input_ids_bl, **kwargs)
    return shift_logits(logits) if kind == "dream" else logits
