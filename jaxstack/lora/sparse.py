"""SparseLoRA: contextual sparsity for the frozen base projections of a LoRA-tuned decoder.

Per training step and decoder block, a cheap estimate (`jaxstack/lora/svd_estimator.py`: x @ A
@ B with rank-8 SVD factors of each frozen kernel) picks the channels worth computing; the base
projections then run as smaller dense GEMMs over those channels, the LoRA branch stays dense:

    y = scatter(x @ W[:, idx]) + delta(x)      q/k/v/gate/up  (output scatter)
    y = x[..., idx] @ W[idx, :] + delta(x)     o/down         (input gather)

Channel selection, k = int(dim * (1 - s)) with s the block's sparsity:

- MLP: x̄ = the mean of the block input over the context tokens (`mlp_mean="all"`: over the
  whole sequence), a = act(x̄ A_g B_g) * (x̄ A_u B_u) [B, F]; the top-k intermediate channels
  by the L2 norm of a over the micro-batch index gate/up outputs and down's inputs.
- Attention: q̃, k̃, ṽ = x A B (+ bias) over all tokens; n_q, n_k, n_v their column norms. The
  top-k of n_q * n_k indexes q and k, the top-k of n_v indexes v and o_proj's inputs.
- GQA, head-aligned: n_q [H * hd] is viewed as [kv_heads, groups, hd] and averaged over the
  groups to kv size; the kv channel c = kvh * hd + d picks q channels (kvh * groups + g) * hd + d
  for every g (the q heads sharing kv head kvh), and v channel c picks o_proj inputs the same
  way. k counts kv channels, so q and o keep k * groups channels. The reference
  (z-lab/sparselora `QKVOFusedGQAPredictor`) averages q over `view(groups, kv)` and maps kv
  index c to q index c * groups + g, which ignores Llama's head layout; it is not copied here.
  With groups = 1 (MHA) both reduce to the same rule.

Only context tokens are sparse: with `sparse_tokens` = m (the batch minimum of the leading
loss-masked run, `context_tokens`), positions [0, m) use the sparse base and [m, T) the dense
one; m is static (one program per m, rounded down to `token_bucket`). The estimate sees all
tokens (attention) or the context (MLP). Steps before `start * total_steps` are dense
(`step_active`), and inference (a KV cache, or m = 0) is dense.

    from jaxstack.lora.sparse import SparseLoRAConfig, SparsityConfig, apply_sparselora
    apply_lora(model, LoRAConfig(rank=16))
    est = apply_sparselora(model, SparseLoRAConfig(SparsityConfig.preset("llama3-8b-math10k")))
    set_sparse_tokens(lora_model, m)   # inside the training step, on the merged model

The LM SFT job switches it on with `lora.sparse.enabled=true` (`SparseLoRASection` in
`jaxstack/train/sections.py`).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.lora.linear import LoRALinear
from jaxstack.lora.svd_estimator import (
    ESTIMATED,
    Estimator,
    build_estimator,
    decoder_blocks,
    estimator_key,
)
from jaxstack.models.llm import ACTIVATIONS, MLP, Attention
from jaxstack.nn.attention import dot_product_attention
from jaxstack.nn.layers import Dense, apply_rope
from jaxstack.parallel.mesh import constrain

Array = jax.Array
IMPLS = ("gather", "mask")
MLP_MEANS = ("context", "all")

# The spec's per-layer tables (inclusive layer ranges; "skip" layers stay dense).
PRESETS: dict[str, dict[str, Any]] = {
    "llama3-8b-math10k": dict(mlp=(0.99, 3, 30), attn=(0.75, 14, 29), attn_skip=(20, 24)),
    "llama3-8b-csr170k": dict(mlp=(0.97, 17, 30), attn=(0.2, 17, 29), attn_skip=(20, 24)),
    "llama2-7b-math10k": dict(mlp=(0.9, 13, 29), attn=(0.6, 17, 29), attn_skip=(20, 24)),
    "llama3.1-8b-codefeedback": dict(mlp=(0.99, 3, 30), attn=(0.4, 14, 29), attn_skip=(20, 24)),
}


def _check_table(name: str, table: Any) -> tuple[tuple[int, float], ...]:
    out = []
    for layer, s in table:
        if not isinstance(layer, int | np.integer) or layer < 0:
            raise ValueError(f"SparseLoRA {name} layer must be an int >= 0, got {layer!r}")
        if not 0.0 <= s < 1.0:
            raise ValueError(f"SparseLoRA {name} sparsity of layer {layer} must be in [0, 1): {s}")
        out.append((int(layer), float(s)))
    if len({layer for layer, _ in out}) != len(out):
        raise ValueError(f"SparseLoRA {name} sparsity lists a layer twice")
    return tuple(sorted(out))


@dataclasses.dataclass(frozen=True)
class SparsityConfig:
    """Per-layer sparsity: mlp / attn are ((layer, s), ...) with s in [0, 1); a layer not
    listed is dense. s = 0 runs the gather path keeping every channel."""

    mlp: tuple[tuple[int, float], ...] = ()
    attn: tuple[tuple[int, float], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "mlp", _check_table("mlp", self.mlp))
        object.__setattr__(self, "attn", _check_table("attn", self.attn))

    def at(self, kind: str, layer: int) -> float | None:
        """The sparsity of block `kind` ("attn" | "mlp") in `layer`, None = dense."""
        return dict(self.mlp if kind == "mlp" else self.attn).get(layer)

    @classmethod
    def from_ranges(
        cls,
        mlp: tuple[float, int, int] | None = None,
        attn: tuple[float, int, int] | None = None,
        attn_skip: tuple[int, ...] = (),
        mlp_skip: tuple[int, ...] = (),
    ) -> SparsityConfig:
        """mlp / attn: (s, first, last) with the layers first..last (inclusive) at sparsity s;
        *_skip: layers of that range kept dense."""

        def table(spec, skip):
            if spec is None:
                return ()
            s, first, last = spec
            if first > last:
                raise ValueError(f"SparseLoRA layer range {first}..{last} is empty")
            return tuple((i, s) for i in range(first, last + 1) if i not in skip)

        return cls(mlp=table(mlp, mlp_skip), attn=table(attn, attn_skip))

    @classmethod
    def preset(cls, name: str) -> SparsityConfig:
        """One of `PRESETS` (the spec's Llama tables)."""
        if name not in PRESETS:
            raise ValueError(f"unknown SparseLoRA preset {name!r}; choose from {list(PRESETS)}")
        return cls.from_ranges(**PRESETS[name])


@dataclasses.dataclass(frozen=True)
class SparseLoRAConfig:
    """sparsity: per-layer table; rank: SVD estimator rank; start / end: sparse only for
    optimizer steps in [start * total, end * total); token_bucket: the context length m is
    rounded down to a multiple of it (one compiled program per m); mlp_mean: "context" (x̄
    over the sparse tokens) or "all" (the whole sequence, as the reference)."""

    sparsity: SparsityConfig
    rank: int = 8
    start: float = 0.05
    end: float = 1.0
    token_bucket: int = 16
    mlp_mean: str = "context"

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"SparseLoRA estimator rank must be >= 1, got {self.rank}")
        if not 0.0 <= self.start <= self.end <= 1.0:
            raise ValueError(
                f"SparseLoRA needs 0 <= start <= end <= 1, got {self.start}, {self.end}"
            )
        if self.token_bucket < 1:
            raise ValueError(f"SparseLoRA token_bucket must be >= 1, got {self.token_bucket}")
        if self.mlp_mean not in MLP_MEANS:
            raise ValueError(f"SparseLoRA mlp_mean must be one of {MLP_MEANS}: {self.mlp_mean!r}")


