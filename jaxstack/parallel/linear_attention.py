"""Sequence-sharded ReLU linear attention (SANA LiteLA): one all-reduce of the state.

The state of ReLU linear attention, S = sum_j relu(k_j) (x) v_j [B, H, d, e] and
z = sum_j relu(k_j) [B, H, d], is a sum over tokens. With the sequence sharded over a mesh
axis, each device computes the state of its own tokens, one `psum` over the axis makes the
global state (a few KB per head: d = e = 32 in SANA), and each device applies it to its own
queries. No K/V moves between devices, so the layout of the sequence shards (contiguous or
zigzag) does not matter. The backward pass is JAX's: the transpose of the psum all-reduces the
state cotangents (dS, dz) once more.

Per-device math: `linear_attention_state` and `linear_attention_apply` of
`pallas_kernels.linear_attention` (the Pallas kernels on GPU when they support the shapes, the
pure-JAX reference elsewhere; both differentiable).
"""

from __future__ import annotations

import jax
from jax import lax
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from jaxstack.parallel.mesh import context_mesh
from jaxstack.parallel.sequence import _batch_and_head_axes, shard_map
from pallas_kernels.linear_attention import (
    DEFAULT_EPS,
    linear_attention_apply,
    linear_attention_state,
)

Array = jax.Array

__all__ = ["sequence_sharded_linear_attention"]


def sequence_sharded_linear_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mesh: Mesh | AbstractMesh | None = None,
    axis: str = "sequence",
    eps: float = DEFAULT_EPS,
    key_mask: Array | None = None,
    implementation: str | None = None,
) -> Array:
    """ReLU linear attention with the sequence sharded over the mesh axis `axis`.

    q/k [B, N, H, d], v [B, N, H, e] (global view, N divisible by the axis size), key_mask
    optional bool [B, N]. Returns [B, N, H, e] in q's dtype, sharded like q along N, equal to
    `pallas_kernels.linear_attention.relu_linear_attention` on one device (up to float32
    summation order). Batch stays sharded over "data"/"fsdp" and heads over "tensor" when those
    axes divide them. mesh: a `Mesh`, the `AbstractMesh` seen inside jit, or None for the
    context mesh (`jax.set_mesh`). implementation: the per-device state/apply ("reference",
    "pallas_triton", or None for the best available). Differentiable in q, k, v.
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q/k/v must be [B, N, H, dim]; got {q.shape}, {k.shape}, {v.shape}")
    if q.shape != k.shape or v.shape[:3] != q.shape[:3]:
        raise ValueError(
            f"need q/k [B, N, H, d], v [B, N, H, e]; got {q.shape}, {k.shape}, {v.shape}"
        )
    mesh = context_mesh() if mesh is None else mesh
    if mesh is None:
        raise ValueError("no mesh: pass mesh= or set one with jax.set_mesh(mesh)")
    if axis not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} have no sequence axis {axis!r}")
    b, n, h, _ = q.shape
    size = int(mesh.shape[axis])
    if n % size:
        raise ValueError(f"sequence length {n} is not divisible by the {size} devices of {axis!r}")
    if key_mask is not None and key_mask.shape != (b, n):
        raise ValueError(f"key_mask must be [B, N] = {(b, n)}; got {key_mask.shape}")

    b_spec, h_axis = _batch_and_head_axes(mesh, b, h, h, {axis})
    x_spec = P(b_spec, axis, h_axis, None)
    has_mask = key_mask is not None

    def local(q, k, v, *mask):
        s, z = linear_attention_state(
            k, v, key_mask=mask[0] if has_mask else None, implementation=implementation
        )
        s, z = lax.psum((s, z), axis)
        return linear_attention_apply(q, s, z, eps=eps, implementation=implementation)

    in_specs = (x_spec, x_spec, x_spec) + ((P(b_spec, axis),) if has_mask else ())
    args = (q, k, v) + ((key_mask,) if has_mask else ())
    return shard_map(local, mesh, in_specs=in_specs, out_specs=x_spec)(*args)
