"""Sequence parallelism for long contexts (LongVILA MM-SP): Ulysses, ring and 2D hybrid attention.

q, k, v are laid out [B, S, heads, H] (as `jax.nn.dot_product_attention`) with S sharded over
the mesh's `sequence` axis. `sequence_parallel_attention` runs one of:

- "ulysses": all_to_all sequence shards -> head shards, full-sequence attention on 1/P of the
  heads through `jaxstack.nn.attention.dot_product_attention` (cuDNN on GPU), all_to_all back.
  KV heads are repeated when P does not divide them (GQA with few KV heads).
- "ring": each device keeps its query block; K/V blocks (with their positions and segment ids)
  travel around the ring with `ppermute`; partial results are merged online by log-sum-exp.
  The backward pass is a second ring pass (custom_vjp) that uses the global output and
  log-sum-exp: dq accumulates locally, dk/dv travel with their blocks and arrive home after P
  steps. Two rings:
  * the static-mask ring, for the common case without segment ids (causal in the zigzag or
    contiguous layout, or bidirectional in any layout): every step is one whole-block call
    with a static mask kind (causal on the own block, otherwise no mask on a whole block or
    a half of it, or nothing), picked at run time by `lax.cond` on the ring step and axis
    index. Its blocks are cuDNN flash attention with explicit softmax statistics on GPU
    (bf16/fp16), or their dense float32 twins elsewhere
    (`pallas_kernels.flash_attention.cudnn_blocks`);
  * the general ring (token positions and segment ids travel with K/V), whose per-block
    math is `pallas_kernels.flash_attention` (GPU kernel or reference), for everything else.
- "2d": the P = R x U sequence devices form R ring groups of U consecutive devices (Ulysses
  inside a node, ring across nodes, as LongVILA's `use_ulysses_low`): all_to_all inside each
  Ulysses group, ring attention across the groups, all_to_all back.

2D on one axis: `make_mesh` keeps its four standard axes, so for "2d" the P = R x U devices of
the `sequence` axis are grouped in place: device d is Ulysses rank d % U of group d // U. The
Ulysses all_to_all runs inside each group (`axis_index_groups`) and R-member rings link the
devices with the same Ulysses rank (device d sends to d + U), so no second mesh is needed and
the mesh stays JAX's context mesh (the collectives are those of the [R, U] view that
`split_sequence_mesh` builds). A caller whose mesh already has two sequence axes passes
`ring_axis=` and `ulysses_axis=` instead.

The mesh: `sequence_parallel_attention(mesh=None)` uses JAX's context mesh (`jax.set_mesh`);
models choose sequence-parallel attention when that mesh has sequence > 1 and
`use_sequence_parallel` has not disabled it (`sequence_parallel_size`). Both are part of jit's
cache key: the mesh context by JAX, the options through `jax.make_user_context`.

Layouts: "contiguous" (device d holds tokens [d S/P, (d+1) S/P)) or "zigzag" (the sequence is
cut into 2P chunks and device d holds chunks d and 2P-1-d, which balances causal work). Global
token positions follow the layout, so causal masks stay right in every mode; use
`to_zigzag`/`from_zigzag` to move arrays between the layouts.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import AbstractMesh, Mesh
from jax.sharding import PartitionSpec as P

from jaxstack.nn.attention import dot_product_attention
from jaxstack.parallel.mesh import context_mesh
from pallas_kernels.flash_attention import get_block_fns, merge_partials

Array = jax.Array

MODES = ("ulysses", "ring", "2d")
LAYOUTS = ("contiguous", "zigzag")
RING_SUFFIX, ULYSSES_SUFFIX = "_ring", "_ulysses"


# -- layouts ----------------------------------------------------------------------------------


def zigzag_permutation(seq_len: int, sp: int) -> np.ndarray:
    """int32 [seq_len]: position held at each storage index of the zigzag layout.

    The sequence is cut into 2 * sp chunks; rank r holds chunks r and 2 sp - 1 - r, so
    `x_zigzag = x[perm]` and storage index i holds the token at position perm[i].
    """
    if seq_len % (2 * sp):
        raise ValueError(f"zigzag layout needs seq_len={seq_len} divisible by 2*sp={2 * sp}")
    c = seq_len // (2 * sp)
    order = [j for r in range(sp) for j in (r, 2 * sp - 1 - r)]
    return np.concatenate([np.arange(j * c, (j + 1) * c) for j in order]).astype(np.int32)


def to_zigzag(x: Array, axis: int, sp: int) -> Array:
    """Reorder `x` along `axis` (length S, positions 0..S-1) into the zigzag layout."""
    return jnp.take(x, zigzag_permutation(x.shape[axis], sp), axis=axis)


def from_zigzag(x: Array, axis: int, sp: int) -> Array:
    """Inverse of `to_zigzag`: zigzag storage order back to position order along `axis`."""
    inv = np.argsort(zigzag_permutation(x.shape[axis], sp)).astype(np.int32)
    return jnp.take(x, inv, axis=axis)


def layout_positions(seq_len: int, sp: int, layout: str) -> np.ndarray:
    """int32 [seq_len]: global token position at each storage index for `layout`."""
    if layout == "contiguous":
        return np.arange(seq_len, dtype=np.int32)
    if layout == "zigzag":
        return zigzag_permutation(seq_len, sp)
    raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")


# -- options used by the models ---------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class SequenceParallelOptions:
    """How models route attention when the context mesh has sequence > 1.

    mode: "auto" (Ulysses when the query heads divide by the sequence size, else 2D with the
    largest Ulysses group the heads allow, else ring), or one of MODES.
    ulysses_size: Ulysses group size for "2d" (default: chosen as in "auto").
    implementation: block implementation for the ring (None = best available; "cudnn" /
    "dense" force the static-mask ring, "reference" / "pallas_triton" the general ring).
    layout: how the LLM stores the sequence on the devices: "contiguous", or "zigzag" (the
    model permutes token ids, positions and segment ids into zigzag order before embedding
    and its hidden states back at the end, so callers see position order; balances causal
    ring work).
    enabled: False runs dense attention even on a mesh with sequence > 1 (XLA then gathers
    the sequence; e.g. for attention patterns the sequence-parallel paths do not take).
    """

    mode: str = "auto"
    ulysses_size: int | None = None
    implementation: str | None = None
    layout: str = "contiguous"
    enabled: bool = True


# The options live in a jit-cache-keyed context (jax.make_user_context): a function traced
# under one setting is traced again under another. Older jax: a plain context variable.
_make_user_context = getattr(jax, "make_user_context", None)
if _make_user_context is not None:
    _OPTIONS = _make_user_context(default_value=None)

    def _get_options() -> SequenceParallelOptions | None:
        return _OPTIONS.value

    def _options_context(options: SequenceParallelOptions):
        return _OPTIONS(options)

else:  # pragma: no cover - jax without user contexts
    _OPTIONS_VAR: contextvars.ContextVar[SequenceParallelOptions | None] = contextvars.ContextVar(
        "sequence_parallel_options", default=None
    )

    def _get_options() -> SequenceParallelOptions | None:
        return _OPTIONS_VAR.get()

    @contextlib.contextmanager
    def _options_context(options: SequenceParallelOptions):
        token = _OPTIONS_VAR.set(options)
        try:
            yield
        finally:
            _OPTIONS_VAR.reset(token)


@contextlib.contextmanager
def use_sequence_parallel(
    mode: str = "auto",
    ulysses_size: int | None = None,
    implementation: str | None = None,
    layout: str = "contiguous",
    *,
    enabled: bool = True,
) -> Iterator[SequenceParallelOptions]:
    """Set the sequence-parallel options read by models traced inside this context.

    Part of jit's cache key (like `jax.set_mesh`): enter it around the jitted call, not
    inside the traced function. enabled=False: dense attention even when the mesh has
    sequence > 1.
    """
    if mode not in ("auto", *MODES):
        raise ValueError(f"unknown sequence-parallel mode {mode!r}; choose auto or {MODES}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    options = SequenceParallelOptions(mode, ulysses_size, implementation, layout, bool(enabled))
    with _options_context(options):
        yield options


def sequence_parallel_options() -> SequenceParallelOptions:
    """The options set by the innermost `use_sequence_parallel` (defaults outside one)."""
    return _get_options() or SequenceParallelOptions()


def sequence_parallel_size(mesh: Mesh | AbstractMesh | None = None, axis: str = "sequence") -> int:
    """Devices that sequence-parallel attention spans: the size of `axis` in `mesh` (default:
    the context mesh), or 1 with no mesh, no such axis, or `use_sequence_parallel(enabled=False)`.

    Models run sequence-parallel attention exactly when this is > 1.
    """
    mesh = context_mesh() if mesh is None else mesh
    if mesh is None or axis not in mesh.axis_names or not sequence_parallel_options().enabled:
        return 1
    return int(mesh.shape[axis])


def choose_mode(num_heads: int, sp: int, ulysses_size: int | None = None) -> tuple[str, int]:
    """("ulysses" | "2d" | "ring", ulysses group size) for `num_heads` query heads over sp devices."""
    if ulysses_size is not None:
        if ulysses_size in (1, sp):
            return ("ring", 1) if ulysses_size == 1 else ("ulysses", sp)
        return "2d", ulysses_size
    if num_heads % sp == 0:
        return "ulysses", sp
    u = max(d for d in range(1, sp + 1) if sp % d == 0 and num_heads % d == 0)
    return ("2d", u) if u > 1 else ("ring", 1)


# -- shard_map across jax versions ------------------------------------------------------------


def shard_map(f: Callable, mesh: Mesh | AbstractMesh | None, in_specs, out_specs) -> Callable:
    """`jax.shard_map(f, ...)` without replication checks, on every supported jax.

    f is per-device code: it sees its shard of each argument (per `in_specs`) and returns its
    shard of the result (per `out_specs`); inside it every mesh axis is manual, so
    `constrain` is a no-op there. mesh: a `Mesh`, an `AbstractMesh` (inside jit), or None for
    the context mesh (`jax.set_mesh`). Falls back to `jax.experimental.shard_map` on jax
    without `jax.shard_map`; passes check_vma=False (check_rep=False on older jax).
    """
    sm = getattr(jax, "shard_map", None)
    if sm is None:  # older jax
        from jax.experimental.shard_map import shard_map as sm
    if mesh is None:
        mesh = context_mesh()
        if mesh is None:
            raise ValueError("shard_map needs a mesh: pass one or set it with jax.set_mesh")
    params = inspect.signature(sm).parameters
    check = {"check_vma": False} if "check_vma" in params else {"check_rep": False}
    return sm(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **check)


def split_sequence_mesh(mesh: Mesh, axis: str, ulysses_size: int) -> tuple[Mesh, str, str]:
    """(mesh view, ring axis, Ulysses axis): `axis` of size R*U reshaped into [R, U].

    Same devices in the same order; Ulysses groups are U consecutive devices of `axis`. For
    callers that want two sequence axes (`ring_axis=`, `ulysses_axis=`); "2d" with
    `ulysses_size` does not build this view (it groups the devices of one axis in place), so
    it works under JAX's mesh context, whose mesh a shard_map must match.
    """
    names = list(mesh.axis_names)
    i = names.index(axis)
    size = mesh.shape[axis]
    if ulysses_size < 1 or size % ulysses_size:
        raise ValueError(f"ulysses_size={ulysses_size} does not divide {axis}={size}")
    devices = np.asarray(mesh.devices)
    shape = devices.shape[:i] + (size // ulysses_size, ulysses_size) + devices.shape[i + 1 :]
    ring, uly = axis + RING_SUFFIX, axis + ULYSSES_SUFFIX
    names[i : i + 1] = [ring, uly]
    return Mesh(devices.reshape(shape), tuple(names)), ring, uly


# -- ring attention (custom_vjp) --------------------------------------------------------------


def _rotate(tree, axis_name: str, size: int, stride: int = 1):
    """Send every leaf to the next device of the ring.

    The ring has `size` members spaced `stride` apart on `axis_name` (of size size * stride):
    device i -> i + stride (mod size * stride); stride > 1 runs `stride` interleaved rings, one
    per position inside the Ulysses groups of "2d".
    """
    n = size * stride
    perm = [(i, (i + stride) % n) for i in range(n)]
    return jax.tree.map(lambda x: lax.ppermute(x, axis_name, perm), tree)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9, 10))
def _ring(q, k, v, pos, seg, axis_name, size, stride, causal, scale, implementation):
    args = (axis_name, size, stride, causal, scale, implementation)
    return _ring_fwd(q, k, v, pos, seg, *args)[0]


def _ring_fwd(q, k, v, pos, seg, axis_name, size, stride, causal, scale, implementation):
    fwd, _ = get_block_fns(implementation)

    def block(kv):
        k_, v_, pos_, seg_ = kv
        return fwd(
            q,
            k_,
            v_,
            q_positions=pos,
            kv_positions=pos_,
            causal=causal,
            q_segment_ids=seg,
            kv_segment_ids=seg_,
            scale=scale,
        )

    def merge(out, lse, kv):
        out_i, lse_i = block(kv)
        return merge_partials(out, lse, out_i.astype(jnp.float32), lse_i)

    def step(carry, _):
        out, lse, kv = carry
        next_kv = _rotate(kv, axis_name, size, stride)  # independent of this block: overlaps
        out, lse = merge(out, lse, kv)
        return (out, lse, next_kv), None

    # P blocks, P - 1 hops: compute block i while block i + 1 is in flight.
    kv = (k, v, pos, seg)
    out, lse = block(kv)
    out = out.astype(jnp.float32)
    if size > 1:
        kv = _rotate(kv, axis_name, size, stride)
        if size > 2:
            (out, lse, kv), _ = lax.scan(step, (out, lse, kv), None, length=size - 2)
        out, lse = merge(out, lse, kv)
    out = out.astype(q.dtype)
    return out, (q, k, v, pos, seg, out, lse)


def _ring_bwd(axis_name, size, stride, causal, scale, implementation, res, dout):
    q, k, v, pos, seg, out, lse = res
    _, bwd = get_block_fns(implementation)

    def block(kv):
        k_, v_, pos_, seg_ = kv
        return bwd(
            q,
            k_,
            v_,
            out,
            lse,
            dout,
            q_positions=pos,
            kv_positions=pos_,
            causal=causal,
            q_segment_ids=seg,
            kv_segment_ids=seg_,
            scale=scale,
        )

    def accumulate(kv, dq, dkv):
        dq_i, dk_i, dv_i = block(kv)
        dk, dv = dkv
        f32 = lambda x: x.astype(jnp.float32)
        return dq + f32(dq_i), (dk + f32(dk_i), dv + f32(dv_i))

    def step(carry, _):
        kv, dq, dkv = carry
        dq, dkv = accumulate(kv, dq, dkv)
        kv, dkv = _rotate((kv, dkv), axis_name, size, stride)
        return (kv, dq, dkv), None

    kv = (k, v, pos, seg)
    dq = jnp.zeros(q.shape, jnp.float32)
    dkv = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    if size > 1:
        (kv, dq, dkv), _ = lax.scan(step, (kv, dq, dkv), None, length=size - 1)
    dq, dkv = accumulate(kv, dq, dkv)
    dk, dv = _rotate(dkv, axis_name, size, stride) if size > 1 else dkv  # the P-th hop: home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_ring.defvjp(_ring_fwd, _ring_bwd)


def ring_attention_shard(
    q: Array,
    k: Array,
    v: Array,
    positions: Array,
    segment_ids: Array | None,
    *,
    axis_name: str,
    axis_size: int,
    causal: bool,
    scale: float | None = None,
    implementation: str | None = None,
    axis_stride: int = 1,
) -> Array:
    """Ring attention on one device's shard, inside shard_map over `axis_name`.

    q [B, T, Nq, H]; k, v [B, T, Nkv, H]: this device's tokens; positions int32 [T] their global
    positions; segment_ids int32 [B, T] or None. The ring is `axis_size` devices spaced
    `axis_stride` apart on `axis_name` (see `_rotate`). Returns [B, T, Nq, H] in q.dtype.
    """
    args = (axis_name, axis_size, axis_stride, causal, scale, implementation)
    return _ring(q, k, v, positions, segment_ids, *args)


# -- static-mask ring (whole blocks, cuDNN or dense) -------------------------------------------

# Block kinds of the static-mask ring: what a KV block from rank j does to rank r's queries.
#   "full": bidirectional, any layout: every step is a whole no-mask block.
#   "zigzag": causal in the zigzag layout (local sequence = [chunk r, chunk 2P-1-r]):
#       j == r: top-left causal on the local concatenation;
#       j <  r: all local queries vs the first half of the KV block, no mask;
#       j >  r: the second half of the local queries vs the whole KV block, no mask.
#   "contiguous": causal in the contiguous layout: j == r causal, j < r whole block no mask,
#       j > r nothing.
STATIC_KINDS = ("full", "zigzag", "contiguous")
# implementation names that select the static-mask ring and its block functions
STATIC_IMPLEMENTATIONS = ("cudnn", "dense")


def _static_block_fns(implementation: str):
    """(fwd, bwd) whole-block functions `(q, k, v, *, causal, scale)` of a static ring."""
    from pallas_kernels.flash_attention import cudnn_blocks

    if implementation == "cudnn":
        return cudnn_blocks.cudnn_block_fwd, cudnn_blocks.cudnn_block_bwd
    if implementation == "dense":
        return cudnn_blocks.dense_block_fwd, cudnn_blocks.dense_block_bwd
    raise ValueError(f"no static-ring blocks {implementation!r}; choose {STATIC_IMPLEMENTATIONS}")


def static_ring_kind(causal: bool, layout: str, has_segments: bool) -> str | None:
    """The static ring's block kind for this case, or None when only the general ring fits."""
    if has_segments:
        return None
    if not causal:
        return "full"
    return layout if layout in ("zigzag", "contiguous") else None