def step_active(step: int, total_steps: int, start: float, end: float = 1.0) -> bool:
    """True when optimizer step `step` (0-based) of `total_steps` runs sparse:
    start * total <= step < end * total."""
    return start * total_steps <= step < end * total_steps


def context_tokens(loss_mask_bt: np.ndarray, bucket: int = 1) -> int:
    """The number m of leading tokens that are context (loss_mask 0) in every row, rounded
    down to a multiple of `bucket`: the batch minimum of each row's leading masked run."""
    mask = np.asarray(loss_mask_bt) != 0
    t = mask.shape[1]
    first = np.where(mask.any(axis=1), mask.argmax(axis=1), t)
    return int(first.min()) // bucket * bucket if len(first) else 0


def keep_count(dim: int, sparsity: float) -> int:
    """k = int(dim * (1 - sparsity)) channels kept; ValueError if that is 0."""
    k = int(dim * (1.0 - sparsity))
    if k < 1:
        raise ValueError(f"SparseLoRA sparsity {sparsity} keeps no channel of {dim}")
    return k


def _topk(score: Array, k: int) -> Array:
    return jnp.sort(jax.lax.top_k(score, k)[1]).astype(jnp.int32)


def _low_rank(x: Array, a: Array, b: Array, bias: Array | None) -> Array:
    y = jnp.dot(jnp.dot(x, a, precision="highest"), b, precision="highest")
    return y if bias is None else y + bias.astype(jnp.float32)


