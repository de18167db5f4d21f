"""Pallas-Triton flash-attention block kernels against the pure-JAX reference.

CPU: the kernels run in the Pallas interpreter (``interpret=True``) on small shapes, float32,
bound max |kernel - reference| <= 1e-5 (absolute + relative) for out, lse, dq, dk, dv. Cases
cover GQA, causal and full masks, zig-zag and shuffled global positions, segment ids, rows with
no visible key, and sequence lengths that are not block multiples (internal padding).

GPU (``pytest -m gpu``): real shapes, bf16 kernel (Triton lowering) vs the float32 reference,
relative Frobenius error <= 1e-2 for every output.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.flash_attention import pallas_triton as kern
from pallas_kernels.flash_attention import reference as ref

TOL = 1e-5  # float32, interpret mode
# The interpreter's cost on the CPU is XLA compile time: compile each call once, unoptimised.
_FAST_CPU = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


@functools.cache
def _jitted(fn, static: tuple):
    return jax.jit(functools.partial(fn, **dict(static)), compiler_options=_FAST_CPU)


def _call(fn, *args, **kw):
    """fn(*args, **kw) under one CPU jit: arrays (and None) traced, other kwargs static."""
    arrays = {k: v for k, v in kw.items() if v is None or isinstance(v, jax.Array)}
    static = tuple(sorted((k, v) for k, v in kw.items() if k not in arrays))
    return _jitted(fn, static)(*args, **arrays)


def kern_fwd(*args, **kw):
    return _call(kern.block_attention_fwd, *args, interpret=True, **kw)


def kern_bwd(*args, **kw):
    return _call(kern.block_attention_bwd, *args, interpret=True, **kw)


def ref_fwd(*args, **kw):
    return _call(ref.block_attention_fwd, *args, **kw)


def ref_bwd(*args, **kw):
    return _call(ref.block_attention_bwd, *args, **kw)


def _inputs(seed, b, t, s, nq, nkv, h, dtype=jnp.float32):
    """Fresh random q [B,T,Nq,H], k/v [B,S,Nkv,H] and dout [B,T,Nq,H] (never zeros)."""
    kq, kk, kv, kd = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(kq, (b, t, nq, h), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (b, s, nkv, h), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (b, s, nkv, h), jnp.float32).astype(dtype)
    dout = jax.random.normal(kd, (b, t, nq, h), jnp.float32).astype(dtype)
    return q, k, v, dout


def _zigzag(n: int, chunks: int, rank: int) -> jnp.ndarray:
    """Global positions of shard `rank` in a zig-zag split of 2*chunks*n/2 tokens: [n] int32."""
    half = n // 2
    lo = rank * half
    hi = (2 * chunks - 1 - rank) * half
    return jnp.concatenate([lo + jnp.arange(half), hi + jnp.arange(n - half)]).astype(jnp.int32)


def _close(name, got, want, tol=TOL):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert got.shape == want.shape, (name, got.shape, want.shape)
    # -inf (no visible key) must match exactly; compare the finite entries numerically.
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want), err_msg=name)
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], rtol=tol, atol=tol, err_msg=name)


def _check_fwd_bwd(q, k, v, dout, blocks, **kw):
    """Kernel fwd and bwd vs the reference; bwd fed with the reference's (global) out, lse."""
    out, lse = kern_fwd(q, k, v, **blocks, **kw)
    r_out, r_lse = ref_fwd(q, k, v, **kw)
    _close("out", out, r_out)
    _close("lse", lse, r_lse)
    assert out.dtype == q.dtype and lse.dtype == jnp.float32
    grads = kern_bwd(q, k, v, r_out, r_lse, dout, **blocks, **kw)
    r_grads = ref_bwd(q, k, v, r_out, r_lse, dout, **kw)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, r_grads):
        assert g.dtype == jnp.float32
        _close(name, g, rg)
    return out, lse


