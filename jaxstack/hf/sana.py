"""Load and save whole SANA pipelines in diffusers' `SanaPipeline` folder layout.

pipe = load_sana("Sana_1600M_1024px_diffusers", dtype=jnp.bfloat16)   # -> SanaPipeline
save_sana(pipe, "runs/x/sana")    # diffusers.SanaPipeline.from_pretrained("runs/x/sana") loads it

A pipeline folder holds model_index.json and one folder per component:

    transformer/   SanaTransformer2DModel   (`load_sana_transformer`)
    vae/           AutoencoderDC            (`load_dcae`)
    text_encoder/  Gemma2Model              (`load_model`, base-model layout)
    tokenizer/     a transformers tokenizer (AutoTokenizer, local files only)
    scheduler/     scheduler_config.json: DPMSolverMultistepScheduler with use_flow_sigmas and
                   prediction_type "flow_prediction" (-> "flow_dpm_solver", shift = flow_shift)
                   or FlowMatchEulerDiscreteScheduler (-> "flow_euler", shift = shift)

Scheduler options that would change the sampler (Karras / exponential / beta sigmas, dynamic
shifting, thresholding, a solver other than 2M midpoint DPM-Solver++, ...) are refused rather
than silently ignored. Every problem is a `CheckpointError` whose one-line message names the
folder or file.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxstack.diffusion.pipeline import SanaPipeline
from jaxstack.hf.dcae import load_dcae, save_dcae
from jaxstack.hf.errors import CheckpointError
from jaxstack.hf.llm import load_model, save_model
from jaxstack.hf.sana_transformer import load_sana_transformer, save_sana_transformer

MODEL_INDEX = "model_index.json"
SCHEDULER_CONFIG = "scheduler_config.json"
PIPELINE_CLASS = "SanaPipeline"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
DIFFUSERS_VERSION = "0.42.1"  # the version this layout was verified against
DPM_CLASS = "DPMSolverMultistepScheduler"
EULER_CLASS = "FlowMatchEulerDiscreteScheduler"

# Scheduler settings jaxstack's samplers implement: key -> (diffusers default, required value).
# A config may omit a key (diffusers' default applies) or give the required value.
_DPM_REQUIRED: dict[str, tuple[Any, Any]] = {
    "use_flow_sigmas": (False, True),
    "prediction_type": ("epsilon", "flow_prediction"),
    "solver_order": (2, 2),
    "algorithm_type": ("dpmsolver++", "dpmsolver++"),
    "solver_type": ("midpoint", "midpoint"),
    "final_sigmas_type": ("zero", "zero"),
    "thresholding": (False, False),
    "use_karras_sigmas": (False, False),
    "use_exponential_sigmas": (False, False),
    "use_beta_sigmas": (False, False),
    "use_lu_lambdas": (False, False),
    "use_dynamic_shifting": (False, False),
    "num_train_timesteps": (1000, 1000),
}
_EULER_REQUIRED: dict[str, tuple[Any, Any]] = {
    "use_dynamic_shifting": (False, False),
    "invert_sigmas": (False, False),
    "shift_terminal": (None, None),
    "use_karras_sigmas": (False, False),
    "use_exponential_sigmas": (False, False),
    "use_beta_sigmas": (False, False),
    "stochastic_sampling": (False, False),
    "num_train_timesteps": (1000, 1000),
}
_SCHEDULERS = {  # diffusers class -> (jaxstack name, shift key, default shift, requirements)
    DPM_CLASS: ("flow_dpm_solver", "flow_shift", 1.0, _DPM_REQUIRED),
    EULER_CLASS: ("flow_euler", "shift", 1.0, _EULER_REQUIRED),
}
_CLASS_OF = {name: cls for cls, (name, *_) in _SCHEDULERS.items()}

__all__ = ["load_sana", "read_scheduler_config", "save_sana", "scheduler_config_for"]


def _read_json(file: str) -> dict[str, Any]:
    if not os.path.isfile(file):
        raise CheckpointError(f"{file}: file not found")
    try:
        with open(file) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{file}: expected a JSON object")
    return data


def read_scheduler_config(path: str | os.PathLike) -> tuple[str, float, dict[str, Any]]:
    """(scheduler name, shift, raw config) of a diffusers scheduler folder (or its
    scheduler_config.json); CheckpointError for unsupported classes or settings."""
    path = os.fspath(path)
    file = path if path.endswith(".json") else os.path.join(path, SCHEDULER_CONFIG)
    raw = _read_json(file)
    cls = raw.get("_class_name")
    if cls not in _SCHEDULERS:
        raise CheckpointError(
            f"{file}: unsupported scheduler {cls!r}; supported: {tuple(_SCHEDULERS)}"
        )
    name, shift_key, default_shift, required = _SCHEDULERS[cls]
    for key, (default, want) in required.items():
        got = raw.get(key, default)
        if got != want:
            raise CheckpointError(
                f"{file}: {cls} with {key}={got!r} is not supported (jaxstack's {name!r} "
                f"sampler needs {key}={want!r})"
            )
    shift = raw.get(shift_key, default_shift)
    if not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
        raise CheckpointError(f"{file}: {shift_key}={shift!r} must be a positive number")
    return name, float(shift), raw


def scheduler_config_for(
    scheduler: str, shift: float, base: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The diffusers scheduler config of ("flow_dpm_solver" | "flow_euler", shift): `base` with
    its shift replaced when it names the same class, else a minimal config of that class."""
    if scheduler not in _CLASS_OF:
        raise ValueError(f"unknown scheduler {scheduler!r}; expected one of {tuple(_CLASS_OF)}")
    cls = _CLASS_OF[scheduler]
    _, shift_key, _, required = _SCHEDULERS[cls]
    if base is not None and base.get("_class_name") == cls:
        out = dict(base)
    else:
        out = {"_class_name": cls, **{k: want for k, (_, want) in required.items()}}
        if cls == DPM_CLASS:
            out["lower_order_final"] = True
    out[shift_key] = float(shift)
    out.setdefault("_diffusers_version", DIFFUSERS_VERSION)
    return out


