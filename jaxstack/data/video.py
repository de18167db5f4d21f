"""Video decoding for VLM inputs: frame sampling, decoding (decord or PyAV) and normalisation.

`load_video` returns uint8 frames [T, H, W, 3] (RGB). It tries decord first (fast random access
via `VideoReader.get_batch`) and falls back to PyAV when decord is not installed or fails on the
file. Both backends are imported lazily. Every decoding failure (missing, empty, corrupt or
zero-frame file) raises `VideoError`, whose message names the file and the reason.

Frame sampling (`sample_indices`) follows NVILA: by count, the `num_frames` indices are
`np.linspace(0, n - 1, num_frames).round().astype(int)` (first and last frame always included);
by rate, one frame every `video_fps / fps` source frames starting at frame 0.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

BACKENDS = ("auto", "decord", "pyav")


class VideoError(ValueError):
    """A video could not be read; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = os.fspath(path)
        self.reason = reason
        super().__init__(f"cannot read video {self.path!r}: {reason}")


def sample_indices(
    num_frames_in_video: int,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    video_fps: float | None = None,
) -> np.ndarray:
    """Indices of the frames to keep, int64 [K], sorted ascending, all in [0, n).

    Exactly one of:
      num_frames: K = num_frames indices `linspace(0, n-1, K).round()` (NVILA style; K > n
        repeats frames).
      fps: one frame every `video_fps / fps` frames (floor of the fractional positions), so
        K = ceil(n * fps / video_fps); `video_fps` is required. If fps >= video_fps every frame
        is kept (no duplication).
    """
    n = int(num_frames_in_video)
    if n <= 0:
        raise ValueError(f"video has no frames (num_frames_in_video={n})")
    if (num_frames is None) == (fps is None):
        raise ValueError("give exactly one of num_frames or fps")
    if num_frames is not None:
        if num_frames <= 0:
            raise ValueError(f"num_frames must be positive, got {num_frames}")
        return np.linspace(0, n - 1, int(num_frames)).round().astype(np.int64)
    if fps is None or fps <= 0 or video_fps is None or video_fps <= 0:
        raise ValueError(f"sampling by fps needs fps > 0 and video_fps > 0, got {fps}, {video_fps}")
    step = max(video_fps / fps, 1.0)
    idx = np.floor(np.arange(0.0, n, step) + 1e-9).astype(np.int64)
    return idx[idx < n]


def _check_file(path: str) -> None:
    """Raise VideoError if `path` is missing, not a file, or empty."""
    if not os.path.exists(path):
        raise VideoError(path, "file not found")
    if not os.path.isfile(path):
        raise VideoError(path, "not a regular file")
    if os.path.getsize(path) == 0:
        raise VideoError(path, "file is empty (0 bytes)")


def _decord_reader(path: str):
    """A decord VideoReader on the CPU (ImportError if decord is missing)."""
    import decord  # lazy: optional dependency

    return decord.VideoReader(path, ctx=decord.cpu(0), num_threads=1)


def _info_decord(path: str) -> tuple[int, float]:
    vr = _decord_reader(path)
    if len(vr) <= 0:
        raise VideoError(path, "video has zero frames")
    return len(vr), float(vr.get_avg_fps())


