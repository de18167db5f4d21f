"""NVILA checkpoint layout (VILA llm/ + vision_tower/ + mm_projector/): import, export, errors.

Parity (float32, max |diff| / max |ref| <= 1e-5): a layout written by hand from transformers
`SiglipVisionModel` + `Qwen2ForCausalLM` `save_pretrained` and `InternVLMultiModalProjector`
weights stored under VILA's projector keys (layers.1 LN, layers.2 Linear 4C->D, layers.4
Linear D->D) against the torch reference SigLIP hidden_states[-2] -> InternVL pixel_shuffle +
projector -> (temporal mean + "\\n" embedding for video) -> Qwen2(inputs_embeds).
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
from flax import nnx

from jaxstack.hf import load_nvila, save_nvila
from jaxstack.hf.errors import CheckpointError
from jaxstack.hf.nvila_projector import projector_from_state_dict
from jaxstack.models import vlm

internvl = pytest.importorskip("transformers.models.internvl.modeling_internvl")

TOL = 1e-5
VOCAB, MEDIA_ID, SEP_ID = 64, 60, 10


def _rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _perturb(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _write_top_config(path, **extra) -> None:
    top = {
        "architectures": ["LlavaLlamaModel"],
        "model_type": "llava_llama",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "cls_patch",
        "image_aspect_ratio": "resize",
        "num_video_frames": 4,
        "video_encoder": json.dumps(
            {"_target_": "llava.model.encoders.TSPVideoEncoder", "pool_sizes": [[2, 1, 1]]}
        ),
        **extra,
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(top, f)


@pytest.fixture(scope="module")
def hand_ckpt(tmp_path_factory):
    """Hand-written NVILA layout from transformers tiny models + torch reference outputs."""
    from transformers import (
        InternVLConfig,
        InternVLVisionConfig,
        Qwen2Config,
        Qwen2ForCausalLM,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    root = tmp_path_factory.mktemp("nvila_hand")
    c, d = 32, 32
    torch.manual_seed(0)
    tower = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=c,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            image_size=56,
            patch_size=14,
            vision_use_head=False,
        )
    ).eval()
    _perturb(tower, 1)
    tower.save_pretrained(root / "vision_tower")

    llm = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=d,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=128,
            tie_word_embeddings=False,
        )
    ).eval()
    _perturb(llm, 2)
    llm.save_pretrained(root / "llm")
    # Minimal tokenizer.json: media token as an added token, "\n" as byte-level "Ċ".
    with open(root / "llm" / "tokenizer.json", "w") as f:
        json.dump(
            {
                "added_tokens": [{"id": MEDIA_ID, "content": "<image>", "special": True}],
                "model": {"type": "BPE", "vocab": {"Ċ": SEP_ID, "a": 0}},
            },
            f,
        )

    icfg = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=c,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        text_config=Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=d,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
    )
    proj = internvl.InternVLMultiModalProjector(icfg).eval()
    _perturb(proj, 3)
    sd = {k: v.detach().numpy().copy() for k, v in proj.state_dict().items()}
    vila = {
        "layers.1.weight": sd["layer_norm.weight"],
        "layers.1.bias": sd["layer_norm.bias"],
        "layers.2.weight": sd["linear_1.weight"],
        "layers.2.bias": sd["linear_1.bias"],
        "layers.4.weight": sd["linear_2.weight"],
        "layers.4.bias": sd["linear_2.bias"],
    }
    os.makedirs(root / "mm_projector")
    safetensors.numpy.save_file(vila, str(root / "mm_projector" / "model.safetensors"))
    with open(root / "mm_projector" / "config.json", "w") as f:
        json.dump(
            {
                "architectures": ["MultimodalProjector"],
                "model_type": "v2l_projector",
                "mm_projector_type": "mlp_downsample_2x2_fix",
            },
            f,
        )
    _write_top_config(root)

    # Torch reference: video of 4 frames, groups of 2 -> 2 * (4 + 1) = 10 media rows.
    frames = torch.randn(4, 3, 56, 56, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        feats = tower(pixel_values=frames, output_hidden_states=True).hidden_states[-2]
        t, n, _ = feats.shape
        side = int(n**0.5)
        shuffled = internvl.InternVLModel.pixel_shuffle(
            None, feats.reshape(t, side, side, c).contiguous(), 0.5
        )
        tokens = proj(shuffled.reshape(t, -1, 4 * c))  # [T, 4, D]
        pooled = tokens.reshape(2, 2, -1, d).mean(1)  # [G, 4, D]
        sep = llm.model.embed_tokens(torch.tensor([SEP_ID]))  # [1, D]
        media = torch.cat([pooled, sep[None].expand(2, 1, d)], 1).reshape(-1, d)  # [10, D]
        rng = np.random.default_rng(5)
        ids = rng.integers(0, 50, size=(1, 16))
        ids[0, 3:13] = MEDIA_ID
        embeds = llm.model.embed_tokens(torch.from_numpy(ids))
        embeds[0, 3:13] = media
        logits = llm(inputs_embeds=embeds).logits.numpy()
    pixels = frames.numpy().transpose(0, 2, 3, 1)  # NHWC
    return root, pixels, ids.astype(np.int32), logits


def test_hand_written_layout_matches_torch_reference(hand_ckpt):
    root, pixels, ids, ref = hand_ckpt
    model = load_nvila(root, dtype=jnp.float32)
    cfg = model.cfg
    assert (cfg.media_token_id, cfg.separator_token_id) == (MEDIA_ID, SEP_ID)  # from tokenizer
    assert cfg.frames_per_group == 2 and cfg.select_layer == -2
    assert cfg.tokens_per_frame == 4 and cfg.llm.architecture == "qwen2"
    assert model.encode_video(jnp.asarray(pixels)[:2]).shape == (5, 32)
    logits = _video_logits(model, jnp.asarray(ids), jnp.asarray(pixels))
    assert _rel(logits, ref) <= TOL


def test_explicit_token_ids_override(hand_ckpt):
    root = hand_ckpt[0]
    cfg = load_nvila(root, media_token_id=61, separator_token_id=11).cfg
    assert (cfg.media_token_id, cfg.separator_token_id) == (61, 11)


def _state(model) -> dict:
    leaves = jax.tree_util.tree_flatten_with_path(nnx.state(model, nnx.Param))[0]
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def _random_nvila(cfg: vlm.VLMConfig, seed: int) -> vlm.NVILA:
    """NVILA with NumPy random parameters (LayerNorm/RMSNorm scales near 1, all else ~0.1)."""
    abstract = nnx.eval_shape(lambda: vlm.NVILA(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(seed)

    def fill(path, v):
        x = 0.1 * rng.normal(size=v.shape).astype(np.float32)
        return jnp.asarray(x + 1.0 if "scale" in jax.tree_util.keystr(path) else x)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


@nnx.jit
def _video_logits(model: vlm.NVILA, ids: jax.Array, frames: jax.Array) -> jax.Array:
    return model(ids, model.encode_video(frames))


def test_save_load_round_trip(tmp_path):
    cfg = vlm.VLMConfig.preset("tiny", frames_per_group=3, media_token_id=500)
    model = _random_nvila(cfg, seed=1)
    save_nvila(model, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "llm", "mm_projector", "vision_tower"]
    projector_sd = safetensors.numpy.load_file(str(tmp_path / "mm_projector/model.safetensors"))
    assert set(projector_sd) == {f"layers.{i}.{p}" for i in (1, 2, 4) for p in ("weight", "bias")}
    # the state-dict converter reads the same key table as load_nvila
    prefixed = {f"mm_projector.{k}": v for k, v in projector_sd.items()}
    projector = projector_from_state_dict(prefixed, "vila_2x2", prefix="mm_projector.")
    a, b = _state(model.projector), _state(projector)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    loaded = load_nvila(tmp_path)
    assert loaded.cfg == cfg
    a, b = _state(model), _state(loaded)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)

    frames = jax.random.normal(jax.random.key(0), (3, 56, 56, 3), jnp.float32)
    n = cfg.video_length(3)
    ids = np.full((1, n + 4), 7, np.int32)
    ids[0, 2 : 2 + n] = cfg.media_token_id
    ids = jnp.asarray(ids)
    np.testing.assert_array_equal(
        np.asarray(_video_logits(loaded, ids, frames)),
        np.asarray(_video_logits(model, ids, frames)),
    )

    bf16 = load_nvila(tmp_path, dtype=jnp.bfloat16)
    assert bf16.projector.linear_1.kernel[...].dtype == jnp.bfloat16


@pytest.fixture(scope="module")
def saved_tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("nvila_tiny")
    save_nvila(_random_nvila(vlm.VLMConfig.preset("tiny"), seed=0), path)
    return path


def _copy(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


def test_errors(saved_tiny, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_nvila(tmp_path / "nope")

    bad = _copy(saved_tiny, tmp_path / "no_vt")
    import shutil

    shutil.rmtree(bad / "vision_tower")
    with pytest.raises(CheckpointError, match="missing sub-directory vision_tower/"):
        load_nvila(bad)

    bad = _copy(saved_tiny, tmp_path / "no_cfg")
    os.remove(bad / "mm_projector" / "config.json")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_nvila(bad)

    bad = _copy(saved_tiny, tmp_path / "no_top")
    os.remove(bad / "config.json")
    with pytest.raises(CheckpointError, match="no config.json"):
        load_nvila(bad)

    bad = _copy(saved_tiny, tmp_path / "proj3x3")
    with open(bad / "mm_projector" / "config.json") as f:
        pcfg = json.load(f)
    pcfg["mm_projector_type"] = "mlp_downsample_3x3_fix"
    with open(bad / "mm_projector" / "config.json", "w") as f:
        json.dump(pcfg, f)
    with pytest.raises(CheckpointError, match="unsupported mm_projector_type") as e:
        load_nvila(bad)
    assert "\n" not in str(e.value)

    bad = _copy(saved_tiny, tmp_path / "s2")
    _edit_top(bad, s2=True, s2_scales="56,112")
    with pytest.raises(CheckpointError, match="S2 \\(non-dynamic\\)"):
        load_nvila(bad)

    bad = _copy(saved_tiny, tmp_path / "wide_proj")  # 4kC projector without dynamic_s2
    _write_projector(bad, np.random.default_rng(0), c=32, k=2, d=64)
    with pytest.raises(CheckpointError, match="projector input 256"):
        load_nvila(bad)

    bad = _copy(saved_tiny, tmp_path / "missing_tensor")
    file = str(bad / "mm_projector" / "model.safetensors")
    tensors = safetensors.numpy.load_file(file)
    del tensors["layers.4.weight"]
    safetensors.numpy.save_file(tensors, file)
    with pytest.raises(CheckpointError, match="layers.4.weight"):
        load_nvila(bad)


def _edit_top(path, **fields) -> None:
    with open(path / "config.json") as f:
        top = json.load(f)
    top.update(fields)
    with open(path / "config.json", "w") as f:
        json.dump(top, f)


def _write_projector(path, rng, *, c: int, k: int, d: int) -> dict[str, np.ndarray]:
    """VILA mlp_downsample_2x2_fix weights for k concatenated scales (input 4kC)."""

    def r(*shape, mean=0.0):
        return (mean + 0.2 * rng.normal(size=shape)).astype(np.float32)

    w = {
        "layers.1.weight": r(4 * k * c, mean=1.0),
        "layers.1.bias": r(4 * k * c),
        "layers.2.weight": r(d, 4 * k * c),
        "layers.2.bias": r(d),
        "layers.4.weight": r(d, d),
        "layers.4.bias": r(d),
    }
    safetensors.numpy.save_file(w, str(path / "mm_projector" / "model.safetensors"))
    return w


def test_dynamic_s2_projector_folds_for_single_tile_input(saved_tiny, tmp_path):
    """dynamic_s2: VILA repeats a single tile's C features k times before the 4kC projector."""
    from jaxstack.models.nvila_connector import space_to_channel, tokens_to_map

    path = _copy(saved_tiny, tmp_path / "dyn_s2")
    _edit_top(path, dynamic_s2=True, s2_scales="56,112,168", mm_hidden_size=96)
    c, k, d = 32, 3, 64
    w = _write_projector(path, np.random.default_rng(7), c=c, k=k, d=d)
    model = load_nvila(path)
    frames = jax.random.normal(jax.random.key(3), (2, 56, 56, 3), jnp.float32)
    feats = np.asarray(model.vision_tower(frames), np.float64)  # [T, 16, C]
    rep = np.concatenate([feats] * k, axis=-1)  # merge_features_for_dynamic_s2, block None
    x = np.asarray(space_to_channel(tokens_to_map(jnp.asarray(rep)), 2), np.float64)
    x = x.reshape(2, -1, 4 * k * c)
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    h = (x - mu) / np.sqrt(var + 1e-5) * w["layers.1.weight"] + w["layers.1.bias"]
    h = h @ w["layers.2.weight"].T.astype(np.float64) + w["layers.2.bias"]
    h = torch.nn.functional.gelu(torch.from_numpy(h)).numpy()  # exact GELU
    ref = h @ w["layers.4.weight"].T.astype(np.float64) + w["layers.4.bias"]
    got = model.encode_images(frames)
    assert got.shape == (2, 4, d)
    assert _rel(got, ref) <= TOL
