"""Decoder LLM configuration: `LLMConfig` (the HF config fields jaxstack reads, Gemma-2 switches,
validation) and its named presets (`LLMConfig.preset`). The model is jaxstack/models/llm.py."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax

Array = jax.Array

ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma2")
# MLP gate activations by transformers name: SwiGLU (silu) or GeGLU (Gemma: gelu tanh approx).
ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "silu": jax.nn.silu,
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
    """Architecture of a decoder LLM (all sizes as in the HF config)."""

    architecture: str = "qwen2"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q/k/v projections (Qwen2)
    qk_norm: bool = False  # per-head RMSNorm on q and k before RoPE (Qwen3)
    causal: bool = True  # False for diffusion LLMs (bidirectional attention)
    max_position_embeddings: int = 32768
    # Gemma 2 (each off by default; the other families use none of them):
    hidden_act: str = "silu"  # MLP gate activation (ACTIVATIONS): silu or gelu_pytorch_tanh
    norm_unit_offset: bool = False  # RMSNorms scale by (1 + w), w stored (and init) at zero
    sandwich_norm: bool = False  # post_attention / pre_ and post_feedforward_layernorm
    scale_embeddings: bool = False  # embeddings * sqrt(hidden_size), in the compute dtype
    query_pre_attn_scalar: float | None = None  # attention scale q_p_a_s ** -0.5 (None: head_dim)
    attn_logit_softcapping: float | None = None  # attention logits cap * tanh(x / cap)
    final_logit_softcapping: float | None = None  # LM-head logits cap * tanh(x / cap)
    sliding_window: int | None = None  # sliding layers: query i sees keys j with i - j < window
    # Per layer "full_attention" | "sliding_attention"; None with a sliding_window: the Gemma 2
    # pattern (layers 0, 2, 4, ... slide). Ignored without a sliding_window.
    layer_types: tuple[str, ...] | None = None

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {self.architecture!r}; supported: {ARCHITECTURES}"
            )
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}"
            )
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(
                f"unknown hidden_act {self.hidden_act!r}; supported: {tuple(ACTIVATIONS)}"
            )
        if self.layer_types is not None:
            types = tuple(self.layer_types)
            object.__setattr__(self, "layer_types", types)  # hashable (lists from YAML/JSON)
            bad = sorted(set(types) - set(LAYER_TYPES))
            if bad or len(types) != self.num_layers:
                raise ValueError(
                    f"layer_types needs num_layers={self.num_layers} entries from {LAYER_TYPES}; "
                    f"got {len(types)} entries" + (f" with unknown {bad}" if bad else "")
                )
        if self.sliding_window is not None:
            if self.sliding_window < 1:
                raise ValueError(f"sliding_window must be >= 1, got {self.sliding_window}")
            if not self.causal:
                raise ValueError("sliding_window needs a causal model (causal=True)")
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "query_pre_attn_scalar"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive or None, got {value}")

    def is_sliding(self, layer: int) -> bool:
        """Whether layer `layer` uses sliding-window attention."""
        if self.sliding_window is None:
            return False
        if self.layer_types is None:
            return layer % 2 == 0  # transformers' Gemma2Config default
        return self.layer_types[layer] == "sliding_attention"

    def num_params(self) -> int:
        d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        attn = d * h * (2 * self.num_heads + 2 * self.num_kv_heads)
        if self.attention_bias:
            attn += h * (self.num_heads + 2 * self.num_kv_heads)
        if self.qk_norm:
            attn += 2 * h
        layer = attn + 3 * d * f + (4 if self.sandwich_norm else 2) * d
        emb = v * d * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * layer + emb + d

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> LLMConfig:
        """The config of preset `name` (see PRESETS; case-insensitive), fields replaced by
        `overrides`: published sizes such as "qwen2.5-1.5b", "llama3-8b", and "tiny" (tests).
        Unknown names raise ValueError listing the known ones."""
        key = name.lower()
        if key not in PRESETS:
            raise ValueError(f"unknown preset {name!r} for LLMConfig; known: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[key](), **overrides)


_QWEN25 = dict(
    architecture="qwen2",
    vocab_size=151936,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    attention_bias=True,
    max_position_embeddings=32768,
)
_QWEN3 = dict(
    architecture="qwen3",
    vocab_size=151936,
    rope_theta=1e6,
    rms_norm_eps=1e-6,
    qk_norm=True,
    head_dim=128,
    max_position_embeddings=40960,
)
_LLAMA3 = dict(
    architecture="llama",
    vocab_size=128256,
    rope_theta=500000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    hidden_size=4096,
    intermediate_size=14336,
    num_layers=32,
    num_heads=32,
    num_kv_heads=8,
    head_dim=128,
    max_position_embeddings=8192,
)
_GEMMA2 = dict(
    architecture="gemma2",
    vocab_size=256000,
    rope_theta=10000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    max_position_embeddings=8192,
    hidden_act="gelu_pytorch_tanh",
    norm_unit_offset=True,
    sandwich_norm=True,
    scale_embeddings=True,
    attn_logit_softcapping=50.0,
    final_logit_softcapping=30.0,
    sliding_window=4096,
)

_PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "tiny": dict(
        architecture="qwen2",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        attention_bias=True,
    ),
    "qwen2.5-0.5b": dict(
        _QWEN25,
        hidden_size=896,
        intermediate_size=4864,
        num_layers=24,
        num_heads=14,
        num_kv_heads=2,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "qwen2.5-1.5b": dict(
        _QWEN25,
        hidden_size=1536,
        intermediate_size=8960,
        num_layers=28,
        num_heads=12,
        num_kv_heads=2,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "qwen2.5-3b": dict(
        _QWEN25,
        hidden_size=2048,
        intermediate_size=11008,
        num_layers=36,
        num_heads=16,
        num_kv_heads=2,
        head_dim=128,
        tie_word_embeddings=True,
    ),
    "qwen2.5-7b": dict(
        _QWEN25,
        vocab_size=152064,
        hidden_size=3584,
        intermediate_size=18944,
        num_layers=28,
        num_heads=28,
        num_kv_heads=4,
        head_dim=128,
        tie_word_embeddings=False,
    ),
    "qwen3-0.6b": dict(
        _QWEN3,
        hidden_size=1024,
        intermediate_size=3072,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        tie_word_embeddings=True,
    ),
    "qwen3-1.7b": dict(
        _QWEN3,
        hidden_size=2048,
        intermediate_size=6144,
        num_layers=28,
        num_heads=16,
        num_kv_heads=8,
        tie_word_embeddings=True,
    ),
    "qwen3-4b": dict(
        _QWEN3,
        hidden_size=2560,
        intermediate_size=9728,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        tie_word_embeddings=True,
    ),
    "qwen3-8b": dict(
        _QWEN3,
        hidden_size=4096,
        intermediate_size=12288,
        num_layers=36,
        num_heads=32,
        num_kv_heads=8,
        tie_word_embeddings=False,
    ),
    "llama3-8b": dict(_LLAMA3),
    "llama3.1-8b": dict(
        _LLAMA3,
        max_position_embeddings=131072,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    # LLaDA-8B: bidirectional Llama-style decoder without GQA.
    "llada-8b": dict(
        _LLAMA3,
        vocab_size=126464,
        intermediate_size=12288,
        num_kv_heads=32,
        causal=False,
        max_position_embeddings=4096,
    ),
    # Gemma-2-2B (transformers' Gemma2Config defaults; the text encoder of SANA).
    "gemma-2-2b": dict(
        _GEMMA2,
        hidden_size=2304,
        intermediate_size=9216,
        num_layers=26,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
}
# name -> config factory, the preset registry idiom of every model family (`LLMConfig.preset`).
PRESETS: dict[str, Callable[[], LLMConfig]] = {
    name: functools.partial(LLMConfig, **fields) for name, fields in _PRESET_FIELDS.items()
}
