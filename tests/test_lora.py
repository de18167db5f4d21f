"""LoRA (jaxstack/lora/) and PEFT adapters (jaxstack/hf/peft.py) against peft + transformers.

Parity bound (DESIGN.md principle 2): float32 logits match the PyTorch reference with
max |diff| / max |ref| <= 1e-5, on tiny random Llama (untied head, no biases) and Qwen2 (tied
embeddings, q/k/v biases) with non-zero A and B, so the adapters change the logits. Training
runs on the shared loop (jaxstack/train/trainer.py): base weights bit-identical, adapters
changed, loss down, checkpoints holding adapters only and resuming bit for bit.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from loop_helpers import same_weight_files
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import jaxstack.hf as hf
from jaxstack.config import load_config
from jaxstack.hf import CheckpointError
from jaxstack.hf.peft import (
    load_peft_adapter,
    read_adapter_config,
    save_merged_model,
    save_peft_adapter,
)
from jaxstack.lora import (
    BASE_PARAMS,
    LORA_PARAMS,
    TARGETS,
    LoRAConfig,
    apply_lora,
    dropout_row_seeds,
    lora_config,
    lora_layers,
    merge_lora,
    set_dropout_seeds,
)
from jaxstack.models.llm import LLM, MLP, LLMConfig
from jaxstack.parallel import make_mesh
from jaxstack.train import (
    Checkpointer,
    TrainJobConfig,
    TrainState,
    abstract_state,
    build_model,
    read_metrics,
    run_train,
)
from jaxstack.train import step as step_lib

peft = pytest.importorskip("peft")  # a test extra (absent on the GPU machine)

REL_TOL = 1e-5  # max |logits - ref| / max |ref|, float32
SIZES = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=96,
)
IDS = np.random.default_rng(0).integers(0, SIZES["vocab_size"], (2, 10))
# The projections each test adapts (Llama: all seven; Qwen2: a mix of attention and MLP).
OURS = {"llama": TARGETS, "qwen2": ("q_proj", "v_proj", "up_proj", "down_proj")}
THEIRS = {"llama": ["q_proj", "v_proj", "o_proj"], "qwen2": ["k_proj", "o_proj", "gate_proj"]}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "train_tiny.yaml")


def _rel_err(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def base_dir(request, tmp_path_factory) -> tuple[str, str]:
    """(architecture, folder) of a tiny transformers model with every weight perturbed."""
    arch = request.param
    torch.manual_seed(0)
    if arch == "llama":
        model = LlamaForCausalLM(LlamaConfig(**SIZES, tie_word_embeddings=False))
    else:
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=True))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = str(tmp_path_factory.mktemp(arch) / "base")
    model.save_pretrained(path)
    return arch, path


def _torch_base(path: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _torch_logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


_forward = nnx.jit(lambda model, ids: model(ids))


def _logits(model) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(IDS)))


def _randomize_adapters(model, seed: int) -> None:
    """Non-zero B (A keeps its PEFT-style init) so the adapters change the outputs."""
    key = jax.random.key(seed)
    for i, (_, layer) in enumerate(lora_layers(model)):
        b = layer.lora_b.get_value()
        layer.lora_b.set_value(0.2 * jax.random.normal(jax.random.fold_in(key, i), b.shape))


@pytest.fixture(scope="module")
def adapted(base_dir):
    """A jaxstack LLM loaded from base_dir with rank-4 adapters (non-zero B) and its logits."""
    arch, path = base_dir
    model = hf.load_model(path)
    base_logits = _logits(model)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=OURS[arch]), rngs=1)
    _randomize_adapters(model, seed=2)
    logits = _logits(model)
    assert _rel_err(logits, base_logits) > 1e-2  # the adapters matter
    return model, logits


def test_saved_adapter_loads_in_peft_with_equal_logits(base_dir, adapted, tmp_path):
    arch, path = base_dir
    model, logits = adapted
    save_peft_adapter(model, tmp_path / "adapter", base_model_name_or_path=path)
    # Key names and shapes are exactly PEFT's own for the same LoraConfig.
    ref_peft = peft.get_peft_model(
        _torch_base(path), peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(OURS[arch]))
    )
    want = {k: tuple(v.shape) for k, v in peft.get_peft_model_state_dict(ref_peft).items()}
    from safetensors.numpy import load_file

    got = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {k: v.shape for k, v in got.items()} == want
    peft_model = peft.PeftModel.from_pretrained(_torch_base(path), str(tmp_path / "adapter")).eval()
    loaded = peft_model.peft_config["default"]
    assert (loaded.r, loaded.lora_alpha, set(loaded.target_modules)) == (4, 8, set(OURS[arch]))
    assert loaded.base_model_name_or_path == path
    assert _rel_err(logits, _torch_logits(peft_model)) <= REL_TOL


def test_peft_written_adapter_loads_into_jaxstack(base_dir, tmp_path):
    arch, path = base_dir
    config = peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=THEIRS[arch])
    peft_model = peft.get_peft_model(_torch_base(path), config)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn_like(p))
    peft_model.save_pretrained(str(tmp_path / "theirs"))
    ref = _torch_logits(peft_model.eval())
    model = load_peft_adapter(hf.load_model(path), tmp_path / "theirs")
    assert lora_config(model) == LoRAConfig(8, 16.0, 0.05, tuple(THEIRS[arch]))
    assert _rel_err(_logits(model), ref) <= REL_TOL
    assert _rel_err(_logits(hf.load_model(path)), ref) > 1e-2  # the adapter matters
    # Loading into a model that already has matching adapters overwrites them.
    again = load_peft_adapter(model, tmp_path / "theirs")
    assert again is model and _rel_err(_logits(model), ref) <= REL_TOL


def test_merged_checkpoint_equals_base_plus_adapter(base_dir, adapted, tmp_path):
    arch, path = base_dir
    model, logits = adapted
    save_merged_model(model, tmp_path / "merged")
    merged_torch = _torch_base(str(tmp_path / "merged"))
    assert _rel_err(_torch_logits(merged_torch), logits) <= REL_TOL
    # Weight by weight it is PEFT's merge_and_unload of the same adapter on the same base.
    save_peft_adapter(model, tmp_path / "adapter")
    peft_merged = peft.PeftModel.from_pretrained(_torch_base(path), str(tmp_path / "adapter"))
    want = peft_merged.merge_and_unload().state_dict()
    got = merged_torch.state_dict()
    assert set(got) == set(want)
    for key in want:
        np.testing.assert_allclose(got[key].numpy(), want[key].numpy(), atol=1e-6, err_msg=key)
    # The adapted model is untouched by merging; the merged copy has no adapters.
    assert lora_layers(model) and not lora_layers(merge_lora(model))
    np.testing.assert_array_equal(_logits(model), logits)


def test_dropout_masks_are_per_row_seeded_and_scaled():
    cfg = LLMConfig.preset("tiny")
    mlp = MLP(cfg, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    apply_lora(mlp, LoRAConfig(rank=4, dropout=0.5, targets=("up_proj",)))
    _randomize_adapters(mlp, seed=0)
    layer = mlp.up_proj
    delta = nnx.jit(lambda layer, x: layer.delta(x))
    x = jnp.ones((3, 5, cfg.hidden_size))
    clean = np.asarray(delta(layer, x))
    seeds = dropout_row_seeds(0, step=7, batch_size=3)
    set_dropout_seeds(mlp, seeds)
    a, b = np.asarray(delta(layer, x)), np.asarray(delta(layer, x))
    set_dropout_seeds(mlp, seeds[::-1].copy())
    flipped = np.asarray(delta(layer, x))
    set_dropout_seeds(mlp, None)
    np.testing.assert_array_equal(a, b)  # a pure function of the seeds
    np.testing.assert_array_equal(flipped[0], a[2])  # row masks follow their row's seed
    assert not np.allclose(a[0], a[1]) and not np.allclose(a, clean)
    # Kept inputs are scaled by 1 / (1 - p): the mask reproduces the output exactly.
    key = lambda s: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), s), 0)
    keep = jax.jit(jax.vmap(lambda s: jax.random.bernoulli(key(s), 0.5, x.shape[1:])))(seeds)
    want = np.where(keep, 2.0, 0.0) @ layer.lora_a[...] @ layer.lora_b[...] * layer.scale
    np.testing.assert_allclose(a, want, rtol=1e-5, atol=1e-6)
    assert 0.3 < float(np.mean(keep)) < 0.7
    np.testing.assert_array_equal(np.asarray(delta(layer, x)), clean)  # off again
    assert (dropout_row_seeds(0, 7, 3) == seeds).all() and (
        dropout_row_seeds(0, 8, 3) != seeds
    ).any()


def test_update_trains_adapters_only_and_leaves_base_bit_identical():
    """make_update with the base as its frozen argument (jaxstack/train/step.py)."""
    cfg = LLMConfig.preset("tiny", vocab_size=64, num_layers=1)
    model = LLM(cfg, rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj", "down_proj")))
    before = jax.tree.map(np.array, nnx.to_pure_dict(nnx.state(model, BASE_PARAMS)))
    optimizer = step_lib.make_optimizer(step_lib.OptimConfig(lr=1e-2, warmup_steps=0))
    state, _ = step_lib.init_train_state(model, optimizer, trainable=LORA_PARAMS)
    graphdef, frozen, rest = step_lib.split_frozen(model, LORA_PARAMS)
    frozen = nnx.to_pure_dict(frozen)
    n_lora = sum(x.size for x in jax.tree.leaves(state.params))
    assert n_lora == 4 * (64 + 64) + 4 * (64 + 32) + 4 * (128 + 64)  # q, v, down; 1 layer
    assert sum(x.size for x in jax.tree.leaves(state.opt_state)) == 2 * n_lora + 2  # mu, nu

    def objective(params, micro, frozen):
        lora_model = step_lib.merge_trainable(graphdef, params, frozen, rest)
        return (*step_lib.lm_loss_sums(lora_model, micro), {})

    update = step_lib.make_update(objective, optimizer)
    ids = np.random.default_rng(0).integers(0, 64, (4, 17))
    batch = dict(input_ids=ids[:, :-1], targets=ids[:, 1:], loss_mask=np.ones((4, 16)))
    batch = step_lib.place_batch(None, batch)
    start = jax.tree.map(np.array, state.params)
    losses = []
    for _ in range(4):
        state, metrics = update(state, batch, frozen)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0]
    after = jax.tree.map(np.array, frozen)
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))  # bit for bit
    assert not any(jax.tree.leaves(jax.tree.map(np.array_equal, start, state.params)))


LORA_RUN = [
    "steps=4",
    "checkpoint_every=2",
    "log_every=1",
    "mesh=data=2,fsdp=2,tensor=2",
    "data.seq_len=32",
    "data.batch_size=8",
    "data.num_records=200",
    "eval=0",
    "optim.warmup_steps=0",
    "lora.rank=4",
    "lora.alpha=8",
    "lora.dropout=0.1",
    "lora.targets=[q_proj,v_proj,gate_proj]",
    "lora.merge=true",
]


def _lora_job(tmp_path, name: str, *extra: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, TINY, [*LORA_RUN, f"output_dir={tmp_path / name}", *extra])


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora_train")
    cfg = _lora_job(tmp, "straight")
    return cfg, run_train(cfg)


def _lora_abstract_state(cfg: TrainJobConfig) -> TrainState:
    """The TrainState of the job's LoRA model (adapters only) as ShapeDtypeStructs."""
    arch = LLMConfig.preset("tiny", vocab_size=263)  # the byte tokenizer's vocabulary
    model = nnx.eval_shape(lambda: LLM(arch, rngs=nnx.Rngs(0)))
    apply_lora(model, cfg.lora.config())
    params = nnx.to_pure_dict(nnx.state(model, LORA_PARAMS))
    opt_state = jax.eval_shape(step_lib.make_optimizer(cfg.resolved().optim).init, params)
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_state)


