"""SFT / causal-LM training job: config -> sharded model -> exact-resume loop -> artifacts.

`run_train(cfg)` writes into `cfg.output_dir` (default `runs/<name>`): config.yaml (resolved),
metrics.jsonl, loss.png, checkpoints/<step>/, hf/ (transformers format), eval.json (held-out
generations, accuracy) and summary.json. Re-running a config resumes from its newest checkpoint
and reproduces the uninterrupted run exactly: batch i is a pure function of (data config, i)
and the state is restored bit for bit.

With `lora.rank` > 0 only LoRA adapters train (`jaxstack/lora/adapters.py`) and the export is
adapter/ (PEFT layout, `jaxstack/hf/peft.py`), plus hf/ with the merged weights when
`lora.merge` is set and base/ (the frozen base) when the model is a preset, not a checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from typing import Any, ClassVar

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxstack.models.llm import LLM, LLMConfig
from jaxstack.parallel.mesh import init_sharded, use_mesh
from jaxstack.train import step as step_lib
from jaxstack.train.loop import LoopParts, RunConfig, run_loop, write_json
from jaxstack.train.sections import DTYPES, LoRASection, NumericsSection
from jaxstack.train.step import OptimConfig

SYNTHETIC = "synthetic:arithmetic"
BATCH_KEYS = ("input_ids", "targets", "segment_ids", "loss_mask")  # what the loss reads
TOKENIZER_RECORD = "jaxstack_tokenizer.json"  # in hf/ when the tokenizer has no HF files


@dataclasses.dataclass
class ModelSection(NumericsSection):
    """name: a preset ("tiny", "qwen2.5-0.5b", ...; trained from scratch with the tokenizer's
    vocab) or a transformers checkpoint directory (fine-tuned). dtype / param_dtype / remat:
    `NumericsSection` (compute dtype, master weights, activation checkpointing)."""

    name: str = "tiny"


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

    def __post_init__(self):
        for key in ("seq_len", "batch_size", "grad_accum", "num_records", "max_digits"):
            if getattr(self, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(self, key)}")
        if self.batch_size % self.grad_accum:
            raise ValueError(
                f"data.batch_size={self.batch_size} is not divisible by "
                f"data.grad_accum={self.grad_accum}"
            )


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
class TrainJobConfig(RunConfig):
    """One training job. optim.total_steps = 0 means "= steps" (the cosine spans the run);
    mesh: e.g. "fsdp=4,tensor=2" or "data=2,sequence=4" ("" = data parallel over all devices);
    sequence_parallel: how attention runs when the mesh has sequence > 1; lora: LoRA
    fine-tuning (rank 0 = off)."""

    RESUME_FREE: ClassVar[tuple[str, ...]] = (
        *RunConfig.RESUME_FREE,
        "eval",
        "max_new_tokens",
        "lora.merge",
    )
    RESUME_WARN: ClassVar[tuple[str, ...]] = (*RunConfig.RESUME_WARN, "sequence_parallel")

    name: str = "train_tiny"
    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=1e-2, warmup_steps=20, total_steps=0)
    )
    steps: int = 1500
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 5
    sequence_parallel: SequenceParallelSection = dataclasses.field(
        default_factory=SequenceParallelSection
    )
    eval: int = 128  # held-out synthetic prompts answered (greedy) at the end; 0 = skip
    max_new_tokens: int = 6
    lora: LoRASection = dataclasses.field(default_factory=LoRASection)

    def __post_init__(self):
        super().__post_init__()
        if self.eval < 0 or self.max_new_tokens < 1:
            raise ValueError("eval must be >= 0 and max_new_tokens >= 1")


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


def lora_train_step(model: LLM, cfg: TrainJobConfig, optimizer, mesh: Mesh):
    """(step(state, batch), state, shardings) training only LoRA adapters added to `model`.

    `jaxstack.lora.apply_lora` with `cfg.lora` (A drawn from seed + 1, B zero); the TrainState
    holds the adapters alone (`LORA_PARAMS`) and the base parameters are the frozen argument
    of `jaxstack.train.step.make_update` (no gradients, optimizer state or checkpoint
    entries). A batch with "lora_seeds" (uint32 [B], `jaxstack.lora.dropout_row_seeds`)
    switches the adapters' dropout on for that step. With `lora.sparse` the decoder blocks
    become SparseLoRA blocks (`jaxstack/lora/sparse.py`); a batch with "sparse_tokens" (any
    [B, m] array) runs its first m positions sparse (one compiled program per m).
    """
    from jaxstack.lora import BASE_PARAMS, LORA_PARAMS, apply_lora, set_dropout_seeds

    apply_lora(model, cfg.lora.config(), rngs=cfg.seed + 1, mesh=mesh)
    if (sparse := cfg.lora.sparse.config()) is not None:  # SparseLoRA blocks, before the split
        from jaxstack.lora.sparse import apply_sparselora
        from jaxstack.lora.svd_estimator import load_estimator

        path = cfg.lora.sparse.estimator
        apply_sparselora(model, sparse, load_estimator(path) if path else None)
    state, shardings = step_lib.init_train_state(model, optimizer, mesh, trainable=LORA_PARAMS)
    graphdef, frozen, rest = step_lib.split_frozen(model, LORA_PARAMS)
    frozen = nnx.to_pure_dict(frozen)
    frozen_sh = None if shardings is None else step_lib.param_shardings(model, mesh, BASE_PARAMS)

    def objective(params, micro, frozen):
        lora_model = step_lib.merge_trainable(graphdef, params, frozen, rest)
        if "lora_seeds" in micro:
            set_dropout_seeds(lora_model, micro["lora_seeds"])
        if "sparse_tokens" in micro:  # its static width is the sparse context length
            from jaxstack.lora.sparse import set_sparse_tokens

            set_sparse_tokens(lora_model, micro["sparse_tokens"].shape[1])
        total, count = step_lib.lm_loss_sums(lora_model, micro)
        return total, count, {}

    update = step_lib.make_update(
        objective,
        optimizer,
        grad_accum=cfg.data.grad_accum,
        mesh=mesh,
        state_sh=shardings,
        frozen_sh=frozen_sh,
    )
    return (lambda state, batch: update(state, batch, frozen)), state, shardings


def export_lora(model: LLM, cfg: TrainJobConfig, save_tokenizer) -> dict:
    """Write the trained adapters as a PEFT folder (adapter/), the merged model (hf/, with
    `lora.merge`) and, for a preset base, the frozen base weights (base/) the adapter refers
    to; save_tokenizer(dir) adds the tokenizer to a model folder. Returns summary fields."""
    from jaxstack.hf import save_model
    from jaxstack.hf.peft import save_merged_model, save_peft_adapter
    from jaxstack.lora import remove_lora

    out = cfg.output_dir
    extra: dict[str, Any] = {}
    if os.path.isdir(cfg.model.name):
        base = os.path.abspath(cfg.model.name)
    else:  # a preset: its (random) base weights exist only in this run
        save_model(remove_lora(model), base := os.path.abspath(os.path.join(out, "base")))
        save_tokenizer(base)
        extra["base_dir"] = base
    adapter_dir = os.path.join(out, "adapter")
    save_peft_adapter(model, adapter_dir, base_model_name_or_path=base)
    extra["adapter_dir"] = adapter_dir
    if cfg.lora.sparse.enabled and jax.process_index() == 0:  # the estimator, by the adapter
        from jaxstack.lora.sparse import model_estimator
        from jaxstack.lora.svd_estimator import save_estimator

        extra["sparselora_estimator"] = save_estimator(model_estimator(model), adapter_dir)
    if cfg.lora.merge:
        save_merged_model(model, hf_dir := os.path.join(out, "hf"))
        save_tokenizer(hf_dir)
        extra["hf_dir"] = hf_dir
    return extra


def build_train(cfg: TrainJobConfig, mesh: Mesh) -> LoopParts:
    """The LM job's parts for `run_loop`: model, packed SFT batches, the token-sum loss step
    (over all parameters, or LoRA adapters only: `lora_train_step`); at the end the
    transformers export (with the tokenizer; `export_lora` with LoRA) and the arithmetic
    evaluation."""
    from jaxstack.data.tokenizer import load_tokenizer
    from jaxstack.hf import save_model

    out, main = cfg.output_dir, jax.process_index() == 0
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    model = build_model(cfg.model, tokenizer.vocab_size, mesh, cfg.seed)
    if cfg.data.seq_len > (max_pos := model.cfg.max_position_embeddings):
        warnings.warn(
            f"data.seq_len={cfg.data.seq_len} exceeds the model's max_position_embeddings="
            f"{max_pos}: positions past it are untrained",
            stacklevel=2,
        )
    data, records = build_data(cfg.data, tokenizer)
    cfg.model.apply_precision(model)
    optimizer = step_lib.make_optimizer(cfg.optim, cfg.model.precision)
    lora = cfg.lora.config()
    if lora is None:
        trainable = nnx.Param
        state, shardings = step_lib.init_train_state(model, optimizer, mesh)
        graphdef, _, rest = nnx.split(model, nnx.Param, ...)
        train_step = step_lib.make_train_step(
            graphdef, rest, optimizer, grad_accum=cfg.data.grad_accum, mesh=mesh, state_sh=shardings
        )
    else:
        from jaxstack.lora import LORA_PARAMS, dropout_row_seeds

        trainable = LORA_PARAMS
        train_step, state, shardings = lora_train_step(model, cfg, optimizer, mesh)
    window = [time.perf_counter(), 0]  # (time, step) of the last log: tokens/s over the window

    def step(state, batch, i):
        host = {k: batch[k] for k in BATCH_KEYS}
        if lora is not None and lora.dropout:  # masks drawn per (seed, step, row)
            host["lora_seeds"] = dropout_row_seeds(cfg.seed, i, len(host["input_ids"]))
        if lora is not None and (m := cfg.lora.sparse.tokens(host["loss_mask"], i, cfg.steps)):
            host["sparse_tokens"] = np.zeros((len(host["input_ids"]), m), np.int8)
        batch = step_lib.place_batch(mesh, host)
        # The step is traced, and its attention routed, on its first call.
        with cfg.sequence_parallel.context():
            return train_step(state, batch)

    def log_row(step_no: int, m: dict) -> dict:
        seconds, window[0] = time.perf_counter() - window[0], time.perf_counter()
        done, window[1] = step_no - max(window[1], 0), step_no
        speed = done * cfg.data.batch_size * cfg.data.seq_len / seconds
        return dict(loss_tokens=int(m["tokens"]), tokens_per_s=speed)

    def batches(start: int, end: int):
        window[:] = [time.perf_counter(), start]
        return data.iterate(start, end)

    def save_tokenizer(model_dir: str) -> None:
        if hasattr(tokenizer, "hf") and main:
            tokenizer.hf.save_pretrained(model_dir)
        elif main:  # no HF files for the byte tokenizer: record it for `jaxstack generate`
            write_json(os.path.join(model_dir, TOKENIZER_RECORD), {"tokenizer": cfg.data.tokenizer})

    def finish(state, summary: dict) -> dict:
        params = nnx.state(model, trainable)
        nnx.replace_by_pure_dict(params, state.params)
        nnx.update(model, params)
        extra: dict[str, Any] = {}
        if lora is None:
            save_model(model, hf_dir := os.path.join(out, "hf"))  # transformers format
            save_tokenizer(hf_dir)
            extra["hf_dir"] = hf_dir
        else:
            extra.update(export_lora(model, cfg, save_tokenizer))
            extra["lora_params"] = sum(x.size for x in jax.tree.leaves(state.params))
        if cfg.data.source == SYNTHETIC and cfg.eval > 0:
            result = evaluate_arithmetic(model, tokenizer, cfg, records, mesh)
            write_json(os.path.join(out, "eval.json"), result)
            extra["eval_accuracy"] = result["accuracy"]
            if main:
                print(f"held-out accuracy {result['accuracy']} on {result['num_prompts']} prompts")
        return extra

    return LoopParts(
        state=state,
        shardings=shardings,
        step=step,
        batches=batches,
        log_row=log_row,
        finish=finish,
    )


def run_train(
    cfg: TrainJobConfig, *, resume: bool | str = True, stop_after: int | None = None
) -> dict:
    """Run (or resume) the job on the shared loop (`jaxstack.train.loop.run_loop`); returns a
    summary dict (also written to summary.json).

    resume: continue from the newest checkpoint in output_dir ("force" accepts a changed
    config, False refuses to start if one exists). stop_after: stop right after global step
    `stop_after` as if killed (no final checkpoint, export or eval), to test resumption. A
    NaN/inf loss raises NonFiniteLossError naming the step; the bad state is not saved,
    earlier checkpoints and metrics stay.
    """
    return run_loop(
        cfg, lambda mesh: build_train(cfg.resolved(), mesh), resume=resume, stop_after=stop_after
    )
