"""Decoder LLM (Llama 3.x, Qwen2/2.5, Qwen3, Gemma 2) in Flax NNX.

One model covers the four families: GQA, RoPE (with Llama-3 scaling), RMSNorm, SwiGLU, optional
qkv bias (Qwen2), optional per-head q/k RMSNorm (Qwen3), tied or untied embeddings, causal or
bidirectional attention, packed sequences (segment ids), left padding and a KV cache. Gemma 2
switches on, through config flags: embeddings scaled by sqrt(D), (1 + w) RMSNorms, sandwich
norms around attention and MLP, GeGLU, a query_pre_attn_scalar attention scale, attention and
final logit soft-capping, and sliding-window attention on some layers (`layer_types`).

The configuration and presets live in jaxstack/models/llm_config.py (re-exported here).

Shapes: B batch, T query length, S key length, D hidden, N query heads, K kv heads, H head dim,
F mlp width, V vocab, L layers.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.models.llm_config import (  # noqa: F401  (re-exported)
    ACTIVATIONS,
    ARCHITECTURES,
    LAYER_TYPES,
    PRESETS,
    LLMConfig,
)
from jaxstack.nn.attention import dot_product_attention, make_attn_mask
from jaxstack.nn.layers import Dense, Embed, RMSNorm, apply_rope, rope_inv_freq
from jaxstack.parallel.mesh import constrain
from jaxstack.parallel.sequence import (
    sequence_parallel_attention,
    sequence_parallel_options,
    sequence_parallel_size,
    zigzag_permutation,
)
from jaxstack.quant.activations import fp8_saved_call

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Per-layer key/value buffers for incremental decoding.

    k, v: tuples (one per layer) of [B, S_max, K, H]; kv_mask: bool [B, S_max], True where a
    slot holds a real (non-padding) token; index: int32 scalar, the next slot to write.
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    kv_mask: Array
    index: Array

    @classmethod
    def init(cls, cfg: LLMConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
        shape = (batch, max_len, cfg.num_kv_heads, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(
            k=zeros,
            v=tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers)),
            kv_mask=jnp.zeros((batch, max_len), bool),
            index=jnp.zeros((), jnp.int32),
        )


class Attention(nnx.Module):
    def __init__(self, cfg: LLMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.num_heads, self.num_kv_heads, self.head_dim = n, k, h
        qpas = cfg.query_pre_attn_scalar
        self.scale = None if qpas is None else float(qpas) ** -0.5  # None: head_dim ** -0.5
        self.soft_cap = cfg.attn_logit_softcapping
        self.q_proj = Dense(d, n * h, axes=("embed", "heads"), use_bias=cfg.attention_bias, **kw)
        self.k_proj = Dense(d, k * h, axes=("embed", "kv_heads"), use_bias=cfg.attention_bias, **kw)
        self.v_proj = Dense(d, k * h, axes=("embed", "kv_heads"), use_bias=cfg.attention_bias, **kw)
        self.o_proj = Dense(n * h, d, axes=("heads", "embed"), **kw)
        norm_kw = dict(eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.q_norm = RMSNorm(h, **norm_kw) if cfg.qk_norm else None
        self.k_norm = RMSNorm(h, **norm_kw) if cfg.qk_norm else None

    def __call__(
        self,
        x_btd,
        positions_bt,
        inv_freq,
        *,
        mask,
        causal,
        window=None,
        cache_kv=None,
        index=None,
        segment_ids=None,
        sequence_parallel=False,
    ):
        b, t, _ = x_btd.shape
        q = self.q_proj(x_btd).reshape(b, t, self.num_heads, self.head_dim)
        k = self.k_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x_btd).reshape(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, positions_bt, inv_freq)
        k = apply_rope(k, positions_bt, inv_freq)
        q = constrain(q, ("batch", "seq", "act_heads", None))
        k = constrain(k, ("batch", "seq", "act_kv_heads", None))
        v = constrain(v, ("batch", "seq", "act_kv_heads", None))
        new_kv = None
        if cache_kv is not None:
            ck, cv = cache_kv
            k = jax.lax.dynamic_update_slice_in_dim(ck, k.astype(ck.dtype), index, axis=1)
            v = jax.lax.dynamic_update_slice_in_dim(cv, v.astype(cv.dtype), index, axis=1)
            new_kv = (k, v)
            k, v = k.astype(q.dtype), v.astype(q.dtype)
        if sequence_parallel:  # mesh has sequence > 1: shard_map attention (segments, no mask)
            out = _sequence_parallel(
                q, k, v, causal=causal, segment_ids=segment_ids, scale=self.scale
            )
        else:
            out = dot_product_attention(
                q,
                k,
                v,
                mask=mask,
                causal=causal,
                scale=self.scale,
                soft_cap=self.soft_cap,
                window=window,
            )
        out = constrain(out, ("batch", "seq", "act_heads", None))
        return self.o_proj(out.reshape(b, t, -1)), new_kv


def _sequence_parallel(q, k, v, *, causal, segment_ids, scale=None):
    """Attention over the context mesh's `sequence` axis; mode from `use_sequence_parallel`."""
    opts = sequence_parallel_options()
    return sequence_parallel_attention(
        q,
        k,
        v,
        mode=opts.mode,
        causal=causal,
        segment_ids=segment_ids,
        ulysses_size=opts.ulysses_size,
        layout=opts.layout,
        scale=scale,
        implementation=opts.implementation,
    )


