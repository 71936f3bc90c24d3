"""pass@k training (Chen et al.), PKPO (Walder & Karkhanis) and W-REINFORCE (Zhu et al.) advantages.

Checked against their definitions by enumeration (every k-subset of a group; every n-tuple of outcomes
of a small bandit with its probability), never against another implementation's output.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction
from itertools import combinations

import pytest
import torch

from dphrl import advantages as A
from dphrl import losses as L
from dphrl.rewards.registry import CORRECT_THRESHOLD

F64 = torch.float64


def all_patterns(n: int) -> list[tuple[int, ...]]:
    return list(itertools.product((0, 1), repeat=n))


def test_threshold_default_is_the_projects_correctness_threshold():
    assert A.DEFAULT_CORRECT_THRESHOLD == CORRECT_THRESHOLD


# ----------------------------------------------------------------------------- pass@k training


def passk_by_enumeration(correct: tuple[int, ...], k: int) -> list[float]:
    """Each response's mean over the k-subsets containing it of (subset pass - mean) / std, where mean
    and std (population) are over ALL k-subsets of the group: the paper's analytical target."""
    n = len(correct)
    subsets = list(combinations(range(n), k))
    passed = {s: Fraction(int(any(correct[i] for i in s))) for s in subsets}
    mean = sum(passed.values()) / len(subsets)
    var = sum((v - mean) ** 2 for v in passed.values()) / len(subsets)
    if var == 0:
        return [0.0] * n
    out = []
    for i in range(n):
        mine = [passed[s] - mean for s in subsets if i in s]
        out.append(float(sum(mine) / len(mine)) / math.sqrt(var))
    return out


@pytest.mark.parametrize("n", range(1, 7))
def test_passk_matches_subset_enumeration(n):
    patterns = all_patterns(n)
    rewards = torch.tensor([float(c) for p in patterns for c in p], dtype=F64)
    for k in range(1, n + 1):
        adv, m = A.passk_advantages(rewards, n, k=k, eps=0.0)
        expected = torch.tensor([a for p in patterns for a in passk_by_enumeration(p, k)], dtype=F64)
        torch.testing.assert_close(adv, expected, rtol=1e-12, atol=1e-12)
        rho = [1 - math.comb(n - sum(p), k) / math.comb(n, k) for p in patterns]
        assert m["adv/passk"] == pytest.approx(sum(rho) / len(rho))
        assert m["adv/zero_std_frac"] == pytest.approx(sum(r in (0.0, 1.0) for r in rho) / len(rho))


def test_passk_hand_values_and_edge_cases():
    # n = 4, c = 1, k = 2: rho = 1 - C(3,2)/C(4,2) = 1/2, sigma = 1/2;
    # A_pos = (1/2) / (1/2) = 1, A_neg = (1/2 - C(2,1)/C(3,1)) / (1/2) = -1/3
    adv, _ = A.passk_advantages(torch.tensor([0.0, 1.0, 0.0, 0.0]), 4, k=2, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1 / 3, 1.0, -1 / 3, -1 / 3]))
    # with the default eps = 1e-6 (as the authors' code): divided by sigma + eps
    adv_eps, _ = A.passk_advantages(torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=F64), 4, k=2)
    torch.testing.assert_close(adv_eps, torch.tensor([-1 / 6, 0.5, -1 / 6, -1 / 6], dtype=F64) / (0.5 + 1e-6))
    # k > n - c: every k-subset holds a correct response -> no signal, exactly 0 (c = 2, n = 4, k = 3)
    adv, m = A.passk_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), 4, k=3)
    assert torch.equal(adv, torch.zeros(4)) and m["adv/zero_std_frac"] == 1.0
    # k = n = 4 with one correct: rho = 1 -> 0 as well; no correct: rho = 0 -> 0
    assert torch.equal(A.passk_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0]), 4, k=4)[0], torch.zeros(4))
    assert torch.equal(A.passk_advantages(torch.zeros(4), 4, k=2)[0], torch.zeros(4))


