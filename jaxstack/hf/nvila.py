"""Load and save NVILA checkpoints in VILA's released layout (e.g. Efficient-Large-Model/NVILA-*).

model = load_nvila("path/to/NVILA", dtype=jnp.bfloat16, mesh=mesh)
save_nvila(model, "runs/x/nvila")

Layout (VILA `llava/model/llava_arch.py` `save_pretrained`): a directory with a top-level
`config.json` (model_type "llava_llama", architectures ["LlavaLlamaModel"], `llm_cfg`,
`vision_tower_cfg`, `mm_projector_cfg`, `mm_vision_select_layer`, `video_encoder`, ...) and
three transformers-style sub-directories, each with its own config.json + safetensors:
  llm/           Qwen2ForCausalLM (also Llama/Qwen3 via `jaxstack.hf.llm`) + the tokenizer
  vision_tower/  SiglipVisionModel (keys with or without the `vision_model.` prefix)
  mm_projector/  model_type "v2l_projector", `mm_projector_type` "mlp_downsample_2x2_fix"

Projector keys (VILA `base_projector.py`, `mlp_downsample_2x2_fix` is
nn.Sequential(DownSample2x2BlockFix, LayerNorm(4C), Linear(4C, D), GELU, Linear(D, D)), so the
weightless downsample block is index 0 and GELU index 3): `layers.1.{weight,bias}` (LayerNorm),
`layers.2.{weight,bias}` (Linear 4C -> D, [D, 4C]), `layers.4.{weight,bias}` (Linear D -> D);
the table is `jaxstack.hf.nvila_projector.PROJECTOR_KEYS["vila_2x2"]`, shared with the
state-dict converter `projector_from_state_dict`. Only the 2x2 projector is supported here.

Dynamic-S2 checkpoints (NVILA-8B/15B: `dynamic_s2` true, `s2_scales` "448,896,1344") feed the
projector the channel concatenation of k = len(s2_scales) scales (mm_hidden_size k * C, LN over
4kC). `NVILA` models single-scale input only: a frame or image given as one 448 tile, which VILA
runs with block size None, so `merge_features_for_dynamic_s2` repeats its C features k times
(in VILA's code video frames take this path: `encode_images` without block sizes; not
checked against a released checkpoint here). For such repeated input the projector folds exactly
(LayerNorm statistics of a repeated vector are unchanged) into a 4C one: LN scale 1, bias 0,
W1'[:, p, c] = sum_s W1[:, p, s, c] * ln_w[p, s, c], b1' = b1 + W1 @ ln_b, with channel index
(p, s, c) = p * kC + s * C + c of the 2x2 space-to-channel output. `load_nvila` applies this
fold, so such a model is exact for videos and single-tile images but does not implement the
multi-scale tiling of Dynamic-S2 images, and `save_nvila` then writes the folded single-scale
projector. Plain (non-dynamic) S2 checkpoints raise CheckpointError.

Config mapping: `VLMConfig.vision` from vision_tower/config.json, `.llm` from llm/config.json
(`jaxstack.hf.llm_config.config_from_hf`), `select_layer` from `mm_vision_select_layer`
(default -2), `frames_per_group` from `video_encoder` (TSPVideoEncoder `pool_sizes[0][0]`;
BasicVideoEncoder -> 1; absent -> 8). Token ids, first match wins:
  media_token_id:     keyword argument; the "<image>" token of llm/tokenizer.json or
                      llm/tokenizer_config.json (VILA appends "<image>", "<vila/video>" as added
                      tokens); top-level `media_token_id` (written by `save_nvila`); 151649.
  separator_token_id: keyword argument; "\\n" in the tokenizer (byte-level BPE spells it "Ċ";
                      198 for Qwen2); top-level `separator_token_id`; 198.
Each VLMConfig model takes one placeholder id repeated once per media row (VILA instead expands
one "<image>"/"<vila/video>" token); pass `media_token_id=` to pick the video token instead.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.hf import siglip as hf_siglip
from jaxstack.hf.errors import CheckpointError
from jaxstack.hf.llm import load_weights, save_model
from jaxstack.hf.llm_config import config_from_hf, config_to_hf, read_hf_config
from jaxstack.hf.nvila_projector import projector_key_for
from jaxstack.hf.params_io import (
    check_shapes,
    is_variable,
    named_params,
    param_path,
    param_sharding,
    read_params,
    to_host,
)
from jaxstack.hf.safetensors_io import (
    SINGLE_FILE,
    CheckpointReader,
    remove_checkpoint_files,
    write_safetensors,
)
from jaxstack.models.siglip import SiglipConfig
from jaxstack.models.vlm import NVILA, VLMConfig

SUBDIRS = ("llm", "vision_tower", "mm_projector")
PROJECTOR_TYPE = "mlp_downsample_2x2_fix"
DEFAULT_MEDIA_TOKEN = "<image>"
_DEFAULT_IDS = {"media_token_id": 151649, "separator_token_id": 198}

# Projector2x2 parameter path -> (VILA key, transpose?) of `mlp_downsample_2x2_fix`.
_projector_key = projector_key_for("vila_2x2")


def _subdirs(path: str) -> dict[str, str]:
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    out = {}
    for name in SUBDIRS:
        sub = os.path.join(path, name)
        if not os.path.isdir(sub):
            raise CheckpointError(
                f"{path}: missing sub-directory {name}/ (NVILA layout: llm/, vision_tower/, "
                "mm_projector/)"
            )
        out[name] = sub
    return out


def _json_field(value: Any) -> Any:
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return None
    return value


def _frames_per_group(top: dict[str, Any], source: str) -> int:
    enc = _json_field(top.get("video_encoder"))
    if not isinstance(enc, dict):
        return 8
    target = str(enc.get("_target_", ""))
    if target.endswith("BasicVideoEncoder"):
        return 1
    try:
        return int(enc["pool_sizes"][0][0])
    except (KeyError, IndexError, TypeError, ValueError):
        raise CheckpointError(
            f"{source}: unsupported video_encoder {enc!r} (need TSP pool_sizes [[t, 1, 1]])"
        ) from None


def _tokenizer_ids(llm_dir: str) -> dict[str, int]:
    """{"<image>": id, "\\n": id, ...} from llm/tokenizer.json / tokenizer_config.json."""
    ids: dict[str, int] = {}
    tok_cfg = os.path.join(llm_dir, "tokenizer_config.json")
    if os.path.isfile(tok_cfg):
        try:
            with open(tok_cfg) as f:
                decoder = json.load(f).get("added_tokens_decoder") or {}
            ids.update({v["content"]: int(k) for k, v in decoder.items()})
        except (OSError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            pass
    tok = os.path.join(llm_dir, "tokenizer.json")
    if os.path.isfile(tok):
        try:
            with open(tok) as f:
                data = json.load(f)
            vocab = (data.get("model") or {}).get("vocab") or {}
            if isinstance(vocab, dict):
                for text in ("\n", "Ċ"):  # "Ċ": byte-level BPE spelling of "\n"
                    if text in vocab:
                        ids.setdefault("\n", int(vocab[text]))
            ids.update({t["content"]: int(t["id"]) for t in data.get("added_tokens") or []})
        except (OSError, json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
            pass
    vocab_file = os.path.join(llm_dir, "vocab.json")
    if "\n" not in ids and os.path.isfile(vocab_file):
        try:
            with open(vocab_file) as f:
                vocab = json.load(f)
            for text in ("\n", "Ċ"):
                if text in vocab:
                    ids.setdefault("\n", int(vocab[text]))
        except (OSError, json.JSONDecodeError, TypeError, ValueError):
            pass
    return ids


def _token_id(name: str, explicit: int | None, tokens: dict, token: str, top: dict) -> int:
    if explicit is not None:
        return int(explicit)
    if token in tokens:
        return tokens[token]
    if top.get(name) is not None:
        return int(top[name])
    return _DEFAULT_IDS[name]


def nvila_config_from_dir(
    path: str | os.PathLike,
    *,
    media_token_id: int | None = None,
    separator_token_id: int | None = None,
) -> VLMConfig:
    """VLMConfig of an NVILA checkpoint directory (see the module docstring for the mapping)."""
    path = os.fspath(path)
    dirs = _subdirs(path)
    top_file = os.path.join(path, "config.json")
    top = read_hf_config(path)
    vision = hf_siglip.siglip_config_from_hf(
        read_hf_config(dirs["vision_tower"]),
        source=os.path.join(dirs["vision_tower"], "config.json"),
    )
    llm = config_from_hf(
        read_hf_config(dirs["llm"]), source=os.path.join(dirs["llm"], "config.json")
    )
    proj_file = os.path.join(dirs["mm_projector"], "config.json")
    proj = read_hf_config(dirs["mm_projector"])
    ptype = proj.get("mm_projector_type")
    if ptype != PROJECTOR_TYPE:
        raise CheckpointError(
            f"{proj_file}: unsupported mm_projector_type {ptype!r}; only {PROJECTOR_TYPE!r} (2x2)"
        )
    feature = top.get("mm_vision_select_feature", "cls_patch")
    if feature != "cls_patch":
        raise CheckpointError(
            f"{top_file}: mm_vision_select_feature {feature!r} unsupported (SigLIP: cls_patch)"
        )
    _s2_repeat(top, top_file)  # validates the S2 settings
    tokens = _tokenizer_ids(dirs["llm"])
    try:
        return VLMConfig(
            vision=vision,
            llm=llm,
            projector="2x2",
            frames_per_group=_frames_per_group(top, top_file),
            media_token_id=_token_id(
                "media_token_id", media_token_id, tokens, DEFAULT_MEDIA_TOKEN, top
            ),
            separator_token_id=_token_id(
                "separator_token_id", separator_token_id, tokens, "\n", top
            ),
            select_layer=int(top.get("mm_vision_select_layer", -2)),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{top_file}: {e}") from None


def _s2_repeat(top: dict[str, Any], source: str) -> int:
    """k = number of Dynamic-S2 scales (1 without S2); plain S2 raises CheckpointError."""
    if top.get("s2") and not top.get("dynamic_s2"):
        raise CheckpointError(
            f"{source}: S2 (non-dynamic) checkpoints are unsupported; only single-scale or "
            "Dynamic-S2 (folded to single-tile input) 2x2 NVILA"
        )
    if not top.get("dynamic_s2"):
        return 1
    scales = top.get("s2_scales")
    try:
        if isinstance(scales, str):
            scales = [int(x) for x in scales.split(",") if x.strip()]
        k = len(scales)
    except (TypeError, ValueError):
        raise CheckpointError(
            f"{source}: dynamic_s2 with unreadable s2_scales {scales!r}"
        ) from None
    if k < 1:
        raise CheckpointError(f"{source}: dynamic_s2 with empty s2_scales")
    return k


def _fold_s2(reader: CheckpointReader, c: int, k: int) -> dict[str, np.ndarray]:
    """Projector2x2 values (jaxstack layout) of a k-scale projector fed k repeats of C features."""

    def full(key: str) -> np.ndarray:
        shape = reader.shape(key)
        return np.asarray(reader.read(key, tuple(slice(0, n) for n in shape)), np.float64)

    ln_w = full("layers.1.weight").reshape(4, k, c)
    ln_b = full("layers.1.bias")
    w1, b1 = full("layers.2.weight"), full("layers.2.bias")  # [D, 4kC]
    d = w1.shape[0]
    w1_fold = (w1.reshape(d, 4, k, c) * ln_w[None]).sum(axis=2).reshape(d, 4 * c)
    return {
        "layer_norm.scale": np.ones((4 * c,)),
        "layer_norm.bias": np.zeros((4 * c,)),
        "linear_1.kernel": w1_fold.T,
        "linear_1.bias": b1 + w1 @ ln_b,
        "linear_2.kernel": full("layers.4.weight").T,
        "linear_2.bias": full("layers.4.bias"),
    }


def _load_projector(model: NVILA, path: str, mesh: Any, s2_repeat: int = 1) -> None:
    """Fill model.projector (abstract) from mm_projector/ safetensors, in place."""
    graphdef, state = nnx.split(model.projector)
    cfg_file = os.path.join(path, "config.json")
    c = model.cfg.vision.hidden_size
    with CheckpointReader(path) as reader:
        found = reader.shape("layers.2.weight")
        if len(found) == 2 and found[1] == 4 * c * s2_repeat and s2_repeat > 1:
            folded = _fold_s2(reader, c, s2_repeat)
            if folded["linear_2.kernel"].shape != (found[0], found[0]):
                raise CheckpointError(f"{reader.where('layers.4.weight')}: not [D, D]")

            def put(key_path: tuple, var: nnx.Variable) -> nnx.Variable:
                value = var.get_value()
                host = folded[param_path(key_path)].astype(value.dtype)
                if host.shape != value.shape:
                    raise CheckpointError(
                        f"{reader.listing}: folded {param_path(key_path)} has shape "
                        f"{host.shape}, model expects {value.shape}"
                    )
                array = jax.make_array_from_callback(
                    value.shape, param_sharding(var, mesh), lambda idx, h=host: h[idx]
                )
                return var.replace(array)

            state = jax.tree_util.tree_map_with_path(put, state, is_leaf=is_variable)
            model.projector = nnx.merge(graphdef, state)
            return
        if len(found) == 2 and found[1] != 4 * c:
            raise CheckpointError(
                f"{reader.where('layers.2.weight')}: projector input {found[1]} is not "
                f"4 * vision hidden {c} (times the {s2_repeat} S2 scales)"
            )
        plan = check_shapes(named_params(state), reader, cfg_file, _projector_key)
        state = read_params(state, plan, reader, mesh)
    model.projector = nnx.merge(graphdef, state)


def load_nvila(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: Any = None,
    remat: str = "none",
    media_token_id: int | None = None,
    separator_token_id: int | None = None,
) -> NVILA:
    """NVILA from a VILA-layout checkpoint directory (llm/, vision_tower/, mm_projector/).

    dtype: compute dtype; param_dtype: parameter storage dtype (default: dtype). mesh:
    parameters placed by the logical-axis rules (None: first local device); each part is read
    slice by slice straight into its sharding (`load_weights`, `load_siglip`). Raises
    CheckpointError (one line) for a missing sub-directory or config, an unsupported projector
    or vision-feature setting, missing tensors and shape mismatches. Dynamic-S2 projectors are
    folded to single-scale input (module docstring).
    """
    path = os.fspath(path)
    cfg = nvila_config_from_dir(
        path, media_token_id=media_token_id, separator_token_id=separator_token_id
    )
    dirs = {name: os.path.join(path, name) for name in SUBDIRS}
    param_dtype = dtype if param_dtype is None else param_dtype
    model = nnx.eval_shape(
        lambda: NVILA(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0))
    )
    model.vision_tower = hf_siglip.load_siglip(
        dirs["vision_tower"],
        dtype=dtype,
        param_dtype=param_dtype,
        mesh=mesh,
        select_layer=cfg.select_layer,
    )
    s2_repeat = _s2_repeat(read_hf_config(path), os.path.join(path, "config.json"))
    _load_projector(model, dirs["mm_projector"], mesh, s2_repeat)
    model.llm = load_weights(
        dirs["llm"], cfg.llm, dtype=dtype, param_dtype=param_dtype, mesh=mesh, remat=remat
    )
    return model


# -- saving --------------------------------------------------------------------------------------


def siglip_config_to_hf(cfg: SiglipConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """transformers `SiglipVisionConfig` dict (model_type "siglip_vision_model")."""
    return {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.mlp_dim,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_channels": cfg.num_channels,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "vision_use_head": False,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def _write_part(
    module: nnx.Module,
    path: str,
    hf_cfg: dict[str, Any],
    key_for: Callable[[str], tuple[str, tuple[int, ...] | None]],
    dtype: Any,
    writer: bool,
) -> None:
    """One-file safetensors + config.json of `module`'s params (key_for -> key, permutation)."""
    specs, getters = [], []
    for name, var in named_params(nnx.state(module, nnx.Param)):
        key, perm = key_for(name)
        array = var.get_value()
        np_dtype = np.dtype(array.dtype if dtype is None else dtype)
        shape = tuple(array.shape)
        if perm is not None:  # array axis j is file axis perm[j]
            inv = tuple(perm.index(a) for a in range(len(perm)))
            shape = tuple(shape[i] for i in inv)
        else:
            inv = None

        def get(a=array, inv=inv, d=np_dtype) -> np.ndarray:
            host = to_host(a)
            return (host if inv is None else host.transpose(inv)).astype(d)

        specs.append((key, shape, np_dtype))
        getters.append(get)
    order = sorted(range(len(specs)), key=lambda i: specs[i][0])
    arrays = (getters[i]() for i in order)
    if not writer:
        for _ in arrays:  # join the collective gathers
            pass
        return
    os.makedirs(path, exist_ok=True)
    remove_checkpoint_files(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    write_safetensors(os.path.join(path, SINGLE_FILE), [specs[i] for i in order], arrays)


def _siglip_key(path: str) -> tuple[str, tuple[int, ...] | None]:
    key, perm = hf_siglip.hf_key_for(path)
    return "vision_model." + key, perm


def _projector_key_perm(path: str) -> tuple[str, tuple[int, ...] | None]:
    key, transpose = _projector_key(path)
    return key, ((1, 0) if transpose else None)


def save_nvila(model: NVILA, path: str | os.PathLike, *, dtype: Any = None) -> None:
    """Write `model` in VILA's NVILA layout (readable by `load_nvila`).

    llm/ via `save_model` (transformers layout), vision_tower/ as a SiglipVisionModel (keys
    under `vision_model.`, as VILA/transformers 4 write them), mm_projector/ with the
    `layers.{1,2,4}` keys, and a top-level config.json (model_type "llava_llama") that also
    records `media_token_id` / `separator_token_id`. No tokenizer is written. dtype: storage
    dtype (default: each parameter's own). With several processes every process must call it.
    """
    path = os.fspath(path)
    cfg = model.cfg
    writer = jax.process_index() == 0
    first = jax.tree_util.tree_leaves(nnx.state(model.llm, nnx.Param))[0]
    dtype_name = np.dtype(first.dtype if dtype is None else dtype).name
    save_model(model.llm, os.path.join(path, "llm"), dtype=dtype)
    vision_cfg = siglip_config_to_hf(cfg.vision, dtype=dtype_name)
    _write_part(
        model.vision_tower,
        os.path.join(path, "vision_tower"),
        vision_cfg,
        _siglip_key,
        dtype,
        writer,
    )
    proj_cfg = {
        "architectures": ["MultimodalProjector"],
        "model_type": "v2l_projector",
        "mm_projector_type": PROJECTOR_TYPE,
        "torch_dtype": dtype_name,
    }
    _write_part(
        model.projector,
        os.path.join(path, "mm_projector"),
        proj_cfg,
        _projector_key_perm,
        dtype,
        writer,
    )
    if writer:
        top = {
            "architectures": ["LlavaLlamaModel"],
            "model_type": "llava_llama",
            "llm_cfg": config_to_hf(cfg.llm, dtype=dtype_name),
            "vision_tower_cfg": vision_cfg,
            "mm_projector_cfg": proj_cfg,
            "hidden_size": cfg.llm.hidden_size,
            "mm_hidden_size": cfg.vision.hidden_size,
            "mm_vision_select_layer": cfg.select_layer,
            "mm_vision_select_feature": "cls_patch",
            "image_aspect_ratio": "resize",
            "dynamic_s2": False,
            "s2": False,
            "image_encoder": json.dumps({"_target_": "llava.model.encoders.BasicImageEncoder"}),
            "video_encoder": json.dumps(
                {
                    "_target_": "llava.model.encoders.TSPVideoEncoder",
                    "pool_sizes": [[cfg.frames_per_group, 1, 1]],
                }
            ),
            "media_token_id": cfg.media_token_id,
            "separator_token_id": cfg.separator_token_id,
            "model_dtype": f"torch.{dtype_name}",
        }
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(top, f, indent=2, sort_keys=True)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"jaxstack.hf.save_nvila:{path}")


__all__ = [
    "load_nvila",
    "nvila_config_from_dir",
    "save_nvila",
    "siglip_config_to_hf",
]
