"""`jaxstack rl`: long-video RL for the NVILA VLM (CoT-SFT stage, then GRPO / DAPO / Dr.GRPO).

One RL step (P prompts, G samples each):
1. The prompts of step i are stream positions [i*P, (i+1)*P) of a seeded grain shuffle of the
   training records (a pure function of i: exact resume).
2. MR-SP stage 1: video embeddings come from `VideoEmbeddingCache` by prompt id (encoded once,
   reused by the rollout and every log-prob pass; the vision tower and projector are frozen).
3. Rollout: each prompt is prefilled once and its KV cache shared by its G samples
   (`jaxstack.generate.rollout`), rng = fold_in(seed, i).
4. Rewards on the decoded responses (registry specs with weights, e.g. {"r1v": 1.0}), optional
   DAPO overlong penalty, group-normalised advantages by explicit group id, optional DAPO
   dynamic sampling (groups with equal rewards get no loss).
5. `update_epochs` x `minibatches` policy-gradient updates of the LLM with the clipped
   surrogate (`jaxstack.rl.losses.policy_loss`); log-probs are recomputed by a training forward
   over [prompt ; response] that computes logits only for response positions. With a single
   update the old log-probs are the stop-gradient of the new ones (ratio exactly 1).
6. `precision` (jaxstack/rl/jet.py): bf16, fp8_rollout (FP8 rollout graph, BF16 training) or
   fp8_unified (one FP8 forward for both). Every step logs the rollout/training mismatch over
   the response tokens: the rollout graph's teacher-forced log-probs vs the training forward's
   at the same parameters before the update (`logp_abs_diff`, `kl_rollout_train`), and the
   sampler's own decode-step log-probs vs the former (`sampler_logp_abs_diff`).

Artifacts in `output_dir` (default runs/<name>): sft/ (the SFT stage when `init_from` is empty),
config.yaml, metrics.jsonl, rewards.png, checkpoints/<step>/ (exact resume), model/ (NVILA
layout), eval_sft.json / eval_rl.json (held-out greedy accuracy before / after RL),
summary.json.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxstack.models.nvila_connector import merge_multimodal
from jaxstack.rl import jet
from jaxstack.rl.losses import (
    PolicyLossConfig,
    dynamic_sampling_keep,
    group_advantages,
    overlong_penalty,
    policy_loss,
)
from jaxstack.train import step as step_lib
from jaxstack.train.loop import LoopParts, RunConfig, run_loop, write_json
from jaxstack.train.sections import NumericsSection
from jaxstack.train.step import OptimConfig, TrainState
from jaxstack.train.video_qa import decode_response, ensure_dataset, evaluate_video_qa
from jaxstack.train.vlm_sft import VLMSFTConfig, run_vlm_sft

Array = jax.Array


@dataclasses.dataclass
class RolloutSection:
    """num_samples: G responses per prompt; temperature/top_p/top_k: sampling."""

    num_samples: int = 8
    max_new_tokens: int = 88
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self):
        checks = (
            ("num_samples", self.num_samples >= 1),
            ("max_new_tokens", self.max_new_tokens >= 1),
            ("temperature", self.temperature >= 0),
            ("top_p", 0 < self.top_p <= 1),
            ("top_k", self.top_k >= 0),
        )
        for key, ok in checks:
            if not ok:
                raise ValueError(f"rollout.{key} out of range: {getattr(self, key)!r}")


@dataclasses.dataclass
class AlgoSection:
    """Policy-gradient settings. advantage: "grpo" (group mean / std) or "drgrpo" (mean only).
    clip_low/clip_high: PPO ratio clip (DAPO clip-higher: clip_high 0.28). loss_agg:
    "token_mean" (DAPO), "seq_mean_token_mean" (GRPO) or "seq_mean_token_sum_norm" (Dr.GRPO).
    kl_coef > 0 adds k3 KL to the frozen starting policy. dynamic_sampling: drop groups whose
    rewards are all equal (DAPO). overlong_buffer > 0: DAPO soft overlong penalty over the last
    that many tokens of max_new_tokens. update_epochs x minibatches updates per rollout batch."""

    advantage: str = "grpo"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: float | None = None
    loss_agg: str = "token_mean"
    kl_coef: float = 0.05
    dynamic_sampling: bool = True
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    update_epochs: int = 1
    minibatches: int = 1

    def __post_init__(self):
        if self.advantage not in ("grpo", "drgrpo"):
            raise ValueError(f"algo.advantage must be 'grpo' or 'drgrpo', got {self.advantage!r}")
        if self.update_epochs < 1 or self.minibatches < 1:
            raise ValueError("algo.update_epochs and algo.minibatches must be >= 1")


@dataclasses.dataclass
class RLJobConfig(RunConfig):
    """The RL job. init_from: an NVILA checkpoint directory (an SFT result) to start from; ""
    runs the embedded `sft` stage first (its data section is also the RL data). policy: compute
    dtype, master-weight dtype and remat of the trained LLM. reward: {spec: weight} over the
    reward registry (names, `module:fn` or `file.py:fn`). prompts_per_step: P prompts per RL
    step (P * G samples). cache_embeddings: MR-SP embedding reuse (False re-encodes the video
    for every pass: the baseline). precision: "bf16", "fp8_rollout" or "fp8_unified" (Jet-RL,
    jaxstack/rl/jet.py; FP8 is block-scaled; policy.precision must stay "bf16")."""

    RESUME_FREE: ClassVar[tuple[str, ...]] = (
        *RunConfig.RESUME_FREE,
        "eval",
        "eval_batch",
        "cache_embeddings",
        "sft.eval",
        "sft.eval_batch",
        "sft.log_every",
        "sft.checkpoint_every",
        "sft.keep_checkpoints",
        "sft.output_dir",
    )
    RESUME_WARN: ClassVar[tuple[str, ...]] = ("policy.remat", "policy.dtype")

    name: str = "rl_tiny"
    init_from: str = ""
    sft: VLMSFTConfig = dataclasses.field(
        default_factory=lambda: VLMSFTConfig(name="sft", steps=300, eval=0)
    )
    policy: NumericsSection = dataclasses.field(default_factory=NumericsSection)
    rollout: RolloutSection = dataclasses.field(default_factory=RolloutSection)
    algo: AlgoSection = dataclasses.field(default_factory=AlgoSection)
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(
            lr=3e-5, warmup_steps=2, total_steps=0, weight_decay=0.0, min_lr_ratio=1.0
        )
    )
    reward: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"mc_accuracy": 0.9, "format": 0.1}
    )
    steps: int = 40
    prompts_per_step: int = 8
    cache_embeddings: bool = True
    precision: str = "bf16"
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    log_every: int = 1
    eval: int = 160
    eval_batch: int = 80

    def __post_init__(self):
        super().__post_init__()
        for key in ("prompts_per_step", "eval_batch"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
        if self.eval < 0:
            raise ValueError(f"eval must be >= 0, got {self.eval}")
        if self.prompts_per_step % self.algo.minibatches:
            raise ValueError("prompts_per_step must be divisible by algo.minibatches")
        jet.check_precision(self.precision)
        if self.policy.precision != "bf16":
            raise ValueError(
                "policy.precision is not read by jaxstack rl: set precision="
                f"{'|'.join(jet.PRECISIONS)} instead"
            )

    def resolved(self) -> RLJobConfig:
        cfg = super().resolved()
        sft_dir = self.sft.output_dir or os.path.join(cfg.output_dir, "sft")
        return dataclasses.replace(cfg, sft=dataclasses.replace(self.sft, output_dir=sft_dir))


# -- the policy update -------------------------------------------------------------------------


def policy_cfg(algo: AlgoSection, max_new_tokens: int) -> PolicyLossConfig:
    return PolicyLossConfig(
        clip_low=algo.clip_low,
        clip_high=algo.clip_high,
        loss_agg=algo.loss_agg,
        max_response_len=max_new_tokens,
        kl_coef=algo.kl_coef,
        dual_clip=algo.dual_clip,
    )


def response_logprobs(llm: nnx.Module, batch: dict, media_token_id: int, temperature: float):
    """Per-token log-probs [P*G, N] of the responses under `llm` (training forward).

    batch: prompt_ids int32 [P, T] left padded, prompt_mask bool [P, T], video float [P, V, D]
    (cached embeddings, one clip per prompt), tokens / mask [P*G, N], prompt_index int32 [P*G].
    The prompt's text embeddings come from `llm` (so they are trained), the video rows are
    spliced in at the placeholders.
    """
    from jaxstack.generate.rollout import sequence_logprobs

    video = batch["video"]
    text = llm.embed(batch["prompt_ids"])
    embeds = merge_multimodal(
        text, batch["prompt_ids"], video.reshape(-1, video.shape[-1]), media_token_id
    )
    return sequence_logprobs(
        llm,
        prompt_embeds=embeds,
        prompt_mask=batch["prompt_mask"],
        response_tokens=batch["tokens"],
        response_mask=batch["mask"],
        prompt_index=batch["prompt_index"],
        temperature=temperature,
    )


def make_update(
    graphdef: nnx.GraphDef,
    rest: nnx.State,
    optimizer: optax.GradientTransformation,
    pcfg: PolicyLossConfig,
    *,
    media_token_id: int,
    temperature: float,
    mesh=None,
    state_sh: TrainState | None = None,
):
    """`update(state, batch, ref_params) -> (state, metrics)`: one clipped policy-gradient step,
    built on the shared sharded update (`jaxstack.train.step.make_update`: the state's
    shardings, the mesh and its compiler options; ref_params, the frozen reference policy for
    the KL term or None, share the params' shardings and are never donated). graphdef: the
    training graph (`jet.policy_graphdefs`: FP8 products for fp8_unified).

    batch as in `response_logprobs` plus advantages float32 [P*G] and old_logp [P*G, N] (None:
    use the stop-gradient of the new log-probs, i.e. a single on-policy update).
    """

    def objective(params, batch, ref_params):
        llm = nnx.merge(graphdef, params, rest)
        logp = response_logprobs(llm, batch, media_token_id, temperature)
        old = batch.get("old_logp")
        old = jax.lax.stop_gradient(logp) if old is None else old
        ref = None
        if ref_params is not None:
            ref_llm = nnx.merge(graphdef, ref_params, rest)
            ref = jax.lax.stop_gradient(
                response_logprobs(ref_llm, batch, media_token_id, temperature)
            )
        loss, metrics = policy_loss(
            logp, old, batch["advantages"], batch["mask"], pcfg, ref_logp=ref
        )
        n = jnp.maximum(jnp.sum(batch["mask"]), 1)
        metrics["neg_logp"] = -jnp.sum(jnp.where(batch["mask"], logp, 0.0)) / n
        return loss, jnp.ones((), jnp.float32), metrics  # a per-batch mean: denominator 1

    ref_sh = None if state_sh is None or pcfg.kl_coef == 0 else state_sh.params
    return step_lib.make_update(
        objective, optimizer, mesh=mesh, state_sh=state_sh, frozen_sh=ref_sh
    )


# -- rewards -----------------------------------------------------------------------------------


def score(
    texts: Sequence[str], examples: Sequence[dict], reward_weights: dict[str, float]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(total rewards float32 [N], per-component scores {spec: [N]}) for decoded responses."""
    from jaxstack.rl.rewards import combine_rewards

    fn = combine_rewards(reward_weights)
    totals, parts = [], {}
    for text, ex in zip(texts, examples):
        total, comp = fn(text, ex)
        totals.append(total)
        for k, v in comp.items():
            parts.setdefault(k, []).append(v)
    return np.asarray(totals, np.float32), {k: np.asarray(v, np.float32) for k, v in parts.items()}


# -- job ---------------------------------------------------------------------------------------


def _sft_stage(cfg: RLJobConfig) -> str:
    """Run (or reuse) the SFT stage (its own run in `sft.output_dir`); returns the NVILA
    checkpoint directory to start RL from."""

    if cfg.init_from:
        if not os.path.isdir(cfg.init_from):
            raise FileNotFoundError(f"init_from {cfg.init_from!r} is not a directory")
        return cfg.init_from
    done = os.path.join(cfg.sft.output_dir, "summary.json")
    if os.path.isfile(done):
        with open(done) as f:
            summary = json.load(f)
        if summary.get("step") == cfg.sft.steps and os.path.isdir(summary.get("model_dir", "")):
            return summary["model_dir"]
    print(f"SFT stage: {cfg.sft.steps} steps -> {cfg.sft.output_dir}")
    return run_vlm_sft(cfg.sft)["model_dir"]


class PromptStream:
    """The RL prompts of step i: a seeded grain shuffle of the records, P per step, skipping
    (and counting) records whose video cannot be decoded."""

    def __init__(self, records: list[dict], per_step: int, seed: int, cache):
        import grain

        self.records, self.per_step, self.cache = records, per_step, cache
        self.stream = grain.MapDataset.range(len(records)).seed(seed).shuffle().repeat()
        self.bad: set[int] = set()
        self.skipped = 0

    def step(self, i: int) -> tuple[list[dict], Array]:
        """(records [P], video embeddings [P, V, D]) for RL step i."""
        from jaxstack.data.video import VideoError

        recs, embs, pos = [], [], i * self.per_step
        limit = (i + 1) * self.per_step + 10 * len(self.records)
        while len(recs) < self.per_step:
            if pos >= limit:
                raise ValueError("no decodable video found in the RL dataset")
            idx = int(self.stream[pos])
            pos += 1
            if idx in self.bad:
                continue
            try:
                embs.append(self.cache.get(self.records[idx]))
            except VideoError as e:
                self.bad.add(idx)
                self.skipped += 1
                print(f"warning: skipping record {self.records[idx]['id']!r}: {e}")
                continue
            recs.append(self.records[idx])
        return recs, jnp.stack(embs)


@dataclasses.dataclass
class RLSetup:
    """Everything one RL step needs, built once by `build_rl` (the job's model, data and
    compiled functions). `state` is the initial `TrainState` of the LLM (the trained part: the
    vision tower and projector are frozen and their output cached)."""

    cfg: RLJobConfig
    mesh: Any
    model: Any
    tok: Any
    vspec: Any
    loader: Any
    n_media: int
    held: list[dict]
    cache: Any
    prompts: PromptStream
    graphdef: nnx.GraphDef
    rest: nnx.State
    state: TrainState
    shardings: TrainState | None
    ref_params: Any
    update: Any
    logp_fn: Any
    prompt_fn: Any
    rollout_cfg: Any
    key: Array
    rollout_graphdef: nnx.GraphDef
    rollout_logp_fn: Any

    def llm_with(self, params, rollout: bool = False) -> nnx.Module:
        """The policy LLM on `params`, with the rollout graph's products if `rollout`."""
        return nnx.merge(self.rollout_graphdef if rollout else self.graphdef, params, self.rest)


def build_rl(cfg: RLJobConfig, start_dir: str, mesh=None) -> RLSetup:
    """Load the policy from `start_dir` (NVILA layout) onto `mesh` (None: one device) and build
    the step's pieces; cfg must be `resolved()`."""
    from jaxstack.data.tokenizer import load_tokenizer
    from jaxstack.data.video_qa import FrameLoader, VideoSpec, read_video_qa
    from jaxstack.generate.rollout import RolloutConfig
    from jaxstack.hf import load_nvila
    from jaxstack.rl.embedding_cache import VideoEmbeddingCache

    data_cfg = cfg.sft.data
    train_path, eval_path = ensure_dataset(data_cfg)
    tok = load_tokenizer(data_cfg.tokenizer)
    model = load_nvila(
        start_dir,
        dtype=cfg.policy.compute_dtype,
        param_dtype=cfg.policy.master_dtype,
        mesh=mesh,
        remat=cfg.policy.remat,
    )
    vcfg = model.cfg
    vspec = VideoSpec(num_frames=data_cfg.num_frames, image_size=data_cfg.image_size)
    loader = FrameLoader(vspec)
    records = read_video_qa(train_path)
    held = (
        read_video_qa(eval_path)[: cfg.eval] if cfg.eval > 0 and os.path.isfile(eval_path) else []
    )
    cache = VideoEmbeddingCache(
        model, lambda r: loader(r["video_path"]), mesh=mesh, enabled=cfg.cache_embeddings
    )
    optimizer = step_lib.make_optimizer(cfg.optim)
    state, shardings = step_lib.init_train_state(model.llm, optimizer, mesh)
    graphdef, rollout_def = jet.policy_graphdefs(model.llm, cfg.precision)
    rest = nnx.split(model.llm, nnx.Param, ...)[2]
    ref_params = jax.tree.map(jnp.copy, state.params) if cfg.algo.kl_coef > 0 else None
    update = make_update(
        graphdef,
        rest,
        optimizer,
        policy_cfg(cfg.algo, cfg.rollout.max_new_tokens),
        media_token_id=vcfg.media_token_id,
        temperature=cfg.rollout.temperature,
        mesh=mesh,
        state_sh=shardings,
    )

    def logp_fn_of(gd):
        return jax.jit(
            lambda params, batch: response_logprobs(
                nnx.merge(gd, params, rest), batch, vcfg.media_token_id, cfg.rollout.temperature
            )
        )

    logp_fn = logp_fn_of(graphdef)
    # bf16 / fp8_unified: the rollout graph is the training graph, its log-probs the same call
    rollout_logp_fn = logp_fn_of(rollout_def) if cfg.precision == "fp8_rollout" else logp_fn
    prompt_fn = jax.jit(
        lambda params, ids, video: merge_multimodal(
            nnx.merge(graphdef, params, rest).embed(ids),
            ids,
            video.reshape(-1, video.shape[-1]),
            vcfg.media_token_id,
        )
    )
    rcfg = RolloutConfig(
        num_samples=cfg.rollout.num_samples,
        max_new_tokens=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature,
        top_p=cfg.rollout.top_p,
        top_k=cfg.rollout.top_k,
        stop_token_ids=(tok.eos_id,),
        pad_id=tok.pad_id,
    )
    return RLSetup(
        cfg=cfg,
        mesh=mesh,
        model=model,
        tok=tok,
        vspec=vspec,
        loader=loader,
        n_media=vcfg.video_length(vspec.num_frames),
        held=held,
        cache=cache,
        prompts=PromptStream(records, cfg.prompts_per_step, cfg.seed, cache),
        graphdef=graphdef,
        rest=rest,
        state=state,
        shardings=shardings,
        ref_params=ref_params,
        update=update,
        logp_fn=logp_fn,
        prompt_fn=prompt_fn,
        rollout_cfg=rcfg,
        key=jax.random.key(cfg.seed),
        rollout_graphdef=rollout_def,
        rollout_logp_fn=rollout_logp_fn,
    )


def rl_batch(setup: RLSetup, params, i: int) -> tuple[dict, dict]:
    """Rollout, rewards and advantages of RL step i under `params`: (update batch, host info).

    batch: as `make_update` takes it (advantages float32 [P*G]; mask already zero for groups
    dropped by dynamic sampling). info: rewards [P*G], reward parts, lengths, keep (numpy),
    the sampler's log-probs and response mask ([P*G, N], device arrays).
    """
    from jaxstack.data.video_qa import prompt_ids
    from jaxstack.generate.engine import pad_prompts
    from jaxstack.generate.rollout import rollout

    cfg, tok, rcfg = setup.cfg, setup.tok, setup.rollout_cfg
    media_id = setup.model.cfg.media_token_id
    p = cfg.prompts_per_step
    recs, video = setup.prompts.step(i)
    ids_list = [prompt_ids(r, tok, media_token_id=media_id, num_media=setup.n_media) for r in recs]
    ids, pmask = pad_prompts(ids_list, pad_id=tok.pad_id, bucket=rcfg.length_bucket)
    ids, pmask = jnp.asarray(ids), jnp.asarray(pmask)
    embeds = setup.prompt_fn(params, ids, video)
    res = rollout(
        setup.llm_with(params, rollout=True),
        inputs_embeds=embeds,
        input_mask=pmask,
        cfg=rcfg,
        rng=jax.random.fold_in(setup.key, i),
    )
    tokens, lengths, pidx = jax.device_get((res.tokens, res.lengths, res.prompt_index))
    texts = [decode_response(tok, row[:n]) for row, n in zip(tokens, lengths)]
    rewards, parts = score(texts, [recs[j] for j in pidx], cfg.reward)
    if cfg.algo.overlong_buffer > 0:
        rewards = rewards + np.asarray(
            overlong_penalty(
                jnp.asarray(lengths),
                max_len=cfg.rollout.max_new_tokens,
                buffer_len=cfg.algo.overlong_buffer,
                penalty=cfg.algo.overlong_penalty,
            )
        )
    scale = "std" if cfg.algo.advantage == "grpo" else "none"
    adv = group_advantages(jnp.asarray(rewards), jnp.asarray(pidx), p, scale=scale)
    mask = res.mask
    keep = np.ones(len(rewards), bool)
    if cfg.algo.dynamic_sampling:
        keep = np.asarray(dynamic_sampling_keep(jnp.asarray(rewards), jnp.asarray(pidx), p))
        mask = mask & jnp.asarray(keep)[:, None]
    batch = dict(
        prompt_ids=ids,
        prompt_mask=pmask,
        video=video,
        tokens=res.tokens,
        mask=mask,
        prompt_index=res.prompt_index,
        advantages=adv,
    )
    if setup.mesh is not None:  # the update runs on the mesh: the batch is replicated there
        from jax.sharding import NamedSharding, PartitionSpec

        batch = jax.device_put(batch, NamedSharding(setup.mesh, PartitionSpec()))
    info = dict(rewards=rewards, parts=parts, lengths=lengths, keep=keep, texts=texts)
    info.update(sampler_logp=res.logprobs, response_mask=res.mask)
    return batch, info


def rl_step(setup: RLSetup, state: TrainState, i: int) -> tuple[TrainState, dict, dict]:
    """One RL step i: `rl_batch`, then update_epochs x minibatches policy updates.

    Returns (new state, metrics row, the update batch). `state` is donated to the update.
    """
    t0 = time.perf_counter()
    cfg = setup.cfg
    batch, info = rl_batch(setup, state.params, i)
    train_logp = setup.logp_fn(state.params, batch)
    mismatch = jet.step_mismatch(
        info["sampler_logp"],
        setup.rollout_logp_fn(state.params, batch),
        train_logp,
        info["response_mask"],
    )
    if cfg.algo.update_epochs * cfg.algo.minibatches > 1:
        batch["old_logp"] = train_logp
    step_metrics = []
    for _ in range(cfg.algo.update_epochs):
        for mb in _minibatches(batch, cfg.algo.minibatches, cfg.rollout.num_samples):
            state, m = setup.update(state, mb, setup.ref_params)
            step_metrics.append({k: v for k, v in m.items() if k != "tokens"})
    m = {k: float(np.mean([float(x[k]) for x in step_metrics])) for k in step_metrics[0]}
    if not math.isfinite(m["loss"]):
        raise FloatingPointError(f"RL loss is {m['loss']} at step {i + 1}; stopped")
    rewards = info["rewards"]
    row = dict(
        reward=float(rewards.mean()),
        **{f"reward_{k}": float(v.mean()) for k, v in info["parts"].items()},
        response_len=float(np.mean(info["lengths"])),
        kept_frac=float(info["keep"].mean()),
        **m,
        **mismatch,
        encoder_calls=setup.cache.encoder_calls,
        cache_hits=setup.cache.hits,
        skipped_videos=setup.prompts.skipped,
        step_seconds=time.perf_counter() - t0,
    )
    return state, row, batch


def build_rl_job(cfg: RLJobConfig, mesh) -> LoopParts:
    """The RL job's parts for `run_loop`: the SFT stage (or `init_from`), the policy and its
    step pieces (`build_rl`), the held-out evaluation before RL; each loop step is `rl_step`
    (host rollout and rewards around the sharded policy update); at the end the NVILA export
    and the evaluation after RL. Host counters (skipped videos, undecodable records) persist
    across resumes; the embedding cache starts empty on resume."""
    from jaxstack.hf import save_nvila

    out, main = cfg.output_dir, jax.process_index() == 0
    setup = build_rl(cfg, _sft_stage(cfg), mesh)
    model, tok = setup.model, setup.tok

    def evaluate(tag: str) -> float | None:
        path = os.path.join(out, f"eval_{tag}.json")
        if os.path.isfile(path):
            with open(path) as f:
                return json.load(f)["accuracy"]
        if not setup.held:
            return None
        res = evaluate_video_qa(
            model,
            tok,
            setup.held,
            setup.vspec,
            batch=cfg.eval_batch,
            max_new_tokens=cfg.rollout.max_new_tokens,
            loader=setup.loader,
        )
        write_json(path, res)
        if main:
            print(f"held-out accuracy ({tag}): {res['accuracy']:.3f}, per task {res['per_task']}")
        return res["accuracy"]

    sft_acc = evaluate("sft")

    def counters() -> dict:
        return {"skipped_videos": setup.prompts.skipped, "bad_records": sorted(setup.prompts.bad)}

    def restore_counters(saved: dict) -> None:
        setup.prompts.skipped = int(saved.get("skipped_videos", 0))
        setup.prompts.bad = set(saved.get("bad_records", []))

    def finish(state, summary: dict) -> dict:
        params = nnx.state(model.llm, nnx.Param)
        nnx.replace_by_pure_dict(params, state.params)
        nnx.update(model.llm, params)
        save_nvila(model, model_dir := os.path.join(out, "model"))
        return {
            "sft_accuracy": sft_acc,
            "model_dir": model_dir,
            "rl_accuracy": evaluate("rl"),
            "cache": setup.cache.stats(),
        }

    state, shardings = setup.state, setup.shardings
    setup.state = None  # the loop owns the state (donated step by step)
    return LoopParts(
        state=state,
        shardings=shardings,
        step=lambda state, _, i: rl_step(setup, state, i)[:2],
        log_row=lambda step_no, m: m,
        counters=counters,
        restore_counters=restore_counters,
        finish=finish,
        plot_keys=("reward", "reward_mc_accuracy", "response_len"),
        plot_name="rewards.png",
    )


def run_rl(cfg: RLJobConfig, *, resume: bool | str = True, stop_after: int | None = None) -> dict:
    """Run (or resume) the RL job on the shared loop; returns a summary (also summary.json)
    with sft_accuracy and rl_accuracy (held-out greedy accuracy before / after RL).
    stop_after: stop right after that step as if killed (tests resumption)."""
    return run_loop(
        cfg, lambda mesh: build_rl_job(cfg.resolved(), mesh), resume=resume, stop_after=stop_after
    )


def _minibatches(batch: dict, n: int, g: int):
    """Split a step's batch into n minibatches of whole prompt groups (prompt-major rows)."""
    if n == 1:
        yield batch
        return
    p = batch["prompt_ids"].shape[0]
    per = p // n
    for j in range(n):
        lo, hi = j * per, (j + 1) * per
        mb = {}
        for k, v in batch.items():
            if k in ("prompt_ids", "prompt_mask", "video"):
                mb[k] = v[lo:hi]
            elif k == "prompt_index":
                mb[k] = v[lo * g : hi * g] - lo
            else:
                mb[k] = v[lo * g : hi * g]
        yield mb
