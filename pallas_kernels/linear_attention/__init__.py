"""ReLU linear attention (SANA LiteLA, DC-AE multi-scale attention): reference, kernels, dispatch.

The contract is `reference.relu_linear_attention(q, k, v, *, eps, key_mask)`: q/k [B, N, H, d],
v [B, N, H, e], float32 state, output in q's dtype. Implementations:
  - "pallas_triton": `pallas_kernels.linear_attention.pallas_triton` (Pallas kernels lowered
    through Triton, forward and custom-VJP backward; imported lazily, only when asked for or on
    a GPU). Handles one input dtype of bf16/fp16/fp32 with d, e powers of two in [16, 128];
  - "reference": `pallas_kernels.linear_attention.reference` (pure JAX; oracle, CPU fallback).

`implementation=None` picks the Pallas kernel on a GPU backend when it supports the inputs and
the reference otherwise; an explicit name forces that implementation (off a GPU the Pallas
kernels run in the interpreter). The state and apply halves are exposed separately (with the
same dispatch) for sequence-sharded callers that all-reduce the state in between
(`jaxstack/parallel/linear_attention.py`).
"""

from __future__ import annotations

import functools
import importlib
from types import ModuleType

import jax

from pallas_kernels.linear_attention import reference as _ref
from pallas_kernels.linear_attention.reference import DEFAULT_EPS
from pallas_kernels.linear_attention.reference import (
    relu_linear_attention as relu_linear_attention_reference,
)

Array = jax.Array

IMPLEMENTATIONS = ("reference", "pallas_triton")

__all__ = [
    "DEFAULT_EPS",
    "IMPLEMENTATIONS",
    "linear_attention_apply",
    "linear_attention_state",
    "relu_linear_attention",
    "relu_linear_attention_reference",
    "resolve_implementation",
]


@functools.cache
def _gpu_module() -> ModuleType | None:
    """The Pallas-Triton module, or None when it cannot be imported on this install."""
    try:
        return importlib.import_module("pallas_kernels.linear_attention.pallas_triton")
    except Exception:  # GPU-only imports failing on this jax
        return None


def _pick(implementation: str | None, **arrays) -> ModuleType | None:
    """The kernel module to use, or None for the reference (see the module docstring)."""
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(
            f"unknown linear-attention implementation {implementation!r}; choose {IMPLEMENTATIONS}"
        )
    if implementation == "reference":
        return None
    if implementation is None and jax.default_backend() != "gpu":
        return None
    module = _gpu_module()
    if module is None:
        if implementation == "pallas_triton":
            raise ImportError("pallas_kernels.linear_attention.pallas_triton cannot be imported")
        return None
    if implementation is None and not module.supported(**arrays):
        return None
    return module


def resolve_implementation(q: Array, k: Array, v: Array, implementation: str | None = None) -> str:
    """The implementation name `relu_linear_attention` would run for these inputs."""
    return "reference" if _pick(implementation, q=q, k=k, v=v) is None else "pallas_triton"


def relu_linear_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    eps: float = DEFAULT_EPS,
    key_mask: Array | None = None,
    implementation: str | None = None,
) -> Array:
    """ReLU linear attention: q/k [B, N, H, d], v [B, N, H, e] -> [B, N, H, e] in q's dtype.

    o_i = relu(q_i) S / (relu(q_i) . z + eps) with the float32 state S = sum_j relu(k_j) (x) v_j,
    z = sum_j relu(k_j). key_mask: optional bool [B, N], False keys are ignored.
    implementation: None (Pallas kernel on GPU when supported, else the reference),
    "reference" or "pallas_triton". Differentiable in q, k, v.
    """
    module = _pick(implementation, q=q, k=k, v=v)
    if module is None:
        return relu_linear_attention_reference(q, k, v, eps=eps, key_mask=key_mask)
    return module.relu_linear_attention(q, k, v, eps=eps, key_mask=key_mask)


def linear_attention_state(
    k: Array, v: Array, *, key_mask: Array | None = None, implementation: str | None = None
) -> tuple[Array, Array]:
    """(S float32 [B, H, d, e], z float32 [B, H, d]) from k [B, N, H, d], v [B, N, H, e].

    key_mask: optional bool [B, N] (False tokens contribute nothing). implementation: as
    :func:`relu_linear_attention`. Differentiable in k, v.
    """
    module = _pick(implementation, k=k, v=v)
    if module is None:
        return _ref.linear_attention_state(k, v, key_mask=key_mask)
    return module.linear_attention_state(k, v, key_mask=key_mask)


def linear_attention_apply(
    q: Array,
    s: Array,
    z: Array,
    *,
    eps: float = DEFAULT_EPS,
    implementation: str | None = None,
) -> Array:
    """o [B, N, H, e] in q's dtype from q [B, N, H, d] and a state (S float32 [B, H, d, e],
    z float32 [B, H, d]) from :func:`linear_attention_state`. implementation: as
    :func:`relu_linear_attention`. Differentiable in q, S, z.
    """
    module = _pick(implementation, q=q, e=s.shape[-1])
    if module is None:
        return _ref.linear_attention_apply(q, s, z, eps=eps)
    return module.linear_attention_apply(q, s, z, eps=eps)
