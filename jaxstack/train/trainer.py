"""SFT / causal-LM training job: config -> sharded model -> exact-resume loop -> artifacts.

`run_train(cfg)` writes into `cfg.output_dir` (default `runs/<name>`): config.yaml (resolved),
metrics.jsonl, loss.png, checkpoints/<step>/, hf/ (transformers format), eval.json (held-out
generations, accuracy) and summary.json. Re-running a config resumes from its newest checkpoint
and reproduces the uninterrupted run exactly: batch i is a pure function of (data config, i)
and the state is restored bit for bit.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh

from jaxstack.config import config_to_dict, save_config
from jaxstack.models.llm import LLM, REMAT_POLICIES, LLMConfig
from jaxstack.parallel.mesh import init_sharded, make_mesh, use_mesh
from jaxstack.train import metrics as metrics_lib
from jaxstack.train import step as step_lib
from jaxstack.train.checkpoint import Checkpointer, abstract_state
from jaxstack.train.step import OptimConfig

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
SYNTHETIC = "synthetic:arithmetic"
BATCH_KEYS = ("input_ids", "targets", "segment_ids", "loss_mask")  # what the loss reads


@dataclasses.dataclass
class ModelSection:
    """name: a preset ("tiny", "qwen2.5-0.5b", ...; trained from scratch with the tokenizer's
    vocab) or a transformers checkpoint directory (fine-tuned). dtype: compute dtype ("bfloat16"
    on GPUs); param_dtype: master weights; remat: "none" | "full" | "dots"."""

    name: str = "tiny"
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: str = "none"

    def __post_init__(self):
        for key, ok in (("dtype", DTYPES), ("param_dtype", DTYPES), ("remat", REMAT_POLICIES)):
            if getattr(self, key) not in ok:
                raise ValueError(f"{key} must be one of {list(ok)}, got {getattr(self, key)!r}")


@dataclasses.dataclass
class DataSection:
    """source: "synthetic:arithmetic" or a JSONL file ({prompt, response} or {text} records);
    tokenizer: "byte" or a tokenizer directory; batch_size: global packed rows [B, seq_len] per
    optimizer step, split into grad_accum micro-batches; num_records, max_digits: synthetic."""

    source: str = SYNTHETIC
    tokenizer: str = "byte"
    seq_len: int = 64
    batch_size: int = 32
    grad_accum: int = 1
    num_records: int = 20000
    max_digits: int = 2
    chat: bool = False
    seed: int = 0


@dataclasses.dataclass
class SequenceParallelSection:
    """Attention routing when the mesh has sequence > 1 (`jaxstack.parallel.use_sequence_parallel`):
    mode "auto" | "ulysses" | "ring" | "2d"; ulysses_size for "2d" (0 = chosen from the heads);
    layout "contiguous" | "zigzag" (balanced causal ring work)."""

    mode: str = "auto"
    ulysses_size: int = 0
    layout: str = "contiguous"

    def __post_init__(self):
        from jaxstack.parallel.sequence import LAYOUTS, MODES

        if self.mode not in ("auto", *MODES):
            raise ValueError(f"sequence_parallel.mode must be auto or one of {MODES}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"sequence_parallel.layout must be one of {LAYOUTS}")
        if self.ulysses_size < 0:
            raise ValueError("sequence_parallel.ulysses_size must be >= 0")

    def context(self):
        from jaxstack.parallel.sequence import use_sequence_parallel

        return use_sequence_parallel(
            self.mode, ulysses_size=self.ulysses_size or None, layout=self.layout
        )


@dataclasses.dataclass
class TrainJobConfig:
    """One training job. optim.total_steps = 0 means "= steps" (the cosine spans the run);
    mesh: e.g. "fsdp=4,tensor=2" or "data=2,sequence=4" ("" = data parallel over all devices);
    sequence_parallel: how attention runs when the mesh has sequence > 1."""

    name: str = "train_tiny"
    output_dir: str = ""  # "" = runs/<name>
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=1e-2, warmup_steps=20, total_steps=0)
    )
    steps: int = 1500
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 5
    mesh: str = ""
    sequence_parallel: SequenceParallelSection = dataclasses.field(
        default_factory=SequenceParallelSection
    )
    seed: int = 0
    eval: int = 128  # held-out synthetic prompts answered (greedy) at the end; 0 = skip
    max_new_tokens: int = 6

    def __post_init__(self):
        for key in ("steps", "checkpoint_every", "log_every", "keep_checkpoints"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")

    def resolved(self) -> TrainJobConfig:
        """Copy with output_dir and optim.total_steps filled in."""
        return dataclasses.replace(
            self,
            output_dir=self.output_dir or os.path.join("runs", self.name),
            optim=dataclasses.replace(self.optim, total_steps=self.optim.total_steps or self.steps),
        )


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/inf; the message names the step and the last good checkpoint."""


