"""Training metrics: a JSON-lines log that survives restarts, a progress bar and loss plots.

`MetricsLogger` appends one JSON object per logged step (`{"step": 10, "loss": 2.31, "lr": ...}`)
to `metrics.jsonl`. On resume from a checkpoint at step s it first drops the lines with
step > s, so after the restarted run finishes the file equals an uninterrupted run's (wall-clock
fields such as `tokens_per_s` aside). Only process 0 writes.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import jax
from tqdm.auto import tqdm


def _jsonable(value: Any) -> Any:
    """Python scalars for numpy / jax scalars; non-finite floats stay floats (JSON NaN)."""
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    return value


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """All records of a metrics JSONL file (empty list if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


class MetricsLogger:
    """Append-only JSONL metrics log for one run.

    path: the `.jsonl` file. resume_step: if given, records with `step > resume_step` are
    removed first (0 starts the file afresh; None keeps everything). enabled: write at all
    (default: only on `jax.process_index() == 0`).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        resume_step: int | None = None,
        enabled: bool | None = None,
    ):
        self.path = os.fspath(path)
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self._file = None
        if not self.enabled:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        if resume_step is not None and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in kept)
            os.replace(tmp, self.path)
        self._file = open(self.path, "a")  # noqa: SIM115 (closed in close())

    def log(self, step: int, **metrics: Any) -> dict:
        """Append `{"step": step, **metrics}` (scalars; jax/numpy scalars are converted)."""
        record = {"step": int(step), **{k: _jsonable(v) for k, v in metrics.items()}}
        if self._file is not None:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        return record

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def progress_bar(total: int, *, initial: int = 0, desc: str = "train", **kwargs: Any) -> tqdm:
    """tqdm bar over training steps, shown on process 0 only (steps `initial`..`total`)."""
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="step",
        dynamic_ncols=True,
        disable=jax.process_index() != 0,
        **kwargs,
    )


def plot_metrics(
    jsonl_path: str | os.PathLike,
    png_path: str | os.PathLike,
    keys: Sequence[str] = ("loss",),
    *,
    title: str | None = None,
) -> str | None:
    """Plot `keys` against step from a metrics JSONL file into a PNG (one panel per key).

    Returns the PNG path, or None when nothing was logged (or on processes other than 0).
    """
    if jax.process_index() != 0:
        return None
    records = read_metrics(jsonl_path)
    keys = [k for k in keys if any(k in r for r in records)]
    if not keys:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # A bare Agg figure: no pyplot state, works headless and leaves notebook backends alone.
    fig = Figure(figsize=(6, 2.6 * len(keys)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(keys), 1, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(r["step"], r[key]) for r in records if _finite(r.get(key))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if key == "loss" and pts and min(p[1] for p in pts) > 0:
            ax.set_yscale("log")
    axes[-1, 0].set_xlabel("step")
    if title:
        axes[0, 0].set_title(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, dpi=100)
    return os.fspath(png_path)


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def summarize(records: Iterable[dict], key: str = "loss", window: int = 10) -> dict[str, float]:
    """First, last, smoothed-last (mean of the last `window` logged values, named as such) and
    min of `key` over the records (for run summaries)."""
    vals = [r[key] for r in records if _finite(r.get(key))]
    if not vals:
        return {}
    tail = vals[-window:]
    return {
        f"first_{key}": vals[0],
        f"final_{key}": vals[-1],
        f"final_{key}_mean{window}": sum(tail) / len(tail),
        f"min_{key}": min(vals),
    }


def in_notebook() -> bool:
    """True inside a Jupyter (IPython kernel) session."""
    try:
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def show_in_notebook(png_path: str | None) -> None:
    """Display a saved plot inline when running in a notebook (no-op elsewhere)."""
    if png_path and jax.process_index() == 0 and in_notebook():
        from IPython.display import Image, display

        display(Image(filename=png_path))
