"""Jet-RL precisions for `jaxstack rl` (jaxstack/rl/jet.py): one FP8 forward shared by rollout
and training (fp8_unified) vs the BF16-train / FP8-rollout baseline (fp8_rollout), on CPU with
tiny random models.

What is bit-identical (test 1): the rollout's reported log-probs are the teacher-forced
recompute of the sampled responses under the rollout graph (`sequence_logprobs`, the function
and shapes of the training forward), jitted forward-only; the training log-probs are the same
function under the training graph, jitted separately (the job's `logp_fn`, whose output is also
the update's old log-probs). In fp8_unified both graphs are the one FP8 graph and the two
programs return `np.array_equal` log-probs. What is not:
- the sampler's own decode-step log-probs (one token at a time against the KV cache) sum the
  same FP8-dequantized products in another order than the full-sequence forward, even in
  float32: they agree to ~1e-6 (asserted <= 1e-5); the job logs the gap every step as
  `sampler_logp_abs_diff`;
- the forward inside the update's `jax.value_and_grad` program: XLA may fuse it differently
  from the forward-only program; measured equal bit for bit at 24 response tokens, off by ~1e-7
  on a few tokens at 32 or 64 (asserted <= 1e-5).
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstack.data.synth_video import synth_video_dataset
from jaxstack.generate.rollout import RolloutConfig, rollout, sequence_logprobs
from jaxstack.hf import save_nvila
from jaxstack.models import vlm
from jaxstack.models.llm import LLM, LLMConfig
from jaxstack.nn.layers import Dense
from jaxstack.quant import fp8_matmul
from jaxstack.rl import jet, trainer
from jaxstack.train.sections import NumericsSection
from jaxstack.train.video_qa import VideoDataSection
from jaxstack.train.vlm_sft import VLMSFTConfig

PROMPTS = jax.random.randint(jax.random.key(1), (3, 16), 1, 500)
PROMPT_MASK = jnp.ones((3, 16), bool).at[0, :5].set(False)  # row 0 left padded


def _policy(precision: str, n: int = 24):
    """(rollout of 3 x 4 responses of n tokens under the rollout graph, log-probs [12, n] from:
    the rollout graph's forward program, the training graph's forward program, the training
    graph's value_and_grad program; the gradients) for a tiny random LLM."""
    model = LLM(LLMConfig.preset("tiny"), rngs=nnx.Rngs(0))
    train_def, rollout_def = jet.policy_graphdefs(model, precision)
    _, params, rest = nnx.split(model, nnx.Param, ...)
    rcfg = RolloutConfig(num_samples=4, max_new_tokens=n, temperature=1.0, length_bucket=16)
    res = rollout(
        nnx.merge(rollout_def, params, rest),
        input_ids=PROMPTS,
        input_mask=PROMPT_MASK,
        cfg=rcfg,
        rng=jax.random.key(0),
    )

    def score(graphdef, p):
        return sequence_logprobs(
            nnx.merge(graphdef, p, rest),
            prompt_ids=PROMPTS,
            prompt_mask=PROMPT_MASK,
            response_tokens=res.tokens,
            response_mask=res.mask,
            prompt_index=res.prompt_index,
        )

    def objective(p):  # a policy-gradient-shaped loss whose forward is the training forward
        logp = score(train_def, p)
        return -jnp.sum(jnp.where(res.mask, logp, 0.0)), logp

    rollout_logp = jax.jit(lambda p: score(rollout_def, p))(params)
    train_logp = jax.jit(lambda p: score(train_def, p))(params)
    (_, grad_logp), grads = jax.jit(jax.value_and_grad(objective, has_aux=True))(params)
    return res, np.asarray(rollout_logp), np.asarray(train_logp), np.asarray(grad_logp), grads


def test_set_fp8_routes_decoder_layers_and_pads_partial_blocks() -> None:
    model = LLM(LLMConfig.preset("tiny"), rngs=nnx.Rngs(0))
    assert jet.set_fp8(model, True) == 2 * 7  # q k v o gate up down per layer, not the head
    denses = [m for _, m in nnx.iter_modules(model) if isinstance(m, Dense)]
    assert all(m.matmul.granularity == "block" for m in denses if m.matmul is not None)
    # 64 -> 32 (k_proj): K and N are not multiples of 128; zero padding = partial blocks
    x = jax.random.normal(jax.random.key(0), (5, 64))
    w = 0.1 * jax.random.normal(jax.random.key(1), (64, 32))
    y = fp8_matmul(x, w, granularity="block", out_dtype=jnp.float32)
    assert y.shape == (5, 32)
    assert 0 < float(jnp.linalg.norm(y - x @ w) / jnp.linalg.norm(x @ w)) < 0.06
    with jet.fp8_products(model):
        assert all(m.matmul is not None for m in denses)
    assert all(m.matmul is None for m in denses)


def test_unified_rollout_and_training_logprobs_are_bit_identical() -> None:
    res, roll, train, in_grad, grads = _policy("fp8_unified")
    m = np.asarray(res.mask)
    assert m.sum() == 3 * 4 * 24
    np.testing.assert_array_equal(roll, train)  # exact, every token
    assert np.abs(in_grad - train)[m].max() <= 1e-5
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    # The sampler's own decode-step log-probs: same FP8 products, another summation order.
    sampler = np.asarray(res.logprobs)
    assert np.abs(sampler - roll)[m].max() <= 1e-5
    # Baseline: FP8 rollout, BF16 (unquantized) training forward: not equal.
    res_b, roll_b, train_b, _, _ = _policy("fp8_rollout")
    mb = np.asarray(res_b.mask)
    assert not np.array_equal(roll_b, train_b)
    assert np.abs(roll_b - train_b)[mb].mean() > 1e-3


def test_mismatch_zero_when_unified_and_growing_with_length_for_fp8_rollout() -> None:
    """One 32-token rollout per precision (no stop token), measured over its first L tokens
    for L in 4, 8, 16, 32 (a prefix is what a rollout of L tokens samples with the same key)."""
    lengths = (4, 8, 16, 32)
    out = {}
    for precision in ("fp8_unified", "fp8_rollout"):
        res, roll, train, in_grad, _ = _policy(precision, n=32)
        print(precision, "update-program vs forward max |d|", np.abs(in_grad - train).max())
        rows = []
        for n in lengths:
            mask = np.asarray(res.mask).copy()
            mask[:, n:] = False
            rows.append({k: float(v) for k, v in jet.mismatch_metrics(roll, train, mask).items()})
        out[precision] = rows
        print(precision, rows)
    assert all(v == 0.0 for r in out["fp8_unified"] for v in r.values())
    base = out["fp8_rollout"]
    assert all(r["logp_abs_diff"] > 1e-3 and r["kl_rollout_train"] > 0 for r in base)
    seq_kl = [r["seq_kl_rollout_train"] for r in base]
    assert all(b > 1.5 * a for a, b in zip(seq_kl, seq_kl[1:])), seq_kl


@pytest.fixture(scope="module")
def start(tmp_path_factory):
    root = tmp_path_factory.mktemp("jet_rl")
    data = str(root / "data")
    synth_video_dataset(data, 8, frames=8, size=64, seed=2)
    save_nvila(vlm.init_nvila(vlm.VLMConfig.preset("tiny"), seed=0), str(root / "init"))
    return dict(root=root, data=data, init=str(root / "init"))


def _cfg(start, **kw) -> trainer.RLJobConfig:
    data = VideoDataSection(dir=start["data"], synth_num=0, num_frames=8, batch_size=4)
    base = dict(
        output_dir=str(start["root"] / "run"),
        init_from=start["init"],
        sft=VLMSFTConfig(data=data),
        rollout=trainer.RolloutSection(num_samples=2, max_new_tokens=4, temperature=1.0),
        algo=trainer.AlgoSection(kl_coef=0.0, dynamic_sampling=False),
        steps=1,
        prompts_per_step=2,
        eval=0,
    )
    return trainer.RLJobConfig(**{**base, **kw}).resolved()


@pytest.mark.slow  # end-to-end job (pytest -m slow)
def test_rl_step_runs_in_each_precision_and_logs_the_mismatch(start) -> None:
    rows = {}
    for precision in jet.PRECISIONS:
        setup = trainer.build_rl(_cfg(start, precision=precision), start["init"])
        state, row, _ = trainer.rl_step(setup, jax.tree.map(jnp.copy, setup.state), 0)
        assert np.isfinite(row["loss"]) and int(state.step) == 1
        rows[precision] = row
        print(precision, {k: row[k] for k in ("logp_abs_diff", "kl_rollout_train", "loss")})
    for precision in ("bf16", "fp8_unified"):
        assert rows[precision]["logp_abs_diff"] == 0.0
        assert rows[precision]["kl_rollout_train"] == 0.0
        assert rows[precision]["sampler_logp_abs_diff"] <= 1e-5
    assert rows["fp8_rollout"]["logp_abs_diff"] > 1e-3
    assert rows["fp8_rollout"]["kl_rollout_train"] > 0.0
    assert rows["fp8_unified"]["neg_logp"] != rows["bf16"]["neg_logp"]  # FP8 training forward


def test_bad_precision_config_is_one_line(start) -> None:
    with pytest.raises(ValueError, match=r"^precision must be one of .*'fp8'$"):
        _cfg(start, precision="fp8")
    with pytest.raises(ValueError, match="policy.precision is not read by jaxstack rl"):
        _cfg(start, policy=NumericsSection(precision="fp8"))
    assert os.path.isdir(start["init"]) and dataclasses.is_dataclass(_cfg(start))
