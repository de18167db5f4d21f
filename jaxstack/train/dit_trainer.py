"""The text-to-image diffusion-transformer job (`jaxstack train-dit`) on the shared loop.

SANA's recipe (../shared/specs/sana.md §5): the flow-matching objective with logit-normal
timesteps and a flow shift (`jaxstack/train/flow_matching.py`), caption dropout to a learned
null caption for classifier-free guidance, AdamW or CAME / CAME-8bit
(`jaxstack/train/came.py`). The embedded default trains a tiny SANA transformer in pixel space
on captioned shapes (`jaxstack/data/shapes.py`: 48 captions, 8 held out of training) with a
learned word-embedding caption encoder (`jaxstack/models/text_to_image.py`), then samples every
held-out prompt with Flow-DPM-Solver and guidance and reads the images back with the
programmatic judge: `prompt accuracy: step0=<x> final=<y>` (step0 is the same initialisation,
untrained), best-of-N with the judge as verifier against one sample, and a sample grid PNG.

Artifacts in `output_dir`: config.yaml, metrics.jsonl, loss.png, checkpoints/, samples/ (grids
during training when `sampling.grid_every` > 0), samples.png (held-out prompts at the end),
eval.json, summary.json.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxstack.data import shapes
from jaxstack.diffusion.scaling import tournament_pick
from jaxstack.models.sana import SanaConfig
from jaxstack.models.text_to_image import WordCaptionDiT
from jaxstack.parallel.mesh import init_sharded, shard_model
from jaxstack.train import step as step_lib
from jaxstack.train.came import came
from jaxstack.train.flow_matching import flow_matching_loss_sums, flow_train_tables
from jaxstack.train.loop import LoopParts, RunConfig, run_loop, write_json
from jaxstack.train.metrics import show_in_notebook
from jaxstack.train.sections import NumericsSection
from jaxstack.train.step import OptimConfig

OPTIMIZERS = ("adamw", "came", "came8bit")


@dataclasses.dataclass
class DiTModelSection(NumericsSection):
    """name: a `SanaConfig` preset (its in/out channels must be 3: pixel space)."""

    name: str = "tiny-shapes"


@dataclasses.dataclass
class ShapesDataSection:
    """Captioned shapes: image_size px, batch_size images per step, held_out captions kept out
    of training; caption_dropout: probability of the null caption (CFG); shift: the flow
    shift of training and sampling."""

    image_size: int = 32
    batch_size: int = 32
    held_out: int = 8
    caption_dropout: float = 0.1
    shift: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.image_size < 8 or self.batch_size < 1 or not 0 <= self.caption_dropout < 1:
            raise ValueError(
                "data: need image_size >= 8, batch_size >= 1 and 0 <= caption_dropout < 1"
            )
        if self.shift <= 0:
            raise ValueError(f"data.shift must be > 0, got {self.shift}")


@dataclasses.dataclass
class SamplingSection:
    """Evaluation sampling: `steps` solver steps of `scheduler` with CFG scale `guidance`;
    per_prompt images per held-out prompt; best_of: N of the best-of-N comparison (0: skip);
    grid_every: a sample grid every that many steps during training (0: only at the end)."""

    steps: int = 20
    scheduler: str = "flow_dpm_solver"
    guidance: float = 3.0
    per_prompt: int = 4
    best_of: int = 8
    grid_every: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.per_prompt < 1 or self.best_of < 0 or self.grid_every < 0:
            raise ValueError("sampling: need steps >= 1, per_prompt >= 1, best_of/grid_every >= 0")


@dataclasses.dataclass
class DiTTrainConfig(RunConfig):
    """A text-to-image DiT job. optimizer: "adamw" (optim.*), "came" or "came8bit" (optim.lr,
    warmup, schedule, weight_decay and clip_norm apply; CAME's betas are its own)."""

    RESUME_FREE: ClassVar[tuple[str, ...]] = (*RunConfig.RESUME_FREE, "sampling")

    name: str = "dit_shapes_tiny"
    model: DiTModelSection = dataclasses.field(default_factory=DiTModelSection)
    data: ShapesDataSection = dataclasses.field(default_factory=ShapesDataSection)
    sampling: SamplingSection = dataclasses.field(default_factory=SamplingSection)
    optimizer: str = "adamw"
    came8bit_min_size: int = 16384  # CAME-8bit quantizes matrices with more elements than this
    optim: OptimConfig = dataclasses.field(
        default_factory=lambda: OptimConfig(lr=1e-3, warmup_steps=50, weight_decay=0.0)
    )
    steps: int = 3000
    checkpoint_every: int = 1000
    log_every: int = 25

    def __post_init__(self):
        super().__post_init__()
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.model.precision != "bf16":
            raise ValueError(f"model.precision={self.model.precision!r}: train-dit has no FP8 path")


def make_dit_optimizer(
    name: str, cfg: OptimConfig, min_8bit_size: int = 16384
) -> optax.GradientTransformation:
    """AdamW (`step.make_optimizer`) or CAME / CAME-8bit with the same schedule and clipping."""
    if name == "adamw":
        return step_lib.make_optimizer(cfg)
    return optax.chain(
        optax.clip_by_global_norm(cfg.clip_norm),
        came(
            step_lib.learning_rate_schedule(cfg),
            weight_decay=cfg.weight_decay,
            eight_bit=name == "came8bit",
            min_8bit_size=min_8bit_size,
        ),
    )


def build_dit(cfg: DiTModelSection, image_size: int, mesh, seed: int) -> WordCaptionDiT:
    """The word-conditioned SANA transformer of the model section, placed on `mesh`."""
    scfg = SanaConfig.preset(cfg.name)
    if scfg.in_channels != 3 or scfg.out_channels != 3:
        raise ValueError(f"model.name={cfg.name!r} is not a pixel-space preset (3 channels)")
    if image_size % scfg.patch_size:
        raise ValueError(f"data.image_size={image_size} not divisible by patch {scfg.patch_size}")
    make = lambda: WordCaptionDiT(
        scfg,
        len(shapes.VOCAB),
        shapes.CAPTION_LEN,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.master_dtype,
        remat=cfg.remat,
        rngs=nnx.Rngs(seed),
    )
    return init_sharded(make, mesh)


class ShapeBatches:
    """batch(i): a pure function of (data config, i), so a resumed run sees the same batches.

    image float32 [B, 3, S, S] in [-1, 1]; ids int32 [B, L] caption words; eps float32 noise
    like image; t int32 [B] logit-normal training timesteps; drop bool [B] (null caption).
    """

    def __init__(self, cfg: ShapesDataSection):
        self.cfg = cfg
        self.train, self.held_out = shapes.split_captions(cfg.held_out, cfg.seed)

    def batch(self, i: int) -> dict[str, np.ndarray]:
        c = self.cfg
        rng = np.random.default_rng([c.seed, i, 11])
        captions = [self.train[j] for j in rng.integers(0, len(self.train), c.batch_size)]
        images = np.stack([shapes.draw_shape(cap, c.image_size, rng) for cap in captions])
        image = images.astype(np.float32).transpose(0, 3, 1, 2) / 127.5 - 1.0
        u = 1.0 / (1.0 + np.exp(-rng.standard_normal(c.batch_size)))  # logit-normal
        return dict(
            image=image,
            ids=np.stack([shapes.tokenize_caption(cap) for cap in captions]),
            eps=rng.standard_normal(image.shape).astype(np.float32),
            t=np.minimum(np.floor(u * 1000), 999).astype(np.int32),
            drop=rng.random(c.batch_size) < c.caption_dropout,
        )


def flow_objective(graphdef, rest, shift: float):
    """objective(params, batch, frozen) -> (loss sum, examples, {}) of SANA's flow matching."""
    alpha_tab, sigma_tab, model_t_tab = (jnp.asarray(a) for a in flow_train_tables(shift))

    def objective(params, batch, _frozen):
        model = nnx.merge(graphdef, params, rest)
        x0, eps, t = batch["image"], batch["eps"], batch["t"]
        alpha, sigma = alpha_tab[t][:, None, None, None], sigma_tab[t][:, None, None, None]
        caption, mask = model.encode(batch["ids"])
        null, _ = model.null(caption.shape[0])
        caption = jnp.where(batch["drop"][:, None, None], null, caption)
        v = model(alpha * x0 + sigma * eps, model_t_tab[t], (caption, mask))
        total, count = flow_matching_loss_sums(v, eps - x0)
        return total, count, {}

    return objective


CAPTION_FILE = "caption_encoder.safetensors"


def save_word_caption_dit(model: WordCaptionDiT, path: str) -> None:
    """`path`/transformer (diffusers `SanaTransformer2DModel` folder) + `path`/CAPTION_FILE
    (the word table and the null caption, float32)."""
    from safetensors.numpy import save_file

    from jaxstack.hf import save_sana_transformer

    save_sana_transformer(model.dit, os.path.join(path, "transformer"))
    tensors = {
        "words": np.asarray(model.words.embedding[...], np.float32),
        "null_caption": np.asarray(model.null_caption[...], np.float32),
    }
    save_file(tensors, os.path.join(path, CAPTION_FILE))


def load_word_caption_dit(
    path: str, *, dtype=jnp.float32, param_dtype=jnp.float32, mesh=None, remat: str = "none"
) -> WordCaptionDiT:
    """The model `save_word_caption_dit` wrote: compute in `dtype`, parameters stored in
    `param_dtype` (cast from the files' float32), placed on `mesh` (None: first device)."""
    from safetensors.numpy import load_file

    from jaxstack.hf import load_sana_transformer

    dit = load_sana_transformer(
        os.path.join(path, "transformer"),
        dtype=dtype,
        param_dtype=param_dtype,
        mesh=mesh,
        remat=remat,
    )
    tensors = load_file(os.path.join(path, CAPTION_FILE))
    words, null = tensors["words"], tensors["null_caption"]
    model = nnx.eval_shape(
        lambda: WordCaptionDiT(
            dit.cfg,
            words.shape[0],
            null.shape[0],
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=nnx.Rngs(0),
        )
    )
    model.dit = dit
    model.words.embedding.set_value(jnp.asarray(words, param_dtype))
    model.null_caption.set_value(jnp.asarray(null, param_dtype))
    return model if mesh is None else shard_model(model, mesh)


# -- sampling and judging ----------------------------------------------------------------------


def generate_images(
    model: WordCaptionDiT, captions: list[str], seeds: list[int], s: SamplingSection, cfg
) -> np.ndarray:
    """uint8 [len(captions), S, S, 3]: image k of captions[k] from noise seed seeds[k]."""
    from jaxstack.diffusion import initial_latents, sample

    size = cfg.image_size
    key = jax.random.key(cfg.seed + 1)
    noise = jnp.concatenate(
        [initial_latents(key, 1, 3, size, size, start=int(seed)) for seed in seeds]
    )
    cond = model.encode(np.stack([shapes.tokenize_caption(c) for c in captions]))
    x = sample(
        model,
        noise,
        cond=cond,
        uncond=model.null(len(captions)),
        guidance_scale=s.guidance,
        steps=s.steps,
        scheduler=s.scheduler,
        shift=cfg.shift,
    )
    x = np.asarray(jnp.clip(x, -1, 1))
    return np.round((x.transpose(0, 2, 3, 1) + 1) * 127.5).astype(np.uint8)


def evaluate_prompts(model, captions: list[str], s: SamplingSection, data_cfg) -> dict[str, Any]:
    """Judge `per_prompt` samples of every caption (accuracy per attribute and overall), and,
    when s.best_of > 0, the tournament's pick of `best_of` samples against the first sample."""
    n = max(s.per_prompt, s.best_of)
    caps = [c for c in captions for _ in range(n)]
    seeds = [k for _ in captions for k in range(n)]
    images = []
    for lo in range(0, len(caps), 64):
        images.append(generate_images(model, caps[lo : lo + 64], seeds[lo : lo + 64], s, data_cfg))
    images = np.concatenate(images)
    verdicts = [shapes.judge(img, cap) for img, cap in zip(images, caps)]
    per = [verdicts[i * n : i * n + s.per_prompt] for i in range(len(captions))]
    flat = [v for group in per for v in group]
    out: dict[str, Any] = {
        "accuracy": float(np.mean([v["all"] for v in flat])),
        **{k: float(np.mean([v[k] for v in flat])) for k in ("colour", "shape", "position")},
        "num_prompts": len(captions),
        "per_prompt": s.per_prompt,
    }
    if s.best_of > 0:
        picked, first = [], []
        for i in range(len(captions)):
            group = verdicts[i * n : i * n + s.best_of]
            score = [(v["colour"] + v["shape"] + v["position"]) / 3 for v in group]
            picked.append(group[tournament_pick([v["all"] for v in group], score)]["all"])
            first.append(group[0]["all"])
        out.update(best_of=s.best_of, best_of_accuracy=float(np.mean(picked)))
        out["one_sample_accuracy"] = float(np.mean(first))
    out["grid"] = images[::n][: len(captions)]  # the first sample of each caption
    return out


def save_grid(images: np.ndarray, path: str, cols: int = 8) -> str:
    """Tile uint8 [N, S, S, 3] images into one PNG (2 px white gaps)."""
    import matplotlib.pyplot as plt

    n, s = images.shape[0], images.shape[1]
    rows = math.ceil(n / cols)
    grid = np.full((rows * (s + 2), cols * (s + 2), 3), 255, np.uint8)
    for k, img in enumerate(images):
        r, c = divmod(k, cols)
        grid[r * (s + 2) : r * (s + 2) + s, c * (s + 2) : c * (s + 2) + s] = img
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    plt.imsave(path, grid)
    return path


# -- job ---------------------------------------------------------------------------------------


def build_dit_train(cfg: DiTTrainConfig, mesh) -> LoopParts:
    """The DiT job's parts for `run_loop`: model, shape batches, the flow-matching update; at
    the end the held-out evaluation (untrained init vs trained), best-of-N and sample grids."""
    out, main = cfg.output_dir, jax.process_index() == 0
    data = ShapeBatches(cfg.data)
    model = build_dit(cfg.model, cfg.data.image_size, mesh, cfg.seed)
    optimizer = make_dit_optimizer(cfg.optimizer, cfg.optim, cfg.came8bit_min_size)
    state, shardings = step_lib.init_train_state(model, optimizer, mesh)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    update = step_lib.make_update(
        flow_objective(graphdef, rest, cfg.data.shift),
        optimizer,
        mesh=mesh,
        state_sh=shardings,
    )
    grid_s = dataclasses.replace(cfg.sampling, per_prompt=1, best_of=0)

    def model_with(params) -> WordCaptionDiT:
        return nnx.merge(graphdef, params, rest)

    def step(state, _, i):
        every = cfg.sampling.grid_every
        if every and i % every == 0 and main:
            res = evaluate_prompts(model_with(state.params), data.held_out, grid_s, cfg.data)
            save_grid(res["grid"], os.path.join(out, "samples", f"step{i:06d}.png"))
        return update(state, step_lib.place_batch(mesh, data.batch(i)), None)

    def finish(state, summary: dict) -> dict:
        s = cfg.sampling
        model_dir = os.path.join(out, "model")
        if main:
            save_word_caption_dit(model_with(state.params), model_dir)
        start = build_dit(cfg.model, cfg.data.image_size, mesh, cfg.seed)  # the same init
        before = evaluate_prompts(start, data.held_out, dataclasses.replace(s, best_of=0), cfg.data)
        after = evaluate_prompts(model_with(state.params), data.held_out, s, cfg.data)
        grid = save_grid(after.pop("grid"), os.path.join(out, "samples.png"))
        before.pop("grid")
        train_s = dataclasses.replace(s, best_of=0, per_prompt=1)
        seen = evaluate_prompts(model_with(state.params), data.train, train_s, cfg.data)
        seen.pop("grid")
        result = {"held_out": data.held_out, "step0": before, "final": after, "train": seen}
        write_json(os.path.join(out, "eval.json"), result)
        show_in_notebook(grid)
        if main:
            print(
                f"held-out colour/shape/position: {after['colour']:.2f} / {after['shape']:.2f}"
                f" / {after['position']:.2f}; training prompts {seen['accuracy']:.3f}"
            )
            if s.best_of:
                print(
                    f"best-of-{s.best_of} (judge tournament): {after['best_of_accuracy']:.3f} vs "
                    f"one sample {after['one_sample_accuracy']:.3f}"
                )
        return {
            "model_dir": model_dir,
            "samples_png": grid,
            "prompt_accuracy_step0": before["accuracy"],
            "prompt_accuracy": after["accuracy"],
            "best_of_accuracy": after.get("best_of_accuracy"),
        }

    return LoopParts(state=state, shardings=shardings, step=step, finish=finish)


def run_dit_train(
    cfg: DiTTrainConfig, *, resume: bool | str = True, stop_after: int | None = None
) -> dict:
    """Run (or resume) the job on the shared loop; returns the summary (also summary.json)."""
    return run_loop(
        cfg,
        lambda mesh: build_dit_train(cfg.resolved(), mesh),
        resume=resume,
        stop_after=stop_after,
    )
