"""Video question answering data: JSONL records -> chat prompts with video placeholders -> batches.

Record schema (one JSON object per line, e.g. written by `jaxstack data synth-video`):
    {"id": str, "video": path (relative to the JSONL's folder, or absolute),
     "question": str, "options": [str, ...], "answer": "A" | "B" | ...,
     "reasoning": str (chain-of-thought trace, optional for RL), "task": str (optional)}

Prompt: one user turn "<video>\\n{question}\\nA. ...\\nB. ...\\n" in the tokenizer's chat template,
then the generation prompt. The `<video>` sentinel is replaced by `VLMConfig.video_length(F)`
copies of the media placeholder id, so `merge_multimodal` writes one video embedding row per
placeholder. Response (SFT target): "<think>{reasoning}</think><answer>{letter}</answer>" + eos;
only the response and eos are trained (label masking).

Batches come from a grain `MapDataset` (seeded shuffle, reshuffled each epoch), so batch `i` is
a pure function of (records, config, i) and a resumed run sees the batches it would have seen.
A video that cannot be decoded is skipped, counted (`skipped`) and replaced by the next record
of the stream; a dataset whose every video is bad raises.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from jaxstack.data.tokenizer import Tokenizer

VIDEO_SENTINEL = "<video>"
LETTERS = "ABCDEFGHIJ"
REQUIRED = {"id": str, "video": str, "question": str, "options": list, "answer": str}


def read_video_qa(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Validated records of a video-QA JSONL file; adds "video_path" (absolute path).

    Raises ValueError naming file and line for bad JSON, missing/mistyped fields, fewer than two
    options, or an answer letter outside the options; FileNotFoundError for a missing file.
    """
    path = os.fspath(path)
    root = os.path.dirname(os.path.abspath(path))
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{where}: expected a JSON object, got {type(rec).__name__}")
            for key, typ in REQUIRED.items():
                if not isinstance(rec.get(key), typ):
                    raise ValueError(
                        f"{where}: field {key!r} missing or not a {typ.__name__} "
                        f"(keys here: {sorted(rec)})"
                    )
            n = len(rec["options"])
            if not 2 <= n <= len(LETTERS):
                raise ValueError(f"{where}: need 2..{len(LETTERS)} options, got {n}")
            if rec["answer"] not in LETTERS[:n]:
                raise ValueError(f"{where}: answer {rec['answer']!r} is not one of {LETTERS[:n]}")
            rec["video_path"] = os.path.join(root, rec["video"])
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def format_question(rec: Mapping[str, Any]) -> str:
    """The user text after the video: question then lettered options, one per line."""
    lines = [rec["question"]]
    lines += [f"{LETTERS[i]}. {opt}" for i, opt in enumerate(rec["options"])]
    return "\n".join(lines) + "\n"


def format_response(rec: Mapping[str, Any]) -> str:
    """The SFT target: reasoning in <think> tags, then the option letter in <answer> tags."""
    return f"<think>{rec.get('reasoning', '')}</think><answer>{rec['answer']}</answer>"


def _find(seq: Sequence[int], sub: Sequence[int]) -> int:
    n = len(sub)
    for i in range(len(seq) - n + 1):
        if list(seq[i : i + n]) == list(sub):
            return i
    return -1


def _media_marker(tok: Tokenizer, media_token_id: int) -> str | None:
    """The tokenizer's own text for the media id when it encodes back to exactly that one id
    (an added special token such as NVILA's "<image>"), else None."""
    if not 0 <= media_token_id < tok.vocab_size:
        return None
    try:
        text = tok.decode([media_token_id], skip_special_tokens=False)
        return text if text and tok.encode(text) == [media_token_id] else None
    except (ValueError, KeyError, IndexError):
        return None


def media_prompt_ids(
    text: str, tok: Tokenizer, *, media_token_id: int, num_media: int
) -> list[int]:
    """Chat-template ids of one user turn "<media>\\n{text}" (then the generation prompt), the
    media given as `num_media` copies of `media_token_id`.

    The media's place is marked with the tokenizer's own media token when it has one (it survives
    templating as one id), else with the text `<video>` located in the ids. Raises ValueError
    when the template splits the `<video>` text so that it cannot be found.
    """
    marker = _media_marker(tok, media_token_id)
    if marker is not None:
        ids = tok.apply_chat_template([{"role": "user", "content": f"{marker}\n{text}"}])
        if ids.count(media_token_id) == 1:
            at = ids.index(media_token_id)
            return ids[:at] + [media_token_id] * num_media + ids[at + 1 :]
    ids = tok.apply_chat_template([{"role": "user", "content": f"{VIDEO_SENTINEL}\n{text}"}])
    sentinel = tok.encode(VIDEO_SENTINEL)
    at = _find(ids, sentinel)
    if at < 0:  # the template tokenised the sentinel together with its neighbours
        raise ValueError(f"could not locate {VIDEO_SENTINEL!r} in the chat-templated prompt")
    return ids[:at] + [media_token_id] * num_media + ids[at + len(sentinel) :]


