"""jaxstack.hf: transformers Llama/Qwen2/Qwen3 checkpoints in and out, sharded loading, errors.

Parity bound (DESIGN.md principle 2): float32 logits of the loaded model match transformers
with max |diff| / max |ref| <= 1e-5. Saved checkpoints reload in transformers bit-identical.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from jax.sharding import PartitionSpec as P
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

import jaxstack.hf as hf
from jaxstack.hf import CheckpointError
from jaxstack.hf.llm import hf_key_for, param_path_for
from jaxstack.hf.params_io import named_params
from jaxstack.models.llm import LLMConfig, init_llm
from jaxstack.parallel import make_mesh, use_mesh

REL_TOL = 1e-5  # max |logits - ref| / max |ref|, float32
SIZES = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    vocab_size=128,
)
LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=4.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=64,
)
ARCHS = ("llama", "qwen2", "qwen3")
IDS = np.random.default_rng(0).integers(0, SIZES["vocab_size"], (2, 12))


def _torch_model(arch: str, seed: int = 0) -> torch.nn.Module:
    """Tiny transformers model with every weight perturbed (norms not ones, biases not zero)."""
    torch.manual_seed(seed)
    if arch == "llama":  # llama3 rope scaling, untied head
        cfg = LlamaConfig(
            **SIZES, rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), tie_word_embeddings=False
        )
        model = LlamaForCausalLM(cfg)
    elif arch == "qwen2":  # q/k/v biases, tied embeddings
        model = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=True))
    else:  # per-head q/k norms
        model = Qwen3ForCausalLM(Qwen3Config(**SIZES, tie_word_embeddings=False))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def _torch_logits(model: torch.nn.Module) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


_forward = nnx.jit(lambda model, ids: model(ids))  # one compile per distinct config


def _logits(model) -> np.ndarray:
    return np.asarray(_forward(model, jnp.asarray(IDS)))


def _random_llm(cfg: LLMConfig, seed: int):
    """LLM with N(0, 0.1^2) parameters, made without compiling an initialiser."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: init_llm(cfg)))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda x: jnp.asarray(0.1 * rng.normal(size=x.shape), x.dtype), state)
    return nnx.merge(graphdef, state)


def _rel_err(out: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(out - ref).max() / np.abs(ref).max())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """arch -> (checkpoint dir written by transformers, torch model, reference logits)."""
    out = {}
    for arch in ARCHS:
        model = _torch_model(arch)
        path = tmp_path_factory.mktemp(arch)
        model.save_pretrained(path)
        out[arch] = (path, model, _torch_logits(model))
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_load_matches_transformers(ckpt, arch):
    path, _, ref = ckpt[arch]
    model = hf.load_model(path)
    cfg = model.cfg
    assert cfg.architecture == arch and cfg.head_dim == 16 and cfg.num_kv_heads == 2
    assert cfg.tie_word_embeddings == (arch == "qwen2")
    assert cfg.attention_bias == (arch == "qwen2") and cfg.qk_norm == (arch == "qwen3")
    if arch == "llama":
        assert cfg.rope_theta == 500000.0 and cfg.rope_scaling == LLAMA3_ROPE
    for path, _ in named_params(nnx.state(model)):  # the key table maps both ways
        assert param_path_for(hf_key_for(path)[0]) == path
    assert _rel_err(_logits(model), ref) <= REL_TOL


@pytest.mark.parametrize(
    "arch,max_shard_bytes", [("llama", 40_000), ("qwen2", None), ("qwen3", None)]
)
def test_save_reloads_identically_in_transformers(ckpt, tmp_path, arch, max_shard_bytes):
    path, ref_model, ref = ckpt[arch]
    kw = {} if max_shard_bytes is None else dict(max_shard_bytes=max_shard_bytes)
    hf.save_model(hf.load_model(path), tmp_path, **kw)
    files = os.listdir(tmp_path)
    if max_shard_bytes is None:
        assert "model.safetensors" in files
    else:
        assert "model.safetensors.index.json" in files and "model.safetensors" not in files
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    want, got = ref_model.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    np.testing.assert_array_equal(_torch_logits(back), ref)


def test_sharded_index_checkpoint_loads(ckpt, tmp_path):
    _, ref_model, ref = ckpt["qwen3"]
    ref_model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    assert _rel_err(_logits(hf.load_model(tmp_path)), ref) <= REL_TOL


