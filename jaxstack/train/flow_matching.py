"""The flow-matching (rectified-flow) training objective of SANA (`linear_flow` in NVlabs/Sana).

    t ~ floor(1000 u), u = sigmoid(N(0, 1))                       (logit-normal, integer t)
    sigma = shift(t / 1000) = s*sigma / (1 + (s - 1)*sigma)
    x_t = (1 - sigma) x0 + sigma eps,   target v = eps - x0
    loss = mean over C, H, W of (v_pred - v)^2, then mean over the batch (unweighted)

The model sees timestep int(sigma * 1000): Sana's `SpacedDiffusion` maps t to sigma*1000 and
casts it back to the int64 timestep dtype (the same integer timesteps diffusers' Flow-DPM-Solver
feeds the model at sampling time). Sana's sigma table is 1 - linspace(1, 0.001, 1000) in float64
(equal to t/1000 up to rounding); it is replicated exactly here.

Caption dropout for classifier-free guidance replaces a caption by the learned null caption with
probability p (Sana's `y_embedding`, `class_dropout_prob` 0.1).

Shapes: B batch, C channels, H, W latent height and width, L caption tokens, D caption width.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxstack.diffusion.schedulers import NUM_TRAIN_TIMESTEPS, flow_shift

Array = jax.Array


@functools.lru_cache(maxsize=16)
def flow_train_tables(shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
    """Host tables indexed by the integer training timestep t in [0, T):
    (alpha float32 [T], sigma float32 [T], model timestep float32 [T] = int(sigma * T)), with
    sigma = shift(t / T) computed in float64 as Sana does and alpha = 1 - sigma."""
    base = 1.0 - np.linspace(1.0, 1.0 / num_train_timesteps, num_train_timesteps)
    sigma = flow_shift(base, shift)
    model_t = (sigma * num_train_timesteps).astype(np.int64).astype(np.float32)
    return (1.0 - sigma).astype(np.float32), sigma.astype(np.float32), model_t


def sample_train_timesteps(
    key: Array, batch: int, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> Array:
    """Logit-normal integer timesteps int32 [batch]: floor(T * sigmoid(N(0, 1))), in [0, T)."""
    u = jax.nn.sigmoid(jax.random.normal(key, (batch,), jnp.float32))
    t = jnp.floor(u * num_train_timesteps).astype(jnp.int32)
    return jnp.clip(t, 0, num_train_timesteps - 1)  # sigmoid rounds to 1.0 for z > ~17


@functools.partial(jax.jit, static_argnames=("shift",))
def flow_noise(key: Array, x0: Array, shift: float) -> tuple[Array, Array, Array]:
    """Noise a batch of clean latents for one flow-matching step.

    x0: [B, ...] latents (any float dtype). shift: the flow shift s (SANA 3.0 or 4.0).
    Returns (x_t float32 [B, ...], timestep float32 [B] = int(sigma*1000), the model's timestep
    input, target float32 [B, ...] = eps - x0).
    """
    k_t, k_eps = jax.random.split(key)
    b = x0.shape[0]
    alpha_tab, sigma_tab, model_t_tab = flow_train_tables(float(shift))
    t = sample_train_timesteps(k_t, b)
    x0 = x0.astype(jnp.float32)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    bshape = (b,) + (1,) * (x0.ndim - 1)
    alpha = jnp.asarray(alpha_tab)[t].reshape(bshape)
    sigma = jnp.asarray(sigma_tab)[t].reshape(bshape)
    x_t = alpha * x0 + sigma * eps
    return x_t, jnp.asarray(model_t_tab)[t], eps - x0


def _broadcast_mask(mask: Array, ndim: int) -> Array:
    mask = jnp.asarray(mask, jnp.float32)
    return mask.reshape(mask.shape + (1,) * (ndim - mask.ndim))


def flow_matching_loss_sums(
    v_pred: Array, target: Array, mask: Array | None = None
) -> tuple[Array, Array]:
    """(sum, normaliser) float32 scalars of the flow-matching loss, for gradient accumulation
    (loss = total sum / total normaliser). Each example contributes its mean over the non-batch
    dimensions; the normaliser counts examples.

    v_pred, target: [B, ...]. mask: optional [B] (or [B, ...] broadcastable, leading-aligned)
    weights: 0 drops an example or element; an element mask averages over its kept elements.
    """
    sq = jnp.square(v_pred.astype(jnp.float32) - target.astype(jnp.float32))
    if mask is None:
        per_example = jnp.mean(sq.reshape(sq.shape[0], -1), axis=1)
        return jnp.sum(per_example), jnp.float32(sq.shape[0])
    m = jnp.broadcast_to(_broadcast_mask(mask, sq.ndim), sq.shape)
    kept = jnp.sum(m.reshape(m.shape[0], -1), axis=1)
    per_example = jnp.sum((m * sq).reshape(sq.shape[0], -1), axis=1) / jnp.maximum(kept, 1e-12)
    w = (kept > 0).astype(jnp.float32)
    return jnp.sum(per_example * w), jnp.sum(w)


def flow_matching_loss(v_pred: Array, target: Array, mask: Array | None = None) -> Array:
    """float32 scalar: mean over the batch of mean over (C, H, W) of (v_pred - target)^2, over
    the examples (or elements) `mask` keeps; see `flow_matching_loss_sums`."""
    total, norm = flow_matching_loss_sums(v_pred, target, mask)
    return total / jnp.maximum(norm, 1.0)


@functools.partial(jax.jit, static_argnames=("p",))
def caption_dropout(
    key: Array, caption: Array, null_caption: Array, p: float
) -> tuple[Array, Array]:
    """Replace each example's caption by the learned null caption with probability p.

    caption: [B, L, D]; null_caption: [L, D] (a trainable parameter, so gradients reach it).
    Returns (caption [B, L, D] in caption's dtype, dropped bool [B]). The attention mask is left
    as is (Sana does the same).
    """
    dropped = jax.random.uniform(key, (caption.shape[0],)) < p
    null = jnp.broadcast_to(null_caption.astype(caption.dtype), caption.shape)
    out = jnp.where(dropped.reshape((-1,) + (1,) * (caption.ndim - 1)), null, caption)
    return out, dropped
