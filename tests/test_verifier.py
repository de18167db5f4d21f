"""VLMVerifier (jaxstack/diffusion/verifier.py) on a tiny random NVILA, float32, byte tokenizer:
the score against the model's own full forward, batching, an image-controlled answer feeding
`tournament_pick`, preprocessing and prompt layout, and bad input."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstack.data.tokenizer import ByteTokenizer
from jaxstack.diffusion import VLMVerifier, tournament_pick
from jaxstack.models import vlm

YES, NO = ord("y"), ord("n")  # first byte tokens of "yes" / "no"
PROMPTS = ["a red fox", "two blue cubes on a wooden table beside a sleeping grey cat"]


@pytest.fixture(scope="module")
def cfg() -> vlm.VLMConfig:
    base = vlm.VLMConfig.preset("tiny")  # 56 px, 4 media tokens per image, separator "\n"
    return dataclasses.replace(base, llm=dataclasses.replace(base.llm, tie_word_embeddings=False))


@pytest.fixture(scope="module")
def model(cfg: vlm.VLMConfig) -> vlm.NVILA:
    return vlm.init_nvila(cfg, seed=0)


def _images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@functools.partial(jax.jit, static_argnums=0)
def _full_forward(graphdef, state, ids_bt, pixels_bhwc):
    """The model's own full forward on unpadded ids [1, L] and one image: (log p(yes) -
    log p(no) from logits [1, L, V] at the last position, final hidden state there [D]).
    Jitted only to compile once per shape instead of op by op."""
    m = nnx.merge(graphdef, state)
    media = m.encode_images(pixels_bhwc)
    media = media.reshape(-1, media.shape[-1])
    logp = jax.nn.log_softmax(m(ids_bt, media)[0, -1].astype(jnp.float32))
    hidden = m.llm.hidden_states(inputs_embeds=m.embed_prompt(ids_bt, media))
    return logp[YES] - logp[NO], hidden[0, -1]


def _oracle(model: vlm.NVILA, ids: list[int], pixels: np.ndarray) -> tuple[float, np.ndarray]:
    graphdef, state = nnx.split(model)
    margin, h = _full_forward(graphdef, state, jnp.asarray([ids], jnp.int32), jnp.asarray(pixels))
    return float(margin), np.asarray(h, np.float64)


def test_score_equals_full_forward_oracle(model: vlm.NVILA, cfg: vlm.VLMConfig) -> None:
    ver = VLMVerifier(model, ByteTokenizer(), batch_size=4)
    assert ver.yes_ids == (YES,) and ver.no_ids == (NO,)
    images = _images(3, 40, 72, seed=1)  # non-square: resized to 56 x 56
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]  # two lengths: the short ones right padded
    yes, score = ver.judge(images, prompts)
    assert len(yes) == len(score) == 3 and len({round(s, 6) for s in score}) == 3
    for i, prompt in enumerate(prompts):
        want, _ = _oracle(model, ver.prompt_ids(prompt), ver.pixels(images[i : i + 1]))
        assert abs(score[i] - want) <= 1e-5, (i, score[i], want)
        assert yes[i] == (want > 0)


def test_prompt_layout(model: vlm.NVILA, cfg: vlm.VLMConfig) -> None:
    """Chat turn: media placeholders, then "\\n" as the image's end token, then the question."""
    ver = VLMVerifier(model, "byte", template="Q: {prompt}? yes or no")
    tok = ver.tok
    ids = ver.prompt_ids("a red fox")
    n = cfg.tokens_per_frame
    at = ids.index(cfg.media_token_id)
    assert ids.count(cfg.media_token_id) == n and ids[at : at + n] == [cfg.media_token_id] * n
    assert ids[at + n] == cfg.separator_token_id
    assert ids[:at] == [tok.special_ids["<|user|>"]]
    want_tail = tok.encode("Q: a red fox? yes or no")
    assert ids[at + n + 1 : at + n + 1 + len(want_tail)] == want_tail
    assert ids[-1] == tok.special_ids["<|assistant|>"]  # the generation prompt ends the ids


def test_pixels_scale_and_resize(model: vlm.NVILA, cfg: vlm.VLMConfig) -> None:
    ver = VLMVerifier(model, ByteTokenizer())
    s = cfg.vision.image_size
    img = _images(2, s, s, seed=2)
    want = (img.astype(np.float32) / 255 - 0.5) / 0.5
    np.testing.assert_allclose(ver.pixels(img), want, atol=1e-6)  # right size: no resize
    np.testing.assert_allclose(ver.pixels(img.astype(np.float64) / 255), want, atol=1e-6)
    const = np.full((1, 30, 90, 3), 200, np.uint8)
    out = ver.pixels(const)
    assert out.shape == (1, s, s, 3)
    np.testing.assert_allclose(out, (200 / 255 - 0.5) / 0.5, atol=1e-5)
    ramp = np.broadcast_to(np.arange(90, dtype=np.uint8)[None, None, :, None], (1, 30, 90, 3))
    row = ver.pixels(ramp)[0, 0, :, 0]
    assert np.all(np.diff(row) > 0)  # the horizontal ramp survives the resize, increasing


