"""Train a diffusion LLM on a task with checkable answers, then compare Fast-dLLM samplers.

`jaxstack train-dllm [CONFIG] [k=v]` (`run_dllm_train(cfg)`) trains a LLaDA-style model with
the masked-diffusion SFT objective (`jaxstack.train.losses.diffusion_loss_sums`: prompt never
masked, loss per answer token weighted by 1/p_mask) on a synthetic task with checkable answers
(`data.task`: "sort" -- `jaxstack.data.synthetic.make_sorting_record` -- or "add", fixed-width
addition; every prompt and answer has a fixed length, so batches need no padding and generation
has static shapes). Answers are followed by EOS up to `data.gen_length`, as in LLaDA's SFT.

After training it answers held-out prompts with each sampler in `eval.samplers` and writes,
into `cfg.output_dir` (default `runs/<name>`): config.yaml, metrics.jsonl, loss.png,
checkpoints/<step>/ (exact resume), model/ (LLaDA checkpoint layout, `jaxstack.hf.load_dllm`;
usable with `jaxstack generate --dllm`), eval.json (per sampler: accuracy, NFE, tokens per
step, wall time, throughput, speed-up over the baseline, sample answers), samplers.png and
summary.json.

Sampler names: a cache part ("baseline" = no cache | "prefix" | "dual") and/or a decoding part
("parallel" = threshold rule at eval.threshold | "factor" = factor rule at eval.factor), joined
by "+", e.g. "dual+parallel"; "parallel" alone = no cache with threshold decoding. Without a
decoding part a sampler commits one token per step (LLaDA's baseline schedule).
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from typing import Any, ClassVar

import jax
import numpy as np
from flax import nnx

from jaxstack.data import synthetic
from jaxstack.models.dllm import DLLMConfig
from jaxstack.models.llm import LLM
from jaxstack.parallel.mesh import init_sharded
from jaxstack.train import metrics as metrics_lib
from jaxstack.train import step as step_lib
from jaxstack.train.loop import LoopParts, RunConfig, run_loop, write_json
from jaxstack.train.losses import make_diffusion_loss
from jaxstack.train.sections import DTYPES, NumericsSection
from jaxstack.train.step import OptimConfig

BATCH_KEYS = ("input_ids", "prompt_mask", "t", "mask_u")
CACHE_PARTS = {"baseline": None, "prefix": "prefix", "dual": "dual"}
DECODE_PARTS = ("parallel", "factor")


@dataclasses.dataclass(frozen=True)
class Task:
    """A synthetic task with checkable fixed-length answers: make(rng, data section) -> record,
    score(prompt, generated) -> bool, partial(prompt, generated) -> float in [0, 1] (per number
    for sorting, per digit for addition), and the data fields that key its random streams."""

    make: Any
    score: Any
    partial: Any
    stream_fields: tuple[str, ...]


TASKS = {
    "sort": Task(
        make=lambda rng, c: synthetic.make_sorting_record(rng, c.count, c.max_value),
        score=synthetic.score_sorting,
        partial=synthetic.sorting_position_accuracy,
        stream_fields=("count", "max_value"),
    ),
    "add": Task(
        make=lambda rng, c: synthetic.make_addition_record(rng, c.digits),
        score=synthetic.score_addition,
        partial=synthetic.addition_digit_accuracy,
        stream_fields=("digits",),
    ),
}


@dataclasses.dataclass
class DLLMModelSection(NumericsSection):
    """name: a diffusion-LLM preset ("llada-100m", "tiny-llada", ...: trained from scratch with
    the vocabulary resized to the tokenizer's plus one [MASK] id) or a LLaDA / Dream checkpoint
    directory (fine-tuned; its own mask id). dtype / param_dtype / remat: `NumericsSection`."""

    name: str = "llada-small"


@dataclasses.dataclass
class TaskDataSection:
    """Problems drawn fresh for every step (a pure function of (seed, step)); the answer plus
    EOS padding fills gen_length tokens. task "sort": `count` integers in [0, max_value];
    task "add": two `digits`-digit operands (`jaxstack.data.synthetic`)."""

    tokenizer: str = "byte"
    task: str = "sort"
    count: int = 6
    max_value: int = 99
    digits: int = 8
    gen_length: int = 24
    batch_size: int = 64
    seed: int = 0

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"data.task must be one of {list(TASKS)}, got {self.task!r}")
        if min(self.count, self.max_value, self.digits, self.batch_size) < 1:
            raise ValueError(
                "data.count, data.max_value, data.digits and data.batch_size must be >= 1"
            )


@dataclasses.dataclass
class DLLMEvalSection:
    """num held-out prompts answered by every sampler, `batch` prompts per call; block_length:
    semi-autoregressive block; threshold / factor: parallel-decoding parameters. Each sampler
    is run once untimed on the first batch (compilation) before the timed pass."""

    num: int = 64
    batch: int = 64
    block_length: int = 8
    threshold: float = 0.9
    factor: float = 1.0
    samplers: list[str] = dataclasses.field(
        default_factory=lambda: [
            "baseline",
            "prefix",
            "dual",
            "parallel",
            "prefix+parallel",
            "dual+parallel",
        ]
    )

    def __post_init__(self):
        if self.num < 0 or self.batch < 1:
            raise ValueError("eval.num must be >= 0 and eval.batch >= 1")
        for name in self.samplers:
            sampler_settings(name, self)  # raises on a bad name


@dataclasses.dataclass
class DLLMTrainConfig(RunConfig):
    """A diffusion-LLM training job. optim.total_steps = 0 means "= steps"; mesh e.g. "data=2"
    ("" = data parallel over all devices)."""

    RESUME_FREE: ClassVar[tuple[str, ...]] = (*RunConfig.RESUME_FREE, "eval")

    name: str = "dllm_sort_tiny"
    model: DLLMModelSection = dataclasses.field(default_factory=DLLMModelSection)
    data: TaskDataSection = dataclasses.field(default_factory=TaskDataSection)
    eval: DLLMEvalSection = dataclasses.field(default_factory=DLLMEvalSection)
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=50, total_steps=0)
    )
    steps: int = 600
    checkpoint_every: int = 200
    keep_checkpoints: int = 2
    log_every: int = 10


def sampler_settings(name: str, ev: DLLMEvalSection) -> dict[str, Any]:
    """`dllm_generate` keyword arguments (cache, threshold, factor) of a sampler name."""
    parts = name.split("+")
    cache_parts = [p for p in parts if p in CACHE_PARTS]
    decode_parts = [p for p in parts if p in DECODE_PARTS]
    if not parts or len(cache_parts) > 1 or len(decode_parts) > 1:
        raise ValueError(f"bad sampler {name!r}: expected [baseline|prefix|dual][+parallel|factor]")
    if len(cache_parts) + len(decode_parts) != len(parts):
        bad = [p for p in parts if p not in CACHE_PARTS and p not in DECODE_PARTS]
        raise ValueError(
            f"bad sampler {name!r}: unknown part(s) {bad}; cache parts {list(CACHE_PARTS)}, "
            f"decoding parts {list(DECODE_PARTS)}"
        )
    kw: dict[str, Any] = {"cache": CACHE_PARTS[cache_parts[0]] if cache_parts else None}
    if decode_parts == ["parallel"]:
        kw["threshold"] = ev.threshold
    elif decode_parts == ["factor"]:
        kw["factor"] = ev.factor
    return kw


# -- model and data ----------------------------------------------------------------------------


def build_dllm(cfg: DLLMModelSection, tokenizer: Any, mesh, seed: int) -> tuple[LLM, DLLMConfig]:
    """(model with every parameter in its sharding on `mesh`, its DLLMConfig)."""
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    if os.path.isdir(cfg.name):
        from jaxstack.hf.dllm import load_dllm

        model, dcfg = load_dllm(cfg.name, dtype=dtype, param_dtype=param_dtype, mesh=mesh)
        if dcfg.llm.vocab_size < tokenizer.vocab_size:
            raise ValueError(
                f"tokenizer has {tokenizer.vocab_size} tokens but {cfg.name!r} only "
                f"{dcfg.llm.vocab_size}: use the checkpoint's own tokenizer (data.tokenizer)"
            )
        return model, dcfg
    base = DLLMConfig.preset(cfg.name)
    vocab = tokenizer.vocab_size + 1  # the tokenizer's ids plus [MASK]
    dcfg = DLLMConfig(
        dataclasses.replace(base.llm, vocab_size=vocab),
        kind=base.kind,
        mask_id=tokenizer.vocab_size,
        eos_id=tokenizer.eos_id,
        pad_id=tokenizer.eos_id,
    )
    make = lambda: LLM(
        dcfg.llm, dtype=dtype, param_dtype=param_dtype, remat=cfg.remat, rngs=nnx.Rngs(seed)
    )
    return init_sharded(make, mesh), dcfg


class TaskBatches:
    """Fixed-shape masked-diffusion batches of the data section's task; batch(i) is a pure
    function of (data config, i), so a resumed run sees the same batches.

    batch(i): input_ids int32 [B, Lp + G] (prompt, answer, EOS padding), prompt_mask bool
    [B, Lp + G], and the loss noise t float32 [B], mask_u float32 [B, Lp + G].
    """

    def __init__(self, cfg: TaskDataSection, tokenizer: Any):
        self.cfg, self.tok, self.task = cfg, tokenizer, TASKS[cfg.task]
        sample = self.task.make(random.Random(0), cfg)
        self.prompt_len = len(tokenizer.encode(sample["prompt"]))
        answer_len = len(tokenizer.encode(sample["response"]))
        if answer_len > cfg.gen_length:
            raise ValueError(
                f"data.gen_length={cfg.gen_length} is shorter than the answers ({answer_len} "
                f"tokens for task {cfg.task!r}); raise it"
            )
        self.seq_len = self.prompt_len + cfg.gen_length

    def encode(self, record: dict) -> list[int]:
        """Prompt ids + answer ids + EOS up to gen_length (checks the fixed lengths)."""
        prompt, answer = self.tok.encode(record["prompt"]), self.tok.encode(record["response"])
        if len(prompt) != self.prompt_len or len(answer) > self.cfg.gen_length:
            raise ValueError(f"record does not have the task's fixed lengths: {record}")
        return prompt + answer + [self.tok.eos_id] * (self.cfg.gen_length - len(answer))

    def records(self, stream: str, index: int, n: int) -> list[dict]:
        c = self.cfg
        key = ":".join(str(getattr(c, f)) for f in ("seed", *self.task.stream_fields))
        tag = "" if c.task == "sort" else f"{c.task}:"  # sorting keeps its original streams
        rng = random.Random(f"{stream}:{tag}{key}:{index}")
        return [self.task.make(rng, c) for _ in range(n)]

    def batch(self, i: int) -> dict[str, np.ndarray]:
        b = self.cfg.batch_size
        ids = np.asarray([self.encode(r) for r in self.records("train", i, b)], np.int32)
        prompt_mask = np.zeros(ids.shape, bool)
        prompt_mask[:, : self.prompt_len] = True
        noise = np.random.default_rng([self.cfg.seed, i, 7])
        return dict(
            input_ids=ids,
            prompt_mask=prompt_mask,
            t=noise.random(b, dtype=np.float32),
            mask_u=noise.random(ids.shape, dtype=np.float32),
        )

    def held_out(self, n: int) -> list[dict]:
        """`n` evaluation problems from a stream disjoint from the training stream's seeds."""
        return self.records("eval", 0, n)


# -- evaluation --------------------------------------------------------------------------------


def evaluate_samplers(
    model: LLM,
    dcfg: DLLMConfig,
    data: TaskBatches,
    ev: DLLMEvalSection,
    *,
    progress: bool = True,
) -> dict[str, Any]:
    """Answer `ev.num` held-out problems with every sampler; accuracy, NFE, speed per sampler.

    tokens_per_step = generated tokens per row / forwards (a batch shares its forwards, so
    with parallel decoding a batch needs as many steps as its slowest row); throughput counts
    generated non-EOS tokens over the timed wall time, as Fast-dLLM reports it.
    """
    from jaxstack.generate.dllm import dllm_generate

    records = data.held_out(ev.num)
    if not records:
        return {"samplers": {}}
    gen = data.cfg.gen_length
    block = min(ev.block_length, gen)
    prompts = np.asarray([data.tok.encode(r["prompt"]) for r in records], np.int32)
    chunks = [prompts[i : i + ev.batch] for i in range(0, len(records), ev.batch)]
    results: dict[str, Any] = {}
    bar = metrics_lib.progress_bar(len(ev.samplers) * len(chunks), desc="eval samplers")
    for name in ev.samplers:
        kw = dict(
            gen_length=gen,
            block_length=block,
            mask_id=dcfg.mask_id,
            kind=dcfg.kind,
            **sampler_settings(name, ev),
        )
        jax.block_until_ready(dllm_generate(model, chunks[0], **kw).tokens)  # compile
        tokens, nfe, t0 = [], 0, time.perf_counter()
        for chunk in chunks:
            out = dllm_generate(model, chunk, **kw)
            tokens.append(np.asarray(out.tokens))  # host copy: the call has finished
            nfe += out.nfe
            bar.update(1)
        seconds = time.perf_counter() - t0
        toks = np.concatenate(tokens)
        texts = [data.tok.decode([int(t) for t in row if t < data.tok.vocab_size]) for row in toks]
        correct = [data.task.score(r["prompt"], t) for r, t in zip(records, texts)]
        answer_tokens = int(np.sum(toks != dcfg.eos_id))
        results[name] = dict(
            **{k: v for k, v in kw.items() if k in ("cache", "threshold", "factor")},
            accuracy=float(np.mean(correct)),
            position_accuracy=float(
                np.mean([data.task.partial(r["prompt"], t) for r, t in zip(records, texts)])
            ),
            nfe=nfe,
            tokens_per_step=gen * len(chunks) / nfe,
            seconds=seconds,
            tokens_per_second=answer_tokens / seconds,
            samples=[
                dict(prompt=r["prompt"], answer=r["response"], generated=t, correct=c)
                for r, t, c in list(zip(records, texts, correct))[:8]
            ],
        )
    bar.close()
    base = results.get("baseline")
    for r in results.values():
        r["speedup_vs_baseline"] = base["seconds"] / r["seconds"] if base else None
    return dict(
        num=len(records),
        batch=ev.batch,
        gen_length=gen,
        block_length=block,
        device=jax.devices()[0].device_kind,
        samplers=results,
    )


def plot_samplers(result: dict, png_path: str) -> str | None:
    """Bar charts of accuracy, tokens per step and throughput per sampler."""
    rows = result.get("samplers") or {}
    if not rows or jax.process_index() != 0:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(rows)
    panels = (
        ("accuracy", "held-out accuracy"),
        ("tokens_per_step", "tokens / step"),
        ("tokens_per_second", "tokens / s"),
    )
    fig = Figure(figsize=(4 * len(panels), 3.2))
    FigureCanvasAgg(fig)
    for ax, (key, label) in zip(fig.subplots(1, len(panels)), panels):
        ax.bar(range(len(names)), [rows[n][key] for n in names], color="tab:blue")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    return png_path


# -- job ---------------------------------------------------------------------------------------


def build_dllm_train(cfg: DLLMTrainConfig, mesh) -> LoopParts:
    """The dLLM job's parts for `run_loop`: model, task batches (noise drawn per step from
    (seed, i)), the masked-diffusion loss; at the end the LLaDA/Dream export and the sampler
    comparison (eval.json, samplers.png)."""
    from jaxstack.data.tokenizer import load_tokenizer
    from jaxstack.hf.dllm import save_dllm

    out, main = cfg.output_dir, jax.process_index() == 0
    tok = load_tokenizer(cfg.data.tokenizer)
    data = TaskBatches(cfg.data, tok)
    model, dcfg = build_dllm(cfg.model, tok, mesh, cfg.seed)
    cfg.model.apply_precision(model)
    optimizer = step_lib.make_optimizer(cfg.optim, cfg.model.precision)
    state, shardings = step_lib.init_train_state(model, optimizer, mesh)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    loss = make_diffusion_loss(dcfg.kind, dcfg.mask_id)
    train_step = step_lib.make_train_step(
        graphdef, rest, optimizer, loss_sums=loss, mesh=mesh, state_sh=shardings
    )

    def finish(state, summary: dict) -> dict:
        params = nnx.state(model, nnx.Param)
        nnx.replace_by_pure_dict(params, state.params)
        nnx.update(model, params)
        save_dllm(model, dcfg, model_dir := os.path.join(out, "model"))
        extra: dict[str, Any] = {"model_dir": model_dir}
        if cfg.eval.num > 0:
            result = evaluate_samplers(model, dcfg, data, cfg.eval)
            write_json(os.path.join(out, "eval.json"), result)
            extra["sampler_plot"] = plot_samplers(result, os.path.join(out, "samplers.png"))
            extra["eval"] = {
                name: {k: r[k] for k in ("accuracy", "tokens_per_step", "speedup_vs_baseline")}
                for name, r in result["samplers"].items()
            }
            if main:
                print(format_eval_table(result))
        return extra

    return LoopParts(
        state=state,
        shardings=shardings,
        step=lambda state, _, i: train_step(state, step_lib.place_batch(mesh, data.batch(i))),
        finish=finish,
    )


def run_dllm_train(
    cfg: DLLMTrainConfig, *, resume: bool | str = True, stop_after: int | None = None
) -> dict:
    """Run (or resume) the job on the shared loop; returns a summary dict (also summary.json).

    stop_after: stop right after that global step as if killed (tests resumption).
    """
    return run_loop(
        cfg,
        lambda mesh: build_dllm_train(cfg.resolved(), mesh),
        resume=resume,
        stop_after=stop_after,
    )


def format_eval_table(result: dict) -> str:
    """A plain-text table of the per-sampler results."""
    lines = [
        f"{result['num']} held-out prompts, gen length {result['gen_length']}, "
        f"block {result['block_length']}, batch {result['batch']}",
        f"{'sampler':<18}{'accuracy':>9}{'partial':>9}{'tok/step':>10}{'tok/s':>10}{'speedup':>9}",
    ]
    for name, r in result["samplers"].items():
        speed = r["speedup_vs_baseline"]
        lines.append(
            f"{name:<18}{r['accuracy']:>9.3f}{r.get('position_accuracy', float('nan')):>9.3f}"
            f"{r['tokens_per_step']:>10.2f}"
            f"{r['tokens_per_second']:>10.1f}{'' if speed is None else f'{speed:.2f}x':>9}"
        )
    return "\n".join(lines)