def mlp_channels(
    x_btd: Array, gate: tuple[Array, Array], up: tuple[Array, Array], k: int, act: str = "silu"
) -> Array:
    """int32 [k] (sorted): the MLP intermediate channels to keep for a micro-batch.

    x_btd [B, T, D] (the tokens to average over); gate / up: (A [D, r], B [r, F]) factors.
    a = act(x̄ A_g B_g) * (x̄ A_u B_u) with x̄ = mean_t x [B, D]; top-k of ||a[:, c]||_2.
    """
    xbar = jnp.mean(x_btd.astype(jnp.float32), axis=1)
    a = ACTIVATIONS[act](_low_rank(xbar, *gate, None)) * _low_rank(xbar, *up, None)
    return _topk(jnp.sqrt(jnp.sum(a * a, axis=0)), k)


def head_aligned(kv_idx: Array, groups: int, head_dim: int) -> Array:
    """int32 [k * groups] (sorted): the q / attention-output channels (kvh * groups + g) * hd
    + d of kv channels c = kvh * hd + d, for every group g."""
    kvh, d = kv_idx // head_dim, kv_idx % head_dim
    g = jnp.arange(groups, dtype=jnp.int32)
    return jnp.sort(((kvh[:, None] * groups + g[None, :]) * head_dim + d[:, None]).reshape(-1))


def attention_channels(
    x_btd: Array,
    factors: dict[str, tuple[Array, Array, Array | None]],
    *,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    k: int,
) -> tuple[Array, Array, Array, Array]:
    """(q_idx [k*G], k_idx [k], v_idx [k], o_idx [k*G]) int32, sorted, G = heads / kv heads.

    x_btd [B, T, D] (all tokens); factors: {"q_proj" | "k_proj" | "v_proj": (A, B, bias or
    None)}; k: kv channels kept. Scores as in the module docstring (head-aligned for GQA)."""
    x = x_btd.reshape(-1, x_btd.shape[-1]).astype(jnp.float32)
    norm = lambda name: jnp.sqrt(jnp.sum(_low_rank(x, *factors[name]) ** 2, axis=0))
    groups = num_heads // num_kv_heads
    n_q = norm("q_proj").reshape(num_kv_heads, groups, head_dim).mean(axis=1).reshape(-1)
    kv_idx = _topk(n_q * norm("k_proj"), k)
    v_idx = _topk(norm("v_proj"), k)
    return (
        head_aligned(kv_idx, groups, head_dim),
        kv_idx,
        v_idx,
        head_aligned(v_idx, groups, head_dim),
    )


def _base(proj: nnx.Module) -> Dense:
    return proj.base if isinstance(proj, LoRALinear) else proj


def sparse_base(base: Dense, x: Array, idx: Array, mode: str, impl: str = "gather") -> Array:
    """The frozen projection over chosen channels: mode "out" computes output columns idx and
    scatters them into zeros [..., out]; mode "in" uses input channels idx only. impl "mask"
    is the dense oracle (full product, channels multiplied by a 0/1 mask)."""
    dt = base.dtype
    kernel = base.kernel[...]
    bias = None if base.bias is None else base.bias[...].astype(dt)
    x = x.astype(dt)
    if impl == "mask":
        if mode == "out":
            keep = jnp.zeros((kernel.shape[1],), dt).at[idx].set(1)
            return base(x) * keep
        return base(x * jnp.zeros((kernel.shape[0],), dt).at[idx].set(1))
    if mode == "out":
        y = jnp.dot(x, jnp.take(kernel, idx, axis=1).astype(dt))
        if bias is not None:
            y = y + jnp.take(bias, idx)
        return jnp.zeros((*x.shape[:-1], kernel.shape[1]), y.dtype).at[..., idx].set(y)
    y = jnp.dot(jnp.take(x, idx, axis=-1), jnp.take(kernel, idx, axis=0).astype(dt))
    return y if bias is None else y + bias


def project(
    proj: nnx.Module, x_btd: Array, idx: Array, tokens: int, mode: str, impl: str = "gather"
) -> Array:
    """A projection (Dense or `LoRALinear`) with the first `tokens` positions through
    `sparse_base` and the rest dense; a LoRA branch is added densely over all positions."""
    base = _base(proj)
    y = sparse_base(base, x_btd[:, :tokens], idx, mode, impl)
    if tokens < x_btd.shape[1]:
        y = jnp.concatenate([y, base(x_btd[:, tokens:]).astype(y.dtype)], axis=1)
    if isinstance(proj, LoRALinear):
        y = y + proj.delta(x_btd)
    return y


