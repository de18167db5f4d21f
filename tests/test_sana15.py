"""SANA-1.5 surgery (`jaxstack.train.sana15`) and sequence-sharded SANA inference.

* depth growth: new blocks are exactly the identity (grown output == old output, block I/O of
  every new block equal bitwise) and their zeroed out-projections get non-zero gradients;
  partial preservation (keep_first < old depth) equals the kept old blocks composed by hand;
* block importance vs a float64 NumPy cosine of the returned block I/O; an identity block has
  BI == 0 and is pruned first; a pruned model equals its kept blocks composed by hand through
  `embed` / the blocks / `final_layer`;
* SanaTransformer under a `sequence=8` mesh (8 simulated CPU devices, tests/conftest.py) at
  4,096 and 16,384 tokens equals the unsharded model, through
  `sequence_sharded_linear_attention` (counted) and its all-reduce of the state (in the HLO).

Every model has all parameters perturbed by noise so no zero-initialised tensor (proj_out,
cross-attention to_out) makes a comparison vacuous.
"""

from __future__ import annotations

import dataclasses
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxstack.models.sana as sana
from jaxstack.models.sana import SanaConfig, init_sana
from jaxstack.parallel.mesh import make_mesh
from jaxstack.train.sana15 import (
    ZEROED_AT_INSERTION,
    block_importance,
    grow_depth,
    prune_blocks,
)

_FWD = nnx.jit(lambda m, batch: m(**batch))
_FWD_IO = nnx.jit(lambda m, batch: m(**batch, return_block_io=True))


def _model(num_layers: int, seed: int = 0, **overrides) -> sana.SanaTransformer:
    """tiny SANA-1.5-style model (q/k norms) with every parameter perturbed by noise."""
    cfg = SanaConfig.preset(
        "tiny", num_layers=num_layers, qk_norm="rms_norm_across_heads", cross_norm=True,
        **overrides,
    )  # fmt: skip
    model = init_sana(cfg, seed=seed)
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        noise = jax.random.normal(jax.random.key(1000 * seed + i), var.get_value().shape)
        var.set_value(var.get_value() + 0.3 * noise)
    return model


def _batch(seed: int, b: int = 2, h: int = 8, w: int = 6, length: int = 5, cfg=None) -> dict:
    """Call arguments: noised latents, captions, timesteps in [0, 1000), a mask with padding."""
    cfg = cfg or SanaConfig.preset("tiny")
    k = jax.random.split(jax.random.key(seed), 3)
    mask = np.ones((b, length), np.float32)
    mask[0, length - 2 :] = 0
    return dict(
        hidden_states=jax.random.normal(k[0], (b, cfg.in_channels, h, w)),
        encoder_hidden_states=jax.random.normal(k[1], (b, length, cfg.caption_channels)),
        timestep=jax.random.uniform(k[2], (b,), minval=0.0, maxval=1000.0),
        encoder_attention_mask=jnp.asarray(mask),
    )


def _rel(a, ref) -> float:
    a, ref = np.asarray(a, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(a - ref).max() / np.abs(ref).max())


def _get(block, path):
    for name in path:
        block = getattr(block, name)
    return block


def _params(module) -> dict:
    return {p: np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(module))}


def _compose(model, blocks, batch):
    """Output of `model`'s embedders and final layer around `blocks` run in order."""
    height, width = batch["hidden_states"].shape[2:]
    x, y, mask, t6, e = model.embed(**batch)
    for block in blocks:
        x = block(x, y, mask, t6, height, width)
    return model.final_layer(x, e, height, width)


# -- depth growth --------------------------------------------------------------------------------


