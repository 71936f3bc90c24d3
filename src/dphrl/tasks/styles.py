"""The multi-style arithmetic task of the demo: several procedures ("styles") for one problem.

A problem is ``a+b`` (in domain) or ``a-b`` (the out-of-domain sibling, a >= b). A response starts
with its style letter, so the style is readable from the first token:

    A  direct answer          17+25 -> ``A=42``
    B  column-wise carrying   17+25 -> ``B:7+5=12c1;1+2+1=4;42``
    C  decomposition          17+25 -> ``C:17+20=37;37+5=42;42``

The final answer is the last integer of the response.

How style validity arises (said plainly, as the report says it): the grader accepts style S on a
problem only if that problem is in S's acceptance set, a fixed pseudo-random subset (a hash of the
problem and the style) covering ``accept`` of the problems (default A 70%, B 50%, C 40%). Nothing
in the prompt reveals it, so no policy can learn which style fits which unseen problem: the only
way to keep a high Pass@k is to keep several styles alive. It stands in for procedures that fail
on some problems for reasons the model cannot see from the question. The base model learns every
style's procedure by supervised fine-tuning on an even mixture, so its answers are right in every
style; RL then decides which styles survive.
"""

from __future__ import annotations

import hashlib
import random
import re

from dphrl.data.example import Example
from dphrl.rewards.registry import register_reward

STYLES = ("A", "B", "C")
VALIDITY_NOTE = (
    "the grader accepts style S on a problem only if the problem is in S's acceptance set, a fixed "
    "pseudo-random subset (a hash of the problem and the style) covering 70% (A), 50% (B) and 40% (C) "
    "of the problems. Nothing in the prompt reveals it, so no policy can learn which style fits an "
    "unseen problem: the only way to keep a high Pass@k is to keep several styles alive. It stands in "
    "for procedures that fail on some problems for reasons the model cannot see in the question. The "
    "base model learns every style's procedure by supervised fine-tuning on an even mixture; RL then "
    "decides which styles survive."
)
DEFAULT_ACCEPT = {"A": 0.7, "B": 0.5, "C": 0.4}
CHARS = "0123456789+-=:;cbABC"
_INT = re.compile(r"-?\d+")


def solve(a: int, b: int, op: str, style: str) -> str:
    """The response text of ``style`` for ``a op b`` (always arithmetically correct)."""
    if op == "add":
        r = a + b
        if style == "A":
            return f"A={r}"
        if style == "B":
            u = a % 10 + b % 10
            carry = u // 10
            t = a // 10 + b // 10 + carry
            c = f"c{carry}" if carry else ""
            return f"B:{a % 10}+{b % 10}={u}{c};{a // 10}+{b // 10}+{carry}={t};{r}"
        if style == "C":
            mid = a + (b // 10) * 10
            return f"C:{a}+{(b // 10) * 10}={mid};{mid}+{b % 10}={r};{r}"
    elif op == "sub":
        r = a - b
        if style == "A":
            return f"A={r}"
        if style == "B":
            borrow = 1 if a % 10 < b % 10 else 0
            u = a % 10 + 10 * borrow - b % 10
            t = a // 10 - b // 10 - borrow
            bb = f"b{borrow}" if borrow else ""
            return f"B:{a % 10 + 10 * borrow}-{b % 10}={u}{bb};{a // 10}-{b // 10}-{borrow}={t};{r}"
        if style == "C":
            mid = a - (b // 10) * 10
            return f"C:{a}-{(b // 10) * 10}={mid};{mid}-{b % 10}={r};{r}"
    raise ValueError(f"unknown op {op!r} or style {style!r}")


def accepted(a: int, b: int, op: str, style: str, accept: dict[str, float] | None = None,
             salt: str = "") -> bool:
    """Whether the grader accepts ``style`` on this problem (fixed pseudo-random subset)."""
    p = (accept or DEFAULT_ACCEPT)[style]
    h = hashlib.sha256(f"{op}|{a}|{b}|{style}|{salt}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64 < p


def style_of(response: str) -> str | None:
    """The style letter a response starts with, or None."""
    s = response.lstrip()
    return s[0] if s and s[0] in STYLES else None


def final_answer(response: str) -> str | None:
    nums = _INT.findall(response)
    return nums[-1] if nums else None


@register_reward("styles")
def styles_reward(response: str, example: Example) -> float:
    """1.0 iff the final answer is right and the response's style is accepted on this problem."""
    st = style_of(response)
    return float(st is not None and st in example.meta["valid_styles"]
                 and final_answer(response) == example.answer)


def make_examples(
    op: str = "add",
    split: str = "train",
    lo: int = 0,
    hi: int = 39,
    n_test: int = 200,
    accept: dict[str, float] | None = None,
    salt: str = "",
    task_seed: int = 1234,
    limit: int | None = None,
) -> list[Example]:
    """All problems ``a op b`` with lo <= a, b <= hi (a >= b for sub), split into train / test.

    The split depends only on ``task_seed`` (not on a run's seed) so every run sees the same data.
    """
    pairs = [(a, b) for a in range(lo, hi + 1) for b in range(lo, hi + 1) if op == "add" or a >= b]
    random.Random(f"{task_seed}-{op}").shuffle(pairs)
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be train | test | all, got {split!r}")
    chosen = pairs[:n_test] if split == "test" else pairs[n_test:] if split == "train" else pairs
    sym = "+" if op == "add" else "-"
    out = []
    for a, b in chosen[:limit] if limit else chosen:
        valid = [s for s in STYLES if accepted(a, b, op, s, accept, salt)]
        r = a + b if op == "add" else a - b
        out.append(
            Example(
                id=f"{op}-{a}-{b}",
                prompt=[{"role": "user", "content": f"{a}{sym}{b}"}],
                answer=str(r),
                task="styles",
                meta={"a": a, "b": b, "op": op, "valid_styles": valid},
            )
        )
    return out


def sft_pairs(examples: list[Example], rng: random.Random, per_problem: int = 1,
              weights: dict[str, float] | None = None) -> list[tuple[list[dict], str]]:
    """(prompt messages, response text) pairs, each style drawn at random: evenly, or with ``weights``
    ({style: weight}, normalized; the SFT prior of an uneven base model)."""
    if weights is not None:
        bad = sorted(set(weights) - set(STYLES)) or [s for s, w in weights.items() if not w >= 0]
        if bad or not sum(weights.values()) > 0:
            raise ValueError(f"weights must map styles {STYLES} to weights >= 0 (not all 0), got {weights}")
        w = [float(weights.get(s, 0.0)) for s in STYLES]
    out = []
    for ex in examples:
        for _ in range(per_problem):
            st = rng.choice(STYLES) if weights is None else rng.choices(STYLES, weights=w)[0]
            out.append((ex.prompt, solve(ex.meta["a"], ex.meta["b"], ex.meta["op"], st)))
    return out
