"""`LoRALinear`: a frozen base projection plus a trainable low-rank update (LoRA).

    y = base(x) + (alpha / rank) * dropout(x) @ A @ B

A [in, rank] and B [rank, out] are `flax.nnx.LoRAParam`s held by an `nnx.LoRA` branch (Flax's
own LoRA module; it has no scale and no dropout, which this wrapper adds); `base` is any module
mapping [..., in] -> [..., out], a `jaxstack.nn.layers.Dense` in the decoder LLM. The wrapper is
the seam for other base projections: a sparse base (SparseLoRA) replaces `base` and keeps
`delta`, the dense LoRA branch, unchanged.

Initialisation as in PEFT: A ~ U(-1/sqrt(in), 1/sqrt(in)) (PyTorch's kaiming-uniform with
a = sqrt(5) on the [rank, in] weight), B = 0, so a fresh adapter leaves the model unchanged.

Dropout (on the branch's input, as in PEFT) is active only while per-row seeds are set
(`set_dropout_seeds` in `jaxstack/lora/adapters.py`); the mask of batch row b in layer l is a
pure function of (seed_b, l), so it does not depend on how rows are split or sharded.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

Array = jax.Array

# PEFT's A initialiser in the [in, rank] layout: U(-b, b) with b = 1 / sqrt(in).
peft_a_init = jax.nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class LoRADropoutSeeds(nnx.Variable):
    """uint32 [B]: one dropout seed per batch row (training only; see `set_dropout_seeds`)."""


class LoRALinear(nnx.Module):
    """base(x) + scale * lora(dropout(x)), scale = alpha / rank.

    base: the frozen projection (any module [..., in] -> [..., out]); in_features /
    out_features: its sizes; in_axis / out_axis: its logical axis names (A gets (in_axis,
    None), B (None, out_axis)); target: the projection's name ("q_proj", ...); layer_id: an
    int that makes this layer's dropout masks differ from the other layers'. dtype: compute
    dtype of the branch; param_dtype: storage dtype of A and B.
    """

    def __init__(
        self,
        base: nnx.Module,
        *,
        in_features: int,
        out_features: int,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        target: str = "",
        layer_id: int = 0,
        in_axis: str | None = None,
        out_axis: str | None = None,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.base = base
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        self.dropout = dropout
        self.target = target
        self.layer_id = layer_id
        self.dtype = dtype
        self.dropout_seeds: LoRADropoutSeeds | None = nnx.data(None)
        self.lora = nnx.LoRA(
            in_features,
            rank,
            out_features,
            dtype=dtype,
            param_dtype=param_dtype,
            a_initializer=peft_a_init,
            rngs=rngs,
            a_metadata={"logical_axes": (in_axis, None)},
            b_metadata={"logical_axes": (None, out_axis)},
        )

    @property
    def lora_a(self) -> nnx.LoRAParam:
        """A [in, rank] (PEFT's lora_A.weight transposed)."""
        return self.lora.lora_a

    @property
    def lora_b(self) -> nnx.LoRAParam:
        """B [rank, out] (PEFT's lora_B.weight transposed)."""
        return self.lora.lora_b

    def _dropped(self, x: Array) -> Array:
        if self.dropout == 0.0 or self.dropout_seeds is None:
            return x
        seeds = self.dropout_seeds[...]
        keep = 1.0 - self.dropout
        if x.ndim < 2 or x.shape[0] != seeds.shape[0]:
            raise ValueError(
                f"LoRA dropout seeds {seeds.shape} do not match the batch of input {x.shape}"
            )

        def row_mask(seed):
            key = jax.random.fold_in(jax.random.fold_in(jax.random.key(0), seed), self.layer_id)
            return jax.random.bernoulli(key, keep, x.shape[1:])

        mask = jax.vmap(row_mask)(seeds)
        return jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))

    def delta(self, x: Array) -> Array:
        """The LoRA branch scale * dropout(x) @ A @ B: [..., in] -> [..., out] in `dtype`."""
        return self.lora(self._dropped(x.astype(self.dtype))) * jnp.asarray(self.scale, self.dtype)

    def __call__(self, x: Array) -> Array:
        """[..., in] -> [..., out]: base(x) + delta(x)."""
        return self.base(x) + self.delta(x)
