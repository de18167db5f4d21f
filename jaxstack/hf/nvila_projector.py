"""NVILA projector weights: the checkpoint key tables and the state-dict converter.

One table per layout maps a jaxstack projector parameter path to (checkpoint key, transpose?);
torch Linear weights [out, in] are transposed into kernels [in, out]. `load_nvila` /
`save_nvila` (`jaxstack.hf.nvila`) read and write the "vila_2x2" table from safetensors;
`projector_from_state_dict` builds a projector from an in-memory state dict (torch tensors or
NumPy arrays) with any of the tables.

Layouts:
  vila_2x2  VILA `llava/model/multimodal_projector/base_projector.py` `mlp_downsample_2x2_fix`:
            nn.Sequential(DownSample2x2BlockFix, LayerNorm(4C), Linear(4C, D), GELU,
            Linear(D, D)), keys `layers.{1,2,4}.{weight,bias}` -> `Projector2x2`.
  vila_3x3  VILA `mlp_downsample_3x3_fix` (NVILA-Lite): LayerNorm(9C), Linear(9C, 3C), GELU,
            LayerNorm(3C), Linear(3C, D), GELU, Linear(D, D) at `layers.{1,2,4,5,7}`
            -> `Projector3x3`.
  internvl  transformers `InternVLMultiModalProjector` (the same math as vila_2x2), keys
            `layer_norm`, `linear_1`, `linear_2` -> `Projector2x2`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.hf.params_io import is_variable, param_path
from jaxstack.models.nvila_connector import Projector2x2, Projector3x3


def _linear(name: str, key: str) -> dict[str, tuple[str, bool]]:
    return {f"{name}.kernel": (f"{key}.weight", True), f"{name}.bias": (f"{key}.bias", False)}


def _norm(name: str, key: str) -> dict[str, tuple[str, bool]]:
    return {f"{name}.scale": (f"{key}.weight", False), f"{name}.bias": (f"{key}.bias", False)}


# layout -> {projector parameter path: (checkpoint key, transpose?)}
PROJECTOR_KEYS: dict[str, dict[str, tuple[str, bool]]] = {
    "vila_2x2": {
        **_norm("layer_norm", "layers.1"),
        **_linear("linear_1", "layers.2"),
        **_linear("linear_2", "layers.4"),
    },
    "vila_3x3": {
        **_norm("norm_1", "layers.1"),
        **_linear("linear_1", "layers.2"),
        **_norm("norm_2", "layers.4"),
        **_linear("linear_2", "layers.5"),
        **_linear("linear_3", "layers.7"),
    },
    "internvl": {
        **_norm("layer_norm", "layer_norm"),
        **_linear("linear_1", "linear_1"),
        **_linear("linear_2", "linear_2"),
    },
}
# layout -> (module, space-to-channel factor f, first LayerNorm [f*f*C], last Linear [D, D])
_MODULES = {
    "vila_2x2": (Projector2x2, 2, "layer_norm.scale", "linear_2.kernel"),
    "vila_3x3": (Projector3x3, 3, "norm_1.scale", "linear_3.kernel"),
    "internvl": (Projector2x2, 2, "layer_norm.scale", "linear_2.kernel"),
}


def projector_key_for(layout: str = "vila_2x2") -> Callable[[str], tuple[str, bool]]:
    """`key_for(param_path) -> (checkpoint key, transpose?)` of a layout (ValueError for an
    unknown layout; the returned function raises KeyError for an unknown parameter path)."""
    if layout not in PROJECTOR_KEYS:
        raise ValueError(f"unknown projector layout {layout!r}; known: {sorted(PROJECTOR_KEYS)}")
    keys = PROJECTOR_KEYS[layout]

    def key_for(path: str) -> tuple[str, bool]:
        if path not in keys:
            raise KeyError(f"no {layout} key for projector parameter {path!r}")
        return keys[path]

    return key_for


def _to_numpy(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor
        t = t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def projector_from_state_dict(
    state_dict: Mapping[str, Any],
    layout: str = "vila_2x2",
    *,
    prefix: str = "",
    dtype: Any = jnp.float32,
) -> Projector2x2 | Projector3x3:
    """A `Projector2x2` / `Projector3x3` filled from a projector state dict.

    state_dict: key -> torch tensor or array (float32 parameters); only keys starting with
    `prefix` (e.g. "multi_modal_projector." or "mm_projector.") are used, the prefix removed.
    layout: "vila_2x2", "vila_3x3" or "internvl" (module docstring). Vision width C and LLM
    width D are read from the first LayerNorm [f*f*C] and the last Linear [D, D]. dtype: the
    module's compute dtype. Raises KeyError for missing keys, ValueError for wrong shapes.
    """
    key_for = projector_key_for(layout)
    module, factor, first_norm, last_linear = _MODULES[layout]
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    missing = [k for k, _ in PROJECTOR_KEYS[layout].values() if k not in sd]
    if missing:
        raise KeyError(
            f"{layout} projector state dict lacks {missing} (prefix {prefix!r}); "
            f"has {sorted(state_dict)}"
        )
    vision_width = _to_numpy(sd[key_for(first_norm)[0]]).shape[0]
    if vision_width % (factor * factor):
        raise ValueError(f"first LayerNorm width {vision_width} is not {factor * factor} * C")
    llm_width = _to_numpy(sd[key_for(last_linear)[0]]).shape[0]
    model = module(vision_width // (factor * factor), llm_width, dtype=dtype, rngs=nnx.Rngs(0))

    def put(key_path: tuple, var: nnx.Variable) -> nnx.Variable:
        key, transpose = key_for(param_path(key_path))
        value = _to_numpy(sd[key])
        value = value.T if transpose else value
        current = var.get_value()
        if value.shape != current.shape:
            raise ValueError(f"{prefix}{key}: shape {value.shape} != expected {current.shape}")
        return var.replace(jnp.asarray(value, current.dtype))

    state = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree_util.tree_map_with_path(put, state, is_leaf=is_variable))
    return model