def test_grow_depth_keep_all_is_exactly_the_old_model():
    old = _model(3)
    before = _params(old)
    grown = grow_depth(old, 7, keep_first=3, seed=5)
    assert grown.cfg.num_layers == 7 and len(grown.transformer_blocks) == 7
    assert grown.cfg == dataclasses.replace(old.cfg, num_layers=7)

    # copied blocks and the non-block parameters equal the old ones, in their own buffers
    new_params = _params(grown)
    for path, value in before.items():
        np.testing.assert_array_equal(new_params[path], value, err_msg=str(path))
    old_ptr = old.proj_out.kernel.get_value().unsafe_buffer_pointer()
    assert grown.proj_out.kernel.get_value().unsafe_buffer_pointer() != old_ptr
    # fresh blocks: the residual branches' last projections are 0, the rest is initialised
    for j in range(3, 7):
        block = grown.transformer_blocks[j]
        for path in ZEROED_AT_INSERTION:
            assert not np.any(np.asarray(_get(block, path).get_value())), (j, path)
        assert np.abs(np.asarray(block.attn1.to_q.kernel.get_value())).max() > 0
        assert np.abs(np.asarray(block.ff.conv_inverted.kernel.get_value())).max() > 0

    batch = _batch(0)
    ref, ref_io = _FWD_IO(old, batch)
    out, io = _FWD_IO(grown, batch)
    err = _rel(out, ref)
    print(f"grown (keep all) vs old: max rel err {err:.3g}, bitwise {np.array_equal(out, ref)}")
    assert err <= 1e-6
    for j in range(3, 7):  # each new block is the identity, bitwise
        np.testing.assert_array_equal(np.asarray(io[j + 1]), np.asarray(io[3]))
    np.testing.assert_array_equal(np.asarray(io[3]), np.asarray(ref_io[3]))
    for path, value in _params(old).items():  # the source model is untouched
        np.testing.assert_array_equal(value, before[path])

    # the zeroed out-projections of the new blocks learn: non-zero, finite gradients
    target = jax.random.normal(jax.random.key(7), ref.shape)
    loss = lambda m: jnp.mean((m(**batch) - target) ** 2)
    grads = nnx.jit(nnx.grad(loss))(grown)
    for j in range(3, 7):
        g_block = grads["transformer_blocks"][j]
        for path in ZEROED_AT_INSERTION:
            g = np.asarray(_get_state(g_block, path))
            assert np.all(np.isfinite(g)) and np.abs(g).max() > 0, (j, path)


def _get_state(state, path):
    for name in path:
        state = state[name]
    return state.get_value()


def test_grow_depth_partial_preservation():
    """Default keep_first = old depth - 2: the last 2 old blocks are gone, the grown model equals
    the first 2 old blocks composed by hand (the new blocks being the identity)."""
    old = _model(4, seed=1)
    grown = grow_depth(old, 6)
    assert grown.cfg.num_layers == 6 and len(grown.transformer_blocks) == 6
    old_blocks = [_params(b) for b in old.transformer_blocks]
    for j in range(2):
        for path, value in _params(grown.transformer_blocks[j]).items():
            np.testing.assert_array_equal(value, old_blocks[j][path])
    for j in range(2, 6):  # not a copy of a dropped block
        new = _params(grown.transformer_blocks[j])
        key = ("attn1", "to_q", "kernel")
        assert all(not np.array_equal(new[key], ob[key]) for ob in old_blocks)

    batch = _batch(1)
    out = _FWD(grown, batch)
    ref = _FWD(old, batch)
    manual = nnx.jit(lambda m, b: _compose(m, list(m.transformer_blocks)[:2], b))(old, batch)
    err = _rel(out, manual)
    print(f"grown (keep 2 of 4) vs first 2 old blocks by hand: max rel err {err:.3g}")
    assert err <= 1e-6
    assert _rel(out, ref) > 1e-2  # the dropped blocks mattered

    # the seed changes only the fresh blocks' randomly initialised tensors
    other = grow_depth(old, 6, seed=1)
    a, b = _params(grown), _params(other)
    for path in a:
        fresh = path[0] == "transformer_blocks" and path[1] >= 2
        random_init = path[-1] in ("kernel", "scale_shift_table")
        if fresh and random_init and path[2:] not in ZEROED_AT_INSERTION:
            assert not np.array_equal(a[path], b[path]), path
        else:
            np.testing.assert_array_equal(a[path], b[path], err_msg=str(path))


