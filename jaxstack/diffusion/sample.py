"""Text-to-image sampling loop for flow-matching models (SANA), jitted with a static step count.

    from jaxstack.diffusion import initial_latents, sample

    z = initial_latents(key, batch=4, channels=32, height=32, width=32)
    z0 = sample(model, z, cond=(emb, mask), uncond=(null_emb, null_mask), guidance_scale=4.5,
                steps=20, scheduler="flow_dpm_solver", shift=3.0)

`velocity_fn(x, timestep, cond) -> v` is any function (or NNX module: its state is passed as a
traced argument, not baked into the program as constants) with x [B', ...] latents, timestep
float32 [B'] (what diffusers' pipeline passes the transformer: sigma*1000 for Flow-Euler,
int(sigma*1000) for Flow-DPM-Solver, see `jaxstack.diffusion.schedulers`), cond a pytree whose
leaves have leading dimension B'. Classifier-free guidance follows `SanaPipeline`: one batched
call on B' = 2B rows, the negative (unconditional) half first, v = v_u + s (v_c - v_u), applied
only when `uncond` is given and s > 1.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxstack.diffusion.schedulers import SCHEDULERS, make_schedule, solve

Array = jax.Array
VelocityFn = Callable[[Array, Array, Any], Array]


def initial_latents(
    key: Array,
    batch: int,
    channels: int,
    height: int,
    width: int,
    *,
    start: int = 0,
    dtype=jnp.float32,
) -> Array:
    """Standard-normal latents [batch, channels, height, width] (`dtype`), one seed per image:
    image j is `normal(fold_in(key, start + j), (channels, height, width))`, so image i is the
    same whatever the batch size or how a large seed sweep is chunked."""
    return _initial_latents(key, jnp.int32(start), batch, (channels, height, width), dtype)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _initial_latents(key, start, batch, shape, dtype):
    idx = start + jnp.arange(batch, dtype=jnp.int32)
    keys = jax.vmap(lambda i: jax.random.fold_in(key, i))(idx)
    return jax.vmap(lambda k: jax.random.normal(k, shape, dtype))(keys)


def cfg_combine(v_uncond: Array, v_cond: Array, guidance_scale) -> Array:
    """Classifier-free guidance v_u + s (v_c - v_u) (shapes broadcast; float32 in, float32 out)."""
    return v_uncond + guidance_scale * (v_cond - v_uncond)


def guided_velocity(
    velocity_fn: VelocityFn,
    x: Array,
    timestep: Array,
    cond: Any,
    uncond: Any = None,
    guidance_scale=4.5,
) -> Array:
    """The (guided) velocity at latents x [B, ...] and scalar timestep, as float32 [B, ...].

    Without `uncond`: velocity_fn(x, t [B], cond). With it: one call on [uncond; cond] (2B rows,
    negative first, like `SanaPipeline`), then `cfg_combine`.
    """
    b = x.shape[0]
    if uncond is None:
        t = jnp.full((b,), timestep, jnp.float32)
        return velocity_fn(x, t, cond).astype(jnp.float32)
    x2 = jnp.concatenate([x, x], axis=0)
    c2 = jax.tree.map(lambda u, c: jnp.concatenate([u, c], axis=0), uncond, cond)
    t2 = jnp.full((2 * b,), timestep, jnp.float32)
    v = velocity_fn(x2, t2, c2).astype(jnp.float32)
    return cfg_combine(v[:b], v[b:], guidance_scale)


@dataclasses.dataclass(frozen=True)
class _PlainFn:
    fn: Callable

    def __call__(self, state, x, t, c):
        del state
        return self.fn(x, t, c)


@dataclasses.dataclass(frozen=True)
class _ModuleFn:
    graphdef: Any

    def __call__(self, state, x, t, c):
        return nnx.merge(self.graphdef, state)(x, t, c)


def _sample_impl(fn, fn_state, latents, cond, uncond, guidance_scale, *, steps, scheduler, shift):
    schedule = make_schedule(scheduler, steps, shift)

    def velocity(x, t):
        return guided_velocity(
            lambda xx, tt, cc: fn(fn_state, xx, tt, cc), x, t, cond, uncond, guidance_scale
        )

    return solve(velocity, latents.astype(jnp.float32), schedule)


_sample_jit = jax.jit(_sample_impl, static_argnames=("fn", "steps", "scheduler", "shift"))


def sample(
    velocity_fn: VelocityFn | nnx.Module,
    latents: Array,
    *,
    cond: Any,
    uncond: Any = None,
    guidance_scale: float = 4.5,
    steps: int = 20,
    scheduler: str = "flow_dpm_solver",
    shift: float = 3.0,
) -> Array:
    """Integrate the flow ODE from noise `latents` [B, ...] (sigma = 1) to sigma = 0.

    velocity_fn: `f(x, timestep, cond) -> v` or an NNX module with that call signature.
    cond / uncond: pytrees of arrays with leading dimension B (e.g. (embeddings, mask)); uncond
    has cond's structure and shapes. Guidance runs when uncond is given and guidance_scale > 1.
    scheduler: "flow_dpm_solver" (SANA default) or "flow_euler"; steps and shift are static.
    Returns float32 [B, ...]. Compiled once per (function, steps, scheduler, shift, shapes);
    guidance_scale is traced, so changing it does not recompile.
    """
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {SCHEDULERS}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    b = latents.shape[0]
    for name, tree in (("cond", cond), ("uncond", uncond)):
        for leaf in jax.tree.leaves(tree):
            if jnp.ndim(leaf) == 0 or leaf.shape[0] != b:
                raise ValueError(
                    f"{name} leaves must have leading dimension {b} (the latents' batch), "
                    f"got shape {jnp.shape(leaf)}"
                )
    use_cfg = uncond is not None and guidance_scale > 1.0
    if use_cfg and jax.tree.structure(uncond) != jax.tree.structure(cond):
        raise ValueError("uncond must have the same pytree structure as cond")
    if isinstance(velocity_fn, nnx.Module):
        graphdef, fn_state = nnx.split(velocity_fn)
        fn = _ModuleFn(graphdef)
    else:
        fn, fn_state = _PlainFn(velocity_fn), None
    return _sample_jit(
        fn,
        fn_state,
        latents,
        cond,
        uncond if use_cfg else None,
        jnp.float32(guidance_scale),
        steps=int(steps),
        scheduler=scheduler,
        shift=float(shift),
    )
