"""Diffusion-LLM decoding: the LLaDA block sampler, Fast-dLLM prefix / dual KV caches, and
confidence-aware parallel decoding (threshold and factor rules).

`dllm_generate(model, prompt_ids, gen_length=...)` fills `gen_length` [MASK] slots after the
prompt, block by block (semi-autoregressive). Per block [s, e) of `block_length` tokens:

* step 0 is one full forward over the whole sequence. With a cache it also (re)builds the
  per-layer K/V cache (post-RoPE K, absolute positions); it counts as one NFE.
* then, while the block still holds a [MASK], one more forward per step (a loop with a static
  trip count under the k_i schedule, a `lax.while_loop` under the threshold / factor rules):
  cache=None: the full sequence again; cache="prefix": the queries x[s:] (in a bucketed
  window, see below) against the cached K/V of positions < s; cache="dual": only the block's
  tokens, whose fresh K/V replace slots [s, e) of the cache before they attend to the whole
  cache (stale suffix [MASK] K/V included).
* each step predicts x_hat (argmax, or Gumbel-max at temperature T > 0) and a confidence c
  (softmax probability of x_hat, or U(0, 1) for remasking="random") for the block's masked
  positions, then commits: the k_i most confident (k_i = n // s_b + [i < n % s_b], s_b = steps
  per block), or the threshold rule (rank 1 always, others iff c >= threshold), or the factor
  rule (rank n passes iff c_n >= 1 - f / (n + 1); ranks before the first failure; a failure
  at the last masked rank is accepted anyway). Ties in confidence go to the lower position.

Dream (kind="dream"): logits are shifted by one (position i is predicted from the logits at
i - 1; inside a cached query window the window's first position keeps its own logits, as in
Fast-dLLM), and, as in Fast-dLLM's Dream block sampler, step 0 of a block commits exactly the
block's first token; the k_i schedule then spreads the remaining n - 1 tokens over
max(s_b - 1, 1) steps.

Numerics: confidence and Gumbel noise are computed in float64 when x64 is enabled (the
reference's precision; tests enable it), else float32. NFE = sum over blocks of (1 + cached
steps), tokens_per_step = gen_length / NFE; the batch shares its forwards, so NFE counts the
steps until every row's block is full.

Static shapes: the block start s is a runtime value in every mode; cache=None and "dual"
compile one block program. "prefix" queries x[s:] (length L_total - s) run in a window of
min(round_up(L_total - s, prefix_bucket), gen_length) slots, so it compiles at most
ceil(gen_length / prefix_bucket) programs. Window slots >= L_total hold [MASK] ids, are masked
out as keys (the cache gets the window's extra slots after the step-0 refresh) and their
outputs are discarded. Blocks run from a Python loop; each block is one jitted call.
`TRACE_COUNTS["block"]` counts the block programs traced (a hook to catch recompiles, as
`jaxstack.generate.engine.TRACE_COUNTS`).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.models.dllm import KINDS, LLADA_MASK_ID
from jaxstack.models.llm import LLM, KVCache

Array = jax.Array

CACHE_MODES = (None, "prefix", "dual")
REMASKING = ("low_confidence", "random")
# Block programs traced so far (one per compiled program; bumped at trace time only).
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


# -- commit rules (pure functions of confidences; tested directly) --------------------------------


def confidence_ranks(conf_bk: Array, masked_bk: Array) -> Array:
    """Rank int32 [B, K] of each masked position by descending confidence (0 = most
    confident; ties: lower position first); unmasked positions rank after all masked ones."""
    key = jnp.where(masked_bk, -conf_bk, jnp.inf)
    order = jnp.argsort(key, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1, stable=True).astype(jnp.int32)


def topk_transfer(conf_bk: Array, masked_bk: Array, k_b: Array) -> Array:
    """Commit the k_b[b] most confident masked positions of each row. Returns bool [B, K]."""
    return masked_bk & (confidence_ranks(conf_bk, masked_bk) < k_b[:, None])


def threshold_transfer(conf_bk: Array, masked_bk: Array, threshold: float) -> Array:
    """Fast-dLLM threshold rule: rank 1 always, every other masked position iff c >= threshold."""
    ranks = confidence_ranks(conf_bk, masked_bk)
    return masked_bk & ((ranks == 0) | (conf_bk >= threshold))


def factor_transfer(conf_bk: Array, masked_bk: Array, factor: float) -> Array:
    """Fast-dLLM factor rule (`get_transfer_index_dynamic`).

    Sorted confidences c_(1) >= c_(2) >= ...: rank 1 is forced; rank n passes iff
    c_(n) >= 1 - factor / (n + 1). The ranks before the first failure are accepted, except
    that a failure at the last masked rank is accepted anyway (the reference's quirk).
    """
    ranks = confidence_ranks(conf_bk, masked_bk)
    k = conf_bk.shape[-1]
    sorted_c = -jnp.sort(jnp.where(masked_bk, -conf_bk, jnp.inf), axis=-1)  # descending
    idx = jnp.arange(k)
    thresh = jnp.where(idx == 0, -1.0, 1.0 - factor / (idx + 2.0)).astype(sorted_c.dtype)
    m = jnp.sum(masked_bk, axis=-1, keepdims=True)  # [B, 1]
    fail = (idx < m) & (sorted_c < thresh)
    first_fail = jnp.min(jnp.where(fail, idx, m), axis=-1, keepdims=True)
    n_accept = jnp.where(first_fail >= m - 1, m, first_fail)
    return masked_bk & (ranks < n_accept)


def num_transfer_schedule(n_b: Array, steps: int) -> Array:
    """k_i = n // steps + [i < n % steps] for i < steps: int32 [B, steps]."""
    i = jnp.arange(steps)
    n = n_b[:, None].astype(jnp.int32)
    return (n // steps + (i < n % steps)).astype(jnp.int32)


def _float_dtype():
    """float64 where x64 is enabled (the reference's precision), else float32."""
    canonicalize = getattr(jax.dtypes, "canonicalize_dtype", None)
    return canonicalize(jnp.float64) if canonicalize else jnp.result_type(float)


def step_noise(key: Array, step: Array | int, shape: tuple[int, ...]) -> tuple[Array, Array]:
    """The randomness of one decode step: (gumbel_u [B, K, V], remask_u [B, K]) ~ U(0, 1).

    Drawn from fold_in(key, step) where step is the global forward count; exposed so that
    reference implementations can reproduce a sampled run.
    """
    k1, k2 = jax.random.split(jax.random.fold_in(key, step))
    dt = _float_dtype()
    tiny = float(jnp.finfo(dt).tiny)
    return (
        jax.random.uniform(k1, shape, dt, minval=tiny, maxval=1.0),
        jax.random.uniform(k2, shape[:2], dt),
    )


def predict(
    logits_bkv: Array,
    *,
    temperature: float,
    remasking: str,
    key: Array,
    step: Array,
    mask_id: int | None = None,
) -> tuple[Array, Array]:
    """(x_hat int32 [B, K], confidence [B, K]) from block logits (float64 under x64).

    x_hat: argmax (temperature 0) or Gumbel-max argmax exp(l) / (-log u)^T, evaluated as
    l - T log(-log u), never `mask_id` (the reference may predict [MASK] and then loops until
    it stops doing so; trained models never do); confidence: softmax(l)[x_hat] over the raw
    logits (low_confidence) or U(0, 1) (random).
    """
    lf = logits_bkv.astype(_float_dtype())
    gumbel_u, remask_u = step_noise(key, step, lf.shape)
    score = lf - temperature * jnp.log(-jnp.log(gumbel_u)) if temperature > 0 else lf
    if mask_id is not None:
        score = score.at[..., mask_id].set(-jnp.inf)
    x_hat = jnp.argmax(score, axis=-1)
    if remasking == "low_confidence":
        p = jax.nn.softmax(lf, axis=-1)
        conf = jnp.take_along_axis(p, x_hat[..., None], axis=-1)[..., 0]
    else:
        conf = remask_u
    return x_hat.astype(jnp.int32), conf


# -- the sampler ------------------------------------------------------------------------------------


@dataclasses.dataclass
class DLLMOutput:
    """Result of `dllm_generate`.

    tokens: int32 [B, gen_length], the generated tokens; sequences: int32 [B, Lp + gen_length]
    (prompt then tokens). nfe: forward passes (shared by the batch); tokens_per_step:
    gen_length / nfe; nfe_per_block: list of per-block NFE (1 refresh + cached steps).
    trace (trace=True only): per block, dict(x=[B, L_total] at the block start,
    logits=[B, Bk, V] the block logits of step 0, before any shift).
    """

    tokens: Array
    sequences: Array
    nfe: int
    tokens_per_step: float
    nfe_per_block: list[int]
    trace: list[dict[str, Array]] | None = None


@dataclasses.dataclass(frozen=True)
class _Static:
    prompt_len: int
    total_len: int
    block_length: int
    steps_per_block: int
    cache: str | None
    threshold: float | None
    factor: float | None
    temperature: float
    remasking: str
    mask_id: int
    kind: str
    cache_dtype: Any
    cache_len: int  # K/V slots of the cached steps: L_total plus the prefix window padding
    trace: bool


def _block_index(s: Array | int, bk: int, shift: bool) -> Array:
    """Sequence columns whose logits predict block [s, s + bk) (Dream: column i - 1)."""
    idx = s + jnp.arange(bk)
    return jnp.maximum(idx - 1, 0) if shift else idx


def _full_logits_at(model, x: Array, idx: Array) -> Array:
    """Logits [B, K, V] of columns idx of a full (uncached) forward; the LM head runs on those
    columns only."""
    return model.logits(jnp.take(model.hidden_states(x), idx, axis=1))


def _commit(x_bl, block_logits, s, step, sched, st: _Static, key, is_first):
    """Apply one decode step's commits to the block of x. Returns the new x."""
    bk = st.block_length
    xb = jax.lax.dynamic_slice_in_dim(x_bl, s, bk, axis=1)
    masked = xb == st.mask_id
    x_hat, conf = predict(
        block_logits,
        temperature=st.temperature,
        remasking=st.remasking,
        key=key,
        step=step,
        mask_id=st.mask_id,
    )
    if st.kind == "dream" and is_first:
        transfer = masked & (jnp.arange(bk) == 0)[None]
    elif st.threshold is not None:
        transfer = threshold_transfer(conf, masked, st.threshold)
    elif st.factor is not None:
        transfer = factor_transfer(conf, masked, st.factor)
    else:
        transfer = topk_transfer(conf, masked, sched)
    xb = jnp.where(transfer, x_hat, xb)
    return jax.lax.dynamic_update_slice_in_dim(x_bl, xb, s, axis=1)


def _positions(b: int, start, length: int) -> Array:
    return jnp.broadcast_to(start + jnp.arange(length, dtype=jnp.int32), (b, length))


def _prefix_window(rest: int, bucket: int, gen_length: int) -> int:
    """Query window of a prefix-cache step with `rest` = L_total - s real query positions."""
    return min(-(-rest // bucket) * bucket, gen_length)


def _pad_cache(cache: KVCache, n: int) -> KVCache:
    """Append n empty (masked-out) slots to every K/V buffer."""
    if n == 0:
        return cache

    def pad(a):
        return jnp.pad(a, [(0, 0), (0, n)] + [(0, 0)] * (a.ndim - 2))

    return dataclasses.replace(
        cache, k=tuple(map(pad, cache.k)), v=tuple(map(pad, cache.v)), kv_mask=pad(cache.kv_mask)
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "st", "window"))
def _run_block(graphdef, state, x, key, nfe, s, *, st: _Static, window: int | None):
    """One block: refresh forward (step 0) then the while-loop of cached/uncached steps.

    window: the prefix-cache query window length (cache="prefix" only).
    Returns (x, nfe, block_nfe, trace_logits-or-None)."""
    TRACE_COUNTS["block"] += 1
    model = nnx.merge(graphdef, state)
    b, total = x.shape
    bk, shift = st.block_length, st.kind == "dream"

    # k_i schedule from the block's masks at block start (Dream: step 0 commits one token).
    n0 = jnp.sum(jax.lax.dynamic_slice_in_dim(x, s, bk, axis=1) == st.mask_id, axis=1)
    steps, offset = _schedule_steps(st)
    sched_all = num_transfer_schedule(jnp.maximum(n0 - offset, 0), steps)

    def sched_at(i):
        j = jnp.clip(i - offset, 0, steps - 1)
        return jax.lax.dynamic_index_in_dim(sched_all, j, axis=1, keepdims=False)

    # Step 0: full forward (and the cache refresh). Only the block's logits are computed; the
    # trace also keeps the unshifted block logits, so it asks for the block's columns too.
    block_idx = _block_index(s, bk, shift)
    idx = jnp.concatenate([block_idx, s + jnp.arange(bk)]) if st.trace else block_idx
    if st.cache is None:
        logits = _full_logits_at(model, x, idx)
        cache = None
    else:
        empty = KVCache.init(model.cfg, b, total, dtype=st.cache_dtype)
        logits, cache = model.decode_step(
            empty, x, positions=_positions(b, 0, total), logits_index=idx
        )
        cache = _pad_cache(cache, st.cache_len - total)
    x = _commit(x, logits[:, :bk], s, nfe, sched_at(0), st, key, is_first=True)
    trace_logits = logits[:, bk:] if st.trace else None

    # Cached steps: the query window starts at the block, so its block logits come from
    # window columns 0..bk-1 (Dream: 0, 0..bk-2).
    window_idx = _block_index(0, bk, shift)

    def step_logits(x, cache):
        """Block logits of one step; with a cache also the cache holding this step's K/V. The
        loop carries that cache so the step's K/V land in place: the next step rewrites the
        same slots (the block, or the whole prefix window) before attending, so what it
        reads is unchanged."""
        if st.cache is None:
            return _full_logits_at(model, x, block_idx), None
        at_s = dataclasses.replace(cache, index=s)
        if st.cache == "prefix":
            pad = st.cache_len - total
            q = jnp.pad(x, ((0, 0), (0, pad)), constant_values=st.mask_id)
            q = jax.lax.dynamic_slice_in_dim(q, s, window, axis=1)
            pos = _positions(b, s, window)
            out, cache = model.decode_step(
                at_s, q, positions=pos, input_mask=pos < total, logits_index=window_idx
            )
        else:
            q = jax.lax.dynamic_slice_in_dim(x, s, bk, axis=1)
            out, cache = model.decode_step(
                at_s, q, positions=_positions(b, s, bk), visible_len=total, logits_index=window_idx
            )
        return out, cache

    def body(carry):
        x, nfe, i, cache = carry
        logits, cache = step_logits(x, cache)
        x = _commit(x, logits, s, nfe, sched_at(i), st, key, is_first=False)
        return x, nfe + 1, i + 1, cache

    one = jnp.ones((), jnp.int32)
    carry = (x, nfe + one, one, cache)
    fixed = _fixed_step_count(st)
    if fixed is not None:
        # The k_i schedule fills the (all-[MASK]) block in a step count known here: a loop
        # with a static trip count, which XLA runs without reading a predicate back to the
        # host between steps.
        carry = jax.lax.fori_loop(0, fixed, lambda _, c: body(c), carry)
    else:
        # Threshold / factor rules: data-dependent length. Every step commits >= 1 token per
        # unfinished row (rank 1), so a block ends within Bk steps; the bound only guards
        # against a broken invariant.
        max_steps = max(st.steps_per_block, bk) + 1

        def cond(carry):
            x, _, i, _ = carry
            has_mask = jnp.any(jax.lax.dynamic_slice_in_dim(x, s, bk, axis=1) == st.mask_id)
            return has_mask & (i < max_steps)

        carry = jax.lax.while_loop(cond, body, carry)
    x, nfe_out, i, _ = carry
    return x, nfe_out, i, trace_logits


def _schedule_steps(st: _Static) -> tuple[int, int]:
    """(steps the k_i schedule spreads over, tokens step 0 commits outside it): LLaDA (s_b, 0);
    Dream (max(s_b - 1, 1), 1), its step 0 committing the block's first token."""
    if st.kind == "dream":
        return max(st.steps_per_block - 1, 1), 1
    return st.steps_per_block, 0


def _fixed_step_count(st: _Static) -> int | None:
    """Cached steps after step 0 under the k_i schedule (None for threshold / factor rules).

    A block starts all [MASK] (n = Bk): the schedule spreads Bk - offset tokens over `steps`
    steps, min(steps, Bk - offset) of them nonzero; step 0 takes the first unless it commits
    outside the schedule (offset 1, Dream)."""
    if st.threshold is not None or st.factor is not None:
        return None
    steps, offset = _schedule_steps(st)
    return min(steps, st.block_length - offset) - (1 - offset)


def dllm_generate(
    model: LLM,
    prompt_ids: Array | np.ndarray,
    *,
    gen_length: int,
    block_length: int = 32,
    steps: int | None = None,
    threshold: float | None = None,
    factor: float | None = None,
    cache: str | None = None,
    temperature: float = 0.0,
    remasking: str = "low_confidence",
    mask_id: int = LLADA_MASK_ID,
    kind: str = "llada",
    seed: int = 0,
    cache_dtype: Any = None,
    prefix_bucket: int = 128,
    trace: bool = False,
) -> DLLMOutput:
    """Generate `gen_length` tokens after each prompt with a diffusion LLM.

    prompt_ids int [B, Lp] (equal-length prompts; no padding); gen_length % block_length == 0;
    steps: total steps (default gen_length, one token per step), a multiple of the number of
    blocks; ignored when threshold or factor is set (a block runs until it has no [MASK]).
    threshold / factor: parallel decoding rule (at most one). cache: None | "prefix" | "dual".
    temperature: Gumbel-max temperature (0 = argmax); remasking: "low_confidence" | "random".
    mask_id: the [MASK] id; kind: "llada" | "dream" (logit shift). seed: PRNG seed of the
    sampling noise. cache_dtype: K/V cache dtype (default the model's compute dtype).
    prefix_bucket (cache="prefix"): the cached steps' query window x[s:] is rounded up to a
    multiple of prefix_bucket (at most gen_length), so at most ceil(gen_length / prefix_bucket)
    block programs compile; padded window slots never affect the result. prefix_bucket =
    block_length gives one unpadded program per block.
    trace: also return each block's start state and step-0 block logits (tests, debugging).
    """
    prompt = jnp.asarray(prompt_ids, jnp.int32)
    if prompt.ndim != 2:
        raise ValueError(f"prompt_ids must be [B, Lp], got shape {prompt.shape}")
    if gen_length <= 0 or block_length <= 0 or gen_length % block_length:
        raise ValueError(
            f"gen_length={gen_length} must be a positive multiple of block_length={block_length}"
        )
    num_blocks = gen_length // block_length
    steps = gen_length if steps is None else steps
    if steps <= 0 or steps % num_blocks:
        raise ValueError(f"steps={steps} must be a positive multiple of num_blocks={num_blocks}")
    if threshold is not None and factor is not None:
        raise ValueError("set at most one of threshold and factor")
    if cache not in CACHE_MODES:
        raise ValueError(f"unknown cache mode {cache!r}; choose from {CACHE_MODES}")
    if remasking not in REMASKING:
        raise ValueError(f"unknown remasking {remasking!r}; choose from {REMASKING}")
    if kind not in KINDS:
        raise ValueError(f"unknown diffusion LLM kind {kind!r}; choose from {KINDS}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if prefix_bucket <= 0:
        raise ValueError(f"prefix_bucket must be positive, got {prefix_bucket}")
    b, lp = prompt.shape
    total = lp + gen_length
    starts = [lp + blk * block_length for blk in range(num_blocks)]
    windows, cache_len = [None] * num_blocks, total
    if cache == "prefix":
        windows = [_prefix_window(total - s, prefix_bucket, gen_length) for s in starts]
        cache_len = max(s + w for s, w in zip(starts, windows, strict=True))
    st = _Static(
        prompt_len=lp,
        total_len=total,
        block_length=block_length,
        steps_per_block=steps // num_blocks,
        cache=cache,
        threshold=None if threshold is None else float(threshold),
        factor=None if factor is None else float(factor),
        temperature=float(temperature),
        remasking=remasking,
        mask_id=int(mask_id),
        kind=kind,
        cache_dtype=jnp.dtype(model.dtype if cache_dtype is None else cache_dtype),
        cache_len=cache_len,
        trace=trace,
    )
    graphdef, state = nnx.split(model)
    x = jnp.concatenate([prompt, jnp.full((b, gen_length), mask_id, jnp.int32)], axis=1)
    key = jax.random.key(seed)
    nfe = jnp.zeros((), jnp.int32)
    per_block, traces = [], []
    for s, window in zip(starts, windows, strict=True):
        x_start = x
        x, nfe, block_nfe, logits0 = _run_block(
            graphdef, state, x, key, nfe, jnp.asarray(s, jnp.int32), st=st, window=window
        )
        per_block.append(block_nfe)
        if trace:
            traces.append({"x": x_start, "logits": logits0})
    nfe_total = int(nfe)
    return DLLMOutput(
        tokens=x[:, lp:],
        sequences=x,
        nfe=nfe_total,
        tokens_per_step=gen_length / nfe_total,
        nfe_per_block=[int(n) for n in per_block],
        trace=traces if trace else None,
    )
