"""Train a ~100M diffusion LLM on a synthetic task (GPU) and compare the Fast-dLLM samplers.

Runs a `jaxstack train-dllm` job (configs/dllm_add_100m.yaml: 10-digit addition;
configs/dllm_sort_100m.yaml: sorting 8 numbers) -- training, then every sampler on 500 held-out
prompts, 100 prompts per call -- then reloads the exported checkpoint and times the samplers
again at batch 1 (one prompt per call, as Fast-dLLM measures; tokens per step is then per prompt
rather than the batch's slowest row). Writes experiments/results/<config name>.json.

    python experiments/dllm_task.py [--config configs/dllm_add_100m.yaml] [--b1-num 100]
        [key=value ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from jaxstack.config import config_to_dict, load_config
from jaxstack.data.tokenizer import load_tokenizer
from jaxstack.hf.dllm import load_dllm
from jaxstack.train.dllm_trainer import (
    DLLMTrainConfig,
    TaskBatches,
    evaluate_samplers,
    format_eval_table,
    run_dllm_train,
)
from jaxstack.train.metrics import read_metrics


def _strip_samples(result: dict) -> dict:
    out = dict(result)
    out["samplers"] = {
        k: {kk: vv for kk, vv in v.items() if kk != "samples"} | {"samples": v["samples"][:3]}
        for k, v in result["samplers"].items()
    }
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/dllm_add_100m.yaml")
    ap.add_argument("--b1-num", type=int, default=100, help="prompts for the batch-1 timing")
    ap.add_argument("--b1-samplers", default="baseline,prefix,dual,parallel,dual+parallel")
    ap.add_argument("--out", default="", help="default experiments/results/<name>.json")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    cfg = load_config(DLLMTrainConfig, args.config, args.overrides).resolved()
    summary = run_dllm_train(cfg, resume=False)
    print(f"trained {summary['step']} steps in {summary['train_seconds']:.0f} s", flush=True)
    eval_main = json.loads(Path(cfg.output_dir, "eval.json").read_text())
    metrics = read_metrics(Path(cfg.output_dir, "metrics.jsonl"))

    model, dcfg = load_dllm(
        Path(cfg.output_dir, "model"), dtype=getattr(jnp, cfg.model.dtype), mesh=None
    )
    data = TaskBatches(cfg.data, load_tokenizer(cfg.data.tokenizer))
    ev1 = dataclasses.replace(
        cfg.eval, num=args.b1_num, batch=1, samplers=args.b1_samplers.split(",")
    )
    eval_b1 = evaluate_samplers(model, dcfg, data, ev1)
    tokens_per_step_train = cfg.data.batch_size * data.seq_len
    result = {
        "experiment": "dllm_task",
        "device": jax.devices()[0].device_kind,
        "jax_version": jax.__version__,
        "config": config_to_dict(cfg),
        "parameters": int(sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))),
        "train": {
            "steps": summary["step"],
            "seconds": summary["train_seconds"],
            "tokens_per_second": tokens_per_step_train * summary["step"] / summary["train_seconds"],
            "first_loss": summary.get("first_loss"),
            "final_loss": summary.get("final_loss"),
            "loss_every_250": [
                (m["step"], round(m["loss"], 4)) for m in metrics if m["step"] % 250 == 0
            ],
        },
        "eval_batched": _strip_samples(eval_main),
        "eval_batch1": _strip_samples(eval_b1),
    }
    out = Path(args.out or f"experiments/results/{cfg.name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print("\n== batched ==\n" + format_eval_table(eval_main))
    print("\n== batch 1 ==\n" + format_eval_table(eval_b1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
