"""The shared training loop (`jaxstack.train.loop`) and its run directory (`run_dir`): one job per
directory (lock, stale-lock takeover), resumes that refuse a silently changed config, host
counters that continue across resume, no empty directory from a failed start, the non-finite
guard, and one-line CLI errors for bad values. A small quadratic job keeps these fast; the
CLI tests run the real LM job."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from jaxstack.config import load_config
from jaxstack.train.loop import LoopParts, NonFiniteLossError, RunConfig, run_loop
from jaxstack.train.metrics import read_metrics
from jaxstack.train.run_dir import ConfigChangedError, RunLock, RunLockedError
from jaxstack.train.step import TrainState

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass
class QuadConfig(RunConfig):
    """Fit w to a target by SGD on 0.5 * |w - target|^2 (the loss is known in closed form)."""

    RESUME_FREE = (*RunConfig.RESUME_FREE, "note")

    name: str = "quad"
    lr: float = 0.1
    target: float = 3.0
    note: str = ""
    nan_at: int = 0  # 1-based step whose loss comes back NaN (0 = never)


def _build_quad(cfg: QuadConfig, counters: dict):
    opt = optax.sgd(cfg.lr)
    params = {"w": jnp.zeros((4,), jnp.float32)}
    state = TrainState(jnp.zeros((), jnp.int32), params, opt.init(params))

    @jax.jit
    def update(state, batch):
        loss, g = jax.value_and_grad(lambda p: 0.5 * jnp.sum((p["w"] - batch) ** 2))(state.params)
        upd, opt_state = opt.update(g, state.opt_state)
        return TrainState(state.step + 1, optax.apply_updates(state.params, upd), opt_state), {
            "loss": loss,
            "grad_norm": optax.tree.norm(g),
        }

    def step(state, batch, i):
        counters["seen"] += 1  # a host counter: how many steps this run has made in total
        state, m = update(state, batch)
        if i + 1 == cfg.nan_at:
            m = {**m, "loss": jnp.float32(jnp.nan)}
        return state, m

    def restore(saved):
        counters["seen"] = saved["seen"]

    return LoopParts(
        state=state,
        shardings=None,
        step=step,
        batches=lambda start, end: (
            jnp.full((4,), cfg.target, jnp.float32) for _ in range(start, end)
        ),
        counters=lambda: dict(counters),
        restore_counters=restore,
        finish=lambda state, summary: {"w": np.asarray(state.params["w"]).tolist()},
    )


def _run(cfg: QuadConfig, **kw):
    counters = {"seen": 0}
    return run_loop(cfg, lambda mesh: _build_quad(cfg.resolved(), counters), **kw), counters


def _quad(tmp_path, **kw) -> QuadConfig:
    base = dict(output_dir=str(tmp_path / "run"), steps=6, checkpoint_every=2, log_every=1)
    return QuadConfig(**{**base, **kw})


def test_quadratic_job_matches_closed_form_and_resumes(tmp_path) -> None:
    summary, _ = _run(_quad(tmp_path))
    # SGD on 0.5 |w - 3|^2 from 0 with lr 0.1: w_k = 3 (1 - 0.9^k); loss_k = 0.5 * 4 * (3 * 0.9^k)^2
    np.testing.assert_allclose(summary["w"], [3 * (1 - 0.9**6)] * 4, rtol=1e-6)
    losses = [r["loss"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    np.testing.assert_allclose(losses, [2 * (3 * 0.9**k) ** 2 for k in range(6)], rtol=1e-5)
    assert summary["final_loss"] == losses[-1]  # the last step's loss, not a mean
    assert summary["final_loss_mean10"] == pytest.approx(np.mean(losses))

    # Killed after step 3 (checkpoint at 2), resumed: the same metrics, and the host counter
    # continues from the checkpoint instead of restarting at zero.
    cfg = _quad(tmp_path, output_dir=str(tmp_path / "b"))
    first, _ = _run(cfg, stop_after=3)
    assert first["stopped_at"] == 3
    second, counters = _run(cfg)
    assert second["start_step"] == 2 and second["w"] == summary["w"]
    rows = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [r["seen"] for r in rows] == [1, 2, 3, 4, 5, 6] and counters["seen"] == 6
    assert [r["loss"] for r in rows] == losses


def test_nan_at_a_checkpoint_step_is_never_saved(tmp_path) -> None:
    cfg = _quad(tmp_path, steps=8, checkpoint_every=2, log_every=3, nan_at=4)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4.*checkpoint: step 2"):
        _run(cfg)
    from jaxstack.train.checkpoint import Checkpointer

    assert Checkpointer(tmp_path / "run" / "checkpoints").all_steps() == [2]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [3]


def test_resume_with_changed_config_stops_unless_forced(tmp_path) -> None:
    cfg = _quad(tmp_path)
    _run(cfg, stop_after=2)
    changed = dataclasses.replace(cfg, lr=0.2, note="free to change")
    with pytest.raises(ConfigChangedError, match=r"lr: 0\.1 -> 0\.2") as err:
        _run(changed)
    assert "note" not in str(err.value) and "\n" not in str(err.value)
    summary, _ = _run(changed, resume="force")
    assert summary["start_step"] == 2 and summary["step"] == 6
    saved = yaml.safe_load(open(tmp_path / "run" / "config.yaml"))
    assert saved["lr"] == 0.1  # config.yaml keeps how the run started
    history = [json.loads(x) for x in open(tmp_path / "run" / "config_history.jsonl")]
    assert history[-1]["step"] == 2 and history[-1]["forced"]
    assert history[-1]["changes"]["lr"] == [0.1, 0.2]
    # More steps is a free change (the schedule here does not depend on them).
    more, _ = _run(dataclasses.replace(changed, steps=8))
    assert more["start_step"] == 6 and more["step"] == 8
    with pytest.raises(FileExistsError):
        _run(changed, resume=False)


def test_lock_refuses_a_second_job_and_is_taken_over_after_a_kill(tmp_path) -> None:
    cfg = _quad(tmp_path)
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunLockedError, match=rf"in use by pid {os.getpid()}"):
            _run(cfg)
    # A holder killed with SIGKILL leaves its lock file behind; the kernel dropped the lock.
    code = (
        "import sys, time; from jaxstack.train.run_dir import RunLock; "
        f"RunLock({str(tmp_path / 'run')!r}).acquire(); print('held', flush=True); time.sleep(60)"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
        RunLock(tmp_path / "run").acquire()
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    summary, _ = _run(cfg)  # takes the stale lock over
    assert summary["step"] == 6


def test_failed_start_leaves_no_empty_directory(tmp_path) -> None:
    def broken(mesh):
        raise FileNotFoundError("no such model")

    with pytest.raises(FileNotFoundError):
        run_loop(_quad(tmp_path), broken)
    assert not os.path.exists(tmp_path / "run")


# -- the CLI on the real LM job ----------------------------------------------------------------


def _cli(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["JAX_PLATFORMS"] = "cpu"
    return subprocess.Popen(
        [sys.executable, "-m", "jaxstack.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _one_line_error(proc: subprocess.Popen, pattern: str) -> str:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert "Traceback" not in err and len(lines) == 1, err
    assert pattern in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("data.batch_size=-4", "data.batch_size must be >= 1"),
        ("optim.lr=0", "optim.lr out of range"),
        ("steps=0", "steps must be >= 1"),
    ],
)
def test_cli_bad_values_are_one_line_errors(tmp_path, override, pattern) -> None:
    out = tmp_path / "bad"
    _one_line_error(
        _cli("train", "configs/train_tiny.yaml", override, f"output_dir={out}"), pattern
    )
    assert not out.exists()


def test_cli_second_job_on_a_running_directory_fails_at_once(tmp_path) -> None:
    out = tmp_path / "shared"
    args = ("train", "configs/train_tiny.yaml", f"output_dir={out}", "steps=40", "eval=0")
    first = _cli(*args, "checkpoint_every=20")
    lock = out / "run.lock"
    deadline = time.time() + 120
    while not (lock.exists() and lock.stat().st_size > 0):
        assert first.poll() is None and time.time() < deadline, first.communicate()
        time.sleep(0.2)
    t0 = time.time()
    _one_line_error(_cli(*args), f"in use by pid {first.pid}")
    assert time.time() - t0 < 60
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 40 and summary["start_step"] == 0
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")][-1] == 40


def test_config_loads_with_run_section_fields() -> None:
    cfg = load_config(QuadConfig, None, ["steps=3", "lr=0.5"])
    assert cfg.steps == 3 and cfg.lr == 0.5 and cfg.resolved().output_dir.endswith("quad")


def test_an_optimizer_built_without_total_steps_spans_the_run() -> None:
    """`TrainJobConfig(steps=1000, optim=OptimConfig(lr=...))`: the cosine ends at step 1000,
    not at a default length; standalone, the default keeps lr after warmup."""
    from jaxstack.train.step import OptimConfig, learning_rate_schedule
    from jaxstack.train.trainer import TrainJobConfig

    cfg = TrainJobConfig(steps=1000, optim=OptimConfig(lr=1e-3, warmup_steps=10)).resolved()
    assert cfg.optim.total_steps == 1000
    lr = learning_rate_schedule(cfg.optim)
    assert float(lr(100)) > 0.9e-3 > float(lr(900)) > float(lr(1000)) == pytest.approx(1e-4)
    standalone = learning_rate_schedule(OptimConfig(lr=1e-3, warmup_steps=10))
    assert float(standalone(0)) == pytest.approx(1e-4)
    assert float(standalone(10)) == float(standalone(10_000)) == pytest.approx(1e-3)
