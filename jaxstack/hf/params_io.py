"""Parameter plumbing shared by the checkpoint loaders and savers of `jaxstack.hf`.

A loader builds its model abstractly (`nnx.eval_shape`), lists the parameters with
`named_params`, maps each path to a checkpoint key plus an axis permutation (`check_shapes`
verifies every tensor's presence and shape), and fills the state with `read_params`: each
parameter is created directly in its sharding (`param_sharding`), every device reading only its
own block of the safetensors tensor (`read_array`). Savers gather parameters with `to_host`.

Permutations: `perm` maps the model array's axes to the file tensor's axes, `array =
file_tensor.transpose(perm)` (None = same layout). A transformers Linear weight [out, in] read
into a jaxstack kernel [in, out] has perm (1, 0); key tables that only transpose give a bool,
which `axis_perm` turns into a permutation.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from jax.sharding import Mesh, Sharding, SingleDeviceSharding

from jaxstack.hf.errors import CheckpointError
from jaxstack.hf.safetensors_io import CheckpointReader
from jaxstack.parallel.mesh import variable_sharding

Perm = tuple[int, ...] | None
# parameter path -> (checkpoint key, transpose flag or axis permutation)
KeyFor = Callable[[str], tuple[str, bool | tuple[int, ...] | None]]


def is_variable(x: Any) -> bool:
    """True for an `nnx.Variable` (the leaf type when flattening parameter states)."""
    return isinstance(x, nnx.Variable)


def param_path(key_path: tuple) -> str:
    """Dotted parameter path ("layers.0.mlp.up_proj.kernel") of a pytree key path."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def named_params(state: nnx.State) -> list[tuple[str, nnx.Variable]]:
    """(dotted path, variable) for every variable of `state`, in pytree order."""
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=is_variable)[0]
    return [(param_path(kp), var) for kp, var in leaves]


def param_sharding(var: nnx.Variable, mesh: Mesh | None) -> Sharding:
    """Where a parameter lives: by its logical axes on `mesh`, else on the first local device."""
    if mesh is None:
        return SingleDeviceSharding(jax.local_devices()[0])
    return variable_sharding(var, mesh)


def axis_perm(layout: bool | Perm, ndim: int) -> Perm:
    """The permutation of a key table entry: True = all axes reversed (a transpose), False or
    None = the file layout, a tuple = itself."""
    if layout is True:
        return tuple(range(ndim))[::-1]
    if layout is False or layout is None:
        return None
    return tuple(layout)


def file_shape(shape: tuple[int, ...], perm: Perm) -> tuple[int, ...]:
    """Shape of the file tensor that `perm` turns into a model array of `shape`."""
    if perm is None:
        return tuple(shape)
    return tuple(shape[perm.index(a)] for a in range(len(perm)))


def check_shapes(
    params: list[tuple[str, nnx.Variable]],
    reader: CheckpointReader,
    cfg_file: str,
    key_for: KeyFor,
) -> dict[str, tuple[str, Perm]]:
    """(checkpoint key, permutation) per parameter path, every tensor present with its shape.

    params: `named_params` of the (abstract) model; key_for: parameter path -> (key, transpose
    flag or permutation). Raises CheckpointError naming the tensor, its file and `cfg_file`
    (the config the expected shape comes from) for a missing tensor or a shape mismatch.
    """
    plan = {}
    for path, var in params:
        key, layout = key_for(path)
        shape = tuple(var.get_value().shape)
        perm = axis_perm(layout, len(shape))
        if key not in reader.weight_map:
            raise CheckpointError(
                f"tensor {key!r} missing from {reader.listing} (parameter {path!r} of the "
                f"model in {cfg_file})"
            )
        expected = file_shape(shape, perm)
        found = reader.shape(key)
        if found != expected:
            raise CheckpointError(
                f"tensor {key!r} in {reader.where(key)}: expected shape {expected} "
                f"(from {cfg_file}), found {found}"
            )
        plan[path] = (key, perm)
    return plan


def read_array(
    reader: CheckpointReader,
    key: str,
    perm: Perm,
    shape: tuple[int, ...],
    dtype: Any,
    sharding: Sharding,
) -> jax.Array:
    """Global array `shape`/`dtype` in `sharding` from file tensor `key` transposed by `perm`;
    each device's block is read from the file (replicated blocks once)."""
    blocks: dict[tuple, np.ndarray] = {}

    def block(index: tuple[slice, ...]) -> np.ndarray:
        cache_key = tuple((s.start, s.stop, s.step) for s in index)
        if cache_key not in blocks:
            if perm is None:
                data = reader.read(key, index)
            else:  # array axis j is file axis perm[j]
                file_index = [slice(None)] * len(perm)
                for j, axis in enumerate(perm):
                    file_index[axis] = index[j]
                data = reader.read(key, tuple(file_index)).transpose(perm)
            blocks[cache_key] = np.ascontiguousarray(data, dtype=dtype)
        return blocks[cache_key]

    return jax.make_array_from_callback(tuple(shape), sharding, block)


def read_params(
    state: nnx.State,
    plan: dict[str, tuple[str, Perm]],
    reader: CheckpointReader,
    mesh: Mesh | None,
) -> nnx.State:
    """`state` (abstract) with every variable read from `reader` by `plan` (`check_shapes`),
    in the variable's dtype and placed by `param_sharding`."""

    def fill(key_path: tuple, var: nnx.Variable) -> nnx.Variable:
        key, perm = plan[param_path(key_path)]
        value = var.get_value()
        sharding = param_sharding(var, mesh)
        return var.replace(read_array(reader, key, perm, value.shape, value.dtype, sharding))

    return jax.tree_util.tree_map_with_path(fill, state, is_leaf=is_variable)


def to_host(array: jax.Array) -> np.ndarray:
    """Full value of a (possibly sharded, possibly multi-host) array on this host.

    With several processes and a not fully addressable array this is a collective: every
    process must call it.
    """
    if jax.process_count() > 1 and not array.is_fully_addressable:
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(jax.device_get(array))