def _f32(x: Array) -> Array:
    return x.astype(jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6, 7, 8))
def _static_ring(q, k, v, axis_name, size, stride, kind, scale, implementation):
    args = (axis_name, size, stride, kind, scale, implementation)
    return _static_ring_fwd(q, k, v, *args)[0]


def _static_ring_fwd(q, k, v, axis_name, size, stride, kind, scale, implementation):
    fwd, _ = _static_block_fns(implementation)
    c = q.shape[1] // 2
    rank = lax.axis_index(axis_name) // stride

    def merge(out, lse, out_i, lse_i):
        return merge_partials(out, lse, _f32(out_i), lse_i)

    def whole(out, lse, k_, v_):
        return merge(out, lse, *fwd(q, k_, v_, causal=False, scale=scale))

    def visit(s, out, lse, kv):
        """Merge the KV block that arrived at ring step s >= 1 (from rank `rank - s`)."""
        k_, v_ = kv
        if kind == "full":
            return whole(out, lse, k_, v_)
        earlier = s <= rank  # the block comes from rank j = rank - s >= 0, i.e. j < rank
        if kind == "contiguous":
            return lax.cond(earlier, lambda: whole(out, lse, k_, v_), lambda: (out, lse))

        def early():  # all queries vs the KV block's first chunk
            return merge(out, lse, *fwd(q, k_[:, :c], v_[:, :c], causal=False, scale=scale))

        def late():  # the second query chunk vs the whole KV block
            o2, l2 = merge(
                out[:, c:], lse[..., c:], *fwd(q[:, c:], k_, v_, causal=False, scale=scale)
            )
            return (
                jnp.concatenate([out[:, :c], o2], axis=1),
                jnp.concatenate([lse[..., :c], l2], axis=-1),
            )

        return lax.cond(earlier, early, late)

    def step(carry, s):
        out, lse, kv = carry
        next_kv = _rotate(kv, axis_name, size, stride)  # independent of this block: overlaps
        out, lse = visit(s, out, lse, kv)
        return (out, lse, next_kv), None

    kv = (k, v)
    out, lse = fwd(q, k, v, causal=kind != "full", scale=scale)
    out = _f32(out)
    if size > 1:
        kv = _rotate(kv, axis_name, size, stride)
        if size > 2:
            steps = jnp.arange(1, size - 1, dtype=jnp.int32)
            (out, lse, kv), _ = lax.scan(step, (out, lse, kv), steps)
        out, lse = visit(size - 1, out, lse, kv)
    out = out.astype(q.dtype)
    return out, (q, k, v, out, lse)


