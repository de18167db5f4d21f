"""The wiring of `dllm_generate`'s commit rules and caches, end to end (spec dllm.md §4, §5).

* The factor rule (`factor=`) and the threshold rule (`threshold=`) in every cache mode are
  token-exact against the plain reference sampler (tests/dllm_reference.py), NFE included.
* Where the cached samplers are exact on a bidirectional model they are asserted exact; where
  they approximate, their agreement with the uncached sampler is asserted above a floor.
* The rules' edges (c == threshold; the factor thresholds 1 - f / (n + 1) met with equality)
  reach the sampler: a model whose logits are exactly 0 gives confidences of exactly 1/64.

When is a cache exact on a bidirectional model? A cached K/V entry is stale once anything it
was computed from changes. Layer 0's K/V of a position are a function of that position's token
only (RoPE at its absolute position). The cache of block [s, e) holds positions outside the
block: the prefix (< s) is final, and the suffix (>= e) stays [MASK] until its own block
starts (commits happen only inside the current block). So with ONE layer every cached entry
equals the fresh one at every step and PrefixCache and DualCache equal the uncached sampler
(for any block size; Dream's cached window keeps its first position's own logits, but step 0
has committed that position). With two or more layers, layer >= 1 K/V of every position mix
in the whole sequence, so all cached entries go stale at the block's first commit: even one
block covering the whole generation (the cache holds only the prompt) is not exact, because
the prompt's deeper K/V were computed while the generation was all [MASK] (measured on the
two-layer models below, one block of 16: 81-91% token agreement at beta = 0.1, 48-65% at
beta = 1). Exact multi-layer cases are the trivial ones without a cached step (step 0 fills
the block). One block is still exact in one respect: PrefixCache and DualCache then compute
the same thing (no suffix; the prefix query window is the block).

Parity runs use x64 (confidences and Gumbel noise in float64, as in the reference).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dllm_reference import MASK, jit_forward, reference_generate, tiny_model

from jaxstack.generate.dllm import dllm_generate

LP, GEN, BK = 3, 16, 8
# factor 2.5 on these models: the right rule takes 12 (LLaDA) / 13 (Dream) forwards; the rule
# off by one ((n) for (n + 1)) 7 / 8, a fixed threshold of 0.9 all 16 (one token per step).
RULES = {"factor": {"factor": 2.5}, "threshold": {"threshold": 0.15}}
TEMPERATURE = {"llada": 0.0, "dream": 0.7}  # Dream samples (Gumbel-max), LLaDA is greedy


def _prompt(batch: int, seed: int) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.key(seed), (batch, LP), 0, MASK))


@functools.cache
def _reference(kind: str, rule: str):
    """(model, prompt, reference sequences, reference NFE) for one kind and rule."""
    model = tiny_model(kind, seed=2)
    prompt = _prompt(3, 5)
    ref, nfe = _run_reference(model, prompt, kind, **RULES[rule])
    return model, prompt, ref, nfe


def _run_reference(model, prompt, kind: str, **rule):
    """The reference sampler on the parity cases' settings with a decoding `rule`."""
    with jax.enable_x64(True):
        return reference_generate(
            jit_forward(model),
            prompt,
            gen_length=GEN,
            block_length=BK,
            steps=GEN,
            temperature=TEMPERATURE[kind],
            kind=kind,
            seed=3,
            **rule,
        )


@pytest.mark.parametrize(
    "rule,kind,cache",
    [
        ("factor", "llada", None),
        ("factor", "llada", "prefix"),
        ("factor", "llada", "dual"),
        ("factor", "dream", None),
        ("factor", "dream", "dual"),
        # (threshold, llada, None): test_dllm.py::test_threshold_matches_reference_and_nfe
        ("threshold", "llada", "prefix"),
        ("threshold", "dream", None),
        ("threshold", "dream", "dual"),
    ],
)
def test_parallel_rule_matches_reference(rule, kind, cache):
    """factor= / threshold= in each cache mode on a one-layer bidirectional model (where the
    caches are exact, see the module docstring) equal the uncached reference token for token,
    with the same NFE; parallel decoding really happened (NFE < gen_length)."""
    model, prompt, ref, ref_nfe = _reference(kind, rule)
    with jax.enable_x64(True):
        out = dllm_generate(
            model,
            prompt,
            gen_length=GEN,
            block_length=BK,
            cache=cache,
            temperature=TEMPERATURE[kind],
            mask_id=MASK,
            kind=kind,
            seed=3,
            **RULES[rule],
        )
    np.testing.assert_array_equal(np.asarray(out.sequences), ref)
    assert out.nfe == ref_nfe == sum(out.nfe_per_block) < GEN
    assert out.tokens_per_step == pytest.approx(GEN / ref_nfe)
    assert not (ref[:, LP:] == MASK).any()


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_factor_case_discriminates(kind):
    """The factor parity case above tells the factor rule from a fixed threshold of 0.9 (the
    reference with threshold=0.9 decodes other tokens, one per step)."""
    model, prompt, ref, ref_nfe = _reference(kind, "factor")
    fixed, fixed_nfe = _run_reference(model, prompt, kind, threshold=0.9)
    assert fixed_nfe == GEN > ref_nfe
    assert (fixed != ref).any()


