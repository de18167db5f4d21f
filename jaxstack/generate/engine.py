"""Batched autoregressive generation with a KV cache: prefill once, then a jitted decode loop.

`generate` takes lists of token ids and returns lists; `generate_tokens` is the array-level
engine (left-padded ids or embeddings in, token / log-prob arrays out) that rollout code reuses.

How a call runs (B prompts, padded prompt length T, N = max_new_tokens):

1. Prefill (one compiled program): prompt columns [0, T - 1) go through `model.decode_step`
   into a `KVCache` of T + N slots; their logits are never used, so XLA never computes the
   [B, T, V] logits. Prompts are left padded, so column T - 1 is every row's last real token.
   With `prefill_chunk` C > 0 the columns go in chunks of C (a first chunk of (T - 1) mod C
   columns, then a `lax.scan` over the full chunks), so the transient attention mask and
   scores are [B, 1 | H, C, T + N] instead of [B, 1 | H, T - 1, T + N] (long video prompts);
   same cache, same results.
2. Decode (one compiled program): a `lax.while_loop` feeds the last prompt token (step 0) and
   then each sampled token back, one cache slot per step, and exits as soon as every row has
   produced a stop token (or after N tokens). Finished rows emit `pad_id` and log-prob 0.

With `num_samples` G > 1 (RL rollouts, `jaxstack.generate.rollout`) the prefill program
repeats its carry's rows G times after prefilling the B prompts once, so the decode loop runs
B * G rows (b * G + g) sharing each prompt's prefill.

Compiled programs are cached on (program, model graph, parameter shapes/dtypes/shardings,
input shapes, static settings, JAX's context mesh, sequence-parallel options). The static settings are N and the cache dtype, plus,
for the prefill program only, num_samples and prefill_chunk, and, for the decode program only,
pad_id, whether greedy and top-p are on, and top_k (static because `lax.top_k` needs it;
sampling from k candidates is the fast path). The temperature and top_p values and the stop
tokens (padded to a multiple of 8 entries) are runtime inputs, so changing them does not
recompile. `TRACE_COUNTS` counts traces per program (a hook to catch recompiles).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.generate.sampling import sample_with_logprobs
from jaxstack.models.llm import KVCache
from jaxstack.parallel.mesh import context_mesh
from jaxstack.parallel.sequence import sequence_parallel_options

Array = jax.Array

# Number of times each program was traced (= compiled) in this process, by name.
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass
class GenerationOutput:
    """Result of `generate`, one entry per prompt.

    tokens: the new tokens, cut after (and including) the first stop token.
    logprobs: their log-probs under the temperature-scaled, unfiltered distribution
      (temperature 0 counts as 1), float32 values as Python floats.
    num_generated: len(tokens[i]) per prompt.
    num_steps: decode positions computed (< max_new_tokens when all rows stopped early).
    prompt_length: the padded (bucketed) prompt length T.
    prefill_seconds: wall time of the prefill (prompt minus its last token) and
      decode_seconds of the decode loop (compilation excluded, device synchronised);
      compile_seconds: time spent compiling in this call (0.0 when every program was cached).
    """

    tokens: list[list[int]]
    logprobs: list[list[float]]
    num_generated: list[int]
    num_steps: int
    prompt_length: int
    prefill_seconds: float
    decode_seconds: float
    compile_seconds: float = 0.0

    @property
    def total_generated(self) -> int:
        return sum(self.num_generated)

    @property
    def decode_tokens_per_second(self) -> float:
        """Generated tokens (all rows) per second of decode time."""
        return self.total_generated / max(self.decode_seconds, 1e-9)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GeneratedTokens:
    """Array result of `generate_tokens`.

    tokens: int32 [B, N], pad_id after a row's stop token (and for empty rows).
    logprobs: float32 [B, N], 0 where tokens are padding.
    lengths: int32 [B], tokens generated per row including the stop token.
    num_steps: int32 [], decode positions computed (max of lengths).
    """

    tokens: Array
    logprobs: Array
    lengths: Array
    num_steps: Array


@dataclasses.dataclass(frozen=True)
class _Static:
    """Compile-time settings of one generation program."""

    max_new_tokens: int
    greedy: bool
    top_k: int
    top_p_on: bool
    pad_id: int
    cache_dtype: Any
    num_samples: int = 1  # prefill only: rows repeated after the prefill (see `_prefill`)
    prefill_chunk: int = 0  # prefill only: prompt columns per decode_step call (0 = all)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Carry:
    """Decode-loop state (B rows, N = max_new_tokens, D hidden size).

    step: int32 [], the output column filled next. first: [B, D] input embedding of the last
    prompt column (fed at step 0). last: int32 [B], the token fed at step > 0. done: bool [B].
    tokens int32 / logprobs float32: [B, N]. lengths, prompt_lengths: int32 [B]. rng: key.
    """

    step: Array
    cache: KVCache
    first: Array
    last: Array
    done: Array
    tokens: Array
    logprobs: Array
    lengths: Array
    prompt_lengths: Array
    rng: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class _Sampling:
    """Runtime sampling settings: temperature float32 [], top_p float32 [], stop int32 [S]
    (see `_stop_array`)."""

    temperature: Array
    top_p: Array
    stop: Array


def _stop_array(stop_tokens: Sequence[int]) -> Array:
    """Stop ids int32 [S], S a multiple of 8, padded with -1 (matches no token)."""
    ids = sorted({int(s) for s in stop_tokens})
    if any(s < 0 for s in ids):
        raise ValueError(f"stop tokens must be >= 0, got {ids}")
    size = max(8, -(-len(ids) // 8) * 8)
    return jnp.asarray(ids + [-1] * (size - len(ids)), jnp.int32)


def _prefill(
    st: _Static,
    graphdef: nnx.GraphDef,
    state: nnx.State,
    input_ids: Array | None,
    inputs_embeds: Array | None,
    input_mask: Array,
    rng: Array,
) -> _Carry:
    """Prompt (ids int [B, T] or embeds [B, T, D]) -> the decode loop's initial carry.

    Columns [0, T - 1) go into the KV cache (their logits are unused, so XLA never computes
    them); the last column is kept as an embedding for the loop's first step. With
    `st.prefill_chunk` C > 0 they go through `decode_step` C columns at a time: first the
    (T - 1) mod C leading columns (if any) in one call, then the full chunks in a `lax.scan`
    (one traced body, so compile time does not grow with T). With
    `st.num_samples` G > 1 the prompts are prefilled once and the carry's rows (cache, first
    embedding, done, prompt lengths) are then repeated G times, row b * G + g being sample g of
    prompt b, so the decode loop runs B * G rows that share each prompt's prefill.
    """
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(graphdef, state)
    b, t = input_mask.shape
    input_mask = input_mask.astype(bool)
    embeds = model.embed(input_ids) if input_ids is not None else inputs_embeds
    embeds = embeds.astype(model.dtype)
    cache = KVCache.init(model.cfg, b, t + st.max_new_tokens, st.cache_dtype)
    if t > 1:
        positions = jnp.maximum(jnp.cumsum(input_mask.astype(jnp.int32), axis=1) - 1, 0)
        cache = _prefill_columns(
            model, cache, embeds[:, :-1], positions[:, :-1], input_mask[:, :-1], st.prefill_chunk
        )
    first = embeds[:, -1]
    done = ~input_mask[:, -1]  # rows that are all padding generate nothing
    prompt_lengths = jnp.sum(input_mask, axis=1, dtype=jnp.int32)
    g = st.num_samples
    if g > 1:  # share the prefill: repeat each prompt's row G times (b * G + g)
        rows = functools.partial(jnp.repeat, repeats=g, axis=0, total_repeat_length=b * g)
        cache = KVCache(
            k=tuple(rows(x) for x in cache.k),
            v=tuple(rows(x) for x in cache.v),
            kv_mask=rows(cache.kv_mask),
            index=cache.index,
        )
        first, done, prompt_lengths = rows(first), rows(done), rows(prompt_lengths)
        b *= g
    n = st.max_new_tokens
    return _Carry(
        step=jnp.zeros((), jnp.int32),
        cache=cache,
        first=first,
        last=jnp.zeros((b,), jnp.int32),  # unused at step 0
        done=done,
        tokens=jnp.zeros((b, n), jnp.int32),  # set to pad_id by the decode program
        logprobs=jnp.zeros((b, n), jnp.float32),
        lengths=jnp.zeros((b,), jnp.int32),
        prompt_lengths=prompt_lengths,
        rng=rng,
    )


def _prefill_columns(
    model: nnx.Module, cache: KVCache, embeds: Array, positions: Array, mask: Array, chunk: int
) -> KVCache:
    """Write L prompt columns (embeds [B, L, D], positions / mask [B, L]) into `cache`.

    chunk 0 (or >= L): one `decode_step` call. Otherwise the first L mod chunk columns go in one
    call and the remaining L // chunk full chunks in a `lax.scan`, each attending to the cache
    filled so far, so the attention mask / scores are [B, 1 | H, chunk, S], not [.., L, S].
    """
    length = embeds.shape[1]
    if chunk <= 0 or chunk >= length:
        _, cache = model.decode_step(
            cache, inputs_embeds=embeds, positions=positions, input_mask=mask
        )
        return cache
    rem = length % chunk
    if rem:
        _, cache = model.decode_step(
            cache,
            inputs_embeds=embeds[:, :rem],
            positions=positions[:, :rem],
            input_mask=mask[:, :rem],
        )

    def chunks(x: Array) -> Array:  # [B, L', ...] -> [L' / chunk, B, chunk, ...]
        x = x[:, rem:]
        x = x.reshape(x.shape[0], -1, chunk, *x.shape[2:])
        return jnp.moveaxis(x, 1, 0)

    def body(c: KVCache, xs: tuple[Array, Array, Array]) -> tuple[KVCache, None]:
        e, p, m = xs
        _, c = model.decode_step(c, inputs_embeds=e, positions=p, input_mask=m)
        return c, None

    cache, _ = jax.lax.scan(body, cache, (chunks(embeds), chunks(positions), chunks(mask)))
    return cache


def _decode(
    st: _Static,
    graphdef: nnx.GraphDef,
    state: nnx.State,
    carry: _Carry,
    sampling: _Sampling,
) -> _Carry:
    """Run the decode loop from the prefill carry until every row stopped or N tokens."""
    TRACE_COUNTS["decode"] += 1
    model = nnx.merge(graphdef, state)

    def cond(c: _Carry) -> Array:
        return (c.step < st.max_new_tokens) & ~jnp.all(c.done)

    def body(c: _Carry) -> _Carry:
        last = jnp.clip(c.last, 0, model.cfg.vocab_size - 1)  # finished rows hold pad_id
        x = jnp.where(c.step == 0, c.first, model.embed(last).astype(c.first.dtype))
        # The input sits at position prompt_length - 1 + step (step 0: the last prompt token).
        positions = (c.prompt_lengths - 1 + c.step)[:, None]
        logits, cache = model.decode_step(c.cache, inputs_embeds=x[:, None], positions=positions)
        rng, key = jax.random.split(c.rng)
        tok, lp = sample_with_logprobs(
            logits[:, 0],
            key,
            temperature=0.0 if st.greedy else sampling.temperature,
            top_k=st.top_k,
            top_p=sampling.top_p if st.top_p_on else 1.0,
        )
        tok = jnp.where(c.done, st.pad_id, tok).astype(jnp.int32)
        lp = jnp.where(c.done, 0.0, lp)
        return _Carry(
            step=c.step + 1,
            cache=cache,
            first=c.first,
            last=tok,
            done=c.done | jnp.any(tok[:, None] == sampling.stop[None, :], axis=1),
            tokens=jax.lax.dynamic_update_slice_in_dim(c.tokens, tok[:, None], c.step, axis=1),
            logprobs=jax.lax.dynamic_update_slice_in_dim(c.logprobs, lp[:, None], c.step, 1),
            lengths=c.lengths + (~c.done).astype(jnp.int32),
            prompt_lengths=c.prompt_lengths,
            rng=rng,
        )

    carry = dataclasses.replace(carry, tokens=jnp.full_like(carry.tokens, st.pad_id))
    # Returning the whole final carry lets the donated input carry (above all the KV cache)
    # alias the loop state, so decoding updates the prefill's cache in place, without a copy.
    return jax.lax.while_loop(cond, body, carry)


# -- compilation cache -------------------------------------------------------------------------


class _CompileCache:
    """Compiled executables keyed by (program, graphdef, static settings, input signature).

    GraphDefs are hashable unless a static module attribute is not (e.g. an LLMConfig holding
    a `rope_scaling` dict); those are matched by equality in a short list instead.
    """

    def __init__(self, max_entries: int = 64):
        self.max_entries = max_entries
        self._hashed: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
        self._unhashable: list[tuple[Any, Any]] = []

    def get(self, key: tuple, build: Callable[[], Any]) -> tuple[Any, float]:
        """(executable, seconds spent compiling: 0.0 on a hit)."""
        try:
            hash(key)
            hashable = True
        except TypeError:
            hashable = False
        if hashable and key in self._hashed:
            self._hashed.move_to_end(key)
            return self._hashed[key], 0.0
        if not hashable:
            for k, v in self._unhashable:
                if k == key:
                    return v, 0.0
        start = time.perf_counter()
        compiled = build()
        seconds = time.perf_counter() - start
        if hashable:
            self._hashed[key] = compiled
            while len(self._hashed) > self.max_entries:
                self._hashed.popitem(last=False)
        else:
            self._unhashable.append((key, compiled))
            del self._unhashable[: -self.max_entries]
        return compiled, seconds

    def clear(self) -> None:
        self._hashed.clear()
        self._unhashable.clear()


_CACHE = _CompileCache()


def clear_compile_cache() -> None:
    """Drop every cached generation executable (frees their device code)."""
    _CACHE.clear()


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple(
        (x.shape, x.dtype, getattr(x, "sharding", None)) if hasattr(x, "shape") else type(x)
        for x in leaves
    )


def _compiled(name: str, fn: Callable, st: _Static, graphdef, args: tuple, donate: tuple[int, ...]):
    # the executable depends on JAX's mesh context and the sequence-parallel options, as jit's
    # own cache does
    mesh_key = (context_mesh(), sequence_parallel_options())
    key = (name, graphdef, st, mesh_key, _signature(args))
    donate = donate if jax.default_backend() != "cpu" else ()  # CPU cannot donate buffers

    def build():
        jitted = jax.jit(functools.partial(fn, st, graphdef), donate_argnums=donate)
        return jitted.lower(*args).compile()

    return _CACHE.get(key, build)


# -- public API --------------------------------------------------------------------------------


def _static_settings(
    model: nnx.Module,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    top_k: int,
    pad_id: int,
    cache_dtype: Any,
    num_samples: int = 1,
    prefill_chunk: int = 0,
) -> _Static:
    if int(max_new_tokens) < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0.0 <= top_p <= 1.0:
        raise ValueError(f"top_p must be in [0, 1] (1 = off), got {top_p}")
    if int(top_k) < 0:
        raise ValueError(f"top_k must be >= 0 (0 = off), got {top_k}")
    if int(num_samples) < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if int(prefill_chunk) < 0:
        raise ValueError(f"prefill_chunk must be >= 0 (0 = one call), got {prefill_chunk}")
    if cache_dtype is None:
        cache_dtype = getattr(model, "dtype", jnp.float32)
    return _Static(
        max_new_tokens=int(max_new_tokens),
        greedy=temperature == 0,
        top_k=int(top_k),
        top_p_on=top_p < 1.0,
        pad_id=int(pad_id),
        cache_dtype=jnp.dtype(cache_dtype),
        num_samples=int(num_samples),
        prefill_chunk=int(prefill_chunk),
    )


def _run(
    model: nnx.Module,
    input_ids: Array | None,
    input_mask: Array,
    inputs_embeds: Array | None,
    rng: Array | int,
    temperature: float,
    top_p: float,
    stop_tokens: Sequence[int],
    st: _Static,
    *,
    timed: bool,
) -> tuple[GeneratedTokens, dict[str, float]]:
    if (input_ids is None) == (inputs_embeds is None):
        raise ValueError("pass exactly one of input_ids [B, T] and inputs_embeds [B, T, D]")
    input_mask = jnp.asarray(input_mask, bool)
    if input_ids is not None:
        input_ids = jnp.asarray(input_ids, jnp.int32)
    prompt = input_ids if input_ids is not None else inputs_embeds
    if prompt.shape[:2] != input_mask.shape:
        raise ValueError(
            f"prompt shape {prompt.shape[:2]} does not match input_mask shape {input_mask.shape}"
        )
    if isinstance(rng, (int, np.integer)):
        rng = jax.random.key(rng)
    graphdef, state = nnx.split(model)
    sampling = _Sampling(
        temperature=jnp.asarray(temperature, jnp.float32),
        top_p=jnp.asarray(top_p, jnp.float32),
        stop=_stop_array(stop_tokens),
    )

    prefill_args = (state, input_ids, inputs_embeds, input_mask, rng)
    # The prefill does not depend on the sampling settings: key it on the cache shape only.
    prefill_st = dataclasses.replace(st, greedy=False, top_k=0, top_p_on=False, pad_id=0)
    # (pad_id is applied by the decode program, so it is not a prefill setting either.)
    prefill, compile_s = _compiled("prefill", _prefill, prefill_st, graphdef, prefill_args, ())
    start = time.perf_counter()
    carry = prefill(*prefill_args)
    if timed:
        jax.block_until_ready(carry)
    prefill_s = time.perf_counter() - start

    decode_args = (state, carry, sampling)
    # The decode program only sees the B * G rows and the filled cache: key it without
    # num_samples and prefill_chunk.
    decode_st = dataclasses.replace(st, num_samples=1, prefill_chunk=0)
    decode, seconds = _compiled("decode", _decode, decode_st, graphdef, decode_args, (1,))
    compile_s += seconds
    start = time.perf_counter()
    final = decode(*decode_args)
    out = GeneratedTokens(
        tokens=final.tokens, logprobs=final.logprobs, lengths=final.lengths, num_steps=final.step
    )
    del final, carry, decode_args  # frees the KV cache
    if timed:
        jax.block_until_ready(out)
    decode_s = time.perf_counter() - start
    return out, {"prefill": prefill_s, "decode": decode_s, "compile": compile_s}


def generate_tokens(
    model: nnx.Module,
    input_ids: Array | None,
    input_mask: Array,
    *,
    max_new_tokens: int,
    inputs_embeds: Array | None = None,
    rng: Array | int = 0,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    cache_dtype: Any = None,
    num_samples: int = 1,
    prefill_chunk: int = 0,
) -> GeneratedTokens:
    """Generate up to `max_new_tokens` tokens for a left-padded batch; arrays in, arrays out.

    model: an `LLM` (anything with `cfg: LLMConfig` and `decode_step`).
    input_ids: int [B, T], left padded; or None with inputs_embeds [B, T, D] (e.g. a VLM's
      prompt with video embeddings spliced in).
    input_mask: bool [B, T], True on real tokens. Rows whose last column is padding are
      treated as empty (batch filler): they generate only pad_id.
    rng: PRNG key or int seed (unused when temperature == 0).
    temperature / top_p / top_k: as in `jaxstack.generate.sampling` (0 = greedy; top_k 0 and
      top_p 1.0 = off). New temperature / top_p values do not recompile; a new top_k value or
      switching greedy or top-p on or off does.
    stop_tokens: a row finishes after emitting any of these; the loop ends when all rows have.
    cache_dtype: KV-cache dtype, default the model's compute dtype.
    num_samples: G samples per prompt. Each prompt is prefilled once and its KV cache shared
      by G decode rows; outputs then have B * G rows, row b * G + g being sample g of prompt b
      (see `jaxstack.generate.rollout` for the RL-facing API). One PRNG key per step draws
      for all rows, so this samples exactly like G = 1 on the prompts repeated G times.
    prefill_chunk: prompt columns per prefill `decode_step` call (0 = all T - 1 in one call).
      Bounds the prefill's transient attention memory to [B, H, chunk, T + N] for long
      prompts; same tokens and log-probs (up to float rounding). Static: a new value
      recompiles the prefill only.
    Returns `GeneratedTokens` (tokens int32 [B, N], logprobs float32 [B, N], lengths int32
    [B], num_steps int32 []; B * G rows with num_samples) without waiting for the device.
    """
    st = _static_settings(
        model,
        max_new_tokens,
        temperature,
        top_p,
        top_k,
        pad_id,
        cache_dtype,
        num_samples,
        prefill_chunk,
    )
    out, _ = _run(
        model,
        input_ids,
        input_mask,
        inputs_embeds,
        rng,
        temperature,
        top_p,
        stop_tokens,
        st,
        timed=False,
    )
    return out


def pad_prompts(
    prompts: Sequence[Sequence[int]], *, pad_id: int = 0, bucket: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad token lists to a common length rounded up to a multiple of `bucket`.

    Returns (input_ids int32 [B, T], input_mask bool [B, T]).
    """
    if not prompts:
        raise ValueError("prompts is empty: pass at least one prompt")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"prompt {lengths.index(0)} is empty: every prompt needs a token")
    bucket = max(int(bucket), 1)
    t = -(-max(lengths) // bucket) * bucket
    ids = np.full((len(prompts), t), pad_id, np.int32)
    mask = np.zeros((len(prompts), t), bool)
    for i, p in enumerate(prompts):
        ids[i, t - len(p) :] = np.asarray(p, np.int64)
        mask[i, t - len(p) :] = True
    return ids, mask


def batch_bucket(batch: int) -> int:
    """Rows actually run for `batch` prompts: a power of two up to 8 (at least 2), then a
    multiple of 8. Bounds the number of compiled programs, and keeps batch 1 off XLA's
    matrix-vector path, which on H200 decodes slower than two rows do (2.19 vs 1.53 ms per
    step for a Qwen2.5-1.5B shape; experiments/decode_variants.py)."""
    if batch <= 8:
        return max(2, 1 << (batch - 1).bit_length())
    return -(-batch // 8) * 8


def pad_batch(
    ids: np.ndarray, mask: np.ndarray, *, pad_id: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Append filler rows (all padding: they generate only pad_id) up to `batch_bucket`."""
    extra = batch_bucket(ids.shape[0]) - ids.shape[0]
    if extra == 0:
        return ids, mask
    filler_ids = np.full((extra, ids.shape[1]), pad_id, ids.dtype)
    filler_mask = np.zeros((extra, ids.shape[1]), bool)
    return np.concatenate([ids, filler_ids]), np.concatenate([mask, filler_mask])


def generate(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    stop_tokens: Sequence[int] = (),
    pad_id: int = 0,
    seed: int = 0,
    cache_dtype: Any = None,
    prompt_bucket: int = 64,
    prefill_chunk: int = 0,
) -> GenerationOutput:
    """Generate continuations of token-id prompts (greedy or sampled) with a KV cache.

    prompts: B lists of token ids (lengths may differ); they are left padded to a length
      rounded up to a multiple of `prompt_bucket` so few programs are compiled.
    Other arguments as in `generate_tokens`; `seed` seeds sampling.
    Raises ValueError (where transformers only warns) when a prompt's length plus
    max_new_tokens exceeds the model's `max_position_embeddings`: positions past it are
    untrained and give garbage silently.
    Returns a `GenerationOutput` of Python lists (each row cut after its first stop token)
    with timings.
    """
    st = _static_settings(
        model,
        max_new_tokens,
        temperature,
        top_p,
        top_k,
        pad_id,
        cache_dtype,
        prefill_chunk=prefill_chunk,
    )
    vocab = model.cfg.vocab_size
    for i, p in enumerate(prompts):
        bad = [int(x) for x in p if not 0 <= int(x) < vocab]
        if bad:
            raise ValueError(f"prompt {i} has token ids outside [0, {vocab}): {bad[:5]}")
    limit = getattr(model.cfg, "max_position_embeddings", None)
    lengths = [len(p) for p in prompts]
    if limit is not None and lengths and max(lengths) + max_new_tokens > limit:
        i, n = lengths.index(max(lengths)), max(lengths)
        raise ValueError(
            f"prompt {i} ({n} tokens) plus max_new_tokens={max_new_tokens} needs "
            f"{n + max_new_tokens} positions, more than the model's max_position_embeddings="
            f"{limit}: shorten the prompt or lower max_new_tokens"
        )
    ids, mask = pad_prompts(prompts, pad_id=pad_id, bucket=prompt_bucket)
    ids, mask = pad_batch(ids, mask, pad_id=pad_id)
    out, times = _run(
        model,
        jnp.asarray(ids),
        jnp.asarray(mask),
        None,
        seed,
        temperature,
        top_p,
        stop_tokens,
        st,
        timed=True,
    )
    tokens, logprobs = np.asarray(out.tokens), np.asarray(out.logprobs)
    lengths = [int(n) for n in np.asarray(out.lengths)][: len(prompts)]  # drop filler rows
    return GenerationOutput(
        tokens=[tokens[i, :n].tolist() for i, n in enumerate(lengths)],
        logprobs=[logprobs[i, :n].tolist() for i, n in enumerate(lengths)],
        num_generated=lengths,
        num_steps=int(out.num_steps),
        prompt_length=int(ids.shape[1]),
        prefill_seconds=times["prefill"],
        decode_seconds=times["decode"],
        compile_seconds=times["compile"],
    )
