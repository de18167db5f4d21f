"""ReLU linear attention (SANA LiteLA): reference, Pallas-Triton kernels, dispatch, sequence sharding.

CPU checks (fresh random normal inputs, never zeros; gradients are jax.vjp with a random
cotangent, i.e. jax.grad of a random-cotangent-weighted sum):

* the pure-JAX reference vs a float64 NumPy oracle of the forward and of the hand-derived
  gradients: max |ref - oracle| <= 2e-6 * max |oracle| (float32 arithmetic);
* the Pallas kernels in the interpreter (``interpret=True``) vs jax.vjp of the reference on the
  same inputs, forward and dq/dk/dv (and dS/dz of the apply half):
  - float32 inputs: max |kernel - ref| <= 1e-5 * max |ref| (IEEE float32 dots in the kernel);
  - bfloat16 inputs: relative Frobenius error <= 1e-3 and max |kernel - ref| <= 2e-2 * max |ref|
    (both round their float32 results to bf16, whose step is 2^-8 relative; the kernel's
    float32 state enters bf16 tensor-core dots as hi/lo parts, ~2^-16);
  cases cover N not a multiple of the tile (masked last tile), several chunks with a short last
  chunk, (d, e) in {(32, 32), (16, 64), (64, 16)}, and a key mask;
* the CUDA lowering of all four kernels (jax.export for platform cuda, no GPU needed);
* sequence-sharded attention on 8 simulated CPU devices (tests/conftest.py forces them) vs
  unsharded, forward and gradients (float32, max error <= 1e-5 * max |unsharded|), including
  16,384 tokens (SANA at 4096^2 pixels) at a small width, and with the Pallas kernels inside
  shard_map.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxstack.parallel.linear_attention import sequence_sharded_linear_attention
from jaxstack.parallel.mesh import make_mesh
from pallas_kernels import linear_attention as la
from pallas_kernels.linear_attention import pallas_triton as kern
from pallas_kernels.linear_attention import reference as ref
from pallas_kernels.linear_attention import triton_kernels as tk

# The interpreter's cost on the CPU is XLA compile time: compile each program once, unoptimised.
_FAST_CPU = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}

F32 = jnp.float32
F32_TOL = 1e-5  # float32 kernel vs reference, relative to max |ref|
BF16_FRO = 1e-3  # bf16 kernel vs reference: relative Frobenius error
BF16_MAX = 2e-2  # bf16 kernel vs reference: max error relative to max |ref|
ORACLE_TOL = 2e-6  # float32 reference vs float64 NumPy oracle, relative to max |oracle|


def _inputs(seed, b, n, h, d, e, dtype=jnp.float32):
    """Fresh random q, k [B, N, H, d], v, do [B, N, H, e] (standard normal, cast to dtype)."""
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (b, n, h, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, n, h, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, n, h, e), jnp.float32).astype(dtype)
    do = jax.random.normal(kd, (b, n, h, e), jnp.float32).astype(dtype)
    return q, k, v, do


def _fwd_bwd(attn):
    """jit of (q, k, v, do, mask) -> (o, dq, dk, dv) for attn(q, k, v, key_mask)."""

    def run(q, k, v, do, mask):
        o, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, mask), q, k, v)
        return (o, *vjp(do))

    return jax.jit(run, compiler_options=_FAST_CPU)


@functools.cache
def _kernel_fwd_bwd(block_n: int | None, chunks: int | None):
    def attn(q, k, v, mask):
        return kern.relu_linear_attention(
            q, k, v, key_mask=mask, block_n=block_n, chunks=chunks, interpret=True
        )

    return _fwd_bwd(attn)


_REF_FWD_BWD = _fwd_bwd(lambda q, k, v, mask: ref.relu_linear_attention(q, k, v, key_mask=mask))


def _max_rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def _fro_rel(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _check(names, got, want, dtype):
    for name, g, w in zip(names, got, want, strict=True):
        assert g.shape == w.shape and g.dtype == w.dtype, (name, g.shape, w.shape, g.dtype)
        if dtype == jnp.float32:
            assert _max_rel(g, w) <= F32_TOL, (name, _max_rel(g, w))
        else:
            assert _fro_rel(g, w) <= BF16_FRO, (name, _fro_rel(g, w))
            assert _max_rel(g, w) <= BF16_MAX, (name, _max_rel(g, w))


# -- the reference vs a float64 NumPy oracle ---------------------------------------------------


def _oracle(q, k, v, do, eps):
    """float64 forward and hand-derived gradients (the formulas the kernels implement)."""
    q, k, v, do = (np.asarray(x, np.float64) for x in (q, k, v, do))
    pq, pk = np.maximum(q, 0), np.maximum(k, 0)
    s = np.einsum("bnhd,bnhe->bhde", pk, v)
    z = pk.sum(axis=1)  # [B, H, d]
    den = np.einsum("bnhd,bhd->bnh", pq, z) + eps
    o = np.einsum("bnhd,bhde->bnhe", pq, s) / den[..., None]
    g = do / den[..., None]
    r = -np.sum(do * o, axis=-1) / den
    dq = (q > 0) * (np.einsum("bnhe,bhde->bnhd", g, s) + r[..., None] * z[:, None])
    ds = np.einsum("bnhd,bnhe->bhde", pq, g)
    dz = np.einsum("bnhd,bnh->bhd", pq, r)
    dk = (k > 0) * (np.einsum("bnhe,bhde->bnhd", v, ds) + dz[:, None])
    dv = np.einsum("bnhd,bhde->bnhe", pk, ds)
    return o, dq, dk, dv


@pytest.mark.parametrize("eps", [1e-15, 1e-8])
def test_reference_matches_float64_oracle(eps):
    q, k, v, do = _inputs(1, 2, 256, 3, 32, 16)
    got = _fwd_bwd(lambda q, k, v, m: ref.relu_linear_attention(q, k, v, eps=eps))(
        q, k, v, do, None
    )
    want = _oracle(q, k, v, do, eps)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert g.dtype == jnp.float32
        assert _max_rel(g, w) <= ORACLE_TOL, (name, _max_rel(g, w))


def test_reference_key_mask_equals_dropping_keys():
    q, k, v, _ = _inputs(2, 1, 40, 2, 16, 16)
    mask = jnp.arange(40)[None] < 25
    attn = jax.jit(ref.relu_linear_attention)
    got = attn(q, k, v, key_mask=mask)
    want = attn(q, k[:, :25], v[:, :25])
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def test_split_bf16_matmul_precision():
    """The kernels' "bf16x3" dot (float32 operands as bf16 hi + lo) vs a float64 matmul:
    relative error <= 1e-4 (a plain bf16 cast gives ~3e-3); bf16-exact operands go in as is."""
    a, b = jax.random.normal(jax.random.PRNGKey(11), (2, 64, 32), jnp.float32)
    want = np.asarray(a, np.float64).T @ np.asarray(b, np.float64)
    got = tk.mm(a, b, (0, 0), mode="bf16x3", a_exact=False, b_exact=False)
    assert got.dtype == jnp.float32 and _fro_rel(got, want) <= 1e-4
    plain = jnp.dot(a.T.astype(jnp.bfloat16), b.astype(jnp.bfloat16), preferred_element_type=F32)
    assert _fro_rel(plain, want) > 1e-3  # the bound above is meaningful
    a16 = a.astype(jnp.bfloat16)
    want = np.asarray(a16, np.float64) @ np.asarray(b.T, np.float64)
    got = tk.mm(a16, b, (1, 1), mode="bf16x3", a_exact=True, b_exact=False)
    assert _fro_rel(got, want) <= 1e-4


# -- Pallas kernels (interpreter) vs the reference ---------------------------------------------

# (name, dtype, B, N, H, d, e, block_n, chunks, masked keys)
CASES = [
    # N = 200 with 32-token tiles: 7 tiles, the last one masked; 3 chunks of 3, 3, 1 tiles.
    ("f32_sana_head_masked_tail_chunks", jnp.float32, 2, 200, 3, 32, 32, 32, 3, False),
    # N a multiple of the (default) tile: the unmasked path; automatic chunking; d != e.
    ("f32_d16_e64_aligned", jnp.float32, 1, 128, 2, 16, 64, None, None, False),
    # bf16 (hi/lo split dots), SANA head dims, masked tail and automatic chunks.
    ("bf16_sana_head_masked_tail", jnp.bfloat16, 2, 200, 3, 32, 32, 64, None, False),
    # bf16, d > e, N = 96 with 64-token tiles (one full, one masked), a key mask.
    ("bf16_d64_e16_key_mask", jnp.bfloat16, 1, 96, 2, 64, 16, 64, None, True),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_kernel_matches_reference(case):
    name, dtype, b, n, h, d, e, block_n, chunks, masked = case
    q, k, v, do = _inputs(sum(map(ord, name)), b, n, h, d, e, dtype)
    mask = None
    if masked:  # drop a random third of the keys
        mask = jax.random.uniform(jax.random.PRNGKey(3), (b, n)) > 1 / 3
    got = _kernel_fwd_bwd(block_n, chunks)(q, k, v, do, mask)
    want = _REF_FWD_BWD(q, k, v, do, mask)
    _check(("o", "dq", "dk", "dv"), got, want, dtype)
    if masked:
        dead = ~np.asarray(mask)
        assert np.all(np.asarray(got[2], np.float32)[dead] == 0.0)  # dk of masked keys
        assert np.all(np.asarray(got[3], np.float32)[dead] == 0.0)  # dv of masked keys


def test_apply_half_gradients_of_state():
    """The apply kernel's VJP w.r.t. (q, S, z) on its own (bf16 q, float32 state): dS and dz
    are what a sequence-sharded caller all-reduces (float32 kernels: the sharded test below)."""
    dtype = jnp.bfloat16
    q, k, v, do = _inputs(4, 1, 80, 2, 32, 32, dtype)
    s, z = ref.linear_attention_state(k, v)

    def run(apply):
        def f(q, s, z, do):
            o, vjp = jax.vjp(apply, q, s, z)
            return (o, *vjp(do))

        return jax.jit(f, compiler_options=_FAST_CPU)(q, s, z, do)

    got = run(lambda q, s, z: kern.linear_attention_apply(q, s, z, block_n=32, interpret=True))
    want = run(ref.linear_attention_apply)
    _check(("o", "dq", "dS", "dz"), got, want, dtype)


def test_dispatch():
    q, k, v, _ = _inputs(5, 1, 64, 2, 32, 32)
    assert la.resolve_implementation(q, k, v) == (
        "pallas_triton" if jax.default_backend() == "gpu" else "reference"
    )
    assert la.resolve_implementation(q, k, v, "reference") == "reference"
    small = jnp.ones((1, 8, 2, 8))  # head dim 8 < 16: the kernels do not take it
    assert la.resolve_implementation(small, small, small, "reference") == "reference"
    assert not kern.supported(small, small, small)
    with pytest.raises(ValueError, match="powers of two"):
        la.relu_linear_attention(small, small, small, implementation="pallas_triton")
    with pytest.raises(ValueError, match="unknown"):
        la.relu_linear_attention(q, k, v, implementation="cuda")
    with pytest.raises(ValueError, match="one dtype"):
        kern.relu_linear_attention(q, k.astype(jnp.bfloat16), v, interpret=True)
    # (Explicit "pallas_triton" off a GPU runs the interpreter: test_sequence_sharded_with_pallas.)


@pytest.mark.parametrize("dtype,n", [("bfloat16", 16384), ("float32", 1000)])
def test_triton_lowering_for_cuda(dtype, n):
    """Forward + backward lower to four Triton custom calls (``__gpu$xla.gpu.triton``) for a
    CUDA target at SANA-1.6B width (H = 70, d = e = 32), aligned and masked N, without a GPU:
    jax.export with platforms=['cuda'] runs every Pallas-Triton lowering rule (not Triton's own
    compiler, nor the kernel)."""
    from jax import export

    x = jax.ShapeDtypeStruct((2, n, 70, 32), jnp.dtype(dtype))

    def fwd_bwd(q, k, v, do):
        attn = functools.partial(kern.relu_linear_attention, interpret=False)
        o, vjp = jax.vjp(attn, q, k, v)
        return o, vjp(do)

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exp = export.export(jax.jit(fwd_bwd), platforms=["cuda"], disabled_checks=checks)(x, x, x, x)
    assert exp.mlir_module().count("stablehlo.custom_call @__gpu$xla.gpu.triton") == 4


# -- sequence sharding on 8 simulated devices --------------------------------------------------


def _sharded_vs_unsharded(mesh, q, k, v, do, *, mask=None, implementation=None):
    spec = P(None, "sequence")

    def sharded(q, k, v, mask):
        kw = dict(mesh=mesh, key_mask=mask, implementation=implementation)
        return sequence_sharded_linear_attention(q, k, v, **kw)

    put = lambda x: jax.device_put(x, NamedSharding(mesh, spec))  # noqa: E731
    args = [put(x) for x in (q, k, v, do)] + [None if mask is None else put(mask)]
    got = _fwd_bwd(sharded)(*args)
    want = _REF_FWD_BWD(q, k, v, do, mask)
    assert got[0].sharding.spec[1] == "sequence"
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        assert _max_rel(g, w) <= F32_TOL, (name, _max_rel(g, w))


@pytest.mark.parametrize("spec", ["sequence=8", "data=2,sequence=4"])
def test_sequence_sharded_matches_unsharded(spec):
    assert jax.device_count() >= 8, "tests/conftest.py must force 8 host devices"
    mesh = make_mesh(spec)
    q, k, v, do = _inputs(6, 2, 512, 4, 32, 32)
    mask = jax.random.uniform(jax.random.PRNGKey(7), (2, 512)) > 0.25
    _sharded_vs_unsharded(mesh, q, k, v, do, mask=mask if spec == "sequence=8" else None)


def test_sequence_sharded_16k_tokens():
    """SANA at 4096^2 pixels has 16,384 tokens; small width (H = 2, d = e = 16)."""
    q, k, v, do = _inputs(8, 1, 16384, 2, 16, 16)
    _sharded_vs_unsharded(make_mesh("sequence=8"), q, k, v, do)


def test_sequence_sharded_with_pallas_kernels():
    """The Pallas state/apply kernels (interpreter) per device, psum in between."""
    q, k, v, do = _inputs(9, 1, 256, 2, 16, 16)
    _sharded_vs_unsharded(make_mesh("sequence=8"), q, k, v, do, implementation="pallas_triton")


def test_sequence_sharded_bad_inputs():
    mesh = make_mesh("sequence=8")
    q = jnp.ones((1, 12, 2, 16))
    with pytest.raises(ValueError, match="not divisible"):
        sequence_sharded_linear_attention(q, q, q, mesh=mesh)
    with pytest.raises(ValueError, match="no sequence axis"):
        sequence_sharded_linear_attention(q, q, q, mesh=mesh, axis="ring")
