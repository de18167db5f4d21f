"""Diffusion LLMs: the LLaDA / Fast-dLLM sampler against a plain reference (spec dllm.md §5),
the commit rules, NFE accounting, the masked-diffusion loss, and the LLaDA / Dream loaders.

Parity runs use x64 (the reference computes confidences and Gumbel noise in float64) with a
float32 model; the loaders are compared with a float64 NumPy oracle at <= 1e-5 relative.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dllm_reference import MASK, reference_generate
from dllm_reference import jit_forward as _jit_forward
from dllm_reference import tiny_cfg as _cfg
from dllm_reference import tiny_model as _model
from flax import nnx

from jaxstack.generate.dllm import (
    dllm_generate,
    factor_transfer,
    num_transfer_schedule,
    threshold_transfer,
)
from jaxstack.hf.dllm import load_dllm
from jaxstack.hf.errors import CheckpointError
from jaxstack.hf.safetensors_io import write_safetensors
from jaxstack.models.dllm import DLLMConfig, dllm_logits, init_dllm
from jaxstack.train.losses import diffusion_loss_sums, draw_diffusion_noise, make_diffusion_loss

LP, GEN, BK = 3, 16, 8


def _prompt(batch: int = 2, seed: int = 1) -> np.ndarray:
    return np.asarray(jax.random.randint(jax.random.key(seed), (batch, LP), 0, MASK))


# -- §5.1 baseline token-exact -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind,temperature,remasking,steps",
    [
        ("llada", 0.0, "low_confidence", GEN),
        ("llada", 1.0, "random", GEN // 2),  # k_i = 2 tokens per step
        ("dream", 0.7, "low_confidence", GEN),
        # more steps than block tokens: the k_i tail is zero and the block ends early
        ("llada", 0.0, "low_confidence", 2 * GEN),
        ("dream", 0.0, "low_confidence", 2 * GEN),
    ],
)
def test_baseline_matches_reference(kind, temperature, remasking, steps):
    model = _model(kind)
    prompt = _prompt()
    with jax.enable_x64(True):
        out = dllm_generate(
            model,
            prompt,
            gen_length=GEN,
            block_length=BK,
            steps=steps,
            temperature=temperature,
            remasking=remasking,
            mask_id=MASK,
            kind=kind,
            seed=3,
        )
        ref, ref_nfe = reference_generate(
            _jit_forward(model),
            prompt,
            gen_length=GEN,
            block_length=BK,
            steps=steps,
            temperature=temperature,
            remasking=remasking,
            kind=kind,
            seed=3,
        )
    np.testing.assert_array_equal(np.asarray(out.sequences), ref)
    assert out.nfe == ref_nfe == sum(out.nfe_per_block)
    if kind == "llada":
        assert out.nfe == min(steps, GEN)  # k_i sums to the block size within min(s_b, Bk) steps
    assert not (ref[:, LP:] == MASK).all()  # the model predicts real tokens


def test_threshold_matches_reference_and_nfe():
    """Parallel decoding without cache (tau rule) and the NFE accounting (§5.6)."""
    model = _model("llada", seed=2)
    prompt = _prompt(seed=5)
    fwd = _jit_forward(model)
    with jax.enable_x64(True):
        par = dllm_generate(
            model, prompt, gen_length=GEN, block_length=BK, threshold=0.15, mask_id=MASK
        )
        ref, ref_nfe = reference_generate(
            fwd, prompt, gen_length=GEN, block_length=BK, steps=GEN, threshold=0.15
        )
    np.testing.assert_array_equal(np.asarray(par.sequences), ref)
    assert par.nfe == ref_nfe < GEN  # parallel decoding saved forwards
    assert par.nfe == sum(par.nfe_per_block) and min(par.nfe_per_block) >= 1
    assert par.tokens_per_step == pytest.approx(GEN / par.nfe)


# -- §5.2 / §5.3 caches ----------------------------------------------------------------------------


def test_prefix_and_dual_cache_exact_on_causal_model():
    model = _model("llada", causal=True, seed=4)
    prompt = _prompt(seed=6)
    outs = {
        mode: dllm_generate(
            model, prompt, gen_length=GEN, block_length=BK, threshold=0.15, cache=mode, mask_id=MASK
        )
        for mode in (None, "prefix", "dual")
    }
    base = np.asarray(outs[None].sequences)
    for mode in ("prefix", "dual"):
        np.testing.assert_array_equal(np.asarray(outs[mode].sequences), base)
        assert outs[mode].nfe_per_block == outs[None].nfe_per_block


@pytest.mark.parametrize("kind,causal", [("llada", True), ("dream", False)])
def test_prefix_bucket_padding_is_exact(kind, causal):
    """Padded prefix windows (bucket 8 or 128 with block 4, gen 16) give the unpadded result
    (bucket = block); on a causal model that is also the uncached result. Sampling at T = 1
    with one token per step makes the tokens sensitive to any leak from the padded slots."""
    model = _model(kind, causal=causal, seed=4)
    prompt = _prompt(batch=4, seed=6)
    kw = dict(gen_length=16, block_length=4, temperature=1.0, seed=6, mask_id=MASK, kind=kind)
    outs = {
        bucket: dllm_generate(model, prompt, cache="prefix", prefix_bucket=bucket, **kw)
        for bucket in (4, 8, 128)
    }
    if causal:
        outs[None] = dllm_generate(model, prompt, **kw)
    base = outs.pop(4)
    for out in outs.values():
        np.testing.assert_array_equal(np.asarray(out.sequences), np.asarray(base.sequences))
        assert out.nfe_per_block == base.nfe_per_block


def test_prefix_bucket_bounds_compiled_programs():
    """gen 32, block 4, bucket 16: the 8 blocks compile 2 block programs (windows 32 and 16),
    a second call none; exact against the uncached sampler on a causal model."""
    from jaxstack.generate.dllm import TRACE_COUNTS

    model = _model("llada", causal=True, seed=11)
    prompt = _prompt(seed=12)
    kw = dict(gen_length=32, block_length=4, threshold=0.15, mask_id=MASK)
    counts = []
    for _ in range(2):
        before = TRACE_COUNTS["block"]
        out = dllm_generate(model, prompt, cache="prefix", prefix_bucket=16, **kw)
        counts.append(TRACE_COUNTS["block"] - before)
    assert counts == [2, 0]
    base = dllm_generate(model, prompt, **kw)
    np.testing.assert_array_equal(np.asarray(out.sequences), np.asarray(base.sequences))


def test_block_first_step_is_the_full_forward_and_agreement():
    """§5.3: step 0 of every block equals the uncached forward bit for bit (dual and prefix);
    the cached samplers' agreement with the uncached one on a bidirectional model is reported."""
    model = _model("llada", seed=7)
    prompt = _prompt(seed=8)
    fwd = _jit_forward(model)
    kw = dict(gen_length=GEN, block_length=BK, steps=GEN)
    with jax.enable_x64(True):
        base, base_nfe = reference_generate(fwd, prompt, **kw)
    for mode in ("dual", "prefix"):
        out = dllm_generate(model, prompt, cache=mode, trace=True, mask_id=MASK, **kw)
        assert len(out.trace) == GEN // BK
        np.testing.assert_array_equal(
            np.asarray(out.trace[0]["x"][:, LP:]), np.full((2, GEN), MASK)
        )
        for blk, tr in enumerate(out.trace):
            s = LP + blk * BK
            full = np.asarray(fwd(tr["x"]))[:, s : s + BK]
            np.testing.assert_array_equal(np.asarray(tr["logits"]), full)
        agree = float(np.mean(np.asarray(out.tokens) == base[:, LP:]))
        print(f"{mode} cache token agreement with the uncached sampler: {agree:.3f}")
        assert out.nfe == base_nfe == GEN


