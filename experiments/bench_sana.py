"""SANA text-to-image end to end: jaxstack vs diffusers, same shapes, random bf16 weights.

One image generation = text encoding + denoising + DC-AE decoding, as `SanaPipeline` does it
(specs/sana.md §4, §6): 1024 x 1024 px (DC-AE f32c32 latent 32 x 32 x 32), 20 Flow-DPM-Solver++
steps (flow_shift 3.0), classifier-free guidance 4.5 batched negative-first (2B transformer
rows per step), for the Sana-0.6B and Sana-1.6B shapes at batch 1 and 4. Both sides build the
SAME configs (`SanaConfig.to_diffusers_config()`, `DCAEConfig.to_diffusers_config()`,
transformers `Gemma2Config()` defaults == `LLMConfig.preset("gemma-2-2b")`) with random weights
stored and computed in bf16. jaxstack draws every floating parameter from N(0, 0.02) (one small
jitted draw per distinct shape: `random_state`); diffusers / transformers keep their own init and
refill with N(0, 0.02) every floating parameter that init leaves all zero (zero-initialised
output projections, biases, Gemma's (1 + w) norms), so no matrix product runs on zeros.

Text inputs (both sides, the same token ids): 2B rows of `--text-tokens` (300) tokens, the B
negative rows first (BOS then padding: the encoded "" of the pipeline) and the B prompt rows
(BOS + 199 random tokens, right padding), encoded in ONE text-encoder call on 2B rows. (The
real pipelines encode the prompt with its Complex Human Instruction prefix, ~550 tokens before
truncation to 300, in a call of its own; that is not modelled: no tokenizer here.)

What is timed (medians of `--repeats` calls after warm-up; compile excluded, reported apart).
e2e on both sides = token ids on the device -> the pipeline's float32 images [B, H, W, 3] in
[0, 1] on the host (jaxstack output_type="float" == diffusers output_type="np").

jaxstack (experiments/timing.py `timed`: `jax.block_until_ready` on the result), through the
product's `jaxstack.diffusion.SanaPipeline` built from the random models:
  text_encode  `nnx.jit(LLM.hidden_states)(ids [2B, L])`, the pipeline's text-encoder call (a
               causal decoder without padding mask; equal to transformers' at real tokens)
  denoise      `jaxstack.diffusion.sample(SanaVelocity(transformer), noise, cond, uncond,
               guidance_scale=4.5, steps=20, scheduler="flow_dpm_solver", shift=3.0)`, as the
               pipeline calls it (one jit of the 20-step scan + the host-side `nnx.split`)
  decode       `SanaPipeline.decode(z)`: DC-AE decode of z / scaling_factor, float32 on device
  e2e          text_encode, then `SanaPipeline(prompt_embeds=, prompt_mask=,
               negative_prompt_embeds=, negative_mask=, height=1024, width=1024, steps=20,
               guidance_scale=4.5, output_type="float")` (initial_latents, sample, decode,
               device -> host, post-processing)
diffusers (torch eager, CUDA events around the region, `torch.inference_mode`):
  e2e          `Gemma2Model(ids, attention_mask=mask)[0]` on the 2B rows (the pipeline's own
               text-encoder call), then `SanaPipeline(prompt_embeds=, prompt_attention_mask=,
               negative_prompt_embeds=, negative_prompt_attention_mask=, num_inference_steps=20,
               guidance_scale=4.5, height=1024, width=1024, output_type="np",
               use_resolution_binning=False)`: its own latents, DPMSolverMultistepScheduler(
               flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"),
               transformer loop, `vae.decode(latents / scaling_factor)`, post-processing
  text_encode / pipeline   the two parts of each e2e call (events in between)
  decode       `AutoencoderDC.decode(z / scaling_factor)` alone, timed apart (denoise is
               reported as pipeline - decode, "derived")
images/s = B / e2e median; ratio = jaxstack images/s / diffusers images/s.

Plus (jaxstack only, if budget remains) the Sana-1.6B denoiser at 4x the image side (4096 px:
latent 128 x 128 = 16,384 tokens), batch 1, CFG, `--hires-steps` steps, flow_shift 6.0, random
caption embeddings; reported as seconds per step (the 4K checkpoints' sin-cos positional
embedding, one add, is not modelled: the preset has none).

Cases run in the order (batch 1: 0.6b, 1.6b), (batch 4: 0.6b, 1.6b), hires; each side of each
case is wrapped in try/except and the JSON is rewritten after every side. A side is skipped
when the elapsed time plus an estimate of its cost (its longest earlier run) passes
`--budget-s`; a watchdog ends the process at `--hard-limit-s` with what was written.

    python experiments/bench_sana.py --out results/sana.json      # GPU
    python experiments/bench_sana.py --tiny --out /tmp/sana.json     # CPU smoke test
--tiny: tiny configs (specs/sana.md §8 sizes), float32, 64 px images, 16 text tokens, 2 steps,
JAX and torch both on the CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # jaxstack from this checkout when it is not installed
    sys.path.insert(1, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from timing import timed  # noqa: E402  # the benchmarks' one timing helper

from jaxstack.diffusion import SanaPipeline, SanaVelocity, initial_latents, sample  # noqa: E402
from jaxstack.models.dcae import DCAE, DCAEConfig  # noqa: E402
from jaxstack.models.llm import LLM, LLMConfig  # noqa: E402
from jaxstack.models.sana import SanaConfig, SanaTransformer  # noqa: E402

GUIDANCE = 4.5
SHIFT = 3.0
HIRES_SHIFT = 6.0  # the 4K pipeline's flow_shift
SCHEDULER = "flow_dpm_solver"
FILL_STD = 0.02  # std of jaxstack's parameters and of diffusers' refilled all-zero ones
PROMPT_REAL_FRACTION = 2 / 3  # prompt rows: BOS + random tokens over 2/3 of the length
BOS, PAD = 2, 0  # Gemma's
# transformers Gemma2Config overrides of the tiny text encoder (specs/sana.md §8) and the same
# model as jaxstack LLMConfig overrides of the "gemma-2-2b" preset
TINY_GEMMA_HF = dict(
    head_dim=16, hidden_size=8, intermediate_size=64, num_attention_heads=2,
    num_hidden_layers=1, num_key_value_heads=2, vocab_size=8,
)  # fmt: skip
TINY_GEMMA = dict(
    head_dim=16, hidden_size=8, intermediate_size=64, num_heads=2, num_layers=1,
    num_kv_heads=2, vocab_size=8,
)  # fmt: skip
TINY_SANA = {"0.6b": dict(), "1.6b": dict(num_layers=2)}  # SanaConfig.preset("tiny", ...)


def log(msg: str) -> None:
    print(f"[bench_sana {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def error_text(e: BaseException) -> str:
    text = str(e)
    if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower():
        return "oom: " + (text.splitlines() or [""])[0][:200]
    return f"{type(e).__name__}: {(text.splitlines() or [''])[0][:300]}"


# -- settings and configs -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Settings:
    tiny: bool
    size: int  # image side, px
    steps: int
    text_tokens: int
    repeats: int
    warmup: int  # extra untimed e2e calls (every stage has already run once)
    hires_steps: int
    hires_factor: int = 4  # hires image side = factor * size

    @property
    def dtype(self):
        return jnp.float32 if self.tiny else jnp.bfloat16

    @property
    def dtype_name(self) -> str:
        return "float32" if self.tiny else "bfloat16"


def model_names(spec: str) -> list[str]:
    names = []
    for m in (x.strip().lower() for x in spec.split(",") if x.strip()):
        m = m.removeprefix("sana-")
        if m not in TINY_SANA:
            raise SystemExit(f"--models: choose from {sorted(TINY_SANA)}, got {m!r}")
        names.append(m)
    return names


def sana_config(name: str, tiny: bool) -> SanaConfig:
    if tiny:
        return SanaConfig.preset("tiny", **TINY_SANA[name])
    return SanaConfig.preset(f"sana-{name}")


def dcae_config(tiny: bool) -> DCAEConfig:
    return DCAEConfig.preset("tiny" if tiny else "dc-ae-f32c32")


def gemma_config(tiny: bool) -> LLMConfig:
    return LLMConfig.preset("gemma-2-2b", **(TINY_GEMMA if tiny else {}))


def text_inputs(batch: int, length: int, vocab: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(ids int64 [2B, L], mask int64 [2B, L]): B negative rows ("" = BOS then padding), then
    B prompt rows (BOS + random ids over 2/3 of the length, right padding)."""
    rng = np.random.default_rng(seed)
    ids = np.full((2 * batch, length), PAD, np.int64)
    mask = np.zeros((2 * batch, length), np.int64)
    ids[:, 0], mask[:, 0] = BOS % vocab, 1
    real = max(2, int(length * PROMPT_REAL_FRACTION))
    ids[batch:, 1:real] = rng.integers(min(3, vocab - 1), vocab, (batch, real - 1))
    mask[batch:, :real] = 1
    return ids, mask


