"""Test helper: recompute a job's reported accuracy from the samples it saved."""

from __future__ import annotations

from collections.abc import Callable


def _mc_correct(sample: dict) -> bool:
    from jaxstack.rl.rewards import parse_choice_from_response

    pick = parse_choice_from_response(sample["generated"])
    return pick is not None and pick.upper() == sample["answer"].upper()


def rescored_accuracy(samples: list[dict], correct: Callable[[dict], bool] = _mc_correct) -> float:
    """Mean of `correct(sample)` over the samples (multiple-choice scoring by default); also
    asserts that every sample's stored verdict agrees with the rescoring."""
    verdicts = [bool(correct(s)) for s in samples]
    assert [bool(s["correct"]) for s in samples] == verdicts
    return sum(verdicts) / len(samples)
