"""SANA / SANA-1.5 linear diffusion transformer (diffusers `SanaTransformer2DModel`) in Flax NNX.

Patch embedding (+ optional 2-D sin-cos PE), AdaLN-single timestep conditioning (optionally plus
a guidance embedding, SANA-Sprint), caption projection (gelu-tanh MLP) + RMSNorm, `num_layers`
blocks, then a modulated final LayerNorm, a Linear and unpatchify. A block (spec sana.md §2):

    (sh1, sc1, g1, sh2, sc2, g2) = scale_shift_table[6, D] + t6.reshape(B, 6, D)
    x += g1 * LinearAttn(LN(x) * (1 + sc1) + sh1)       # ReLU linear attention (LiteLA)
    x += CrossAttn(x, y, caption_mask)                  # softmax, no norm / modulation / gate
    x += g2 * MixFFN(norm2(x) * (1 + sc2) + sh2)        # GLUMBConv on the (h, w) token grid

Layout as in diffusers: the input latent is NCHW [B, C, H, W], captions [B, L, caption_channels]
with a 1/0 mask [B, L], timesteps [B] (sigma * 1000); the output is NCHW [B, C_out, H, W].
Tokens are the (H / p) x (W / p) patches in row-major order; H != W works.

Parameters carry `logical_axes` (`jaxstack.parallel.mesh.RULES`), are stored in `param_dtype`
and computed in `dtype`; norms, modulation and the linear-attention state run in float32.
Conv kernels are HWIO ([kh, kw, in / groups, out]; torch [out, in, kh, kw] permuted by
(2, 3, 1, 0)), Dense kernels [in, out].

Shapes: B batch, C channels, N = h * w tokens, D hidden, L caption length, F FFN width (Hf).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.nn.attention import dot_product_attention
from jaxstack.nn.layers import Dense, LayerNorm, RMSNorm
from jaxstack.parallel.linear_attention import sequence_sharded_linear_attention
from jaxstack.parallel.mesh import constrain
from jaxstack.parallel.sequence import sequence_parallel_size
from pallas_kernels.linear_attention import relu_linear_attention

Array = jax.Array

QK_NORMS = (None, "rms_norm_across_heads")
LINEAR_ATTN_EPS = 1e-15  # diffusers' SanaLinearAttnProcessor2_0 (the original code uses 1e-8)
QK_NORM_EPS = 1e-5  # diffusers Attention(eps=1e-5) for norm_q / norm_k
CAPTION_NORM_EPS = 1e-5
FINAL_NORM_EPS = 1e-6
TIMESTEP_CHANNELS = 256
MASK_BIAS = -10000.0  # diffusers' additive bias for masked caption tokens (see `caption_mask`)
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}

# diffusers' `SanaTransformer2DModel.__init__` defaults (keys absent from a config.json).
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    in_channels=32, out_channels=32, num_attention_heads=70, attention_head_dim=32,
    num_layers=20, num_cross_attention_heads=20, cross_attention_head_dim=112,
    cross_attention_dim=2240, caption_channels=2304, mlp_ratio=2.5, dropout=0.0,
    attention_bias=False, sample_size=32, patch_size=1, norm_elementwise_affine=False,
    norm_eps=1e-6, interpolation_scale=None, guidance_embeds=False, guidance_embeds_scale=0.1,
    qk_norm=None, timestep_scale=1.0,
)  # fmt: skip
DIFFUSERS_CLASS = "SanaTransformer2DModel"


@dataclasses.dataclass(frozen=True)
class SanaConfig:
    """SANA transformer sizes; field names are diffusers' config keys, except `cross_norm`.

    qk_norm: None or "rms_norm_across_heads" (SANA-1.5): RMSNorm over all heads (eps 1e-5) on
      q and k of the linear self-attention. cross_norm: the same on the cross-attention's q/k
      (the original's `cross_norm`). diffusers has one switch, `qk_norm`, for both attentions,
      so `to_diffusers_config` refuses configs where they differ.
    interpolation_scale: None (512/1024 models: no positional embedding) or the sin-cos PE
      scale of the 2K/4K models. guidance_embeds: SANA-Sprint's extra guidance embedding
      (`guidance` argument). timestep_scale / guidance_embeds_scale: pipeline-side factors,
      kept for the config round trip; the model does not apply them.
    """

    in_channels: int = 4
    out_channels: int = 4
    patch_size: int = 1
    num_layers: int = 1
    num_attention_heads: int = 2
    attention_head_dim: int = 4
    num_cross_attention_heads: int = 2
    cross_attention_head_dim: int = 4
    cross_attention_dim: int = 8
    caption_channels: int = 8
    mlp_ratio: float = 2.5
    attention_bias: bool = False  # bias on the linear attention's q/k/v
    norm_elementwise_affine: bool = False  # affine norm2 (before the Mix-FFN)
    norm_eps: float = 1e-6
    qk_norm: str | None = None
    cross_norm: bool = False
    sample_size: int = 32
    interpolation_scale: float | None = None
    guidance_embeds: bool = False
    guidance_embeds_scale: float = 0.1
    timestep_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.qk_norm not in QK_NORMS:
            raise ValueError(f"unsupported qk_norm {self.qk_norm!r}; supported: {QK_NORMS}")
        if self.cross_attention_dim != self.hidden_size:
            raise ValueError(
                f"cross_attention_dim {self.cross_attention_dim} must equal num_attention_heads"
                f" * attention_head_dim = {self.hidden_size} (the projected caption width)"
            )

    @property
    def hidden_size(self) -> int:
        """D = num_attention_heads * attention_head_dim."""
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ffn_dim(self) -> int:
        """Mix-FFN width Hf = int(mlp_ratio * D)."""
        return int(self.mlp_ratio * self.hidden_size)

    @property
    def cross_inner_dim(self) -> int:
        return self.num_cross_attention_heads * self.cross_attention_head_dim

    def num_params(self) -> int:
        """Parameter count of `SanaTransformer(self)`."""
        d, f, c, p = self.hidden_size, self.ffn_dim, self.cross_inner_dim, self.patch_size
        cd, pp = self.cross_attention_dim, p * p
        embedder = TIMESTEP_CHANNELS * d + d + d * d + d
        attn1 = (
            4 * d * d + d + (3 * d if self.attention_bias else 0) + (2 * d if self.qk_norm else 0)
        )
        attn2 = d * c + c + 2 * (cd * c + c) + c * d + d + (2 * c if self.cross_norm else 0)
        ff = d * 2 * f + 2 * f + 9 * 2 * f + 2 * f + f * d
        block = attn1 + attn2 + ff + 6 * d + (2 * d if self.norm_elementwise_affine else 0)
        total = pp * self.in_channels * d + d  # patch embedding
        total += embedder * (2 if self.guidance_embeds else 1) + d * 6 * d + 6 * d
        total += self.caption_channels * d + d + d * d + d + d  # caption projection + norm
        total += self.num_layers * block
        return total + 2 * d + (d + 1) * pp * self.out_channels

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SanaConfig:
        """The config of preset `name` (see PRESETS; case-insensitive), fields replaced by
        `overrides`: "sana-0.6b", "sana-1.6b", "sana-1.5-1.6b", "sana-1.5-4.8b" (1024 px,
        sample_size 32) and "tiny" (the diffusers test config, spec §8). Unknown names raise
        ValueError listing the known ones."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r} for SanaConfig; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[key](), **overrides)

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> SanaConfig:
        """SanaConfig of a diffusers `SanaTransformer2DModel` config.json dict (absent keys take
        diffusers' defaults; `_`-prefixed keys are ignored). Raises ValueError for unknown
        keys, dropout != 0 and unsupported values."""
        cfg = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(cfg) - set(DIFFUSERS_DEFAULTS))
        if unknown:
            raise ValueError(f"unknown SanaTransformer2DModel config keys {unknown}")
        cfg = {**DIFFUSERS_DEFAULTS, **cfg}
        if cfg.pop("dropout"):
            raise ValueError("dropout > 0 is not supported (SANA is trained without dropout)")
        if cfg["out_channels"] is None:
            cfg["out_channels"] = cfg["in_channels"]
        if cfg["cross_attention_dim"] is None:
            raise ValueError("cross_attention_dim None (no cross-attention) is not supported")
        return cls(**cfg, cross_norm=cfg["qk_norm"] is not None)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers config.json dict (with `_class_name`) of this config."""
        if self.cross_norm != (self.qk_norm is not None):
            raise ValueError(
                f"qk_norm={self.qk_norm!r} with cross_norm={self.cross_norm} has no diffusers "
                "equivalent (diffusers' qk_norm normalises both attentions)"
            )
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        del fields["cross_norm"]
        return {"_class_name": DIFFUSERS_CLASS, **fields, "dropout": 0.0}


_BASE = dict(
    in_channels=32, out_channels=32, patch_size=1, attention_head_dim=32, caption_channels=2304,
    mlp_ratio=2.5, sample_size=32,
)  # fmt: skip
_1600M = dict(
    _BASE, num_attention_heads=70, num_cross_attention_heads=20, cross_attention_head_dim=112,
    cross_attention_dim=2240, num_layers=20,
)  # fmt: skip
_SANA15 = dict(qk_norm="rms_norm_across_heads", cross_norm=True)
_PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "tiny": dict(),  # the dataclass defaults: diffusers' test config (spec §8)
    # pixel-space model of the embedded `jaxstack train-dit` job (32 px RGB, 8 x 8 tokens);
    # with sin-cos positions (as SANA's 2K/4K models): linear attention is order-blind and
    # the 3x3 conv alone did not teach it where a shape is
    "tiny-shapes": dict(
        in_channels=3,
        out_channels=3,
        patch_size=4,
        num_layers=4,
        num_attention_heads=4,
        attention_head_dim=16,
        num_cross_attention_heads=4,
        cross_attention_head_dim=16,
        cross_attention_dim=64,
        caption_channels=64,
        sample_size=32,
        interpolation_scale=1.0,
    ),  # fmt: skip
    "sana-0.6b": dict(
        _BASE,
        num_attention_heads=36,
        num_cross_attention_heads=16,
        cross_attention_head_dim=72,
        cross_attention_dim=1152,
        num_layers=28,
    ),
    "sana-1.6b": dict(_1600M),
    "sana-1.5-1.6b": dict(_1600M, **_SANA15),
    "sana-1.5-4.8b": dict(_1600M, **_SANA15, num_layers=60),
}
# name -> config factory, the preset registry idiom of every model family (`SanaConfig.preset`).
PRESETS: dict[str, Callable[[], SanaConfig]] = {
    name: functools.partial(SanaConfig, **fields) for name, fields in _PRESET_FIELDS.items()
}


# -- stateless pieces ---------------------------------------------------------------------------


def timestep_freqs(half: int) -> np.ndarray:
    """Frequencies float32 [half] of `timestep_embedding`: exp(-ln(1e4) k / half), the exponent
    in float32 as diffusers computes it, the exp correctly rounded (torch's float32 exp is off
    by one ulp at a few k, which moves the features at t ~ 1000 by up to ~3e-5)."""
    exponent = np.float32(-math.log(10000.0)) * np.arange(half, dtype=np.float32)
    return np.exp((exponent / np.float32(half)).astype(np.float64)).astype(np.float32)


def timestep_embedding(t_b: Array, dim: int = TIMESTEP_CHANNELS) -> Array:
    """Sinusoidal timestep features float32 [B, dim], cos first (diffusers `Timesteps(dim,
    flip_sin_to_cos=True, downscale_freq_shift=0)`): [cos(t w_k), sin(t w_k)], w_k =
    `timestep_freqs(dim // 2)`."""
    freqs = timestep_freqs(dim // 2)
    args = jnp.asarray(t_b).astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def sincos_pos_embed(
    dim: int, height: int, width: int, base_size: int, interpolation_scale: float
) -> np.ndarray:
    """2-D sin-cos positional embedding float32 [height * width, dim] (row-major tokens), as
    diffusers' `get_2d_sincos_pos_embed` (first half from the column position, second half
    from the row position; each half [sin, cos])."""
    grid_h = np.arange(height, dtype=np.float32) / np.float32(height / base_size)
    grid_h = grid_h / np.float32(interpolation_scale)
    grid_w = np.arange(width, dtype=np.float32) / np.float32(width / base_size)
    grid_w = grid_w / np.float32(interpolation_scale)
    cols, rows = np.meshgrid(grid_w, grid_h, indexing="xy")  # [height, width] each
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4.0))

    def one_d(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1).astype(np.float64), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(cols), one_d(rows)], axis=1).astype(np.float32)


def caption_mask(mask_bl: Array | None) -> Array | None:
    """Boolean cross-attention mask [B, 1, 1, L] equal to diffusers' additive (1 - m) * -1e4.

    Kept tokens have bias 0 and masked ones exp(-1e4) = 0 weight; a row with no kept token gets
    the same -1e4 on every key, i.e. unmasked attention, which is what this returns for it.
    """
    if mask_bl is None:
        return None
    keep = jnp.asarray(mask_bl) > 0.5
    keep = keep | ~jnp.any(keep, axis=-1, keepdims=True)
    return keep[:, None, None, :]


def _layer_norm(x: Array, eps: float) -> Array:
    """LayerNorm without affine over the last axis, float32 out."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    return (x32 - mean) * jax.lax.rsqrt(var + eps)