def _load_tokenizer(path: str):
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - transformers is a dependency
        raise CheckpointError(f"{path}: loading the tokenizer needs transformers ({e})") from None
    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; report one line
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: cannot load the tokenizer ({message})") from None
    if tok.pad_token_id is None:
        raise CheckpointError(f"{path}: the tokenizer has no padding token")
    return tok


def _component_dirs(path: str) -> dict[str, str]:
    """Component name -> folder, after checking model_index.json and the folders exist."""
    if not os.path.isdir(path):
        raise CheckpointError(f"pipeline directory {path!r} does not exist")
    index_file = os.path.join(path, MODEL_INDEX)
    index = _read_json(index_file)
    name = index.get("_class_name")
    if name != PIPELINE_CLASS:
        warnings.warn(
            f"{index_file}: _class_name {name!r} is not {PIPELINE_CLASS!r}; loading its "
            "components as a SanaPipeline",
            stacklevel=3,
        )
    dirs = {}
    for comp in COMPONENTS:
        folder = os.path.join(path, comp)
        if comp not in index:
            raise CheckpointError(f"{index_file}: no {comp!r} component listed")
        if not os.path.isdir(folder):
            raise CheckpointError(f"{folder}: component folder {comp}/ is missing")
        dirs[comp] = folder
    return dirs


