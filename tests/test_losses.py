"""Training losses against an explicit NumPy cross-entropy (float64 log-softmax NLL).

Every loss the jobs train on -- the causal-LM loss (plain and chunked over the sequence), the
VLM SFT loss with spliced video rows, and the masked-diffusion objective -- is compared with a
reference computed here from the model's own logits, so wrong masking, summing, normalising,
target alignment or noising fails a test (not only a self-consistency check).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstack.models import vlm
from jaxstack.models.dllm import DLLMConfig, init_dllm
from jaxstack.models.llm import LLMConfig, init_llm
from jaxstack.train.losses import (
    DEFAULT_EPS,
    draw_diffusion_noise,
    make_diffusion_loss,
    vlm_loss_sums,
)
from jaxstack.train.step import (
    OptimConfig,
    chunked_token_nll,
    init_train_state,
    lm_loss_sums,
    make_optimizer,
    make_train_step,
    token_cross_entropy,
)

RTOL, ATOL = 1e-5, 1e-5


# -- NumPy reference -------------------------------------------------------------------------------


def np_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] in float64, shape logits.shape[:-1]."""
    z = np.asarray(logits, np.float64)
    m = z.max(axis=-1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=-1)) + m[..., 0]
    return lse - np.take_along_axis(z, np.asarray(targets)[..., None], axis=-1)[..., 0]


def np_softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def random_model(make, seed: int) -> nnx.Module:
    """`make()`'s module with O(1) random weights (the default init gives near-uniform logits,
    which would hide target-alignment bugs): vectors 1 + 0.2 N, matrices 1.5 N / sqrt(fan_in).
    The module is built abstractly (no eager init) and every parameter is filled here."""
    model = nnx.eval_shape(make)
    state = nnx.state(model, nnx.Param)
    assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(nnx.state(model)))
    leaves, treedef = jax.tree.flatten(state)
    rng = np.random.default_rng(seed)
    new = [
        jnp.asarray(
            1.0 + 0.2 * rng.standard_normal(x.shape)
            if x.ndim == 1
            else 1.5 * rng.standard_normal(x.shape) / np.sqrt(x.shape[0]),
            x.dtype,
        )
        for x in leaves
    ]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def assert_spread(logits: np.ndarray) -> None:
    """The reference is meaningful only if the logits are far from uniform."""
    assert float(np.std(logits, axis=-1).mean()) > 0.5


# -- token_cross_entropy / chunked_token_nll -----------------------------------------------------


def test_token_cross_entropy_matches_numpy() -> None:
    rng = np.random.default_rng(0)
    logits = jnp.asarray(3.0 * rng.standard_normal((3, 7, 37)) + 1.0, jnp.float32)
    targets = jnp.asarray(rng.integers(0, 37, (3, 7)), jnp.int32)
    got = jax.jit(token_cross_entropy)(logits, targets)
    assert got.shape == (3, 7) and got.dtype == jnp.float32
    want = np_nll(np.asarray(logits), np.asarray(targets))
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL, atol=ATOL)
    assert (np.asarray(got) > 0).all()
    # bfloat16 logits are upcast before the log-sum-exp
    got16 = jax.jit(token_cross_entropy)(logits.astype(jnp.bfloat16), targets)
    want16 = np_nll(np.asarray(logits.astype(jnp.bfloat16).astype(jnp.float32)), targets)
    assert got16.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got16), want16, rtol=RTOL, atol=ATOL)


def _head_problem(t: int, seed: int = 1, b: int = 3, d: int = 12, v: int = 29):
    """hidden [B, T, D], LM head (w [D, V], bias [V]), targets [B, T], mask [B, T] with a fully
    masked row (row 1)."""
    rng = np.random.default_rng(seed)
    hidden = jnp.asarray(rng.standard_normal((b, t, d)), jnp.float32)
    w = jnp.asarray(1.5 * rng.standard_normal((d, v)) / np.sqrt(d), jnp.float32)
    bias = jnp.asarray(rng.standard_normal(v), jnp.float32)
    targets = jnp.asarray(rng.integers(0, v, (b, t)), jnp.int32)
    mask = rng.random((b, t)) < 0.6
    mask[1] = False
    return hidden, (w, bias), targets, mask


def _np_head(hidden, w, bias) -> np.ndarray:
    return np.asarray(hidden, np.float64) @ np.asarray(w, np.float64) + np.asarray(bias)


