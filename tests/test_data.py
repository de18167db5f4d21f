"""Data: tokenizers, synthetic arithmetic task, JSONL reading, packing, SFTBatches."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from jaxstack.data.sft import (
    BATCH_KEYS,
    SFTBatches,
    pack_examples,
    plan_packing,
    read_jsonl,
    tokenize_record,
)
from jaxstack.data.synthetic import make_arithmetic_records, score_arithmetic
from jaxstack.data.tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

TEXTS = ["", "hello", "héllo wörld", "数学 1+1=2", "emoji 🚀🎉 done", "tab\tnew\nline"]


# --- tokenizers ---------------------------------------------------------------------------


def test_byte_tokenizer_roundtrip_and_specials():
    tok = load_tokenizer("byte")
    assert isinstance(tok, ByteTokenizer)
    assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (263, 256, 257, 258)
    for text in TEXTS:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids) and tok.decode(ids) == text
    ids = [tok.bos_id, *tok.encode("é"), tok.eos_id, tok.pad_id]
    assert tok.decode(ids) == "é"
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>é<eos><pad>"
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a cut multi-byte char does not raise
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([263])
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}])
    assert tok.decode(chat, skip_special_tokens=False) == "<|user|>hi<|end|><|assistant|>"
    with pytest.raises(ValueError, match="unknown chat role"):
        tok.apply_chat_template([{"role": "tool", "content": "x"}])


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory):
    """A real byte-level BPE tokenizer (trained here, offline) saved in the HF layout."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tk.train_from_iterator(TEXTS * 20, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>")
    fast.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )
    path = tmp_path_factory.mktemp("hf_tok")
    fast.save_pretrained(path)
    return str(path)


def test_hf_tokenizer(hf_tokenizer_dir, tmp_path):
    tok = load_tokenizer(hf_tokenizer_dir)
    assert isinstance(tok, HFTokenizer)
    assert tok.eos_id == tok.hf.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_id == tok.eos_id and tok.bos_id is None  # no pad token: falls back to eos
    assert tok.vocab_size == len(tok.hf)
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hello"}])
    assert chat[0] == tok.hf.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(chat, skip_special_tokens=False).endswith("<|im_start|>assistant\n")
    with pytest.raises(FileNotFoundError, match="neither 'byte' nor an existing local directory"):
        load_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="cannot load a tokenizer"):
        load_tokenizer(str(tmp_path))  # exists, but holds no tokenizer


# --- synthetic task -----------------------------------------------------------------------


def test_arithmetic_records_and_scorer():
    a = make_arithmetic_records(200, seed=1, max_digits=4)
    assert a == make_arithmetic_records(200, seed=1, max_digits=4)
    assert a != make_arithmetic_records(200, seed=2, max_digits=4)
    assert make_arithmetic_records(50, seed=1, max_digits=4) == a[:50]  # prefix-stable
    lengths = set()
    for rec in a:
        assert score_arithmetic(rec["prompt"], rec["response"])
        assert score_arithmetic(rec["prompt"], " " + rec["response"] + "<eos>junk\n")
        assert not score_arithmetic(rec["prompt"], str(int(rec["response"]) + 1))
        assert not score_arithmetic(rec["prompt"], rec["response"] + "0")
        lengths.update(len(x) for x in rec["prompt"][3:].split("=")[0].split("+"))
    assert lengths == {1, 2, 3, 4}
    p = "Q: 482+37=?\nA: "
    assert (
        score_arithmetic(p, "519")
        and not score_arithmetic(p, "")
        and not score_arithmetic(p, "x519")
    )
    with pytest.raises(ValueError, match="not an arithmetic prompt"):
        score_arithmetic("hello", "1")


# --- JSONL --------------------------------------------------------------------------------


