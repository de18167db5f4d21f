"""Video-QA data (prompts, label masking, batches, bad videos) and the VLM SFT job."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest
from flax import nnx
from loop_helpers import poison_step, same_weight_files
from scoring import rescored_accuracy

from jaxstack.data.synth_video import synth_video_dataset
from jaxstack.data.tokenizer import ByteTokenizer
from jaxstack.data.video_qa import (
    VideoQABatches,
    VideoSpec,
    format_response,
    prompt_ids,
    read_video_qa,
    sft_example,
)
from jaxstack.models import vlm
from jaxstack.parallel.mesh import make_mesh
from jaxstack.train import vlm_sft
from jaxstack.train.video_qa import VideoDataSection

MEDIA = 511


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth"))
    synth_video_dataset(out, 30, frames=8, size=64, seed=1)
    return out


def test_read_video_qa_errors(tmp_path) -> None:
    good = {"id": "a", "video": "v.mp4", "question": "q", "options": ["x", "y"], "answer": "B"}
    cases = [
        ({**good, "answer": "C"}, "answer 'C'"),
        ({**good, "options": ["x"]}, "options"),
        ({k: v for k, v in good.items() if k != "question"}, "'question'"),
    ]
    for rec, needle in cases:
        path = tmp_path / "bad.jsonl"
        path.write_text(json.dumps(good) + "\n" + json.dumps(rec) + "\n")
        with pytest.raises(ValueError, match=needle) as e:
            read_video_qa(path)
        assert "bad.jsonl:2" in str(e.value)
    path.write_text(json.dumps(good) + "\n")
    (rec,) = read_video_qa(path)
    assert rec["video_path"] == os.path.join(str(tmp_path), "v.mp4")


def test_prompt_placeholders_and_label_mask(dataset: str) -> None:
    tok = ByteTokenizer()
    rec = read_video_qa(os.path.join(dataset, "train.jsonl"))[0]
    ids = prompt_ids(rec, tok, media_token_id=MEDIA, num_media=13)
    assert ids.count(MEDIA) == 13
    # The placeholders form one run right after the user-role token.
    first = ids.index(MEDIA)
    assert ids[first : first + 13] == [MEDIA] * 13 and ids[first - 1] == tok.special_ids["<|user|>"]
    assert ids[-1] == tok.special_ids["<|assistant|>"]
    tokens, trained = sft_example(rec, tok, media_token_id=MEDIA, num_media=13)
    assert list(tokens[: len(ids)]) == ids and not trained[: len(ids)].any()
    assert trained[len(ids) :].all() and tokens[-1] == tok.eos_id
    assert tok.decode(tokens[len(ids) : -1]) == format_response(rec)
    assert format_response(rec).endswith(f"<answer>{rec['answer']}</answer>")


def _batches(records, **kw) -> VideoQABatches:
    tok = ByteTokenizer()
    cfg = vlm.VLMConfig.preset("tiny")
    args = dict(
        media_token_id=cfg.media_token_id,
        num_media=cfg.video_length(8),
        video=VideoSpec(num_frames=8, image_size=56, cache_size=0),
        batch_size=4,
        seq_len=256,
        seed=3,
    )
    return VideoQABatches(records, tok, **{**args, **kw})


def test_batches_deterministic_and_shifted(dataset: str) -> None:
    records = read_video_qa(os.path.join(dataset, "train.jsonl"))
    a, b = _batches(records), _batches(records)
    x, y = a.batch(5), b.batch(5)
    for k in x:
        np.testing.assert_array_equal(x[k], y[k])
    assert x["frames"].shape == (4, 8, 56, 56, 3) and x["frames"].dtype == np.float32
    # targets are the next tokens; the loss covers the response and eos only.
    ids, tg, lm = x["input_ids"], x["targets"], x["loss_mask"]
    np.testing.assert_array_equal(tg[:, :-1][lm[:, :-1]], ids[:, 1:][lm[:, :-1]])
    assert not (a.batch(5)["input_ids"] == a.batch(6)["input_ids"]).all()


def test_bad_video_skipped_and_counted(dataset: str, tmp_path) -> None:
    records = read_video_qa(os.path.join(dataset, "train.jsonl"))[:8]
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(os.urandom(2000))
    records[2] = {**records[2], "video_path": str(broken)}
    records[5] = {**records[5], "video_path": str(tmp_path / "missing.mp4")}
    data = _batches(records, batch_size=4)
    for step in range(6):  # more than an epoch: every record is visited
        batch = data.batch(step)
        assert batch["frames"].shape[0] == 4
    assert data.skipped == 2
    with pytest.raises(ValueError, match="no decodable video"):
        bad = [{**r, "video_path": str(broken)} for r in records]
        _batches(bad).batch(0)


def test_encode_videos_matches_per_clip() -> None:
    cfg = vlm.VLMConfig.preset("tiny")
    model = vlm.init_nvila(cfg, seed=0)
    s = cfg.vision.image_size
    frames = jax.random.normal(jax.random.key(1), (3, 8, s, s, 3))
    # Compiled, as in the SFT step and evaluation (eager, op by op, is several times slower).
    batched = nnx.jit(lambda m, x: m.encode_videos(x))(model, frames)
    one_clip = nnx.jit(lambda m, x: m.encode_video(x))
    for i in range(3):
        np.testing.assert_allclose(batched[i], one_clip(model, frames[i]), atol=1e-5)


def _small_cfg(dataset: str, out: str, **kw) -> vlm_sft.VLMSFTConfig:
    data = VideoDataSection(dir=dataset, synth_num=0, num_frames=8, batch_size=4, seq_len=256)
    model = vlm_sft.VLMModelSection(name="tiny", freeze_vision=kw.pop("freeze", False))
    base = dict(
        output_dir=out,
        model=model,
        data=data,
        steps=4,
        checkpoint_every=2,
        log_every=1,
        eval=4,
        eval_batch=4,
        max_new_tokens=8,
    )
    return vlm_sft.VLMSFTConfig(**{**base, **kw})


@pytest.mark.slow  # end-to-end job (pytest -m slow)
def test_sft_resume_exact_and_artifacts(dataset: str, tmp_path) -> None:
    straight = vlm_sft.run_vlm_sft(_small_cfg(dataset, str(tmp_path / "a")))
    vlm_sft.run_vlm_sft(_small_cfg(dataset, str(tmp_path / "b")), stop_after=2)
    resumed = vlm_sft.run_vlm_sft(_small_cfg(dataset, str(tmp_path / "b")))
    assert resumed["start_step"] == 2

    def losses(d):
        with open(tmp_path / d / "metrics.jsonl") as f:
            return [json.loads(line)["loss"] for line in f]

    assert losses("a") == losses("b") and len(losses("a")) == 4
    for name in ("loss.png", "eval.json", "summary.json", "config.yaml", "model/config.json"):
        assert os.path.exists(tmp_path / "a" / name), name
    assert same_weight_files(str(tmp_path / "a" / "model"), str(tmp_path / "b" / "model"))
    ev = json.load(open(tmp_path / "a" / "eval.json"))
    assert straight["eval_accuracy"] == ev["accuracy"] == rescored_accuracy(ev["samples"])
    assert ev["num"] == len(ev["samples"]) == 4


def test_nan_at_a_checkpoint_step_is_caught_and_never_saved(dataset, tmp_path, monkeypatch):
    from jaxstack.train.checkpoint import Checkpointer
    from jaxstack.train.loop import NonFiniteLossError

    monkeypatch.setattr(vlm_sft, "build_vlm_sft", poison_step(vlm_sft.build_vlm_sft, 4))
    cfg = _small_cfg(dataset, str(tmp_path / "n"), steps=6, checkpoint_every=2, log_every=3)
    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 4.*checkpoint: step 2"):
        vlm_sft.run_vlm_sft(cfg)
    assert Checkpointer(tmp_path / "n" / "checkpoints").all_steps() == [2]


def test_sft_frozen_vision_tower_unchanged(dataset: str, tmp_path) -> None:
    from jaxstack.hf import load_nvila

    cfg = _small_cfg(dataset, str(tmp_path / "f"), freeze=True, steps=2, eval=0)
    vlm_sft.run_vlm_sft(cfg)
    trained = load_nvila(str(tmp_path / "f" / "model"))
    init = vlm_sft.build_vlm(cfg.model, 263, make_mesh(None), 0)
    tower = lambda m: jax.tree.leaves(nnx.state(m.vision_tower, nnx.Param))
    for a, b in zip(tower(trained), tower(init)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    llm = lambda m: jax.tree.leaves(nnx.state(m.llm, nnx.Param))
    assert any(not np.array_equal(a, b) for a, b in zip(llm(trained), llm(init)))


def test_prompt_uses_tokenizers_own_media_token(dataset: str) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from jaxstack.data.tokenizer import HFTokenizer

    words = ["[UNK]", "user", "assistant", "A.", "B.", "C.", "D."]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", eos_token="<|im_end|>")
    hf.add_special_tokens({"additional_special_tokens": ["<image>", "<|im_start|>"]})
    hf.chat_template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    tok = HFTokenizer(hf)
    media = hf.convert_tokens_to_ids("<image>")
    rec = read_video_qa(os.path.join(dataset, "train.jsonl"))[0]
    ids = prompt_ids(rec, tok, media_token_id=media, num_media=7)
    assert ids.count(media) == 7
    first = ids.index(media)
    assert ids[first : first + 7] == [media] * 7
    assert ids[-2:] == [hf.convert_tokens_to_ids("<|im_start|>"), words.index("assistant")]
