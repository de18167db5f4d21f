"""Parsing model answers in the `<think>...</think><answer>...</answer>` format: the answer tag,
multiple-choice letters and the format check. Used by the rewards (`jaxstack.rl.rewards`) and by
the evaluations; pure text functions that never raise on malformed output."""

from __future__ import annotations

import re

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL | re.IGNORECASE)
_FORMAT_RE = re.compile(r"^\s*<think>.+?</think>\s*<answer>.+?</answer>\s*$", re.DOTALL)
_PAREN_LETTER_RE = re.compile(r"^\(\s*([A-Za-z])\s*\)(?:\s.*)?$", re.DOTALL)
_LETTER_RE = re.compile(r"^([A-Za-z])(?:[.):](?:\s.*)?)?$", re.DOTALL)


def parse_answer(response: str) -> str | None:
    """Stripped content of the last `<answer>...</answer>` tag (case-insensitive), else None."""
    if not isinstance(response, str):
        return None
    found = _ANSWER_RE.findall(response)
    return found[-1].strip() if found else None


def parse_choice(text: str | None) -> str | None:
    """Upper-case option letter from a multiple-choice answer string, else None.

    Accepts "B", "b", " B ", "(B)", "(B) text", "B.", "B)", "B:", "B) text", "B. text".
    Conservative: anything else ("B text", "the answer is B", "AB") is None.
    """
    if not isinstance(text, str):
        return None
    text = text.strip()
    m = _PAREN_LETTER_RE.match(text) or _LETTER_RE.match(text)
    return m.group(1).upper() if m else None


def parse_choice_from_response(response: str) -> str | None:
    """Option letter inside the last `<answer>` tag of a response (no fallback without a tag)."""
    return parse_choice(parse_answer(response))


def is_formatted(response: str) -> bool:
    """True if the response is `<think>...</think>` then `<answer>...</answer>` (nothing else
    but whitespace around them)."""
    return isinstance(response, str) and _FORMAT_RE.match(response) is not None