@pytest.mark.slow  # end-to-end job (pytest -m slow)
def test_lora_job_trains_adapters_only_and_exports_peft(lora_run):
    cfg, summary = lora_run
    out = cfg.output_dir
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(1, 5))
    assert records[-1]["loss"] < records[0]["loss"]
    # Checkpoints hold exactly the adapters and their moments (restore checks every key).
    like = _lora_abstract_state(cfg)
    state, _ = Checkpointer(os.path.join(out, "checkpoints")).restore(4, abstract_state(like))
    assert summary["lora_params"] == sum(x.size for x in jax.tree.leaves(state.params))
    # The base the adapters trained on is the preset's initial model, bit for bit.
    fresh = build_model(cfg.model, 263, make_mesh(cfg.mesh), cfg.seed)  # as the job built it
    hf.save_model(fresh, os.path.join(out, "fresh"))
    assert same_weight_files(summary["base_dir"], os.path.join(out, "fresh"))
    # PEFT loads the adapter on that base; the merged export equals it.
    with open(os.path.join(summary["adapter_dir"], "adapter_config.json")) as f:
        assert json.load(f)["base_model_name_or_path"] == summary["base_dir"]
    assert read_adapter_config(summary["adapter_dir"]) == cfg.lora.config()
    peft_model = peft.PeftModel.from_pretrained(
        _torch_base(summary["base_dir"]), summary["adapter_dir"]
    )
    ids = torch.tensor(np.random.default_rng(1).integers(0, 263, (2, 12)))
    with torch.no_grad():
        ref = peft_model.eval()(ids).logits.numpy()
        base = _torch_base(summary["base_dir"])(ids).logits.numpy()
        merged = _torch_base(summary["hf_dir"])(ids).logits.numpy()
    assert _rel_err(base, ref) > 1e-4  # the trained adapters change the logits
    assert _rel_err(merged, ref) <= REL_TOL


