"""Building blocks of the DC-AE autoencoder (diffusers `AutoencoderDC`), NHWC, in Flax NNX.

Each block mirrors the diffusers module of the same name, attribute by attribute, so a
parameter path ("attn.to_qkv_multiscale.0.proj_in.kernel") is the diffusers key with the
last name translated (kernel/scale -> weight, mean/var -> running_mean/running_var).

Layout: activations are NHWC [B, H, W, C] (diffusers is NCHW; channel order is the same).
Conv kernels are HWIO [kh, kw, C_in / groups, C_out] (torch weight [C_out, C_in / groups, kh,
kw] permuted by (2, 3, 1, 0)) and replicated; Dense kernels are [in, out]. Parameters are
stored in `param_dtype` and cast to `dtype` at use; norms compute in float32.

Multi-scale ReLU linear attention (diffusers `SanaMultiscaleLinearAttention` +
`SanaMultiscaleAttnProcessor2_0`): q, k, v = bias-free Linears, concatenated to 3I channels
(I = heads * d); each scale adds a depthwise k x k conv then a grouped 1 x 1 conv (3 * heads
groups) of those 3I channels; the (1 + S) * 3I channels are cut into (1 + S) * heads groups of
3d consecutive channels, each group read as (q_h, k_h, v_h) of d channels (the original
EfficientViT per-head qkv layout: diffusers' `to_q` output is not a query by itself). Then
o = (relu(q) . sum_j relu(k_j) v_j^T) / (relu(q) . sum_j relu(k_j) + eps), eps 1e-15: in
float32 through `pallas_kernels.linear_attention` when H * W > d ("linear" branch), and as an
explicit [N, N] score matrix in the compute dtype (scores normalised in float32) when
H * W <= d ("quadratic" branch), as diffusers does. Then Linear -> norm -> + residual.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxstack.nn.layers import Dense
from pallas_kernels.linear_attention import relu_linear_attention

Array = jax.Array

NORM_EPS = 1e-5  # diffusers get_normalization / RMSNorm(…, 1e-5) in every DC-AE norm
ATTN_EPS = 1e-15  # SanaMultiscaleLinearAttention(eps=1e-15)
NORM_TYPES = ("rms_norm", "batch_norm")
BLOCK_TYPES = ("ResBlock", "EfficientViTBlock")
_HIGHEST = jax.lax.Precision.HIGHEST


def _mish(x: Array) -> Array:
    return x * jnp.tanh(jax.nn.softplus(x))


# diffusers `get_activation` names (torch modules) -> functions; None = identity.
ACTIVATIONS: dict[str | None, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # torch nn.GELU() is exact (erf)
    "mish": _mish,
    None: lambda x: x,
}


def activation(name: str | None) -> Callable[[Array], Array]:
    """The activation diffusers' `get_activation(name)` builds (case-insensitive)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; known: {[k for k in ACTIVATIONS if k]}")
    return ACTIVATIONS[key]


