"""Smoke test of experiments/bench_sana.py --tiny: both sides, every stage, the JSON (CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(__file__), "..")
SCRIPT = [sys.executable, "experiments/bench_sana.py", "--tiny"]


def run(args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.run(
        SCRIPT + args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env
    )


@pytest.mark.slow  # end-to-end job (pytest -m slow)
def test_bench_sana_tiny_runs_both_sides(tmp_path) -> None:
    out = tmp_path / "sana.json"
    res = run(["--models", "0.6b", "--batches", "1", "--repeats", "2", "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["tiny"] and result["settings"]["steps"] == 2
    assert result["settings"]["image_px"] == 64
    by_side = {c["side"]: c for c in result["cases"]}
    jax_row, torch_row = by_side["jaxstack"], by_side["diffusers"]
    assert jax_row["status"] == "ok", jax_row
    assert torch_row["status"] == "ok", torch_row
    for row in (jax_row, torch_row):
        assert row["image_shape"] == [1, 64, 64, 3]  # host float32 images in [0, 1]
        assert row["image_dtype"] == "float32"
        assert 0.0 <= row["output"]["mean"] <= 1.0
        assert row["output"]["finite"]
        assert row["e2e_s"] > 0 and len(row["e2e_s_all"]) == 2
    assert set(jax_row["stages_s"]) == set(jax_row["compile_s_est"])
    assert set(jax_row["stages_s"]) == {"text_encode", "denoise", "decode"}
    assert set(torch_row["stages_s"]) >= {"text_encode", "pipeline", "decode"}
    assert result["diffusers_info"]["gemma_config_equals_jaxstack"]
    (ratio,) = result["ratios"]
    assert ratio["jax_over_diffusers_images_per_s"] > 0
    hires = result["hires_jaxstack"]
    assert hires["status"] == "ok" and hires["tokens"] == 128 * 128, hires
    assert "jax/dif" in res.stdout and "hires jaxstack" in res.stdout  # the table, last


def test_bench_sana_budget_spent_skips_everything(tmp_path) -> None:
    out = tmp_path / "sana.json"
    res = run(["--budget-s", "0", "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["cases"]) == 2 * 2 * 2  # sides x models x batches, all recorded
    assert {c["status"] for c in result["cases"]} == {"skipped"}
    assert result["hires_jaxstack"]["status"] == "skipped"
    assert result["ratios"] == []