def test_lora_job_resumes_bit_for_bit(lora_run, tmp_path):
    ref_cfg, ref_summary = lora_run
    cfg = _lora_job(tmp_path, "resumed")
    assert run_train(cfg, stop_after=3)["stopped_at"] == 3
    second = run_train(cfg)  # restored from step 2, dropout masks drawn again per step
    assert second["start_step"] == 2 and second["step"] == 4
    drop = lambda rs: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rs]
    got = read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"))
    want = read_metrics(os.path.join(ref_cfg.output_dir, "metrics.jsonl"))
    assert drop(got) == drop(want)
    assert same_weight_files(second["adapter_dir"], ref_summary["adapter_dir"])
    assert same_weight_files(second["hf_dir"], ref_summary["hf_dir"])


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_configs_give_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="rank must be an int >= 1, got 0") as e:
        LoRAConfig(rank=0)
    _one_line(e)
    with pytest.raises(ValueError, match="unknown LoRA target 'qkv_proj'; choose from") as e:
        LoRAConfig(rank=4, targets=("q_proj", "qkv_proj"))
    _one_line(e)
    with pytest.raises(ValueError, match="lora: unknown LoRA target 'attn'") as e:
        load_config(TrainJobConfig, TINY, ["lora.rank=8", "lora.targets=[attn]"])
    _one_line(e)
    with pytest.raises(ValueError, match="lora.rank must be >= 0") as e:
        load_config(TrainJobConfig, TINY, ["lora.rank=-1"])
    _one_line(e)
    off = load_config(TrainJobConfig, TINY, ["lora.targets=[up_proj,q_proj]"])
    assert off.lora.config() is None and off.lora.targets == ("q_proj", "up_proj")
    model = LLM(LLMConfig.preset("tiny"), rngs=nnx.Rngs(0))
    apply_lora(model, LoRAConfig(rank=4))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, LoRAConfig(rank=4))


