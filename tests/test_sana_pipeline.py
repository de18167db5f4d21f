"""The SANA text-to-image pipeline (jaxstack.diffusion.pipeline, jaxstack.hf.sana) against
diffusers' `SanaPipeline`, on a tiny float32 pipeline built on the CPU: the spec §8
transformer / AutoencoderDC / Gemma2Model configs with every tensor perturbed, a local
word-level tokenizer (no downloads), and both schedulers.

Parity bounds (float32, max |jax - torch| / max |torch|):
* sampling (4 steps, guidance 4.5, fixed latents, given or encoded prompts): final latents
  and decoded images <= SAMPLE_RTOL (measured: latents ~6e-7, images ~3.5e-6); uint8 images
  within 1 level of diffusers' "pil" output (measured: equal).
  The transformer's timestep frequencies are pinned to torch's (`tests/test_sana.py` explains
  the one-ulp exp difference) so that the bound measures the pipeline.
* encode_prompt (no CHI, a short CHI, diffusers' default CHI): masks equal, embeddings on the
  kept positions <= ENCODE_RTOL (measured <= 6.5e-7; padding positions are not compared, see
  the pipeline module).
save_sana -> diffusers `SanaPipeline.from_pretrained` gives bit-identical tensors.
"""

from __future__ import annotations

import inspect
import json
import math
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jaxstack.models.sana as sana
from jaxstack import cli
from jaxstack.diffusion import DEFAULT_CHI, SanaPipeline, save_images
from jaxstack.hf import CheckpointError, load_sana, save_sana

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

SAMPLE_RTOL = 1e-5
ENCODE_RTOL = 1e-5
STEPS, GUIDANCE, MSL = 4, 4.5, 8
LATENT = (2, 4, 16, 16)  # tiny AutoencoderDC: 2x compression -> 32 x 32 images
SHORT_CHI = ["a red dog:", "cat "]
PROMPTS = ["A red CAT", "  dog dog a red cat cat dog a red dog cat dog  "]  # 2nd: truncated
VOCAB = {"<pad>": 0, "<eos>": 1, "<bos>": 2, "<unk>": 3, "a": 4, "cat": 5, "dog": 6, "red": 7}
TRANSFORMER = dict(  # spec §8, caption_channels = the Gemma2's hidden size
    patch_size=1, in_channels=4, out_channels=4, num_layers=1, num_attention_heads=2,
    attention_head_dim=4, num_cross_attention_heads=2, cross_attention_head_dim=4,
    cross_attention_dim=8, caption_channels=8, sample_size=32,
)  # fmt: skip
VAE = dict(  # spec §8
    in_channels=3, latent_channels=4, attention_head_dim=2,
    encoder_block_types=("ResBlock", "EfficientViTBlock"),
    decoder_block_types=("ResBlock", "EfficientViTBlock"),
    encoder_block_out_channels=(8, 8), decoder_block_out_channels=(8, 8),
    encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
    encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1),
    downsample_block_type="conv", upsample_block_type="interpolate",
    decoder_norm_types="rms_norm", decoder_act_fns="silu", scaling_factor=0.41407,
)  # fmt: skip
GEMMA = dict(  # spec §8
    head_dim=16, hidden_size=8, intermediate_size=64, num_attention_heads=2,
    num_hidden_layers=1, num_key_value_heads=2, vocab_size=8, max_position_embeddings=8192,
)  # fmt: skip
SCHEDULER_KINDS = ("flow_dpm_solver", "flow_euler")


def _scheduler(kind: str):
    if kind == "flow_dpm_solver":
        return diffusers.DPMSolverMultistepScheduler(
            flow_shift=3.0, use_flow_sigmas=True, prediction_type="flow_prediction"
        )
    return diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)


def _tokenizer():
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<bos> $A", special_tokens=[("<bos>", VOCAB["<bos>"])]
    )  # BOS only, like Gemma's tokenizer
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        unk_token="<unk>",
    )  # fmt: skip


def _perturb(module: torch.nn.Module, scale: float, seed: int) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def torch_freqs(half: int) -> np.ndarray:
    """diffusers' float32 timestep frequencies, as torch computes them (see test_sana.py)."""
    exponent = -math.log(10000) * torch.arange(0, half, dtype=torch.float32)
    return torch.exp(exponent / half).numpy()


