"""Diffusion LLMs (LLaDA, Dream) on the bidirectional `LLM` backbone, and their training loss.

A diffusion LLM is the jaxstack decoder with `causal=False` plus three facts: the id of the
[MASK] token, whether logits are shifted by one (Dream: position i is predicted from the logits
at i - 1, position 0 keeps its own; LLaDA: no shift), and the masked-diffusion objective:

    t ~ U(0, 1) per sequence, p_mask = (1 - eps) t + eps, each token masked i.i.d. with p_mask
    (never a prompt token in SFT), loss = sum over masked tokens of CE / p_mask, divided by
    B * L (pre-training) or, in SFT, by each sequence's answer length and then by B.

`diffusion_loss_sums` returns (sum, count) so `jaxstack.train.step.make_train_step(...,
loss_sums=...)` normalises exactly under gradient accumulation. Its randomness comes from the
batch (pre-drawn uniforms, see `draw_diffusion_noise`), so the train step stays pure.

Shapes: B batch, L sequence length, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxstack.models.llm import LLM, LLMConfig, init_llm

Array = jax.Array

KINDS = ("llada", "dream")
LLADA_MASK_ID = 126336
DREAM_MASK_ID = 151666
DEFAULT_EPS = 1e-3


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
    def preset(cls, name: str) -> DLLMConfig:
        """By name: "llada-8b", "dream-7b" (published sizes), "llada-100m", "llada-small"
        (trainable here with the byte tokenizer), "tiny-llada", "tiny-dream" (tests)."""
        key = name.lower()
        if key not in DLLM_PRESETS:
            raise ValueError(
                f"unknown diffusion LLM preset {name!r}; known: {sorted(DLLM_PRESETS)}"
            )
        return DLLM_PRESETS[key]()


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


DLLM_PRESETS: dict[str, Callable[[], DLLMConfig]] = {
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


def draw_diffusion_noise(key: Array, batch: int, length: int) -> dict[str, Array]:
    """Pre-drawn randomness of the masked-diffusion loss for one batch.

    Returns {"t": float32 [B] ~ U(0, 1), "mask_u": float32 [B, L] ~ U(0, 1)}; add it to the
    batch dict (token i of row b is masked iff mask_u[b, i] < p_mask[b]).
    """
    k_t, k_u = jax.random.split(key)
    return {
        "t": jax.random.uniform(k_t, (batch,), jnp.float32),
        "mask_u": jax.random.uniform(k_u, (batch, length), jnp.float32),
    }


def diffusion_loss_sums(
    model: LLM,
    batch: dict[str, Array],
    *,
    kind: str = "llada",
    mask_id: int = LLADA_MASK_ID,
    eps: float = DEFAULT_EPS,
) -> tuple[Array, Array]:
    """(loss sum, normaliser) of the masked-diffusion objective for one micro-batch.

    batch: input_ids int [B, L] (clean tokens); t float [B] and mask_u float [B, L] uniforms
    (`draw_diffusion_noise`); optional prompt_mask bool [B, L] (SFT: True on prompt tokens,
    which are never masked); optional loss_mask bool [B, L] (False on padding that must not
    be trained, e.g. for packed pre-training; LLaDA's SFT trains on the EOS padding).
    Pre-training (no prompt_mask): sum = sum_masked CE / p_mask, normaliser = number of
    (valid) tokens, i.e. B * L. SFT: sum = sum_b (sum_masked CE / p_mask) / answer_length_b,
    normaliser = B. loss = sum / normaliser, float32 scalars.
    """
    ids = batch["input_ids"]
    b, length = ids.shape
    valid = batch.get("loss_mask")
    valid = jnp.ones((b, length), bool) if valid is None else valid.astype(bool)
    prompt = batch.get("prompt_mask")
    p_mask = (1.0 - eps) * batch["t"].astype(jnp.float32) + eps  # [B]
    masked = (batch["mask_u"] < p_mask[:, None]) & valid
    if prompt is not None:
        masked = masked & ~prompt.astype(bool)
    noisy = jnp.where(masked, mask_id, ids)
    logits = dllm_logits(model, noisy, kind).astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, ids[..., None], axis=-1)[..., 0]
    weighted = jnp.where(masked, (lse - picked) / p_mask[:, None], 0.0)  # [B, L]
    if prompt is None:
        return jnp.sum(weighted), jnp.sum(valid.astype(jnp.float32))
    answer_len = jnp.sum((~prompt.astype(bool) & valid).astype(jnp.float32), axis=1)
    per_row = jnp.sum(weighted, axis=1) / jnp.maximum(answer_len, 1.0)
    return jnp.sum(per_row), jnp.asarray(b, jnp.float32)


def make_diffusion_loss(
    kind: str = "llada", mask_id: int = LLADA_MASK_ID, eps: float = DEFAULT_EPS
) -> Callable[[nnx.Module, dict[str, Array]], tuple[Array, Array]]:
    """`loss_sums(model, batch)` hook for `make_train_step` (see `diffusion_loss_sums`)."""
    return functools.partial(diffusion_loss_sums, kind=kind, mask_id=mask_id, eps=eps)
