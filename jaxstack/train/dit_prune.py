"""Block-importance pruning of a trained text-to-image DiT, then a short fine-tune
(`jaxstack prune-dit`), on the shared loop.

SANA-1.5's recipe (../shared/specs/sana.md §7): measure each block's importance
BI_i = 1 - E[cos(x_in^i, x_out^i)] (`jaxstack/train/sana15.py`), drop the lowest-BI blocks
down to `prune.keep`, fine-tune briefly. The job loads a `jaxstack train-dit` model
(`jaxstack/train/dit_trainer.py`: a run directory's newest checkpoint, one checkpoint, or the
exported `model/` folder), averages BI over `prune.bi_batches` batches of training prompts
(their images noised to `prune.timesteps` evenly spaced training timesteps, conditioned on
their captions), prunes, fine-tunes for `steps` steps with the train job's flow-matching update
(checkpoints, exact resume, loss plot from `jaxstack/train/loop.py`), and judges the held-out
prompts three times with the same sampling settings: the source model, the pruned model before
the fine-tune and after it. It prints

    prune: blocks N->K accuracy full=<a> pruned=<b> finetuned=<c>

Artifacts in `output_dir`: config.yaml, metrics.jsonl, loss.png, checkpoints/, model/ (the
fine-tuned model, loadable with `dit_trainer.load_word_caption_dit`), samples.png (held-out
prompts after the fine-tune), eval.json (block importance, dropped and kept blocks, the three
evaluations, timings), summary.json.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterator
from typing import Any, ClassVar

import jax
import numpy as np
from flax import nnx

from jaxstack.config import load_config
from jaxstack.models.sana import SanaTransformer
from jaxstack.models.text_to_image import WordCaptionDiT
from jaxstack.train import step as step_lib
from jaxstack.train.checkpoint import Checkpointer, CheckpointError, abstract_state
from jaxstack.train.dit_trainer import (
    CAPTION_FILE,
    OPTIMIZERS,
    DiTModelSection,
    DiTTrainConfig,
    SamplingSection,
    ShapeBatches,
    ShapesDataSection,
    build_dit,
    evaluate_prompts,
    flow_objective,
    load_word_caption_dit,
    make_dit_optimizer,
    save_grid,
    save_word_caption_dit,
)
from jaxstack.train.flow_matching import flow_train_tables
from jaxstack.train.loop import LoopParts, RunConfig, run_loop, write_json
from jaxstack.train.sana15 import block_importance, prune_blocks
from jaxstack.train.sections import NumericsSection
from jaxstack.train.step import OptimConfig

__all__ = [
    "DiTPruneConfig",
    "PruneSection",
    "build_dit_prune",
    "importance_batches",
    "load_source",
    "resolve_source",
    "run_dit_prune",
    "with_transformer",
]

# data keys that define the task and its held-out split: they must match the source run's
TASK_KEYS = ("image_size", "held_out", "seed", "shift")


@dataclasses.dataclass
class PruneSection:
    """source: the trained model -- a `jaxstack train-dit` run directory (its newest
    checkpoint), one checkpoint folder (RUN/checkpoints/STEP) or an exported model folder
    (RUN/model: transformer/ + caption_encoder.safetensors); keep: blocks to keep (fewer than
    the source has); bi_batches: batches of training prompts (data.batch_size each) the block
    importance averages over; timesteps: how many evenly spaced training timesteps each batch
    is noised to."""

    source: str = "runs/dit_shapes_tiny"
    keep: int = 3
    bi_batches: int = 4
    timesteps: int = 8

    def __post_init__(self):
        if not self.source:
            raise ValueError("prune.source is empty: name a train-dit run, checkpoint or model")
        if self.keep < 1 or self.bi_batches < 1 or not 1 <= self.timesteps <= 1000:
            raise ValueError(
                "prune: need keep >= 1, bi_batches >= 1 and 1 <= timesteps <= 1000, got "
                f"keep={self.keep}, bi_batches={self.bi_batches}, timesteps={self.timesteps}"
            )


@dataclasses.dataclass
class DiTPruneConfig(RunConfig):
    """Prune a trained DiT and fine-tune it. The architecture comes from the source; model:
    the numerics of the job (compute / master dtype, remat; precision stays "bf16"); data must
    describe the source's task (image_size, held_out, seed and shift equal to the source run's when its config is
    known); data.batch_size and caption_dropout apply to the fine-tune; optimizer / optim as
    in `DiTTrainConfig`."""

    RESUME_FREE: ClassVar[tuple[str, ...]] = (*RunConfig.RESUME_FREE, "sampling")

    name: str = "dit_shapes_prune"
    prune: PruneSection = dataclasses.field(default_factory=PruneSection)
    model: NumericsSection = dataclasses.field(default_factory=NumericsSection)
    data: ShapesDataSection = dataclasses.field(default_factory=ShapesDataSection)
    sampling: SamplingSection = dataclasses.field(
        default_factory=lambda: SamplingSection(per_prompt=8)
    )
    optimizer: str = "adamw"
    came8bit_min_size: int = 16384
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=3e-4, warmup_steps=20, weight_decay=0.0)
    )
    steps: int = 300
    checkpoint_every: int = 100
    log_every: int = 10

    def __post_init__(self):
        super().__post_init__()
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.model.precision != "bf16":
            raise ValueError(f"model.precision={self.model.precision!r}: prune-dit has no FP8 path")


# -- the source model ----------------------------------------------------------------------------


def resolve_source(path: str) -> tuple[str, str, int | None]:
    """(kind, folder, step) of a prune source: ("model", folder, None) for an exported model
    (or a run directory that has only its model/), ("checkpoint", RUN/checkpoints, step) for a
    checkpoint folder or a run directory (its newest step). Raises FileNotFoundError (one
    line) when `path` is none of these."""
    path = os.path.normpath(os.path.expanduser(path))
    if os.path.isfile(os.path.join(path, CAPTION_FILE)):
        return "model", path, None
    parent, leaf = os.path.split(path)
    if leaf.isdigit() and os.path.basename(parent) == "checkpoints" and os.path.isdir(path):
        return "checkpoint", parent, int(leaf)
    ckpt_dir = os.path.join(path, "checkpoints")
    exported = os.path.join(path, "model")
    if not os.path.isdir(ckpt_dir) and os.path.isfile(os.path.join(exported, CAPTION_FILE)):
        return "model", exported, None
    if os.path.isdir(ckpt_dir):
        with Checkpointer(ckpt_dir, keep=None) as ckpt:
            step = ckpt.latest_step()
        if step is None:
            raise FileNotFoundError(f"prune.source={path}: {ckpt_dir} holds no checkpoint")
        return "checkpoint", ckpt_dir, step
    raise FileNotFoundError(
        f"prune.source={path}: not a train-dit run directory (with checkpoints/), a checkpoint "
        f"folder (RUN/checkpoints/STEP) or an exported model (with {CAPTION_FILE})"
    )


def _config_from_record(record: dict) -> DiTTrainConfig:
    """The DiTTrainConfig of a checkpoint's config record (validated like a YAML file)."""
    import tempfile

    import yaml

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "config.yaml")
        with open(path, "w") as f:
            yaml.safe_dump(record, f)
        return load_config(DiTTrainConfig, path)