# (name, B, T, S, Nq, Nkv, H, causal, positions, segments, blocks)
CASES = [
    # GQA 4:2, zig-zag shard positions (rank 1 of 4), segment ids with a query id absent from
    # the KV side (rows with no visible key), T = S = 96 with 64-tiles: the padding path.
    ("causal_zigzag_gqa_segments_pad", 2, 96, 96, 4, 2, 32, True, "zigzag", True, (64, 64)),
    # Zig-zag without segments or padding, 16-tiles: unmasked spans of fully visible blocks
    # between masked diagonal blocks (a prefix for KV blocks, a suffix for q blocks).
    ("causal_zigzag_unmasked_spans", 1, 128, 128, 2, 1, 32, True, "zigzag", False, (16, 16)),
    # Non-causal, T != S, no mask at all (aligned, no segments), H = 64, multi-block loops.
    ("full_nomask_h64", 1, 64, 96, 2, 2, 64, False, "arange", False, (32, 32)),
    # Shuffled positions with keys offset by T/2: invisible blocks inside the loop span are
    # masked element-wise, and queries at positions < T/2 see no key (out 0, lse -inf). MQA.
    ("causal_shuffled_future_mqa", 1, 64, 64, 4, 1, 32, True, "shuffled", False, (16, 16)),
]


def _positions(kind, t, s):
    if kind == "zigzag":
        return _zigzag(t, 4, 1), _zigzag(s, 4, 1)
    if kind == "shuffled":  # queries: a permutation of 0..T-1; keys: of T/2..T/2+S-1
        perm_q = jax.random.permutation(jax.random.PRNGKey(7), t)
        perm_k = jax.random.permutation(jax.random.PRNGKey(8), s) + t // 2
        return perm_q.astype(jnp.int32), perm_k.astype(jnp.int32)
    return jnp.arange(t, dtype=jnp.int32), jnp.arange(s, dtype=jnp.int32)