@pytest.mark.parametrize(
    "t,chunk",
    [
        (32, 8),  # chunked: lax.map over 4 chunks
        (48, 16),  # chunked: 3 chunks
        (24, 16),  # T % chunk != 0: whole-sequence fallback
        (8, 16),  # T <= chunk: fallback
        (16, 0),  # chunking off
    ],
)
def test_chunked_token_nll_matches_numpy(t: int, chunk: int) -> None:
    hidden, (w, bias), targets, mask = _head_problem(t)
    fn = jax.jit(lambda h, w, bias, y: chunked_token_nll(lambda x: x @ w + bias, h, y, chunk))
    got = np.asarray(fn(hidden, w, bias, targets))
    logits = _np_head(hidden, w, bias)
    assert_spread(logits)
    want = np_nll(logits, targets)
    assert got.shape == (3, t)
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(np.sum(got * mask), np.sum(want * mask), rtol=RTOL)


def test_chunked_token_nll_gradient_matches_unchunked_and_numpy() -> None:
    t, chunk = 32, 8
    hidden, (w, bias), targets, mask = _head_problem(t, seed=2)
    maskf = jnp.asarray(mask, jnp.float32)

    def loss(h, w, bias, c):
        nll = chunked_token_nll(lambda x: x @ w + bias, h, targets, c)
        return jnp.sum(nll * maskf)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
    g_chunk = grad(hidden, w, bias, chunk)
    g_full = grad(hidden, w, bias, 0)
    for a, b in zip(g_chunk, g_full, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=1e-6)
    # d loss / d logits = mask * (softmax - onehot), pushed through the affine head
    logits = _np_head(hidden, w, bias)
    onehot = np.eye(logits.shape[-1])[np.asarray(targets)]
    dz = (np_softmax(logits) - onehot) * mask[..., None]
    want_h = dz @ np.asarray(w, np.float64).T
    want_w = np.einsum("btd,btv->dv", np.asarray(hidden, np.float64), dz)
    want_b = dz.sum(axis=(0, 1))
    np.testing.assert_allclose(np.asarray(g_chunk[0]), want_h, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(np.asarray(g_chunk[1]), want_w, rtol=RTOL, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g_chunk[2]), want_b, rtol=RTOL, atol=1e-5)
    assert not np.asarray(g_chunk[0])[1].any()  # the fully masked row gets no gradient


# -- lm_loss_sums on a tiny LLM ------------------------------------------------------------------

LM_T = 32


@pytest.fixture(scope="module")
def lm():
    model = random_model(lambda: init_llm(LLMConfig.preset("tiny")), seed=10)
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda st, ids, seg: nnx.merge(graphdef, st)(ids, segment_ids=seg))
    return model, graphdef, state, logits


@functools.cache
def _jit_loss(loss_sums, graphdef, chunk: int):
    """jit of `loss_sums(model, batch, logits_chunk=chunk)` over (state, batch), shared."""
    return jax.jit(lambda st, b: loss_sums(nnx.merge(graphdef, st), b, logits_chunk=chunk))


def _lm_batch(b: int = 3, t: int = LM_T, vocab: int = 512, seed: int = 3) -> dict:
    """Packed rows (segment 0 = padding), random next-token targets, a random loss mask that is
    zero on padding, and one fully masked row (row 1)."""
    layouts = [
        [1] * 10 + [2] * 14 + [0] * 8,
        [1] * 20 + [2] * 12,
        [1] * 5 + [2] * 5 + [3] * 20 + [0] * 2,
        [1] * 32,
    ]
    rng = np.random.default_rng(seed)
    seg = np.asarray([layouts[i % len(layouts)][:t] for i in range(b)], np.int32)
    mask = (rng.random((b, t)) < 0.6) & (seg > 0)
    mask[1] = False
    return {
        "input_ids": rng.integers(0, vocab, (b, t)).astype(np.int32),
        "targets": rng.integers(0, vocab, (b, t)).astype(np.int32),
        "loss_mask": mask,
        "segment_ids": seg,
    }


def _np_lm_sums(logits_fn, state, batch) -> tuple[float, float, np.ndarray]:
    logits = np.asarray(logits_fn(state, batch["input_ids"], batch["segment_ids"]), np.float64)
    nll = np_nll(logits, batch["targets"])
    mask = batch["loss_mask"].astype(np.float64)
    return float(np.sum(nll * mask)), float(mask.sum()), logits


@pytest.mark.parametrize("chunk", [8, 12])  # chunked (lax.map, 4 chunks); T % 12 != 0: whole
def test_lm_loss_sums_matches_numpy(lm, chunk: int) -> None:
    _, graphdef, state, logits_fn = lm
    batch = _lm_batch()
    loss_sums = _jit_loss(lm_loss_sums, graphdef, chunk)
    total, count = loss_sums(state, batch)
    want_total, want_count, logits = _np_lm_sums(logits_fn, state, batch)
    assert_spread(logits)
    np.testing.assert_allclose(float(total), want_total, rtol=RTOL)
    assert float(count) == want_count == batch["loss_mask"].sum()
    # Masked-out positions contribute nothing, whatever their targets
    rng = np.random.default_rng(0)
    other = np.where(batch["loss_mask"], batch["targets"], rng.integers(0, 512, (3, LM_T)))
    assert (other != batch["targets"]).any()
    total2, _ = loss_sums(state, {**batch, "targets": other.astype(np.int32)})
    np.testing.assert_allclose(float(total2), float(total), rtol=RTOL)
    # ... while a loss position does (the reference is sensitive to the mask)
    assert abs(want_total - float(np.sum(np_nll(logits, batch["targets"])))) > 1.0


def test_lm_loss_sums_chunked_gradient_matches_reference(lm) -> None:
    _, graphdef, state, _ = lm
    batch = _lm_batch(seed=4)

    def chunked(st, c):
        return lm_loss_sums(nnx.merge(graphdef, st), batch, logits_chunk=c)[0]

    def reference(st):  # log_softmax, independent of token_cross_entropy
        model = nnx.merge(graphdef, st)
        logits = model(batch["input_ids"], segment_ids=batch["segment_ids"])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(logp, batch["targets"][..., None], axis=-1)[..., 0]
        return -jnp.sum(picked * batch["loss_mask"])

    # chunked (lax.map over 4 chunks, rematerialised) vs the unchunked reference
    g8 = jax.jit(jax.grad(chunked), static_argnums=1)(state, 8)
    g_ref = jax.jit(jax.grad(reference))(state)
    flat8, flat_ref = jax.tree.leaves(g8), jax.tree.leaves(g_ref)
    assert any(np.abs(np.asarray(g)).max() > 1e-3 for g in flat_ref)
    for a, r in zip(flat8, flat_ref, strict=True):
        scale = max(float(np.abs(np.asarray(r)).max()), 1e-6)
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=RTOL, atol=1e-6 * scale)


def test_train_step_loss_is_numpy_mean_token_nll(lm) -> None:
    model, _, state, logits_fn = lm
    batch = _lm_batch(b=4, seed=5)
    want_total, want_count, _ = _np_lm_sums(logits_fn, state, batch)
    opt = make_optimizer(OptimConfig(lr=1e-3))
    train_state, _ = init_train_state(model, opt)
    graphdef, _, rest = nnx.split(model, nnx.Param, ...)
    step = make_train_step(graphdef, rest, opt, grad_accum=2)
    _, metrics = step(train_state, batch)
    np.testing.assert_allclose(float(metrics["loss"]), want_total / want_count, rtol=RTOL)
    assert float(metrics["tokens"]) == want_count


# -- VLM SFT loss with video rows ----------------------------------------------------------------

VLM_T, FRAMES = 24, 4


@pytest.fixture(scope="module")
def nvila():
    cfg = vlm.VLMConfig.preset("tiny")
    model = random_model(lambda: vlm.init_nvila(cfg), seed=20)
    graphdef, state = nnx.split(model)

    @jax.jit
    def reference_logits(st, ids, frames):  # one clip at a time, spliced by the model
        model = nnx.merge(graphdef, st)
        media = jnp.concatenate([model.encode_video(f) for f in frames], axis=0)
        return model(ids, media)

    return cfg, graphdef, state, reference_logits


def _vlm_batch(cfg: vlm.VLMConfig, seed: int = 6) -> dict:
    """Rows laid out like `VideoQABatches`: [user, media x n, question, answer, eos, pad];
    targets are the next tokens, the loss mask is True on answer + eos targets only."""
    n_media = cfg.video_length(FRAMES)
    rng = np.random.default_rng(seed)
    s = cfg.vision.image_size
    rows, ids, tgt, mask = [(3, 4), (5, 7)], [], [], []  # (question, answer) lengths
    for q, a in rows:
        head = [1] + [cfg.media_token_id] * n_media + list(rng.integers(12, 500, q))
        body = list(rng.integers(12, 500, a)) + [2]
        tokens = np.asarray(head + body + [0] * (VLM_T - len(head) - len(body)), np.int32)
        trained = np.r_[np.zeros(len(head), bool), np.ones(len(body), bool)]
        trained = np.r_[trained, np.zeros(VLM_T - len(trained), bool)]
        ids.append(tokens)
        tgt.append(np.r_[tokens[1:], 0].astype(np.int32))
        mask.append(np.r_[trained[1:], False])
    return {
        "input_ids": np.stack(ids),
        "targets": np.stack(tgt),
        "loss_mask": np.stack(mask),
        "frames": rng.normal(size=(len(rows), FRAMES, s, s, 3)).astype(np.float32),
    }


@pytest.mark.parametrize("chunk", [8, 1024])  # chunked (3 chunks of 8), whole sequence
@pytest.mark.parametrize("mask_kind", ["sft", "random"])
def test_vlm_loss_sums_matches_numpy(nvila, chunk: int, mask_kind: str) -> None:
    cfg, graphdef, state, reference_logits = nvila
    batch = _vlm_batch(cfg)
    media_pos = batch["input_ids"] == cfg.media_token_id
    assert media_pos.sum(axis=1).tolist() == [cfg.video_length(FRAMES)] * 2
    if mask_kind == "random":  # includes media positions; row 1 fully masked
        mask = np.random.default_rng(1).random(batch["loss_mask"].shape) < 0.5
        mask[0, media_pos[0]] = True
        mask[1] = False
        batch["loss_mask"] = mask
    else:  # prompt (and media) targets are not trained
        assert not (batch["loss_mask"] & media_pos).any()
        assert not batch["loss_mask"][:, :6].any()
    loss_sums = _jit_loss(vlm_loss_sums, graphdef, chunk)
    total, count = loss_sums(state, batch)
    logits = np.asarray(reference_logits(state, batch["input_ids"], batch["frames"]), np.float64)
    assert_spread(logits)
    nll = np_nll(logits, batch["targets"])
    mask = batch["loss_mask"].astype(np.float64)
    np.testing.assert_allclose(float(total), float(np.sum(nll * mask)), rtol=RTOL)
    assert float(count) == mask.sum() > 0
    assert abs(float(total) - float(nll.sum())) > 1.0  # the mask matters here
    # Targets at masked positions (prompt, media, padding) contribute nothing
    rng = np.random.default_rng(2)
    other = np.where(batch["loss_mask"], batch["targets"], rng.integers(0, 500, mask.shape))
    total2, _ = loss_sums(state, {**batch, "targets": other.astype(np.int32)})
    np.testing.assert_allclose(float(total2), float(total), rtol=RTOL)
    # ... but the video does: the answer is conditioned on the spliced media rows
    total3, _ = loss_sums(state, {**batch, "frames": batch["frames"][::-1].copy()})
    assert abs(float(total3) - float(total)) > 1e-5 * abs(float(total))


# -- masked-diffusion objective ------------------------------------------------------------------

DL_B, DL_L = 4, 16


@pytest.fixture(scope="module", params=["llada", "dream"])
def dllm(request):
    cfg = DLLMConfig.preset(f"tiny-{request.param}")
    model = random_model(lambda: init_dllm(cfg), seed=30)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
    hook = make_diffusion_loss(cfg.kind, mask_id=cfg.mask_id)
    loss = jax.jit(lambda st, b: hook(nnx.merge(graphdef, st), b))
    return cfg, graphdef, state, forward, loss


def _diffusion_batch(cfg: DLLMConfig) -> dict:
    """Clean ids, noise from `draw_diffusion_noise` with fixed t (row 1: t = 0 and no token
    under p_mask = eps, so it has nothing masked), padding (loss_mask False) at the ends of
    rows 0 and 2, and prompt positions that the noise would have masked."""
    draw = jax.jit(draw_diffusion_noise, static_argnums=(1, 2))
    noise = jax.device_get(draw(jax.random.key(7), DL_B, DL_L))
    assert (noise["mask_u"] >= 0).all() and (noise["mask_u"] < 1).all()
    assert noise["t"].shape == (DL_B,) and noise["mask_u"].shape == (DL_B, DL_L)
    assert noise["t"].dtype == np.float32 and noise["mask_u"].dtype == np.float32
    t = np.array([0.7, 0.0, 0.35, 0.95], np.float32)
    mask_u = np.array(noise["mask_u"])
    mask_u[1] = np.maximum(mask_u[1], 0.01)  # > eps: row 1 keeps every token
    mask_u[[0, 2, 3], 0] = 0.0  # prompt position 0 of these rows: "would be masked"
    mask_u[0, -1] = 0.0  # a padding position that would be masked
    ids = np.random.default_rng(8).integers(0, cfg.mask_id, (DL_B, DL_L))
    valid = np.ones((DL_B, DL_L), bool)
    valid[0, -3:] = False
    valid[2, -5:] = False
    prompt = np.arange(DL_L)[None, :] < np.array([3, 5, 4, 2])[:, None]
    return {
        "input_ids": ids.astype(np.int32),
        "t": t,
        "mask_u": mask_u,
        "loss_mask": valid,
        "prompt_mask": prompt,
    }


def _np_diffusion(cfg, forward, state, batch, *, sft: bool, eps: float = DEFAULT_EPS):
    """(sum, normaliser, masked) by the formula in the `jaxstack.models.dllm` docstring."""
    ids, valid = batch["input_ids"], batch.get("loss_mask", np.ones(batch["input_ids"].shape, bool))
    p = np.float32(1.0 - eps) * batch["t"] + np.float32(eps)  # [B]
    masked = (batch["mask_u"] < p[:, None]) & valid
    if sft:
        masked &= ~batch["prompt_mask"]
    noisy = np.where(masked, cfg.mask_id, ids)
    logits = np.asarray(forward(state, noisy), np.float64)
    if cfg.kind == "dream":  # position i is predicted from the logits at i - 1
        logits = np.concatenate([logits[:, :1], logits[:, :-1]], axis=1)
    assert_spread(logits)
    weighted = np.where(masked, np_nll(logits, ids) / np.float64(p)[:, None], 0.0)
    if not sft:
        return weighted.sum(), float(valid.sum()), masked
    answer_len = (~batch["prompt_mask"] & valid).sum(axis=1)
    return (weighted.sum(axis=1) / np.maximum(answer_len, 1)).sum(), float(len(ids)), masked


@pytest.mark.parametrize("sft", [False, True], ids=["pretrain", "sft"])
def test_diffusion_loss_matches_numpy(dllm, sft: bool) -> None:
    cfg, _, state, forward, loss = dllm
    batch = _diffusion_batch(cfg)
    if not sft:
        batch.pop("prompt_mask")
    total, count = loss(state, batch)
    want_total, want_count, masked = _np_diffusion(cfg, forward, state, batch, sft=sft)
    assert masked.sum(axis=1)[1] == 0 and (masked.sum(axis=1)[[0, 2, 3]] > 0).all()
    assert not masked[0, -1] and (masked[[0, 2, 3], 0] != sft).all()
    np.testing.assert_allclose(float(total), want_total, rtol=RTOL)
    assert float(count) == want_count


def test_diffusion_loss_weights_and_masks(dllm) -> None:
    """With the masked set held fixed, the loss scales exactly with 1 / p_mask; the t of a row
    with nothing masked does not matter; padding is never masked and not counted."""
    cfg, _, state, forward, loss = dllm
    batch = _diffusion_batch(cfg)
    # mask_u in {0, 1}: a token is masked iff mask_u == 0, whatever t (p_mask is in (0, 1])
    fixed = np.where(batch["mask_u"] < 0.3, 0.0, 1.0).astype(np.float32)
    fixed[1] = 1.0  # row 1: nothing masked
    p = lambda t: (1 - DEFAULT_EPS) * t + DEFAULT_EPS
    for sft in (False, True):
        b = {**batch, "mask_u": fixed}
        if not sft:
            b.pop("prompt_mask")
        sums = {}
        for name, t in {"hi": [0.9] * 4, "lo": [0.5] * 4, "row1": [0.9, 0.01, 0.9, 0.9]}.items():
            sums[name] = float(loss(state, {**b, "t": np.asarray(t, np.float32)})[0])
        assert sums["hi"] > 0
        np.testing.assert_allclose(sums["lo"] / sums["hi"], p(0.9) / p(0.5), rtol=RTOL)
        np.testing.assert_allclose(sums["row1"], sums["hi"], rtol=RTOL)
    # padding is never masked, even where its noise says so, and is not in the pre-training count
    b = {k: v for k, v in batch.items() if k != "prompt_mask"}
    ids2 = np.where(b["loss_mask"], b["input_ids"], (b["input_ids"] + 1) % cfg.mask_id)
    u2 = np.where(b["loss_mask"], b["mask_u"], 0.0).astype(np.float32)
    b2 = {**b, "input_ids": ids2.astype(np.int32), "mask_u": u2}
    want, _, masked = _np_diffusion(cfg, forward, state, b2, sft=False)
    got, count = loss(state, b2)
    np.testing.assert_allclose(float(got), want, rtol=RTOL)
    assert not (masked & ~b["loss_mask"]).any()
    assert float(count) == b["loss_mask"].sum() < DL_B * DL_L
