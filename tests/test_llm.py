"""Decoder unit tests that need no reference framework: masks, positions, cache vs full forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstack.models.llm import KVCache, LLMConfig, init_llm, positions_from
from jaxstack.nn.attention import dot_product_attention, make_attn_mask


# The model comparisons below run compiled, as the model runs in training and generation (op by
# op, each test spent most of its time compiling single ops for its shapes).
@nnx.jit
def _forward(model, ids, segment_ids=None, input_mask=None):
    return model(ids, segment_ids=segment_ids, input_mask=input_mask)


@nnx.jit
def _decode_step(model, cache, ids, positions):
    return model.decode_step(cache, ids, positions=positions)


def test_make_attn_mask_patterns():
    causal = make_attn_mask(jnp.ones((1, 4), jnp.int32))[0, 0]
    np.testing.assert_array_equal(causal, np.tril(np.ones((4, 4), bool)))
    full = make_attn_mask(jnp.zeros((1, 4), jnp.int32))[0, 0]
    assert bool(full.all())
    prefix = make_attn_mask(jnp.array([[0, 0, 1, 1]]))[0, 0]
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(prefix, expected)
    block = make_attn_mask(jnp.array([[1, 0, 1, 0]]))[0, 0]
    expected = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 1, 1]], bool)
    np.testing.assert_array_equal(block, expected)
    seg = make_attn_mask(jnp.ones((1, 4), jnp.int32), segment_ids_bt=jnp.array([[1, 1, 2, 2]]))
    expected = np.array([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], bool)
    np.testing.assert_array_equal(seg[0, 0], expected)


def test_positions_from_segments_and_padding():
    seg = jnp.array([[1, 1, 1, 2, 2, 3]])
    np.testing.assert_array_equal(positions_from(1, 6, seg, None), [[0, 1, 2, 0, 1, 0]])
    pad = jnp.array([[False, False, True, True]])
    np.testing.assert_array_equal(positions_from(1, 4, None, pad), [[0, 0, 0, 1]])


def test_gqa_attention_matches_repeated_heads():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 5, 2, 8)), jnp.float32)
    out = dot_product_attention(q, k, v, causal=True, implementation="xla")
    ref = jax.nn.dot_product_attention(
        q, jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2), is_causal=True
    )
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "qwen3"])
def test_packed_segments_equal_separate_sequences(arch):
    cfg = LLMConfig(architecture=arch, attention_bias=arch == "qwen2", qk_norm=arch == "qwen3")
    model = init_llm(cfg, seed=1)
    rng = np.random.default_rng(0)
    a, b = rng.integers(0, cfg.vocab_size, 7), rng.integers(0, cfg.vocab_size, 5)
    packed = jnp.asarray(np.concatenate([a, b]))[None]
    seg = jnp.asarray([[1] * 7 + [2] * 5])
    out = _forward(model, packed, segment_ids=seg)
    np.testing.assert_allclose(
        out[0, :7], _forward(model, jnp.asarray(a)[None])[0], rtol=1e-5, atol=1e-5
    )
    np.testing.assert_allclose(
        out[0, 7:], _forward(model, jnp.asarray(b)[None])[0], rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("causal", [True, False])
def test_cache_prefill_and_steps_equal_full_forward(causal):
    cfg = LLMConfig(architecture="qwen3", qk_norm=True, causal=causal)
    model = init_llm(cfg, seed=2)
    ids = jnp.asarray(np.random.default_rng(1).integers(0, cfg.vocab_size, (2, 9)))
    full = _forward(model, ids)
    cache = KVCache.init(cfg, 2, 16, dtype=jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(9), (2, 9))
    if causal:
        logits, cache = _decode_step(model, cache, ids[:, :6], pos[:, :6])
        parts = [logits]
        for i in range(6, 9):
            logits, cache = _decode_step(model, cache, ids[:, i : i + 1], pos[:, i : i + 1])
            parts.append(logits)
        np.testing.assert_allclose(jnp.concatenate(parts, 1), full, rtol=1e-5, atol=1e-5)
    else:
        logits, cache = _decode_step(model, cache, ids, pos)
        np.testing.assert_allclose(logits, full, rtol=1e-5, atol=1e-5)
    assert int(cache.index) == 9


def test_decode_step_logits_index_selects_columns_and_keeps_the_cache():
    cfg = LLMConfig(architecture="qwen3", qk_norm=True, causal=False)
    model = init_llm(cfg, seed=4)
    ids = jnp.asarray(np.random.default_rng(2).integers(0, cfg.vocab_size, (2, 7)))
    pos = jnp.broadcast_to(jnp.arange(7), (2, 7))
    cache = KVCache.init(cfg, 2, 8, dtype=jnp.float32)
    idx = jnp.asarray([3, 0, 3, 6])
    step = nnx.jit(lambda m, c, i: m.decode_step(c, ids, positions=pos, logits_index=i))
    logits, new_cache = _decode_step(model, cache, ids, pos)
    picked, picked_cache = step(model, cache, idx)
    assert picked.shape == (2, 4, cfg.vocab_size)
    np.testing.assert_allclose(picked, logits[:, np.asarray(idx)], rtol=1e-6, atol=1e-6)
    for a, b in zip(new_cache.k + new_cache.v, picked_cache.k + picked_cache.v, strict=True):
        np.testing.assert_array_equal(a, b)


def test_left_padding_matches_unpadded():
    cfg = LLMConfig()
    model = init_llm(cfg, seed=3)
    ids = np.random.default_rng(2).integers(0, cfg.vocab_size, 6)
    padded = jnp.asarray(np.concatenate([[0, 0, 0], ids]))[None]
    mask = jnp.asarray([[False] * 3 + [True] * 6])
    out = _forward(model, padded, input_mask=mask)[0, 3:]
    np.testing.assert_allclose(
        out, _forward(model, jnp.asarray(ids)[None])[0], rtol=1e-5, atol=1e-5
    )


def test_presets_param_counts():
    assert abs(LLMConfig.preset("qwen2.5-1.5b").num_params() / 1e9 - 1.54) < 0.02
    assert abs(LLMConfig.preset("qwen2.5-7b").num_params() / 1e9 - 7.62) < 0.03
    assert abs(LLMConfig.preset("llama3-8b").num_params() / 1e9 - 8.03) < 0.03
    assert abs(LLMConfig.preset("qwen3-8b").num_params() / 1e9 - 8.19) < 0.03
    with pytest.raises(ValueError, match="unknown preset"):
        LLMConfig.preset("gpt-17")
