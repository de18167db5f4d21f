"""Gemma 2 in the jaxstack decoder: parity with transformers' Gemma2Model / Gemma2ForCausalLM.

Parity bound (DESIGN.md principle 2): in float32, max |out - ref| / max |ref| <= 1e-5 for the
last hidden state (`Gemma2Model.last_hidden_state` vs `LLM.hidden_states`) and the logits,
over the real tokens of a batch with an unpadded, a right-padded and a left-padded row
(positions of padding tokens are not compared: there jaxstack's padding attends to nothing,
while transformers lets it attend to the real tokens). Two tiny configs: the one of
specs/sana.md §8 (one layer, default soft-caps that do not bind) and a 3-layer one whose
sliding window (4) is shorter than the sequence (12) and whose soft-caps bind (checked by
turning each off in transformers). Saved checkpoints reload in transformers bit-identical;
greedy decoding with the KV cache past the window equals transformers' `generate`.
"""

import dataclasses
import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import AutoConfig, Gemma2Config, Gemma2ForCausalLM, Gemma2Model

import jaxstack.hf as hf
from jaxstack.generate import generate
from jaxstack.hf.llm import hf_key_for, param_path_for
from jaxstack.hf.params_io import named_params
from jaxstack.models.llm import KVCache, LLMConfig, init_llm
from jaxstack.nn.attention import dot_product_attention

REL_TOL = 1e-5  # max |out - ref| / max |ref|, float32
SPEC = dict(  # specs/sana.md §8
    head_dim=16,
    hidden_size=8,
    intermediate_size=64,
    num_attention_heads=2,
    num_hidden_layers=1,
    num_key_value_heads=2,
    vocab_size=8,
    max_position_embeddings=8192,
)
WINDOW = dict(  # sliding layers 0 and 2 with a window shorter than the sequence; caps bind
    head_dim=16,
    hidden_size=32,
    intermediate_size=64,
    num_attention_heads=4,
    num_hidden_layers=3,
    num_key_value_heads=2,
    vocab_size=128,
    sliding_window=4,
    query_pre_attn_scalar=8,
    attn_logit_softcapping=1.0,
    final_logit_softcapping=2.0,
)
CONFIGS = {"spec": SPEC, "window": WINDOW}
T = 12
MASK = np.ones((3, T), bool)
MASK[1, 8:] = False  # right padding (SANA's text encoder)
MASK[2, :3] = False  # left padding (generation)
POSITIONS = np.maximum(np.cumsum(MASK, axis=1) - 1, 0)  # jaxstack's default for input_mask


def _ids(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, vocab, (3, T))