@pytest.fixture
def pin_freqs(monkeypatch):
    monkeypatch.setattr(sana, "timestep_freqs", torch_freqs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """{"torch": {kind: diffusers SanaPipeline}, "path": {kind: its save_pretrained folder},
    "jax": {kind: load_sana(folder, float32)}} for both schedulers (same weights)."""
    torch.manual_seed(0)
    parts = dict(
        tokenizer=_tokenizer(),
        text_encoder=_perturb(
            transformers.Gemma2Model(
                transformers.Gemma2Config(**GEMMA, attn_implementation="eager")
            ),
            0.3,
            1,
        ),
        vae=_perturb(diffusers.AutoencoderDC(**VAE), 0.3, 2),
        transformer=_perturb(diffusers.SanaTransformer2DModel(**TRANSFORMER), 0.2, 3),
    )
    out = {"torch": {}, "path": {}, "jax": {}}
    for kind in SCHEDULER_KINDS:
        pipe = diffusers.SanaPipeline(**parts, scheduler=_scheduler(kind))
        pipe.set_progress_bar_config(disable=True)
        path = tmp_path_factory.mktemp(f"sana_{kind}") / "pipe"
        pipe.save_pretrained(path)
        out["torch"][kind], out["path"][kind] = pipe, path
        out["jax"][kind] = load_sana(path, dtype=jnp.float32)
    return out


def _rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.abs(out - ref).max() / np.abs(ref).max())


def _caption_inputs():
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(2, MSL, 8)).astype(np.float32)
    neg = rng.normal(size=(2, MSL, 8)).astype(np.float32)
    mask = np.ones((2, MSL), np.int64)
    mask[1, 5:] = 0
    neg_mask = np.zeros((2, MSL), np.int64)
    neg_mask[:, :2] = 1
    latents = rng.normal(size=LATENT).astype(np.float32)
    return emb, mask, neg, neg_mask, latents


# -- loading ------------------------------------------------------------------------------------


def test_load_sana_reads_components(tiny):
    for kind in SCHEDULER_KINDS:
        pipe = tiny["jax"][kind]
        assert isinstance(pipe, SanaPipeline)
        assert (pipe.scheduler, pipe.shift) == (kind, 3.0)
        assert pipe.vae_scale_factor == tiny["torch"][kind].vae_scale_factor == 2
        assert pipe.chi == DEFAULT_CHI
    ref = inspect.signature(diffusers.SanaPipeline.__call__).parameters
    assert list(DEFAULT_CHI) == ref["complex_human_instruction"].default


# -- (a) sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", SCHEDULER_KINDS)
def test_sampling_with_embeddings_matches_diffusers(tiny, kind, pin_freqs):
    emb, mask, neg, neg_mask, latents = _caption_inputs()
    tpipe, jpipe = tiny["torch"][kind], tiny["jax"][kind]
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    common = dict(num_inference_steps=STEPS, guidance_scale=GUIDANCE, height=32, width=32)
    tkw = dict(
        prompt_embeds=t(emb), prompt_attention_mask=t(mask), negative_prompt_embeds=t(neg),
        negative_prompt_attention_mask=t(neg_mask), latents=t(latents), negative_prompt=None,
        use_resolution_binning=False, **common,
    )  # fmt: skip
    jkw = dict(
        prompt_embeds=emb, prompt_mask=mask, negative_prompt_embeds=neg, negative_mask=neg_mask,
        latents=latents, steps=STEPS, guidance_scale=GUIDANCE,
    )  # fmt: skip
    with torch.no_grad():
        ref_z = tpipe(output_type="latent", **tkw).images.numpy()
        ref_img = tpipe(output_type="np", **tkw).images
        ref_pil = np.stack([np.asarray(im) for im in tpipe(output_type="pil", **tkw).images])
    z = jpipe(output_type="latent", **jkw)
    img = jpipe(output_type="float", **jkw)
    img_u8 = jpipe(output_type="np", **jkw)
    assert z.shape == LATENT and img.shape == ref_img.shape == (2, 32, 32, 3)
    err_z, err_img = _rel(z, ref_z), _rel(img, ref_img)
    u8_diff = int(np.abs(img_u8.astype(np.int32) - ref_pil).max())
    print(f"{kind}: latents rel err {err_z:.2e}, images {err_img:.2e}, uint8 max diff {u8_diff}")
    assert err_z <= SAMPLE_RTOL and err_img <= SAMPLE_RTOL
    assert img_u8.dtype == np.uint8 and u8_diff <= 1
    assert np.abs(ref_z - latents).max() > 0.1  # the sampler moved the latents


