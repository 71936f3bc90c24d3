"""maj@k, diversity and style metrics on hand-computed examples."""

from __future__ import annotations

import math

import pytest

from dphrl.evaluation.metrics import (
    distinct_n,
    effective_number,
    jaccard_similarity,
    maj_at_k,
    maj_vote,
    mean_pairwise_similarity,
    normalize_text,
    problem_diversity,
    style_metrics,
)


def test_maj_vote_and_ties():
    assert maj_vote(["a", "b", "b", "a", "c"]) == "a"  # tie a/b (2 each): first occurrence wins
    assert maj_vote(["c", "b", "b"]) == "b"
    assert maj_vote([None, None, "x"]) == "x"  # None does not vote
    assert maj_vote([None, None]) is None
    assert maj_vote([]) is None


def test_maj_at_k_hand_computed():
    answers = ["3", "5", "5", "3", "3", None]
    rewards = [0.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    assert maj_at_k(answers, rewards, 1) == 0.0  # vote "3" (wrong)
    assert maj_at_k(answers, rewards, 2) == 0.0  # tie 3/5 -> "3" came first
    assert maj_at_k(answers, rewards, 3) == 1.0  # "5" x2 beats "3" x1
    assert maj_at_k(answers, rewards, 4) == 0.0  # tie 2/2 -> "3" first
    assert maj_at_k(answers, rewards, 5) == 0.0  # "3" x3
    assert maj_at_k(answers, rewards, 6) == 0.0
    assert maj_at_k([None, None], [1.0, 1.0], 2) == 0.0  # no answer, no vote
    # +1/-1 rewards with the default 0.5 threshold
    assert maj_at_k(["a", "a", "b"], [1.0, 1.0, -1.0], 3) == 1.0
    # inconsistent rewards for the same answer: fraction of the voted answer's samples that are correct
    assert maj_at_k(["a", "a", "b"], [1.0, 0.0, 1.0], 3) == 0.5
    with pytest.raises(ValueError):
        maj_at_k(["a"], [1.0], 2)
    with pytest.raises(ValueError):
        maj_at_k(["a", "b"], [1.0], 1)


def test_distinct_n_hand_computed():
    texts = ["a b c", "a b d"]
    # unigrams: a b c a b d -> 6 total, {a,b,c,d} 4 unique
    assert distinct_n(texts, 1) == 4 / 6
    # bigrams: (a b)(b c)(a b)(b d) -> 4 total, 3 unique
    assert distinct_n(texts, 2) == 3 / 4
    assert distinct_n(["x"], 2) == 0.0  # no bigram at all
    assert distinct_n([], 1) == 0.0
    assert distinct_n(["a  a\na"], 1) == 1 / 3  # whitespace-separated words
    with pytest.raises(ValueError):
        distinct_n(texts, 0)


def test_similarity():
    assert normalize_text("  SELECT  *\nFROM t ") == "select * from t"
    # bigrams {(a,b),(b,c)} vs {(a,b),(b,d)} -> 1/3
    assert jaccard_similarity("a b c", "a b d") == pytest.approx(1 / 3)
    assert jaccard_similarity("A  b c", "a b c") == 1.0
    assert jaccard_similarity("x", "x") == 1.0 and jaccard_similarity("x", "y") == 0.0
    assert jaccard_similarity("", "") == 1.0
    assert mean_pairwise_similarity(["a b c"]) is None
    sims = [1 / 3, 1.0, 1 / 3]  # pairs (0,1), (0,2), (1,2)
    assert mean_pairwise_similarity(["a b c", "a b d", "a b c"]) == pytest.approx(sum(sims) / 3)
    # capped number of pairs: still in [0, 1] and deterministic
    many = [f"w{i} w{i + 1} w{i + 2}" for i in range(40)]
    v1 = mean_pairwise_similarity(many, max_pairs=50)
    assert v1 == mean_pairwise_similarity(many, max_pairs=50) and 0.0 <= v1 <= 1.0


def test_problem_diversity_hand_computed():
    responses = ["x = 2", "x  = 2", "so x = 2", "x = 3"]
    rewards = [1.0, 1.0, 1.0, 0.0]
    answers = ["2", "2", "2.0", "3"]
    d = problem_diversity(responses, rewards, answers)
    assert d["distinct_correct_answers"] == 2.0  # "2", "2.0"
    assert d["distinct_correct_solutions"] == 2.0  # "x = 2" (twice, normalized), "so x = 2"
    # words: x = 2 | x = 2 | so x = 2 | x = 3 -> 13 total, {x,=,2,so,3} 5 unique
    assert d["distinct_1"] == 5 / 13
    # bigrams: (x =)(= 2) x2, (so x)(x =)(= 2), (x =)(= 3) -> 9 total, 4 unique
    assert d["distinct_2"] == 4 / 9
    # correct: A="x = 2", A, B="so x = 2": J(A,A)=1, J(A,B)=2/3 twice
    assert d["pairwise_similarity"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    d2 = problem_diversity(responses, [0.0] * 4)
    assert d2["distinct_correct_answers"] is None
    assert d2["distinct_correct_solutions"] == 0.0 and d2["pairwise_similarity"] is None


def test_effective_number():
    assert effective_number({"a": 1.0}) == pytest.approx(1.0)
    assert effective_number({"a": 0.5, "b": 0.5}) == pytest.approx(2.0)
    assert effective_number([0.25] * 4) == pytest.approx(4.0)
    p = [0.5, 0.25, 0.25]
    assert effective_number(p) == pytest.approx(math.exp(-(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))))
    assert effective_number([2, 1, 1]) == pytest.approx(effective_number(p))  # renormalized
    assert effective_number({"a": 1.0, "b": 0.0}) == pytest.approx(1.0)
    assert effective_number([]) == 0.0


def test_style_metrics_hand_computed():
    styles = ["cte", "join", "cte", None, "subquery", "cte"]
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    m = style_metrics(styles, rewards)
    assert m["shares"] == {"cte": 3 / 5, "join": 1 / 5, "subquery": 1 / 5}
    assert m["accuracy"] == {"cte": 2 / 3, "join": 0.0, "subquery": 1.0}
    assert m["unlabeled"] == 1 / 6
    expected = math.exp(-(0.6 * math.log(0.6) + 2 * 0.2 * math.log(0.2)))
    assert m["effective_styles"] == pytest.approx(expected)
    empty = style_metrics([None, None], [1.0, 0.0])
    assert empty["shares"] == {} and empty["effective_styles"] == 0.0 and empty["unlabeled"] == 1.0
