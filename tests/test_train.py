"""Training job: orbax checkpoints (sharded, int layer keys, mismatch errors), exact resume
after a simulated kill, NaN handling, and the tiny config's artifacts (8 simulated devices)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from loop_helpers import poison_step
from scoring import rescored_accuracy

import jaxstack.train.step as step_lib
from jaxstack.config import load_config
from jaxstack.data.synthetic import score_arithmetic
from jaxstack.data.tokenizer import ByteTokenizer
from jaxstack.models.llm import LLM, LLMConfig
from jaxstack.parallel.mesh import make_mesh
from jaxstack.train import (
    Checkpointer,
    CheckpointError,
    MetricsLogger,
    ModelSection,
    NonFiniteLossError,
    OptimConfig,
    TrainJobConfig,
    TrainState,
    abstract_state,
    build_model,
    init_train_state,
    make_optimizer,
    read_metrics,
    run_train,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "train_tiny.yaml")
WALL_CLOCK = ("tokens_per_s",)  # the only metrics that may differ between identical runs
SMALL = [  # a few seconds of training on the tiny config
    "steps=20",
    "checkpoint_every=10",
    "log_every=2",
    "mesh=data=2,fsdp=2,tensor=2",
    "data.seq_len=32",
    "data.batch_size=8",
    "data.num_records=400",
]


def _config(tmp_path, name: str, *extra: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, TINY, [*SMALL, f"output_dir={tmp_path / name}", *extra])


def _deterministic(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in WALL_CLOCK} for r in records]


def _abstract_state(vocab: int) -> TrainState:
    """TrainState of ShapeDtypeStructs for the tiny preset (traced only, nothing compiled)."""
    arch = dataclasses.replace(LLMConfig.preset("tiny"), vocab_size=vocab)
    model = nnx.eval_shape(lambda: LLM(arch, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    opt_state = jax.eval_shape(make_optimizer(OptimConfig()).init, params)
    return TrainState(jax.ShapeDtypeStruct((), jnp.int32), params, opt_state)


def _restore_params(directory: str, step: int, like: TrainState) -> dict:
    state, _ = Checkpointer(directory).restore(step, abstract_state(like))
    return jax.device_get(state.params)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """The tiny config run for 20 steps without interruption (with a short eval)."""
    tmp = tmp_path_factory.mktemp("train")
    cfg = _config(tmp, "straight", "eval=4", "max_new_tokens=4")
    return cfg, run_train(cfg)


@pytest.mark.slow  # end-to-end job (pytest -m slow)
def test_tiny_config_run_writes_artifacts(straight):
    cfg, summary = straight
    out = cfg.output_dir
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "eval.json", "summary.json"):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert load_config(TrainJobConfig, os.path.join(out, "config.yaml")) == cfg.resolved()
    records = read_metrics(os.path.join(out, "metrics.jsonl"))
    assert [r["step"] for r in records] == list(range(2, 21, 2))
    assert {"loss", "grad_norm", "lr", "loss_tokens", "tokens_per_s"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"]  # it learns
    assert Checkpointer(os.path.join(out, "checkpoints")).all_steps() == [10, 20]
    assert os.path.exists(os.path.join(out, "hf", "config.json"))
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert ev["num_prompts"] == len(ev["samples"]) == 4
    assert ev["accuracy"] == rescored_accuracy(
        ev["samples"], lambda s: score_arithmetic(s["prompt"], s["generated"])
    )
    assert summary["eval_accuracy"] == ev["accuracy"] and summary["step"] == 20
    with open(os.path.join(out, "loss.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_sequence_parallel_job_matches_the_data_parallel_run(straight, tmp_path):
    """mesh data=4,sequence=2 with the zigzag ring: the first steps' losses equal the straight
    (data-parallel) run's, up to float32 reduction order."""
    cfg = _config(
        tmp_path,
        "sp",
        "mesh=data=4,sequence=2",
        "sequence_parallel.mode=ring",
        "sequence_parallel.layout=zigzag",
        "eval=0",
    )
    run_train(cfg, stop_after=4)
    got = read_metrics(os.path.join(cfg.resolved().output_dir, "metrics.jsonl"))
    want = read_metrics(os.path.join(straight[0].output_dir, "metrics.jsonl"))[: len(got)]
    assert [r["step"] for r in got] == [2, 4] == [r["step"] for r in want]
    for a, b in zip(got, want):
        np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
        np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-3)
    with pytest.raises(ValueError, match="sequence_parallel.layout"):
        _config(tmp_path, "bad", "sequence_parallel.layout=spiral")


