"""Video decoding (decord / PyAV) and the synthetic long-video QA dataset."""

import argparse
import json
import os
import re
from collections import Counter

import numpy as np
import pytest

from jaxstack.data import video
from jaxstack.data.synth_video import PALETTE, add_synth_video_args, run_synth_video
from jaxstack.data.synth_video import synth_video_dataset as synth
from jaxstack.data.video import (
    VideoError,
    load_video,
    normalize_frames,
    sample_indices,
    video_info,
)

try:
    import decord  # noqa: F401

    HAVE_DECORD = True
except ImportError:
    HAVE_DECORD = False

BACKENDS = ["pyav", "auto"] + (["decord"] if HAVE_DECORD else [])
KEYS = ["id", "video", "question", "options", "answer", "reasoning", "task"]
NUM = 12


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    summary = synth(out, NUM, seed=3)
    records = {}
    for split in ("train", "eval"):
        with open(out / f"{split}.jsonl") as f:
            records[split] = [json.loads(line) for line in f]
    return out, summary, records


def _all(records):
    return records["train"] + records["eval"]


def test_jsonl_schema_and_balance(dataset):
    out, summary, records = dataset
    assert len(records["eval"]) == round(NUM * 0.2) == summary["num_eval"]
    assert len(records["train"]) == NUM - summary["num_eval"] == summary["num_train"]
    ids = [r["id"] for r in _all(records)]
    assert len(set(ids)) == NUM  # train/eval disjoint
    for r in _all(records):
        assert list(r) == KEYS
        assert r["video"] == f"videos/{r['id']}.mp4" and (out / r["video"]).is_file()
        assert len(r["options"]) == 4 and len(set(r["options"])) == 4
        assert r["answer"] in "ABCD" and len(r["reasoning"]) < 50
        answer = r["options"]["ABCD".index(r["answer"])]
        assert answer in r["reasoning"] or (r["task"] == "count" and answer == "1")
    assert Counter(r["task"] for r in _all(records)) == {
        "color_order": 4,
        "count": 4,
        "direction": 4,
    }
    assert Counter(r["answer"] for r in _all(records)) == {"A": 3, "B": 3, "C": 3, "D": 3}
    assert summary["tasks"] == {"color_order": 4, "count": 4, "direction": 4}


def test_deterministic(tmp_path, dataset):
    out, _, _ = dataset
    synth(tmp_path / "a", NUM, seed=3)
    for split in ("train.jsonl", "eval.jsonl"):
        assert (tmp_path / "a" / split).read_bytes() == (out / split).read_bytes()
    first = (out / "videos" / "synth-00000.mp4").read_bytes()
    assert (tmp_path / "a" / "videos" / "synth-00000.mp4").read_bytes() == first
    synth(tmp_path / "b", NUM, seed=4)
    assert (tmp_path / "b" / "train.jsonl").read_bytes() != (out / "train.jsonl").read_bytes()


def test_cli_entry(tmp_path, capsys):
    args = add_synth_video_args(argparse.ArgumentParser()).parse_args(
        ["--out", str(tmp_path), "--num", "3", "--frames", "8", "--size", "32"]
    )
    assert run_synth_video(args) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and "synth-video" in line
    assert load_video(tmp_path / "videos" / "synth-00000.mp4").shape == (8, 32, 32, 3)


def _nearest_colour(rgb):
    names = list(PALETTE)
    d = [np.abs(np.asarray(PALETTE[n], float) - rgb).sum() for n in names]
    return names[int(np.argmin(d))]