def _sequence_shards(num_tokens: int) -> int:
    """Devices the linear attention shards the tokens over: the context mesh's "sequence" axis
    (`sequence_parallel_size`: 1 without a mesh or under `use_sequence_parallel(enabled=False)`),
    or 1 when it does not divide the token count (then XLA partitions the plain attention)."""
    sp = sequence_parallel_size()
    return sp if sp > 1 and num_tokens % sp == 0 else 1


def _xavier(fan_in: int, fan_out: int) -> float:
    return math.sqrt(2.0 / (fan_in + fan_out))


# -- layers -------------------------------------------------------------------------------------


def _depthwise_shifted(x_bhwc: Array, kernel: Array) -> Array:
    """Depthwise 'same' conv (kernel [k, k, 1, C]) as k*k shifted multiply-adds."""
    k, (h, w) = kernel.shape[0], x_bhwc.shape[1:3]
    xp = jnp.pad(x_bhwc, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    taps = [xp[:, i : i + h, j : j + w] * kernel[i, j, 0] for i in range(k) for j in range(k)]
    return functools.reduce(jnp.add, taps)


class Conv(nnx.Module):
    """Stride-1 'same' Conv2d on NHWC. kernel [k, k, in / groups, out] (HWIO), bias [out]."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int,
        *,
        axes: tuple[str | None, str | None],
        groups: int = 1,
        use_bias: bool = True,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        k, fan_in = kernel_size, kernel_size * kernel_size * in_features // groups
        std = 1.0 / math.sqrt(3 * fan_in)  # the variance of torch's default Conv2d init
        shape = (k, k, in_features // groups, out_features)
        w = std * jax.random.normal(rngs.params(), shape, jnp.float32)
        self.kernel = nnx.Param(w.astype(param_dtype), logical_axes=(None, None, *axes))
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), logical_axes=(axes[1],))
            if use_bias
            else None
        )
        self.groups, self.dtype = groups, dtype

    def __call__(self, x_bhwc: Array) -> Array:
        kernel = self.kernel[...].astype(self.dtype)
        x = x_bhwc.astype(self.dtype)
        k = kernel.shape[0]
        if k == 1 and self.groups == 1:
            y = jnp.dot(x, kernel[0, 0])
        elif self.groups == x.shape[-1] == kernel.shape[-1] and jax.default_backend() == "cpu":
            y = _depthwise_shifted(x, kernel)  # XLA's CPU grouped conv is ~10x slower
        else:
            y = jax.lax.conv_general_dilated(
                x,
                kernel,
                window_strides=(1, 1),
                padding=((k // 2, k // 2), (k // 2, k // 2)),
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
                feature_group_count=self.groups,
            )
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)


class PatchEmbed(nnx.Module):
    """Non-overlapping p x p patch conv (diffusers `patch_embed.proj`): kernel [p, p, C, D]
    (HWIO), bias [D]."""

    def __init__(self, cfg: SanaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        p, c, d = cfg.patch_size, cfg.in_channels, cfg.hidden_size
        std = _xavier(p * p * c, d)
        w = std * jax.random.normal(rngs.params(), (p, p, c, d), jnp.float32)
        self.kernel = nnx.Param(w.astype(param_dtype), logical_axes=(None, None, None, "embed"))
        self.bias = nnx.Param(jnp.zeros((d,), param_dtype), logical_axes=("embed",))
        self.patch_size, self.dtype = p, dtype

    def __call__(self, x_bchw: Array) -> Array:
        """latent [B, C, H, W] -> tokens [B, (H/p) * (W/p), D], row-major patches."""
        b, c, h, w = x_bchw.shape
        p = self.patch_size
        x = x_bchw.astype(self.dtype).reshape(b, c, h // p, p, w // p, p)
        y = jnp.einsum("bcipjq,pqcd->bijd", x, self.kernel[...].astype(self.dtype))
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape(b, (h // p) * (w // p), -1)


class MLP(nnx.Module):
    """linear_2(act(linear_1(x))), both Linears with bias; act "silu" or "gelu_tanh"."""

    def __init__(
        self, d_in: int, d_hidden: int, d_out: int, axes, *, act: str, dtype, param_dtype, rngs
    ):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = Dense(d_in, d_hidden, axes=axes[0], init_std=_xavier(d_in, d_hidden), **kw)
        self.linear_2 = Dense(
            d_hidden, d_out, axes=axes[1], init_std=_xavier(d_hidden, d_out), **kw
        )
        self.act = act

    def __call__(self, x: Array) -> Array:
        h = self.linear_1(x)
        h = jax.nn.silu(h) if self.act == "silu" else jax.nn.gelu(h, approximate=True)
        return self.linear_2(h)


class TimeEmbed(nnx.Module):
    """AdaLN-single: e = MLP(sin-cos(t)) (+ MLP(sin-cos(guidance))); t6 = Linear(SiLU(e))."""

    def __init__(self, cfg: SanaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        axes = ((None, "embed"), ("embed", None))
        self.timestep_embedder = MLP(TIMESTEP_CHANNELS, d, d, axes, act="silu", **kw)
        self.guidance_embedder = (
            MLP(TIMESTEP_CHANNELS, d, d, axes, act="silu", **kw) if cfg.guidance_embeds else None
        )
        self.linear = Dense(d, 6 * d, axes=("embed", None), use_bias=True, **kw)
        self.dtype = dtype

    def __call__(self, t_b: Array, guidance_b: Array | None = None) -> tuple[Array, Array]:
        """(t6 [B, 6D], e [B, D]) in `dtype`."""
        e = self.timestep_embedder(timestep_embedding(t_b).astype(self.dtype))
        if self.guidance_embedder is not None:
            if guidance_b is None:
                raise ValueError("this model has guidance_embeds=True: pass `guidance`")
            e = e + self.guidance_embedder(timestep_embedding(guidance_b).astype(self.dtype))
        return self.linear(jax.nn.silu(e)), e


class LinearAttention(nnx.Module):
    """ReLU linear self-attention (LiteLA): q/k/v Linears (bias: `attention_bias`), optional
    RMSNorm over all heads on q and k, per-head relu(q) (sum relu(k) v^T) / (relu(q) . sum
    relu(k) + eps) in float32, `to_out` Linear with bias. Under a context mesh whose "sequence"
    axis divides the tokens, each device sums the state of its own tokens and one psum makes
    the global one (`sequence_sharded_linear_attention`; SANA 4K inference)."""

    def __init__(self, cfg: SanaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, h = cfg.hidden_size, cfg.num_attention_heads
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs, init_std=_xavier(d, d))
        self.to_q = Dense(d, d, axes=("embed", "heads"), use_bias=cfg.attention_bias, **kw)
        self.to_k = Dense(d, d, axes=("embed", "heads"), use_bias=cfg.attention_bias, **kw)
        self.to_v = Dense(d, d, axes=("embed", "heads"), use_bias=cfg.attention_bias, **kw)
        self.to_out = Dense(d, d, axes=("heads", "embed"), use_bias=True, **kw)
        norm_kw = dict(eps=QK_NORM_EPS, dtype=dtype, param_dtype=param_dtype, axis_name="heads")
        self.norm_q = RMSNorm(d, **norm_kw) if cfg.qk_norm else None
        self.norm_k = RMSNorm(d, **norm_kw) if cfg.qk_norm else None
        self.num_heads = h

    def __call__(self, x_bnd: Array) -> Array:
        b, n, _ = x_bnd.shape
        q, k, v = self.to_q(x_bnd), self.to_k(x_bnd), self.to_v(x_bnd)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (
            constrain(a.reshape(b, n, self.num_heads, -1), ("batch", "seq", "act_heads", None))
            for a in (q, k, v)
        )
        if _sequence_shards(n) > 1:  # one psum of the [B, H, d, e] state over "sequence"
            out = sequence_sharded_linear_attention(q, k, v, eps=LINEAR_ATTN_EPS)
        else:
            out = relu_linear_attention(q, k, v, eps=LINEAR_ATTN_EPS)
        return self.to_out(out.reshape(b, n, -1))


class CrossAttention(nnx.Module):
    """Softmax cross-attention from tokens to the caption; all Linears with bias; optional
    RMSNorm over all heads on q and k (`cross_norm`)."""

    def __init__(self, cfg: SanaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, c, cd = cfg.hidden_size, cfg.cross_inner_dim, cfg.cross_attention_dim
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.to_q = Dense(d, c, axes=("embed", "heads"), init_std=_xavier(d, c), **kw)
        self.to_k = Dense(cd, c, axes=("embed", "heads"), init_std=_xavier(cd, c), **kw)
        self.to_v = Dense(cd, c, axes=("embed", "heads"), init_std=_xavier(cd, c), **kw)
        # zero-initialised (PixArt / SANA): a fresh block's cross-attention adds nothing
        self.to_out = Dense(c, d, axes=("heads", "embed"), init_std=0.0, **kw)
        norm_kw = dict(eps=QK_NORM_EPS, dtype=dtype, param_dtype=param_dtype, axis_name="heads")
        self.norm_q = RMSNorm(c, **norm_kw) if cfg.cross_norm else None
        self.norm_k = RMSNorm(c, **norm_kw) if cfg.cross_norm else None
        self.num_heads = cfg.num_cross_attention_heads

    def __call__(self, x_bnd: Array, y_bld: Array, mask_b11l: Array | None) -> Array:
        b, n, _ = x_bnd.shape
        q, k, v = self.to_q(x_bnd), self.to_k(y_bld), self.to_v(y_bld)
        if self.norm_q is not None:
            q, k = self.norm_q(q), self.norm_k(k)
        q = constrain(q.reshape(b, n, self.num_heads, -1), ("batch", "seq", "act_heads", None))
        k = k.reshape(b, k.shape[1], self.num_heads, -1)
        v = v.reshape(b, v.shape[1], self.num_heads, -1)
        if mask_b11l is not None:  # full query axis: cuDNN rejects a mask broadcast over it
            mask_b11l = jnp.broadcast_to(mask_b11l, (b, 1, n, k.shape[1]))
        out = dot_product_attention(q, k, v, mask=mask_b11l)
        return self.to_out(out.reshape(b, n, -1))


class GLUMBConv(nnx.Module):
    """Mix-FFN: 1x1 conv D -> 2F (bias), SiLU, depthwise 3x3 (bias), z * SiLU(gate), 1x1 F -> D."""

    def __init__(self, cfg: SanaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.ffn_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv_inverted = Conv(d, 2 * f, 1, axes=("embed", "mlp"), **kw)
        self.conv_depth = Conv(2 * f, 2 * f, 3, axes=(None, "mlp"), groups=2 * f, **kw)
        self.conv_point = Conv(f, d, 1, axes=("mlp", "embed"), use_bias=False, **kw)

    def __call__(self, x_bnd: Array, height: int, width: int) -> Array:
        b, n, d = x_bnd.shape
        x = x_bnd.reshape(b, height, width, d)
        x = self.conv_depth(jax.nn.silu(self.conv_inverted(x)))
        z, gate = jnp.split(x, 2, axis=-1)
        return self.conv_point(z * jax.nn.silu(gate)).reshape(b, n, d)


class SanaBlock(nnx.Module):
    """One SANA block (module docstring); t6 [B, 6D] is shared by all blocks."""

    def __init__(self, cfg: SanaConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d = cfg.hidden_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.attn1 = LinearAttention(cfg, **kw)
        self.attn2 = CrossAttention(cfg, **kw)
        self.norm2 = (
            LayerNorm(d, eps=cfg.norm_eps, dtype=jnp.float32, param_dtype=param_dtype)
            if cfg.norm_elementwise_affine
            else None
        )
        self.ff = GLUMBConv(cfg, **kw)
        table = jax.random.normal(rngs.params(), (6, d), jnp.float32) / math.sqrt(d)
        self.scale_shift_table = nnx.Param(table.astype(param_dtype), logical_axes=(None, "embed"))
        self.eps, self.dtype = cfg.norm_eps, dtype

    def __call__(
        self, x: Array, y: Array, mask: Array | None, t6: Array, height: int, width: int
    ) -> Array:
        """x [B, N, D], y [B, L, D], mask bool [B, 1, 1, L] or None, t6 [B, 6D] -> [B, N, D]."""
        b, _, d = x.shape
        mod = self.scale_shift_table[...].astype(jnp.float32)[None] + t6.reshape(b, 6, d)
        sh1, sc1, g1, sh2, sc2, g2 = (mod[:, i, None].astype(jnp.float32) for i in range(6))
        h = (_layer_norm(x, self.eps) * (1 + sc1) + sh1).astype(self.dtype)
        x = (x + g1 * self.attn1(h)).astype(self.dtype)
        x = x + self.attn2(x, y, mask).astype(self.dtype)
        normed = _layer_norm(x, self.eps) if self.norm2 is None else self.norm2(x)
        h = (normed * (1 + sc2) + sh2).astype(self.dtype)
        x = (x + g2 * self.ff(h, height, width)).astype(self.dtype)
        return constrain(x, ("batch", "seq", "act_embed"))


class SanaTransformer(nnx.Module):
    """SANA transformer: `model(latent, caption, timestep, caption_mask)` -> velocity.

    dtype: compute dtype (bfloat16 on GPU, float32 for parity); param_dtype: storage dtype.
    remat: "none" | "full" | "dots": activation checkpointing per block (training).
    Parameter names follow diffusers' state dict (`jaxstack.hf.sana_transformer` maps them).
    """

    def __init__(
        self,
        cfg: SanaConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat {remat!r}; choose from {list(REMAT_POLICIES)}")
        d, p = cfg.hidden_size, cfg.patch_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.cfg, self.dtype, self.remat = cfg, dtype, remat
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.time_embed = TimeEmbed(cfg, **kw)
        axes = (("embed", "mlp"), ("mlp", "embed"))
        self.caption_projection = MLP(cfg.caption_channels, d, d, axes, act="gelu_tanh", **kw)
        self.caption_norm = RMSNorm(
            d, eps=CAPTION_NORM_EPS, dtype=dtype, param_dtype=param_dtype, axis_name="embed"
        )
        self.transformer_blocks = nnx.List([SanaBlock(cfg, **kw) for _ in range(cfg.num_layers)])
        table = jax.random.normal(rngs.params(), (2, d), jnp.float32) / math.sqrt(d)
        self.scale_shift_table = nnx.Param(table.astype(param_dtype), logical_axes=(None, "embed"))
        # zero-initialised (PixArt / SANA final layer)
        self.proj_out = Dense(
            d, p * p * cfg.out_channels, axes=("embed", None), use_bias=True, init_std=0.0, **kw
        )

    def embed(
        self,
        hidden_states: Array,
        encoder_hidden_states: Array,
        timestep: Array,
        encoder_attention_mask: Array | None = None,
        guidance: Array | None = None,
    ) -> tuple[Array, Array, Array | None, Array, Array]:
        """The blocks' inputs: (x [B, N, D], y [B, L, D], mask [B, 1, 1, L] | None, t6 [B, 6D],
        e [B, D]) from the `__call__` arguments."""
        cfg = self.cfg
        _, _, height, width = hidden_states.shape
        p = cfg.patch_size
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by patch_size {p}")
        x = self.patch_embed(hidden_states)
        if cfg.interpolation_scale is not None:
            pe = sincos_pos_embed(
                cfg.hidden_size, height // p, width // p, cfg.sample_size // p,
                cfg.interpolation_scale,
            )  # fmt: skip
            x = (x.astype(jnp.float32) + pe[None]).astype(self.dtype)
        x = constrain(x, ("batch", "seq", "act_embed"))
        t6, e = self.time_embed(timestep, guidance)
        y = self.caption_norm(self.caption_projection(encoder_hidden_states))
        return x, y, caption_mask(encoder_attention_mask), t6, e

    def run_blocks(
        self, x: Array, y: Array, mask: Array | None, t6: Array, height: int, width: int
    ) -> tuple[Array, tuple[Array, ...]]:
        """(final tokens [B, N, D], (x_0, ..., x_num_layers)): x_i is block i's input and
        x_{i+1} its output (block-importance statistics, SANA-1.5 pruning)."""
        hidden = [x]
        for block in self.transformer_blocks:
            if self.remat != "none":
                run = lambda blk, x, y, mask, t6: blk(x, y, mask, t6, height, width)
                x = nnx.remat(run, policy=REMAT_POLICIES[self.remat])(block, x, y, mask, t6)
            else:
                x = block(x, y, mask, t6, height, width)
            hidden.append(x)
        return x, tuple(hidden)

    def final_layer(self, x: Array, e: Array, height: int, width: int) -> Array:
        """Tokens [B, N, D] and embedded timestep e [B, D] -> output NCHW [B, C_out, H, W]."""
        b = x.shape[0]
        p, c = self.cfg.patch_size, self.cfg.out_channels
        mod = self.scale_shift_table[...].astype(jnp.float32)[None] + e.astype(jnp.float32)[:, None]
        shift, scale = mod[:, 0:1], mod[:, 1:2]
        h = (_layer_norm(x, FINAL_NORM_EPS) * (1 + scale) + shift).astype(self.dtype)
        out = self.proj_out(h).reshape(b, height // p, width // p, p, p, c)
        return out.transpose(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)

    def __call__(
        self,
        hidden_states: Array,
        encoder_hidden_states: Array,
        timestep: Array,
        encoder_attention_mask: Array | None = None,
        guidance: Array | None = None,
        *,
        return_block_io: bool = False,
    ) -> Array | tuple[Array, tuple[Array, ...]]:
        """Velocity [B, C_out, H, W] (`dtype`) of latent hidden_states [B, C_in, H, W].

        encoder_hidden_states [B, L, caption_channels]; timestep [B] (sigma * 1000, float or
        int); encoder_attention_mask [B, L] 1 = keep, 0 = padding (None: all kept); guidance
        [B] only for guidance_embeds models. return_block_io: also return the tuple of
        num_layers + 1 token arrays [B, N, D] (`run_blocks`).
        """
        height, width = hidden_states.shape[2:]
        x, y, mask, t6, e = self.embed(
            hidden_states, encoder_hidden_states, timestep, encoder_attention_mask, guidance
        )
        p = self.cfg.patch_size
        x, hidden = self.run_blocks(x, y, mask, t6, height // p, width // p)
        out = self.final_layer(x, e, height, width)
        return (out, hidden) if return_block_io else out


def init_sana(
    cfg: SanaConfig,
    *,
    seed: int = 0,
    dtype: Any = jnp.float32,
    param_dtype: Any = jnp.float32,
    remat: str = "none",
) -> SanaTransformer:
    """Randomly initialised SanaTransformer (tests, benchmarks, from-scratch training)."""
    return SanaTransformer(
        cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(seed)
    )
