"""GPU checks (run with `pytest -m gpu` on a CUDA machine) of the cuDNN whole-block attention
with explicit softmax statistics and of the static-mask ring built on it.

- `cudnn_block_fwd` vs the dense float32 twin on bf16 inputs: output and lse (this pins the
  statistics' format: [B, Nq, T] float32 natural-log log-sum-exp of the scaled logits);
- `cudnn_block_bwd` given the GLOBAL out / lse of the dense reference vs the dense backward,
  and a two-block split (merge by lse, backward per block with the global statistics) vs one
  whole block: the property the ring relies on;
- ring / 2D sequence-parallel attention with cuDNN blocks over the available GPUs vs
  single-device cuDNN attention (skipped with fewer than 2 GPUs).

Bounds: relative Frobenius error (bf16 inputs): outputs 1e-2, gradients 2e-2; lse absolute
error 2e-2 (lse is O(log S)).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstack.parallel.mesh import make_mesh
from jaxstack.parallel.sequence import (
    from_zigzag,
    sequence_parallel_attention,
    to_zigzag,
)
from pallas_kernels.flash_attention import merge_partials
from pallas_kernels.flash_attention.cudnn_blocks import (
    cudnn_available,
    cudnn_block_bwd,
    cudnn_block_fwd,
    dense_block_bwd,
    dense_block_fwd,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU"),
]

OUT_TOL, GRAD_TOL, LSE_TOL = 1e-2, 2e-2, 2e-2


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _inputs(seed, b, t, s, nq, nkv, h, dtype=jnp.bfloat16):
    keys = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(keys[0], (b, t, nq, h), dtype)
    k = jax.random.normal(keys[1], (b, s, nkv, h), dtype)
    v = jax.random.normal(keys[2], (b, s, nkv, h), dtype)
    dout = jax.random.normal(keys[3], (b, t, nq, h), dtype)
    return q, k, v, dout


_cudnn_fwd = jax.jit(cudnn_block_fwd, static_argnames="causal")
_cudnn_bwd = jax.jit(cudnn_block_bwd, static_argnames="causal")
_dense_fwd = jax.jit(dense_block_fwd, static_argnames="causal")
_dense_bwd = jax.jit(dense_block_bwd, static_argnames="causal")


def test_cudnn_private_api_available():
    assert cudnn_available(), "jax's private cuDNN fused-attention primitives are missing"


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("nq,nkv", [(8, 8), (8, 2)])
def test_cudnn_block_matches_dense(causal, nq, nkv):
    b, t, h = 2, 1024, 128
    q, k, v, dout = _inputs(1 + causal + nkv, b, t, t, nq, nkv, h)
    out, lse = _cudnn_fwd(q, k, v, causal=causal)
    ref_out, ref_lse = _dense_fwd(q, k, v, causal=causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert lse.shape == (b, nq, t) and lse.dtype == jnp.float32
    assert rel_err(out, ref_out) < OUT_TOL
    lse_err = float(jnp.max(jnp.abs(lse - ref_lse)))
    assert lse_err < LSE_TOL, f"lse differs by {lse_err} (format or units mismatch?)"
    # backward with the reference's global statistics
    ref_out = ref_out.astype(q.dtype)
    grads = _cudnn_bwd(q, k, v, ref_out, ref_lse, dout, causal=causal)
    ref_grads = _dense_bwd(q, k, v, ref_out, ref_lse, dout, causal=causal)
    for name, g, rg in zip("qkv", grads, ref_grads):
        assert g.shape == rg.shape
        assert rel_err(g, rg) < GRAD_TOL, f"d{name}: {rel_err(g, rg):.3e}"


@pytest.mark.parametrize("nq,nkv", [(8, 8), (8, 2)])
def test_cudnn_blocks_split_equals_whole(nq, nkv):
    """Two no-mask KV halves: merged forward == whole block; per-half backward with the GLOBAL
    out / lse sums (dq) and concatenates (dk, dv) to the whole block's gradients."""
    b, t, h = 1, 1024, 128
    q, k, v, dout = _inputs(7 + nkv, b, t, t, nq, nkv, h)
    half = t // 2
    o1, l1 = _cudnn_fwd(q, k[:, :half], v[:, :half], causal=False)
    o2, l2 = _cudnn_fwd(q, k[:, half:], v[:, half:], causal=False)
    out, lse = merge_partials(o1, l1, o2, l2)
    ref_out, ref_lse = _dense_fwd(q, k, v, causal=False)
    assert rel_err(out, ref_out) < OUT_TOL
    assert float(jnp.max(jnp.abs(lse - ref_lse))) < LSE_TOL
    out = out.astype(q.dtype)
    g1 = _cudnn_bwd(q, k[:, :half], v[:, :half], out, lse, dout, causal=False)
    g2 = _cudnn_bwd(q, k[:, half:], v[:, half:], out, lse, dout, causal=False)
    dq = g1[0].astype(jnp.float32) + g2[0].astype(jnp.float32)
    dk = jnp.concatenate([g1[1], g2[1]], axis=1)
    dv = jnp.concatenate([g1[2], g2[2]], axis=1)
    ref = _dense_bwd(q, k, v, out, lse, dout, causal=False)
    for name, g, rg in zip("qkv", (dq, dk, dv), ref):
        assert rel_err(g, rg) < GRAD_TOL, f"d{name}: {rel_err(g, rg):.3e}"