def test_grow_depth_validation():
    old = _model(3)
    with pytest.raises(ValueError, match="keep_first"):
        grow_depth(old, 6, keep_first=4)  # more than the old depth
    with pytest.raises(ValueError, match="keep_first"):
        grow_depth(old, 2, keep_first=3)  # more than the new depth
    with pytest.raises(ValueError, match="keep_first"):
        grow_depth(old, 6, keep_first=-1)
    with pytest.raises(TypeError):
        grow_depth(old, 6, keep_first=2.0)
    with pytest.raises(ValueError, match="num_layers"):
        grow_depth(old, 0, keep_first=0)
    with pytest.raises(ValueError, match="explicitly"):
        grow_depth(_model(1), 4)  # default keep_first = 1 - 2 < 0
    assert grow_depth(_model(1), 2, keep_first=0).cfg.num_layers == 2


# -- block importance and pruning ----------------------------------------------------------------


def _numpy_bi(model, batches) -> np.ndarray:
    """1 - mean cos(x_in, x_out) in float64 from `return_block_io`, over all tokens."""
    total, count = np.zeros(model.cfg.num_layers), 0
    for batch in batches:
        _, io = _FWD_IO(model, batch)
        io = [np.asarray(x, np.float64) for x in io]
        for i in range(model.cfg.num_layers):
            a, b = io[i], io[i + 1]
            cos = (a * b).sum(-1) / np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
            total[i] += (1.0 - cos).sum()
        count += io[0].shape[0] * io[0].shape[1]
    return total / count


def test_block_importance_matches_numpy_cosine():
    model = _model(4, seed=2)
    batches = [_batch(10), _batch(11, b=3, h=4, w=10)]  # batches of different sizes
    bi = block_importance(model, batches)
    ref = _numpy_bi(model, batches)
    err = np.abs(bi - ref).max()
    print(f"BI {np.round(bi, 5)}, max |BI - NumPy float64| {err:.3g}")
    assert bi.shape == (4,) and bi.dtype == np.float64
    assert err <= 1e-6
    assert np.all(bi > 1e-3) and np.all(bi < 2)
    with pytest.raises(ValueError, match="at least one batch"):
        block_importance(model, [])


def test_identity_block_has_zero_importance_and_is_pruned_first():
    model = _model(5, seed=3)
    for path in ZEROED_AT_INSERTION:  # block 2 becomes the identity
        var = _get(model.transformer_blocks[2], path)
        var.set_value(jnp.zeros_like(var.get_value()))
    batches = [_batch(20), _batch(21)]
    bi = block_importance(model, batches)
    print(f"BI with block 2 the identity: {bi}")
    assert bi[2] == 0.0
    assert np.all(np.delete(bi, 2) > 1e-3)
    pruned, removed = prune_blocks(model, keep=4, importance=bi)
    assert removed == [2] and pruned.cfg.num_layers == 4
    # computing BI inside prune_blocks removes the same block, and the output is unchanged
    pruned2, removed2 = prune_blocks(model, keep=4, batches=batches)
    assert removed2 == [2]
    np.testing.assert_array_equal(_FWD(pruned2, batches[0]), _FWD(pruned, batches[0]))
    err = _rel(_FWD(pruned, batches[0]), _FWD(model, batches[0]))
    print(f"pruning the identity block: max rel err {err:.3g}")
    assert err <= 1e-6