@pytest.mark.parametrize("kind,cache", [("llada", "prefix"), ("dream", "dual")])
def test_topk_schedule_cached_exact_on_one_layer_model(kind, cache):
    """The k_i schedule (steps = gen_length) with a cache equals the uncached reference on a
    one-layer bidirectional model (exact, see the module docstring), every block, not only
    step 0."""
    model = tiny_model(kind, seed=7)
    prompt = _prompt(2, 8)
    kw = dict(gen_length=GEN, block_length=BK, steps=GEN, temperature=TEMPERATURE[kind], seed=4)
    with jax.enable_x64(True):
        out = dllm_generate(model, prompt, cache=cache, mask_id=MASK, kind=kind, **kw)
        ref, ref_nfe = reference_generate(jit_forward(model), prompt, kind=kind, **kw)
    np.testing.assert_array_equal(np.asarray(out.sequences), ref)
    assert out.nfe == ref_nfe == GEN


# -- multi-layer: the cache approximates --------------------------------------------------------


def _two_layer_model(seed: int, beta: float):
    """A two-layer bidirectional LLaDA whose second attention output is scaled by beta.

    With a cache, only layer 1's attention reads stale K/V (layer 0's are exact and the MLPs
    are per position), so beta scales the approximation error: beta -> 0 recovers exactness.
    At beta = 1 these random tiny models are chaotic (confidences ~0.1-0.3, near-tied argmaxes,
    one flip changes the rest of the generation): 42-77% agreement per seed, too close to what
    a broken cache gives (33-44% for a DualCache never refreshed after the first block)."""
    model = tiny_model("llada", seed=seed, num_layers=2)
    kernel = model.layers[1].self_attn.o_proj.kernel
    kernel[...] = kernel[...] * beta
    return model


AGREE_SEEDS = range(4)
AGREE_FLOOR = 0.8  # pooled over 4 seeds x 8 prompts x 16 tokens
AGREE_SEED_FLOOR = 0.65  # every seed


def test_cached_agreement_on_two_layer_model():
    """PrefixCache and DualCache vs the uncached sampler on two-layer bidirectional models
    (beta = 0.1, gen 16, block 4, one token per step, float32 confidences).

    Measured token agreement per seed 0-3: prefix 0.938 0.953 1.000 0.828 (pooled 0.930),
    dual 0.992 0.766 0.992 0.867 (pooled 0.904). Broken caches measured on the same runs:
    DualCache never refreshed after the first block 0.477 0.414 0.492 0.375 (pooled 0.439).
    Floors: pooled >= 0.8, every seed >= 0.65.
    With one block (block = gen 16) the two caches are identical to each other (exact)."""
    kw = dict(gen_length=GEN, steps=GEN, mask_id=MASK)
    agree = {"prefix": [], "dual": []}
    for seed in AGREE_SEEDS:
        model = _two_layer_model(seed, beta=0.1)
        prompt = _prompt(8, 10 + seed)
        base = np.asarray(dllm_generate(model, prompt, block_length=4, **kw).tokens)
        for cache, got in agree.items():
            out = dllm_generate(model, prompt, block_length=4, cache=cache, **kw)
            assert out.nfe == GEN
            got.append(float(np.mean(np.asarray(out.tokens) == base)))
    for cache, got in agree.items():
        print(f"{cache} cache agreement per seed {np.round(got, 3)}, pooled {np.mean(got):.3f}")
        assert np.mean(got) >= AGREE_FLOOR, (cache, got)
        assert min(got) >= AGREE_SEED_FLOOR, (cache, got)
    # one block: no suffix and the prefix query window is the block -> the caches coincide
    model, prompt = _two_layer_model(0, beta=1.0), _prompt(8, 10)
    one = {
        cache: dllm_generate(model, prompt, block_length=GEN, cache=cache, **kw)
        for cache in ("prefix", "dual")
    }
    np.testing.assert_array_equal(np.asarray(one["prefix"].tokens), np.asarray(one["dual"].tokens))


# -- the rules' edges, through the sampler ---------------------------------------------------------


def _uniform_model():
    """One-layer LLaDA with a zero LM head: every logit is exactly 0, so every confidence is
    exactly 1/64 (vocab 64) and x_hat is token 0 (the lowest id; [MASK] = 63 is excluded)."""
    model = tiny_model("llada", seed=1)
    model.lm_head.kernel[...] = jnp.zeros_like(model.lm_head.kernel[...])
    return model


@pytest.mark.parametrize(
    "rule,cache,per_block",
    [
        # c = 1/64 >= threshold = 1/64: the whole block commits at step 0
        ({"threshold": 1 / 64}, None, [1, 1]),
        # factor 189/64: rank 2 needs c >= 1 - (189/64)/3 = 1/64 (met with equality), rank 3
        # needs 0.26 (fails): 2 tokens per step, and at 2 left both pass: 8 -> 6 -> 4 -> 2 -> 0
        ({"factor": 189 / 64}, "dual", [4, 4]),
    ],
)
def test_rule_edges_through_the_sampler(rule, cache, per_block):
    """Exact edges reach the sampler: `c >= threshold` (not `>`), the factor thresholds
    1 - f / (n + 1) (not n) met with equality. Per-block NFE under the wrong variants: `>` [8, 8];
    factor off by one [3, 3]; factor with `<=` for `<` [7, 7]; a fixed threshold 0.9 [8, 8]."""
    with jax.enable_x64(True):
        out = dllm_generate(
            _uniform_model(),
            _prompt(2, 3),
            gen_length=GEN,
            block_length=BK,
            cache=cache,
            mask_id=MASK,
            **rule,
        )
    assert out.nfe_per_block == per_block
    assert (np.asarray(out.tokens) == 0).all()
