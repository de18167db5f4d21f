"""DC-AE (jaxstack.models.dcae, jaxstack.hf.dcae) against diffusers `AutoencoderDC` (CPU).

Parity: every tensor of a tiny diffusers model (and every BatchNorm running statistic) is
perturbed so zero-initialised biases and unit norms are exercised; the model is saved with
`save_pretrained`, loaded with `load_dcae`, and encode/decode are compared in float32 with
max |jax - torch| / max |torch| <= 1e-5 (PARITY_RTOL). Config "tiny" is sana.md §8 (diffusers'
own test config: linear-attention branch, conv down / interpolate up, shortcuts). Config
"other" covers the rest of diffusers' code paths: the quadratic attention branch (H*W <=
attention_head_dim), two qkv scales, pixel-unshuffle / pixel-shuffle blocks, a first stage
without layers (conv_in / conv_out are the 2x blocks), BatchNorm and ReLU decoder stages, no
encoder/decoder shortcuts and a SiLU tail.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstack.hf.dcae import WEIGHTS_FILE, diffusers_key_for, load_dcae, save_dcae
from jaxstack.hf.errors import CheckpointError
from jaxstack.models.dcae import DCAE, DCAEConfig
from jaxstack.models.dcae_blocks import ATTN_EPS, quadratic_relu_attention
from pallas_kernels.linear_attention import relu_linear_attention_reference

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

PARITY_RTOL = 1e-5  # max |jax - torch| / max |torch|, float32

OTHER = DCAEConfig(
    in_channels=3,
    latent_channels=8,
    attention_head_dim=8,
    encoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 16, 32),
    decoder_block_out_channels=(8, 16, 32),
    encoder_layers_per_block=(0, 1, 1),
    decoder_layers_per_block=(0, 1, 2),
    encoder_qkv_multiscales=((), (), (3, 5)),
    decoder_qkv_multiscales=((), (), (5,)),
    downsample_block_type="pixel_unshuffle",
    upsample_block_type="pixel_shuffle",
    decoder_norm_types=("rms_norm", "batch_norm", "batch_norm"),
    decoder_act_fns=("silu", "relu", "silu"),
    encoder_out_shortcut=False,
    decoder_in_shortcut=False,
    decoder_conv_act_fn="silu",
)


def _torch_model(cfg: DCAEConfig, seed: int):
    """A diffusers AutoencoderDC of `cfg` with every parameter and BN statistic perturbed."""
    torch.manual_seed(seed)
    kwargs = {k: v for k, v in cfg.to_diffusers_config().items() if not k.startswith("_")}
    model = diffusers.AutoencoderDC(**kwargs).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))
            elif name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """name -> (torch model, its save_pretrained folder, jaxstack model loaded from it)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cfg = DCAEConfig.preset("tiny") if name == "tiny" else OTHER
            tm = _torch_model(cfg, seed=0 if name == "tiny" else 10)
            path = str(tmp_path_factory.mktemp(f"dcae_{name}") / "vae")
            tm.save_pretrained(path)
            cache[name] = tm, path, load_dcae(path)
        return cache[name]

    return get


# encode(x) and decode(z) in one compiled program per model and shape.
_encode_decode = nnx.jit(lambda model, x, z: (model.encode(x), model.decode(z)))


def _rel(jax_out, torch_out) -> float:
    t = torch_out.detach().numpy()
    return float(np.abs(np.asarray(jax_out) - t).max() / np.abs(t).max())


# (config, image size): "tiny" runs linear attention at 16x16 / 16x32 (N > d = 2); "other"
# runs it at 4x4 (N = 16 > d = 8) and the quadratic branch at 2x4 (N = 8 <= d = 8).
SIZES = {"tiny": [(32, 32), (32, 64)], "other": [(16, 16), (8, 16)]}


def _branch(cfg: DCAEConfig, h: int, w: int) -> str:
    """The attention branch diffusers takes in the last stage (the attention stage here)."""
    r = cfg.spatial_compression_ratio
    return "linear" if (h // r) * (w // r) > cfg.attention_head_dim else "quadratic"


@pytest.mark.parametrize("name", ["tiny", "other"])
def test_dcae_encode_decode_parity(saved, name):
    tm, _, model = saved(name)
    seen = set()
    for i, (h, w) in enumerate(SIZES[name]):
        x = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(100 + i))
        with torch.no_grad():
            z_t = tm.encode(x).latent
            y_t = tm.decode(z_t).sample
        z_j, y_j = _encode_decode(model, jnp.asarray(x.numpy()), jnp.asarray(z_t.numpy()))
        assert z_j.shape == tuple(z_t.shape) and y_j.shape == tuple(y_t.shape) == (2, 3, h, w)
        assert _rel(z_j, z_t) <= PARITY_RTOL, (name, h, w, _rel(z_j, z_t))
        assert _rel(y_j, y_t) <= PARITY_RTOL, (name, h, w, _rel(y_j, y_t))
        seen.add(_branch(model.cfg, h, w))
    assert seen == ({"linear"} if name == "tiny" else {"linear", "quadratic"})


