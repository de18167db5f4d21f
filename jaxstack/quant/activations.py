"""FP8-saved activations of non-linear layers (COAT's mixed granularity, specs/efficiency.md
§1.2): the inputs a non-linear function keeps for its backward pass are stored in e4m3 with one
scale per 1 x 16 group along the last axis, scale = (max|x_g| + 1e-10) / 448, instead of in the
compute dtype. The forward output is computed from the unquantized inputs; the backward pass is
the function's VJP at the dequantized inputs.

Linear layers need no wrapper: `jaxstack.quant.fp8_matmul` already saves its input as the e4m3
copy the product used (one scale per tensor). Small groups matter for the non-linear inputs
because their outliers (gate pre-activations, residual streams) would flush a per-tensor
scale's small values to zero.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxstack.quant.fp8 import E4M3, fp8_max

Array = jax.Array
GROUP = 16


def quantize_1xg(x: Array, group: int = GROUP, fmt=E4M3) -> tuple[Array, Array]:
    """(q [..., K'] in fmt, scales float32 [..., K' / group]) with K' = K padded to a multiple of
    `group` by zeros; scale = (max|x_g| + 1e-10) / fp8_max."""
    pad = -x.shape[-1] % group
    xp = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x
    xg = xp.astype(jnp.float32).reshape(*xp.shape[:-1], -1, group)
    s = (jnp.max(jnp.abs(xg), axis=-1) + 1e-10) / fp8_max(fmt)
    return (xg / s[..., None]).astype(fmt).reshape(xp.shape), s


def dequantize_1xg(q: Array, s: Array, size: int, dtype, group: int = GROUP) -> Array:
    """Inverse of `quantize_1xg`, cut back to the last-axis `size`, in `dtype`."""
    x = q.astype(jnp.float32).reshape(*q.shape[:-1], -1, group) * s[..., None]
    return x.reshape(q.shape)[..., :size].astype(dtype)


def fp8_saved_call(fn: Callable[..., Array], *xs: Array, group: int = GROUP) -> Array:
    """fn(*xs), differentiable, with every x saved for the backward pass as its 1 x `group`
    e4m3 copy (module docstring)."""

    meta = [(x.shape[-1], x.dtype) for x in xs]  # static: the bwd closes over no arrays

    @jax.custom_vjp
    def call(*args):
        return fn(*args)

    def fwd(*args):
        saved = tuple(quantize_1xg(a, group) for a in args)
        return fn(*args), saved

    def bwd(saved, ct):
        approx = [dequantize_1xg(q, s, n, dt, group) for (q, s), (n, dt) in zip(saved, meta)]
        return jax.vjp(fn, *approx)[1](ct)

    call.defvjp(fwd, bwd)
    return call(*xs)
