"""ReLU linear attention (SANA LiteLA): reference + implementations + dispatch.

The contract is `reference.relu_linear_attention(q, k, v, *, eps, key_mask)`: q/k [B, N, H, d],
v [B, N, H, e], float32 state, output in q's dtype. Implementations:
  - "reference": `pallas_kernels.linear_attention.reference` (pure JAX; oracle, CPU fallback).
"""

from __future__ import annotations

import jax

from pallas_kernels.linear_attention.reference import (
    DEFAULT_EPS,
    linear_attention_apply,
    linear_attention_state,
)
from pallas_kernels.linear_attention.reference import (
    relu_linear_attention as relu_linear_attention_reference,
)

Array = jax.Array

IMPLEMENTATIONS = ("reference",)

__all__ = [
    "DEFAULT_EPS",
    "IMPLEMENTATIONS",
    "linear_attention_apply",
    "linear_attention_state",
    "relu_linear_attention",
    "relu_linear_attention_reference",
]


def relu_linear_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    eps: float = DEFAULT_EPS,
    key_mask: Array | None = None,
    implementation: str | None = None,
) -> Array:
    """ReLU linear attention [B, N, H, e]; `implementation` None picks the fastest available."""
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"unknown linear-attention implementation {implementation!r}")
    return relu_linear_attention_reference(q, k, v, eps=eps, key_mask=key_mask)
