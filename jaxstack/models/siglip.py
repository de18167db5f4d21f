"""SigLIP vision tower (ViT encoder) as NVILA uses it, in Flax NNX.

Matches transformers `SiglipVisionModel` without its attention-pooling head:
patch embedding (Conv2d k=s=patch, with bias) + learned position embeddings, then `num_layers`
pre-LN encoder layers (LayerNorm -> MHA with biases -> residual, LayerNorm -> fc1 ->
gelu(tanh) -> fc2 -> residual), then `post_layernorm`.

Layout: pixel_values are NHWC, [B, H, W, C] float (HF/torch takes NCHW; transpose with
`x.transpose(0, 2, 3, 1)`). H = W = image_size. Features are [B, N, D] with
N = (image_size // patch_size) ** 2 tokens in row-major patch order (as HF's flatten(2)).

Shapes: B batch, N tokens, D hidden, F mlp width, Nh heads, Hd head dim, P patch size.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from jaxstack.nn.attention import dot_product_attention
from jaxstack.nn.layers import Dense, LayerNorm
from jaxstack.parallel.mesh import constrain

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """SigLIP vision encoder sizes (field names follow jaxstack; HF names in comments)."""

    hidden_size: int = 64  # hidden_size
    num_layers: int = 2  # num_hidden_layers
    num_heads: int = 4  # num_attention_heads
    mlp_dim: int = 128  # intermediate_size
    image_size: int = 28  # image_size
    patch_size: int = 14  # patch_size
    num_channels: int = 3  # num_channels
    layer_norm_eps: float = 1e-6  # layer_norm_eps

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} not divisible by num_heads {self.num_heads}"
            )
        if self.image_size % self.patch_size:
            raise ValueError(
                f"image_size {self.image_size} not divisible by patch_size {self.patch_size}"
            )

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SiglipConfig:
        """The config of preset `name` (see PRESETS; case-insensitive), fields replaced by
        `overrides`: "so400m-patch14-448" (the NVILA tower), "tiny" (tests). Unknown names
        raise ValueError listing the known ones."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r} for SiglipConfig; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[key](), **overrides)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def grid_size(self) -> int:
        """Patches per side (448 / 14 = 32 for so400m-patch14-448)."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Tokens per image: grid_size ** 2."""
        return self.grid_size**2


PRESETS: dict[str, Callable[[], SiglipConfig]] = {
    # google/siglip-so400m-patch14-448 (the PaliGemma / NVILA vision tower).
    "so400m-patch14-448": functools.partial(
        SiglipConfig,
        hidden_size=1152,
        num_layers=27,
        num_heads=16,
        mlp_dim=4304,
        image_size=448,
        patch_size=14,
        layer_norm_eps=1e-6,
    ),
    "tiny": functools.partial(
        SiglipConfig,
        hidden_size=64,
        num_layers=3,
        num_heads=4,
        mlp_dim=128,
        image_size=28,
        patch_size=14,
    ),
}


