"""FP8 products and COAT's FP8 AdamW (jaxstack/quant), on CPU against float32 oracles."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from jaxstack.models.llm import LLM, LLMConfig
from jaxstack.quant import (
    E4M3,
    E5M2,
    apply_fp8,
    apply_precision,
    coat_adamw,
    dequantize_1xg,
    dequantize_blocks,
    dequantize_groups,
    dre_dequantize,
    dre_exponent,
    dre_quantize,
    fp8_matmul,
    fp8_saved_call,
    group_e4m3_roundtrip,
    quantize_1xg,
    quantize_blocks,
    quantize_groups,
    quantize_tensor,
    state_bytes,
)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def qdq(x, fmt):
    q, s = quantize_tensor(x, fmt)
    return q.astype(jnp.float32) * s


@pytest.fixture
def xw():
    x = jax.random.normal(jax.random.key(0), (3, 40, 256))
    w = 0.05 * jax.random.normal(jax.random.key(1), (256, 384))
    g = jax.random.normal(jax.random.key(2), (3, 40, 384))
    return x, w, g


def test_tensor_fp8_matmul_equals_quantize_dequantize_oracle(xw) -> None:
    """Forward, dgrad and wgrad are exactly the float32 products of the e4m3 / e5m2 operands."""
    x, w, g = xw
    y, vjp = jax.vjp(lambda a, b: fp8_matmul(a, b, out_dtype=jnp.float32), x, w)
    dx, dw = vjp(g)
    x2, g2 = x.reshape(-1, 256), g.reshape(-1, 384)
    xq, wq, gq = qdq(x2, E4M3), qdq(w.T, E4M3).T, qdq(g2, E5M2)
    np.testing.assert_allclose(y.reshape(-1, 384), xq @ wq, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx.reshape(-1, 256), gq @ wq.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, xq.T @ gq, rtol=1e-5, atol=1e-5)
    assert dx.dtype == x.dtype and dw.dtype == w.dtype


@pytest.mark.parametrize("granularity", ["tensor", "block"])
def test_fp8_matmul_within_format_error_of_float32(xw, granularity) -> None:
    x, w, g = xw
    y, vjp = jax.vjp(lambda a, b: fp8_matmul(a, b, granularity=granularity), x, w)
    dx, dw = vjp(g)
    y_ref, vjp_ref = jax.vjp(lambda a, b: a @ b, x, w)
    dx_ref, dw_ref = vjp_ref(g)
    # e4m3 keeps 3 mantissa bits (relative step 2^-3, rms rounding error ~2.6%), e5m2 two
    assert 0.005 < rel(y, y_ref) < 0.06
    assert 0.01 < rel(dx, dx_ref) < 0.1
    assert 0.01 < rel(dw, dw_ref) < 0.1


def test_group_and_block_quantization_roundtrip() -> None:
    x = jax.random.normal(jax.random.key(3), (8, 256)) * jnp.logspace(-3, 3, 256)
    q, s = quantize_groups(x, E4M3)
    assert q.dtype == E4M3 and s.shape == (8, 2)
    assert np.all(np.log2(np.asarray(s)) == np.round(np.log2(np.asarray(s))))  # powers of two
    assert rel(dequantize_groups(q, s), x) < 0.05
    w = jax.random.normal(jax.random.key(4), (256, 384))
    qb, sb = quantize_blocks(w, E4M3)
    assert sb.shape == (2, 3)
    assert rel(dequantize_blocks(qb, sb), w) < 0.05
    with pytest.raises(ValueError, match="multiple of the group size"):
        quantize_groups(jnp.ones((2, 100)), E4M3)


def test_block_scaling_is_per_token() -> None:
    """A token's block-quantized product does not depend on the other tokens in the batch (what
    lets one-token decode and a full-sequence forward share quantized values)."""
    w = 0.05 * jax.random.normal(jax.random.key(5), (256, 128))
    x = jax.random.normal(jax.random.key(6), (16, 256)).at[3].multiply(1e5)
    full = fp8_matmul(x, w, granularity="block", out_dtype=jnp.float32)
    alone = fp8_matmul(x[5:6], w, granularity="block", out_dtype=jnp.float32)
    np.testing.assert_array_equal(full[5:6], alone)
    per_tensor = fp8_matmul(x, w, out_dtype=jnp.float32)  # the outlier token coarsens the rest
    assert rel(per_tensor[5], x[5] @ w) > 5 * rel(full[5], x[5] @ w)


def test_fp8_matmul_bad_input() -> None:
    with pytest.raises(ValueError, match="granularity"):
        fp8_matmul(jnp.ones((2, 128)), jnp.ones((128, 128)), granularity="row")
    with pytest.raises(ValueError, match="do not contract"):
        fp8_matmul(jnp.ones((2, 64)), jnp.ones((128, 128)))


def test_dre_exponent_and_roundtrip() -> None:
    assert float(dre_exponent(jnp.float32(2.0**4))) == 4.125  # floor(16 log2(100352) / 4) / 16
    key_m, key_v, key_s = jax.random.split(jax.random.key(7), 3)
    n = 128 * 64
    sign = jnp.sign(jax.random.normal(key_s, (n,)))
    m = 1e-3 * sign * jnp.exp(jax.random.uniform(key_m, (n,), maxval=np.log(1e3)))  # range 1e3
    v = 1e-6 * jnp.exp(jax.random.uniform(key_v, (n,), maxval=np.log(1e1)))  # range 1e1
    sm, sv = dre_quantize(m), dre_quantize(v)
    assert float(jnp.mean(sv.k)) > float(jnp.mean(sm.k)) > 1.0  # narrower range: more expansion
    for x, st, bound in ((m, sm, 0.5), (v, sv, 0.1)):
        mse_dre = float(jnp.mean((dre_dequantize(st, x.shape) - x) ** 2))
        mse_plain = float(jnp.mean((group_e4m3_roundtrip(x) - x) ** 2))
        assert mse_dre < bound * mse_plain, (mse_dre, mse_plain)
    zero = dre_quantize(jnp.zeros((300,)))  # all-zero groups (and a padded tail) stay finite
    assert np.all(np.isfinite(np.asarray(zero.k)))
    np.testing.assert_array_equal(dre_dequantize(zero, (300,)), np.zeros(300))
    const = jnp.full((128,), -2.5e-3)  # one magnitude: R = 1, exact
    np.testing.assert_allclose(dre_dequantize(dre_quantize(const), (128,)), const, rtol=1e-6)


def _tiny_lm():
    cfg = LLMConfig.preset("tiny", hidden_size=128, intermediate_size=256, head_dim=32)
    return LLM(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))


def _batch(step: int, vocab: int = 64, rows: int = 16, length: int = 33):
    """Fresh tokens each step: next = perm[prev] with probability 0.8, else uniform (a floor
    of about 1.2 nats the model can reach, not a batch it can memorise)."""
    rng = np.random.default_rng(step)
    perm = np.random.default_rng(1234).permutation(vocab)
    ids = np.empty((rows, length), np.int32)
    ids[:, 0] = rng.integers(0, vocab, rows)
    for t in range(1, length):
        noise = rng.random(rows) < 0.2
        ids[:, t] = np.where(noise, rng.integers(0, vocab, rows), perm[ids[:, t - 1]])
    return jnp.asarray(ids)


def _train(model, tx, steps=80):
    graphdef, params = nnx.split(model, nnx.Param)
    opt = tx.init(params)

    def loss_fn(p, ids):
        logits = nnx.merge(graphdef, p)(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    @jax.jit
    def step(p, o, ids):
        loss, g = jax.value_and_grad(loss_fn)(p, ids)
        upd, o = tx.update(g, o, p)
        return optax.apply_updates(p, upd), o, loss

    losses = []
    for i in range(steps):
        params, opt, loss = step(params, opt, _batch(i))
        losses.append(float(loss))
    return np.array(losses), opt


def test_coat_adamw_tracks_float32_adamw() -> None:
    mask = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731
    ref, ref_state = _train(_tiny_lm(), optax.adamw(3e-3, b2=0.999, weight_decay=0.01, mask=mask))
    got, coat_state = _train(_tiny_lm(), coat_adamw(3e-3, weight_decay=0.01, mask=mask))
    tail_ref, tail_got = ref[-20:].mean(), got[-20:].mean()
    assert tail_ref < 0.5 * ref[0]  # the task is learned
    # same curve within noise: a wrong moment, sign or bias correction departs by far more
    assert abs(tail_got - tail_ref) < 0.03 * tail_ref, (tail_got, tail_ref)
    assert np.max(np.abs(got - ref)) < 0.1 * ref[0]
    assert state_bytes(coat_state) < 0.35 * state_bytes(ref_state)  # 2 of 8 bytes + scales


def test_apply_precision_on_llm() -> None:
    model = _tiny_lm()
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    ref = model(ids)
    n = apply_precision(model, "fp8")
    assert n == 2 * 7  # q, k, v, o, gate, up, down per layer; the LM head stays
    got = model(ids)
    assert 1e-4 < rel(got, ref) < 0.1
    assert apply_fp8(model, None) == n  # back to plain products: identical
    np.testing.assert_array_equal(model(ids), ref)
    with pytest.raises(ValueError, match="precision must be one of"):
        apply_precision(model, "fp4")


@pytest.mark.slow  # end-to-end job (pytest -m slow)
def test_train_job_fp8_coat_resumes_exactly(tmp_path) -> None:
    """`jaxstack train` with precision=fp8_coat on 8 simulated devices: FP8 moments in the
    checkpoint, and a run killed at step 12 and resumed equals the straight run."""
    from jaxstack.config import load_config
    from jaxstack.train import TrainJobConfig, read_metrics, run_train

    tiny = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", "train_tiny.yaml")
    small = [
        "steps=8", "checkpoint_every=4", "log_every=2", "eval=0", "mesh=data=4,fsdp=2",
        "data.seq_len=32", "data.batch_size=8", "data.num_records=400",
        "model.precision=fp8_coat",
    ]  # fmt: skip
    cfgs = {
        n: load_config(TrainJobConfig, tiny, [*small, f"output_dir={tmp_path / n}"])
        for n in ("straight", "resumed")
    }
    run_train(cfgs["straight"])
    assert run_train(cfgs["resumed"], stop_after=6)["stopped_at"] == 6
    second = run_train(cfgs["resumed"])
    assert second["start_step"] == 4 and second["step"] == 8

    def losses(name):
        rows = read_metrics(os.path.join(cfgs[name].output_dir, "metrics.jsonl"))
        return [(r["step"], r["loss"], r["grad_norm"]) for r in rows]

    assert losses("resumed") == losses("straight")
    ckpt = os.path.join(cfgs["straight"].output_dir, "checkpoints")
    assert os.path.isdir(ckpt)


def test_1x16_groups_beat_per_tensor_on_outliers() -> None:
    """Mixed granularity: on an outlier-heavy tensor 1 x 16 e4m3 groups keep the small values
    that one per-tensor scale flushes (spec test 2)."""
    x = jax.random.normal(jax.random.key(11), (64, 256))
    x = x.at[:, ::64].multiply(3e4)  # a few huge channels
    q, s = quantize_1xg(x)
    grouped = dequantize_1xg(q, s, 256, jnp.float32)
    per_tensor = qdq(x, E4M3)
    small = np.abs(np.asarray(x)) < 10
    err_g = np.abs(np.asarray(grouped) - np.asarray(x))[small].mean()
    err_t = np.abs(np.asarray(per_tensor) - np.asarray(x))[small].mean()
    assert err_g < 0.3 * err_t, (err_g, err_t)  # a quarter of the groups hold an outlier


def test_fp8_saved_call_gradient_and_memory() -> None:
    """Forward unchanged; the gradient is the VJP at the 1 x 16 e4m3 inputs; the compiled
    backward keeps fewer bytes (CPU buffer assignment)."""

    def glu(g, u):
        return jax.nn.silu(g) * u

    kg, ku, kc = jax.random.split(jax.random.key(12), 3)
    g, u = jax.random.normal(kg, (512, 1024)), jax.random.normal(ku, (512, 1024))
    ct = jax.random.normal(kc, (512, 1024))
    y, vjp = jax.vjp(lambda a, b: fp8_saved_call(glu, a, b), g, u)
    np.testing.assert_array_equal(y, glu(g, u))
    got = vjp(ct)
    deq = [dequantize_1xg(*quantize_1xg(x), 1024, jnp.float32) for x in (g, u)]
    want = jax.vjp(glu, *deq)[1](ct)
    for a, b, exact in zip(got, want, jax.vjp(glu, g, u)[1](ct)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
        assert 1e-3 < rel(a, exact) < 0.1

    w = jax.random.normal(kc, (1024, 1024)) * 0.03

    def loss(x, saved):
        h = x @ w
        out = fp8_saved_call(glu, h, h + 1.0) if saved else glu(h, h + 1.0)
        return jnp.sum(jnp.tanh(out @ w))

    def temp_bytes(saved):
        grad = jax.jit(jax.grad(lambda x: loss(x, saved)))
        return grad.lower(g).compile().memory_analysis().temp_size_in_bytes

    assert temp_bytes(True) < 0.8 * temp_bytes(False)


def test_fp8_coat_switches_mlp_activation_saving() -> None:
    model = _tiny_lm()
    mlps = [m for _, m in nnx.iter_modules(model) if hasattr(m, "fp8_saved_activations")]
    assert mlps and not any(m.fp8_saved_activations for m in mlps)
    apply_precision(model, "fp8_coat")
    assert all(m.fp8_saved_activations for m in mlps)
    ids = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
    loss = lambda m: jnp.mean(m(ids).astype(jnp.float32) ** 2)  # noqa: E731
    grads = nnx.grad(loss)(model)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(grads))
    apply_precision(model, "fp8")
    assert not any(m.fp8_saved_activations for m in mlps)