# -- §5.4 / §5.5 commit rules ----------------------------------------------------------------------


def _rule(fn, param, cases):
    """Accepted positions per case; cases: (conf, masked or None), padded into one batch."""
    width = max(len(c) for c, _ in cases)
    conf = np.zeros((len(cases), width))
    masked = np.zeros((len(cases), width), bool)
    for r, (c, m) in enumerate(cases):
        conf[r, : len(c)] = c
        masked[r, : len(c)] = True if m is None else m
    with jax.enable_x64(True):
        got = np.asarray(jax.jit(fn, static_argnums=2)(jnp.asarray(conf), masked, param))
    return [set(np.flatnonzero(row).tolist()) for row in got]


def test_threshold_rule():
    cases = [
        ([0.95, 0.5, 0.92], None),
        ([0.5, 0.3, 0.6], None),  # all below tau: only the argmax
        ([0.99, 0.5, 0.92], [False, True, True]),  # unmasked positions are never committed
        ([0.2, 0.1], [False, True]),
        ([0.9, 0.1], None),  # c >= tau passes
        ([0.5, 0.5, 0.2], None),  # a tie goes to the lower position
    ]
    assert _rule(threshold_transfer, 0.9, cases) == [{0, 2}, {2}, {2}, {1}, {0}, {0}]