def test_passk_k1_is_grpo_with_the_population_std():
    # p = 1/4, sigma = sqrt(3)/4: correct (1 - p)/sigma = sqrt(3), incorrect -p/sigma = -1/sqrt(3)
    adv, _ = A.passk_advantages(torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=F64), 4, k=1, eps=0.0)
    s3 = math.sqrt(3)
    torch.testing.assert_close(adv, torch.tensor([s3, -1 / s3, -1 / s3, -1 / s3], dtype=F64))


def test_passk_thresholds_graded_rewards():
    r = torch.tensor([1.0, 0.5, 0.0, -1.0, 1.0, 0.9, 0.9, 0.0])
    adv, _ = A.passk_advantages(r, 4, k=2, eps=0.0)
    bin_adv, _ = A.passk_advantages(torch.tensor([1.0, 0, 0, 0, 1, 0, 0, 0]), 4, k=2, eps=0.0)
    torch.testing.assert_close(adv, bin_adv)  # partial credit counts as a failure
    adv_half, _ = A.passk_advantages(r, 4, k=2, eps=0.0, threshold=0.5)
    two, _ = A.passk_advantages(torch.tensor([1.0, 1, 0, 0, 1, 1, 1, 0]), 4, k=2, eps=0.0)
    torch.testing.assert_close(adv_half, two)
    pm1, _ = A.passk_advantages(torch.tensor([1.0, -1.0, -1.0, -1.0]), 4, k=2, eps=0.0)  # -1/+1 rewards
    torch.testing.assert_close(pm1, torch.tensor([1.0, -1 / 3, -1 / 3, -1 / 3]))


@pytest.mark.parametrize("name", ["passk", "pkpo"])
def test_k_is_validated(name):
    r = torch.tensor([1.0, 0.0, 0.0, 0.0])
    for bad in (0, 5, 2.0, True):
        with pytest.raises(ValueError, match="k must be"):
            A.compute_advantages(name, r, 4, k=bad)


# ----------------------------------------------------------------------------- PKPO


def pkpo_by_enumeration(g: list[float], k: int, baseline: str) -> list[Fraction]:
    """Eq. 27 (s_i = sum over k-subsets S containing i of max_S g, / C(n, k)) and eq. 33 (the same of
    max_S g - max_{S minus i} g), in exact rationals."""
    n = len(g)
    out = []
    for i in range(n):
        total = Fraction(0)
        for s in combinations(range(n), k):
            if i not in s:
                continue
            top = max(g[j] for j in s)
            rest = max(g[j] for j in s if j != i) if k > 1 else 0
            total += top - (rest if baseline == "loo-1" else 0)
        out.append(total / math.comb(n, k))
    return out


@pytest.mark.parametrize("baseline", ["none", "loo-1"])
@pytest.mark.parametrize("n", range(2, 7))
def test_pkpo_matches_subset_definition(n, baseline):
    g = torch.Generator().manual_seed(n)
    groups = [list(p) for p in all_patterns(n)]  # binary: every pattern
    draws = torch.randint(-4, 5, (20, n), generator=g).tolist()  # graded rewards in quarters, with ties
    groups += [[Fraction(v, 4) for v in row] for row in draws]
    rewards = torch.tensor([float(v) for grp in groups for v in grp], dtype=F64)
    for k in range(2, n + 1):
        adv, _ = A.pkpo_advantages(rewards, n, k=k, baseline=baseline)
        expected = [float(v) for grp in groups for v in pkpo_by_enumeration(grp, k, baseline)]
        torch.testing.assert_close(adv, torch.tensor(expected, dtype=F64), rtol=1e-12, atol=1e-14)