def prompt_ids(
    rec: Mapping[str, Any], tok: Tokenizer, *, media_token_id: int, num_media: int
) -> list[int]:
    """Chat-template ids of the prompt with `num_media` media placeholders for the video:
    `media_prompt_ids` of the record's question and options (`format_question`)."""
    return media_prompt_ids(
        format_question(rec), tok, media_token_id=media_token_id, num_media=num_media
    )


def sft_example(
    rec: Mapping[str, Any], tok: Tokenizer, *, media_token_id: int, num_media: int
) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [L], trained bool [L]): prompt, then response + eos (trained)."""
    head = prompt_ids(rec, tok, media_token_id=media_token_id, num_media=num_media)
    body = tok.encode(format_response(rec)) + [tok.eos_id]
    tokens = np.asarray(head + body, np.int32)
    trained = np.concatenate([np.zeros(len(head), bool), np.ones(len(body), bool)])
    return tokens, trained


@dataclasses.dataclass(frozen=True)
class VideoSpec:
    """How clips are read: `num_frames` sampled uniformly, resized to `image_size` square,
    SigLIP-normalised. `cache_size` decoded clips are kept in host memory (0 = none)."""

    num_frames: int = 16
    image_size: int = 56
    cache_size: int = 4096


class FrameLoader:
    """Decodes clips to float32 [F, S, S, 3] (normalised), with a bounded in-memory cache."""

    def __init__(self, spec: VideoSpec):
        self.spec = spec
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()

    def __call__(self, path: str) -> np.ndarray:
        from jaxstack.data.video import load_video, normalize_frames

        if path in self._cache:
            self._cache.move_to_end(path)
            return self._cache[path]
        s = self.spec
        frames = load_video(path, num_frames=s.num_frames, size=(s.image_size, s.image_size))
        out = normalize_frames(frames)
        if s.cache_size > 0:
            self._cache[path] = out
            if len(self._cache) > s.cache_size:
                self._cache.popitem(last=False)
        return out


class VideoQABatches:
    """Fixed-shape SFT batches of video-QA records (see module doc).

    Batch `i` (numpy):
        input_ids int32 [B, T] right padded with pad_id; targets int32 [B, T] (next token);
        loss_mask bool [B, T] (next token is a trained token); frames float32 [B, F, S, S, 3].
    Examples longer than T raise (raise `seq_len`); `skipped` counts bad videos met so far.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        tok: Tokenizer,
        *,
        media_token_id: int,
        num_media: int,
        video: VideoSpec,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
    ):
        import grain

        self.records, self.tok = list(records), tok
        self.batch_size, self.seq_len = batch_size, seq_len
        self.loader = FrameLoader(video)
        self.examples = [
            sft_example(r, tok, media_token_id=media_token_id, num_media=num_media)
            for r in self.records
        ]
        longest = max(len(t) for t, _ in self.examples)
        if longest > seq_len:
            raise ValueError(f"an example has {longest} tokens > data.seq_len={seq_len}")
        self.stream = grain.MapDataset.range(len(self.records)).seed(seed).shuffle().repeat()
        self.skipped = 0
        self._bad: set[int] = set()

    def _frames(self, idx: int) -> np.ndarray | None:
        from jaxstack.data.video import VideoError

        if idx in self._bad:
            return None
        try:
            return self.loader(self.records[idx]["video_path"])
        except VideoError as e:
            self._bad.add(idx)
            self.skipped += 1
            print(f"warning: skipping record {self.records[idx]['id']!r}: {e}")
            return None

    def batch(self, step: int) -> dict[str, np.ndarray]:
        b, t = self.batch_size, self.seq_len
        out = {
            "input_ids": np.full((b, t), self.tok.pad_id, np.int32),
            "targets": np.zeros((b, t), np.int32),
            "loss_mask": np.zeros((b, t), bool),
        }
        # Rows come from stream positions [step * b, (step + 1) * b); a bad video's row is filled
        # from the positions after that window (deterministic, so resume stays exact).
        frames, pos, row = [], step * b, 0
        limit = (step + 1) * b + 10 * len(self.records)
        while row < b:
            if pos >= limit:
                raise ValueError("no decodable video found in the dataset")
            idx = int(self.stream[pos])
            pos += 1
            clip = self._frames(idx)
            if clip is None:
                continue
            tokens, trained = self.examples[idx]
            n = len(tokens)
            out["input_ids"][row, :n] = tokens
            out["targets"][row, : n - 1] = tokens[1:]
            out["loss_mask"][row, : n - 1] = trained[1:]
            frames.append(clip)
            row += 1
        out["frames"] = np.stack(frames)
        return out
