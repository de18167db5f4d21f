"""Embedded synthetic long-video QA dataset: real mp4 clips + multiple-choice JSONL.

Every clip is split into 4 equal segments of frames (`np.array_split`), and every question
needs the whole clip: no single frame answers it. Signals are big and bold (black background,
large saturated squares) so a tiny VLM with 56x56 input that averages groups of 2-4 frames can
learn them in minutes on a CPU. Tasks (round-robin over records):

  color_order  one large square per segment, 4 distinct colours from a palette of 6;
               "which colour appeared first/last?"; options are the 4 colours shown, in
               palette order.
  count        a big white square flashes (visible in the first half of the segment, black in
               the second half) in k of the 4 segments, k in 1..4; "how many times did it
               flash?"; options "1".."4" in order.
  direction    a coloured square moves linearly from one edge to the opposite edge over the
               whole clip; "in which direction did it move?"; options left/right/up/down
               in that order.

Options are listed in a fixed order per task (palette order, count order, left/right/up/down),
so the answer letter follows from the perceived answer without a content lookup over shuffled
options, which tiny models learn slowly; what the model must learn is the video itself.

Layout written by `synth_video_dataset(out_dir, num)`:
  out_dir/videos/<id>.mp4   mpeg4 (yuv420p, high quality), readable by decord and PyAV
  out_dir/train.jsonl       records {"id", "video", "question", "options", "answer",
  out_dir/eval.jsonl        "reasoning", "task"}; "video" is relative to the JSONL directory

Determinism: record i depends only on (seed, i, frames, size); the correct answer's letter
cycles through a seeded permutation of A-D per task, so letters are balanced exactly within
every 4 records of a task. The same seed gives byte-identical JSONL and identical frames.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time
from collections import Counter
from typing import Any

import numpy as np

TASKS = ("color_order", "count", "direction")
LETTERS = ("A", "B", "C", "D")
NUM_SEGMENTS = 4
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 255, 0),
    "blue": (0, 0, 255),
    "yellow": (255, 255, 0),
    "magenta": (255, 0, 255),
    "cyan": (0, 255, 255),
}
WHITE = (255, 255, 255)
DIRECTIONS = ("left", "right", "up", "down")
CODEC = "mpeg4"
CLIP_NAME = re.compile(r"synth-\d{5,}\.mp4")  # the clips this module writes: videos/<id>.mp4

_COLOR_Q = {
    "first": (
        "Which colour appeared first?",
        "Which colour was shown first in the video?",
        "What colour was the square at the start of the clip?",
    ),
    "last": (
        "Which colour appeared last?",
        "Which colour was shown last in the video?",
        "What colour was the square at the end of the clip?",
    ),
}
_COUNT_Q = (
    "How many times did the white square flash?",
    "How many flashes of the white square were there?",
    "Count the white square's flashes. How many were there?",
)
_DIRECTION_Q = (
    "In which direction did the square move?",
    "Which way did the square travel?",
    "Where did the square move to during the video?",
)
# direction -> (start edge, end edge) in words
_EDGES = {
    "left": ("right", "left"),
    "right": ("left", "right"),
    "up": ("bottom", "top"),
    "down": ("top", "bottom"),
}


def _segments(frames: int) -> list[np.ndarray]:
    """Frame indices of the 4 equal (up to one frame) consecutive segments."""
    return np.array_split(np.arange(frames), NUM_SEGMENTS)


def _even(x: float) -> int:
    """Round to the nearest even integer (keeps shape edges on yuv420p chroma samples)."""
    return int(2 * round(x / 2))


def _centered_square(size: int, frac_area: float = 0.4) -> tuple[int, int]:
    """(start, stop) pixel span of a centred square covering ~frac_area of a size x size frame."""
    side = _even(size * np.sqrt(frac_area))
    start = _even((size - side) / 2)
    return start, start + side


def _color_order_frames(order: list[str], frames: int, size: int) -> np.ndarray:
    """uint8 [frames, size, size, 3]: segment s shows a large centred square of colour order[s]."""
    video = np.zeros((frames, size, size, 3), np.uint8)
    a, b = _centered_square(size)
    for seg, name in zip(_segments(frames), order):
        video[seg, a:b, a:b] = PALETTE[name]
    return video


def _count_frames(on: list[int], frames: int, size: int) -> np.ndarray:
    """uint8 [frames, size, size, 3]: white square in the first half of each segment in `on`."""
    video = np.zeros((frames, size, size, 3), np.uint8)
    a, b = _centered_square(size)
    segs = _segments(frames)
    for s in on:
        seg = segs[s]
        video[seg[: (len(seg) + 1) // 2], a:b, a:b] = WHITE
    return video


def _direction_frames(direction: str, color: str, frames: int, size: int) -> np.ndarray:
    """uint8 [frames, size, size, 3]: a square moving edge to edge linearly over all frames."""
    video = np.zeros((frames, size, size, 3), np.uint8)
    side = _even(size * 0.375)
    mid = _even((size - side) / 2)
    travel = np.linspace(0, size - side, frames)
    if direction in ("left", "up"):
        travel = travel[::-1]
    for t, pos in enumerate(travel):
        p = min(_even(pos), size - side)
        if direction in ("left", "right"):
            video[t, mid : mid + side, p : p + side] = PALETTE[color]
        else:
            video[t, p : p + side, mid : mid + side] = PALETTE[color]
    return video


def _answer_letter(seed: int, task: str, k: int) -> int:
    """Index of the correct letter for the k-th record of `task`: a seeded permutation of 0..3
    per block of 4, so letters are exactly balanced per task."""
    block, pos = divmod(k, 4)
    rng = np.random.default_rng([seed, TASKS.index(task), block, 7919])
    return int(rng.permutation(4)[pos])


def make_example(
    i: int, *, frames: int = 16, size: int = 64, seed: int = 0
) -> tuple[dict[str, Any], np.ndarray]:
    """Record i (without "video") and its frames uint8 [frames, size, size, 3].

    Pure function of (i, frames, size, seed). Task = TASKS[i % 3].
    """
    task = TASKS[i % len(TASKS)]
    letter = _answer_letter(seed, task, i // len(TASKS))
    rng = np.random.default_rng([seed, i, 104729])
    if task == "color_order":
        # Options: the 4 colours shown, in palette order; the answer sits at `letter`.
        shown = {str(c) for c in rng.choice(list(PALETTE), NUM_SEGMENTS, replace=False)}
        options = [c for c in PALETTE if c in shown]
        answer = options[letter]
        which = ("first", "last")[int(rng.integers(2))]
        rest = [options[j] for j in rng.permutation(NUM_SEGMENTS) if options[j] != answer]
        order = [answer, *rest] if which == "first" else [*rest, answer]
        question = str(rng.choice(_COLOR_Q[which]))
        reasoning = f"order {', '.join(order)}; {which} {answer}"
        video = _color_order_frames(order, frames, size)
    elif task == "count":
        k = letter + 1  # options are "1".."4" in order
        on = sorted(int(s) for s in rng.choice(NUM_SEGMENTS, k, replace=False))
        parts = [str(s + 1) for s in on]
        question = str(rng.choice(_COUNT_Q))
        options = [str(j) for j in range(1, NUM_SEGMENTS + 1)]
        reasoning = f"flashes in part {', '.join(parts)}: {k}"
        video = _count_frames(on, frames, size)
    else:
        direction = DIRECTIONS[letter]  # options always in DIRECTIONS order
        color = str(rng.choice(list(PALETTE)))
        question = str(rng.choice(_DIRECTION_Q))
        options = list(DIRECTIONS)
        start, end = _EDGES[direction]
        reasoning = f"{start} to {end}: {direction}"
        video = _direction_frames(direction, color, frames, size)
    record = {
        "id": f"synth-{i:05d}",
        "question": question,
        "options": options,
        "answer": LETTERS[letter],
        "reasoning": reasoning,
        "task": task,
    }
    return record, video


def write_mp4(path: str | os.PathLike, video: np.ndarray, fps: int = 8) -> None:
    """Encode uint8 [T, H, W, 3] RGB (H, W even) to an mp4 (mpeg4, yuv420p, near-lossless)."""
    import av  # lazy: keeps `import jaxstack.data` light

    t, h, w, _ = video.shape
    if h % 2 or w % 2:
        raise ValueError(f"yuv420p needs even height/width, got {h}x{w}")
    with av.open(os.fspath(path), "w") as container:
        stream = container.add_stream(CODEC, rate=int(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        ctx = stream.codec_context
        ctx.bit_rate = max(2_000_000, 8 * h * w * int(fps))
        ctx.qmin, ctx.qmax = 1, 3
        ctx.thread_count = 1
        for frame in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def _write_jsonl(path: str, records: list[dict[str, Any]]) -> None:
    """Write records atomically (temp file + rename)."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _remove_stale_clips(videos_dir: str, keep: set[str]) -> None:
    """Delete this module's clips (CLIP_NAME) in videos_dir that are not in `keep`."""
    for name in os.listdir(videos_dir):
        path = os.path.join(videos_dir, name)
        if CLIP_NAME.fullmatch(name) and name not in keep and os.path.isfile(path):
            os.remove(path)