def sana_flops(cfg: SanaConfig, tokens: int, caption_len: int) -> float:
    """Forward FLOPs of one transformer row (matrix products, both attentions, the depthwise
    conv; norms and elementwise work left out)."""
    d, f, c, h = cfg.hidden_size, cfg.ffn_dim, cfg.cross_inner_dim, cfg.num_attention_heads
    hd, n, lc = cfg.attention_head_dim, tokens, caption_len
    attn1 = n * 4 * d * d * 2 + 2 * n * h * hd * (hd + 1) * 2
    attn2 = n * d * c * 2 + lc * d * c * 2 * 2 + n * lc * c * 2 * 2 + n * c * d * 2
    ff = n * (d * 2 * f + f * d) * 2 + n * 2 * f * 9 * 2
    caption = lc * (cfg.caption_channels * d + d * d) * 2
    io = n * (cfg.in_channels + cfg.out_channels) * d * 2
    return float(cfg.num_layers * (attn1 + attn2 + ff) + caption + io)


def gemma_flops(cfg: LLMConfig, rows: int, tokens: int) -> float:
    """Forward FLOPs of the text encoder over rows x tokens (matrix products + attention)."""
    d, hd = cfg.hidden_size, cfg.head_dim
    proj = d * hd * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 3 * d * cfg.intermediate_size
    attn = 2 * tokens * cfg.num_heads * hd * 2  # per token: scores + values over `tokens` keys
    return float(rows * tokens * cfg.num_layers * (2 * proj + attn))


