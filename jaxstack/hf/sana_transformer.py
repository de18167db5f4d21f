"""Load and save `SanaTransformer`s as diffusers `SanaTransformer2DModel` checkpoints.

model = load_sana_transformer("Sana_1600M_1024px_diffusers", dtype=jnp.bfloat16, mesh=mesh)
save_sana_transformer(model, "runs/x/transformer")   # diffusers' from_pretrained reads it

A checkpoint is a folder with config.json and `diffusion_pytorch_model.safetensors`, or shards
`diffusion_pytorch_model-0000i-of-0000N.safetensors` plus
`diffusion_pytorch_model.safetensors.index.json`; a pipeline folder holding it in
`transformer/` is accepted too. Loading builds the model abstractly, checks every tensor's
presence and shape, then reads each parameter slice by slice straight into its sharding.

Layouts: torch Linear weight [out, in] -> Dense kernel [in, out]; torch Conv2d weight
[out, in / groups, kh, kw] -> HWIO kernel [kh, kw, in / groups, out]; norm `weight` -> `scale`.
Parameter paths mirror diffusers' keys except `patch_embed.kernel` (`patch_embed.proj.weight`),
`to_out` (`to_out.0`) and, without guidance embeddings, `time_embed.timestep_embedder`
(`time_embed.emb.timestep_embedder`).
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from jaxstack.hf.diffusers_io import WEIGHTS_FILE, WEIGHTS_INDEX, DiffusersReader
from jaxstack.hf.errors import CheckpointError
from jaxstack.hf.params_io import check_shapes, named_params, read_params, to_host
from jaxstack.hf.safetensors_io import plan_shards, write_safetensors
from jaxstack.models.sana import DIFFUSERS_CLASS, SanaConfig, SanaTransformer

WEIGHTS_NAME, WEIGHTS_INDEX_NAME = WEIGHTS_FILE, WEIGHTS_INDEX  # diffusers' file names
DIFFUSERS_VERSION = "0.42.1"  # the version this layout was verified against
DEFAULT_MAX_SHARD_BYTES = 10 * 2**30  # diffusers' save_pretrained default ("10GB")

_LINEAR = (1, 0)  # torch Linear weight [out, in] -> kernel [in, out]
_CONV = (2, 3, 1, 0)  # torch Conv2d weight [out, in, kh, kw] -> kernel [kh, kw, in, out]

__all__ = [
    "diffusers_key_for",
    "load_sana_transformer",
    "read_sana_config",
    "save_sana_transformer",
]


def diffusers_key_for(path: str, cfg: SanaConfig) -> tuple[str, tuple[int, ...] | None]:
    """(diffusers key, permutation of the file tensor into the parameter) of a parameter path
    such as "transformer_blocks.0.ff.conv_depth.kernel"."""
    parts = path.split(".")
    leaf, ndim_4 = parts[-1], path.startswith("patch_embed.") or ".ff.conv_" in path
    if parts[0] == "patch_embed":
        parts = ["patch_embed", "proj", leaf]
    elif parts[:2] == ["time_embed", "timestep_embedder"] and not cfg.guidance_embeds:
        parts = ["time_embed", "emb", *parts[1:]]
    parts = [p if p != "to_out" else "to_out.0" for p in parts]
    perm = None
    if leaf == "kernel":
        parts[-1], perm = "weight", (_CONV if ndim_4 else _LINEAR)
    elif leaf == "scale":
        parts[-1] = "weight"
    return ".".join(parts), perm


def _resolve(path: str) -> str:
    """The transformer folder: `path` itself, or `path`/transformer of a pipeline folder."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint directory {path!r} does not exist")
    sub = os.path.join(path, "transformer")
    if not os.path.isfile(os.path.join(path, "config.json")) and os.path.isdir(sub):
        return sub
    return path


def read_sana_config(path: str | os.PathLike) -> SanaConfig:
    """SanaConfig of the diffusers checkpoint (or pipeline) folder `path`; CheckpointError for
    a missing or unsupported config.json."""
    path = _resolve(os.fspath(path))
    cfg_file = os.path.join(path, "config.json")
    try:
        with open(cfg_file) as f:
            raw = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: unreadable config ({e!r})") from None
    name = raw.get("_class_name", DIFFUSERS_CLASS)
    if name != DIFFUSERS_CLASS:
        raise CheckpointError(f"{cfg_file}: _class_name {name!r} is not {DIFFUSERS_CLASS!r}")
    try:
        return SanaConfig.from_diffusers_config(raw)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{cfg_file}: {e}") from None