@pytest.mark.parametrize("kind", SCHEDULER_KINDS)
def test_text_to_latents_matches_diffusers(tiny, kind, pin_freqs):
    """The whole path from text: CHI, truncation, negative "" and sampling."""
    latents = _caption_inputs()[-1]
    with torch.no_grad():
        ref = tiny["torch"][kind](
            PROMPTS, latents=torch.from_numpy(latents), num_inference_steps=STEPS,
            guidance_scale=GUIDANCE, height=32, width=32, use_resolution_binning=False,
            max_sequence_length=MSL, complex_human_instruction=SHORT_CHI, output_type="latent",
        ).images.numpy()  # fmt: skip
    z = tiny["jax"][kind](
        PROMPTS, latents=latents, steps=STEPS, guidance_scale=GUIDANCE,
        max_sequence_length=MSL, complex_human_instruction=SHORT_CHI, output_type="latent",
    )  # fmt: skip
    err = _rel(z, ref)
    print(f"{kind} from text: latents rel err {err:.2e}")
    assert err <= SAMPLE_RTOL


# -- (b) prompt encoding --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "chi,msl",
    [(None, MSL), (SHORT_CHI, MSL), (list(DEFAULT_CHI), 300)],
    ids=["none", "short", "default"],
)
def test_encode_prompt_matches_diffusers(tiny, chi, msl):
    tpipe, jpipe = tiny["torch"]["flow_dpm_solver"], tiny["jax"]["flow_dpm_solver"]
    with torch.no_grad():
        ref = tpipe.encode_prompt(
            PROMPTS, do_classifier_free_guidance=True, negative_prompt="", device="cpu",
            max_sequence_length=msl, complex_human_instruction=chi,
        )  # fmt: skip
    out = jpipe.encode_prompt(
        PROMPTS, max_sequence_length=msl, complex_human_instruction=chi or None
    )
    for name, (emb, mask), (ref_emb, ref_mask) in (
        ("prompt", out[:2], ref[:2]),
        ("negative", out[2:], ref[2:]),
    ):
        ref_emb, ref_mask = ref_emb.numpy(), ref_mask.numpy()
        assert emb.shape == ref_emb.shape == (2, msl, 8)
        np.testing.assert_array_equal(np.asarray(mask), ref_mask, err_msg=name)
        keep = ref_mask.astype(bool)
        err = _rel(np.asarray(emb)[keep], ref_emb[keep])
        print(f"chi={'none' if chi is None else len(chi)} {name}: kept {keep.sum()} rel {err:.2e}")
        assert err <= ENCODE_RTOL, name
    if chi and msl == MSL:  # the long prompt is truncated (every position kept), not the short
        assert np.asarray(out[1])[1].all() and not np.asarray(out[1])[0].all()


# -- (c) save_sana -> diffusers -------------------------------------------------------------------


@pytest.mark.parametrize("kind", SCHEDULER_KINDS)
def test_save_sana_loads_in_diffusers_bit_identical(tiny, kind, tmp_path):
    out = tmp_path / "saved"
    save_sana(tiny["jax"][kind], out)
    back = diffusers.SanaPipeline.from_pretrained(out)
    ref = tiny["torch"][kind]
    for comp in ("transformer", "vae", "text_encoder"):
        got, want = getattr(back, comp).state_dict(), getattr(ref, comp).state_dict()
        assert sorted(got) == sorted(want), comp
        for key, value in want.items():
            assert got[key].dtype == value.dtype and torch.equal(got[key], value), (comp, key)
    assert type(back.scheduler) is type(ref.scheduler)
    shift_key = "flow_shift" if kind == "flow_dpm_solver" else "shift"
    assert back.scheduler.config[shift_key] == 3.0
    texts = [p.lower() for p in PROMPTS] + ["\n".join(SHORT_CHI)]
    assert back.tokenizer(texts)["input_ids"] == ref.tokenizer(texts)["input_ids"]
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "SanaPipeline"
    again = load_sana(out, dtype=jnp.float32)  # and back into jaxstack
    assert (again.scheduler, again.shift) == (kind, 3.0)


