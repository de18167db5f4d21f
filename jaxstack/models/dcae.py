"""DC-AE, the deep-compression autoencoder of SANA (diffusers `AutoencoderDC`), in Flax NNX.

ae = DCAE(DCAEConfig.preset("dc-ae-f32c32"), rngs=nnx.Rngs(0))   # or jaxstack.hf.load_dcae
z = ae.encode(images_nchw)        # [B, 3, H, W] -> [B, 32, H/32, W/32], unscaled
x = ae.decode(z)                  # [B, 32, h, w] -> [B, 3, 32h, 32w]

As in diffusers, `encode`/`decode` do not apply `scaling_factor` (a diffusion model sees
z * scaling_factor; divide before decoding) and take/return NCHW. The encoder and decoder
modules themselves work on NHWC (`ae.encoder(x_nhwc)`, `ae.decoder(z_nhwc)`).

Encoder: conv_in (3x3; a `DownBlock` without shortcut when the first stage has no layers),
then per stage its blocks (ResBlock / EfficientViTBlock) and, except after the last, a 2x
`DownBlock` with its pixel-unshuffle + group-mean shortcut; then conv_out(x) + group-mean of
x to the latent channels. Decoder: conv_in(z) + channel repeat-interleave of z, per stage
(last first) a 2x `UpBlock` (repeat-interleave + pixel-shuffle shortcut) and the blocks, then
RMSNorm -> act -> conv_out. Blocks: `jaxstack.models.dcae_blocks`; references
../shared/specs/sana.md §3 and diffusers `models/autoencoders/autoencoder_dc.py`.
Tiled encoding/decoding and slicing (diffusers memory options) are not implemented.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxstack.models.dcae_blocks import (
    BLOCK_TYPES,
    NORM_TYPES,
    ChannelRMSNorm,
    Conv2d,
    DownBlock,
    UpBlock,
    activation,
    group_mean,
    make_block,
)

Array = jax.Array

PerStage = str | tuple[str, ...]


def _tuple(value: Any) -> Any:
    """Lists (from JSON) -> tuples, recursively; other values unchanged."""
    if isinstance(value, list | tuple):
        return tuple(_tuple(v) for v in value)
    return value


def _list(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_list(v) for v in value]
    return value


def _per_stage(value: Any, n: int) -> tuple:
    return (value,) * n if isinstance(value, str) or value is None else tuple(value)


@dataclasses.dataclass(frozen=True)
class DCAEConfig:
    """diffusers `AutoencoderDC` config: same field names, same defaults.

    A string for a per-stage field (block types, norm types, act fns) means every stage. A
    downsample type other than "pixel_unshuffle" is the stride-2 conv ("conv"/"Conv"); an
    upsample type other than "interpolate" is pixel-shuffle (as in diffusers).
    """

    in_channels: int = 3
    latent_channels: int = 32
    attention_head_dim: int = 32
    encoder_block_types: PerStage = "ResBlock"
    decoder_block_types: PerStage = "ResBlock"
    encoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    decoder_block_out_channels: tuple[int, ...] = (128, 256, 512, 512, 1024, 1024)
    encoder_layers_per_block: tuple[int, ...] = (2, 2, 2, 3, 3, 3)
    decoder_layers_per_block: tuple[int, ...] = (3, 3, 3, 3, 3, 3)
    encoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    decoder_qkv_multiscales: tuple[tuple[int, ...], ...] = ((), (), (), (5,), (5,), (5,))
    upsample_block_type: str = "pixel_shuffle"
    downsample_block_type: str = "pixel_unshuffle"
    decoder_norm_types: PerStage = "rms_norm"
    decoder_act_fns: PerStage = "silu"
    encoder_out_shortcut: bool = True
    decoder_in_shortcut: bool = True
    decoder_conv_act_fn: str = "relu"
    scaling_factor: float = 1.0

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
        self._validate()

    def _validate(self) -> None:
        for side in ("encoder", "decoder"):
            channels = getattr(self, f"{side}_block_out_channels")
            n = len(channels)
            if n < 1:
                raise ValueError(f"{side}_block_out_channels is empty")
            per_stage = {
                f"{side}_block_types": self.stage_block_types(side),
                f"{side}_layers_per_block": getattr(self, f"{side}_layers_per_block"),
                f"{side}_qkv_multiscales": getattr(self, f"{side}_qkv_multiscales"),
            }
            if side == "decoder":
                per_stage["decoder_norm_types"] = _per_stage(self.decoder_norm_types, n)
                per_stage["decoder_act_fns"] = _per_stage(self.decoder_act_fns, n)
            for name, value in per_stage.items():
                if len(value) != n:
                    raise ValueError(f"{name} has {len(value)} entries for {n} stages")
            for t in per_stage[f"{side}_block_types"]:
                if t not in BLOCK_TYPES:
                    raise ValueError(f"{side} block type {t!r} unsupported; known: {BLOCK_TYPES}")
            layers = per_stage[f"{side}_layers_per_block"]
            for i in range(n - 1):  # the 2x down/up block between stage i and i + 1
                a, b = channels[i], channels[i + 1]
                if layers[i] > 0 and ((4 * a) % b if side == "encoder" else (4 * b) % a):
                    raise ValueError(
                        f"{side}_block_out_channels {channels}: the shortcut between "
                        f"{a} and {b} channels needs 4 * {a if side == 'encoder' else b} "
                        f"divisible by {b if side == 'encoder' else a}"
                    )
            if channels[-1] % self.latent_channels:
                raise ValueError(
                    f"{side}_block_out_channels[-1] {channels[-1]} not divisible by "
                    f"latent_channels {self.latent_channels}"
                )
        for t in _per_stage(self.decoder_norm_types, self.num_decoder_stages):
            if t not in NORM_TYPES:
                raise ValueError(f"decoder norm type {t!r} unsupported; known: {NORM_TYPES}")
        for a in _per_stage(self.decoder_act_fns, self.num_decoder_stages):
            activation(a)  # None = identity, as diffusers' ResBlock allows
        if not isinstance(self.decoder_conv_act_fn, str):
            raise ValueError(
                f"decoder_conv_act_fn must be a name, got {self.decoder_conv_act_fn!r}"
            )
        activation(self.decoder_conv_act_fn)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> DCAEConfig:
        """The config of preset `name` (see PRESETS): "dc-ae-f32c32" (SANA's DC-AE, the
        `mit-han-lab/dc-ae-f32c32-sana-1.x-diffusers` config), "tiny" (tests); fields
        replaced by `overrides`. Unknown names raise ValueError listing the known ones."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r} for DCAEConfig; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[key](), **overrides)

    @classmethod
    def from_diffusers_config(cls, config: dict[str, Any]) -> DCAEConfig:
        """DCAEConfig from a diffusers `AutoencoderDC` config dict (config.json). Keys starting
        with "_" (class name, versions) are ignored; other unknown keys raise ValueError."""
        known = {f.name for f in dataclasses.fields(cls)}
        fields = {k: v for k, v in config.items() if not k.startswith("_")}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise ValueError(f"unknown AutoencoderDC config keys {unknown}; known: {sorted(known)}")
        return cls(**fields)

    def to_diffusers_config(self) -> dict[str, Any]:
        """The diffusers config dict (JSON-ready: tuples as lists, `_class_name` set)."""
        out: dict[str, Any] = {"_class_name": "AutoencoderDC"}
        out.update({f.name: _list(getattr(self, f.name)) for f in dataclasses.fields(self)})
        return out

    @property
    def num_encoder_stages(self) -> int:
        return len(self.encoder_block_out_channels)

    @property
    def num_decoder_stages(self) -> int:
        return len(self.decoder_block_out_channels)

    @property
    def spatial_compression_ratio(self) -> int:
        """Image pixels per latent pixel along each side (32 for f32c32)."""
        return 2 ** (self.num_encoder_stages - 1)

    def stage_block_types(self, side: str) -> tuple[str, ...]:
        """Block type of each stage of "encoder" or "decoder"."""
        n = len(getattr(self, f"{side}_block_out_channels"))
        return _per_stage(getattr(self, f"{side}_block_types"), n)


