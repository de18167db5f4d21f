"""Kernel bodies of the Pallas-Triton ReLU linear-attention kernels (see ``pallas_triton``).

Each body runs for one grid point ``(head, token tile or chunk, batch)``; its refs are the
blocks chosen by the BlockSpecs in ``pallas_triton``: the whole token axis of one (batch, head)
for q/k/v/o and their gradients ([N, d] or [N, e], rows H*d elements apart in memory), and one
head's state. Token tiles of ``block_n`` rows are read with ``pl.ds``; when N is not a multiple
of the tile the last tile is loaded with a row mask (``other`` = 0, so padded rows have
relu(k) = 0 and contribute nothing) and stored with the same mask.

Matmul precision (``mode``): "f32" runs IEEE float32 dots (float32 / float16 inputs). "bf16x3"
(bfloat16 inputs) keeps the float32 state exact enough on bf16 tensor cores: an operand that is
exactly representable in bf16 (relu(q), relu(k), v, do are bf16 inputs) enters the dot as is; a
float32 operand (S, z, dS, dz, do/den) is split into hi = bf16(x) and lo = bf16(x - hi), and the
dot sums hi*hi + hi*lo + lo*hi with float32 accumulation (relative error ~2^-16, vs 2^-8 for a
plain bf16 cast). Every accumulator is float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

F32 = jnp.float32
BF16 = jnp.bfloat16


# -- helpers -----------------------------------------------------------------------------------


def _split(x: jax.Array) -> list[jax.Array]:
    """float32 x -> [hi, lo] bfloat16 with hi + lo = x to ~2^-16 relative."""
    hi = x.astype(BF16)
    return [hi, (x - hi.astype(F32)).astype(BF16)]


def mm(
    a: jax.Array,
    b: jax.Array,
    contract: tuple[int, int],
    *,
    mode: str,
    a_exact: bool,
    b_exact: bool,
) -> jax.Array:
    """float32 2-D matmul of a and b contracting dims ``contract``, at the precision of ``mode``.

    a_exact / b_exact: the operand holds bf16-representable values (bf16 inputs and their
    ReLU), so "bf16x3" feeds it to the tensor cores without a low part.
    """
    dims = (((contract[0],), (contract[1],)), ((), ()))
    if mode == "f32":
        return lax.dot_general(
            a.astype(F32),
            b.astype(F32),
            dims,
            precision=lax.Precision.HIGHEST,
            preferred_element_type=F32,
        )
    pa = [a.astype(BF16)] if a_exact else _split(a.astype(F32))
    pb = [b.astype(BF16)] if b_exact else _split(b.astype(F32))
    acc = None
    # Smallest terms first: lo*hi, hi*lo, then hi*hi (lo*lo, ~2^-16 relative, is dropped).
    for i, j in ((1, 0), (0, 1), (0, 0)):
        if i < len(pa) and j < len(pb):
            term = lax.dot_general(pa[i], pb[j], dims, preferred_element_type=F32)
            acc = term if acc is None else acc + term
    return acc


def _row_mask(start: jax.Array, block_n: int, width: int, n: int) -> jax.Array:
    rows = start + lax.broadcasted_iota(jnp.int32, (block_n, width), 0)
    return rows < n


def load_tile(ref, start: jax.Array, block_n: int, n: int | None) -> jax.Array:
    """Rows [start, start + block_n) of a [N, width] ref; rows >= n read as 0 (n None: no
    mask, N is a multiple of the tile)."""
    view = ref.at[pl.ds(start, block_n), :]
    if n is None:
        return view[...]
    mask = _row_mask(start, block_n, ref.shape[-1], n)
    return plt.load(view, mask=mask, other=jnp.zeros((), ref.dtype))


def store_tile(ref, start: jax.Array, block_n: int, n: int | None, value: jax.Array) -> None:
    """Write rows [start, start + block_n) of a [N, width] ref, skipping rows >= n."""
    view = ref.at[pl.ds(start, block_n), :]
    value = value.astype(ref.dtype)
    if n is None:
        view[...] = value
    else:
        plt.store(view, value, mask=_row_mask(start, block_n, ref.shape[-1], n))


def _chunk_bounds(tiles_per_chunk: int, n_tiles: int) -> tuple[jax.Array, jax.Array]:
    """(first tile, tile count) of this program's chunk (grid axis 1)."""
    first = pl.program_id(1) * tiles_per_chunk
    return first, jnp.minimum(tiles_per_chunk, n_tiles - first)


# -- forward -----------------------------------------------------------------------------------