def test_resume_after_kill_is_exact(straight, tmp_path):
    ref_cfg, _ = straight
    cfg = _config(tmp_path, "resumed", "eval=0")
    first = run_train(cfg, stop_after=12)  # "killed" after step 12; checkpoint at 10
    assert first["stopped_at"] == 12
    metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
    assert [r["step"] for r in read_metrics(metrics_path)][-1] == 12
    second = run_train(cfg)  # fresh model objects, restored from disk at step 10
    assert second["start_step"] == 10 and second["step"] == 20
    ref = read_metrics(os.path.join(ref_cfg.output_dir, "metrics.jsonl"))
    got = read_metrics(metrics_path)
    assert [r["step"] for r in got] == [r["step"] for r in ref]  # lines 11-12 were replaced
    assert _deterministic(got) == _deterministic(ref)  # identical losses, grad norms, lr
    like = _abstract_state(ByteTokenizer().vocab_size)
    a = _restore_params(os.path.join(cfg.output_dir, "checkpoints"), 20, like)
    b = _restore_params(os.path.join(ref_cfg.output_dir, "checkpoints"), 20, like)
    assert all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))  # bit for bit


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = step_lib.make_train_step

    def poisoned(*args, **kwargs):  # the loss of step 8 comes back NaN
        step = real(*args, **kwargs)

        def wrapped(state, batch):
            n = int(state.step)
            state, metrics = step(state, batch)
            return state, {**metrics, "loss": jnp.float32(jnp.nan if n == 7 else 1.0)}

        return wrapped

    monkeypatch.setattr(step_lib, "make_train_step", poisoned)
    cfg = _config(tmp_path, "nan", "steps=10", "checkpoint_every=5", "log_every=1", "eval=0")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 8.*checkpoint: step 5"):
        run_train(cfg)
    assert Checkpointer(os.path.join(cfg.output_dir, "checkpoints")).all_steps() == [5]
    logged = read_metrics(os.path.join(cfg.output_dir, "metrics.jsonl"))
    assert [r["step"] for r in logged] == list(range(1, 8))


def test_nan_at_a_checkpoint_step_is_caught_and_never_saved(tmp_path, monkeypatch):
    from jaxstack.train import trainer

    monkeypatch.setattr(trainer, "build_train", poison_step(trainer.build_train, 4))
    cfg = _config(tmp_path, "nan4", "steps=6", "checkpoint_every=2", "log_every=3", "eval=0")
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4.*checkpoint: step 2"):
        run_train(cfg)
    assert Checkpointer(os.path.join(cfg.output_dir, "checkpoints")).all_steps() == [2]


def test_default_config_is_the_tiny_yaml():
    assert load_config(TrainJobConfig, TINY) == TrainJobConfig()


def test_checkpointer_roundtrip_reshards_and_checks_shapes(tmp_path):
    """Save from an fsdp x tensor mesh, restore straight into data-parallel shardings: exact
    values (int layer keys survive), meta JSON back, keep=2 retention, clear mismatch errors."""
    src = make_mesh("fsdp=4,tensor=2")
    optimizer = make_optimizer(OptimConfig())
    state, _ = init_train_state(build_model(ModelSection(), 64, src, seed=1), optimizer, src)
    assert 0 in state.params["layers"]  # pure-dict params: int keys for layers
    ckpt = Checkpointer(tmp_path / "ck", keep=2)
    for step in (1, 2, 3):
        ckpt.save(step, state, {"step": step, "config": {"name": "x", "lr": 1e-3}})
    ckpt.wait_until_finished()
    assert ckpt.latest_step() == 3 and ckpt.all_steps() == [2, 3]

    dst = make_mesh("data=8")
    replicated = NamedSharding(dst, P())
    like = jax.tree.map(lambda x: replicated, _abstract_state(64))
    target = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), _abstract_state(64), like
    )
    restored, meta = Checkpointer(tmp_path / "ck").restore(3, target)
    assert meta == {"step": 3, "config": {"name": "x", "lr": 1e-3}}
    assert jax.tree.structure(restored) == jax.tree.structure(state)
    host = jax.device_get(state)
    same = jax.tree.map(lambda a, b: np.array_equal(jax.device_get(a), b), restored, host)
    assert all(jax.tree.leaves(same))
    for leaf in jax.tree.leaves(restored):
        assert leaf.sharding == replicated

    with pytest.raises(CheckpointError, match=r"embed_tokens/embedding: checkpoint \(64, 64\)"):
        Checkpointer(tmp_path / "ck").restore(3, abstract_state(_abstract_state(72)))
    with pytest.raises(CheckpointError, match="no checkpoint for step 7"):
        Checkpointer(tmp_path / "ck").restore(7, target)


def test_metrics_logger_truncates_on_resume(tmp_path):
    path = tmp_path / "m.jsonl"
    with MetricsLogger(path, resume_step=0) as log:
        for s in range(1, 6):
            log.log(s, loss=np.float32(1.0 / s))
    with MetricsLogger(path, resume_step=3) as log:
        log.log(4, loss=9.0)
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [
        (1, 1.0),
        (2, 0.5),
        (3, float(np.float32(1 / 3))),
        (4, 9.0),
    ]
    with MetricsLogger(path, enabled=False) as log:  # not process 0: writes nothing
        log.log(5, loss=1.0)
    assert len(read_metrics(path)) == 4


def test_byte_tokenizer_export_records_the_tokenizer(straight):
    """The byte tokenizer has no HF files: hf/ records it for `jaxstack generate`."""
    from jaxstack.train.trainer import TOKENIZER_RECORD

    cfg, _ = straight
    with open(os.path.join(cfg.output_dir, "hf", TOKENIZER_RECORD)) as f:
        assert json.load(f) == {"tokenizer": "byte"}


def test_seq_len_beyond_max_positions_warns_once(tmp_path):
    import warnings

    from jaxstack.hf import save_model
    from jaxstack.models.llm import init_llm
    from jaxstack.train.trainer import build_train

    ckpt = str(tmp_path / "ckpt")
    save_model(init_llm(LLMConfig(vocab_size=263, max_position_embeddings=16), seed=0), ckpt)
    cfg = _config(tmp_path, "long", f"model.name={ckpt}", "mesh=", "data.num_records=64")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        build_train(cfg.resolved(), make_mesh(None))
    hits = [w for w in caught if "max_position_embeddings" in str(w.message)]
    assert len(hits) == 1, [str(w.message) for w in caught]
    assert "data.seq_len=32" in str(hits[0].message) and "=16" in str(hits[0].message)