# -- jaxstack side ------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(1, 2))
def _normal(key, shape, dtype):
    return (FILL_STD * jax.random.normal(key, shape, jnp.float32)).astype(dtype)


def random_state(abstract_state, seed: int):
    """A concrete state for `abstract_state` (from `nnx.eval_shape`): every floating leaf drawn
    from N(0, FILL_STD) by one small jitted draw per distinct (shape, dtype), integer leaves
    zero, key leaves `jax.random.key(seed)`.

    The models' own initialisers compiled as one program took 31 s for Sana-0.6B alone on two
    CPU cores (tens of distinct init ops per layer); the draws here compile once per shape."""
    leaves, treedef = jax.tree.flatten(abstract_state)
    key, out = jax.random.key(seed), []
    for i, x in enumerate(leaves):
        if jnp.issubdtype(x.dtype, jnp.floating):
            out.append(_normal(jax.random.fold_in(key, i), tuple(x.shape), x.dtype))
        elif jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            out.append(
                jax.random.split(jax.random.key(seed), x.shape) if x.shape else jax.random.key(seed)
            )
        else:
            out.append(jnp.zeros(x.shape, x.dtype))
    return jax.tree.unflatten(treedef, out), sum(
        jnp.issubdtype(x.dtype, jnp.floating) for x in leaves
    )


