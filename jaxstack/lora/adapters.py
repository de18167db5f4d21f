"""LoRA adapters on the decoder LLM's projections: add, inspect, merge, remove.

`apply_lora(model, LoRAConfig(rank=16, targets=("q_proj", "v_proj")))` replaces each targeted
`jaxstack.nn.layers.Dense` of every `Attention` / `MLP` block of `jaxstack/models/llm.py` (in an
`LLM`, or any module holding one, e.g. the VLM's language model) by a `LoRALinear`
(`jaxstack/lora/linear.py`) that keeps the Dense as its frozen `base`. Parameter paths become
`layers.{i}.self_attn.q_proj.base.kernel` (frozen) and `layers.{i}.self_attn.q_proj.lora.lora_a`
/ `.lora_b` (`nnx.LoRAParam`, trainable).

Training only the adapters: `LORA_PARAMS` is the trainable filter and `BASE_PARAMS` the frozen
one (`jaxstack.train.step.init_train_state(..., trainable=LORA_PARAMS)` and `split_frozen`), so
base weights get no gradients, no optimizer state, no weight decay and no checkpoint entries.

`merge_lora` folds the adapters into the base kernels (W + alpha/rank * A @ B) and returns a
plain model for the transformers exporter; `remove_lora` returns the untouched base model.
Both leave their input model as it was (they share its arrays, which are immutable).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.lora.linear import LoRADropoutSeeds, LoRALinear
from jaxstack.models.llm import MLP, Attention
from jaxstack.nn.layers import Dense
from jaxstack.parallel.mesh import variable_sharding

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_TARGETS = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION_TARGETS + MLP_TARGETS  # PEFT's `target_modules` names (transformers')

LORA_PARAMS = nnx.LoRAParam  # the trainable filter: adapter matrices only
BASE_PARAMS = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))  # everything else: frozen

Path = tuple[str | int, ...]


def check_targets(targets: Any) -> tuple[str, ...]:
    """`targets` as a tuple in `TARGETS` order; ValueError for unknown, empty or non-list."""
    if isinstance(targets, str) or not isinstance(targets, list | tuple):
        raise ValueError(f"LoRA targets must be a list of names from {TARGETS}, got {targets!r}")
    unknown = [t for t in targets if t not in TARGETS]
    if unknown:
        raise ValueError(f"unknown LoRA target {unknown[0]!r}; choose from {', '.join(TARGETS)}")
    if not targets:
        raise ValueError(f"LoRA targets are empty; choose from {', '.join(TARGETS)}")
    return tuple(t for t in TARGETS if t in targets)


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """rank: r >= 1 of A [in, r] and B [r, out]; alpha: the update is scaled by alpha / rank
    (PEFT's `lora_alpha`, without rsLoRA); dropout: probability on the adapter input while
    training; targets: the projections that get adapters, in every layer (any of `TARGETS`)."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ATTENTION_TARGETS

    def __post_init__(self):
        if not isinstance(self.rank, int | np.integer) or self.rank < 1:
            raise ValueError(
                f"LoRA rank must be an int >= 1, got {self.rank!r} (rank 0 means no adapters: "
                "do not apply LoRA, or set lora.rank=0 in a job config)"
            )
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "targets", check_targets(self.targets))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _child(obj: Any, key: str | int) -> Any:
    return obj[key] if isinstance(key, int) else getattr(obj, key)


def _set_child(parent: Any, key: str | int, value: Any) -> None:
    if isinstance(key, int):
        parent[key] = value
    else:
        setattr(parent, key, value)


def _blocks(model: nnx.Module) -> Iterator[tuple[Path, nnx.Module, tuple[str, ...]]]:
    """(path, module, projection names) of every decoder Attention / MLP in `model`."""
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Attention):
            yield tuple(path), module, ATTENTION_TARGETS
        elif isinstance(module, MLP):
            yield tuple(path), module, MLP_TARGETS


def lora_layers(model: nnx.Module) -> list[tuple[Path, LoRALinear]]:
    """(path, layer) of every `LoRALinear` in `model`, e.g. (("layers", 0, "self_attn",
    "q_proj"), layer), in the module tree's order."""
    return [(tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, LoRALinear)]


def lora_config(model: nnx.Module) -> LoRAConfig | None:
    """The LoRAConfig of `model`'s adapters (None without any). ValueError if the layers
    differ in rank, alpha or dropout, or if a target is missing from some blocks."""
    layers = lora_layers(model)
    if not layers:
        return None
    kinds = {(layer.rank, layer.alpha, layer.dropout) for _, layer in layers}
    if len(kinds) > 1:
        raise ValueError(f"LoRA layers differ in (rank, alpha, dropout): {sorted(kinds)}")
    targets = {layer.target for _, layer in layers}
    blocks = {t: 0 for t in targets}
    for _, _, names in _blocks(model):
        for t in targets & set(names):
            blocks[t] += 1
    counts = {t: sum(layer.target == t for _, layer in layers) for t in targets}
    partial = sorted(t for t in targets if counts[t] != blocks[t])
    if partial:
        raise ValueError(f"LoRA target {partial[0]} has adapters in only some of the blocks")
    rank, alpha, dropout = kinds.pop()
    return LoRAConfig(rank=rank, alpha=alpha, dropout=dropout, targets=tuple(targets))


def lora_params(model: nnx.Module) -> nnx.State:
    """The adapter matrices of `model` (an nnx.State of `nnx.LoRAParam`)."""
    return nnx.state(model, LORA_PARAMS)


