"""Math reward: extract the final answer and check it against the reference with ``math_verify``.

Extraction (:func:`extract_answer`): the last top-level ``\\boxed{...}`` / ``\\fbox{...}`` with balanced
braces; else the last GSM8K-style ``#### 42``; else the last "The (final) answer is ...".

Comparison (:func:`score`): a fast path on normalized strings and plain numbers ("1,000" == "1000",
"18.0" == "18", "$18" == "18"), then a symbolic check with ``math_verify`` (fractions, LaTeX,
sets/intervals, matrices, units...). Every check runs under a wall-clock time-out: in the main thread
a ``SIGALRM`` timer interrupts the sympy work; in any other thread the symbolic check runs in a
separate worker process that is killed on time-out (see :mod:`dphrl.rewards.sandbox`).
"""

from __future__ import annotations

import functools
import logging
import re
from decimal import Decimal, InvalidOperation
from functools import lru_cache
from typing import Any

import math_verify

from dphrl.data.example import Example
from dphrl.rewards.registry import RewardFn, register_reward
from dphrl.rewards.sandbox import can_interrupt, run_isolated, time_limit

DEFAULT_TIMEOUT_S = 5.0
MAX_ANSWER_CHARS = 1000  # longer "answers" skip the symbolic check (no real answer is this long)

# ----------------------------------------------------------------------------------------------------
# Extraction

_BOX_RE = re.compile(r"\\(?:boxed|fbox)\s*\{")
_BOX_SPACE_RE = re.compile(r"\\boxed +([^\s$]+)")
_HASH_RE = re.compile(r"####\s*([^\n]*)")
_ANSWER_IS_RE = re.compile(r"(?:final\s+answer|the\s+answer)\s*(?:is|:)\s*:?\s*", re.IGNORECASE)


def _matching_braces(text: str) -> dict[int, int]:
    """Map the index of every balanced ``{`` to the index of its ``}`` (one linear pass)."""
    out: dict[int, int] = {}
    stack: list[int] = []
    for i, ch in enumerate(text):
        if ch == "{":
            stack.append(i)
        elif ch == "}" and stack:
            out[stack.pop()] = i
    return out


def _last_boxed(text: str) -> str | None:
    """Content of the last top-level ``\\boxed{}``/``\\fbox{}`` with balanced braces, else None."""
    if "\\boxed" not in text and "\\fbox" not in text:
        return None
    pairs = _matching_braces(text)
    found: str | None = None
    span_end = -1
    for m in _BOX_RE.finditer(text):
        if m.start() < span_end:  # nested inside the previous box
            continue
        close = pairs.get(m.end() - 1)
        if close is None:
            continue
        found, span_end = text[m.end() : close], close
    if found is None:
        ms = list(_BOX_SPACE_RE.finditer(text))
        if ms:
            found = ms[-1].group(1)
    return found


def extract_answer(text: str) -> str | None:
    """The final answer in ``text``: last ``\\boxed{}``/``\\fbox{}``, else ``#### x``, else "The answer is x"."""
    if not text:
        return None
    boxed = _last_boxed(text)
    if boxed is not None:
        boxed = boxed.strip()
        while (m := _BOX_RE.match(boxed)) and _matching_braces(boxed).get(m.end() - 1) == len(boxed) - 1:
            boxed = boxed[m.end() : -1].strip()  # \boxed{\boxed{x}} -> x
        return boxed
    hashes = list(_HASH_RE.finditer(text))
    if hashes:
        ans = hashes[-1].group(1).strip()
        if ans:
            return ans
    ms = list(_ANSWER_IS_RE.finditer(text))
    if ms:
        rest = text[ms[-1].end() :]
        rest = rest.split("\n", 1)[0].strip()
        rest = re.sub(r"\.\s.*$", "", rest)  # end of the sentence
        rest = rest.rstrip(" .").strip()
        if rest.startswith("$") and rest.count("$") >= 2:
            rest = rest[1 : rest.index("$", 1)]
        return rest or None
    return None


# ----------------------------------------------------------------------------------------------------
# Normalization and the fast path

_TEXT_UNIT_RE = re.compile(r"\\(?:text|mbox|mathrm|textbf)\{\s*[A-Za-z][A-Za-z .]*\}(\^\{?\d\}?)?$")
_NUM_RE = re.compile(r"^[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d*)?$")