def test_pruned_model_equals_kept_blocks_composed():
    model = _model(5, seed=4)
    batch = _batch(30)
    pruned, removed = prune_blocks(model, remove=[3, 1])
    assert removed == [1, 3] and pruned.cfg.num_layers == 3
    blocks = list(model.transformer_blocks)
    manual = nnx.jit(lambda m, b: _compose(m, [blocks[i] for i in (0, 2, 4)], b))(model, batch)
    out = _FWD(pruned, batch)
    err = _rel(out, manual)
    print(f"pruned (remove 1, 3) vs blocks 0, 2, 4 by hand: max rel err {err:.3g}")
    assert err <= 1e-6
    for j, i in enumerate((0, 2, 4)):  # kept blocks in order, copied exactly
        a, b = _params(pruned.transformer_blocks[j]), _params(model.transformer_blocks[i])
        for path in a:
            np.testing.assert_array_equal(a[path], b[path])

    # keep=k drops the k lowest-BI blocks (ties: the earlier one), keeping the order
    bi = np.array([0.3, 0.1, 0.5, 0.1, 0.2])
    pruned, removed = prune_blocks(model, keep=2, importance=bi)
    assert removed == [1, 3, 4] and pruned.cfg.num_layers == 2
    np.testing.assert_array_equal(
        _params(pruned.transformer_blocks[1])[("attn1", "to_q", "kernel")],
        _params(model.transformer_blocks[2])[("attn1", "to_q", "kernel")],
    )
    for bad in (
        dict(),
        dict(keep=2, remove=[1]),
        dict(keep=2),
        dict(keep=0, importance=bi),
        dict(keep=2, importance=bi[:4]),
        dict(remove=[5]),
        dict(remove=[1, 1]),
        dict(remove=range(5)),
    ):
        with pytest.raises(ValueError):
            prune_blocks(model, **bad)


# -- sequence-sharded inference ------------------------------------------------------------------


def _sharded_vs_unsharded(side: int, monkeypatch) -> tuple[float, float, int, str]:
    """(max rel err, seconds of the sharded compile + run, sharded-attention calls, HLO) of a
    2-block tiny SANA on a side x side latent (patch 1: side^2 tokens) under sequence=8."""
    cfg = SanaConfig.preset("tiny", num_layers=2)
    model = _model(2, seed=5)
    batch = _batch(40, b=2, h=side, w=side, length=5, cfg=cfg)
    graphdef, state = nnx.split(model)
    run = jax.jit(lambda state, batch: nnx.merge(graphdef, state)(**batch))

    calls = []
    original = sana.sequence_sharded_linear_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("mesh"))
        return original(*args, **kwargs)

    monkeypatch.setattr(sana, "sequence_sharded_linear_attention", counting)
    ref = run(state, batch)  # no mesh: the plain attention
    assert not calls
    mesh = make_mesh("sequence=8")
    start = time.perf_counter()
    with jax.set_mesh(mesh):
        compiled = run.lower(state, batch).compile()
        out = compiled(state, batch)
        out.block_until_ready()
    seconds = time.perf_counter() - start
    assert out.sharding.mesh.shape["sequence"] == 8
    return _rel(out, ref), seconds, len(calls), compiled.as_text()


def test_sequence_sharded_inference_4k_tokens(monkeypatch):
    err, seconds, calls, hlo = _sharded_vs_unsharded(64, monkeypatch)
    print(f"64x64 latent (4,096 tokens), sequence=8: max rel err {err:.3g}, {seconds:.1f} s")
    assert err <= 1e-5
    assert calls == 2  # once per block
    # the psum of the linear-attention state (S [B, H, d, e] = f32[2,2,4,4]) is an all-reduce
    reduces = [line for line in hlo.splitlines() if re.search(r"\ball-reduce(-start)?\(", line)]
    assert any("f32[2,2,4,4]" in line for line in reduces), reduces


def test_sequence_sharded_inference_16k_tokens(monkeypatch):
    err, seconds, calls, _ = _sharded_vs_unsharded(128, monkeypatch)
    print(f"128x128 latent (16,384 tokens), sequence=8: max rel err {err:.3g}, {seconds:.1f} s")
    assert err <= 1e-5 and calls == 2
