"""Load transformers SigLIP vision checkpoints into `jaxstack.models.siglip.SiglipVisionTower`.

tower = load_siglip("path/to/siglip-so400m-patch14-448", dtype=jnp.bfloat16, mesh=mesh)
features_bnd = tower(pixels_bhwc)  # hidden_states[-2], NHWC input

Accepted: a `SiglipVisionModel` directory (config.json model_type "siglip_vision_model"; keys
`embeddings.*`, `encoder.layers.{i}.*`, `post_layernorm.*`, optionally under `vision_model.`)
or a full `SiglipModel` (model_type "siglip" with a `vision_config`; keys under
`vision_model.`). The attention-pooling head and the text tower are not loaded. As in
`jaxstack.hf.llm`, the model is built abstractly (`nnx.eval_shape`) and every parameter is
read straight into its sharding, each device reading only its own block.
"""

from __future__ import annotations

import os
import re
import warnings
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxstack.hf.errors import CheckpointError
from jaxstack.hf.llm_config import read_hf_config
from jaxstack.hf.params_io import check_shapes, named_params, read_params
from jaxstack.hf.safetensors_io import CheckpointReader
from jaxstack.models.siglip import SiglipConfig, SiglipVisionTower

# transformers SiglipVisionConfig defaults (used for fields a config.json leaves out).
_HF_DEFAULTS = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
}
_PREFIXES = ("", "vision_model.")

# jaxstack parameter path -> (HF key without prefix, permutation applied to the HF tensor).
_T = (1, 0)  # torch Linear weight [out, in] -> kernel [in, out]
_CONV = (2, 3, 1, 0)  # torch Conv2d weight [out, in, kh, kw] -> kernel [kh, kw, in, out]
_FIXED = {
    "embeddings.kernel": ("embeddings.patch_embedding.weight", _CONV),
    "embeddings.bias": ("embeddings.patch_embedding.bias", None),
    "embeddings.position_embedding": ("embeddings.position_embedding.weight", None),
    "post_layernorm.scale": ("post_layernorm.weight", None),
    "post_layernorm.bias": ("post_layernorm.bias", None),
}
_LAYER = re.compile(
    r"layers\.(?P<i>\d+)\.(?:(?P<ln>layer_norm[12])\.(?P<ln_p>scale|bias)"
    r"|(?P<mod>self_attn\.(?:[qkv]_proj|out_proj)|mlp\.fc[12])\.(?P<p>kernel|bias))"
)


def hf_key_for(param_path: str) -> tuple[str, tuple[int, ...] | None]:
    """(HF key without prefix, permutation or None) for a SiglipVisionTower parameter path."""
    if param_path in _FIXED:
        return _FIXED[param_path]
    m = _LAYER.fullmatch(param_path)
    if m is None:
        raise KeyError(f"no HF key for SigLIP parameter {param_path!r}")
    base = f"encoder.layers.{m['i']}."
    if m["ln"]:
        return base + f"{m['ln']}.{'weight' if m['ln_p'] == 'scale' else 'bias'}", None
    if m["p"] == "kernel":
        return base + f"{m['mod']}.weight", _T
    return base + f"{m['mod']}.bias", None


def siglip_config_from_hf(hf: dict[str, Any], *, source: str = "config.json") -> SiglipConfig:
    """SiglipConfig from a parsed transformers config (vision-only or full SigLIP)."""
    model_type = hf.get("model_type")
    if model_type == "siglip":
        if not isinstance(hf.get("vision_config"), dict):
            raise CheckpointError(f"{source}: model_type 'siglip' without a vision_config")
        vision = hf["vision_config"]
    elif model_type == "siglip_vision_model":
        vision = hf
    else:
        raise CheckpointError(
            f"{source}: unsupported model_type {model_type!r}; expected "
            "'siglip_vision_model' or 'siglip'"
        )
    v = {**_HF_DEFAULTS, **vision}
    if v["hidden_act"] != "gelu_pytorch_tanh":
        raise CheckpointError(
            f"{source}: unsupported hidden_act {v['hidden_act']!r} (only gelu_pytorch_tanh)"
        )
    try:
        return SiglipConfig(
            hidden_size=int(v["hidden_size"]),
            num_layers=int(v["num_hidden_layers"]),
            num_heads=int(v["num_attention_heads"]),
            mlp_dim=int(v["intermediate_size"]),
            image_size=int(v["image_size"]),
            patch_size=int(v["patch_size"]),
            num_channels=int(v["num_channels"]),
            layer_norm_eps=float(v["layer_norm_eps"]),
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid SigLIP vision config ({e})") from None


def _prefix(reader: CheckpointReader) -> str:
    keys = reader.keys()
    for prefix in _PREFIXES:
        if prefix + "embeddings.patch_embedding.weight" in keys:
            return prefix
    raise CheckpointError(
        f"{reader.listing}: no SigLIP vision tensors (looked for "
        f"{[p + 'embeddings.patch_embedding.weight' for p in _PREFIXES]})"
    )


def load_siglip(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    select_layer: int = -2,
) -> SiglipVisionTower:
    """SiglipVisionTower from a transformers SigLIP checkpoint directory.

    dtype: compute dtype; param_dtype: parameter storage dtype (default: dtype), cast from the
    file's dtype. mesh: parameters placed by the logical-axis rules (None: first local device).
    select_layer: index into HF `hidden_states` returned by `tower(pixels)` (-2 = NVILA).
    Raises CheckpointError for missing/corrupt files, unsupported configs, missing tensors and
    shape mismatches; warns about unused vision tensors (the pooling head is skipped silently).
    """
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    cfg = siglip_config_from_hf(read_hf_config(path), source=cfg_file)
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = nnx.eval_shape(
        lambda: SiglipVisionTower(
            cfg,
            select_layer=select_layer,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
        )
    )
    graphdef, state = nnx.split(abstract)
    with CheckpointReader(path) as reader:
        prefix = _prefix(reader)

        def key_for(param_path: str) -> tuple[str, tuple[int, ...] | None]:
            key, perm = hf_key_for(param_path)
            return prefix + key, perm

        plan = check_shapes(named_params(state), reader, cfg_file, key_for)
        used = {k for k, _ in plan.values()}
        unused = sorted(
            k
            for k in reader.keys() - used
            if k.startswith(prefix) and not k[len(prefix) :].startswith("head.")
        )
        if unused:
            warnings.warn(
                f"{reader.listing}: {len(unused)} SigLIP tensors not used, e.g. {unused[:3]}",
                stacklevel=2,
            )
        state = read_params(state, plan, reader, mesh)
    return nnx.merge(graphdef, state)
