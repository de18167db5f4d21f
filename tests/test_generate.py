"""Generation tests: sampling filters vs oracles, greedy KV-cache decoding vs transformers,
stop tokens, log-probs vs a full forward pass, and no recompilation for repeated shapes.

Float32 on CPU (conftest sets 'highest' matmul precision). Greedy token ids must match
transformers exactly; log-probs match a full forward pass to atol 1e-5 and transformers' own
logits to atol 1e-4.
"""

from __future__ import annotations

import functools
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jaxstack.hf as jaxstack_hf
from jaxstack.generate import (
    TRACE_COUNTS,
    filter_logits,
    filter_mask,
    generate,
    generate_tokens,
    pad_prompts,
    sample_token,
    sample_with_logprobs,
    token_logprobs,
)
from jaxstack.models.llm import LLM, LLMConfig, init_llm
from jaxstack.parallel.mesh import make_mesh, shard_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MAX_NEW = 32
PROMPT_LENGTHS = (5, 11, 17)


# -- transformers reference models ---------------------------------------------------------


def _hf_model(arch: str):
    """Tiny random transformers model with every weight perturbed by randn * 0.2.

    With transformers' init (std 0.02, unit norms) or a 0.05 perturbation, the tied Qwen2 model
    repeats one token and its top-2 logits come within 1e-5 of each other, which makes a
    greedy comparison fragile; at 0.2 the top-2 gap stays above 1e-3 for these prompts.
    """
    common = dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    if arch == "qwen2":
        cfg = transformers.Qwen2Config(**common, tie_word_embeddings=True, rms_norm_eps=1e-6)
        model = transformers.Qwen2ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common, tie_word_embeddings=False, rms_norm_eps=1e-5)
        model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return model.eval()


def _to_jaxstack(hf_model) -> LLM:
    """Load a transformers model into jaxstack through the checkpoint format (save_pretrained ->
    `jaxstack.hf.load_model`), as a user would."""
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(tmp)
        return jaxstack_hf.load_model(tmp)


def _prompts(seed: int, lengths=PROMPT_LENGTHS, vocab: int = 512) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, n).tolist() for n in lengths]


