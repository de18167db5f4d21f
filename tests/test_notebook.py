"""experiments/quickstart.ipynb (load -> generate -> fine-tune -> plot -> generate again).

Fast: the file is nbformat 4 JSON with the four stages and no stored outputs. Slow: the
notebook is executed without Jupyter: its code cells run in order in one namespace, in a fresh
Python process (one CPU device, not this session's 8 simulated ones; `sys.argv` as a Jupyter
kernel has it, so parsing arguments at import would fail) with cwd a temp dir, MPLBACKEND=Agg and
TMPDIR inside the test's tmp_path; then its results are checked: the loss falls, the run
directory holds what run_train promises, the plot shows the logged losses and the fine-tuned
model recalls the facts it was trained on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "experiments" / "quickstart.ipynb"
STAGES = ("load", "generate", "fine-tune", "plot")

# Runs in the child process: argv = [notebook, result.json]. Writes the JSON-able globals the
# cells left behind, plus the data of every open pyplot figure, to result.json.
RUNNER = r"""
import json, sys

nb_path, out_path = sys.argv[1:3]
sys.argv = ["ipykernel_launcher.py", "-f", "/tmp/kernel-quickstart.json"]  # as in a kernel
with open(nb_path, encoding="utf-8") as f:
    cells = [c for c in json.load(f)["cells"] if c["cell_type"] == "code"]
ns = {"__name__": "__main__"}
for i, cell in enumerate(cells):
    src = cell["source"] if isinstance(cell["source"], str) else "".join(cell["source"])
    src = "\n".join(l for l in src.splitlines() if not l.lstrip().startswith(("%", "!")))
    exec(compile(src, f"<quickstart cell {i}>", "exec"), ns)

out = {}
for key, value in ns.items():
    try:
        out[key] = json.loads(json.dumps(value))
    except (TypeError, ValueError):
        pass
import matplotlib.pyplot as plt
out["_figures"] = [
    [line.get_xydata().tolist() for ax in plt.figure(n).axes for line in ax.lines]
    for n in plt.get_fignums()
]
with open(out_path, "w") as f:
    json.dump(out, f)
"""


def _cells() -> list[dict]:
    with open(NOTEBOOK, encoding="utf-8") as f:
        return json.load(f)["cells"]


def _source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def test_notebook_is_valid_nbformat4_without_outputs() -> None:
    with open(NOTEBOOK, encoding="utf-8") as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4 and isinstance(nb["nbformat_minor"], int), nb.get("nbformat")
    assert isinstance(nb["metadata"], dict) and nb["cells"]
    ids = []
    for i, cell in enumerate(nb["cells"]):
        assert cell["cell_type"] in ("markdown", "code"), (i, cell["cell_type"])
        assert isinstance(cell["metadata"], dict), i
        src = cell["source"]
        assert isinstance(src, str) or all(isinstance(s, str) for s in src), i
        if nb["nbformat_minor"] >= 5:  # nbformat 4.5 requires cell ids
            assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cell["id"]), (i, cell.get("id"))
            ids.append(cell["id"])
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, f"cell {i} has output"
            compile(_source(cell), f"<cell {i}>", "exec")  # valid Python, no IPython magics
            magics = [s for s in _source(cell).splitlines() if s.lstrip().startswith(("%", "!"))]
            assert not magics, (i, magics)
        else:
            assert "outputs" not in cell and "execution_count" not in cell, i
    assert len(ids) == len(set(ids)), ids

    # The stages, as markdown headings in this order, each followed by code using its API.
    headings = [
        (i, line.lower())
        for i, cell in enumerate(nb["cells"])
        if cell["cell_type"] == "markdown"
        for line in _source(cell).splitlines()
        if line.startswith("## ")
    ]
    at = [next((i for i, h in headings if stage in h), None) for stage in STAGES]
    assert None not in at and at == sorted(at), headings
    code = "\n".join(_source(c) for c in nb["cells"] if c["cell_type"] == "code")
    for api in ("hf.load_model(", "generate(", "run_train(", "read_metrics("):
        assert api in code, api


@pytest.mark.slow
def test_notebook_runs_and_fine_tuning_works(tmp_path) -> None:
    cwd, tmp, result = tmp_path / "cwd", tmp_path / "tmp", tmp_path / "result.json"
    cwd.mkdir()
    tmp.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env.update(JAX_PLATFORMS="cpu", MPLBACKEND="Agg", TMPDIR=str(tmp))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, str(NOTEBOOK), str(result)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-4000:]
    ns = json.loads(result.read_text())
    print(f"notebook ran in {seconds:.1f} s")

    # Everything was written into the notebook's temp dir, nothing into the cwd.
    workdir = Path(ns["workdir"])
    assert workdir.parent == tmp and not list(cwd.iterdir()), list(cwd.iterdir())

    # load: a transformers checkpoint was written and read back.
    base = Path(ns["base_dir"])
    assert (base / "config.json").is_file() and (base / "model.safetensors").is_file()
    assert json.loads((base / "config.json").read_text())["vocab_size"] == 263  # byte vocab

    # fine-tune: the run directory holds what run_train promises, for 100 steps.
    summary = ns["summary"]
    run = Path(summary["output_dir"])
    assert run == workdir / "run" and summary["start_step"] == 0 and summary["step"] == 100
    for name in ("config.yaml", "metrics.jsonl", "loss.png", "summary.json", "hf/config.json"):
        assert (run / name).is_file(), name
    assert (run / "checkpoints" / "100").is_dir(), list((run / "checkpoints").iterdir())
    assert json.loads((run / "summary.json").read_text())["final_loss"] == summary["final_loss"]
    records = [json.loads(s) for s in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 101))
    losses = [r["loss"] for r in records]
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert losses[0] > 3.0 and last < 0.1 * first, (losses[:10], losses[-10:])

    # plot: the notebook's figure draws exactly the logged losses against their steps.
    assert ns["losses"] == losses and ns["steps"] == list(range(1, 101))
    curves = [line for fig in ns["_figures"] for line in fig]
    assert [[float(r["step"]), r["loss"]] for r in records] in curves, len(curves)

    # generate, before and after: text; the tuned model recalls what it was trained on.
    before, after = ns["before"], ns["after"]
    assert isinstance(before, str) and isinstance(after, str) and before != after
    assert "Paris" not in before
    assert ns["correct"] >= 6 and len(ns["answers"]) == 8, ns["answers"]
    assert after.strip() == "Paris.", after