def _torch_model(name: str) -> Gemma2ForCausalLM:
    """Tiny transformers Gemma 2 with every weight perturbed (norm weights not zero)."""
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(**CONFIGS[name], attn_implementation="eager"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def _torch_forward(model: Gemma2ForCausalLM, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits [B, T, V], last_hidden_state [B, T, D]) with the padding mask and positions."""
    kw = dict(
        attention_mask=torch.tensor(MASK.astype(np.int64)), position_ids=torch.tensor(POSITIONS)
    )
    with torch.no_grad():
        logits = model(torch.tensor(ids), **kw).logits.numpy()
        hidden = model.model(torch.tensor(ids), **kw).last_hidden_state.numpy()
    return logits, hidden


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


_logits = nnx.jit(lambda model, ids, mask: model(ids, input_mask=mask))
_hidden = nnx.jit(lambda model, ids, mask: model.hidden_states(ids, input_mask=mask))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """name -> (Gemma2ForCausalLM dir, Gemma2Model dir, torch model, ids, logits, hidden)."""
    out = {}
    for name in CONFIGS:
        model = _torch_model(name)
        causal, base = tmp_path_factory.mktemp(f"{name}_lm"), tmp_path_factory.mktemp(name)
        model.save_pretrained(causal)
        model.model.save_pretrained(base)  # the base layout: Gemma2Model, no "model." prefix
        ids = _ids(model.config.vocab_size)
        out[name] = (causal, base, model, ids, *_torch_forward(model, ids))
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gemma2_model_last_hidden_state_matches_transformers(ckpt, name):
    _, base, _, ids, _, ref = ckpt[name]
    assert json.loads((base / "config.json").read_text())["architectures"] == ["Gemma2Model"]
    model = hf.load_model(base)
    cfg = model.cfg
    assert cfg.architecture == "gemma2" and cfg.tie_word_embeddings and cfg.sandwich_norm
    assert [cfg.is_sliding(i) for i in range(cfg.num_layers)] == [
        t == "sliding_attention" for t in ckpt[name][2].config.layer_types
    ]
    for path, _ in named_params(nnx.state(model)):  # the key table maps both ways
        assert param_path_for(hf_key_for(path)[0]) == path
    out = np.asarray(_hidden(model, jnp.asarray(ids), jnp.asarray(MASK)))
    err = _rel_err(out[MASK], ref[MASK])
    print(f"{name}: last_hidden_state max rel err {err:.2e}")
    assert err <= REL_TOL


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gemma2_causal_lm_logits_match_transformers(ckpt, name):
    causal, _, _, ids, ref, _ = ckpt[name]
    model = hf.load_model(causal)
    assert model.lm_head is None  # tied
    out = np.asarray(_logits(model, jnp.asarray(ids), jnp.asarray(MASK)))
    err = _rel_err(out[MASK], ref[MASK])
    print(f"{name}: logits max rel err {err:.2e}")
    assert err <= REL_TOL


def test_window_config_exercises_window_and_caps(ckpt):
    """In the "window" config each Gemma-2 feature changes transformers' logits: turning the
    sliding window, the attention soft-cap or the final soft-cap off moves them by > 1%."""
    _, _, model, ids, ref, _ = ckpt["window"]
    attn = [layer.self_attn for layer in model.model.layers]

    def moved(undo, redo) -> float:
        undo()
        try:
            return _rel_err(_torch_forward(model, ids)[0][MASK], ref[MASK])
        finally:
            redo()

    cfg = model.config
    no_window = moved(lambda: setattr(cfg, "sliding_window", 10**6), lambda: None)
    cfg.sliding_window = WINDOW["sliding_window"]
    no_attn_cap = moved(
        lambda: [setattr(a, "attn_logit_softcapping", None) for a in attn],
        lambda: [setattr(a, "attn_logit_softcapping", 1.0) for a in attn],
    )
    no_final_cap = moved(
        lambda: setattr(cfg, "final_logit_softcapping", None),
        lambda: setattr(cfg, "final_logit_softcapping", 2.0),
    )
    assert min(no_window, no_attn_cap, no_final_cap) > 1e-2, (no_window, no_attn_cap, no_final_cap)
    assert _rel_err(_torch_forward(model, ids)[0][MASK], ref[MASK]) == 0.0  # restored


def test_save_reloads_identically_in_transformers(ckpt, tmp_path):
    causal, base, ref_model, ids, ref, _ = ckpt["window"]
    model = hf.load_model(causal)
    hf.save_model(model, tmp_path / "lm")
    back = Gemma2ForCausalLM.from_pretrained(tmp_path / "lm", dtype=torch.float32).eval()
    want, got = ref_model.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    np.testing.assert_array_equal(_torch_forward(back, ids)[0], ref)
    hf.save_model(model, tmp_path / "base", base_model=True)
    saved = json.loads((tmp_path / "base" / "config.json").read_text())
    assert saved["architectures"] == ["Gemma2Model"]
    back_base = Gemma2Model.from_pretrained(tmp_path / "base", dtype=torch.float32)
    want, got = ref_model.model.state_dict(), back_base.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert hf.config_from_hf(saved) == model.cfg == hf.load_model(base).cfg
    untied = nnx.eval_shape(
        lambda: init_llm(dataclasses.replace(model.cfg, tie_word_embeddings=False))
    )
    with pytest.raises(ValueError, match="no LM head"):
        hf.save_model(untied, tmp_path / "bad", base_model=True)


def test_greedy_generation_matches_transformers(ckpt):
    """Prompts of different lengths (left padded into one batch) decoded 8 tokens past a
    window of 4 with the KV cache equal transformers' greedy `generate`."""
    causal, _, ref_model, _, _, _ = ckpt["window"]
    prompts = [[5, 17, 99, 3, 42], [38, 15, 58, 125], [7, 7, 120, 64, 1, 33, 2]]
    out = generate(hf.load_model(causal), prompts, max_new_tokens=8, prompt_bucket=8)
    for prompt, tokens in zip(prompts, out.tokens, strict=True):
        with torch.no_grad():
            want = ref_model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones((1, len(prompt)), dtype=torch.long),
                max_new_tokens=8,
                do_sample=False,
                eos_token_id=None,
            )[0, len(prompt) :].tolist()
        assert tokens == want