def _single_device_cudnn(q, k, v, causal):
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation="cudnn")


def _value_and_grads(fn, q, k, v, dout):
    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(out.astype(jnp.float32) * dout.astype(jnp.float32)), out

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = grad_fn(q, k, v)
    return out, grads, grad_fn


@pytest.mark.skipif(jax.device_count() < 2, reason="needs at least 2 GPUs")
@pytest.mark.parametrize(
    "mode,causal,layout,implementation",
    [
        ("ring", True, "zigzag", None),  # None on GPU + bf16 + no segments -> cuDNN blocks
        ("ring", False, "contiguous", "cudnn"),
        ("ring", True, "contiguous", "cudnn"),
        ("2d", True, "zigzag", "cudnn"),
    ],
)
def test_ring_cudnn_matches_single_device(mode, causal, layout, implementation):
    n = jax.device_count()
    if mode == "2d" and (n < 4 or n % 2):
        pytest.skip("2D needs at least 4 GPUs (ring groups of 2)")
    mesh = make_mesh(f"sequence={n}")
    s = 1024 * n
    q, k, v, dout = _inputs(11 + causal, 1, s, s, 8, 2, 128)
    want_out, want_grads, _ = _value_and_grads(
        lambda q, k, v: _single_device_cudnn(q, k, v, causal), q, k, v, dout
    )
    zig = layout == "zigzag"
    fwd = (lambda x: to_zigzag(x, 1, n)) if zig else (lambda x: x)
    back = (lambda x: from_zigzag(x, 1, n)) if zig else (lambda x: x)

    def fn(q, k, v):
        out = sequence_parallel_attention(
            fwd(q),
            fwd(k),
            fwd(v),
            mesh=mesh,
            mode=mode,
            causal=causal,
            layout=layout,
            ulysses_size=2 if mode == "2d" else None,
            implementation=implementation,
        )
        return back(out)

    text = str(jax.make_jaxpr(fn)(q, k, v))
    assert "dot_product_attention_fwd_wrapper" in text, "the ring did not use cuDNN blocks"
    out, grads, _ = _value_and_grads(fn, q, k, v, dout)
    assert rel_err(out, want_out) < OUT_TOL
    for name, g, rg in zip("qkv", grads, want_grads):
        assert rel_err(g, rg) < GRAD_TOL, f"d{name}: {rel_err(g, rg):.3e}"
