"""Training objectives of the jobs, as `loss_sums(model, batch) -> (sum, normaliser)` hooks.

Each returns float32 scalars (sum, normaliser) so `jaxstack.train.step.make_train_step(...,
loss_sums=...)` / `make_update` normalise exactly under gradient accumulation (loss = total sum
/ total normaliser over the micro-batches). The causal-LM loss is
`jaxstack.train.step.lm_loss_sums`.

Masked diffusion (LLaDA, Dream; `jaxstack.models.dllm` for the model side):

    t ~ U(0, 1) per sequence, p_mask = (1 - eps) t + eps, each token masked i.i.d. with p_mask
    (never a prompt token in SFT), loss = sum over masked tokens of CE / p_mask, divided by
    B * L (pre-training) or, in SFT, by each sequence's answer length and then by B.

Its randomness comes from the batch (pre-drawn uniforms, `draw_diffusion_noise`), so the train
step stays pure.

Shapes: B batch, L (or T) sequence length, V vocab.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
from flax import nnx

from jaxstack.models.dllm import LLADA_MASK_ID, dllm_logits
from jaxstack.models.llm import LLM
from jaxstack.train.step import chunked_token_nll

if TYPE_CHECKING:
    from jaxstack.models.vlm import NVILA

Array = jax.Array

DEFAULT_EPS = 1e-3


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


def vlm_loss_sums(
    model: NVILA, batch: dict[str, Array], *, logits_chunk: int = 1024
) -> tuple[Array, Array]:
    """(sum of masked token NLL, loss-token count): clips -> video rows spliced at placeholders.

    batch: input_ids/targets int32 [B, T], loss_mask bool [B, T], frames float [B, F, S, S, 3].
    The LM head runs over chunks of `logits_chunk` positions when T is a larger multiple of
    it (`jaxstack.train.step.chunked_token_nll`). Returns float32 scalars.
    """
    media = model.encode_videos(batch["frames"])
    embeds = model.embed_prompt(batch["input_ids"], media.reshape(-1, media.shape[-1]))
    hidden = model.llm.hidden_states(inputs_embeds=embeds)
    nll = chunked_token_nll(model.llm.logits, hidden, batch["targets"], logits_chunk)
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)
