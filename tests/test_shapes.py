"""The captioned-shapes set and its judge (jaxstack/data/shapes.py)."""

from __future__ import annotations

import numpy as np
import pytest

from jaxstack.data import shapes


@pytest.mark.parametrize("size", [32, 48])
def test_judge_reads_back_every_drawn_caption(size) -> None:
    rng = np.random.default_rng(size)
    for caption in shapes.all_captions():
        for _ in range(10):
            img = shapes.draw_shape(caption, size, rng)
            assert shapes.read_shape(img) == shapes.parse_caption(caption), caption
            # the float [-1, 1] layout a model outputs reads the same
            assert shapes.judge(img.astype(np.float32) / 127.5 - 1, caption)["all"]


def test_judge_rejects_wrong_attributes_and_blank_images() -> None:
    img = shapes.draw_shape("a red square at the top left", 32)
    verdict = shapes.judge(img, "a blue square at the bottom left")
    assert verdict == {"colour": False, "shape": True, "position": False, "all": False}
    assert not shapes.judge(img, "a red circle at the top left")["all"]
    blank = np.full((32, 32, 3), shapes.BACKGROUND, np.uint8)
    assert shapes.read_shape(blank) is None
    assert shapes.judge(blank, "a red square at the top left")["all"] is False
    noise = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert not shapes.judge(noise, "a red square at the top left")["all"]


def test_split_holds_out_captions_but_no_attribute() -> None:
    train, held = shapes.split_captions(held_out=8, seed=0)
    assert len(held) == 8 and len(train) == 40 and not set(train) & set(held)
    assert shapes.split_captions(held_out=8, seed=0) == (train, held)
    for i, values in enumerate((shapes.COLOURS, shapes.SHAPES, shapes.POSITIONS)):
        assert {shapes.parse_caption(c)[i] for c in train} == set(values)


def test_captions_tokenize_to_fixed_length_and_bad_captions_fail() -> None:
    ids = shapes.tokenize_caption("a green circle at the bottom right")
    assert ids.shape == (shapes.CAPTION_LEN,) and ids.dtype == np.int32
    assert [shapes.VOCAB[i] for i in ids] == "a green circle at the bottom right".split()
    with pytest.raises(ValueError, match="not a shapes caption"):
        shapes.parse_caption("a purple circle at the bottom right")