def _segments(b, t, s):
    """[B, T], [B, S] ids: two packed sequences; the last 8 queries use id 9, absent in KV."""
    q_seg = jnp.where(jnp.arange(t) < t // 2, 1, 2)[None].repeat(b, 0)
    q_seg = q_seg.at[:, -8:].set(9).astype(jnp.int32)
    kv_seg = jnp.where(jnp.arange(s) < s // 3, 1, 2)[None].repeat(b, 0).astype(jnp.int32)
    return q_seg, kv_seg


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_block_attention_matches_reference(case):
    name, b, t, s, nq, nkv, h, causal, pos_kind, segs, (bq, bk) = case
    q, k, v, dout = _inputs(sum(map(ord, name)), b, t, s, nq, nkv, h)
    q_pos, kv_pos = _positions(pos_kind, t, s)
    kw = dict(q_positions=q_pos, kv_positions=kv_pos, causal=causal)
    if segs:
        kw["q_segment_ids"], kw["kv_segment_ids"] = _segments(b, t, s)
    out, lse = _check_fwd_bwd(q, k, v, dout, dict(block_q=bq, block_k=bk), **kw)
    if pos_kind == "shuffled" or segs:
        dead = np.isneginf(np.asarray(lse))
        assert dead.any(), "case must contain rows with no visible key"
        out_bnt = np.transpose(np.asarray(out), (0, 2, 1, 3))
        assert np.all(out_bnt[dead] == 0.0)


def test_ring_of_two_kv_blocks_matches_autodiff():
    """Two KV shards merged with the LSE give full attention; bwd with the global (out, lse)
    summed over shards equals jax.vjp of the reference on the whole sequence (float32)."""
    b, t, nq, nkv, h = 1, 64, 4, 2, 32
    q, k, v, dout = _inputs(3, b, t, t, nq, nkv, h)
    pos = jnp.arange(t, dtype=jnp.int32)
    blocks = dict(block_q=32, block_k=32)
    halves = [slice(0, t // 2), slice(t // 2, t)]
    parts = [
        kern_fwd(
            q, k[:, sl], v[:, sl], q_positions=pos, kv_positions=pos[sl], causal=True, **blocks
        )
        for sl in halves
    ]
    out, lse = jax.jit(ref.merge_partials)(*parts[0], *parts[1])

    @functools.partial(jax.jit, compiler_options=_FAST_CPU)
    def full_and_grads(q, k, v, dout):
        def full(q, k, v):
            kw = dict(q_positions=pos, kv_positions=pos, causal=True)
            return ref.block_attention_fwd(q, k, v, **kw)[0]

        out, vjp = jax.vjp(full, q, k, v)
        return out, *vjp(dout)

    want_out, want_dq, want_dk, want_dv = full_and_grads(q, k, v, dout)
    _close("merged out", out, want_out)
    dq = 0.0
    for i, sl in enumerate(halves):
        gq, gk, gv = kern_bwd(
            q, k[:, sl], v[:, sl], out, lse, dout, q_positions=pos, kv_positions=pos[sl],
            causal=True, **blocks,
        )  # fmt: skip
        dq = dq + gq
        _close(f"dk[{i}]", gk, want_dk[:, sl])
        _close(f"dv[{i}]", gv, want_dv[:, sl])
    _close("dq", dq, want_dq)


def test_bf16_full_segments_default_blocks():
    """bf16 in, fp32 accumulation, default tiles (shrunk to 128 > T = S = 80: padding), full
    attention with segment ids; bound: 2e-2 on out and relative error of the gradients."""
    q, k, v, dout = _inputs(5, 1, 80, 80, 2, 1, 64, jnp.bfloat16)
    pos = jnp.arange(80, dtype=jnp.int32)
    q_seg, kv_seg = _segments(1, 80, 80)
    kw = dict(
        q_positions=pos,
        kv_positions=pos,
        causal=False,
        q_segment_ids=q_seg,
        kv_segment_ids=kv_seg,
    )
    out, lse = kern_fwd(q, k, v, **kw)
    r_out, r_lse = ref_fwd(*(x.astype(jnp.float32) for x in (q, k, v)), **kw)
    assert out.dtype == jnp.bfloat16
    _close("out", out, r_out, tol=2e-2)
    _close("lse", lse, r_lse, tol=1e-3)
    dq, dk, dv = kern_bwd(q, k, v, r_out, r_lse, dout, **kw)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    r_grads = ref_bwd(*f32, r_out, r_lse, dout.astype(jnp.float32), **kw)
    for name, g, rg in zip(("dq", "dk", "dv"), (dq, dk, dv), r_grads):
        err = float(jnp.linalg.norm(g - rg) / jnp.linalg.norm(rg))
        assert err < 2e-2, (name, err)


def test_bad_inputs_raise():
    pos = jnp.arange(16, dtype=jnp.int32)
    q, kv = jnp.ones((1, 16, 3, 16)), jnp.ones((1, 16, 2, 16))
    with pytest.raises(ValueError, match="multiple of Nkv"):
        kern.block_attention_fwd(q, kv, kv, q_positions=pos, kv_positions=pos, causal=True)
    q = jnp.ones((1, 16, 2, 16))
    with pytest.raises(ValueError, match="kv_positions"):
        kern.block_attention_fwd(q, kv, kv, q_positions=pos, kv_positions=pos[:8], causal=True)
    with pytest.raises(ValueError, match="one dtype"):
        kern.block_attention_fwd(
            q, kv.astype(jnp.bfloat16), kv, q_positions=pos, kv_positions=pos, causal=True
        )
    with pytest.raises(ValueError, match="powers of two"):
        kern.block_attention_fwd(q, kv, kv, q_positions=pos, kv_positions=pos, causal=1, block_q=48)


@pytest.mark.parametrize(
    "dtype,h,seq,nkv,causal,segments",
    [("bfloat16", 128, 4096, 4, True, True), ("float32", 64, 200, 2, False, False)],
)
def test_triton_lowering_for_cuda(dtype, h, seq, nkv, causal, segments):
    """Both kernels lower to Triton IR (custom call ``__gpu$xla.gpu.triton``) for a CUDA target,
    without a GPU: jax.export with platforms=['cuda'] runs every Pallas-Triton lowering rule. It
    does not run Triton's own compiler (PTX, shared-memory checks) or the kernel."""
    from jax import export

    b, nq = 2, 16 if h == 128 else 4
    dt = jnp.dtype(dtype)
    q = jax.ShapeDtypeStruct((b, seq, nq, h), dt)
    kv = jax.ShapeDtypeStruct((b, seq, nkv, h), dt)
    lse = jax.ShapeDtypeStruct((b, nq, seq), jnp.float32)
    pos = jax.ShapeDtypeStruct((seq,), jnp.int32)
    seg = jax.ShapeDtypeStruct((b, seq), jnp.int32) if segments else None

    def masks(qp, kp, qs, ks):
        kw = dict(q_positions=qp, kv_positions=kp, causal=causal, interpret=False)
        if segments:
            kw.update(q_segment_ids=qs, kv_segment_ids=ks)
        return kw

    def fwd(q, k, v, qp, kp, qs, ks):
        return kern.block_attention_fwd(q, k, v, **masks(qp, kp, qs, ks))

    def bwd(q, k, v, o, lse, do, qp, kp, qs, ks):
        return kern.block_attention_bwd(q, k, v, o, lse, do, **masks(qp, kp, qs, ks))

    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    for fn, args, n_calls in (
        (fwd, (q, kv, kv, pos, pos, seg, seg), 1),
        (bwd, (q, kv, kv, q, lse, q, pos, pos, seg, seg), 2),
    ):
        exp = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=checks)(*args)
        assert exp.mlir_module().count("stablehlo.custom_call @__gpu$xla.gpu.triton") == n_calls


def _rel(a, b):
    a, b = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    fin = jnp.isfinite(b)
    a, b = jnp.where(fin, a, 0.0), jnp.where(fin, b, 0.0)
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU (Triton lowering)")
@pytest.mark.parametrize(
    "nkv,causal,positions",
    [(4, True, "zigzag"), (16, False, "arange"), (4, True, "arange")],
)
def test_gpu_real_shapes(nkv, causal, positions):
    """B=2, T=S=4096, Nq=16, H=128, bf16 on the GPU vs the float32 reference: rel. error < 1e-2."""
    b, t, nq, h = 2, 4096, 16, 128
    q, k, v, dout = _inputs(11, b, t, t, nq, nkv, h, jnp.bfloat16)
    if positions == "zigzag":
        q_pos, kv_pos = _zigzag(t, 2, 0), _zigzag(t, 2, 1)  # rank 0 queries, rank 1 keys
    else:
        q_pos = kv_pos = jnp.arange(t, dtype=jnp.int32)
    kw = dict(q_positions=q_pos, kv_positions=kv_pos, causal=causal)
    out, lse = kern.block_attention_fwd(q, k, v, interpret=False, **kw)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    with jax.default_matmul_precision("highest"):
        r_out, r_lse = ref_fwd(*f32, **kw)
        r_grads = ref_bwd(*f32, r_out, r_lse, dout.astype(jnp.float32), **kw)
    assert _rel(out, r_out) < 1e-2
    assert _rel(lse, r_lse) < 1e-2
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(np.asarray(r_lse)))
    grads = kern.block_attention_bwd(q, k, v, r_out, r_lse, dout, interpret=False, **kw)
    for name, g, rg in zip(("dq", "dk", "dv"), grads, r_grads):
        err = _rel(g, rg)
        assert err < 1e-2, (name, err)
