"""Rollout engine tests (GRPO groups): shared-prefix sampling vs per-sample prefill, rollout
log-probs vs the training-side `sequence_logprobs` forward, stop tokens, no recompiles, greedy
groups, gradients through `sequence_logprobs`, chunked prefill vs one call, and unpadded prompts
without masks (the causal fast path).

Tiny random model, float32 on CPU (conftest sets 'highest' matmul precision).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstack.generate import TRACE_COUNTS, generate_tokens
from jaxstack.generate.rollout import (
    RolloutConfig,
    pad_embeds,
    pad_ids,
    rollout,
    sequence_logprobs,
)
from jaxstack.models.llm import LLMConfig, init_llm

B, G, N = 3, 4, 12
BUCKET = 16
LENGTHS = (3, 9, 14)


def _prompts(seed: int, lengths=LENGTHS) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, 512, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def model():
    m = init_llm(LLMConfig.preset("tiny"), seed=0)
    # Sharpen the random model a little so sampled tokens depend visibly on the context.
    graphdef, state = nnx.split(m)

    @jax.jit
    def perturb(state):
        keys = iter(jax.random.split(jax.random.key(1), len(jax.tree.leaves(state))))
        return jax.tree.map(lambda x: x + 0.1 * jax.random.normal(next(keys), x.shape), state)

    return nnx.merge(graphdef, perturb(state))


@nnx.jit
def _seq_logprobs_ids(model, ids, mask, tokens, rmask, index, temperature):
    return sequence_logprobs(
        model,
        prompt_ids=ids,
        prompt_mask=mask,
        response_tokens=tokens,
        response_mask=rmask,
        prompt_index=index,
        temperature=temperature,
    )


@nnx.jit
def _seq_logprobs_embeds(model, embeds, mask, tokens, rmask, index, temperature):
    return sequence_logprobs(
        model,
        prompt_embeds=embeds,
        prompt_mask=mask,
        response_tokens=tokens,
        response_mask=rmask,
        prompt_index=index,
        temperature=temperature,
    )


def _cfg(**kw) -> RolloutConfig:
    """Top-k and top-p on everywhere (one static setting: fewer compiled decode programs)."""
    base = dict(num_samples=G, max_new_tokens=N, length_bucket=BUCKET, top_k=40, top_p=0.95)
    return RolloutConfig(**{**base, **kw})


# -- (1) rollout log-probs == training-side forward -------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("as_embeds", [False, True])
def test_rollout_logprobs_match_sequence_logprobs(model, temperature, as_embeds):
    ids, mask = pad_ids(_prompts(0), bucket=BUCKET)
    assert ids.shape == (B, BUCKET)
    cfg = _cfg(temperature=temperature)
    if as_embeds:
        embeds, emask = pad_embeds(
            [model.embed(jnp.asarray(p)) for p in _prompts(0)], bucket=BUCKET
        )
        np.testing.assert_array_equal(emask, mask)
        np.testing.assert_array_equal(embeds[mask], model.embed(jnp.asarray(ids))[mask])
        out = rollout(model, inputs_embeds=embeds, input_mask=mask, cfg=cfg, rng=3)
        ref = _seq_logprobs_embeds(
            model, embeds, mask, out.tokens, out.mask, out.prompt_index, temperature
        )
    else:
        out = rollout(model, input_ids=ids, input_mask=mask, cfg=cfg, rng=3)
        ref = _seq_logprobs_ids(
            model, ids, mask, out.tokens, out.mask, out.prompt_index, temperature
        )
    assert out.tokens.shape == out.logprobs.shape == out.mask.shape == (B * G, N)
    np.testing.assert_array_equal(out.prompt_index, np.repeat(np.arange(B), G))
    np.testing.assert_array_equal(out.sample_index, np.tile(np.arange(G), B))
    valid = np.asarray(out.mask)
    assert valid.all()  # no stop tokens: every row ran N steps
    assert len(np.unique(np.asarray(out.tokens))) > 30  # actually sampling
    diff = np.abs(np.asarray(out.logprobs) - np.asarray(ref))[valid]
    assert diff.max() <= 1e-5, diff.max()


def test_sequence_logprobs_is_differentiable(model):
    ids, mask = pad_ids(_prompts(0), bucket=BUCKET)
    out = rollout(model, input_ids=ids, input_mask=mask, cfg=_cfg(), rng=0)
    rmask = np.asarray(out.mask).copy()
    rmask[1, 5:] = False  # a short response: masked positions get no gradient signal

    @nnx.jit
    def loss_and_grad(m):
        def loss(m):
            lp = sequence_logprobs(
                m,
                prompt_ids=ids,
                prompt_mask=mask,
                response_tokens=out.tokens,
                response_mask=rmask,
                prompt_index=out.prompt_index,
            )
            return -jnp.sum(lp) / jnp.sum(rmask), lp

        return nnx.value_and_grad(loss, has_aux=True)(m)

    (value, lp), grads = loss_and_grad(model)
    assert np.isfinite(float(value))
    assert (np.asarray(lp)[~rmask] == 0).all()
    leaves = jax.tree.leaves(grads)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    assert sum(float(jnp.sum(jnp.abs(x))) for x in leaves) > 0


# -- (2) shared prefix == per-sample prefill --------------------------------------------------


def test_shared_prefix_equals_repeated_prompts(model):
    ids, mask = pad_ids(_prompts(1), bucket=BUCKET)
    cfg = _cfg(temperature=0.9, top_p=0.9)
    key = jax.random.key(7)
    out = rollout(model, input_ids=ids, input_mask=mask, cfg=cfg, rng=key)
    ref = generate_tokens(
        model,
        np.repeat(ids, G, axis=0),
        np.repeat(mask, G, axis=0),
        max_new_tokens=N,
        rng=key,
        temperature=0.9,
        top_k=40,
        top_p=0.9,
    )
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens, ref.tokens)
    np.testing.assert_allclose(out.logprobs, ref.logprobs, atol=1e-5, rtol=0)
    # The G samples of a prompt differ (one key per step draws independently per row).
    for b in range(B):
        assert len({tuple(r) for r in tokens[b * G : (b + 1) * G]}) == G


# -- (3) stop tokens ----------------------------------------------------------------------------


def test_stop_tokens_end_rows(model):
    ids, mask = pad_ids(_prompts(2), bucket=BUCKET)
    ids[2], mask[2] = 0, False  # prompt 2 is batch filler: its G rows generate nothing
    key = jax.random.key(11)
    free = rollout(model, input_ids=ids, input_mask=mask, cfg=_cfg(), rng=key)
    ref = np.asarray(free.tokens)
    stop = sorted({int(ref[0, 2]), int(ref[5, 6])})
    out = rollout(
        model,
        input_ids=ids,
        input_mask=mask,
        cfg=_cfg(stop_token_ids=tuple(stop), pad_id=-1),
        rng=key,
    )
    tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
    lengths, rmask = np.asarray(out.lengths), np.asarray(out.mask)
    for r in range(B * G):
        if r // G == 2:
            assert lengths[r] == 0 and not rmask[r].any() and (tokens[r] == -1).all()
            continue
        hits = [j for j in range(N) if ref[r, j] in stop]
        n = hits[0] + 1 if hits else N
        assert lengths[r] == n
        np.testing.assert_array_equal(rmask[r], np.arange(N) < n)
        np.testing.assert_array_equal(tokens[r, :n], ref[r, :n])  # same draws up to the stop
        assert (tokens[r, n:] == -1).all() and (logprobs[r, n:] == 0).all()
        np.testing.assert_allclose(logprobs[r, :n], np.asarray(free.logprobs)[r, :n], atol=1e-6)
    assert lengths[0] == 3 and lengths[5] <= 7
    assert int(out.num_steps) == lengths.max()
    np.testing.assert_array_equal(rmask.sum(-1), lengths)


# -- (4) no recompilation ------------------------------------------------------------------------


def test_same_shapes_do_not_recompile(model):
    cfg = _cfg()
    ids, mask = pad_ids(_prompts(3), bucket=BUCKET)
    first = rollout(model, input_ids=ids, input_mask=mask, cfg=cfg, rng=0)
    before = dict(TRACE_COUNTS)
    assert before.get("prefill", 0) >= 1 and before.get("decode", 0) >= 1
    ids2, mask2 = pad_ids(_prompts(4, lengths=(16, 1, 7)), bucket=BUCKET)
    # New prompts (same bucketed shape), key, temperature and stop tokens: runtime inputs.
    cfg2 = dataclasses.replace(cfg, temperature=0.6, stop_token_ids=(5,))
    second = rollout(model, input_ids=ids2, input_mask=mask2, cfg=cfg2, rng=jax.random.key(5))
    assert dict(TRACE_COUNTS) == before
    assert not np.array_equal(first.tokens, second.tokens)
    # A prompt length that is not a bucket multiple is left padded to one: still no recompile.
    third = rollout(model, input_ids=ids2[:, 4:], input_mask=mask2[:, 4:], cfg=cfg, rng=1)
    assert dict(TRACE_COUNTS) == before
    assert third.tokens.shape == (B * G, N)


# -- (5) greedy groups ----------------------------------------------------------------------------


def test_greedy_samples_identical_within_group(model):
    ids, mask = pad_ids(_prompts(5), bucket=BUCKET)
    out = rollout(model, input_ids=ids, input_mask=mask, cfg=_cfg(temperature=0.0), rng=0)
    tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
    single = generate_tokens(model, ids, mask, max_new_tokens=N)
    for b in range(B):
        group = slice(b * G, (b + 1) * G)
        assert (tokens[group] == tokens[b * G]).all()
        np.testing.assert_array_equal(logprobs[group], np.broadcast_to(logprobs[b * G], (G, N)))
        np.testing.assert_array_equal(tokens[b * G], np.asarray(single.tokens)[b])
    assert len({tuple(tokens[b * G]) for b in range(B)}) == B


# -- (6) chunked prefill == one-call prefill --------------------------------------------------


@pytest.mark.parametrize(
    "chunk, as_embeds",
    [(5, False), (4, False), (7, True), (1, True)],  # T - 1 = 15: 3 x 5; 3 + 3 x 4; 1 + 2 x 7
)
def test_chunked_prefill_matches_one_call(model, chunk, as_embeds):
    ids, mask = pad_ids(_prompts(6), bucket=BUCKET)  # left padded, lengths 3, 9, 14
    prompt = dict(inputs_embeds=model.embed(jnp.asarray(ids))) if as_embeds else dict(input_ids=ids)
    key = jax.random.key(9)
    ref = rollout(model, **prompt, input_mask=mask, cfg=_cfg(), rng=key)
    before = dict(TRACE_COUNTS)
    out = rollout(model, **prompt, input_mask=mask, cfg=_cfg(prefill_chunk=chunk), rng=key)
    # The chunk is in the prefill's compile key only: the decode program is reused.
    assert TRACE_COUNTS["prefill"] == before["prefill"] + 1
    assert TRACE_COUNTS["decode"] == before["decode"]
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.lengths, ref.lengths)
    diff = np.abs(np.asarray(out.logprobs) - np.asarray(ref.logprobs))
    assert diff.max() <= 1e-5, diff.max()
    assert len(np.unique(np.asarray(out.tokens))) > 30  # actually sampling


# -- (7) prompts without left padding: no masks, causal fast path -----------------------------


@nnx.jit
def _seq_loss_and_grad(model, ids, mask, tokens, rmask, index):
    def loss(m):
        lp = sequence_logprobs(
            m,
            prompt_ids=ids,
            prompt_mask=mask,
            response_tokens=tokens,
            response_mask=rmask,
            prompt_index=index,
        )
        return -jnp.sum(lp) / jnp.sum(rmask), lp

    return nnx.value_and_grad(loss, has_aux=True)(model)


def test_unpadded_prompts_without_masks(model):
    # Full-length prompts of 13 tokens (rollout left pads them to the 16 bucket internally).
    ids = np.asarray(_prompts(7, lengths=(13, 13, 13)), np.int32)
    full = np.ones(ids.shape, bool)
    out = rollout(model, input_ids=ids, cfg=_cfg(), rng=4)
    ref = rollout(model, input_ids=ids, input_mask=full, cfg=_cfg(), rng=4)
    np.testing.assert_array_equal(out.tokens, ref.tokens)
    np.testing.assert_array_equal(out.logprobs, ref.logprobs)
    embeds = model.embed(jnp.asarray(ids))
    via_embeds = rollout(model, inputs_embeds=embeds, cfg=_cfg(), rng=4)
    np.testing.assert_array_equal(via_embeds.tokens, out.tokens)

    rmask = np.asarray(out.mask).copy()
    rmask[1, 5:] = False  # short responses: unmasked right padding follows the scored tokens
    rmask[6, 9:] = False
    tokens = np.where(rmask, np.asarray(out.tokens), -1)
    args = (tokens, rmask, out.prompt_index, 1.0)
    masked = _seq_logprobs_ids(model, ids, full, *args)
    fast = _seq_logprobs_ids(model, ids, None, *args)
    fast_embeds = _seq_logprobs_embeds(model, embeds, None, *args)
    assert (np.asarray(fast)[~rmask] == 0).all()
    for lp in (masked, fast_embeds, out.logprobs):
        diff = np.abs(np.asarray(fast) - np.asarray(lp))[rmask]
        assert diff.max() <= 1e-5, diff.max()

    # Gradients flow through the unmasked path and equal the masked path's.
    (value, lp), grads = _seq_loss_and_grad(model, ids, None, tokens, rmask, out.prompt_index)
    (value_ref, _), grads_ref = _seq_loss_and_grad(
        model, ids, full, tokens, rmask, out.prompt_index
    )
    assert np.isfinite(float(value)) and abs(float(value) - float(value_ref)) <= 1e-5
    leaves, leaves_ref = jax.tree.leaves(grads), jax.tree.leaves(grads_ref)
    assert sum(float(jnp.sum(jnp.abs(x))) for x in leaves) > 0
    for x, y in zip(leaves, leaves_ref):
        np.testing.assert_allclose(x, y, atol=1e-5, rtol=1e-4)


def test_bad_inputs_raise(model):
    ids, mask = pad_ids(_prompts(0), bucket=BUCKET)
    with pytest.raises(ValueError, match="exactly one"):
        rollout(model, input_mask=mask, cfg=_cfg(), rng=0)
    with pytest.raises(ValueError, match="num_samples"):
        rollout(model, input_ids=ids, input_mask=mask, cfg=_cfg(num_samples=0), rng=0)
    with pytest.raises(ValueError, match="prefill_chunk"):
        rollout(model, input_ids=ids, input_mask=mask, cfg=_cfg(prefill_chunk=-1), rng=0)
    with pytest.raises(ValueError, match="empty"):
        pad_embeds([jnp.zeros((2, 64)), jnp.zeros((0, 64))])
