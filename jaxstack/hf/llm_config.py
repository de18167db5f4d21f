"""transformers `config.json` <-> `LLMConfig` for Llama, Qwen2, Qwen3 and Gemma 2 decoders.

Gemma 2 comes as `Gemma2ForCausalLM` or as the base `Gemma2Model` (no LM head; SANA's text
encoder); both map to the same `LLMConfig` (`is_base_model` tells which class a config names).

Handles both config generations: transformers 4 (`rope_theta` top level, `rope_scaling`) and
transformers 5 (`rope_parameters` holding `rope_theta` and `rope_type`). `config_to_hf` writes
both forms so either generation reads the file.
"""

from __future__ import annotations

import json
import os
from typing import Any

from jaxstack.hf.errors import CheckpointError
from jaxstack.models.llm import ACTIVATIONS, LLMConfig

# transformers class name -> jaxstack architecture (model_type)
_ARCH_CLASSES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma2ForCausalLM": "gemma2",
}
# Base-model classes: the decoder without LM head, tensors named without the "model." prefix.
_BASE_CLASSES = {"Gemma2Model": "gemma2"}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(_ARCH_CLASSES) + tuple(_BASE_CLASSES)
_CLASS_FOR = {arch: cls for cls, arch in _ARCH_CLASSES.items()}
_BASE_CLASS_FOR = {arch: cls for cls, arch in _BASE_CLASSES.items()}
_LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
# Defaults of the transformers config classes for keys a config.json may omit.
_DEFAULT_MAX_POSITIONS = {"llama": 2048, "qwen2": 32768, "qwen3": 32768, "gemma2": 8192}
# transformers' Gemma2Config defaults for the Gemma-2 keys.
_GEMMA2_DEFAULTS = dict(
    head_dim=256,
    hidden_activation="gelu_pytorch_tanh",
    query_pre_attn_scalar=256,
    sliding_window=4096,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    tie_word_embeddings=True,
)
_GEMMA2_FLAGS = ("norm_unit_offset", "sandwich_norm", "scale_embeddings")


def is_base_model(hf: dict[str, Any]) -> bool:
    """Whether the config names a base-model class (e.g. `Gemma2Model`: no LM head)."""
    classes = hf.get("architectures") or []
    return len(classes) == 1 and classes[0] in _BASE_CLASSES


def _architecture(hf: dict[str, Any], source: str) -> str:
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    classes = hf.get("architectures") or []
    known = {**_ARCH_CLASSES, **_BASE_CLASSES}
    if classes:
        if len(classes) != 1 or classes[0] not in known:
            raise CheckpointError(
                f"{source}: unsupported architecture {classes}; supported: {supported}"
            )
        return known[classes[0]]
    model_type = hf.get("model_type")
    if model_type not in _CLASS_FOR:
        raise CheckpointError(
            f"{source}: unsupported model_type {model_type!r} (no 'architectures'); "
            f"supported: {supported}"
        )
    return model_type


