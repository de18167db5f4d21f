"""NVILA vision-to-LLM connector: space-to-channel, projectors, video pooling, token splicing.

Mirrors NVlabs/VILA `llava/model/multimodal_projector/base_projector.py`
(`mlp_downsample_2x2_fix`, `mlp_downsample_3x3_fix`), the TSP video encoder's temporal pooling
with "\\n" separators, and `_embed`'s splicing of media embeddings at placeholder tokens.

Layout of `space_to_channel` (`flat_square_2x2` / `flat_square_3x3`): for x [B, H, W, C] and
factor f, out[b, i, j, (dh * f + dw) * C + c] = x[b, f*i + dh, f*j + dw, c], with H and W
zero-padded at the end up to a multiple of f. For f = 2 and even H, W this is exactly
transformers `InternVLModel.pixel_shuffle(x, 0.5)`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.nn.layers import Dense, LayerNorm

Array = jax.Array


def space_to_channel(x_bhwc: Array, factor: int) -> Array:
    """Fold each factor x factor patch into channels (NVILA `flat_square_{2x2,3x3}`).

    x_bhwc: [B, H, W, C]; factor: 2 or 3. H and W are zero-padded at the end to a multiple of
    `factor`. Returns [B, ceil(H/f), ceil(W/f), f*f*C] in x's dtype; channel index is
    (dh * f + dw) * C + c.
    """
    if factor not in (2, 3):
        raise ValueError(f"space_to_channel factor must be 2 or 3, got {factor}")
    if x_bhwc.ndim != 4:
        raise ValueError(f"space_to_channel expects [B, H, W, C], got shape {x_bhwc.shape}")
    b, h, w, c = x_bhwc.shape
    ph, pw = (-h) % factor, (-w) % factor
    if ph or pw:
        x_bhwc = jnp.pad(x_bhwc, ((0, 0), (0, ph), (0, pw), (0, 0)))
    hf, wf = (h + ph) // factor, (w + pw) // factor
    x = x_bhwc.reshape(b, hf, factor, wf, factor, c)
    x = jnp.transpose(x, (0, 1, 3, 2, 4, 5))
    return x.reshape(b, hf, wf, factor * factor * c)


def tokens_to_map(tokens_bnc: Array) -> Array:
    """[B, N, C] square token grid (row-major) -> [B, sqrt(N), sqrt(N), C]."""
    b, n, c = tokens_bnc.shape
    side = int(round(n**0.5))
    if side * side != n:
        raise ValueError(f"token count {n} is not a square number")
    return tokens_bnc.reshape(b, side, side, c)


def _gelu(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


class Projector2x2(nnx.Module):
    """NVILA `mlp_downsample_2x2_fix`: 2x2 space-to-channel, LN(4C) -> Lin(4C, D) -> GELU -> Lin(D, D).

    Parameter names follow transformers `InternVLMultiModalProjector` (layer_norm, linear_1,
    linear_2); `jaxstack.hf.nvila_projector` maps VILA's and InternVL's weights onto them.
    """

    def __init__(
        self,
        vision_dim: int,
        llm_dim: int,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layer_norm = LayerNorm(4 * vision_dim, eps=1e-5, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = Dense(4 * vision_dim, llm_dim, axes=("mlp", "embed"), **kw)
        self.linear_2 = Dense(llm_dim, llm_dim, axes=("embed", "mlp"), **kw)

    def mlp(self, x: Array) -> Array:
        """x [..., 4C] (already space-to-channel) -> [..., D]."""
        return self.linear_2(_gelu(self.linear_1(self.layer_norm(x))))

    def __call__(self, x_bhwc: Array) -> Array:
        """x [B, H, W, C] feature map -> [B, ceil(H/2) * ceil(W/2), D] tokens (row-major)."""
        y = self.mlp(space_to_channel(x_bhwc, 2))
        return y.reshape(y.shape[0], -1, y.shape[-1])


class Projector3x3(nnx.Module):
    """NVILA-Lite `mlp_downsample_3x3_fix`.

    3x3 space-to-channel, LN(9C) -> Lin(9C, 3C) -> GELU -> LN(3C) -> Lin(3C, D) -> GELU ->
    Lin(D, D). Attribute order follows VILA's nn.Sequential indices 1..7 (key table:
    `jaxstack.hf.nvila_projector.PROJECTOR_KEYS["vila_3x3"]`).
    """

    def __init__(
        self,
        vision_dim: int,
        llm_dim: int,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        c = vision_dim
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm_1 = LayerNorm(9 * c, eps=1e-5, dtype=dtype, param_dtype=param_dtype)
        self.linear_1 = Dense(9 * c, 3 * c, axes=("embed", "mlp"), **kw)
        self.norm_2 = LayerNorm(3 * c, eps=1e-5, dtype=dtype, param_dtype=param_dtype)
        self.linear_2 = Dense(3 * c, llm_dim, axes=("mlp", "embed"), **kw)
        self.linear_3 = Dense(llm_dim, llm_dim, axes=("embed", "mlp"), **kw)

    def mlp(self, x: Array) -> Array:
        """x [..., 9C] (already space-to-channel) -> [..., D]."""
        h = _gelu(self.linear_1(self.norm_1(x)))
        h = _gelu(self.linear_2(self.norm_2(h)))
        return self.linear_3(h)

    def __call__(self, x_bhwc: Array) -> Array:
        """x [B, H, W, C] feature map -> [B, ceil(H/3) * ceil(W/3), D] tokens (row-major)."""
        y = self.mlp(space_to_channel(x_bhwc, 3))
        return y.reshape(y.shape[0], -1, y.shape[-1])


def temporal_pool(tokens_tnd: Array, group: int) -> Array:
    """Average consecutive groups of `group` frames (TSP pool_sizes [[group, 1, 1]]).

    tokens_tnd: [T, N, D] per-frame tokens. Returns [ceil(T / group), N, D]; a final partial
    group (T not divisible by `group`) is averaged over the frames it has. Means in float32,
    result in the input dtype.
    """
    if group < 1:
        raise ValueError(f"temporal_pool group must be >= 1, got {group}")
    t, n, d = tokens_tnd.shape
    g = -(-t // group)
    pad = g * group - t
    x32 = tokens_tnd.astype(jnp.float32)
    if pad:
        x32 = jnp.pad(x32, ((0, pad), (0, 0), (0, 0)))
    sums = x32.reshape(g, group, n, d).sum(axis=1)
    counts = np.full((g,), group, np.float32)
    counts[-1] = group - pad
    return (sums / jnp.asarray(counts)[:, None, None]).astype(tokens_tnd.dtype)


def interleave_separators(groups_gnd: Array, sep_embedding: Array) -> Array:
    """Follow each group's tokens with the separator embedding(s) (e.g. the "\\n" token).

    groups_gnd: [G, N, D]; sep_embedding: [D] or [S, D]. Returns [G * (N + S), D]:
    group 0 tokens, separator, group 1 tokens, separator, ...
    """
    g, _, d = groups_gnd.shape
    sep = sep_embedding.reshape(-1, d).astype(groups_gnd.dtype)
    sep = jnp.broadcast_to(sep[None], (g,) + sep.shape)
    return jnp.concatenate([groups_gnd, sep], axis=1).reshape(-1, d)


def merge_multimodal(
    text_embeds_btd: Array, input_ids_bt: Array, media_embeds_md: Array, media_token_id: int
) -> Array:
    """Write media embeddings at the placeholder positions, in order (row-major over [B, T]).

    text_embeds_btd: [B, T, D]; input_ids_bt: int [B, T]; media_embeds_md: [M, D], one row
    per placeholder token. Static shapes, jit-friendly. Outside jit, a placeholder count that
    differs from M raises ValueError; under jit extra media rows are ignored and missing ones
    repeat the last row (callers bucket M to the placeholder count). Returns [B, T, D] in the
    text dtype.
    """
    b, t, d = text_embeds_btd.shape
    m = media_embeds_md.shape[0]
    if input_ids_bt.shape != (b, t) or media_embeds_md.shape[-1] != d:
        raise ValueError(
            f"shape mismatch: text {text_embeds_btd.shape}, ids {input_ids_bt.shape}, "
            f"media {media_embeds_md.shape}"
        )
    mask = input_ids_bt == media_token_id
    try:
        count = int(np.asarray(mask).sum())
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        count = None  # traced: no host-side check possible
    if count is not None and count != m:
        raise ValueError(
            f"{count} media placeholder tokens (id {media_token_id}) but {m} media embeddings"
        )
    if m == 0:
        return text_embeds_btd
    flat = mask.reshape(-1)
    idx = jnp.clip(jnp.cumsum(flat.astype(jnp.int32)) - 1, 0, m - 1)
    gathered = jnp.take(media_embeds_md, idx, axis=0).astype(text_embeds_btd.dtype)
    out = jnp.where(flat[:, None], gathered, text_embeds_btd.reshape(-1, d))
    return out.reshape(b, t, d)


def project_video(
    projector: Projector2x2, frames_tnc: Array, group: int, sep_embedding: Array
) -> Array:
    """NVILA video path: per-frame 2x2 projector, temporal pooling, "\\n" separators.

    frames_tnc: [T, N, C] SigLIP tokens per frame (N square). Returns
    [ceil(T / group) * (N' + S), D] with N' = ceil(sqrt(N)/2)^2.
    """
    tokens = projector(tokens_to_map(frames_tnc))
    return interleave_separators(temporal_pool(tokens, group), sep_embedding)


__all__: Sequence[str] = (
    "LayerNorm",
    "Projector2x2",
    "Projector3x3",
    "interleave_separators",
    "merge_multimodal",
    "project_video",
    "space_to_channel",
    "temporal_pool",
    "tokens_to_map",
)
