"""Device meshes and the one table of logical-axis sharding rules.

Every mesh has the four axes ("data", "fsdp", "sequence", "tensor"), size 1 where unused, so
the rules below apply to any mesh. Parameters carry `logical_axes` metadata; activations are
constrained with `constrain(x, ("batch", "seq", "act_embed"))`.

The mesh activations are constrained to is JAX's own mesh context: `jax.set_mesh(mesh)` (or
`use_mesh(mesh)`, the same context), read with `context_mesh()`; there is no jaxstack-private
mesh state. JAX keys its jit caches on that context, so a function traced without a mesh and
called again under one is traced again. Set it outside `jax.jit`, around the jitted call.

Divisibility: where the mesh axes of a logical axis do not divide its dimension (a vocabulary
of 263 on tensor=2), `spec_for` replicates that dimension and warns once per (name, logical
axes, shape, mesh axes) with an `IndivisibleShardingWarning` naming the parameter, the logical
axis and the sizes: never silently, and without refusing a model whose sizes are what they
are (pad such a dimension to shard it). Turn the warning into an error with
`warnings.simplefilter("error", IndivisibleShardingWarning)`. `constrain` (activations, whose
sizes change with the input: one-token decode steps on a sequence mesh, odd batches) leaves
such a dimension replicated without a warning.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, AxisType, Mesh, NamedSharding, PartitionSpec

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


class IndivisibleShardingWarning(UserWarning):
    """A dimension its mesh axes do not divide was left replicated (see `spec_for`)."""


_WARNED: set[tuple] = set()  # (name, logical axes, shape, mesh axes) already warned about


def _mesh_sizes(mesh: Mesh | AbstractMesh) -> dict[str, int]:
    return dict(zip(mesh.axis_names, (int(n) for n in mesh.axis_sizes), strict=True))


def _spec(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    sizes: dict[str, int],
    *,
    name: str | None,
    warn: bool,
) -> PartitionSpec:
    """PartitionSpec over the mesh axes in `sizes` (axes absent there count as size 1)."""
    if len(logical_axes) != len(shape):
        what = f"{name!r}: " if name else ""
        raise ValueError(
            f"{what}{len(logical_axes)} logical axes {tuple(logical_axes)} for shape {tuple(shape)}"
        )
    used: set[str] = set()
    out = []
    for logical, dim in zip(logical_axes, shape, strict=True):
        if logical is not None and logical not in RULES:
            raise KeyError(f"logical axis {logical!r} has no rule; known: {sorted(RULES)}")
        target = RULES.get(logical) if logical is not None else None
        axes = (target,) if isinstance(target, str) else tuple(target or ())
        axes = tuple(a for a in axes if sizes.get(a, 1) > 1 and a not in used)
        size = math.prod(sizes[a] for a in axes)
        if not axes:
            out.append(None)
            continue
        if dim % size:
            mesh_axes = ", ".join(f"{a}={sizes[a]}" for a in axes)
            key = (name, tuple(logical_axes), tuple(shape), mesh_axes)
            if warn and key not in _WARNED:
                _WARNED.add(key)
                what = f"parameter {name!r}" if name else "array"
                warnings.warn(
                    f"{what} of shape {tuple(shape)}: dimension {dim} (logical axis "
                    f"{logical!r}) is not divisible by mesh axes {mesh_axes} (product {size}); "
                    "it stays replicated over them (pad it, or choose a mesh whose axes "
                    "divide it, to shard it)",
                    IndivisibleShardingWarning,
                    stacklevel=3,
                )
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def spec_for(
    logical_axes: Sequence[str | None],
    shape: Sequence[int],
    mesh: Mesh | AbstractMesh,
    *,
    name: str | None = None,
) -> PartitionSpec:
    """PartitionSpec for an array whose dims carry `logical_axes` (one name or None per dim).

    Each logical axis maps to mesh axes by `RULES`; mesh axes of size 1 (or absent from the
    mesh) are dropped, and a mesh axis is used at most once per array. A dimension not
    divisible by the product of its mesh axes is replicated, with an
    `IndivisibleShardingWarning` (once per name, logical axes, shape and mesh axes) that
    names `name` (the parameter path, when given), the logical axis and the sizes.
    """
    return _spec(logical_axes, shape, _mesh_sizes(mesh), name=name, warn=True)


def variable_sharding(var: nnx.Variable, mesh: Mesh, name: str | None = None) -> NamedSharding:
    """NamedSharding of one (abstract or concrete) variable by its `logical_axes` metadata.

    name: the parameter's path, for the warning when the mesh does not divide a dimension.
    """
    axes = var.get_metadata().get("logical_axes")
    shape = var.get_value().shape
    spec = spec_for(axes, shape, mesh, name=name) if axes else PartitionSpec()
    return NamedSharding(mesh, spec)


def _path(key_path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "name", k))) for k in key_path)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedSharding for every variable in an (abstract or concrete) nnx.State."""
    return jax.tree_util.tree_map_with_path(
        lambda path, var: variable_sharding(var, mesh, _path(path)),
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


# -- JAX's mesh context ------------------------------------------------------------------------


def _tracing() -> bool:
    """True inside a jit / shard_map trace (where JAX exposes only the abstract mesh)."""
    try:
        jax.sharding.get_mesh()  # raises ValueError while tracing (jax >= 0.7)
    except ValueError:
        return True
    return False


def context_mesh() -> Mesh | AbstractMesh | None:
    """The mesh of JAX's mesh context (`jax.set_mesh` / `use_mesh`), or None when none is set.

    Outside jit: the concrete `Mesh`. While tracing (inside `jax.jit`, `shard_map`): the
    `AbstractMesh` (JAX exposes only that there), whose axis types mark the axes that are
    manual inside a `shard_map`. Read it at trace time; it is part of jit's cache key.
    """
    abstract = jax.sharding.get_abstract_mesh()
    if abstract.empty:
        return None
    if _tracing() or any(t == AxisType.Manual for t in abstract.axis_types):
        return abstract
    concrete = jax.sharding.get_mesh()
    if concrete.empty or concrete.abstract_mesh != abstract:  # set by use_abstract_mesh only
        return abstract
    return concrete


@contextlib.contextmanager
def use_mesh(mesh: Mesh | None) -> Iterator[Mesh | None]:
    """`jax.set_mesh(mesh)` as a context manager (None: no mesh): JAX's own mesh context.

    A user's `with jax.set_mesh(mesh):` has exactly the same effect; prefer it. Use it outside
    `jax.jit`, around the jitted call (JAX keys its caches on it). Inside a trace, where
    `jax.set_mesh` is not allowed, this sets only the abstract mesh
    (`jax.sharding.use_abstract_mesh`), which is what `constrain` and `shard_map` read; the
    traced arrays must then already be placed on `mesh` (committed jit arguments).
    """
    if not _tracing():
        with jax.set_mesh(mesh):
            yield mesh
        return
    target = mesh.abstract_mesh if mesh is not None else AbstractMesh((), ())
    if jax.sharding.get_abstract_mesh() == target:
        yield mesh
        return
    with jax.sharding.use_abstract_mesh(target):
        yield mesh


def _auto_sizes(mesh: Mesh | AbstractMesh) -> dict[str, int]:
    """Sizes of the axes `constrain` may use: Auto axes (not Manual inside shard_map, not
    Explicit, whose shardings JAX carries in the array types)."""
    types = getattr(mesh, "axis_types", None) or (AxisType.Auto,) * len(mesh.axis_names)
    return {a: s for (a, s), t in zip(_mesh_sizes(mesh).items(), types) if t == AxisType.Auto}


def constrain(
    x: jax.Array, logical_axes: Sequence[str | None], mesh: Mesh | AbstractMesh | None = None
) -> jax.Array:
    """Sharding constraint on an activation by logical axis names (`RULES`).

    mesh: default the context mesh (`jax.set_mesh` / `use_mesh`). A no-op without a mesh, on a
    mesh of size 1, and inside `shard_map` (manual axes are never constrained; all manual: no
    constraint). A dimension its mesh axes do not divide stays replicated (activations change
    size with the input, e.g. one-token decode steps).
    """
    mesh = context_mesh() if mesh is None else mesh
    if mesh is None or mesh.size == 1:
        return x
    sizes = _auto_sizes(mesh)
    if math.prod(sizes.values()) == 1:
        return x
    spec = _spec(logical_axes, x.shape, sizes, name=None, warn=False)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
