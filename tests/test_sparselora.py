"""SparseLoRA (jaxstack/lora/sparse.py, jaxstack/lora/svd_estimator.py) on tiny random decoders.

CPU, float32, tiny Llama-shaped (GQA 4/2 heads, no biases) and Qwen2-shaped (q/k/v biases)
configs. Checks: the SVD factors are the best rank-r approximation; with every channel kept
the sparse step equals the dense LoRA step (outputs and LoRA gradients); with a subset it
equals the masked dense computation; the estimator's recall@k of the oracle channels beats
random (printed per layer); only context tokens are sparse; the step schedule; the LM job.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstack.config import load_config
from jaxstack.data.tokenizer import load_tokenizer
from jaxstack.lora import LORA_PARAMS, LoRAConfig, apply_lora, lora_layers
from jaxstack.lora.sparse import (
    ACTIVATIONS,
    PRESETS,
    SparseLoRAConfig,
    SparseMLP,
    SparsityConfig,
    apply_sparselora,
    attention_channels,
    context_tokens,
    head_aligned,
    mlp_channels,
    set_sparse_tokens,
    sparse_blocks,
    step_active,
)
from jaxstack.lora.svd_estimator import (
    build_estimator,
    decoder_blocks,
    estimator_key,
    load_estimator,
    save_estimator,
    svd_factors,
)
from jaxstack.models.llm import LLM, LLMConfig
from jaxstack.nn.layers import rope_inv_freq
from jaxstack.train import TrainJobConfig, run_train
from jaxstack.train.trainer import build_data

ARCHS = {
    "llama": dict(architecture="llama", tie_word_embeddings=False),
    "qwen2": dict(architecture="qwen2", attention_bias=True),
}
SIZES = dict(
    vocab_size=96,
    hidden_size=64,
    intermediate_size=128,
    num_layers=3,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)
B, T = 4, 16
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "train_tiny.yaml")


def _model(arch: str, *, lora: bool = True, spectrum: float | None = None) -> LLM:
    """A tiny random decoder with every weight perturbed (biases included, so no projection is
    trivially zero). spectrum p: each projection kernel gets singular values decaying as
    i^-p (same Frobenius norm), like trained projections; None keeps Gaussian kernels, whose
    spectrum is flat."""
    model = LLM(LLMConfig(**SIZES, **ARCHS[arch]), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    leaves, tree = jax.tree.flatten(state)
    rng = np.random.default_rng(1)
    leaves = [np.asarray(x) + 0.05 * rng.standard_normal(x.shape, np.float32) for x in leaves]
    model = nnx.merge(graphdef, jax.tree.unflatten(tree, [jnp.asarray(x) for x in leaves]))
    if spectrum is not None:
        for _, _, blk in decoder_blocks(model):
            for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj"):
                if hasattr(blk, name):
                    kernel = getattr(blk, name).kernel
                    u, sv, vh = np.linalg.svd(np.asarray(kernel.get_value(), np.float64), False)
                    decayed = np.arange(1, len(sv) + 1) ** -spectrum
                    decayed *= np.linalg.norm(sv) / np.linalg.norm(decayed)
                    kernel.set_value(jnp.asarray((u * decayed) @ vh, jnp.float32))
    if lora:
        targets = ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj")
        apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=targets), rngs=2)
        key = jax.random.key(3)
        for i, (_, layer) in enumerate(lora_layers(model)):  # non-zero B: the branch matters
            b = layer.lora_b.get_value()
            layer.lora_b.set_value(0.2 * jax.random.normal(jax.random.fold_in(key, i), b.shape))
    return model


def _everywhere(s: float, n: int = SIZES["num_layers"]) -> SparsityConfig:
    return SparsityConfig.from_ranges(mlp=(s, 0, n - 1), attn=(s, 0, n - 1))


IDS = jnp.asarray(np.random.default_rng(0).integers(0, SIZES["vocab_size"], (B, T)))
WEIGHTS = jnp.asarray(np.random.default_rng(1).normal(size=(B, T, SIZES["vocab_size"])))


def _loss_and_grads(model: LLM, tokens: int, impl: str = "gather"):
    """(logits, LoRA grads) of sum(logits * WEIGHTS) with the first `tokens` positions sparse."""
    graphdef, lora, rest = nnx.split(model, LORA_PARAMS, ...)

    @jax.jit
    def run(lora, rest):
        def loss(lora):
            m = nnx.merge(graphdef, lora, rest)
            set_sparse_tokens(m, tokens, impl)
            logits = m(IDS)
            return jnp.sum(logits * WEIGHTS), logits

        (_, logits), grads = jax.value_and_grad(loss, has_aux=True)(lora)
        return logits, grads

    logits, grads = run(lora, rest)
    return np.asarray(logits), [np.asarray(g) for g in jax.tree.leaves(grads)]


# -- (1) the estimator -------------------------------------------------------------------------


def test_svd_factors_are_the_best_rank_r_approximation(tmp_path):
    w = np.random.default_rng(0).normal(size=(48, 40)).astype(np.float32)
    s = np.linalg.svd(w.astype(np.float64), compute_uv=False)
    for r in (1, 8, 40):
        a, b = svd_factors(w, r)
        assert a.shape == (48, r) and b.shape == (r, 40) and a.dtype == np.float32
        err = np.linalg.norm(w.astype(np.float64) - a.astype(np.float64) @ b)
        want = np.sqrt(np.sum(s[r:] ** 2))
        assert abs(err - want) <= 1e-5 * np.linalg.norm(w), (r, err, want)
        # A = U_r sqrt(S_r), B = sqrt(S_r) V_r^H: A^T A = B B^T = diag(S_r).
        np.testing.assert_allclose(a.T @ a, np.diag(s[:r]), atol=1e-4)
        np.testing.assert_allclose(b @ b.T, np.diag(s[:r]), atol=1e-4)
    model = _model("qwen2")
    est = build_estimator(model, rank=8, layers=[(1, "mlp"), (2, "attn")])
    assert sorted(est) == [
        "layers.1.mlp.gate_proj",
        "layers.1.mlp.up_proj",
        "layers.2.self_attn.k_proj",
        "layers.2.self_attn.q_proj",
        "layers.2.self_attn.v_proj",
    ]
    q = model.layers[2].self_attn.q_proj.base.kernel.get_value()  # q_proj has LoRA: its base
    np.testing.assert_array_equal(est["layers.2.self_attn.q_proj"][0], svd_factors(q, 8)[0])
    back = load_estimator(save_estimator(est, str(tmp_path / "adapter")))
    assert sorted(back) == sorted(est)
    for key, (a, b) in est.items():
        np.testing.assert_array_equal(back[key][0], a)
        np.testing.assert_array_equal(back[key][1], b)


# -- (2) every channel kept == the dense LoRA step; (3) a subset == the masked dense step --------


@pytest.mark.parametrize("arch", ["qwen2"])  # GQA and q/k/v biases; Llama runs in the job test
def test_all_channels_equal_dense_and_subset_equals_masked_dense(arch):
    dense = _model(arch)
    ref_logits, ref_grads = _loss_and_grads(dense, 0)
    full = _model(arch)
    apply_sparselora(full, SparseLoRAConfig(_everywhere(0.0)))
    assert len(sparse_blocks(full)) == 2 * SIZES["num_layers"]
    for tokens in (10,):  # a sparse context prefix, then dense positions
        logits, grads = _loss_and_grads(full, tokens)
        np.testing.assert_array_equal(logits, ref_logits)
        assert len(grads) == len(ref_grads) == 30  # 5 targets x 3 layers x (A, B)
        for g, r in zip(grads, ref_grads):
            np.testing.assert_array_equal(g, r)

    sub = _model(arch)
    apply_sparselora(sub, SparseLoRAConfig(_everywhere(0.5)))
    logits, grads = _loss_and_grads(sub, 8, "gather")
    mask_logits, mask_grads = _loss_and_grads(sub, 8, "mask")
    scale = np.max(np.abs(mask_logits))
    assert np.max(np.abs(logits - mask_logits)) <= 1e-5 * scale
    for g, r in zip(grads, mask_grads):
        assert np.max(np.abs(g - r)) <= 1e-5 * np.max(np.abs(r))
    # The subset changes the result (the check above is not between equal dense runs).
    assert np.max(np.abs(logits - ref_logits)) > 1e-2 * scale


# -- (4) estimator recall@k --------------------------------------------------------------------


def _block_inputs(model: LLM, ids) -> list[tuple[jax.Array, jax.Array]]:
    """(attention input, MLP input) [B, T, D] of every layer of a dense pre-norm model."""
    x = model.embed(ids)
    pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    inv = rope_inv_freq(model.cfg.head_dim, model.cfg.rope_theta, model.cfg.rope_scaling)
    out = []
    for layer in model.layers:
        xa = layer.input_layernorm(x)
        x = x + layer.self_attn(xa, pos, inv, mask=None, causal=True)[0]
        xm = layer.post_attention_layernorm(x)
        x = x + layer.mlp(xm)
        out.append((xa, xm))
    return out


def _recall(got, want) -> float:
    return len(set(np.asarray(got).tolist()) & set(np.asarray(want).tolist())) / len(want)


def _oracle_topk(score, k):
    return np.argsort(-np.asarray(score), kind="stable")[:k]


def _measure_recall(arch, rank, s_mlp, s_attn, ctx, spectrum):
    model = _model(arch, lora=False, spectrum=spectrum)
    cfg = model.cfg
    ids = jnp.asarray(np.random.default_rng(5).integers(0, cfg.vocab_size, (8, 32)))
    est = build_estimator(model, rank)
    rows = []
    for i, (xa, xm) in enumerate(_block_inputs(model, ids)):
        mlp, attn = model.layers[i].mlp, model.layers[i].self_attn
        # MLP: oracle = top-k of the true intermediate activation norms over the context.
        f = cfg.intermediate_size
        k = int(f * (1 - s_mlp))
        a = ACTIVATIONS[cfg.hidden_act](mlp.gate_proj(xm[:, :ctx])) * mlp.up_proj(xm[:, :ctx])
        oracle = _oracle_topk(jnp.sqrt(jnp.sum(a**2, axis=(0, 1))), k)
        key = lambda p, kind="mlp", i=i: estimator_key(i, kind, p)
        got = mlp_channels(xm[:, :ctx], est[key("gate_proj")], est[key("up_proj")], k)
        row = {"layer": i, "mlp": _recall(got, oracle)}
        # Attention: oracle = the same head-aligned rule on the true q, k, v column norms.
        kv = cfg.num_kv_heads * cfg.head_dim
        k = int(kv * (1 - s_attn))
        g = cfg.num_heads // cfg.num_kv_heads
        norm = lambda y: jnp.sqrt(jnp.sum(y.reshape(-1, y.shape[-1]) ** 2, axis=0))
        n_q = norm(attn.q_proj(xa)).reshape(cfg.num_kv_heads, g, cfg.head_dim).mean(1).reshape(-1)
        oracle_qk = _oracle_topk(n_q * norm(attn.k_proj(xa)), k)
        oracle_v = _oracle_topk(norm(attn.v_proj(xa)), k)
        bias = lambda p, attn=attn: (
            None if getattr(attn, p).bias is None else getattr(attn, p).bias[...]
        )
        factors = {p: (*est[key(p, "attn")], bias(p)) for p in ("q_proj", "k_proj", "v_proj")}
        _, k_idx, v_idx, _ = attention_channels(
            xa,
            factors,
            num_heads=cfg.num_heads,
            num_kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            k=k,
        )
        row["qk"], row["v"] = _recall(k_idx, oracle_qk), _recall(v_idx, oracle_v)
        rows.append(row)
    return rows


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_estimator_recall_beats_random(arch):
    """Recall@k of the rank-8 estimate vs the oracle top-k (true activation norms), per layer:
    MLP sparsity 0.75 over 24 context tokens, attention sparsity 0.5, batch 8 x 32 tokens.
    Kernels get a 1/i singular-value decay (as trained projections have); on flat Gaussian
    kernels rank 8 of 64 holds little of W and recall is only a little above random."""
    s_mlp, s_attn, ctx = 0.75, 0.5, 24
    rows = _measure_recall(arch, 8, s_mlp, s_attn, ctx, spectrum=1.0)
    for r in rows:
        print(
            f"{arch} layer {r['layer']}: recall@k mlp {r['mlp']:.2f} (random {1 - s_mlp:.2f}), "
            f"qk {r['qk']:.2f}, v {r['v']:.2f} (random {1 - s_attn:.2f})"
        )
    for r in rows:
        assert r["mlp"] >= (1 - s_mlp) + 0.25, r
        assert r["qk"] >= (1 - s_attn) + 0.25, r
        assert r["v"] >= (1 - s_attn) + 0.25, r
    # Full rank: the estimate is exact, so attention recall is 1 (the MLP still averages x).
    for r in _measure_recall(arch, SIZES["hidden_size"], s_mlp, s_attn, ctx, spectrum=1.0):
        assert r["qk"] == 1.0 and r["v"] == 1.0, r


# -- (5) only context tokens are sparse ----------------------------------------------------------


def test_only_context_tokens_are_sparse():
    model = _model("llama")
    x = jax.random.normal(jax.random.key(7), (B, T, SIZES["hidden_size"]))
    dense = np.asarray(model.layers[1].mlp(x))
    apply_sparselora(model, SparseLoRAConfig(SparsityConfig(mlp=((1, 0.75),))))
    blk = model.layers[1].mlp
    assert isinstance(blk, SparseMLP) and not isinstance(model.layers[0].mlp, SparseMLP)
    set_sparse_tokens(model, 6)
    y = np.asarray(blk(x))
    np.testing.assert_array_equal(y[:, 6:], dense[:, 6:])  # output tokens: the dense MLP
    assert np.min(np.max(np.abs(y[:, :6] - dense[:, :6]), axis=-1)) > 1e-4  # context: sparse
    set_sparse_tokens(model, 0)
    np.testing.assert_array_equal(np.asarray(blk(x)), dense)  # m = 0: dense

    # m = the batch minimum of each row's leading loss-masked run, rounded down to the bucket.
    mask = np.zeros((3, 40), np.int32)
    mask[0, 25:], mask[1, 37:], mask[2, 21:30] = 1, 1, 1
    assert context_tokens(mask) == 21 and context_tokens(mask, 8) == 16
    assert context_tokens(np.zeros((2, 40))) == 40 and context_tokens(mask[:, ::-1]) == 0


def test_gqa_channels_are_head_aligned():
    # kv channel c = kvh * hd + d selects q channels (kvh * groups + g) * hd + d.
    got = np.asarray(head_aligned(jnp.asarray([1, 9], jnp.int32), groups=2, head_dim=8))
    assert got.tolist() == [1, 9, 17, 25]  # kvh 0, d 1 -> heads 0, 1; kvh 1, d 1 -> heads 2, 3
    # An input whose estimate is large only on kv head 1 selects q heads 2, 3.
    d, hd = 4, 2
    eye = lambda n: (jnp.eye(d, n), jnp.eye(n, n))
    a_q, b_q = jnp.eye(d, d), jnp.zeros((d, 8)).at[:, 4:].set(1.0)  # q heads 2, 3 only
    a_k, b_k = jnp.eye(d, d), jnp.ones((d, 4))
    x = jnp.ones((1, 3, d))
    q_idx, k_idx, v_idx, o_idx = attention_channels(
        x,
        {"q_proj": (a_q, b_q, None), "k_proj": (a_k, b_k, None), "v_proj": (*eye(4), None)},
        num_heads=4,
        num_kv_heads=2,
        head_dim=hd,
        k=2,
    )
    assert np.asarray(k_idx).tolist() == [2, 3]
    assert np.asarray(q_idx).tolist() == [4, 5, 6, 7]
    assert len(np.asarray(o_idx)) == 4 and len(np.asarray(v_idx)) == 2


# -- (6) the step schedule, the job, configs ------------------------------------------------------


def test_schedule_is_dense_before_start():
    assert [step_active(i, 100, 0.05) for i in (0, 4, 5, 99)] == [False, False, True, True]
    assert not step_active(50, 100, 0.05, 0.5) and step_active(49, 100, 0.05, 0.5)
    cfg = load_config(TrainJobConfig, TINY, _SPARSE_RUN + ["output_dir=/nonexistent"])
    mask = np.zeros((4, 64), np.int32)
    mask[:, 20:] = 1
    widths = [cfg.lora.sparse.tokens(mask, i, cfg.steps) for i in range(cfg.steps)]
    assert widths == [0, 0, 16, 16]  # start 0.5 of 4 steps; 20 context tokens -> bucket 8 -> 16


_SPARSE_RUN = [
    "steps=4",
    "log_every=1",
    "checkpoint_every=100",
    "data.seq_len=32",
    "data.batch_size=4",
    "data.num_records=100",
    "eval=0",
    "optim.warmup_steps=0",
    "lora.rank=4",
    "lora.targets=[q_proj,v_proj]",
    "lora.sparse.enabled=true",
    "lora.sparse.mlp_sparsity=0.5",
    "lora.sparse.mlp_layers=[0,1]",
    "lora.sparse.attn_sparsity=0.5",
    "lora.sparse.attn_layers=[1,1]",
    "lora.sparse.start=0.5",
    "lora.sparse.token_bucket=8",
]


@pytest.mark.slow  # end-to-end job (pytest -m slow)
def test_lm_job_trains_with_sparselora_and_saves_the_estimator(tmp_path):
    cfg = load_config(TrainJobConfig, TINY, [*_SPARSE_RUN, f"output_dir={tmp_path / 'run'}"])
    summary = run_train(cfg)
    assert summary["step"] == 4 and np.isfinite(summary["final_loss"])
    # The job's own batches have a sparse context from step 2 on (start 0.5 of 4 steps).
    data, _ = build_data(cfg.data, load_tokenizer(cfg.data.tokenizer))
    masks = [batch["loss_mask"] for batch in data.iterate(0, 4)]
    widths = [cfg.lora.sparse.tokens(mask, i, cfg.steps) for i, mask in enumerate(masks)]
    assert widths[:2] == [0, 0] and min(widths[2:]) >= 8, widths
    est = load_estimator(os.path.join(cfg.output_dir, "adapter"))
    assert sorted(est) == [
        "layers.0.mlp.gate_proj",
        "layers.0.mlp.up_proj",
        "layers.1.mlp.gate_proj",
        "layers.1.mlp.up_proj",
        "layers.1.self_attn.k_proj",
        "layers.1.self_attn.q_proj",
        "layers.1.self_attn.v_proj",
    ]
    assert all(a.shape[1] == 8 for a, _ in est.values())
    with open(os.path.join(cfg.output_dir, "adapter", "adapter_config.json")) as f:
        assert json.load(f)["r"] == 4


@pytest.mark.parametrize(
    "override, message",
    [
        (["lora.sparse.preset=llama9"], "unknown SparseLoRA preset"),
        (["lora.sparse.mlp_layers=[0,1]", "lora.sparse.mlp_sparsity=1.0"], "must be in [0, 1)"),
        (["lora.sparse.mlp_layers=[3]"], "must be [first, last]"),
        (
            [
                "lora.sparse.preset=llama3-8b-math10k",
                "lora.sparse.start=0.9",
                "lora.sparse.end=0.5",
            ],
            "start <= end",
        ),
        (["lora.sparse.mlp_layers=[0,1]", "lora.sparse.preset=llama3-8b-math10k"], "not both"),
        ([], "without a preset"),
    ],
)
def test_bad_configs_give_one_line_errors(override, message):
    base = ["lora.rank=4", "lora.sparse.enabled=true"]
    with pytest.raises(ValueError, match=None) as info:
        load_config(TrainJobConfig, TINY, base + override)
    assert message in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ValueError, match="needs lora.rank"):
        load_config(
            TrainJobConfig,
            TINY,
            ["lora.sparse.enabled=true", "lora.sparse.preset=llama2-7b-math10k"],
        )


def test_bad_model_configs_give_one_line_errors():
    model = _model("llama")
    with pytest.raises(ValueError, match="names layer 7; the model has 3"):
        apply_sparselora(model, SparseLoRAConfig(SparsityConfig(mlp=((7, 0.5),))))
    with pytest.raises(ValueError, match="keeps no channel of 128"):
        apply_sparselora(model, SparseLoRAConfig(SparsityConfig(mlp=((0, 0.999),))))
    apply_sparselora(model, SparseLoRAConfig(SparsityConfig(mlp=((0, 0.5),))))
    with pytest.raises(ValueError, match="already has SparseLoRA blocks"):
        apply_sparselora(model, SparseLoRAConfig(SparsityConfig(mlp=((0, 0.5),))))
    # The presets are the spec's tables (first and last layers dense, 20 and 24 skipped).
    math = SparsityConfig.preset("llama3-8b-math10k")
    assert [i for i, _ in math.mlp] == list(range(3, 31)) and math.at("mlp", 3) == 0.99
    assert (
        math.at("attn", 20) is None and math.at("attn", 14) == 0.75 and math.at("mlp", 31) is None
    )
    assert len(PRESETS) == 4
