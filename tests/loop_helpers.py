"""Test helpers for the shared training loop: a NaN planted into a job's step, and bitwise
comparison of two runs' exported weights."""

from __future__ import annotations

import glob
import os


def poison_step(build, bad_step: int):
    """Wrap a job's `build(cfg, mesh) -> LoopParts` so that the metrics of (1-based) step
    `bad_step` report a NaN loss (the state itself is left as the step made it)."""

    def wrapped(cfg, mesh):
        parts = build(cfg, mesh)
        real = parts.step

        def step(state, batch, i):
            state, metrics = real(state, batch, i)
            if i + 1 == bad_step:
                metrics = {**metrics, "loss": float("nan")}
            return state, metrics

        parts.step = step
        return parts

    return wrapped


def same_weight_files(dir_a: str, dir_b: str) -> bool:
    """True if the two export directories hold byte-identical safetensors files (same names)."""

    def files(d):
        return sorted(
            os.path.relpath(p, d) for p in glob.glob(f"{d}/**/*.safetensors", recursive=True)
        )

    names = files(dir_a)
    if not names or names != files(dir_b):
        return False
    for name in names:
        with (
            open(os.path.join(dir_a, name), "rb") as fa,
            open(os.path.join(dir_b, name), "rb") as fb,
        ):
            if fa.read() != fb.read():
                return False
    return True