def _rope(hf: dict[str, Any], source: str) -> tuple[float, dict | None]:
    """(rope_theta, LLMConfig.rope_scaling) from either config generation."""
    params = dict(hf.get("rope_parameters") or {})
    legacy = dict(hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = {**legacy, **params}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise CheckpointError(
            f"{source}: unsupported rope type {rope_type!r}; supported: default, llama3"
        )
    missing = [k for k in _LLAMA3_KEYS if k not in scaling]
    if missing:
        raise CheckpointError(f"{source}: llama3 rope scaling lacks {missing}")
    return float(theta), {"rope_type": "llama3", **{k: scaling[k] for k in _LLAMA3_KEYS}}


def _gemma2_fields(hf: dict[str, Any], source: str) -> dict[str, Any]:
    """The Gemma-2 LLMConfig fields of a Gemma2 config (transformers' defaults filled in)."""
    get = lambda key: hf.get(key, _GEMMA2_DEFAULTS[key])
    act = hf.get("hidden_activation") or _GEMMA2_DEFAULTS["hidden_activation"]
    if act not in ACTIVATIONS:
        raise CheckpointError(
            f"{source}: hidden_activation {act!r} unsupported; supported: {tuple(ACTIVATIONS)}"
        )
    if hf.get("use_bidirectional_attention"):
        raise CheckpointError(f"{source}: use_bidirectional_attention=true is unsupported")
    window = get("sliding_window")
    layer_types = hf.get("layer_types")
    n = hf.get("num_hidden_layers", 0)
    default_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    if window is None or layer_types is None or list(layer_types) == default_types:
        layer_types = None  # None: the default pattern (or no sliding layers at all)
    else:
        layer_types = tuple(layer_types)
    return dict(
        head_dim=hf.get("head_dim") or _GEMMA2_DEFAULTS["head_dim"],
        hidden_act=act,
        norm_unit_offset=True,
        sandwich_norm=True,
        scale_embeddings=True,
        query_pre_attn_scalar=get("query_pre_attn_scalar"),
        attn_logit_softcapping=get("attn_logit_softcapping"),
        final_logit_softcapping=get("final_logit_softcapping"),
        sliding_window=window,
        layer_types=layer_types,
        tie_word_embeddings=get("tie_word_embeddings"),
    )


def config_from_hf(hf: dict[str, Any], *, source: str = "config") -> LLMConfig:
    """LLMConfig from a transformers config dict (the parsed `config.json`).

    source: names the file in error messages. Raises CheckpointError for architectures and
    options the jaxstack decoder does not implement (sliding windows outside Gemma 2, MLP bias,
    o_proj bias, activations other than SiLU outside Gemma 2, rope types other than
    default/llama3, bidirectional Gemma 2). Gemma 2 keys a config omits take transformers'
    Gemma2Config defaults (e.g. tied embeddings, head_dim 256, sliding window 4096 on layers
    0, 2, 4, ...).
    """
    arch = _architecture(hf, source)
    gemma = _gemma2_fields(hf, source) if arch == "gemma2" else {}
    if not gemma and hf.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{source}: hidden_act {hf['hidden_act']!r} unsupported (silu only)")
    if hf.get("mlp_bias"):
        raise CheckpointError(f"{source}: mlp_bias=true is unsupported")
    sliding = [t for t in hf.get("layer_types") or [] if t != "full_attention"]
    if not gemma and (hf.get("use_sliding_window") or sliding):
        raise CheckpointError(f"{source}: sliding-window attention is unsupported")
    if arch == "qwen2":
        attention_bias = True  # Qwen2 always has q/k/v biases (and none on o_proj)
    elif hf.get("attention_bias"):
        raise CheckpointError(
            f"{source}: attention_bias=true for {arch} also adds an o_proj bias, which the "
            "jaxstack decoder does not have"
        )
    else:
        attention_bias = False
    theta, scaling = _rope(hf, source)
    try:
        heads = hf["num_attention_heads"]
        fields = dict(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // heads,
            rope_theta=theta,
            rope_scaling=scaling,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=attention_bias,
            qk_norm=arch == "qwen3",
            causal=True,
            max_position_embeddings=hf.get("max_position_embeddings", _DEFAULT_MAX_POSITIONS[arch]),
        )
        return LLMConfig(**{**fields, **gemma})
    except KeyError as e:
        raise CheckpointError(f"{source}: missing required key {e.args[0]!r}") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def _check_family_flags(cfg: LLMConfig) -> None:
    """ValueError unless the Gemma-2 fields of `cfg` are those its architecture has."""
    arch = cfg.architecture
    if arch == "gemma2":
        off = [name for name in _GEMMA2_FLAGS if not getattr(cfg, name)]
        if off:
            raise ValueError(f"a gemma2 LLMConfig needs {off} set for the Gemma2 layout")
        return
    on = [name for name in _GEMMA2_FLAGS if getattr(cfg, name)]
    on += [
        name
        for name in (
            "query_pre_attn_scalar",
            "attn_logit_softcapping",
            "final_logit_softcapping",
            "sliding_window",
        )
        if getattr(cfg, name) is not None
    ]
    if cfg.hidden_act != "silu":
        on.append(f"hidden_act={cfg.hidden_act!r}")
    if on:
        raise ValueError(f"{on} have no transformers layout for {arch} (only gemma2)")


def _gemma2_to_hf(cfg: LLMConfig) -> dict[str, Any]:
    types = [
        "sliding_attention" if cfg.is_sliding(i) else "full_attention"
        for i in range(cfg.num_layers)
    ]
    qpas = cfg.head_dim if cfg.query_pre_attn_scalar is None else cfg.query_pre_attn_scalar
    if float(qpas).is_integer():
        qpas = int(qpas)  # transformers' (strictly checked) field is an int
    return {
        "hidden_activation": cfg.hidden_act,
        "query_pre_attn_scalar": qpas,
        "attn_logit_softcapping": cfg.attn_logit_softcapping,
        "final_logit_softcapping": cfg.final_logit_softcapping,
        "sliding_window": cfg.sliding_window,
        "layer_types": types,
        "attention_bias": False,
        "use_bidirectional_attention": None,
    }


def config_to_hf(
    cfg: LLMConfig, *, dtype: str = "float32", base_model: bool = False
) -> dict[str, Any]:
    """transformers config dict (for `config.json`) describing `cfg`.

    dtype: the storage dtype name written as `dtype` (e.g. "bfloat16").
    base_model: name the base-model class (`Gemma2Model`, no LM head) instead of the
    causal-LM class; only architectures with one in `SUPPORTED_ARCHITECTURES`.
    A Qwen2 config without attention bias maps to Qwen2 with (zero) biases; configs with no
    transformers equivalent (bidirectional, qk_norm outside Qwen3, Llama/Qwen3 with q/k/v
    bias, Gemma-2 fields on another family or missing on gemma2) raise ValueError.
    """
    arch = cfg.architecture
    if not cfg.causal:
        raise ValueError("a bidirectional LLMConfig (causal=False) has no transformers layout")
    if cfg.qk_norm != (arch == "qwen3"):
        raise ValueError(f"qk_norm={cfg.qk_norm} has no transformers layout for {arch}")
    if cfg.attention_bias and arch != "qwen2":
        raise ValueError(f"attention_bias=True has no transformers layout for {arch}")
    _check_family_flags(cfg)
    if base_model and arch not in _BASE_CLASS_FOR:
        raise ValueError(f"no base-model class for {arch}; supported: {tuple(_BASE_CLASSES)}")
    rope_params: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling is not None:
        rope_params = {**cfg.rope_scaling, "rope_type": "llama3", "rope_theta": cfg.rope_theta}
    out: dict[str, Any] = {
        "architectures": [(_BASE_CLASS_FOR if base_model else _CLASS_FOR)[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "rms_norm_eps": cfg.rms_norm_eps,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "rope_theta": cfg.rope_theta,  # transformers 4
        "rope_scaling": None if cfg.rope_scaling is None else dict(cfg.rope_scaling),  # 4
        "rope_parameters": rope_params,  # transformers 5
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "dtype": dtype,
    }
    if arch == "gemma2":
        out.update(_gemma2_to_hf(cfg))
        return out
    out["hidden_act"] = "silu"
    if arch == "llama":
        out.update(attention_bias=False, mlp_bias=False, pretraining_tp=1)
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers)
        out["layer_types"] = ["full_attention"] * cfg.num_layers
        if arch == "qwen3":
            out["attention_bias"] = False
    return out


def read_hf_config(path: str | os.PathLike) -> dict[str, Any]:
    """Parsed `config.json` of the checkpoint directory `path` (CheckpointError if absent)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    file = os.path.join(path, "config.json")
    if not os.path.isfile(file):
        raise CheckpointError(f"no config.json in checkpoint directory {path!r}")
    try:
        with open(file) as f:
            hf = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable JSON ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return hf