def test_pkpo_binary_closed_forms():
    # n = 4, c = 1, k = 2. none (eq. 8): correct k/n = 1/2, incorrect (k/n)(1 - C(2,1)/C(3,1)) = 1/6.
    # loo-1: correct C(n-c, k-1)/C(n, k) = 3/6, incorrect 0.
    r = torch.tensor([0.0, 1.0, 0.0, 0.0], dtype=F64)
    torch.testing.assert_close(A.pkpo_advantages(r, 4, k=2, baseline="none")[0],
                               torch.tensor([1 / 6, 1 / 2, 1 / 6, 1 / 6], dtype=F64))
    torch.testing.assert_close(A.pkpo_advantages(r, 4, k=2)[0], torch.tensor([0, 1 / 2, 0, 0], dtype=F64))
    # k = n: only a lone correct response gets signal (the TZSM25 special case)
    torch.testing.assert_close(A.pkpo_advantages(r, 4, k=4)[0], torch.tensor([0, 1.0, 0, 0], dtype=F64))
    two = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=F64)
    assert torch.equal(A.pkpo_advantages(two, 4, k=4)[0], torch.zeros(4, dtype=F64))
    # all-equal groups: loo-1 gives exactly 0, none gives k/n to an all-correct group
    same = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.3, 0.3, 0.3, 0.3])
    adv, m = A.pkpo_advantages(same, 4, k=2)
    assert torch.equal(adv, torch.zeros(8)) and m["adv/zero_std_frac"] == 1.0
    torch.testing.assert_close(A.pkpo_advantages(same, 4, k=2, baseline="none")[0], same / 2)


def test_pkpo_k1():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0])
    # loo-1 at k = 1 is the paper's k_opt = 1 run: the leave-one-out mean baseline (= rloo)
    torch.testing.assert_close(A.pkpo_advantages(r, 4, k=1)[0], torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3]))
    torch.testing.assert_close(A.pkpo_advantages(r, 4, k=1, baseline="none")[0], r / 4)
    with pytest.raises(ValueError, match="baseline"):
        A.pkpo_advantages(r, 4, k=2, baseline="loo")


def _bandit_outcomes(arm_rewards: list[list[tuple[float, float]]], n: int):
    """Every n-tuple of (arm, reward) outcomes: arms (M, n), rewards (M, n), log P(reward | arm) (M,)."""
    single = [(a, v, p) for a, dist in enumerate(arm_rewards) for v, p in dist]
    tuples = list(itertools.product(single, repeat=n))
    arms = torch.tensor([[o[0] for o in t] for t in tuples])
    rewards = torch.tensor([[o[1] for o in t] for t in tuples], dtype=F64)
    cond = torch.tensor([math.prod(o[2] for o in t) for t in tuples], dtype=F64)
    return arms, rewards, cond


def expected_estimator(theta: torch.Tensor, arm_rewards, n: int, **kw) -> torch.Tensor:
    """E[sum_i A_i grad log pi(a_i)] over ALL n-tuples of outcomes, with the exact probabilities."""
    arms, rewards, cond = _bandit_outcomes(arm_rewards, n)
    pi = theta.softmax(-1).detach()  # (3,)
    prob = cond * pi[arms].prod(-1)  # (M,)
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-12)
    adv, _ = A.pkpo_advantages(rewards.reshape(-1), n, **kw)  # (M*n,)
    score = torch.nn.functional.one_hot(arms, 3).to(F64) - pi  # (M, n, 3) grad_theta log pi(a)
    return (prob[:, None] * (adv.reshape(-1, n)[..., None] * score).sum(1)).sum(0)  # (3,)


THETA = torch.tensor([0.3, -0.6, 0.4], dtype=F64)


