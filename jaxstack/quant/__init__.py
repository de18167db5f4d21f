"""FP8 training pieces: scaled FP8 products for `Dense` layers (`fp8`) and COAT's FP8 AdamW
with dynamic range expansion (`coat`); `precision` names how a training job uses them.

    precision="bf16"      no FP8: products in the model's compute dtype, float32 AdamW
    precision="fp8"       every decoder `Dense` (not the LM head) through `Fp8Matmul`
    precision="fp8_coat"  fp8 + `coat_adamw` (e4m3 moments with dynamic range expansion) + the
                          MLP's non-linear inputs saved in 1 x 16 e4m3 groups (`activations`)
"""

from __future__ import annotations

from flax import nnx

from jaxstack.nn.layers import Dense
from jaxstack.quant.activations import dequantize_1xg, fp8_saved_call, quantize_1xg
from jaxstack.quant.coat import (
    CoatAdamWState,
    DREState,
    coat_adamw,
    dre_dequantize,
    dre_exponent,
    dre_quantize,
    group_e4m3_roundtrip,
    state_bytes,
)
from jaxstack.quant.fp8 import (
    E4M3,
    E5M2,
    GRANULARITIES,
    Fp8Matmul,
    dequantize_blocks,
    dequantize_groups,
    fp8_matmul,
    quantize_blocks,
    quantize_groups,
    quantize_tensor,
)

PRECISIONS = ("bf16", "fp8", "fp8_coat")
SKIP_BY_DEFAULT = ("lm_head",)


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def apply_fp8(
    model: nnx.Module, granularity: str = "tensor", skip: tuple[str, ...] = SKIP_BY_DEFAULT
) -> int:
    """Route every `Dense` of `model` whose path has no component in `skip` through
    `Fp8Matmul(granularity)`, in place; `granularity=None` restores plain products. Returns the
    number of layers set."""
    matmul = None if granularity is None else Fp8Matmul(granularity)
    n = 0
    for path, module in nnx.iter_modules(model):
        if isinstance(module, Dense) and not any(str(p) in skip for p in path):
            module.matmul = matmul
            n += 1
    return n


def apply_precision(model: nnx.Module, precision: str, granularity: str = "tensor") -> int:
    """Set `model`'s products for `precision` (module docstring); returns the FP8 layer count.
    fp8_coat also turns on `fp8_saved_activations` in every module that has the switch (the
    decoder's MLP: its gate / up inputs saved for backward in 1 x 16 e4m3 groups)."""
    check_precision(precision)
    for _, module in nnx.iter_modules(model):
        if hasattr(module, "fp8_saved_activations"):
            module.fp8_saved_activations = precision == "fp8_coat"
    return apply_fp8(model, granularity if precision != "bf16" else None)


__all__ = [
    "E4M3",
    "E5M2",
    "GRANULARITIES",
    "PRECISIONS",
    "CoatAdamWState",
    "DREState",
    "Fp8Matmul",
    "apply_fp8",
    "apply_precision",
    "check_precision",
    "coat_adamw",
    "dequantize_1xg",
    "dequantize_blocks",
    "dequantize_groups",
    "dre_dequantize",
    "dre_exponent",
    "dre_quantize",
    "fp8_matmul",
    "fp8_saved_call",
    "group_e4m3_roundtrip",
    "quantize_1xg",
    "quantize_blocks",
    "quantize_groups",
    "quantize_tensor",
    "state_bytes",
]
