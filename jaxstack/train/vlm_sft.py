"""Chain-of-thought SFT of the NVILA VLM on video multiple-choice QA (`jaxstack sft`).

`run_vlm_sft(cfg)` writes into `cfg.output_dir` (default `runs/<name>`): config.yaml,
metrics.jsonl, loss.png, checkpoints/<step>/ (exact resume), model/ (NVILA checkpoint layout,
loadable with `jaxstack.hf.load_nvila`), eval.json (held-out greedy answers and accuracy) and
summary.json. With `data.synth_num > 0` and no `train.jsonl` in `data.dir`, the synthetic
long-video QA set is generated there first.

The LLM and projector are trained; the vision tower too unless `model.freeze_vision` (then it
is outside the training state: no gradients, optimizer moments or checkpoint entries). The
loop is the shared one (`jaxstack.train.loop`); the video-QA pieces the RL job shares live in
`jaxstack.train.video_qa`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import jax
from flax import nnx

from jaxstack.models.vlm import NVILA, VLMConfig
from jaxstack.parallel.mesh import init_sharded
from jaxstack.train import step as step_lib
from jaxstack.train.loop import LoopParts, RunConfig, run_loop, write_json
from jaxstack.train.losses import vlm_loss_sums
from jaxstack.train.sections import DTYPES, NumericsSection
from jaxstack.train.step import OptimConfig
from jaxstack.train.video_qa import VideoDataSection, ensure_dataset, evaluate_video_qa

BATCH_KEYS = ("input_ids", "targets", "loss_mask", "frames")


@dataclasses.dataclass
class VLMModelSection(NumericsSection):
    """name: a VLM preset ("tiny-video", "tiny", "nvila-8b": random init, for the byte tokenizer
    or shapes) or an NVILA checkpoint directory (`jaxstack.hf.load_nvila` layout).
    freeze_vision: train the LLM and projector only (the tower gets no gradients, no optimizer
    state and no checkpoint entries)."""

    name: str = "tiny-video"
    freeze_vision: bool = False


@dataclasses.dataclass
class VLMSFTConfig(RunConfig):
    """A VLM SFT job. optim.total_steps = 0 means "= steps"; eval: held-out records answered
    (greedy) at the end, 0 = skip; mesh e.g. "data=2" ("" = data parallel over all devices)."""

    RESUME_FREE: ClassVar[tuple[str, ...]] = (
        *RunConfig.RESUME_FREE,
        "eval",
        "eval_batch",
        "max_new_tokens",
    )

    name: str = "vlm_sft_tiny"
    model: VLMModelSection = dataclasses.field(default_factory=VLMModelSection)
    data: VideoDataSection = dataclasses.field(default_factory=VideoDataSection)
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=3e-3, warmup_steps=20, total_steps=0)
    )
    steps: int = 300
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    log_every: int = 5
    eval: int = 160
    eval_batch: int = 80
    max_new_tokens: int = 88

    def __post_init__(self):
        super().__post_init__()
        if self.eval_batch < 1 or self.eval < 0 or self.max_new_tokens < 1:
            raise ValueError("eval_batch and max_new_tokens must be >= 1, eval >= 0")


# -- model -------------------------------------------------------------------------------------


def build_vlm(cfg: VLMModelSection, vocab_size: int, mesh, seed: int) -> NVILA:
    """NVILA created (or loaded) with every parameter placed in its sharding on `mesh`."""
    dtype, param_dtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
    if os.path.isdir(cfg.name):
        from jaxstack.hf import load_nvila

        model = load_nvila(cfg.name, dtype=dtype, mesh=mesh)
        vcfg = model.cfg
    else:
        vcfg = VLMConfig.preset(cfg.name)
        if vcfg.llm.vocab_size < vocab_size:
            raise ValueError(
                f"tokenizer has {vocab_size} tokens but preset {cfg.name!r} only "
                f"{vcfg.llm.vocab_size}"
            )
        make = lambda: NVILA(
            vcfg, dtype=dtype, param_dtype=param_dtype, remat=cfg.remat, rngs=nnx.Rngs(seed)
        )
        model = init_sharded(make, mesh)
    if cfg.freeze_vision != vcfg.freeze_vision:
        model.cfg = dataclasses.replace(vcfg, freeze_vision=cfg.freeze_vision)
    return model


def build_vlm_sft(cfg: VLMSFTConfig, mesh) -> LoopParts:
    """The VLM SFT job's parts for `run_loop`: NVILA, video-QA batches (bad videos skipped and
    counted across resumes), the token-sum loss over the trainable params (all, or all but the
    tower with `model.freeze_vision`); at the end the NVILA export and the held-out evaluation."""
    from jaxstack.data.tokenizer import load_tokenizer
    from jaxstack.data.video_qa import VideoQABatches, VideoSpec, read_video_qa
    from jaxstack.hf import save_nvila
    from jaxstack.models.vlm import trainable_filter

    out, main = cfg.output_dir, jax.process_index() == 0
    tok = load_tokenizer(cfg.data.tokenizer)
    model = build_vlm(cfg.model, tok.vocab_size, mesh, cfg.seed)
    train_path, eval_path = ensure_dataset(cfg.data)
    video = VideoSpec(num_frames=cfg.data.num_frames, image_size=cfg.data.image_size)
    data = VideoQABatches(
        read_video_qa(train_path),
        tok,
        media_token_id=model.cfg.media_token_id,
        num_media=model.cfg.video_length(video.num_frames),
        video=video,
        batch_size=cfg.data.batch_size,
        seq_len=cfg.data.seq_len,
        seed=cfg.data.seed,
    )
    trainable = trainable_filter(model.cfg)
    cfg.model.apply_precision(model)
    optimizer = step_lib.make_optimizer(cfg.optim, cfg.model.precision)
    state, shardings = step_lib.init_train_state(model, optimizer, mesh, trainable=trainable)
    graphdef, frozen, rest = step_lib.split_frozen(model, trainable)

    def objective(params, micro, frozen):
        total, count = vlm_loss_sums(
            step_lib.merge_trainable(graphdef, params, frozen, rest), micro
        )
        return total, count, {}

    update = step_lib.make_update(objective, optimizer, mesh=mesh, state_sh=shardings)

    def step(state, _, i):
        host = data.batch(i)
        return update(state, step_lib.place_batch(mesh, {k: host[k] for k in BATCH_KEYS}), frozen)

    def restore_counters(saved: dict) -> None:
        data.skipped = int(saved.get("skipped_videos", 0))

    def finish(state, summary: dict) -> dict:
        params = nnx.state(model, trainable)
        nnx.replace_by_pure_dict(params, state.params)
        nnx.update(model, params)
        save_nvila(model, model_dir := os.path.join(out, "model"))
        extra: dict[str, Any] = {"model_dir": model_dir, "skipped_videos": data.skipped}
        if cfg.eval > 0 and os.path.isfile(eval_path):
            held = read_video_qa(eval_path)[: cfg.eval]
            result = evaluate_video_qa(
                model, tok, held, video, batch=cfg.eval_batch, max_new_tokens=cfg.max_new_tokens
            )
            write_json(os.path.join(out, "eval.json"), result)
            extra["eval_accuracy"] = result["accuracy"]
            extra["eval_format_rate"] = result["format_rate"]
            extra["eval_per_task"] = result["per_task"]
            if main:
                print(
                    f"held-out accuracy {result['accuracy']:.3f} on {result['num']} questions "
                    f"(chance {1 / len(held[0]['options']):.2f}), per task {result['per_task']}"
                )
        return extra

    return LoopParts(
        state=state,
        shardings=shardings,
        step=step,
        counters=lambda: {"skipped_videos": data.skipped},
        restore_counters=restore_counters,
        finish=finish,
    )


def run_vlm_sft(
    cfg: VLMSFTConfig, *, resume: bool | str = True, stop_after: int | None = None
) -> dict:
    """Run (or resume) the SFT job on the shared loop; returns a summary dict (also
    summary.json). stop_after: stop right after that global step as if killed (tests
    resumption)."""
    return run_loop(
        cfg, lambda mesh: build_vlm_sft(cfg.resolved(), mesh), resume=resume, stop_after=stop_after
    )