@pytest.mark.parametrize("baseline", ["none", "loo-1"])
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_pkpo_is_unbiased_for_the_passk_gradient_binary_bandit(k, baseline):
    q = [0.2, 0.5, 0.7]  # success probability of each arm
    arm_rewards = [[(1.0, qa), (0.0, 1 - qa)] for qa in q]
    theta = THETA.clone().requires_grad_()
    p = (theta.softmax(-1) * torch.tensor(q, dtype=F64)).sum()
    (exact,) = torch.autograd.grad(1 - (1 - p) ** k, theta)  # pass@k = 1 - (1 - p)^k
    est = expected_estimator(THETA, arm_rewards, 4, k=k, baseline=baseline)
    scale = 4 if (k == 1 and baseline == "loo-1") else 1  # k = 1 loo-1 is rloo: n grad pass@1
    torch.testing.assert_close(est, scale * exact, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("baseline", ["none", "loo-1"])
@pytest.mark.parametrize("k", [2, 3])
def test_pkpo_is_unbiased_for_the_maxg_at_k_gradient_graded_bandit(k, baseline):
    values = [-1.0, 0.25, 1.0]
    dists = [[0.5, 0.3, 0.2], [0.1, 0.8, 0.1], [0.6, 0.0, 0.4]]  # P(value | arm)
    arm_rewards = [list(zip(values, d)) for d in dists]
    theta = THETA.clone().requires_grad_()
    mix = theta.softmax(-1) @ torch.tensor(dists, dtype=F64)  # (3,) P(value) under the policy
    cdf = mix.cumsum(0)  # P(reward <= v)
    below = torch.cat([torch.zeros(1, dtype=F64), cdf[:-1]])
    maxg = (torch.tensor(values, dtype=F64) * (cdf**k - below**k)).sum()  # E[max of k rewards]
    (exact,) = torch.autograd.grad(maxg, theta)
    est = expected_estimator(THETA, arm_rewards, 3, k=k, baseline=baseline)
    torch.testing.assert_close(est, exact, rtol=1e-10, atol=1e-12)


def test_annealed_k():
    # the paper's schedule: k = 8 up to step 1500, k = 1 after
    assert [A.annealed_k(s, k=8, anneal_step=1500) for s in (0, 1499, 1500, 9000)] == [8, 8, 1, 1]
    assert A.annealed_k(10**6, k=4) == 4
    assert A.annealed_k(5, k=8, k_final=2, anneal_step=5) == 2


# ----------------------------------------------------------------------------- W-REINFORCE


def test_w_reinforce_values_and_all_equal_groups():
    r = torch.tensor([1.0, 0.0, 0.5, 0.0, 1.0, 1.0, 0.0, 0.0])  # partial credit 0.5 is incorrect
    adv, m = A.compute_advantages("w_reinforce", r, 2)
    lam = 0.1
    torch.testing.assert_close(adv, torch.tensor([lam, -1.0, -1.0, -1.0, lam, lam, -1.0, -1.0]))
    assert m["adv/zero_std_frac"] == pytest.approx(3 / 4)  # groups 2, 3, 4 are all-equal: NOT zeroed
    adv2, _ = A.w_reinforce_advantages(r, 2, lam=1.0, threshold=0.5)
    torch.testing.assert_close(adv2, torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 1.0, -1.0, -1.0]))
    nsr, _ = A.w_reinforce_advantages(r, 2, lam=0.0)
    assert nsr.max().item() == 0.0
    assert A.w_reinforce_advantages(r.double(), 2)[0].dtype == F64
    with pytest.raises(ValueError, match="lam"):
        A.w_reinforce_advantages(r, 2, lam=-0.1)


def test_w_reinforce_on_policy_is_weighted_reinforce():
    """One PPO step on fresh samples: ratio 1, clip inactive, gradient -A grad log pi / N."""
    adv, _ = A.w_reinforce_advantages(torch.tensor([1.0, 0.0]), 2)
    logp = torch.tensor([[-0.7, -1.2], [-0.3, -2.0]], dtype=F64, requires_grad=True)
    mask = torch.ones(2, 2, dtype=F64)
    loss, m = L.ppo_clip_loss(logp, logp.detach(), adv.double(), mask)
    (grad,) = torch.autograd.grad(loss, logp)
    torch.testing.assert_close(grad, torch.tensor([[-0.1, -0.1], [1.0, 1.0]], dtype=F64) / 4)
    assert m["pg/clip_frac"] == 0.0 and m["pg/ratio_mean"] == 1.0
