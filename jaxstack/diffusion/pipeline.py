"""SANA text-to-image pipeline: Gemma-2 prompt encoding with the Complex Human Instruction,
flow sampling with classifier-free guidance, DC-AE decoding (diffusers' `SanaPipeline`).

    pipe = jaxstack.hf.load_sana("Sana_1600M_1024px_diffusers", dtype=jnp.bfloat16)
    images = pipe(["a cat sleeping on a windowsill"], steps=20, guidance_scale=4.5, seed=0)
    save_images(images, ["cat.png"])                  # uint8 [B, H, W, 3]

Prompt encoding follows `SanaPipeline.encode_prompt` (spec sana.md §4): prompts are lowercased
and stripped; with a CHI the prompt becomes "\\n".join(chi) + prompt and is padded (right) or
truncated to max_length_all = len(tokens(chi)) + max_sequence_length - 2 tokens (the CHI's
token count includes the BOS the tokenizer adds); the text encoder's last hidden state and
the mask then keep position 0 (BOS) plus the last max_sequence_length - 1 positions. The
negative prompt ("" by default) is encoded without the CHI at max_sequence_length.

The text encoder runs as a plain causal decoder (RoPE positions 0..T-1, no padding mask): with
right padding the real tokens never see a padding token, so their hidden states equal those of
transformers' Gemma2Model with its attention mask; the padding positions differ (transformers
lets padding attend to the real tokens only) and are masked out of the transformer's
cross-attention (bias -1e4, exp underflows to 0 in float32), so they do not change the output.

Differences from diffusers' `SanaPipeline.__call__`: no resolution binning (height and width
are used as given and must be multiples of the DC-AE's compression ratio, 32 for f32c32);
initial noise comes from `jaxstack.diffusion.initial_latents` (JAX PRNG, one key per image),
not torch's generator, so equal seeds do not give equal images (pass `latents` to reproduce
a diffusers run); one image per prompt (repeat a prompt for more); `clean_caption` (bs4/ftfy
caption cleaning) is not implemented; output_type "np" returns uint8 images (diffusers' "pil"
pixel values) and "float" diffusers' float "np" ones.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from types import EllipsisType
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.diffusion.sample import initial_latents, sample
from jaxstack.diffusion.schedulers import SCHEDULERS
from jaxstack.models.dcae import DCAE
from jaxstack.models.llm import LLM
from jaxstack.models.sana import SanaTransformer

Array = jax.Array

# `SanaPipeline.__call__`'s default `complex_human_instruction` (diffusers 0.42.1; the same
# text as the Sana YAML `chi_prompt`).
DEFAULT_CHI: tuple[str, ...] = (
    "Given a user prompt, generate an 'Enhanced prompt' that provides detailed visual "
    "descriptions suitable for image generation. Evaluate the level of detail in the user "
    "prompt:",
    "- If the prompt is simple, focus on adding specifics about colors, shapes, sizes, "
    "textures, and spatial relationships to create vivid and concrete scenes.",
    "- If the prompt is already detailed, refine and enhance the existing details slightly "
    "without overcomplicating.",
    "Here are examples of how to transform or refine prompts:",
    "- User Prompt: A cat sleeping -> Enhanced: A small, fluffy white cat curled up in a round "
    "shape, sleeping peacefully on a warm sunny windowsill, surrounded by pots of blooming red "
    "flowers.",
    "- User Prompt: A busy city street -> Enhanced: A bustling city street scene at dusk, "
    "featuring glowing street lamps, a diverse crowd of people in colorful clothing, and a "
    "double-decker bus passing by towering glass skyscrapers.",
    "Please generate only the enhanced description for the prompt below and avoid including "
    "any additional commentary or evaluations:",
    "User Prompt: ",
)
OUTPUT_TYPES = ("np", "float", "latent")

__all__ = ["DEFAULT_CHI", "OUTPUT_TYPES", "SanaPipeline", "SanaVelocity", "save_images"]


class SanaVelocity(nnx.Module):
    """`SanaTransformer` in the `velocity_fn(x, timestep, (embeddings, mask))` form that
    `jaxstack.diffusion.sample` takes, with the pipeline's conventions: inputs cast to the
    transformer's dtype, timestep * `cfg.timestep_scale`, and the first half of the channels
    kept when the model predicts a learned sigma too (out_channels = 2 * in_channels)."""

    def __init__(self, transformer: SanaTransformer):
        self.transformer = transformer

    def __call__(self, x: Array, timestep: Array, cond: tuple[Array, Array]) -> Array:
        model = self.transformer
        emb, mask = cond
        t = timestep.astype(jnp.float32) * model.cfg.timestep_scale
        v = model(x.astype(model.dtype), emb.astype(model.dtype), t, mask)
        c = model.cfg.in_channels
        if model.cfg.out_channels // 2 == c:
            v = v[:, :c]
        return v


_hidden_states = nnx.jit(lambda model, ids: model.hidden_states(ids))
_decode = nnx.jit(lambda vae, z: vae.decode(z))


def _as_list(prompts: str | Sequence[str], name: str) -> list[str]:
    if isinstance(prompts, str):
        return [prompts]
    out = list(prompts)
    if not out or not all(isinstance(p, str) for p in out):
        raise ValueError(f"{name} must be a string or a non-empty list of strings")
    return out


def postprocess(images_nchw: Array | np.ndarray, output_type: str = "np") -> np.ndarray:
    """Decoder output [B, 3, H, W] in [-1, 1] -> host images [B, H, W, 3] as diffusers'
    `VaeImageProcessor.postprocess` makes them: float32 (x / 2 + 0.5) clipped to [0, 1]
    ("float", diffusers' "np"), or that times 255, rounded, as uint8 ("np", diffusers' "pil")."""
    x = np.asarray(jax.device_get(images_nchw), np.float32)
    x = np.clip(x * np.float32(0.5) + np.float32(0.5), 0.0, 1.0).transpose(0, 2, 3, 1)
    if output_type == "float":
        return x
    if output_type == "np":
        return (x * np.float32(255)).round().astype(np.uint8)
    raise ValueError(f"unknown output_type {output_type!r} for images; use 'np' or 'float'")


@dataclasses.dataclass(eq=False)
class SanaPipeline:
    """A loaded SANA pipeline (see the module docstring; `jaxstack.hf.load_sana` builds one).

    transformer: the diffusion transformer; vae: the DC-AE (decodes z / scaling_factor);
    text_encoder: Gemma-2 base model (`LLM`, `hidden_states` = last_hidden_state); tokenizer:
    a transformers tokenizer (BOS added, padding token set); scheduler: "flow_dpm_solver" or
    "flow_euler", with `shift` its flow shift; chi: the Complex Human Instruction lines used by
    default (None: none); scheduler_config: the diffusers scheduler config read from disk
    (kept so that `jaxstack.hf.save_sana` writes it back; None: written from scheduler/shift).
    """

    transformer: SanaTransformer
    vae: DCAE
    text_encoder: LLM
    tokenizer: Any
    scheduler: str = "flow_dpm_solver"
    shift: float = 3.0
    chi: tuple[str, ...] | None = DEFAULT_CHI
    scheduler_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; expected one of {SCHEDULERS}")

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel along each side (32 for DC-AE f32c32)."""
        return self.vae.cfg.spatial_compression_ratio

    # -- text ----------------------------------------------------------------------------------

    def _encode_texts(
        self, texts: list[str], max_length: int, chi: Sequence[str] | None
    ) -> tuple[Array, Array]:
        """diffusers' `_get_gemma_prompt_embeds`: (hidden [B, T, D], mask int32 [B, T]) with
        T = max_length, or the CHI's max_length_all when `chi` is non-empty."""
        tok = self.tokenizer
        tok.padding_side = "right"
        texts = [t.lower().strip() for t in texts]
        if chi:
            chi_prompt = "\n".join(chi)
            texts = [chi_prompt + t for t in texts]
            max_length = len(tok.encode(chi_prompt)) + max_length - 2
        enc = tok(
            texts,
            padding="max_length",
            max_length=max_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="np",
        )
        ids = jnp.asarray(enc["input_ids"], jnp.int32)
        mask = jnp.asarray(enc["attention_mask"], jnp.int32)
        return _hidden_states(self.text_encoder, ids), mask

    def encode_prompt(
        self,
        prompts: str | Sequence[str],
        *,
        negative_prompt: str | Sequence[str] | None = "",
        max_sequence_length: int = 300,
        complex_human_instruction: Sequence[str] | None | EllipsisType = ...,
    ) -> tuple[Array, Array, Array | None, Array | None]:
        """(embeddings [B, L, D], mask int32 [B, L], negative embeddings [B, L, D], negative
        mask [B, L]) with L = max_sequence_length and D the text encoder's width (its compute
        dtype), as diffusers' `SanaPipeline.encode_prompt` computes them.

        complex_human_instruction: CHI lines prefixed to every prompt (default `...`: the
        pipeline's `chi`; None or [] for none). negative_prompt: a string for every prompt or
        one per prompt, encoded without the CHI; None skips it (negatives returned as None).
        """
        prompts = _as_list(prompts, "prompts")
        chi = self.chi if complex_human_instruction is ... else complex_human_instruction
        msl = int(max_sequence_length)
        if msl < 1:
            raise ValueError(f"max_sequence_length must be >= 1, got {max_sequence_length}")
        emb, mask = self._encode_texts(prompts, msl, chi)
        select = np.array([0, *range(-msl + 1, 0)]) % emb.shape[1]
        emb, mask = emb[:, select], mask[:, select]
        if negative_prompt is None:
            return emb, mask, None, None
        neg_emb, neg_mask = self._encode_negative(negative_prompt, len(prompts), msl)
        return emb, mask, neg_emb, neg_mask

    def _encode_negative(
        self, negative_prompt: str | Sequence[str], batch: int, max_length: int
    ) -> tuple[Array, Array]:
        negatives = _as_list(negative_prompt, "negative_prompt")
        if len(negatives) == 1:
            negatives = negatives * batch
        if len(negatives) != batch:
            raise ValueError(f"{len(negatives)} negative prompts for {batch} prompts")
        return self._encode_texts(negatives, max_length, None)

    # -- sampling ------------------------------------------------------------------------------

    def __call__(
        self,
        prompts: str | Sequence[str] | None = None,
        *,
        negative_prompt: str | Sequence[str] = "",
        height: int = 1024,
        width: int = 1024,
        steps: int = 20,
        guidance_scale: float = 4.5,
        seed: int = 0,
        latents: Array | np.ndarray | None = None,
        prompt_embeds: Array | np.ndarray | None = None,
        prompt_mask: Array | np.ndarray | None = None,
        negative_prompt_embeds: Array | np.ndarray | None = None,
        negative_mask: Array | np.ndarray | None = None,
        max_sequence_length: int = 300,
        complex_human_instruction: Sequence[str] | None | EllipsisType = ...,
        scheduler: str | None = None,
        shift: float | None = None,
        output_type: str = "np",
    ) -> np.ndarray | Array:
        """Generate one image per prompt.

        prompts, or prompt_embeds [B, L, D] with prompt_mask [B, L] (1 = keep). Guidance
        (v_u + s (v_c - v_u)) runs when guidance_scale > 1, with negative_prompt_embeds /
        negative_mask [B, L] if given, else `negative_prompt` encoded. latents: initial noise
        [B, C, H / r, W / r] (r = `vae_scale_factor`; then height/width are ignored), default
        `initial_latents(jax.random.key(seed), ...)`: image i uses fold_in(key, i).
        scheduler / shift: override the pipeline's ("flow_dpm_solver" | "flow_euler").
        output_type: "np" -> uint8 [B, H, W, 3]; "float" -> float32 [B, H, W, 3] in [0, 1]
        (diffusers' "np"); "latent" -> the final latents float32 [B, C, h, w] (jax.Array).
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"unknown output_type {output_type!r}; expected one of {OUTPUT_TYPES}")
        use_cfg = guidance_scale > 1.0
        if (prompts is None) == (prompt_embeds is None):
            raise ValueError("pass exactly one of prompts and prompt_embeds")
        if prompt_embeds is not None:
            if prompt_mask is None:
                raise ValueError("prompt_embeds needs prompt_mask")
            emb, mask = jnp.asarray(prompt_embeds), jnp.asarray(prompt_mask)
            batch = emb.shape[0]
            neg_emb = neg_mask = None
        else:
            encode_negative = use_cfg and negative_prompt_embeds is None
            emb, mask, neg_emb, neg_mask = self.encode_prompt(
                prompts,
                negative_prompt=negative_prompt if encode_negative else None,
                max_sequence_length=max_sequence_length,
                complex_human_instruction=complex_human_instruction,
            )
            batch = emb.shape[0]
        if use_cfg:
            if negative_prompt_embeds is not None:
                if negative_mask is None:
                    raise ValueError("negative_prompt_embeds needs negative_mask")
                neg_emb, neg_mask = jnp.asarray(negative_prompt_embeds), jnp.asarray(negative_mask)
            elif neg_emb is None:
                neg_emb, neg_mask = self._encode_negative(
                    negative_prompt, batch, int(max_sequence_length)
                )
            if neg_emb.shape != emb.shape or neg_mask.shape != mask.shape:
                raise ValueError(
                    f"negative embeddings {tuple(neg_emb.shape)} / mask {tuple(neg_mask.shape)} "
                    f"must match the prompt's {tuple(emb.shape)} / {tuple(mask.shape)}"
                )
        latents = self._initial_latents(latents, batch, height, width, seed)
        z = sample(
            SanaVelocity(self.transformer),
            latents,
            cond=(emb, mask),
            uncond=(neg_emb, neg_mask) if use_cfg else None,
            guidance_scale=guidance_scale,
            steps=steps,
            scheduler=self.scheduler if scheduler is None else scheduler,
            shift=self.shift if shift is None else shift,
        )
        if output_type == "latent":
            return z
        return postprocess(self.decode(z), output_type)

    def _initial_latents(self, latents, batch: int, height: int, width: int, seed: int) -> Array:
        c = self.transformer.cfg.in_channels
        if latents is not None:
            latents = jnp.asarray(latents, jnp.float32)
            if latents.ndim != 4 or latents.shape[:2] != (batch, c):
                raise ValueError(
                    f"latents must have shape [{batch}, {c}, h, w], got {tuple(latents.shape)}"
                )
            return latents
        r = self.vae_scale_factor
        if height % r or width % r or height <= 0 or width <= 0:
            raise ValueError(
                f"height and width must be positive multiples of {r} (the autoencoder's "
                f"compression ratio), got {height}x{width}"
            )
        return initial_latents(jax.random.key(seed), batch, c, height // r, width // r)

    def decode(self, latents: Array) -> Array:
        """Final latents [B, C, h, w] -> decoder output float32 [B, 3, h r, w r] in about
        [-1, 1]: `vae.decode(latents / scaling_factor)` (divided in float32, decoded in the
        autoencoder's compute dtype)."""
        z = jnp.asarray(latents, jnp.float32) / jnp.float32(self.vae.scaling_factor)
        return _decode(self.vae, z).astype(jnp.float32)


def save_images(images: np.ndarray | Sequence[np.ndarray], paths: Sequence[str]) -> list[str]:
    """Write uint8 images [B, H, W, 3] (or a list of [H, W, 3]) as PNG files, one path each
    (folders created); Pillow if installed, else matplotlib. Returns the paths."""
    images = list(images)
    paths = [os.fspath(p) for p in paths]
    if len(images) != len(paths):
        raise ValueError(f"{len(images)} images for {len(paths)} paths")
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a matplotlib dependency
        Image = None
    for image, path in zip(images, paths):
        image = np.asarray(image)
        if image.dtype != np.uint8 or image.ndim != 3:
            raise ValueError(f"expected uint8 [H, W, C] images, got {image.dtype} {image.shape}")
        folder = os.path.dirname(path)
        if folder:
            os.makedirs(folder, exist_ok=True)
        if Image is not None:
            Image.fromarray(image).save(path, format="PNG")
        else:
            import matplotlib.pyplot as plt

            plt.imsave(path, image, format="png")
    return paths
