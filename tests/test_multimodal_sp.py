"""Multimodal sequence sharding (MM-SP): routing plan, sharded embeddings, exchange HLO and the
NVILA long-video forward with sequence parallelism, on 8 simulated CPU devices (float32)."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxstack.models import vlm
from jaxstack.parallel import multimodal as mm
from jaxstack.parallel.mesh import make_mesh
from jaxstack.parallel.sequence import from_zigzag

D, VOCAB = 16, 50


def _mask(segments: list[tuple[str, int]], tokens_per_unit: int) -> tuple[np.ndarray, int]:
    """Visual mask from [("text", n) | ("video", frames)] in order; (mask [S], frame count)."""
    parts, frames = [], 0
    for kind, n in segments:
        parts.append(np.full(n * (tokens_per_unit if kind == "video" else 1), kind == "video"))
        frames += n if kind == "video" else 0
    return np.concatenate(parts), frames


# text before / between / after videos; frame counts not divisible by P; a video-first prompt.
LAYOUTS_CASES = [
    ([("text", 5), ("video", 11), ("text", 4), ("video", 6), ("text", 7)], 3),
    ([("video", 13), ("text", 9)], 2),
    ([("text", 3), ("video", 5), ("text", 1)], 4),  # fewer frames than devices
]


@functools.cache
def _mesh(sp: int):
    return make_mesh(f"sequence={sp}", jax.devices()[:sp])


@pytest.mark.parametrize("sp", [4, 8])
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
@pytest.mark.parametrize("method", mm.METHODS)
@pytest.mark.parametrize("case", range(len(LAYOUTS_CASES)))
def test_plan_routes_every_token_once(sp, layout, method, case):
    segments, t = LAYOUTS_CASES[case]
    mask, f = _mask(segments, t)
    plan = mm.plan_mm_sharding(mask, f, t, sp, layout, method=method)
    s = mask.size
    assert plan.padded_len % (2 * sp) == 0 and plan.padded_len >= s
    # frames split at frame boundaries, in order, ceil/floor(F/P) each, each frame once
    assert plan.unit_counts.tolist() == [f // sp + (i < f % sp) for i in range(sp)]
    owned = plan.device_units[plan.device_units >= 0]
    np.testing.assert_array_equal(owned, np.arange(f))  # each frame once, in device order
    # the layout: storage index i holds position positions[i], each position once
    np.testing.assert_array_equal(np.sort(plan.positions), np.arange(plan.padded_len))
    vis = np.flatnonzero(plan.is_visual)
    assert vis.size == f * t and np.array_equal(np.sort(plan.positions[vis]), np.flatnonzero(mask))
    # every visual token comes from the device owning its frame, at the right local row
    rank = np.cumsum(mask)[plan.positions[vis]] - 1
    unit, tok = rank // t, rank % t
    src, off = plan.source_device[vis], plan.source_offset[vis]
    np.testing.assert_array_equal(plan.device_units[src, off // t], unit)
    np.testing.assert_array_equal(off % t, tok)
    # simulate the exchange on indices: each visual slot receives exactly its source row
    u = plan.units_per_device
    n = plan.send_len
    sent = np.stack([plan.send_index[a] + a * u * t for a in range(sp)])  # global source rows
    local = plan.local_len
    recv = np.zeros((sp, n), np.int64)
    for shift, start, size in plan.pieces:
        for a in range(sp):
            b = (a + shift) % sp
            if method == "all_to_all":  # piece `shift` = destination b; lands at rows a*C..
                b, dst = shift, a * size
                recv[b, dst : dst + size] = sent[a, start : start + size]
            else:
                recv[b, start : start + size] = sent[a, start : start + size]
    dev = vis // local
    got = recv[dev, plan.recv_index[vis]]
    np.testing.assert_array_equal(got, src * u * t + off)
    # no more moved than needed: every send piece is bounded by the largest real transfer
    per_pair = np.zeros((sp, sp), int)
    np.add.at(per_pair, (src, dev), 1)
    if method == "all_to_all":
        assert n == sp * max(1, per_pair.max())
    else:
        assert n == max(
            1, sum(max(per_pair[a, (a + k) % sp] for a in range(sp)) for k in range(sp))
        )


def test_merged_reference_and_plan_helpers():
    segments, t = LAYOUTS_CASES[0]
    mask, f, ids, feats = _inputs(segments, t)
    table = _embed_table()
    ref = table[ids][None]
    ref[0, mask] = feats.reshape(-1, D)
    got = mm.merged_reference(jnp.asarray(feats), ids, lambda i: jnp.take(table, i, axis=0), mask)
    np.testing.assert_array_equal(np.asarray(got), ref)
    plan = mm.plan_mm_sharding(mask, f, t, 4, "zigzag")
    stored = plan.to_layout(jnp.asarray(ref), axis=1)
    np.testing.assert_array_equal(np.asarray(plan.from_layout(stored)), ref)
    np.testing.assert_array_equal(
        np.asarray(plan.layout_ids(ids))[0, plan.positions < mask.size],
        ids[plan.positions[plan.positions < mask.size]],
    )
    units = np.asarray(plan.arrange_units(feats))
    slots = plan.unit_slots()
    np.testing.assert_array_equal(units[slots >= 0], feats)


def test_plan_errors():
    mask, f = _mask([("text", 2), ("video", 3)], 2)
    with pytest.raises(ValueError, match="visual positions"):
        mm.plan_mm_sharding(mask, f + 1, 2, 4)
    with pytest.raises(ValueError, match="layout"):
        mm.plan_mm_sharding(mask, f, 2, 4, "striped")


def _embed_table() -> np.ndarray:
    return np.random.default_rng(123).standard_normal((VOCAB, D)).astype(np.float32)


def _inputs(segments, t, seed=0):
    mask, f = _mask(segments, t)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, VOCAB, mask.size).astype(np.int32)
    ids[mask] = VOCAB - 1  # placeholder id at visual positions
    feats = rng.standard_normal((f, t, D)).astype(np.float32)
    return mask, f, ids, feats


@functools.cache
def _sharded_fn(plan_key):
    """Jitted exchange for one plan (cached per plan arguments)."""
    case, sp, layout, method = plan_key
    segments, t = LAYOUTS_CASES[case]
    mask, f = _mask(segments, t)
    plan = mm.plan_mm_sharding(mask, f, t, sp, layout, method=method)
    mesh = _mesh(sp)

    def run(table, units, ids):
        embed = lambda i: jnp.take(table, i, axis=0)
        return mm.shard_multimodal_embeddings(units, ids, embed, plan, mesh)

    return plan, mesh, jax.jit(run)


@pytest.mark.parametrize(
    "sp,layout,method",
    [
        (8, "contiguous", "all_to_all"),
        (8, "zigzag", "all_to_all"),
        (8, "zigzag", "ppermute"),
        (4, "contiguous", "ppermute"),
        (4, "zigzag", "all_to_all"),
    ],
)
@pytest.mark.parametrize("case", range(len(LAYOUTS_CASES)))
def test_sharded_embeddings_equal_unsharded(sp, layout, method, case):
    segments, t = LAYOUTS_CASES[case]
    mask, f, ids, feats = _inputs(segments, t, seed=case)
    table = _embed_table()
    ref = table[ids][None]  # the unsharded merged sequence [1, S, D]
    ref[0, mask] = feats.reshape(-1, D)

    plan, mesh, fn = _sharded_fn((case, sp, layout, method))
    units = jax.device_put(plan.arrange_units(feats), NamedSharding(mesh, P("sequence")))
    out, pos = fn(table, units, ids)
    assert out.shape == (1, plan.padded_len, D)
    assert out.sharding.spec == P(None, "sequence")
    np.testing.assert_array_equal(np.asarray(pos[0]), plan.positions)
    if layout == "zigzag":
        full = np.asarray(from_zigzag(out, 1, sp))
    else:
        full = np.asarray(out)
    np.testing.assert_array_equal(full[:, : mask.size], ref)
    np.testing.assert_array_equal(np.asarray(out)[:, np.argsort(plan.positions)[: mask.size]], ref)
    # padding slots hold the pad id's embedding
    np.testing.assert_array_equal(
        full[0, mask.size :], np.broadcast_to(table[0], full[0, mask.size :].shape)
    )
    # each device holds exactly its storage indices
    local = plan.local_len
    for shard in out.addressable_shards:
        d = shard.index[1].start // local
        np.testing.assert_array_equal(
            np.asarray(shard.data)[0], full[0, plan.positions[d * local : (d + 1) * local]]
        )


@pytest.mark.parametrize("layout,method", [("zigzag", "all_to_all"), ("contiguous", "ppermute")])
def test_exchange_gradient_returns_to_the_encoding_device(layout, method):
    """d sum(w * out) / d unit_features: each unit's rows get w at that unit's positions."""
    plan, mesh, fn = _sharded_fn((0, 8, layout, method))
    segments, t = LAYOUTS_CASES[0]
    mask, f, ids, feats = _inputs(segments, t)
    units = jax.device_put(plan.arrange_units(feats), NamedSharding(mesh, P("sequence")))
    w = np.random.default_rng(7).standard_normal((1, plan.padded_len, D)).astype(np.float32)
    grad = jax.jit(jax.grad(lambda u: jnp.sum(w * fn(_embed_table(), u, ids)[0])))(units)
    w_pos = w[:, np.argsort(plan.positions)[: mask.size]]
    expect = np.zeros((plan.unit_slots().size, t, D), np.float32)
    slots = plan.unit_slots()
    expect[slots >= 0] = w_pos[0, mask].reshape(f, t, D)[slots[slots >= 0]]
    np.testing.assert_allclose(np.asarray(grad), expect, rtol=0, atol=1e-6)


@pytest.mark.parametrize("method", mm.METHODS)
@pytest.mark.parametrize("layout", ["contiguous", "zigzag"])
def test_exchange_hlo_has_no_gather_or_reduce(layout, method):
    plan, mesh, fn = _sharded_fn((0, 8, layout, method))
    segments, t = LAYOUTS_CASES[0]
    _, f, ids, feats = _inputs(segments, t)
    units = jax.device_put(plan.arrange_units(feats), NamedSharding(mesh, P("sequence")))
    hlo = fn.lower(_embed_table(), units, ids).compile().as_text()
    ops = set(re.findall(r"\b(all-gather|all-reduce|all-to-all|collective-permute)", hlo))
    assert "all-gather" not in ops and "all-reduce" not in ops, ops
    assert ops == {"all-to-all" if method == "all_to_all" else "collective-permute"}, ops


# -- NVILA forward with sequence parallelism ----------------------------------------------------


@functools.cache
def _vlm(freeze_vision: bool = False):
    """(cfg, graphdef, state) of the tiny NVILA, initialised under jit (eager init is slow)."""
    cfg = vlm.VLMConfig.preset("tiny", freeze_vision=freeze_vision)
    make = lambda: vlm.init_nvila(cfg, seed=0)
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return cfg, graphdef, jax.jit(lambda: nnx.state(make()))()


def _video_prompt(cfg, frame_counts, seed=0):
    """ids [S]: text, video 0, text, video 1, ..., text (placeholders for the videos)."""
    rng = np.random.default_rng(seed)
    parts = [rng.integers(0, 500, 3)]
    for i, f in enumerate(frame_counts):
        parts += [np.full(cfg.video_length(f), cfg.media_token_id), rng.integers(0, 500, 2 + i)]
    return np.concatenate(parts).astype(np.int32)


def _rel_tree(a, b) -> float:
    diff = max(float(np.max(np.abs(x - y))) for x, y in zip(a, b, strict=True))
    return diff / max(float(np.max(np.abs(y))) for y in b)


# sp=4: Ulysses attention, two videos, gradients (frozen tower: projector + LLM); sp=8: 2D
# attention (2 rings x 4 Ulysses), forward only.
@pytest.mark.parametrize("sp,frame_counts,grads", [(4, (10, 5), True), (8, (22,), False)])
def test_vlm_long_video_logits_and_loss_match_unsharded(sp, frame_counts, grads):
    cfg, graphdef, state = _vlm(freeze_vision=grads)
    ids = _video_prompt(cfg, frame_counts, seed=sp)
    s = cfg.vision.image_size
    frames = jax.random.normal(jax.random.key(sp), (sum(frame_counts), s, s, 3), jnp.float32)
    rng = np.random.default_rng(1)
    targets = rng.integers(0, 500, ids.size).astype(np.int32)
    loss_mask = rng.random(ids.size) < 0.8

    # unsharded reference: encode each video, splice, full forward
    bounds = np.cumsum((0, *frame_counts))

    def reference(st, x):
        m = nnx.merge(graphdef, st)
        clips = zip(bounds[:-1], bounds[1:], strict=True)
        media = jnp.concatenate([m.encode_video(x[a:b]) for a, b in clips])
        logits = m(jnp.asarray(ids)[None], media)
        logp = jax.nn.log_softmax(logits[0], -1)
        nll = -jnp.take_along_axis(logp, jnp.asarray(targets)[:, None], -1)[:, 0]
        return jnp.sum(nll * loss_mask) / loss_mask.sum(), logits

    def with_grads(f):
        return jax.jit(jax.value_and_grad(f, has_aux=True) if grads else f)

    out = with_grads(reference)(state, frames)
    (ref_loss, ref), ref_grads = out if grads else (out, None)
    ref, ref_loss = np.asarray(ref), float(ref_loss)

    mesh = _mesh(sp)
    plan = vlm.plan_video_prompt(cfg, ids, frame_counts, sp)
    # groups split at group boundaries: ceil/floor over devices, every frame encoded once
    groups = sum(-(-f // cfg.frames_per_group) for f in frame_counts)
    assert set(plan.mm.unit_counts.tolist()) <= {groups // sp, -(-groups // sp)}
    used = plan.frame_index[plan.frame_index >= 0]
    np.testing.assert_array_equal(np.sort(used), np.arange(sum(frame_counts)))

    def run(st, x):
        m = nnx.merge(graphdef, st)
        logits, _ = vlm.video_prompt_logits_sp(m, x, plan, mesh)
        return vlm.video_prompt_lm_loss(logits, plan, targets, loss_mask), logits

    compiled = with_grads(run).lower(state, frames).compile()
    out = compiled(state, frames)
    (loss, logits), sp_grads = out if grads else (out, None)
    if not grads:  # the forward moves shards only: no all-gather, all-reduce of the loss only
        hlo = compiled.as_text()
        assert "all-gather" not in hlo and "all-to-all" in hlo
        reduced = re.findall(r"= (.+?) all-reduce(?:-start)?\(", hlo)  # result shapes
        dims = [d for shape in reduced for d in re.findall(r"\w+\[([^\]]*)\]", shape)]
        assert reduced and not any(dims), reduced  # scalars (the loss sums) only
    assert logits.sharding.spec[1] == "sequence"
    got = np.asarray(plan.mm.from_layout(logits))
    err = np.max(np.abs(got - ref)) / np.max(np.abs(ref))
    assert err <= 1e-5, err
    assert abs(float(loss) - ref_loss) <= 1e-5 * abs(ref_loss), (float(loss), ref_loss)
    if grads:  # projector and LLM gradients through the exchange and the SP attention
        leaves = lambda g: [np.asarray(x) for x in jax.tree.leaves(g)]
        assert _rel_tree(leaves(sp_grads), leaves(ref_grads)) <= 1e-5
        projector = leaves(sp_grads["projector"])
        assert projector and max(float(np.abs(x).max()) for x in projector) > 0
    zplan = vlm.plan_video_prompt(cfg, ids, frame_counts, sp, layout="zigzag")
    with pytest.raises(ValueError, match="contiguous"):
        vlm.video_prompt_logits_sp(nnx.merge(graphdef, state), frames, zplan, mesh)