def _segments(t):
    return np.array_split(np.arange(t), 4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_matches_drawing(dataset, backend):
    out, _, records = dataset
    for r in _all(records):
        frames = load_video(out / r["video"], backend=backend)
        assert frames.shape == (16, 64, 64, 3) and frames.dtype == np.uint8
        assert video_info(out / r["video"], backend=backend) == (16, 8.0)
        if r["task"] == "color_order":
            order = re.search(r"order (.*);", r["reasoning"]).group(1).split(", ")
            seen = [_nearest_colour(frames[s, 28:36, 28:36].mean((0, 1, 2))) for s in _segments(16)]
            assert seen == order
            assert frames[:, :4, :4].max() < 30  # black background
        elif r["task"] == "count":
            flashes = [frames[s[:2], 28:36, 28:36].mean() > 200 for s in _segments(16)]
            assert all(frames[s[2:]].max() < 30 for s in _segments(16))  # off halves
            assert str(sum(flashes)) == r["options"]["ABCD".index(r["answer"])]
        else:
            direction = r["options"]["ABCD".index(r["answer"])]
            ys, xs = [], []
            for f in (frames[0], frames[-1]):
                y, x = np.nonzero(f.max(-1) > 128)
                ys.append(y.mean())
                xs.append(x.mean())
            dy, dx = ys[1] - ys[0], xs[1] - xs[0]
            got = (
                ("right" if dx > 0 else "left")
                if abs(dx) > abs(dy)
                else ("down" if dy > 0 else "up")
            )
            assert got == direction and max(abs(dx), abs(dy)) > 30


def test_backends_agree_and_sample(dataset):
    out, _, records = dataset
    path = out / records["train"][0]["video"]
    full = load_video(path, backend="pyav")
    if HAVE_DECORD:
        assert np.array_equal(load_video(path, backend="decord"), full)
    for backend in BACKENDS:
        sub = load_video(path, num_frames=5, backend=backend)
        assert np.array_equal(sub, full[[0, 4, 8, 11, 15]])
        assert np.array_equal(load_video(path, fps=2, backend=backend), full[[0, 4, 8, 12]])
        resized = load_video(path, num_frames=3, size=(56, 48), backend=backend)
        assert resized.shape == (3, 56, 48, 3) and resized.dtype == np.uint8


def test_auto_falls_back_to_pyav(dataset, monkeypatch):
    out, _, records = dataset
    path = out / records["train"][0]["video"]

    def no_decord(_):
        raise ImportError("no decord")

    monkeypatch.setattr(video, "_decord_reader", no_decord)
    assert load_video(path).shape == (16, 64, 64, 3)
    with pytest.raises(VideoError, match="decord is not installed"):
        load_video(path, backend="decord")


def test_sample_indices():
    np.testing.assert_array_equal(sample_indices(10, num_frames=4), [0, 3, 6, 9])
    np.testing.assert_array_equal(sample_indices(16, num_frames=1), [0])
    np.testing.assert_array_equal(sample_indices(3, num_frames=5), [0, 0, 1, 2, 2])
    np.testing.assert_array_equal(sample_indices(10, fps=2, video_fps=8), [0, 4, 8])
    np.testing.assert_array_equal(sample_indices(10, fps=3, video_fps=8), [0, 2, 5, 8])
    np.testing.assert_array_equal(sample_indices(4, fps=30, video_fps=8), [0, 1, 2, 3])
    assert sample_indices(100, fps=1, video_fps=30).dtype.kind == "i"
    for kwargs in ({}, {"num_frames": 2, "fps": 1, "video_fps": 8}, {"fps": 1}, {"num_frames": 0}):
        with pytest.raises(ValueError):
            sample_indices(10, **kwargs)
    with pytest.raises(ValueError):
        sample_indices(0, num_frames=2)


def test_normalize_frames():
    x = np.array([[[[0, 255, 51]]]], np.uint8)
    y = normalize_frames(x)
    assert y.dtype == np.float32 and y.shape == x.shape
    np.testing.assert_allclose(y[0, 0, 0], [-1.0, 1.0, -0.6], atol=1e-6)
    z = normalize_frames(x, mean=(0.0, 0.5, 0.2), std=(1.0, 0.25, 0.1))
    np.testing.assert_allclose(z[0, 0, 0], [0.0, 2.0, 0.0], atol=1e-6)


def _bad_files(tmp_path, dataset):
    out, _, records = dataset
    good = (out / records["train"][0]["video"]).read_bytes()
    files = {
        "missing": tmp_path / "missing.mp4",
        "empty": tmp_path / "empty.mp4",
        "random": tmp_path / "random.mp4",
        "truncated": tmp_path / "truncated.mp4",
    }
    files["empty"].write_bytes(b"")
    files["random"].write_bytes(np.random.default_rng(0).bytes(4096))
    files["truncated"].write_bytes(good[: len(good) // 2])
    return files


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_name_the_file(tmp_path, dataset, backend):
    for kind, path in _bad_files(tmp_path, dataset).items():
        for fn in (load_video, video_info):
            with pytest.raises(VideoError) as exc:
                fn(path, backend=backend)
            assert str(path) in str(exc.value), kind
            assert exc.value.path == os.fspath(path)
            assert isinstance(exc.value, ValueError)
    with pytest.raises(ValueError, match="backend"):
        load_video(tmp_path / "x.mp4", backend="opencv")
    with pytest.raises(ValueError, match="positive"):
        load_video(tmp_path / "x.mp4", num_frames=0, backend=backend)


def test_zero_frame_video(tmp_path):
    import av

    path = tmp_path / "zero.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=8)
        s.width = s.height = 64
        s.pix_fmt = "yuv420p"
        c.start_encoding()
    assert path.stat().st_size > 0
    for backend in BACKENDS:
        with pytest.raises(VideoError, match=re.escape(str(path))):
            load_video(path, backend=backend)


def test_synth_rejects_bad_args(tmp_path):
    with pytest.raises(ValueError):
        synth(tmp_path, 2, size=63)
    with pytest.raises(ValueError):
        synth(tmp_path, 0)


def test_synth_rewrite_removes_its_old_clips_only(tmp_path):
    synth(tmp_path, 5, frames=4, size=16)
    videos = tmp_path / "videos"
    (videos / "mine.mp4").write_bytes(b"user clip")  # not the synth-<id>.mp4 pattern: kept
    (videos / "synth-notes.txt").write_text("user notes")
    synth(tmp_path, 2, frames=4, size=16)
    names = sorted(p.name for p in videos.iterdir())
    assert names == ["mine.mp4", "synth-00000.mp4", "synth-00001.mp4", "synth-notes.txt"]
    used = {json.loads(line)["video"] for s in ("train", "eval")
            for line in (tmp_path / f"{s}.jsonl").read_text().splitlines()}  # fmt: skip
    assert used == {"videos/synth-00000.mp4", "videos/synth-00001.mp4"}