class MLP(nnx.Module):
    """Gated MLP: down(act(gate(x)) * up(x)); SwiGLU (silu) or GeGLU (Gemma, gelu tanh)."""

    def __init__(self, cfg: LLMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.hidden_act = cfg.hidden_act
        self.fp8_saved_activations = False
        self.gate_proj = Dense(d, f, axes=("embed", "mlp"), **kw)
        self.up_proj = Dense(d, f, axes=("embed", "mlp"), **kw)
        self.down_proj = Dense(f, d, axes=("mlp", "embed"), **kw)

    def __call__(self, x_btd):
        glu = lambda gate, up: ACTIVATIONS[self.hidden_act](gate) * up  # noqa: E731
        gate, up = self.gate_proj(x_btd), self.up_proj(x_btd)
        # fp8_saved_activations (precision fp8_coat): gate / up kept for backward in e4m3
        h = fp8_saved_call(glu, gate, up) if self.fp8_saved_activations else glu(gate, up)
        h = constrain(h, ("batch", "seq", "act_mlp"))
        return self.down_proj(h)


class Block(nnx.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(post_attention_layernorm(x)). With
    `sandwich_norm` (Gemma 2): x + post_attention_layernorm(attn(input_layernorm(x))), then
    x + post_feedforward_layernorm(mlp(pre_feedforward_layernorm(x)))."""

    def __init__(self, cfg: LLMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm_kw = dict(
            eps=cfg.rms_norm_eps,
            dtype=dtype,
            param_dtype=param_dtype,
            unit_offset=cfg.norm_unit_offset,
        )
        self.input_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
        self.self_attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, **norm_kw)
        self.mlp = MLP(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        sandwich = cfg.sandwich_norm
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, **norm_kw) if sandwich else None
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, **norm_kw) if sandwich else None

    def __call__(
        self,
        x_btd,
        positions_bt,
        inv_freq,
        *,
        mask,
        causal,
        window=None,
        cache_kv=None,
        index=None,
        segment_ids=None,
        sequence_parallel=False,
    ):
        attn, new_kv = self.self_attn(
            self.input_layernorm(x_btd),
            positions_bt,
            inv_freq,
            mask=mask,
            causal=causal,
            window=window,
            cache_kv=cache_kv,
            index=index,
            segment_ids=segment_ids,
            sequence_parallel=sequence_parallel,
        )
        if self.pre_feedforward_layernorm is None:
            x_btd = x_btd + attn
            x_btd = x_btd + self.mlp(self.post_attention_layernorm(x_btd))
        else:
            x_btd = x_btd + self.post_attention_layernorm(attn)
            mlp = self.mlp(self.pre_feedforward_layernorm(x_btd))
            x_btd = x_btd + self.post_feedforward_layernorm(mlp)
        return constrain(x_btd, ("batch", "seq", "act_embed")), new_kv


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def positions_from(
    batch: int, length: int, segment_ids_bt: Array | None, input_mask_bt: Array | None
) -> Array:
    """RoPE positions [B, T]: restart at 0 per packed segment; skip left padding."""
    idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (batch, length))
    if segment_ids_bt is not None:
        prev = jnp.concatenate([segment_ids_bt[:, :1] - 1, segment_ids_bt[:, :-1]], axis=1)
        start = jax.lax.cummax(jnp.where(segment_ids_bt != prev, idx, 0), axis=1)
        return idx - start
    if input_mask_bt is not None:
        return jnp.maximum(jnp.cumsum(input_mask_bt.astype(jnp.int32), axis=1) - 1, 0)
    return idx


class LLM(nnx.Module):
    """Decoder LLM. `model(input_ids)` -> logits [B, T, V].

    dtype: compute dtype (bfloat16 for training/inference on GPU, float32 for parity).
    param_dtype: storage dtype of parameters (float32 master weights for training).
    remat: "none" | "full" | "dots": activation checkpointing per block (training).
    """

    def __init__(
        self,
        cfg: LLMConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        remat: str = "none",
        rngs: nnx.Rngs,
    ):
        if remat not in REMAT_POLICIES:
            raise ValueError(f"unknown remat {remat!r}; choose from {list(REMAT_POLICIES)}")
        self.cfg = cfg
        self.dtype = dtype
        self.remat = remat
        self.embed_tokens = Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.layers = nnx.List(
            [
                Block(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                for _ in range(cfg.num_layers)
            ]
        )
        self.norm = RMSNorm(
            cfg.hidden_size,
            eps=cfg.rms_norm_eps,
            dtype=dtype,
            param_dtype=param_dtype,
            unit_offset=cfg.norm_unit_offset,
        )
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else Dense(
                cfg.hidden_size,
                cfg.vocab_size,
                axes=("embed", "vocab"),
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
        )

    # -- pieces -------------------------------------------------------------------------------

    def embed(self, input_ids_bt: Array) -> Array:
        """Token embeddings [B, T, D] in the compute dtype. With `scale_embeddings` (Gemma)
        times sqrt(hidden_size), the factor rounded to the compute dtype first as transformers
        does (it casts the normalizer to the embedding's dtype). `inputs_embeds` passed to the
        model are used as given (not scaled), as in transformers."""
        x = self.embed_tokens(input_ids_bt)
        if self.cfg.scale_embeddings:
            x = x * jnp.asarray(self.cfg.hidden_size**0.5, self.dtype)
        return x

    def logits(self, hidden_btd: Array) -> Array:
        """LM-head logits [B, T, V] (compute dtype) from final (normed) hidden states; with
        `final_logit_softcapping` c: c * tanh(logits / c), computed in float32."""
        if self.lm_head is None:
            out = self.embed_tokens.attend(hidden_btd)
        else:
            out = self.lm_head(hidden_btd)
        cap = self.cfg.final_logit_softcapping
        if cap is not None:
            out = (jnp.tanh(out.astype(jnp.float32) / cap) * cap).astype(out.dtype)
        return constrain(out, ("batch", "seq", "act_vocab"))

    def _run_layers(
        self,
        x,
        positions,
        *,
        mask,
        causal,
        cache: KVCache | None,
        sliding_mask=None,
        segment_ids=None,
        sequence_parallel=False,
    ):
        """Blocks then the final norm. Sliding layers (`cfg.is_sliding`) use `sliding_mask`
        when given (decoding: the window is in the mask), else `mask` plus the window."""
        sp = dict(segment_ids=segment_ids, sequence_parallel=sequence_parallel)
        inv_freq = rope_inv_freq(self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling)
        new_k, new_v = [], []
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            index = None if cache is None else cache.index
            layer_mask, window = mask, None
            if self.cfg.is_sliding(i):
                if sliding_mask is None:
                    window = self.cfg.sliding_window
                else:
                    layer_mask = sliding_mask
            if self.remat != "none" and cache is None:
                policy = REMAT_POLICIES[self.remat]

                def run(block, x, positions, mask, window=window):
                    return block(
                        x, positions, inv_freq, mask=mask, causal=causal, window=window, **sp
                    )[0]

                x = nnx.remat(run, policy=policy)(layer, x, positions, layer_mask)
                continue
            x, new_kv = layer(
                x,
                positions,
                inv_freq,
                mask=layer_mask,
                causal=causal,
                window=window,
                cache_kv=kv,
                index=index,
                **sp,
            )
            if new_kv is not None:
                new_k.append(new_kv[0])
                new_v.append(new_kv[1])
        return self.norm(x), (tuple(new_k), tuple(new_v))

    # -- full-sequence forward (training, scoring, prefill without cache) ----------------------

    def hidden_states(
        self,
        input_ids: Array | None = None,
        *,
        inputs_embeds: Array | None = None,
        positions: Array | None = None,
        segment_ids: Array | None = None,
        input_mask: Array | None = None,
        mask_ar: Array | None = None,
    ) -> Array:
        """Final normed hidden states [B, T, D] (transformers' `last_hidden_state`).

        input_ids int [B, T] or inputs_embeds [B, T, D]; positions int [B, T] (default: from
        segments / padding); segment_ids int [B, T] for packed sequences; input_mask bool
        [B, T] (False = padding); mask_ar int [B, T] overrides the attention pattern (see
        `make_attn_mask`), default all ones if causal else all zeros.

        Sequence parallelism: when the context mesh (`jax.set_mesh`) has sequence > 1 and
        `use_sequence_parallel` has not disabled it (`sequence_parallel_size() > 1`), attention
        runs sequence-parallel (`jaxstack.parallel.sequence`; mode and layout from
        `use_sequence_parallel`, default "auto", contiguous) with segment ids instead of a dense
        mask: input_mask becomes a segment of its own for the padding (padding is seen by
        nothing), T must divide by the sequence size, and mask_ar is not supported (ValueError;
        disable sequence parallelism for such patterns). The choice never depends on which
        masks are passed.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, t = x.shape[:2]
        x = constrain(x, ("batch", "seq", "act_embed"))
        if positions is None:
            positions = positions_from(b, t, segment_ids, input_mask)
        sp = sequence_parallel_size()
        if sp > 1:
            if self.cfg.attn_logit_softcapping is not None or self.cfg.sliding_window is not None:
                raise ValueError(
                    "attention soft-capping and sliding windows (Gemma 2) are not supported with "
                    f"sequence-parallel attention (mesh sequence={sp}); run it under "
                    "use_sequence_parallel(enabled=False) or without a sequence axis"
                )
            if mask_ar is not None:
                raise ValueError(
                    "mask_ar is not supported with sequence-parallel attention (mesh sequence="
                    f"{sp}); run it under use_sequence_parallel(enabled=False) or without a "
                    "sequence axis"
                )
            if t % sp:
                raise ValueError(
                    f"sequence length {t} is not divisible by the mesh's sequence axis ({sp}); "
                    "pad or bucket it to a multiple, or disable sequence parallelism"
                )
            if input_mask is not None:  # padding: a segment no real token shares
                seg = jnp.zeros((b, t), jnp.int32) if segment_ids is None else segment_ids
                pad_id = jnp.iinfo(jnp.int32).min
                segment_ids = jnp.where(input_mask.astype(bool), seg.astype(jnp.int32), pad_id)
            # Sequence parallelism: segment ids go to the shard_map attention (no dense mask).
            zigzag = sequence_parallel_options().layout == "zigzag"
            if zigzag:  # store the sequence in zigzag order; hidden states come back in order
                perm = zigzag_permutation(t, sp)
                x = constrain(jnp.take(x, perm, axis=1), ("batch", "seq", "act_embed"))
                positions = jnp.take(positions, perm, axis=1)
                if segment_ids is not None:
                    segment_ids = jnp.take(segment_ids, perm, axis=1)
            hidden, _ = self._run_layers(
                x,
                positions,
                mask=None,
                causal=self.cfg.causal,
                cache=None,
                segment_ids=segment_ids,
                sequence_parallel=True,
            )
            if zigzag:
                hidden = jnp.take(hidden, np.argsort(perm).astype(np.int32), axis=1)
                hidden = constrain(hidden, ("batch", "seq", "act_embed"))
            return hidden
        if segment_ids is None and input_mask is None and mask_ar is None:
            mask, causal = None, self.cfg.causal
        else:
            if mask_ar is None:
                mask_ar = jnp.full((b, t), 1 if self.cfg.causal else 0, jnp.int32)
            mask, causal = make_attn_mask(mask_ar, input_mask, segment_ids), False
        hidden, _ = self._run_layers(x, positions, mask=mask, causal=causal, cache=None)
        return hidden

    def __call__(self, input_ids: Array | None = None, **kwargs) -> Array:
        """Logits [B, T, V] (compute dtype). Keyword arguments as in `hidden_states`."""
        return self.logits(self.hidden_states(input_ids, **kwargs))

    # -- incremental decoding -----------------------------------------------------------------

    def decode_step(
        self,
        cache: KVCache,
        input_ids: Array | None = None,
        *,
        inputs_embeds: Array | None = None,
        positions: Array,
        input_mask: Array | None = None,
        visible_len: Array | int | None = None,
        logits_index: Array | None = None,
    ) -> tuple[Array, KVCache]:
        """Run T new tokens through the model against `cache`; returns (logits [B,T,V], cache).

        The tokens are written at slots [cache.index, cache.index + T). positions int [B, T]
        are their RoPE positions; input_mask bool [B, T] marks real tokens (left padding in a
        prefill). A new token attends to earlier real slots (and, if the model is bidirectional,
        to the other new tokens). visible_len (bidirectional models only): attend to every real
        slot < visible_len instead, e.g. the whole cache for a DualCache step whose suffix K/V
        were cached earlier. logits_index int [K]: return logits [B, K, V] of these new-token
        columns only (the LM head skips the others; the cache is the same).

        Sliding-window layers (Gemma 2) see only the slots within the window before each new
        token (slot distance < sliding_window), at any cache length; the cache keeps every
        slot (no ring buffer), so its memory is that of full attention.
        """
        x = self.embed(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.dtype)
        b, t = x.shape[:2]
        s = cache.kv_mask.shape[1]
        if input_mask is None:
            input_mask = jnp.ones((b, t), bool)
        kv_mask = jax.lax.dynamic_update_slice_in_dim(cache.kv_mask, input_mask, cache.index, 1)
        slots = jnp.arange(s)
        q_slots = cache.index + jnp.arange(t)
        if self.cfg.causal:
            allowed = slots[None, :] <= q_slots[:, None]
        else:
            limit = cache.index + t if visible_len is None else visible_len
            allowed = jnp.broadcast_to(slots[None, :] < limit, (t, s))
        mask = (allowed[None] & kv_mask[:, None, :])[:, None]  # [B, 1, T, S]
        sliding_mask = None
        if self.cfg.sliding_window is not None:  # causal (checked by LLMConfig)
            near = q_slots[:, None] - slots[None, :] < self.cfg.sliding_window
            sliding_mask = mask & near[None, None]
        hidden, (ks, vs) = self._run_layers(
            x, positions, mask=mask, causal=False, cache=cache, sliding_mask=sliding_mask
        )
        new_cache = KVCache(k=ks, v=vs, kv_mask=kv_mask, index=cache.index + t)
        if logits_index is not None:
            hidden = jnp.take(hidden, logits_index, axis=1)
        return self.logits(hidden), new_cache


def init_llm(
    cfg: LLMConfig,
    *,
    seed: int = 0,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: str = "none",
) -> LLM:
    """Randomly initialised LLM (convenience for tests, benchmarks and from-scratch training)."""
    return LLM(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat, rngs=nnx.Rngs(seed))
