"""Embedded synthetic SFT task with checkable answers: multi-digit addition.

Records look like {"prompt": "Q: 482+37=?\nA: ", "response": "519"}. The task needs no
download, a byte tokenizer handles it, a tiny model learns it in minutes on a CPU, and
`score_arithmetic` checks any generation, so the default train/RL jobs report real accuracy.
"""

from __future__ import annotations

import random
import re

_PROMPT = "Q: {a}+{b}=?\nA: "
_PROMPT_RE = re.compile(r"Q: (\d+)\+(\d+)=\?")
_ANSWER_RE = re.compile(r"\s*(-?\d+)")


def make_arithmetic_records(n: int, seed: int = 0, max_digits: int = 3) -> list[dict[str, str]]:
    """`n` addition problems, deterministic per (seed, max_digits).

    Each operand first draws its digit count uniformly from 1..max_digits, then a value with
    exactly that many digits, so short and long problems are equally common.
    Returns [{"prompt": "Q: a+b=?\\nA: ", "response": str(a + b)}, ...].
    """
    if n < 0 or max_digits < 1:
        raise ValueError(f"need n >= 0 and max_digits >= 1, got n={n}, max_digits={max_digits}")
    rng = random.Random(f"arithmetic:{seed}:{max_digits}")

    def operand() -> int:
        digits = rng.randint(1, max_digits)
        return rng.randint(0 if digits == 1 else 10 ** (digits - 1), 10**digits - 1)

    records = []
    for _ in range(n):
        a, b = operand(), operand()
        records.append({"prompt": _PROMPT.format(a=a, b=b), "response": str(a + b)})
    return records


def score_arithmetic(prompt: str, generated: str) -> bool:
    """True when `generated` starts (after whitespace) with the correct sum for `prompt`.

    Text after the number (an eos rendered as text, a newline, more tokens) is ignored; a
    number that merely starts with the right digits ("5190" for 519) is wrong.
    Raises ValueError if `prompt` is not an addition prompt.
    """
    m = _PROMPT_RE.search(prompt)
    if m is None:
        raise ValueError(f"not an arithmetic prompt: {prompt!r}")
    answer = _ANSWER_RE.match(generated)
    return answer is not None and int(answer.group(1)) == int(m.group(1)) + int(m.group(2))


# -- sorting (fixed-length prompts and answers, for diffusion LLMs) -------------------------------

_SORT_PREFIX = "sort: "


def make_sorting_record(rng: random.Random, count: int, max_value: int = 99) -> dict[str, str]:
    """One sorting problem: `count` integers in [0, max_value], zero-padded to a fixed width.

    {"prompt": "sort: 42 07 93\\n", "response": "07 42 93"}. Every prompt of a given (count,
    max_value) has the same length, and so has every answer, so a batch needs no padding.
    """
    if count < 1 or max_value < 1:
        raise ValueError(f"need count >= 1 and max_value >= 1, got {count}, {max_value}")
    width = len(str(max_value))
    values = [rng.randint(0, max_value) for _ in range(count)]
    fmt = lambda vs: " ".join(f"{v:0{width}d}" for v in vs)
    return {"prompt": f"{_SORT_PREFIX}{fmt(values)}\n", "response": fmt(sorted(values))}


def make_sorting_records(
    n: int, seed: int = 0, count: int = 16, max_value: int = 99
) -> list[dict[str, str]]:
    """`n` sorting problems, deterministic per (seed, count, max_value)."""
    rng = random.Random(f"sorting:{seed}:{count}:{max_value}")
    return [make_sorting_record(rng, count, max_value) for _ in range(n)]


def score_sorting(prompt: str, generated: str) -> bool:
    """True when `generated` (leading/trailing whitespace ignored) is exactly the prompt's
    numbers in ascending order, written as in the prompt. Raises ValueError on a non-sorting
    prompt."""
    if not prompt.startswith(_SORT_PREFIX):
        raise ValueError(f"not a sorting prompt: {prompt!r}")
    items = prompt[len(_SORT_PREFIX) :].split()
    return generated.strip() == " ".join(sorted(items, key=int))


def sorting_position_accuracy(prompt: str, generated: str) -> float:
    """Fraction of the answer's positions holding the right number (partial credit; a missing
    or extra number counts against it). Raises ValueError on a non-sorting prompt."""
    if not prompt.startswith(_SORT_PREFIX):
        raise ValueError(f"not a sorting prompt: {prompt!r}")
    want = sorted(prompt[len(_SORT_PREFIX) :].split(), key=int)
    got = generated.split()
    hits = sum(a == b for a, b in zip(want, got))
    return hits / max(len(want), len(got))


# -- fixed-width addition (fixed-length prompts and answers, for diffusion LLMs) ------------------

_ADD_PREFIX = "add: "
_ADD_RE = re.compile(r"add: (\d+)\+(\d+)\n\Z")


def make_addition_record(rng: random.Random, digits: int) -> dict[str, str]:
    """One addition problem with two `digits`-digit operands (zero-padded) and the sum written
    with digits + 1 digits (zero-padded), most significant digit first.

    {"prompt": "add: 0482+9037\\n", "response": "09519"}: every prompt and every answer of a
    given `digits` has the same length. Carries run from the answer's end to its start, against
    a left-to-right block order, so a model must compute them from the prompt.
    """
    if digits < 1:
        raise ValueError(f"need digits >= 1, got {digits}")
    a, b = rng.randrange(10**digits), rng.randrange(10**digits)
    return {
        "prompt": f"{_ADD_PREFIX}{a:0{digits}d}+{b:0{digits}d}\n",
        "response": f"{a + b:0{digits + 1}d}",
    }


def _addition_answer(prompt: str) -> str:
    m = _ADD_RE.match(prompt)
    if m is None or len(m.group(1)) != len(m.group(2)):
        raise ValueError(f"not a fixed-width addition prompt: {prompt!r}")
    digits = len(m.group(1))
    return f"{int(m.group(1)) + int(m.group(2)):0{digits + 1}d}"


def score_addition(prompt: str, generated: str) -> bool:
    """True when `generated` (surrounding whitespace ignored) is exactly the zero-padded sum.
    Raises ValueError on a prompt not made by `make_addition_record`."""
    return generated.strip() == _addition_answer(prompt)


def addition_digit_accuracy(prompt: str, generated: str) -> float:
    """Fraction of the sum's digits right in place (partial credit; a missing or extra
    character counts against it). Raises ValueError on a non-addition prompt."""
    want, got = _addition_answer(prompt), generated.strip()
    hits = sum(a == b for a, b in zip(want, got))
    return hits / max(len(want), len(got))
