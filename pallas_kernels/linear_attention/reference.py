"""ReLU linear attention (SANA's LiteLA, DC-AE's multi-scale attention): the pure-JAX reference.

    o_i = (phi(q_i) . S) / (phi(q_i) . z + eps),  S = sum_j phi(k_j) (x) v_j,  z = sum_j phi(k_j)

with phi = ReLU, per head, no softmax and no 1/sqrt(d) (../shared/specs/sana.md §2). The state
(S [B, H, d, e], z [B, H, d]) is a sum over tokens, so a sequence split over devices needs one
all-reduce of it (`sequence_sharded_linear_attention` in jaxstack/parallel/linear_attention.py).
All arithmetic is float32 whatever the input dtype; the output has q's dtype. This module is
the oracle of every implementation and the CPU fallback.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

DEFAULT_EPS = 1e-15  # diffusers' LiteLA (the original SANA code uses 1e-8)


def linear_attention_state(k: Array, v: Array, *, key_mask: Array | None = None):
    """(S float32 [B, H, d, e], z float32 [B, H, d]) from k [B, N, H, d], v [B, N, H, e].

    key_mask: optional bool [B, N]; False tokens contribute nothing to the state.
    """
    k = jax.nn.relu(k.astype(jnp.float32))
    v = v.astype(jnp.float32)
    if key_mask is not None:
        k = jnp.where(key_mask[:, :, None, None], k, 0.0)
    s = jnp.einsum("bnhd,bnhe->bhde", k, v, precision=jax.lax.Precision.HIGHEST)
    z = jnp.sum(k, axis=1)
    return s, z


def linear_attention_apply(q: Array, s: Array, z: Array, *, eps: float = DEFAULT_EPS) -> Array:
    """o [B, N, H, e] (q's dtype) from q [B, N, H, d] and a state from `linear_attention_state`."""
    qf = jax.nn.relu(q.astype(jnp.float32))
    num = jnp.einsum("bnhd,bhde->bnhe", qf, s, precision=jax.lax.Precision.HIGHEST)
    den = jnp.einsum("bnhd,bhd->bnh", qf, z, precision=jax.lax.Precision.HIGHEST)
    return (num / (den[..., None] + eps)).astype(q.dtype)


def relu_linear_attention(
    q: Array, k: Array, v: Array, *, eps: float = DEFAULT_EPS, key_mask: Array | None = None
) -> Array:
    """ReLU linear attention, q/k [B, N, H, d], v [B, N, H, e] -> [B, N, H, e] in q's dtype."""
    s, z = linear_attention_state(k, v, key_mask=key_mask)
    return linear_attention_apply(q, s, z, eps=eps)
