"""Math reward: extraction, equivalence, real MATH-500/GSM8K answers, pathological inputs, threads."""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from dphrl.data.example import Example
from dphrl.rewards import get_reward
from dphrl.rewards import math as mr
from dphrl.rewards.math import extract_answer, number_reward, number_score, score

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


# ----------------------------------------------------------------------------------------------------
# The ``number`` reward on real SmolLM2-135M-Instruct outputs

DATA = Path(__file__).resolve().parent / "data"


def _labelled(name: str = "smollm2_arith_labelled.jsonl") -> list[dict]:
    return [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]


def _number(response: str, answer: str, prompt: str | None = None) -> float:
    msgs = [{"role": "user", "content": prompt}] if prompt else []
    return number_reward(response, Example(id="x", prompt=msgs, answer=answer))


def _errors(rows: list[dict], name: str) -> tuple[list[str], list[str], int, int]:
    """False positives and negatives of the ``number`` reward against the labels (printed as rates)."""
    scored = [(r, _number(r["response"], r["answer"], r["prompt"])) for r in rows]
    fp = [r["response"] for r, s in scored if r["label"] == 0 and s >= 1.0]
    fn = [r["response"] for r, s in scored if r["label"] == 1 and s < 1.0]
    neg = sum(r["label"] == 0 for r in rows)
    pos = len(rows) - neg
    print(f"{name}: {len(rows)} responses, FP {len(fp)}/{neg} = {len(fp) / neg:.3f}, "
          f"FN {len(fn)}/{pos} = {len(fn) / pos:.3f}")
    return fp, fn, neg, pos


def test_labelled_set_is_what_it_claims():
    """815 distinct sampled responses, labelled by hand (rule in tests/data/README.md), a third held out."""
    rows = _labelled()
    assert len({(r["prompt"], r["response"]) for r in rows}) == len(rows) >= 300
    assert {r["temperature"] for r in rows} == {0.7, 1.0} and {r["max_new_tokens"] for r in rows} == {64}
    assert {r["label"] for r in rows} == {0, 1} and {r["part"] for r in rows} == {"dev", "heldout"}
    pats = (("+", r"\+|plus|sum|[Aa]dd"), ("-", r" - |minus|[Ss]ubtract"),
            ("*", r"[*×]|times|product|[Mm]ultiply"))
    ops = {op for r in rows for op, pat in pats if re.search(pat, r["prompt"])}
    assert ops == {"+", "-", "*"} and any(re.search(r"\d\d \+ \d\d", r["prompt"]) for r in rows)
    held = {r["prompt"] for r in rows if r["part"] == "heldout"}
    assert not held & {r["prompt"] for r in rows if r["part"] == "dev"}  # split by prompt
    assert 0.25 < len([r for r in rows if r["part"] == "heldout"]) / len(rows) < 0.4


@pytest.mark.parametrize("part", ["dev", "heldout"])
def test_number_reward_agrees_with_hand_labels(part):
    """False-positive and false-negative rates of the ``number`` reward against the hand labels, <= 1 %
    on the part it was developed on (dev) and on the held-out third."""
    fp, fn, neg, pos = _errors([r for r in _labelled() if r["part"] == part], part)
    assert len(fp) <= 0.01 * neg, fp
    assert len(fn) <= 0.01 * pos, fn


def test_number_reward_on_fresh_labelled_outputs():
    """298 later responses (temperatures 0.5, 0.7 and 1.0), labelled blind after the reward was built on
    the set above (tests/data/README.md): the reward's rates there, kept from getting worse."""
    rows = _labelled("smollm2_arith_fresh_labelled.jsonl")
    keys = {(r["prompt"], r["response"]) for r in rows}
    assert len(rows) == len(keys) == 298 and not keys & {(r["prompt"], r["response"]) for r in _labelled()}
    fp, fn, _, _ = _errors(rows, "fresh")
    assert len(fp) <= 3 and len(fn) <= 1, (fp, fn)