PRESETS: dict[str, Callable[[], DCAEConfig]] = {
    # mit-han-lab/dc-ae-f32c32-sana-1.0-diffusers (and -1.1): SANA's autoencoder, ~312M params.
    "dc-ae-f32c32": functools.partial(
        DCAEConfig,
        in_channels=3,
        latent_channels=32,
        attention_head_dim=32,
        encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        decoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3,
        encoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        decoder_block_out_channels=(128, 256, 512, 512, 1024, 1024),
        encoder_layers_per_block=(2, 2, 2, 3, 3, 3),
        decoder_layers_per_block=(3, 3, 3, 3, 3, 3),
        encoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        decoder_qkv_multiscales=((), (), (), (5,), (5,), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="Conv",  # as in the Hub config.json; any non-"pixel_unshuffle"
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ),
    # diffusers' AutoencoderDC test config (sana.md §8): ~9.5k params, 32x32 -> (4, 16, 16).
    "tiny": functools.partial(
        DCAEConfig,
        in_channels=3,
        latent_channels=4,
        attention_head_dim=2,
        encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"),
        encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8),
        encoder_layers_per_block=(1, 1),
        decoder_layers_per_block=(1, 1),
        encoder_qkv_multiscales=((), (5,)),
        decoder_qkv_multiscales=((), (5,)),
        upsample_block_type="interpolate",
        downsample_block_type="conv",
        decoder_norm_types="rms_norm",
        decoder_act_fns="silu",
        scaling_factor=0.41407,
    ),
}


