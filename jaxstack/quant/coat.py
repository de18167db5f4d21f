"""COAT's FP8 AdamW: first and second moments stored in e4m3 with Dynamic Range Expansion.

Each optimizer-state tensor is flattened and cut into groups of 128 consecutive elements (the
tail zero-padded). A group X is stored as (q e4m3 [128], scale s, exponent k, centre c), all
float32 per group (../shared/specs/efficiency.md §1.1):

    M = max|X| + 1e-30     mu = min over X != 0 of |X| + 1e-30     R = M / mu
    c = sqrt(M) sqrt(mu)   k = floor(16 log2(448^2 / 2) / log2 R) / 16, clipped to [1/16, 64]
    Y = sign(X) (|X| / c)^k     s = (M / c)^k / 448     q = e4m3(Y / s)
    dequantize: X = sign(q s) |q s|^(1/k) c

k > 1 stretches a group whose values span a small range over e4m3's whole range (448^2 / 2
from the largest to the smallest normal), k < 1 squeezes a wide one. A group that is all zero
(or of one magnitude) has R = 1 and an infinite k; the clip keeps it finite (it then round-trips
exactly). The AdamW step itself runs in float32 on the dequantized moments:

    m = b1 m + (1 - b1) g      v = b2 v + (1 - b2) g^2
    p -= lr (m / ((sqrt(v) / sqrt(1 - b2^t) + eps) (1 - b1^t)) + wd p)

State per element: 2 bytes (two e4m3 moments) + 24 bytes per 128-element group, against 8 for
float32 AdamW.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jaxstack.quant.fp8 import E4M3

Array = jax.Array
GROUP = 128
EXPAND_MIN = 16  # k is a multiple of 1 / EXPAND_MIN
K_RANGE = (1.0 / EXPAND_MIN, 64.0)
_EPS = 1e-30
_TARGET_LOG2 = math.log2(448.0**2 / 2)  # log2 of the e4m3 normal range, 16.615


class DREState(NamedTuple):
    """One tensor in e4m3 with per-group (scale, exponent, centre); `q` is [groups, 128]."""

    q: Array
    scale: Array
    k: Array
    centre: Array


def dre_exponent(ratio: Array) -> Array:
    """k for a group whose largest / smallest nonzero magnitude is `ratio` (clipped)."""
    log_r = jnp.log2(ratio)
    k = jnp.floor(EXPAND_MIN * _TARGET_LOG2 / jnp.maximum(log_r, 1e-30)) / EXPAND_MIN
    return jnp.clip(k, *K_RANGE)


def _groups(x: Array) -> Array:
    flat = x.reshape(-1).astype(jnp.float32)
    pad = -flat.shape[0] % GROUP
    return jnp.pad(flat, (0, pad)).reshape(-1, GROUP)


def dre_quantize(x: Array) -> DREState:
    """`x` (any shape) -> DREState over its flattened, zero-padded 128-element groups."""
    g = _groups(x)
    mag = jnp.abs(g)
    big = jnp.max(mag, axis=1) + _EPS
    small = jnp.min(jnp.where(mag > 0, mag, jnp.inf), axis=1)
    small = jnp.where(jnp.isfinite(small), small, big - _EPS) + _EPS  # all-zero group: R = 1
    centre = jnp.sqrt(big) * jnp.sqrt(small)
    k = dre_exponent(big / small)
    y = jnp.sign(g) * (mag / centre[:, None]) ** k[:, None]
    scale = (big / centre) ** k / 448.0
    q = (y / scale[:, None]).astype(E4M3)
    return DREState(q, scale, k, centre)


def dre_dequantize(st: DREState, shape: tuple[int, ...]) -> Array:
    """float32 tensor of `shape` from its DREState."""
    y = st.q.astype(jnp.float32) * st.scale[:, None]
    x = jnp.sign(y) * jnp.abs(y) ** (1.0 / st.k[:, None]) * st.centre[:, None]
    n = 1
    for d in shape:
        n *= d
    return x.reshape(-1)[:n].reshape(shape)


def group_e4m3_roundtrip(x: Array) -> Array:
    """The baseline DRE improves on: plain per-group e4m3 (scale = amax / 448), round trip."""
    g = _groups(x)
    s = jnp.maximum(jnp.max(jnp.abs(g), axis=1, keepdims=True), _EPS) / 448.0
    out = (g / s).astype(E4M3).astype(jnp.float32) * s
    return out.reshape(-1)[: x.size].reshape(x.shape)


class CoatAdamWState(NamedTuple):
    count: Array
    m: Any  # pytree of DREState
    v: Any


def coat_adamw(
    learning_rate: float | optax.Schedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    mask: Any = None,
) -> optax.GradientTransformation:
    """AdamW with e4m3 DRE moments (module docstring). `mask`: like optax.adamw's (a pytree
    of bools or a function of the params) selecting the leaves that get weight decay."""

    def init(params):
        zero = jax.tree.map(lambda p: dre_quantize(jnp.zeros(p.shape, jnp.float32)), params)
        return CoatAdamWState(jnp.zeros((), jnp.int32), zero, zero)

    def update(grads, state, params=None):
        if params is None:
            raise ValueError("coat_adamw needs the params (weight decay): update(g, s, params)")
        count = state.count + 1
        t = count.astype(jnp.float32)
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        decay = mask(params) if callable(mask) else mask
        if decay is None:
            decay = jax.tree.map(lambda _: True, params)
        is_state = lambda x: isinstance(x, DREState)  # noqa: E731

        def leaf(g, p, m_st, v_st, wd_on):
            g32 = g.astype(jnp.float32)
            m = b1 * dre_dequantize(m_st, g.shape) + (1 - b1) * g32
            v = b2 * dre_dequantize(v_st, g.shape) + (1 - b2) * g32 * g32
            denom = (jnp.sqrt(v) / jnp.sqrt(1 - b2**t) + eps) * (1 - b1**t)
            step = m / denom + (weight_decay * p.astype(jnp.float32) if wd_on else 0.0)
            return (-lr * step).astype(p.dtype), dre_quantize(m), dre_quantize(v)

        flat_g, treedef = jax.tree.flatten(grads)
        flat_p = treedef.flatten_up_to(params)
        flat_m = jax.tree.flatten(state.m, is_leaf=is_state)[0]
        flat_v = jax.tree.flatten(state.v, is_leaf=is_state)[0]
        flat_d = treedef.flatten_up_to(decay)
        out = [leaf(*a) for a in zip(flat_g, flat_p, flat_m, flat_v, flat_d)]
        updates = treedef.unflatten([o[0] for o in out])
        new_m = treedef.unflatten([o[1] for o in out])
        new_v = treedef.unflatten([o[2] for o in out])
        return updates, CoatAdamWState(count, new_m, new_v)

    return optax.GradientTransformation(init, update)


def state_bytes(opt_state: Any) -> int:
    """Bytes of every array in an optimizer state (measured from the arrays' dtypes)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_state) if hasattr(x, "dtype"))
