"""Whole-block attention with explicit softmax statistics: cuDNN flash attention and dense twins.

Used by the static-mask ring in `jaxstack.parallel.sequence`, whose steps only need whole
blocks that are either fully visible or top-left causal on a square block.

`cudnn_block_fwd(q, k, v, *, causal, scale=None) -> (out, lse)`
    q [B, T, Nq, H]; k, v [B, S, Nkv, H], bf16 or fp16, Nq % Nkv == 0 (GQA is native in
    cuDNN: no KV repeat). causal: key j visible to query i iff j <= i on local indices
    (top-left aligned; meant for square blocks). Returns out [B, T, Nq, H] in q.dtype and lse
    float32 [B, Nq, T].
`cudnn_block_bwd(q, k, v, out, lse, dout, *, causal, scale=None) -> (dq, dk, dv)`
    out, lse: the GLOBAL output and log-sum-exp of these queries (merged over all KV blocks),
    dout the output cotangent. Returns this block's contribution to the gradients, in the
    input dtypes: dq [B, T, Nq, H], dk, dv [B, S, Nkv, H].

`dense_block_fwd` / `dense_block_bwd`: the same signatures in pure JAX, computed in float32
(out in q.dtype, lse and gradients float32); they run anywhere and are the CPU path and oracle.

Softmax statistics: the cuDNN forward in training mode returns, next to the output, a float32
tensor of shape [B, Nq, T] (always heads-before-queries, whatever the q/k/v layout) holding the
natural-log log-sum-exp of the SCALED logits over the visible keys of the block:
lse[b, n, i] = log(sum_j exp(scale * q_i . k_j)). This is exactly the `lse` of
`pallas_kernels.flash_attention.reference` (same layout [B, Nq, T], same units), so no
conversion is needed: block results merge with `merge_partials`, and the cuDNN backward,
which takes the statistics and the forward output as explicit inputs (it recomputes
p = exp(scale q k^T - lse) and delta = sum(out * dout, -1) from them), gives this block's
share of the gradients when it is handed the global out and lse. The GPU tests check the
forward lse against the dense reference and the backward against the dense backward.

Binding: the public `jax.nn.dot_product_attention` cannot return the statistics' gradient
path (its backward does not accept an external lse), so the blocks bind jax's private fused
attention primitives (`jax._src.cudnn.fused_attention_stablehlo`
`_dot_product_attention_fwd_p_wrapper` / `_dot_product_attention_bwd_p_wrapper`). Their
operand order and parameters are read from the primitives' abstract-evaluation signatures, so
small changes between jax versions are tolerated; a missing private API raises ImportError and
an unknown required parameter raises RuntimeError with the signature found.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.reference import block_attention_bwd, block_attention_fwd

Array = jax.Array

_PRIVATE_MODULE = "jax._src.cudnn.fused_attention_stablehlo"
# Optional operands of the fused primitives; unused ones are bound as empty arrays.
_OPTIONAL_OPERANDS = (
    "bias",
    "q_seqlen",
    "kv_seqlen",
    "q_offsets",
    "kv_offsets",
    "page_table_k",
    "page_table_v",
)

__all__ = [
    "cudnn_available",
    "cudnn_block_bwd",
    "cudnn_block_fwd",
    "dense_block_bwd",
    "dense_block_fwd",
]


# -- dense (pure JAX) twins -------------------------------------------------------------------


def _local_positions(q: Array, k: Array) -> dict[str, Array]:
    return dict(
        q_positions=jnp.arange(q.shape[1], dtype=jnp.int32),
        kv_positions=jnp.arange(k.shape[1], dtype=jnp.int32),
    )


def dense_block_fwd(
    q: Array, k: Array, v: Array, *, causal: bool, scale: float | None = None
) -> tuple[Array, Array]:
    """Pure-JAX twin of `cudnn_block_fwd` (float32 math): (out q.dtype, lse float32 [B,Nq,T])."""
    return block_attention_fwd(q, k, v, causal=causal, scale=scale, **_local_positions(q, k))


def dense_block_bwd(
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    dout: Array,
    *,
    causal: bool,
    scale: float | None = None,
) -> tuple[Array, Array, Array]:
    """Pure-JAX twin of `cudnn_block_bwd`: this block's (dq, dk, dv) in float32."""
    return block_attention_bwd(
        q, k, v, out, lse, dout, causal=causal, scale=scale, **_local_positions(q, k)
    )


# -- cuDNN ------------------------------------------------------------------------------------


@functools.cache
def _fused_module():
    """The private fused-attention module, checked for the names the blocks need."""
    try:
        fa = importlib.import_module(_PRIVATE_MODULE)
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        raise ImportError(
            f"cuDNN block attention needs {_PRIVATE_MODULE}, which cannot be imported "
            f"with jax {jax.__version__}: {e}"
        ) from e
    names = (
        "_dot_product_attention_fwd_p_wrapper",
        "_dot_product_attention_bwd_p_wrapper",
        "_dot_product_attention_fwd_abstract",
        "_dot_product_attention_bwd_abstract",
        "MaskType",
        "AttentionLayout",
    )
    missing = [n for n in names if not hasattr(fa, n)]
    if missing:
        raise ImportError(
            f"cuDNN block attention: {_PRIVATE_MODULE} of jax {jax.__version__} lacks {missing}"
        )
    return fa


