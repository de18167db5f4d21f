"""SFT data: JSONL records -> tokens with loss masks -> packed fixed-shape batches.

Labels are shifted HERE, not in the loss: every batch carries `input_ids` and `targets`, where
targets[b, t] is the token that follows input_ids[b, t] inside the same packed segment, and
`loss_mask[b, t]` is True only where that next token exists in the same segment AND is a
trained token (response or eos; never prompt, never padding, never another segment). The loss is
then plain `cross_entropy(logits[b, t], targets[b, t])` weighted by loss_mask.

Batch layout (numpy, B = batch_size // process_count rows for this process, T = seq_len):
    input_ids   int32 [B, T]  tokens, pad_id in padding
    targets     int32 [B, T]  next token in the same segment; 0 where there is none
    segment_ids int32 [B, T]  1..n for the n examples packed in a row, 0 = padding
    positions   int32 [B, T]  RoPE positions, restarting at 0 in every segment (0 in padding)
    loss_mask   bool  [B, T]  see above

Determinism and exact resume: `SFTBatches` packs the whole dataset once (records visited in a
seeded shuffled order, greedy first-fit into rows), then each epoch visits the packed rows in a
fresh seeded permutation. The number of rows is fixed, so steps_per_epoch is constant,
epoch = step // steps_per_epoch, and `batches[step]` is a pure function of (data, config, step):
a run resumed at step s sees exactly the batches it would have seen.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from jaxstack.data.tokenizer import Tokenizer

Example = tuple[np.ndarray, np.ndarray]  # (tokens int32 [L], trained bool [L])
BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a JSONL file; each needs string fields "prompt" and "response", or "text".

    Lines end at "\n" ("\r\n" too); a UTF-8 BOM at the start of the file is skipped. Blank
    lines are skipped. Raises ValueError naming file and line (1-based, and the 1-based column
    for bad JSON) for bad JSON, invalid UTF-8, a line that is not an object, or
    missing/non-string fields; FileNotFoundError if the file is missing.
    """
    path = os.fspath(path)
    records = []
    with open(path, "rb") as f:  # binary: split on "\n" only and decode line by line
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                at = e.start + len(raw) - len(e.object)  # utf-8-sig reports past the BOM
                raise ValueError(
                    f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[at]:02x} at byte {at + 1} "
                    "of the line)"
                ) from None
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                # e.pos indexes `line`, which has no newline: column = pos + 1 (json's own
                # colno restarts at 1 when the error sits past a trailing newline)
                raise ValueError(
                    f"{path}:{lineno}: bad JSON ({e.msg} at column {e.pos + 1})"
                ) from None
            if not isinstance(rec, dict):
                raise ValueError(
                    f"{path}:{lineno}: expected a JSON object, got {type(rec).__name__}"
                )
            fields = ("prompt", "response") if "text" not in rec else ("text",)
            for key in fields:
                if not isinstance(rec.get(key), str):
                    what = "missing" if key not in rec else f"not a string ({rec[key]!r:.40})"
                    raise ValueError(
                        f"{path}:{lineno}: field {key!r} is {what}; each record needs string "
                        f"fields 'prompt' and 'response', or 'text' (keys here: {sorted(rec)})"
                    )
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: no records")
    return records


def tokenize_record(
    rec: Mapping[str, Any], tok: Tokenizer, max_len: int, chat: bool = False
) -> Example:
    """Tokens and trained-token flags of one record, cut to at most `max_len` tokens.

    prompt/response: [bos] + prompt + response + [eos]; only response and eos are trained.
    With chat=True the prompt is the tokenizer's chat template for one user turn (with the
    generation prompt) instead of bos + prompt. text: [bos] + text + [eos], all trained but bos.
    Returns (tokens int32 [L], trained bool [L]) with L <= max_len (longer ones lose the end).
    """
    bos = [] if tok.bos_id is None else [tok.bos_id]
    if "text" in rec:
        body = tok.encode(rec["text"]) + [tok.eos_id]
        head: list[int] = bos
    else:
        if chat:
            head = tok.apply_chat_template([{"role": "user", "content": rec["prompt"]}])
        else:
            head = bos + tok.encode(rec["prompt"])
        body = tok.encode(rec["response"]) + [tok.eos_id]
    tokens = np.asarray(head + body, np.int32)[:max_len]
    trained = np.concatenate([np.zeros(len(head), bool), np.ones(len(body), bool)])[:max_len]
    return tokens, trained


