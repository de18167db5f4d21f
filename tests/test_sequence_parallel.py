"""Sequence parallelism (Ulysses, ring, 2D) and its block kernel reference, on 8 simulated CPU
devices in float32 ('highest' matmuls, see conftest).

The 2-process test runs this file as a script: two `jax.distributed` processes on localhost
(CPU, gloo collectives) with 2 devices each run 2D attention with Ulysses inside each process
and the ring across them.

Bounds: every output and gradient is compared to single-device attention by the relative error
max |a - b| / max |b| <= 1e-5 (float32); the LLM training step as in tests/test_sharding.py
(loss and gradient relative error <= 1e-5).
"""

from __future__ import annotations

import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from localhost_workers import start_workers, wait_workers

from jaxstack.models.llm import LLM, LLMConfig
from jaxstack.parallel.mesh import make_mesh, shard_model
from jaxstack.parallel.sequence import (
    choose_mode,
    from_zigzag,
    group_zigzag_order,
    resolve_ring,
    sequence_parallel_attention,
    split_sequence_mesh,
    to_zigzag,
    use_sequence_parallel,
    zigzag_permutation,
)
from jaxstack.train.step import init_train_state, lm_loss_sums, make_train_step, place_batch
from pallas_kernels.flash_attention import (
    block_attention_bwd,
    block_attention_fwd,
    flash_attention,
    get_block_fns,
    merge_partials,
)
from pallas_kernels.flash_attention.cudnn_blocks import dense_block_bwd, dense_block_fwd

TOL = 1e-5
# jitted once per static `causal` (eager op-by-op dispatch is slow on the shared CPU)
_fwd = jax.jit(block_attention_fwd, static_argnames="causal")
_bwd = jax.jit(block_attention_bwd, static_argnames="causal")
_merge = jax.jit(merge_partials)


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _qkv(seed: int, b: int, t: int, nq: int, nkv: int, h: int):
    """Fresh random q [B,T,Nq,H], k, v [B,T,Nkv,H] (float32) and a loss-weight tensor.

    numpy's generator: eager jax.random recompiles per shape (seconds each on this CPU).
    """
    rng = np.random.default_rng(seed)
    shapes = [(b, t, nq, h), (b, t, nkv, h), (b, t, nkv, h), (b, t, nq, h)]
    return tuple(jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in shapes)


def _segments(b: int, t: int) -> jax.Array:
    """Packed rows: segment boundaries differ per row and fall inside device shards."""
    seg = np.zeros((b, t), np.int32)
    for r in range(b):
        cut1, cut2 = 5 + 3 * r, t - 4 - r
        seg[r, :cut1], seg[r, cut1:cut2], seg[r, cut2:] = 1, 2, 0
    return jnp.asarray(seg)


def _mask(seg):
    return None if seg is None else (seg[:, :, None] == seg[:, None, :])[:, None]


def _oracle(q, k, v, *, causal, seg):
    """Single-device oracle: jax.nn.dot_product_attention (XLA; GQA, causal, segment mask)."""
    return jax.nn.dot_product_attention(q, k, v, mask=_mask(seg), is_causal=causal)


def _value_and_grads(fn, q, k, v, w):
    """(out, (dq, dk, dv)) of sum(w * fn(q, k, v)) in one jitted call."""

    def loss(q, k, v):
        out = fn(q, k, v)
        return jnp.sum(w * out), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def _assert_close(got, want, what: str) -> None:
    (o1, g1), (o2, g2) = got, want
    errs = {"out": _rel(o1, o2)} | {n: _rel(a, b) for n, a, b in zip("qkv", g1, g2)}
    bad = {n: f"{e:.1e}" for n, e in errs.items() if not e <= TOL}
    assert not bad, f"{what}: relative errors above {TOL}: {bad}"