def test_save_sana_writes_changed_scheduler(tiny, tmp_path):
    pipe = tiny["jax"]["flow_dpm_solver"]
    changed = SanaPipeline(**{**pipe.__dict__, "scheduler": "flow_euler", "shift": 4.0})
    save_sana(changed, tmp_path / "euler")
    config = json.loads((tmp_path / "euler" / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "FlowMatchEulerDiscreteScheduler" and config["shift"] == 4.0
    back = load_sana(tmp_path / "euler", dtype=jnp.float32)
    assert (back.scheduler, back.shift) == ("flow_euler", 4.0)


# -- (d) errors -----------------------------------------------------------------------------------


def _break(path, fault: str) -> str:
    """Apply `fault` to the pipeline folder `path`; returns text the error must contain."""
    if fault == "missing_vae":
        shutil.rmtree(path / "vae")
        return "vae"
    if fault == "missing_model_index":
        (path / "model_index.json").unlink()
        return "model_index.json"
    if fault == "karras_scheduler":
        file = path / "scheduler" / "scheduler_config.json"
        file.write_text(json.dumps({**json.loads(file.read_text()), "use_karras_sigmas": True}))
        return "use_karras_sigmas"
    if fault == "empty_tokenizer":
        for f in (path / "tokenizer").iterdir():
            f.unlink()
        return "tokenizer"
    if fault == "missing_text_encoder_weights":
        (path / "text_encoder" / "model.safetensors").unlink()
        return "text_encoder"
    raise ValueError(fault)


FAULTS = (
    "missing_vae",
    "missing_model_index",
    "karras_scheduler",
    "empty_tokenizer",
    "missing_text_encoder_weights",
)


@pytest.mark.parametrize("fault", FAULTS)
def test_bad_pipeline_is_one_line_error(tiny, tmp_path, fault):
    path = tmp_path / "bad"
    shutil.copytree(tiny["path"]["flow_dpm_solver"], path)
    needle = _break(path, fault)
    with pytest.raises(CheckpointError) as info:
        load_sana(path, dtype=jnp.float32)
    message = str(info.value)
    assert "\n" not in message and needle in message, message


# -- CLI --------------------------------------------------------------------------------------------


def test_cli_sample_image_writes_pngs(tiny, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "img.png"
    argv = [
        "sample-image", "--model", str(tiny["path"]["flow_dpm_solver"]), "--prompt", "a red cat",
        "--prompt", "Dog", "--steps", "2", "--height", "32", "--width", "64", "--dtype",
        "float32", "--seed", "1", "--out", str(out),
    ]  # fmt: skip
    assert cli.main(argv) == 0
    for i in range(2):
        with Image.open(tmp_path / f"img_{i}.png") as im:
            assert im.size == (64, 32) and im.mode == "RGB"
    assert "img_1.png: Dog" in capsys.readouterr().out


def test_cli_sample_image_missing_component(tiny, tmp_path, capsys):
    path = tmp_path / "bad"
    shutil.copytree(tiny["path"]["flow_euler"], path)
    shutil.rmtree(path / "transformer")
    code = cli.main(["sample-image", "--model", str(path), "--prompt", "a", "--out", "x.png"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "transformer" in lines[0], err


def test_seeds_and_save_images(tiny, tmp_path):
    pipe = tiny["jax"]["flow_euler"]
    emb, mask, *_ = _caption_inputs()
    kw = dict(width=32, steps=1, guidance_scale=1.0, output_type="latent")
    one = pipe(prompt_embeds=emb[:1], prompt_mask=mask[:1], height=32, seed=3, **kw)
    two = pipe(prompt_embeds=emb, prompt_mask=mask, height=32, seed=3, **kw)
    # image i's noise does not depend on the batch (the model's float32 sums may, slightly)
    np.testing.assert_allclose(one[0], two[0], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="multiples of 2"):
        pipe(prompt_embeds=emb, prompt_mask=mask, height=33, **kw)
    images = np.random.default_rng(0).integers(0, 256, (2, 8, 12, 3), dtype=np.uint8)
    paths = save_images(images, [tmp_path / "a.png", tmp_path / "sub" / "b.png"])
    from PIL import Image

    for image, path in zip(images, paths):
        np.testing.assert_array_equal(np.asarray(Image.open(path)), image)