def _static_ring_bwd(axis_name, size, stride, kind, scale, implementation, res, dout):
    q, k, v, out, lse = res
    _, bwd = _static_block_fns(implementation)
    c = q.shape[1] // 2
    rank = lax.axis_index(axis_name) // stride

    def add(acc, grads):
        return tuple(a + _f32(g) for a, g in zip(acc, grads))

    def whole(acc, k_, v_):
        return add(acc, bwd(q, k_, v_, out, lse, dout, causal=False, scale=scale))

    def visit(s, acc, kv):
        """Add the gradients of the KV block held at ring step s >= 1 (from rank `rank - s`)."""
        k_, v_ = kv
        if kind == "full":
            return whole(acc, k_, v_)
        earlier = s <= rank
        if kind == "contiguous":
            return lax.cond(earlier, lambda: whole(acc, k_, v_), lambda: acc)

        def early():
            dq, dk, dv = acc
            dq_i, dk_i, dv_i = bwd(
                q, k_[:, :c], v_[:, :c], out, lse, dout, causal=False, scale=scale
            )
            return dq + _f32(dq_i), dk.at[:, :c].add(_f32(dk_i)), dv.at[:, :c].add(_f32(dv_i))

        def late():
            dq, dk, dv = acc
            dq_i, dk_i, dv_i = bwd(
                q[:, c:], k_, v_, out[:, c:], lse[..., c:], dout[:, c:], causal=False, scale=scale
            )
            return dq.at[:, c:].add(_f32(dq_i)), dk + _f32(dk_i), dv + _f32(dv_i)

        return lax.cond(earlier, early, late)

    # dq stays here; (dk, dv) travel with their KV block and arrive home after P hops.
    acc = bwd(q, k, v, out, lse, dout, causal=kind != "full", scale=scale)
    dq, dk, dv = (_f32(g) for g in acc)

    def step(carry, s):
        kv, dq, dkv = carry
        next_kv = _rotate(kv, axis_name, size, stride)  # KV does not depend on this step: overlaps
        dq, *dkv = visit(s, (dq, *dkv), kv)
        return (next_kv, dq, _rotate(tuple(dkv), axis_name, size, stride)), None

    if size > 1:
        kv, dkv = _rotate(((k, v), (dk, dv)), axis_name, size, stride)
        if size > 2:
            steps = jnp.arange(1, size - 1, dtype=jnp.int32)
            (kv, dq, dkv), _ = lax.scan(step, (kv, dq, dkv), steps)
        dq, dk, dv = visit(size - 1, (dq, *dkv), kv)
        dk, dv = _rotate((dk, dv), axis_name, size, stride)  # the P-th hop: home
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