def _jsonl(tmp_path, lines: list[str]) -> str:
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def test_read_jsonl_ok_and_errors(tmp_path):
    good = [json.dumps({"prompt": "p", "response": "r", "id": 1}), "", json.dumps({"text": "t"})]
    recs = read_jsonl(_jsonl(tmp_path, good))
    assert recs == [{"prompt": "p", "response": "r", "id": 1}, {"text": "t"}]
    cases = [
        ([good[0], "{bad json"], r"d.jsonl:2: bad JSON"),
        ([good[0], good[0], '{"prompt": "p"}'], r"d.jsonl:3: field 'response' is missing"),
        (['{"prompt": 1, "response": "r"}'], r"d.jsonl:1: field 'prompt' is not a string"),
        (["[1, 2]"], r"d.jsonl:1: expected a JSON object, got list"),
        (["", "  "], r"d.jsonl: no records"),
    ]
    for lines, msg in cases:
        with pytest.raises(ValueError, match=msg):
            read_jsonl(_jsonl(tmp_path, lines))
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")


# --- tokenize + pack ----------------------------------------------------------------------


def test_tokenize_record():
    tok = ByteTokenizer()
    ids, trained = tokenize_record({"prompt": "ab", "response": "c"}, tok, max_len=16)
    assert ids.dtype == np.int32 and trained.dtype == bool
    assert ids.tolist() == [257, 97, 98, 99, 258]
    assert trained.tolist() == [False, False, False, True, True]
    ids, trained = tokenize_record({"text": "xy"}, tok, max_len=16)
    assert ids.tolist() == [257, 120, 121, 258] and trained.tolist() == [False, True, True, True]
    ids, trained = tokenize_record({"prompt": "ab", "response": "cd"}, tok, max_len=4)
    assert ids.tolist() == [257, 97, 98, 99] and trained.tolist() == [False, False, False, True]
    ids, trained = tokenize_record({"prompt": "ab", "response": "c"}, tok, 16, chat=True)
    assert ids.tolist() == [260, 97, 98, 262, 261, 99, 258] and trained.sum() == 2


def test_pack_hand_example():
    # example A: tokens 10 11 12 (12 trained), example B: 20 21 (21 trained); seq_len 7, pad 0
    a = (np.array([10, 11, 12], np.int32), np.array([0, 0, 1], bool))
    b = (np.array([20, 21], np.int32), np.array([0, 1], bool))
    out = pack_examples([a, b], seq_len=7, pad_id=99)
    assert set(out) == set(BATCH_KEYS) and out["input_ids"].shape == (1, 7)
    assert out["input_ids"].tolist() == [[10, 11, 12, 20, 21, 99, 99]]
    assert out["targets"].tolist() == [[11, 12, 0, 21, 0, 0, 0]]
    assert out["loss_mask"].tolist() == [[False, True, False, True, False, False, False]]
    assert out["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 0, 0]]
    assert out["positions"].tolist() == [[0, 1, 2, 0, 1, 0, 0]]
    assert out["input_ids"].dtype == np.int32 and out["loss_mask"].dtype == bool
    # a third example that does not fit opens a second row; first-fit puts a 2-token one back
    c = (np.array([30, 31, 32, 33], np.int32), np.ones(4, bool))
    d = (np.array([40, 41], np.int32), np.ones(2, bool))
    assert plan_packing([3, 2, 4, 2], 7) == [[0, 1, 3], [2]]
    out = pack_examples([a, b, c, d], seq_len=7)
    assert out["segment_ids"].tolist() == [[1, 1, 1, 2, 2, 3, 3], [1, 1, 1, 1, 0, 0, 0]]
    with pytest.raises(ValueError, match="need 1..seq_len=7"):
        plan_packing([8], 7)


def _check_rows(batch: dict, examples_by_row=None):
    """Invariants of packed rows: contiguous segments, targets = next token in segment."""
    ids, tgt, seg, pos, mask = (batch[k] for k in BATCH_KEYS)
    for r in range(ids.shape[0]):
        s = seg[r]
        n = s.max()
        assert (np.diff(s[s > 0]) >= 0).all() and set(s[s > 0]) == set(range(1, n + 1))
        assert (s[: (s > 0).sum()] > 0).all()  # padding only at the end
        for k in range(1, n + 1):
            idx = np.flatnonzero(s == k)
            assert (np.diff(idx) == 1).all()  # contiguous: segments never interleave
            assert (pos[r, idx] == np.arange(len(idx))).all()
            assert (tgt[r, idx[:-1]] == ids[r, idx[1:]]).all()
            assert not mask[r, idx[-1]]  # last token of a segment predicts nothing
        same_next = np.append((s[:-1] == s[1:]) & (s[:-1] > 0), False)
        assert not (mask[r] & ~same_next).any()  # never across segments or into padding


def test_packing_random_examples():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 33, size=300)
    examples = [
        (rng.integers(0, 256, n).astype(np.int32), rng.random(n) < 0.5) for n in lengths.tolist()
    ]
    out = pack_examples(examples, seq_len=64, max_open_rows=4)
    _check_rows(out)
    assert (out["segment_ids"] > 0).sum() == lengths.sum()  # every token placed exactly once
    assert out["loss_mask"].sum() == sum(t[1:].sum() for _, t in examples)
    assert out["input_ids"].shape[0] < lengths.sum() / 64 * 1.1  # first-fit packs tightly