class SparseEstimate(nnx.Variable):
    """A frozen SVD factor of the estimator (not trained, not checkpointed)."""


def _adopt(new: nnx.Module, old: nnx.Module) -> None:
    for name, value in vars(old).items():
        if name != "_pytree__state":
            setattr(new, name, value)


class _SparseBlock:
    layer: int
    sparse_tokens: int
    sparse_impl: str
    sparsity: float
    keep: int

    def _factor(self, name: str) -> tuple[Array, Array]:
        return getattr(self, f"{name}_est_a")[...], getattr(self, f"{name}_est_b")[...]

    def _set_factors(self, kind: str, layer: int, est: Estimator) -> None:
        for name in ESTIMATED[kind]:
            key = estimator_key(layer, kind, name)
            if key not in est:
                raise ValueError(f"SparseLoRA estimator has no factors for {key}")
            a, b = est[key]
            setattr(self, f"{name}_est_a", SparseEstimate(jnp.asarray(a, jnp.float32)))
            setattr(self, f"{name}_est_b", SparseEstimate(jnp.asarray(b, jnp.float32)))


class SparseMLP(_SparseBlock, MLP):
    """An `MLP` (jaxstack/models/llm.py) whose base gate/up/down run over estimated channels
    on the first `sparse_tokens` positions; dense while sparse_tokens is 0."""

    def __init__(self, mlp: MLP, *, layer: int, sparsity: float, est: Estimator, mean: str):
        _adopt(self, mlp)
        self.layer = layer
        self.sparse_tokens, self.sparse_impl, self.mlp_mean = 0, "gather", mean
        self.sparsity = sparsity
        self.keep = keep_count(_base(mlp.gate_proj).kernel.get_value().shape[1], sparsity)
        self._set_factors("mlp", layer, est)

    def __call__(self, x_btd):
        m = self.sparse_tokens
        if not m:
            return super().__call__(x_btd)
        src = x_btd[:, :m] if self.mlp_mean == "context" else x_btd
        idx = jax.lax.stop_gradient(
            mlp_channels(
                src, self._factor("gate_proj"), self._factor("up_proj"), self.keep, self.hidden_act
            )
        )
        g = project(self.gate_proj, x_btd, idx, m, "out", self.sparse_impl)
        u = project(self.up_proj, x_btd, idx, m, "out", self.sparse_impl)
        h = constrain(ACTIVATIONS[self.hidden_act](g) * u, ("batch", "seq", "act_mlp"))
        return project(self.down_proj, h, idx, m, "in", self.sparse_impl)