def build_jax(ctor, seed: int):
    """(graphdef, state, drawn) of `ctor()`: shapes from `nnx.eval_shape` (nothing runs), every
    floating parameter drawn from N(0, FILL_STD) (`random_state`)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(ctor))
    state, drawn = random_state(abstract, seed + 1000)
    return graphdef, jax.block_until_ready(state), drawn


# The text-encoder call of `jaxstack.diffusion.SanaPipeline._encode_texts` (a plain causal
# decoder, no padding mask: see that module's docstring), on the 2B rows at once, split into
# (prompt, negative) halves inside the program.
_encode_rows = nnx.jit(
    lambda llm, ids: (lambda h: (h[h.shape[0] // 2 :], h[: h.shape[0] // 2]))(
        llm.hidden_states(ids)
    )
)


class JaxSide:
    """jaxstack models (built on first use, kept) and one `SanaPipeline` per transformer."""

    def __init__(self, s: Settings, sana_cfgs: dict[str, SanaConfig]):
        self.s, self.sana_cfgs = s, sana_cfgs
        self.llm_cfg, self.ae_cfg = gemma_config(s.tiny), dcae_config(s.tiny)
        self._llm = self._ae = None
        self._pipes: dict[str, SanaPipeline] = {}
        self.build_s: dict[str, float] = {}
        self.drawn: dict[str, int] = {}  # floating parameters drawn, per model

    def _build(self, name: str, ctor, seed: int):
        t0 = time.perf_counter()
        graphdef, state, self.drawn[name] = build_jax(ctor, seed)
        self.build_s[name] = time.perf_counter() - t0
        log(f"built {name} in {self.build_s[name]:.1f}s")
        return nnx.merge(graphdef, state)

    def llm(self) -> LLM:
        if self._llm is None:
            dt = self.s.dtype
            self._llm = self._build(
                "gemma", lambda: LLM(self.llm_cfg, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(0)), 0
            )
        return self._llm

    def ae(self) -> DCAE:
        if self._ae is None:
            dt = self.s.dtype
            self._ae = self._build(
                "dcae", lambda: DCAE(self.ae_cfg, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(1)), 1
            )
        return self._ae

    def pipe(self, name: str) -> SanaPipeline:
        if name not in self._pipes:
            dt, cfg = self.s.dtype, self.sana_cfgs[name]
            dit = self._build(
                f"sana-{name}",
                lambda: SanaTransformer(cfg, dtype=dt, param_dtype=dt, rngs=nnx.Rngs(2)),
                2,
            )
            self._pipes[name] = SanaPipeline(
                transformer=dit, vae=self.ae(), text_encoder=self.llm(), tokenizer=None,
                scheduler=SCHEDULER, shift=SHIFT,
            )  # fmt: skip
        return self._pipes[name]


def peak_bytes() -> int | None:
    try:
        return (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:
        return None


def finite_stats(x) -> dict:
    x = np.asarray(jax.device_get(x), np.float32)
    return {"finite": bool(np.isfinite(x).all()), "mean": float(np.nanmean(x))}


def first_call(fn):
    """(fn()'s result, seconds of this call to completion): trace + compile + one run."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    return out, time.perf_counter() - t0


def run_jax_case(side: JaxSide, name: str, batch: int) -> dict:
    s = side.s
    cfg, r = side.sana_cfgs[name], side.ae_cfg.spatial_compression_ratio
    lat = s.size // r
    pipe = side.pipe(name)
    llm = side.llm()
    ids_np, mask_np = text_inputs(batch, s.text_tokens, side.llm_cfg.vocab_size, seed=batch)
    ids, mask = jnp.asarray(ids_np, jnp.int32), jnp.asarray(mask_np, jnp.int32)
    mask_c, mask_u = mask[batch:], mask[:batch]
    noise = initial_latents(jax.random.key(0), batch, cfg.in_channels, lat, lat)
    first, stages, spread = {}, {}, {}

    def measure(stage: str, fn):
        out, first[stage] = first_call(fn)
        log(f"  {stage}: first call {first[stage]:.1f}s")
        spread[stage] = []
        stages[stage] = timed(fn, warmup=0, repeats=s.repeats, times=spread[stage])
        return out

    emb_c, emb_u = measure("text_encode", lambda: _encode_rows(llm, ids))

    def denoise():
        return sample(
            SanaVelocity(pipe.transformer), noise, cond=(emb_c, mask_c), uncond=(emb_u, mask_u),
            guidance_scale=GUIDANCE, steps=s.steps, scheduler=SCHEDULER, shift=SHIFT,
        )  # fmt: skip

    z = measure("denoise", denoise)
    measure("decode", lambda: pipe.decode(z))

    def e2e():
        c, u = _encode_rows(llm, ids)
        return pipe(
            prompt_embeds=c, prompt_mask=mask_c, negative_prompt_embeds=u, negative_mask=mask_u,
            height=s.size, width=s.size, steps=s.steps, guidance_scale=GUIDANCE, seed=0,
            output_type="float",
        )  # fmt: skip

    times: list[float] = []
    e2e_s = timed(e2e, warmup=1 + s.warmup, repeats=s.repeats, times=times)
    image = e2e()
    t0 = time.perf_counter()
    nnx.split(SanaVelocity(pipe.transformer))  # the host-side work `sample` does per call
    split_s = time.perf_counter() - t0
    denoise_flops = s.steps * 2 * batch * sana_flops(cfg, lat * lat, s.text_tokens)
    return {
        "status": "ok",
        "build_s": dict(side.build_s),
        "stages_s": stages,
        "stages_s_all": spread,
        "first_call_s": first,
        # first call (trace + compile + one run) minus a steady run; text_encode and decode
        # compile on the first batch-size case only (shared by the models)
        "compile_s_est": {k: first[k] - stages[k] for k in first},
        "e2e_s": e2e_s,
        "e2e_s_all": times,
        "images_per_s": batch / e2e_s,
        "sample_host_split_s": split_s,
        "denoise_tflop": denoise_flops / 1e12,
        "denoise_tflop_per_s": denoise_flops / stages["denoise"] / 1e12,
        "text_encode_tflop": gemma_flops(side.llm_cfg, 2 * batch, s.text_tokens) / 1e12,
        "image_shape": list(image.shape),
        "image_dtype": str(image.dtype),
        "output": finite_stats(image),
        "linear_attention_impl": linear_attention_impl(cfg, 2 * batch, lat * lat, s.dtype),
        "peak_bytes_in_use_so_far": peak_bytes(),
    }


def linear_attention_impl(cfg: SanaConfig, rows: int, tokens: int, dtype) -> str:
    """What `relu_linear_attention` picks for the transformer's self-attention inputs."""
    try:
        from pallas_kernels.linear_attention import resolve_implementation

        shape = (rows, tokens, cfg.num_attention_heads, cfg.attention_head_dim)
        return resolve_implementation(*(jax.ShapeDtypeStruct(shape, dtype),) * 3)
    except Exception as e:
        return error_text(e)


def run_jax_hires(side: JaxSide, name: str) -> dict:
    """Denoiser only at hires_factor x the image side, batch 1, CFG: seconds per step."""
    s = side.s
    cfg = side.sana_cfgs[name]
    lat = s.hires_factor * s.size // side.ae_cfg.spatial_compression_ratio
    velocity = SanaVelocity(side.pipe(name).transformer)
    k1, k2 = jax.random.split(jax.random.key(7))
    shape = (1, s.text_tokens, cfg.caption_channels)
    mask = jnp.ones((1, s.text_tokens), jnp.int32)
    cond = (jax.random.normal(k1, shape, jnp.float32).astype(s.dtype), mask)
    uncond = (jax.random.normal(k2, shape, jnp.float32).astype(s.dtype), mask)
    noise = initial_latents(jax.random.key(8), 1, cfg.in_channels, lat, lat)

    def denoise():
        return sample(
            velocity, noise, cond=cond, uncond=uncond, guidance_scale=GUIDANCE,
            steps=s.hires_steps, scheduler=SCHEDULER, shift=HIRES_SHIFT,
        )  # fmt: skip

    z, first = first_call(denoise)
    times: list[float] = []
    med = timed(denoise, warmup=0, repeats=s.repeats, times=times)
    flops = s.hires_steps * 2 * sana_flops(cfg, lat * lat, s.text_tokens)
    return {
        "status": "ok",
        "model": name,
        "batch": 1,
        "image_px": s.hires_factor * s.size,
        "latent": [cfg.in_channels, lat, lat],
        "tokens": lat * lat,
        "steps": s.hires_steps,
        "shift": HIRES_SHIFT,
        "denoise_s": med,
        "denoise_s_all": times,
        "s_per_step": med / s.hires_steps,
        "first_call_s": first,
        "compile_s_est": first - med,
        "tflop_per_s": flops / med / 1e12,
        "output": finite_stats(z),
        "linear_attention_impl": linear_attention_impl(cfg, 2, lat * lat, s.dtype),
        "peak_bytes_in_use_so_far": peak_bytes(),
        "caption": "random N(0, 1) embeddings (denoiser only)",
    }


# -- diffusers side -----------------------------------------------------------------------------


class TorchSide:
    """diffusers / transformers models from the same configs (built on first use, kept)."""

    def __init__(self, s: Settings, sana_cfgs: dict[str, SanaConfig]):
        import diffusers
        import torch
        import transformers

        self.torch, self.diffusers, self.transformers = torch, diffusers, transformers
        self.s, self.sana_cfgs = s, sana_cfgs
        cuda = torch.cuda.is_available() and not s.tiny
        self.device = torch.device("cuda" if cuda else "cpu")
        self.dtype = torch.float32 if s.tiny else torch.bfloat16
        self._gemma = self._vae = None
        self._pipes: dict = {}
        self.build_s: dict[str, float] = {}
        self.info: dict = {
            "device": torch.cuda.get_device_name() if cuda else "cpu",
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
            "mode": "eager (no torch.compile)",
        }

    def _finish(self, model, seed: int):
        """Model on the device in the benchmark dtype, eval, all-zero parameters refilled."""
        torch = self.torch
        model = model.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        gen = torch.Generator(device=self.device).manual_seed(seed)
        refilled = 0
        with torch.no_grad():
            for p in model.parameters():
                if p.is_floating_point() and int(torch.count_nonzero(p)) == 0:
                    p.normal_(0.0, FILL_STD, generator=gen)
                    refilled += 1
        self.info.setdefault("num_params", {})[type(model).__name__] = sum(
            p.numel() for p in model.parameters()
        )
        return model, refilled

    def gemma(self):
        if self._gemma is None:
            from transformers import Gemma2Config, Gemma2Model

            t0 = time.perf_counter()
            hf_cfg = Gemma2Config(**(TINY_GEMMA_HF if self.s.tiny else {}))
            try:  # transformers' Gemma2Config read by jaxstack == the jaxstack side's config
                from jaxstack.hf.llm_config import config_from_hf

                mine = config_from_hf(hf_cfg.to_dict())
                self.info["gemma_config_equals_jaxstack"] = mine == gemma_config(self.s.tiny)
            except Exception as e:
                self.info["gemma_config_equals_jaxstack"] = error_text(e)
            with self.torch.device(self.device):
                model = Gemma2Model(hf_cfg)
            self._gemma, n = self._finish(model, 0)
            self.info["gemma_attn_implementation"] = self._gemma.config._attn_implementation
            self.info["gemma_zero_params_refilled"] = n
            self.build_s["gemma"] = time.perf_counter() - t0
        return self._gemma

    def vae(self):
        if self._vae is None:
            t0 = time.perf_counter()
            cfg = dcae_config(self.s.tiny).to_diffusers_config()
            with self.torch.device(self.device):
                model = self.diffusers.AutoencoderDC.from_config(cfg)
            self._vae, n = self._finish(model, 1)
            self.info["dcae_zero_params_refilled"] = n
            self.build_s["dcae"] = time.perf_counter() - t0
        return self._vae

    def pipe(self, name: str):
        if name not in self._pipes:
            d = self.diffusers
            gemma, vae = self.gemma(), self.vae()
            t0 = time.perf_counter()
            cfg = self.sana_cfgs[name].to_diffusers_config()
            with self.torch.device(self.device):
                model = d.SanaTransformer2DModel.from_config(cfg)
            transformer, n = self._finish(model, 2)
            self.info[f"sana-{name}_zero_params_refilled"] = n
            scheduler = d.DPMSolverMultistepScheduler(
                flow_shift=SHIFT, use_flow_sigmas=True, prediction_type="flow_prediction"
            )
            pipe = d.SanaPipeline(
                tokenizer=None, text_encoder=gemma, vae=vae, transformer=transformer,
                scheduler=scheduler,
            )  # fmt: skip
            pipe.set_progress_bar_config(disable=True)
            self._pipes[name] = pipe
            self.build_s[f"sana-{name}"] = time.perf_counter() - t0
        return self._pipes[name]

    # timing: CUDA events on the GPU, the host clock after a synchronize on the CPU
    def _mark(self):
        torch = self.torch
        if self.device.type == "cuda":
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            return ev
        return time.perf_counter()

    def _between(self, a, b) -> float:
        if self.device.type == "cuda":
            b.synchronize()
            return a.elapsed_time(b) / 1e3
        return b - a

    def _sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def run_torch_case(side: TorchSide, name: str, batch: int) -> dict:
    torch, s = side.torch, side.s
    pipe = side.pipe(name)
    gemma, vae = side.gemma(), side.vae()
    ids_np, mask_np = text_inputs(batch, s.text_tokens, gemma.config.vocab_size, seed=batch)
    ids = torch.from_numpy(ids_np).to(side.device)
    mask = torch.from_numpy(mask_np).to(side.device)
    gen = torch.Generator(device=side.device).manual_seed(batch)
    if side.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def encode():
        return gemma(ids, attention_mask=mask)[0]  # the pipeline's own text-encoder call

    def run_pipe(hidden):
        return pipe(
            prompt_embeds=hidden[batch:],
            prompt_attention_mask=mask[batch:],
            negative_prompt=None,  # the pipeline's default "" would clash with the embeds
            negative_prompt_embeds=hidden[:batch],
            negative_prompt_attention_mask=mask[:batch],
            num_inference_steps=s.steps,
            guidance_scale=GUIDANCE,
            height=s.size,
            width=s.size,
            output_type="np",  # host float32 [B, H, W, 3] in [0, 1], as jaxstack's "float"
            use_resolution_binning=False,
            return_dict=False,
            generator=gen,
        )[0]

    enc_all, pipe_all, e2e_all = [], [], []
    image = None
    with torch.inference_mode():
        side._sync()
        t0 = time.perf_counter()
        image = run_pipe(encode())  # warm-up (cuBLAS / cuDNN handles, allocator growth)
        side._sync()
        first_s = time.perf_counter() - t0
        for i in range(s.warmup + s.repeats):
            side._sync()
            a = side._mark()
            hidden = encode()
            b = side._mark()
            image = run_pipe(hidden)
            c = side._mark()
            if i >= s.warmup:
                enc_all.append(side._between(a, b))
                pipe_all.append(side._between(b, c))
                e2e_all.append(side._between(a, c))
        lat = s.size // (2 ** (len(vae.config.encoder_block_out_channels) - 1))
        z = torch.randn(
            (batch, vae.config.latent_channels, lat, lat), generator=gen, device=side.device
        ).to(side.dtype)
        dec_all = []
        for i in range(1 + s.repeats):
            side._sync()
            a = side._mark()
            vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]
            b = side._mark()
            if i >= 1:
                dec_all.append(side._between(a, b))
    e2e_s = statistics.median(e2e_all)
    pipe_s, dec_s = statistics.median(pipe_all), statistics.median(dec_all)
    out = {
        "status": "ok",
        "build_s": dict(side.build_s),
        "first_call_s": first_s,
        "stages_s": {
            "text_encode": statistics.median(enc_all),
            "pipeline": pipe_s,
            "decode": dec_s,
            "denoise_derived": pipe_s - dec_s,
        },
        "stages_s_all": {"text_encode": enc_all, "pipeline": pipe_all, "decode": dec_all},
        "e2e_s": e2e_s,
        "e2e_s_all": e2e_all,
        "images_per_s": batch / e2e_s,
        "image_shape": list(image.shape),
        "image_dtype": str(image.dtype),
        "output": finite_stats(image),
    }
    if side.device.type == "cuda":
        out["max_memory_allocated"] = int(torch.cuda.max_memory_allocated())
    return out


