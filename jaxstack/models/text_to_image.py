"""A SANA transformer conditioned on a learned word-embedding caption encoder.

For small closed-vocabulary tasks (the captioned shapes of `jaxstack/data/shapes.py`) a large
text encoder is not needed: captions are word ids, a trainable table maps them to the
transformer's `caption_channels`, and a learned null caption (SANA's `y_embedding`) stands in
for dropped captions in training and for the unconditional branch of classifier-free guidance.
The transformer is `jaxstack.models.sana.SanaTransformer`, unchanged.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jaxstack.models.sana import SanaConfig, SanaTransformer
from jaxstack.nn.layers import Embed

Array = jax.Array


class WordCaptionDiT(nnx.Module):
    """`model(x, timestep, (caption [B, L, C], mask [B, L]))` -> velocity, the signature
    `jaxstack.diffusion.sample` takes; `encode(ids)` gives the caption pair of word ids and
    `null(batch)` the unconditional one."""

    def __init__(
        self,
        cfg: SanaConfig,
        vocab_size: int,
        caption_len: int,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        self.caption_len = caption_len
        self.dit = SanaTransformer(
            cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=rngs
        )
        self.words = Embed(
            vocab_size, cfg.caption_channels, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        null = 0.02 * jax.random.normal(rngs.params(), (caption_len, cfg.caption_channels))
        self.null_caption = nnx.Param(null.astype(param_dtype), logical_axes=(None, "embed"))

    def encode(self, ids_bl: Array) -> tuple[Array, Array]:
        """(caption [B, L, C], mask int32 [B, L]) of word ids [B, L] (0 = padding)."""
        ids_bl = jnp.asarray(ids_bl, jnp.int32)
        return self.words(ids_bl), (ids_bl > 0).astype(jnp.int32)

    def null(self, batch: int) -> tuple[Array, Array]:
        """The unconditional caption pair for `batch` images (every position kept)."""
        emb = jnp.broadcast_to(
            self.null_caption[...].astype(self.dit.dtype),
            (batch, self.caption_len, self.null_caption.shape[-1]),
        )
        return emb, jnp.ones((batch, self.caption_len), jnp.int32)

    def __call__(self, x: Array, timestep: Array, cond: tuple[Array, Array]) -> Array:
        caption, mask = cond
        return self.dit(x, caption, timestep, mask)
