"""Smoke test of experiments/bench_mrsp.py: the product's RL step, cache on and off (tiny, CPU)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")


@pytest.mark.slow
def test_bench_mrsp_tiny_runs_both_modes(tmp_path) -> None:
    cmd = [sys.executable, "experiments/bench_mrsp.py", "--tiny", "--frames", "16", "--iters", "1"]
    cmd += ["--out", str(tmp_path / "mrsp.json")]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "frames 16: off/on = " in res.stdout, res.stdout
    # cache on: the timed step hits the cache; off: it re-encodes its one clip
    assert (
        '"mode": "on", "status": "ok"' in res.stderr and '"cache_hits_per_step": 1.0' in res.stderr
    )
    assert '"mode": "off", "status": "ok"' in res.stderr
    assert '"encoder_calls_per_step": 1.0' in res.stderr
    assert not (tmp_path / "mrsp.json").exists()  # --tiny writes nothing
