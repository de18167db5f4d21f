"""The one training loop: every job (LM SFT, diffusion LLM, VLM SFT, RL) runs through `run_loop`.

A job supplies only what differs, as a `LoopParts` built on the mesh: the initial `TrainState`
and its shardings, `step(state, batch, i)` (usually `jaxstack.train.step.make_update` on a
placed batch; RL's step is host code around the same sharded update), the host batches of steps
[start, end), extra metric fields, host counters, and `finish` (export, evaluation). The loop
owns the rest, the same way for every job:

- the run directory: an exclusive lock (`run_dir.RunLock`), `config.yaml` written once, a
  resume that compares the config with the checkpoint's and stops on result-changing differences
  (`run_dir.check_resume_config`; `resume="force"` allows them and records them), no empty
  directory left by a run that failed before its first step;
- exact resume: the newest checkpoint's state, host counters and data position (the batches of
  step i are a pure function of (config, i));
- the non-finite guard on every step (loss and grad_norm): a bad step is never saved, the error
  names the step and the last good checkpoint; metrics are read one step late so the device
  never waits for the host, and always before a checkpoint is written;
- checkpoint cadence, metrics JSONL, progress bar, loss plot, `summary.json` with the last
  step's loss (`final_loss`) and a smoothed one (`final_loss_mean10`).

Adding a job: a config dataclass deriving `RunConfig`, a `build(mesh) -> LoopParts`, and a
`run_<job>(cfg)` that calls `run_loop(cfg, build)` (see `jaxstack/train/trainer.py`).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterable
from typing import Any, ClassVar

import jax

from jaxstack.config import config_to_dict, save_config
from jaxstack.train import metrics as metrics_lib
from jaxstack.train.checkpoint import Checkpointer, abstract_state
from jaxstack.train.run_dir import RunLock, check_resume_config, remove_if_empty
from jaxstack.train.step import TrainState, learning_rate_schedule

__all__ = ["LoopParts", "NonFiniteLossError", "RunConfig", "run_loop", "write_json"]


class NonFiniteLossError(FloatingPointError):
    """The loss (or gradient norm) became NaN/inf; the message names the step and the last
    good checkpoint."""


@dataclasses.dataclass
class RunConfig:
    """What every job's config has (jobs derive from it and add their sections).

    name: run name, output_dir: "" = runs/<name>; steps: optimizer steps; checkpoint_every /
    keep_checkpoints / log_every: cadences; mesh: e.g. "fsdp=4,tensor=2" ("" = data parallel
    over all devices); seed. A config with an `optim` section gets `optim.total_steps = steps`
    when it is 0. RESUME_FREE / RESUME_WARN: dotted keys a resume may change freely / with a
    warning (every other change stops the resume, see `run_dir.check_resume_config`).
    """

    RESUME_FREE: ClassVar[tuple[str, ...]] = (
        "name",
        "output_dir",
        "steps",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "mesh",
    )
    RESUME_WARN: ClassVar[tuple[str, ...]] = ("model.remat", "model.dtype")

    name: str = "run"
    output_dir: str = ""
    steps: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 5
    mesh: str = ""
    seed: int = 0

    def __post_init__(self):
        for key in ("steps", "checkpoint_every", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

    def resolved(self):
        """Copy with output_dir (and optim.total_steps, if the config has an optimizer) set."""
        kw: dict[str, Any] = {"output_dir": self.output_dir or os.path.join("runs", self.name)}
        optim = getattr(self, "optim", None)
        if optim is not None and not optim.total_steps:
            kw["optim"] = dataclasses.replace(optim, total_steps=self.steps)
        return dataclasses.replace(self, **kw)


@dataclasses.dataclass
class LoopParts:
    """What a job hands the loop (built by the job's `build(mesh)`).

    state / shardings: the initial TrainState (trainable params only) and its shardings (None
    on one device). step(state, host_batch, i) -> (state, metrics): metrics a dict of scalars
    (device arrays or floats) with at least "loss"; the state argument may be donated.
    batches(start, end): the host batches of steps start..end-1 (default: None per step, for
    steps that fetch their own data). log_row(step, metrics) -> extra fields for the logged row
    (metrics as floats). counters() / restore_counters(d): host counters (JSON values) saved
    with every checkpoint and restored on resume (skipped videos ...); their values right after
    each step are also logged with it (the scalar ones). finish(state, summary) -> summary
    fields, run once when the last step is done (export, evaluation). plot_keys: metrics drawn
    into plot_name.
    """

    state: TrainState
    shardings: TrainState | None
    step: Callable[[TrainState, Any, int], tuple[TrainState, dict]]
    batches: Callable[[int, int], Iterable] | None = None
    log_row: Callable[[int, dict], dict] | None = None
    counters: Callable[[], dict] | None = None
    restore_counters: Callable[[dict], None] | None = None
    finish: Callable[[TrainState, dict], dict] | None = None
    plot_keys: tuple[str, ...] = ("loss", "lr")
    plot_name: str = "loss.png"


def write_json(path: str, obj: Any) -> None:
    """Write `obj` as indented JSON (process 0 only)."""
    import json

    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)


def _saved_config(ckpt: Checkpointer, step: int, out: str) -> dict | None:
    meta = ckpt.read_meta(step)
    if "config" in meta:
        return meta["config"]
    path = os.path.join(out, "config.yaml")
    if not os.path.isfile(path):
        return None
    import yaml

    with open(path) as f:
        return yaml.safe_load(f)


def run_loop(
    cfg: RunConfig,
    build: Callable[[Any], LoopParts],
    *,
    resume: bool | str = True,
    stop_after: int | None = None,
) -> dict:
    """Run (or resume) a job; returns its summary (also written to summary.json).

    cfg: the job's config (resolved here). build(mesh) -> LoopParts, called inside the run
    directory's lock. resume: True continues from the newest checkpoint (a result-changing
    config difference raises `run_dir.ConfigChangedError`), "force" also accepts those
    differences (recorded in config_history.jsonl), False refuses to start if a checkpoint
    exists. stop_after: stop right after that global step as if killed (tests resumption).
    """
    from jaxstack.parallel.distributed import initialize
    from jaxstack.parallel.mesh import make_mesh

    if resume not in (True, False, "force"):
        raise ValueError(f"resume must be True, False or 'force', got {resume!r}")
    initialize()
    cfg = cfg.resolved()
    out, main = cfg.output_dir, jax.process_index() == 0
    existed = os.path.isdir(out)
    lock = RunLock(out).acquire() if main else None
    try:
        return _run(cfg, build, out, main, resume, stop_after, make_mesh)
    except BaseException:
        if main and not existed:
            remove_if_empty(out)
        raise
    finally:
        if lock is not None:
            lock.release()


def _run(cfg, build, out, main, resume, stop_after, make_mesh) -> dict:
    os.makedirs(out, exist_ok=True)
    mesh = make_mesh(cfg.mesh or None)
    ckpt = Checkpointer(os.path.join(out, "checkpoints"), keep=cfg.keep_checkpoints)
    try:
        start = ckpt.latest_step()
        if start is not None and not resume:
            raise FileExistsError(f"{ckpt.directory} has checkpoints (step {start}); resume?")
        if start is not None:
            old = _saved_config(ckpt, start, out)
            if old is not None:
                check_resume_config(
                    out,
                    old,
                    config_to_dict(cfg),
                    step=start,
                    free=type(cfg).RESUME_FREE,
                    warn=type(cfg).RESUME_WARN,
                    force=resume == "force",
                )
        parts = build(mesh)
        state = parts.state
        if start is not None:
            state, meta = ckpt.restore(start, abstract_state(state, parts.shardings))
            if parts.restore_counters is not None:
                parts.restore_counters(meta.get("counters", {}))
        elif main:
            save_config(cfg, os.path.join(out, "config.yaml"))
        parts.state = None  # the loop owns the state from here (steps may donate it)
        return _train(cfg, parts, state, ckpt, start or 0, out, stop_after)
    finally:
        ckpt.close()


def _train(cfg, parts: LoopParts, state, ckpt: Checkpointer, start: int, out: str, stop_after):
    metrics_path = os.path.join(out, "metrics.jsonl")
    logger = metrics_lib.MetricsLogger(metrics_path, resume_step=start)
    optim = getattr(cfg, "optim", None)
    lr_at = learning_rate_schedule(optim) if optim is not None else None
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = metrics_lib.progress_bar(cfg.steps, initial=start, desc=cfg.name)
    last_good = start or None
    last_loss: list[float] = []

    def finish_step(step: int, metrics: dict, counted: dict) -> None:  # host side of a step
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        bad = [k for k in ("loss", "grad_norm") if k in m and not math.isfinite(m[k])]
        if bad:
            ckpt.wait_until_finished()
            raise NonFiniteLossError(
                f"{bad[0]} is {m[bad[0]]} at step {step} (loss {m['loss']}, grad_norm "
                f"{m.get('grad_norm')}); stopped, the step was not saved. Last good "
                f"checkpoint: step {last_good} in {ckpt.directory}; metrics up to step "
                f"{step - 1} in {metrics_path}"
            )
        last_loss[:] = [m["loss"]]
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            row = {k: m[k] for k in ("loss", "grad_norm") if k in m}
            if lr_at is not None:
                row["lr"] = float(lr_at(step - 1))
            if parts.log_row is not None:
                row.update(parts.log_row(step, m))
            row.update({k: v for k, v in counted.items() if isinstance(v, int | float)})
            logger.log(step, **row)
            bar.set_postfix(loss=f"{m['loss']:.4f}")

    batches = parts.batches(start, end) if parts.batches else (None for _ in range(start, end))
    pending = None  # (step, device metrics) read one step late, so the device never idles
    t0 = time.perf_counter()
    try:
        for i, batch in zip(range(start, end), batches):
            state, metrics = parts.step(state, batch, i)
            counted = parts.counters() if parts.counters is not None else {}
            if pending is not None:
                finish_step(*pending)
            pending = (i + 1, metrics, counted)
            if (i + 1) % cfg.checkpoint_every == 0 or i + 1 == cfg.steps:
                finish_step(*pending)  # never save a state whose step is not checked
                pending = None
                meta = {"step": i + 1, "next_batch": i + 1, "config": config_to_dict(cfg)}
                if parts.counters is not None:
                    meta["counters"] = parts.counters()
                ckpt.save(i + 1, state, meta)
                last_good = i + 1
        if pending is not None:
            finish_step(*pending)
    finally:
        bar.close()
        logger.close()
    summary: dict[str, Any] = {"output_dir": out, "start_step": start, "step": max(start, end)}
    summary["train_seconds"] = time.perf_counter() - t0
    if end < cfg.steps:
        return {**summary, "stopped_at": end}
    records = metrics_lib.read_metrics(metrics_path)
    summary.update(metrics_lib.summarize(records))
    if last_loss:  # the last step's own loss (also when it was not a log step)
        summary["final_loss"] = last_loss[0]
    png = os.path.join(out, parts.plot_name)
    summary["plot"] = metrics_lib.plot_metrics(metrics_path, png, parts.plot_keys)
    if parts.finish is not None:
        summary.update(parts.finish(state, summary))
    write_json(os.path.join(out, "summary.json"), summary)
    metrics_lib.show_in_notebook(summary["plot"])
    return summary
