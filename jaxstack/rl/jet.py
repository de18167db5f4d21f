"""Jet-RL precisions for `jaxstack rl` (../shared/specs/efficiency.md §2): where the policy's
linear layers run FP8 products.

    precision="bf16"         no FP8: rollout and training forwards in the policy's compute dtype
    precision="fp8_rollout"  BF16 training, FP8 rollout: the off-policy baseline (a second
                             graph of the same parameters with FP8 products samples the
                             responses; the training forward and the update stay unquantized)
    precision="fp8_unified"  one FP8 forward for rollout and training: every decoder `Dense`
                             (not the LM head) runs block FP8 in both, and the update's
                             gradients go through its FP8 backward (jaxstack/quant/fp8.py)

FP8 here is always the "block" granularity of `jaxstack.quant.fp8_matmul` (activations 1 x 128
per token, weights 128 x 128, power-of-two scales): a token's quantized values do not depend on
the other tokens, so a one-token decode step and a full-sequence forward quantize it alike.
The block product zero-pads dimensions that are not multiples of 128 (partial edge blocks), so
small models run it too.

The rollout/training mismatch (`mismatch_metrics`) compares per-token log-probs of the sampled
response tokens under the rollout with those of the training forward at the same parameters:
mean |delta log-prob| and the k3 estimate of KL(rollout || train), exp(d) - d - 1 with
d = logp_train - logp_rollout, averaged over response tokens (unbiased for the KL because the
tokens are drawn from the rollout policy; >= 0, and 0 exactly when the log-probs are equal).
"""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.quant import apply_fp8

Array = jax.Array

PRECISIONS = ("bf16", "fp8_rollout", "fp8_unified")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
    return precision


def set_fp8(llm: nnx.Module, on: bool) -> int:
    """Every decoder `Dense` of `llm` (not the LM head) through block-granularity FP8 products
    (on) or plain products (off), in place (`jaxstack.quant.apply_fp8`); the layer count."""
    return apply_fp8(llm, "block" if on else None)


@contextlib.contextmanager
def fp8_products(llm: nnx.Module, on: bool = True):
    """`set_fp8(llm, on)` inside the block, plain products again after it."""
    set_fp8(llm, on)
    try:
        yield llm
    finally:
        set_fp8(llm, False)


def policy_graphdefs(llm: nnx.Module, precision: str) -> tuple[nnx.GraphDef, nnx.GraphDef]:
    """(training graphdef, rollout graphdef) of `llm` for `precision`, both splitting as
    `nnx.split(llm, nnx.Param, ...)` (so they merge with the same params and rest). Leaves `llm`
    with the training products set (FP8 only for fp8_unified)."""
    check_precision(precision)
    set_fp8(llm, precision != "bf16")
    rollout_def = nnx.split(llm, nnx.Param, ...)[0]
    set_fp8(llm, precision == "fp8_unified")
    return nnx.split(llm, nnx.Param, ...)[0], rollout_def


def mismatch_metrics(rollout_logp: Array, train_logp: Array, mask: Array) -> dict[str, Array]:
    """{"logp_abs_diff", "kl_rollout_train", "seq_kl_rollout_train"}: float32 means over the
    tokens where `mask` is True of |train - rollout| and of exp(d) - d - 1, d = train - rollout
    (module docstring), and the latter summed per response and averaged over the responses with
    a token: the KL between the two policies' whole-response distributions.
    rollout_logp, train_logp float [R, N]; mask bool [R, N]."""
    m = jnp.asarray(mask, bool)
    d = jnp.asarray(train_logp, jnp.float32) - jnp.asarray(rollout_logp, jnp.float32)
    d = jnp.where(m, d, 0.0)
    k3 = jnp.where(m, jnp.expm1(d) - d, 0.0)
    n = jnp.maximum(jnp.sum(m), 1)
    rows = jnp.maximum(jnp.sum(jnp.any(m, axis=-1)), 1)
    return {
        "logp_abs_diff": jnp.sum(jnp.abs(d)) / n,
        "kl_rollout_train": jnp.sum(k3) / n,
        "seq_kl_rollout_train": jnp.sum(k3) / rows,
    }


def step_mismatch(
    sampler_logp: Array, rollout_logp: Array, train_logp: Array, mask: Array
) -> dict[str, float]:
    """An RL step's logged mismatch, computed on the host (the arrays may live on different
    devices or meshes): `mismatch_metrics(rollout_logp, train_logp, mask)` plus
    "sampler_logp_abs_diff", the mean |sampler_logp - rollout_logp| over `mask` (the sampler's
    decode-step log-probs vs the rollout graph's teacher-forced recompute: the same products,
    summed in a different order)."""
    sampler, rollout, train, m = (
        np.asarray(a) for a in jax.device_get((sampler_logp, rollout_logp, train_logp, mask))
    )
    out = mismatch_metrics(rollout, train, m)
    out["sampler_logp_abs_diff"] = mismatch_metrics(sampler, rollout, m)["logp_abs_diff"]
    return {k: float(v) for k, v in out.items()}