def test_factor_rule():
    cases = [
        ([0.99, 0.8, 0.7, 0.6], None),  # thresholds [-1, .667, .75, .8]: rank 3 fails -> 2
        ([0.7, 0.6, 0.99, 0.8], None),  # by rank, not position
        ([0.99, 0.8, 0.7], None),  # quirk: a failure at the last rank is accepted -> 3
        ([0.99, 0.9, 0.95, 0.97], None),  # no failure -> all
        ([0.3], None),  # rank 1 is forced
        ([0.3, 0.2], [False, False]),  # nothing masked -> nothing
        ([0.99, 0.5, 0.4, 0.3], [True, False, True, True]),  # rank 2 (0.4) fails, not last
    ]
    want = [{0, 1}, {2, 3}, {0, 1, 2}, {0, 1, 2, 3}, {0}, set(), {0}]
    assert _rule(factor_transfer, 1.0, cases) == want


def test_transfer_schedule():
    k = np.asarray(num_transfer_schedule(jnp.asarray([8, 5, 0]), 3))
    np.testing.assert_array_equal(k, [[3, 3, 2], [2, 2, 1], [0, 0, 0]])


def test_generate_rejects_bad_arguments():
    model = _model("llada")
    with pytest.raises(ValueError, match="multiple of block_length"):
        dllm_generate(model, _prompt(), gen_length=10, block_length=8, mask_id=MASK)
    with pytest.raises(ValueError, match="at most one"):
        dllm_generate(model, _prompt(), gen_length=8, block_length=8, threshold=0.9, factor=1.0)
    with pytest.raises(ValueError, match="cache mode"):
        dllm_generate(model, _prompt(), gen_length=8, block_length=8, cache="suffix")
    with pytest.raises(ValueError, match="prefix_bucket"):
        dllm_generate(model, _prompt(), gen_length=8, block_length=8, prefix_bucket=0)


# -- masked-diffusion loss ------------------------------------------------------------------------


def _np_ce(logits: np.ndarray, target: int) -> float:
    z = logits.astype(np.float64)
    return float(np.log(np.exp(z - z.max()).sum()) + z.max() - z[target])


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_diffusion_loss_by_hand(kind):
    model = _model(kind, seed=9)
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], np.int32)
    t = np.array([0.5, 0.0], np.float32)  # p_mask = 0.5005 and eps = 0.001
    mask_u = np.array([[0.1, 0.9, 0.3, 0.6], [0.0005, 0.5, 0.9, 0.0001]], np.float32)
    masked = [[(0, 0), (0, 2)], [(1, 0), (1, 3)]]  # mask_u < p_mask
    p = [0.5 * 0.999 + 1e-3, 1e-3]
    noisy = ids.copy()
    for pairs in masked:
        for r, c in pairs:
            noisy[r, c] = MASK
    fwd = _jit_forward(model)
    graphdef, state = nnx.split(model)
    loss_sums = jax.jit(
        lambda st, b: diffusion_loss_sums(nnx.merge(graphdef, st), b, kind=kind, mask_id=MASK)
    )
    logits = np.asarray(fwd(noisy), np.float64)
    if kind == "dream":
        logits = np.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
    batch = {"input_ids": ids, "t": t, "mask_u": mask_u}
    total, count = loss_sums(state, batch)
    want = sum(_np_ce(logits[r, c], ids[r, c]) / p[r] for pairs in masked for r, c in pairs)
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert float(count) == 8.0  # pre-training: normalised by B * L
    # SFT: position 0 of each row is prompt (never masked); answer lengths 3 and 3
    prompt_mask = np.array([[True, False, False, False]] * 2)
    noisy_sft = noisy.copy()
    noisy_sft[:, 0] = ids[:, 0]
    logits = np.asarray(fwd(noisy_sft), np.float64)
    if kind == "dream":
        logits = np.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
    total, count = loss_sums(state, {**batch, "prompt_mask": prompt_mask})
    want = _np_ce(logits[0, 2], 7) / p[0] / 3 + _np_ce(logits[1, 3], 12) / p[1] / 3
    np.testing.assert_allclose(float(total), want, rtol=1e-5)
    assert float(count) == 2.0  # SFT: normalised by the batch size
    out = dllm_logits(model, jnp.asarray(noisy_sft), kind)
    np.testing.assert_allclose(np.asarray(out, np.float64), logits, rtol=1e-5, atol=1e-5)