_static_ring.defvjp(_static_ring_fwd, _static_ring_bwd)


def static_ring_attention_shard(
    q: Array,
    k: Array,
    v: Array,
    *,
    axis_name: str,
    axis_size: int,
    kind: str,
    scale: float | None = None,
    implementation: str = "cudnn",
    axis_stride: int = 1,
) -> Array:
    """Ring attention whose steps are whole blocks with a static mask (inside shard_map).

    q [B, T, Nq, H]; k, v [B, T, Nkv, H]: this device's tokens, no segment ids. kind (see
    `STATIC_KINDS`): "full" (bidirectional, any layout), "zigzag" (causal; the local
    sequence is [chunk r, chunk 2P-1-r] of the 2P chunks of the ring's sequence, each in
    position order; T even) or "contiguous" (causal; rank r holds the r-th contiguous
    block). implementation: "cudnn" (GPU, bf16/fp16) or "dense" (pure JAX, anywhere). The
    ring is `axis_size` devices spaced `axis_stride` apart on `axis_name` (rank = axis index
    // stride; see `_rotate`). Returns [B, T, Nq, H] in q.dtype.
    """
    if kind not in STATIC_KINDS:
        raise ValueError(f"unknown static ring kind {kind!r}; choose {STATIC_KINDS}")
    if kind == "zigzag" and q.shape[1] % 2:
        raise ValueError(f"zigzag static ring needs an even local length, got {q.shape[1]}")
    args = (axis_name, axis_size, axis_stride, kind, scale, implementation)
    return _static_ring(q, k, v, *args)


