"""Multimodal sequence sharding (LongVILA MM-SP): encode frames once, route tokens to SP shards.

A long-video prompt is one sequence of S tokens: text tokens and visual tokens, where the visual
tokens come in units (frames, or groups of frames after temporal pooling) of a fixed number T
of tokens each, in order. With P devices on the mesh's `sequence` axis:

1. Encoding is split at unit boundaries: device d owns units [start_d, start_d + n_d) with
   n_d = ceil(F / P) for d < F % P and floor(F / P) otherwise, so every unit is encoded exactly
   once and the vision tower runs on 1 / P of the units per device. Each device's units sit in a
   fixed-size local buffer of U = ceil(F / P) slots (the last slot is padding where n_d < U).
2. The merged sequence is padded to S_pad (a multiple of 2P) and stored in the balanced
   sequence-parallel layout of `jaxstack.parallel.sequence` ("contiguous" or "zigzag"): device
   d holds storage indices [d L, (d + 1) L), L = S_pad / P, and storage index i holds the token
   at global position `layout_positions(S_pad, P, layout)[i]`.
3. Visual tokens move from their encoding device to their storage device through one
   `all_to_all` on fixed-size buffers (or P - 1 `ppermute`s, one per device shift), each device
   gathering only the tokens the others need by static index arrays. No collective carries the
   whole sequence. Text tokens do not move: every device embeds the ids of its own slots.

`plan_mm_sharding` computes the routing (NumPy, static, from the visual-token mask, unit count,
tokens per unit, P and the layout); `shard_multimodal_embeddings` runs it. The result is
[1, S_pad, D] sharded over `sequence` in the chosen layout, plus the global positions of the
storage indices (the RoPE positions to pass to the LLM). Padding slots (positions >= S) hold
the embedding of `pad_id` and come last in position order, so causal attention over the real
tokens is unaffected.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxstack.parallel.sequence import LAYOUTS, layout_positions, shard_map

Array = jax.Array

METHODS = ("all_to_all", "ppermute")


@dataclasses.dataclass(frozen=True, eq=False)
class MMShardPlan:
    """Static routing of one multimodal prompt onto P sequence-parallel devices.

    Sizes: S seq_len (real tokens), S_pad padded_len (multiple of 2P), L = S_pad / P
    local_len, F num_units, T tokens_per_unit, U = units_per_device = ceil(F / P) (>= 1),
    N = send_len (length of every device's send and receive buffer).

    unit_counts int [P]: units owned per device (ceil / floor of F / P, larger ones first).
    unit_starts int [P]: first global unit of each device (units are split in order).
    device_units int32 [P, U]: global unit index in each device's local slot, -1 for padding.
        A device's local token buffer is its U slots flattened: [U * T, D].
    positions int32 [S_pad]: global position held at each storage index (the layout).
    is_visual bool [S_pad]: storage index holds a visual token.
    send_index int32 [P, N]: row s gathers rows of device s's local token buffer into its send
        buffer (pieces concatenated, see `pieces`; unused entries are 0).
    recv_index int32 [S_pad]: for a visual storage index on device d, the row of d's receive
        buffer holding its token (0 for text and padding).
    pieces tuple of (shift, start, size): for method "ppermute", send rows
        [start, start + size) of device s go to device (s + shift) % P and land at the same rows
        of its receive buffer (shift 0 stays local). For "all_to_all" the pieces are the P
        destinations, (d, d * C, C) with C = N / P, and receive rows [s C, (s + 1) C) come from
        source s.
    source_device, source_offset int32 [S_pad]: for visual storage indices, the device that
        encodes the token and its row in that device's local token buffer (-1 elsewhere); used
        for checks, the exchange uses send_index / recv_index.
    """

    sp: int
    layout: str
    method: str
    seq_len: int
    padded_len: int
    num_units: int
    tokens_per_unit: int
    unit_counts: np.ndarray
    unit_starts: np.ndarray
    device_units: np.ndarray
    positions: np.ndarray
    is_visual: np.ndarray
    send_index: np.ndarray
    recv_index: np.ndarray
    pieces: tuple[tuple[int, int, int], ...]
    source_device: np.ndarray
    source_offset: np.ndarray

    @property
    def local_len(self) -> int:
        return self.padded_len // self.sp

    @property
    def units_per_device(self) -> int:
        return int(self.device_units.shape[1])

    @property
    def send_len(self) -> int:
        return int(self.send_index.shape[1])

    def unit_slots(self) -> np.ndarray:
        """int32 [P * U]: global unit per slot of the sharded unit buffer (-1 = padding)."""
        return self.device_units.reshape(-1)

    def arrange_units(self, x: np.ndarray | Array) -> np.ndarray | Array:
        """[F, ...] per-unit inputs (or features) -> [P * U, ...] in device-slot order (NumPy
        in, NumPy out).

        Padding slots repeat unit 0; their outputs are never routed. Shard the result over the
        `sequence` axis on dim 0 so each device holds exactly its own units.
        """
        idx = np.maximum(self.unit_slots(), 0)
        if isinstance(x, np.ndarray):
            return x[idx]
        return jnp.take(x, jnp.asarray(idx), axis=0)

    def layout_ids(self, input_ids: np.ndarray | Array, pad_id: int = 0) -> Array:
        """Token ids [S] or [1, S] -> ids in storage order [1, S_pad] (padding = pad_id)."""
        ids = jnp.asarray(input_ids).reshape(-1)
        if ids.shape[0] != self.seq_len:
            raise ValueError(f"{ids.shape[0]} ids for a plan of seq_len={self.seq_len}")
        pad = self.padded_len - self.seq_len
        ids = jnp.concatenate([ids, jnp.full((pad,), pad_id, ids.dtype)]) if pad else ids
        return jnp.take(ids, jnp.asarray(self.positions), axis=0)[None]

    def to_layout(self, x: np.ndarray | Array, fill=0, axis: int = 0) -> Array:
        """Array with the S real positions on `axis` -> storage order (S_pad, padding = fill)."""
        x = jnp.asarray(x)
        axis = axis % x.ndim
        pad = self.padded_len - self.seq_len
        if pad:
            widths = [(0, 0)] * x.ndim
            widths[axis] = (0, pad)
            x = jnp.pad(x, widths, constant_values=fill)
        return jnp.take(x, jnp.asarray(self.positions), axis=axis)

    def from_layout(self, x: Array, axis: int = 1) -> Array:
        """Storage order (S_pad on `axis`) -> position order, cut to the S real tokens."""
        inv = np.argsort(self.positions)[: self.seq_len].astype(np.int32)
        return jnp.take(x, jnp.asarray(inv), axis=axis)


def split_units(num_units: int, sp: int) -> tuple[np.ndarray, np.ndarray]:
    """(counts [P], starts [P]): units per device, ceil(F / P) for the first F % P devices."""
    base, extra = divmod(num_units, sp)
    counts = np.asarray([base + (d < extra) for d in range(sp)], np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
    return counts, starts


def plan_mm_sharding(
    visual_mask: np.ndarray,
    num_units: int,
    tokens_per_unit: int,
    sp: int,
    layout: str = "contiguous",
    *,
    method: str = "all_to_all",
    pad_multiple: int | None = None,
) -> MMShardPlan:
    """Routing plan for one prompt (host-side NumPy; all outputs static).

    visual_mask: bool [S] (or [1, S]), True at the positions of visual tokens; the k-th True
    position holds token k % T of unit k // T (units in order), so it must count F * T.
    num_units F: frames (or pooled frame groups) in the prompt, over all videos in order.
    tokens_per_unit T: visual tokens per unit. sp P: devices on the sequence axis.
    layout: "contiguous" or "zigzag" (see `jaxstack.parallel.sequence`).
    method: "all_to_all" (one all_to_all of P equal pieces) or "ppermute" (one collective
    permute per device shift that carries tokens, each piece sized to the largest transfer
    at that shift).
    pad_multiple: S_pad is S rounded up to a multiple of lcm(2P, pad_multiple).
    """
    mask = np.asarray(visual_mask, bool).reshape(-1)
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if sp < 1 or num_units < 0 or tokens_per_unit < 1:
        raise ValueError(f"bad sizes: sp={sp}, units={num_units}, tokens={tokens_per_unit}")
    s = mask.shape[0]
    t = tokens_per_unit
    if int(mask.sum()) != num_units * t:
        raise ValueError(
            f"{int(mask.sum())} visual positions but {num_units} units x {t} tokens per unit"
        )
    multiple = 2 * sp if pad_multiple is None else math.lcm(2 * sp, pad_multiple)
    s_pad = max(multiple, -(-s // multiple) * multiple)
    local = s_pad // sp

    counts, starts = split_units(num_units, sp)
    u_max = max(1, -(-num_units // sp))
    device_units = np.full((sp, u_max), -1, np.int32)
    unit_owner = np.zeros(num_units, np.int64)
    unit_slot = np.zeros(num_units, np.int64)
    for d in range(sp):
        units = np.arange(starts[d], starts[d] + counts[d])
        device_units[d, : counts[d]] = units
        unit_owner[units] = d
        unit_slot[units] = np.arange(counts[d])

    positions = layout_positions(s_pad, sp, layout)
    real = positions < s
    is_visual = np.zeros(s_pad, bool)
    is_visual[real] = mask[positions[real]]
    rank = np.cumsum(mask) - 1  # visual rank of each position
    vis_rank = np.where(is_visual, rank[np.minimum(positions, s - 1)] if s else 0, -1)
    unit = np.where(is_visual, vis_rank // t, 0)
    src_dev = np.where(is_visual, unit_owner[unit] if num_units else 0, -1)
    src_off = np.where(is_visual, unit_slot[unit] * t + vis_rank % t if num_units else 0, -1)
    dst_dev = np.arange(s_pad) // local

    # Storage indices grouped by (source, destination), in storage order.
    routes = {
        (a, b): np.flatnonzero(is_visual & (src_dev == a) & (dst_dev == b))
        for a in range(sp)
        for b in range(sp)
    }
    recv_index = np.zeros(s_pad, np.int64)
    if method == "all_to_all":
        cap = max(1, max(len(v) for v in routes.values()))
        pieces = tuple((d, d * cap, cap) for d in range(sp))
        send_index = np.zeros((sp, sp * cap), np.int64)
        for (a, b), idx in routes.items():
            send_index[a, b * cap : b * cap + len(idx)] = src_off[idx]
            recv_index[idx] = a * cap + np.arange(len(idx))
    else:
        pieces_l = []
        start = 0
        for k in range(sp):
            size = max(len(routes[(a, (a + k) % sp)]) for a in range(sp))
            if size:
                pieces_l.append((k, start, size))
                start += size
        pieces = tuple(pieces_l)
        send_index = np.zeros((sp, max(start, 1)), np.int64)
        for k, begin, _ in pieces:
            for a in range(sp):
                b = (a + k) % sp
                idx = routes[(a, b)]
                send_index[a, begin : begin + len(idx)] = src_off[idx]
                recv_index[idx] = begin + np.arange(len(idx))

    return MMShardPlan(
        sp=sp,
        layout=layout,
        method=method,
        seq_len=s,
        padded_len=s_pad,
        num_units=num_units,
        tokens_per_unit=t,
        unit_counts=counts,
        unit_starts=starts,
        device_units=device_units,
        positions=positions.astype(np.int32),
        is_visual=is_visual,
        send_index=send_index.astype(np.int32),
        recv_index=recv_index.astype(np.int32),
        pieces=pieces,
        source_device=src_dev.astype(np.int32),
        source_offset=src_off.astype(np.int32),
    )


def _exchange(send: Array, plan: MMShardPlan, axis: str) -> Array:
    """Per-device send buffer [N, D] -> receive buffer [N, D] (inside shard_map over `axis`)."""
    if plan.sp == 1:
        return send
    if plan.method == "all_to_all":
        return lax.all_to_all(send, axis, split_axis=0, concat_axis=0, tiled=True)
    out = []
    for shift, start, size in plan.pieces:
        piece = send[start : start + size]
        if shift:
            perm = [(a, (a + shift) % plan.sp) for a in range(plan.sp)]
            piece = lax.ppermute(piece, axis, perm)
        out.append(piece)
    return jnp.concatenate(out, axis=0) if len(out) > 1 else out[0]


def shard_multimodal_embeddings(
    unit_features: Array,
    input_ids: np.ndarray | Array,
    embed_fn: Callable[[Array], Array],
    plan: MMShardPlan,
    mesh: Mesh,
    *,
    axis: str = "sequence",
    pad_id: int = 0,
) -> tuple[Array, Array]:
    """Merged prompt embeddings in the sequence-parallel layout, visual tokens moved once.

    unit_features: [P * U, T, D] encoded units in device-slot order (`plan.device_units`;
        see `MMShardPlan.arrange_units`), sharded over `axis` on dim 0, so device d holds the
        units it encoded. Padding slots may hold anything.
    input_ids: int [S] or [1, S]: the prompt's ids; used at text positions only (visual
        positions may hold any id, e.g. the media placeholder).
    embed_fn: ids int [1, S_pad] -> [1, S_pad, D] (e.g. `llm.embed`); applied to the ids in
        storage order, sharded over `axis`, so each device embeds its own text slots.
    Returns (embeddings [1, S_pad, D] in embed_fn's dtype, sharded over `axis` in
    `plan.layout`; positions int32 [1, S_pad], the global position of each storage index).
    Inside shard_map each device gathers the rows others need into a buffer of
    `plan.send_len` rows, exchanges it (`plan.method`) and picks its visual tokens out of the
    received rows; the only collective is that exchange.
    """
    sp = int(mesh.shape[axis]) if axis in mesh.axis_names else 1
    if sp != plan.sp:
        raise ValueError(f"plan is for {plan.sp} devices but mesh axis {axis!r} has {sp}")
    p_u = plan.sp * plan.units_per_device
    if unit_features.ndim != 3 or unit_features.shape[:2] != (p_u, plan.tokens_per_unit):
        raise ValueError(
            f"unit_features {unit_features.shape}: expected [{p_u}, {plan.tokens_per_unit}, D]"
        )
    seq = NamedSharding(mesh, P(None, axis))
    ids = lax.with_sharding_constraint(plan.layout_ids(input_ids, pad_id), seq)
    text = embed_fn(ids)
    d = unit_features.shape[-1]
    if text.shape != (1, plan.padded_len, d):
        raise ValueError(f"embed_fn gave {text.shape}, expected (1, {plan.padded_len}, {d})")

    def body(feats, text_l, send_idx, recv_idx, vis):
        flat = feats.reshape(-1, feats.shape[-1])  # [U * T, D]: this device's units
        send = jnp.take(flat, send_idx[0], axis=0)  # [N, D]
        recv = _exchange(send, plan, axis)
        tokens = jnp.take(recv, recv_idx, axis=0).astype(text_l.dtype)  # [L, D]
        return jnp.where(vis[None, :, None], tokens[None], text_l)

    fn = shard_map(
        body,
        mesh,
        in_specs=(P(axis), P(None, axis), P(axis), P(axis), P(axis)),
        out_specs=P(None, axis),
    )
    out = fn(
        unit_features,
        text,
        jnp.asarray(plan.send_index),
        jnp.asarray(plan.recv_index),
        jnp.asarray(plan.is_visual),
    )
    return out, jnp.asarray(plan.positions)[None]


def merged_reference(
    unit_features: Array,
    input_ids: np.ndarray | Array,
    embed_fn: Callable[[Array], Array],
    visual_mask: np.ndarray,
) -> Array:
    """Single-device merged sequence [1, S, D] (units [F, T, D] in order at the visual
    positions, embed_fn(ids) elsewhere): what `shard_multimodal_embeddings` equals after
    `plan.from_layout`."""
    ids = jnp.asarray(input_ids).reshape(1, -1)
    text = embed_fn(ids)
    mask = np.asarray(visual_mask, bool).reshape(-1)
    if not mask.any():
        return text
    flat = unit_features.reshape(-1, unit_features.shape[-1]).astype(text.dtype)
    return text.at[0, np.flatnonzero(mask)].set(flat)


__all__ = [
    "METHODS",
    "MMShardPlan",
    "merged_reference",
    "plan_mm_sharding",
    "shard_multimodal_embeddings",
    "split_units",
]