# -- driver -------------------------------------------------------------------------------------


class Bench:
    """Results, budget, JSON writing and the final table."""

    def __init__(self, args, s: Settings, models: list[str], batches: list[int]):
        self.args, self.s, self.t0 = args, s, time.perf_counter()
        self.models, self.batches = models, batches
        self.rows: list[dict] = []
        self.hires: dict | None = None
        self.durations: dict[str, list[tuple[str, int, float]]] = {"jaxstack": [], "diffusers": []}
        self.meta: dict = {}
        self.lock = threading.Lock()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def estimate(self, side: str, batch: int, model: str | None = None) -> float:
        """Seconds a run of `side` is expected to take: the longest earlier run of that side
        with this model and batch, else with this batch, else any; 0 for the first."""
        done = self.durations[side]
        for pick in (
            [d for m, b, d in done if (m, b) == (model, batch)],
            [d for _, b, d in done if b == batch],
            [d for _, _, d in done],
        ):
            if pick:
                return max(pick)
        return 0.0

    def allows(self, side: str, batch: int, model: str | None = None) -> bool:
        return self.elapsed() + self.estimate(side, batch, model) <= self.args.budget_s

    def run_side(self, side: str, model: str, batch: int, fn) -> dict:
        row = {"side": side, "model": model, "batch": batch}
        if not self.allows(side, batch, model):
            row.update(status="skipped", reason="budget", elapsed_s=self.elapsed())
            log(f"{side} {model} b{batch}: skipped (budget)")
        else:
            log(f"{side} {model} b{batch}: start at {self.elapsed():.0f}s")
            t0 = time.perf_counter()
            try:
                row.update(fn())
            except Exception as e:
                row.update(status=error_text(e))
                traceback.print_exc()
            row["case_wall_s"] = time.perf_counter() - t0
            self.durations[side].append((model, batch, row["case_wall_s"]))
            short = {k: row.get(k) for k in ("status", "e2e_s", "images_per_s", "case_wall_s")}
            log(f"{side} {model} b{batch}: {json.dumps(short)}")
        with self.lock:
            self.rows.append(row)
        self.write()
        gc.collect()
        return row

    def ratios(self) -> list[dict]:
        by = {(r["side"], r["model"], r["batch"]): r for r in self.rows}
        out = []
        for m in self.models:
            for b in self.batches:
                j, t = by.get(("jaxstack", m, b), {}), by.get(("diffusers", m, b), {})
                if j.get("status") == t.get("status") == "ok":
                    out.append(
                        {
                            "model": m,
                            "batch": b,
                            "jaxstack_images_per_s": j["images_per_s"],
                            "diffusers_images_per_s": t["images_per_s"],
                            "jax_over_diffusers_images_per_s": j["images_per_s"]
                            / t["images_per_s"],
                        }
                    )
        return out

    def result(self) -> dict:
        return {
            **self.meta,
            "cases": list(self.rows),
            "ratios": self.ratios(),
            "hires_jaxstack": self.hires,
            "wall_s": self.elapsed(),
        }

    def write(self) -> None:
        if not self.args.out:
            return
        with self.lock:
            text = json.dumps(self.result(), indent=2, default=str) + "\n"
        out = Path(self.args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, out)

    def table(self) -> str:
        s = self.s
        lines = [
            f"\n== SANA t2i {s.size}px, {s.steps} steps, CFG {GUIDANCE}, {s.dtype_name} "
            f"({self.meta.get('device')}) : seconds (median), images/s ==",
            f"{'model':6s} {'B':>2s} | {'jax enc':>8s} {'denoise':>8s} {'decode':>8s} "
            f"{'e2e':>8s} {'img/s':>7s} | {'dif enc':>8s} {'pipe':>8s} {'decode':>8s} "
            f"{'e2e':>8s} {'img/s':>7s} | {'jax/dif':>7s}",
        ]
        by = {(r["side"], r["model"], r["batch"]): r for r in self.rows}
        ratio = {(q["model"], q["batch"]): q for q in self.ratios()}

        def cells(r, keys):
            if r.get("status") != "ok":
                return f"{(r.get('status') or '-')[:44]:>44s}"
            st = r["stages_s"]
            vals = [st[k] for k in keys] + [r["e2e_s"]]
            return " ".join(f"{v:8.3f}" for v in vals) + f" {r['images_per_s']:7.2f}"

        for b in self.batches:
            for m in self.models:
                j, t = by.get(("jaxstack", m, b), {}), by.get(("diffusers", m, b), {})
                q = ratio.get((m, b))
                lines.append(
                    f"{m:6s} {b:2d} | {cells(j, ('text_encode', 'denoise', 'decode'))} | "
                    f"{cells(t, ('text_encode', 'pipeline', 'decode'))} | "
                    + (f"{q['jax_over_diffusers_images_per_s']:6.2f}x" if q else "    -")
                )
        h = self.hires
        if h is not None:
            if h.get("status") == "ok":
                lines.append(
                    f"hires jaxstack sana-{h['model']} {h['image_px']}px ({h['tokens']} tokens) "
                    f"B=1 CFG: {h['s_per_step']:.3f} s/step ({h['tflop_per_s']:.0f} TFLOP/s)"
                )
            else:
                lines.append(f"hires jaxstack: {h.get('status')}")
        lines.append(f"wall {self.elapsed():.0f}s of budget {self.args.budget_s:.0f}s")
        return "\n".join(lines)