# --- SFTBatches ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def records():
    return make_arithmetic_records(600, seed=0, max_digits=3)


def _equal(x: dict, y: dict) -> bool:
    return set(x) == set(y) and all(
        x[k].dtype == y[k].dtype and np.array_equal(x[k], y[k]) for k in x
    )


def test_sft_batches_shapes_and_content(records):
    tok = ByteTokenizer()
    ds = SFTBatches(records, tok, batch_size=4, seq_len=96, seed=3)
    b = ds[0]
    for k, dtype in zip(BATCH_KEYS, [np.int32] * 4 + [bool]):
        assert b[k].shape == (4, 96) and b[k].dtype == dtype
    _check_rows(b)
    # every record is packed exactly once; one epoch visits distinct rows
    assert sorted(i for row in ds._plan for i in row) == list(range(len(records)))
    order = np.concatenate([ds.epoch_row_order(e) for e in range(2)]).reshape(2, -1)
    assert all(len(set(o.tolist())) == o.size for o in order)
    assert not np.array_equal(order[0], order[1])  # reshuffled per epoch
    assert ds.stats["tokens"] == sum(len(tokenize_record(r, tok, 96)[0]) for r in records)
    # trained targets in an epoch are the responses + eos of the records in the used rows
    spe = ds.steps_per_epoch
    trained = sum(ds[s]["loss_mask"].sum() for s in range(spe))
    used = [i for r in ds.epoch_row_order(0).tolist() for i in ds._plan[r]]
    assert trained == sum(len(records[i]["response"]) + 1 for i in used)
    text = tok.decode(b["input_ids"][0][b["segment_ids"][0] == 1])
    assert score_arithmetic(text, text.split("A: ")[1])  # prompt and response stay together


def test_sft_batches_deterministic_random_access_and_resume(records):
    tok = ByteTokenizer()
    ds = SFTBatches(records, tok, batch_size=4, seq_len=96, seed=7)
    steps = list(range(0, 2 * ds.steps_per_epoch + 3))
    seq = [ds[s] for s in steps]
    again = SFTBatches(records, tok, batch_size=4, seq_len=96, seed=7)  # a "restarted" job
    for s in reversed(steps):  # random access in any order gives the same batches
        assert _equal(again[s], seq[s])
    resumed = list(again.iterate(5, len(steps)))
    assert all(_equal(x, seq[5 + i]) for i, x in enumerate(resumed))
    assert all(_equal(x, seq[i]) for i, x in enumerate(again.iterate(0, 4, prefetch=0)))
    other = SFTBatches(records, tok, batch_size=4, seq_len=96, seed=8)
    assert not _equal(other[0], seq[0])