def test_decode_steps_past_the_window_match_transformers_logits(ckpt):
    """Prefill 3 tokens, then 9 one-token decode steps in a 16-slot cache (window 4): the
    logits of every step equal transformers' full forward of the sequence."""
    causal, _, ref_model, ids, _, _ = ckpt["window"]
    model = hf.load_model(causal)
    ids = jnp.asarray(ids[:1])
    with torch.no_grad():
        ref = ref_model(torch.tensor(np.asarray(ids))).logits.numpy()
    step = nnx.jit(lambda m, c, x, p: m.decode_step(c, x, positions=p))
    cache = KVCache.init(model.cfg, 1, 16, dtype=jnp.float32)
    pos = jnp.arange(T)[None]
    logits, cache = step(model, cache, ids[:, :3], pos[:, :3])
    parts = [logits]
    for i in range(3, T):
        logits, cache = step(model, cache, ids[:, i : i + 1], pos[:, i : i + 1])
        parts.append(logits)
    err = _rel_err(np.asarray(jnp.concatenate(parts, axis=1)), ref)
    print(f"decode past the window: logits max rel err {err:.2e}")
    assert err <= REL_TOL


# -- configs ------------------------------------------------------------------------------------


def test_gemma_2_2b_preset_is_transformers_default_config(tmp_path):
    cfg = LLMConfig.preset("gemma-2-2b")
    assert hf.config_from_hf(Gemma2Config().to_dict()) == cfg  # Gemma2Config() is Gemma-2-2B
    assert cfg.num_params() == 2_614_341_888  # Gemma2ForCausalLM(Gemma2Config()) parameters
    for base_model in (False, True):
        (tmp_path / "config.json").write_text(
            json.dumps(hf.config_to_hf(cfg, base_model=base_model))
        )
        loaded = AutoConfig.from_pretrained(tmp_path)
        assert isinstance(loaded, Gemma2Config) and loaded.layer_types[:2] == [
            "sliding_attention",
            "full_attention",
        ]
        assert hf.config_from_hf(loaded.to_dict()) == cfg


def test_gemma2_config_options_and_errors():
    hf_cfg = Gemma2Config(**WINDOW).to_dict()
    custom = ["full_attention", "sliding_attention", "sliding_attention"]
    cfg = hf.config_from_hf({**hf_cfg, "layer_types": custom})
    assert cfg.layer_types == tuple(custom) and not cfg.is_sliding(0) and cfg.is_sliding(2)
    assert hf.config_to_hf(cfg)["layer_types"] == custom
    no_caps = hf.config_from_hf(
        {**hf_cfg, "attn_logit_softcapping": None, "final_logit_softcapping": None}
    )
    assert no_caps.attn_logit_softcapping is None and no_caps.final_logit_softcapping is None
    with pytest.raises(hf.CheckpointError, match="use_bidirectional_attention"):
        hf.config_from_hf({**hf_cfg, "use_bidirectional_attention": True})
    with pytest.raises(hf.CheckpointError, match="o_proj bias"):
        hf.config_from_hf({**hf_cfg, "attention_bias": True})
    with pytest.raises(ValueError, match="no transformers layout for llama"):
        hf.config_to_hf(LLMConfig(architecture="llama", final_logit_softcapping=30.0))
    with pytest.raises(ValueError, match="needs .*sandwich_norm"):
        hf.config_to_hf(LLMConfig(architecture="gemma2"))
    with pytest.raises(ValueError, match="layer_types needs num_layers=2"):
        LLMConfig(sliding_window=4, layer_types=("full_attention",))
    with pytest.raises(ValueError, match="sliding_window needs a causal model"):
        LLMConfig(sliding_window=4, causal=False)


def test_attention_soft_cap_and_window():
    rng = np.random.default_rng(0)
    q = jnp.asarray(3 * rng.normal(size=(2, 6, 4, 8)), jnp.float32)
    k = jnp.asarray(3 * rng.normal(size=(2, 6, 2, 8)), jnp.float32)
    v = jnp.asarray(rng.normal(size=(2, 6, 2, 8)), jnp.float32)
    band = np.tril(np.ones((6, 6), bool)) & ~np.tril(np.ones((6, 6), bool), -3)  # i - j < 3
    windowed = dot_product_attention(q, k, v, causal=True, window=3)
    masked = dot_product_attention(q, k, v, mask=jnp.asarray(band))
    np.testing.assert_allclose(windowed, masked, rtol=1e-6, atol=1e-6)
    # soft-capping: softmax(cap * tanh(q.k / sqrt(H) / cap)) by hand
    kk, vv = np.repeat(np.asarray(k), 2, axis=2), np.repeat(np.asarray(v), 2, axis=2)
    logits = np.einsum("btnh,bsnh->bnts", np.asarray(q), kk) / np.sqrt(8)
    logits = 2.0 * np.tanh(logits / 2.0)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    want = np.einsum("bnts,bsnh->btnh", probs, vv)
    got = dot_product_attention(q, k, v, soft_cap=2.0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not supported by the cuDNN path"):
        dot_product_attention(q, k, v, soft_cap=2.0, implementation="cudnn")
