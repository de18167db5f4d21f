"""Reward functions for RL on decoded responses, and a registry to name them in configs.

A reward function is `fn(response: str, example: Mapping[str, Any]) -> float`; `example` is the
dataset row the prompt came from and holds at least `answer` (and `options` for multiple choice).
Built-in rewards never raise on malformed model output: they return 0.0.

`get_reward(spec)` resolves a spec that is one of:
  * a registered name ("mc_accuracy", "format", "math", "r1v", or one added by `register_reward`),
  * `package.module:function` (imported with importlib),
  * `path/to/file.py:function` (loaded from that file).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import math
import os
import re
import sys
from collections.abc import Callable, Mapping
from fractions import Fraction
from typing import Any

from jaxstack.data.answers import (
    is_formatted,
    parse_answer,
    parse_choice,
    parse_choice_from_response,
)

RewardFn = Callable[[str, Mapping[str, Any]], float]

REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str, *, override: bool = False) -> Callable[[RewardFn], RewardFn]:
    """Decorator adding a reward function to `REWARDS` under `name`.

    Re-registering a name with a different function raises ValueError unless `override=True`.
    """
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"reward name must be a non-empty string without ':', got {name!r}")

    def deco(fn: RewardFn) -> RewardFn:
        if not callable(fn):
            raise ValueError(f"reward {name!r} must be callable, got {type(fn).__name__}")
        if name in REWARDS and REWARDS[name] is not fn and not override:
            raise ValueError(f"reward {name!r} is already registered (pass override=True)")
        REWARDS[name] = fn
        return fn

    return deco


def _load_file(path: str):
    if not os.path.isfile(path):
        raise ValueError(f"reward file {path!r} does not exist")
    full = os.path.abspath(path)
    stem = re.sub(r"\W", "_", os.path.splitext(os.path.basename(full))[0])
    name = f"_jaxstack_reward_{stem}_{hashlib.sha1(full.encode()).hexdigest()[:8]}"
    spec = importlib.util.spec_from_file_location(name, full)
    if spec is None or spec.loader is None:
        raise ValueError(f"cannot load reward file {path!r} as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ValueError(
            f"error while loading reward file {path!r}: {type(e).__name__}: {e}"
        ) from e
    return module


def get_reward(spec: str | RewardFn) -> RewardFn:
    """Resolve a reward spec (registered name, `module.path:function`, `file.py:function`).

    A callable is returned unchanged. Every failure raises ValueError with a clear message.
    """
    if callable(spec):
        return spec
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"reward spec must be a non-empty string, got {spec!r}")
    spec = spec.strip()
    if spec in REWARDS:
        return REWARDS[spec]
    if ":" not in spec:
        raise ValueError(
            f"unknown reward {spec!r}; registered rewards: {', '.join(sorted(REWARDS))} "
            "(or use 'module.path:function' / 'path/to/file.py:function')"
        )
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise ValueError(
            f"reward spec {spec!r} must look like 'module:function' or 'file.py:function'"
        )
    if target.endswith(".py") or "/" in target or os.sep in target:
        module = _load_file(target)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ValueError(f"cannot import reward module {target!r}: {e}") from e
    if not hasattr(module, attr):
        raise ValueError(f"reward module {target!r} has no attribute {attr!r}")
    fn = getattr(module, attr)
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable (it is a {type(fn).__name__})")
    return fn


def combine_rewards(
    specs: Mapping[str, float],
) -> Callable[[str, Mapping[str, Any]], tuple[float, dict[str, float]]]:
    """Weighted sum of rewards: `{spec: weight}` -> `fn(response, example) -> (total, parts)`.

    Specs are resolved now (bad specs fail early). `parts` maps each spec to its *unweighted*
    score; `total = sum(weight * parts[spec])`.
    """
    if not specs:
        raise ValueError("combine_rewards needs at least one reward spec")
    resolved: list[tuple[str, float, RewardFn]] = []
    for spec, weight in specs.items():
        try:
            w = float(weight)
        except (TypeError, ValueError) as e:
            raise ValueError(f"weight of reward {spec!r} must be a number, got {weight!r}") from e
        if not math.isfinite(w):
            raise ValueError(f"weight of reward {spec!r} must be finite, got {weight!r}")
        resolved.append((spec, w, get_reward(spec)))

    def combined(response: str, example: Mapping[str, Any]) -> tuple[float, dict[str, float]]:
        parts = {spec: float(fn(response, example)) for spec, _, fn in resolved}
        total = sum(w * parts[spec] for spec, w, _ in resolved)
        return float(total), parts

    return combined


def _never_raise(fn: RewardFn) -> RewardFn:
    @functools.wraps(fn)
    def wrapper(response, example):
        try:
            return float(fn(response, example))
        except Exception:
            return 0.0

    return wrapper


# ---------------------------------------------------------------------------------------------
# Parsing


def last_boxed(text: str) -> str | None:
    """Content of the last `\\boxed{...}` (balanced braces) in `text`, else None."""
    if not isinstance(text, str):
        return None
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth = 1
    for j in range(i, len(text)):
        c = text[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return text[i:j].strip()
    return None


def extract_math_answer(response: str) -> str | None:
    """The answer to grade: the last `<answer>` tag's content (its `\\boxed{}` if any), else the
    last `\\boxed{...}` of the response, else None."""
    ans = parse_answer(response)
    if ans is not None:
        boxed = last_boxed(ans)
        return boxed if boxed is not None else ans
    return last_boxed(response)


_TEXT_CMD_RE = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_THOUSANDS_RE = re.compile(r"^[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?$")
_DECIMAL_RE = re.compile(r"^[+-]?(?:\d+(?:\.\d*)?|\.\d+)$")
_SLASH_FRAC_RE = re.compile(r"^([+-]?)(\d+(?:\.\d*)?|\.\d+)/(\d+(?:\.\d*)?|\.\d+)$")
_TEX_FRAC_RE = re.compile(r"^([+-]?)\\frac\{([^{}]+)\}\{([^{}]+)\}$")
_TEX_FRAC_SHORT_RE = re.compile(r"^([+-]?)\\frac(\d)(\d)$")
_MAX_NUMBER_CHARS = 100


def normalize_math(text: str) -> str:
    """Canonical string form of a math answer: no spaces, `$`, `\\text{}` wrappers, `\\left`/
    `\\right`, thin spaces, degree signs, percent signs, trailing period; `\\dfrac`/`\\tfrac` ->
    `\\frac`; thousands separators dropped from plain numbers ("1,000" -> "1000")."""
    s = text.strip()
    for _ in range(3):  # nested \text{\textbf{...}}
        s = _TEXT_CMD_RE.sub(r"\1", s)
    s = s.replace("$", "")
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for tok in ("\\!", "\\,", "\\;", "\\:", "\\ ", "~", "^\\circ", "^{\\circ}", "\\%", "%"):
        s = s.replace(tok, "")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".")
    if _THOUSANDS_RE.match(s):
        s = s.replace(",", "")
    return s


def _to_fraction(s: str) -> Fraction | None:
    if len(s) > _MAX_NUMBER_CHARS:
        return None
    if _DECIMAL_RE.match(s):
        return Fraction(s)
    m = _SLASH_FRAC_RE.match(s) or _TEX_FRAC_RE.match(s) or _TEX_FRAC_SHORT_RE.match(s)
    if m:
        sign, num, den = m.groups()
        a, b = _to_fraction(num), _to_fraction(den)
        if a is None or b is None or b == 0:
            return None
        value = a / b
        return -value if sign == "-" else value
    return None


def math_equal(pred: str | None, gold: Any) -> bool:
    """Whether two math answers agree: numerically (exact rationals, so "0.5" == "1/2" ==
    "\\frac{1}{2}") when both parse as numbers, else as strings after `normalize_math`."""
    if pred is None or gold is None:
        return False
    a, b = normalize_math(str(pred)), normalize_math(str(gold))
    if not a or not b:
        return False
    fa, fb = _to_fraction(a), _to_fraction(b)
    if fa is not None and fb is not None:
        return fa == fb
    return a == b


# ---------------------------------------------------------------------------------------------
# Built-in rewards


@register_reward("mc_accuracy")
@_never_raise
def mc_accuracy(response: str, example: Mapping[str, Any]) -> float:
    """1.0 if the letter in the last `<answer>` tag equals `example["answer"]`, else 0.0.

    Only the answer tag is read (no fallback to a letter elsewhere in the response). The gold
    answer may be given as "B", "(B)", "b", ...; with `example["options"]` the letter must also
    name one of the options.
    """
    choice = parse_choice_from_response(response)
    gold = parse_choice(str(example["answer"]))
    if choice is None or gold is None:
        return 0.0
    options = example.get("options") if hasattr(example, "get") else None
    if options is not None and ord(choice) - ord("A") >= len(options):
        return 0.0
    return 1.0 if choice == gold else 0.0


@register_reward("format")
@_never_raise
def format_reward(response: str, example: Mapping[str, Any]) -> float:
    """1.0 if the response is `<think>...</think>` then `<answer>...</answer>` (nothing else but
    whitespace around them), else 0.0."""
    return 1.0 if is_formatted(response) else 0.0


@register_reward("math")
@_never_raise
def math_reward(response: str, example: Mapping[str, Any]) -> float:
    """1.0 if the extracted answer (see `extract_math_answer`) equals `example["answer"]` under
    `math_equal`, else 0.0."""
    return 1.0 if math_equal(extract_math_answer(response), example["answer"]) else 0.0


@register_reward("r1v")
@_never_raise
def r1v_reward(response: str, example: Mapping[str, Any]) -> float:
    """Long-RL's r1v reward: 0.9 * mc_accuracy + 0.1 * format."""
    return 0.9 * mc_accuracy(response, example) + 0.1 * format_reward(response, example)
