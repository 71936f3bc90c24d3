"""Math reward: extraction, equivalence, real MATH-500/GSM8K answers, pathological inputs, threads."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from dphrl.data.example import Example
from dphrl.rewards import get_reward
from dphrl.rewards import math as mr
from dphrl.rewards.math import extract_answer, score

try:
    from _shared import require_shared
except ImportError:
    from tests._shared import require_shared


@pytest.mark.parametrize(
    "text, want",
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\fbox{7}", "7"),
        ("\\boxed{\\boxed{4}}", "4"),
        ("\\boxed{3} and a truncated \\boxed{12", "3"),
        ("\\boxed 5 is it", "5"),
        ("blah\n#### 1,234", "1,234"),
        ("The answer is 17.", "17"),
        ("So the final answer is: $\\frac{3}{4}$. Done", "\\frac{3}{4}"),
        ("no answer here", None),
        ("", None),
    ],
)
def test_extract_answer(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize(
    "response, answer, want",
    [
        ("\\boxed{1,000}", "1000", 1.0),
        ("\\boxed{18.0}", "18", 1.0),
        ("\\boxed{\\$18.00}", "18", 1.0),
        ("#### 42", "42", 1.0),
        ("The answer is 7 apples.", "7", 1.0),
        ("\\boxed{\\frac12}", "0.5", 1.0),
        ("\\boxed{\\dfrac{2}{4}}", "\\frac{1}{2}", 1.0),
        ("\\boxed{2\\sqrt{5}}", "\\sqrt{20}", 1.0),
        ("\\boxed{\\{2,1\\}}", "\\{1,2\\}", 1.0),
        ("\\boxed{(-\\infty, 2) \\cup (3, \\infty)}", "(-\\infty,2)\\cup(3,\\infty)", 1.0),
        ("\\boxed{[1,2]}", "(1,2)", 0.0),
        ("\\boxed{15}", "15\\mbox{ cm}^2", 1.0),
        ("\\boxed{76^\\circ}", "76", 1.0),
        ("\\boxed{\\text{Monday}}", "\\text{Tuesday}", 0.0),
        ("\\boxed{1,2}", "12", 0.0),
        ("\\boxed{19}", "18", 0.0),
        ("no box", "1", 0.0),
    ],
)
def test_score_cases(response, answer, want):
    assert score(response, answer) == want


def test_registered_reward_uses_example_answer():
    fn = get_reward("math")
    ex = Example(id="x", prompt=[], answer="\\frac{1}{3}")
    assert fn("\\boxed{\\frac{2}{6}}", ex) == 1.0
    assert fn("\\boxed{0.34}", ex) == 0.0
    with pytest.raises(ValueError):
        fn("\\boxed{1}", Example(id="y", prompt=[]))


def _math500():
    path = require_shared("math500", "test.jsonl")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_math500_gold_answers_score_one():
    rows = _math500()
    assert len(rows) == 500
    bad = [r["answer"] for r in rows if score("\\boxed{" + r["answer"] + "}", r["answer"]) != 1.0]
    assert bad == []
    # The symbolic layer on its own (bypassing the string fast path) also accepts every answer.
    bad = [r["answer"] for r in rows if not mr._symbolic_limited(r["answer"], r["answer"], 5.0)]
    assert bad == []


def test_math500_different_answers_score_zero():
    rows = _math500()
    answers = [r["answer"] for r in rows]

    def genuinely_different(a: str, b: str) -> bool:
        na, nb = mr._normalize(a), mr._normalize(b)
        strip_var = re.compile(r"^[a-z]\s*=\s*")  # "x=5" is the same answer as "5"
        return na != nb and strip_var.sub("", na) != strip_var.sub("", nb)

    wrong = []
    for i, a in enumerate(answers):
        j = (i + 1) % len(answers)
        while not genuinely_different(a, answers[j]):
            j = (j + 1) % len(answers)
        if score("\\boxed{" + answers[j] + "}", a) != 0.0:
            wrong.append((a, answers[j]))
    assert wrong == []


def test_gsm8k_gold_answers_parse():
    path = require_shared("gsm8k", "test.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    assert len(rows) == 1319
    for r in rows:
        ans = extract_answer(r["answer"])
        assert ans is not None and mr._as_number(mr._normalize(ans)) is not None, r["answer"][-60:]
        number = r["answer"].rsplit("####", 1)[1].strip().replace(",", "")
        assert score(r["answer"], number) == 1.0
        assert score(r["answer"], str(int(float(number)) + 1)) == 0.0


PATHOLOGICAL = {
    "power tower": "\\boxed{9^{9^{9^{9}}}}",
    "power tower plain": "\\boxed{9^9^9^9}",
    "python power": "The answer is 9**9**9**9",
    "2^2^30": "\\boxed{2^{2^{30}}}",
    "factorial": "\\boxed{(10^{10^{5}})!}",
    "nested frac": "\\boxed{" + "\\frac{" * 60 + "1" + "}{2}" * 60 + "}",
    "deep nested frac": "\\boxed{" + "\\frac{" * 2000 + "1" + "}{2}" * 2000 + "}",
    "100 kB sum": "\\boxed{" + "1+" * 50_000 + "1}",
    "100 kB text": "x" * 100_000,
    "100 kB braces": "\\boxed{" * 15_000,
    "100 kB boxes": "\\boxed{1}" * 11_000,
}


@pytest.mark.parametrize("name", sorted(PATHOLOGICAL))
def test_pathological_inputs_are_bounded(name):
    timeout = 1.0
    t0 = time.monotonic()
    s = score(PATHOLOGICAL[name], "5", timeout_s=timeout)
    assert time.monotonic() - t0 < timeout + 1.0
    assert s == 0.0


def test_pathological_inputs_bounded_in_a_thread():
    """Off the main thread there is no SIGALRM: the symbolic check runs in a killable worker process."""
    timeout = 1.0
    with ThreadPoolExecutor(1) as ex:
        assert ex.submit(score, "\\boxed{\\frac{2}{4}}", "0.5").result() == 1.0  # also warms the worker up
        for name in ("power tower", "2^2^30", "nested frac"):
            t0 = time.monotonic()
            s = ex.submit(score, PATHOLOGICAL[name], "5", timeout_s=timeout).result()
            assert time.monotonic() - t0 < timeout + 1.0, name
            assert s == 0.0