def state_kernel(
    k_ref,
    v_ref,
    s_ref,
    z_ref,
    *,
    block_n: int,
    n_mask: int | None,
    tiles_per_chunk: int,
    n_tiles: int,
    mode: str,
):
    """One (head, chunk, batch): partial S = sum relu(k)^T v [d, e], z = sum relu(k) [d] over
    the chunk's token tiles."""
    d, e = k_ref.shape[-1], v_ref.shape[-1]
    first, count = _chunk_bounds(tiles_per_chunk, n_tiles)

    def body(i, carry):
        s, zacc = carry
        start = pl.multiple_of((first + i) * block_n, block_n)
        k = jnp.maximum(load_tile(k_ref, start, block_n, n_mask), 0)
        v = load_tile(v_ref, start, block_n, n_mask)
        s = s + mm(k, v, (0, 0), mode=mode, a_exact=True, b_exact=True)
        return s, zacc + k.astype(F32)

    init = (jnp.zeros((d, e), F32), jnp.zeros((block_n, d), F32))
    s, zacc = lax.fori_loop(0, count, body, init)
    s_ref[...] = s
    z_ref[...] = jnp.sum(zacc, axis=0)


def apply_kernel(
    q_ref, s_ref, z_ref, o_ref, *, block_n: int, n_mask: int | None, eps: float, mode: str
):
    """One (head, token tile, batch): o = relu(q) S / (relu(q) . z + eps)."""
    start = pl.multiple_of(pl.program_id(1) * block_n, block_n)
    q = jnp.maximum(load_tile(q_ref, start, block_n, n_mask), 0)
    s = s_ref[...]
    z = z_ref[...]
    num = mm(q, s, (1, 0), mode=mode, a_exact=True, b_exact=False)
    den = jnp.sum(q.astype(F32) * z[None, :], axis=1) + eps
    store_tile(o_ref, start, block_n, n_mask, num / den[:, None])


# -- backward ----------------------------------------------------------------------------------
#
# With phi = relu, den_i = phi(q_i) . z + eps, o_i = phi(q_i) S / den_i and cotangent do_i:
#   g_i = do_i / den_i                     (the cotangent of the numerator)
#   r_i = -(do_i . o_i) / den_i            (the cotangent of the denominator)
#   dq_i = [q_i > 0] * (S g_i + r_i z)
#   dS = sum_i phi(q_i) (x) g_i,  dz = sum_i r_i phi(q_i)
#   dk_j = [k_j > 0] * (dS v_j + dz),  dv_j = dS^T phi(k_j)


def apply_bwd_kernel(
    q_ref,
    do_ref,
    s_ref,
    z_ref,
    dq_ref,
    ds_ref,
    dz_ref,
    *,
    block_n: int,
    n_mask: int | None,
    tiles_per_chunk: int,
    n_tiles: int,
    eps: float,
    mode: str,
):
    """One (head, chunk, batch): dq for the chunk's tiles, partial dS [d, e] and dz [d]."""
    d, e = q_ref.shape[-1], s_ref.shape[-1]
    s = s_ref[...]
    z = z_ref[...]
    first, count = _chunk_bounds(tiles_per_chunk, n_tiles)

    def body(i, carry):
        ds, dz = carry
        start = pl.multiple_of((first + i) * block_n, block_n)
        q = load_tile(q_ref, start, block_n, n_mask)
        do = load_tile(do_ref, start, block_n, n_mask).astype(F32)
        phi = jnp.maximum(q, 0)
        phi32 = phi.astype(F32)
        inv = 1.0 / (jnp.sum(phi32 * z[None, :], axis=1) + eps)  # [T]
        o = mm(phi, s, (1, 0), mode=mode, a_exact=True, b_exact=False) * inv[:, None]
        g = do * inv[:, None]  # [T, e]
        r = -jnp.sum(do * o, axis=1) * inv  # [T]
        dphi = mm(g, s, (1, 1), mode=mode, a_exact=False, b_exact=False) + r[:, None] * z[None, :]
        store_tile(dq_ref, start, block_n, n_mask, jnp.where(q > 0, dphi, 0.0))
        ds = ds + mm(phi, g, (0, 0), mode=mode, a_exact=True, b_exact=False)
        # Reduced per tile (not carried as a [T, d] sum): this kernel is the register-heaviest.
        return ds, dz + jnp.sum(phi32 * r[:, None], axis=0)

    init = (jnp.zeros((d, e), F32), jnp.zeros((d,), F32))
    ds, dz = lax.fori_loop(0, count, body, init)
    ds_ref[...] = ds
    dz_ref[...] = dz


def state_bwd_kernel(
    k_ref,
    v_ref,
    ds_ref,
    dz_ref,
    dk_ref,
    dv_ref,
    *,
    block_n: int,
    n_mask: int | None,
    mode: str,
):
    """One (head, token tile, batch): dk = [k > 0] (v dS^T + dz), dv = relu(k) dS."""
    start = pl.multiple_of(pl.program_id(1) * block_n, block_n)
    k = load_tile(k_ref, start, block_n, n_mask)
    v = load_tile(v_ref, start, block_n, n_mask)
    ds = ds_ref[...]
    dz = dz_ref[...]
    dphi = mm(v, ds, (1, 1), mode=mode, a_exact=True, b_exact=False) + dz[None, :]
    store_tile(dk_ref, start, block_n, n_mask, jnp.where(k > 0, dphi, 0.0))
    dv = mm(jnp.maximum(k, 0), ds, (1, 0), mode=mode, a_exact=True, b_exact=False)
    store_tile(dv_ref, start, block_n, n_mask, dv)
