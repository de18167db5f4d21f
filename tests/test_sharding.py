"""Sharded forward pass and training step on 8 simulated CPU devices equal the single-device
result in float32 (conftest: 8 host devices, 'highest' matmul precision).

Bounds (all 1e-5): logits max |a - b| / max |b|; loss and grad norm relative difference;
parameters after one step: max |p_sharded - p_ref| / max |p_ref - p_before| over the whole
model, the error relative to the size of the update (see `_optimizer`: the update is ~g).
"""

from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from jaxstack.models.llm import LLM, LLMConfig
from jaxstack.parallel.mesh import (
    IndivisibleShardingWarning,
    constrain,
    context_mesh,
    make_mesh,
    shard_model,
    spec_for,
    state_shardings,
    use_mesh,
)
from jaxstack.parallel.sequence import shard_map
from jaxstack.train.step import (
    OptimConfig,
    init_train_state,
    make_optimizer,
    make_train_step,
    place_batch,
    weight_decay_mask,
)

TOL = 1e-5
MESHES = ["fsdp=4,tensor=2", "data=8"]
CFG = LLMConfig.preset("tiny")  # vocab 512, hidden 64, 4 heads / 2 kv heads, 2 layers


def _optimizer() -> optax.GradientTransformation:
    """make_optimizer's chain (global-norm clipping, AdamW with decay on matrices) at a constant
    lr, with eps=1 and lr=1 so that one update is ~g (Lipschitz in the gradient) and large.

    Why not the defaults: the scheduled optimizer warms up from lr 0 (its first update is zero),
    and with eps=1e-8 Adam's first update is lr * g / (|g| + 1e-8) ~ lr * sign(g): for gradient
    elements near zero its value is decided by float32 rounding of the reductions (we measured
    10% of lr on single elements). A small update would also sink below float32 resolution of
    parameters near 1 (norm scales: ulp 1.2e-7).
    """
    return optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(1.0, b1=0.9, b2=0.95, eps=1.0, weight_decay=0.1, mask=weight_decay_mask),
    )


@functools.lru_cache(maxsize=1)
def _init():
    """(graphdef, float32 state) of the tiny model: one jitted init shared by every case."""
    make = lambda: LLM(CFG, rngs=nnx.Rngs(0))
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    return graphdef, jax.device_get(jax.jit(lambda: nnx.state(make()))())


def _model(mesh=None) -> LLM:
    """A fresh copy of the same model, sharded over `mesh` (or on device 0)."""
    graphdef, state = _init()
    model = nnx.merge(graphdef, jax.tree.map(jnp.asarray, state))
    return shard_model(model, mesh) if mesh is not None else model


@functools.lru_cache(maxsize=1)
def _batch() -> dict[str, np.ndarray]:
    """Packed batch [8, 16]: two segments per row, padding, a random loss mask."""
    rng = np.random.default_rng(0)
    b, t = 8, 16
    seg = np.zeros((b, t), np.int32)
    seg[:, :7], seg[:, 7:13] = 1, 2
    ids = rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32)
    return {
        "input_ids": ids,
        "targets": rng.integers(0, CFG.vocab_size, (b, t)).astype(np.int32),
        "segment_ids": seg,
        "loss_mask": (rng.random((b, t)) < 0.7) & (seg > 0),
    }


def _train_step(mesh, grad_accum=1, optimizer=None):
    """(loss, grad_norm, params before, params after, state, shardings) of one step."""
    optimizer = optimizer or _optimizer()
    model = _model(mesh)
    state, shardings = init_train_state(model, optimizer, mesh)
    before = jax.device_get(state.params)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    step = make_train_step(
        graphdef, rest, optimizer, grad_accum=grad_accum, mesh=mesh, state_sh=shardings
    )
    state, metrics = step(state, place_batch(mesh, _batch()))
    metrics = jax.device_get(metrics)
    return metrics, before, state, shardings


@functools.lru_cache(maxsize=4)
def _sharded_step(spec: str, grad_accum: int):
    return _train_step(make_mesh(spec), grad_accum)


@functools.lru_cache(maxsize=1)
def _reference():
    metrics, before, state, _ = _train_step(None)
    return metrics, before, jax.device_get(state.params)


def _rel(a: float, b: float) -> float:
    return abs(float(a) - float(b)) / abs(float(b))