def _place(model: nnx.Module, mesh: Any) -> None:
    """Put the adapter params on `mesh` by their logical axes (each process supplies its own
    blocks from the same host values, so this works across processes)."""
    state = lora_params(model)

    def put(var: nnx.Variable) -> nnx.Variable:
        host = np.asarray(jax.device_get(var.get_value()))
        sharding = variable_sharding(var, mesh)
        return var.replace(jax.make_array_from_callback(host.shape, sharding, lambda i: host[i]))

    nnx.update(model, jax.tree.map(put, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def apply_lora(
    model: nnx.Module,
    cfg: LoRAConfig,
    *,
    rngs: nnx.Rngs | int = 0,
    param_dtype: Any = jnp.float32,
    mesh: Any = None,
) -> nnx.Module:
    """Add adapters to `model` in place (and return it): every `cfg.targets` projection of
    every decoder block becomes a `LoRALinear` around its Dense.

    A is drawn from `rngs` (an int is a seed) as PEFT does, B is zero, so the model's outputs
    are unchanged until training. param_dtype: the adapters' storage dtype (float32 master
    weights, as PEFT keeps adapters of a bfloat16 model); the branch computes in the base
    Dense's dtype. mesh: place the adapter params on it by their logical axes (A shards like
    the base kernel's input axis, B like its output axis); None leaves them on the default
    device. ValueError if the model already has adapters or has no decoder blocks.
    """
    if lora_layers(model):
        raise ValueError(f"the {type(model).__name__} already has LoRA adapters")
    if isinstance(rngs, int):
        rngs = nnx.Rngs(rngs)
    blocks = list(_blocks(model))
    if not blocks:
        raise ValueError(
            f"no decoder Attention / MLP blocks (jaxstack/models/llm.py) in {type(model).__name__}"
        )
    layer_id = 0
    for path, module, names in blocks:
        for name in names:
            if name not in cfg.targets:
                continue
            base = getattr(module, name)
            if not isinstance(base, Dense):
                where = ".".join(map(str, (*path, name)))
                raise ValueError(f"{where} is a {type(base).__name__}, not a Dense projection")
            in_features, out_features = base.kernel.get_value().shape
            axes = base.kernel.get_metadata().get("logical_axes") or (None, None)
            layer = LoRALinear(
                base,
                in_features=in_features,
                out_features=out_features,
                rank=cfg.rank,
                alpha=cfg.alpha,
                dropout=cfg.dropout,
                target=name,
                layer_id=layer_id,
                in_axis=axes[0],
                out_axis=axes[1],
                dtype=base.dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            setattr(module, name, layer)
            layer_id += 1
    if mesh is not None:
        _place(model, mesh)
    return model


def _copy(model: nnx.Module) -> nnx.Module:
    """A new module graph over the same (immutable) arrays: editing it leaves `model` alone."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, state, copy=True)  # new Variables, same arrays


@jax.jit
def _merge_kernel(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    update = jnp.dot(a.astype(jnp.float32), b.astype(jnp.float32), precision="highest")
    return (kernel.astype(jnp.float32) + scale * update).astype(kernel.dtype)


def merge_lora(model: nnx.Module) -> nnx.Module:
    """A copy of `model` without adapters whose kernels are W + alpha / rank * A @ B (summed in
    float32, stored in W's dtype and sharding): a plain model for `jaxstack.hf.save_model`.
    `model` itself keeps its adapters. ValueError if a base is not a Dense."""
    merged = _copy(model)
    for path, layer in lora_layers(merged):
        base = layer.base
        if not isinstance(base, Dense):
            where = ".".join(map(str, path))
            raise ValueError(f"cannot merge {where}: its base is a {type(base).__name__}")
        kernel = base.kernel.get_value()
        scale = jnp.float32(layer.scale)
        new = _merge_kernel(kernel, layer.lora_a.get_value(), layer.lora_b.get_value(), scale)
        base.kernel.set_value(jax.device_put(new, kernel.sharding))
        _set_child(_parent(merged, path), path[-1], base)
    return merged


def remove_lora(model: nnx.Module) -> nnx.Module:
    """A copy of `model` with each `LoRALinear` replaced by its (frozen) base: the model the
    adapters were trained on. `model` itself keeps its adapters."""
    plain = _copy(model)
    for path, layer in lora_layers(plain):
        _set_child(_parent(plain, path), path[-1], layer.base)
    return plain


def _parent(model: nnx.Module, path: Path) -> Any:
    obj = model
    for key in path[:-1]:
        obj = _child(obj, key)
    return obj


def set_dropout_seeds(model: nnx.Module, seeds_b: jax.Array | None) -> None:
    """Switch LoRA dropout on for the next forward pass of `model` (in place): seeds_b uint32
    [B], one per batch row of the inputs (`dropout_row_seeds`); None switches it off. Call it
    on the model rebuilt inside the training step (the model's inputs must have batch B)."""
    for _, layer in lora_layers(model):
        layer.dropout_seeds = nnx.data(None) if seeds_b is None else LoRADropoutSeeds(seeds_b)


def dropout_row_seeds(seed: int, step: int, batch_size: int) -> np.ndarray:
    """uint32 [batch_size]: the dropout seeds of the rows of training step `step`, a pure
    function of (seed, step), so a resumed run draws the same masks."""
    rng = np.random.default_rng([int(seed), int(step)])
    return rng.integers(0, 2**32, size=batch_size, dtype=np.uint32)
