"""Synthetic captioned shapes for text-to-image training, with a programmatic judge.

Each image shows one filled shape on a grey background; its caption names the colour, the shape
and the quadrant: "a red triangle at the top left". There are 4 x 3 x 4 = 48 captions; a
deterministic subset is held out of training (`split_captions`), so accuracy on it measures
whether a model composes attributes it has only seen apart. `read_shape` reads colour, shape and
quadrant back from any RGB image (generated or drawn), and `judge` scores an image against its
caption: the embedded DiT job's accuracy and best-of-N selection both use it.
"""

from __future__ import annotations

import itertools
import random

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 230),
    "yellow": (235, 205, 30),
}
SHAPES = ("square", "circle", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND = (128, 128, 128)
# Word vocabulary of the captions: id 0 pads, every caption is CAPTION_LEN ids.
VOCAB = ("<pad>", "a", "at", "the", *COLOURS, *SHAPES, "top", "bottom", "left", "right")
CAPTION_LEN = 7


def all_captions() -> list[str]:
    return [f"a {c} {s} at the {p}" for c, s, p in itertools.product(COLOURS, SHAPES, POSITIONS)]


def parse_caption(caption: str) -> tuple[str, str, str]:
    """(colour, shape, position) of a caption made by `all_captions`; ValueError otherwise."""
    words = caption.split()
    if len(words) != 7 or words[0] != "a" or words[3:5] != ["at", "the"]:
        raise ValueError(f"not a shapes caption: {caption!r}")
    colour, shape, position = words[1], words[2], " ".join(words[5:])
    if colour not in COLOURS or shape not in SHAPES or position not in POSITIONS:
        raise ValueError(f"not a shapes caption: {caption!r}")
    return colour, shape, position


def split_captions(held_out: int = 8, seed: int = 0) -> tuple[list[str], list[str]]:
    """(train, held-out) captions. Every attribute value still occurs in training."""
    captions = all_captions()
    rng = random.Random(f"shapes-split:{seed}")
    for _ in range(1000):
        held = rng.sample(captions, held_out)
        train = [c for c in captions if c not in held]
        seen = [set(parse_caption(c)[i] for c in train) for i in range(3)]
        if all(len(s) == n for s, n in zip(seen, (len(COLOURS), len(SHAPES), len(POSITIONS)))):
            return train, held
    raise ValueError(f"cannot hold out {held_out} captions and keep every attribute in training")


def tokenize_caption(caption: str) -> np.ndarray:
    """int32 [CAPTION_LEN] word ids (0 = padding)."""
    ids = [VOCAB.index(w) for w in caption.split()]
    if len(ids) > CAPTION_LEN:
        raise ValueError(f"caption longer than {CAPTION_LEN} words: {caption!r}")
    return np.asarray(ids + [0] * (CAPTION_LEN - len(ids)), np.int32)


def draw_shape(caption: str, size: int = 32, rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 [size, size, 3] image of the caption; `rng` jitters the shape's size and place."""
    colour, shape, position = parse_caption(caption)
    rng = rng or np.random.default_rng(0)
    half = size / 2
    r = half * rng.uniform(0.28, 0.38)  # half-width of the shape
    cy = half * (0.5 if position.startswith("top") else 1.5) + rng.uniform(-1, 1) * half * 0.08
    cx = half * (0.5 if position.endswith("left") else 1.5) + rng.uniform(-1, 1) * half * 0.08
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    dy, dx = y - cy, x - cx
    if shape == "square":
        inside = (np.abs(dx) <= r) & (np.abs(dy) <= r)
    elif shape == "circle":
        inside = dx**2 + dy**2 <= (r * 1.1) ** 2
    else:  # apex up, base at the bottom: width grows linearly from the apex
        t = (dy + r) / (2 * r)  # 0 at the apex, 1 at the base
        inside = (t >= 0) & (t <= 1) & (np.abs(dx) <= t * r * 1.1)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = BACKGROUND
    img[inside] = COLOURS[colour]
    return img


def read_shape(img: np.ndarray, min_pixels: int = 6) -> tuple[str, str, str] | None:
    """(colour, shape, position) read from an RGB image (uint8 [H, W, 3] or float in [-1, 1]),
    or None when no shape is visible.

    Foreground: pixels far from the grey background. Colour: the palette entry nearest the
    foreground's median colour. Position: the foreground centroid's quadrant. Shape: how much
    of its bounding box the foreground fills (square ~1, circle ~0.8, triangle ~0.5).
    """
    img = np.asarray(img)
    if img.dtype != np.uint8:
        img = np.clip((img.astype(np.float32) + 1) * 127.5, 0, 255)
    img = img.astype(np.float32)
    h, w = img.shape[:2]
    fg = np.linalg.norm(img - np.asarray(BACKGROUND, np.float32), axis=-1) > 60
    if fg.sum() < min_pixels:
        return None
    median = np.median(img[fg], axis=0)
    names = list(COLOURS)
    dist = [np.linalg.norm(median - np.asarray(COLOURS[n], np.float32)) for n in names]
    colour = names[int(np.argmin(dist))]
    ys, xs = np.nonzero(fg)
    position = ("top" if ys.mean() < h / 2 else "bottom") + (
        " left" if xs.mean() < w / 2 else " right"
    )
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = fg.sum() / box
    shape = "square" if fill > 0.9 else "circle" if fill > 0.66 else "triangle"
    return colour, shape, position


def judge(img: np.ndarray, caption: str) -> dict[str, bool]:
    """Per-attribute and overall agreement of an image with its caption."""
    want = parse_caption(caption)
    got = read_shape(img)
    parts = {
        k: got is not None and got[i] == want[i]
        for i, k in enumerate(("colour", "shape", "position"))
    }
    return {**parts, "all": all(parts.values())}
