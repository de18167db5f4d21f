"""A VLM yes/no verifier for SANA-1.5 inference-time scaling (spec sana.md §7), run through
jaxstack's own NVILA (`jaxstack.models.vlm.NVILA`).

    model = jaxstack.hf.load_nvila("path/to/NVILA-Lite-2B-Verifier", dtype=jnp.bfloat16)
    verifier = VLMVerifier(model, "path/to/NVILA-Lite-2B-Verifier/llm")  # its tokenizer
    yes, score = verifier.judge(images, "a red fox in the snow")   # uint8 [N, H, W, 3]
    best = jaxstack.diffusion.tournament_pick(yes, score)

`judge` asks the VLM whether each image matches its prompt and reads the answer off ONE forward
pass: score = log p("yes") - log p("no") of the first answer token, yes = score > 0.

How the public Sana code uses its verifier (`tools/inference_scaling/nvila_sana_pick.py` of
NVlabs/Sana, read in the fork xin-ran-w/Sana at commit 168cf92; the judge is
Efficient-Large-Model/NVILA-Lite-2B-Verifier): one user turn holding the image first, then a
text that states the generation prompt and asks for a direct 'yes' or 'no'; the answer ids are
the first tokens of the lowercase words "yes" and "no" without a leading space; a pair of
images is compared by the generated answer, then by the first step's score of the "yes" id
(both yes) or of the "no" id (both no, the lower wins). The differences here:
- The question is `template` with "{prompt}" replaced by the prompt (default
  `DEFAULT_TEMPLATE`; the Sana script words its instruction differently, with an introductory
  sentence about ranking images: pass its text as `template` to match it).
- yes is p("yes") > p("no") at the first answer position, not the decoded (generated) answer;
  the two differ only when some third token is the most likely one.
- One score per image, the log-odds margin, so `tournament_pick` compares two yeses and two
  noes by the same number (higher wins); Sana's two raw scores rank the same way only when
  the other id's score is the same.
- `yes_words` / `no_words` default to ("yes",) / ("no",) as in the script: after the chat
  template's assistant header the answer starts without a space, and BPE tokenizers give
  "yes", "Yes" and " yes" different ids. Several words pool their distinct first-token ids:
  score = logsumexp(log p[yes ids]) - logsumexp(log p[no ids]).

Prompt layout (NVlabs/VILA `llava/utils/media.py` `extract_media` puts the media token before
the text; `llava/model/encoders/image/basic.py` `BasicImageEncoder` follows an image's features
with the embedding of "\\n"): the tokenizer's chat template over one user turn, built by
`jaxstack.data.video_qa.media_prompt_ids`, with tokens_per_frame media placeholders that
receive the image's projected tokens, then the "\\n" of the text as the image's end token
(checked to be `separator_token_id`), then the question, then the generation prompt.

Images: uint8 [N, H, W, 3] or float in [0, 1] (the SANA pipeline's "np" and "float" outputs)
are resized to the tower's square `image_size` with `jaxstack.data.s2_tiling.resize_image`
(bicubic, antialiased, PIL-like, without PIL's uint8 rounding) and SigLIP-normalised with
`jaxstack.data.video.normalize_frames` ((x / 255 - 0.5) / 0.5). One 448 tile per image, as
`NVILA` models it (no Dynamic-S2 / multi-tile image input; see jaxstack/hf/nvila.py).

Batching: images go in chunks of `batch_size` (the last chunk padded by repeating its last
item); prompts are right padded to one length per call, rounded up to a multiple of
`length_bucket`, so one jitted program serves a call (it is keyed on the model's structure:
verifiers over equally shaped models share it). Right padding is exact for a causal LLM: the
answer position reads only earlier positions.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxstack.data.s2_tiling import resize_image
from jaxstack.data.tokenizer import Tokenizer, load_tokenizer
from jaxstack.data.video import normalize_frames
from jaxstack.data.video_qa import media_prompt_ids
from jaxstack.models.vlm import NVILA

Array = jax.Array

DEFAULT_TEMPLATE = (
    "Does this image match the description? Please directly respond with yes or no.\n{prompt}"
)


def _answer_ids(tok: Tokenizer, words: Sequence[str], vocab: int, name: str) -> tuple[int, ...]:
    if isinstance(words, str) or not words:
        raise ValueError(f"{name} must be a non-empty sequence of words, got {words!r}")
    ids = []
    for word in words:
        enc = tok.encode(word)
        if not enc:
            raise ValueError(f"{name}: the tokenizer encodes {word!r} to no tokens")
        if not 0 <= enc[0] < vocab:
            raise ValueError(f"{name}: token id {enc[0]} of {word!r} outside the LLM vocab {vocab}")
        ids.append(int(enc[0]))
    return tuple(sorted(set(ids)))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _margin(
    graphdef: nnx.GraphDef,
    yes_ids: tuple[int, ...],
    no_ids: tuple[int, ...],
    state: nnx.State,
    pixels_bhwc: Array,
    ids_bt: Array,
    last_b: Array,
) -> Array:
    """float32 [B]: logsumexp log p(yes ids) - logsumexp log p(no ids) at position last_b."""
    model = nnx.merge(graphdef, state)
    media = model.encode_images(pixels_bhwc)  # [B, n, D]
    embeds = model.embed_prompt(ids_bt, media.reshape(-1, media.shape[-1]))
    hidden = model.llm.hidden_states(inputs_embeds=embeds)  # [B, L, D]
    h = jnp.take_along_axis(hidden, last_b[:, None, None], axis=1)  # [B, 1, D]
    logp = jax.nn.log_softmax(model.llm.logits(h)[:, 0].astype(jnp.float32), axis=-1)
    yes = jax.nn.logsumexp(logp[:, jnp.asarray(yes_ids)], axis=-1)
    no = jax.nn.logsumexp(logp[:, jnp.asarray(no_ids)], axis=-1)
    return yes - no


class VLMVerifier:
    """Yes/no judge of image-prompt agreement over an NVILA model (module docstring).

    model: `NVILA` with a causal LLM (e.g. from `jaxstack.hf.load_nvila`); its current
    parameters are read at every `judge` call. tokenizer: a `jaxstack.data.tokenizer`
    tokenizer, or a spec for `load_tokenizer` ("byte", or a directory such as the checkpoint's
    llm/). template: the question, "{prompt}" replaced by each prompt. yes_words / no_words:
    words whose first token ids are pooled into p(yes) / p(no). batch_size: images per forward
    pass. length_bucket: prompt lengths are padded up to a multiple of it.
    """

    def __init__(
        self,
        model: NVILA,
        tokenizer: Tokenizer | str,
        *,
        template: str = DEFAULT_TEMPLATE,
        yes_words: Sequence[str] = ("yes",),
        no_words: Sequence[str] = ("no",),
        batch_size: int = 8,
        length_bucket: int = 64,
    ):
        cfg = model.cfg
        if not cfg.llm.causal:
            raise ValueError("VLMVerifier needs a causal LLM (right padding relies on it)")
        if "{prompt}" not in template:
            raise ValueError(f"template must contain '{{prompt}}', got {template!r}")
        if batch_size < 1 or length_bucket < 1:
            raise ValueError(
                f"batch_size and length_bucket must be >= 1, got {batch_size}, {length_bucket}"
            )
        self.model = model
        self.tok = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self.template = template
        self.batch_size, self.length_bucket = batch_size, length_bucket
        vocab = cfg.llm.vocab_size
        self.yes_ids = _answer_ids(self.tok, yes_words, vocab, "yes_words")
        self.no_ids = _answer_ids(self.tok, no_words, vocab, "no_words")
        if set(self.yes_ids) & set(self.no_ids):
            raise ValueError(
                f"yes and no words share first-token ids {self.yes_ids} / {self.no_ids}"
            )
        pad = self.tok.pad_id
        self.pad_id = cfg.separator_token_id if pad == cfg.media_token_id else pad
        self._graphdef = nnx.graphdef(model)
        self._ids: dict[str, list[int]] = {}

    def prompt_ids(self, prompt: str) -> list[int]:
        """Chat-template ids of the question about `prompt`: tokens_per_frame media placeholders
        (`media_token_id`), `separator_token_id`, the question, the generation prompt."""
        if prompt not in self._ids:
            cfg = self.model.cfg
            n = cfg.tokens_per_frame
            text = self.template.replace("{prompt}", prompt)
            ids = media_prompt_ids(text, self.tok, media_token_id=cfg.media_token_id, num_media=n)
            at = ids.index(cfg.media_token_id) + n
            if at >= len(ids) or ids[at] != cfg.separator_token_id:
                got = ids[at] if at < len(ids) else None
                raise ValueError(
                    f"the tokenizer does not encode the newline after the image as "
                    f"separator_token_id {cfg.separator_token_id} (got {got})"
                )
            self._ids[prompt] = ids
        return self._ids[prompt]

    def pixels(self, images: Any) -> np.ndarray:
        """uint8 [N, H, W, 3] or float [N, H, W, 3] in [0, 1] -> float32 [N, S, S, 3], resized
        to S = the tower's image_size and SigLIP-normalised. ValueError for other input."""
        x = _check_images(images)
        if x.dtype != np.uint8:  # [0, 1] -> the [0, 255] scale normalize_frames expects
            x = x.astype(np.float32) * np.float32(255)
        s = self.model.cfg.vision.image_size
        if x.shape[1:3] != (s, s):
            x = np.stack([resize_image(img, s, s) for img in x])
        return normalize_frames(x)

    def judge(self, images: Any, prompts: str | Sequence[str]) -> tuple[list[bool], list[float]]:
        """(yes, score) for N images, each judged against its prompt (one string is used for
        all). images: uint8 [N, H, W, 3] or float in [0, 1]. score = log p(yes) - log p(no)
        at the first answer token (float32); yes = score > 0. Feeds
        `jaxstack.diffusion.tournament_pick(yes, score)`."""
        x = _check_images(images)
        n = x.shape[0]
        if isinstance(prompts, str):
            prompts = [prompts] * n
        prompts = list(prompts)
        if len(prompts) != n:
            raise ValueError(f"{n} images but {len(prompts)} prompts")
        if not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be strings")
        ids = [self.prompt_ids(p) for p in prompts]
        longest = max(len(i) for i in ids)
        length = -(-longest // self.length_bucket) * self.length_bucket
        state = nnx.state(self.model)
        margins = []  # device arrays, read at the end: the next chunk's host work overlaps
        for lo in range(0, n, self.batch_size):
            rows = list(range(lo, min(lo + self.batch_size, n)))
            rows += [rows[-1]] * (self.batch_size - len(rows))  # static batch shape
            batch = np.full((self.batch_size, length), self.pad_id, np.int32)
            for r, i in enumerate(rows):
                batch[r, : len(ids[i])] = ids[i]
            last = np.asarray([len(ids[i]) - 1 for i in rows], np.int32)
            pixels = self.pixels(x[rows])
            margins.append(
                _margin(
                    self._graphdef,
                    self.yes_ids,
                    self.no_ids,
                    state,
                    jnp.asarray(pixels),
                    jnp.asarray(batch),
                    jnp.asarray(last),
                )
            )
        scores = [float(v) for v in np.concatenate([np.asarray(m) for m in margins])[:n]]
        return [s > 0 for s in scores], scores


def _check_images(images: Any) -> np.ndarray:
    """images as a host array [N, H, W, 3], uint8 or float in [0, 1]; ValueError otherwise."""
    x = np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be [N, H, W, 3], got shape {x.shape}")
    if x.shape[0] == 0 or x.shape[1] == 0 or x.shape[2] == 0:
        raise ValueError(f"images must be non-empty, got shape {x.shape}")
    if x.dtype == np.uint8:
        return x
    if not np.issubdtype(x.dtype, np.floating):
        raise ValueError(f"images must be uint8 or float in [0, 1], got dtype {x.dtype}")
    if not (np.all(x >= 0) and np.all(x <= 1)):  # also catches NaN
        raise ValueError(f"float images must lie in [0, 1], got range [{x.min()}, {x.max()}]")
    return x


__all__ = ["DEFAULT_TEMPLATE", "VLMVerifier"]
