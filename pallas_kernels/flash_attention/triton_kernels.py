"""Kernel bodies of the Pallas-Triton flash-attention block kernels (see ``pallas_triton``).

Each body runs for one grid point; refs are the blocks chosen by the BlockSpecs in
``pallas_triton``. Logits live in the log2 domain (``exp2``); all state is float32. Masks are
built from global positions, segment ids and the real KV length, and applied only on blocks
that are not fully visible (``block_ranges`` / ``run_spans``).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

LOG2E = math.log2(math.e)
_LN2 = math.log(2.0)
# Finite "minus infinity" for masked logits: keeps the online max free of inf - inf = NaN.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_INT32_MIN = int(np.iinfo(np.int32).min)
_INT32_MAX = int(np.iinfo(np.int32).max)


def block_ranges(
    q_positions: jax.Array,
    kv_positions: jax.Array,
    *,
    t: int,
    s: int,
    block_q: int,
    block_k: int,
    causal: bool,
    has_segments: bool,
) -> tuple[jax.Array, jax.Array]:
    """Per-block loop bounds from the (padded) position arrays.

    A KV block is *visible* to a q block when it holds a real key and, if causal, its smallest
    key position is <= the largest query position of the q block; it is *fully visible* when,
    besides, it holds no padding, there are no segment ids and (if causal) its largest key
    position is <= the smallest query position. Kernels loop over the span ``[lo, hi)`` of
    visible blocks, with the per-element mask except on ``[ulo, uhi)``, the span of fully visible
    blocks when those are contiguous (else empty). The masks keep any block of the span exact,
    so unsorted positions stay correct; sorted shards, zig-zag ones included, skip every
    invisible block and mask only the diagonal ones.

    Args:
      q_positions: int32 [Tp] padded query positions (real length ``t``).
      kv_positions: int32 [Sp] padded key positions (real length ``s``).

    Returns:
      kv_ranges int32 [Tp // block_q, 4] (KV-block bounds per q block) and q_ranges int32
      [Sp // block_k, 4] (q-block bounds per KV block), rows ``(lo, ulo, uhi, hi)`` with
      ``lo <= ulo <= uhi <= hi``.
    """
    nq, nk = q_positions.shape[0] // block_q, kv_positions.shape[0] // block_k
    q_valid = (jnp.arange(q_positions.shape[0]) < t).reshape(nq, block_q)
    kv_valid = (jnp.arange(kv_positions.shape[0]) < s).reshape(nk, block_k)
    vis = q_valid.any(axis=1)[:, None] & kv_valid.any(axis=1)[None, :]
    full = vis & kv_valid.all(axis=1)[None, :] & (not has_segments)
    if causal:
        q_pos = q_positions.reshape(nq, block_q)
        kv_pos = kv_positions.reshape(nk, block_k)
        q_max = jnp.where(q_valid, q_pos, _INT32_MIN).max(axis=1)
        q_min = jnp.where(q_valid, q_pos, _INT32_MAX).min(axis=1)
        kv_min = jnp.where(kv_valid, kv_pos, _INT32_MAX).min(axis=1)
        kv_max = jnp.where(kv_valid, kv_pos, _INT32_MIN).max(axis=1)
        vis = vis & (kv_min[None, :] <= q_max[:, None])
        full = full & (kv_max[None, :] <= q_min[:, None])

    def span(v: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        n = v.shape[1]
        has = v.any(axis=1)
        lo = jnp.where(has, jnp.argmax(v, axis=1), 0)
        hi = jnp.where(has, n - jnp.argmax(v[:, ::-1], axis=1), 0)
        contiguous = has & (v.sum(axis=1) == hi - lo)
        return lo, hi, contiguous

    def ranges(v: jax.Array, f: jax.Array) -> jax.Array:
        lo, hi, _ = span(v)
        ulo, uhi, ok = span(f)
        ulo, uhi = jnp.where(ok, ulo, lo), jnp.where(ok, uhi, lo)
        return jnp.stack([lo, ulo, uhi, hi], axis=1).astype(jnp.int32)

    return ranges(vis, full), ranges(vis.T, full.T)


def run_spans(rng_ref, body_masked, body_unmasked, carry, *, needs_mask: bool):
    """fori_loop over ``[lo, hi)`` from a (lo, ulo, uhi, hi) block-range ref: masked body on
    ``[lo, ulo)`` and ``[uhi, hi)``, unmasked body on ``[ulo, uhi)``; one unmasked loop when the
    kernel has no mask at all."""
    lo, hi = rng_ref[0], rng_ref[3]
    if not needs_mask:
        return lax.fori_loop(lo, hi, body_unmasked, carry)
    ulo, uhi = rng_ref[1], rng_ref[2]
    carry = lax.fori_loop(lo, ulo, body_masked, carry)
    carry = lax.fori_loop(ulo, uhi, body_unmasked, carry)
    return lax.fori_loop(uhi, hi, body_masked, carry)


def _dot(a: jax.Array, b: jax.Array, contract: tuple[int, int]) -> jax.Array:
    """2-D matmul with fp32 accumulation; IEEE fp32 (no TF32) when the operands are fp32."""
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a,
        b,
        (((contract[0],), (contract[1],)), ((), ())),
        precision=precision,
        preferred_element_type=jnp.float32,
    )


def _mask(
    q_pos: jax.Array,
    kv_pos: jax.Array,
    q_seg: jax.Array | None,
    kv_seg: jax.Array | None,
    kv_start: jax.Array,
    *,
    causal: bool,
    s_valid: int | None,
) -> jax.Array | None:
    """Boolean [bq, bk] visibility of keys to queries, or None when everything is visible."""
    mask = None

    def conj(m: jax.Array | None, new: jax.Array) -> jax.Array:
        return new if m is None else jnp.logical_and(m, new)

    if causal:
        mask = conj(mask, kv_pos[None, :] <= q_pos[:, None])
    if q_seg is not None:
        mask = conj(mask, q_seg[:, None] == kv_seg[None, :])
    if s_valid is not None:
        idx = kv_start + lax.broadcasted_iota(jnp.int32, (q_pos.shape[0], kv_pos.shape[0]), 1)
        mask = conj(mask, idx < s_valid)
    return mask


def _kv_block_mask(q_pos, q_seg, kv_pos_ref, kv_seg_ref, sl, start, *, causal, s_valid):
    """Mask of KV block ``sl`` (starting at ``start``) for a kernel's whole q block: the
    forward and dq kernels loop over KV blocks with the q block fixed."""
    return _mask(
        q_pos,
        kv_pos_ref[sl],
        q_seg,
        None if kv_seg_ref is None else kv_seg_ref[sl],
        start,
        causal=causal,
        s_valid=s_valid,
    )


def fwd_kernel(
    rng_ref,
    q_pos_ref,
    kv_pos_ref,
    *refs,
    has_segments: bool,
    causal: bool,
    block_k: int,
    s_valid: int | None,
    scale_log2: float,
):
    """One (q block, batch, q head): online softmax over KV blocks [lo, hi)."""
    if has_segments:
        q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        q_seg = q_seg_ref[...]
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref = refs
        q_seg = kv_seg_ref = None
    q = q_ref[...]  # [bq, H]
    q_pos = q_pos_ref[...]  # [bq]
    block_q, head_dim = q.shape

    def body(j, carry, masked: bool):
        acc, m_prev, l_prev = carry
        start = pl.multiple_of(j * block_k, block_k)
        sl = pl.ds(start, block_k)
        k = k_ref[sl, :]
        v = v_ref[sl, :]
        qk = _dot(q, k, (1, 1))  # [bq, bk]
        mask = None
        if masked:
            mask = _kv_block_mask(
                q_pos, q_seg, kv_pos_ref, kv_seg_ref, sl, start, causal=causal, s_valid=s_valid
            )
        if mask is None:
            # Row max of the raw logits, scaled once per row, so that the scale and the max
            # subtraction fuse into one FMA per logit (the exp stage bounds this loop).
            m_new = jnp.maximum(m_prev, jnp.max(qk, axis=1) * scale_log2)
            p = jnp.exp2(qk * scale_log2 - m_new[:, None])
        else:
            s = jnp.where(mask, qk * scale_log2, _MASK_VALUE)  # log2 domain
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
            p = jnp.where(mask, jnp.exp2(s - m_new[:, None]), 0.0)
        alpha = jnp.exp2(m_prev - m_new)
        l_new = alpha * l_prev + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v, (1, 0))
        return acc, m_new, l_new

    acc0 = jnp.zeros((block_q, head_dim), jnp.float32)
    m0 = jnp.full((block_q,), _MASK_VALUE, jnp.float32)
    l0 = jnp.zeros((block_q,), jnp.float32)
    acc, m, denom = run_spans(
        rng_ref,
        functools.partial(body, masked=True),
        functools.partial(body, masked=False),
        (acc0, m0, l0),
        needs_mask=causal or has_segments or s_valid is not None,
    )
    has_key = denom > 0.0
    l_safe = jnp.where(has_key, denom, 1.0)
    o_ref[...] = jnp.where(has_key[:, None], acc / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(has_key, (m + jnp.log2(l_safe)) * _LN2, -jnp.inf)


def dq_kernel(
    rng_ref,
    q_pos_ref,
    kv_pos_ref,
    *refs,
    has_segments: bool,
    causal: bool,
    block_k: int,
    s_valid: int | None,
    scale: float,
):
    """One (q block, batch, q head): dq = scale * sum_j ds_j k_j over KV blocks [lo, hi)."""
    if has_segments:
        (q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref) = refs
        q_seg = q_seg_ref[...]
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref = refs
        q_seg = kv_seg_ref = None
    q = q_ref[...]
    do = do_ref[...]
    lse2 = lse_ref[...] * LOG2E  # [bq], log2 domain
    delta = delta_ref[...]
    q_pos = q_pos_ref[...]
    scale_log2 = scale * LOG2E

    def body(j, dq, masked: bool):
        start = pl.multiple_of(j * block_k, block_k)
        sl = pl.ds(start, block_k)
        k = k_ref[sl, :]
        v = v_ref[sl, :]
        s = _dot(q, k, (1, 1)) * scale_log2
        p = jnp.exp2(s - lse2[:, None])
        if masked:
            mask = _kv_block_mask(
                q_pos, q_seg, kv_pos_ref, kv_seg_ref, sl, start, causal=causal, s_valid=s_valid
            )
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
        dp = _dot(do, v, (1, 1))
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k, (1, 0))

    dq = run_spans(
        rng_ref,
        functools.partial(body, masked=True),
        functools.partial(body, masked=False),
        jnp.zeros(q.shape, jnp.float32),
        needs_mask=causal or has_segments or s_valid is not None,
    )
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def dkdv_kernel(
    rng_ref,
    q_pos_ref,
    kv_pos_ref,
    *refs,
    has_segments: bool,
    causal: bool,
    block_q: int,
    s_valid: int | None,
    scale: float,
):
    """One (kv block, batch, q head): this head's dk, dv over q blocks [lo, hi)."""
    if has_segments:
        (q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref) = refs[:8]
        kv_seg = kv_seg_ref[...]
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref = refs[:6]
        kv_seg = None
    dk_ref, dv_ref = refs[-2:]
    k = k_ref[...]  # [bk, H]
    v = v_ref[...]
    kv_pos = kv_pos_ref[...]
    kv_start = pl.program_id(0) * k.shape[0]
    scale_log2 = scale * LOG2E

    def body(i, carry, masked: bool):
        dk, dv = carry
        start = pl.multiple_of(i * block_q, block_q)
        sl = pl.ds(start, block_q)
        q = q_ref[sl, :]
        do = do_ref[sl, :]
        lse2 = lse_ref[sl] * LOG2E
        delta = delta_ref[sl]
        s = _dot(q, k, (1, 1)) * scale_log2  # [bq, bk]
        p = jnp.exp2(s - lse2[:, None])
        if masked:
            mask = _mask(
                q_pos_ref[sl],
                kv_pos,
                q_seg_ref[sl] if has_segments else None,
                kv_seg,
                kv_start,
                causal=causal,
                s_valid=s_valid,
            )
            if mask is not None:
                p = jnp.where(mask, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, (0, 0))
        dp = _dot(do, v, (1, 1))
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, (0, 0))
        return dk, dv

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = run_spans(
        rng_ref,
        functools.partial(body, masked=True),
        functools.partial(body, masked=False),
        (zeros, zeros),
        needs_mask=causal or has_segments or s_valid is not None,
    )
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)