class SparseAttention(_SparseBlock, Attention):
    """An `Attention` (jaxstack/models/llm.py) whose base q/k/v/o run over estimated channels
    on the first `sparse_tokens` positions. The sparse forward mirrors `Attention.__call__`
    without KV cache or sequence parallelism; with a cache, sequence parallelism or
    sparse_tokens 0 it is the dense `Attention.__call__`."""

    def __init__(self, attn: Attention, *, layer: int, sparsity: float, est: Estimator):
        _adopt(self, attn)
        self.layer = layer
        self.sparse_tokens, self.sparse_impl = 0, "gather"
        self.sparsity = sparsity
        self.keep = keep_count(self.num_kv_heads * self.head_dim, sparsity)
        self._set_factors("attn", layer, est)

    def _factors(self) -> dict[str, tuple[Array, Array, Array | None]]:
        out = {}
        for name in ESTIMATED["attn"]:
            bias = _base(getattr(self, name)).bias
            out[name] = (*self._factor(name), None if bias is None else bias[...])
        return out

    def __call__(self, x_btd, positions_bt, inv_freq, *, mask, causal, **kw):
        m = self.sparse_tokens
        if not m or kw.get("cache_kv") is not None or kw.get("sequence_parallel"):
            return super().__call__(x_btd, positions_bt, inv_freq, mask=mask, causal=causal, **kw)
        b, t, _ = x_btd.shape
        h, kvh, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q_idx, k_idx, v_idx, o_idx = jax.lax.stop_gradient(
            attention_channels(
                x_btd, self._factors(), num_heads=h, num_kv_heads=kvh, head_dim=hd, k=self.keep
            )
        )
        impl = self.sparse_impl
        q = project(self.q_proj, x_btd, q_idx, m, "out", impl).reshape(b, t, h, hd)
        k = project(self.k_proj, x_btd, k_idx, m, "out", impl).reshape(b, t, kvh, hd)
        v = project(self.v_proj, x_btd, v_idx, m, "out", impl).reshape(b, t, kvh, hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = constrain(apply_rope(q, positions_bt, inv_freq), ("batch", "seq", "act_heads", None))
        k = constrain(apply_rope(k, positions_bt, inv_freq), ("batch", "seq", "act_kv_heads", None))
        v = constrain(v, ("batch", "seq", "act_kv_heads", None))
        out = dot_product_attention(
            q,
            k,
            v,
            mask=mask,
            causal=causal,
            scale=self.scale,
            soft_cap=self.soft_cap,
            window=kw.get("window"),
        )
        out = constrain(out, ("batch", "seq", "act_heads", None)).reshape(b, t, -1)
        return project(self.o_proj, out, o_idx, m, "in", impl), None


def sparse_blocks(model: nnx.Module) -> list[SparseMLP | SparseAttention]:
    """Every SparseLoRA block of `model`, in module-tree order."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, SparseMLP | SparseAttention)]


def apply_sparselora(
    model: nnx.Module, cfg: SparseLoRAConfig, est: Estimator | None = None
) -> Estimator:
    """Make the decoder blocks `cfg.sparsity` lists sparse, in place; returns the estimator
    used (`est`, or built from `model`'s frozen kernels with `cfg.rank`). Apply it after
    `jaxstack.lora.apply_lora` (the LoRA branches stay dense) or to a model without adapters.
    ValueError for a layer the model lacks, a sparsity keeping no channel, FP8 projections or
    a model that is already sparse."""
    if sparse_blocks(model):
        raise ValueError(f"the {type(model).__name__} already has SparseLoRA blocks")
    blocks = decoder_blocks(model)
    n_layers = 1 + max((i for i, _, _ in blocks), default=-1)
    for kind, table in (("mlp", cfg.sparsity.mlp), ("attn", cfg.sparsity.attn)):
        for layer, _ in table:
            if layer >= n_layers:
                raise ValueError(
                    f"SparseLoRA {kind} sparsity names layer {layer}; the model has {n_layers}"
                )
    chosen = [(i, kind, blk) for i, kind, blk in blocks if cfg.sparsity.at(kind, i) is not None]
    if est is None:
        est = build_estimator(model, cfg.rank, layers=[(i, kind) for i, kind, _ in chosen])
    parents = {id(blk): where for blk, where in _block_parents(model)}
    for i, kind, blk in chosen:
        for name in ATTN_PROJ if kind == "attn" else MLP_PROJ:
            if _base(getattr(blk, name)).matmul is not None:
                raise ValueError(f"SparseLoRA does not support FP8 projections (layer {i} {name})")
        s = cfg.sparsity.at(kind, i)
        if kind == "mlp":
            new = SparseMLP(blk, layer=i, sparsity=s, est=est, mean=cfg.mlp_mean)
        else:
            new = SparseAttention(blk, layer=i, sparsity=s, est=est)
        parent, key = parents[id(blk)]
        setattr(parent, key, new)
    return est


ATTN_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJ = ("gate_proj", "up_proj", "down_proj")


def _block_parents(model: nnx.Module):
    for _, module in nnx.iter_modules(model):
        for key, value in list(vars(module).items()):
            if isinstance(value, Attention | MLP):
                yield value, (module, key)


def set_sparse_tokens(model: nnx.Module, tokens: int, impl: str = "gather") -> None:
    """Run the next forward passes of `model` with the first `tokens` positions sparse (0 =
    dense), in place. impl: "gather" (smaller GEMMs) or "mask" (the dense oracle: full
    products times 0/1 channel masks). Call it on the model rebuilt inside a jitted step."""
    if impl not in IMPLS:
        raise ValueError(f"SparseLoRA impl must be one of {IMPLS}, got {impl!r}")
    if tokens < 0:
        raise ValueError(f"SparseLoRA sparse_tokens must be >= 0, got {tokens}")
    for blk in sparse_blocks(model):
        blk.sparse_tokens, blk.sparse_impl = int(tokens), impl


def model_estimator(model: nnx.Module) -> Estimator:
    """The estimator factors held by `model`'s SparseLoRA blocks (for `save_estimator`)."""
    est: Estimator = {}
    for blk in sparse_blocks(model):
        kind = "mlp" if isinstance(blk, SparseMLP) else "attn"
        for name in ESTIMATED[kind]:
            a, b = blk._factor(name)
            est[estimator_key(blk.layer, kind, name)] = (np.asarray(a), np.asarray(b))
    return est