class PatchEmbed(nnx.Module):
    """Non-overlapping patch conv + learned position embeddings.

    kernel [P, P, C, D] (HWIO; HF Conv2d weight [D, C, P, P] permuted by (2, 3, 1, 0)),
    bias [D], position embedding [N, D].
    """

    def __init__(self, cfg: SiglipConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        self.patch_size = p
        self.dtype = dtype
        std = (p * p * c) ** -0.5
        self.kernel = nnx.Param(
            (std * jax.random.normal(rngs.params(), (p, p, c, d), jnp.float32)).astype(param_dtype),
            logical_axes=(None, None, None, "embed"),
        )
        self.bias = nnx.Param(jnp.zeros((d,), param_dtype), logical_axes=("embed",))
        self.position_embedding = nnx.Param(
            (0.02 * jax.random.normal(rngs.params(), (cfg.num_patches, d), jnp.float32)).astype(
                param_dtype
            ),
            logical_axes=(None, "embed"),
        )

    def __call__(self, pixels_bhwc: Array) -> Array:
        """pixels [B, H, W, C] -> tokens [B, N, D], N = (H / P) * (W / P), row-major."""
        y = jax.lax.conv_general_dilated(
            pixels_bhwc.astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            window_strides=(self.patch_size, self.patch_size),
            padding="VALID",
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        b, gh, gw, d = y.shape
        y = y.reshape(b, gh * gw, d) + self.bias[...].astype(self.dtype)
        return y + self.position_embedding[...].astype(self.dtype)[None]


class Attention(nnx.Module):
    """Full (non-causal) multi-head self-attention with biases on q, k, v and out."""

    def __init__(self, cfg: SiglipConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.k_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.v_proj = Dense(d, d, axes=("embed", "heads"), **kw)
        self.out_proj = Dense(d, d, axes=("heads", "embed"), **kw)

    def __call__(self, x_bnd: Array) -> Array:
        """x [B, N, D] -> [B, N, D]."""
        b, n, _ = x_bnd.shape
        shape = (b, n, self.num_heads, self.head_dim)
        q = constrain(self.q_proj(x_bnd).reshape(shape), ("batch", "seq", "act_heads", None))
        k = constrain(self.k_proj(x_bnd).reshape(shape), ("batch", "seq", "act_heads", None))
        v = constrain(self.v_proj(x_bnd).reshape(shape), ("batch", "seq", "act_heads", None))
        out = dot_product_attention(q, k, v, causal=False)
        out = constrain(out, ("batch", "seq", "act_heads", None))
        return self.out_proj(out.reshape(b, n, -1))


class MLP(nnx.Module):
    """fc1 -> gelu (tanh approximation, HF `gelu_pytorch_tanh`) -> fc2, with biases."""

    def __init__(self, cfg: SiglipConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense(cfg.hidden_size, cfg.mlp_dim, axes=("embed", "mlp"), **kw)
        self.fc2 = Dense(cfg.mlp_dim, cfg.hidden_size, axes=("mlp", "embed"), **kw)

    def __call__(self, x_bnd: Array) -> Array:
        """x [B, N, D] -> [B, N, D]."""
        h = jax.nn.gelu(self.fc1(x_bnd), approximate=True)
        h = constrain(h, ("batch", "seq", "act_mlp"))
        return self.fc2(h)


class EncoderLayer(nnx.Module):
    """Pre-LN transformer layer: x + attn(ln1(x)), then x + mlp(ln2(x))."""

    def __init__(self, cfg: SiglipConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        ln = dict(eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.layer_norm1 = LayerNorm(cfg.hidden_size, **ln)
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, **ln)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_bnd: Array) -> Array:
        """x [B, N, D] -> [B, N, D]."""
        x_bnd = x_bnd + self.self_attn(self.layer_norm1(x_bnd))
        x_bnd = x_bnd + self.mlp(self.layer_norm2(x_bnd))
        return constrain(x_bnd, ("batch", "seq", "act_embed"))


class SiglipOutput(NamedTuple):
    """All outputs of `SiglipVisionTower.forward` (each [B, N, D])."""

    features: Array  # hidden_states[select_layer] (NVILA's features; no post-LN)
    last_hidden_state: Array  # post_layernorm(output of the last layer)
    hidden_states: tuple[Array, ...]  # embeddings, then the output of each layer (L + 1 items)


class SiglipVisionTower(nnx.Module):
    """SigLIP vision encoder returning NVILA's features.

    select_layer: which entry of HF's `hidden_states` (embeddings, layer 1, ..., layer L) is
    the feature map, Python-indexed; -2 (NVILA's `mm_vision_select_layer`) is the output of the
    second-to-last layer, before `post_layernorm`. `__call__` runs only the layers it needs.
    dtype: compute dtype; param_dtype: parameter storage dtype (LayerNorm math in float32).
    """

    def __init__(
        self,
        cfg: SiglipConfig,
        *,
        select_layer: int = -2,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        n = cfg.num_layers + 1
        if not -n <= select_layer < n:
            raise ValueError(
                f"select_layer {select_layer} out of range for {cfg.num_layers} layers "
                f"(hidden_states has {n} entries: embeddings + one per layer)"
            )
        self.cfg = cfg
        self.select_layer = select_layer
        self.dtype = dtype
        self.embeddings = PatchEmbed(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List(
            [
                EncoderLayer(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.num_layers)
            ]
        )
        self.post_layernorm = LayerNorm(
            cfg.hidden_size, eps=cfg.layer_norm_eps, dtype=dtype, param_dtype=param_dtype
        )

    @property
    def num_feature_layers(self) -> int:
        """Number of encoder layers that produce the selected features."""
        return self.select_layer % (self.cfg.num_layers + 1)

    def _check_pixels(self, pixels_bhwc: Array) -> None:
        c = self.cfg
        expected = (c.image_size, c.image_size, c.num_channels)
        if pixels_bhwc.ndim != 4 or tuple(pixels_bhwc.shape[1:]) != expected:
            raise ValueError(
                f"pixel_values must be NHWC [B, {c.image_size}, {c.image_size}, "
                f"{c.num_channels}], got shape {tuple(pixels_bhwc.shape)} (NCHW input needs "
                "x.transpose(0, 2, 3, 1))"
            )

    def __call__(self, pixels_bhwc: Array) -> Array:
        """pixel_values [B, H, W, C] float (NHWC) -> features [B, N, D] (hidden_states[select])."""
        self._check_pixels(pixels_bhwc)
        x = constrain(self.embeddings(pixels_bhwc), ("batch", "seq", "act_embed"))
        for layer in self.layers[: self.num_feature_layers]:
            x = layer(x)
        return x

    def forward(self, pixels_bhwc: Array) -> SiglipOutput:
        """pixel_values [B, H, W, C] (NHWC) -> SiglipOutput running all layers + post-LN."""
        self._check_pixels(pixels_bhwc)
        x = constrain(self.embeddings(pixels_bhwc), ("batch", "seq", "act_embed"))
        hidden = [x]
        for layer in self.layers:
            x = layer(x)
            hidden.append(x)
        return SiglipOutput(
            features=hidden[self.select_layer],
            last_hidden_state=self.post_layernorm(x),
            hidden_states=tuple(hidden),
        )
