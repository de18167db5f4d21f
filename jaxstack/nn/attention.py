"""The attention entry point and the one mask helper.

`dot_product_attention` uses cuDNN's fused kernel on GPU when the inputs allow it (bf16/fp16,
head_dim <= 256 and a multiple of 8) and XLA everywhere else. `make_attn_mask` expresses causal,
full, prefix-LM and block-causal masks with one rule (a cumulative sum over "starts a new
autoregressive block" flags), plus padding and packed-sequence segment ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def make_attn_mask(
    mask_ar_bt: Array,
    input_mask_bt: Array | None = None,
    segment_ids_bt: Array | None = None,
) -> Array:
    """Boolean attention mask [batch, 1, T, T] from autoregressive flags.

    mask_ar_bt: int/bool [B, T]. Token i may attend to token j iff cumsum(mask_ar)[j] <=
      cumsum(mask_ar)[i]. All ones -> causal; all zeros -> full (bidirectional); zeros on a
      prefix then ones -> prefix-LM; a one at the start of each block and zeros inside ->
      block-causal (full inside a block, causal across blocks).
    input_mask_bt: bool [B, T], False for padding (padding attends to and is seen by nothing).
    segment_ids_bt: int [B, T], packed sequences attend only within equal ids.
    """
    cumsum = jnp.cumsum(mask_ar_bt.astype(jnp.int32), axis=-1)
    mask = cumsum[:, None, :] <= cumsum[:, :, None]
    if input_mask_bt is not None:
        valid = input_mask_bt.astype(bool)
        mask = mask & valid[:, None, :] & valid[:, :, None]
    if segment_ids_bt is not None:
        mask = mask & (segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :])
    return mask[:, None, :, :]


def causal_flags(batch: int, length: int) -> Array:
    """mask_ar for a plain causal mask: all ones [B, T]."""
    return jnp.ones((batch, length), jnp.int32)


def _cudnn_ok(q: Array, k: Array) -> bool:
    if jax.default_backend() != "gpu":
        return False
    head_dim = q.shape[-1]
    return (
        q.dtype in (jnp.bfloat16, jnp.float16)
        and q.dtype == k.dtype
        and head_dim <= 256
        and head_dim % 8 == 0
    )


def dot_product_attention(
    q_bthd: Array,
    k_bshd: Array,
    v_bshd: Array,
    *,
    mask: Array | None = None,
    causal: bool = False,
    scale: float | None = None,
    soft_cap: float | None = None,
    window: int | None = None,
    implementation: str | None = None,
) -> Array:
    """Scaled dot-product attention with grouped-query support.

    q_bthd: [B, T, Nq, H]; k_bshd, v_bshd: [B, S, Nkv, H] with Nq % Nkv == 0.
    mask: optional bool, broadcastable to [B, Nq, T, S]; True = may attend.
    causal: apply a causal mask aligned to the top-left (T == S for training/prefill).
    scale: logit scale, default H ** -0.5.
    soft_cap: Gemma-2 logit soft-capping, logits <- soft_cap * tanh(logits / soft_cap) after
      scaling and before masking (float32).
    window: sliding window: query i sees key j only if i - j < window, indices aligned to the
      top-left as for `causal` (combine with causal or a causal mask; with an offset between
      query and key indices, e.g. decoding against a cache, put the window into `mask`).
    implementation: None (cuDNN on GPU when supported, else XLA), "cudnn" or "xla". Soft-capping
      and windows run on the XLA path (None picks it; "cudnn" raises ValueError).
    Returns [B, T, Nq, H] in q's dtype. Rows whose mask is all False return zeros.
    """
    extras = soft_cap is not None or window is not None
    if implementation is None:
        implementation = "cudnn" if _cudnn_ok(q_bthd, k_bshd) and not extras else "xla"
    if implementation == "cudnn":
        if extras:
            raise ValueError("soft_cap and window are not supported by the cuDNN path; use 'xla'")
        return _cudnn_attention(q_bthd, k_bshd, v_bshd, mask=mask, causal=causal, scale=scale)
    return _xla_attention(
        q_bthd,
        k_bshd,
        v_bshd,
        mask=mask,
        causal=causal,
        scale=scale,
        soft_cap=soft_cap,
        window=window,
    )


CUDNN_SEQ_MULTIPLE = 64


def _cudnn_attention(q, k, v, *, mask, causal, scale):
    """cuDNN flash attention with T and S padded up to a multiple of 64 (cuDNN rejects some
    lengths, e.g. odd ones with a mask in training). Padded keys are never attended by real
    queries (masked, or after them under the causal mask); padded query rows attend to the
    real keys and are sliced off."""
    t, s = q.shape[1], k.shape[1]
    pad_t, pad_s = (-t) % CUDNN_SEQ_MULTIPLE, (-s) % CUDNN_SEQ_MULTIPLE
    if causal and t != s:
        pad_t = pad_s = 0  # top-left causal alignment would shift: leave such calls as they are
    kv_lengths = None
    if pad_t or pad_s:
        seq = lambda x, n: jnp.pad(x, ((0, 0), (0, n), (0, 0), (0, 0)))
        q, k, v = seq(q, pad_t), seq(k, pad_s), seq(v, pad_s)
        if mask is not None:
            mask = jnp.asarray(mask, bool)
            mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
            rows = pad_t if mask.shape[-2] == t else 0
            cols = pad_s if mask.shape[-1] == s else 0
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, rows), (0, 0)), constant_values=True)
            mask = jnp.pad(mask, ((0, 0), (0, 0), (0, 0), (0, cols)), constant_values=False)
        elif not causal:
            kv_lengths = jnp.full((q.shape[0],), s, jnp.int32)
    out = jax.nn.dot_product_attention(
        q,
        k,
        v,
        mask=mask,
        is_causal=causal,
        scale=scale,
        key_value_seq_lengths=kv_lengths,
        implementation="cudnn",
    )
    return out[:, :t]


def _xla_attention(q, k, v, *, mask, causal, scale, soft_cap=None, window=None):
    b, t, nq, h = q.shape
    s, nkv = k.shape[1], k.shape[2]
    groups = nq // nkv
    scale = h**-0.5 if scale is None else scale
    q = q.reshape(b, t, nkv, groups, h)
    logits = jnp.einsum("btkgh,bskh->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    if soft_cap is not None:
        logits = jnp.tanh(logits / soft_cap) * soft_cap
    full_mask = None
    if mask is not None:
        m = jnp.broadcast_to(mask, (b, nq, t, s)).reshape(b, nkv, groups, t, s)
        full_mask = m
    if causal:
        cm = jnp.arange(s)[None, :] <= jnp.arange(t)[:, None]
        full_mask = cm if full_mask is None else full_mask & cm
    if window is not None:
        wm = jnp.arange(t)[:, None] - jnp.arange(s)[None, :] < window
        full_mask = wm if full_mask is None else full_mask & wm
    if full_mask is not None:
        logits = jnp.where(full_mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    if full_mask is not None:
        probs = jnp.where(full_mask, probs, 0.0)
    out = jnp.einsum("bkgts,bskh->btkgh", probs.astype(v.dtype), v)
    return out.reshape(b, t, nq, h)
