"""SigLIP vision tower: parity with transformers `SiglipVisionModel`, loader errors, sharding.

Parity bound (DESIGN.md principle 2): float32 `hidden_states[-2]` (NVILA's features) and the
post-LayerNorm `last_hidden_state` match transformers with max |diff| / max |ref| <= 1e-5.
Pixels: torch takes NCHW, jaxstack takes NHWC (converted in the test with transpose(0,2,3,1)).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx
from transformers import SiglipConfig as HFSiglipConfig
from transformers import SiglipModel, SiglipTextConfig, SiglipVisionConfig, SiglipVisionModel

from jaxstack.hf.errors import CheckpointError
from jaxstack.hf.siglip import load_siglip
from jaxstack.models.siglip import PRESETS, SiglipConfig, SiglipVisionTower
from jaxstack.parallel.mesh import make_mesh, use_mesh

TOL = 1e-5


def _tiny_vision_config(**kw) -> SiglipVisionConfig:
    base = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=28,
        patch_size=14,
        layer_norm_eps=1e-6,
    )
    return SiglipVisionConfig(**{**base, **kw})


def _perturb(model: torch.nn.Module, seed: int = 0) -> None:
    """Random weights everywhere (LayerNorm scales/biases and biases are not ones/zeros)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    torch.manual_seed(0)
    model = SiglipVisionModel(_tiny_vision_config()).eval()
    _perturb(model)
    path = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(path)
    pixels_nchw = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out = model(pixel_values=pixels_nchw, output_hidden_states=True)
    ref = {
        "hidden": [h.numpy() for h in out.hidden_states],
        "last": out.last_hidden_state.numpy(),
    }
    return path, pixels_nchw.numpy(), ref


def test_parity_with_transformers(tiny_ckpt):
    path, pixels_nchw, ref = tiny_ckpt
    pixels_bhwc = jnp.asarray(pixels_nchw.transpose(0, 2, 3, 1))  # NCHW -> NHWC
    tower = load_siglip(path, dtype=jnp.float32, select_layer=-2)
    assert len(ref["hidden"]) == 4  # embeddings + 3 layers

    features = tower(pixels_bhwc)
    assert features.shape == (2, 4, 64)
    assert _rel(features, ref["hidden"][-2]) <= TOL

    out = tower.forward(pixels_bhwc)
    assert _rel(out.features, ref["hidden"][-2]) <= TOL
    assert _rel(out.last_hidden_state, ref["last"]) <= TOL
    for ours, theirs in zip(out.hidden_states, ref["hidden"], strict=True):
        assert _rel(ours, theirs) <= TOL

    last_layer = load_siglip(path, select_layer=-1)(pixels_bhwc)
    assert _rel(last_layer, ref["hidden"][-1]) <= TOL  # pre-post-LN last layer


def test_full_siglip_checkpoint_and_sharding(tmp_path):
    """model_type 'siglip' (vision_model.* prefix, text tower ignored), sharded on 8 devices."""
    torch.manual_seed(0)
    cfg = HFSiglipConfig(
        vision_config=_tiny_vision_config(num_hidden_layers=2).to_dict(),
        text_config=SiglipTextConfig(
            vocab_size=32,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            max_position_embeddings=16,
        ).to_dict(),
    )
    model = SiglipModel(cfg).eval()
    _perturb(model, seed=3)
    model.save_pretrained(tmp_path)
    pixels_nchw = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model.vision_model(pixel_values=pixels_nchw, output_hidden_states=True)
    pixels_bhwc = jnp.asarray(pixels_nchw.numpy().transpose(0, 2, 3, 1))

    mesh = make_mesh("data=2,fsdp=2,tensor=2", jax.devices()[:8])
    tower = load_siglip(tmp_path, mesh=mesh)
    q = tower.layers[0].self_attn.q_proj.kernel[...]
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    with use_mesh(mesh):
        out = nnx.jit(lambda m, x: m.forward(x))(tower, pixels_bhwc)
    assert _rel(out.features, ref.hidden_states[-2].numpy()) <= TOL
    assert _rel(out.last_hidden_state, ref.last_hidden_state.numpy()) <= TOL


def test_mismatched_checkpoint_errors(tiny_ckpt, tmp_path):
    path, _, _ = tiny_ckpt
    # config says 4 layers, checkpoint has 3.
    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    bad = tmp_path / "more_layers"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 4}))
    os.symlink(os.path.join(path, "model.safetensors"), bad / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"encoder\.layers\.3\..*missing"):
        load_siglip(bad)

    # wrong width in config -> shape mismatch names the tensor.
    wide = tmp_path / "wide"
    wide.mkdir()
    (wide / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 256}))
    os.symlink(os.path.join(path, "model.safetensors"), wide / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"mlp\.fc1\..*expected shape \(256,"):
        load_siglip(wide)

    # unsupported model type / activation.
    other = tmp_path / "clip"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({**cfg, "model_type": "clip_vision_model"}))
    with pytest.raises(CheckpointError, match="unsupported model_type 'clip_vision_model'"):
        load_siglip(other)
    act = tmp_path / "act"
    act.mkdir()
    (act / "config.json").write_text(json.dumps({**cfg, "hidden_act": "relu"}))
    with pytest.raises(CheckpointError, match="unsupported hidden_act 'relu'"):
        load_siglip(act)

    # a checkpoint without vision tensors.
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(cfg))
    safetensors.numpy.save_file({"foo": np.zeros(2, np.float32)}, empty / "model.safetensors")
    with pytest.raises(CheckpointError, match="no SigLIP vision tensors"):
        load_siglip(empty)


def test_presets_and_input_checks():
    so400m = SiglipConfig.preset("so400m-patch14-448")
    assert (so400m.hidden_size, so400m.num_layers, so400m.num_heads, so400m.mlp_dim) == (
        1152,
        27,
        16,
        4304,
    )
    assert so400m.num_patches == 1024
    assert set(PRESETS) >= {"so400m-patch14-448", "tiny"}
    assert SiglipConfig.preset("TINY", num_layers=1).num_layers == 1
    with pytest.raises(ValueError, match=r"unknown preset 'nope' for SiglipConfig; known: \["):
        SiglipConfig.preset("nope")
    abstract = nnx.eval_shape(lambda: SiglipVisionTower(so400m, rngs=nnx.Rngs(0)))
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert 400e6 < n_params < 430e6  # "so400m" without the pooling head

    tower = SiglipVisionTower(SiglipConfig.preset("tiny"), rngs=nnx.Rngs(0))
    assert tower(jnp.ones((1, 28, 28, 3))).shape == (1, 4, 64)
    with pytest.raises(ValueError, match="NHWC"):
        tower(jnp.ones((1, 3, 28, 28)))
    with pytest.raises(ValueError, match="select_layer"):
        SiglipVisionTower(SiglipConfig.preset("tiny"), select_layer=4, rngs=nnx.Rngs(0))
