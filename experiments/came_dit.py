"""CAME-8bit against CAME (32-bit) on the embedded text-to-image job, and their state memory.

1. Training curves: `jaxstack train-dit`'s embedded default (`jaxstack/train/dit_trainer.py`)
   run once per optimizer with the same seed and data, `came8bit_min_size` lowered (default
   1024) so that the tiny model's matrices are quantized as a large model's would be (with the
   16384 default only its 64 x 320 Mix-FFN convs qualify). Compares the loss curves (mean
   over the last 20% of steps, and the largest gap of the 50-step running means) and the
   held-out prompt accuracy.
2. State memory: `came_state_bytes` of CAME / CAME-8bit / AdamW states for the Sana-0.6B and
   Sana-1.6B transformers, from `jax.eval_shape` (no allocation), with the quantized tensors'
   element count: bytes per element of the quantized tensors and the whole state's ratio.

    python experiments/came_dit.py                # CPU, ~10 minutes on 2 cores
    python experiments/came_dit.py --steps 300    # shorter
Writes experiments/results/came8bit.json and experiments/results/came8bit.png.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from jaxstack.config import load_config
from jaxstack.models.sana import SanaConfig, SanaTransformer
from jaxstack.train.came import came, came_state_bytes, uses_8bit
from jaxstack.train.dit_trainer import DiTTrainConfig, run_dit_train
from jaxstack.train.metrics import read_metrics
from jaxstack.train.step import OptimConfig, make_optimizer

ROOT = Path(__file__).resolve().parent.parent


def train_curves(steps: int, min_size: int, work: str) -> dict:
    runs = {}
    for opt in ("came", "came8bit"):
        cfg = load_config(
            DiTTrainConfig,
            overrides=[
                f"output_dir={work}/{opt}",
                f"steps={steps}",
                "log_every=10",
                f"optimizer={opt}",
                f"came8bit_min_size={min_size}",
                "optim.lr=3e-4",
            ],
        )
        t0 = time.perf_counter()
        summary = run_dit_train(cfg)
        rows = read_metrics(f"{work}/{opt}/metrics.jsonl")
        runs[opt] = {
            "steps": [r["step"] for r in rows],
            "loss": [r["loss"] for r in rows],
            "prompt_accuracy": summary["prompt_accuracy"],
            "prompt_accuracy_step0": summary["prompt_accuracy_step0"],
            "wall_s": time.perf_counter() - t0,
        }
    a, b = np.asarray(runs["came"]["loss"]), np.asarray(runs["came8bit"]["loss"])
    tail = max(1, len(a) // 5)
    smooth = lambda x: np.convolve(x, np.ones(5) / 5, mode="valid")  # 50 steps at log_every 10
    return {
        "runs": runs,
        "last20pct_mean_loss": {
            "came": float(a[-tail:].mean()),
            "came8bit": float(b[-tail:].mean()),
        },
        "max_gap_running_mean": float(np.max(np.abs(smooth(a) - smooth(b)))),
        "min_8bit_size": min_size,
    }


def state_memory() -> dict:
    out = {}
    for name in ("sana-0.6b", "sana-1.6b"):
        cfg = SanaConfig.preset(name)
        abstract = jax.eval_shape(lambda c=cfg: nnx.state(SanaTransformer(c, rngs=nnx.Rngs(0))))
        params = nnx.to_pure_dict(abstract)
        n_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
        quant = [x for x in jax.tree.leaves(params) if uses_8bit(x.shape)]
        n_quant = sum(math.prod(x.shape) for x in quant)
        b32 = came_state_bytes(jax.eval_shape(came(1e-4).init, params))
        b8 = came_state_bytes(jax.eval_shape(came(1e-4, eight_bit=True).init, params))
        adam = came_state_bytes(jax.eval_shape(make_optimizer(OptimConfig()).init, params))
        out[name] = {
            "params": n_params,
            "quantized_elements": n_quant,
            "came32_state_bytes": b32,
            "came8bit_state_bytes": b8,
            "adamw32_state_bytes": adam,
            # CAME-8bit stores m of each quantized matrix in 1 byte instead of 4
            "bytes_per_quantized_element_saved": (b32 - b8) / n_quant,
            "came8bit_over_adamw": b8 / adam,
        }
    return out


def plot(curves: dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for opt, r in curves["runs"].items():
        ax.plot(r["steps"], r["loss"], label=opt, alpha=0.8)
    ax.set(xlabel="step", ylabel="flow-matching loss", yscale="log", title="CAME vs CAME-8bit")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--min-8bit-size", type=int, default=1024)
    ap.add_argument("--out", default=str(ROOT / "experiments/results/came8bit.json"))
    args = ap.parse_args()
    memory = state_memory()
    with tempfile.TemporaryDirectory() as work:
        curves = train_curves(args.steps, args.min_8bit_size, work)
    out = Path(args.out)
    result = {
        "benchmark": "came8bit",
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "job": "jaxstack train-dit embedded default (tiny-shapes), optim.lr=3e-4",
        "memory": memory,
        "curves": curves,
    }
    out.write_text(json.dumps(result, indent=1))
    plot(curves, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in curves.items() if k != "runs"}, indent=1))
    for opt, r in curves["runs"].items():
        print(opt, "accuracy", r["prompt_accuracy_step0"], "->", r["prompt_accuracy"])
    for name, m in memory.items():
        print(
            f"{name}: CAME {m['came32_state_bytes'] / 2**30:.2f} GiB, CAME-8bit "
            f"{m['came8bit_state_bytes'] / 2**30:.2f} GiB, AdamW {m['adamw32_state_bytes'] / 2**30:.2f}"
            f" GiB; saved {m['bytes_per_quantized_element_saved']:.2f} B per quantized element"
        )


if __name__ == "__main__":
    main()
