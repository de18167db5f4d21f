"""Load the released diffusion-LLM checkpoint layouts (LLaDA, Dream) into the jaxstack `LLM`.

Neither layout has a transformers class on PyPI (both ship their own modeling file), so the
key names and config fields below are those of the released checkpoints as we know them:

LLaDA (`GSAI-ML/LLaDA-8B-*`, `modeling_llada.py`, OLMo-derived; config `model_type: "llada"`):
  model.transformer.wte.weight                 [vocab, d]   token embedding
  model.transformer.blocks.{i}.attn_norm.weight             RMSNorm before attention
  model.transformer.blocks.{i}.{q,k,v}_proj.weight  [out, d] (no biases: include_bias false)
  model.transformer.blocks.{i}.attn_out.weight [d, d]       output projection
  model.transformer.blocks.{i}.ff_norm.weight               RMSNorm before the MLP
  model.transformer.blocks.{i}.ff_proj.weight  [f, d]       SwiGLU gate (silu applied to it)
  model.transformer.blocks.{i}.up_proj.weight  [f, d]       SwiGLU up
  model.transformer.blocks.{i}.ff_out.weight   [d, f]       SwiGLU down
  model.transformer.ln_f.weight                             final RMSNorm
  model.transformer.ff_out.weight              [vocab, d]   LM head (absent if weight_tying)
  config: d_model, n_heads, n_kv_heads, n_layers, mlp_hidden_size, vocab_size /
  embedding_size (rows of wte; the larger wins), rope_theta, rms_norm_eps,
  max_sequence_length, weight_tying, include_bias, mask_token_id (default 126336).

Dream (`Dream-org/Dream-v0-*-7B`, `modeling_dream.py`; config `model_type: "Dream"`): the
Qwen2 layout (`model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj` with q/k/v
biases, `mlp.{gate,up,down}_proj`, `model.norm`, `lm_head`) and Qwen2 config fields plus
mask_token_id (default 151666). Logits are shifted by one at use (`jaxstack.models.dllm`).

Both load as bidirectional (`causal=False`) `LLM`s; `load_dllm` returns the model and its
`DLLMConfig`. HF Linear weights are [out, in]; jaxstack kernels are [in, out] (transposed).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxstack.hf.errors import CheckpointError
from jaxstack.hf.llm import hf_key_for, load_weights, save_model
from jaxstack.hf.llm_config import config_from_hf, config_to_hf, read_hf_config
from jaxstack.models.dllm import DREAM_MASK_ID, LLADA_MASK_ID, DLLMConfig
from jaxstack.models.llm import LLM, LLMConfig

# (jaxstack parameter path pattern, LLaDA key template, transpose)
LLADA_KEY_TABLE: tuple[tuple[str, str, bool], ...] = (
    (r"embed_tokens\.embedding", "model.transformer.wte.weight", False),
    (r"norm\.scale", "model.transformer.ln_f.weight", False),
    (r"lm_head\.kernel", "model.transformer.ff_out.weight", True),
    (
        r"layers\.(\d+)\.input_layernorm\.scale",
        "model.transformer.blocks.{}.attn_norm.weight",
        False,
    ),
    (
        r"layers\.(\d+)\.post_attention_layernorm\.scale",
        "model.transformer.blocks.{}.ff_norm.weight",
        False,
    ),
    (
        r"layers\.(\d+)\.self_attn\.q_proj\.kernel",
        "model.transformer.blocks.{}.q_proj.weight",
        True,
    ),
    (
        r"layers\.(\d+)\.self_attn\.k_proj\.kernel",
        "model.transformer.blocks.{}.k_proj.weight",
        True,
    ),
    (
        r"layers\.(\d+)\.self_attn\.v_proj\.kernel",
        "model.transformer.blocks.{}.v_proj.weight",
        True,
    ),
    (
        r"layers\.(\d+)\.self_attn\.o_proj\.kernel",
        "model.transformer.blocks.{}.attn_out.weight",
        True,
    ),
    (r"layers\.(\d+)\.mlp\.gate_proj\.kernel", "model.transformer.blocks.{}.ff_proj.weight", True),
    (r"layers\.(\d+)\.mlp\.up_proj\.kernel", "model.transformer.blocks.{}.up_proj.weight", True),
    (r"layers\.(\d+)\.mlp\.down_proj\.kernel", "model.transformer.blocks.{}.ff_out.weight", True),
)
_LLADA_RULES = [(re.compile(p), k, t) for p, k, t in LLADA_KEY_TABLE]


def llada_key_for(param_path: str) -> tuple[str, bool]:
    """(LLaDA checkpoint key, transpose?) of a jaxstack parameter path."""
    for pattern, template, transpose in _LLADA_RULES:
        m = pattern.fullmatch(param_path)
        if m:
            return template.format(*m.groups()), transpose
    raise KeyError(f"no LLaDA key for parameter {param_path!r}; extend LLADA_KEY_TABLE")


def checkpoint_kind(hf: dict[str, Any]) -> str | None:
    """ "llada", "dream" or None from a parsed config.json."""
    model_type = str(hf.get("model_type", "")).lower()
    classes = [str(c).lower() for c in hf.get("architectures") or []]
    if model_type == "llada" or any(c.startswith("llada") for c in classes):
        return "llada"
    if model_type == "dream" or any(c.startswith("dream") for c in classes):
        return "dream"
    return None


def llada_config_from_hf(hf: dict[str, Any], *, source: str = "config") -> DLLMConfig:
    """DLLMConfig of a LLaDA config.json (OLMo-style field names)."""
    if hf.get("include_bias") or hf.get("include_qkv_bias"):
        raise CheckpointError(f"{source}: LLaDA with biases (include_bias) is unsupported")
    if hf.get("activation_type", "silu") not in ("silu", "swiglu"):
        raise CheckpointError(f"{source}: activation_type {hf['activation_type']!r} unsupported")
    if hf.get("block_type", "llama") != "llama":
        raise CheckpointError(f"{source}: block_type {hf['block_type']!r} unsupported (llama)")
    if hf.get("rope") is False:
        raise CheckpointError(f"{source}: LLaDA without RoPE is unsupported")
    try:
        d, heads = hf["d_model"], hf["n_heads"]
        vocab = max(hf["vocab_size"], hf.get("embedding_size") or 0)
        llm = LLMConfig(
            architecture="llama",
            vocab_size=vocab,
            hidden_size=d,
            intermediate_size=hf.get("mlp_hidden_size") or hf.get("mlp_ratio", 4) * d,
            num_layers=hf["n_layers"],
            num_heads=heads,
            num_kv_heads=hf.get("n_kv_heads") or heads,
            head_dim=d // heads,
            rope_theta=float(hf.get("rope_theta", 10000.0)),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-5),
            tie_word_embeddings=bool(hf.get("weight_tying", False)),
            attention_bias=False,
            causal=False,
            max_position_embeddings=hf.get("max_sequence_length", 4096),
        )
        eos = hf.get("eos_token_id")
        return DLLMConfig(
            llm,
            kind="llada",
            mask_id=hf.get("mask_token_id", LLADA_MASK_ID),
            eos_id=eos,
            pad_id=hf.get("pad_token_id", eos),
        )
    except KeyError as e:
        raise CheckpointError(f"{source}: missing required key {e.args[0]!r}") from None
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def dream_config_from_hf(hf: dict[str, Any], *, source: str = "config") -> DLLMConfig:
    """DLLMConfig of a Dream config.json (Qwen2 fields, bidirectional)."""
    qwen = {**hf, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2"}
    llm = dataclasses.replace(config_from_hf(qwen, source=source), causal=False)
    eos = hf.get("eos_token_id")
    try:
        return DLLMConfig(
            llm,
            kind="dream",
            mask_id=hf.get("mask_token_id", DREAM_MASK_ID),
            eos_id=eos,
            pad_id=hf.get("pad_token_id", eos),
        )
    except ValueError as e:
        raise CheckpointError(f"{source}: {e}") from None


def dllm_config_from_hf(hf: dict[str, Any], *, source: str = "config") -> DLLMConfig:
    """DLLMConfig from a LLaDA or Dream config.json (CheckpointError for anything else)."""
    kind = checkpoint_kind(hf)
    if kind == "llada":
        return llada_config_from_hf(hf, source=source)
    if kind == "dream":
        return dream_config_from_hf(hf, source=source)
    raise CheckpointError(
        f"{source}: not a LLaDA or Dream checkpoint (model_type={hf.get('model_type')!r}, "
        f"architectures={hf.get('architectures')})"
    )


def load_dllm(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
) -> tuple[LLM, DLLMConfig]:
    """(bidirectional LLM, DLLMConfig) from a LLaDA or Dream checkpoint directory.

    dtype: compute dtype; param_dtype: storage dtype (default dtype). mesh: parameters placed
    by the logical-axis rules (None: first local device). Raises CheckpointError for missing
    or corrupt files, other architectures, missing tensors and shape mismatches; warns
    about tensors the model does not use.
    """
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    dcfg = dllm_config_from_hf(read_hf_config(path), source=cfg_file)
    key_for = llada_key_for if dcfg.kind == "llada" else hf_key_for
    model = load_weights(
        path, dcfg.llm, key_for=key_for, dtype=dtype, param_dtype=param_dtype, mesh=mesh
    )
    return model, dcfg


def llada_config_to_hf(dcfg: DLLMConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """LLaDA config.json fields (OLMo style) describing `dcfg` (inverse of llada_config_from_hf)."""
    c = dcfg.llm
    if c.head_dim * c.num_heads != c.hidden_size or c.attention_bias or c.qk_norm:
        raise ValueError("the LLaDA layout needs head_dim * heads == d_model and no biases/qk-norm")
    return {
        "architectures": ["LLaDAModelLM"],
        "model_type": "llada",
        "d_model": c.hidden_size,
        "n_heads": c.num_heads,
        "n_kv_heads": c.num_kv_heads,
        "n_layers": c.num_layers,
        "mlp_hidden_size": c.intermediate_size,
        "vocab_size": c.vocab_size,
        "embedding_size": c.vocab_size,
        "rope": True,
        "rope_theta": c.rope_theta,
        "rms_norm_eps": c.rms_norm_eps,
        "max_sequence_length": c.max_position_embeddings,
        "weight_tying": c.tie_word_embeddings,
        "include_bias": False,
        "activation_type": "silu",
        "block_type": "llama",
        "mask_token_id": dcfg.mask_id,
        "eos_token_id": dcfg.eos_id,
        "pad_token_id": dcfg.pad_id,
        "torch_dtype": dtype,
    }


def save_dllm(model: LLM, dcfg: DLLMConfig, path: str | os.PathLike, *, dtype: Any = None) -> None:
    """Write a diffusion LLM in its released layout (LLaDA or Dream), loadable by `load_dllm`.

    dtype: storage dtype of the safetensors (default each parameter's own)."""
    first = jax.tree.leaves(nnx.state(model, nnx.Param))[0]
    store = jnp.dtype(first.dtype if dtype is None else dtype).name
    if dcfg.kind == "llada":
        hf = llada_config_to_hf(dcfg, dtype=store)
        save_model(model, path, dtype=dtype, key_for=llada_key_for, hf_config=hf)
        return
    hf = config_to_hf(dataclasses.replace(dcfg.llm, causal=True), dtype=store)
    hf.update(
        architectures=["DreamModel"],
        model_type="Dream",
        mask_token_id=dcfg.mask_id,
        eos_token_id=dcfg.eos_id,
        pad_token_id=dcfg.pad_id,
    )
    save_model(model, path, dtype=dtype, hf_config=hf)
