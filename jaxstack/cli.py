"""The `jaxstack` command.

    jaxstack rl [CONFIG.yaml] [key=value ...]        long-video RL (CoT-SFT, then GRPO): main job
    jaxstack sft [CONFIG.yaml] [key=value ...]       chain-of-thought SFT of the video VLM
    jaxstack data synth-video --out DIR --num N      synthetic long-video QA set (mp4 + JSONL)
    jaxstack train [CONFIG.yaml] [key=value ...]     causal-LM SFT / pre-training job
    jaxstack generate --model DIR --prompt TEXT ...  batched KV-cache generation
    jaxstack train-dllm [CONFIG.yaml] [key=value ...] diffusion LLM on sorting + sampler table
    jaxstack generate --dllm --model DIR ...         diffusion LLM with Fast-dLLM caches
    jaxstack train-dit [CONFIG.yaml] [key=value ...] text-to-image SANA DiT on captioned shapes
    jaxstack prune-dit [CONFIG.yaml] [key=value ...] block-importance pruning + fine-tune of it
    jaxstack sample-image --model DIR --prompt TEXT  images from a diffusers SanaPipeline folder

With no CONFIG, `rl` runs its embedded default (synthetic video QA, a tiny VLM through a short
CoT-SFT stage then GRPO, about 15 minutes on 2 CPU cores) and `train` its own (a tiny decoder learning addition from
scratch, a couple of minutes on a laptop CPU). Errors in user input (unknown config keys,
missing or corrupt checkpoints, bad values) print one line naming the problem and exit with
status 2; set JAXSTACK_DEBUG=1 for the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

# Files that make a folder a Hugging Face tokenizer (any one of them).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _job_config(cls, overrides_in: Sequence[str]):
    """Config of type `cls` from an optional leading YAML path plus dotted overrides."""
    from jaxstack.config import load_config

    config, overrides = None, list(overrides_in)
    if overrides and "=" not in overrides[0]:
        config = overrides.pop(0)
        if not os.path.isfile(config):
            raise FileNotFoundError(f"config file not found: {config}")
    return load_config(cls, config, overrides)


def _add_resume_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--no-resume", action="store_true", help="refuse to start if the run has checkpoints"
    )
    group.add_argument(
        "--force-resume",
        action="store_true",
        help="resume even if the config changed in result-changing keys (recorded in "
        "config_history.jsonl)",
    )


def _resume(args: argparse.Namespace) -> bool | str:
    return "force" if args.force_resume else not args.no_resume


def _sft(args: argparse.Namespace) -> int:
    from jaxstack.train.vlm_sft import VLMSFTConfig, run_vlm_sft

    cfg = _job_config(VLMSFTConfig, args.overrides)
    summary = run_vlm_sft(cfg, resume=_resume(args))
    line = f"done: {summary.get('step')} steps, output in {summary.get('output_dir')}"
    if summary.get("final_loss") is not None:
        line += f", final loss {summary['final_loss']:.4f}"
    if summary.get("eval_accuracy") is not None:
        line += f", held-out accuracy {summary['eval_accuracy']:.3f}"
    print(line)
    return 0


def _rl(args: argparse.Namespace) -> int:
    from jaxstack.rl.trainer import RLJobConfig, run_rl

    cfg = _job_config(RLJobConfig, args.overrides)
    summary = run_rl(cfg, resume=_resume(args))
    print(f"output in {summary['output_dir']}")
    sft, rl = summary.get("sft_accuracy"), summary.get("rl_accuracy")
    if sft is not None and rl is not None:
        print(f"accuracy: sft={sft:.3f} rl={rl:.3f}")
    return 0


def _synth_video(args: argparse.Namespace) -> int:
    from jaxstack.data.synth_video import run_synth_video

    return run_synth_video(args)


def _train(args: argparse.Namespace) -> int:
    from jaxstack.parallel.distributed import initialize
    from jaxstack.train.trainer import TrainJobConfig, run_train

    cfg = _job_config(TrainJobConfig, args.overrides)
    initialize()
    summary = run_train(cfg, resume=_resume(args))
    final = summary.get("final_loss")
    acc = summary.get("eval_accuracy")
    line = f"done: {summary.get('step', cfg.steps)} steps, output in {summary.get('output_dir')}"
    if final is not None:
        line += f", final loss {final:.4f}"
    if acc is not None:
        line += f", held-out accuracy {acc:.3f}"
    print(line)
    return 0


def _train_dllm(args: argparse.Namespace) -> int:
    from jaxstack.train.dllm_trainer import DLLMTrainConfig, run_dllm_train

    cfg = _job_config(DLLMTrainConfig, args.overrides)
    summary = run_dllm_train(cfg, resume=_resume(args))
    line = f"done: {summary.get('step')} steps, output in {summary.get('output_dir')}"
    if summary.get("final_loss") is not None:
        line += f", final loss {summary['final_loss']:.4f}"
    print(line)
    return 0


def _check_checkpoint(path: str, *, dllm: bool) -> None:
    """Raise CheckpointError unless `path` has a config.json of a supported architecture."""
    from jaxstack.hf import config_from_hf
    from jaxstack.hf.dllm import dllm_config_from_hf
    from jaxstack.hf.llm_config import read_hf_config

    parse = dllm_config_from_hf if dllm else config_from_hf
    parse(read_hf_config(path), source=os.path.join(path, "config.json"))


def _tokenizer_spec(model_dir: str, tokenizer: str | None) -> str:
    """--tokenizer if given; else the model folder if it holds tokenizer files; else the
    tokenizer a jaxstack training job recorded there (one with no HF files, e.g. "byte")."""
    if tokenizer:
        return tokenizer
    if any(os.path.isfile(os.path.join(model_dir, f)) for f in TOKENIZER_FILES):
        return model_dir
    from jaxstack.train.trainer import TOKENIZER_RECORD

    record = os.path.join(model_dir, TOKENIZER_RECORD)
    if not os.path.isfile(record):
        raise FileNotFoundError(
            f"{model_dir} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...): "
            "pass --tokenizer DIR (a tokenizer folder) or --tokenizer byte"
        )
    with open(record, encoding="utf-8") as f:
        data = json.load(f)
    spec = data.get("tokenizer") if isinstance(data, dict) else None
    if not isinstance(spec, str):
        raise ValueError(f'{record}: expected {{"tokenizer": NAME}}; pass --tokenizer')
    print(
        f"note: {model_dir} has no tokenizer files; its training job used the {spec!r} "
        f"tokenizer, which has none (recorded in {TOKENIZER_RECORD}): using it",
        file=sys.stderr,
    )
    return spec


def _generate(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from jaxstack import hf
    from jaxstack.data.tokenizer import load_tokenizer
    from jaxstack.generate import generate
    from jaxstack.parallel.distributed import initialize
    from jaxstack.parallel.mesh import make_mesh

    initialize()
    _check_checkpoint(args.model, dllm=args.dllm)  # before the tokenizer: clear errors first
    tokenizer = load_tokenizer(_tokenizer_spec(args.model, args.tokenizer))
    mesh = make_mesh(args.mesh) if args.mesh else None
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    prompts = list(args.prompt)
    if args.prompts_file:
        with open(args.prompts_file, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable) or --prompts-file FILE")
    if args.dllm:
        return _generate_dllm(args, tokenizer, prompts, dtype, mesh)
    model = hf.load_model(args.model, dtype=dtype, mesh=mesh)
    encoded = []
    for p in prompts:
        ids = tokenizer.encode(p)
        if getattr(tokenizer, "bos_id", None) is not None and not args.no_bos:
            ids = [tokenizer.bos_id, *ids]
        encoded.append(ids)
    stop = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    out = generate(
        model,
        encoded,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop_tokens=stop,
        pad_id=tokenizer.pad_id,
        seed=args.seed,
    )
    for prompt, toks in zip(prompts, out.tokens):
        text = tokenizer.decode([t for t in toks if t not in stop])
        print(f"{prompt}{text}")
    return 0


def _generate_dllm(args, tokenizer, prompts, dtype, mesh) -> int:
    """Diffusion-LLM generation (LLaDA / Dream), one prompt at a time as in Fast-dLLM."""
    from jaxstack.generate.dllm import dllm_generate
    from jaxstack.hf.dllm import load_dllm

    model, dcfg = load_dllm(args.model, dtype=dtype, mesh=mesh)
    for prompt in prompts:
        out = dllm_generate(
            model,
            [tokenizer.encode(prompt)],
            gen_length=args.max_new_tokens,
            block_length=args.block_length,
            steps=args.steps,
            threshold=args.threshold,
            factor=args.factor,
            cache=None if args.cache == "none" else args.cache,
            temperature=args.temperature,
            mask_id=dcfg.mask_id,
            kind=dcfg.kind,
            seed=args.seed,
        )
        toks = [int(t) for t in out.tokens[0]]
        toks = toks[: toks.index(dcfg.eos_id)] if dcfg.eos_id in toks else toks
        print(f"{prompt}{tokenizer.decode(toks)}")
        print(f"[nfe={out.nfe} tokens/step={out.tokens_per_step:.2f}]", file=sys.stderr)
    return 0


def _train_dit(args: argparse.Namespace) -> int:
    from jaxstack.train.dit_trainer import DiTTrainConfig, run_dit_train

    cfg = _job_config(DiTTrainConfig, args.overrides)
    summary = run_dit_train(cfg, resume=_resume(args))
    print(f"output in {summary['output_dir']} (samples: {summary.get('samples_png')})")
    before, after = summary.get("prompt_accuracy_step0"), summary.get("prompt_accuracy")
    if before is not None and after is not None:
        print(f"prompt accuracy: step0={before:.3f} final={after:.3f}")
    return 0


def _prune_dit(args: argparse.Namespace) -> int:
    from jaxstack.train.dit_prune import DiTPruneConfig, run_dit_prune

    cfg = _job_config(DiTPruneConfig, args.overrides)
    summary = run_dit_prune(cfg, resume=_resume(args))
    print(f"output in {summary['output_dir']} (dropped blocks: {summary.get('dropped_blocks')})")
    return 0


def _image_paths(out: str, count: int) -> list[str]:
    """`out` for one image; out_0.png, out_1.png, ... (stem_i + suffix) for several."""
    if count == 1:
        return [out]
    stem, ext = os.path.splitext(out)
    return [f"{stem}_{i}{ext or '.png'}" for i in range(count)]


def _sample_image(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from jaxstack.diffusion import save_images
    from jaxstack.hf import load_sana

    prompts = list(args.prompt)
    if not prompts:
        raise ValueError("no prompts: give --prompt TEXT (repeatable)")
    dtype = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[args.dtype]
    pipe = load_sana(args.model, dtype=dtype)
    images = pipe(
        prompts,
        negative_prompt=args.negative_prompt,
        height=args.height,
        width=args.width,
        steps=args.steps,
        guidance_scale=args.cfg,
        seed=args.seed,
        scheduler=args.scheduler,
        shift=args.shift,
    )
    for prompt, path in zip(prompts, save_images(images, _image_paths(args.out, len(prompts)))):
        print(f"{path}: {prompt}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxstack", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    overrides_help = "optional YAML config, then dotted overrides such as optim.lr=1e-3"
    rl = sub.add_parser("rl", help="long-video RL: CoT-SFT then GRPO/DAPO (the main job)")
    rl.add_argument("overrides", nargs="*", metavar="[CONFIG] key=value", help=overrides_help)
    _add_resume_flags(rl)
    rl.set_defaults(func=_rl)

    sft = sub.add_parser("sft", help="chain-of-thought SFT of the video VLM")
    sft.add_argument("overrides", nargs="*", metavar="[CONFIG] key=value", help=overrides_help)
    _add_resume_flags(sft)
    sft.set_defaults(func=_sft)

    data = sub.add_parser("data", help="dataset tools")
    data_sub = data.add_subparsers(dest="data_command", required=True)
    synth = data_sub.add_parser("synth-video", help="write a synthetic long-video QA set")
    from jaxstack.data.synth_video import add_synth_video_args

    add_synth_video_args(synth)
    synth.set_defaults(func=_synth_video)

    train = sub.add_parser("train", help="train a causal LM (SFT / from scratch)")
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="[CONFIG] key=value",
        help="optional YAML config, then dotted overrides such as optim.lr=1e-3",
    )
    _add_resume_flags(train)
    train.set_defaults(func=_train)

    tdl = sub.add_parser(
        "train-dllm", help="train a diffusion LLM, then compare Fast-dLLM samplers"
    )
    tdl.add_argument("overrides", nargs="*", metavar="[CONFIG] key=value", help=overrides_help)
    _add_resume_flags(tdl)
    tdl.set_defaults(func=_train_dllm)

    tdit = sub.add_parser(
        "train-dit", help="train a text-to-image SANA transformer (flow matching, CFG, judge)"
    )
    tdit.add_argument("overrides", nargs="*", metavar="[CONFIG] key=value", help=overrides_help)
    _add_resume_flags(tdit)
    tdit.set_defaults(func=_train_dit)

    pdit = sub.add_parser(
        "prune-dit",
        help="prune a train-dit model by block importance (SANA-1.5), fine-tune, judge again",
    )
    pdit.add_argument("overrides", nargs="*", metavar="[CONFIG] key=value", help=overrides_help)
    _add_resume_flags(pdit)
    pdit.set_defaults(func=_prune_dit)

    gen = sub.add_parser("generate", help="generate text from a transformers checkpoint")
    gen.add_argument("--model", required=True, help="transformers checkpoint directory")
    gen.add_argument(
        "--tokenizer",
        default=None,
        help='"byte" or a tokenizer dir (default: the model dir, or the tokenizer its '
        "training job recorded there)",
    )
    gen.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    gen.add_argument("--prompts-file", default=None, help="one prompt per line")
    gen.add_argument("--max-new-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    gen.add_argument("--mesh", default="", help='e.g. "tensor=2"; default one device')
    gen.add_argument("--no-bos", action="store_true", help="do not prepend the BOS token")
    dllm = gen.add_argument_group("diffusion LLMs (LLaDA, Dream) with Fast-dLLM decoding")
    dllm.add_argument("--dllm", action="store_true", help="the model is a diffusion LLM")
    dllm.add_argument("--block-length", type=int, default=32)
    dllm.add_argument("--steps", type=int, default=None, help="default: one token per step")
    dllm.add_argument("--threshold", type=float, default=None, help="parallel decoding tau")
    dllm.add_argument("--factor", type=float, default=None, help="factor-rule parallel decoding")
    dllm.add_argument("--cache", choices=["none", "prefix", "dual"], default="none")
    gen.set_defaults(func=_generate)

    img = sub.add_parser("sample-image", help="text-to-image from a diffusers SanaPipeline folder")
    img.add_argument("--model", required=True, help="diffusers SanaPipeline directory")
    img.add_argument("--prompt", action="append", default=[], help="prompt text (repeatable)")
    img.add_argument("--negative-prompt", default="", help='default ""')
    img.add_argument("--steps", type=int, default=20)
    img.add_argument("--cfg", type=float, default=4.5, help="guidance scale (<= 1: no CFG)")
    img.add_argument("--height", type=int, default=1024)
    img.add_argument("--width", type=int, default=1024)
    img.add_argument("--seed", type=int, default=0, help="image i uses fold_in(key(seed), i)")
    img.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    img.add_argument(
        "--scheduler",
        choices=["flow_dpm_solver", "flow_euler"],
        default=None,
        help="default: the pipeline's scheduler_config.json",
    )
    img.add_argument("--shift", type=float, default=None, help="default: the pipeline's")
    img.add_argument(
        "--out", default="image.png", help="PNG path; several prompts give OUT_0.png, OUT_1.png"
    )
    img.set_defaults(func=_sample_image)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from jaxstack.train.run_dir import RunLockedError

    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, KeyError, OSError, RunLockedError) as e:
        if os.environ.get("JAXSTACK_DEBUG"):
            raise
        message = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