def build_model(cfg: ModelSection, vocab_size: int, mesh: Mesh, seed: int) -> LLM:
    """The LLM with every parameter created (or loaded) directly in its sharding on `mesh`."""
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    kw = dict(dtype=dtype, param_dtype=param_dtype, remat=cfg.remat)
    if os.path.isdir(cfg.name):
        from jaxstack.hf import load_model

        model = load_model(cfg.name, mesh=mesh, **kw)
        if model.cfg.vocab_size < vocab_size:
            raise ValueError(
                f"tokenizer has {vocab_size} tokens but model {cfg.name!r} only "
                f"{model.cfg.vocab_size}: use the checkpoint's own tokenizer (data.tokenizer)"
            )
        return model
    arch = dataclasses.replace(LLMConfig.preset(cfg.name), vocab_size=vocab_size)
    make = lambda: LLM(arch, rngs=nnx.Rngs(seed), **kw)
    return init_sharded(make, mesh)


def build_data(cfg: DataSection, tokenizer: Any) -> tuple[Any, list[dict]]:
    """(SFTBatches: the GLOBAL batch of every step on every process, the training records)."""
    from jaxstack.data.sft import SFTBatches, read_jsonl
    from jaxstack.data.synthetic import make_arithmetic_records

    if cfg.source == SYNTHETIC:
        records = make_arithmetic_records(cfg.num_records, cfg.seed, cfg.max_digits)
    elif os.path.isfile(cfg.source):
        records = read_jsonl(cfg.source)
    else:
        raise FileNotFoundError(f"data.source {cfg.source!r} is neither {SYNTHETIC!r} nor a file")
    kw = dict(batch_size=cfg.batch_size, seq_len=cfg.seq_len, seed=cfg.seed, chat=cfg.chat)
    return SFTBatches(records, tokenizer, **kw), records


def evaluate_arithmetic(
    model: LLM, tokenizer: Any, cfg: TrainJobConfig, train_records: list[dict], mesh: Mesh
) -> dict:
    """Greedy answers to held-out arithmetic prompts (none seen in training) -> accuracy."""
    from jaxstack.data.synthetic import make_arithmetic_records, score_arithmetic
    from jaxstack.generate import generate

    seen = {r["prompt"] for r in train_records}
    n, seed = cfg.eval, cfg.data.seed + 7919
    pool = make_arithmetic_records(8 * n, seed, cfg.data.max_digits)
    held = [r for r in pool if r["prompt"] not in seen][:n]
    if not held:
        return {"accuracy": None, "num_prompts": 0, "samples": []}
    if cfg.data.chat:
        chat = lambda p: tokenizer.apply_chat_template([{"role": "user", "content": p}])
        prompts = [chat(r["prompt"]) for r in held]
    else:
        bos = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
        prompts = [bos + tokenizer.encode(r["prompt"]) for r in held]
    if jax.process_count() > 1:  # generate() feeds host arrays: use a local replicated copy
        from jax.experimental.multihost_utils import process_allgather

        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda a: process_allgather(a, tiled=True), state)
        model, mesh = nnx.merge(graphdef, jax.device_put(state, jax.local_devices()[0])), None
    with use_mesh(mesh):
        gen_kw = dict(stop_tokens=[tokenizer.eos_id], pad_id=tokenizer.pad_id)
        out = generate(model, prompts, max_new_tokens=cfg.max_new_tokens, **gen_kw)
    samples = [
        dict(prompt=r["prompt"], answer=r["response"], generated=text)
        for r, text in zip(held, map(tokenizer.decode, out.tokens))
    ]
    for s in samples:
        s["correct"] = score_arithmetic(s["prompt"], s["generated"])
    acc = sum(s["correct"] for s in samples) / len(samples)
    return {"accuracy": acc, "num_prompts": len(samples), "samples": samples}


def _write_json(path: str, obj: Any) -> None:
    if jax.process_index() == 0:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)


