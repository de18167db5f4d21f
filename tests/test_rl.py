"""RL job pieces: the MR-SP embedding cache, rollout vs training log-probs on the VLM path, and
the `run_rl` loop (artifacts, exact resume, multi-update and KL options)."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from loop_helpers import poison_step, same_weight_files
from scoring import rescored_accuracy

from jaxstack.data.synth_video import synth_video_dataset
from jaxstack.data.tokenizer import ByteTokenizer
from jaxstack.data.video_qa import FrameLoader, VideoSpec, prompt_ids, read_video_qa
from jaxstack.generate.engine import pad_prompts
from jaxstack.generate.rollout import RolloutConfig, rollout
from jaxstack.hf import save_nvila
from jaxstack.models import vlm
from jaxstack.rl import trainer
from jaxstack.rl.embedding_cache import VideoEmbeddingCache
from jaxstack.train.step import OptimConfig
from jaxstack.train.video_qa import VideoDataSection
from jaxstack.train.vlm_sft import VLMSFTConfig

FRAMES = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    data = str(root / "data")
    synth_video_dataset(data, 24, frames=FRAMES, size=64, seed=2)
    model = vlm.init_nvila(vlm.VLMConfig.preset("tiny"), seed=0)
    save_nvila(model, str(root / "init"))
    records = read_video_qa(os.path.join(data, "train.jsonl"))
    return dict(root=root, data=data, model=model, records=records, init=str(root / "init"))


def _cache(model, enabled=True):
    loader = FrameLoader(VideoSpec(num_frames=FRAMES, image_size=56))
    return VideoEmbeddingCache(model, lambda r: loader(r["video_path"]), enabled=enabled)


def test_embedding_cache_hit_and_keyed_by_id(setup) -> None:
    model, recs = setup["model"], setup["records"][:6]
    cache = _cache(model)
    first = cache.get_many(recs)
    assert cache.encoder_calls == 6 and cache.hits == 0
    # Reordered, filtered and repeated reads: served from the cache, rows follow the ids.
    order = [4, 1, 1, 5, 0]
    again = cache.get_many([recs[i] for i in order])
    assert cache.encoder_calls == 6 and cache.hits == 5
    np.testing.assert_array_equal(np.asarray(again), np.asarray(first)[order])
    loader = FrameLoader(VideoSpec(num_frames=FRAMES, image_size=56))
    direct = model.encode_video(jnp.asarray(loader(recs[5]["video_path"])))
    np.testing.assert_allclose(np.asarray(again[3]), np.asarray(direct), atol=1e-5)
    off = _cache(model, enabled=False)
    off.get_many(recs[:2] * 2)
    assert off.encoder_calls == 4 and off.hits == 0


def test_rollout_logprobs_equal_training_forward_on_video_prompts(setup) -> None:
    model, recs = setup["model"], setup["records"][:3]
    cfg, tok = model.cfg, ByteTokenizer()
    video = _cache(model).get_many(recs)
    ids_list = [
        prompt_ids(r, tok, media_token_id=cfg.media_token_id, num_media=cfg.video_length(FRAMES))
        for r in recs
    ]
    ids, mask = (jnp.asarray(a) for a in pad_prompts(ids_list, pad_id=tok.pad_id, bucket=16))
    embeds = model.embed_prompt(ids, video.reshape(-1, video.shape[-1]))
    rcfg = RolloutConfig(num_samples=4, max_new_tokens=12, temperature=1.0, pad_id=tok.pad_id)
    res = rollout(model.llm, inputs_embeds=embeds, input_mask=mask, cfg=rcfg, rng=jax.random.key(0))
    batch = dict(
        prompt_ids=ids,
        prompt_mask=mask,
        video=video,
        tokens=res.tokens,
        mask=res.mask,
        prompt_index=res.prompt_index,
    )
    # The training forward compiled as in the update (eager, op by op, is several times slower).
    logp_fn = nnx.jit(trainer.response_logprobs, static_argnums=(2, 3))
    logp = logp_fn(model.llm, batch, cfg.media_token_id, 1.0)
    m = np.asarray(res.mask)
    diff = np.abs(np.asarray(logp) - np.asarray(res.logprobs))[m]
    assert m.sum() > 20 and diff.max() <= 1e-5


def _rl_cfg(setup, out: str, **kw) -> trainer.RLJobConfig:
    data = VideoDataSection(dir=setup["data"], synth_num=0, num_frames=FRAMES, batch_size=4)
    base = dict(
        output_dir=out,
        init_from=setup["init"],
        sft=VLMSFTConfig(data=data),
        rollout=trainer.RolloutSection(num_samples=4, max_new_tokens=10),
        steps=3,
        prompts_per_step=4,
        checkpoint_every=1,
        eval=4,
        eval_batch=4,
    )
    return trainer.RLJobConfig(**{**base, **kw})


def _metrics(path: str) -> list[dict]:
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    return [{k: v for k, v in r.items() if k != "step_seconds"} for r in rows]


@pytest.mark.slow  # end-to-end job (pytest -m slow)
def test_run_rl_resume_exact(setup) -> None:
    root = setup["root"]
    straight = trainer.run_rl(_rl_cfg(setup, str(root / "a")))
    trainer.run_rl(_rl_cfg(setup, str(root / "b")), stop_after=1)
    resumed = trainer.run_rl(_rl_cfg(setup, str(root / "b")))
    assert resumed["start_step"] == 1
    a, b = _metrics(root / "a" / "metrics.jsonl"), _metrics(root / "b" / "metrics.jsonl")
    assert len(a) == 3
    for ra, rb in zip(a, b):
        for k in ra:
            if k not in ("encoder_calls", "cache_hits"):  # the cache restarts empty on resume
                assert ra[k] == rb[k], k
    # One read per prompt per step (the rollout and the update share it); a clip is encoded
    # only on its first read (repeats across steps are cache hits).
    assert a[-1]["encoder_calls"] + a[-1]["cache_hits"] == 12
    for name in ("rewards.png", "eval_sft.json", "eval_rl.json", "model/config.json"):
        assert os.path.exists(root / "a" / name), name
    assert same_weight_files(str(root / "a" / "model"), str(root / "b" / "model"))
    # The reported accuracies are the held-out evals' rescored samples (4 each).
    for tag in ("sft", "rl"):
        ev = json.load(open(root / "a" / f"eval_{tag}.json"))
        assert straight[f"{tag}_accuracy"] == ev["accuracy"] == rescored_accuracy(ev["samples"])
        assert ev["num"] == len(ev["samples"]) == 4


def test_nan_at_a_checkpoint_step_is_caught_and_never_saved(setup, monkeypatch) -> None:
    from jaxstack.train.checkpoint import Checkpointer
    from jaxstack.train.loop import NonFiniteLossError

    monkeypatch.setattr(trainer, "build_rl_job", poison_step(trainer.build_rl_job, 4))
    out = setup["root"] / "nan"
    cfg = _rl_cfg(setup, str(out), steps=6, checkpoint_every=2, log_every=3, eval=0)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4.*checkpoint: step 2"):
        trainer.run_rl(cfg)
    assert Checkpointer(out / "checkpoints").all_steps() == [2]


def test_run_rl_multi_update_kl_and_drgrpo(setup) -> None:
    algo = trainer.AlgoSection(
        advantage="drgrpo",
        loss_agg="seq_mean_token_sum_norm",
        kl_coef=0.05,
        update_epochs=2,
        minibatches=2,
        dynamic_sampling=False,
        overlong_buffer=4,
    )
    out = str(setup["root"] / "c")
    summary = trainer.run_rl(
        _rl_cfg(setup, out, algo=algo, steps=1, eval=0, cache_embeddings=False)
    )
    (row,) = _metrics(os.path.join(out, "metrics.jsonl"))
    for key in ("loss", "clip_frac", "kl_ref", "approx_kl", "reward", "kept_frac"):
        assert np.isfinite(row[key]), key
    assert row["kept_frac"] == 1.0 and summary["rl_accuracy"] is None
    with pytest.raises(ValueError, match="advantage"):
        dataclasses.replace(algo, advantage="ppo")


def test_update_moves_logprobs_along_the_advantage(setup) -> None:
    """One update raises the log-prob of responses with positive advantage, lowers negative."""
    from jaxstack.train import step as step_lib

    model, recs = setup["model"], setup["records"][:2]
    cfg, tok = model.cfg, ByteTokenizer()
    video = _cache(model).get_many(recs)
    ids_list = [
        prompt_ids(r, tok, media_token_id=cfg.media_token_id, num_media=cfg.video_length(FRAMES))
        for r in recs
    ]
    ids, mask = (jnp.asarray(a) for a in pad_prompts(ids_list, pad_id=tok.pad_id, bucket=16))
    embeds = model.embed_prompt(ids, video.reshape(-1, video.shape[-1]))
    rcfg = RolloutConfig(num_samples=2, max_new_tokens=6, pad_id=tok.pad_id)
    res = rollout(model.llm, inputs_embeds=embeds, input_mask=mask, cfg=rcfg, rng=jax.random.key(3))
    adv = jnp.asarray([1.0, -1.0, -1.0, 1.0])
    batch = dict(
        prompt_ids=ids,
        prompt_mask=mask,
        video=video,
        tokens=res.tokens,
        mask=res.mask,
        prompt_index=res.prompt_index,
        advantages=adv,
    )
    opt = step_lib.make_optimizer(step_lib.OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0))
    state, _ = step_lib.init_train_state(model.llm, opt, None)
    state = jax.tree.map(jnp.copy, state)  # the update donates its input
    graphdef, _, rest = nnx.split(model.llm, nnx.Param, ...)
    pcfg = trainer.policy_cfg(trainer.AlgoSection(kl_coef=0.0), 6)
    update = trainer.make_update(
        graphdef, rest, opt, pcfg, media_token_id=cfg.media_token_id, temperature=1.0
    )

    @jax.jit  # compiled once for before and after (eager, op by op, is several times slower)
    def seq_logp(params, batch):
        llm = nnx.merge(graphdef, params, rest)
        return trainer.response_logprobs(llm, batch, cfg.media_token_id, 1.0).sum(-1)

    before = np.asarray(seq_logp(state.params, batch))
    state, metrics = update(state, batch, None)
    delta = np.asarray(seq_logp(state.params, batch)) - before
    assert np.all(np.sign(delta) == np.sign(np.asarray(adv))), delta
    assert float(metrics["clip_frac"]) == 0.0  # on-policy: ratio is exactly 1


def _first_byte_even(response: str, example: dict) -> float:
    """A planted reward with a known value per response: 1 if its first character's code is
    even."""
    return float(bool(response) and ord(response[0]) % 2 == 0)


def test_job_step_moves_policy_toward_rewarded_responses(setup) -> None:
    """Through the job's own step (`rl_step`: rollout -> rewards -> advantages -> update), with a
    planted reward: the advantages that reach the update are the group-normalised planted
    rewards (checked against NumPy), and the update raises the log-probability of the rewarded
    responses and lowers the others (a flipped advantage sign reverses both)."""
    from jaxstack.rl.rewards import register_reward

    register_reward("planted_first_byte_even", override=True)(_first_byte_even)
    cfg = _rl_cfg(
        setup,
        str(setup["root"] / "direction"),
        reward={"planted_first_byte_even": 1.0},
        optim=OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0, min_lr_ratio=1.0),
        prompts_per_step=2,
        rollout=trainer.RolloutSection(num_samples=4, max_new_tokens=6, temperature=1.0),
    ).resolved()
    job = trainer.build_rl(cfg, setup["init"])
    before_params = job.state.params
    state, row, batch = trainer.rl_step(job, jax.tree.map(jnp.copy, job.state), 0)

    # The rewards the step saw are the planted ones on its decoded responses.
    tokens, mask = np.asarray(batch["tokens"]), np.asarray(batch["mask"])
    lengths = np.asarray(jax.device_get(batch["tokens"] != job.tok.pad_id)).sum(-1)
    texts = [trainer.decode_response(job.tok, t[:n]) for t, n in zip(tokens, lengths)]
    rewards = np.asarray([_first_byte_even(t, {}) for t in texts], np.float64)
    assert row["reward"] == pytest.approx(rewards.mean())
    # NumPy GRPO advantages: (r - group mean) / (unbiased group std + 1e-6), 0 for equal groups.
    pidx = np.asarray(batch["prompt_index"])
    want = np.zeros_like(rewards)
    for g in np.unique(pidx):
        r = rewards[pidx == g]
        if r.std() > 0:
            want[pidx == g] = (r - r.mean()) / (r.std(ddof=1) + 1e-6)
    np.testing.assert_allclose(np.asarray(batch["advantages"]), want, rtol=1e-5, atol=1e-6)
    # Dynamic sampling: groups with equal rewards carry no loss tokens, the others all theirs.
    varied = np.asarray([rewards[pidx == g].std() > 0 for g in pidx])
    assert varied.any(), "planted rewards gave no group with a reward spread; change the seed"
    assert not mask[~varied].any() and mask[varied].any(axis=-1).all()

    def seq_logp(params):
        return np.where(mask, np.asarray(job.logp_fn(params, batch)), 0.0).sum(-1)

    delta = seq_logp(state.params) - seq_logp(before_params)
    pos, neg = want > 0, want < 0
    assert pos.any() and neg.any()
    assert delta[pos].min() > 0 and delta[neg].max() < 0, (delta, want)
    assert float(np.sum(want * delta)) > 0


def test_rl_update_sharded_on_fsdp_tensor_equals_single_device(setup) -> None:
    """The RL update runs through the shared sharded step: on fsdp=2,tensor=2 its params and
    Adam moments carry the rules' shardings (embed -> fsdp, heads/kv_heads/mlp/vocab -> tensor,
    when the dimension divides), and one update equals the single-device update."""
    from jaxstack.parallel.mesh import make_mesh

    rule = {"vocab": "tensor", "embed": "fsdp", "heads": "tensor", "kv_heads": "tensor"}
    rule |= {"mlp": "tensor", "norm": None}
    from jaxstack.rl.rewards import register_reward

    register_reward("planted_first_byte_even", override=True)(_first_byte_even)
    cfg = _rl_cfg(
        setup,
        str(setup["root"] / "sharded"),
        reward={"planted_first_byte_even": 1.0},
        prompts_per_step=2,
        rollout=trainer.RolloutSection(num_samples=4, max_new_tokens=6, temperature=1.0),
        optim=OptimConfig(lr=1e-3, warmup_steps=0, weight_decay=0.0, min_lr_ratio=1.0),
    ).resolved()
    mesh = make_mesh("fsdp=2,tensor=2", devices=jax.devices()[:4])
    one, many = trainer.build_rl(cfg, setup["init"]), trainer.build_rl(cfg, setup["init"], mesh)
    sizes = dict(mesh.shape)

    def expected(var) -> tuple:
        out = []
        for name, dim in zip(var.get_metadata()["logical_axes"], var.get_value().shape):
            axis = rule.get(name)
            out.append(axis if axis and dim % sizes[axis] == 0 else None)
        return tuple(out)

    flat_vars = nnx.to_flat_state(nnx.state(many.model.llm, nnx.Param))
    wanted = {tuple(map(str, k)): expected(v) for k, v in flat_vars}
    got = {k: v.sharding.spec for k, v in _flat(many.state.params).items()}
    mu = {k: v.sharding.spec for k, v in _flat(many.state.opt_state[1][0].mu).items()}
    assert set(got) == set(wanted) == set(mu)
    for k in wanted:
        spec = tuple(got[k]) + (None,) * (len(wanted[k]) - len(got[k]))
        assert spec == wanted[k] and tuple(mu[k]) == tuple(got[k]), (k, got[k], wanted[k])
    used = {a for spec in wanted.values() for a in spec if a}
    assert used == {"fsdp", "tensor"}

    batch, _ = trainer.rl_batch(one, one.state.params, 0)
    assert np.abs(np.asarray(batch["advantages"])).sum() > 0
    s1, m1 = one.update(jax.tree.map(jnp.copy, one.state), batch, one.ref_params)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    s2, m2 = many.update(many.state, jax.device_put(batch, replicated), many.ref_params)
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5, atol=1e-7)
    for k, a in _flat(s1.params).items():
        # Adam moves each weight by ~lr = 1e-3; float32 reduction order differs by ~1e-6.
        np.testing.assert_allclose(np.asarray(_flat(s2.params)[k]), np.asarray(a), atol=1e-5)
        assert _flat(s2.params)[k].sharding.spec == got[k]  # the update keeps the shardings
    # The job's whole step on the mesh (rollout, rewards, sharded update) runs as well.
    s3, row, _ = trainer.rl_step(many, s2, 1)
    assert np.isfinite(row["loss"]) and int(s3.step) == 2


def _flat(tree) -> dict:
    return {
        tuple(str(getattr(p, "key", p)) for p in path): leaf
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }
