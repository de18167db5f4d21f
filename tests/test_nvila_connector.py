"""NVILA connector and Dynamic-S2 tests: transformers InternVL parity plus NumPy/torch oracles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstack.data import s2_tiling as s2
from jaxstack.hf.nvila_projector import projector_from_state_dict
from jaxstack.models import nvila_connector as nc

torch = pytest.importorskip("torch")
internvl = pytest.importorskip("transformers.models.internvl.modeling_internvl")


def _np_flat_square(x: np.ndarray, f: int) -> np.ndarray:
    """NumPy port of VILA flat_square_{2x2,3x3}: pad, view/permute/view/permute."""
    n, w, h, c = x.shape
    if w % f:
        x = np.concatenate([x, np.zeros((n, f - w % f, h, c), x.dtype)], axis=1)
    n, w, h, c = x.shape
    if h % f:
        x = np.concatenate([x, np.zeros((n, w, f - h % f, c), x.dtype)], axis=2)
    n, w, h, c = x.shape
    x = x.reshape(n, w, h // f, c * f).transpose(0, 2, 1, 3)
    return x.reshape(n, h // f, w // f, c * f * f).transpose(0, 2, 1, 3)


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (1, 8, 8, 5), (3, 2, 10, 4)])
def test_space_to_channel_2x2_equals_internvl_pixel_shuffle(shape):
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    # pixel_shuffle does not touch `self`: call it unbound on the class.
    ref = internvl.InternVLModel.pixel_shuffle(None, torch.from_numpy(x), 0.5).numpy()
    out = np.asarray(nc.space_to_channel(jnp.asarray(x), 2))
    assert out.shape == ref.shape
    assert np.array_equal(out, ref)


@pytest.mark.parametrize("factor,shape", [(2, (2, 5, 7, 3)), (3, (1, 7, 8, 2)), (3, (2, 9, 6, 4))])
def test_space_to_channel_padding(factor, shape):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float32)
    out = np.asarray(nc.space_to_channel(jnp.asarray(x), factor))
    b, h, w, c = shape
    assert out.shape == (b, -(-h // factor), -(-w // factor), factor * factor * c)
    np.testing.assert_array_equal(out, _np_flat_square(x, factor))
    # padded positions are zero: bottom-right output cell, last sub-position
    if h % factor or w % factor:
        assert np.all(out[:, -1, -1, -c:] == 0)


def _tiny_internvl_projector(vision_dim: int, llm_dim: int):
    from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

    cfg = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=vision_dim,
            intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=28,
            patch_size=14,
        ),
        text_config=Qwen2Config(
            vocab_size=64,
            hidden_size=llm_dim,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
        ),
        downsample_ratio=0.5,
        projector_hidden_act="gelu",
    )
    torch.manual_seed(0)
    proj = internvl.InternVLMultiModalProjector(cfg).eval()
    with torch.no_grad():  # non-trivial LayerNorm affine
        proj.layer_norm.weight.normal_(1.0, 0.2)
        proj.layer_norm.bias.normal_(0.0, 0.2)
    return proj


def test_projector2x2_matches_internvl():
    c, d = 8, 32
    proj = _tiny_internvl_projector(c, d)
    model = projector_from_state_dict(proj.state_dict(), "internvl")
    x = np.random.default_rng(2).standard_normal((2, 6, 6, c)).astype(np.float32)
    with torch.no_grad():
        shuffled = internvl.InternVLModel.pixel_shuffle(None, torch.from_numpy(x), 0.5)
        ref = proj(shuffled.reshape(2, -1, 4 * c)).numpy()
    out = np.asarray(model(jnp.asarray(x)))
    assert out.shape == ref.shape == (2, 9, d)
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel <= 1e-5, rel
    # logical axes metadata uses names from the rules table
    from jaxstack.parallel.mesh import RULES

    for _, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        axes = var.get_metadata()["logical_axes"]
        assert all(a in RULES for a in axes)


def test_projector3x3_against_torch_sequential():
    c, d = 4, 16
    tnn = torch.nn
    torch.manual_seed(1)
    seq = tnn.Sequential(
        tnn.Identity(),
        tnn.LayerNorm(9 * c),
        tnn.Linear(9 * c, 3 * c),
        tnn.GELU(),
        tnn.LayerNorm(3 * c),
        tnn.Linear(3 * c, d),
        tnn.GELU(),
        tnn.Linear(d, d),
    ).eval()
    sd = {f"layers.{k}": v for k, v in seq.state_dict().items()}
    model = projector_from_state_dict(sd, "vila_3x3")
    x = np.random.default_rng(3).standard_normal((2, 7, 5, c)).astype(np.float32)
    flat = _np_flat_square(x, 3)  # [2, 3, 2, 9c]
    with torch.no_grad():
        ref = seq(torch.from_numpy(flat.reshape(2, -1, 9 * c))).numpy()
    out = np.asarray(model(jnp.asarray(x)))
    assert out.shape == (2, 6, d)
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel <= 1e-5, rel


def test_temporal_pool_and_separators():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((19, 4, 3)).astype(np.float32)
    sep = rng.standard_normal((3,)).astype(np.float32)
    pooled = np.asarray(nc.temporal_pool(jnp.asarray(x), 8))
    ref = np.stack([x[k : k + 8].mean(0) for k in range(0, 19, 8)])
    np.testing.assert_allclose(pooled, ref, rtol=1e-6, atol=1e-6)
    seq = np.asarray(nc.interleave_separators(jnp.asarray(pooled), jnp.asarray(sep)))
    ref_seq = np.concatenate([np.concatenate([g, sep[None]]) for g in pooled])
    np.testing.assert_array_equal(seq, ref_seq)
    # NVILA shape check (scaled down): 32 frames, 4x4 SigLIP grid, groups of 8
    proj = nc.Projector2x2(3, 5, rngs=nnx.Rngs(0))
    out = nc.project_video(
        proj, jnp.asarray(rng.standard_normal((32, 16, 3)), jnp.float32), 8, jnp.ones((5,))
    )
    assert out.shape == (4 * (4 + 1), 5)
    np.testing.assert_array_equal(np.asarray(out[4::5]), np.ones((4, 5)))


def test_merge_multimodal():
    rng = np.random.default_rng(5)
    ids = np.array([[1, 9, 9, 2, 9], [9, 3, 4, 9, 9]], np.int32)
    text = rng.standard_normal((2, 5, 4)).astype(np.float32)
    media = rng.standard_normal((6, 4)).astype(np.float32)
    ref = text.copy()
    k = 0
    for b in range(2):
        for t in range(5):
            if ids[b, t] == 9:
                ref[b, t] = media[k]
                k += 1
    out = nc.merge_multimodal(jnp.asarray(text), jnp.asarray(ids), jnp.asarray(media), 9)
    np.testing.assert_array_equal(np.asarray(out), ref)
    jitted = jax.jit(nc.merge_multimodal, static_argnums=3)
    np.testing.assert_array_equal(
        np.asarray(jitted(jnp.asarray(text), jnp.asarray(ids), jnp.asarray(media), 9)), ref
    )
    with pytest.raises(ValueError, match="5 media embeddings"):
        nc.merge_multimodal(jnp.asarray(text), jnp.asarray(ids), jnp.asarray(media[:5]), 9)


# ---------------------------------------------------------------- Dynamic-S2 oracles


def _oracle_closest(aspect, width, height, tile, min_num, max_num):
    """Straight port of VILA's loop, with its own grid enumeration."""
    ratios = sorted(
        {
            (i, j)
            for n in range(min_num, max_num + 1)
            for i in range(1, n + 1)
            for j in range(1, n + 1)
            if min_num <= i * j <= max_num
        },
        key=lambda r: (r[0] * r[1], r[0], r[1]),
    )
    best, best_diff = (1, 1), float("inf")
    for r in ratios:
        diff = abs(aspect - r[0] / r[1])
        if diff < best_diff:
            best, best_diff = r, diff
        elif diff == best_diff and width * height > 0.5 * tile * tile * r[0] * r[1]:
            best = r
    return best