@pytest.mark.parametrize(("prompt", "answer", "response", "want"), [
    # the answer on a later line; the first line only restates the question
    ("What is 9 + 5?", "14", "To compute 9 plus 5, we add them.\n\n9 + 5 = 14", 1.0),
    ("Compute 9 plus 5.", "14", "In code, this would be 9 + 5 = 14, which is the result of 9 + 5.", 1.0),
    ("What is 9 + 8?", "17", "9 + 8 = 17\n\nSo, 9 + 8 = 17. The answer is just 17.", 1.0),
    ("What is 8 + 5?", "13", "The answer is correctly represented below.\n8 + 5 = 13", 1.0),
    # restated operands are not answers
    ("What is the sum of 0 and 7?", "7", "The sum of 0 and 7 is actually a mad idea.", 0.0),
    ("What is 3 + 7?", "10", "Three is the original and 7 = 10,", 0.0),
    ("What is 0 + 6?", "6", "2 is not a solution to 1 + 6.", 0.0),
    # two answers, hedges, answers carried on to another result, negated statements
    ("8 + 3 = ?", "11", "10 is the answer to 8 + 3, which is 11.", 0.0),
    ("Add 3 and 6.", "9", "The sum of 3 and 6 is 18. So, 3 + 6 = 9.", 0.0),
    ("9 + 4 = ?", "13", "In this case, 9 + 4 = 13, so 13 + 4 = 17.", 0.0),
    ("Multiply 4 and 9.", "36", "4 multiplied by 9 equals 36, and then 36 adds up to 120.", 0.0),
    ("Compute 3 minus 2.", "1", "3 minus 2 = 1 and a bit", 0.0),
    ("6 + 6 = ?", "12", "It is not possible to have 6 + 6 = 12 with no fractional form.", 0.0),
    ("8 + 8 = ?", "16", "The answer is 8 + 8 = 16, but for some, 8 + 8 is 18 which is incorrect.", 1.0),
    # statements about other expressions are not answers
    ("6 + 9 = ?", "15", "6 + 9 = 15\n\nHere's how to multiply 6 and 9:\n\n6 * 9 = 54", 1.0),
    ("What is 8 × 6?", "48", "14 + 8 = 22\n8 × 6 = 48", 1.0),
    ("What is 2 + 1?", "3", "A simple answer: 2 + 1 is simply a statement of equality.", 0.0),
    ("What is 5 + 7?", "12", "5 is the result of the product of 10 and 7. So, 5 + 7 = 12.", 1.0),
    ("Compute 5 plus 9.", "14", "5 + 9 = 14?", 0.0),
    ("2 + 0 = ?", "2", "Code must be 2 + 0 = 2 but that does not provide the actual equation.", 0.0),
    ("Add 0 and 4.", "4", "The number 0 is added to 4 to get 4.", 1.0),
    ("What is the sum of 9 and 4?", "13", "The sum of 9 and 4 must be 13.", 1.0),
    # words are operands, never the answer
    ("What is 1 + 2?", "3", "One + Two equals 3.", 1.0),
    ("What is 8 + 5?", "13", "thirteen", 0.0),
    # cut before an answer
    ("What is 5 + 4?", "9", "To solve this problem, let's add 5 and 4. When you add", 0.0),
    # other forms
    ("What is the product of 7 and 6?", "42", "The product of 7 and 6 is 42.", 1.0),
    ("Subtract 5 from 9.", "4", "1. 9 - 5 = 4\n\nHere's just the number: 4", 1.0),
    ("What is 65 + 935?", "1000", "The answer is 1,000.", 1.0),
    ("What is 2 - 5?", "-3", "2 - 5 = -3", 1.0),
    ("What is 8 + 5?", "13", "\\boxed{13}", 1.0),
    # a word problem: intermediate equations are not answers, the one whose value is the reference is
    ("Tom has 3 apples and buys 5 bags of 2 apples. How many apples does he have?", "13",
     "5 * 2 = 10 apples in the bags. 3 + 10 = 13. The answer is 13.", 1.0),
    ("Tom has 3 apples and buys 5 bags of 2 apples. How many apples does he have?", "13",
     "5 * 2 = 10 apples in the bags. 3 + 10 = 13. The answer is 14.", 0.0),
])
def test_number_reward_cases(prompt, answer, response, want):
    assert _number(response, answer, prompt) == want


def test_number_reward_without_prompt_and_plain_api():
    assert _number("8 + 5 = 13", "13") == 1.0 and _number("12\n13", "13") == 0.0
    assert number_score("The sum of 8 and 5 is 13.", "13") == 1.0
    assert number_score("7", "7", [{"role": "user", "content": "What is 3 + 4?"}]) == 1.0
    with pytest.raises(ValueError):
        number_reward("7", Example(id="y", prompt=[]))


@pytest.mark.parametrize("text", ["1+" * 50_000 + "1", "one plus " * 10_000, "3 + 4 = 7 = " * 8_000,
                                  "7\n" * 50_000, "not 3 + 4 = 7 " * 7_000, "the answer is " * 8_000,
                                  "3 and 4 and " * 8_000, "9" * 100_000])
def test_number_reward_is_fast_on_long_inputs(text):
    t0 = time.monotonic()
    _number(text, "7", "What is 3 + 4?")
    assert time.monotonic() - t0 < 2.0
