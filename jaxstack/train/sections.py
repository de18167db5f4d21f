"""Config sections shared by the jobs: dtype names and the model's numerics settings."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jaxstack.models.llm import REMAT_POLICIES

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


@dataclasses.dataclass
class NumericsSection:
    """dtype: compute dtype ("bfloat16" on GPUs); param_dtype: master weights; remat: "none" |
    "full" | "dots" (activation checkpointing policy)."""

    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        for key, ok in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMAT_POLICIES)):
            if getattr(self, key) not in ok:
                raise ValueError(f"{key} must be one of {list(ok)}, got {getattr(self, key)!r}")

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def master_dtype(self):
        return DTYPES[self.param_dtype]