def _update_error(params, ref, before) -> float:
    """max |p - p_ref| / max |p_ref - p_before|, both maxima over all parameters.

    One max for the whole model, not per array: norm scales sit near 1.0, where one float32
    ulp (6e-8) is already ~4e-5 of their own small update.
    """
    diff = jax.tree.map(lambda p, r: np.max(np.abs(np.asarray(p) - r)), params, ref)
    step = jax.tree.map(lambda r, p0: np.max(np.abs(r - p0)), ref, before)
    return float(max(jax.tree.leaves(diff)) / max(jax.tree.leaves(step)))


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_forward_matches_single_device(spec):
    batch = _batch()
    fwd = jax.jit(lambda m, ids, seg: m(ids, segment_ids=seg))
    ref = np.asarray(fwd(_model(), batch["input_ids"], batch["segment_ids"]))
    mesh = make_mesh(spec)
    model = _model(mesh)
    placed = place_batch(mesh, batch)
    with jax.set_mesh(mesh):  # JAX's own mesh context makes the activation constraints act
        out = fwd(model, placed["input_ids"], placed["segment_ids"])
        jaxpr = str(jax.make_jaxpr(fwd)(model, placed["input_ids"], placed["segment_ids"]))
    assert jaxpr.count("sharding_constraint") >= 2 * CFG.num_layers
    assert len(out.sharding.device_set) == 8
    err = np.max(np.abs(np.asarray(out) - ref)) / np.max(np.abs(ref))
    assert err <= TOL, f"{spec}: logits relative error {err:.2e} > {TOL}"


