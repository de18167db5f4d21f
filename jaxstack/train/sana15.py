"""SANA-1.5 model surgery and statistics: depth growth, block importance, pruning (spec sana.md §7).

    grown = grow_depth(model, 60, keep_first=18)     # 20 -> 60 blocks, partial preservation
    bi = block_importance(grown, batches)            # BI_i = 1 - E[cos(x_in^i, x_out^i)]
    pruned, removed = prune_blocks(grown, keep=40, importance=bi)

Depth growth (partial preservation): the new model keeps the first `keep_first` blocks of the
old one (SANA-1.5 kept 18 of 20, dropping the last 2), copies the embedders, the caption path
and the final layer, and appends freshly initialised blocks that are exactly the identity at
insertion. A SANA block has three residual branches, `x += g1 * attn1(.)`, `x += attn2(.)`
(ungated) and `x += g2 * ff(.)`; each new block gets the last projection of every branch
zeroed -- `attn1.to_out` (kernel and bias), `attn2.to_out` (kernel and bias) and
`ff.conv_point` (the Mix-FFN's last 1x1 conv, kernel; it has no bias) -- so every branch adds
exactly 0 whatever the gates are. Zeroing only the gates would leave the ungated
cross-attention. The zeroed projections still get non-zero gradients: each gradient is the
outer product of the branch's (non-zero) input with the upstream gradient, so the new blocks
start learning on the first step.

Block importance: BI_i = 1 - mean over tokens, examples and batches of cos(x_in^i, x_out^i),
x_in^i / x_out^i block i's input / output tokens ([B, N, D], `SanaTransformer.run_blocks`).
An identity block has BI = 0 exactly. Pruning removes the lowest-BI blocks, keeping the rest
in order; the spec's recipe then fine-tunes for about 100 steps (`jaxstack prune-dit`,
`jaxstack/train/dit_prune.py`, does both for a trained text-to-image DiT).

Every function returns a new `SanaTransformer` that shares no buffers with its source (the
copied arrays are copied on their devices, keeping their shardings; fresh block parameters
take the sharding of the source's block 0), so donating one model's buffers to a train step
never invalidates the other. The source model is not modified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.models.sana import SanaBlock, SanaTransformer

Array = jax.Array

__all__ = ["ZEROED_AT_INSERTION", "block_importance", "grow_depth", "prune_blocks"]

# The parameters (paths inside a SanaBlock) zeroed in a newly inserted block: the last
# projection of each residual branch (self-attention, cross-attention, Mix-FFN).
ZEROED_AT_INSERTION: tuple[tuple[str, ...], ...] = (
    ("attn1", "to_out", "kernel"),
    ("attn1", "to_out", "bias"),
    ("attn2", "to_out", "kernel"),
    ("attn2", "to_out", "bias"),
    ("ff", "conv_point", "kernel"),
)

_BLOCKS = "transformer_blocks"


def _param_dtype(model: SanaTransformer) -> Any:
    return model.scale_shift_table.get_value().dtype


def _assemble(
    model: SanaTransformer, sources: Sequence[int | None], *, seed: int = 0
) -> SanaTransformer:
    """A new SanaTransformer with len(sources) blocks: block j is a copy of the old block
    sources[j], or for None a fresh block with its residual branches zeroed (the identity);
    everything outside the blocks is copied."""
    cfg = dataclasses.replace(model.cfg, num_layers=len(sources))
    kw = dict(dtype=model.dtype, param_dtype=_param_dtype(model))
    graphdef, abstract = nnx.split(
        nnx.eval_shape(lambda: SanaTransformer(cfg, **kw, remat=model.remat, rngs=nnx.Rngs(0)))
    )
    old = dict(nnx.to_flat_state(nnx.state(model)))
    rngs = nnx.Rngs(seed)
    fresh: dict[int, dict[tuple, Array]] = {}
    for j, src in enumerate(sources):
        if src is None:  # built one at a time, in order: the fresh blocks depend only on seed
            block_state = nnx.state(SanaBlock(model.cfg, **kw, rngs=rngs))
            fresh[j] = {p: v.get_value() for p, v in nnx.to_flat_state(block_state)}
            for p in ZEROED_AT_INSERTION:
                fresh[j][p] = jnp.zeros_like(fresh[j][p])

    flat = []
    for path, var in nnx.to_flat_state(abstract):
        if path[0] == _BLOCKS and sources[path[1]] is None:
            value = fresh[path[1]][path[2:]]
            like = old.get((_BLOCKS, 0, *path[2:]))  # place it like the old blocks' tensors
            if like is not None:
                value = jax.device_put(value, like.get_value().sharding)
        else:
            src_path = (_BLOCKS, sources[path[1]], *path[2:]) if path[0] == _BLOCKS else path
            value = old[src_path].get_value().copy()  # own buffers, same sharding
        want = var.get_value()
        if value.shape != want.shape or value.dtype != want.dtype:
            raise ValueError(f"{path}: {value.shape} {value.dtype}, expected {want}")
        flat.append((path, var.replace(value)))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def grow_depth(
    model: SanaTransformer, num_layers: int, keep_first: int | None = None, *, seed: int = 0
) -> SanaTransformer:
    """Partial-preservation depth growth (SANA-1.5): a new model with `num_layers` blocks.

    Blocks [0, keep_first) are copies of the old blocks [0, keep_first); blocks
    [keep_first, num_layers) are fresh (`nnx.Rngs(seed)`) with the parameters in
    `ZEROED_AT_INSERTION` set to 0, so each is exactly the identity at insertion. The patch
    and timestep embedders, caption projection and norm, final modulation table and
    `proj_out` are copied; dtype, param_dtype and remat are the old model's.

    keep_first: default old depth - 2 (SANA-1.5 grew 20 -> 60 keeping the first 18); must be
    in [0, min(old depth, num_layers)]. With keep_first = old depth the grown model computes
    exactly the old model's function.
    """
    old_layers = model.cfg.num_layers
    if keep_first is None:
        keep_first = old_layers - 2
        if keep_first < 0:
            raise ValueError(
                f"the default keep_first (old depth - 2) is negative for a {old_layers}-block "
                "model; pass keep_first explicitly"
            )
    if isinstance(keep_first, bool) or not isinstance(keep_first, int | np.integer):
        raise TypeError(f"keep_first must be an int; got {keep_first!r}")
    if not isinstance(num_layers, int | np.integer) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int; got {num_layers!r}")
    if not 0 <= keep_first <= min(old_layers, num_layers):
        raise ValueError(
            f"keep_first={keep_first} must be in [0, min(old depth {old_layers}, "
            f"num_layers {num_layers})]"
        )
    sources = [*range(int(keep_first)), *([None] * (int(num_layers) - int(keep_first)))]
    return _assemble(model, sources, seed=seed)


def _block_bi_sums(model: SanaTransformer, batch: dict[str, Any]) -> tuple[Array, Array]:
    """(sum over the batch's B * N tokens of 1 - cos(x_in, x_out), per block: float32 [L],
    B * N). 1 - cos(a, b) = |a/|a| - b/|b||^2 / 2 (accurate near 0), exactly 0 when a == b."""
    _, hidden = model(**batch, return_block_io=True)
    tiny = jnp.finfo(jnp.float32).tiny

    def unit(x: Array) -> Array:
        x = x.astype(jnp.float32)
        return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), tiny))

    def one_minus_cos(x_in: Array, x_out: Array) -> Array:  # per token [B, N]
        d = 0.5 * jnp.sum(jnp.square(unit(x_in) - unit(x_out)), axis=-1)
        # XLA may reduce the two norms in different orders; equal tokens are exactly 0
        return jnp.where(jnp.all(x_in == x_out, axis=-1), 0.0, d)

    sums = [
        jnp.sum(one_minus_cos(x_in, x_out))
        for x_in, x_out in zip(hidden[:-1], hidden[1:], strict=True)
    ]
    tokens = hidden[0].shape[0] * hidden[0].shape[1]
    return jnp.stack(sums), jnp.asarray(tokens, jnp.int32)


_block_bi_sums_jit = nnx.jit(_block_bi_sums)


def block_importance(model: SanaTransformer, batches: Iterable[Mapping[str, Any]]) -> np.ndarray:
    """Block importance float64 [num_layers]: BI_i = 1 - E[cos(x_in^i, x_out^i)].

    batches: dicts of `SanaTransformer.__call__` arguments (hidden_states: noised latents
    [B, C, H, W], encoder_hidden_states [B, L, caption_channels], timestep [B],
    encoder_attention_mask [B, L] or None, guidance for guidance_embeds models); the
    expectation is the mean over every token of every example of every batch (a batch of
    more tokens weighs more), so spread prompts and timesteps over the batches. cos is over
    the hidden axis D, in float32 (a token whose input or output is all zero counts as cos 0,
    or 1 when both are). Runs jitted (under the context mesh if one is set); the block I/O
    never leaves the devices.
    """
    total, count = np.zeros(model.cfg.num_layers, np.float64), 0
    for batch in batches:
        sums, tokens = _block_bi_sums_jit(model, dict(batch))
        total += np.asarray(sums, np.float64)
        count += int(tokens)
    if count == 0:
        raise ValueError("block_importance needs at least one batch")
    return total / count


def prune_blocks(
    model: SanaTransformer,
    keep: int | None = None,
    *,
    importance: np.ndarray | Sequence[float] | None = None,
    batches: Iterable[Mapping[str, Any]] | None = None,
    remove: Sequence[int] | None = None,
) -> tuple[SanaTransformer, list[int]]:
    """(pruned model, removed block indices ascending): the model without some blocks, the
    remaining ones in their original order, everything else copied.

    Either keep: the number of blocks to keep, removing the num_layers - keep blocks of lowest
    importance (BI from `importance` [num_layers], or computed by `block_importance(model,
    batches)`; ties remove the earlier block first), or remove: the block indices to drop.
    """
    n = model.cfg.num_layers
    if (keep is None) == (remove is None):
        raise ValueError("pass exactly one of keep= and remove=")
    if remove is not None:
        if importance is not None or batches is not None:
            raise ValueError("importance= / batches= only go with keep=")
        removed = sorted({int(i) for i in remove})
        if len(removed) != len(remove) or any(not 0 <= i < n for i in removed):
            raise ValueError(f"remove={list(remove)} must be distinct block indices in [0, {n})")
    else:
        if isinstance(keep, bool) or not isinstance(keep, int | np.integer) or not 1 <= keep <= n:
            raise ValueError(f"keep={keep!r} must be an int in [1, {n}]")
        if (importance is None) == (batches is None):
            raise ValueError("with keep=, pass exactly one of importance= and batches=")
        bi = block_importance(model, batches) if importance is None else np.asarray(importance)
        if bi.shape != (n,) or not np.all(np.isfinite(bi)):
            raise ValueError(f"importance must be finite with shape ({n},); got {bi.shape}")
        removed = sorted(int(i) for i in np.argsort(bi, kind="stable")[: n - int(keep)])
    if len(removed) == n:
        raise ValueError("cannot remove every block")
    kept = [i for i in range(n) if i not in set(removed)]
    return _assemble(model, kept), removed
