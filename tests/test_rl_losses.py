"""GRPO / DAPO / Dr.GRPO loss pieces against values worked out by hand on tiny batches."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxstack.rl import (
    PolicyLossConfig,
    dynamic_sampling_keep,
    group_advantages,
    k3_kl,
    overlong_penalty,
    token_entropy,
)
from jaxstack.rl import policy_loss as eager_policy_loss

# Jitted (cfg static): one compile per test instead of dispatching every op eagerly.
policy_loss = jax.jit(eager_policy_loss, static_argnums=4)

# ---------------------------------------------------------------------------------------------
# group_advantages

# Groups interleaved: group 0 at positions 0, 2, 5; group 1 at 1, 3; group 2 (one sample) at 4.
REWARDS = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
IDS = [0, 1, 0, 1, 2, 0]


def test_group_advantages_std_by_hand():
    # group 0: rewards 1, 0, 1 -> mean 2/3, deviations 1/3, -2/3, 1/3,
    #   unbiased var = (1/9 + 4/9 + 1/9) / (3 - 1) = 1/3, std = 1/sqrt(3)
    s0 = 1 / math.sqrt(3)
    # group 1: rewards 0, 1 -> mean 1/2, deviations -1/2, 1/2, var = (1/4 + 1/4) / 1,
    #   std = sqrt(1/2)
    s1 = math.sqrt(0.5)
    # group 2: a single sample -> 0
    want = [(1 / 3) / s0, -0.5 / s1, (-2 / 3) / s0, 0.5 / s1, 0.0, (1 / 3) / s0]
    got = group_advantages(jnp.array(REWARDS), jnp.array(IDS), 3, eps=0.0)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    # default eps barely moves it; num_groups inferred on the host gives the same
    np.testing.assert_allclose(group_advantages(REWARDS, IDS), want, rtol=1e-5)


def test_group_advantages_none_is_mean_centering():
    got = group_advantages(jnp.array(REWARDS), jnp.array(IDS), 3, scale="none")
    np.testing.assert_allclose(got, [1 / 3, -0.5, -2 / 3, 0.5, 0.0, 1 / 3], rtol=1e-6, atol=1e-7)


def test_group_advantages_permutation_equivariant_and_jit():
    rng = np.random.default_rng(0)
    rewards = rng.normal(size=12).astype(np.float32)
    ids = np.repeat(np.arange(4), 3)
    rng.shuffle(ids)
    fn = jax.jit(group_advantages, static_argnames=("num_groups", "scale"))
    base = np.asarray(fn(rewards, ids, num_groups=4))
    for g in range(4):  # each group's advantages have mean 0 and unbiased std ~1
        np.testing.assert_allclose(base[ids == g].mean(), 0.0, atol=1e-5)
        np.testing.assert_allclose(base[ids == g].std(ddof=1), 1.0, rtol=1e-4)
    perm = rng.permutation(12)
    np.testing.assert_allclose(fn(rewards[perm], ids[perm], num_groups=4), base[perm], rtol=1e-6)


def test_group_advantages_equal_rewards_and_errors():
    got = group_advantages([1.0, 1.0, 0.0, 0.0], [0, 0, 1, 1], 2, eps=0.0)
    np.testing.assert_array_equal(got, [0.0, 0.0, 0.0, 0.0])  # no 0/0 even with eps=0
    with pytest.raises(ValueError, match="scale"):
        group_advantages([1.0], [0], 1, scale="bogus")
    with pytest.raises(ValueError, match="num_groups"):
        jax.jit(lambda r, i: group_advantages(r, i))(jnp.ones(2), jnp.zeros(2, jnp.int32))


# ---------------------------------------------------------------------------------------------
# policy_loss on a 2x3 batch
#
# ratios:  row 0 (A = +1): 1.5, 0.5, 1.1      row 1 (A = -2): 0.7, 1.3, [masked]
# clip range [0.8, 1.2]; per-token loss = max(-A r, -A clip(r)):
#   row 0: r=1.5: max(-1.5, -1.2) = -1.2 (clipped)   r=0.5: max(-0.5, -0.8) = -0.5
#          r=1.1: -1.1 (inside the range)
#   row 1: r=0.7: max(1.4, 1.6) = 1.6 (clipped)      r=1.3: max(2.6, 2.4) = 2.6
# clip_frac = 2 clipped / 5 valid tokens = 0.4

RATIOS = np.array([[1.5, 0.5, 1.1], [0.7, 1.3, 1.0]])
MASK = jnp.array([[True, True, True], [True, True, False]])
ADV = jnp.array([1.0, -2.0])
OLD = jnp.array([[-1.0, -2.0, -0.5], [-3.0, -0.1, -0.7]])
LOGP = OLD + jnp.log(jnp.asarray(RATIOS, jnp.float32))
ROW0, ROW1 = -1.2 - 0.5 - 1.1, 1.6 + 2.6  # -2.8, 4.2


@pytest.mark.parametrize(
    "agg,max_len,want",
    [
        ("token_mean", None, (ROW0 + ROW1) / 5),  # 1.4 / 5 = 0.28
        ("seq_mean_token_mean", None, (ROW0 / 3 + ROW1 / 2) / 2),  # (-0.9333 + 2.1) / 2
        ("seq_mean_token_sum_norm", 4, (ROW0 / 4 + ROW1 / 4) / 2),  # (-0.7 + 1.05) / 2 = 0.175
        ("seq_mean_token_sum_norm", None, (ROW0 / 3 + ROW1 / 3) / 2),  # constant = T = 3
    ],
)
def test_policy_loss_aggregations(agg, max_len, want):
    cfg = PolicyLossConfig(loss_agg=agg, max_response_len=max_len)
    loss, m = policy_loss(LOGP, OLD, ADV, MASK, cfg)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(m["pg_loss"], want, rtol=1e-5)
    np.testing.assert_allclose(m["clip_frac"], 0.4, rtol=1e-6)
    np.testing.assert_allclose(m["ratio_mean"], (1.5 + 0.5 + 1.1 + 0.7 + 1.3) / 5, rtol=1e-5)
    k1 = -(math.log(1.5) + math.log(0.5) + math.log(1.1) + math.log(0.7) + math.log(1.3)) / 5
    np.testing.assert_allclose(m["approx_kl"], k1, rtol=1e-5)
    assert "kl_ref" not in m and "entropy" not in m


def test_policy_loss_per_token_advantages_match_broadcast():
    cfg = PolicyLossConfig()
    a, _ = policy_loss(LOGP, OLD, ADV, MASK, cfg)
    b, _ = policy_loss(LOGP, OLD, jnp.broadcast_to(ADV[:, None], (2, 3)), MASK, cfg)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_policy_loss_grad_zero_where_clipped():
    cfg = PolicyLossConfig(loss_agg="token_mean")
    grad = jax.jit(jax.grad(lambda lp: policy_loss(lp, OLD, ADV, MASK, cfg)[0]))(LOGP)
    # d(-A r)/d logp = -A r, divided by the 5 valid tokens; clipped and masked tokens give 0.
    want = [[0.0, -0.5 / 5, -1.1 / 5], [0.0, 2 * 1.3 / 5, 0.0]]
    np.testing.assert_allclose(grad, want, rtol=1e-5, atol=1e-7)


def test_clip_higher_changes_which_tokens_clip():
    # DAPO clip_high = 0.28: r = 1.2 < 1.28 is no longer clipped for A > 0.
    logp = jnp.log(jnp.array([[1.25, 1.3]]))
    old = jnp.zeros((1, 2))
    mask = jnp.ones((1, 2), bool)
    _, sym = policy_loss(logp, old, jnp.array([1.0]), mask, PolicyLossConfig())
    _, dapo = policy_loss(logp, old, jnp.array([1.0]), mask, PolicyLossConfig(clip_high=0.28))
    np.testing.assert_allclose(sym["clip_frac"], 1.0)
    np.testing.assert_allclose(dapo["clip_frac"], 0.5)
    np.testing.assert_allclose(dapo["pg_loss"], (-1.25 - 1.28) / 2, rtol=1e-5)


def test_dual_clip():
    # row 0 (A = -2): r = 5 -> max(10, 2.4) = 10, dual cap -A c = 6 -> 6
    #                 r = 0.5 -> max(1, 1.6) = 1.6 (clipped)
    # row 1 (A = +1): r = 5 -> max(-5, -1.2) = -1.2 (dual clip only for A < 0);  r = 1 -> -1
    logp = jnp.log(jnp.array([[5.0, 0.5], [5.0, 1.0]]))
    old = jnp.zeros((2, 2))
    mask = jnp.ones((2, 2), bool)
    adv = jnp.array([-2.0, 1.0])
    plain, _ = policy_loss(logp, old, adv, mask, PolicyLossConfig())
    np.testing.assert_allclose(plain, (10 + 1.6 - 1.2 - 1) / 4, rtol=1e-5)
    cfg = PolicyLossConfig(dual_clip=3.0)
    loss, m = policy_loss(logp, old, adv, mask, cfg)
    np.testing.assert_allclose(loss, (6 + 1.6 - 1.2 - 1) / 4, rtol=1e-5)  # 1.35
    np.testing.assert_allclose(m["dual_clip_frac"], 0.25)
    np.testing.assert_allclose(m["clip_frac"], 0.5)  # r=0.5 in row 0 and r=5 in row 1
    grad = jax.jit(jax.grad(lambda lp: policy_loss(lp, old, adv, mask, cfg)[0]))(logp)
    np.testing.assert_allclose(grad, [[0.0, 0.0], [0.0, -1.0 / 4]], atol=1e-7)


def test_k3_kl_to_reference():
    # ratio 1 and A = 0 -> pg = 0, so the loss is kl_coef * mean k3.
    # ref - logp = ln2 -> 2 - ln2 - 1 = 1 - ln2;  0 -> 0;  -ln2 -> 1/2 + ln2 - 1;  ln3 -> 2 - ln3
    logp = jnp.array([[-1.0, -2.0, -0.5], [-1.5, -0.2, -3.0]])
    d = jnp.array([[math.log(2), 0.0, -math.log(2)], [math.log(3), 0.0, 50.0]])
    k3 = [1 - math.log(2), 0.0, 0.5 + math.log(2) - 1, 2 - math.log(3)]
    cfg = PolicyLossConfig(kl_coef=0.5)
    loss, m = policy_loss(logp, logp, jnp.zeros(2), MASK, cfg, ref_logp=logp + d)
    np.testing.assert_allclose(m["kl_ref"], sum(k3) / 5, rtol=1e-5)
    np.testing.assert_allclose(loss, 0.5 * sum(k3) / 5, rtol=1e-5)
    # clipped to [-10, 10] as verl does: e^5 - 5 - 1 = 142.4 -> 10
    np.testing.assert_allclose(k3_kl(jnp.zeros(2), jnp.array([5.0, 0.0])), [10.0, 0.0])
    with pytest.raises(ValueError, match="ref_logp"):
        policy_loss(logp, logp, jnp.zeros(2), MASK, cfg)


def test_entropy_metric_and_bonus():
    ent = jnp.array([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    cfg = PolicyLossConfig(entropy_coef=0.1)
    loss, m = policy_loss(LOGP, OLD, ADV, MASK, cfg, entropy=ent)
    np.testing.assert_allclose(m["entropy"], 15 / 5, rtol=1e-6)
    np.testing.assert_allclose(loss, (ROW0 + ROW1) / 5 - 0.1 * 3.0, rtol=1e-5)
    with pytest.raises(ValueError, match="entropy"):
        policy_loss(LOGP, OLD, ADV, MASK, cfg)


@pytest.mark.parametrize("agg", ["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"])
def test_empty_mask_no_nan(agg):
    logp = jnp.full((2, 3), -jnp.inf)  # garbage on padding must not leak
    old = jnp.zeros((2, 3))
    mask = jnp.zeros((2, 3), bool)
    cfg = PolicyLossConfig(loss_agg=agg, kl_coef=0.1, entropy_coef=0.01)

    def f(lp):
        return policy_loss(lp, old, ADV, mask, cfg, ref_logp=old, entropy=jnp.ones((2, 3)))

    (loss, m), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(logp)
    assert float(loss) == 0.0
    assert all(np.isfinite(v) for v in m.values())
    assert np.all(np.asarray(grad) == 0.0)


def test_padding_rows_do_not_change_seq_mean():
    cfg = PolicyLossConfig(loss_agg="seq_mean_token_mean")
    a, _ = policy_loss(LOGP, OLD, ADV, MASK, cfg)
    pad = lambda x, v: jnp.concatenate([x, jnp.full((1,) + x.shape[1:], v, x.dtype)])
    b, _ = policy_loss(pad(LOGP, 0.0), pad(OLD, 0.0), pad(ADV, 5.0), pad(MASK, False), cfg)
    np.testing.assert_allclose(a, b, rtol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="loss_agg"):
        PolicyLossConfig(loss_agg="mean")
    with pytest.raises(ValueError, match="clip_low"):
        PolicyLossConfig(clip_low=1.0)
    with pytest.raises(ValueError, match="clip_high"):
        PolicyLossConfig(clip_high=-0.1)
    with pytest.raises(ValueError, match="dual_clip"):
        PolicyLossConfig(dual_clip=1.0)
    with pytest.raises(ValueError, match="max_response_len"):
        PolicyLossConfig(max_response_len=0)
    with pytest.raises(ValueError, match="kl_coef"):
        PolicyLossConfig(kl_coef=-1.0)
    with pytest.raises(ValueError, match="advantages"):
        policy_loss(LOGP, OLD, jnp.zeros(3), MASK, PolicyLossConfig())


def test_policy_loss_eager_matches_jit():
    cfg = PolicyLossConfig(loss_agg="seq_mean_token_mean", clip_high=0.28, dual_clip=3.0)
    eager, m_eager = eager_policy_loss(LOGP, OLD, ADV, MASK, cfg)
    jitted, m_jit = policy_loss(LOGP, OLD, ADV, MASK, cfg)
    np.testing.assert_allclose(eager, jitted, rtol=1e-6)
    for k in m_eager:
        np.testing.assert_allclose(m_eager[k], m_jit[k], rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# token_entropy, dynamic sampling, overlong penalty


def test_token_entropy():
    logits = jnp.array([[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, -jnp.inf, -jnp.inf], [1e4, 0.0, 0, 0]])
    np.testing.assert_allclose(token_entropy(logits), [math.log(4), math.log(2), 0.0], atol=1e-6)
    p = np.array([0.5, 0.25, 0.25])  # H = 0.5 ln2 + 2 * 0.25 ln4 = 1.5 ln2
    out = token_entropy(jnp.log(jnp.asarray(p, jnp.bfloat16)) + 3.0)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, 1.5 * math.log(2), rtol=1e-2)


def test_dynamic_sampling_keep():
    # group 0: 1, 1 (all equal) -> drop;   group 1: 0, 1 -> keep;   group 2: one sample -> drop
    # group 3: 0.5, 0.5 -> drop;           group 4: 0, 0, 1 -> keep
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0, 0.5, 0.5, 0.0, 0.0, 1.0]
    ids = [0, 1, 1, 0, 2, 3, 3, 4, 4, 4]
    want = [False, True, True, False, False, False, False, True, True, True]
    np.testing.assert_array_equal(dynamic_sampling_keep(rewards, ids, 5), want)
    np.testing.assert_array_equal(dynamic_sampling_keep(rewards, ids), want)
    jitted = jax.jit(dynamic_sampling_keep, static_argnums=2)
    np.testing.assert_array_equal(jitted(jnp.array(rewards), jnp.array(ids), 5), want)


def test_overlong_penalty():
    # max_len 10, buffer 4: free up to 6, then -(L - 6) / 4, -1 from 10 on
    lengths = jnp.array([0, 6, 7, 8, 10, 11, 100])
    got = overlong_penalty(lengths, max_len=10, buffer_len=4)
    np.testing.assert_allclose(got, [0.0, 0.0, -0.25, -0.5, -1.0, -1.0, -1.0])
    half = overlong_penalty(lengths, max_len=10, buffer_len=4, penalty=0.5)
    np.testing.assert_allclose(half, [0.0, 0.0, -0.125, -0.25, -0.5, -0.5, -0.5])
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, max_len=10, buffer_len=0)
    with pytest.raises(ValueError, match="buffer_len"):
        overlong_penalty(lengths, max_len=10, buffer_len=11)