@pytest.mark.parametrize("spec", MESHES)
def test_sharded_train_step_matches_single_device(spec):
    ref_metrics, before, ref_params = _reference()
    metrics, _, state, shardings = _sharded_step(spec, 1)
    assert _rel(metrics["loss"], ref_metrics["loss"]) <= TOL
    assert _rel(metrics["grad_norm"], ref_metrics["grad_norm"]) <= TOL
    assert metrics["tokens"] == ref_metrics["tokens"]
    err = _update_error(state.params, ref_params, before)
    assert err <= TOL, f"{spec}: params after one step differ by {err:.2e} of the update size"

    # Parameters and both Adam moments live where the rules say.
    q = lambda tree: tree["layers"][0]["self_attn"]["q_proj"]["kernel"]
    emb = lambda tree: tree["embed_tokens"]["embedding"]
    adam = state.opt_state[1][0]  # chain(clip, adamw) -> adamw = (scale_by_adam, ...)
    arrays = [state.params, adam.mu, adam.nu]
    if spec == "fsdp=4,tensor=2":
        assert q(shardings.params).spec == P("fsdp", "tensor")
        assert emb(shardings.params).spec == P("tensor", "fsdp")
        for tree in arrays:
            assert q(tree).sharding.spec == P("fsdp", "tensor")
            assert emb(tree).sharding.spec == P("tensor", "fsdp")
            assert q(tree).addressable_shards[0].data.shape == (64 // 4, 64 // 2)
    else:  # pure data parallelism: parameters and moments replicated on all 8 devices
        for tree in arrays:
            for leaf in jax.tree.leaves(tree):
                assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
    assert state.step.sharding.is_fully_replicated


def test_scheduled_optimizer_state_shardings():
    """make_optimizer's full state (schedule counts, masked decay): Adam moments sharded exactly
    like their parameters, everything else replicated."""
    mesh = make_mesh("fsdp=4,tensor=2")
    state, shardings = init_train_state(_model(mesh), make_optimizer(OptimConfig()), mesh)
    is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
    (adam,) = [x for x in jax.tree.leaves(state.opt_state, is_leaf=is_adam) if is_adam(x)]
    for moments in (adam.mu, adam.nu):
        same = jax.tree.map(lambda m, p: m.sharding == p.sharding, moments, state.params)
        assert all(jax.tree.leaves(same))
    assert adam.count.sharding.is_fully_replicated
    scalars = [x for x in jax.tree.leaves(state.opt_state) if x.ndim == 0]
    assert len(scalars) >= 2 and all(x.sharding.is_fully_replicated for x in scalars)
    assert jax.tree.structure(shardings.opt_state) == jax.tree.structure(state.opt_state)


def test_grad_accumulation_matches_full_batch():
    m1, before, s1, _ = _sharded_step("fsdp=4,tensor=2", 1)
    m2, _, s2, _ = _sharded_step("fsdp=4,tensor=2", 2)
    assert _rel(m2["loss"], m1["loss"]) <= TOL
    assert _rel(m2["grad_norm"], m1["grad_norm"]) <= TOL
    assert m2["tokens"] == m1["tokens"]
    err = _update_error(s2.params, jax.device_get(s1.params), before)
    assert err <= TOL, f"grad_accum=2 params differ by {err:.2e} of the update size"


# -- JAX's mesh context and `constrain` -----------------------------------------------------------


def _has_constraint(fn, *args) -> bool:
    return "sharding_constraint" in str(jax.make_jaxpr(fn)(*args))


def test_constrain_reads_jax_mesh_context():
    """`constrain` acts under `jax.set_mesh` (no jaxstack context needed), is part of jit's
    cache key, and is a no-op without a mesh, on a 1-device mesh and inside shard_map."""
    mesh = make_mesh("data=8")
    x = jnp.arange(8 * 4 * 2, dtype=jnp.float32).reshape(8, 4, 2)
    traces = []

    @jax.jit
    def f(x):
        traces.append(1)
        return constrain(x * 2, ("batch", "seq", "act_embed"))

    assert not _has_constraint(f, x)
    assert len(f(x).sharding.device_set) == 1
    with jax.set_mesh(mesh):
        assert context_mesh() is mesh
        out = f(x)  # traced again: the mesh context is in jit's key
        assert out.sharding.spec == P("data") or out.sharding.spec == P("data", None, None)
        assert len(out.sharding.device_set) == 8
        eager = constrain(x, ("batch", "seq", "act_embed"))  # outside jit: the concrete mesh
        assert len(eager.sharding.device_set) == 8
        odd = jax.jit(lambda y: constrain(y, ("batch", "seq", "act_embed")))(x[:3])
        assert odd.sharding.is_fully_replicated  # an activation dim 8 does not divide

        def body(xl):  # per-device code: every axis manual, no constraint
            assert context_mesh().axis_types == (jax.sharding.AxisType.Manual,) * 4
            return constrain(xl, ("batch", "seq", "act_embed"))

        sm = shard_map(body, None, in_specs=P("data"), out_specs=P("data"))
        assert not _has_constraint(sm, x)
        np.testing.assert_array_equal(jax.jit(sm)(x), x)
    assert len(traces) == 2
    np.testing.assert_array_equal(f(x), 2 * x)  # no mesh again: the first entry
    assert len(traces) == 2 and context_mesh() is None
    with jax.set_mesh(make_mesh("data=1", jax.devices()[:1])):
        assert not _has_constraint(f, x)


def test_use_mesh_is_jax_mesh_context():
    """`use_mesh(mesh)` is `jax.set_mesh(mesh)`: what one sets, the other sees."""
    mesh = make_mesh("fsdp=4,tensor=2")
    with use_mesh(mesh):
        assert jax.sharding.get_abstract_mesh() == mesh.abstract_mesh
        assert jax.sharding.get_mesh() is mesh and context_mesh() is mesh
        with use_mesh(None):
            assert jax.sharding.get_abstract_mesh().empty and context_mesh() is None
    assert jax.sharding.get_abstract_mesh().empty

    def traced(x):  # inside a trace, use_mesh sets the abstract mesh that constrain reads
        with use_mesh(mesh):
            assert context_mesh() == mesh.abstract_mesh
            return constrain(x, ("batch", "act_embed"))

    x = jax.device_put(jnp.ones((8, 16)), jax.sharding.NamedSharding(mesh, P()))
    assert _has_constraint(traced, x)


def test_spec_for_warns_once_and_replicates_a_dimension_the_mesh_does_not_divide():
    mesh = make_mesh("fsdp=4,tensor=2")
    assert spec_for(("embed", "heads"), (64, 32), mesh) == P("fsdp", "tensor")
    with pytest.warns(IndivisibleShardingWarning, match=r"'q_proj.kernel'.*33.*'heads'.*tensor=2"):
        spec = spec_for(("embed", "heads"), (64, 33), mesh, name="q_proj.kernel")
    assert spec == P("fsdp", None)
    with warnings.catch_warnings():  # once per (name, axes, shape, mesh axes): no repeat
        warnings.simplefilter("error")
        assert spec_for(("embed", "heads"), (64, 33), mesh, name="q_proj.kernel") == spec
    with pytest.warns(IndivisibleShardingWarning, match=r"dimension 6 \(logical axis 'batch'\)"):
        assert spec_for(("batch", None), (6, 3), mesh) == P(None, None)
    # a whole model: the warning names the parameter path; the rest is sharded as usual
    cfg = dataclasses.replace(CFG, vocab_size=511)
    abstract = nnx.state(nnx.eval_shape(lambda: LLM(cfg, rngs=nnx.Rngs(0))))
    with pytest.warns(IndivisibleShardingWarning) as record:
        shardings = state_shardings(abstract, mesh)
    assert [str(w.message).split(" of shape")[0] for w in record] == [
        "parameter 'embed_tokens.embedding'"
    ]
    assert "511" in str(record[0].message) and "'vocab'" in str(record[0].message)
    assert shardings["embed_tokens"]["embedding"].spec == P(None, "fsdp")
    assert shardings["layers"][0]["self_attn"]["q_proj"]["kernel"].spec == P("fsdp", "tensor")