def pixel_unshuffle(x: Array, r: int = 2) -> Array:
    """torch `F.pixel_unshuffle` on NHWC: [B, H*r, W*r, C] -> [B, H, W, C*r*r], channel
    c*r*r + i*r + j taken from pixel (h*r + i, w*r + j) of channel c."""
    b, h, w, c = x.shape
    x = x.reshape(b, h // r, r, w // r, r, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, h // r, w // r, c * r * r)


def pixel_shuffle(x: Array, r: int = 2) -> Array:
    """torch `F.pixel_shuffle` on NHWC: [B, H, W, C*r*r] -> [B, H*r, W*r, C] (inverse of
    `pixel_unshuffle`)."""
    b, h, w, c = x.shape
    x = x.reshape(b, h, w, c // (r * r), r, r).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, h * r, w * r, c // (r * r))


def group_mean(x: Array, group: int) -> Array:
    """Mean over consecutive channel groups: [..., C] -> [..., C / group] (torch
    `x.unflatten(1, (-1, group)).mean(2)`)."""
    return x.reshape(*x.shape[:-1], x.shape[-1] // group, group).mean(axis=-1)


class Conv2d(nnx.Module):
    """torch `nn.Conv2d(in, out, k, stride, padding=k // 2, groups)` on NHWC.

    kernel [k, k, in / groups, out] (replicated), bias [out]; torch's default init
    (uniform +-1/sqrt(fan_in)).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        groups: int = 1,
        use_bias: bool = True,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"conv {in_channels}->{out_channels}: groups {groups} must divide both"
            )
        self.stride, self.groups, self.dtype = stride, groups, dtype
        self.padding = kernel_size // 2
        shape = (kernel_size, kernel_size, in_channels // groups, out_channels)
        bound = 1.0 / math.sqrt(shape[0] * shape[1] * shape[2])

        def uniform(s):
            return jax.random.uniform(rngs.params(), s, jnp.float32, -bound, bound).astype(
                param_dtype
            )

        self.kernel = nnx.Param(uniform(shape), logical_axes=(None, None, None, None))
        self.bias = nnx.Param(uniform((out_channels,)), logical_axes=(None,)) if use_bias else None

    def __call__(self, x: Array) -> Array:
        """x [B, H, W, in] -> [B, H', W', out] (H' = ceil(H / stride) for odd k)."""
        p = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.stride, self.stride),
            padding=((p, p), (p, p)),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
            feature_group_count=self.groups,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class ChannelRMSNorm(nnx.Module):
    """diffusers `RMSNorm(C, eps, elementwise_affine=True, bias=True)` over the channel axis:
    x / sqrt(mean(x^2) + eps) * scale + bias, in float32 (scale = weight, init ones)."""

    def __init__(self, features: int, *, eps: float = NORM_EPS, dtype: Any, param_dtype: Any):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: Array) -> Array:
        """x [..., C] -> [..., C] in `dtype`."""
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


class BatchNorm2d(nnx.Module):
    """torch `nn.BatchNorm2d` in eval mode (running statistics), float32 math. Inference only:
    `mean`/`var` are `nnx.BatchStat`s that nothing here updates (the f32c32-in/mix decoders)."""

    def __init__(self, features: int, *, eps: float = NORM_EPS, dtype: Any, param_dtype: Any):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((features,), param_dtype), logical_axes=("norm",))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype), logical_axes=("norm",))
        self.mean = nnx.BatchStat(jnp.zeros((features,), param_dtype), logical_axes=("norm",))
        self.var = nnx.BatchStat(jnp.ones((features,), param_dtype), logical_axes=("norm",))

    def __call__(self, x: Array) -> Array:
        """x [..., C] -> [..., C] in `dtype`."""
        f32 = jnp.float32
        inv = jax.lax.rsqrt(self.var[...].astype(f32) + self.eps) * self.scale[...].astype(f32)
        y = (x.astype(f32) - self.mean[...].astype(f32)) * inv + self.bias[...].astype(f32)
        return y.astype(self.dtype)


def make_norm(norm_type: str, features: int, *, dtype: Any, param_dtype: Any) -> nnx.Module:
    """diffusers `get_normalization(norm_type, features)` (eps 1e-5, affine, bias)."""
    if norm_type == "rms_norm":
        return ChannelRMSNorm(features, dtype=dtype, param_dtype=param_dtype)
    if norm_type == "batch_norm":
        return BatchNorm2d(features, dtype=dtype, param_dtype=param_dtype)
    raise ValueError(f"unsupported norm type {norm_type!r}; known: {list(NORM_TYPES)}")


