"""The text-to-image DiT job (jaxstack/train/dit_trainer.py) on the shared loop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from loop_helpers import same_weight_files

from jaxstack.config import load_config
from jaxstack.data import shapes
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
    assert dit.tournament_pick([False, True], [0.9, 0.1]) == 1
    assert dit.tournament_pick([True, True, False, False], [0.2, 0.8, 0.5, 0.6]) == 1
    assert dit.tournament_pick([False, False, False], [0.1, 0.3, 0.9]) == 2
    assert dit.tournament_pick([True], [0.0]) == 0


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
