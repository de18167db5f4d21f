"""GPU checks of the Pallas-Triton ReLU linear-attention kernels (run with `pytest -m gpu`).

At SANA shapes (B = 1..4, N = 1024 / 4096 / 16384, H = 36 (Sana-0.6B) or 70 (Sana-1.6B),
d = e = 32) and one N that is not a tile multiple, fresh random normal bf16 and fp32 inputs: the
compiled kernels (``interpret=False``) vs the pure-JAX reference run in float32 (HIGHEST
precision) on the same input values, forward and dq/dk/dv for a random output cotangent.

Bounds (relative Frobenius error, and max error relative to max |ref|):
  - bf16 inputs: <= 1e-2 and <= 5e-2 (the kernel rounds o and the gradients to bf16, 2^-8
    relative per element; the oracle keeps float32);
  - fp32 inputs: <= 1e-5 and <= 1e-4 (IEEE float32 dots; only the summation order differs).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import linear_attention as la
from pallas_kernels.linear_attention import pallas_triton as kern
from pallas_kernels.linear_attention import reference as ref

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton lowering)"),
]

TOL = {"bfloat16": (1e-2, 5e-2), "float32": (1e-5, 1e-4)}  # (Frobenius, max) relative errors


def _inputs(seed, b, n, h, d, e, dtype):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (b, n, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(keys[1], (b, n, h, d), jnp.float32).astype(dtype)
    v = jax.random.normal(keys[2], (b, n, h, e), jnp.float32).astype(dtype)
    do = jax.random.normal(keys[3], (b, n, h, e), jnp.float32).astype(dtype)
    return q, k, v, do


def _fwd_bwd(attn):
    def run(q, k, v, do):
        o, vjp = jax.vjp(attn, q, k, v)
        return (o, *vjp(do))

    return jax.jit(run)


def _errors(got, want) -> tuple[float, float]:
    """(relative Frobenius error, max error / max |want|), computed on the device in float32."""
    got, want = jnp.asarray(got, jnp.float32), jnp.asarray(want, jnp.float32)
    assert bool(jnp.all(jnp.isfinite(got)))
    diff = got - want
    fro = float(jnp.linalg.norm(diff.ravel()) / jnp.linalg.norm(want.ravel()))
    mx = float(jnp.max(jnp.abs(diff)) / jnp.max(jnp.abs(want)))
    return fro, mx


# (B, N, H): SANA-0.6B / 1.6B self-attention at 1024^2, 2048^2 and 4096^2 pixels, plus a
# sequence that is not a multiple of the tile (masked last tile).
SHAPES = [
    (1, 1024, 70),
    (4, 1024, 36),
    (2, 4096, 70),
    (4, 4096, 36),
    (1, 16384, 70),
    (4, 16384, 70),
    (2, 16384, 36),
    (1, 4000, 70),
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("b,n,h", SHAPES, ids=[f"B{b}_N{n}_H{h}" for b, n, h in SHAPES])
def test_kernel_matches_reference_sana_shapes(b, n, h, dtype):
    d = e = 32
    q, k, v, do = _inputs(b * 100003 + n + h, b, n, h, d, e, jnp.dtype(dtype))
    got = _fwd_bwd(lambda q, k, v: kern.relu_linear_attention(q, k, v, interpret=False))(
        q, k, v, do
    )
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    with jax.default_matmul_precision("highest"):
        want = _fwd_bwd(ref.relu_linear_attention)(*f32)
    fro_tol, max_tol = TOL[dtype]
    for name, g, w, x in zip(("o", "dq", "dk", "dv"), got, want, (q, q, k, v)):
        assert g.dtype == x.dtype, (name, g.dtype)
        fro, mx = _errors(g, w)
        assert fro <= fro_tol and mx <= max_tol, (name, fro, mx)


def test_dispatch_picks_kernel_on_gpu():
    q, k, v, do = _inputs(1, 1, 1024, 70, 32, 32, jnp.bfloat16)
    assert la.resolve_implementation(q, k, v) == "pallas_triton"
    got = _fwd_bwd(la.relu_linear_attention)(q, k, v, do)
    want = _fwd_bwd(lambda q, k, v: kern.relu_linear_attention(q, k, v, interpret=False))(
        q, k, v, do
    )
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g, np.float32), np.asarray(w, np.float32))


@pytest.mark.parametrize("block_n,num_warps,num_stages", [(64, 4, 2), (256, 8, 3)])
def test_other_tiles_compile_and_match(block_n, num_warps, num_stages):
    """Tile/launch settings the benchmark sweeps also compile and stay correct (bf16)."""
    q, k, v, do = _inputs(2, 2, 4096, 70, 32, 32, jnp.bfloat16)
    cfg = dict(block_n=block_n, num_warps=num_warps, num_stages=num_stages, interpret=False)
    got = _fwd_bwd(lambda q, k, v: kern.relu_linear_attention(q, k, v, **cfg))(q, k, v, do)
    f32 = [x.astype(jnp.float32) for x in (q, k, v, do)]
    with jax.default_matmul_precision("highest"):
        want = _fwd_bwd(ref.relu_linear_attention)(*f32)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        fro, mx = _errors(g, w)
        assert fro <= TOL["bfloat16"][0] and mx <= TOL["bfloat16"][1], (name, fro, mx)