class DCAEEncoder(nnx.Module):
    """Image [B, H, W, in_channels] (NHWC) -> latent [B, H/r, W/r, latent_channels], r = 2^(S-1)."""

    def __init__(
        self,
        cfg: DCAEConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        channels, layers = cfg.encoder_block_out_channels, cfg.encoder_layers_per_block
        unshuffle = cfg.downsample_block_type == "pixel_unshuffle"
        n = len(channels)
        if layers[0] > 0:
            self.conv_in = Conv2d(cfg.in_channels, channels[0], 3, **kw)
        else:
            self.conv_in = DownBlock(
                cfg.in_channels, channels[1], pixel_unshuffle=unshuffle, shortcut=False, **kw
            )
        stages = []
        for i, (block_type, c, num) in enumerate(
            zip(cfg.stage_block_types("encoder"), channels, layers, strict=True)
        ):
            stage = [
                make_block(
                    block_type,
                    c,
                    head_dim=cfg.attention_head_dim,
                    norm_type="rms_norm",
                    act_fn="silu",
                    kernel_sizes=cfg.encoder_qkv_multiscales[i],
                    **kw,
                )
                for _ in range(num)
            ]
            if i < n - 1 and num > 0:
                stage.append(
                    DownBlock(c, channels[i + 1], pixel_unshuffle=unshuffle, shortcut=True, **kw)
                )
            stages.append(nnx.List(stage))
        self.down_blocks = nnx.List(stages)
        self.conv_out = Conv2d(channels[-1], cfg.latent_channels, 3, **kw)
        self.out_shortcut = cfg.encoder_out_shortcut
        self.out_group = channels[-1] // cfg.latent_channels

    def __call__(self, x_bhwc: Array) -> Array:
        """x [B, H, W, C_in] -> latent [B, H/r, W/r, C_latent] in the compute dtype."""
        x = self.conv_in(x_bhwc)
        for stage in self.down_blocks:
            for block in stage:
                x = block(x)
        y = self.conv_out(x)
        if self.out_shortcut:
            y = y + group_mean(x, self.out_group).astype(y.dtype)
        return y


class DCAEDecoder(nnx.Module):
    """Latent [B, h, w, latent_channels] (NHWC) -> image [B, h*r, w*r, in_channels]."""

    def __init__(
        self,
        cfg: DCAEConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        channels, layers = cfg.decoder_block_out_channels, cfg.decoder_layers_per_block
        interpolate = cfg.upsample_block_type == "interpolate"
        n = len(channels)
        norms = _per_stage(cfg.decoder_norm_types, n)
        acts = _per_stage(cfg.decoder_act_fns, n)
        self.conv_in = Conv2d(cfg.latent_channels, channels[-1], 3, **kw)
        self.in_shortcut = cfg.decoder_in_shortcut
        self.in_repeats = channels[-1] // cfg.latent_channels
        stages = []  # index i = stage i (diffusers' up_blocks order); run last to first
        for i, (block_type, c, num) in enumerate(
            zip(cfg.stage_block_types("decoder"), channels, layers, strict=True)
        ):
            stage = []
            if i < n - 1 and num > 0:
                stage.append(
                    UpBlock(channels[i + 1], c, interpolate=interpolate, shortcut=True, **kw)
                )
            stage += [
                make_block(
                    block_type,
                    c,
                    head_dim=cfg.attention_head_dim,
                    norm_type=norms[i],
                    act_fn=acts[i],
                    kernel_sizes=cfg.decoder_qkv_multiscales[i],
                    **kw,
                )
                for _ in range(num)
            ]
            stages.append(nnx.List(stage))
        self.up_blocks = nnx.List(stages)
        out_c = channels[0] if layers[0] > 0 else channels[1]
        self.norm_out = ChannelRMSNorm(out_c, dtype=dtype, param_dtype=param_dtype)
        self.conv_act = activation(cfg.decoder_conv_act_fn)
        if layers[0] > 0:
            self.conv_out = Conv2d(out_c, cfg.in_channels, 3, **kw)
        else:
            self.conv_out = UpBlock(
                out_c, cfg.in_channels, interpolate=interpolate, shortcut=False, **kw
            )

    def __call__(self, z_bhwc: Array) -> Array:
        """z [B, h, w, C_latent] -> image [B, h*r, w*r, C_in] in the compute dtype."""
        x = self.conv_in(z_bhwc)
        if self.in_shortcut:
            x = x + jnp.repeat(z_bhwc, self.in_repeats, axis=-1).astype(x.dtype)
        for stage in reversed(self.up_blocks):
            for block in stage:
                x = block(x)
        return self.conv_out(self.conv_act(self.norm_out(x)))


class DCAE(nnx.Module):
    """diffusers `AutoencoderDC`: `encode`/`decode` in NCHW (see the module docstring).

    dtype: compute dtype; param_dtype: parameter storage dtype (norms and the linear-attention
    state in float32 whatever the dtype).
    """

    def __init__(
        self,
        cfg: DCAEConfig,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.cfg = cfg
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = DCAEEncoder(cfg, **kw)
        self.decoder = DCAEDecoder(cfg, **kw)

    @property
    def scaling_factor(self) -> float:
        return self.cfg.scaling_factor

    def encode(self, x_nchw: Array) -> Array:
        """images [B, C_in, H, W] -> latents [B, C_latent, H/r, W/r] (not scaled).

        H and W must be multiples of r = cfg.spatial_compression_ratio.
        """
        r, c = self.cfg.spatial_compression_ratio, self.cfg.in_channels
        if x_nchw.ndim != 4 or x_nchw.shape[1] != c or x_nchw.shape[2] % r or x_nchw.shape[3] % r:
            raise ValueError(
                f"encode takes NCHW images [B, {c}, H, W] with H, W multiples of {r}; got shape "
                f"{tuple(x_nchw.shape)}"
            )
        return self.encoder(x_nchw.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    def decode(self, z_nchw: Array) -> Array:
        """latents [B, C_latent, h, w] (unscaled) -> images [B, C_in, h*r, w*r]."""
        c = self.cfg.latent_channels
        if z_nchw.ndim != 4 or z_nchw.shape[1] != c:
            raise ValueError(
                f"decode takes NCHW latents [B, {c}, h, w]; got shape {tuple(z_nchw.shape)}"
            )
        return self.decoder(z_nchw.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)

    def __call__(self, x_nchw: Array) -> Array:
        """decode(encode(x)): images [B, C_in, H, W] -> reconstructions, same shape."""
        return self.decode(self.encode(x_nchw))
