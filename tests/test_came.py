"""CAME / CAME-8bit (jaxstack/train/came.py) and the flow-matching objective
(jaxstack/train/flow_matching.py).

CAME is checked against a float64 NumPy transcription of specs/sana.md section 7.1 (and the
NVlabs/Sana `CAMEWrapper` details it summarises: no bias correction, confidence only for
factored parameters), step by step on 2-D, 1-D, 1x1-conv (PyTorch and Flax layouts) and 3x3-conv
parameters, with decoupled weight decay: float32 JAX stays within 2e-6 of max |param| over 6
steps (measured 1.3e-7; the factored parameters move by ~3, the others by ~0.04).
CAME-8bit: the block quantizer's per-block error bound, constant blocks, an 8-bit vs 32-bit
least-squares run, the state's byte count and its pytree / orbax round trip.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxstack.diffusion import flow_shift
from jaxstack.train.came import (
    CameState,
    came,
    came_state_bytes,
    dequantize_blocks,
    factored_shape,
    quantize_blocks,
    uses_8bit,
)
from jaxstack.train.flow_matching import (
    caption_dropout,
    flow_matching_loss,
    flow_matching_loss_sums,
    flow_noise,
    flow_train_tables,
    sample_train_timesteps,
)

CAME_RTOL = 2e-6  # float32 JAX vs float64 NumPy, max |diff| / max |param|, 6 steps (1.3e-7)

SHAPES = {
    "linear": (24, 40),
    "bias": (40,),
    "conv1x1_torch": (16, 12, 1, 1),
    "conv1x1_flax": (1, 1, 12, 16),
    "conv3x3": (8, 4, 3, 3),
}


# -- float64 NumPy oracle of the spec ----------------------------------------------------------


def np_came_step(p, g, st, lr, wd, betas=(0.9, 0.999, 0.9999), eps=(1e-30, 1e-16), clip=1.0):
    b1, b2, b3 = betas
    shape = p.shape
    if len(shape) == 2 or (len(shape) == 4 and shape[2:] == (1, 1)):
        mat = (shape[0], shape[1])
    elif len(shape) == 4 and shape[:2] == (1, 1):
        mat = (shape[2], shape[3])
    else:
        mat = None
    if not st:
        z = np.zeros(mat or shape)
        st.update(m=z, v=z.copy())
        if mat:
            st.update(
                r=np.zeros(mat[0]), c=np.zeros(mat[1]), rr=np.zeros(mat[0]), rc=np.zeros(mat[1])
            )

    def approx(row, col):
        return np.outer(1 / np.sqrt(row / row.mean()), 1 / np.sqrt(col))

    g = g.reshape(mat) if mat else g
    sq = g**2 + eps[0]
    if mat:
        st["r"] = b2 * st["r"] + (1 - b2) * sq.mean(1)
        st["c"] = b2 * st["c"] + (1 - b2) * sq.mean(0)
        u = g * approx(st["r"], st["c"])
    else:
        st["v"] = b2 * st["v"] + (1 - b2) * sq
        u = g / np.sqrt(st["v"])
    u = u / max(1.0, np.sqrt(np.mean(u**2)) / clip)
    st["m"] = b1 * st["m"] + (1 - b1) * u
    if mat:
        res = (u - st["m"]) ** 2 + eps[1]
        st["rr"] = b3 * st["rr"] + (1 - b3) * res.mean(1)
        st["rc"] = b3 * st["rc"] + (1 - b3) * res.mean(0)
        step = (st["m"] * approx(st["rr"], st["rc"])).reshape(shape)
    else:
        step = st["m"]
    return p - lr * wd * p - lr * step


def random_tree(rng, scale=1.0):
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in SHAPES.items()}


def test_came_matches_numpy_float64(wd=0.05):
    rng = np.random.default_rng(0)
    params = random_tree(rng)
    grads = [random_tree(rng, scale=10.0 ** rng.uniform(-3, 1)) for _ in range(6)]
    lr = 0.02
    opt = came(lr, weight_decay=wd)
    p_jax = jax.tree.map(jnp.asarray, params)
    state = opt.init(p_jax)
    step = jax.jit(opt.update)
    p_np = {k: v.astype(np.float64) for k, v in params.items()}
    st_np = {k: {} for k in params}
    worst = 0.0
    for g in grads:
        updates, state = step(jax.tree.map(jnp.asarray, g), state, p_jax)
        p_jax = optax.apply_updates(p_jax, updates)
        for k in params:
            p_np[k] = np_came_step(p_np[k], g[k].astype(np.float64), st_np[k], lr, wd)
            err = np.abs(np.asarray(p_jax[k], np.float64) - p_np[k]).max() / np.abs(p_np[k]).max()
            worst = max(worst, err)
            assert err <= CAME_RTOL, (k, err)
    print(f"CAME float32 vs float64 NumPy: max relative error {worst:.2e}")
    assert int(state.count) == len(grads)
    # the optimizer moved every parameter (a trivially-zero update would also "match" slowly)
    for k in params:
        assert np.abs(np.asarray(p_jax[k]) - params[k]).max() > 0.5 * lr


def test_came_factored_and_8bit_selection():
    assert factored_shape((24, 40)) == (24, 40)
    assert factored_shape((16, 12, 1, 1)) == (16, 12)
    assert factored_shape((1, 1, 12, 16)) == (12, 16)
    assert factored_shape((8, 4, 3, 3)) is None and factored_shape((40,)) is None
    assert factored_shape((2, 24, 40)) is None  # the reference factors exactly 2-D only
    assert uses_8bit((128, 129)) and not uses_8bit((128, 128))  # numel > 16384, strictly
    assert uses_8bit((256, 128, 1, 1)) and not uses_8bit((256, 128, 3, 3))
    assert not uses_8bit((20000,))
    st = came(1e-3).init(
        {"w": jnp.zeros((24, 40)), "b": jnp.zeros(40), "k": jnp.zeros((8, 4, 3, 3))}
    )
    assert set(st.stats["w"]) == {"m", "v_row", "v_col", "res_row", "res_col"}
    assert st.stats["w"]["v_row"].shape == (24,) and st.stats["w"]["v_col"].shape == (40,)
    assert set(st.stats["b"]) == {"m", "v"} and st.stats["k"]["v"].shape == (8, 4, 3, 3)


def test_came_bf16_params_and_schedule_and_chain():
    params = {"w": jnp.ones((8, 16), jnp.bfloat16), "b": jnp.zeros(16, jnp.bfloat16)}
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.5, p.dtype), params)
    sched = optax.linear_schedule(1e-2, 0.0, 10)
    opt = optax.chain(optax.clip_by_global_norm(0.1), came(sched, weight_decay=0.01))
    state = opt.init(params)
    updates, state = jax.jit(opt.update)(grads, state, params)
    assert updates["w"].dtype == jnp.bfloat16
    assert jax.tree.leaves(state[1].stats)[0].dtype == jnp.float32
    # by hand, first step of a constant gradient (no bias correction): u = 1 after the RMS clip,
    # m = 0.1; factored: res = 0.81, step = m / sqrt((1 - b3) 0.81); 1-D: step = m
    want_w = -1e-2 * (0.1 / np.sqrt(1e-4 * 0.81) + 0.01 * 1.0)
    np.testing.assert_allclose(np.asarray(updates["w"], np.float32), want_w, rtol=1e-2)
    np.testing.assert_allclose(np.asarray(updates["b"], np.float32), -1e-3, rtol=1e-2)
    with pytest.raises(ValueError, match="needs params"):
        came(1e-3, weight_decay=0.1).update(grads, came(1e-3).init(params))


# -- CAME-8bit ---------------------------------------------------------------------------------


def test_quantizer_error_bound_per_block():
    rng = np.random.default_rng(1)
    rows, block = 5000, 2048  # 3 blocks, the last one partial
    x = rng.standard_normal((rows, 7)).astype(np.float32)
    x[:block] *= 1e-3  # very different ranges per block
    x[block : 2 * block] += 50.0
    code = quantize_blocks(jnp.asarray(x), block)
    assert code["q"].dtype == jnp.uint8 and code["q"].shape == x.shape
    assert code["scale"].shape == (3,) and code["min"].shape == (3,)
    x_hat = np.asarray(dequantize_blocks(code, block))
    for i in range(3):
        blk = slice(i * block, min((i + 1) * block, rows))
        scale = float(code["scale"][i])
        np.testing.assert_allclose(scale, (x[blk].max() - x[blk].min()) / 255, rtol=1e-6)
        err = np.abs(x[blk] - x_hat[blk]).max()
        f32_slack = 4 * np.finfo(np.float32).eps * np.abs(x[blk]).max()
        assert err <= scale / 2 + f32_slack, (i, err, scale)
        q = np.asarray(code["q"][blk])
        assert q.min() == 0 and q.max() == 255  # min and max hit the ends of the code


def test_quantizer_constant_blocks_exact():
    x = np.zeros((10, 3), np.float32)
    x[:4] = 3.25  # block 0 constant non-zero, block 1 all zero, block 2 varies
    x[8:] = [[1, 2, 3], [4, 5, 6]]
    code = quantize_blocks(jnp.asarray(x), 4)
    np.testing.assert_array_equal(np.asarray(code["scale"])[:2], [0.0, 0.0])
    x_hat = np.asarray(dequantize_blocks(code, 4))
    assert np.all(np.isfinite(x_hat))
    np.testing.assert_array_equal(x_hat[:8], x[:8])
    np.testing.assert_allclose(x_hat[8:], x[8:], atol=5 / 255 / 2 + 1e-6)
    # zero-initialised optimizer state decodes to exact zeros
    st = came(1e-3, eight_bit=True, min_8bit_size=16).init({"w": jnp.zeros((8, 4))})
    np.testing.assert_array_equal(dequantize_blocks(st.stats["w"]["m"]), np.zeros((8, 4)))


def least_squares(eight_bit: bool, steps=100):
    rng = np.random.default_rng(2)
    n, d_in, d_out = 256, 192, 128  # W: 24576 elements > 16384 -> 8-bit m
    x = jnp.asarray(rng.standard_normal((n, d_in)), jnp.float32)
    w_true = jnp.asarray(rng.standard_normal((d_in, d_out)) * 0.1, jnp.float32)
    y = x @ w_true
    params = {"w": jnp.zeros((d_in, d_out)), "b": jnp.zeros(d_out)}
    loss_fn = lambda p: jnp.mean(jnp.square(x @ p["w"] + p["b"] - y))
    opt = came(3e-3, eight_bit=eight_bit, block_rows=64)  # 3 blocks of 64 rows
    state = opt.init(params)

    @jax.jit
    def step(params, state):
        loss, g = jax.value_and_grad(loss_fn)(params)
        u, state = opt.update(g, state, params)
        return optax.apply_updates(params, u), state, loss

    losses = []
    for _ in range(steps):
        params, state, loss = step(params, state)
        losses.append(float(loss))
    return params, state, np.array(losses + [float(loss_fn(params))])


def test_came_8bit_tracks_32bit_on_least_squares():
    p32, s32, l32 = least_squares(False)
    p8, s8, l8 = least_squares(True)
    assert s8.stats["w"]["m"]["q"].dtype == jnp.uint8 and s8.stats["w"]["m"]["scale"].shape == (3,)
    assert not isinstance(s8.stats["b"]["m"], dict)  # 1-D stays float32
    # both converge (measured: loss 1.87 -> 3.04e-6 (32-bit), 3.06e-6 (8-bit) in 100 steps)
    assert l32[-1] < 1e-4 * l32[0] and l8[-1] < 1e-4 * l8[0]
    rel = float(jnp.linalg.norm(p8["w"] - p32["w"]) / jnp.linalg.norm(p32["w"]))
    assert rel < 5e-3, rel  # the trajectories stay close (measured 1.8e-4)
    assert abs(l8[-1] - l32[-1]) < 0.1 * l32[-1]


def test_came_8bit_state_bytes():
    params = {
        "big": jax.ShapeDtypeStruct((4096, 64), jnp.float32),  # 262144 > 16384: 2 blocks
        "conv": jax.ShapeDtypeStruct((256, 128, 1, 1), jnp.float32),  # 32768: 1 block
        "small": jax.ShapeDtypeStruct((64, 64), jnp.float32),  # 4096: float32
        "bias": jax.ShapeDtypeStruct((64,), jnp.float32),
    }
    s32 = jax.eval_shape(came(1e-4).init, params)
    s8 = jax.eval_shape(came(1e-4, eight_bit=True).init, params)
    for name, numel, blocks in (("big", 4096 * 64, 2), ("conv", 256 * 128, 1)):
        m8 = came_state_bytes(s8.stats[name]["m"])
        assert m8 == numel + 2 * 4 * blocks  # 1 byte per element + 2 float32 per block
        assert m8 / numel < 1.001
        assert came_state_bytes(s32.stats[name]["m"]) == 4 * numel
    saved = came_state_bytes(s32) - came_state_bytes(s8)
    assert saved == 3 * (4096 * 64 + 256 * 128) - 8 * 3
    # with the float32 row/column statistics, the quantized parameters' whole state shrinks to
    # ~0.27 of CAME-32's (m: 4 -> 1 byte per element)
    both = lambda s: came_state_bytes(s.stats["big"]) + came_state_bytes(s.stats["conv"])
    ratio = both(s8) / both(s32)
    assert 0.25 < ratio < 0.3, ratio


def test_came_state_is_a_checkpointable_pytree(tmp_path):
    from jaxstack.train.checkpoint import Checkpointer, abstract_state
    from jaxstack.train.step import TrainState

    rng = np.random.default_rng(3)
    params = {
        "w": jnp.asarray(rng.standard_normal((160, 128)), jnp.float32),
        "b": jnp.zeros(128),
    }
    opt = came(1e-3, eight_bit=True, block_rows=64)
    opt_state = opt.init(params)
    grads = jax.tree.map(lambda p: jnp.ones_like(p) * 0.3, params)
    _, opt_state = jax.jit(opt.update)(grads, opt_state, params)
    assert isinstance(opt_state, CameState)
    leaves, treedef = jax.tree.flatten(opt_state)
    assert all(isinstance(x, jax.Array) for x in leaves)
    again = jax.tree.unflatten(treedef, leaves)
    assert jax.tree.structure(again) == treedef and isinstance(again, CameState)

    state = TrainState(jnp.asarray(1, jnp.int32), params, opt_state)
    with Checkpointer(tmp_path / "ckpt") as ckpt:
        ckpt.save(1, state, {"note": "came8"})
        ckpt.wait_until_finished()
        restored, meta = ckpt.restore(1, abstract_state(state))
    assert meta["note"] == "came8"
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert restored.opt_state.stats["w"]["m"]["q"].dtype == jnp.uint8


# -- flow-matching objective -------------------------------------------------------------------


def test_flow_noise_against_numpy():
    x0 = np.random.default_rng(5).standard_normal((64, 4, 3, 2)).astype(np.float32)
    shift = 3.0
    x_t, timestep, target = flow_noise(jax.random.key(4), jnp.asarray(x0), shift)
    assert x_t.dtype == target.dtype == timestep.dtype == jnp.float32
    assert x_t.shape == target.shape == x0.shape and timestep.shape == (64,)
    x_t, target = np.asarray(x_t, np.float64), np.asarray(target, np.float64)
    # x_t - x0 = sigma (eps - x0) = sigma * target: read sigma off, find the integer t it belongs
    # to under sigma = shift(t / 1000), and rebuild everything in float64 from (t, eps)
    sigma_hat = np.median((x_t - x0) / target, axis=(1, 2, 3))
    grid = flow_shift(np.arange(1000) / 1000.0, shift)
    t = np.abs(grid[None, :] - sigma_hat[:, None]).argmin(1)
    np.testing.assert_allclose(grid[t], sigma_hat, atol=1e-5)
    eps = target + x0
    assert abs(eps.mean()) < 0.1 and abs(eps.std() - 1) < 0.1  # eps ~ N(0, 1)
    sigma = grid[t][:, None, None, None]
    np.testing.assert_allclose(x_t, (1 - sigma) * x0 + sigma * eps, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(timestep, flow_train_tables(shift)[2][t])
    assert np.all(np.abs(np.asarray(timestep) - np.floor(sigma.ravel() * 1000)) <= 1)
    # the target's sign: with v = x0 - eps instead, sigma_hat would come out negative
    assert np.all(sigma_hat >= 0)


def test_flow_tables_and_timestep_statistics():
    for shift in (1.0, 3.0, 4.0):
        alpha, sigma, model_t = flow_train_tables(shift)
        ref = flow_shift(np.arange(1000) / 1000.0, shift)
        np.testing.assert_array_equal(sigma, ref.astype(np.float32))
        np.testing.assert_array_equal(alpha, (1 - ref).astype(np.float32))
        # Sana truncates sigma*1000 to the int64 timestep dtype; its float64 table sits an ulp
        # below t/1000 for some t, so a few timesteps are one lower than floor(1000 * ref)
        off = model_t - np.floor(ref * 1000)
        assert set(np.unique(off)) <= {-1.0, 0.0} and np.mean(off != 0) < 0.15
    # logit-normal t: P(t < 1000 q) = Phi(logit q) (N = 40000, 4-sigma tolerance ~0.01)
    from math import erf, log, sqrt

    t = np.asarray(sample_train_timesteps(jax.random.key(6), 40000))
    assert t.dtype == np.int32
    for q in (0.1, 0.3, 0.5, 0.8, 0.95):
        want = 0.5 * (1 + erf(log(q / (1 - q)) / sqrt(2)))
        assert abs(np.mean(t < round(1000 * q)) - want) < 0.012, q
    assert t.min() >= 0 and t.max() <= 999


def test_flow_matching_loss_against_numpy():
    rng = np.random.default_rng(7)
    v_pred = rng.standard_normal((5, 4, 3, 2)).astype(np.float32)
    target = rng.standard_normal((5, 4, 3, 2)).astype(np.float32)
    sq = (v_pred.astype(np.float64) - target) ** 2
    want = sq.reshape(5, -1).mean(1).mean()
    np.testing.assert_allclose(flow_matching_loss(v_pred, target), want, rtol=1e-6)
    keep = np.array([1, 0, 1, 1, 0], np.float32)
    want_masked = sq.reshape(5, -1).mean(1)[keep > 0].mean()
    np.testing.assert_allclose(flow_matching_loss(v_pred, target, keep), want_masked, rtol=1e-6)
    s, n = flow_matching_loss_sums(v_pred, target, keep)
    assert float(n) == 3.0
    np.testing.assert_allclose(float(s) / float(n), want_masked, rtol=1e-6)
    elem = (rng.uniform(size=(5, 1, 3, 2)) > 0.3).astype(np.float32)  # broadcast over C
    m = np.broadcast_to(elem, sq.shape)
    per = (m * sq).reshape(5, -1).sum(1) / np.maximum(m.reshape(5, -1).sum(1), 1e-12)
    kept = m.reshape(5, -1).sum(1) > 0
    np.testing.assert_allclose(
        flow_matching_loss(v_pred, target, elem), per[kept].mean(), rtol=1e-6
    )


def test_caption_dropout():
    key = jax.random.key(8)
    cap = jnp.asarray(np.random.default_rng(9).standard_normal((4000, 3, 2)), jnp.float32)
    null = jnp.full((3, 2), -7.0)
    out, dropped = caption_dropout(key, cap, null, 0.1)
    d = np.asarray(dropped)
    assert abs(d.mean() - 0.1) < 0.02
    np.testing.assert_array_equal(np.asarray(out)[d], np.broadcast_to(-7.0, (d.sum(), 3, 2)))
    np.testing.assert_array_equal(np.asarray(out)[~d], np.asarray(cap)[~d])
    grad = jax.grad(lambda n: jnp.sum(caption_dropout(key, cap, n, 0.1)[0]))(null)
    np.testing.assert_array_equal(grad, np.full((3, 2), d.sum(), np.float32))
    out0, d0 = caption_dropout(key, cap, null, 0.0)
    assert not np.any(d0) and np.array_equal(out0, cap)
