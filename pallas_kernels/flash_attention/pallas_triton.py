"""Flash-attention block kernels (forward with LSE, backward with an external global LSE).

Pallas `pl.pallas_call` kernels that lower through Triton on NVIDIA GPUs (jax 0.10.2-0.11.x; the
Triton lowering is deprecated since 0.11 but works) and run on the CPU with ``interpret=True``.
They implement the contract of :mod:`pallas_kernels.flash_attention.reference`:

* :func:`block_attention_fwd` attends a query block to one KV block and returns the output
  normalised within that KV block plus its log-sum-exp, so a ring-attention driver can merge
  partial results from several KV blocks.
* :func:`block_attention_bwd` takes the *global* merged output and LSE and returns the
  gradients with respect to this KV block (and the query block's share of dq).

Masking uses global token positions (``kv_pos <= q_pos`` when causal) and optional segment ids,
so zig-zag or otherwise non-contiguous sequence shards work. Sequences are padded internally to
block multiples; padded keys are masked by index, padded query rows are dropped.

Kernel layout (FlashAttention-2):

* forward: grid ``(q blocks, B, Nq)``, online softmax over the KV blocks ``[lo, hi)`` that can
  be visible to the query block (computed from the position arrays), exp2 domain, fp32 state;
  the per-element mask is applied only to blocks that are not fully visible.
* dq: grid ``(q blocks, B, Nq)``, loop over visible KV blocks.
* dk/dv: grid ``(kv blocks, B, Nq)``, loop over visible q blocks; with GQA each query head
  writes fp32 partial dk/dv that are summed over the head group afterwards.
* GQA: query head n reads KV head n // (Nq // Nkv) through the K/V BlockSpec index maps.

This file holds the public API and the ``pallas_call`` set-up; the kernel bodies and the
block-range logic are in :mod:`pallas_kernels.flash_attention.triton_kernels`.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.flash_attention.triton_kernels import (
    LOG2E,
    block_ranges,
    dkdv_kernel,
    dq_kernel,
    fwd_kernel,
)

__all__ = ["block_attention_fwd", "block_attention_bwd", "default_block_sizes"]

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))


def default_block_sizes(head_dim: int, dtype: jnp.dtype | type = jnp.bfloat16) -> dict[str, int]:
    """Default tiles and launch parameters for one head dimension and input dtype.

    head_dim 128, bf16: chosen by ``experiments/sweep_flash_tiles.py`` on an H200 (jax 0.11.2;
    results in experiments/results/flash_attention_tiles.json): forward 128x128 tiles, 8 warps,
    3 pipeline stages (0.70-0.77x cuDNN; 4 stages overflow shared memory); backward 64x64 tiles,
    4 warps, 2 stages (2.2x faster than 8 warps, which the register count had suggested).
    head_dim 64 (4 warps) and 256 (8 warps) keep 2-stage tiles that compile without spills.
    float32 (IEEE dots, no tensor-core tiles) gets tiles halved and 2 stages.

    Args:
      head_dim: attention head dimension H.
      dtype: input dtype (bf16/fp16 share defaults; 4-byte dtypes get half-size tiles).

    Returns:
      dict with ``block_q``, ``block_k``, ``num_warps``, ``num_stages`` (forward) and
      ``block_q_bwd``, ``block_k_bwd``, ``num_warps_bwd``, ``num_stages_bwd`` (both backward
      kernels).
    """
    bwd = dict(num_stages_bwd=2)
    if head_dim <= 64:
        fwd = dict(block_q=64, block_k=64, num_warps=4, num_stages=2)
        bwd.update(block_q_bwd=64, block_k_bwd=64, num_warps_bwd=4)
    elif head_dim <= 128:
        fwd = dict(block_q=128, block_k=128, num_warps=8, num_stages=3)
        bwd.update(block_q_bwd=64, block_k_bwd=64, num_warps_bwd=4)
    else:
        fwd = dict(block_q=64, block_k=32, num_warps=8, num_stages=2)
        bwd.update(block_q_bwd=32, block_k_bwd=32, num_warps_bwd=8)
    cfg = {**fwd, **bwd}
    if jnp.dtype(dtype).itemsize >= 4:
        cfg = {k: (max(16, v // 2) if k.startswith("block") else v) for k, v in cfg.items()}
        cfg["num_stages"] = 2
    return cfg


def _default_interpret(interpret: bool | None) -> bool:
    """Interpret mode unless running on a GPU backend (explicit value wins)."""
    if interpret is not None:
        return bool(interpret)
    return jax.default_backend() != "gpu"


def _fit_block(block: int, length: int) -> int:
    """Validate a tile and shrink it to the next power of two >= length (min 16: Triton's
    smallest dot operand)."""
    if block < 16 or block & (block - 1):
        raise ValueError(f"block sizes must be powers of two >= 16; got {block}")
    return int(min(block, max(16, pl.next_power_of_2(length))))


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _pad_axis(x: jax.Array, axis: int, new_len: int, value: float | int = 0) -> jax.Array:
    """Pad ``x`` along ``axis`` at the end to ``new_len`` with a constant."""
    if x.shape[axis] == new_len:
        return x
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, new_len - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


@functools.partial(
    jax.jit,
    static_argnames=(
        "causal",
        "scale",
        "block_q",
        "block_k",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def _fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    causal: bool,
    scale: float,
    block_q: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
) -> tuple[jax.Array, jax.Array]:
    b, t, nq_heads, h = q.shape
    s_len, nkv_heads = k.shape[1], k.shape[2]
    group = nq_heads // nkv_heads
    hp = max(16, pl.next_power_of_2(h))
    tp, sp = _round_up(t, block_q), _round_up(s_len, block_k)
    q_p = _pad_axis(_pad_axis(q, 1, tp), 3, hp)
    k_p = _pad_axis(_pad_axis(k, 1, sp), 3, hp)
    v_p = _pad_axis(_pad_axis(v, 1, sp), 3, hp)
    q_pos = _pad_axis(q_positions.astype(jnp.int32), 0, tp)
    kv_pos = _pad_axis(kv_positions.astype(jnp.int32), 0, sp)
    has_segments = q_segment_ids is not None
    kv_ranges, _ = block_ranges(
        q_pos,
        kv_pos,
        t=t,
        s=s_len,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        has_segments=has_segments,
    )
    nqb = tp // block_q

    in_specs = [
        pl.BlockSpec((None, 4), lambda i, bi, hi: (i, 0)),
        pl.BlockSpec((block_q,), lambda i, bi, hi: (i,)),
        pl.BlockSpec((sp,), lambda i, bi, hi: (0,)),
    ]
    args = [kv_ranges, q_pos, kv_pos]
    if has_segments:
        in_specs += [
            pl.BlockSpec((None, block_q), lambda i, bi, hi: (bi, i)),
            pl.BlockSpec((None, sp), lambda i, bi, hi: (bi, 0)),
        ]
        args += [
            _pad_axis(q_segment_ids.astype(jnp.int32), 1, tp),
            _pad_axis(kv_segment_ids.astype(jnp.int32), 1, sp),
        ]
    in_specs += [
        pl.BlockSpec((None, block_q, None, hp), lambda i, bi, hi: (bi, i, hi, 0)),
        pl.BlockSpec((None, sp, None, hp), lambda i, bi, hi: (bi, 0, hi // group, 0)),
        pl.BlockSpec((None, sp, None, hp), lambda i, bi, hi: (bi, 0, hi // group, 0)),
    ]
    args += [q_p, k_p, v_p]
    kernel = functools.partial(
        fwd_kernel,
        has_segments=has_segments,
        causal=causal,
        block_k=block_k,
        s_valid=None if sp == s_len else s_len,
        scale_log2=scale * LOG2E,
    )
    out, lse = pl.pallas_call(
        kernel,
        grid=(nqb, b, nq_heads),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, block_q, None, hp), lambda i, bi, hi: (bi, i, hi, 0)),
            pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, tp, nq_heads, hp), q.dtype),
            jax.ShapeDtypeStruct((b, nq_heads, tp), jnp.float32),
        ],
        compiler_params=plt.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="block_attention_fwd",
    )(*args)
    return out[:, :t, :, :h], lse[:, :, :t]


def _check_inputs(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
) -> None:
    """Raise ValueError with the offending shapes when the inputs break the contract."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, N, H]; got {q.shape}, {k.shape}, {v.shape}")
    b, t, nq_heads, h = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"k/v must be [B={b}, S, Nkv, H={h}]; got k {k.shape}, v {v.shape}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _DTYPES:
        raise ValueError(
            f"q, k, v must share one dtype of {[str(d) for d in _DTYPES]}; got "
            f"{q.dtype}, {k.dtype}, {v.dtype}"
        )
    if nq_heads % k.shape[2]:
        raise ValueError(f"Nq={nq_heads} must be a multiple of Nkv={k.shape[2]} (GQA)")
    if q_positions.shape != (t,) or kv_positions.shape != (k.shape[1],):
        raise ValueError(
            f"q_positions must be [T={t}] and kv_positions [S={k.shape[1]}]; got "
            f"{q_positions.shape}, {kv_positions.shape}"
        )
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("pass both q_segment_ids and kv_segment_ids, or neither")
    if q_segment_ids is not None and (
        q_segment_ids.shape != (b, t) or kv_segment_ids.shape != (b, k.shape[1])
    ):
        raise ValueError(
            f"segment ids must be [B, T]={(b, t)} and [B, S]={(b, k.shape[1])}; got "
            f"{q_segment_ids.shape}, {kv_segment_ids.shape}"
        )