def versions() -> dict:
    out = {"jax_version": jax.__version__, "python": platform.python_version()}
    for mod in ("torch", "diffusers", "transformers", "flax"):
        try:
            out[f"{mod}_version"] = __import__(mod).__version__
        except Exception as e:
            out[f"{mod}_version"] = f"unavailable ({error_text(e)})"
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="JSON path (default: results/sana.json; "
                    "--tiny: none)")  # fmt: skip
    ap.add_argument("--budget-s", type=float, default=270.0)
    ap.add_argument("--hard-limit-s", type=float, default=None, help="default budget + 90")
    ap.add_argument("--models", default="0.6b,1.6b")
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--steps", type=int, default=None, help="default 20 (--tiny: 2)")
    ap.add_argument("--size", type=int, default=None, help="image px (default 1024, tiny 64)")
    ap.add_argument("--text-tokens", type=int, default=None, help="default 300 (tiny: 16)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=0, help="extra untimed e2e calls")
    ap.add_argument("--hires-steps", type=int, default=None, help="default 4 (tiny: 2)")
    ap.add_argument("--no-hires", action="store_true")
    ap.add_argument("--no-diffusers", action="store_true")
    ap.add_argument("--no-jaxstack", action="store_true", help="diffusers side only (no hires)")
    ap.add_argument("--tiny", action="store_true", help="tiny configs, float32, CPU")
    args = ap.parse_args(argv)
    # random init through XLA's RngBitGenerator: the threefry init programs of three models
    # take minutes to compile on a CPU and seconds on the GPU; the values are not compared
    jax.config.update("jax_default_prng_impl", "rbg")
    if args.tiny:
        jax.config.update("jax_platforms", "cpu")
    else:
        # JAX and torch share the GPU: JAX preallocates under half, torch takes what it needs
        os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
        if args.out is None:
            args.out = str(ROOT / "experiments/results/sana.json")
    if args.hard_limit_s is None:
        args.hard_limit_s = args.budget_s + 90
    s = Settings(
        tiny=args.tiny,
        size=args.size or (64 if args.tiny else 1024),
        steps=args.steps or (2 if args.tiny else 20),
        text_tokens=args.text_tokens or (16 if args.tiny else 300),
        repeats=args.repeats,
        warmup=args.warmup,
        hires_steps=args.hires_steps or (2 if args.tiny else 4),
    )
    models = model_names(args.models)
    batches = [int(b) for b in args.batches.split(",") if b.strip()]
    bench = Bench(args, s, models, batches)

    def hard_stop():
        log(f"hard limit {args.hard_limit_s:.0f}s reached: exiting with the results so far")
        try:
            bench.write()
            print(bench.table(), flush=True)
        finally:
            os._exit(3)

    watchdog = threading.Timer(args.hard_limit_s, hard_stop)
    watchdog.daemon = True
    watchdog.start()

    sana_cfgs = {m: sana_config(m, s.tiny) for m in models}
    dev = jax.devices()[0]
    ae_cfg, llm_cfg = dcae_config(s.tiny), gemma_config(s.tiny)
    r = ae_cfg.spatial_compression_ratio
    bench.meta = {
        "benchmark": "sana_t2i",
        "device": dev.device_kind,
        "backend": jax.default_backend(),
        **versions(),
        "tiny": s.tiny,
        "settings": {
            "image_px": s.size,
            "latent": [ae_cfg.latent_channels, s.size // r, s.size // r],
            "steps": s.steps,
            "guidance_scale": GUIDANCE,
            "scheduler": "DPM-Solver++(2M) flow (DPMSolverMultistepScheduler(flow_shift=3.0, "
            "use_flow_sigmas=True, prediction_type='flow_prediction'))",
            "flow_shift": SHIFT,
            "text_tokens": s.text_tokens,
            "text_rows": "2B (B negative + B prompt), one text-encoder call",
            "dtype": s.dtype_name,
            "weights": f"random: jaxstack all floating params N(0, {FILL_STD}); diffusers its init "
            f"with all-zero floating params refilled N(0, {FILL_STD})",
            "repeats": s.repeats,
            "extra_e2e_warmup": s.warmup,
            "budget_s": args.budget_s,
            "jax_prng_impl": "rbg",
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "xla_mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        },
        "configs": {
            **{
                f"sana-{m}": {**dataclasses.asdict(c), "num_params": c.num_params()}
                for m, c in sana_cfgs.items()
            },
            "dcae": dataclasses.asdict(ae_cfg),
            "gemma2": {**dataclasses.asdict(llm_cfg), "num_params": llm_cfg.num_params()},
        },
        "what_is_timed": {
            "e2e_contract": "token ids on the device -> float32 images [B, H, W, 3] in [0, 1] "
            "on the host",
            "jaxstack": "e2e = nnx.jit(LLM.hidden_states)(ids [2B, L]) -> "
            "jaxstack.diffusion.SanaPipeline(prompt_embeds, prompt_mask, negative_prompt_embeds,"
            " negative_mask, steps, guidance_scale=4.5, output_type='float') (initial_latents, "
            "sample: 20-step flow_dpm_solver scan with CFG batched negative-first, decode, "
            "postprocess); stages text_encode / denoise (sample) / decode (SanaPipeline.decode) "
            "timed apart with experiments/timing.py; compile excluded (compile_s_est)",
            "diffusers": "e2e = Gemma2Model(ids, attention_mask)[0] on 2B rows -> "
            "SanaPipeline(prompt_embeds=..., negative_prompt_embeds=..., masks, "
            "num_inference_steps, guidance_scale=4.5, output_type='np', "
            "use_resolution_binning=False) (latents, DPM-Solver loop, vae.decode, postprocess); "
            "torch eager, CUDA events, after one warm-up call; decode timed apart",
        },
        "notes": [
            "the real pipeline encodes CHI + prompt (~550 tokens before truncation to 300) in "
            "a call of its own; here both sides encode 300-token rows in one 2B-row call",
            "text encoder: jaxstack runs it as its SanaPipeline does (causal, no padding mask), "
            "diffusers with attention_mask (as its pipeline does); equal at the real tokens",
            "hires: denoiser only, no sin-cos PE (the 4K checkpoints add one), random captions",
        ],
    }
    log(f"device {dev.device_kind}, jax {jax.__version__}, models {models}, batches {batches}")
    jside = JaxSide(s, sana_cfgs)
    tside, tside_error = None, None
    if not args.no_diffusers:
        try:
            tside = TorchSide(s, sana_cfgs)
            bench.meta["torch_device"] = str(tside.device)
            bench.meta["diffusers_info"] = tside.info
        except Exception as e:
            tside_error = error_text(e)
            traceback.print_exc()
    for b in batches:
        for m in models:
            if not args.no_jaxstack:
                bench.run_side("jaxstack", m, b, lambda m=m, b=b: run_jax_case(jside, m, b))
            if tside is not None:
                bench.run_side("diffusers", m, b, lambda m=m, b=b: run_torch_case(tside, m, b))
                bench.meta["diffusers_build_s"] = dict(tside.build_s)
            else:
                reason = "disabled" if args.no_diffusers else f"unavailable: {tside_error}"
                with bench.lock:
                    bench.rows.append({"side": "diffusers", "model": m, "batch": b,
                                       "status": "skipped", "reason": reason})  # fmt: skip
    if not (args.no_hires or args.no_jaxstack):
        name = "1.6b" if "1.6b" in models else models[-1]
        # a new compile of the denoiser plus a few steps: like this model's batch-1 case
        if bench.allows("jaxstack", 1, name):
            log(f"hires jaxstack sana-{name}: start at {bench.elapsed():.0f}s")
            t0 = time.perf_counter()
            try:
                bench.hires = run_jax_hires(jside, name)
            except Exception as e:
                bench.hires = {"status": error_text(e), "model": name}
                traceback.print_exc()
            bench.hires["case_wall_s"] = time.perf_counter() - t0
        else:
            bench.hires = {"status": "skipped", "reason": "budget", "model": name}
    bench.meta["jaxstack_build_s"] = dict(jside.build_s)
    bench.meta["jaxstack_params_drawn"] = dict(jside.drawn)
    bench.write()
    watchdog.cancel()
    if args.out:
        log(f"wrote {args.out}")
    print(bench.table(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