class ResBlock(nnx.Module):
    """x + norm(conv2(act(conv1(x)))): conv1 3x3 with bias, conv2 3x3 without."""

    def __init__(
        self,
        channels: int,
        *,
        norm_type: str,
        act_fn: str | None,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = activation(act_fn)
        self.conv1 = Conv2d(channels, channels, 3, **kw)
        self.conv2 = Conv2d(channels, channels, 3, use_bias=False, **kw)
        self.norm = make_norm(norm_type, channels, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        """x [B, H, W, C] -> [B, H, W, C]."""
        return self.norm(self.conv2(self.act(self.conv1(x)))) + x


class MultiscaleProjection(nnx.Module):
    """One extra scale of q/k/v: depthwise k x k conv then grouped 1x1 conv, both bias-free."""

    def __init__(
        self, channels: int, heads: int, kernel_size: int, *, dtype, param_dtype, rngs: nnx.Rngs
    ):
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.proj_in = Conv2d(channels, channels, kernel_size, groups=channels, **kw)
        self.proj_out = Conv2d(channels, channels, 1, groups=3 * heads, **kw)

    def __call__(self, x: Array) -> Array:
        return self.proj_out(self.proj_in(x))


def quadratic_relu_attention(q: Array, k: Array, v: Array, *, eps: float = ATTN_EPS) -> Array:
    """diffusers' `apply_quadratic_attention`: q/k/v [B, N, H, d] -> [B, N, H, d] in v's dtype.

    s_jn = relu(k_j) . relu(q_n) in the input dtype, normalised over j in float32
    (s / (sum_j s + eps)), cast back and applied to v. Equal to the linear form up to rounding.
    """
    qr, kr = jax.nn.relu(q), jax.nn.relu(k)
    s = jnp.einsum("bjhc,bnhc->bhjn", kr, qr, precision=_HIGHEST).astype(jnp.float32)
    s = s / (jnp.sum(s, axis=2, keepdims=True) + eps)
    return jnp.einsum("bjhe,bhjn->bnhe", v, s.astype(v.dtype), precision=_HIGHEST)


class MultiscaleLinearAttention(nnx.Module):
    """diffusers `SanaMultiscaleLinearAttention` (residual form, mult 1): see the module doc."""

    def __init__(
        self,
        channels: int,
        *,
        head_dim: int,
        kernel_sizes: tuple[int, ...],
        norm_type: str,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.head_dim = head_dim
        self.heads = channels // head_dim
        inner = self.heads * head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_q = Dense(channels, inner, axes=("embed", "heads"), **kw)
        self.to_k = Dense(channels, inner, axes=("embed", "heads"), **kw)
        self.to_v = Dense(channels, inner, axes=("embed", "heads"), **kw)
        self.to_qkv_multiscale = nnx.List(
            [MultiscaleProjection(3 * inner, self.heads, ks, **kw) for ks in kernel_sizes]
        )
        self.to_out = Dense(
            inner * (1 + len(kernel_sizes)), channels, axes=("heads", "embed"), **kw
        )
        self.norm_out = make_norm(norm_type, channels, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        """x [B, H, W, C] -> [B, H, W, C] (with the residual)."""
        b, h, w, _ = x.shape
        d = self.head_dim
        qkv = jnp.concatenate([self.to_q(x), self.to_k(x), self.to_v(x)], axis=-1)
        qkv = jnp.concatenate([qkv] + [proj(qkv) for proj in self.to_qkv_multiscale], axis=-1)
        qkv = qkv.reshape(b, h * w, -1, 3, d)  # groups of 3d channels = (q, k, v) of a head
        q, k, v = qkv[..., 0, :], qkv[..., 1, :], qkv[..., 2, :]
        if h * w > d:  # diffusers' linear branch: float32 state, output in the compute dtype
            out = relu_linear_attention(q, k, v, eps=ATTN_EPS)
        else:
            out = quadratic_relu_attention(q, k, v, eps=ATTN_EPS)
        out = self.to_out(out.reshape(b, h, w, -1))
        return self.norm_out(out) + x


class GLUMBConv(nnx.Module):
    """diffusers `GLUMBConv(C, C, expand_ratio=4, norm_type="rms_norm")`: 1x1 C->2F (bias),
    SiLU, depthwise 3x3 (bias), z * SiLU(gate), 1x1 F->C (no bias), RMSNorm, + residual."""

    def __init__(
        self, channels: int, *, expand_ratio: float = 4, dtype, param_dtype, rngs: nnx.Rngs
    ):
        hidden = int(expand_ratio * channels)
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_inverted = Conv2d(channels, 2 * hidden, 1, **kw)
        self.conv_depth = Conv2d(2 * hidden, 2 * hidden, 3, groups=2 * hidden, **kw)
        self.conv_point = Conv2d(hidden, channels, 1, use_bias=False, **kw)
        self.norm = ChannelRMSNorm(channels, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: Array) -> Array:
        """x [B, H, W, C] -> [B, H, W, C]."""
        y = self.conv_depth(jax.nn.silu(self.conv_inverted(x)))
        z, gate = jnp.split(y, 2, axis=-1)
        return self.norm(self.conv_point(z * jax.nn.silu(gate))) + x


class EfficientViTBlock(nnx.Module):
    """Multi-scale linear attention then GLUMBConv, each with its residual."""

    def __init__(
        self,
        channels: int,
        *,
        head_dim: int,
        kernel_sizes: tuple[int, ...],
        norm_type: str,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn = MultiscaleLinearAttention(
            channels, head_dim=head_dim, kernel_sizes=kernel_sizes, norm_type=norm_type, **kw
        )
        self.conv_out = GLUMBConv(channels, **kw)

    def __call__(self, x: Array) -> Array:
        """x [B, H, W, C] -> [B, H, W, C]."""
        return self.conv_out(self.attn(x))


def make_block(
    block_type: str,
    channels: int,
    *,
    head_dim: int,
    norm_type: str,
    act_fn: str | None,
    kernel_sizes: tuple[int, ...],
    dtype: Any,
    param_dtype: Any,
    rngs: nnx.Rngs,
) -> nnx.Module:
    """diffusers `get_block`: a ResBlock or an EfficientViTBlock of `channels`."""
    kw = dict(norm_type=norm_type, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if block_type == "ResBlock":
        return ResBlock(channels, act_fn=act_fn, **kw)
    if block_type == "EfficientViTBlock":
        return EfficientViTBlock(channels, head_dim=head_dim, kernel_sizes=kernel_sizes, **kw)
    raise ValueError(f"unsupported block type {block_type!r}; known: {list(BLOCK_TYPES)}")


class DownBlock(nnx.Module):
    """diffusers `DCDownBlock2d`: 2x downsampling by a stride-2 3x3 conv (`pixel_unshuffle`
    False) or a 3x3 conv to out/4 channels then pixel-unshuffle; shortcut = pixel-unshuffle of
    the input averaged over groups of in*4/out channels."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        pixel_unshuffle: bool,
        shortcut: bool,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.unshuffle, self.shortcut = pixel_unshuffle, shortcut
        self.group_size = in_channels * 4 // out_channels
        conv_out = out_channels // 4 if pixel_unshuffle else out_channels
        self.conv = Conv2d(
            in_channels,
            conv_out,
            3,
            stride=1 if pixel_unshuffle else 2,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
        )

    def __call__(self, x: Array) -> Array:
        """x [B, H, W, in] -> [B, H/2, W/2, out]."""
        y = self.conv(x)
        if self.unshuffle:
            y = pixel_unshuffle(y)
        if self.shortcut:
            y = y + group_mean(pixel_unshuffle(x), self.group_size).astype(y.dtype)
        return y


class UpBlock(nnx.Module):
    """diffusers `DCUpBlock2d`: 2x upsampling by nearest-2x then a 3x3 conv (`interpolate`) or a
    3x3 conv to 4*out channels then pixel-shuffle; shortcut = each input channel repeated
    out*4/in times, then pixel-shuffled."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        *,
        interpolate: bool,
        shortcut: bool,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.interpolate, self.shortcut = interpolate, shortcut
        self.repeats = out_channels * 4 // in_channels
        conv_out = out_channels if interpolate else out_channels * 4
        self.conv = Conv2d(
            in_channels, conv_out, 3, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )

    def __call__(self, x: Array) -> Array:
        """x [B, H, W, in] -> [B, 2H, 2W, out]."""
        if self.interpolate:
            y = self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))
        else:
            y = pixel_shuffle(self.conv(x))
        if self.shortcut:
            y = y + pixel_shuffle(jnp.repeat(x, self.repeats, axis=-1).astype(y.dtype))
        return y