def load_sana_transformer(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    remat: str = "none",
) -> SanaTransformer:
    """SanaTransformer from a diffusers `SanaTransformer2DModel` folder (or a pipeline folder
    with `transformer/`).

    dtype: compute dtype; param_dtype: storage dtype (default: dtype), cast from the file's
    dtype. mesh: parameters are placed by the logical-axis rules (None: first local device).
    Raises CheckpointError (one line naming the tensor / file) for missing files, unsupported
    configs, missing tensors and shape mismatches; warns about tensors the model does not use.
    """
    path = _resolve(os.fspath(path))
    cfg = read_sana_config(path)
    cfg_file = os.path.join(path, "config.json")
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = nnx.eval_shape(
        lambda: SanaTransformer(
            cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(0)
        )
    )
    graphdef, state = nnx.split(abstract)
    with DiffusersReader(path) as reader:
        plan = check_shapes(
            named_params(state), reader, cfg_file, lambda p: diffusers_key_for(p, cfg)
        )
        unused = sorted(reader.keys() - {key for key, _ in plan.values()})
        if unused:
            warnings.warn(
                f"{reader.listing}: {len(unused)} tensors not used by the model, e.g. {unused[:3]}",
                stacklevel=2,
            )
        state = read_params(state, plan, reader, mesh)
    return nnx.merge(graphdef, state)


def _tensors(model: SanaTransformer, dtype: Any) -> list[tuple[str, tuple, np.dtype, Callable]]:
    """(diffusers key, file shape, dtype, () -> host array) per parameter, sorted by key."""
    out = []
    for path, var in named_params(nnx.state(model, nnx.Param)):
        key, perm = diffusers_key_for(path, model.cfg)
        array = var.get_value()
        np_dtype = np.dtype(array.dtype if dtype is None else dtype)
        inverse = None if perm is None else tuple(int(i) for i in np.argsort(perm))
        shape = array.shape if inverse is None else tuple(array.shape[i] for i in inverse)

        def get(a=array, inv=inverse, d=np_dtype) -> np.ndarray:
            host = to_host(a)
            return (host if inv is None else host.transpose(inv)).astype(d)

        out.append((key, tuple(shape), np_dtype, get))
    return sorted(out, key=lambda t: t[0])


def save_sana_transformer(
    model: SanaTransformer,
    path: str | os.PathLike,
    *,
    dtype: Any = None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write `model` as a diffusers `SanaTransformer2DModel` folder (config.json + safetensors)
    that `SanaTransformer2DModel.from_pretrained(path)` loads.

    dtype: storage dtype of the files (e.g. jnp.bfloat16); default each parameter's own.
    Above max_shard_bytes the weights are split into diffusers' numbered shards plus
    `WEIGHTS_INDEX_NAME`. Earlier weight files in `path` are replaced. With several
    processes every process must call this (parameters are gathered); process 0 writes.
    """
    path = os.fspath(path)
    hf_cfg = {**model.cfg.to_diffusers_config(), "_diffusers_version": DIFFUSERS_VERSION}
    tensors = _tensors(model, dtype)
    nbytes = [int(np.prod(shape)) * d.itemsize for _, shape, d, _ in tensors]
    shards = plan_shards(nbytes, max_shard_bytes)
    n = len(shards)
    stem, ext = WEIGHTS_NAME.rsplit(".", 1)
    names = [WEIGHTS_NAME] if n == 1 else [f"{stem}-{i + 1:05d}-of-{n:05d}.{ext}" for i in range(n)]
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):  # stale shards of an earlier save would mix
            if name.startswith(stem) and name.endswith((".safetensors", ".index.json")):
                os.remove(os.path.join(path, name))
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(hf_cfg, f, indent=2, sort_keys=True)
    weight_map = {}
    for shard, name in zip(shards, names):
        arrays = (tensors[i][3]() for i in shard)
        weight_map.update((tensors[i][0], name) for i in shard)
        if writer:
            write_safetensors(os.path.join(path, name), [tensors[i][:3] for i in shard], arrays)
        else:
            for _ in arrays:  # join the collective gathers
                pass
    if writer and n > 1:
        index = {"metadata": {"total_size": sum(nbytes)}, "weight_map": weight_map}
        with open(os.path.join(path, WEIGHTS_INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2, sort_keys=True)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxstack.hf.save_sana_transformer:{path}")