# -- block kernel reference -------------------------------------------------------------------


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("segments", [False, True])
def test_reference_blocks_merge_to_full_attention(causal, segments):
    """Two KV blocks: forward partials merged by LSE == full attention; backward with the global
    (out, lse): dq summed over blocks and dk/dv per block == jax.grad of the full attention."""
    b, t, nq, nkv, h = 2, 24, 6, 2, 8
    q, k, v, w = _qkv(1 + causal + 2 * segments, b, t, nq, nkv, h)
    seg = _segments(b, t) if segments else None
    pos = jnp.arange(t, dtype=jnp.int32)
    half = t // 2
    parts = []
    for sl in (slice(0, half), slice(half, t)):
        kw = dict(q_positions=pos, kv_positions=pos[sl], causal=causal)
        if seg is not None:
            kw |= dict(q_segment_ids=seg, kv_segment_ids=seg[:, sl])
        parts.append((sl, kw))
    (o1, l1), (o2, l2) = (_fwd(q, k[:, sl], v[:, sl], **kw) for sl, kw in parts)
    assert l1.shape == (b, nq, t) and l1.dtype == jnp.float32 and o1.shape == q.shape
    if causal:  # queries 0..half-1 see nothing of the second block
        assert np.all(np.isneginf(np.asarray(l2)[:, :, :half]))
        assert np.all(np.asarray(o2)[:, :half] == 0)
    out, lse = _merge(o1, l1, o2, l2)
    want_out, want_grads = _value_and_grads(
        lambda q, k, v: _oracle(q, k, v, causal=causal, seg=seg), q, k, v, w
    )
    # lse against a direct float32 computation
    logits = jnp.einsum("btkgh,bskh->bkgts", q.reshape(b, t, nkv, nq // nkv, h), k) * h**-0.5
    visible = jnp.ones((b, t, t), bool)
    if causal:
        visible &= jnp.tril(jnp.ones((t, t), bool))[None]
    if seg is not None:
        visible &= seg[:, :, None] == seg[:, None, :]
    want_lse = jax.nn.logsumexp(jnp.where(visible[:, None, None], logits, -jnp.inf), axis=-1)
    assert _rel(lse, want_lse.reshape(b, nq, t)) <= TOL
    dq = jnp.zeros_like(q)
    dks, dvs = [], []
    for sl, kw in parts:
        dq_i, dk_i, dv_i = _bwd(q, k[:, sl], v[:, sl], out, lse, w, **kw)
        assert dq_i.dtype == dk_i.dtype == dv_i.dtype == jnp.float32
        dq = dq + dq_i
        dks.append(dk_i)
        dvs.append(dv_i)
    got = (out, (dq, jnp.concatenate(dks, 1), jnp.concatenate(dvs, 1)))
    _assert_close(got, (want_out, want_grads), f"blocks causal={causal} segments={segments}")


def test_reference_fully_masked_rows():
    """Queries whose segment has no key: out 0, lse -inf, zero and finite gradients."""
    b, t, nq, nkv, h = 1, 8, 4, 4, 8
    q, k, v, w = _qkv(7, b, t, nq, nkv, h)
    q_seg = jnp.asarray([[1, 1, 1, 3, 3, 1, 1, 1]], jnp.int32)  # segment 3 has no keys
    kv_seg = jnp.asarray([[1, 1, 1, 1, 2, 2, 2, 2]], jnp.int32)
    pos = jnp.arange(t, dtype=jnp.int32)
    kw = dict(q_positions=pos, kv_positions=pos, causal=True)
    kw |= dict(q_segment_ids=q_seg, kv_segment_ids=kv_seg)
    out, lse = _fwd(q, k, v, **kw)
    assert np.all(np.asarray(out)[0, 3:5] == 0)
    assert np.all(np.isneginf(np.asarray(lse)[0, :, 3:5]))
    assert np.all(np.isfinite(np.asarray(lse)[0, :, :3]))
    merged, merged_lse = _merge(out, lse, out, lse)
    assert np.all(np.isneginf(np.asarray(merged_lse)[0, :, 3:5]))
    np.testing.assert_allclose(merged, out, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(merged_lse[0, :, :3], lse[0, :, :3] + np.log(2.0), rtol=1e-6)
    dq, dk, dv = _bwd(q, k, v, out, lse, w, **kw)
    assert all(np.all(np.isfinite(np.asarray(x))) for x in (dq, dk, dv))
    assert np.all(np.asarray(dq)[0, 3:5] == 0)
    # keys of segment 2 are never visible: no gradient reaches them
    assert np.all(np.asarray(dk)[0, 4:] == 0) and np.all(np.asarray(dv)[0, 4:] == 0)


@pytest.mark.parametrize("causal", [True, False])
def test_flash_attention_matches_jax(causal):
    """Single-device custom_vjp entry (reference implementation) vs jax.nn, GQA + segments."""
    b, t, nq, nkv, h = 2, 16, 4, 2, 8
    q, k, v, w = _qkv(11 + causal, b, t, nq, nkv, h)
    seg = _segments(b, t)
    got = _value_and_grads(
        lambda q, k, v: flash_attention(
            q, k, v, causal=causal, segment_ids=seg, implementation="reference"
        ),
        q,
        k,
        v,
        w,
    )
    want = _value_and_grads(lambda q, k, v: _oracle(q, k, v, causal=causal, seg=seg), q, k, v, w)
    _assert_close(got, want, f"flash_attention causal={causal}")
    assert get_block_fns("reference") == (block_attention_fwd, block_attention_bwd)
    if jax.default_backend() != "gpu":
        assert get_block_fns(None) == (block_attention_fwd, block_attention_bwd)
    with pytest.raises(ValueError, match="unknown implementation"):
        get_block_fns("cuda")


# -- layouts and mode choice ------------------------------------------------------------------


def test_zigzag_layout():
    perm = zigzag_permutation(16, 4)  # chunks of 2: rank r holds chunks r and 7 - r
    chunks = perm.reshape(4, 2, 2)[:, :, 0] // 2
    assert chunks.tolist() == [[0, 7], [1, 6], [2, 5], [3, 4]]
    x = jnp.arange(2 * 16).reshape(2, 16)
    np.testing.assert_array_equal(to_zigzag(x, 1, 4), np.asarray(x)[:, perm])
    np.testing.assert_array_equal(from_zigzag(to_zigzag(x, 1, 4), 1, 4), x)
    with pytest.raises(ValueError, match="divisible"):
        zigzag_permutation(12, 4)
    assert choose_mode(8, 4) == ("ulysses", 4)
    assert choose_mode(12, 8) == ("2d", 4)
    assert choose_mode(7, 8) == ("ring", 1)
    assert choose_mode(8, 8, ulysses_size=2) == ("2d", 2)


def test_split_sequence_mesh_keeps_device_order():
    mesh = make_mesh("data=2,sequence=4")
    view, ring, uly = split_sequence_mesh(mesh, "sequence", 2)
    assert view.axis_names == ("data", "fsdp", "sequence_ring", "sequence_ulysses", "tensor")
    assert dict(view.shape) == {
        "data": 2,
        "fsdp": 1,
        "sequence_ring": 2,
        "sequence_ulysses": 2,
        "tensor": 1,
    }
    np.testing.assert_array_equal(view.devices.reshape(mesh.devices.shape), mesh.devices)
    assert (ring, uly) == ("sequence_ring", "sequence_ulysses")


# -- sequence-parallel attention vs single device ---------------------------------------------

# (mode, ulysses_size, mesh) x (causal, layout, segments). GQA everywhere: 8 query heads over
# 2 KV heads, so Ulysses over 4 or 8 devices repeats KV heads and 2D with U=2 does not.
MODES = [
    ("ulysses", None, "sequence=8"),
    ("ring", None, "sequence=8"),
    ("2d", 4, "sequence=8"),  # 2 ring groups x 4 Ulysses
    ("2d", 2, "sequence=8"),  # 4 ring groups x 2 Ulysses
    ("2d", 2, "data=2,sequence=4"),  # batch sharded too (data=2 ring: see the LLM test)
]
CASES = [(True, "contiguous", True), (True, "zigzag", False), (False, "zigzag", True)]


@functools.cache
def _single_device(causal: bool, segments: bool):
    q, k, v, w = _qkv(3, 2, 32, 8, 2, 8)
    seg = _segments(2, 32) if segments else None
    fn = lambda q, k, v: _oracle(q, k, v, causal=causal, seg=seg)
    return (q, k, v, w, seg), _value_and_grads(fn, q, k, v, w)


@pytest.mark.parametrize("mode,ulysses_size,spec", MODES)
@pytest.mark.parametrize("causal,layout,segments", CASES)
def test_sequence_parallel_matches_single_device(
    mode, ulysses_size, spec, causal, layout, segments
):
    (q, k, v, w, seg), want = _single_device(causal, segments)
    mesh = make_mesh(spec)
    sp = mesh.shape["sequence"]
    zig = layout == "zigzag"
    fwd = (lambda x: to_zigzag(x, 1, sp)) if zig else (lambda x: x)
    back = (lambda x: from_zigzag(x, 1, sp)) if zig else (lambda x: x)

    def fn(q, k, v):
        out = sequence_parallel_attention(
            fwd(q),
            fwd(k),
            fwd(v),
            mesh=mesh,
            mode=mode,
            causal=causal,
            segment_ids=None if seg is None else fwd(seg),
            ulysses_size=ulysses_size,
            layout=layout,
            implementation="reference",
        )
        return back(out)

    _assert_close(_value_and_grads(fn, q, k, v, w), want, f"{mode} U={ulysses_size} {spec}")


# Static-mask ring (whole blocks; the dense twins of the cuDNN blocks on CPU): zigzag causal,
# contiguous causal and bidirectional ("full": the same for every layout), ring and 2D (the 2D zigzag cases reorder the Ulysses
# group's sequence into the ring's zigzag halves), GQA everywhere.
STATIC_CASES = [
    ("ring", None, "sequence=8", True, "zigzag"),
    ("2d", 2, "sequence=8", True, "zigzag"),  # 4 ring groups x 2 Ulysses
    ("2d", 4, "sequence=8", False, "contiguous"),  # 2 ring groups x 4 Ulysses
    ("ring", None, "data=2,sequence=4", True, "contiguous"),  # batch sharded too
]


@pytest.mark.parametrize("mode,ulysses_size,spec,causal,layout", STATIC_CASES)
def test_static_ring_matches_single_device(mode, ulysses_size, spec, causal, layout):
    (q, k, v, w, _), want = _single_device(causal, False)
    mesh = _mesh(spec)
    sp = mesh.shape["sequence"]
    zig = layout == "zigzag"
    fwd = (lambda x: to_zigzag(x, 1, sp)) if zig else (lambda x: x)
    back = (lambda x: from_zigzag(x, 1, sp)) if zig else (lambda x: x)

    def fn(q, k, v):
        out = sequence_parallel_attention(
            fwd(q),
            fwd(k),
            fwd(v),
            mesh=mesh,
            mode=mode,
            causal=causal,
            ulysses_size=ulysses_size,
            layout=layout,
            implementation="dense",
        )
        return back(out)

    text = str(jax.make_jaxpr(fn)(q, k, v))
    assert "ppermute" in text and ("cond" in text) == causal, "not the static-mask ring"
    _assert_close(_value_and_grads(fn, q, k, v, w), want, f"static {mode} U={ulysses_size} {spec}")


def test_static_ring_selection_and_blocks():
    """Which ring runs, the Ulysses-group reorder, and the dense whole-block twins."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    assert resolve_ring("dense", f32, True, "zigzag", False) == ("zigzag", "dense")
    assert resolve_ring("cudnn", bf16, False, "contiguous", False) == ("full", "cudnn")
    assert resolve_ring("reference", f32, True, "zigzag", False) == (None, "reference")
    assert resolve_ring(None, f32, True, "zigzag", True) == (None, None)
    if jax.default_backend() != "gpu":
        assert resolve_ring(None, f32, True, "contiguous", False) == ("contiguous", "dense")
    with pytest.raises(ValueError, match="static-mask ring"):
        resolve_ring("dense", f32, True, "zigzag", True)
    # P = 2 ring groups x U = 2: group 0 holds chunks [0, 7, 1, 6] -> [0, 1, 6, 7]
    perm = zigzag_permutation(16, 4)
    group0 = perm[:8][group_zigzag_order(8, 2)]
    np.testing.assert_array_equal(group0, [0, 1, 2, 3, 12, 13, 14, 15])
    np.testing.assert_array_equal(perm[8:][group_zigzag_order(8, 2)], np.arange(4, 12))
    # dense twins == the positional reference on local indices (rectangular, no mask)
    q, k, v, w = _qkv(21, 1, 8, 4, 2, 8)
    pos = jnp.arange(8, dtype=jnp.int32)
    dense_fwd = jax.jit(dense_block_fwd, static_argnames="causal")
    dense_bwd = jax.jit(dense_block_bwd, static_argnames="causal")
    out, lse = dense_fwd(q, k[:, :4], v[:, :4], causal=False)
    want = _fwd(q, k[:, :4], v[:, :4], q_positions=pos, kv_positions=pos[:4], causal=False)
    np.testing.assert_allclose(out, want[0], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse, want[1], rtol=1e-6, atol=1e-6)
    out, lse = dense_fwd(q, k, v, causal=True)
    grads = dense_bwd(q, k, v, out, lse, w, causal=True)
    want = _bwd(q, k, v, out, lse, w, q_positions=pos, kv_positions=pos, causal=True)
    for g, wg in zip(grads, want):
        np.testing.assert_allclose(g, wg, rtol=1e-6, atol=1e-6)


def test_sequence_parallel_errors():
    q, k, v, _ = _qkv(0, 1, 12, 8, 2, 8)
    mesh = make_mesh("sequence=8")
    with pytest.raises(ValueError, match="not divisible"):
        sequence_parallel_attention(q, k, v, mesh=mesh, mode="ring", causal=True)
    with pytest.raises(ValueError, match="unknown sequence-parallel mode"):
        sequence_parallel_attention(q, k, v, mesh=mesh, mode="mesh", causal=True)
    with pytest.raises(ValueError, match="ulysses_size"):
        sequence_parallel_attention(q, k, v, mesh=mesh, mode="2d", causal=True)


# -- LLM with sequence > 1 --------------------------------------------------------------------

CFG = LLMConfig.preset("tiny")  # 4 query heads, 2 KV heads, 2 layers


@functools.cache
def _llm_state():
    make = lambda: LLM(CFG, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return graphdef, jax.device_get(jax.jit(lambda: nnx.state(make()))())


def _llm(mesh=None) -> LLM:
    graphdef, state = _llm_state()
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
    return shard_model(model, mesh) if mesh is not None else model


@functools.cache
def _llm_batch() -> dict[str, np.ndarray]:
    """Packed batch [4, 16]: segment boundaries inside sequence shards, padding, loss mask."""
    rng = np.random.default_rng(0)
    b, t = 4, 16
    seg = np.zeros((b, t), np.int32)
    seg[:, :7], seg[:, 7:13] = 1, 2
    return {
        "input_ids": rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32),
        "targets": rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32),
        "segment_ids": seg,
        "loss_mask": (rng.random((b, t)) < 0.7) & (seg > 0),
    }


def _loss_and_grads(mesh):
    """(loss sum, grads pure dict, jaxpr text) of lm_loss_sums, traced under `mesh`."""
    model = _llm(mesh)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    batch = place_batch(mesh, _llm_batch())

    def loss(params, batch):
        return lm_loss_sums(nnx.merge(graphdef, params, rest), batch)[0]

    grad_fn = jax.value_and_grad(loss)
    with jax.set_mesh(mesh):  # JAX's own mesh context, outside jit: the model reads it
        text = str(jax.make_jaxpr(grad_fn)(params, batch))
        value, grads = jax.jit(grad_fn)(params, batch)
    return float(value), jax.device_get(nnx.to_pure_dict(grads)), text


@functools.cache
def _llm_reference():
    return _loss_and_grads(None)


def _mesh(spec: str):
    """make_mesh over the first prod(sizes) of the 8 devices (e.g. 4 for "sequence=4")."""
    sizes = [int(part.split("=")[1]) for part in spec.split(",")]
    return make_mesh(spec, jax.devices()[: int(np.prod(sizes))])


def _tree_rel(a, b) -> float:
    diff = max(np.max(np.abs(x - y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
    return float(diff / max(np.max(np.abs(y)) for y in jax.tree.leaves(b)))


@pytest.mark.parametrize(
    "spec,mode,collective,layout",
    [
        ("data=2,sequence=4", "ring", "ppermute", "contiguous"),
        ("sequence=4", "2d", "ppermute", "contiguous"),  # 2 ring groups x 2 Ulysses
        ("sequence=2", "ring", "ppermute", "zigzag"),  # segments cross the zigzag chunks
        ("sequence=4", "ulysses", "all_to_all", "zigzag"),
    ],
)
def test_llm_loss_and_grads_with_sequence_parallelism(spec, mode, collective, layout):
    ref_loss, ref_grads, ref_text = _llm_reference()
    assert "all_to_all" not in ref_text and "ppermute" not in ref_text
    uly = 2 if mode == "2d" else None
    with use_sequence_parallel(mode, ulysses_size=uly, layout=layout):
        value, grads, text = _loss_and_grads(_mesh(spec))
    assert collective in text, f"{spec} {mode}: the attention did not go through shard_map"
    assert abs(value - ref_loss) / abs(ref_loss) <= TOL
    err = _tree_rel(grads, ref_grads)
    assert err <= TOL, f"{spec} {mode}: gradient relative error {err:.1e}"


def test_llm_train_step_sequence_4_matches_unsharded():
    """jaxstack.train.step with mesh sequence=4 (default mode: 4 query heads over 4 devices ->
    Ulysses, the 2 KV heads repeated): same loss, grad norm and update as unsharded."""
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1.0, eps=1.0))

    def run(mesh):
        model = _llm(mesh)
        state, shardings = init_train_state(model, opt, mesh)
        before = jax.device_get(state.params)
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        step = make_train_step(graphdef, rest, opt, mesh=mesh, state_sh=shardings)
        batch = place_batch(mesh, _llm_batch())
        text = str(jax.make_jaxpr(step)(state, batch))
        state, metrics = step(state, batch)
        return jax.device_get(metrics), before, jax.device_get(state.params), text

    m_ref, before, p_ref, ref_text = run(None)
    m_sp, _, p_sp, text = run(_mesh("sequence=4"))
    assert "all_to_all" in text and "all_to_all" not in ref_text
    assert abs(m_sp["loss"] - m_ref["loss"]) / m_ref["loss"] <= TOL
    assert abs(m_sp["grad_norm"] - m_ref["grad_norm"]) / m_ref["grad_norm"] <= TOL
    update = jax.tree.map(lambda a, b: a - b, p_ref, before)
    diff = jax.tree.map(lambda a, b: a - b, p_sp, p_ref)
    err = max(np.max(np.abs(x)) for x in jax.tree.leaves(diff)) / max(
        np.max(np.abs(x)) for x in jax.tree.leaves(update)
    )
    assert err <= TOL, f"params after one step differ by {err:.1e} of the update size"


def _hidden(mesh, **kwargs):
    """(hidden states [B, T, D] as numpy, jaxpr text) of the tiny LLM under `mesh` (jax.set_mesh)."""
    model = _llm(mesh)
    ids = _llm_batch()["input_ids"]
    fwd = lambda m, ids, kw: m.hidden_states(ids, **kw)  # noqa: E731
    with jax.set_mesh(mesh):
        text = str(jax.make_jaxpr(fwd)(model, ids, kwargs))
        out = jax.jit(fwd)(model, ids, kwargs)
    return np.asarray(out), text


def test_sequence_parallel_choice_does_not_depend_on_the_mask():
    """A padding mask does not turn sequence parallelism off: with mesh sequence=4 the LLM
    runs the shard_map attention (padding becomes a segment of its own) and matches the
    unsharded dense-masked forward on the real tokens; `use_sequence_parallel(enabled=False)`
    is what turns it off. mask_ar (a dense pattern) is refused rather than silently dense."""
    b, t = _llm_batch()["input_ids"].shape
    input_mask = np.ones((b, t), bool)
    input_mask[0, :5] = False  # left padding
    input_mask[2, 11:] = False  # right padding
    seg = _llm_batch()["segment_ids"]
    mesh = _mesh("sequence=4")
    for kw in ({"input_mask": input_mask}, {"input_mask": input_mask, "segment_ids": seg}):
        ref, ref_text = _hidden(None, **kw)
        assert "all_to_all" not in ref_text
        out, text = _hidden(mesh, **kw)
        assert "all_to_all" in text, f"{list(kw)}: the mask turned sequence parallelism off"
        err = _rel(out[input_mask], ref[input_mask])
        assert err <= TOL, f"{list(kw)}: hidden states relative error {err:.1e}"
        with use_sequence_parallel(enabled=False):
            dense, text = _hidden(mesh, **kw)
        assert "all_to_all" not in text and "ppermute" not in text
        assert _rel(dense[input_mask], ref[input_mask]) <= TOL
    with pytest.raises(ValueError, match="mask_ar is not supported"):
        _hidden(mesh, mask_ar=np.ones((b, t), np.int32))
    with pytest.raises(ValueError, match="not divisible by the mesh's sequence axis"):
        with jax.set_mesh(mesh):
            _llm(mesh).hidden_states(_llm_batch()["input_ids"][:, :10])


def test_jit_retraces_when_the_mesh_or_the_sequence_parallel_options_change():
    """The mesh context and the sequence-parallel options are part of jit's cache key: one
    jitted forward traced without a mesh, under mesh sequence=4 (ring, then Ulysses) and
    without again runs the right program each time (no stale cache entry)."""
    traces = []

    @jax.jit
    def fwd(model, ids):
        traces.append(1)
        return model.hidden_states(ids)

    mesh = _mesh("sequence=4")
    model, ids = _llm(mesh), jnp.asarray(_llm_batch()["input_ids"])
    ref = np.asarray(fwd(_llm(), ids))
    outs = {}
    for mode, collective in (("ring", "ppermute"), ("ulysses", "all_to_all")):
        with jax.set_mesh(mesh), use_sequence_parallel(mode):
            outs[mode] = np.asarray(fwd(model, ids))
            text = str(fwd.trace(model, ids).jaxpr)
        assert collective in text, f"{mode}: a stale program without {collective}"
    assert len(traces) == 3  # one trace per setting (`trace` reuses the call's)
    np.asarray(fwd(_llm(), ids))  # no mesh again: the first cache entry, no new trace
    assert len(traces) == 3
    for mode, out in outs.items():
        assert _rel(out, ref) <= TOL, mode


# -- 2 processes (jax.distributed, gloo) -------------------------------------------------------


def _two_process_inputs():
    """Global q [2,32,8,8], k, v [2,32,2,8], loss weights, segment ids (numpy, same everywhere)."""
    rng = np.random.default_rng(5)
    q = rng.standard_normal((2, 32, 8, 8), np.float32)
    k, v = (rng.standard_normal((2, 32, 2, 8), np.float32) for _ in range(2))
    w = rng.standard_normal((2, 32, 8, 8), np.float32)
    return q, k, v, w, np.asarray(_segments(2, 32))


def _worker(out_path: str) -> None:
    """One of 2 processes: 2D attention (Ulysses 2 in-process x ring 2 across), fwd + grads."""
    from jax.experimental.multihost_utils import process_allgather
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from jaxstack.parallel.distributed import initialize

    assert initialize(), "JAXSTACK_* variables did not start a multi-process runtime"
    jax.config.update("jax_default_matmul_precision", "highest")
    assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
    mesh = make_mesh("sequence=4")
    groups = np.asarray(mesh.devices).reshape(2, 2)  # [ring, Ulysses]
    assert all(len({d.process_index for d in row}) == 1 for row in groups), "Ulysses crosses hosts"
    q, k, v, w, seg = _two_process_inputs()
    sh = lambda x: NamedSharding(mesh, P(None, "sequence", *(None,) * (x.ndim - 2)))
    put = lambda x: jax.make_array_from_callback(x.shape, sh(x), lambda idx: x[idx])
    qg, kg, vg, wg = (put(x) for x in (q, k, v, w))

    def fn(q, k, v):  # segment ids: a host constant (a global array can't be closed over)
        return sequence_parallel_attention(
            q, k, v, mesh=mesh, mode="2d", causal=True, segment_ids=jnp.asarray(seg), ulysses_size=2
        )

    def loss(q, k, v, w):
        out = fn(q, k, v)
        return jnp.sum(w * out), out

    grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    (_, out), grads = grad_fn(qg, kg, vg, wg)  # global arrays must be arguments, not closures
    host = [np.asarray(process_allgather(x, tiled=True)) for x in (out, *grads)]
    if jax.process_index() == 0:
        np.savez(out_path, out=host[0], dq=host[1], dk=host[2], dv=host[3])


def test_two_process_2d_attention_matches_single_process(tmp_path):
    out_path = str(tmp_path / "result.npz")
    procs = start_workers(
        [os.path.abspath(__file__), out_path],
        extra_env={"XLA_FLAGS": "--xla_force_host_platform_device_count=2"},
    )
    q, k, v, w, seg = (jnp.asarray(x) for x in _two_process_inputs())
    want = _value_and_grads(lambda q, k, v: _oracle(q, k, v, causal=True, seg=seg), q, k, v, w)
    wait_workers(procs, timeout=180)
    got = np.load(out_path)
    _assert_close((got["out"], (got["dq"], got["dk"], got["dv"])), want, "2 processes, 2D")


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_compiler_options_turn_off_latency_hiding_only_for_gpu_sequence_parallel():
    from types import SimpleNamespace

    from jaxstack.parallel.mesh import compiler_options

    gpu = lambda **shape: SimpleNamespace(  # noqa: E731 -- a mesh-like stand-in
        shape=shape, devices=np.array([SimpleNamespace(platform="gpu")])
    )
    assert compiler_options(gpu(sequence=2, data=1)) == {
        "xla_gpu_enable_latency_hiding_scheduler": False
    }
    assert compiler_options(gpu(sequence=1, data=2)) is None
    assert compiler_options(None) is None
    assert compiler_options(_mesh("sequence=4")) is None  # CPU devices: XLA's defaults