def test_bf16_checkpoint_loads_and_saves(ckpt, tmp_path):
    bf16 = _torch_model("llama").to(torch.bfloat16)
    bf16.save_pretrained(tmp_path / "in")
    model = hf.load_model(tmp_path / "in")  # bf16 file -> float32 parameters, exactly
    want = bf16.model.layers[0].self_attn.q_proj.weight.detach().float().numpy().T
    np.testing.assert_array_equal(np.asarray(model.layers[0].self_attn.q_proj.kernel[...]), want)
    ref = _torch_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "in", dtype=torch.float32))
    assert _rel_err(_logits(model), ref) <= REL_TOL
    on_mesh = hf.load_model(tmp_path / "in", mesh=make_mesh("fsdp=4,tensor=2"))
    for a, b in [
        (on_mesh.lm_head.kernel, model.lm_head.kernel),
        (on_mesh.layers[1].mlp.down_proj.kernel, model.layers[1].mlp.down_proj.kernel),
    ]:
        assert not a[...].sharding.is_fully_replicated
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]))
    stored = hf.load_model(tmp_path / "in", param_dtype=jnp.bfloat16)
    assert stored.embed_tokens.embedding[...].dtype == jnp.bfloat16
    hf.save_model(stored, tmp_path / "out", dtype=jnp.bfloat16)
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.bfloat16)
    assert back.config.dtype == torch.bfloat16
    want, got = bf16.state_dict(), back.state_dict()
    assert want.keys() == got.keys()
    for key in want:
        assert got[key].dtype == torch.bfloat16 and torch.equal(want[key], got[key]), key


def test_save_qwen2_without_bias_writes_zero_biases(tmp_path):
    cfg = LLMConfig(architecture="qwen2", vocab_size=128, attention_bias=False)
    model = _random_llm(cfg, seed=3)
    hf.save_model(model, tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    assert not back.model.layers[0].self_attn.k_proj.bias.any()
    assert _rel_err(_torch_logits(back), _logits(model)) <= REL_TOL


def test_load_onto_mesh_matches_single_device(ckpt, tmp_path):
    path, _, _ = ckpt["llama"]
    mesh = make_mesh("fsdp=4,tensor=2")
    model = hf.load_model(path, mesh=mesh)
    attn = model.layers[0].self_attn
    expected = [
        (attn.q_proj.kernel, P("fsdp", "tensor")),
        (attn.o_proj.kernel, P("tensor", "fsdp")),
        (model.layers[1].mlp.down_proj.kernel, P("tensor", "fsdp")),
        (model.embed_tokens.embedding, P("tensor", "fsdp")),
        (model.lm_head.kernel, P("fsdp", "tensor")),
    ]
    for param, spec in expected:
        array = param[...]
        assert array.sharding.mesh == mesh and array.sharding.spec == spec
    q = attn.q_proj.kernel[...]
    assert {s.data.shape for s in q.addressable_shards} == {(16, 32)}  # each device: its slice
    for norm in (model.norm.scale, model.layers[0].input_layernorm.scale):
        assert norm[...].sharding.is_fully_replicated
    single = _logits(hf.load_model(path))
    with use_mesh(mesh):  # activation constraints take effect when traced under the mesh
        sharded = np.asarray(nnx.jit(lambda m, x: m(x))(model, jnp.asarray(IDS)))
    assert _rel_err(sharded, single) <= REL_TOL

    hf.save_model(model, tmp_path)  # gathers the sharded parameters
    want = safetensors.numpy.load_file(path / "model.safetensors")
    got = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)

    qwen2 = hf.load_model(ckpt["qwen2"][0], mesh=mesh)
    assert qwen2.layers[0].self_attn.k_proj.bias[...].sharding.spec == P("tensor")
    assert qwen2.lm_head is None


# -- config mapping -----------------------------------------------------------------------------


def _hf_dict(arch: str) -> dict:
    return _torch_model(arch).config.to_dict()


