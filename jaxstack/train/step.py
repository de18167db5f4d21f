"""Causal-LM training step: masked cross-entropy, AdamW (warmup + cosine), global-norm clipping,
gradient accumulation, bf16 compute over float32 master weights, explicit shardings.

The step is a pure function of a `TrainState` pytree and a batch, jitted once with the
shardings derived from the mesh rules, so the same code runs on one device, on an 8-device
mesh and across processes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxstack.parallel.mesh import compiler_options, spec_for, state_shardings, use_mesh
from jaxstack.quant import coat_adamw

Array = jax.Array
Batch = dict[str, Array]


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine decay to `lr * min_lr_ratio` at `total_steps`.

    total_steps = 0 (the default) means "the job's steps": the loop fills it in
    (`jaxstack.train.loop.RunConfig.resolved`), so the cosine spans the run; used outside a job,
    0 keeps the learning rate at `lr` after warmup.
    """

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    total_steps: int = 0
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0

    def __post_init__(self):
        checks = (
            ("lr", self.lr > 0),
            ("min_lr_ratio", self.min_lr_ratio >= 0),
            ("warmup_steps", self.warmup_steps >= 0),
            ("total_steps", self.total_steps >= 0),
            ("weight_decay", self.weight_decay >= 0),
            ("b1", 0 <= self.b1 < 1),
            ("b2", 0 <= self.b2 < 1),
            ("eps", self.eps > 0),
            ("clip_norm", self.clip_norm > 0),
        )
        for key, ok in checks:
            if not ok:
                raise ValueError(f"optim.{key} out of range: {getattr(self, key)!r}")


