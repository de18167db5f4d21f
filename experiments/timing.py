"""The one timing helper of the benchmarks: median wall-clock seconds of a jitted call.

Method (see the device notes): device work is asynchronous, so every call ends in
`jax.block_until_ready` on its result before the host clock is read; `warmup` calls first keep
compilation, module load and autotuning out of the numbers; the median of `repeats` calls is
the result (robust to a slow outlier). Callers pass random inputs, never zeros.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import jax


def timed(
    fn: Callable[..., Any],
    *args: Any,
    warmup: int,
    repeats: int,
    times: list[float] | None = None,
) -> float:
    """Median seconds of `fn(*args)` over `repeats` calls, after `warmup` untimed calls.

    Each call is timed to completion (`jax.block_until_ready` on whatever `fn` returns, any
    pytree of arrays). times: if given, each call's seconds are appended to it (for the spread).
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        samples.append(time.perf_counter() - t0)
    if times is not None:
        times.extend(samples)
    return statistics.median(samples)