def synth_video_dataset(
    out_dir: str | os.PathLike,
    num: int,
    *,
    frames: int = 16,
    size: int = 64,
    fps: int = 8,
    seed: int = 0,
    eval_fraction: float = 0.2,
) -> dict[str, Any]:
    """Write `num` clips to out_dir/videos and their questions to train.jsonl / eval.jsonl.

    The last round(num * eval_fraction) records form eval.jsonl (disjoint ids); the rest form
    train.jsonl. Videos are written first, JSONL next; then clips of an earlier run in
    out_dir/videos that the new set does not use (only names of the form synth-<id>.mp4; other
    files are left alone) are removed. Existing files are overwritten.
    Returns {"out_dir", "train", "eval", "num_train", "num_eval", "tasks": {task: n},
    "answers": {letter: n}, "frames", "size", "fps", "codec"}.
    """
    if num < 1:
        raise ValueError(f"num must be >= 1, got {num}")
    if frames < NUM_SEGMENTS:
        raise ValueError(f"frames must be >= {NUM_SEGMENTS}, got {frames}")
    if size < 16 or size % 2:
        raise ValueError(f"size must be even and >= 16, got {size}")
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    out_dir = os.fspath(out_dir)
    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    records = []
    for i in range(num):
        record, video = make_example(i, frames=frames, size=size, seed=seed)
        rel = f"videos/{record['id']}.mp4"
        write_mp4(os.path.join(out_dir, rel), video, fps=fps)
        records.append({"id": record["id"], "video": rel, **record})
    n_eval = int(round(num * eval_fraction))
    train, evals = records[: num - n_eval], records[num - n_eval :]
    train_path = os.path.join(out_dir, "train.jsonl")
    eval_path = os.path.join(out_dir, "eval.jsonl")
    _write_jsonl(train_path, train)
    _write_jsonl(eval_path, evals)
    _remove_stale_clips(
        os.path.join(out_dir, "videos"), {os.path.basename(r["video"]) for r in records}
    )
    return {
        "out_dir": out_dir,
        "train": train_path,
        "eval": eval_path,
        "num_train": len(train),
        "num_eval": len(evals),
        "tasks": dict(Counter(r["task"] for r in records)),
        "answers": {k: v for k, v in sorted(Counter(r["answer"] for r in records).items())},
        "frames": frames,
        "size": size,
        "fps": fps,
        "codec": CODEC,
    }


