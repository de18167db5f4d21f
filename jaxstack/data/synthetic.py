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
