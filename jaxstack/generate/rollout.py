"""Batched rollouts for RL (GRPO groups): G samples per prompt from one shared prefill, and the
training-side forward that recomputes their log-probs.

`rollout` (inference side, jitted and compile-cached by `jaxstack.generate.engine`):

1. B prompts, left padded to T columns (ids [B, T] or embeddings [B, T, D], e.g. a VLM prompt
   with cached video embeddings spliced in), are prefilled ONCE into a KV cache of T + N slots
   (N = max_new_tokens): columns [0, T - 1) go through `model.decode_step`, in one call or,
   with `RolloutConfig.prefill_chunk` C > 0, C columns at a time (a `lax.scan`), so a long
   (video) prompt's transient attention scores are [B, H, C, T + N], not [B, H, T - 1, T + N].
2. The prefill's cache (k, v, kv_mask), the last prompt column and the prompt lengths are
   repeated G times along the batch: row b * G + g is sample g of prompt b.
3. One jitted `lax.while_loop` samples all B * G rows (temperature / top-k / top-p, stop
   tokens), one PRNG key per step shared by the whole [B * G] batch; so `rollout` with G
   samples draws exactly what `engine.generate_tokens` draws on the prompts repeated G times
   with the same key. Per-token log-probs are those of the sampled tokens under the
   temperature-scaled, unfiltered distribution (temperature 0 counts as 1), as in engine.py.

Prompt lengths are bucketed to a multiple of `RolloutConfig.length_bucket` (the same rule as
`engine.pad_prompts`): `pad_ids` / `pad_embeds` pad to it, and `rollout` adds left padding
columns when given a T that is not a multiple, so the number of compiled programs is bounded by
(max prompt length / bucket) per batch size. Same shapes never recompile
(`engine.TRACE_COUNTS`); the temperature / top_p values, stop tokens, prompts and key are
runtime inputs.

`sequence_logprobs` (training side): a pure function of the model (no jit inside; call it
under `nnx.jit` / `nnx.value_and_grad`) that runs one full forward over [prompt ; response]
and returns the same per-token log-probs, differentiable w.r.t. the model parameters. Without a
prompt mask (prompts not left padded) it runs the model's causal fast path (no dense mask:
cuDNN flash attention on GPU), which long prompts need.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.generate import engine
from jaxstack.generate.sampling import token_logprobs

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RolloutConfig:
    """Sampling settings of a rollout.

    num_samples: G, samples per prompt (a GRPO group).
    max_new_tokens: N, the response length budget.
    temperature / top_p / top_k: as in `jaxstack.generate.sampling` (0 = greedy; top_k 0 and
      top_p 1.0 = off). Changing the temperature or top_p value does not recompile.
    stop_token_ids: a row finishes after emitting any of these (the stop token is kept and
      counted in the mask / lengths); the loop ends once every row has.
    pad_id: the token written after a row's stop token.
    length_bucket: prompt lengths are left padded up to a multiple of this (bounds recompiles).
    cache_dtype: KV-cache dtype, default the model's compute dtype.
    prefill_chunk: prompt columns per prefill `decode_step` call, 0 = the whole prompt in one
      call. Set it (e.g. 2048) for long prompts: it bounds the prefill's transient attention
      memory to [B, H, prefill_chunk, T + N]. Same results; a new value recompiles the prefill.
    """

    num_samples: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop_token_ids: tuple[int, ...] = ()
    pad_id: int = 0
    length_bucket: int = 64
    cache_dtype: Any = None
    prefill_chunk: int = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RolloutResult:
    """B * G sampled responses; row b * G + g is sample g of prompt b.

    tokens: int32 [B*G, N], pad_id after the stop token (and for empty prompt rows).
    logprobs: float32 [B*G, N], log-probs of the sampled tokens (0 on padding).
    mask: bool [B*G, N], True on generated tokens including the stop token.
    lengths: int32 [B*G], generated tokens per row (= mask.sum(-1)).
    prompt_index: int32 [B*G], b. sample_index: int32 [B*G], g.
    num_steps: int32 [], decode steps run (max of lengths).
    """

    tokens: Array
    logprobs: Array
    mask: Array
    lengths: Array
    prompt_index: Array
    sample_index: Array
    num_steps: Array


def bucketed_length(length: int, bucket: int) -> int:
    """`length` rounded up to a multiple of `bucket` (at least one bucket)."""
    bucket = max(int(bucket), 1)
    return max(-(-int(length) // bucket), 1) * bucket


def pad_ids(
    prompts: Sequence[Sequence[int]], *, pad_id: int = 0, bucket: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to a multiple of `bucket`: (ids int32 [B, T], mask bool [B, T])."""
    return engine.pad_prompts(prompts, pad_id=pad_id, bucket=bucket)