def _source_config(kind: str, folder: str, step: int | None) -> DiTTrainConfig | None:
    """The train-dit config of the source: the checkpoint's own record, or for an exported
    model the config.yaml of the run directory around it (None when there is none)."""
    if kind == "checkpoint":
        with Checkpointer(folder, keep=None) as ckpt:
            saved = ckpt.read_meta(step).get("config")
        if saved is None:
            raise CheckpointError(f"{folder}/{step} has no config record; is it a train-dit run?")
        return _config_from_record(saved)
    run_yaml = os.path.join(os.path.dirname(folder), "config.yaml")
    return load_config(DiTTrainConfig, run_yaml) if os.path.isfile(run_yaml) else None


def load_source(cfg: DiTPruneConfig, mesh) -> tuple[WordCaptionDiT, dict[str, Any]]:
    """(model, description) of `cfg.prune.source`, in the job's numerics on `mesh`.

    A checkpoint is restored into the train job's own state (its config is the checkpoint's
    record, so optimizer moments and shapes match); its master dtype must equal
    model.param_dtype. When the source's train config is known, its TASK_KEYS data fields
    must equal this job's (else the held-out split or the images differ)."""
    kind, folder, step = resolve_source(cfg.prune.source)
    src = _source_config(kind, folder, step)
    if src is not None:
        for key in TASK_KEYS:
            mine, theirs = getattr(cfg.data, key), getattr(src.data, key)
            if mine != theirs:
                raise ValueError(
                    f"data.{key}={mine} but the source run used {theirs}; pass data.{key}={theirs}"
                )
    m = cfg.model
    if kind == "model":
        model = load_word_caption_dit(
            folder, dtype=m.compute_dtype, param_dtype=m.master_dtype, mesh=mesh, remat=m.remat
        )
    else:
        if src.model.param_dtype != m.param_dtype:
            raise ValueError(
                f"model.param_dtype={m.param_dtype} but the checkpoint's master weights are "
                f"{src.model.param_dtype}; pass model.param_dtype={src.model.param_dtype}"
            )
        section = DiTModelSection(
            name=src.model.name, dtype=m.dtype, param_dtype=m.param_dtype, remat=m.remat
        )
        model = build_dit(section, src.data.image_size, mesh, src.seed)
        optimizer = make_dit_optimizer(src.optimizer, src.optim, src.came8bit_min_size)
        state, shardings = step_lib.init_train_state(model, optimizer, mesh)
        with Checkpointer(folder, keep=None) as ckpt:
            state, _ = ckpt.restore(step, abstract_state(state, shardings))
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        model = nnx.merge(graphdef, state.params, rest)
    where = folder if step is None else os.path.join(folder, str(step))
    return model, {"path": where, "kind": kind, "step": step}


