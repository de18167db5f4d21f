"""FP8 formats, scaled quantization and the FP8 linear product (forward and both gradients).

Formats: e4m3 (`jnp.float8_e4m3fn`, max 448) for forward values, e5m2 (`jnp.float8_e5m2`,
max 57344) for gradients (../shared/specs/efficiency.md §1.2). A scaled quantization stores
q = cast(x / s) with s = amax / fp8_max, so x ~= q * s.

`fp8_matmul(x, w, granularity=...)` is y = x @ w for x [..., K] and w [K, N] (the layout of
`jaxstack.nn.layers.Dense`), with a custom VJP so that all three products are FP8:

  forward  y  [M, N] = q(x) [M, K] . q(w)^T [N, K]^T     e4m3 x e4m3
  dgrad    dx [M, K] = q(g) [M, N] . q(w)^T [N, K]       e5m2 x e4m3
  wgrad    dw [K, N] = q(x)^T [K, M] . q(g) [M, N]       e4m3 x e5m2

The weight is quantized transposed, (N, K), in the same elementwise pass that casts it: both
operands of the forward product then keep the contraction dimension minor, the layout cuBLASLt's
FP8 GEMM takes without a transpose (kernels.md §3-4: 1,532 vs 962 TFLOP/s on an H200). The
residuals saved for the backward pass are the FP8 operands and their scales, so a linear layer's
saved input costs one byte per element.

Granularities:
  "tensor": one scale per tensor, computed from the current values (no amax history). The
            scales factor out of the products, which run as XLA's native FP8 `dot_general`.
  "block":  DeepSeek-style: activations 1 x 128 along K (per token), weights 128 x 128, gradients
            1 x 128 along their contraction dimension. Scales are powers of two, so a block's
            values dequantized to bf16 are exact and the product is an ordinary bf16 GEMM with
            float32 accumulation: the same numbers as a fine-grained FP8 GEMM (up to summation
            order) but not its speed, which on Hopper needs a block-scaled GEMM kernel that XLA
            does not have. A token's quantization does not depend on the other tokens, which
            keeps one-token decode and full-sequence forwards on the same quantized values.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

Array = jax.Array

E4M3 = jnp.float8_e4m3fn
E5M2 = jnp.float8_e5m2
FP8_MAX = {jnp.dtype(E4M3): 448.0, jnp.dtype(E5M2): 57344.0}
BLOCK = 128  # group / block size of the "block" granularity
GRANULARITIES = ("tensor", "block")
_TINY = 1e-12


def fp8_max(fmt) -> float:
    return FP8_MAX[jnp.dtype(fmt)]


def tensor_scale(x: Array, fmt) -> Array:
    """float32 scalar s = max|x| / fp8_max (never 0), so that x / s fits `fmt`."""
    amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
    return jnp.maximum(amax, _TINY) / fp8_max(fmt)


def quantize_tensor(x: Array, fmt) -> tuple[Array, Array]:
    """(q in `fmt`, float32 scalar scale) with x ~= q * scale."""
    s = tensor_scale(x, fmt)
    return (x.astype(jnp.float32) / s).astype(fmt), s


def _pow2_scale(amax: Array, fmt) -> Array:
    """Smallest power of two s with amax / s <= fp8_max."""
    amax = jnp.maximum(amax.astype(jnp.float32), _TINY)
    return jnp.exp2(jnp.ceil(jnp.log2(amax / fp8_max(fmt))))


def quantize_groups(x: Array, fmt, group: int = BLOCK) -> tuple[Array, Array]:
    """Per-group quantization along the last axis (1 x `group`), power-of-two scales.

    x [..., K] with K % group == 0 -> (q [..., K] in fmt, scales float32 [..., K // group])."""
    *lead, k = x.shape
    if k % group:
        raise ValueError(f"last dimension {k} is not a multiple of the group size {group}")
    xg = x.astype(jnp.float32).reshape(*lead, k // group, group)
    s = _pow2_scale(jnp.max(jnp.abs(xg), axis=-1), fmt)
    return (xg / s[..., None]).astype(fmt).reshape(x.shape), s


def dequantize_groups(q: Array, s: Array, group: int = BLOCK, dtype=jnp.float32) -> Array:
    *lead, k = q.shape
    qg = q.astype(jnp.float32).reshape(*lead, k // group, group)
    return (qg * s[..., None]).reshape(q.shape).astype(dtype)


def quantize_blocks(w: Array, fmt, block: int = BLOCK) -> tuple[Array, Array]:
    """Per-block quantization of a matrix w [R, C] (block x block tiles, power-of-two scales).

    Returns (q [R, C] in fmt, scales float32 [R // block, C // block])."""
    r, c = w.shape
    if r % block or c % block:
        raise ValueError(f"matrix {w.shape} is not a multiple of the block size {block}")
    wb = w.astype(jnp.float32).reshape(r // block, block, c // block, block)
    s = _pow2_scale(jnp.max(jnp.abs(wb), axis=(1, 3)), fmt)
    return (wb / s[:, None, :, None]).astype(fmt).reshape(r, c), s


def dequantize_blocks(q: Array, s: Array, block: int = BLOCK, dtype=jnp.float32) -> Array:
    r, c = q.shape
    qb = q.astype(jnp.float32).reshape(r // block, block, c // block, block)
    return (qb * s[:, None, :, None]).reshape(r, c).astype(dtype)


def _dot(a: Array, b: Array, contract: tuple[int, int]) -> Array:
    """2-D product contracting a's dim contract[0] with b's dim contract[1], float32 out."""
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


# -- per-tensor scaling: native FP8 products --------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_tensor(x2: Array, w: Array, out_dtype) -> Array:
    return _matmul_tensor_fwd(x2, w, out_dtype)[0]


def _matmul_tensor_fwd(x2, w, out_dtype):
    qx, sx = quantize_tensor(x2, E4M3)
    qw_nk, sw = quantize_tensor(w.T, E4M3)  # transposed in the casting pass: K minor
    y = (_dot(qx, qw_nk, (1, 1)) * (sx * sw)).astype(out_dtype)
    zeros = (jnp.zeros((), x2.dtype), jnp.zeros((), w.dtype))  # carry the input dtypes
    return y, (qx, sx, qw_nk, sw, zeros)


def _matmul_tensor_bwd(out_dtype, res, g):
    qx, sx, qw_nk, sw, (x_zero, w_zero) = res
    qg, sg = quantize_tensor(g, E5M2)
    dx = (_dot(qg, qw_nk, (1, 0)) * (sg * sw)).astype(x_zero.dtype)
    dw = (_dot(qx, qg, (0, 0)) * (sx * sg)).astype(w_zero.dtype)
    return dx, dw


_matmul_tensor.defvjp(_matmul_tensor_fwd, _matmul_tensor_bwd)


# -- per-block scaling (power-of-two scales, exact bf16 dequantization) ------------------------


def _pad_last(x: Array, multiple: int = BLOCK) -> Array:
    pad = -x.shape[-1] % multiple
    return jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)]) if pad else x


def _block_operands_fwd(x2: Array, w: Array):
    qx, sx = quantize_groups(x2, E4M3)  # [M, K], scales [M, K/128]
    qw, sw = quantize_blocks(w, E4M3)  # [K, N], scales [K/128, N/128]
    return qx, sx, qw, sw


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _matmul_block(x2: Array, w: Array, out_dtype) -> Array:
    return _matmul_block_fwd(x2, w, out_dtype)[0]


def _matmul_block_fwd(x2, w, out_dtype):
    qx, sx, qw, sw = _block_operands_fwd(x2, w)
    xd = dequantize_groups(qx, sx, dtype=jnp.bfloat16)
    wd = dequantize_blocks(qw, sw, dtype=jnp.bfloat16)
    y = _dot(xd, wd, (1, 0)).astype(out_dtype)
    zeros = (jnp.zeros((), x2.dtype), jnp.zeros((), w.dtype))
    return y, (qx, sx, qw, sw, zeros)


def _matmul_block_bwd(out_dtype, res, g):
    qx, sx, qw, sw, (x_zero, w_zero) = res
    wd = dequantize_blocks(qw, sw, dtype=jnp.bfloat16)
    # dgrad contracts over N: g in 1 x 128 groups along N
    gd_n = dequantize_groups(*quantize_groups(g, E5M2), dtype=jnp.bfloat16)
    dx = _dot(gd_n, wd, (1, 1)).astype(x_zero.dtype)
    # wgrad contracts over M (tokens): x and g in 1 x 128 groups along M (zero rows pad M)
    x_km = _pad_last(dequantize_groups(qx, sx).T)
    xd_m = dequantize_groups(*quantize_groups(x_km, E4M3), dtype=jnp.bfloat16)
    gd_m = dequantize_groups(*quantize_groups(_pad_last(g.T), E5M2), dtype=jnp.bfloat16)
    dw = _dot(xd_m, gd_m, (1, 1)).astype(w_zero.dtype)
    return dx, dw


_matmul_block.defvjp(_matmul_block_fwd, _matmul_block_bwd)


def fp8_matmul(x: Array, w: Array, *, granularity: str = "tensor", out_dtype=None) -> Array:
    """y = x @ w through FP8 products (module docstring). x [..., K], w [K, N] -> [..., N] in
    `out_dtype` (default x.dtype). "block" zero-pads K and N up to multiples of 128 (partial
    edge blocks) and cuts the output back."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if w.ndim != 2 or x.shape[-1] != w.shape[0]:
        raise ValueError(f"fp8_matmul: x {x.shape} and w {w.shape} do not contract")
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    lead, n = x.shape[:-1], w.shape[1]
    x2 = x.reshape(-1, x.shape[-1])
    if granularity == "tensor":
        return _matmul_tensor(x2, w, out_dtype).reshape(*lead, n)
    # partial edge blocks: zero padding changes no group or block maximum
    x2, w = _pad_last(x2), _pad_last(_pad_last(w.T).T)
    return _matmul_block(x2, w, out_dtype)[:, :n].reshape(*lead, n)


@dataclasses.dataclass(frozen=True)
class Fp8Matmul:
    """The product a `Dense` layer runs when FP8 is on (`jaxstack.quant.apply_fp8`): hashable,
    so it sits in the module's static graph."""

    granularity: str = "tensor"

    def __post_init__(self):
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )

    def __call__(self, x: Array, w: Array, out_dtype) -> Array:
        return fp8_matmul(x, w, granularity=self.granularity, out_dtype=out_dtype)
