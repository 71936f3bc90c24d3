"""Evaluation metrics: unbiased pass@k, maj@k, solution diversity and style shares.

Everything here is pure Python (no torch, no numpy) so that ``import dphrl.evaluation`` stays light.
A sample is *correct* when its reward is ``>= threshold``, by default the project-wide
:data:`dphrl.rewards.registry.CORRECT_THRESHOLD` (full credit, 1.0), the same as training and presample.
"""

from __future__ import annotations

import math
import operator
import random
import re
from collections import Counter
from collections.abc import Callable, Sequence
from itertools import combinations

from dphrl.rewards.registry import CORRECT_THRESHOLD

DEFAULT_THRESHOLD = CORRECT_THRESHOLD
SIMILARITY_METHOD = "jaccard_word_bigrams"
MAX_SIMILARITY_PAIRS = 200

AnswerFn = Callable[[str], "str | None"]
StyleFn = Callable[[str], "str | None"]


# --------------------------------------------------------------------------------------------- pass@k
def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate 1 − C(n−c, k)/C(n, k) from ``c`` correct out of ``n`` samples.

    Computed from exact integers (Python's int division is correctly rounded) for n ≤ 4096, and
    with the product form 1 − Π_{i=n−c+1}^{n} (1 − k/i) in log space beyond; always finite in [0, 1].
    """
    n, c, k = (_as_int(name, v) for name, v in (("n", n), ("c", c), ("k", k)))
    if n < 1:
        raise ValueError(f"pass_at_k: need n >= 1, got n={n}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}")
    if c == 0:
        return 0.0
    if n - c < k:
        return 1.0
    if n <= 4096:
        total = math.comb(n, k)
        return (total - math.comb(n - c, k)) / total
    # log Π (1 - k/i) for i = n-c+1..n; every factor is in (0, 1) since i > n-c >= k.
    log_prod = math.fsum(math.log1p(-k / i) for i in range(n - c + 1, n + 1))
    return -math.expm1(log_prod)


def _as_int(name: str, v: object) -> int:
    if isinstance(v, bool):
        raise ValueError(f"pass_at_k: {name} must be an integer, got {v!r}")
    if isinstance(v, float) and v.is_integer():
        return int(v)
    try:
        return operator.index(v)  # int, numpy integers
    except TypeError:
        raise ValueError(f"pass_at_k: {name} must be an integer, got {v!r}") from None


def ks_for(n: int) -> list[int]:
    """1, 2, 4, ... up to ``n``, with ``n`` itself appended when it is not a power of two."""
    if n < 1:
        raise ValueError(f"ks_for: need n >= 1, got {n}")
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    if ks[-1] != n:
        ks.append(n)
    return ks


def pass_at_k_curve(
    n: int, correct_counts: Sequence[int], ks: Sequence[int] | None = None
) -> dict[int, float]:
    """Mean pass@k over problems (each with ``n`` samples, ``correct_counts[i]`` correct) for each k."""
    ks = list(ks) if ks is not None else ks_for(n)
    if not correct_counts:
        return {k: float("nan") for k in ks}
    return {k: math.fsum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts) for k in ks}


# ---------------------------------------------------------------------------------------------- maj@k
def maj_vote(answers: Sequence[str | None]) -> str | None:
    """Most frequent non-None answer; ties go to the answer that occurs first. None if none."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    best = max(counts.values())
    for a in answers:  # first occurrence among the tied answers
        if a is not None and counts[a] == best:
            return a
    return None  # unreachable


def maj_at_k(
    answers: Sequence[str | None], rewards: Sequence[float], k: int, *, threshold: float = DEFAULT_THRESHOLD
) -> float:
    """maj@k of one problem: majority vote over the first ``k`` samples' answers.

    Returns the fraction of the first-k samples carrying the voted answer that are correct (0 or 1
    whenever equal answers get equal rewards); 0.0 when no sample has an answer.
    """
    if len(answers) != len(rewards):
        raise ValueError(f"maj_at_k: {len(answers)} answers but {len(rewards)} rewards")
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj_at_k: need 1 <= k <= {len(answers)}, got k={k}")
    first = list(answers[:k])
    voted = maj_vote(first)
    if voted is None:
        return 0.0
    hits = [float(r) >= threshold for a, r in zip(first, rewards[:k]) if a == voted]
    return sum(hits) / len(hits)


# ------------------------------------------------------------------------------------------ diversity
_WS = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """Whitespace collapsed, stripped, lower-cased: what counts as 'the same solution'."""
    return _WS.sub(" ", text).strip().lower()


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct-n over whitespace-separated words: unique n-grams / total n-grams over all ``texts``.

    Returns 0.0 when the texts hold no n-gram at all.
    """
    if n < 1:
        raise ValueError(f"distinct_n: need n >= 1, got {n}")
    total, unique = 0, set()
    for t in texts:
        words = t.split()
        grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
        total += len(grams)
        unique.update(grams)
    return len(unique) / total if total else 0.0


def _shingles(text: str) -> frozenset[tuple[str, ...]]:
    words = normalize_text(text).split()
    if len(words) < 2:
        return frozenset([tuple(words)]) if words else frozenset()
    return frozenset(zip(words, words[1:]))


def jaccard_similarity(a: str, b: str) -> float:
    """Jaccard similarity of the word-bigram sets of two texts (a one-word text is its own shingle)."""
    sa, sb = _shingles(a), _shingles(b)
    if not sa and not sb:
        return 1.0
    return len(sa & sb) / len(sa | sb)


def mean_pairwise_similarity(
    texts: Sequence[str], *, max_pairs: int = MAX_SIMILARITY_PAIRS, seed: int = 0
) -> float | None:
    """Mean Jaccard word-bigram similarity over pairs of ``texts`` (None with fewer than two).

    With more than ``max_pairs`` pairs, a fixed-seed random subset of pairs is used.
    """
    if len(texts) < 2:
        return None
    shingles = [_shingles(t) for t in texts]
    pairs = list(combinations(range(len(texts)), 2))
    if len(pairs) > max_pairs:
        pairs = random.Random(seed).sample(pairs, max_pairs)
    sims = []
    for i, j in pairs:
        sa, sb = shingles[i], shingles[j]
        union = sa | sb
        sims.append(len(sa & sb) / len(union) if union else 1.0)
    return math.fsum(sims) / len(sims)


def problem_diversity(
    responses: Sequence[str],
    rewards: Sequence[float],
    answers: Sequence[str | None] | None = None,
    *,
    threshold: float = DEFAULT_THRESHOLD,
) -> dict[str, float | None]:
    """Diversity of one problem's samples.

    Keys: ``distinct_correct_answers`` (None without answers), ``distinct_correct_solutions``
    (distinct normalized texts among correct samples), ``distinct_1``/``distinct_2`` (over all
    samples), ``pairwise_similarity`` (mean Jaccard word-bigram similarity of correct samples; None
    with fewer than two correct).
    """
    correct = [r for r, w in zip(responses, rewards) if float(w) >= threshold]
    out: dict[str, float | None] = {
        "distinct_correct_answers": None,
        "distinct_correct_solutions": float(len({normalize_text(r) for r in correct})),
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "pairwise_similarity": mean_pairwise_similarity(correct),
    }
    if answers is not None:
        ok = {a for a, w in zip(answers, rewards) if a is not None and float(w) >= threshold}
        out["distinct_correct_answers"] = float(len(ok))
    return out


def mean_ignoring_none(values: Sequence[float | None]) -> float | None:
    """Mean of the non-None values (None if there are none)."""
    vals = [v for v in values if v is not None]
    return math.fsum(vals) / len(vals) if vals else None


# ----------------------------------------------------------------------------------------------- styles
def effective_number(shares: dict[str, float] | Sequence[float]) -> float:
    """exp(entropy) of a distribution (shares are renormalized; zeros ignored); 0.0 if empty."""
    vals = [float(v) for v in (shares.values() if isinstance(shares, dict) else shares) if v > 0]
    total = math.fsum(vals)
    if total <= 0:
        return 0.0
    return math.exp(-math.fsum((v / total) * math.log(v / total) for v in vals))


def style_metrics(
    styles: Sequence[str | None], rewards: Sequence[float], *, threshold: float = DEFAULT_THRESHOLD
) -> dict[str, object]:
    """Style shares among labelled samples, effective number of styles and per-style accuracy.

    ``styles[i]`` is ``style_fn(response_i)``; None (unlabelled) samples are left out of the shares
    and reported as ``unlabeled`` (fraction of all samples).
    """
    if len(styles) != len(rewards):
        raise ValueError(f"style_metrics: {len(styles)} styles but {len(rewards)} rewards")
    labelled = [(s, float(r) >= threshold) for s, r in zip(styles, rewards) if s is not None]
    counts = Counter(s for s, _ in labelled)
    n_lab = len(labelled)
    shares = {s: counts[s] / n_lab for s in sorted(counts)}
    accuracy = {s: sum(ok for t, ok in labelled if t == s) / counts[s] for s in sorted(counts)}
    return {
        "shares": shares,
        "accuracy": accuracy,
        "effective_styles": effective_number(shares),
        "unlabeled": (len(styles) - n_lab) / len(styles) if styles else 0.0,
    }
