"""CAME (Confidence-guided Adaptive Memory-Efficient optimizer) and CAME-8bit, as optax
transformations, following NVlabs/Sana `CAMEWrapper` / `CAME8BitWrapper`.

Per parameter, with g the float32 gradient (no bias correction, as the reference):

    factored (2-D, and 1x1-conv 4-D seen as [out, in]) -- rows r, cols c:
        r = b2 r + (1-b2) mean_cols(g^2 + eps1);  c = b2 c + (1-b2) mean_rows(g^2 + eps1)
        u = g * rsqrt(r / mean(r)) (x) rsqrt(c)
    otherwise (1-D, 3x3 conv, ...) -- full v:
        v = b2 v + (1-b2)(g^2 + eps1);  u = g * rsqrt(v)
    u = u / max(1, RMS(u) / clip_threshold)
    m = b1 m + (1-b1) u
    factored: res = (u - m)^2 + eps2, R = b3 R + (1-b3) mean_cols(res), C likewise,
              step = m * rsqrt(R / mean(R)) (x) rsqrt(C)          (the confidence term)
    otherwise: step = m                                             (the reference has none)
    p <- p - lr * wd * p - lr * step                                (decoupled weight decay)

CAME-8bit (`eight_bit=True`) stores m of a factored parameter with more than `min_8bit_size`
elements as uint8 with a per-block min-max affine code, blocks of `block_rows` ROWS of the
[rows, cols] matrix (the reference splits along dim 0): scale = (max - min)/255,
q = round((x - min)/scale), x_hat = q*scale + min, with scale = 0 (a constant block) stored
as is and decoded exactly (q = 0). Each step dequantizes, updates in float32 and requantizes;
the step itself uses the float32 m, as the reference does. Row/column statistics stay float32.
The reference also quantizes a full v "when unfactored", but only factored parameters are
eligible, so no v is ever quantized (here neither).

1x1 convs are recognised in PyTorch layout [out, in, 1, 1] and in Flax layout [1, 1, in, out];
the factored estimate is transpose-invariant, so only the 8-bit block rows depend on layout.
Other ranks (e.g. scanned [layers, in, out] kernels) keep a full v, as in the reference.

The state is a pytree of arrays (`CameState`: int32 count + one dict of arrays per parameter),
checkpointable with orbax. Its per-parameter dicts do not mirror the param tree, so
`jaxstack.train.step.opt_state_shardings` replicates them.
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array


class CameState(NamedTuple):
    """count: int32 scalar (steps taken); stats: per-parameter dicts (same tree prefix as the
    params): factored {"m" [rows, cols], "v_row", "v_col", "res_row", "res_col"}, otherwise
    {"m", "v"} in the param's shape; all float32, except that an 8-bit "m" is itself
    {"q": uint8 [rows, cols], "scale": float32 [blocks], "min": float32 [blocks]}.
    """

    count: Array
    stats: Any


def factored_shape(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """(rows, cols) of the matrix a parameter is factored as, or None for a full v: 2-D
    [rows, cols]; 4-D 1x1 conv [out, in, 1, 1] -> (out, in) or Flax [1, 1, in, out] -> (in, out)."""
    if len(shape) == 2:
        return int(shape[0]), int(shape[1])
    if len(shape) == 4 and tuple(shape[2:]) == (1, 1):
        return int(shape[0]), int(shape[1])
    if len(shape) == 4 and tuple(shape[:2]) == (1, 1):
        return int(shape[2]), int(shape[3])
    return None


def uses_8bit(shape: tuple[int, ...], min_8bit_size: int = 16384) -> bool:
    """Whether CAME-8bit quantizes this parameter's m: factored and numel > min_8bit_size."""
    mat = factored_shape(shape)
    return mat is not None and mat[0] * mat[1] > min_8bit_size