# -- pruning -------------------------------------------------------------------------------------


def importance_timesteps(count: int) -> np.ndarray:
    """int [count]: training timesteps (0..999) at the midpoints of `count` equal intervals."""
    return ((np.arange(count) + 0.5) * 1000 / count).astype(np.int64)


def importance_batches(model: WordCaptionDiT, cfg: DiTPruneConfig) -> Iterator[dict[str, Any]]:
    """`SanaTransformer` call arguments for `block_importance`: for each of prune.bi_batches
    training batches (`ShapeBatches.batch(k)`: images, captions, noise), the images noised to
    each of `importance_timesteps(prune.timesteps)` with the flow of data.shift
    (hidden_states float32 [B, 3, S, S], timestep float32 [B]), conditioned on their captions
    (encoder_hidden_states [B, L, C] from the word table, encoder_attention_mask [B, L])."""
    data = ShapeBatches(cfg.data)
    alpha, sigma, model_t = flow_train_tables(cfg.data.shift)
    for k in range(cfg.prune.bi_batches):
        batch = data.batch(k)
        caption, mask = model.encode(batch["ids"])
        for t in importance_timesteps(cfg.prune.timesteps):
            yield dict(
                hidden_states=alpha[t] * batch["image"] + sigma[t] * batch["eps"],
                encoder_hidden_states=caption,
                timestep=np.full(len(batch["ids"]), model_t[t], np.float32),
                encoder_attention_mask=mask,
            )


def with_transformer(model: WordCaptionDiT, dit: SanaTransformer) -> WordCaptionDiT:
    """A WordCaptionDiT around transformer `dit` with copies (own buffers, same placement) of
    `model`'s word table and null caption; `model` is left as it is."""
    words, null = model.words.embedding.get_value(), model.null_caption.get_value()
    new = nnx.eval_shape(
        lambda: WordCaptionDiT(
            dit.cfg,
            words.shape[0],
            model.caption_len,
            dtype=dit.dtype,
            param_dtype=null.dtype,
            rngs=nnx.Rngs(0),
        )
    )
    new.dit = dit
    new.words.embedding.set_value(words.copy())
    new.null_caption.set_value(null.copy())
    return new


# -- job -----------------------------------------------------------------------------------------