def test_diffusion_loss_in_train_step_accumulates_exactly():
    from jaxstack.train.step import OptimConfig, init_train_state, make_optimizer, make_train_step

    model = _model("llada", seed=10)
    ids = jax.random.randint(jax.random.key(0), (4, 8), 0, MASK)
    batch = {"input_ids": ids, **draw_diffusion_noise(jax.random.key(1), 4, 8)}
    total, count = diffusion_loss_sums(model, batch, mask_id=MASK)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    opt = make_optimizer(OptimConfig(lr=1e-3))
    state, _ = init_train_state(model, opt)
    step = make_train_step(
        graphdef, rest, opt, grad_accum=2, loss_sums=make_diffusion_loss(mask_id=MASK)
    )
    _, metrics = step(state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), float(total / count), rtol=1e-5)
    assert float(metrics["tokens"]) == 32.0 and np.isfinite(float(metrics["grad_norm"]))


# -- checkpoint loaders vs a NumPy oracle -----------------------------------------------------------


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def _rope(x, theta):  # x [B, T, N, H], rotate-half layout, positions 0..T-1
    h = x.shape[-1]
    inv = 1.0 / theta ** (np.arange(0, h, 2, dtype=np.float64) / h)
    ang = np.arange(x.shape[1])[:, None] * inv[None]
    cos = np.concatenate([np.cos(ang)] * 2, -1)[None, :, None]
    sin = np.concatenate([np.sin(ang)] * 2, -1)[None, :, None]
    rot = np.concatenate([-x[..., h // 2 :], x[..., : h // 2]], -1)
    return x * cos + rot * sin


def oracle_forward(w: dict, ids: np.ndarray, keys: dict, *, layers, heads, kv_heads, theta, eps):
    """Bidirectional pre-norm decoder in float64 NumPy from HF-layout weights (keys: names)."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    x = w[keys["embed"]][ids]
    b, t, _ = x.shape
    for i in range(layers):
        k_ = {name: tpl.format(i=i) for name, tpl in keys.items()}
        h = _rms(x, w[k_["attn_norm"]], eps)
        proj = {}
        for name, n in (("q", heads), ("k", kv_heads), ("v", kv_heads)):
            y = h @ w[k_[name]].T
            if k_[name].replace("weight", "bias") in w:
                y = y + w[k_[name].replace("weight", "bias")]
            proj[name] = y.reshape(b, t, n, -1)
        hd = proj["q"].shape[-1]
        q, k = _rope(proj["q"], theta), _rope(proj["k"], theta)
        k = np.repeat(k, heads // kv_heads, axis=2)
        v = np.repeat(proj["v"], heads // kv_heads, axis=2)
        s = np.einsum("btnh,bsnh->bnts", q, k) / np.sqrt(hd)  # no mask: bidirectional
        a = np.exp(s - s.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        o = np.einsum("bnts,bsnh->btnh", a, v).reshape(b, t, -1)
        x = x + o @ w[k_["o"]].T
        h = _rms(x, w[k_["ff_norm"]], eps)
        g = h @ w[k_["gate"]].T
        x = x + ((g / (1 + np.exp(-g))) * (h @ w[k_["up"]].T)) @ w[k_["down"]].T
    return _rms(x, w[keys["final_norm"]], eps) @ w[keys["head"]].T


LLADA_KEYS = {
    "embed": "model.transformer.wte.weight",
    "final_norm": "model.transformer.ln_f.weight",
    "head": "model.transformer.ff_out.weight",
    "attn_norm": "model.transformer.blocks.{i}.attn_norm.weight",
    "ff_norm": "model.transformer.blocks.{i}.ff_norm.weight",
    "q": "model.transformer.blocks.{i}.q_proj.weight",
    "k": "model.transformer.blocks.{i}.k_proj.weight",
    "v": "model.transformer.blocks.{i}.v_proj.weight",
    "o": "model.transformer.blocks.{i}.attn_out.weight",
    "gate": "model.transformer.blocks.{i}.ff_proj.weight",
    "up": "model.transformer.blocks.{i}.up_proj.weight",
    "down": "model.transformer.blocks.{i}.ff_out.weight",
}
DREAM_KEYS = {
    "embed": "model.embed_tokens.weight",
    "final_norm": "model.norm.weight",
    "head": "lm_head.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "ff_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "q": "model.layers.{i}.self_attn.q_proj.weight",
    "k": "model.layers.{i}.self_attn.k_proj.weight",
    "v": "model.layers.{i}.self_attn.v_proj.weight",
    "o": "model.layers.{i}.self_attn.o_proj.weight",
    "gate": "model.layers.{i}.mlp.gate_proj.weight",
    "up": "model.layers.{i}.mlp.up_proj.weight",
    "down": "model.layers.{i}.mlp.down_proj.weight",
}


def _write_checkpoint(path, kind: str):
    """A tiny random checkpoint in the released LLaDA / Dream layout. Returns (weights, dims)."""
    rng = np.random.default_rng(0 if kind == "llada" else 1)
    d, f, vocab, layers, heads, kv, hd = 32, 48, 80, 2, 4, (4 if kind == "llada" else 2), 8
    keys = LLADA_KEYS if kind == "llada" else DREAM_KEYS
    shapes = {"embed": (vocab, d), "final_norm": (d,), "head": (vocab, d)}
    per_layer = {
        "attn_norm": (d,),
        "ff_norm": (d,),
        "q": (heads * hd, d),
        "k": (kv * hd, d),
        "v": (kv * hd, d),
        "o": (d, heads * hd),
        "gate": (f, d),
        "up": (f, d),
        "down": (d, f),
    }
    w = {}
    for name, shape in shapes.items():
        w[keys[name]] = shape
    for i in range(layers):
        for name, shape in per_layer.items():
            w[keys[name].format(i=i)] = shape
            if kind == "dream" and name in "qkv":
                w[keys[name].format(i=i).replace("weight", "bias")] = (shape[0],)
    weights = {}
    for key, shape in w.items():
        scale = 1.0 if len(shape) == 1 else 1.0 / np.sqrt(shape[1])
        base = 1.0 if key.endswith("norm.weight") else 0.0
        weights[key] = (base + scale * rng.standard_normal(shape)).astype(np.float32)
    if kind == "llada":
        config = {
            "architectures": ["LLaDAModelLM"],
            "model_type": "llada",
            "d_model": d,
            "n_heads": heads,
            "n_kv_heads": kv,
            "n_layers": layers,
            "mlp_hidden_size": f,
            "mlp_ratio": 4,
            "vocab_size": vocab,
            "embedding_size": vocab,
            "rope_theta": 500000.0,
            "rms_norm_eps": 1e-5,
            "max_sequence_length": 4096,
            "weight_tying": False,
            "include_bias": False,
            "block_type": "llama",
            "activation_type": "silu",
            "layer_norm_type": "rms",
            "mask_token_id": 77,
            "eos_token_id": 78,
            "pad_token_id": 78,
        }
    else:
        config = {
            "architectures": ["DreamModel"],
            "model_type": "Dream",
            "hidden_size": d,
            "intermediate_size": f,
            "num_hidden_layers": layers,
            "num_attention_heads": heads,
            "num_key_value_heads": kv,
            "vocab_size": vocab,
            "rope_theta": 10000.0,
            "rms_norm_eps": 1e-6,
            "max_position_embeddings": 4096,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "use_sliding_window": False,
            "mask_token_id": 77,
            "pad_token_id": 78,
            "eos_token_id": 78,
        }
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    specs = [(k, v.shape, v.dtype) for k, v in weights.items()]
    write_safetensors(str(path / "model.safetensors"), specs, list(weights.values()))
    dims = dict(layers=layers, heads=heads, kv_heads=kv, theta=config["rope_theta"])
    return weights, dims, config["rms_norm_eps"]


@pytest.mark.parametrize("kind", ["llada", "dream"])
def test_loader_matches_numpy_oracle(tmp_path, kind):
    weights, dims, eps = _write_checkpoint(tmp_path / kind, kind)
    model, dcfg = load_dllm(tmp_path / kind)
    assert dcfg.kind == kind and dcfg.mask_id == 77 and dcfg.eos_id == 78
    assert not model.cfg.causal and model.cfg.attention_bias == (kind == "dream")
    ids = np.random.default_rng(2).integers(0, 80, (2, 7))
    got = np.asarray(model(jnp.asarray(ids)), np.float64)
    keys = LLADA_KEYS if kind == "llada" else DREAM_KEYS
    want = oracle_forward(weights, ids, keys, eps=eps, **dims)
    rel = np.max(np.abs(got - want)) / np.max(np.abs(want))
    assert rel <= 1e-5, rel  # float32 model vs float64 oracle
    # the bidirectional model really sees the future: changing the last token moves logit 0
    ids2 = ids.copy()
    ids2[:, -1] = (ids2[:, -1] + 1) % 80
    assert not np.allclose(np.asarray(model(jnp.asarray(ids2)))[:, 0], got[:, 0])


def test_loader_errors(tmp_path):
    weights, _, _ = _write_checkpoint(tmp_path / "ok", "llada")
    cfg = json.loads((tmp_path / "ok" / "config.json").read_text())
    bad = tmp_path / "missing"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps(cfg))
    kept = {k: v for k, v in weights.items() if "blocks.1.up_proj" not in k}
    write_safetensors(
        str(bad / "model.safetensors"),
        [(k, v.shape, v.dtype) for k, v in kept.items()],
        kept.values(),
    )
    with pytest.raises(CheckpointError, match="blocks.1.up_proj"):
        load_dllm(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": []}))
    with pytest.raises(CheckpointError, match="not a LLaDA or Dream"):
        load_dllm(bad)


def test_presets():
    llada = DLLMConfig.preset("llada-8b")
    assert llada.mask_id == 126336 and not llada.llm.causal and llada.llm.num_kv_heads == 32
    assert not llada.llm.tie_word_embeddings and not llada.llm.attention_bias
    dream = DLLMConfig.preset("dream-7b")
    assert dream.mask_id == 151666 and dream.shift_logits and not dream.llm.causal
    with pytest.raises(ValueError, match="unknown preset 'llada-1b' for DLLMConfig; known"):
        DLLMConfig.preset("llada-1b")
    tiny = DLLMConfig.preset("tiny-dream")
    model = init_dllm(tiny)
    assert not model.cfg.causal and tiny.mask_id < tiny.llm.vocab_size
    with pytest.raises(ValueError, match="bidirectional"):
        init_dllm(dataclasses.replace(tiny, llm=_cfg("dream", causal=True), mask_id=MASK))


def test_cli_generate_dllm(tmp_path):
    """`jaxstack generate --dllm` on a tiny LLaDA checkpoint with DualCache + threshold."""
    import os
    import subprocess
    import sys

    _write_checkpoint(tmp_path / "llada", "llada")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    cmd = [sys.executable, "-m", "jaxstack.cli", "generate", "--dllm", "--model",
           str(tmp_path / "llada"), "--tokenizer", "byte", "--prompt", "1+2=",
           "--max-new-tokens", "8", "--block-length", "4", "--cache", "dual",
           "--threshold", "0.9"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("1+2=")
    assert "nfe=" in proc.stderr
