"""Training losses against an explicit NumPy cross-entropy (float64 log-softmax NLL).

Every loss the jobs train on -- the causal-LM loss (plain and chunked over the sequence), the
VLM SFT loss with spliced video rows, and the masked-diffusion objective -- is compared with a
reference computed here from the model's own logits, so wrong masking, summing, normalising,
target alignment or noising fails a test (not only a self-consistency check).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxstack.models import vlm
from jaxstack.models.dllm import (
    DEFAULT_EPS,
    DLLMConfig,
    diffusion_loss_sums,
    draw_diffusion_noise,
    init_dllm,
    make_diffusion_loss,
)
from jaxstack.models.llm import LLMConfig, init_llm
from jaxstack.train.step import (
    OptimConfig,
    chunked_token_nll,
    init_train_state,
    lm_loss_sums,
    make_optimizer,
    make_train_step,
    token_cross_entropy,
)
from jaxstack.train.vlm_sft import vlm_loss_sums

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


def randomize(model: nnx.Module, seed: int) -> nnx.Module:
    """O(1) random weights (the default init gives near-uniform logits, which would hide
    target-alignment bugs): vectors 1 + 0.2 N, matrices 1.5 N / sqrt(fan_in)."""
    state = nnx.state(model, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    new = [
        1.0 + 0.2 * jax.random.normal(k, x.shape, x.dtype)
        if x.ndim == 1
        else 1.5 * jax.random.normal(k, x.shape, x.dtype) / np.sqrt(x.shape[0])
        for k, x in zip(keys, leaves, strict=True)
    ]
    nnx.update(model, jax.tree.unflatten(treedef, new))
    return model


def assert_spread(logits: np.ndarray) -> None:
    """The reference is meaningful only if the logits are far from uniform."""
    assert float(np.std(logits, axis=-1).mean()) > 0.5


# -- token_cross_entropy / chunked_token_nll -----------------------------------------------------


def test_token_cross_entropy_matches_numpy() -> None:
    k1, k2 = jax.random.split(jax.random.key(0))
    logits = 3.0 * jax.random.normal(k1, (3, 7, 37), jnp.float32) + 1.0
    targets = jax.random.randint(k2, (3, 7), 0, 37)
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
    kh, kw, kb, ky, km = jax.random.split(jax.random.key(seed), 5)
    hidden = jax.random.normal(kh, (b, t, d), jnp.float32)
    w = 1.5 * jax.random.normal(kw, (d, v), jnp.float32) / np.sqrt(d)
    bias = jax.random.normal(kb, (v,), jnp.float32)
    targets = jax.random.randint(ky, (b, t), 0, v)
    mask = np.array(jax.random.bernoulli(km, 0.6, (b, t)))
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
    model = randomize(init_llm(LLMConfig.preset("tiny"), seed=0), seed=10)
    graphdef, state = nnx.split(model)
    logits = jax.jit(lambda st, ids, seg: nnx.merge(graphdef, st)(ids, segment_ids=seg))
    return model, graphdef, state, logits


def _lm_batch(b: int = 3, t: int = LM_T, vocab: int = 512, seed: int = 3) -> dict:
    """Packed rows (segment 0 = padding), random next-token targets, a random loss mask that is
    zero on padding, and one fully masked row (row 1)."""
    layouts = [
        [1] * 10 + [2] * 14 + [0] * 8,
        [1] * 20 + [2] * 12,
        [1] * 5 + [2] * 5 + [3] * 20 + [0] * 2,
        [1] * 32,
    ]
    k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
    seg = np.asarray([layouts[i % len(layouts)][:t] for i in range(b)], np.int32)
    mask = np.asarray(jax.random.bernoulli(k3, 0.6, (b, t))) & (seg > 0)
    mask[1] = False
    return {
        "input_ids": np.asarray(jax.random.randint(k1, (b, t), 0, vocab), np.int32),
        "targets": np.asarray(jax.random.randint(k2, (b, t), 0, vocab), np.int32),
        "loss_mask": mask,
        "segment_ids": seg,
    }


def _np_lm_sums(logits_fn, state, batch) -> tuple[float, float, np.ndarray]:
    logits = np.asarray(logits_fn(state, batch["input_ids"], batch["segment_ids"]), np.float64)
    nll = np_nll(logits, batch["targets"])
    mask = batch["loss_mask"].astype(np.float64)
    return float(np.sum(nll * mask)), float(mask.sum()), logits


@pytest.mark.parametrize("chunk", [8, 12, 1024])  # chunked (4 chunks), T % 12 != 0, default
def test_lm_loss_sums_matches_numpy(lm, chunk: int) -> None:
    _, graphdef, state, logits_fn = lm
    batch = _lm_batch()
    loss_sums = jax.jit(
        lambda st, b: lm_loss_sums(nnx.merge(graphdef, st), b, logits_chunk=chunk)
    )
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

    grad = jax.jit(jax.grad(chunked), static_argnums=1)
    g8, g0 = grad(state, 8), grad(state, 0)
    g_ref = jax.jit(jax.grad(reference))(state)
    flat8, flat0, flat_ref = (jax.tree.leaves(g) for g in (g8, g0, g_ref))
    assert any(np.abs(np.asarray(g)).max() > 1e-3 for g in flat_ref)
    for a, b, r in zip(flat8, flat0, flat_ref, strict=True):
        scale = max(float(np.abs(np.asarray(r)).max()), 1e-6)
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=RTOL, atol=1e-6 * scale)
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), rtol=1e-4, atol=1e-5 * scale)


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
    model = randomize(vlm.init_nvila(cfg, seed=0), seed=20)
    return cfg, model, *nnx.split(model)


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
    cfg, _, graphdef, state = nvila
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

    @jax.jit
    def reference_logits(st, ids, frames):  # one clip at a time, spliced by the model
        model = nnx.merge(graphdef, st)
        media = jnp.concatenate([model.encode_video(f) for f in frames], axis=0)
        return model(ids, media)

    loss_sums = jax.jit(
        lambda st, b: vlm_loss_sums(nnx.merge(graphdef, st), b, logits_chunk=chunk)
    )
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
    assert abs(float(total3) - float(total)) > 1e-3 * abs(float(total))


# -- masked-diffusion objective ------------------------------------------------------------------

DL_B, DL_L = 4, 16


@pytest.fixture(scope="module", params=["llada", "dream"])
def dllm(request):
    cfg = DLLMConfig.preset(f"tiny-{request.param}")
    model = randomize(init_dllm(cfg, seed=0), seed=30)
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
    return cfg, graphdef, state, forward


def _diffusion_batch(cfg: DLLMConfig) -> dict:
    """Clean ids, noise from `draw_diffusion_noise` with fixed t (row 1: t = 0 and no token
    under p_mask = eps, so it has nothing masked), padding (loss_mask False) at the ends of
    rows 0 and 2, and prompt positions that the noise would have masked."""
    noise = jax.device_get(draw_diffusion_noise(jax.random.key(7), DL_B, DL_L))
    assert noise["t"].shape == (DL_B,) and noise["mask_u"].shape == (DL_B, DL_L)
    assert noise["t"].dtype == np.float32 and noise["mask_u"].dtype == np.float32
    t = np.array([0.7, 0.0, 0.35, 0.95], np.float32)
    mask_u = np.array(noise["mask_u"])
    mask_u[1] = np.maximum(mask_u[1], 0.01)  # > eps: row 1 keeps every token
    mask_u[[0, 2, 3], 0] = 0.0  # prompt position 0 of these rows: "would be masked"
    mask_u[0, -1] = 0.0  # a padding position that would be masked
    ids = np.asarray(jax.random.randint(jax.random.key(8), (DL_B, DL_L), 0, cfg.mask_id))
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
    cfg, graphdef, state, forward = dllm
    batch = _diffusion_batch(cfg)
    if not sft:
        batch.pop("prompt_mask")
    loss = make_diffusion_loss(cfg.kind, mask_id=cfg.mask_id)
    total, count = jax.jit(lambda st, b: loss(nnx.merge(graphdef, st), b))(state, batch)
    want_total, want_count, masked = _np_diffusion(cfg, forward, state, batch, sft=sft)
    assert masked.sum(axis=1)[1] == 0 and (masked.sum(axis=1)[[0, 2, 3]] > 0).all()
    assert not masked[0, -1] and (masked[[0, 2, 3], 0] != sft).all()
    np.testing.assert_allclose(float(total), want_total, rtol=RTOL)
    assert float(count) == want_count


def test_diffusion_loss_weights_and_masks(dllm) -> None:
    """Per-row structure: a row's contribution scales with 1 / p_mask, a row with nothing
    masked contributes 0, and padding / prompt tokens neither get masked nor count."""
    cfg, graphdef, state, forward = dllm
    loss = jax.jit(
        lambda st, b: diffusion_loss_sums(
            nnx.merge(graphdef, st), b, kind=cfg.kind, mask_id=cfg.mask_id
        )
    )
    batch = _diffusion_batch(cfg)
    for sft in (False, True):
        b = batch if sft else {k: v for k, v in batch.items() if k != "prompt_mask"}
        # each row alone: contributions add up and match the reference row by row
        totals = []
        for r in range(DL_B):
            row = {k: v[r : r + 1] for k, v in b.items()}
            got, _ = loss(state, row)
            want, _, masked = _np_diffusion(cfg, forward, state, row, sft=sft)
            np.testing.assert_allclose(float(got), want, rtol=RTOL, atol=1e-6)
            totals.append(float(got))
        assert totals[1] == 0.0  # nothing masked in row 1
        full, _ = loss(state, b)
        np.testing.assert_allclose(float(full), sum(totals), rtol=RTOL)
    # same masked set, different t: the sum scales exactly with 1 / p_mask
    row = {k: v[:1] for k, v in batch.items()}
    hi = {**row, "t": np.array([0.9], np.float32), "mask_u": np.where(row["mask_u"] < 0.3, 0, 1.0)}
    lo = {**hi, "t": np.array([0.5], np.float32)}
    l_hi, l_lo = float(loss(state, hi)[0]), float(loss(state, lo)[0])
    p = lambda t: (1 - DEFAULT_EPS) * t + DEFAULT_EPS  # noqa: E731
    assert l_hi > 0
    np.testing.assert_allclose(l_lo / l_hi, p(0.9) / p(0.5), rtol=RTOL)
    # padding: its tokens and noise do not matter; it is excluded from the pre-training count
    b = {k: v for k, v in batch.items() if k != "prompt_mask"}
    ids2 = np.where(b["loss_mask"], b["input_ids"], (b["input_ids"] + 1) % cfg.mask_id)
    u2 = np.where(b["loss_mask"], b["mask_u"], 0.0).astype(np.float32)
    b2 = {**b, "input_ids": ids2, "mask_u": u2}
    want, _, masked = _np_diffusion(cfg, forward, state, b2, sft=False)
    got, count = loss(state, b2)
    np.testing.assert_allclose(float(got), want, rtol=RTOL)
    assert not (masked & ~b["loss_mask"]).any()
    assert float(count) == b["loss_mask"].sum() < DL_B * DL_L