def group_zigzag_order(local_len: int, ulysses_size: int) -> np.ndarray:
    """int32 [local_len]: storage order that turns a Ulysses group's gathered zigzag sequence
    into the ring's zigzag halves.

    With a zigzag layout over P = R * U devices, Ulysses rank u of ring group g holds chunks
    gU + u and 2P-1-gU-u; after the all_to_all the group's local sequence is those pairs in
    u order. Its first chunks (u = 0..U-1) form ring chunk g and its second chunks in reverse
    u order form ring chunk 2R-1-g, so `x[:, order]` is [ring chunk g, ring chunk 2R-1-g],
    each in position order: the zigzag layout of the R-device ring.
    """
    c = local_len // (2 * ulysses_size)
    first = [np.arange(u * 2 * c, u * 2 * c + c) for u in range(ulysses_size)]
    second = [np.arange(u * 2 * c + c, (u + 1) * 2 * c) for u in reversed(range(ulysses_size))]
    return np.concatenate(first + second).astype(np.int32)


def resolve_ring(
    implementation: str | None, dtype, causal: bool, layout: str, has_segments: bool
) -> tuple[str | None, str | None]:
    """(static kind, static blocks) for the static ring, or (None, block implementation) for
    the general ring.

    implementation None: the static ring when the case allows it (no segment ids; causal with
    the zigzag or contiguous layout, or bidirectional) with cuDNN blocks on GPU for bf16/fp16
    inputs, dense blocks off GPU; otherwise the general ring with the best block kernel.
    "cudnn" / "dense" force the static ring (error when the case does not allow it); the
    general ring's names ("reference", "pallas_triton") force the general ring.
    """
    kind = static_ring_kind(causal, layout, has_segments)
    if implementation in STATIC_IMPLEMENTATIONS:
        if kind is None:
            raise ValueError(
                f"implementation {implementation!r} (static-mask ring) needs no segment ids and "
                f"a bidirectional, zigzag or contiguous case; got causal={causal} "
                f"layout={layout!r} segments={has_segments}"
            )
        return kind, implementation
    if implementation is not None or kind is None:
        return None, implementation
    if jax.default_backend() == "gpu":
        from pallas_kernels.flash_attention.cudnn_blocks import cudnn_available

        if jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and cudnn_available():
            return kind, "cudnn"
        return None, None
    return kind, "dense"


