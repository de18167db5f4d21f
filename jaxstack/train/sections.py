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
class LoRASection:
    """LoRA fine-tuning (`jaxstack/lora/adapters.py`): rank 0 = off (every parameter trains);
    rank r >= 1 trains only adapters A [in, r], B [r, out] on `targets` in every layer (the
    base stays frozen: no gradients, optimizer state or checkpoint entries), scaled by
    alpha / rank, with `dropout` on the adapter input. merge: also export the merged weights
    (W + alpha / rank * A @ B) as a transformers checkpoint next to the PEFT adapter."""

    rank: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    merge: bool = False

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"lora.rank must be >= 0 (0 = off), got {self.rank}")
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