def _hf_greedy(hf, prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """transformers greedy generate with left padding: (new tokens [B, N], logits [B, N, V])."""
    ids, mask = pad_prompts(prompts, bucket=1)
    with torch.no_grad():
        out = hf.generate(
            torch.as_tensor(ids, dtype=torch.long),
            attention_mask=torch.as_tensor(mask, dtype=torch.long),
            do_sample=False,
            max_new_tokens=MAX_NEW,
            min_new_tokens=MAX_NEW,
            eos_token_id=None,
            pad_token_id=0,
            return_dict_in_generate=True,
            output_logits=True,
        )
    new = out.sequences[:, ids.shape[1] :].numpy()
    logits = torch.stack(out.logits, dim=1).numpy()
    return new, logits


@pytest.fixture(scope="module")
def qwen2():
    hf = _hf_model("qwen2")
    return hf, _to_jaxstack(hf)


@pytest.fixture(scope="module")
def qwen2_greedy(qwen2):
    """jaxstack greedy generation on the shared prompts (compiles the B=3, T=64 programs)."""
    return generate(qwen2[1], _prompts(0), max_new_tokens=MAX_NEW)


@nnx.jit
def _forward(model: LLM, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return model(ids, input_mask=mask)


def _full_forward_logprobs(
    model: LLM, prompts: list[list[int]], new: list[list[int]], temperature: float
) -> list[np.ndarray]:
    """log_softmax(logits / T) [n_i, V] of a full forward pass at each generated position."""
    seqs = [p + n for p, n in zip(prompts, new)]
    ids, mask = pad_prompts(seqs, bucket=64)  # one compiled forward for every call here
    logits = _forward(model, jnp.asarray(ids), jnp.asarray(mask))
    logp = np.asarray(jax.nn.log_softmax(logits / temperature, axis=-1))
    t = ids.shape[1]
    return [logp[i, t - len(n) - 1 : t - 1] for i, n in enumerate(new)]


# -- (1) greedy parity with transformers ----------------------------------------------------


def test_greedy_matches_transformers_qwen2(qwen2, qwen2_greedy):
    hf, _ = qwen2
    prompts = _prompts(0)
    expected, hf_logits = _hf_greedy(hf, prompts)
    assert min(len(set(row)) for row in expected.tolist()) > 10  # not a repeated token
    top2 = np.sort(hf_logits, axis=-1)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-4  # argmax is robust to fp32 rounding
    assert qwen2_greedy.tokens == expected.tolist()
    assert qwen2_greedy.num_generated == [MAX_NEW] * 3
    assert qwen2_greedy.num_steps == MAX_NEW and qwen2_greedy.prompt_length == 64
    hf_logp = jax.nn.log_softmax(jnp.asarray(hf_logits), axis=-1)
    picked = np.take_along_axis(np.asarray(hf_logp), expected[..., None], axis=-1)[..., 0]
    np.testing.assert_allclose(qwen2_greedy.logprobs, picked, atol=1e-4)


def test_greedy_matches_transformers_llama():
    hf = _hf_model("llama")
    model = _to_jaxstack(hf)
    assert model.lm_head is not None
    prompts = _prompts(1)
    expected, _ = _hf_greedy(hf, prompts)
    out = generate(model, prompts, max_new_tokens=MAX_NEW, prompt_bucket=8)
    assert out.prompt_length == 24
    assert out.tokens == expected.tolist()


# -- (2) sampling filters and frequencies ---------------------------------------------------


def _numpy_filter(logits: np.ndarray, top_k: int, top_p: float) -> np.ndarray:
    """HF TopK then TopP warpers in NumPy: bool keep mask [B, V]."""
    x = logits.astype(np.float64).copy()
    if top_k:
        kth = np.sort(x, axis=-1)[:, -min(top_k, x.shape[-1])][:, None]
        x[x < kth] = -np.inf
    keep = np.isfinite(x)
    if top_p < 1.0:
        for b in range(x.shape[0]):
            order = np.argsort(x[b])  # ascending
            p = np.exp(x[b, order] - x[b, order].max())
            cum = np.cumsum(p / p.sum())
            remove = cum <= 1 - top_p
            remove[-1] = False
            keep[b, order[remove]] = False
    return keep


_filter_mask = jax.jit(lambda x, k, p: filter_mask(x, top_k=k, top_p=p))  # traced k, p

FILTER_CASES = [(0, 0.9), (5, 1.0), (5, 0.8), (0, 0.3), (1, 1.0), (10, 0.0), (40, 0.95), (100, 0.5)]


def test_filter_logits_matches_oracles():
    rng = np.random.default_rng(0)
    for top_k, top_p in FILTER_CASES:
        logits = (rng.normal(size=(6, 40)) * 2).astype(np.float32)
        expected = _numpy_filter(logits, top_k, top_p)
        assert expected.sum(-1).min() >= 1
        got = np.asarray(_filter_mask(logits, top_k, top_p))
        np.testing.assert_array_equal(got, expected, err_msg=f"{top_k=} {top_p=}")
        if top_p == 1.0 or top_k == 0:  # static arguments skip the filter that is off
            got = np.isfinite(np.asarray(filter_logits(logits, top_k=top_k, top_p=top_p)))
            np.testing.assert_array_equal(got, expected, err_msg=f"static {top_k=} {top_p=}")
        # transformers' own warpers agree with the NumPy oracle.
        scores = torch.as_tensor(logits)
        if top_k:
            scores = transformers.TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1.0:
            scores = transformers.TopPLogitsWarper(top_p)(None, scores)
        np.testing.assert_array_equal(np.isfinite(scores.numpy()), expected)


@functools.cache
def _sampler(n: int, static_top_k: int | None):
    """Jitted n draws per row, int [n, B]; temperature and top_p are traced, and top_k too
    unless `static_top_k` is given (the lax.top_k candidate path)."""
    keys = jax.random.split(jax.random.key(1234), n)

    def draw(logits, temperature, top_k, top_p):
        top_k = top_k if static_top_k is None else static_top_k
        one = lambda k: sample_token(logits, k, temperature=temperature, top_k=top_k, top_p=top_p)
        return jax.vmap(one)(keys)

    return jax.jit(draw)


def _chi2_ok(samples: np.ndarray, probs: np.ndarray) -> None:
    """Pearson chi-square per row below df + 6 sqrt(2 df) (about six sigma)."""
    n = samples.shape[0]
    for b in range(probs.shape[0]):
        support = probs[b] > 0
        counts = np.bincount(samples[:, b], minlength=probs.shape[1])
        assert counts[~support].sum() == 0, "sampled a filtered token"
        exp = n * probs[b, support]
        chi2 = float(((counts[support] - exp) ** 2 / exp).sum())
        df = max(int(support.sum()) - 1, 1)
        assert chi2 < df + 6 * np.sqrt(2 * df), (b, chi2, df)


@pytest.mark.parametrize(
    "temperature,top_k,top_p,static",
    [(0.7, 0, 1.0, False), (1.3, 0, 0.8, False), (1.0, 4, 1.0, False), (0.9, 4, 0.7, False)]
    + [(1.0, 4, 1.0, True), (0.9, 4, 0.7, True)],
)
def test_sampling_frequencies_match_filtered_softmax(temperature, top_k, top_p, static):
    logits = (np.random.default_rng(7).normal(size=(2, 8)) * 1.5).astype(np.float32)
    scaled = logits / temperature
    keep = _numpy_filter(scaled, top_k, top_p)
    probs = np.where(keep, np.exp(scaled - scaled.max(-1, keepdims=True)), 0.0)
    probs /= probs.sum(-1, keepdims=True)
    draw = _sampler(20000, top_k if static else None)
    samples = draw(logits, np.float32(temperature), np.int32(top_k), np.float32(top_p))
    _chi2_ok(np.asarray(samples), probs)


def test_greedy_and_traced_temperature():
    logits = jnp.asarray(np.random.default_rng(3).normal(size=(4, 30)), jnp.float32)
    key = jax.random.key(0)
    argmax = np.argmax(np.asarray(logits), -1)
    np.testing.assert_array_equal(sample_token(logits, key, temperature=0.0), argmax)
    traced = jax.jit(lambda t: sample_with_logprobs(logits, key, temperature=t, top_k=5))
    tok, lp = traced(jnp.float32(0.0))
    np.testing.assert_array_equal(tok, argmax)
    ref = np.asarray(jax.nn.log_softmax(logits))[np.arange(4), argmax]
    np.testing.assert_allclose(lp, ref, atol=1e-6)
    tok, lp = traced(jnp.float32(0.5))  # log-probs under the T-scaled, unfiltered softmax
    ref = np.asarray(jax.nn.log_softmax(logits / 0.5))[np.arange(4), np.asarray(tok)]
    np.testing.assert_allclose(lp, ref, atol=1e-6)
    np.testing.assert_allclose(token_logprobs(logits, tok, temperature=0.5), ref, atol=1e-6)


# -- (3) stop tokens ------------------------------------------------------------------------


def test_stop_tokens_truncate_per_row_and_end_loop(qwen2, qwen2_greedy):
    model = qwen2[1]
    ref = qwen2_greedy.tokens
    stop = {ref[0][4], ref[1][9], ref[2][2]}
    cut = [next(j for j, t in enumerate(row) if t in stop) + 1 for row in ref]
    before = dict(TRACE_COUNTS)
    out = generate(model, _prompts(0), max_new_tokens=MAX_NEW, stop_tokens=sorted(stop))
    assert dict(TRACE_COUNTS) == before  # stop tokens are a runtime input
    assert out.tokens == [row[:n] for row, n in zip(ref, cut)]
    assert out.num_generated == cut
    assert out.num_steps == max(cut) < MAX_NEW  # the loop ended early
    for lp, ref_lp, n in zip(out.logprobs, qwen2_greedy.logprobs, cut):
        np.testing.assert_allclose(lp, ref_lp[:n], atol=1e-6)
    # The array API pads finished rows with pad_id and log-prob 0.
    ids, mask = pad_prompts(_prompts(0))
    arr = generate_tokens(model, ids, mask, max_new_tokens=MAX_NEW, stop_tokens=sorted(stop))
    tokens, logprobs = np.asarray(arr.tokens), np.asarray(arr.logprobs)
    np.testing.assert_array_equal(arr.lengths, cut)
    for i, n in enumerate(cut):
        assert (tokens[i, n:] == 0).all() and (logprobs[i, n:] == 0).all()


# -- (4) log-probs equal a full forward pass ------------------------------------------------


def test_greedy_logprobs_match_full_forward(qwen2, qwen2_greedy):
    prompts = _prompts(0)
    full = _full_forward_logprobs(qwen2[1], prompts, qwen2_greedy.tokens, 1.0)
    for row, lp, logp in zip(qwen2_greedy.tokens, qwen2_greedy.logprobs, full):
        np.testing.assert_array_equal(row, np.argmax(logp, -1))
        np.testing.assert_allclose(lp, logp[np.arange(len(row)), row], atol=1e-5, rtol=0)


def test_sampled_logprobs_match_full_forward_and_respect_filters(qwen2):
    model = qwen2[1]
    prompts = _prompts(0)
    t, k, p = 0.8, 50, 0.9
    out = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=t, top_k=k, top_p=p)
    full = _full_forward_logprobs(model, prompts, out.tokens, t)
    distinct = set()
    for row, lp, logp in zip(out.tokens, out.logprobs, full):
        np.testing.assert_allclose(lp, logp[np.arange(len(row)), row], atol=1e-5, rtol=0)
        keep = np.asarray(_filter_mask(logp, k, p))
        assert keep[np.arange(len(row)), row].all()
        distinct.update(row)
    assert len(distinct) > 10  # actually sampling
    # Same seed -> same tokens; another seed -> different tokens. New temperature / top_p /
    # stop values reuse the compiled programs (they are runtime inputs).
    before = dict(TRACE_COUNTS)
    again = generate(model, prompts, max_new_tokens=MAX_NEW, temperature=t, top_k=k, top_p=p)
    assert again.tokens == out.tokens and again.compile_seconds == 0.0
    other = generate(
        model,
        prompts,
        max_new_tokens=MAX_NEW,
        temperature=1.3,
        top_k=k,
        top_p=0.95,
        seed=5,
        stop_tokens=[3],
    )
    assert other.tokens != out.tokens
    assert dict(TRACE_COUNTS) == before


# -- (5) no recompilation; embeddings input and empty rows ----------------------------------


def test_same_shapes_do_not_recompile(qwen2, qwen2_greedy):
    before = dict(TRACE_COUNTS)
    assert before.get("prefill", 0) >= 1 and before.get("decode", 0) >= 1
    out = generate(qwen2[1], _prompts(9, lengths=(30, 2, 64)), max_new_tokens=MAX_NEW, seed=3)
    assert dict(TRACE_COUNTS) == before and out.compile_seconds == 0.0
    assert out.prompt_length == 64 and out.prefill_seconds > 0 and out.decode_seconds > 0
    assert pad_prompts(_prompts(9, lengths=(65, 3)))[0].shape == (2, 128)  # next bucket


def test_compile_cache_keys_on_jax_mesh_context(qwen2, qwen2_greedy):
    """Programs compiled under `jax.set_mesh` are cached apart from the unsharded ones: a
    tensor=2 copy of the model under the mesh compiles its own prefill and decode (the
    activation constraints act) and gives the same greedy tokens; no mesh again: no trace."""
    mesh = make_mesh("tensor=2", jax.devices()[:2])
    sharded = shard_model(nnx.clone(qwen2[1]), mesh)  # a copy: the fixture stays on device 0
    before = dict(TRACE_COUNTS)
    with jax.set_mesh(mesh):
        out = generate(sharded, _prompts(0), max_new_tokens=MAX_NEW)
    assert TRACE_COUNTS["prefill"] == before["prefill"] + 1
    assert TRACE_COUNTS["decode"] == before["decode"] + 1
    assert out.tokens == qwen2_greedy.tokens
    generate(qwen2[1], _prompts(0), max_new_tokens=MAX_NEW)
    assert TRACE_COUNTS["prefill"] == before["prefill"] + 1


def test_inputs_embeds_and_empty_rows(qwen2, qwen2_greedy):
    model = qwen2[1]
    prompts = _prompts(0)
    ids, mask = pad_prompts(prompts)
    mask[2] = False  # row 2 is batch filler
    embeds = model.embed(jnp.asarray(ids))
    before = dict(TRACE_COUNTS)
    out = generate_tokens(
        model, None, mask, inputs_embeds=embeds, max_new_tokens=MAX_NEW, pad_id=-1
    )
    # A new prefill signature and a new pad_id: one more trace of each program.
    assert TRACE_COUNTS["prefill"] == before["prefill"] + 1
    assert TRACE_COUNTS["decode"] == before["decode"] + 1
    tokens = np.asarray(out.tokens)
    np.testing.assert_array_equal(tokens[:2], qwen2_greedy.tokens[:2])
    assert (tokens[2] == -1).all() and int(out.lengths[2]) == 0
    assert (np.asarray(out.logprobs)[2] == 0).all()
    assert int(out.num_steps) == MAX_NEW


@pytest.mark.parametrize("chunk", [16, 21])  # T - 1 = 63: a remainder chunk of 15; 3 x 21
def test_chunked_prefill_matches_one_call(qwen2, qwen2_greedy, chunk):
    before = dict(TRACE_COUNTS)
    out = generate(qwen2[1], _prompts(0), max_new_tokens=MAX_NEW, prefill_chunk=chunk)
    # The chunk is a prefill setting: a new prefill program, the same decode program.
    assert TRACE_COUNTS["prefill"] == before["prefill"] + 1
    assert TRACE_COUNTS["decode"] == before["decode"]
    assert out.tokens == qwen2_greedy.tokens
    for lp, ref in zip(out.logprobs, qwen2_greedy.logprobs):
        np.testing.assert_allclose(lp, ref, atol=1e-5, rtol=0)


def test_bad_inputs_raise():
    model = nnx.eval_shape(lambda: init_llm(LLMConfig()))  # inputs are checked before any compute
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[1, 2], []], max_new_tokens=4)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[1, 512]], max_new_tokens=4)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)
    with pytest.raises(ValueError, match="top_p"):
        generate(model, [[1]], max_new_tokens=4, top_p=1.5)
    with pytest.raises(ValueError, match="prefill_chunk"):
        generate(model, [[1]], max_new_tokens=4, prefill_chunk=-1)
    ids, mask = pad_prompts([[5, 6, 7], [8]], bucket=4)
    np.testing.assert_array_equal(ids, [[0, 5, 6, 7], [0, 0, 0, 8]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 1]])


def test_prompt_plus_new_tokens_beyond_max_positions_raises():
    model = nnx.eval_shape(lambda: init_llm(LLMConfig(max_position_embeddings=16)))
    msg = r"prompt 1 \(12 tokens\) plus max_new_tokens=5 needs 17 positions, .*embeddings=16:"
    with pytest.raises(ValueError, match=msg):
        generate(model, [[1] * 10, [1] * 12], max_new_tokens=5)
