"""Reward registry and built-in rewards: parsing edge cases, math equivalence, user functions
loaded from files and modules, and clear errors for bad specs."""

import pytest

from jaxstack.rl import rewards
from jaxstack.rl.rewards import (
    REWARDS,
    combine_rewards,
    extract_math_answer,
    get_reward,
    math_equal,
    parse_answer,
    parse_choice,
    register_reward,
)

GOOD = "<think>2 + 2 is 4, option B.</think>\n<answer>B</answer>"


# ---------------------------------------------------------------------------------------------
# parsing


@pytest.mark.parametrize(
    "response,want",
    [
        (GOOD, "B"),
        ("<answer>  (C) a cat \n</answer>", "(C) a cat"),
        ("<ANSWER>d</Answer>", "d"),
        ("<answer>A</answer> then <answer>B</answer>", "B"),  # the last tag counts
        ("<answer></answer>", ""),
        ("the answer is B", None),
        ("<answer>B", None),  # unclosed
        (None, None),
        (42, None),
    ],
)
def test_parse_answer(response, want):
    assert parse_answer(response) == want


@pytest.mark.parametrize(
    "text,want",
    [
        ("B", "B"),
        ("b", "B"),
        ("  C \n", "C"),
        ("(B)", "B"),
        ("( d )", "D"),
        ("(B) the second one", "B"),
        ("B.", "B"),
        ("B)", "B"),
        ("B:", "B"),
        ("B) a dog", "B"),
        ("B. a dog", "B"),
        ("B text", None),  # conservative: no separator after the letter
        ("AB", None),
        ("the answer is B", None),
        ("(AB)", None),
        ("", None),
        ("1", None),
        (None, None),
    ],
)
def test_parse_choice(text, want):
    assert parse_choice(text) == want


# ---------------------------------------------------------------------------------------------
# built-in rewards


def test_mc_accuracy():
    mc = get_reward("mc_accuracy")
    ex = {"answer": "B", "options": ["one", "two", "three", "four"]}
    assert mc(GOOD, ex) == 1.0
    assert mc("<answer>(b) two</answer>", ex) == 1.0
    assert mc("<answer>C</answer>", ex) == 0.0
    assert mc("I think it is B", ex) == 0.0  # only the answer tag is read
    assert mc("<answer>B</answer>", {"answer": "(B)"}) == 1.0
    assert mc("<answer>E</answer>", {"answer": "E", "options": ["a", "b"]}) == 0.0
    # weird output or examples never raise
    assert mc(None, ex) == 0.0
    assert mc("<answer>B</answer>", {}) == 0.0
    assert mc("<answer>B</answer>", {"answer": None}) == 0.0
    assert mc("<answer>" * 1000, ex) == 0.0


@pytest.mark.parametrize(
    "response,want",
    [
        (GOOD, 1.0),
        ("  \n<think>\nmulti\nline\n</think>  <answer>42</answer>\n", 1.0),
        ("<answer>B</answer>", 0.0),  # no think
        ("<think></think><answer>B</answer>", 0.0),  # empty think
        ("<think>x</think><answer>B</answer> trailing", 0.0),
        ("prefix <think>x</think><answer>B</answer>", 0.0),
        ("<answer>B</answer><think>x</think>", 0.0),
        ("<think>x</think>", 0.0),
        (None, 0.0),
    ],
)
def test_format_reward(response, want):
    assert get_reward("format")(response, {"answer": "B"}) == want


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("0.5", "1/2"),
        ("\\frac{1}{2}", "0.5"),
        ("\\dfrac{1}{2}", "1/2"),
        ("\\frac12", ".5"),
        ("-\\frac{3}{4}", "-0.75"),
        ("$1,000$.", "1000"),
        ("2.0", 2),
        ("\\text{12}", "12"),
        ("50\\%", "50"),
        ("90^\\circ", "90"),
        ("x^2 + 1", "x^2+1"),
        ("\\left(1, 2\\right)", "(1,2)"),
        ("\\frac{\\sqrt{2}}{2}", "\\dfrac{\\sqrt{2}}{2}"),
    ],
)
def test_math_equal(pred, gold):
    assert math_equal(pred, gold)


@pytest.mark.parametrize(
    "pred,gold",
    [
        ("0.333", "1/3"),
        ("1/0", "0"),
        ("2", "3"),
        ("(1,2)", "(2,1)"),
        ("", ""),
        (None, "1"),
        ("1" * 5000, "1" * 5000 + "0"),
    ],
)
def test_math_not_equal(pred, gold):
    assert not math_equal(pred, gold)


