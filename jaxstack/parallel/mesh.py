"""Device meshes and the one table of logical-axis sharding rules.

Every mesh has the four axes ("data", "fsdp", "sequence", "tensor"), size 1 where unused, so
the rules below apply to any mesh. Parameters carry `logical_axes` metadata; activations are
constrained with `constrain(x, ("batch", "seq", "act_embed"))` inside a `use_mesh` context.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXES = ("data", "fsdp", "sequence", "tensor")

# logical axis name -> mesh axis (or tuple of mesh axes). The single place sharding is decided.
RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",  # flattened (num_heads * head_dim) projection dim
    "kv_heads": "tensor",
    "mlp": "tensor",
    "norm": None,
    # activations
    "batch": ("data", "fsdp"),
    "seq": "sequence",
    "act_embed": None,
    "act_heads": "tensor",
    "act_kv_heads": "tensor",
    "act_mlp": "tensor",
    "act_vocab": "tensor",
}


def parse_mesh_spec(spec: str | dict[str, int] | None, num_devices: int) -> dict[str, int]:
    """Parse "data=2,fsdp=2,tensor=2" (or a dict) into sizes for all four axes.

    One axis may be -1 (the rest of the devices). Axes not named get size 1; an empty spec
    means "data=-1" (pure data parallelism).
    """
    if spec is None or spec == "" or spec == {}:
        sizes = {"data": -1}
    elif isinstance(spec, str):
        sizes = {}
        for part in spec.split(","):
            if "=" not in part:
                raise ValueError(f"bad mesh spec {spec!r}: expected 'axis=size,...' (axes {AXES})")
            name, value = (s.strip() for s in part.split("=", 1))
            try:
                sizes[name] = int(value)
            except ValueError as e:
                raise ValueError(f"bad mesh spec {spec!r}: size {value!r} is not an int") from e
    else:
        sizes = dict(spec)
    unknown = set(sizes) - set(AXES)
    if unknown:
        raise ValueError(f"unknown mesh axes {sorted(unknown)}; valid axes: {list(AXES)}")
    full = {a: sizes.get(a, 1) for a in AXES}
    rest = [a for a, s in full.items() if s == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh spec {spec!r}: at most one axis may be -1")
    known = math.prod(s for s in full.values() if s != -1)
    if rest:
        if num_devices % known:
            raise ValueError(f"mesh spec {spec!r} does not divide {num_devices} devices")
        full[rest[0]] = num_devices // known
    if math.prod(full.values()) != num_devices:
        raise ValueError(
            f"mesh spec {spec!r} uses {math.prod(full.values())} devices but {num_devices} exist"
        )
    return full


def make_mesh(
    spec: str | dict[str, int] | None = None, devices: Sequence[jax.Device] | None = None
) -> Mesh:
    """Mesh over `devices` (default: all, across processes) with axes (data, fsdp, sequence, tensor).

    spec: e.g. "data=2,fsdp=2,tensor=2" or "fsdp=-1"; default "data=-1".
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[a] for a in AXES)
    try:
        from jax.experimental import mesh_utils

        dev_array = mesh_utils.create_device_mesh(shape, devices=devices)
    except Exception:  # CPU / uneven topologies: plain reshape keeps process locality
        dev_array = np.asarray(devices).reshape(shape)
    return Mesh(dev_array, AXES)


def spec_for(logical_axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
    """PartitionSpec for an array whose dims carry `logical_axes`.

    A dim whose size the mesh axes do not divide is left replicated; a mesh axis is used at
    most once per array.
    """
    used: set[str] = set()
    out = []
    for name, dim in zip(logical_axes, shape, strict=True):
        target = RULES.get(name) if name is not None else None
        if name is not None and name not in RULES:
            raise KeyError(f"logical axis {name!r} has no rule; known: {sorted(RULES)}")
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if mesh.shape[a] > 1 and a not in used)
        size = math.prod(mesh.shape[a] for a in axes)
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def variable_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    """NamedSharding of one (abstract or concrete) variable by its `logical_axes` metadata."""
    axes = var.get_metadata().get("logical_axes")
    shape = var.get_value().shape
    return NamedSharding(mesh, spec_for(axes, shape, mesh) if axes else PartitionSpec())


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding for every variable in an (abstract or concrete) nnx.State."""
    return jax.tree.map(
        lambda var: variable_sharding(var, mesh),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def compiler_options(mesh: Mesh | None) -> dict[str, bool] | None:
    """XLA options for training programs on `mesh` (None: XLA's defaults).

    On GPU with sequence parallelism (mesh sequence > 1) the latency-hiding scheduler is off:
    to overlap the sequence-parallel collectives it hoists every layer's rematerialized forward
    ahead of the backward pass, so all layers' MLP activations are live at once and activation
    checkpointing is undone (Qwen2.5-1.5B shape, 2 H200s, full remat, 128k tokens: 85 GiB of
    temporaries with it, 13 GiB without; same step time; experiments/NOTES.md).
    """
    if mesh is None or mesh.shape.get("sequence", 1) <= 1:
        return None
    if mesh.devices.flat[0].platform != "gpu":
        return None
    return {"xla_gpu_enable_latency_hiding_scheduler": False}


def init_sharded(make, mesh: Mesh | None):
    """Construct the module `make()` with every parameter created in its sharded layout.

    Several devices: the initializer is jitted with the rules' output shardings, so no device
    ever holds the whole model. One device (or no mesh): built eagerly, op by op, because
    one jitted program of every parameter's random initializer can take minutes to compile
    on the GPU for a ~100M-parameter model.
    """
    if mesh is None or mesh.size == 1:
        model = make()
        return model if mesh is None else shard_model(model, mesh)
    graphdef, abstract = nnx.split(nnx.eval_shape(make))
    shardings = state_shardings(abstract, mesh)
    return nnx.merge(graphdef, jax.jit(lambda: nnx.state(make()), out_shardings=shardings)())


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Place every parameter of `model` on `mesh` by the rules (in place); returns the model."""
    state = nnx.state(model)
    shardings = state_shardings(state, mesh)
    nnx.update(model, jax.device_put(state, shardings))
    return model


_CURRENT_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("mesh", default=None)


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None):
    """Make `mesh` the target of `constrain` calls traced inside this context."""
    token = _CURRENT_MESH.set(mesh)
    try:
        yield mesh
    finally:
        _CURRENT_MESH.reset(token)


def current_mesh() -> Mesh | None:
    return _CURRENT_MESH.get()


def constrain(x: jax.Array, logical_axes: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical axis names; no-op without a mesh."""
    mesh = _CURRENT_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    spec = spec_for(logical_axes, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