def test_bad_adapters_give_one_line_errors(base_dir, tmp_path):
    arch, path = base_dir
    model = hf.load_model(path)
    apply_lora(model, LoRAConfig(rank=4, alpha=8, targets=("q_proj", "v_proj")))
    good = tmp_path / "good"
    save_peft_adapter(model, good)

    def variant(name: str, **changes) -> str:
        folder = tmp_path / name
        folder.mkdir()
        raw = json.loads((good / "adapter_config.json").read_text())
        (folder / "adapter_config.json").write_text(json.dumps({**raw, **changes}))
        (folder / "adapter_model.safetensors").write_bytes(
            (good / "adapter_model.safetensors").read_bytes()
        )
        return str(folder)

    cases = [
        (variant("rslora", use_rslora=True), r"use_rslora=True is not supported"),
        (variant("dora", use_dora=True), r"use_dora=True is not supported"),
        (variant("head", target_modules=["q_proj", "lm_head"]), r"'lm_head' is not supported"),
        (variant("listed", target_modules=["q_proj"]), r"target_modules \['q_proj'\] but"),
        (variant("pattern", rank_pattern={"q_proj": 8}), r"rank_pattern=.* is not supported"),
    ]
    for folder, pattern in cases:
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_peft_adapter(hf.load_model(path), folder)
        assert "adapter_config.json" in _one_line(e)
    # A model whose adapters have another rank / targets: the mismatch is named.
    other = apply_lora(
        hf.load_model(path), LoRAConfig(rank=2, alpha=8, targets=("q_proj", "v_proj"))
    )
    with pytest.raises(CheckpointError, match="adapter rank 4 but the model's LoRA rank is 2") as e:
        load_peft_adapter(other, good)
    _one_line(e)
    other = apply_lora(hf.load_model(path), LoRAConfig(rank=4, alpha=8, targets=("q_proj",)))
    with pytest.raises(CheckpointError, match="adapter targets") as e:
        load_peft_adapter(other, good)
    _one_line(e)
    # A tensor of the wrong shape, a tensor PEFT would put on another module, a missing file.
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(good / "adapter_model.safetensors"))
    a_key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    for name, changed, pattern in (
        ("shape", {a_key: np.zeros((4, 7), np.float32)}, r"has shape \(4, 7\), the model expects"),
        ("extra", {"base_model.model.lm_head.lora_A.weight": tensors[a_key]}, r"lm_head.*not a"),
    ):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
        save_file({**tensors, **changed}, str(folder / "adapter_model.safetensors"))
        with pytest.raises(CheckpointError, match=pattern) as e:
            load_peft_adapter(hf.load_model(path), folder)
        assert "adapter_model.safetensors" in _one_line(e)
    with pytest.raises(CheckpointError, match="no adapter_config.json"):
        load_peft_adapter(hf.load_model(path), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        save_peft_adapter(hf.load_model(path), tmp_path / "none")