def test_find_closest_aspect_ratio_tie_rule():
    grids = s2.dynamic_s2_grids(9, 12)
    assert (3, 3) in grids and (4, 3) in grids and (2, 6) in grids and (2, 2) not in grids
    # aspect 1: only 3x3 matches exactly
    assert s2.find_closest_aspect_ratio(1.0, grids, 100, 100, 448) == (3, 3)
    # exact tie between (1, 10) and (1, 11) at aspect 0.095238...: later grid needs large area
    a = (1 / 10 + 1 / 11) / 2
    assert s2.find_closest_aspect_ratio(a, [(1, 10), (1, 11)], 10, 10, 448) == (1, 10)
    big = 448 * 448 * 11
    assert s2.find_closest_aspect_ratio(a, [(1, 10), (1, 11)], big, 1, 448) == (1, 11)
    for w, h in [(300, 100), (100, 300), (640, 480), (50, 700), (1000, 999)]:
        assert s2.find_closest_aspect_ratio(w / h, grids, w, h, 448) == _oracle_closest(
            w / h, w, h, 448, 9, 12
        )


def _oracle_tiles(image, scales, tile, max_num):
    h, w = image.shape[:2]
    min_num = (scales[-1] // scales[0]) ** 2
    out = []
    for s in scales[:-1]:
        n = s // scales[0]
        img = s2.resize_image(image, tile * n, tile * n)
        out.append(
            np.stack(
                [
                    img[(k // n) * tile : (k // n + 1) * tile, (k % n) * tile : (k % n + 1) * tile]
                    for k in range(n * n)
                ]
            )
        )
    i, j = _oracle_closest(w / h, w, h, tile, min_num, max_num)
    img = s2.resize_image(image, tile * j, tile * i)
    out.append(
        np.stack(
            [
                img[(k // i) * tile : (k // i + 1) * tile, (k % i) * tile : (k % i + 1) * tile]
                for k in range(i * j)
            ]
        )
    )
    return out, (j, i)


def test_resize_image_identity_and_constant():
    img = np.random.default_rng(6).integers(0, 256, (7, 9, 3)).astype(np.uint8)
    np.testing.assert_allclose(s2.resize_image(img, 7, 9), img.astype(np.float32), atol=1e-4)
    const = np.full((13, 5, 3), 77, np.uint8)
    np.testing.assert_allclose(s2.resize_image(const, 4, 11), 77.0, atol=1e-3)


@pytest.mark.parametrize("hw", [(30, 90), (90, 30), (56, 56), (40, 71)])
def test_dynamic_s2_tiles_against_oracle(hw):
    scales, tile = (28, 56, 84), 28
    img = np.random.default_rng(7).integers(0, 256, hw + (3,)).astype(np.uint8)
    tiles, grid = s2.dynamic_s2_tiles(img, scales, tile, max_num=12)
    ref, ref_grid = _oracle_tiles(img, scales, tile, 12)
    assert grid == ref_grid
    assert [t.shape for t in tiles] == [
        (1, 28, 28, 3),
        (4, 28, 28, 3),
        (grid[0] * grid[1], 28, 28, 3),
    ]
    for a, b in zip(tiles, ref, strict=True):
        np.testing.assert_array_equal(a, b)


def _oracle_merge(feats, grids, side):
    """VILA merge_features_for_dynamic_s2 in torch (NCHW), then split_chessboard."""
    maps = []
    for f, (rows, cols) in zip(feats, grids, strict=True):
        x = torch.from_numpy(f).reshape(f.shape[0], side, side, -1).permute(0, 3, 1, 2)
        maps.append(
            torch.cat(
                [
                    torch.cat([x[r * cols + c : r * cols + c + 1] for c in range(cols)], dim=-1)
                    for r in range(rows)
                ],
                dim=-2,
            )
        )
    size = maps[-1].shape[-2:]
    merged = torch.cat(
        [torch.nn.functional.interpolate(m, size=size, mode="area") for m in maps], 1
    )
    rows, cols = grids[-1]
    hb, wb = size[0] // rows, size[1] // cols
    blocks = torch.cat(
        [
            merged[:, :, r * hb : (r + 1) * hb, c * wb : (c + 1) * wb]
            for r in range(rows)
            for c in range(cols)
        ],
        dim=0,
    )
    return blocks.flatten(2).transpose(1, 2).numpy()


@pytest.mark.parametrize("last_grid", [(3, 3), (2, 5), (4, 3)])
def test_merge_s2_features_against_torch_oracle(last_grid):
    side, c = 4, 5  # 56 px tiles / patch 14
    grids = [(1, 1), (2, 2), last_grid]
    rng = np.random.default_rng(8)
    feats = [rng.standard_normal((r * k, side * side, c)).astype(np.float32) for r, k in grids]
    merge = jax.jit(s2.merge_s2_features, static_argnums=1)
    blocks, grid = merge([jnp.asarray(f) for f in feats], tuple(grids))
    ref = _oracle_merge(feats, grids, side)
    assert grid == last_grid
    assert blocks.shape == (last_grid[0] * last_grid[1], side * side, 3 * c)
    np.testing.assert_allclose(np.asarray(blocks), ref, rtol=1e-5, atol=1e-6)
    # blocks stitch back to the last scale's map; its own channels are untouched
    stitched = s2.merge_chessboard(blocks.reshape(-1, side, side, 3 * c), *last_grid)
    last = s2.merge_chessboard(jnp.asarray(feats[-1]).reshape(-1, side, side, c), *last_grid)
    np.testing.assert_array_equal(np.asarray(stitched[..., 2 * c :]), np.asarray(last))
