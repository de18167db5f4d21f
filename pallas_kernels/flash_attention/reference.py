"""Pure-JAX reference of the ring-attention block kernel: the test oracle and the CPU fallback.

Contract (every implementation in this folder follows it exactly):

`block_attention_fwd(q, k, v, *, q_positions, kv_positions, causal, q_segment_ids=None,
kv_segment_ids=None, scale=None) -> (out, lse)`
    q [B, T, Nq, H]; k, v [B, S, Nkv, H] with Nq % Nkv == 0 (GQA: query head n reads KV head
    n // (Nq // Nkv)). q_positions int32 [T], kv_positions int32 [S]: global token positions;
    `causal` means key j is visible to query i iff kv_positions[j] <= q_positions[i] (positions,
    not offsets, so zigzag layouts work). q_segment_ids int32 [B, T], kv_segment_ids int32
    [B, S] (both or neither): attend only within equal ids. scale: default H ** -0.5.
    Returns out [B, T, Nq, H] in q.dtype, normalised within this KV block, and lse float32
    [B, Nq, T], the log-sum-exp of the scaled logits over this block's visible keys. Rows with
    no visible key: out 0, lse -inf. Computed in float32.

`block_attention_bwd(q, k, v, out, lse, dout, *, q_positions, kv_positions, causal,
q_segment_ids=None, kv_segment_ids=None, scale=None) -> (dq, dk, dv)`
    out [B, T, Nq, H] and lse float32 [B, Nq, T] are the GLOBAL output and log-sum-exp (merged
    over all KV blocks), dout [B, T, Nq, H] the output cotangent. Returns this block's
    contribution in float32: dq [B, T, Nq, H] (sum it over KV blocks), dk, dv [B, S, Nkv, H]
    (exact gradients of this KV block). With delta = sum(out * dout, -1), p = exp(s - lse),
    dp = dout v^T, ds = p (dp - delta): dq = scale ds k, dk = scale ds^T q, dv = p^T dout.

`merge_partials(out1, lse1, out2, lse2) -> (out, lse)`
    Online log-sum-exp merge of two partial results over disjoint KV sets (handles -inf).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def visibility_mask(
    q_positions: Array,
    kv_positions: Array,
    *,
    causal: bool,
    q_segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
) -> Array | None:
    """Boolean mask [B or 1, T, S] (True = key visible to query), or None when all visible.

    q_positions int [T], kv_positions int [S]; segment ids int [B, T] / [B, S].
    """
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    mask = None
    if causal:
        mask = (kv_positions[None, :] <= q_positions[:, None])[None]
    if q_segment_ids is not None:
        seg = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
        mask = seg if mask is None else mask & seg
    return mask


def _grouped_logits(q, k, scale, mask):
    """Scaled float32 logits [B, Nkv, G, T, S], -inf where masked; q as [B, T, Nkv, G, H]."""
    b, t, nq, h = q.shape
    nkv = k.shape[2]
    qg = q.reshape(b, t, nkv, nq // nkv, h).astype(jnp.float32)
    s = jnp.einsum("btkgh,bskh->bkgts", qg, k.astype(jnp.float32)) * scale
    if mask is not None:
        s = jnp.where(mask[:, None, None], s, -jnp.inf)
    return s


def _check(q: Array, k: Array, v: Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(
            f"expected q [B,T,Nq,H], k/v [B,S,Nkv,H]; got {q.shape} {k.shape} {v.shape}"
        )
    if q.shape[2] % k.shape[2] or q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"incompatible q {q.shape} and k/v {k.shape} (need Nq % Nkv == 0)")


def block_attention_fwd(
    q: Array,
    k: Array,
    v: Array,
    *,
    q_positions: Array,
    kv_positions: Array,
    causal: bool,
    q_segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    scale: float | None = None,
) -> tuple[Array, Array]:
    """Attention of q over one KV block: (out [B, T, Nq, H] q.dtype, lse float32 [B, Nq, T]).

    See the module docstring for the full contract.
    """
    _check(q, k, v)
    b, t, nq, h = q.shape
    scale = h**-0.5 if scale is None else scale
    mask = visibility_mask(
        q_positions,
        kv_positions,
        causal=causal,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
    s = _grouped_logits(q, k, scale, mask)  # [B, K, G, T, S]
    m = jnp.max(s, axis=-1, keepdims=True)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    p = jnp.exp(s - m)  # exp(-inf) = 0 for masked keys
    denom = jnp.sum(p, axis=-1, keepdims=True)
    safe = jnp.where(denom > 0, denom, 1.0)
    o = jnp.einsum("bkgts,bskh->btkgh", p / safe, v.astype(jnp.float32))
    lse = jnp.where(denom > 0, m + jnp.log(safe), -jnp.inf)[..., 0]  # [B, K, G, T]
    return o.reshape(b, t, nq, h).astype(q.dtype), lse.reshape(b, nq, t)


def block_attention_bwd(
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    dout: Array,
    *,
    q_positions: Array,
    kv_positions: Array,
    causal: bool,
    q_segment_ids: Array | None = None,
    kv_segment_ids: Array | None = None,
    scale: float | None = None,
) -> tuple[Array, Array, Array]:
    """This KV block's gradient contributions (dq [B,T,Nq,H], dk, dv [B,S,Nkv,H]), float32.

    out [B, T, Nq, H], lse float32 [B, Nq, T]: the global (merged) forward results; dout: the
    cotangent of out. See the module docstring for the full contract.
    """
    _check(q, k, v)
    b, t, nq, h = q.shape
    nkv = k.shape[2]
    g = nq // nkv
    scale = h**-0.5 if scale is None else scale
    mask = visibility_mask(
        q_positions,
        kv_positions,
        causal=causal,
        q_segment_ids=q_segment_ids,
        kv_segment_ids=kv_segment_ids,
    )
    s = _grouped_logits(q, k, scale, mask)  # [B, K, G, T, S]
    lse_g = lse.astype(jnp.float32).reshape(b, nkv, g, t)[..., None]
    p = jnp.where(jnp.isfinite(lse_g), jnp.exp(s - jnp.where(jnp.isfinite(lse_g), lse_g, 0.0)), 0.0)
    do = dout.astype(jnp.float32).reshape(b, t, nkv, g, h)
    delta = jnp.sum(out.astype(jnp.float32).reshape(b, t, nkv, g, h) * do, axis=-1)  # [B,T,K,G]
    delta = jnp.transpose(delta, (0, 2, 3, 1))[..., None]  # [B, K, G, T, 1]
    vf, kf = v.astype(jnp.float32), k.astype(jnp.float32)
    dv = jnp.einsum("bkgts,btkgh->bskh", p, do)
    dp = jnp.einsum("btkgh,bskh->bkgts", do, vf)
    ds = p * (dp - delta) * scale
    dq = jnp.einsum("bkgts,bskh->btkgh", ds, kf).reshape(b, t, nq, h)
    dk = jnp.einsum("bkgts,btkgh->bskh", ds, q.astype(jnp.float32).reshape(b, t, nkv, g, h))
    return dq, dk, dv


def merge_partials(out1: Array, lse1: Array, out2: Array, lse2: Array) -> tuple[Array, Array]:
    """Merge two attention partials over disjoint key sets.

    out1, out2 [B, T, Nq, H] (each normalised over its own keys); lse1, lse2 float32 [B, Nq, T].
    Returns (out [B, T, Nq, H] in the promoted dtype of out1/out2, lse float32 [B, Nq, T]);
    rows where both lse are -inf give out 0, lse -inf.
    """
    lse1, lse2 = lse1.astype(jnp.float32), lse2.astype(jnp.float32)
    m = jnp.maximum(lse1, lse2)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w1, w2 = jnp.exp(lse1 - m), jnp.exp(lse2 - m)
    total = w1 + w2
    safe = jnp.where(total > 0, total, 1.0)
    lse = jnp.where(total > 0, m + jnp.log(safe), -jnp.inf)
    a1 = jnp.transpose(w1 / safe, (0, 2, 1))[..., None]  # [B, T, Nq, 1]
    a2 = jnp.transpose(w2 / safe, (0, 2, 1))[..., None]
    dtype = jnp.result_type(out1.dtype, out2.dtype)
    out = a1 * out1.astype(jnp.float32) + a2 * out2.astype(jnp.float32)
    return out.astype(dtype), lse
