"""ReLU linear attention (SANA LiteLA) as Pallas kernels lowered through Triton, with custom VJPs.

Backend choice: `pl.pallas_call` with `plt.CompilerParams`, which on jax 0.10.2-0.11.x lowers
through the Triton bundled in XLA on NVIDIA GPUs (deprecated since jax 0.11 but working, see
../shared/specs/kernels.md §1) and runs on the CPU with ``interpret=True``, so every kernel is
tested against the pure-JAX reference here. A Mosaic GPU (`plgpu.kernel`) version is not used:
its interpreter needs private 0.11 APIs and cannot run on this project's CPU jax 0.10.2. The
work is memory bound (d = e = 32 in SANA: ~2 K FLOP per 128 bytes of a token-head), so the
Triton lowering's lack of TMA / warp specialisation costs little.

Contract (as :mod:`pallas_kernels.linear_attention.reference`): q/k [B, N, H, d], v [B, N, H, e]
in bf16, fp16 or fp32 (one dtype), d and e powers of two in [16, 128]; state float32
S [B, H, d, e] = sum_j relu(k_j) (x) v_j and z [B, H, d] = sum_j relu(k_j);
o = relu(q) S / (relu(q) . z + eps) in q's dtype. The layout stays [B, N, H, d]: a kernel reads
one head's token rows with stride H*d (no transpose copy).

Kernels (grid axes ``(head, tiles or chunks, batch)``: heads vary fastest so programs that run
together read neighbouring bytes of the same token rows):

* state: grid (H, C, B). Each program loops over the token tiles of one chunk of the sequence
  (``block_n`` rows per tile) and accumulates relu(k)^T v and relu(k) in float32; the C partial
  states are summed by XLA (a few KB per head). C is chosen so that B*H*C fills the GPU
  (``target_programs``) with at least two tiles per chunk.
* apply: grid (H, N / block_n, B). One token tile: ReLU, relu(q) S, relu(q) . z, the division
  by (. + eps) and the cast are fused; o is written once.
* backward of apply (grid (H, C, B)): recomputes o in float32 from q and the state, writes dq
  for each tile and the chunk's partial dS, dz (summed by XLA).
* backward of state (grid (H, N / block_n, B)): dk = [k > 0] (v dS^T + dz), dv = relu(k) dS.

So the forward reads q, k, v and writes o once (plus the tiny state); the backward reads
q, k, v, do and writes dq, dk, dv once. The two halves are separate `jax.custom_vjp`s
(:func:`linear_attention_state`, :func:`linear_attention_apply`), so a sequence-sharded caller
can all-reduce the state between them and JAX transposes the psum. N need not be a multiple of
``block_n``: the last tile is masked. bf16 inputs use bf16 tensor-core dots with float32 state
split into bf16 hi/lo parts (see :mod:`pallas_kernels.linear_attention.triton_kernels`);
fp32/fp16 inputs use IEEE float32 dots. The gradient formulas are in that module too.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from pallas_kernels.linear_attention import triton_kernels as tk
from pallas_kernels.linear_attention.reference import DEFAULT_EPS

Array = jax.Array

__all__ = [
    "Config",
    "check_inputs",
    "default_config",
    "linear_attention_apply",
    "linear_attention_state",
    "relu_linear_attention",
    "supported",
]

DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16), jnp.dtype(jnp.float32))
MIN_DIM, MAX_DIM = 16, 128  # Triton dots need >= 16; the [d, e] float32 state lives in registers
TARGET_PROGRAMS = 528  # ~4 programs per SM of an H100/H200 (132 SMs) for the chunked kernels


@dataclasses.dataclass(frozen=True)
class Config:
    """Launch configuration shared by the four kernels (hashable: a custom_vjp static arg).

    block_n: tokens per tile (power of two >= 16; shrunk for short sequences).
    num_warps, num_stages: Triton launch parameters (ignored by the interpreter).
    chunks: sequence chunks of the state and dq/dS kernels; None = fill ``TARGET_PROGRAMS``.
    interpret: run the Pallas interpreter (CPU).
    """

    block_n: int = 128
    num_warps: int = 4
    num_stages: int = 2
    chunks: int | None = None
    interpret: bool = False


def default_config(d: int, e: int, dtype) -> dict[str, int]:
    """Default tiles and launch parameters for head dims d, e and the input dtype.

    Untuned starting point (SANA: d = e = 32, bf16): 128-token tiles, 4 warps, 2 stages;
    4-byte inputs or 128-wide heads halve the tile. `experiments/bench_linear_attention.py`
    sweeps these on the GPU and records the best in its JSON.
    """
    block_n = 128
    if jnp.dtype(dtype).itemsize >= 4 or max(d, e) >= 128:
        block_n = 64
    return dict(block_n=block_n, num_warps=4, num_stages=2)


def _pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def check_inputs(q: Array | None, k: Array | None, v: Array | None) -> None:
    """Raise ValueError unless the shapes/dtypes are ones the kernels handle (None = skip)."""
    arrays = [x for x in (q, k, v) if x is not None]
    if not arrays:
        return
    if any(x.ndim != 4 for x in arrays):
        raise ValueError(f"q/k/v must be [B, N, H, dim]; got {[x.shape for x in arrays]}")
    if len({x.shape[:3] for x in arrays}) > 1:
        raise ValueError(f"q/k/v must share [B, N, H]; got {[x.shape for x in arrays]}")
    if q is not None and k is not None and q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k need the same head dim; got {q.shape}, {k.shape}")
    if len({x.dtype for x in arrays}) > 1 or arrays[0].dtype not in DTYPES:
        raise ValueError(
            f"q/k/v must share one dtype of {[str(d) for d in DTYPES]}; got "
            f"{[str(x.dtype) for x in arrays]}"
        )
    for x in arrays:
        if not (_pow2(x.shape[3]) and MIN_DIM <= x.shape[3] <= MAX_DIM):
            raise ValueError(
                f"head dims must be powers of two in [{MIN_DIM}, {MAX_DIM}]; got {x.shape[3]}"
            )


def supported(
    q: Array | None = None, k: Array | None = None, v: Array | None = None, *, e: int | None = None
) -> bool:
    """True when the kernels handle these inputs (see `check_inputs`); e: the value head dim
    of a `linear_attention_apply` call (its state's last axis)."""
    try:
        check_inputs(q, k, v)
    except ValueError:
        return False
    return e is None or (_pow2(e) and MIN_DIM <= e <= MAX_DIM)


def _mode(dtype) -> str:
    return "bf16x3" if jnp.dtype(dtype) == jnp.bfloat16 else "f32"


def _fit_block(block: int, n: int) -> int:
    if block < 16 or not _pow2(block):
        raise ValueError(f"block_n must be a power of two >= 16; got {block}")
    return int(min(block, max(16, pl.next_power_of_2(n))))


def _chunking(n_tiles: int, programs: int, chunks: int | None) -> tuple[int, int]:
    """(tiles per chunk, chunks) for a sequence of n_tiles tiles and `programs` (B*H) heads."""
    if chunks is None:
        want = -(-TARGET_PROGRAMS // programs)
        per = max(2, -(-n_tiles // want))
    else:
        per = -(-n_tiles // max(1, chunks))
    per = min(per, n_tiles)
    return per, -(-n_tiles // per)


def _tiles(n: int, cfg: Config) -> tuple[int, int, int | None]:
    """(block_n, n_tiles, n for the row mask or None when N is a multiple of the tile)."""
    block_n = _fit_block(cfg.block_n, n)
    return block_n, -(-n // block_n), (None if n % block_n == 0 else n)


def _call(kernel, cfg: Config, name: str, **kw):
    return pl.pallas_call(
        kernel,
        compiler_params=plt.CompilerParams(num_warps=cfg.num_warps, num_stages=cfg.num_stages),
        interpret=cfg.interpret,
        name=name,
        **kw,
    )


def _seq_spec(n: int, width: int) -> pl.BlockSpec:
    """The whole token axis of one (batch, head) of a [B, N, H, width] array."""
    return pl.BlockSpec((None, n, None, width), lambda h, i, b: (b, 0, h, 0))


def _head_spec(*dims: int) -> pl.BlockSpec:
    """One head's [dims] block of a [B, H, *dims] array."""
    return pl.BlockSpec((None, None, *dims), lambda h, i, b: (b, h, *([0] * len(dims))))


def _chunk_spec(*dims: int) -> pl.BlockSpec:
    """One (chunk, head)'s [dims] block of a [B, C, H, *dims] array."""
    return pl.BlockSpec((None, None, None, *dims), lambda h, i, b: (b, i, h, *([0] * len(dims))))


# -- the four pallas_calls ---------------------------------------------------------------------


def _state_fwd_call(k: Array, v: Array, cfg: Config) -> tuple[Array, Array]:
    b, n, h, d = k.shape
    e = v.shape[3]
    block_n, n_tiles, n_mask = _tiles(n, cfg)
    per, chunks = _chunking(n_tiles, b * h, cfg.chunks)
    kernel = functools.partial(
        tk.state_kernel,
        block_n=block_n,
        n_mask=n_mask,
        tiles_per_chunk=per,
        n_tiles=n_tiles,
        mode=_mode(k.dtype),
    )
    s, z = _call(
        kernel,
        cfg,
        "linear_attention_state",
        grid=(h, chunks, b),
        in_specs=[_seq_spec(n, d), _seq_spec(n, e)],
        out_specs=[_chunk_spec(d, e), _chunk_spec(d)],
        out_shape=[
            jax.ShapeDtypeStruct((b, chunks, h, d, e), jnp.float32),
            jax.ShapeDtypeStruct((b, chunks, h, d), jnp.float32),
        ],
    )(k, v)
    return s.sum(axis=1), z.sum(axis=1)


def _apply_fwd_call(q: Array, s: Array, z: Array, eps: float, cfg: Config) -> Array:
    b, n, h, d = q.shape
    e = s.shape[3]
    block_n, n_tiles, n_mask = _tiles(n, cfg)
    kernel = functools.partial(
        tk.apply_kernel, block_n=block_n, n_mask=n_mask, eps=eps, mode=_mode(q.dtype)
    )
    return _call(
        kernel,
        cfg,
        "linear_attention_apply",
        grid=(h, n_tiles, b),
        in_specs=[_seq_spec(n, d), _head_spec(d, e), _head_spec(d)],
        out_specs=_seq_spec(n, e),
        out_shape=jax.ShapeDtypeStruct((b, n, h, e), q.dtype),
    )(q, s, z)


def _apply_bwd_call(
    q: Array, s: Array, z: Array, do: Array, eps: float, cfg: Config
) -> tuple[Array, Array, Array]:
    b, n, h, d = q.shape
    e = s.shape[3]
    block_n, n_tiles, n_mask = _tiles(n, cfg)
    per, chunks = _chunking(n_tiles, b * h, cfg.chunks)
    kernel = functools.partial(
        tk.apply_bwd_kernel,
        block_n=block_n,
        n_mask=n_mask,
        tiles_per_chunk=per,
        n_tiles=n_tiles,
        eps=eps,
        mode=_mode(q.dtype),
    )
    dq, ds, dz = _call(
        kernel,
        cfg,
        "linear_attention_apply_bwd",
        grid=(h, chunks, b),
        in_specs=[_seq_spec(n, d), _seq_spec(n, e), _head_spec(d, e), _head_spec(d)],
        out_specs=[_seq_spec(n, d), _chunk_spec(d, e), _chunk_spec(d)],
        out_shape=[
            jax.ShapeDtypeStruct((b, n, h, d), q.dtype),
            jax.ShapeDtypeStruct((b, chunks, h, d, e), jnp.float32),
            jax.ShapeDtypeStruct((b, chunks, h, d), jnp.float32),
        ],
    )(q, do.astype(q.dtype), s, z)
    return dq, ds.sum(axis=1), dz.sum(axis=1)


def _state_bwd_call(k: Array, v: Array, ds: Array, dz: Array, cfg: Config) -> tuple[Array, Array]:
    b, n, h, d = k.shape
    e = v.shape[3]
    block_n, n_tiles, n_mask = _tiles(n, cfg)
    kernel = functools.partial(
        tk.state_bwd_kernel, block_n=block_n, n_mask=n_mask, mode=_mode(k.dtype)
    )
    return _call(
        kernel,
        cfg,
        "linear_attention_state_bwd",
        grid=(h, n_tiles, b),
        in_specs=[_seq_spec(n, d), _seq_spec(n, e), _head_spec(d, e), _head_spec(d)],
        out_specs=[_seq_spec(n, d), _seq_spec(n, e)],
        out_shape=[
            jax.ShapeDtypeStruct((b, n, h, d), k.dtype),
            jax.ShapeDtypeStruct((b, n, h, e), v.dtype),
        ],
    )(k, v, ds.astype(jnp.float32), dz.astype(jnp.float32))


# -- custom VJPs -------------------------------------------------------------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _state(k: Array, v: Array, cfg: Config) -> tuple[Array, Array]:
    return _state_fwd_call(k, v, cfg)


def _state_fwd(k, v, cfg):
    return _state_fwd_call(k, v, cfg), (k, v)


def _state_bwd(cfg, res, cts):
    k, v = res
    ds, dz = cts
    return _state_bwd_call(k, v, ds, dz, cfg)


_state.defvjp(_state_fwd, _state_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _apply(q: Array, s: Array, z: Array, eps: float, cfg: Config) -> Array:
    return _apply_fwd_call(q, s, z, eps, cfg)


def _apply_fwd(q, s, z, eps, cfg):
    return _apply_fwd_call(q, s, z, eps, cfg), (q, s, z)


def _apply_bwd(eps, cfg, res, do):
    q, s, z = res
    return _apply_bwd_call(q, s, z, do, eps, cfg)


_apply.defvjp(_apply_fwd, _apply_bwd)


# -- public API --------------------------------------------------------------------------------


def _config(d: int, e: int, dtype, block_n, num_warps, num_stages, chunks, interpret) -> Config:
    cfg = default_config(d, e, dtype)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return Config(
        block_n=int(block_n or cfg["block_n"]),
        num_warps=int(num_warps or cfg["num_warps"]),
        num_stages=int(num_stages or cfg["num_stages"]),
        chunks=None if chunks is None else int(chunks),
        interpret=bool(interpret),
    )


def linear_attention_state(
    k: Array,
    v: Array,
    *,
    key_mask: Array | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    chunks: int | None = None,
    interpret: bool | None = None,
) -> tuple[Array, Array]:
    """(S float32 [B, H, d, e], z float32 [B, H, d]) from k [B, N, H, d], v [B, N, H, e].

    Differentiable (custom VJP: dk = [k > 0] (v dS^T + dz), dv = relu(k) dS, one kernel).
    key_mask: optional bool [B, N]; False tokens contribute nothing (k is zeroed outside the
    kernel, so relu(k) = 0 there and JAX differentiates the select).
    block_n, num_warps, num_stages, chunks: see :class:`Config` (defaults from
    :func:`default_config`). interpret: Pallas interpreter; default True unless on a GPU.
    """
    check_inputs(None, k, v)
    if key_mask is not None:
        k = jnp.where(key_mask[:, :, None, None], k, jnp.zeros((), k.dtype))
    cfg = _config(
        k.shape[3], v.shape[3], k.dtype, block_n, num_warps, num_stages, chunks, interpret
    )
    return _state(k, v, cfg)


def linear_attention_apply(
    q: Array,
    s: Array,
    z: Array,
    *,
    eps: float = DEFAULT_EPS,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    chunks: int | None = None,
    interpret: bool | None = None,
) -> Array:
    """o [B, N, H, e] in q's dtype from q [B, N, H, d] and a float32 state S [B, H, d, e],
    z [B, H, d]: o = relu(q) S / (relu(q) . z + eps). Differentiable in q, S and z (custom VJP,
    one kernel for dq, dS, dz). Tiling arguments as :func:`linear_attention_state`."""
    check_inputs(q, None, None)
    b, _, h, d = q.shape
    if s.ndim != 4 or s.shape[:3] != (b, h, d) or z.shape != (b, h, d):
        raise ValueError(
            f"need S [B, H, d, e] and z [B, H, d] for q {q.shape}; got {s.shape}, {z.shape}"
        )
    e = s.shape[3]
    if not (_pow2(e) and MIN_DIM <= e <= MAX_DIM):
        raise ValueError(f"head dims must be powers of two in [{MIN_DIM}, {MAX_DIM}]; got {e}")
    cfg = _config(d, e, q.dtype, block_n, num_warps, num_stages, chunks, interpret)
    return _apply(q, s.astype(jnp.float32), z.astype(jnp.float32), float(eps), cfg)


def relu_linear_attention(
    q: Array,
    k: Array,
    v: Array,
    *,
    eps: float = DEFAULT_EPS,
    key_mask: Array | None = None,
    block_n: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    chunks: int | None = None,
    interpret: bool | None = None,
) -> Array:
    """ReLU linear attention, q/k [B, N, H, d], v [B, N, H, e] (one dtype of bf16, fp16, fp32;
    d, e powers of two in [16, 128]) -> [B, N, H, e] in q's dtype; float32 state.

    Forward: state kernel + apply kernel; backward: their two VJP kernels. key_mask: optional
    bool [B, N] (False keys are ignored). Tiling arguments as :func:`linear_attention_state`.
    """
    check_inputs(q, k, v)
    kw = dict(
        block_n=block_n,
        num_warps=num_warps,
        num_stages=num_stages,
        chunks=chunks,
        interpret=interpret,
    )
    s, z = linear_attention_state(k, v, key_mask=key_mask, **kw)
    return linear_attention_apply(q, s, z, eps=eps, **kw)