def _info_pyav(path: str) -> tuple[int, float]:
    import av  # lazy

    with av.open(path) as container:
        if not container.streams.video:
            raise VideoError(path, "no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        n = int(stream.frames or 0)
        if n <= 0:  # container does not store a count: decode to count
            n = sum(1 for _ in container.decode(stream))
    if n <= 0:
        raise VideoError(path, "video has zero frames")
    return n, fps


def _select(n: int, video_fps: float, num_frames: int | None, fps: float | None) -> np.ndarray:
    """Frame indices to decode: all frames if neither num_frames nor fps, else sample_indices."""
    if num_frames is None and fps is None:
        return np.arange(n, dtype=np.int64)
    return sample_indices(n, num_frames=num_frames, fps=fps, video_fps=video_fps or None)


def _decode_decord(path: str, num_frames: int | None, fps: float | None) -> np.ndarray:
    vr = _decord_reader(path)
    n = len(vr)
    if n <= 0:
        raise VideoError(path, "video has zero frames")
    idx = _select(n, float(vr.get_avg_fps()), num_frames, fps)
    return np.asarray(vr.get_batch(list(map(int, idx))).asnumpy(), dtype=np.uint8)


def _decode_pyav(path: str, num_frames: int | None, fps: float | None) -> np.ndarray:
    """Decode sequentially, keeping only the sampled frames (all frames if no count is stored)."""
    import av  # lazy

    n, video_fps = _info_pyav(path)
    idx = _select(n, video_fps, num_frames, fps)
    wanted: dict[int, int] = {}
    for i in idx.tolist():
        wanted[i] = wanted.get(i, 0) + 1
    out: list[np.ndarray] = []
    with av.open(path) as container:
        stream = container.streams.video[0]
        for i, frame in enumerate(container.decode(stream)):
            if i in wanted:
                out.extend([frame.to_ndarray(format="rgb24")] * wanted[i])
            if i >= idx[-1]:
                break
    if len(out) != len(idx):
        raise VideoError(path, f"decoded {len(out)} of {len(idx)} requested frames (truncated?)")
    return np.stack(out).astype(np.uint8, copy=False)


def _resize(frames: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """Bilinear resize (PIL) of uint8 [T, H, W, 3] to [T, size[0], size[1], 3]."""
    from PIL import Image

    h, w = int(size[0]), int(size[1])
    if frames.shape[1:3] == (h, w):
        return frames
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in frames])


def _run_backend(name: str, path: str, fn, *args):
    """Call a backend, turning any non-VideoError failure into VideoError naming the file."""
    try:
        return fn(path, *args)
    except VideoError:
        raise
    except ImportError:
        raise
    except Exception as e:  # decord raises DECORDError, av raises InvalidDataError, ...
        raise VideoError(path, f"{name} failed: {type(e).__name__}: {e}") from e


def video_info(path: str | os.PathLike, *, backend: str = "auto") -> tuple[int, float]:
    """(num_frames, fps) of a video file (same backends as `load_video`).

    Raises VideoError if the file is missing, empty, corrupt or has zero frames.
    """
    path = os.fspath(path)
    return _dispatch(path, backend, _info_decord, _info_pyav)


def _dispatch(path: str, backend: str, decord_fn, pyav_fn, *args):
    """Run decord_fn (backend "decord", or "auto" first) or pyav_fn ("pyav", or auto fallback).

    With "auto", a missing or failing decord falls back to PyAV; if both fail the VideoError
    carries both reasons.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _check_file(path)
    decord_reason = None
    if backend in ("auto", "decord"):
        try:
            return _run_backend("decord", path, decord_fn, *args)
        except ImportError as e:
            if backend == "decord":
                raise VideoError(path, "decord is not installed") from e
        except VideoError as e:
            if backend == "decord":
                raise
            decord_reason = e.reason
    try:
        return _run_backend("pyav", path, pyav_fn, *args)
    except VideoError as e:
        if decord_reason is None:
            raise
        raise VideoError(path, f"{decord_reason}; {e.reason}") from e


def load_video(
    path: str | os.PathLike,
    *,
    num_frames: int | None = None,
    fps: float | None = None,
    size: Sequence[int] | None = None,
    backend: str = "auto",
) -> np.ndarray:
    """Decode sampled RGB frames of a video: uint8 [T, H, W, 3].

    Give num_frames or fps (see `sample_indices`); with neither, every frame is returned.
    size=(H, W) resizes each frame bilinearly. backend: "auto" (decord, PyAV fallback),
    "decord" or "pyav". Raises VideoError (naming the file) for missing, empty, corrupt or
    zero-frame videos.
    """
    path = os.fspath(path)
    if num_frames is not None and fps is not None:
        raise ValueError("give at most one of num_frames or fps")
    if (num_frames is not None and num_frames <= 0) or (fps is not None and fps <= 0):
        raise ValueError(f"num_frames and fps must be positive, got {num_frames}, {fps}")
    frames = _dispatch(path, backend, _decode_decord, _decode_pyav, num_frames, fps)
    if size is not None:
        frames = _resize(frames, size)
    return frames


def normalize_frames(
    frames: np.ndarray,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> np.ndarray:
    """SigLIP normalisation of uint8 [..., 3] frames: (x / 255 - mean) / std, float32 same shape.

    With the default mean = std = 0.5 the result lies in [-1, 1].
    """
    x = np.asarray(frames, dtype=np.float32) / 255.0
    mean_a = np.asarray(mean, dtype=np.float32)
    std_a = np.asarray(std, dtype=np.float32)
    return (x - mean_a) / std_a