# -- Ulysses pieces ---------------------------------------------------------------------------


def _kv_repeat(num_heads: int, num_kv_heads: int, size: int) -> int:
    """Factor to repeat KV heads by so that `size` divides them (GQA grouping preserved)."""
    if num_heads % size:
        raise ValueError(
            f"Ulysses over {size} devices needs the query heads per device ({num_heads}) "
            "divisible by it; use mode 'ring' or '2d' with a smaller ulysses_size"
        )
    return size // math.gcd(num_kv_heads, size)


def _seq_to_heads(x: Array, axis_name: str, groups=None) -> Array:
    """[B, T/U, N, H] sequence shard -> [B, T, N/U, H] head shard (all_to_all over the group:
    the whole axis, or each list of axis indices in `groups`)."""
    return lax.all_to_all(
        x, axis_name, split_axis=2, concat_axis=1, tiled=True, axis_index_groups=groups
    )


def _heads_to_seq(x: Array, axis_name: str, groups=None) -> Array:
    """[B, T, N/U, H] head shard -> [B, T/U, N, H] sequence shard."""
    return lax.all_to_all(
        x, axis_name, split_axis=1, concat_axis=2, tiled=True, axis_index_groups=groups
    )


def _local_attention(q, k, v, seg, *, causal, layout, sp, scale):
    """Full-sequence attention on gathered heads; q/k/v [B, S, n, H] in storage order."""
    perm = layout_positions(q.shape[1], sp, layout)
    zig = layout == "zigzag"
    if zig:  # back to position order so the causal mask is the plain one (cuDNN's is_causal)
        inv = np.argsort(perm).astype(np.int32)
        q, k, v = (jnp.take(x, inv, axis=1) for x in (q, k, v))
        seg = None if seg is None else jnp.take(seg, inv, axis=1)
    mask = None if seg is None else (seg[:, :, None] == seg[:, None, :])[:, None]
    out = dot_product_attention(q, k, v, mask=mask, causal=causal, scale=scale)
    return jnp.take(out, perm, axis=1) if zig else out


