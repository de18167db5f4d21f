"""Config sections shared by the jobs: dtype names, the model's numerics settings, LoRA."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxstack.lora import LoRAConfig, check_targets
from jaxstack.models.llm import REMAT_POLICIES
from jaxstack.quant import GRANULARITIES, PRECISIONS, apply_precision

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class NumericsSection:
    """dtype: compute dtype ("bfloat16" on GPUs); param_dtype: master weights; remat: "none" |
    "full" | "dots" (activation checkpointing policy); precision: "bf16" (no FP8: products in
    `dtype`), "fp8" (the decoder's linear layers through FP8 products) or "fp8_coat" (fp8 and
    COAT's e4m3 AdamW moments), see `jaxstack.quant`; fp8_granularity: "tensor" | "block"."""

    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"
    precision: str = "bf16"
    fp8_granularity: str = "tensor"

    def __post_init__(self):
        checks = (
            ("dtype", DTYPES),
            ("param_dtype", DTYPES),
            ("remat", REMAT_POLICIES),
            ("precision", PRECISIONS),
            ("fp8_granularity", GRANULARITIES),
        )
        for key, ok in checks:
            if getattr(self, key) not in ok:
                raise ValueError(f"{key} must be one of {list(ok)}, got {getattr(self, key)!r}")

    def apply_precision(self, model) -> int:
        """Route `model`'s linear layers as `precision` says (in place); FP8 layer count."""
        return apply_precision(model, self.precision, self.fp8_granularity)

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def master_dtype(self):
        return DTYPES[self.param_dtype]


@dataclasses.dataclass
class SparseLoRASection:
    """SparseLoRA on the frozen base projections of a LoRA run (`jaxstack/lora/sparse.py`):
    preset: a per-layer table from `jaxstack.lora.sparse.PRESETS`, or "" for the ranges
    mlp_sparsity on mlp_layers [first, last] and attn_sparsity on attn_layers minus attn_skip;
    rank: SVD estimator rank (estimator: a saved estimator folder, "" = built from the base);
    start / end: sparse for steps in [start * steps, end * steps); token_bucket: the context
    length is rounded down to a multiple (one compiled program each); mlp_mean: "context" |
    "all"."""

    enabled: bool = False
    preset: str = ""
    mlp_sparsity: float = 0.0
    mlp_layers: tuple[int, ...] = ()
    attn_sparsity: float = 0.0
    attn_layers: tuple[int, ...] = ()
    attn_skip: tuple[int, ...] = ()
    rank: int = 8
    start: float = 0.05
    end: float = 1.0
    token_bucket: int = 16
    mlp_mean: str = "context"
    estimator: str = ""

    def __post_init__(self):
        for key in ("mlp_layers", "attn_layers"):
            if len(getattr(self, key)) not in (0, 2):
                raise ValueError(
                    f"lora.sparse.{key} must be [first, last], got {getattr(self, key)}"
                )
        if self.preset and (self.mlp_layers or self.attn_layers):
            raise ValueError("lora.sparse: give a preset or mlp_layers / attn_layers, not both")
        try:
            self.config()
        except ValueError as e:
            raise ValueError(f"lora.sparse: {e}") from None

    def config(self):
        """The `jaxstack.lora.sparse.SparseLoRAConfig`, or None when not enabled."""
        from jaxstack.lora.sparse import SparseLoRAConfig, SparsityConfig

        if not self.enabled:
            return None
        if self.preset:
            table = SparsityConfig.preset(self.preset)
        else:
            mlp = (self.mlp_sparsity, *self.mlp_layers) if self.mlp_layers else None
            attn = (self.attn_sparsity, *self.attn_layers) if self.attn_layers else None
            table = SparsityConfig.from_ranges(mlp=mlp, attn=attn, attn_skip=self.attn_skip)
        if not table.mlp and not table.attn:
            raise ValueError("enabled without a preset or mlp_layers / attn_layers")
        return SparseLoRAConfig(
            table, self.rank, self.start, self.end, self.token_bucket, self.mlp_mean
        )

    def tokens(self, loss_mask_bt, step: int, total_steps: int) -> int:
        """Sparse context width m of step `step`'s batch: 0 (dense) when off or outside
        [start, end), else `jaxstack.lora.sparse.context_tokens` of loss_mask [B, T]."""
        from jaxstack.lora.sparse import context_tokens, step_active

        if not self.enabled or not step_active(step, total_steps, self.start, self.end):
            return 0
        return context_tokens(loss_mask_bt, self.token_bucket)


@dataclasses.dataclass
class LoRASection:
    """LoRA fine-tuning (`jaxstack/lora/adapters.py`): rank 0 = off (every parameter trains);
    rank r >= 1 trains only adapters A [in, r], B [r, out] on `targets` in every layer (the
    base stays frozen: no gradients, optimizer state or checkpoint entries), scaled by
    alpha / rank, with `dropout` on the adapter input. merge: also export the merged weights
    (W + alpha / rank * A @ B) as a transformers checkpoint next to the PEFT adapter.
    sparse: SparseLoRA on the frozen base projections (`SparseLoRASection`)."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    merge: bool = False
    sparse: SparseLoRASection = dataclasses.field(default_factory=SparseLoRASection)

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0 = off), got {self.rank}")
        if self.sparse.enabled and not self.rank:
            raise ValueError("lora.sparse.enabled needs lora.rank >= 1")
        try:
            self.targets = check_targets(self.targets)
            if self.rank:
                LoRAConfig(self.rank, self.alpha, self.dropout, self.targets)
        except ValueError as e:
            raise ValueError(f"lora: {e}") from None

    def config(self) -> LoRAConfig | None:
        """The `jaxstack.lora.LoRAConfig`, or None when rank is 0 (LoRA off)."""
        if not self.rank:
            return None
        return LoRAConfig(self.rank, self.alpha, self.dropout, self.targets)