def num_blocks(rows: int, block_rows: int) -> int:
    return -(-rows // block_rows)


@functools.partial(jax.jit, static_argnames=("block_rows",))
def quantize_blocks(x: Array, block_rows: int = 2048) -> dict[str, Array]:
    """Per-block min-max uint8 code of x float32 [rows, cols], blocks of `block_rows` rows.

    Returns {"q": uint8 [rows, cols], "scale": float32 [nb], "min": float32 [nb]} with
    nb = ceil(rows / block_rows); |x - dequantize_blocks(...)| <= scale/2 per block (up to
    float32 rounding), and a constant block (scale 0) decodes exactly.
    """
    x = x.astype(jnp.float32)
    rows = x.shape[0]
    nb = num_blocks(rows, block_rows)
    pad = nb * block_rows - rows
    row_min = jnp.pad(jnp.min(x, axis=1), (0, pad), constant_values=jnp.inf)
    row_max = jnp.pad(jnp.max(x, axis=1), (0, pad), constant_values=-jnp.inf)
    bmin = jnp.min(row_min.reshape(nb, block_rows), axis=1)
    bmax = jnp.max(row_max.reshape(nb, block_rows), axis=1)
    scale = (bmax - bmin) / 255.0
    safe = jnp.where(scale > 0, scale, 1.0)
    per_row = lambda a: jnp.repeat(a, block_rows, total_repeat_length=nb * block_rows)[:rows]
    q = jnp.round((x - per_row(bmin)[:, None]) / per_row(safe)[:, None])
    q = jnp.clip(q, 0, 255).astype(jnp.uint8)
    return {"q": q, "scale": scale, "min": bmin}


@functools.partial(jax.jit, static_argnames=("block_rows",))
def dequantize_blocks(code: dict[str, Array], block_rows: int = 2048) -> Array:
    """float32 [rows, cols] = q * scale + min of a `quantize_blocks` code."""
    q = code["q"]
    rows = q.shape[0]
    nb = code["scale"].shape[0]
    per_row = lambda a: jnp.repeat(a, block_rows, total_repeat_length=nb * block_rows)[:rows]
    return q.astype(jnp.float32) * per_row(code["scale"])[:, None] + per_row(code["min"])[:, None]


def _rms(x: Array) -> Array:
    return jnp.sqrt(jnp.mean(jnp.square(x)))


def _factored_rsqrt(row: Array, col: Array) -> Array:
    return jax.lax.rsqrt(row / jnp.mean(row))[:, None] * jax.lax.rsqrt(col)[None, :]


def came(
    learning_rate: float | optax.Schedule,
    betas: tuple[float, float, float] = (0.9, 0.999, 0.9999),
    eps: tuple[float, float] = (1e-30, 1e-16),
    clip_threshold: float = 1.0,
    weight_decay: float = 0.0,
    *,
    eight_bit: bool = False,
    min_8bit_size: int = 16384,
    block_rows: int = 2048,
) -> optax.GradientTransformation:
    """CAME (or CAME-8bit with `eight_bit=True`) as an optax transformation; the returned
    updates are to be added to the params (`optax.apply_updates`). See the module docstring.

    learning_rate: float or optax schedule of the step count. Params may be any float dtype;
    gradients are cast to float32, updates are returned in the params' dtypes. `params` must be
    passed to `update` when weight_decay > 0.
    """
    b1, b2, b3 = betas
    eps1, eps2 = eps
    if not all(0.0 <= b <= 1.0 for b in betas):
        raise ValueError(f"came betas must lie in [0, 1], got {betas}")
    if block_rows < 1:
        raise ValueError(f"came block_rows must be >= 1, got {block_rows}")

    def quantized(shape) -> bool:
        return eight_bit and uses_8bit(shape, min_8bit_size)

    def init_one(p: Array) -> dict[str, Array]:
        mat = factored_shape(p.shape)
        if mat is None:
            zeros = jnp.zeros(p.shape, jnp.float32)
            return {"m": zeros, "v": zeros}
        rows, cols = mat
        if quantized(p.shape):
            m = quantize_blocks(jnp.zeros(mat, jnp.float32), block_rows)
        else:
            m = jnp.zeros(mat, jnp.float32)
        return {
            "m": m,
            "v_row": jnp.zeros((rows,), jnp.float32),
            "v_col": jnp.zeros((cols,), jnp.float32),
            "res_row": jnp.zeros((rows,), jnp.float32),
            "res_col": jnp.zeros((cols,), jnp.float32),
        }

    def update_one(g: Array, st: dict, p: Array | None, lr: Array):
        shape, in_dtype = g.shape, g.dtype
        mat = factored_shape(shape)
        g = g.astype(jnp.float32)
        if mat is None:
            v = b2 * st["v"] + (1 - b2) * (jnp.square(g) + eps1)
            u = g * jax.lax.rsqrt(v)
            new = {"v": v}
        else:
            g = g.reshape(mat)
            sq = jnp.square(g) + eps1
            v_row = b2 * st["v_row"] + (1 - b2) * jnp.mean(sq, axis=1)
            v_col = b2 * st["v_col"] + (1 - b2) * jnp.mean(sq, axis=0)
            u = g * _factored_rsqrt(v_row, v_col)
            new = {"v_row": v_row, "v_col": v_col}
        u = u / jnp.maximum(1.0, _rms(u) / clip_threshold)
        is_q = mat is not None and quantized(shape)
        m_old = dequantize_blocks(st["m"], block_rows) if is_q else st["m"]
        m = b1 * m_old + (1 - b1) * u
        new["m"] = quantize_blocks(m, block_rows) if is_q else m
        if mat is None:
            step = m
        else:
            res = jnp.square(u - m) + eps2
            res_row = b3 * st["res_row"] + (1 - b3) * jnp.mean(res, axis=1)
            res_col = b3 * st["res_col"] + (1 - b3) * jnp.mean(res, axis=0)
            step = (m * _factored_rsqrt(res_row, res_col)).reshape(shape)
            new["res_row"], new["res_col"] = res_row, res_col
        delta = -lr * step
        if weight_decay != 0.0:
            delta = delta - lr * weight_decay * p.astype(jnp.float32)
        return delta.astype(p.dtype if p is not None else in_dtype), new

    def init_fn(params) -> CameState:
        return CameState(jnp.zeros((), jnp.int32), jax.tree.map(init_one, params))

    def update_fn(updates, state: CameState, params=None):
        if weight_decay != 0.0 and params is None:
            raise ValueError("came with weight_decay > 0 needs params in update()")
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        lr = jnp.asarray(lr, jnp.float32)
        grads, treedef = jax.tree.flatten(updates)
        stats = treedef.flatten_up_to(state.stats)
        ps = treedef.flatten_up_to(params) if params is not None else [None] * len(grads)
        outs = [update_one(g, s, p, lr) for g, s, p in zip(grads, stats, ps, strict=True)]
        new_updates = treedef.unflatten([o[0] for o in outs])
        new_stats = treedef.unflatten([o[1] for o in outs])
        count = optax.safe_increment(state.count)
        return new_updates, CameState(count, new_stats)

    return optax.GradientTransformation(init_fn, update_fn)


def came_state_bytes(state) -> int:
    """Bytes held by an optimizer state's arrays (works on arrays and on `jax.eval_shape`
    ShapeDtypeStructs, so the cost can be measured without allocating)."""
    return sum(
        math.prod(x.shape) * np.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(state)
        if hasattr(x, "dtype")
    )