def build_dit_prune(cfg: DiTPruneConfig, mesh) -> LoopParts:
    """The prune job's parts for `run_loop`: the source loaded and pruned (block importance
    printed), the pruned model's fine-tune with the train job's update; at the end the
    held-out evaluation of the source, the pruned and the fine-tuned model."""
    out, main = cfg.output_dir, jax.process_index() == 0
    data = ShapeBatches(cfg.data)
    source, origin = load_source(cfg, mesh)
    n, keep = source.dit.cfg.num_layers, cfg.prune.keep
    if keep >= n:
        raise ValueError(f"prune.keep={keep} must be less than the source's {n} blocks")
    t0 = time.perf_counter()
    bi = block_importance(source.dit, importance_batches(source, cfg))
    dit, dropped = prune_blocks(source.dit, keep, importance=bi)
    bi_seconds = time.perf_counter() - t0
    kept = [i for i in range(n) if i not in dropped]
    if main:
        listed = ", ".join(f"{i}: {b:.4f}" for i, b in enumerate(bi))
        print(f"block importance (1 - E[cos(x_in, x_out)]) {listed}; dropping blocks {dropped}")

    model = with_transformer(source, dit)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    pruned_params = jax.tree.map(lambda x: x.copy(), nnx.to_pure_dict(params))  # never donated
    optimizer = make_dit_optimizer(cfg.optimizer, cfg.optim, cfg.came8bit_min_size)
    state, shardings = step_lib.init_train_state(model, optimizer, mesh)
    update = step_lib.make_update(
        flow_objective(graphdef, rest, cfg.data.shift), optimizer, mesh=mesh, state_sh=shardings
    )
    grid_s = dataclasses.replace(cfg.sampling, per_prompt=1, best_of=0)
    model_with = lambda p: nnx.merge(graphdef, p, rest)

    def step(state, _, i):
        every = cfg.sampling.grid_every
        if every and i % every == 0 and main:
            res = evaluate_prompts(model_with(state.params), data.held_out, grid_s, cfg.data)
            save_grid(res["grid"], os.path.join(out, "samples", f"step{i:06d}.png"))
        return update(state, step_lib.place_batch(mesh, data.batch(i)), None)

    def restore_counters(saved: dict) -> None:
        if saved.get("dropped_blocks") != dropped:
            raise ValueError(
                f"the run being resumed dropped blocks {saved.get('dropped_blocks')} but "
                f"prune.source now gives {dropped}: the source changed; use a new output_dir"
            )

    def finish(state, summary: dict) -> dict:
        s, t1 = cfg.sampling, time.perf_counter()
        tuned = model_with(state.params)
        model_dir = os.path.join(out, "model")
        if main:
            save_word_caption_dit(tuned, model_dir)
        evals, grids = {}, {}
        models = {"full": source, "pruned": model_with(pruned_params), "finetuned": tuned}
        for label, m in models.items():
            evals[label] = evaluate_prompts(m, data.held_out, s, cfg.data)
            grids[label] = evals[label].pop("grid")
        grid = save_grid(grids["finetuned"], os.path.join(out, "samples.png"))
        acc = {label: evals[label]["accuracy"] for label in evals}
        result = {
            "source": origin,
            "blocks": {"before": n, "after": keep},
            "block_importance": [float(b) for b in bi],
            "dropped_blocks": dropped,
            "kept_blocks": kept,
            "importance_inputs": {
                "batches": cfg.prune.bi_batches,
                "batch_size": cfg.data.batch_size,
                "timesteps": importance_timesteps(cfg.prune.timesteps).tolist(),
            },
            "finetune_steps": cfg.steps,
            "held_out": data.held_out,
            "accuracy": acc,
            **evals,
            "seconds": {
                "importance_and_prune": bi_seconds,
                "finetune": summary["train_seconds"],
                "evaluation": time.perf_counter() - t1,
            },
            "device": f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}",
            "jax": jax.__version__,
        }
        write_json(os.path.join(out, "eval.json"), result)
        if main:
            print(
                f"prune: blocks {n}->{keep} accuracy full={acc['full']:.3f} "
                f"pruned={acc['pruned']:.3f} finetuned={acc['finetuned']:.3f}"
            )
        return {
            "model_dir": model_dir,
            "samples_png": grid,
            "blocks_before": n,
            "blocks_after": keep,
            "dropped_blocks": dropped,
            "block_importance": result["block_importance"],
            **{f"prompt_accuracy_{label}": a for label, a in acc.items()},
        }

    return LoopParts(
        state=state,
        shardings=shardings,
        step=step,
        counters=lambda: {"dropped_blocks": dropped},
        restore_counters=restore_counters,
        finish=finish,
    )


def run_dit_prune(
    cfg: DiTPruneConfig, *, resume: bool | str = True, stop_after: int | None = None
) -> dict:
    """Run (or resume) the prune job on the shared loop; returns the summary (also
    summary.json). A missing source fails here, before the run directory is made."""
    resolve_source(cfg.prune.source)
    return run_loop(
        cfg,
        lambda mesh: build_dit_prune(cfg.resolved(), mesh),
        resume=resume,
        stop_after=stop_after,
    )
