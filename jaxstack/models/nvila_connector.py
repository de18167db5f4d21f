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

from collections.abc import Mapping, Sequence
from typing import Any

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
    linear_2); see `projector_from_internvl`.
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
    Lin(D, D). Attribute order follows VILA's nn.Sequential indices 1..7 (see
    `projector3x3_from_vila`).
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


def _to_np(t: Any) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor
        t = t.detach().float().cpu().numpy()
    return np.asarray(t, dtype=np.float32)


def _assign(
    module: nnx.Module, mapping: Mapping[str, tuple[str, str]], sd: Mapping[str, Any]
) -> None:
    """Copy sd[key] into module.<attr>.<param> (Linear weights [out, in] are transposed)."""
    missing = [k for k in mapping if k not in sd]
    if missing:
        raise KeyError(f"projector state_dict lacks {missing}; has {sorted(sd)}")
    for key, (attr, pname) in mapping.items():
        param = getattr(getattr(module, attr), pname)
        value = _to_np(sd[key])
        if pname == "kernel":
            value = value.T
        if value.shape != param[...].shape:
            raise ValueError(f"{key}: shape {value.shape} != expected {param[...].shape}")
        param[...] = jnp.asarray(value, param[...].dtype)


def projector_from_internvl(
    state_dict: Mapping[str, Any], *, prefix: str = "", dtype=jnp.float32
) -> Projector2x2:
    """Build a Projector2x2 from `InternVLMultiModalProjector` weights (torch or NumPy).

    Keys (after `prefix`, e.g. "multi_modal_projector."): layer_norm.{weight,bias},
    linear_1.{weight,bias} ([D, 4C]), linear_2.{weight,bias} ([D, D]).
    """
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if "linear_1.weight" not in sd:
        raise KeyError(f"no 'linear_1.weight' under prefix {prefix!r}; keys: {sorted(state_dict)}")
    d, four_c = _to_np(sd["linear_1.weight"]).shape
    if four_c % 4:
        raise ValueError(f"linear_1 input dim {four_c} is not 4 * C")
    model = Projector2x2(four_c // 4, d, dtype=dtype, rngs=nnx.Rngs(0))
    mapping = {
        "layer_norm.weight": ("layer_norm", "scale"),
        "layer_norm.bias": ("layer_norm", "bias"),
        "linear_1.weight": ("linear_1", "kernel"),
        "linear_1.bias": ("linear_1", "bias"),
        "linear_2.weight": ("linear_2", "kernel"),
        "linear_2.bias": ("linear_2", "bias"),
    }
    _assign(model, mapping, sd)
    return model


def projector3x3_from_vila(
    state_dict: Mapping[str, Any], *, prefix: str = "layers.", dtype=jnp.float32
) -> Projector3x3:
    """Build a Projector3x3 from VILA `mlp_downsample_3x3_fix` weights (nn.Sequential indices).

    Keys after `prefix`: 1 (LN 9C), 2 (Lin 9C->3C), 4 (LN 3C), 5 (Lin 3C->D), 7 (Lin D->D).
    """
    sd = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if "2.weight" not in sd or "5.weight" not in sd:
        raise KeyError(
            f"no '2.weight'/'5.weight' under prefix {prefix!r}; keys: {sorted(state_dict)}"
        )
    three_c = _to_np(sd["2.weight"]).shape[0]
    d = _to_np(sd["5.weight"]).shape[0]
    model = Projector3x3(three_c // 3, d, dtype=dtype, rngs=nnx.Rngs(0))
    mapping = {
        "1.weight": ("norm_1", "scale"),
        "1.bias": ("norm_1", "bias"),
        "2.weight": ("linear_1", "kernel"),
        "2.bias": ("linear_1", "bias"),
        "4.weight": ("norm_2", "scale"),
        "4.bias": ("norm_2", "bias"),
        "5.weight": ("linear_2", "kernel"),
        "5.bias": ("linear_2", "bias"),
        "7.weight": ("linear_3", "kernel"),
        "7.bias": ("linear_3", "bias"),
    }
    _assign(model, mapping, sd)
    return model


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
    "projector3x3_from_vila",
    "projector_from_internvl",
    "space_to_channel",
    "temporal_pool",
    "tokens_to_map",
)
