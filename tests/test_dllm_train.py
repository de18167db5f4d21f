"""The diffusion-LLM training job (`jaxstack train-dllm`): sorting and addition data, sampler names, the
LLaDA / Dream export, exact resume and the sampler comparison it writes."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
from loop_helpers import poison_step, same_weight_files
from scoring import rescored_accuracy

from jaxstack.config import load_config
from jaxstack.data.synthetic import (
    addition_digit_accuracy,
    make_addition_record,
    make_sorting_record,
    make_sorting_records,
    score_addition,
    score_sorting,
    sorting_position_accuracy,
)
from jaxstack.data.tokenizer import load_tokenizer
from jaxstack.hf.dllm import load_dllm, save_dllm
from jaxstack.models.dllm import DLLMConfig, init_dllm
from jaxstack.train.dllm_trainer import (
    DLLMEvalSection,
    DLLMModelSection,
    DLLMTrainConfig,
    TaskBatches,
    TaskDataSection,
    run_dllm_train,
    sampler_settings,
)
from jaxstack.train.metrics import read_metrics


def test_sorting_records_and_scoring():
    recs = make_sorting_records(50, seed=3, count=5, max_value=99)
    assert recs == make_sorting_records(50, seed=3, count=5, max_value=99)
    assert (
        len({len(r["prompt"]) for r in recs}) == 1 and len({len(r["response"]) for r in recs}) == 1
    )
    for r in recs:
        nums = r["prompt"][len("sort: ") :].split()
        assert r["response"].split() == sorted(nums, key=int)
        assert score_sorting(r["prompt"], r["response"] + " \n")
    r = {"prompt": "sort: 42 07 42 93\n", "response": "07 42 42 93"}
    assert score_sorting(r["prompt"], "07 42 42 93")
    assert not score_sorting(r["prompt"], "07 42 93")  # a duplicate dropped
    assert not score_sorting(r["prompt"], "07 42 93 42")
    assert not score_sorting(r["prompt"], "7 42 42 93")  # width matters
    p = r["prompt"]
    assert sorting_position_accuracy(p, "07 42 42 93") == 1.0
    assert sorting_position_accuracy(p, "07 42 93") == 0.5  # positions 3, 4 wrong or missing
    assert sorting_position_accuracy(p, "07 42 42 93 99") == 0.8  # an extra number costs
    assert sorting_position_accuracy(p, "") == 0.0
    with pytest.raises(ValueError, match="not a sorting prompt"):
        sorting_position_accuracy("Q: 1+2=?\nA: ", "3")
    wide = make_sorting_record(random.Random(0), 3, max_value=999)
    assert all(len(x) == 3 for x in wide["response"].split())
    with pytest.raises(ValueError, match="not a sorting prompt"):
        score_sorting("Q: 1+2=?\nA: ", "3")
    with pytest.raises(ValueError):
        make_sorting_record(random.Random(0), 0)


def test_addition_records_and_scoring():
    rng = random.Random(5)
    recs = [make_addition_record(rng, 6) for _ in range(200)]
    assert len({r["prompt"] for r in recs}) == 200
    assert {len(r["prompt"]) for r in recs} == {len("add: 000000+000000\n")}
    assert {len(r["response"]) for r in recs} == {7}
    for r in recs:
        a, b = r["prompt"][len("add: ") : -1].split("+")
        assert int(r["response"]) == int(a) + int(b)
        assert score_addition(r["prompt"], " " + r["response"] + "\n")
    assert any(r["response"][0] == "1" for r in recs) and any(r["response"][0] == "0" for r in recs)
    p = "add: 0482+9037\n"
    assert score_addition(p, "09519") and not score_addition(p, "9519")  # width matters
    assert not score_addition(p, "09518") and not score_addition(p, "095190")
    assert addition_digit_accuracy(p, "09519") == 1.0
    assert addition_digit_accuracy(p, "09510") == 0.8
    assert addition_digit_accuracy(p, "095190") == 5 / 6  # an extra digit costs
    assert addition_digit_accuracy(p, "") == 0.0
    for bad in ("Q: 1+2=?\nA: ", "add: 12+345\n", "add: 12+34"):
        with pytest.raises(ValueError, match="not a fixed-width addition prompt"):
            score_addition(bad, "0")
    with pytest.raises(ValueError, match="digits"):
        make_addition_record(rng, 0)


def test_addition_batches_and_task_names():
    tok = load_tokenizer("byte")
    data = TaskBatches(TaskDataSection(task="add", digits=5, gen_length=8, batch_size=4), tok)
    assert data.prompt_len == len("add: 00000+00000\n") and data.seq_len == data.prompt_len + 8
    ids = data.batch(3)["input_ids"][0]
    prompt = tok.decode(ids[: data.prompt_len].tolist())
    assert score_addition(prompt, tok.decode(ids[data.prompt_len :].tolist()))
    assert ids[-1] == ids[-2] == tok.eos_id  # 6 answer digits, then EOS
    with pytest.raises(ValueError, match="gen_length"):
        TaskBatches(TaskDataSection(task="add", digits=8, gen_length=8), tok)
    with pytest.raises(ValueError, match="data.task"):
        TaskDataSection(task="multiply")


def test_sampler_names():
    ev = DLLMEvalSection(threshold=0.8, factor=2.0)
    assert sampler_settings("baseline", ev) == {"cache": None}
    assert sampler_settings("dual", ev) == {"cache": "dual"}
    assert sampler_settings("parallel", ev) == {"cache": None, "threshold": 0.8}
    assert sampler_settings("prefix+parallel", ev) == {"cache": "prefix", "threshold": 0.8}
    assert sampler_settings("dual+factor", ev) == {"cache": "dual", "factor": 2.0}
    for bad in ("dual+prefix", "fast", "dual+parallel+factor", ""):
        with pytest.raises(ValueError, match="bad sampler"):
            sampler_settings(bad, ev)
    with pytest.raises(ValueError, match="bad sampler"):
        DLLMEvalSection(samplers=["baseline", "turbo"])


def test_sorting_batches_are_pure_and_shaped():
    tok = load_tokenizer("byte")
    cfg = TaskDataSection(count=4, gen_length=16, batch_size=8, seed=1)
    data = TaskBatches(cfg, tok)
    a, b = data.batch(5), data.batch(5)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    assert not np.array_equal(a["input_ids"], data.batch(6)["input_ids"])
    assert a["input_ids"].shape == (8, data.prompt_len + 16) == a["mask_u"].shape
    assert (
        a["prompt_mask"][:, : data.prompt_len].all()
        and not a["prompt_mask"][:, data.prompt_len :].any()
    )
    answer = tok.decode(a["input_ids"][0, data.prompt_len :].tolist())  # EOS padding dropped
    prompt = tok.decode(a["input_ids"][0, : data.prompt_len].tolist())
    assert score_sorting(prompt, answer)
    assert a["input_ids"][0, -1] == tok.eos_id
    held = {r["prompt"] for r in data.held_out(50)}
    train = {r["prompt"] for i in range(20) for r in data.records("train", i, 8)}
    assert not held & train
    with pytest.raises(ValueError, match="gen_length"):
        TaskBatches(TaskDataSection(count=8, gen_length=10), tok)


@pytest.mark.parametrize("name", ["tiny-llada", "tiny-dream"])
def test_save_dllm_round_trip(tmp_path, name):
    dcfg = DLLMConfig.preset(name)
    model = init_dllm(dcfg, seed=3)
    save_dllm(model, dcfg, tmp_path)
    loaded, dcfg2 = load_dllm(tmp_path)
    assert dcfg2 == dcfg
    ids = np.arange(12, dtype=np.int32)[None] % 100
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(loaded(ids)))


def test_default_config_is_the_tiny_config_file():
    assert load_config(DLLMTrainConfig, "configs/dllm_sort_tiny.yaml", []) == DLLMTrainConfig()
    load_config(DLLMTrainConfig, "configs/dllm_sort_100m.yaml", [])  # parses
    assert load_config(DLLMTrainConfig, "configs/dllm_add_100m.yaml", []).data.task == "add"


def _tiny_job(tmp_path, **kw) -> DLLMTrainConfig:
    cfg = DLLMTrainConfig(
        output_dir=str(tmp_path),
        model=DLLMModelSection(name="tiny-llada"),  # LLaDA architecture, 2 layers of width 32
        data=TaskDataSection(count=3, gen_length=8, batch_size=16),
        # 6 prompts in 2 equal batches of 3: one compiled program per sampler (batches of 4 + 2
        # compiled every sampler twice).
        eval=DLLMEvalSection(
            num=6, batch=3, block_length=4, samplers=["baseline", "dual+parallel"]
        ),
        steps=4,
        checkpoint_every=2,
        log_every=1,
    )
    return dataclasses.replace(cfg, **kw)


@pytest.mark.slow  # end-to-end job (pytest -m slow)
def test_job_resumes_exactly_and_writes_the_sampler_table(tmp_path):
    straight = run_dllm_train(_tiny_job(tmp_path / "a"))
    run_dllm_train(_tiny_job(tmp_path / "b"), stop_after=2)
    resumed = run_dllm_train(_tiny_job(tmp_path / "b"))
    assert resumed["start_step"] == 2 and straight["step"] == resumed["step"] == 4
    drop = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]
    ma, mb = (drop(read_metrics(tmp_path / d / "metrics.jsonl")) for d in "ab")
    assert [r["step"] for r in ma] == [1, 2, 3, 4] and ma == mb
    ev = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert set(ev["samplers"]) == {"baseline", "dual+parallel"} and ev["num"] == 6
    base, fast = ev["samplers"]["baseline"], ev["samplers"]["dual+parallel"]
    assert base["nfe"] == 2 * 8 and base["tokens_per_step"] == 1.0  # 2 calls, 1 token per step
    assert fast["nfe"] <= base["nfe"] and fast["tokens_per_step"] >= 1.0
    assert len(base["samples"]) == len(fast["samples"]) == 6  # all of them (num <= 8)
    for r in (base, fast):
        assert r["accuracy"] == pytest.approx(
            rescored_accuracy(r["samples"], lambda s: score_sorting(s["prompt"], s["generated"]))
        )
    assert (tmp_path / "a" / "samplers.png").is_file() and (tmp_path / "a" / "loss.png").is_file()
    model, dcfg = load_dllm(tmp_path / "a" / "model")
    assert dcfg.mask_id == 263 and dcfg.eos_id == 258 and not dcfg.llm.causal
    ids = np.arange(10, dtype=np.int32)[None]
    other, _ = load_dllm(tmp_path / "b" / "model")
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(other(ids)))
    assert same_weight_files(tmp_path / "a" / "model", tmp_path / "b" / "model")  # bit for bit


def test_nan_at_a_checkpoint_step_is_caught_and_never_saved(tmp_path, monkeypatch):
    from jaxstack.train import dllm_trainer
    from jaxstack.train.checkpoint import Checkpointer
    from jaxstack.train.loop import NonFiniteLossError

    monkeypatch.setattr(
        dllm_trainer, "build_dllm_train", poison_step(dllm_trainer.build_dllm_train, 4)
    )
    cfg = _tiny_job(tmp_path, steps=6, checkpoint_every=2, log_every=3)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4.*checkpoint: step 2"):
        run_dllm_train(cfg)
    assert Checkpointer(tmp_path / "checkpoints").all_steps() == [2]


def test_training_lowers_the_loss(tmp_path):
    # The tiny model needs a shorter warmup and a larger peak lr than the job's default model.
    optim = dataclasses.replace(DLLMTrainConfig().optim, lr=1e-2, warmup_steps=10)
    cfg = _tiny_job(
        tmp_path, steps=40, checkpoint_every=40, optim=optim, eval=DLLMEvalSection(num=0)
    )
    run_dllm_train(cfg)
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl")]
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5]), losses