def add_synth_video_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the `data synth-video` options: --out --num --frames --size --fps --seed --eval-fraction."""
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--num", type=int, default=600, help="number of clips (default 600)")
    parser.add_argument("--frames", type=int, default=16, help="frames per clip (default 16)")
    parser.add_argument("--size", type=int, default=64, help="frame side in pixels, even")
    parser.add_argument("--fps", type=int, default=8, help="frame rate written to the mp4")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-fraction", type=float, default=0.2, help="held-out fraction")
    return parser


def run_synth_video(args: argparse.Namespace) -> int:
    """Generate the dataset from parsed `add_synth_video_args` options; print one line; return 0."""
    t0 = time.perf_counter()
    s = synth_video_dataset(
        args.out,
        args.num,
        frames=args.frames,
        size=args.size,
        fps=args.fps,
        seed=args.seed,
        eval_fraction=args.eval_fraction,
    )
    tasks = ", ".join(f"{k}={v}" for k, v in s["tasks"].items())
    print(
        f"synth-video: {s['num_train']} train + {s['num_eval']} eval clips "
        f"({s['frames']}x{s['size']}x{s['size']} @ {s['fps']} fps, {s['codec']}; {tasks}) "
        f"-> {s['out_dir']} in {time.perf_counter() - t0:.1f}s"
    )
    return 0
