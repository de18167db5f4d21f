"""Policy-gradient losses for RL on language models: GRPO, DAPO and Dr.GRPO.

Everything here is a pure `jax.numpy` function of arrays, usable under `jax.jit`/`jax.grad`.
Shapes: `N` sequences (responses) in the batch, `T` response tokens per sequence (right-padded,
`mask` marks the valid ones), `V` vocabulary entries.

The three algorithms differ only in a few knobs:

* GRPO (DeepSeekMath): `group_advantages(..., scale="std")`, symmetric clip 0.2,
  `loss_agg="seq_mean_token_mean"`, optional k3 KL to a frozen reference (`kl_coef`).
* DAPO: clip-higher (`clip_high=0.28`), `loss_agg="token_mean"`, no KL, `dynamic_sampling_keep`
  to drop groups whose rewards are all equal, and `overlong_penalty` for soft length punishment.
* Dr.GRPO: `group_advantages(..., scale="none")` and `loss_agg="seq_mean_token_sum_norm"`
  (sum over tokens divided by a constant `max_response_len`).
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np

LOSS_AGGS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
ADVANTAGE_SCALES = ("std", "none")
KL_CLAMP = 10.0  # verl clamps the k3 ("low_var_kl") estimate to [-10, 10]
LOG_RATIO_CLAMP = 20.0  # verl clamps log(ratio) to [-20, 20] before exp


@dataclass(frozen=True)
class PolicyLossConfig:
    """Knobs of the clipped policy-gradient loss.

    clip_low / clip_high: the ratio is clipped to `[1 - clip_low, 1 + clip_high]`
        (DAPO "clip-higher" uses clip_high=0.28).
    loss_agg: how per-token losses become a scalar:
        "token_mean": sum over all valid tokens of the batch / number of valid tokens (DAPO).
        "seq_mean_token_mean": mean over the valid tokens of each sequence, then mean over the
            sequences (GRPO as published).
        "seq_mean_token_sum_norm": sum over the valid tokens of each sequence / `max_response_len`
            (a constant), then mean over the sequences (Dr.GRPO).
        Sequence means run over sequences with at least one valid token, so all-padding rows
        (e.g. used to pad a batch to a fixed size) change nothing.
    max_response_len: the Dr.GRPO constant; None means the padded length `T` of the batch.
    kl_coef: weight of the k3 ("low_var_kl") estimate of KL(policy || reference), added to the
        loss; needs `ref_logp`.
    entropy_coef: weight of an entropy bonus (subtracted from the loss); needs `entropy`.
    dual_clip: optional dual-clip constant c > 1 (e.g. 3.0): for negative advantages the
        per-token loss is capped at `-A * c`, so huge ratios cannot blow the loss up.
    """

    clip_low: float = 0.2
    clip_high: float = 0.2
    loss_agg: str = "token_mean"
    max_response_len: int | None = None
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    dual_clip: float | None = None

    def __post_init__(self):
        if not 0.0 <= self.clip_low < 1.0:
            raise ValueError(f"clip_low must be in [0, 1), got {self.clip_low}")
        if not self.clip_high >= 0.0:
            raise ValueError(f"clip_high must be >= 0, got {self.clip_high}")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")
        if self.max_response_len is not None and (
            isinstance(self.max_response_len, bool)
            or not isinstance(self.max_response_len, int | np.integer)
            or self.max_response_len <= 0
        ):
            raise ValueError(
                f"max_response_len must be a positive int or None, got {self.max_response_len!r}"
            )
        if not self.kl_coef >= 0.0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if not self.entropy_coef >= 0.0:
            raise ValueError(f"entropy_coef must be >= 0, got {self.entropy_coef}")
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 (e.g. 3.0) or None, got {self.dual_clip}")


def _num_groups(group_ids, num_groups: int | None) -> int:
    if num_groups is not None:
        if isinstance(num_groups, bool) or not isinstance(num_groups, int | np.integer):
            raise ValueError(f"num_groups must be a static int, got {num_groups!r}")
        if num_groups <= 0:
            raise ValueError(f"num_groups must be positive, got {num_groups}")
        return int(num_groups)
    try:
        ids = np.asarray(group_ids)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError) as e:
        raise ValueError(
            "num_groups must be given (as a static int) when group_ids is traced"
        ) from e
    if ids.size == 0:
        return 1
    if ids.min() < 0:
        raise ValueError(f"group ids must be >= 0, got {ids.min()}")
    return int(ids.max()) + 1


def group_advantages(
    rewards,
    group_ids,
    num_groups: int | None = None,
    *,
    eps: float = 1e-6,
    scale: str = "std",
) -> jax.Array:
    """GRPO group-normalised advantages: `(r - mean_g) / (std_g + eps)` per group `g`.

    rewards: [N] float. group_ids: [N] int in `[0, num_groups)`, naming the prompt each
    sample answers; samples of a group may sit anywhere in the batch (no positional pairing).
    num_groups: static number of groups (needed under jit; when None it is `max(group_ids) + 1`,
    read on the host). Samples with ids outside `[0, num_groups)` get meaningless advantages.
    scale: "std" divides by the *unbiased* (n - 1) group standard deviation, as verl does with
    `torch.std`; "none" only subtracts the group mean (Dr.GRPO).
    A group of one sample gets advantage 0; a group whose rewards are all equal gets 0.
    Returns [N] float32.
    """
    if scale not in ADVANTAGE_SCALES:
        raise ValueError(f"scale must be one of {ADVANTAGE_SCALES}, got {scale!r}")
    g = _num_groups(group_ids, num_groups)
    r = jnp.asarray(rewards, jnp.float32)
    ids = jnp.asarray(group_ids, jnp.int32)
    if r.ndim != 1 or ids.shape != r.shape:
        raise ValueError(f"rewards and group_ids must both be [N], got {r.shape} and {ids.shape}")
    count = jax.ops.segment_sum(jnp.ones_like(r), ids, num_segments=g)
    mean = jax.ops.segment_sum(r, ids, num_segments=g) / jnp.maximum(count, 1.0)
    centred = r - mean[ids]
    n = count[ids]
    if scale == "none":
        return jnp.where(n > 1, centred, 0.0)
    sq = jax.ops.segment_sum(centred * centred, ids, num_segments=g)
    den = jnp.sqrt(sq / jnp.maximum(count - 1.0, 1.0))[ids] + eps
    ok = (n > 1) & (den > 0)  # eps=0 with an all-equal group: 0, not 0/0
    return jnp.where(ok, centred / jnp.where(ok, den, 1.0), 0.0)


def token_entropy(logits) -> jax.Array:
    """Entropy (nats) of `softmax(logits)` over the last axis: [..., V] -> [...] float32.

    Computed in float32 from `log_softmax`; `-inf` logits (masked vocabulary) contribute 0.
    """
    logits = jnp.asarray(logits, jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    return -jnp.sum(jnp.where(p > 0, p * logp, 0.0), axis=-1)


def _masked_mean(x, mask) -> jax.Array:
    return jnp.sum(jnp.where(mask, x, 0.0)) / jnp.maximum(jnp.sum(mask), 1)


def _aggregate(per_token, mask, cfg: PolicyLossConfig) -> jax.Array:
    """Reduce [N, T] per-token values to a scalar following `cfg.loss_agg`."""
    x = jnp.where(mask, per_token, 0.0)
    if cfg.loss_agg == "token_mean":
        return jnp.sum(x) / jnp.maximum(jnp.sum(mask), 1)
    tokens = jnp.sum(mask, axis=-1)  # [N]
    seq_sum = jnp.sum(x, axis=-1)  # [N]
    if cfg.loss_agg == "seq_mean_token_mean":
        seq = seq_sum / jnp.maximum(tokens, 1)
    else:  # seq_mean_token_sum_norm
        norm = cfg.max_response_len if cfg.max_response_len is not None else mask.shape[-1]
        seq = seq_sum / float(norm)
    live = tokens > 0
    return jnp.sum(jnp.where(live, seq, 0.0)) / jnp.maximum(jnp.sum(live), 1)


def k3_kl(logp, ref_logp) -> jax.Array:
    """Per-token k3 ("low_var_kl") estimate of KL(policy || ref), clipped to [-10, 10].

    `exp(ref - logp) - (ref - logp) - 1`, the verl form (>= 0, unbiased for samples of the policy).
    """
    d = jnp.clip(ref_logp - logp, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return jnp.clip(jnp.exp(d) - d - 1.0, -KL_CLAMP, KL_CLAMP)


def policy_loss(
    logp,
    old_logp,
    advantages,
    mask,
    cfg: PolicyLossConfig,
    *,
    ref_logp=None,
    entropy=None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """PPO clipped surrogate for GRPO/DAPO/Dr.GRPO.

    logp: [N, T] log-probs of the sampled tokens under the policy being trained (differentiate
    through this). old_logp: [N, T] the same under the policy that sampled them (no gradient).
    advantages: [N] per sequence (broadcast over its tokens) or [N, T] per token.
    mask: [N, T] bool, True for valid response tokens. ref_logp: optional [N, T] under the frozen
    reference (needed when `cfg.kl_coef > 0`). entropy: optional [N, T] token entropies (see
    `token_entropy`; needed when `cfg.entropy_coef > 0`).

    Per token, with `ratio = exp(logp - old_logp)`:
      `pg = max(-A * ratio, -A * clip(ratio, 1 - clip_low, 1 + clip_high))`,
    and with dual clip c, for `A < 0`: `pg = min(pg, -A * c)`.
    loss = agg(pg) + kl_coef * agg(k3) - entropy_coef * agg(entropy), agg per `cfg.loss_agg`.

    Metrics (float32 scalars, means over valid tokens only):
      pg_loss: agg(pg), the policy-gradient part of the loss.
      clip_frac: fraction of valid tokens where the ratio clip is active (the clipped branch is
        strictly larger, so the token gives no gradient).
      dual_clip_frac: (only with dual_clip) fraction of valid tokens capped by the dual clip.
      approx_kl: mean of `old_logp - logp`, the k1 estimate of KL(old || new) (verl's ppo_kl).
      ratio_mean: mean ratio.
      kl_ref: (when ref_logp is given) mean k3 KL to the reference.
      entropy: (when entropy is given) mean entropy.
    A fully masked batch yields loss 0 and finite metrics (counts are guarded with max(n, 1)).
    """
    logp = jnp.asarray(logp, jnp.float32)
    old_logp = jnp.asarray(old_logp, jnp.float32)
    mask = jnp.asarray(mask).astype(bool)
    if logp.ndim != 2 or old_logp.shape != logp.shape or mask.shape != logp.shape:
        raise ValueError(
            f"logp, old_logp and mask must all be [N, T]; got {logp.shape}, {old_logp.shape}, "
            f"{mask.shape}"
        )
    adv = jnp.asarray(advantages, jnp.float32)
    if adv.shape == logp.shape[:1]:
        adv = adv[:, None]
    elif adv.shape != logp.shape:
        raise ValueError(
            f"advantages must be [N] or [N, T] with [N, T]={logp.shape}, got {adv.shape}"
        )
    if cfg.kl_coef > 0 and ref_logp is None:
        raise ValueError("cfg.kl_coef > 0 needs ref_logp")
    if cfg.entropy_coef > 0 and entropy is None:
        raise ValueError("cfg.entropy_coef > 0 needs entropy")

    # Zero the log-ratio on padding so garbage there cannot make inf/NaN (in values or grads).
    log_ratio = jnp.where(mask, logp - old_logp, 0.0)
    log_ratio = jnp.clip(log_ratio, -LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * jnp.clip(ratio, 1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    is_clipped = clipped > unclipped
    pg = jnp.where(is_clipped, clipped, unclipped)
    metrics: dict[str, jax.Array] = {}
    if cfg.dual_clip is not None:
        cap = -adv * cfg.dual_clip
        is_dual = (adv < 0) & (pg > cap)
        pg = jnp.where(is_dual, cap, pg)
        metrics["dual_clip_frac"] = _masked_mean(is_dual.astype(jnp.float32), mask)

    pg_loss = _aggregate(pg, mask, cfg)
    loss = pg_loss
    metrics["pg_loss"] = pg_loss
    metrics["clip_frac"] = _masked_mean(is_clipped.astype(jnp.float32), mask)
    metrics["approx_kl"] = _masked_mean(-log_ratio, mask)
    metrics["ratio_mean"] = _masked_mean(ratio, mask)
    if ref_logp is not None:
        ref = jnp.asarray(ref_logp, jnp.float32)
        kl = k3_kl(jnp.where(mask, logp, 0.0), jnp.where(mask, ref, 0.0))
        metrics["kl_ref"] = _masked_mean(kl, mask)
        if cfg.kl_coef > 0:
            loss = loss + cfg.kl_coef * _aggregate(kl, mask, cfg)
    if entropy is not None:
        ent = jnp.where(mask, jnp.asarray(entropy, jnp.float32), 0.0)
        metrics["entropy"] = _masked_mean(ent, mask)
        if cfg.entropy_coef > 0:
            loss = loss - cfg.entropy_coef * _aggregate(ent, mask, cfg)
    return loss, metrics


def dynamic_sampling_keep(rewards, group_ids, num_groups: int | None = None) -> jax.Array:
    """DAPO dynamic-sampling filter: [N] bool, True for samples whose group's rewards differ.

    Groups whose rewards are all equal (all 0, all 1, ...) give zero advantage and hence no
    gradient, so DAPO drops them (and keeps sampling). A group of one sample is dropped too.
    num_groups: as in `group_advantages`.
    """
    g = _num_groups(group_ids, num_groups)
    r = jnp.asarray(rewards, jnp.float32)
    ids = jnp.asarray(group_ids, jnp.int32)
    hi = jax.ops.segment_max(r, ids, num_segments=g)
    lo = jax.ops.segment_min(r, ids, num_segments=g)
    return (hi > lo)[ids]


def overlong_penalty(lengths, *, max_len: int, buffer_len: int, penalty: float = 1.0) -> jax.Array:
    """DAPO soft overlong punishment (added to the reward): [N] lengths -> [N] float32.

    0 for `length <= max_len - buffer_len`, then linear down to `-penalty` at `length == max_len`,
    and `-penalty` beyond.
    """
    if not 0 < buffer_len <= max_len:
        raise ValueError(
            f"need 0 < buffer_len <= max_len, got buffer_len={buffer_len}, max_len={max_len}"
        )
    if not penalty >= 0:
        raise ValueError(f"penalty must be >= 0, got {penalty}")
    length = jnp.asarray(lengths, jnp.float32)
    start = float(max_len - buffer_len)
    frac = jnp.clip((length - start) / float(buffer_len), 0.0, 1.0)
    return -penalty * frac