def load_sana(
    path: str | os.PathLike,
    *,
    dtype: Any = jnp.bfloat16,
    mesh: Mesh | None = None,
) -> SanaPipeline:
    """`SanaPipeline` from a diffusers SanaPipeline folder (see the module docstring).

    dtype: compute and parameter dtype of the transformer, the autoencoder and the text
    encoder (cast from the files' dtype). mesh: parameters placed by their logical axes
    (None: first local device). The CHI is diffusers' default (`DEFAULT_CHI`). Raises
    CheckpointError (one line naming the folder / file) for a missing or unusable component,
    an unsupported scheduler or components that do not fit together.
    """
    path = os.fspath(path)
    dirs = _component_dirs(path)
    scheduler, shift, scheduler_config = read_scheduler_config(dirs["scheduler"])
    tokenizer = _load_tokenizer(dirs["tokenizer"])
    transformer = load_sana_transformer(dirs["transformer"], dtype=dtype, mesh=mesh)
    vae = load_dcae(dirs["vae"], dtype=dtype, mesh=mesh)
    text_encoder = load_model(dirs["text_encoder"], dtype=dtype, mesh=mesh)
    tcfg = transformer.cfg
    if text_encoder.cfg.hidden_size != tcfg.caption_channels:
        raise CheckpointError(
            f"{os.path.join(dirs['text_encoder'], 'config.json')}: hidden_size "
            f"{text_encoder.cfg.hidden_size} != the transformer's caption_channels "
            f"{tcfg.caption_channels}"
        )
    if vae.cfg.latent_channels != tcfg.in_channels:
        raise CheckpointError(
            f"{os.path.join(dirs['vae'], 'config.json')}: latent_channels "
            f"{vae.cfg.latent_channels} != the transformer's in_channels {tcfg.in_channels}"
        )
    if len(tokenizer) > text_encoder.cfg.vocab_size:
        warnings.warn(
            f"{dirs['tokenizer']}: {len(tokenizer)} tokens but the text encoder's vocab_size is "
            f"{text_encoder.cfg.vocab_size}",
            stacklevel=2,
        )
    return SanaPipeline(
        transformer=transformer,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        shift=shift,
        scheduler_config=scheduler_config,
    )


def _library_entry(obj: Any) -> list[str]:
    return [type(obj).__module__.split(".")[0], type(obj).__name__]


def save_sana(pipe: SanaPipeline, path: str | os.PathLike, *, dtype: Any = None) -> None:
    """Write `pipe` as a diffusers SanaPipeline folder (model_index.json, scheduler config,
    tokenizer files, transformer/vae/text_encoder weights) that
    `diffusers.SanaPipeline.from_pretrained(path)` loads.

    dtype: storage dtype of the weights (e.g. jnp.bfloat16); default each parameter's own.
    The scheduler config is the one read by `load_sana` with the pipeline's shift (or a
    minimal one when the scheduler was changed). With several processes every process must
    call this (parameters are gathered); process 0 writes the non-weight files.
    """
    path = os.fspath(path)
    save_sana_transformer(pipe.transformer, os.path.join(path, "transformer"), dtype=dtype)
    save_dcae(pipe.vae, os.path.join(path, "vae"), dtype=dtype)
    save_model(pipe.text_encoder, os.path.join(path, "text_encoder"), dtype=dtype, base_model=True)
    if jax.process_index() != 0:
        return
    pipe.tokenizer.save_pretrained(os.path.join(path, "tokenizer"))
    sched = scheduler_config_for(pipe.scheduler, pipe.shift, pipe.scheduler_config)
    os.makedirs(os.path.join(path, "scheduler"), exist_ok=True)
    with open(os.path.join(path, "scheduler", SCHEDULER_CONFIG), "w") as f:
        json.dump(sched, f, indent=2, sort_keys=True)
    index = {
        "_class_name": PIPELINE_CLASS,
        "_diffusers_version": DIFFUSERS_VERSION,
        "scheduler": ["diffusers", sched["_class_name"]],
        "text_encoder": ["transformers", "Gemma2Model"],
        "tokenizer": _library_entry(pipe.tokenizer),
        "transformer": ["diffusers", "SanaTransformer2DModel"],
        "vae": ["diffusers", "AutoencoderDC"],
    }
    with open(os.path.join(path, MODEL_INDEX), "w") as f:
        json.dump(index, f, indent=2, sort_keys=True)