def run_train(cfg: TrainJobConfig, *, resume: bool = True, stop_after: int | None = None) -> dict:
    """Run (or resume) the job; returns a summary dict (also written to summary.json).

    resume: continue from the newest checkpoint in output_dir (False refuses to start if one
    exists). stop_after: stop right after global step `stop_after` as if killed (no final
    checkpoint, export or eval), to test resumption. A NaN/inf loss raises NonFiniteLossError
    naming the step; the bad state is not saved, earlier checkpoints and metrics stay.
    """
    from jaxstack.data.tokenizer import load_tokenizer
    from jaxstack.hf import save_model
    from jaxstack.parallel.distributed import initialize

    initialize()
    cfg = cfg.resolved()
    out, main = cfg.output_dir, jax.process_index() == 0
    os.makedirs(out, exist_ok=True)
    mesh = make_mesh(cfg.mesh or None)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg.model, tokenizer.vocab_size, mesh, cfg.seed)
    data, records = build_data(cfg.data, tokenizer)
    optimizer = step_lib.make_optimizer(cfg.optim)
    state, shardings = step_lib.init_train_state(model, optimizer, mesh)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    train_step = step_lib.make_train_step(
        graphdef, rest, optimizer, grad_accum=cfg.data.grad_accum, mesh=mesh, state_sh=shardings
    )
    ckpt = Checkpointer(os.path.join(out, "checkpoints"), keep=cfg.keep_checkpoints)
    start = last_good = ckpt.latest_step()
    if start is not None and not resume:
        ckpt.close()
        raise FileExistsError(f"{ckpt.directory} has checkpoints (step {start}); resume=True?")
    if start is not None:
        state, meta = ckpt.restore(start, abstract_state(state, shardings))
        if meta.get("config", {}).get("data") != config_to_dict(cfg.data) and main:
            print(f"warning: data config differs from checkpoint {start}: batches will differ")
    start = start or 0
    if main:
        save_config(cfg, os.path.join(out, "config.yaml"))
    metrics_path = os.path.join(out, "metrics.jsonl")
    logger = metrics_lib.MetricsLogger(metrics_path, resume_step=start)
    lr_at = step_lib.learning_rate_schedule(cfg.optim)
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    bar = metrics_lib.progress_bar(cfg.steps, initial=start, desc=cfg.name)
    window = [time.perf_counter(), start]  # (time, step) of the last log: tokens/s over the window

    def finish(step: int, metrics: dict) -> None:  # host side of (1-based) step `step`
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not math.isfinite(m["loss"]):
            ckpt.wait_until_finished()
            raise NonFiniteLossError(
                f"loss is {m['loss']} at step {step} (grad_norm {m['grad_norm']}); stopped. "
                f"Last good checkpoint: step {last_good} in {ckpt.directory}; metrics up to "
                f"step {step - 1} in {metrics_path}"
            )
        bar.update(1)
        if step % cfg.log_every == 0 or step == cfg.steps:
            seconds, window[0] = time.perf_counter() - window[0], time.perf_counter()
            speed = (step - window[1]) * cfg.data.batch_size * cfg.data.seq_len / seconds
            window[1] = step
            row = dict(loss=m["loss"], grad_norm=m["grad_norm"], lr=float(lr_at(step - 1)))
            logger.log(step, **row, loss_tokens=int(m["tokens"]), tokens_per_s=speed)
            bar.set_postfix(loss=f"{m['loss']:.4f}")

    pending = None  # (step, device metrics) read one step late, so the device never idles
    # The step is traced, and its attention routed, on its first call inside the loop.
    sp_context = cfg.sequence_parallel.context()
    sp_context.__enter__()
    try:
        for i, batch in zip(range(start, end), data.iterate(start, end)):
            batch = step_lib.place_batch(mesh, {k: batch[k] for k in BATCH_KEYS})
            state, metrics = train_step(state, batch)
            if pending is not None:
                finish(*pending)
            pending = (i + 1, metrics)
            if (i + 1) % cfg.checkpoint_every == 0 or i + 1 == cfg.steps:
                finish(*pending)
                pending = None
                meta = {"step": i + 1, "next_batch": i + 1, "config": config_to_dict(cfg)}
                ckpt.save(i + 1, state, meta)
                last_good = i + 1
        if pending is not None:
            finish(*pending)
    finally:
        sp_context.__exit__(None, None, None)
        bar.close()
        logger.close()
        ckpt.close()
    summary: dict[str, Any] = {"output_dir": out, "start_step": start, "step": max(start, end)}
    if end < cfg.steps:
        return {**summary, "stopped_at": end}
    params = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(params, state.params)
    nnx.update(model, params)
    summary.update(metrics_lib.summarize(metrics_lib.read_metrics(metrics_path)))
    png = os.path.join(out, "loss.png")
    summary["plot"] = metrics_lib.plot_metrics(metrics_path, png, ("loss", "lr"))
    save_model(model, hf_dir := os.path.join(out, "hf"))  # transformers format
    if hasattr(tokenizer, "hf") and main:
        tokenizer.hf.save_pretrained(hf_dir)
    summary["hf_dir"] = hf_dir
    if cfg.data.source == SYNTHETIC and cfg.eval > 0:
        result = evaluate_arithmetic(model, tokenizer, cfg, records, mesh)
        _write_json(os.path.join(out, "eval.json"), result)
        summary["eval_accuracy"] = result["accuracy"]
        if main:
            print(f"held-out accuracy {result['accuracy']} on {result['num_prompts']} prompts")
    _write_json(os.path.join(out, "summary.json"), summary)
    return summary
