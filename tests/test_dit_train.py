"""The text-to-image DiT job (jaxstack/train/dit_trainer.py) on the shared loop."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
from loop_helpers import same_weight_files

from jaxstack.config import load_config
from jaxstack.data import shapes
from jaxstack.diffusion import best_of_n, tournament_pick
from jaxstack.train import dit_trainer as dit
from jaxstack.train.came import came_state_bytes
from jaxstack.train.metrics import read_metrics


def _tiny_job(out, *extra):
    return load_config(
        dit.DiTTrainConfig,
        overrides=[
            f"output_dir={out}",
            "steps=4",
            "log_every=1",
            "checkpoint_every=2",
            "data.batch_size=8",
            "sampling.steps=2",
            "sampling.per_prompt=1",
            "sampling.best_of=2",
            *extra,
        ],
    )


@pytest.mark.slow  # end-to-end job (pytest -m slow)
def test_job_resumes_exactly_exports_and_judges_its_samples(tmp_path) -> None:
    straight = dit.run_dit_train(_tiny_job(tmp_path / "a"))
    dit.run_dit_train(_tiny_job(tmp_path / "b"), stop_after=2)
    resumed = dit.run_dit_train(_tiny_job(tmp_path / "b"))
    assert resumed["start_step"] == 2 and straight["step"] == resumed["step"] == 4
    drop = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]
    ma, mb = (drop(read_metrics(tmp_path / d / "metrics.jsonl")) for d in "ab")
    assert [r["step"] for r in ma] == [1, 2, 3, 4] and ma == mb
    assert same_weight_files(tmp_path / "a" / "model", tmp_path / "b" / "model")  # bit for bit

    ev = json.loads((tmp_path / "a" / "eval.json").read_text())
    held = ev["held_out"]
    assert len(held) == 8 and not set(held) & set(shapes.split_captions(8, 0)[0])
    final = ev["final"]
    assert final["num_prompts"] == 8 and final["per_prompt"] == 1 and final["best_of"] == 2
    assert straight["prompt_accuracy"] == final["accuracy"]
    assert straight["prompt_accuracy_step0"] == ev["step0"]["accuracy"]
    # the tournament keeps a correct sample whenever the first one is
    assert final["best_of_accuracy"] >= final["one_sample_accuracy"]
    assert (tmp_path / "a" / "samples.png").is_file() and (tmp_path / "a" / "loss.png").is_file()

    # the exported model reloads and samples the same images as the job's final weights
    model = dit.load_word_caption_dit(str(tmp_path / "a" / "model"))
    cfg = _tiny_job(tmp_path / "a")
    s = dit.SamplingSection(steps=2, per_prompt=1, best_of=0)
    images = dit.generate_images(model, held[:2], [0, 0], s, cfg.data)
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
    verdicts = [shapes.judge(img, cap)["all"] for img, cap in zip(images, held[:2])]
    again = dit.evaluate_prompts(model, held[:2], s, cfg.data)
    assert again["accuracy"] == np.mean(verdicts)
    np.testing.assert_array_equal(again["grid"], images)


@pytest.mark.slow  # end-to-end job (pytest -m slow)
def test_came8bit_job_runs_and_keeps_8bit_state(tmp_path) -> None:
    import jax

    cfg = _tiny_job(tmp_path / "c", "optimizer=came8bit", "sampling.best_of=0")
    parts = dit.build_dit_train(cfg.resolved(), None)
    leaves = jax.tree.leaves(parts.state.opt_state)
    assert any(x.dtype == np.uint8 for x in leaves)  # the big matrices' first moments
    summary = dit.run_dit_train(cfg)
    assert summary["step"] == 4 and np.isfinite(summary["final_loss"])
    bytes_8 = came_state_bytes(parts.state.opt_state)
    full = dit.build_dit_train(_tiny_job(tmp_path / "d", "optimizer=came").resolved(), None)
    assert bytes_8 < came_state_bytes(full.state.opt_state)


def test_tournament_pick_follows_the_pair_rules() -> None:
    # a yes beats a no; equal answers: the higher score
    assert tournament_pick([False, True], [0.9, 0.1]) == 1
    assert tournament_pick([True, True, False, False], [0.2, 0.8, 0.5, 0.6]) == 1
    assert tournament_pick([False, False, False], [0.1, 0.3, 0.9]) == 2
    assert tournament_pick([True], [0.0]) == 0


def test_best_of_n_judges_then_runs_the_tournament() -> None:
    images = np.zeros((4, 8, 8, 3), np.uint8)
    images[2] = 255  # the judge below says yes to the bright image only

    def judge(imgs, prompt):
        bright = [float(im.mean()) for im in imgs]
        return [b > 100 for b in bright], bright

    assert best_of_n(images, "a white square", judge) == 2
    with pytest.raises(ValueError, match="answers for 4 images"):
        best_of_n(images, "x", lambda imgs, p: ([True], [1.0]))


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("optimizer=sgd", "optimizer must be one of"),
        ("data.caption_dropout=1.5", "caption_dropout"),
        ("sampling.steps=0", "steps >= 1"),
        ("model.name=tiny", "not a pixel-space preset"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path, override, pattern) -> None:
    with pytest.raises(ValueError, match=pattern):
        cfg = _tiny_job(tmp_path / "e", override)
        dit.build_dit_train(cfg.resolved(), None)


# -- block-importance pruning + fine-tune (jaxstack/train/dit_prune.py) -------------------------


@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    """A finished 4-block train-dit run: checkpoints/ (steps 2, 4) and the exported model/."""
    out = tmp_path_factory.mktemp("dit_source")
    dit.run_dit_train(_tiny_job(out, "sampling.best_of=0"))
    return out


def _prune_job(out, source, *extra):
    from jaxstack.train.dit_prune import DiTPruneConfig

    return load_config(
        DiTPruneConfig,
        overrides=[
            f"output_dir={out}",
            f"prune.source={source}",
            "prune.keep=3",
            "prune.bi_batches=2",
            "prune.timesteps=3",
            "steps=4",
            "log_every=1",
            "checkpoint_every=2",
            "data.batch_size=8",
            "sampling.steps=2",
            "sampling.per_prompt=1",
            "sampling.best_of=0",
            *extra,
        ],
    )


def _flat_params(tree, prefix=()) -> dict[tuple, object]:
    """{path: array} of a nested pure dict; a block's path is ("dit", "transformer_blocks",
    index, ...)."""
    out = {}
    for k, v in tree.items():
        out.update(_flat_params(v, (*prefix, k)) if isinstance(v, dict) else {(*prefix, k): v})
    return out


@pytest.mark.slow  # end-to-end job (pytest -m slow)
def test_prune_job_prunes_finetunes_resumes_and_reports(tmp_path, source_run, capsys) -> None:
    from flax import nnx

    from jaxstack.train import dit_prune
    from jaxstack.train.sana15 import prune_blocks

    straight = dit_prune.run_dit_prune(_prune_job(tmp_path / "a", source_run))
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("prune: ")]
    assert len(line) == 1
    m = re.fullmatch(
        r"prune: blocks 4->3 accuracy full=([0-9.]+) pruned=([0-9.]+) finetuned=([0-9.]+)",
        line[0],
    )
    assert m, line
    ev = json.loads((tmp_path / "a" / "eval.json").read_text())
    acc = ev["accuracy"]
    assert [float(x) for x in m.groups()] == [
        round(acc[k], 3) for k in ("full", "pruned", "finetuned")
    ]
    assert straight["prompt_accuracy_finetuned"] == ev["finetuned"]["accuracy"] == acc["finetuned"]
    assert ev["source"] == {
        "path": str(source_run / "checkpoints" / "4"),
        "kind": "checkpoint",
        "step": 4,
    }
    bi = np.array(ev["block_importance"])
    assert ev["blocks"] == {"before": 4, "after": 3} and bi.shape == (4,) and np.all(bi > 0)
    assert ev["dropped_blocks"] == [int(np.argmin(bi))] == straight["dropped_blocks"]
    assert ev["kept_blocks"] == [i for i in range(4) if i != np.argmin(bi)]
    assert ev["importance_inputs"]["timesteps"] == [166, 500, 833]
    assert ev["full"]["num_prompts"] == ev["pruned"]["num_prompts"] == 8

    # "full" is the source model judged with the job's sampling settings
    cfg = _prune_job(tmp_path / "a", source_run).resolved()
    source = dit.load_word_caption_dit(str(source_run / "model"))
    full = dit.evaluate_prompts(source, ev["held_out"], cfg.sampling, cfg.data)
    assert full["accuracy"] == acc["full"]

    # the pruned model: the 3 kept blocks of the source, bit for bit, everything else copied
    parts = dit_prune.build_dit_prune(cfg, None)
    pruned = _flat_params(parts.state.params)
    src = _flat_params(nnx.to_pure_dict(nnx.state(source, nnx.Param)))
    assert len({k[2] for k in pruned if k[:2] == ("dit", "transformer_blocks")}) == 3
    for key, value in pruned.items():
        if key[:2] == ("dit", "transformer_blocks"):
            key = (*key[:2], ev["kept_blocks"][key[2]], *key[3:])
        np.testing.assert_array_equal(np.asarray(value), np.asarray(src[key]), err_msg=str(key))
    assert len(pruned) < len(src)
    # "pruned" judged those weights, before the fine-tune
    cut, removed = prune_blocks(source.dit, remove=ev["dropped_blocks"])
    again = dit.evaluate_prompts(
        dit_prune.with_transformer(source, cut), ev["held_out"], cfg.sampling, cfg.data
    )
    assert removed == ev["dropped_blocks"] and again["accuracy"] == acc["pruned"]

    # the fine-tune moved every kept block (and the caption path) away from the pruned weights
    tuned = dit.load_word_caption_dit(str(tmp_path / "a" / "model"))
    tuned = _flat_params(nnx.to_pure_dict(nnx.state(tuned, nnx.Param)))
    assert set(tuned) == set(pruned)
    moved = {k for k in pruned if not np.array_equal(np.asarray(pruned[k]), np.asarray(tuned[k]))}
    assert {k[2] for k in moved if k[:2] == ("dit", "transformer_blocks")} == {0, 1, 2}
    assert ("words", "embedding") in moved

    # stopped after step 2 and resumed: the same metrics and the same final weights
    dit_prune.run_dit_prune(_prune_job(tmp_path / "b", source_run), stop_after=2)
    resumed = dit_prune.run_dit_prune(_prune_job(tmp_path / "b", source_run))
    assert resumed["start_step"] == 2 and resumed["step"] == 4
    drop = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]
    ma, mb = (drop(read_metrics(tmp_path / d / "metrics.jsonl")) for d in "ab")
    assert [r["step"] for r in ma] == [1, 2, 3, 4] and ma == mb
    assert same_weight_files(tmp_path / "a" / "model", tmp_path / "b" / "model")
    assert (tmp_path / "a" / "loss.png").is_file() and (tmp_path / "a" / "samples.png").is_file()


def test_prune_sources_checkpoint_and_export_load_the_same_model(tmp_path, source_run) -> None:
    from flax import nnx

    from jaxstack.train import dit_prune

    loaded = {}
    for label, src in [
        ("run", source_run),
        ("ckpt", source_run / "checkpoints" / "4"),
        ("model", source_run / "model"),
        ("ckpt2", source_run / "checkpoints" / "2"),
    ]:
        cfg = _prune_job(tmp_path / label, src).resolved()
        model, origin = dit_prune.load_source(cfg, None)
        loaded[label] = _flat_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
        assert origin["kind"] == ("model" if label == "model" else "checkpoint"), origin
    for label in ("ckpt", "model"):
        for key, value in loaded["run"].items():
            np.testing.assert_array_equal(np.asarray(value), np.asarray(loaded[label][key]))
    assert any(
        not np.array_equal(np.asarray(v), np.asarray(loaded["ckpt2"][k]))
        for k, v in loaded["run"].items()
    )


@pytest.mark.parametrize(
    "source, override, error, pattern",
    [
        ("RUN", "prune.keep=4", ValueError, r"prune.keep=4 must be less than the source's 4"),
        ("RUN", "prune.keep=0", ValueError, "keep >= 1"),
        ("RUN", "data.held_out=6", ValueError, r"data.held_out=6 but the source run used 8"),
        ("MISSING", "steps=4", FileNotFoundError, "not a train-dit run directory"),
        ("EMPTY", "steps=4", FileNotFoundError, "holds no checkpoint"),
        ("RUN", "model.param_dtype=bfloat16", ValueError, "master weights are float32"),
        ("RUN", "model.precision=fp8", ValueError, "no FP8 path"),
    ],
)
def test_prune_bad_config_is_a_one_line_error(
    tmp_path, source_run, source, override, error, pattern
) -> None:
    from jaxstack.train import dit_prune

    (tmp_path / "empty" / "checkpoints").mkdir(parents=True)
    path = {"RUN": source_run, "MISSING": tmp_path / "nope", "EMPTY": tmp_path / "empty"}[source]
    with pytest.raises(error, match=pattern) as info:
        dit_prune.run_dit_prune(_prune_job(tmp_path / "out", path, override))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists()  # no run directory left behind
