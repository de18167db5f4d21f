"""Inference-time scaling for text-to-image: SANA-1.5's pairwise tournament over N samples.

`tournament_pick(yes, score)` takes a judge's answers, e.g. `VLMVerifier.judge` in
jaxstack/diffusion/verifier.py or the programmatic judge of the captioned-shapes job
(jaxstack/train/dit_trainer.py); `best_of_n` runs a judge and the tournament in one call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np


def tournament_pick(yes: list[bool], score: list[float]) -> int:
    """SANA-1.5's single-elimination tournament over consecutive pairs (specs/sana.md §7):
    a yes beats a no; two yeses: the higher score wins; two noes: the lower score of being
    wrong wins (here: the higher match score). Returns the winner's index."""
    alive = list(range(len(yes)))
    while len(alive) > 1:
        nxt = []
        for a, b in zip(alive[::2], alive[1::2]):
            if yes[a] != yes[b]:
                nxt.append(a if yes[a] else b)
            else:
                nxt.append(a if score[a] >= score[b] else b)
        if len(alive) % 2:
            nxt.append(alive[-1])
        alive = nxt
    return alive[0]


def best_of_n(
    images: np.ndarray,
    prompt: str | Sequence[str],
    judge: Callable[[np.ndarray, str | Sequence[str]], tuple[list[bool], list[float]]],
) -> int:
    """Index of the tournament winner among `images` [N, H, W, 3] for `prompt` (one string or
    one per image), judged by `judge(images, prompt) -> (yes, score)` (e.g. `verifier.judge`)."""
    if len(images) == 0:
        raise ValueError("best_of_n needs at least one image")
    yes, score = judge(images, prompt)
    if len(yes) != len(images) or len(score) != len(images):
        raise ValueError(f"judge returned {len(yes)} answers for {len(images)} images")
    return tournament_pick(list(yes), list(score))