def _normalize(s: str) -> str:
    """Cheap, conservative canonical form used before the symbolic check."""
    s = s.strip()
    s = re.sub(r"\\(?:dfrac|tfrac)", r"\\frac", s)
    s = re.sub(r"\\left|\\right|\\!|\\,|\\;|\\:|\\ |~", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\^\{?\\circ\}?|\\degree|°", "", s)
    m = _TEXT_UNIT_RE.search(s)
    if m and re.search(r"[\d}]\s*$", s[: m.start()]):  # a unit after a number: "15\text{ cm}^2"
        s = s[: m.start()].strip()
    s = re.sub(r"^\\text\{(.*)\}$", r"\1", s)
    s = s.rstrip(".").strip()
    s = re.sub(r"\s+", " ", s)
    return s


def _as_number(s: str) -> Decimal | None:
    t = s.replace(" ", "")
    if not t or not _NUM_RE.match(t) or not any(c.isdigit() for c in t):
        return None
    try:
        return Decimal(t.replace(",", ""))
    except InvalidOperation:
        return None


def _fast_check(pred: str, gold: str) -> bool | None:
    """True/False when decidable without sympy, else None."""
    p, g = _normalize(pred), _normalize(gold)
    if not p or not g:
        return None
    if p == g or p.replace(" ", "") == g.replace(" ", ""):
        return True
    pn, gn = _as_number(p), _as_number(g)
    if pn is not None and gn is not None:
        return pn == gn
    return None


# ----------------------------------------------------------------------------------------------------
# Symbolic check (math_verify)


logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns about disabled time-outs: they are ours


def _mv() -> Any:
    return math_verify


@lru_cache(maxsize=4096)
def _parse_gold(gold: str) -> tuple:
    mv = _mv()
    return tuple(mv.parse("\\boxed{" + gold + "}", parsing_timeout=None))


def _parse_pred(pred: str) -> list:
    return _mv().parse("\\boxed{" + pred + "}", parsing_timeout=None)


def _symbolic_equal(pred: str, gold: str) -> bool:
    """math_verify equivalence of two extracted answers (no time-out of its own)."""
    mv = _mv()
    candidates = [pred]
    m = re.match(r"^([-+]?\d[\d,]*(?:\.\d+)?)\s+[A-Za-z][A-Za-z ]*$", pred)  # "5 apples" -> "5"
    if m:
        candidates.append(m.group(1))
    preds = list(dict.fromkeys(v for c in candidates for v in (c, _normalize(c)) if v))
    parsed_preds = [pp for pp in (_parse_pred(c) for c in preds) if pp]
    for g in dict.fromkeys((gold, _normalize(gold))):
        gp = list(_parse_gold(g)) if g else []
        if gp and any(mv.verify(gp, pp, timeout_seconds=None) for pp in parsed_preds):
            return True
    return False


def _symbolic_limited(pred: str, gold: str, timeout_s: float) -> bool:
    """:func:`_symbolic_equal` under a main-thread time limit; False on time-out (runs in workers)."""
    try:
        with time_limit(timeout_s):
            return _symbolic_equal(pred, gold)
    except TimeoutError:
        return False


def is_equivalent(pred: str, gold: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether two extracted answers are equivalent; bounded by ``timeout_s`` in any thread."""
    if len(pred) > 20 * MAX_ANSWER_CHARS:  # no answer is this long; skip even the string work
        return False
    fast = _fast_check(pred, gold)
    if fast is not None:
        return fast
    if len(pred) > MAX_ANSWER_CHARS or len(gold) > 10 * MAX_ANSWER_CHARS:
        return False
    if can_interrupt():
        return _symbolic_limited(pred, gold, timeout_s)
    # Not the main thread: SIGALRM is unavailable, so isolate the check in a killable process.
    out = run_isolated(_symbolic_limited, (pred, gold, timeout_s), timeout_s + 0.5)
    return out.status == "ok" and bool(out.value)


def score(response: str, answer: str, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 if the final answer of ``response`` is equivalent to ``answer``, else 0.0."""
    if answer is None:
        raise ValueError("math reward: the example has no reference answer")
    pred = extract_answer(response)
    if pred is None:
        return 0.0
    gold = str(answer).strip()
    return 1.0 if is_equivalent(pred, gold, timeout_s=timeout_s) else 0.0


@register_reward("math")
def math_reward(response: str, example: Example) -> float:
    """Registered ``math``/``gsm8k`` reward: :func:`score` against ``example.answer``."""
    if example.answer is None:
        raise ValueError(f"example {example.id!r} has no answer; the math reward needs one")
    return score(response, example.answer)


register_reward("gsm8k", math_reward)


def _configured_reward(response: str, example: Example, *, timeout_s: float) -> float:
    if example.answer is None:
        raise ValueError(f"example {example.id!r} has no answer; the math reward needs one")
    return score(response, example.answer, timeout_s=timeout_s)


def make_reward(*, timeout_s: float = DEFAULT_TIMEOUT_S) -> RewardFn:
    """The math reward with a non-default time-out; picklable (works with worker pools)."""
    return functools.partial(_configured_reward, timeout_s=timeout_s)


_NUM = re.compile(r"[-+]?\d+(?:\.\d+)?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")


@register_reward("number")
def number_reward(response: str, example: Example) -> float:
    """1.0 when the response's answer equals ``example.answer`` as a number, else 0.0.

    A ``\\boxed{}`` / ``#### x`` / "The answer is x" answer is checked by the ``math`` reward; otherwise
    the answer is the last number on the first non-empty line ("7", "7.", "3 + 4 = 7"). Thousands
    separators are ignored ("1,000" = 1000; "1,3" is two numbers).
    """
    if example.answer is None:
        raise ValueError(f"example {example.id!r} has no answer; number_reward needs one")
    if extract_answer(response) is not None:
        return score(response, str(example.answer))
    line = next((ln for ln in response.strip().splitlines() if ln.strip()), "")
    nums = _NUM.findall(_THOUSANDS.sub("", line))
    if not nums:
        return 0.0
    try:
        return float(Decimal(nums[-1]) == Decimal(_THOUSANDS.sub("", str(example.answer).strip())))
    except InvalidOperation:
        return 0.0
