"""Load and save DC-AE autoencoders as diffusers `AutoencoderDC` checkpoints.

ae = load_dcae("path/to/Sana_1600M_1024px_diffusers/vae", dtype=jnp.bfloat16)
save_dcae(ae, "runs/x/vae")        # AutoencoderDC.from_pretrained("runs/x/vae") loads it

A diffusers model folder holds config.json and diffusion_pytorch_model.safetensors (or
diffusion_pytorch_model-0000i-of-0000N.safetensors + diffusion_pytorch_model.safetensors.index
.json). jaxstack parameter paths are the diffusers keys with the last name translated: kernel
/scale -> weight, mean/var -> running_mean/running_var (BatchNorm statistics). Conv kernels
[kh, kw, in/groups, out] are torch [out, in/groups, kh, kw] permuted by (2, 3, 1, 0); Dense
kernels [in, out] are torch Linear [out, in] transposed. BatchNorm's `num_batches_tracked` is
read past and written as 0 (inference only). As in `jaxstack.hf.llm`, the model is built
abstractly and each parameter is read straight into its sharding.
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

from jaxstack.hf.diffusers_io import (
    WEIGHTS_FILE,
    WEIGHTS_INDEX,
    DiffusersReader,
)
from jaxstack.hf.errors import CheckpointError
from jaxstack.hf.llm_config import read_hf_config
from jaxstack.hf.params_io import check_shapes, named_params, read_params, to_host
from jaxstack.hf.safetensors_io import write_safetensors
from jaxstack.models.dcae import DCAE, DCAEConfig

_SHARD_RE = re.compile(r"diffusion_pytorch_model-\d{5}-of-\d{5}\.safetensors")
_LEAF_NAMES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_STAT_NAMES = {"mean": "running_mean", "var": "running_var"}
_PERMS = {4: (2, 3, 1, 0), 2: (1, 0)}  # model array ndim -> axes of the torch tensor
_NUM_BATCHES = "num_batches_tracked"
DIFFUSERS_VERSION = "0.32.0"  # first diffusers release with AutoencoderDC


def diffusers_key_for(param_path: str, ndim: int) -> tuple[str, tuple[int, ...] | None]:
    """(diffusers key, permutation of the torch tensor or None) of a `DCAE` parameter path
    ("encoder.down_blocks.1.0.attn.to_q.kernel" -> "encoder.down_blocks.1.0.attn.to_q.weight",
    (1, 0)); ndim is the jaxstack array's rank."""
    module, _, leaf = param_path.rpartition(".")
    if leaf in _STAT_NAMES:
        return f"{module}.{_STAT_NAMES[leaf]}", None
    if leaf not in _LEAF_NAMES:
        raise KeyError(f"no diffusers key for DCAE parameter {param_path!r}")
    return f"{module}.{_LEAF_NAMES[leaf]}", _PERMS.get(ndim)


def _key_for(state: nnx.State) -> Callable[[str], tuple[str, tuple[int, ...] | None]]:
    ndims = {path: var.get_value().ndim for path, var in named_params(state)}
    return lambda path: diffusers_key_for(path, ndims[path])


def dcae_config_from_diffusers(config: dict[str, Any], *, source: str) -> DCAEConfig:
    """DCAEConfig from a parsed diffusers config.json (CheckpointError naming `source`)."""
    name = config.get("_class_name", "AutoencoderDC")
    if name != "AutoencoderDC":
        raise CheckpointError(f"{source}: _class_name {name!r} is not 'AutoencoderDC'")
    try:
        return DCAEConfig.from_diffusers_config(config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: invalid AutoencoderDC config ({e})") from None


def load_dcae(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.float32,
    param_dtype: Any = None,
    mesh: Mesh | None = None,
    variant: str | None = None,
) -> DCAE:
    """DCAE from a diffusers `AutoencoderDC` folder (a pipeline's `vae/`).

    dtype: compute dtype; param_dtype: parameter storage dtype (default: dtype), cast from the
    file's dtype. mesh: parameters placed by their logical axes (None: first local device).
    variant: diffusers weight variant ("bf16" reads diffusion_pytorch_model.bf16.safetensors).
    Raises CheckpointError (one line naming the file and tensor) for a missing or corrupt
    file, an unsupported config, a missing tensor or a shape mismatch; warns about tensors
    the model does not use.
    """
    path = os.fspath(path)
    cfg_file = os.path.join(path, "config.json")
    cfg = dcae_config_from_diffusers(read_hf_config(path), source=cfg_file)
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = nnx.eval_shape(
        lambda: DCAE(cfg, dtype=dtype, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    )
    graphdef, state = nnx.split(abstract)
    with DiffusersReader(path, variant) as reader:
        plan = check_shapes(named_params(state), reader, cfg_file, _key_for(state))
        used = {key for key, _ in plan.values()}
        unused = sorted(k for k in reader.keys() - used if not k.endswith("." + _NUM_BATCHES))
        if unused:
            warnings.warn(
                f"{reader.listing}: {len(unused)} tensors not used by the AutoencoderDC of "
                f"{cfg_file}, e.g. {unused[:3]}",
                stacklevel=2,
            )
        state = read_params(state, plan, reader, mesh)
    return nnx.merge(graphdef, state)


def _tensors(model: DCAE, dtype: Any) -> list[tuple[str, tuple, np.dtype, Callable]]:
    """(diffusers key, torch shape, dtype, () -> host array) for every tensor, key-sorted."""
    state = nnx.state(model)
    key_for = _key_for(state)
    out = []
    for path, var in named_params(state):
        key, perm = key_for(path)
        array = var.get_value()
        np_dtype = np.dtype(array.dtype if dtype is None else dtype)
        inverse = None if perm is None else tuple(int(i) for i in np.argsort(perm))
        shape = tuple(array.shape) if perm is None else tuple(array.shape[i] for i in inverse)

        def get(a=array, inv=inverse, d=np_dtype) -> np.ndarray:
            host = to_host(a)
            return (host if inv is None else host.transpose(inv)).astype(d)

        out.append((key, shape, np_dtype, get))
        if key.endswith(".running_var"):  # torch BatchNorm2d buffer; statistics frozen here
            nb_key = key[: -len("running_var")] + _NUM_BATCHES
            out.append((nb_key, (), np.dtype(np.int64), lambda: np.zeros((), np.int64)))
    return sorted(out, key=lambda t: t[0])


def save_dcae(model: DCAE, path: str | os.PathLike, *, dtype: Any = None) -> None:
    """Write `model` as a diffusers `AutoencoderDC` folder: config.json +
    diffusion_pytorch_model.safetensors (one file; earlier weight files in `path` are removed).

    dtype: storage dtype (e.g. jnp.bfloat16); default each parameter's own dtype. With several
    processes every process must call this (parameters are gathered); process 0 writes.
    """
    path = os.fspath(path)
    tensors = _tensors(model, dtype)
    writer = jax.process_index() == 0
    if writer:
        os.makedirs(path, exist_ok=True)
        for name in os.listdir(path):
            if name in (WEIGHTS_FILE, WEIGHTS_INDEX) or _SHARD_RE.fullmatch(name):
                os.remove(os.path.join(path, name))
        config = {**model.cfg.to_diffusers_config(), "_diffusers_version": DIFFUSERS_VERSION}
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
    arrays = (get() for *_, get in tensors)
    specs = [t[:3] for t in tensors]
    if writer:
        write_safetensors(os.path.join(path, WEIGHTS_FILE), specs, arrays)
    else:
        for _ in arrays:  # join the collective gathers
            pass
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"jaxstack.hf.save_dcae:{path}")