def block_attention_fwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    causal: bool,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:
    """Attention of a query block to one KV block, normalised within the block, plus its LSE.

    Args:
      q: [B, T, Nq, H] queries (bf16, fp16 or fp32; accumulation is fp32).
      k, v: [B, S, Nkv, H] keys and values, Nq % Nkv == 0 (GQA: q head n reads kv head
        n // (Nq // Nkv)).
      q_positions: int32 [T] global query positions.
      kv_positions: int32 [S] global key positions; when ``causal`` a key is visible to a
        query iff kv_pos <= q_pos.
      causal: apply the position-based causal mask.
      q_segment_ids, kv_segment_ids: optional int [B, T] / [B, S]; queries attend only to keys
        with an equal id.
      scale: logit scale, default 1/sqrt(H).
      block_q, block_k: forward tiles (powers of two >= 16), default from
        :func:`default_block_sizes`; shrunk for short sequences.
      num_warps, num_stages: Triton launch parameters (ignored by the interpreter).
      interpret: run the Pallas interpreter; default True unless the backend is a GPU.

    Returns:
      out: [B, T, Nq, H] in q.dtype, softmax-normalised over the visible keys of this block;
        0 for rows with no visible key.
      lse: float32 [B, Nq, T] log-sum-exp of the scaled logits over the visible keys; -inf for
        rows with no visible key.
    """
    _check_inputs(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    h = q.shape[3]
    if scale is not None and not scale > 0:
        raise ValueError(
            f"scale must be > 0 (the kernel takes row maxima before scaling); got {scale}"
        )
    cfg = default_block_sizes(h, q.dtype)
    return _fwd(
        q,
        k,
        v,
        q_positions,
        kv_positions,
        q_segment_ids,
        kv_segment_ids,
        causal=bool(causal),
        scale=float(1.0 / math.sqrt(h) if scale is None else scale),
        block_q=_fit_block(block_q or cfg["block_q"], q.shape[1]),
        block_k=_fit_block(block_k or cfg["block_k"], k.shape[1]),
        num_warps=num_warps or cfg["num_warps"],
        num_stages=num_stages or cfg["num_stages"],
        interpret=_default_interpret(interpret),
    )


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------


@functools.partial(
    jax.jit,
    static_argnames=(
        "causal",
        "scale",
        "block_q",
        "block_k",
        "num_warps",
        "num_stages",
        "interpret",
    ),
)
def _bwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    *,
    causal: bool,
    scale: float,
    block_q: int,
    block_k: int,
    num_warps: int,
    num_stages: int,
    interpret: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    b, t, nq_heads, h = q.shape
    s_len, nkv_heads = k.shape[1], k.shape[2]
    group = nq_heads // nkv_heads
    hp = max(16, pl.next_power_of_2(h))
    tp, sp = _round_up(t, block_q), _round_up(s_len, block_k)

    # delta = rowsum(out * dout) with the global output, [B, Nq, T] fp32.
    delta = jnp.einsum(
        "btnh,btnh->bnt",
        out.astype(jnp.float32),
        dout.astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
    )
    # Rows with no visible key anywhere (lse = -inf) and padded rows get lse = +inf: p = 0.
    lse_safe = jnp.where(jnp.isneginf(lse), jnp.inf, lse.astype(jnp.float32))
    q_p = _pad_axis(_pad_axis(q, 1, tp), 3, hp)
    do_p = _pad_axis(_pad_axis(dout.astype(q.dtype), 1, tp), 3, hp)
    k_p = _pad_axis(_pad_axis(k, 1, sp), 3, hp)
    v_p = _pad_axis(_pad_axis(v, 1, sp), 3, hp)
    lse_p = _pad_axis(lse_safe, 2, tp, jnp.inf)
    delta_p = _pad_axis(delta, 2, tp)
    q_pos = _pad_axis(q_positions.astype(jnp.int32), 0, tp)
    kv_pos = _pad_axis(kv_positions.astype(jnp.int32), 0, sp)
    has_segments = q_segment_ids is not None
    kv_ranges, q_ranges = block_ranges(
        q_pos,
        kv_pos,
        t=t,
        s=s_len,
        block_q=block_q,
        block_k=block_k,
        causal=causal,
        has_segments=has_segments,
    )
    if has_segments:
        q_seg = _pad_axis(q_segment_ids.astype(jnp.int32), 1, tp)
        kv_seg = _pad_axis(kv_segment_ids.astype(jnp.int32), 1, sp)
    s_valid = None if sp == s_len else s_len
    params = plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)

    # dq: grid (q blocks, B, Nq); this q block, full K/V of its kv head.
    in_specs = [
        pl.BlockSpec((None, 4), lambda i, bi, hi: (i, 0)),
        pl.BlockSpec((block_q,), lambda i, bi, hi: (i,)),
        pl.BlockSpec((sp,), lambda i, bi, hi: (0,)),
    ]
    args = [kv_ranges, q_pos, kv_pos]
    if has_segments:
        in_specs += [
            pl.BlockSpec((None, block_q), lambda i, bi, hi: (bi, i)),
            pl.BlockSpec((None, sp), lambda i, bi, hi: (bi, 0)),
        ]
        args += [q_seg, kv_seg]
    q_blk = pl.BlockSpec((None, block_q, None, hp), lambda i, bi, hi: (bi, i, hi, 0))
    kv_full = pl.BlockSpec((None, sp, None, hp), lambda i, bi, hi: (bi, 0, hi // group, 0))
    row_blk = pl.BlockSpec((None, None, block_q), lambda i, bi, hi: (bi, hi, i))
    in_specs += [q_blk, kv_full, kv_full, q_blk, row_blk, row_blk]
    args += [q_p, k_p, v_p, do_p, lse_p, delta_p]
    dq = pl.pallas_call(
        functools.partial(
            dq_kernel,
            has_segments=has_segments,
            causal=causal,
            block_k=block_k,
            s_valid=s_valid,
            scale=scale,
        ),
        grid=(tp // block_q, b, nq_heads),
        in_specs=in_specs,
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct((b, tp, nq_heads, hp), jnp.float32),
        compiler_params=params,
        interpret=interpret,
        name="block_attention_bwd_dq",
    )(*args)

    # dk, dv: grid (kv blocks, B, Nq); this kv block, all q rows of one q head.
    in_specs = [
        pl.BlockSpec((None, 4), lambda j, bi, hi: (j, 0)),
        pl.BlockSpec((tp,), lambda j, bi, hi: (0,)),
        pl.BlockSpec((block_k,), lambda j, bi, hi: (j,)),
    ]
    args = [q_ranges, q_pos, kv_pos]
    if has_segments:
        in_specs += [
            pl.BlockSpec((None, tp), lambda j, bi, hi: (bi, 0)),
            pl.BlockSpec((None, block_k), lambda j, bi, hi: (bi, j)),
        ]
        args += [q_seg, kv_seg]
    q_full = pl.BlockSpec((None, tp, None, hp), lambda j, bi, hi: (bi, 0, hi, 0))
    kv_blk = pl.BlockSpec((None, block_k, None, hp), lambda j, bi, hi: (bi, j, hi // group, 0))
    row_full = pl.BlockSpec((None, None, tp), lambda j, bi, hi: (bi, hi, 0))
    in_specs += [q_full, kv_blk, kv_blk, q_full, row_full, row_full]
    args += [q_p, k_p, v_p, do_p, lse_p, delta_p]
    # With GQA every q head writes its own fp32 partial; the group sum happens below.
    out_blk = pl.BlockSpec((None, block_k, None, hp), lambda j, bi, hi: (bi, j, hi, 0))
    dk, dv = pl.pallas_call(
        functools.partial(
            dkdv_kernel,
            has_segments=has_segments,
            causal=causal,
            block_q=block_q,
            s_valid=s_valid,
            scale=scale,
        ),
        grid=(sp // block_k, b, nq_heads),
        in_specs=in_specs,
        out_specs=[out_blk, out_blk],
        out_shape=[
            jax.ShapeDtypeStruct((b, sp, nq_heads, hp), jnp.float32),
            jax.ShapeDtypeStruct((b, sp, nq_heads, hp), jnp.float32),
        ],
        compiler_params=params,
        interpret=interpret,
        name="block_attention_bwd_dkdv",
    )(*args)
    if group > 1:
        dk = dk.reshape(b, sp, nkv_heads, group, hp).sum(axis=3)
        dv = dv.reshape(b, sp, nkv_heads, group, hp).sum(axis=3)
    return dq[:, :t, :, :h], dk[:, :s_len, :, :h], dv[:, :s_len, :, :h]


def block_attention_bwd(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    out: jax.Array,
    lse: jax.Array,
    dout: jax.Array,
    *,
    q_positions: jax.Array,
    kv_positions: jax.Array,
    causal: bool,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Gradients of one query-block x KV-block attention given the GLOBAL output and LSE.

    With delta = rowsum(out * dout), p = exp(scale * q k^T - lse) (0 where masked) and
    ds = p * (dout v^T - delta): dq = scale * ds k, dk = scale * ds^T q, dv = p^T dout.

    Args:
      q: [B, T, Nq, H]; k, v: [B, S, Nkv, H] (Nq % Nkv == 0).
      out: [B, T, Nq, H] global (merged over all KV blocks) attention output.
      lse: float32 [B, Nq, T] global log-sum-exp (-inf for rows with no visible key anywhere).
      dout: [B, T, Nq, H] cotangent of the global output.
      q_positions, kv_positions, causal, q_segment_ids, kv_segment_ids, scale: as in
        :func:`block_attention_fwd`.
      block_q, block_k: tiles of both backward kernels (default from
        :func:`default_block_sizes`); num_warps, num_stages: Triton launch parameters.
      interpret: run the Pallas interpreter; default True unless the backend is a GPU.

    Returns:
      float32 dq [B, T, Nq, H], dk [B, S, Nkv, H], dv [B, S, Nkv, H]: this KV block's
      contribution to dq (sum it over KV blocks) and the exact gradients of this block's k, v.
    """
    _check_inputs(q, k, v, q_positions, kv_positions, q_segment_ids, kv_segment_ids)
    b, t, nq_heads, h = q.shape
    if out.shape != q.shape or dout.shape != q.shape or lse.shape != (b, nq_heads, t):
        raise ValueError(
            f"out/dout must be {q.shape} and lse {(b, nq_heads, t)}; got {out.shape}, "
            f"{dout.shape}, {lse.shape}"
        )
    cfg = default_block_sizes(h, q.dtype)
    return _bwd(
        q,
        k,
        v,
        out,
        lse,
        dout,
        q_positions,
        kv_positions,
        q_segment_ids,
        kv_segment_ids,
        causal=bool(causal),
        scale=float(1.0 / math.sqrt(h) if scale is None else scale),
        block_q=_fit_block(block_q or cfg["block_q_bwd"], t),
        block_k=_fit_block(block_k or cfg["block_k_bwd"], k.shape[1]),
        num_warps=num_warps or cfg["num_warps_bwd"],
        num_stages=num_stages or cfg["num_stages_bwd"],
        interpret=_default_interpret(interpret),
    )