def test_config_from_hf_handles_both_rope_layouts_and_defaults():
    v5 = _hf_dict("llama")
    assert "rope_parameters" in v5
    v4 = {k: v for k, v in v5.items() if k != "rope_parameters"}
    v4.update(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE))
    assert hf.config_from_hf(v5) == hf.config_from_hf(v4)
    assert hf.config_from_hf(v5).rope_scaling == LLAMA3_ROPE
    no_head_dim = {k: v for k, v in _hf_dict("qwen2").items() if k != "head_dim"}
    cfg = hf.config_from_hf(no_head_dim)
    assert cfg.head_dim == 64 // 4 and cfg.attention_bias and not cfg.qk_norm
    assert hf.config_from_hf(_hf_dict("qwen3")).qk_norm


@pytest.mark.parametrize("name", ["tiny", "qwen2.5-0.5b", "qwen3-0.6b", "llama3.1-8b"])
def test_config_roundtrip_through_transformers(tmp_path, name):
    cfg = LLMConfig.preset(name)
    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(cfg)))
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded).__name__.replace("Config", "ForCausalLM") in hf.SUPPORTED_ARCHITECTURES
    assert loaded.num_key_value_heads == cfg.num_kv_heads and loaded.head_dim == cfg.head_dim
    assert hf.config_from_hf(loaded.to_dict()) == cfg


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(attention_bias=True), "o_proj bias"),
        (dict(rope_parameters=dict(rope_type="yarn", rope_theta=1e4, factor=2.0)), "'yarn'"),
        (dict(hidden_act="gelu"), "hidden_act 'gelu'"),
        (dict(architectures=["MistralForCausalLM"]), "LlamaForCausalLM, Qwen2ForCausalLM"),
    ],
)
def test_config_from_hf_rejects_unsupported(change, match):
    with pytest.raises(CheckpointError, match=match):
        hf.config_from_hf({**_hf_dict("llama"), **change})


# -- errors -------------------------------------------------------------------------------------


@pytest.fixture
def broken(ckpt, tmp_path):
    """A writable copy of the qwen3 checkpoint."""
    path = tmp_path / "ckpt"
    shutil.copytree(ckpt["qwen3"][0], path)
    return path


def test_error_missing_directory_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="nope' does not exist"):
        hf.load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no config.json"):
        hf.load_model(tmp_path)
    (tmp_path / "config.json").write_text('{"architectures": ')
    with pytest.raises(CheckpointError, match="config.json: unreadable JSON"):
        hf.load_model(tmp_path)


def test_error_unsupported_architecture(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"config.json: unsupported architecture .*GPT2LM.*"
        "supported: LlamaForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM",
    ):
        hf.load_model(broken)


def test_error_missing_safetensors_files(ckpt, broken, tmp_path):
    os.remove(broken / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index"):
        hf.load_model(broken)
    sharded = tmp_path / "sharded"
    ckpt["qwen3"][1].save_pretrained(sharded, max_shard_size="20KB")
    shard = sorted(sharded.glob("model-*.safetensors"))[1]
    os.remove(shard)
    with pytest.raises(CheckpointError, match=f"{shard.name} .listed in .*index.json. is missing"):
        hf.load_model(sharded)


def test_error_truncated_safetensors(broken):
    file = broken / "model.safetensors"
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        hf.load_model(broken)
    file.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated"):
        hf.load_model(broken)


def test_error_missing_tensor_and_unused_tensor_warning(broken):
    file = str(broken / "model.safetensors")
    tensors = safetensors.numpy.load_file(file)
    tensors["model.extra.weight"] = np.zeros(3, np.float32)
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    with pytest.warns(UserWarning, match="1 tensors not used by the model.*model.extra.weight"):
        hf.load_model(broken)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    safetensors.numpy.save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="'model.layers.1.mlp.up_proj.weight' missing from"):
        hf.load_model(broken)


def test_error_index_points_to_wrong_shard(ckpt, tmp_path):
    ckpt["qwen3"][1].save_pretrained(tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    names = sorted(set(index["weight_map"].values()))
    key = next(k for k, v in index["weight_map"].items() if v == names[0])
    index["weight_map"][key] = names[1]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"'{key}' missing from .*{names[1]}"):
        hf.load_model(tmp_path)


def test_error_shape_mismatch(broken):
    cfg = json.loads((broken / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"'model.layers.0.mlp.down_proj.weight' in .*model.safetensors: "
        r"expected shape \(64, 96\) \(from .*config.json\), found \(64, 128\)",
    ):
        hf.load_model(broken)