def test_batched_equals_one_by_one(model: vlm.NVILA) -> None:
    images = _images(5, 56, 56, seed=3)
    prompts = [PROMPTS[i % 2] for i in range(5)]  # two lengths, padded differently alone
    # 4 + 1 (padded to 4) images, prompts right padded to 192; alone: padded to 256
    batched = VLMVerifier(model, ByteTokenizer(), batch_size=4, length_bucket=64)
    single = VLMVerifier(model, ByteTokenizer(), batch_size=1, length_bucket=256)
    yes_b, score_b = batched.judge(images, prompts)
    for i in range(5):
        yes_1, score_1 = single.judge(images[i : i + 1], prompts[i])
        assert abs(score_b[i] - score_1[0]) <= 1e-5, (i, score_b[i], score_1[0])
        assert yes_b[i] == yes_1[0]
    # one prompt string for all images == the list of that prompt
    assert (
        batched.judge(images[:3], PROMPTS[0])[1] == batched.judge(images[:3], [PROMPTS[0]] * 3)[1]
    )


def test_image_controls_the_answer_and_the_pick(cfg: vlm.VLMConfig) -> None:
    """LM-head columns set so that the yes/no margin is c * u . h(last): positive for image A,
    negative for image B (h = the final hidden state at the answer position)."""
    model = vlm.init_nvila(cfg, seed=1)
    ver = VLMVerifier(model, ByteTokenizer(), batch_size=4, length_bucket=192)
    prompt = PROMPTS[0]
    img_a, img_b = _images(1, 56, 56, seed=10), _images(1, 56, 56, seed=11)
    ids = ver.prompt_ids(prompt)
    h_a = _oracle(model, ids, ver.pixels(img_a))[1]
    h_b = _oracle(model, ids, ver.pixels(img_b))[1]
    u, m = h_a - h_b, (h_a + h_b) / 2
    u = u - (u @ m) / (m @ m) * m  # u . h_a = -u . h_b > 0
    kernel = np.asarray(model.llm.lm_head.kernel[...], np.float64)
    kernel[:, YES] = kernel[:, NO] + 50.0 * u / np.linalg.norm(u)
    model.llm.lm_head.kernel[...] = jnp.asarray(kernel, jnp.float32)
    want_a = 50.0 * (u @ h_a) / np.linalg.norm(u)

    images = np.concatenate([img_b, img_b, img_a, img_b])
    yes, score = ver.judge(images, prompt)  # the model's new head is read at the call
    assert yes == [False, False, True, False]
    assert score[2] > 0.1 and score[0] < -0.1 and abs(score[2] + score[0]) <= 1e-3
    assert abs(score[2] - want_a) <= 1e-3 * max(1.0, abs(want_a))
    assert tournament_pick(yes, score) == 2
    yes2, score2 = ver.judge(np.concatenate([img_a, img_b]), prompt)
    assert (yes2, tournament_pick(yes2, score2)) == ([True, False], 0)


def test_bad_input_one_line_errors(model: vlm.NVILA) -> None:
    ver = VLMVerifier(model, ByteTokenizer())
    good = _images(2, 56, 56, seed=4)
    cases = [
        (lambda: ver.judge(good, ["a", "b", "c"]), "2 images but 3 prompts"),
        (lambda: ver.judge(good[0], ["a"]), r"\[N, H, W, 3\]"),
        (lambda: ver.judge(good[..., :2], ["a", "b"]), r"\[N, H, W, 3\]"),
        (lambda: ver.judge(good[:0], []), "non-empty"),
        (lambda: ver.judge(good.astype(np.int32), ["a", "b"]), "uint8 or float"),
        (lambda: ver.judge(good.astype(np.float32), ["a", "b"]), r"\[0, 1\]"),
        (lambda: ver.judge(np.full((1, 8, 8, 3), np.nan), ["a"]), r"\[0, 1\]"),
        (lambda: ver.judge(good, [1, 2]), "strings"),
        (lambda: VLMVerifier(model, ByteTokenizer(), template="no slot"), "{prompt}"),
        (lambda: VLMVerifier(model, ByteTokenizer(), yes_words=("no",)), "share"),
        (lambda: VLMVerifier(model, ByteTokenizer(), yes_words="yes"), "sequence"),
        (lambda: VLMVerifier(model, ByteTokenizer(), batch_size=0), ">= 1"),
    ]
    for fn, match in cases:
        with pytest.raises(ValueError, match=match) as err:
            fn()
        assert "\n" not in str(err.value), str(err.value)