@pytest.mark.parametrize("name", ["tiny", "other"])
def test_save_dcae_round_trip(saved, tmp_path, name):
    tm, _, model = saved(name)
    out = str(tmp_path / "saved")
    save_dcae(model, out)
    assert sorted(os.listdir(out)) == ["config.json", WEIGHTS_FILE]
    with open(os.path.join(out, "config.json")) as f:
        assert DCAEConfig.from_diffusers_config(json.load(f)) == model.cfg
    back, info = diffusers.AutoencoderDC.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing / unexpected / mismatched keys
    ref, got = tm.state_dict(), back.state_dict()
    assert ref.keys() == got.keys()
    for key, value in ref.items():
        if key.endswith("num_batches_tracked"):
            continue  # written as 0: jaxstack keeps BatchNorm statistics frozen
        assert torch.equal(value, got[key]), key
    x = torch.randn(1, 3, *SIZES[name][0], generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert torch.equal(tm(x).sample, back(x).sample)
    again = nnx.state(load_dcae(out))
    for (path, a), (_, b) in zip(_leaves(nnx.state(model)), _leaves(again), strict=True):
        assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), path


def _leaves(state):
    return jax.tree_util.tree_flatten_with_path(
        state, is_leaf=lambda v: isinstance(v, nnx.Variable)
    )[0]


def test_quadratic_branch_equals_linear_attention():
    """diffusers' two branches are one formula; check ours against the kernel reference."""
    q, k, v = np.random.default_rng(0).standard_normal((3, 2, 6, 3, 4), np.float32)
    quad, ref = jax.jit(
        lambda q, k, v: (
            quadratic_relu_attention(q, k, v, eps=ATTN_EPS),
            relu_linear_attention_reference(q, k, v, eps=ATTN_EPS),
        )
    )(q, k, v)
    np.testing.assert_allclose(quad, ref, rtol=1e-5, atol=1e-6)


def test_bf16_compute_dtype(saved):
    """dtype=bfloat16 computes in bfloat16 (norms, attention state in float32) close to float32."""
    _, path, m32 = saved("tiny")
    m16 = load_dcae(path, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 32), np.float32)
    z32, _ = _encode_decode(m32, x, np.zeros((1, 4, 16, 16), np.float32))
    z16, y16 = _encode_decode(m16, x, z32)
    _, y32 = _encode_decode(m32, x, z32)
    assert z16.dtype == y16.dtype == jnp.bfloat16
    for a, b in ((z16, z32), (y16, y32)):
        assert float(jnp.abs(a.astype(jnp.float32) - b).max() / jnp.abs(b).max()) < 0.05


def test_f32c32_preset_matches_diffusers_layout():
    """The real-size preset builds the same tensors (keys, shapes) as diffusers' model, and
    every jaxstack parameter carries logical axes."""
    cfg = DCAEConfig.preset("dc-ae-f32c32")
    assert cfg.spatial_compression_ratio == 32
    kwargs = {k: v for k, v in cfg.to_diffusers_config().items() if not k.startswith("_")}
    with torch.device("meta"):
        tm = diffusers.AutoencoderDC(**kwargs)
    expected = {k: tuple(v.shape) for k, v in tm.state_dict().items()}
    abstract = nnx.eval_shape(lambda: DCAE(cfg, rngs=nnx.Rngs(0)))
    got = {}
    for path, var in _leaves(nnx.state(abstract)):
        dotted = ".".join(str(getattr(k, "key", k)) for k in path)
        shape = var.get_value().shape
        key, perm = diffusers_key_for(dotted, len(shape))
        got[key] = shape if perm is None else tuple(shape[perm.index(a)] for a in range(len(perm)))
    assert got == expected
    assert sum(np.prod(s) for s in got.values()) == sum(p.numel() for p in tm.parameters())
    for path, var in _leaves(nnx.state(abstract)):  # sharding metadata on every parameter
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var.get_value().ndim, path


def _rewrite(path: str, edit) -> None:
    from safetensors.numpy import load_file, save_file

    file = os.path.join(path, WEIGHTS_FILE)
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


@pytest.mark.parametrize("fault", ["missing", "misshaped"])
def test_bad_checkpoint_is_one_line_error(saved, tmp_path, fault):
    _, _, model = saved("tiny")
    path = str(tmp_path / "vae")
    save_dcae(model, path)
    key = "decoder.up_blocks.1.0.attn.to_qkv_multiscale.0.proj_out.weight"
    if fault == "missing":
        _rewrite(path, lambda t: t.pop(key))
    else:
        _rewrite(path, lambda t: t.__setitem__(key, t[key][:-1]))
    with pytest.raises(CheckpointError) as err:
        load_dcae(path)
    msg = str(err.value)
    assert "\n" not in msg and key in msg and WEIGHTS_FILE in msg, msg
    assert ("missing" in msg) if fault == "missing" else ("expected shape" in msg), msg
