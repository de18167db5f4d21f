"""NVILA Dynamic-S2: multi-scale tiling of one image (NumPy) and feature merging (JAX).

Follows NVlabs/VILA `llava/mm_utils.py` (`find_closest_aspect_ratio`,
`dynamic_s2_preprocess`) and `llava_arch.py` (`merge_chessboard`, `split_chessboard`,
`merge_features_for_dynamic_s2`). Grids are (cols, rows) = (i, j) tiles across width and
height as in VILA's `target_ratios`; `dynamic_s2_tiles` returns the last scale's block size as
(rows, cols), the order VILA passes to `merge_chessboard`.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def dynamic_s2_grids(min_tiles: int = 9, max_tiles: int = 12) -> list[tuple[int, int]]:
    """All grids (i, j) with min_tiles <= i*j <= max_tiles, sorted by (i*j, i, j)."""
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    grids = {
        (i, j)
        for i in range(1, max_tiles + 1)
        for j in range(1, max_tiles + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda g: (g[0] * g[1], g[0], g[1]))


def find_closest_aspect_ratio(
    aspect: float, grids: Sequence[tuple[int, int]], width: int, height: int, tile: int
) -> tuple[int, int]:
    """Grid (i, j) (i tiles across width, j down height) whose i/j is closest to `aspect`.

    Grids are scanned in order; on an exact tie the later (larger) grid wins when the image
    area width*height exceeds 0.5 * tile^2 * i * j (VILA's rule).
    """
    best, best_diff = (1, 1), float("inf")
    area = width * height
    for i, j in grids:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and area > 0.5 * tile * tile * i * j:
            best = (i, j)
    return best


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    return np.where(
        x < 1,
        ((a + 2) * x - (a + 3)) * x * x + 1,
        np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0),
    )


def _resize_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] antialiased bicubic weights (PIL-style support scaling), rows sum to 1."""
    scale = n_in / n_out
    support = max(scale, 1.0)
    centers = (np.arange(n_out) + 0.5) * scale
    src = np.arange(n_in) + 0.5
    w = _cubic((src[None, :] - centers[:, None]) / support)
    return w / w.sum(axis=1, keepdims=True)


def resize_image(image_hwc: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bicubic (a=-0.5, antialiased when shrinking) resize. [H, W, C] -> float32 [h, w, C].

    Close to PIL's BICUBIC (VILA's `image.resize` default) but computed in float without
    uint8 rounding.
    """
    x = np.asarray(image_hwc, np.float32)
    if x.ndim != 3:
        raise ValueError(f"image must be [H, W, C], got shape {x.shape}")
    rh = _resize_matrix(x.shape[0], height)
    rw = _resize_matrix(x.shape[1], width)
    return np.einsum("oh,hwc,pw->opc", rh, x, rw, optimize=True).astype(np.float32)


def _tile(image_hwc: np.ndarray, rows: int, cols: int, tile: int) -> np.ndarray:
    """Resize to (rows*tile, cols*tile) and cut row-major tiles -> [rows*cols, tile, tile, C]."""
    x = resize_image(image_hwc, rows * tile, cols * tile)
    x = x.reshape(rows, tile, cols, tile, x.shape[-1]).transpose(0, 2, 1, 3, 4)
    return x.reshape(rows * cols, tile, tile, x.shape[-1])


def dynamic_s2_tiles(
    image_hwc: np.ndarray,
    scales: Sequence[int] = (448, 896, 1344),
    tile: int = 448,
    max_num: int = 12,
) -> tuple[list[np.ndarray], tuple[int, int]]:
    """Dynamic-S2 tiles of one image (uint8 or float [H, W, C]).

    Non-final scales s: square resize to tile*(s//scales[0]) and (s//scales[0])^2 tiles.
    Last scale: grid (i, j) from `find_closest_aspect_ratio` over
    `dynamic_s2_grids((scales[-1]//scales[0])^2, max_num)`, resize to (tile*j, tile*i) (H, W).
    Returns (tiles per scale, each float32 [n_s, tile, tile, C] in row-major order,
    (rows, cols) = (j, i) of the last scale).
    """
    image = np.asarray(image_hwc)
    if image.ndim != 3:
        raise ValueError(f"image must be [H, W, C], got shape {image.shape}")
    height, width = image.shape[:2]
    base = scales[0]
    min_num = (scales[-1] // base) ** 2
    if min_num > max_num:
        raise ValueError(f"max_num={max_num} is below the last scale's {min_num} tiles")
    tiles = []
    for s in scales[:-1]:
        n = s // base
        tiles.append(_tile(image, n, n, tile))
    i, j = find_closest_aspect_ratio(
        width / height, dynamic_s2_grids(min_num, max_num), width, height, tile
    )
    tiles.append(_tile(image, j, i, tile))
    return tiles, (j, i)


def merge_chessboard(x_nhwc: Array, rows: int, cols: int) -> Array:
    """Stitch row-major tiles [rows*cols, h, w, C] into one map [rows*h, cols*w, C]."""
    n, h, w, c = x_nhwc.shape
    if n != rows * cols:
        raise ValueError(f"{n} tiles do not fill a {rows}x{cols} grid")
    x = x_nhwc.reshape(rows, cols, h, w, c).transpose(0, 2, 1, 3, 4)
    return x.reshape(rows * h, cols * w, c)


def split_chessboard(x_hwc: Array, rows: int, cols: int) -> Array:
    """Cut a map [H, W, C] into row-major tiles [rows*cols, H/rows, W/cols, C]."""
    h, w, c = x_hwc.shape
    if h % rows or w % cols:
        raise ValueError(f"map {h}x{w} does not split into a {rows}x{cols} grid")
    x = x_hwc.reshape(rows, h // rows, cols, w // cols, c).transpose(0, 2, 1, 3, 4)
    return x.reshape(rows * cols, h // rows, w // cols, c)


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """[n_out, n_in] adaptive-average-pool weights (torch `F.interpolate(mode="area")`)."""
    m = np.zeros((n_out, n_in), np.float32)
    for o in range(n_out):
        start = (o * n_in) // n_out
        end = -(-((o + 1) * n_in) // n_out)
        m[o, start:end] = 1.0 / (end - start)
    return m


def area_resize(x_hwc: Array, height: int, width: int) -> Array:
    """Area (adaptive average pool) resize [H, W, C] -> [height, width, C], float32 math."""
    ph = jnp.asarray(_area_matrix(x_hwc.shape[0], height))
    pw = jnp.asarray(_area_matrix(x_hwc.shape[1], width))
    y = jnp.einsum("oh,hwc,pw->opc", ph, x_hwc.astype(jnp.float32), pw)
    return y.astype(x_hwc.dtype)


def merge_s2_features(
    features_per_scale: Sequence[Array],
    grids: Sequence[tuple[int, int]],
    resize_output_to_scale_idx: int = -1,
) -> tuple[Array, tuple[int, int]]:
    """VILA `merge_features_for_dynamic_s2` for one image, then re-split into blocks.

    features_per_scale: per scale, tile tokens [n_s, N, C] (N square, row-major) or maps
    [n_s, h, w, C]; grids: per scale (rows, cols) with rows*cols = n_s. Each scale's tiles are
    stitched, area-resized to the map size of scale `resize_output_to_scale_idx` and
    concatenated on channels, then cut back into that scale's grid. Returns
    (blocks [rows*cols, h*w, C*S], (rows, cols)); each block is one tile-sized token grid.
    """
    if len(features_per_scale) != len(grids):
        raise ValueError(f"{len(features_per_scale)} feature sets but {len(grids)} grids")
    maps = []
    for feats, (rows, cols) in zip(features_per_scale, grids, strict=True):
        if feats.ndim == 3:
            n, tokens, c = feats.shape
            side = int(round(tokens**0.5))
            if side * side != tokens:
                raise ValueError(f"token count {tokens} is not a square number")
            feats = feats.reshape(n, side, side, c)
        maps.append(merge_chessboard(feats, rows, cols))
    out_h, out_w = maps[resize_output_to_scale_idx].shape[:2]
    merged = jnp.concatenate([area_resize(m, out_h, out_w) for m in maps], axis=-1)
    rows, cols = grids[resize_output_to_scale_idx]
    blocks = split_chessboard(merged, rows, cols)
    return blocks.reshape(blocks.shape[0], -1, blocks.shape[-1]), (rows, cols)


__all__ = [
    "area_resize",
    "dynamic_s2_grids",
    "dynamic_s2_tiles",
    "find_closest_aspect_ratio",
    "merge_chessboard",
    "merge_s2_features",
    "resize_image",
    "split_chessboard",
]