def test_sft_batches_grain_matches_python_fallback(records, monkeypatch):
    pytest.importorskip("grain")
    tok = ByteTokenizer()
    kw = dict(batch_size=4, seq_len=80, seed=1)
    g = SFTBatches(records, tok, backend="grain", **kw)
    p = SFTBatches(records, tok, backend="python", **kw)
    assert g.use_grain and not p.use_grain and g.stats == p.stats
    for s in [0, 1, g.steps_per_epoch - 1, g.steps_per_epoch, 3 * g.steps_per_epoch + 2]:
        assert _equal(g[s], p[s])
    assert all(_equal(x, p[3 + i]) for i, x in enumerate(g.iterate(3, 9)))
    monkeypatch.setitem(sys.modules, "grain", None)  # as on the GPU machine: grain absent
    auto = SFTBatches(records, tok, **kw)
    assert not auto.use_grain and _equal(auto[5], g[5])


def test_sft_batches_process_shards_and_errors(records):
    tok = ByteTokenizer()
    full = SFTBatches(records, tok, batch_size=4, seq_len=64)
    parts = [
        SFTBatches(records, tok, batch_size=4, seq_len=64, process_index=i, process_count=2)
        for i in range(2)
    ]
    for s in [0, full.steps_per_epoch + 1]:
        joined = {k: np.concatenate([p[s][k] for p in parts]) for k in BATCH_KEYS}
        assert parts[0][s]["input_ids"].shape == (2, 64) and _equal(joined, full[s])
    with pytest.raises(ValueError, match="must divide over process_count"):
        SFTBatches(records, tok, batch_size=3, seq_len=64, process_count=2)
    with pytest.raises(ValueError, match="fewer than batch_size=64"):
        SFTBatches(records[:10], tok, batch_size=64, seq_len=64)
    # a prompt that fills seq_len leaves nothing to train: skipped and counted
    long = [{"prompt": "x" * 100, "response": "y"}] + records[:50]
    ds = SFTBatches(long, tok, batch_size=2, seq_len=64)
    assert ds.stats["skipped_no_target"] == 1 and ds.stats["truncated"] == 0


def test_read_jsonl_error_positions_utf8_and_bom(tmp_path):
    good = json.dumps({"prompt": "p", "response": "r"}).encode()
    path = tmp_path / "e.jsonl"
    # A line cut short: the error sits just past its end (column 8 of line 2), not "column 1".
    path.write_bytes(good + b'\n{"a": 1\n')
    with pytest.raises(
        ValueError, match=r"e\.jsonl:2: bad JSON \(Expecting ',' delimiter at column 8\)"
    ):
        read_jsonl(path)
    path.write_bytes(good + b"\r\n" + good + b'\r\n{"prompt": "p",, }\r\n')
    with pytest.raises(ValueError, match=r"e\.jsonl:3: bad JSON .* at column 16\)"):
        read_jsonl(path)
    # Invalid UTF-8: one line naming file and line, not a raw UnicodeDecodeError.
    path.write_bytes(good + b"\n" + good + b'\n{"prompt": "\xff", "response": "r"}\n')
    with pytest.raises(ValueError, match=r"e\.jsonl:3: not valid UTF-8 \(byte 0xff at byte 13"):
        read_jsonl(path)
    # A UTF-8 BOM at the start of the file is accepted (and only there).
    path.write_bytes(b'\xef\xbb\xbf{"text": "\xc3"}\n')
    with pytest.raises(ValueError, match=r"e\.jsonl:1: not valid UTF-8 \(byte 0xc3 at byte 14"):
        read_jsonl(path)
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n" + good + b"\n")
    assert read_jsonl(path) == [{"prompt": "p", "response": "r"}] * 2
    path.write_bytes(good + b"\n\xef\xbb\xbf" + good + b"\n")
    with pytest.raises(ValueError, match=r"e\.jsonl:2: bad JSON"):
        read_jsonl(path)