def pad_embeds(embeds: Sequence[Array], bucket: int = 64) -> tuple[Array, Array]:
    """Left-pad embedding sequences [L_i, D] to a multiple of `bucket`.

    Returns (embeds [B, T, D] in the first sequence's dtype, zeros on padding; mask bool
    [B, T], True on real positions).
    """
    if not embeds:
        raise ValueError("embeds is empty: pass at least one [L, D] sequence")
    lengths = [int(e.shape[0]) for e in embeds]
    if min(lengths) == 0:
        raise ValueError(f"sequence {lengths.index(0)} is empty: every prompt needs a position")
    dims = {int(e.shape[1]) for e in embeds}
    if len(dims) != 1 or any(e.ndim != 2 for e in embeds):
        raise ValueError(f"expected [L_i, D] arrays with one D, got {[e.shape for e in embeds]}")
    t = bucketed_length(max(lengths), bucket)
    dtype = embeds[0].dtype
    out = jnp.stack([jnp.pad(jnp.asarray(e, dtype), ((t - e.shape[0], 0), (0, 0))) for e in embeds])
    mask = jnp.asarray(np.arange(t)[None, :] >= t - np.asarray(lengths)[:, None])
    return out, mask


def _left_pad_to(x: Array, t: int, value: Any = 0) -> Array:
    extra = t - x.shape[1]
    if extra == 0:
        return x
    widths = [(0, 0), (extra, 0)] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths, constant_values=value)


def rollout(
    model: nnx.Module,
    *,
    input_ids: Array | None = None,
    inputs_embeds: Array | None = None,
    input_mask: Array | None = None,
    cfg: RolloutConfig,
    rng: Array | int,
) -> RolloutResult:
    """Sample `cfg.num_samples` responses per prompt, sharing each prompt's prefill.

    model: an `LLM` (anything with `cfg`, `embed`, `decode_step`).
    input_ids: int [B, T] left padded, or inputs_embeds [B, T, D] left padded (exactly one).
    input_mask: bool [B, T], True on real positions; rows whose last column is padding are
      batch filler and generate only pad_id. None: every position is real (no left padding).
      T is left padded up to a multiple of `cfg.length_bucket` if it is not one already.
    rng: PRNG key or int seed (unused when temperature == 0).
    Returns a `RolloutResult` with B * G rows (b * G + g), without waiting for the device.
    """
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, D]")
    g = int(cfg.num_samples)
    if input_mask is None:
        prompt = input_ids if input_ids is not None else inputs_embeds
        input_mask = jnp.ones(np.shape(prompt)[:2], bool)
    input_mask = jnp.asarray(input_mask, bool)
    if input_mask.ndim != 2:
        raise ValueError(f"input_mask must be [B, T], got shape {input_mask.shape}")
    t = bucketed_length(input_mask.shape[1], cfg.length_bucket)
    input_mask = _left_pad_to(input_mask, t, False)
    if input_ids is not None:
        input_ids = _left_pad_to(jnp.asarray(input_ids, jnp.int32), t, 0)
    else:
        inputs_embeds = _left_pad_to(jnp.asarray(inputs_embeds), t, 0)
    out = engine.generate_tokens(
        model,
        input_ids,
        input_mask,
        max_new_tokens=cfg.max_new_tokens,
        inputs_embeds=inputs_embeds,
        rng=rng,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_k=cfg.top_k,
        stop_tokens=cfg.stop_token_ids,
        pad_id=cfg.pad_id,
        cache_dtype=cfg.cache_dtype,
        num_samples=g,
        prefill_chunk=cfg.prefill_chunk,
    )
    b = input_mask.shape[0]
    n = out.tokens.shape[1]
    return RolloutResult(
        tokens=out.tokens,
        logprobs=out.logprobs,
        mask=jnp.arange(n, dtype=jnp.int32)[None, :] < out.lengths[:, None],
        lengths=out.lengths,
        prompt_index=jnp.repeat(jnp.arange(b, dtype=jnp.int32), g),
        sample_index=jnp.tile(jnp.arange(g, dtype=jnp.int32), b),
        num_steps=out.num_steps,
    )


def sequence_logprobs(
    model: nnx.Module,
    *,
    prompt_ids: Array | None = None,
    prompt_embeds: Array | None = None,
    prompt_mask: Array | None = None,
    response_tokens: Array,
    response_mask: Array,
    prompt_index: Array,
    temperature: float | Array = 1.0,
) -> Array:
    """Per-token log-probs float32 [R, N] of responses under the model (one full forward).

    prompt_ids int [B, T] or prompt_embeds [B, T, D]: left-padded prompts (exactly one);
      prompt_mask bool [B, T], True on real positions (left padding: False then True); None
      means no padding (every prompt is T tokens long).
    response_tokens int [R, N], right padded (any pad id); response_mask bool [R, N], True on
      the tokens to score (a prefix of each row); prompt_index int [R]: each response's prompt
      row (`RolloutResult.prompt_index`).
    temperature: log-probs under softmax(logits / temperature), 0 counting as 1 (the rollout
      convention).

    Runs [prompt ; response[:, :-1]] (T + N - 1 columns) through `model.hidden_states` and
    computes logits only for the N response-predicting positions, never [R, T + N, V].
    Attention always takes the model's causal path (cuDNN flash attention on GPU, sequence
    parallel on a `sequence` mesh), never a dense [T, T] mask, which long (video) prompts
    cannot afford: with a prompt_mask each row is rotated so that its left padding moves to
    the end ([real prompt ; response ; padding]), where causal attention keeps it from reaching
    any scored position; positions are then 0 .. for the real tokens, as in `rollout` (response
    token j sits at position prompt_length + j). The response padding after each row's end is
    likewise unmasked and harmless. Either way the log-probs match `rollout`'s on the same
    prompts. Returns 0 where response_mask is False.
    Pure and differentiable w.r.t. the model's parameters: call it inside `nnx.jit` /
    `nnx.value_and_grad`.
    """
    if (prompt_ids is None) == (prompt_embeds is None):
        raise ValueError("pass exactly one of prompt_ids [B, T] and prompt_embeds [B, T, D]")
    prompt_index = jnp.asarray(prompt_index, jnp.int32)
    if prompt_ids is not None:
        prompt = model.embed(jnp.take(jnp.asarray(prompt_ids, jnp.int32), prompt_index, axis=0))
    else:
        prompt = jnp.take(prompt_embeds, prompt_index, axis=0).astype(model.dtype)
    tokens = jnp.asarray(response_tokens, jnp.int32)
    r_mask = jnp.asarray(response_mask, bool)
    t, n = prompt.shape[1], tokens.shape[1]
    # Pad ids (e.g. -1) may lie outside the vocabulary: embed a valid id there; it is masked.
    safe = jnp.where(r_mask, jnp.clip(tokens, 0, model.cfg.vocab_size - 1), 0)
    # The last response token predicts nothing we score: feed T + N - 1 columns.
    embeds = jnp.concatenate([prompt, model.embed(safe[:, :-1]).astype(prompt.dtype)], axis=1)
    # Column T - 1 + j (the last prompt token, then response token j - 1) predicts token j.
    if prompt_mask is None:  # no left padding
        hidden = model.hidden_states(inputs_embeds=embeds)[:, t - 1 : t - 1 + n]
    else:  # rotate row r left by its pad count: [real prompt ; response[:-1] ; padding]
        p_mask = jnp.take(jnp.asarray(prompt_mask, bool), prompt_index, axis=0)
        pad = t - jnp.sum(p_mask, axis=1, dtype=jnp.int32)  # [R]
        cols = jnp.arange(embeds.shape[1], dtype=jnp.int32)
        src = (cols[None, :] + pad[:, None]) % embeds.shape[1]
        embeds = jnp.take_along_axis(embeds, src[:, :, None], axis=1)
        hidden = model.hidden_states(inputs_embeds=embeds)
        at = jnp.maximum(t - 1 - pad, 0)[:, None] + jnp.arange(n, dtype=jnp.int32)[None, :]
        hidden = jnp.take_along_axis(hidden, at[:, :, None], axis=1)
    logits = model.logits(hidden)  # [R, N, V]
    logp = token_logprobs(logits, safe, temperature=temperature)
    return jnp.where(r_mask, logp, 0.0)