def test_math_reward_extraction():
    m = get_reward("math")
    assert m("<think>..</think><answer>\\frac{3}{4}</answer>", {"answer": "0.75"}) == 1.0
    assert m("so the result is \\boxed{\\frac{1}{2}}.", {"answer": "0.5"}) == 1.0
    assert m("\\boxed{1} no wait \\boxed{2}", {"answer": "2"}) == 1.0  # last boxed
    assert m("<answer>The answer is \\boxed{7}</answer>", {"answer": 7}) == 1.0
    assert m("\\boxed{3}<answer>4</answer>", {"answer": "4"}) == 1.0  # the tag wins
    assert extract_math_answer("\\boxed{\\frac{1}{\\sqrt{2}}}") == "\\frac{1}{\\sqrt{2}}"
    assert extract_math_answer("\\boxed{1") is None  # unbalanced
    assert m("\\boxed{1", {"answer": "1"}) == 0.0
    assert m("no answer at all", {"answer": "1"}) == 0.0
    assert m(None, {"answer": "1"}) == 0.0
    assert m("\\boxed{1}", {}) == 0.0


def test_r1v_reward():
    r1v = get_reward("r1v")
    ex = {"answer": "B"}
    assert r1v(GOOD, ex) == pytest.approx(1.0)  # 0.9 * 1 + 0.1 * 1
    assert r1v("<answer>B</answer>", ex) == pytest.approx(0.9)  # right, bad format
    assert r1v("<think>x</think><answer>A</answer>", ex) == pytest.approx(0.1)
    assert r1v("nothing", ex) == 0.0


def test_combine_rewards():
    fn = combine_rewards({"mc_accuracy": 0.9, "format": 0.1})
    total, parts = fn("<answer>B</answer>", {"answer": "B"})
    assert parts == {"mc_accuracy": 1.0, "format": 0.0}
    assert total == pytest.approx(0.9)
    total, _ = fn(GOOD, {"answer": "B"})
    assert total == pytest.approx(get_reward("r1v")(GOOD, {"answer": "B"}))
    with pytest.raises(ValueError, match="at least one"):
        combine_rewards({})
    with pytest.raises(ValueError, match="number"):
        combine_rewards({"format": "heavy"})
    with pytest.raises(ValueError, match="unknown reward"):
        combine_rewards({"nope": 1.0})


# ---------------------------------------------------------------------------------------------
# registry and user functions


def test_builtins_registered():
    assert {"mc_accuracy", "format", "math", "r1v"} <= set(REWARDS)


def test_register_reward(monkeypatch):
    monkeypatch.setattr(rewards, "REWARDS", dict(REWARDS))

    @register_reward("length")
    def length(response, example):
        return float(len(response))

    assert get_reward("length")("abc", {}) == 3.0
    assert get_reward(length) is length  # callables pass through
    with pytest.raises(ValueError, match="already registered"):
        register_reward("length")(lambda r, e: 0.0)
    register_reward("length", override=True)(lambda r, e: 1.0)
    assert get_reward("length")("abc", {}) == 1.0
    with pytest.raises(ValueError, match="without ':'"):
        register_reward("a:b")


def test_unknown_name_lists_registered():
    with pytest.raises(ValueError, match="unknown reward 'nope'.*mc_accuracy"):
        get_reward("nope")
    with pytest.raises(ValueError, match="non-empty"):
        get_reward("  ")


USER_SRC = """
CONST = 3

def exact(response, example):
    return 1.0 if response.strip() == str(example["answer"]) else 0.0
"""


def test_reward_from_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_SRC)
    fn = get_reward(f"{path}:exact")
    assert fn(" 42 ", {"answer": 42}) == 1.0
    assert fn("41", {"answer": 42}) == 0.0
    with pytest.raises(ValueError, match="has no attribute 'missing'"):
        get_reward(f"{path}:missing")
    with pytest.raises(ValueError, match="not callable"):
        get_reward(f"{path}:CONST")
    with pytest.raises(ValueError, match="does not exist"):
        get_reward(f"{tmp_path / 'nope.py'}:exact")
    bad = tmp_path / "broken.py"
    bad.write_text("raise RuntimeError('boom')\n")
    with pytest.raises(ValueError, match="boom"):
        get_reward(f"{bad}:exact")


def test_reward_from_module(tmp_path, monkeypatch):
    (tmp_path / "user_reward_mod.py").write_text(USER_SRC)
    monkeypatch.syspath_prepend(str(tmp_path))
    fn = get_reward("user_reward_mod:exact")
    assert fn("7", {"answer": "7"}) == 1.0
    with pytest.raises(ValueError, match="not callable"):
        get_reward("user_reward_mod:CONST")
    with pytest.raises(ValueError, match="cannot import"):
        get_reward("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="must look like"):
        get_reward("user_reward_mod:")
