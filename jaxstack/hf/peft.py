"""PEFT LoRA adapters in and out: `adapter_config.json` + `adapter_model.safetensors`.

The layout is what `peft.PeftModel.save_pretrained` writes for a transformers causal LM, so
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)`
loads an adapter saved here, and an adapter trained with PEFT loads into a jaxstack `LLM`:

    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_A.weight   [r, in]
    base_model.model.model.layers.{i}.self_attn.{q,k,v,o}_proj.lora_B.weight   [out, r]
    base_model.model.model.layers.{i}.mlp.{gate,up,down}_proj.lora_{A,B}.weight

(the transformers module names of `jaxstack/hf/llm.py`'s KEY_TABLE, behind PEFT's
"base_model.model." prefix; jaxstack's A [in, r] / B [r, out] are these transposed). The
adapters are those of `jaxstack/lora/adapters.py`: one rank, alpha and dropout, every layer.

Supported: plain LoRA (`peft_type` LORA, scale lora_alpha / r). Anything else in a PEFT
config -- rsLoRA, DoRA, rank / alpha patterns, a subset of layers, fan-in-fan-out weights,
trained biases, `modules_to_save`, adapters on other modules -- is a one-line CheckpointError
naming the file and the field or tensor.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxstack.hf.errors import CheckpointError
from jaxstack.hf.llm import hf_key_for, param_path_for, save_model
from jaxstack.hf.params_io import read_array, to_host
from jaxstack.hf.safetensors_io import CheckpointReader, write_safetensors
from jaxstack.lora import TARGETS, LoRAConfig, apply_lora, lora_config, lora_layers, merge_lora
from jaxstack.models.llm import LLM

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PEFT's wrapper (PeftModel.base_model.model is the LLM)
_KEY = re.compile(re.escape(PREFIX) + r"(?P<module>.+)\.lora_(?P<ab>[AB])\.weight")

# PEFT config fields whose non-default values jaxstack cannot reproduce: name -> test of the
# value that is fine (absent fields take PEFT's defaults, which all pass).
_UNSUPPORTED: dict[str, Any] = {
    "use_rslora": lambda v: not v,
    "use_dora": lambda v: not v,
    "fan_in_fan_out": lambda v: not v,
    "lora_bias": lambda v: not v,
    "bias": lambda v: v in (None, "none"),
    "rank_pattern": lambda v: not v,
    "alpha_pattern": lambda v: not v,
    "layers_to_transform": lambda v: v is None,
    "modules_to_save": lambda v: not v,
    "target_parameters": lambda v: not v,
    "trainable_token_indices": lambda v: not v,
    "use_qalora": lambda v: not v,
    "layer_replication": lambda v: not v,
}


def _module_name(path: tuple) -> str:
    """transformers module name ("model.layers.0.self_attn.q_proj") of a LoRALinear path."""
    key, _ = hf_key_for(".".join(map(str, path)) + ".kernel")
    return key.removesuffix(".weight")


def adapter_config(cfg: LoRAConfig, base_model_name_or_path: str | None = None) -> dict:
    """The adapter_config.json dict PEFT reads back as a `LoraConfig` for `cfg`."""
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": cfg.rank,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.targets),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "revision": None,
    }


def _check_llm(model: Any, what: str) -> None:
    if not isinstance(model, LLM):
        raise TypeError(f"{what}: PEFT adapters are for jaxstack.models.llm.LLM, got {model!r}")


def save_peft_adapter(
    model: LLM,
    path: str | os.PathLike,
    *,
    base_model_name_or_path: str | None = None,
    dtype: Any = None,
) -> None:
    """Write `model`'s LoRA adapters (`jaxstack.lora.apply_lora`) as a PEFT adapter folder.

    path gets adapter_config.json (r, lora_alpha, lora_dropout, target_modules, task_type
    CAUSAL_LM, base_model_name_or_path) and adapter_model.safetensors (lora_A [r, in] and
    lora_B [out, r] per adapted module, PEFT's key names). dtype: storage dtype (default the
    adapters' own, float32). With several processes every process must call this (adapters
    are gathered collectively); process 0 writes. ValueError if the model has no adapters.
    """
    _check_llm(model, "save_peft_adapter")
    path = os.fspath(path)
    cfg = lora_config(model)
    if cfg is None:
        raise ValueError("save_peft_adapter: the model has no LoRA adapters (apply_lora)")
    specs, arrays = [], []
    for layer_path, layer in lora_layers(model):
        module = PREFIX + _module_name(layer_path)
        for ab, var in (("A", layer.lora_a), ("B", layer.lora_b)):
            host = to_host(var.get_value()).T  # jaxstack [in, r] / [r, out] -> PEFT layout
            host = np.ascontiguousarray(host if dtype is None else host.astype(dtype))
            specs.append((f"{module}.lora_{ab}.weight", host.shape, host.dtype))
            arrays.append(host)
    if jax.process_index() == 0:
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, CONFIG_FILE), "w") as f:
            json.dump(adapter_config(cfg, base_model_name_or_path), f, indent=2, sort_keys=True)
        write_safetensors(os.path.join(path, WEIGHTS_FILE), specs, arrays, {"format": "pt"})
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxstack.hf.save_peft_adapter:{path}")


def read_adapter_config(path: str | os.PathLike) -> LoRAConfig:
    """The LoRAConfig of the PEFT adapter folder `path` (its adapter_config.json), with the
    targets found in its adapter_model.safetensors; CheckpointError for an unsupported or
    inconsistent adapter (one line naming the file and the field or tensor)."""
    return _read(os.fspath(path))[0]


def _read(path: str) -> tuple[LoRAConfig, dict[str, dict[str, str]]]:
    """(config, {module name: {"A": key, "B": key}}) of an adapter folder, checked."""
    file = os.path.join(path, CONFIG_FILE)
    try:
        with open(file) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise CheckpointError(f"no {CONFIG_FILE} in adapter directory {path!r}") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable ({e})") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    if raw.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{file}: peft_type {raw['peft_type']!r} is not supported (LORA)")
    for name, ok in _UNSUPPORTED.items():
        if name in raw and not ok(raw[name]):
            raise CheckpointError(f"{file}: {name}={raw[name]!r} is not supported by jaxstack")
    listed = raw.get("target_modules")
    if isinstance(listed, list | tuple):
        bad = [t for t in listed if t not in TARGETS]
        if bad:
            raise CheckpointError(
                f"{file}: target module {bad[0]!r} is not supported; jaxstack adapts "
                f"{', '.join(TARGETS)}"
            )
    modules: dict[str, dict[str, str]] = {}
    with CheckpointReader(path, single_file=WEIGHTS_FILE) as reader:
        where = reader.listing
        for key in sorted(reader.keys()):
            m = _KEY.fullmatch(key)
            param = m and param_path_for(m["module"] + ".weight")
            target = param and param.split(".")[-2]
            if not param or target not in TARGETS:
                raise CheckpointError(f"{where}: tensor {key!r} is not a supported LoRA weight")
            modules.setdefault(m["module"], {})[m["ab"]] = key
    for module, pair in modules.items():
        if set(pair) != {"A", "B"}:
            missing = "B" if "A" in pair else "A"
            raise CheckpointError(f"{where}: {module}.lora_{missing}.weight is missing")
    found = {name.rsplit(".", 1)[-1] for name in modules}
    if not found:
        raise CheckpointError(f"{where}: no LoRA tensors")
    if isinstance(listed, list | tuple) and set(listed) != found:
        raise CheckpointError(
            f"{file}: target_modules {sorted(listed)} but {where} has adapters for {sorted(found)}"
        )
    try:
        cfg = LoRAConfig(
            rank=raw.get("r", 8),
            alpha=raw.get("lora_alpha", 8),
            dropout=raw.get("lora_dropout") or 0.0,
            targets=tuple(found),
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{file}: {e}") from None
    return cfg, modules


def load_peft_adapter(
    model: LLM,
    path: str | os.PathLike,
    *,
    mesh: Any = None,
) -> LLM:
    """Load the PEFT LoRA adapter folder `path` into `model` (in place; returns it).

    A model without adapters gets them (`apply_lora` with the adapter's r, lora_alpha,
    lora_dropout and targets, placed on `mesh`); a model with adapters must match them
    (targets, rank, alpha). Every adapted module must be in every layer and every tensor's
    shape must fit the model; mismatches and unsupported PEFT features raise a one-line
    CheckpointError naming the file and the tensor or field. Values are cast to the adapters'
    dtype and keep their sharding.
    """
    _check_llm(model, "load_peft_adapter")
    path = os.fspath(path)
    cfg, modules = _read(path)
    config_file = os.path.join(path, CONFIG_FILE)
    have = lora_config(model)
    if have is None:
        apply_lora(model, cfg, mesh=mesh)
    else:
        for field, want in (("targets", cfg.targets), ("rank", cfg.rank), ("alpha", cfg.alpha)):
            if getattr(have, field) != want:
                raise CheckpointError(
                    f"{config_file}: adapter {field} {want!r} but the model's LoRA {field} is "
                    f"{getattr(have, field)!r}"
                )
    layers = {_module_name(p): layer for p, layer in lora_layers(model)}
    with CheckpointReader(path, single_file=WEIGHTS_FILE) as reader:
        missing, extra = sorted(set(layers) - set(modules)), sorted(set(modules) - set(layers))
        if missing:
            raise CheckpointError(f"{reader.listing}: no lora_A / lora_B for {missing[0]}")
        if extra:
            raise CheckpointError(f"{reader.listing}: {extra[0]} is not a module of the model")
        for name, layer in layers.items():
            for ab, var in (("A", layer.lora_a), ("B", layer.lora_b)):
                key = modules[name][ab]
                value = var.get_value()
                want = tuple(value.shape[::-1])
                if reader.shape(key) != want:
                    raise CheckpointError(
                        f"{reader.where(key)}: tensor {key!r} has shape {reader.shape(key)}, "
                        f"the model expects {want}"
                    )
                var.set_value(
                    read_array(reader, key, (1, 0), value.shape, value.dtype, value.sharding)
                )
    return model


def save_merged_model(model: LLM, path: str | os.PathLike, **save_kwargs: Any) -> None:
    """Write `model` with its adapters folded into the base weights (`merge_lora`) as a plain
    transformers checkpoint (`jaxstack.hf.save_model`, whose keyword arguments pass through).
    `model` keeps its adapters."""
    _check_llm(model, "save_merged_model")
    save_model(merge_lora(model), path, **save_kwargs)


__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "adapter_config",
    "load_peft_adapter",
    "read_adapter_config",
    "save_merged_model",
    "save_peft_adapter",
]
