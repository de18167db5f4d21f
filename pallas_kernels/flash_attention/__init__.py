"""Flash-attention block kernel for ring attention: forward with log-sum-exp, backward with an
external (global) log-sum-exp. The contract is in `reference.py`.

Implementations, tried in order by `get_block_fns(None)`:
  - "pallas_triton": `pallas_kernels.flash_attention.pallas_triton` (GPU only, imported lazily;
    it exposes `block_attention_fwd` / `block_attention_bwd` with the reference's signatures);
  - "reference": the pure-JAX blockwise reference (oracle and CPU fallback).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.reference import (
    block_attention_bwd,
    block_attention_fwd,
    merge_partials,
    visibility_mask,
)

Array = jax.Array
BlockFns = tuple[Callable[..., tuple[Array, Array]], Callable[..., tuple[Array, Array, Array]]]

IMPLEMENTATIONS = ("reference", "pallas_triton")

__all__ = [
    "IMPLEMENTATIONS",
    "block_attention_bwd",
    "block_attention_fwd",
    "flash_attention",
    "get_block_fns",
    "merge_partials",
    "visibility_mask",
]


@functools.cache
def _gpu_module():
    """The GPU kernel module, or None when it is absent or cannot be imported here."""
    try:
        return importlib.import_module("pallas_kernels.flash_attention.pallas_triton")
    except Exception:  # absent, or its GPU-only imports fail on this install
        return None


def get_block_fns(implementation: str | None = None) -> BlockFns:
    """(block_attention_fwd, block_attention_bwd) of an implementation.

    implementation: None = the GPU kernel when running on GPU and importable, else the
    reference; "reference"; or "pallas_triton" (error if it cannot be imported).
    """
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"unknown implementation {implementation!r}; choose {IMPLEMENTATIONS}")
    if implementation == "reference":
        return block_attention_fwd, block_attention_bwd
    if implementation is None and jax.default_backend() != "gpu":
        return block_attention_fwd, block_attention_bwd
    module = _gpu_module()
    if module is None:
        if implementation == "pallas_triton":
            raise ImportError("pallas_kernels.flash_attention.pallas_triton cannot be imported")
        return block_attention_fwd, block_attention_bwd
    return module.block_attention_fwd, module.block_attention_bwd


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, segment_ids, causal, scale, implementation):
    return _flash_fwd(q, k, v, segment_ids, causal, scale, implementation)[0]


def _positions_and_segments(q, k, segment_ids):
    q_pos = jnp.arange(q.shape[1], dtype=jnp.int32)
    kv_pos = jnp.arange(k.shape[1], dtype=jnp.int32)
    return dict(
        q_positions=q_pos,
        kv_positions=kv_pos,
        q_segment_ids=segment_ids,
        kv_segment_ids=segment_ids,
    )


def _flash_fwd(q, k, v, segment_ids, causal, scale, implementation):
    fwd, _ = get_block_fns(implementation)
    kw = _positions_and_segments(q, k, segment_ids)
    out, lse = fwd(q, k, v, causal=causal, scale=scale, **kw)
    return out, (q, k, v, segment_ids, out, lse)


def _flash_bwd(causal, scale, implementation, res, dout):
    q, k, v, segment_ids, out, lse = res
    _, bwd = get_block_fns(implementation)
    kw = _positions_and_segments(q, k, segment_ids)
    dq, dk, dv = bwd(q, k, v, out, lse, dout, causal=causal, scale=scale, **kw)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    causal: bool,
    segment_ids: Array | None = None,
    scale: float | None = None,
    implementation: str | None = None,
) -> Array:
    """Single-device attention built on the block kernel, differentiable (custom_vjp).

    q [B, T, Nq, H]; k, v [B, T, Nkv, H] (Nq % Nkv == 0); segment_ids int32 [B, T] (packed
    sequences attend within equal ids); causal: key j visible to query i iff j <= i.
    Returns [B, T, Nq, H] in q.dtype; rows with no visible key are 0.
    """
    if segment_ids is not None:
        segment_ids = segment_ids.astype(jnp.int32)
    return _flash(q, k, v, segment_ids, causal, scale, implementation)