def learning_rate_schedule(cfg: OptimConfig) -> optax.Schedule:
    if cfg.total_steps == 0:  # no decay: linear warmup, then constant
        return optax.linear_schedule(
            cfg.lr / max(cfg.warmup_steps, 1), cfg.lr, max(cfg.warmup_steps, 1)
        )
    return optax.warmup_cosine_decay_schedule(
        init_value=cfg.lr / max(cfg.warmup_steps, 1),  # the first update already moves
        peak_value=cfg.lr,
        warmup_steps=max(cfg.warmup_steps, 1),
        decay_steps=max(cfg.total_steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * cfg.min_lr_ratio,
    )


def weight_decay_mask(params: nnx.State) -> nnx.State:
    """Weight decay on matrices only (not on norms or biases)."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: OptimConfig, precision: str = "bf16") -> optax.GradientTransformation:
    """Clipping, then AdamW; with precision "fp8_coat" the AdamW of `jaxstack.quant.coat_adamw`
    (e4m3 moments with dynamic range expansion), otherwise optax's float32 one."""
    adamw = coat_adamw if precision == "fp8_coat" else optax.adamw
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        adamw(
            learning_rate_schedule(cfg),
            b1=cfg.b1,
            b2=cfg.b2,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            mask=weight_decay_mask,
        ),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    """step: int32 scalar; params: nnx.State of plain arrays (float32 master weights);
    opt_state: the optax state for `params`."""

    step: Array
    params: nnx.State
    opt_state: optax.OptState


def param_shardings(model: nnx.Module, mesh: Mesh, trainable: nnx.filterlib.Filter = nnx.Param):
    """NamedShardings (pure dict, same structure as TrainState.params) by the mesh rules."""
    return nnx.to_pure_dict(state_shardings(nnx.state(model, trainable), mesh))


def opt_state_shardings(opt_state_shapes, params_sh: dict, mesh: Mesh):
    """Optimizer moments shard like the params they mirror; everything else is replicated."""
    params_def = jax.tree.structure(params_sh)
    replicated = NamedSharding(mesh, PartitionSpec())

    def is_param_tree(node) -> bool:
        return isinstance(node, dict) and jax.tree.structure(node) == params_def

    return jax.tree.map(
        lambda n: params_sh if is_param_tree(n) else replicated,
        opt_state_shapes,
        is_leaf=is_param_tree,
    )


def init_train_state(
    model: nnx.Module,
    optimizer: optax.GradientTransformation,
    mesh: Mesh | None = None,
    *,
    trainable: nnx.filterlib.Filter = nnx.Param,
) -> tuple[TrainState, TrainState | None]:
    """(state, shardings) from a model whose params are already placed (see `shard_model`).

    Params are the `trainable` parameters (default: all) as a pure dict of float32 master
    weights; the others (a frozen vision tower, LoRA base weights) are not in the state, so they
    get no optimizer moments, no gradients and no checkpoint entries (`split_frozen` gives
    them). Optimizer moments are created directly in their param's sharding. shardings is None
    without a mesh.
    """
    params = nnx.to_pure_dict(nnx.state(model, trainable))
    if mesh is None:
        opt_state = jax.jit(optimizer.init)(params)
        return TrainState(jnp.zeros((), jnp.int32), params, opt_state), None
    params_sh = param_shardings(model, mesh, trainable)
    opt_sh = opt_state_shardings(jax.eval_shape(optimizer.init, params), params_sh, mesh)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(params)
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = TrainState(step=replicated, params=params_sh, opt_state=opt_sh)
    step = jax.device_put(jnp.zeros((), jnp.int32), replicated)
    return TrainState(step, params, opt_state), shardings


def split_frozen(
    model: nnx.Module, trainable: nnx.filterlib.Filter = nnx.Param
) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, frozen params, rest) for a model trained on its `trainable` params only.

    `merge_trainable(graphdef, params, frozen, rest)` rebuilds the model from a TrainState's
    params (pure dict). frozen holds the parameters outside `trainable` (empty when all train);
    rest is the non-parameter state.
    """
    graphdef, _, frozen, rest = nnx.split(model, trainable, nnx.Param, ...)
    return graphdef, frozen, rest


def merge_trainable(graphdef: nnx.GraphDef, params, frozen: nnx.State, rest: nnx.State):
    """The model of `split_frozen` with the trainable params `params` (pure dict or State)."""
    return nnx.merge(graphdef, params, frozen, rest)


def token_cross_entropy(logits_btv: Array, targets_bt: Array) -> Array:
    """Per-token negative log-likelihood [B, T] in float32."""
    logits = logits_btv.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    return lse - picked


def chunked_token_nll(
    logits_fn: Callable[[Array], Array], hidden_btd: Array, targets_bt: Array, chunk: int
) -> Array:
    """Per-token NLL [B, T] without materialising all logits: the LM head and the
    cross-entropy run over sequence chunks of `chunk` tokens and are recomputed in the
    backward pass (a [B, T, V] float32 logits tensor would dominate memory at long T)."""
    b, t, d = hidden_btd.shape
    if chunk <= 0 or t <= chunk or t % chunk:
        return token_cross_entropy(logits_fn(hidden_btd), targets_bt)
    n = t // chunk
    h = hidden_btd.reshape(b, n, chunk, d).swapaxes(0, 1)
    y = targets_bt.reshape(b, n, chunk).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        h_c, y_c = args
        return token_cross_entropy(logits_fn(h_c), y_c)

    return jax.lax.map(one, (h, y)).swapaxes(0, 1).reshape(b, t)


def lm_loss_sums(model: nnx.Module, batch: Batch, *, logits_chunk: int = 1024):
    """(sum of masked token NLL, number of loss tokens) for one micro-batch.

    batch: input_ids int32 [B, T]; targets int32 [B, T] (next token); loss_mask [B, T];
    optional segment_ids int32 [B, T] (packed sequences, 0 = padding).
    """
    hidden = model.hidden_states(batch["input_ids"], segment_ids=batch.get("segment_ids"))
    nll = chunked_token_nll(model.logits, hidden, batch["targets"], logits_chunk)
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def _split_micro(batch: Batch, grad_accum: int) -> Batch:
    def one(x):
        if x.shape[0] % grad_accum:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by grad_accum={grad_accum}")
        # Strided split: micro-batch j takes rows j, j+k, j+2k, ... so with rows sharded over
        # (data, fsdp) every micro-batch stays spread over all devices (no resharding).
        return x.reshape(x.shape[0] // grad_accum, grad_accum, *x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(one, batch)


Objective = Callable[[nnx.State, Batch, object], tuple[Array, Array, dict[str, Array]]]


def make_update(
    objective: Objective,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    mesh: Mesh | None = None,
    state_sh: TrainState | None = None,
    frozen_sh=None,
) -> Callable[[TrainState, Batch, object], tuple[TrainState, dict[str, Array]]]:
    """Build the jitted `update(state, batch, frozen) -> (state, metrics)` every job trains with.

    objective(params, micro_batch, frozen) -> (loss numerator, denominator, aux metrics): the
    loss is numerator / denominator summed over the `grad_accum` micro-batches (strided rows of
    the batch), so accumulation is exact for token-sum losses (denominator = token count) and a
    plain mean for per-batch losses (denominator 1). frozen: any pytree the objective reads but
    does not train (frozen params, an RL reference policy; None for none); it is an argument,
    never a constant baked into the program, and never donated.
    mesh/state_sh/frozen_sh: the mesh and shardings (`init_train_state`); the state is donated
    and keeps its shardings, the program gets `compiler_options(mesh)` and runs under the mesh.
    metrics: loss, tokens (the denominator), grad_norm and the aux metrics (means over
    micro-batches); float32 scalars.
    """

    def loss_fn(params, micro, frozen):
        num, den, aux = objective(params, micro, frozen)
        return num, (den, aux)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def update(state: TrainState, batch: Batch, frozen):
        with use_mesh(mesh):
            micro = _split_micro(batch, grad_accum)

            def body(carry, mb):
                g_acc, l_acc, n_acc, a_acc = carry
                (num, (den, aux)), g = grad_fn(state.params, mb, frozen)
                aux = {k: jnp.asarray(v, jnp.float32) for k, v in aux.items()}
                a_acc = jax.tree.map(jnp.add, a_acc, aux) if a_acc is not None else aux
                return (jax.tree.map(jnp.add, g_acc, g), l_acc + num, n_acc + den, a_acc), None

            first = jax.tree.map(lambda x: x[0], micro)
            carry, _ = body(
                (
                    jax.tree.map(jnp.zeros_like, state.params),
                    jnp.zeros((), jnp.float32),
                    jnp.zeros((), jnp.float32),
                    None,
                ),
                first,
            )
            if grad_accum > 1:
                carry, _ = jax.lax.scan(body, carry, jax.tree.map(lambda x: x[1:], micro))
            grads, loss_sum, n_tokens, aux = carry
            denom = jnp.maximum(n_tokens, 1.0)
            grads = jax.tree.map(lambda g: g / denom, grads)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        metrics = {
            **{k: v / grad_accum for k, v in aux.items()},
            "loss": loss_sum / denom,
            "tokens": n_tokens,
            "grad_norm": optax.tree.norm(grads),
        }
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    if mesh is None or state_sh is None:
        return jax.jit(update, donate_argnums=0)
    replicated = NamedSharding(mesh, PartitionSpec())
    return jax.jit(
        update,
        donate_argnums=0,
        in_shardings=(state_sh, None, frozen_sh),
        out_shardings=(state_sh, replicated),
        compiler_options=compiler_options(mesh),
    )


def make_train_step(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    optimizer: optax.GradientTransformation,
    *,
    grad_accum: int = 1,
    loss_sums: Callable[[nnx.Module, Batch], tuple[Array, Array]] = lm_loss_sums,
    mesh: Mesh | None = None,
    state_sh: TrainState | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Array]]]:
    """`step(state, batch) -> (state, metrics)` for a token-sum loss over all params.

    graphdef/rest: from `nnx.split(model, nnx.Param, ...)` (rest = non-parameter state).
    loss_sums(model, micro_batch) -> (sum of token losses, loss-token count). The rest as in
    `make_update` (whose `update(state, batch, None)` this is).
    """

    def objective(params, micro, _frozen):
        total, count = loss_sums(nnx.merge(graphdef, params, rest), micro)
        return total, count, {}

    update = make_update(objective, optimizer, grad_accum=grad_accum, mesh=mesh, state_sh=state_sh)
    return lambda state, batch: update(state, batch, None)


def batch_sharding(mesh: Mesh, batch: Batch) -> dict[str, NamedSharding]:
    """Shard every batch array's leading dim over (data, fsdp) and its second dim over sequence."""

    def one(x):
        names = ("batch", "seq")[: x.ndim] + (None,) * max(x.ndim - 2, 0)
        return NamedSharding(mesh, spec_for(names, x.shape, mesh))

    return jax.tree.map(one, batch)


def place_batch(mesh: Mesh | None, batch: dict) -> Batch:
    """Put a host batch (numpy, the same on every process) onto the mesh."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, batch)
    shardings = batch_sharding(mesh, batch)
    return jax.tree.map(
        lambda x, s: jax.make_array_from_callback(x.shape, s, lambda idx: x[idx]), batch, shardings
    )