# -- entry point ------------------------------------------------------------------------------


def _batch_and_head_axes(
    mesh: Mesh, batch: int, nq: int, nkv: int, used: set[str]
) -> tuple[str | tuple[str, ...] | None, str | None]:
    """(batch spec, head axis) for the shard_map specs: batch over the data/fsdp axes that
    divide it, heads over "tensor" when it divides both Nq and Nkv (else replicated)."""
    b_axes = tuple(
        a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1 and a not in used
    )
    if b_axes and batch % math.prod(mesh.shape[a] for a in b_axes):
        b_axes = ()
    h_axis = None
    if "tensor" in mesh.axis_names and "tensor" not in used:
        tp = mesh.shape["tensor"]
        if tp > 1 and nq % tp == 0 and nkv % tp == 0:
            h_axis = "tensor"
    b_spec = None if not b_axes else (b_axes[0] if len(b_axes) == 1 else b_axes)
    return b_spec, h_axis


def sequence_parallel_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    mesh: Mesh | AbstractMesh | None = None,
    mode: str = "auto",
    causal: bool,
    segment_ids: Array | None = None,
    ring_axis: str = "sequence",
    ulysses_axis: str | None = None,
    ulysses_size: int | None = None,
    layout: str = "contiguous",
    scale: float | None = None,
    implementation: str | None = None,
) -> Array:
    """Attention with the sequence sharded over the mesh (global view in, global view out).

    q [B, S, Nq, H]; k, v [B, S, Nkv, H] (Nq % Nkv == 0), S sharded over `ring_axis` in the
    given `layout` ("contiguous" or "zigzag"; positions follow the layout). segment_ids int
    [B, S] (packed sequences attend within equal ids), same layout. Returns [B, S, Nq, H] in
    q.dtype, sharded like q, equal to single-device attention on the un-permuted sequence.

    mode: "ulysses" | "ring" over `ring_axis` (the mesh's sequence axis), "2d", or "auto"
    (Ulysses when the query heads per device divide by the sequence size, else 2D with the
    largest Ulysses group they allow, else ring; see `choose_mode`). For "2d",
    either `ulysses_axis` names a second mesh axis (sequence sharded over (ring_axis,
    ulysses_axis), Ulysses inner), or `ulysses_size` splits `ring_axis` into ring groups of
    that many consecutive devices (see the module docstring).
    mesh: a `Mesh`, or the `AbstractMesh` seen inside jit; default the context mesh
    (`jax.set_mesh`).
    Batch is kept sharded over "data"/"fsdp" and heads over "tensor" when those axes divide.
    implementation: the ring's blocks. None: the static-mask ring when the case allows it (no
    segment ids; causal with a zigzag or contiguous layout, or bidirectional) with cuDNN
    blocks on GPU for bf16/fp16 (dense blocks off GPU), else the general ring with the best
    block kernel. "cudnn" / "dense" force the static-mask ring (error if the case does not
    allow it); "reference" / "pallas_triton" force the general ring with that kernel.
    In "2d" with the zigzag layout the Ulysses group's gathered sequence is reordered
    locally into the ring's zigzag halves (`group_zigzag_order`) and back.
    """
    if mode not in ("auto", *MODES):
        raise ValueError(f"unknown sequence-parallel mode {mode!r}; choose auto or {MODES}")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose from {LAYOUTS}")
    if q.ndim != 4 or k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[2] % k.shape[2]:
        raise ValueError(f"need q [B,S,Nq,H], k/v [B,S,Nkv,H], Nq % Nkv == 0: {q.shape} {k.shape}")
    mesh = context_mesh() if mesh is None else mesh
    if mesh is None:
        raise ValueError("no mesh: pass mesh= or set one with jax.set_mesh(mesh)")
    if ring_axis not in mesh.axis_names:
        raise ValueError(f"mesh axes {mesh.axis_names} have no sequence axis {ring_axis!r}")
    b, s, nq, _ = q.shape
    nkv = k.shape[2]
    if mode == "auto":
        _, h_axis = _batch_and_head_axes(mesh, b, nq, nkv, {ring_axis})
        local_heads = nq // (mesh.shape[h_axis] if h_axis else 1)
        mode, size = choose_mode(local_heads, int(mesh.shape[ring_axis]), ulysses_size)
        ulysses_size = size if mode == "2d" else None

    # The ring: (axis, members, stride); Ulysses: (axis, group size, axis index groups).
    ring: tuple[str, int, int] | None = None
    uly: tuple[str, int, list[list[int]] | None] | None = None
    seq_axes: tuple[str, ...] = (ring_axis,)
    p_ring = int(mesh.shape[ring_axis])
    if mode == "ulysses":
        uly = (ring_axis, p_ring, None)
    elif mode == "ring":
        ring = (ring_axis, p_ring, 1)
    elif ulysses_axis is not None:  # "2d" over two mesh axes, Ulysses inner
        if ulysses_axis not in mesh.axis_names:
            raise ValueError(f"mesh axes {mesh.axis_names} have no Ulysses axis {ulysses_axis!r}")
        ring = (ring_axis, p_ring, 1)
        uly = (ulysses_axis, int(mesh.shape[ulysses_axis]), None)
        seq_axes = (ring_axis, ulysses_axis)
    else:  # "2d" inside one axis: Ulysses groups of U consecutive devices, R interleaved rings
        if ulysses_size is None:
            raise ValueError("mode '2d' needs ulysses_size (or a mesh with ulysses_axis)")
        u = int(ulysses_size)
        if u < 1 or p_ring % u:
            raise ValueError(f"ulysses_size={ulysses_size} does not divide {ring_axis}={p_ring}")
        groups = [list(range(g * u, (g + 1) * u)) for g in range(p_ring // u)]
        ring = (ring_axis, p_ring // u, u)
        uly = (ring_axis, u, groups if p_ring // u > 1 else None)
    sp = math.prod(int(mesh.shape[a]) for a in seq_axes)
    if s % sp:
        raise ValueError(f"sequence length {s} is not divisible by the {sp} sequence devices")
    positions = jnp.asarray(layout_positions(s, sp, layout))

    b_spec, h_axis = _batch_and_head_axes(mesh, b, nq, nkv, set(seq_axes))
    s_spec = seq_axes[0] if len(seq_axes) == 1 else seq_axes
    x_spec = P(b_spec, s_spec, h_axis, None)
    seg_spec = P(b_spec, s_spec)
    has_seg = segment_ids is not None
    seg_in = segment_ids.astype(jnp.int32) if has_seg else jnp.zeros((b, s), jnp.int32)
    static_kind, blocks = (None, implementation)
    if ring is not None:
        static_kind, blocks = resolve_ring(implementation, q.dtype, causal, layout, has_seg)

    def body(q, k, v, pos, seg):
        seg = seg if has_seg else None
        if uly is not None:
            u_axis, u, groups = uly
            rep = _kv_repeat(q.shape[2], k.shape[2], u)
            if rep > 1:
                k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
            q, k, v = (_seq_to_heads(x, u_axis, groups) for x in (q, k, v))
            pos = lax.all_gather(pos, u_axis, axis=0, tiled=True, axis_index_groups=groups)
            if seg is not None:
                seg = lax.all_gather(seg, u_axis, axis=1, tiled=True, axis_index_groups=groups)
        if ring is None:
            out = _local_attention(q, k, v, seg, causal=causal, layout=layout, sp=sp, scale=scale)
        elif static_kind is not None:
            # After the Ulysses all_to_all the local sequence is the ring group's; in the zigzag
            # layout it is reordered into the ring's [chunk g, chunk 2R-1-g] halves and back.
            order = None
            if static_kind == "zigzag" and uly is not None and uly[1] > 1:
                order = group_zigzag_order(q.shape[1], uly[1])
                q, k, v = (jnp.take(x, order, axis=1) for x in (q, k, v))
            out = static_ring_attention_shard(
                q,
                k,
                v,
                axis_name=ring[0],
                axis_size=ring[1],
                axis_stride=ring[2],
                kind=static_kind,
                scale=scale,
                implementation=blocks,
            )
            if order is not None:
                out = jnp.take(out, np.argsort(order).astype(np.int32), axis=1)
        else:
            out = ring_attention_shard(
                q,
                k,
                v,
                pos,
                seg,
                axis_name=ring[0],
                axis_size=ring[1],
                axis_stride=ring[2],
                causal=causal,
                scale=scale,
                implementation=blocks,
            )
        if uly is not None:
            out = _heads_to_seq(out, uly[0], uly[2])
        return out

    fn = shard_map(
        body,
        mesh,
        in_specs=(x_spec, x_spec, x_spec, P(s_spec), seg_spec),
        out_specs=x_spec,
    )
    return fn(q, k, v, positions, seg_in)