def plan_packing(lengths: Sequence[int], seq_len: int, max_open_rows: int = 64) -> list[list[int]]:
    """Greedy first-fit: assign example i (in the given order) to the first open row with room.

    At most `max_open_rows` rows stay open (the oldest is closed when a new one is needed), so
    cost is O(N * max_open_rows). Returns rows as lists of example indices, in row order.
    """
    rows: list[list[int]] = []
    open_rows: list[int] = []  # indices into rows
    room: list[int] = []
    for i, n in enumerate(lengths):
        if not 0 < n <= seq_len:
            raise ValueError(f"example {i} has {n} tokens; need 1..seq_len={seq_len}")
        j = next((k for k, r in enumerate(room) if r >= n), None)
        if j is None:
            if len(open_rows) == max_open_rows:
                open_rows.pop(0)
                room.pop(0)
            rows.append([])
            open_rows.append(len(rows) - 1)
            room.append(seq_len)
            j = len(room) - 1
        rows[open_rows[j]].append(i)
        room[j] -= n
    return rows


def pack_row(examples: Sequence[Example], seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
    """One packed row [T] (keys BATCH_KEYS, see module doc) from examples that fit in seq_len."""
    row = {
        "input_ids": np.full(seq_len, pad_id, np.int32),
        "targets": np.zeros(seq_len, np.int32),
        "segment_ids": np.zeros(seq_len, np.int32),
        "positions": np.zeros(seq_len, np.int32),
        "loss_mask": np.zeros(seq_len, bool),
    }
    start = 0
    for seg, (tokens, trained) in enumerate(examples, 1):
        n = len(tokens)
        if start + n > seq_len:
            raise ValueError(f"examples need more than seq_len={seq_len} tokens")
        s = slice(start, start + n)
        row["input_ids"][s] = tokens
        row["segment_ids"][s] = seg
        row["positions"][s] = np.arange(n)
        row["targets"][start : start + n - 1] = tokens[1:]
        row["loss_mask"][start : start + n - 1] = trained[1:]
        start += n
    return row


def stack_rows(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Stack rows [T] into a batch [B, T] per key."""
    return {k: np.stack([r[k] for r in rows]) for k in BATCH_KEYS}


def pack_examples(
    examples: Sequence[Example], seq_len: int, pad_id: int = 0, max_open_rows: int = 64
) -> dict[str, np.ndarray]:
    """Greedy-pack examples (in order) into rows of seq_len: dict of BATCH_KEYS arrays [R, T]."""
    plan = plan_packing([len(t) for t, _ in examples], seq_len, max_open_rows)
    return stack_rows([pack_row([examples[i] for i in row], seq_len, pad_id) for row in plan])


class _PyMap:
    """Lazy `fn(source[i])`: the plain-Python stand-in for grain.MapDataset.source(...).map(fn)."""

    def __init__(self, source: Sequence, fn: Callable):
        self.source, self.fn = source, fn

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        return self.fn(self.source[i])


def _grain_available() -> bool:
    try:
        import grain  # noqa: F401
    except ImportError:
        return False
    return True


class SFTBatches:
    """Packed SFT batches with random access by step: `batches[step] -> dict` (see module doc).

    records: dicts with "prompt"/"response" or "text" (e.g. from read_jsonl or
    make_arithmetic_records). batch_size is the global number of rows per step; this process
    gets rows [process_index * b, (process_index + 1) * b) of it, b = batch_size // process_count.
    backend: "grain" (grain.MapDataset), "python" (identical output without grain) or "auto"
    (grain when importable). Records whose prompt fills max_len (no trained token left) are
    skipped and counted in `stats`.
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        tokenizer: Tokenizer,
        *,
        batch_size: int,
        seq_len: int,
        seed: int = 0,
        chat: bool = False,
        process_index: int = 0,
        process_count: int = 1,
        max_open_rows: int = 64,
        backend: str = "auto",
    ):
        if backend not in ("auto", "grain", "python"):
            raise ValueError(f"backend must be 'auto', 'grain' or 'python', got {backend!r}")
        if batch_size % process_count or not 0 <= process_index < process_count:
            raise ValueError(
                f"batch_size={batch_size} must divide over process_count={process_count} "
                f"(process_index={process_index})"
            )
        self.use_grain = backend == "grain" or (backend == "auto" and _grain_available())
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.local_batch_size = batch_size // process_count
        self.process_index = process_index
        self.pad_id = tokenizer.pad_id
        # one token over seq_len marks truncation; rows cut examples back to seq_len
        tokenize = functools.partial(tokenize_record, tok=tokenizer, max_len=seq_len + 1, chat=chat)
        self._grain = None
        if self.use_grain:
            import grain  # lazy: absent on the GPU machine

            self._grain = grain
            self._examples = grain.MapDataset.source(records).map(tokenize)
        else:
            self._examples = _PyMap(records, tokenize)

        # Pack once: visit records in a seeded order, keep those with a trained token.
        order = np.random.default_rng([seed, 0x5F7]).permutation(len(records))
        lengths, kept, truncated, tokens = [], [], 0, 0
        for i in order.tolist():
            ids, trained = self._examples[i]
            if not trained[1:seq_len].any():
                continue
            kept.append(i)
            lengths.append(min(len(ids), seq_len))
            truncated += len(ids) > seq_len
            tokens += lengths[-1]
        self._plan = [
            [kept[j] for j in row] for row in plan_packing(lengths, seq_len, max_open_rows)
        ]
        self.num_rows = len(self._plan)
        self.steps_per_epoch = self.num_rows // batch_size
        self.stats = {
            "records": len(records),
            "skipped_no_target": len(records) - len(kept),
            "truncated": truncated,
            "tokens": tokens,
            "rows": self.num_rows,
            "fill": tokens / max(1, self.num_rows * seq_len),
            "rows_dropped_per_epoch": self.num_rows - self.steps_per_epoch * batch_size,
        }
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"{len(kept)} usable records pack into {self.num_rows} rows of {seq_len} tokens, "
                f"fewer than batch_size={batch_size}: add data or lower batch_size/seq_len"
            )
        if self.use_grain:
            self._rows = grain.MapDataset.source(self._plan).map(self._make_row)
        else:
            self._rows = _PyMap(self._plan, self._make_row)
        self._cached_epoch: tuple[int, Sequence[dict[str, np.ndarray]]] | None = None

    def _make_row(self, example_ids: Sequence[int]) -> dict[str, np.ndarray]:
        t = self.seq_len
        examples = [
            (ids[:t], trained[:t]) for ids, trained in map(self._examples.__getitem__, example_ids)
        ]
        return pack_row(examples, t, self.pad_id)

    def epoch_row_order(self, epoch: int) -> np.ndarray:
        """Row ids this process reads in `epoch`: int [steps_per_epoch * local_batch_size]."""
        perm = np.random.default_rng([self.seed, 0xE90C, epoch]).permutation(self.num_rows)
        b = self.batch_size
        used = perm[: self.steps_per_epoch * b].reshape(self.steps_per_epoch, b)
        lo = self.process_index * self.local_batch_size
        return used[:, lo : lo + self.local_batch_size].reshape(-1)

    def _epoch(self, epoch: int) -> Sequence[dict[str, np.ndarray]]:
        """Random-access batches of one epoch (the latest one is cached)."""
        cached = self._cached_epoch
        if cached is not None and cached[0] == epoch:
            return cached[1]
        order = self.epoch_row_order(epoch).tolist()
        b = self.local_batch_size
        if self.use_grain:
            batches = (
                self._grain.MapDataset.source(order)
                .map(self._rows.__getitem__)
                .batch(b, drop_remainder=True, batch_fn=stack_rows)
            )
        else:
            batches = _PyMap(
                range(self.steps_per_epoch),
                lambda s: stack_rows([self._rows[r] for r in order[s * b : (s + 1) * b]]),
            )
        self._cached_epoch = (epoch, batches)  # one tuple store: safe with prefetch threads
        return batches

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        """Batch of global step `step` (>= 0): epoch step // steps_per_epoch, reshuffled per epoch."""
        step = int(step)
        if step < 0:
            raise IndexError(f"step must be >= 0, got {step}")
        epoch, index = divmod(step, self.steps_per_epoch)
        return self._epoch(epoch)[index]

    def iterate(
        self, start_step: int, stop_step: int, prefetch: int = 2
    ) -> Iterator[dict[str, np.ndarray]]:
        """Batches for steps [start_step, stop_step), built ahead by `prefetch` threads with grain.

        prefetch=0 (or the python backend) builds them one by one in the caller's thread.
        """
        if self.use_grain and prefetch > 0:
            grain = self._grain
            ds = grain.MapDataset.range(start_step, stop_step).map(self.__getitem__)
            read = grain.ReadOptions(num_threads=prefetch, prefetch_buffer_size=2 * prefetch)
            yield from ds.to_iter_dataset(read)
        else:
            for step in range(start_step, stop_step):
                yield self[step]

    def __repr__(self) -> str:
        return (
            f"SFTBatches(rows={self.num_rows}, batch_size={self.batch_size}, seq_len={self.seq_len}, "
            f"steps_per_epoch={self.steps_per_epoch}, backend={'grain' if self.use_grain else 'python'})"
        )