def cudnn_available() -> bool:
    """True when the default backend is a GPU and the private cuDNN primitives are present."""
    if jax.default_backend() != "gpu":
        return False
    try:
        _fused_module()
    except ImportError:
        return False
    return True


@functools.cache
def _cudnn_version() -> int | None:
    fa = _fused_module()
    check = getattr(fa, "check_cudnn_version", None)
    return None if check is None else int(check())


def _signature(fn) -> tuple[list[str], list[inspect.Parameter]]:
    """(operand names, keyword parameters) of a primitive's abstract-eval function."""
    operands, params = [], []
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            operands.append(p.name)
        elif p.kind == p.KEYWORD_ONLY:
            params.append(p)
    return operands, params


def _bind(which: str, arrays: dict[str, Array], params: dict[str, Any], empty: Array):
    """Bind the fused primitive `which` ("fwd" or "bwd") by parameter name."""
    fa = _fused_module()
    prim = getattr(fa, f"_dot_product_attention_{which}_p_wrapper")
    abstract = getattr(fa, f"_dot_product_attention_{which}_abstract")
    operand_names, param_specs = _signature(abstract)
    operands = []
    for name in operand_names:
        if name in arrays:
            operands.append(arrays[name])
        elif name in _OPTIONAL_OPERANDS:
            operands.append(empty)
        else:
            raise RuntimeError(
                f"cuDNN block attention: unknown operand {name!r} of the private {which} "
                f"primitive (jax {jax.__version__}); operands are {operand_names}"
            )
    kwargs = {}
    for p in param_specs:
        if p.name in params:
            kwargs[p.name] = params[p.name]
        elif p.name == "cudnn_version":
            kwargs[p.name] = _cudnn_version()
        elif p.default is not p.empty:
            continue
        else:
            raise RuntimeError(
                f"cuDNN block attention: unknown parameter {p.name!r} of the private {which} "
                f"primitive (jax {jax.__version__}); parameters are "
                f"{[s.name for s in param_specs]}"
            )
    return prim.bind(*operands, **kwargs)


def _check_inputs(q: Array, k: Array, v: Array, causal: bool) -> None:
    if q.ndim != 4 or k.ndim != 4 or v.shape != k.shape:
        raise ValueError(f"expected q [B,T,Nq,H], k/v [B,S,Nkv,H]; got {q.shape} {k.shape}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3] or q.shape[2] % k.shape[2]:
        raise ValueError(f"incompatible q {q.shape} and k/v {k.shape} (need Nq % Nkv == 0)")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in (jnp.bfloat16, jnp.float16):
        raise ValueError(f"cuDNN blocks need bf16/fp16 q, k, v; got {q.dtype} {k.dtype}")
    if causal and q.shape[1] != k.shape[1]:
        raise ValueError(f"causal cuDNN blocks must be square; got T={q.shape[1]} S={k.shape[1]}")


def _params(q: Array, causal: bool, scale: float | None) -> dict[str, Any]:
    fa = _fused_module()
    mask = fa.MaskType.CAUSAL if causal else fa.MaskType.NO_MASK
    return dict(
        scale=float(q.shape[-1] ** -0.5 if scale is None else scale),
        seed=42,
        dropout_rate=0.0,
        variadic_args=(False, False),  # (has_bias, has_dbias)
        mask_type=mask,
        layout=fa.AttentionLayout.BTNH.value,
        sliding_window_length=None,
        is_training=True,  # forward: also return the softmax statistics (ignored by bwd)
    )


def cudnn_block_fwd(
    q: Array, k: Array, v: Array, *, causal: bool, scale: float | None = None
) -> tuple[Array, Array]:
    """cuDNN flash attention of q over one KV block: (out q.dtype, lse float32 [B, Nq, T])."""
    _check_inputs(q, k, v, causal)
    empty = jnp.zeros((0,), q.dtype)
    out, lse = _bind("fwd", dict(query=q, key=k, value=v), _params(q, causal, scale), empty)[:2]
    return out, lse.astype(jnp.float32)


def cudnn_block_bwd(
    q: Array,
    k: Array,
    v: Array,
    out: Array,
    lse: Array,
    dout: Array,
    *,
    causal: bool,
    scale: float | None = None,
) -> tuple[Array, Array, Array]:
    """This KV block's (dq, dk, dv), in the input dtypes, from the GLOBAL out and lse."""
    _check_inputs(q, k, v, causal)
    b, t, nq, _ = q.shape
    if out.shape != q.shape or dout.shape != q.shape or lse.shape != (b, nq, t):
        raise ValueError(
            f"need out/dout {q.shape} and lse {(b, nq, t)}; got {out.shape} {dout.shape} "
            f"{lse.shape}"
        )
    empty = jnp.zeros((0,), q.dtype)
    arrays = dict(
        query=q,
        key=k,
        value=v,
        activation=lse.astype(jnp.float32),
        fwd_output=out.astype(q.dtype),
        grad_output=dout.astype(q.dtype),
    )
    dq, dk, dv = _bind("bwd", arrays, _params(q, causal, scale), empty)[:3]
    return dq, dk, dv
