"""Load and save jaxstack `LLM`s as transformers Llama / Qwen2 / Qwen3 / Gemma 2 checkpoints.

Gemma 2 reads and writes both `Gemma2ForCausalLM` (tensors under "model.", tied LM head) and
the base `Gemma2Model` layout (no prefix, no LM head; SANA's text encoder): `load_model` tells
them apart by the tensor names, `save_model(..., base_model=True)` writes the latter.

Loading builds the model abstractly (no parameter memory), checks every tensor's key and shape
against the config, then creates each parameter directly in its sharding: every device reads
only its own slice of the safetensors file. Saving gathers one parameter at a time and streams
it into transformers-layout files (process 0 writes; all processes join the gathers).

HF Linear weights are [out, in]; jaxstack Dense kernels are [in, out] (transposed here).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxstack.hf.errors import CheckpointError
from jaxstack.hf.llm_config import config_from_hf, config_to_hf, read_hf_config
from jaxstack.hf.params_io import check_shapes, named_params, read_params, to_host
from jaxstack.hf.safetensors_io import (
    CheckpointReader,
    plan_shards,
    remove_checkpoint_files,
    shard_file_names,
    write_index,
    write_safetensors,
)
from jaxstack.models.llm import LLM, LLMConfig

# (HF key, jaxstack parameter path, transpose); "{field}" matches the pattern in _FIELDS.
KEY_TABLE: tuple[tuple[str, str, bool], ...] = (
    ("model.embed_tokens.weight", "embed_tokens.embedding", False),
    ("model.norm.weight", "norm.scale", False),
    ("lm_head.weight", "lm_head.kernel", True),
    ("model.layers.{i}.{norm}.weight", "layers.{i}.{norm}.scale", False),
    ("model.layers.{i}.self_attn.{attn}.weight", "layers.{i}.self_attn.{attn}.kernel", True),
    ("model.layers.{i}.self_attn.{qkv}.bias", "layers.{i}.self_attn.{qkv}.bias", False),
    ("model.layers.{i}.self_attn.{qk_norm}.weight", "layers.{i}.self_attn.{qk_norm}.scale", False),
    ("model.layers.{i}.mlp.{mlp}.weight", "layers.{i}.mlp.{mlp}.kernel", True),
)
_FIELDS = {
    "i": r"\d+",
    "norm": "input_layernorm|post_attention_layernorm|pre_feedforward_layernorm"
    "|post_feedforward_layernorm",
    "attn": "[qkvo]_proj",
    "qkv": "[qkv]_proj",
    "qk_norm": "[qk]_norm",
    "mlp": "gate_proj|up_proj|down_proj",
}
# Tensors some checkpoints carry that no parameter corresponds to (buffers).
_IGNORED = re.compile(r".*rotary_emb\.inv_freq")
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9


def _regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", template)  # literal, field, literal, field, ...
    return re.compile(
        "".join(
            re.escape(p) if i % 2 == 0 else f"(?P<{p}>{_FIELDS[p]})" for i, p in enumerate(parts)
        )
    )


_RULES = [(hf, js, _regex(hf), _regex(js), t) for hf, js, t in KEY_TABLE]


def hf_key_for(param_path: str) -> tuple[str, bool]:
    """(HF key, transpose?) of a jaxstack parameter path such as "layers.0.mlp.up_proj.kernel"."""
    for hf, _, _, js_re, transpose in _RULES:
        m = js_re.fullmatch(param_path)
        if m:
            return hf.format(**m.groupdict()), transpose
    raise KeyError(f"no HF key for parameter {param_path!r}; extend KEY_TABLE")


def base_key_for(param_path: str) -> tuple[str, bool]:
    """(key, transpose?) in a base-model checkpoint (e.g. `Gemma2Model`): the transformers key
    without the "model." prefix. The base layout has no LM head (KeyError for it)."""
    key, transpose = hf_key_for(param_path)
    if not key.startswith("model."):
        raise KeyError(f"parameter {param_path!r} ({key}) has no place in a base-model layout")
    return key.removeprefix("model."), transpose


def param_path_for(hf_key: str) -> str | None:
    """jaxstack parameter path of an HF key (None if no table entry matches)."""
    for _, js, hf_re, _, _ in _RULES:
        m = hf_re.fullmatch(hf_key)
        if m:
            return js.format(**m.groupdict())
    return None


def _warn_unused(reader: CheckpointReader, used: set[str], tied: bool) -> None:
    unused = sorted(
        k
        for k in reader.keys() - used
        if not _IGNORED.fullmatch(k) and not (tied and k == "lm_head.weight")
    )
    if unused:
        warnings.warn(
            f"{reader.listing}: {len(unused)} tensors not used by the model, e.g. {unused[:3]}",
            stacklevel=3,
        )


def load_model(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    remat: str = "none",
) -> LLM:
    """LLM from a transformers checkpoint directory (config.json + safetensors, maybe sharded).

    dtype: compute dtype; param_dtype: storage dtype of the parameters (default: dtype), cast
    from the file's dtype (float32, float16 or bfloat16). mesh: parameters are placed by the
    logical-axis rules of `jaxstack.parallel` (None: on the first local device). Raises
    CheckpointError for missing/corrupt files, unsupported architectures, missing tensors and
    shape mismatches; warns about tensors the model does not use.

    A base-model checkpoint (tensors named "embed_tokens.weight", ... without the "model."
    prefix, e.g. a `Gemma2Model`) loads too; it has no LM head, so its config must tie the
    embeddings (Gemma 2 does) and `model.hidden_states` is what it is for.
    """
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    cfg = config_from_hf(read_hf_config(path), source=cfg_file)
    key_for = None
    keys = CheckpointReader(path).keys()
    if "model.embed_tokens.weight" not in keys and "embed_tokens.weight" in keys:
        if not cfg.tie_word_embeddings:
            raise CheckpointError(
                f"{path}: a base-model checkpoint (no 'model.' prefix) has no lm_head.weight, "
                f"but {cfg_file} unties the embeddings (tie_word_embeddings=false)"
            )
        key_for = base_key_for
    return load_weights(
        path, cfg, key_for=key_for, dtype=dtype, param_dtype=param_dtype, mesh=mesh, remat=remat
    )


def load_weights(
    path: str | os.PathLike,
    cfg: LLMConfig,
    *,
    key_for: Callable[[str], tuple[str, bool]] | None = None,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    remat: str = "none",
) -> LLM:
    """An `LLM(cfg)` filled from the safetensors in `path`, each parameter read slice by slice
    straight into its sharding. key_for maps a parameter path (e.g. "layers/0/mlp/up_proj/kernel")
    to (checkpoint key, transpose?); default: the transformers layout (`hf_key_for`). Missing
    tensors and shape mismatches raise CheckpointError; tensors the model does not use warn."""
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    key_for = hf_key_for if key_for is None else key_for
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = nnx.eval_shape(
        lambda: LLM(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    with CheckpointReader(path) as reader:
        plan = check_shapes(named_params(state), reader, cfg_file, key_for)
        _warn_unused(reader, {k for k, _ in plan.values()}, cfg.tie_word_embeddings)
        state = read_params(state, plan, reader, mesh)
    return nnx.merge(graphdef, state)


def _natural(key: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", key)]


def _tensors(
    model: LLM, dtype: Any, key_for: Callable[[str], tuple[str, bool]] = hf_key_for
) -> list[tuple[str, tuple, np.dtype, Callable]]:
    """(HF key, HF shape, dtype, () -> host array) for every tensor of the HF layout."""
    out = []
    for path, var in named_params(nnx.state(model, nnx.Param)):
        key, transpose = key_for(path)
        array = var.get_value()
        np_dtype = np.dtype(array.dtype if dtype is None else dtype)
        shape = tuple(array.shape[::-1] if transpose else array.shape)

        def get(a=array, t=transpose, d=np_dtype) -> np.ndarray:
            host = to_host(a)
            return (host.T if t else host).astype(d)

        out.append((key, shape, np_dtype, get))
    cfg = model.cfg
    qwen2_layout = key_for is hf_key_for and cfg.architecture == "qwen2"
    if qwen2_layout and not cfg.attention_bias:  # HF Qwen2 always has biases
        bias_dtype = out[0][2]
        sizes = {"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads, "v_proj": cfg.num_kv_heads}
        for i in range(cfg.num_layers):
            for proj, heads in sizes.items():
                shape = (heads * cfg.head_dim,)
                get = lambda s=shape: np.zeros(s, bias_dtype)
                out.append((f"model.layers.{i}.self_attn.{proj}.bias", shape, bias_dtype, get))
    return sorted(out, key=lambda t: _natural(t[0]))


def save_model(
    model: LLM,
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    key_for: Callable[[str], tuple[str, bool]] = hf_key_for,
    hf_config: dict | None = None,
    base_model: bool = False,
) -> None:
    """Write `model` as a transformers checkpoint (config.json + safetensors) into `path`.

    key_for / hf_config: another layout's tensor names and config.json (default: the
    transformers class of the architecture; `jaxstack.hf.dllm.save_dllm` writes LLaDA's).
    base_model: write the base-model layout instead (`Gemma2Model`: no "model." prefix, no LM
    head; the model must tie its embeddings; ValueError otherwise).
    dtype: storage dtype of the files (e.g. jnp.bfloat16); default each parameter's own dtype.
    Files above max_shard_bytes are split into model-0000i-of-0000N.safetensors plus
    model.safetensors.index.json. Earlier safetensors files in `path` are replaced. With
    several processes, every process must call this (parameters are gathered collectively);
    only process 0 writes.
    """
    path = os.fspath(path)
    if base_model:
        if not model.cfg.tie_word_embeddings:
            raise ValueError("base_model=True: the base layout has no LM head (untied model)")
        key_for = base_key_for
    tensors = _tensors(model, dtype, key_for)
    hf_cfg = hf_config
    if hf_cfg is None:
        hf_cfg = config_to_hf(model.cfg, dtype=tensors[0][2].name, base_model=base_model)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
        remove_checkpoint_files(path)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2, sort_keys=True)
    nbytes = [int(np.prod(shape)) * d.itemsize for _, shape, d, _ in tensors]
    shards = plan_shards(nbytes, max_shard_bytes)
    names = shard_file_names(len(shards))
    weight_map = {}
    for shard, name in zip(shards, names):
        specs = [tensors[i][:3] for i in shard]
        arrays = (tensors[i][3]() for i in shard)
        weight_map.update((tensors[i][0], name) for i in shard)
        if writer:
            write_safetensors(os.path.join(path, name), specs, arrays)
        else:
            for _ in arrays:  # join the collective gathers
                pass
    if writer and len(shards) > 1:
        write_index(path, weight_map, sum(nbytes))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxstack.hf.save_model:{path}")
