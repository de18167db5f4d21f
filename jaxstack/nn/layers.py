"""Shared layers: dense projections, embeddings, RMSNorm and rotary position embeddings.

Parameters are `nnx.Param`s carrying `logical_axes` metadata (e.g. ("embed", "mlp")); the
table `jaxstack.parallel.mesh.RULES` maps those names to mesh axes. Parameters are stored in
`param_dtype` (float32 master weights for training) and cast to `dtype` at use.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array


def _normal(rngs: nnx.Rngs, shape: Sequence[int], std: float, dtype) -> Array:
    return (std * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)


class Dense(nnx.Module):
    """y = x @ kernel (+ bias). kernel [in, out] with logical axes `axes`.

    `matmul`: None (a plain product in `dtype`) or a hashable callable `(x, kernel, out_dtype)
    -> y` that runs the product instead, e.g. `jaxstack.quant.Fp8Matmul` (set by
    `jaxstack.quant.apply_fp8`)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        axes: tuple[str | None, str | None],
        use_bias: bool = False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        init_std: float = 0.02,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.matmul = None
        self.kernel = nnx.Param(
            _normal(rngs, (in_features, out_features), init_std, param_dtype), logical_axes=axes
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
            if use_bias
            else None
        )

    def __call__(self, x: Array) -> Array:
        if self.matmul is not None:
            y = self.matmul(x.astype(self.dtype), self.kernel[...], self.dtype)
        else:
            y = jnp.dot(x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table [vocab, embed]; `attend` gives tied-embedding logits."""

    def __init__(self, vocab: int, features: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = nnx.Param(
            _normal(rngs, (vocab, features), 0.02, param_dtype), logical_axes=("vocab", "embed")
        )

    def __call__(self, ids_bt: Array) -> Array:
        return jnp.take(self.embedding[...], ids_bt, axis=0).astype(self.dtype)

    def attend(self, x_btd: Array) -> Array:
        return jnp.dot(x_btd.astype(self.dtype), self.embedding[...].astype(self.dtype).T)


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32: x / rms(x) * scale (scale stored as in HF, init ones).

    unit_offset: Gemma's form x / rms(x) * (1 + scale), scale initialised to zeros (as HF
    Gemma stores it); the product is taken in float32 before the cast to `dtype`.
    """

    def __init__(
        self,
        features: int,
        *,
        eps: float,
        dtype,
        param_dtype,
        axis_name="norm",
        unit_offset: bool = False,
    ):
        self.eps = eps
        self.dtype = dtype
        self.unit_offset = unit_offset
        init = jnp.zeros if unit_offset else jnp.ones
        self.scale = nnx.Param(init((features,), param_dtype), logical_axes=(axis_name,))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(var + self.eps)
        scale = self.scale[...].astype(jnp.float32)
        if self.unit_offset:
            scale = 1.0 + scale
        return (y * scale).astype(self.dtype)


class LayerNorm(nnx.Module):
    """torch.nn.LayerNorm over the last axis in float32: (x - mean) / std * scale + bias
    (`scale`/`bias` = the HF weight/bias)."""

    def __init__(
        self, features: int, *, eps: float = 1e-5, dtype=jnp.float32, param_dtype=jnp.float32
    ):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: Array) -> Array:
        """x [..., D] -> [..., D] in `dtype`."""
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def rope_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> Array:
    """Inverse frequencies [head_dim // 2] (float32), with optional Llama-3 scaling.

    scaling: HF `rope_scaling` dict; supported types: None/"default" and "llama3"
    (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    rope_type = None if scaling is None else scaling.get("rope_type", scaling.get("type"))
    if rope_type in (None, "default"):
        return inv_freq
    if rope_type != "llama3":
        raise ValueError(f"unsupported rope_scaling type {rope_type!r}; supported: default, llama3")
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_medium, smoothed, scaled)


def apply_rope(x_btnh: Array, positions_bt: Array, inv_freq: Array) -> Array:
    """Rotary embedding in the HF "rotate half" layout. x [B, T, N, H], positions int [B, T]."""
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x32 = x_btnh.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_btnh.dtype)
