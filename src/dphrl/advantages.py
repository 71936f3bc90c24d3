"""Outcome-reward advantages (GRPO, Dr. GRPO, RLOO, pass@k, PKPO, W-REINFORCE) and DAPO shaping / filtering.

Rewards are one scalar per response, shape (B,), with ``B = G * group_size`` and each prompt's
``group_size`` responses contiguous (rows ``g*n .. g*n + n - 1``). Every advantage function returns
``(advantages (B,), metrics)``; the registry ``ADVANTAGES`` maps config names to them
(``@ADVANTAGES.register("name")`` adds one). Groups whose rewards are all
equal carry no learning signal and get exactly 0 advantage (every estimator but ``w_reinforce``,
which has no baseline by design, and ``pkpo`` with ``baseline="none"``).

Binary estimators (``passk``, ``w_reinforce``) call a response correct when its reward is
``>= threshold``; the default 1.0 is :data:`dphrl.rewards.registry.CORRECT_THRESHOLD` (the one
definition the training metrics, presample and evaluation use), written here as a literal so that
this tensor module does not import the reward layer (a test keeps the two equal).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from fractions import Fraction

import torch
from torch import Tensor

from dphrl.registry import Registry, config_params

__all__ = [
    "ADVANTAGES",
    "annealed_k",
    "compute_advantages",
    "dynamic_sampling_mask",
    "grpo_advantages",
    "grpo_no_std_advantages",
    "overlong_penalty",
    "passk_advantages",
    "pkpo_advantages",
    "rloo_advantages",
    "w_reinforce_advantages",
]

#: Default of the binary estimators' ``threshold``: equal to ``dphrl.rewards.registry.CORRECT_THRESHOLD``.
DEFAULT_CORRECT_THRESHOLD = 1.0


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """(B,) -> (G, group_size) in a floating dtype (float64 kept, else float32)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (B,), got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the batch size {rewards.numel()}")
    dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    return rewards.detach().to(dt).reshape(-1, group_size)  # (G, n)


def _all_equal(grouped: Tensor) -> Tensor:
    """(G, n) -> (G,) True where every reward of the group is identical."""
    return grouped.amax(-1) == grouped.amin(-1)  # (G,)


def _metrics(adv: Tensor, zero_group: Tensor) -> dict[str, float]:
    return {
        "adv/mean": adv.mean().item(),
        "adv/std": adv.std(correction=0).item(),
        "adv/zero_std_frac": zero_group.float().mean().item(),
    }


ADVANTAGES: Registry[Callable[..., tuple[Tensor, dict[str, float]]]] = Registry(
    "advantage estimator", config_key="advantage"
)


@ADVANTAGES.register("grpo")
def grpo_advantages(
    rewards: Tensor, group_size: int, *, std_normalize: bool = True, eps: float = 1e-6
) -> tuple[Tensor, dict[str, float]]:
    """GRPO: ``(r - mean_g) / (std_g + eps)``; without std (Dr. GRPO) ``r - mean_g``.

    ``std_g`` is the unbiased sample std (``torch.std`` default, as in verl). Metrics: ``adv/mean``,
    ``adv/std`` (population std over the batch), ``adv/zero_std_frac`` (fraction of all-equal groups).
    """
    r = _grouped(rewards, group_size)  # (G, n)
    zero = _all_equal(r)  # (G,)
    adv = r - r.mean(-1, keepdim=True)  # (G, n)
    if std_normalize and group_size > 1:
        adv = adv / (r.std(-1, keepdim=True) + eps)  # (G, n)
    adv = torch.where(zero.unsqueeze(-1), torch.zeros_like(adv), adv)  # (G, n) exactly 0, not rounding noise
    adv = adv.reshape(-1)  # (B,)
    return adv, _metrics(adv, zero)


@ADVANTAGES.register("grpo_no_std")
def grpo_no_std_advantages(
    rewards: Tensor, group_size: int, *, eps: float = 1e-6
) -> tuple[Tensor, dict[str, float]]:
    """Dr. GRPO: ``r - mean_g`` (no std normalisation, no difficulty bias)."""
    return grpo_advantages(rewards, group_size, std_normalize=False, eps=eps)


@ADVANTAGES.register("rloo")
def rloo_advantages(rewards: Tensor, group_size: int) -> tuple[Tensor, dict[str, float]]:
    """RLOO: ``r_i - mean of the other responses of the group`` (= n/(n-1) (r_i - mean_g))."""
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2, got {group_size}")
    r = _grouped(rewards, group_size)  # (G, n)
    zero = _all_equal(r)  # (G,)
    loo_mean = (r.sum(-1, keepdim=True) - r) / (group_size - 1)  # (G, n)
    adv = torch.where(zero.unsqueeze(-1), torch.zeros_like(r), r - loo_mean).reshape(-1)  # (B,)
    return adv, _metrics(adv, zero)


# ----------------------------------------------------------------------------- pass@k objectives


def _check_k(k: int, group_size: int, what: str) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= group_size:
        raise ValueError(f"{what}: k must be an integer with 1 <= k <= group_size={group_size}, got {k!r}")
    return k


def _correct(rewards: Tensor, group_size: int, threshold: float) -> Tensor:
    """(B,) rewards -> (G, n) bool, True where ``reward >= threshold``."""
    return _grouped(rewards, group_size) >= threshold  # (G, n)


@functools.lru_cache(maxsize=64)
def _passk_table(n: int, k: int) -> tuple[tuple[float, ...], tuple[float, ...], tuple[float, ...]]:
    """For c = 0..n correct responses: (rho_c, 1 - rho_c, 1 - rho_c - miss_c), exact rationals rounded once.

    rho_c = 1 - C(n-c, k) / C(n, k) (the unbiased pass@k estimate), miss_c = C(n-c-1, k-1) / C(n-1, k-1)
    (the chance that k-1 other responses drawn from the group are all incorrect too).
    """
    rho, pos, neg = [], [], []
    for c in range(n + 1):
        r = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
        miss = Fraction(math.comb(n - c - 1, k - 1), math.comb(n - 1, k - 1)) if c < n else Fraction(0)
        rho.append(float(r))
        pos.append(float(1 - r))
        neg.append(float(1 - r - miss))
    return tuple(rho), tuple(pos), tuple(neg)


@ADVANTAGES.register("passk")
@config_params(k="passk_k")
def passk_advantages(
    rewards: Tensor,
    group_size: int,
    *,
    k: int = 4,
    threshold: float = DEFAULT_CORRECT_THRESHOLD,
    eps: float = 1e-6,
) -> tuple[Tensor, dict[str, float]]:
    """Pass@k Training with the analytical advantage (Chen et al. 2025, arXiv 2508.10751).

    The reward of a response is the pass@k of a random k-subset of its group that contains it; the
    advantage is that group reward's deviation from its mean over ALL k-subsets, divided by its std,
    in closed form. A group of n with c correct (``reward >= threshold``):

        rho   = 1 - C(n-c, k) / C(n, k)            sigma = sqrt(rho (1 - rho))
        A_pos = (1 - rho) / (sigma + eps)
        A_neg = (1 - rho - C(n-c-1, k-1) / C(n-1, k-1)) / (sigma + eps)

    (``eps`` as in the authors' code and ``grpo``; ``eps=0`` is the paper's formula.) Groups with
    rho in {0, 1} get exactly 0: no correct response, or k > n - c (every k-subset holds a correct
    one; the formula is 0/0 there), so at k = n every advantage is 0 (the config refuses
    ``passk_k = rollout_n``). k = 1 is GRPO with the population std: A = (r - p)/sqrt(p(1-p)).

    Non-binary rewards are thresholded, not refused: pass@k is defined on correctness, and the project
    defines correctness once (``reward >= CORRECT_THRESHOLD``, also for -1/+1 and partial-credit
    rewards, and for evaluation's Pass@k), so training optimises the pass@k that is reported; partial
    credit counts as a failure. Note: the trainer passes rewards after DAPO overlong shaping, which can
    push a correct but overlong response below the threshold (then counted incorrect).
    Metrics: ``adv/mean``, ``adv/std``, ``adv/zero_std_frac`` (groups with no signal, rho in {0, 1}),
    ``adv/passk`` (mean rho: the unbiased pass@k estimate of the rollouts).
    """
    k = _check_k(k, group_size, "passk")
    correct = _correct(rewards, group_size, threshold)  # (G, n)
    dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    table = _passk_table(group_size, k)
    rho_t, pos_t, neg_t = (torch.tensor(v, dtype=torch.float64) for v in table)  # (n+1,) each
    c = correct.sum(-1)  # (G,)
    rho = rho_t[c]  # (G,)
    sigma = (rho * (1 - rho)).sqrt() + eps  # (G,)
    zero = (rho == 0) | (rho == 1)  # (G,) no learning signal
    adv = torch.where(correct, (pos_t[c] / sigma).unsqueeze(-1), (neg_t[c] / sigma).unsqueeze(-1))  # (G, n)
    adv = torch.where(zero.unsqueeze(-1), torch.zeros_like(adv), adv).to(dt).reshape(-1)  # (B,)
    return adv, {**_metrics(adv, zero), "adv/passk": rho.mean().item()}


@functools.lru_cache(maxsize=64)
def _max_rank_probs(m: int, j: int) -> tuple[float, ...]:
    """P(the largest of a uniform j-subset of m sorted values has rank r), r = 0..m-1: C(r, j-1) / C(m, j)."""
    total = math.comb(m, j)
    return tuple(float(Fraction(math.comb(r, j - 1), total)) for r in range(m))


PKPO_BASELINES = ("loo-1", "none")


@ADVANTAGES.register("pkpo")
@config_params(k="passk_k", baseline="pkpo_baseline")
def pkpo_advantages(
    rewards: Tensor, group_size: int, *, k: int = 4, baseline: str = "loo-1"
) -> tuple[Tensor, dict[str, float]]:
    """PKPO, Pass-at-k Policy Optimization (Walder & Karkhanis 2025, arXiv 2505.15201).

    Transformed rewards s_i such that sum_i s_i grad log pi(y_i) is an UNBIASED estimate of
    grad pass@k (binary rewards) or of grad maxg@k = grad E[max of k rewards] (any real rewards,
    the paper's Section 3); binary 0/1 rewards give pass@k exactly, so no threshold is needed.
    With n = group_size, E_{S ni i} the mean over the k-subsets S of the group that contain i and
    E_B the mean over the (k-1)-subsets B of the OTHER n - 1 responses:

    * ``baseline="none"`` (eq. 19 / 27): s_i = (1/C(n,k)) sum_{S ni i} max_S r = (k/n) E_B[max(r_i, max_B r)];
      binary (eq. 8): k/n if correct, (k/n) (1 - C(n-c-1, k-1) / C(n-1, k-1)) if not. Not 0 on
      all-equal groups (k/n each on an all-correct group): unbiased, but noisier.
    * ``baseline="loo-1"`` (eq. 33, the estimator the paper trains with and calls PKPO):
      s_i = (1/C(n,k)) sum_{S ni i} (max_S r - max_{S minus i} r) = (k/n) E_B[(r_i - max_B r)_+];
      binary: C(n-c, k-1) / C(n, k) if correct, 0 if not. Unbiased (the baseline never depends on y_i),
      0 on all-equal groups, 0 for the group's lowest reward. For k = 1 (no (k-1)-subsets) it is the
      paper's k_opt = 1 run: the leave-one-out mean baseline of eq. 26, r_i - mean_{j != i} r_j
      (= ``rloo``, whose expectation is n grad pass@1: a scale n times that of k >= 2).

    Scale: the paper's, sum_i s_i estimates the gradient, so values are O(k/n), smaller than GRPO's;
    adaptive optimisers absorb a constant scale. ``annealed_k`` gives the paper's k schedule. The
    paper's eq. 29 ("loo", baseline over k-subsets of the others) is not offered: it needs k < n,
    is not 0 on all-equal groups, and the paper prefers eq. 33 for its lower variance (its Fig. 4).
    """
    k = _check_k(k, group_size, "pkpo")
    if baseline not in PKPO_BASELINES:
        raise ValueError(f"pkpo: baseline must be one of {PKPO_BASELINES}, got {baseline!r}")
    if baseline == "loo-1" and k == 1:
        return rloo_advantages(rewards, group_size)
    r = _grouped(rewards, group_size)  # (G, n)
    zero = _all_equal(r)  # (G,)
    dt = r.dtype
    n = group_size
    if k == 1:  # baseline "none": s_i = r_i / n
        adv = (r.double() / n).to(dt).reshape(-1)  # (B,)
        return adv, _metrics(adv, zero)
    g, order = r.double().sort(-1)  # (G, n) ascending, (G, n)
    w = torch.tensor(_max_rank_probs(n - 1, k - 1), dtype=torch.float64)  # (n-1,) by rank among the others
    p = torch.arange(n).unsqueeze(-1)  # (n, 1) own sorted position
    q = torch.arange(n).unsqueeze(0)  # (1, n) the other's sorted position
    rank = (q - (q > p).long()).clamp(0, n - 2)  # (n, n) rank of q among the n-1 others of p (p == q: unused)
    weight = torch.where(p == q, torch.zeros(()), w[rank])  # (n, n) P(max_B is the response at q)
    gp, gq = g.unsqueeze(-1), g.unsqueeze(-2)  # (G, n, 1), (G, 1, n)
    pair = (gp - gq).clamp(min=0) if baseline == "loo-1" else torch.maximum(gp, gq)  # (G, n, n)
    s_sorted = (k / n) * (pair * weight).sum(-1)  # (G, n)
    adv = torch.empty_like(s_sorted).scatter_(-1, order, s_sorted).to(dt).reshape(-1)  # (B,)
    return adv, _metrics(adv, zero)


def annealed_k(step: int, *, k: int, k_final: int = 1, anneal_step: int | None = None) -> int:
    """PKPO's k schedule (Walder & Karkhanis 2025, Sec. 5.2.3, Fig. 3): ``k`` before ``anneal_step``, then
    ``k_final`` (the paper: k = 8 up to step 1500, k = 1 after). ``anneal_step=None`` keeps ``k``.

    Explore first (optimise pass@k), then consolidate the single-sample policy (pass@1); usable for
    ``passk`` as well. The trainer passes ``k=annealed_k(step, ...)`` to the estimator each step.
    """
    if anneal_step is None or step < anneal_step:
        return k
    return k_final


@ADVANTAGES.register("w_reinforce")
@config_params(lam="w_reinforce_lambda")
def w_reinforce_advantages(
    rewards: Tensor, group_size: int, *, lam: float = 0.1, threshold: float = DEFAULT_CORRECT_THRESHOLD
) -> tuple[Tensor, dict[str, float]]:
    """W-REINFORCE (Zhu et al. 2025, "The Surprising Effectiveness of Negative Reinforcement in LLM
    Reasoning", arXiv 2506.01347): ``+lam`` for a correct response (``reward >= threshold``), ``-1``
    for an incorrect one; paper default lam = 0.1.

    The objective is lam * PSR + NSR: REINFORCE with the positive samples down-weighted, NO baseline.
    So, unlike every other estimator here, all-equal groups are NOT zeroed: an all-wrong group still
    pushes all its responses down (negative sample reinforcement, the paper's main signal, which
    redistributes mass to other candidates) and an all-right group still pulls them up by lam. (DAPO
    dynamic sampling would drop those groups: combine the two only knowingly.) lam = 1 is plain
    REINFORCE on +-1 rewards; lam = 0 is NSR alone.

    With the policy loss: the value is an ordinary advantage; the policy loss (``ppo_clip`` ...) is
    unchanged. On-policy with one PPO epoch and one mini-batch the ratio is 1 and the clip inactive,
    so the gradient is -A grad log pi, weighted REINFORCE as in the paper; with more epochs the ratio
    clip bounds each update as for any advantage. ``adv/zero_std_frac`` reports the all-equal groups
    (those other estimators would zero), not zero advantages.

    Aggregation matters more than for a zero-mean advantage: the advantages mostly sum to a negative
    number, and ``loss_agg: seq-mean-token-mean`` divides each response's gradient by its own length, so
    the short wrong responses are pushed down hardest and the policy drifts to long ones whatever their
    reward. Use ``token-mean`` (the aggregation of the authors' verl code); the README's sweep of
    both (``dphrl demo --more-families --sweep``) measures the difference.
    """
    if lam < 0 or not math.isfinite(lam):
        raise ValueError(f"w_reinforce: lam (w_reinforce_lambda) must be finite and >= 0, got {lam}")
    correct = _correct(rewards, group_size, threshold)  # (G, n)
    dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    pos, neg = torch.tensor(float(lam), dtype=dt), torch.tensor(-1.0, dtype=dt)
    adv = torch.where(correct, pos, neg).reshape(-1)  # (B,)
    return adv, _metrics(adv, _all_equal(correct.to(dt)))


def compute_advantages(name: str, rewards: Tensor, group_size: int, **kw) -> tuple[Tensor, dict[str, float]]:
    """Dispatch to the advantage estimator registered as ``name`` (or ``package.module:fn``); ``kw`` are
    that estimator's keyword arguments (e.g. ``k=`` for passk / pkpo, ``lam=`` for w_reinforce)."""
    return ADVANTAGES.get(name)(rewards, group_size, **kw)


def overlong_penalty(lengths: Tensor, max_len: int, buffer_len: int, penalty: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment, added to the reward.

    0 for ``len <= max_len - buffer_len``, then linear down to ``-penalty`` at ``max_len``, ``-penalty``
    beyond. ``buffer_len = 0`` gives a hard ``-penalty`` for ``len > max_len``.
    """
    if not 0 <= buffer_len <= max_len:
        raise ValueError(f"need 0 <= buffer_len <= max_len, got buffer_len={buffer_len}, max_len={max_len}")
    lengths = torch.as_tensor(lengths)
    dt = torch.float64 if lengths.dtype == torch.float64 else torch.float32
    lens = lengths.to(dt)  # (B,)
    if buffer_len == 0:
        return torch.where(lens > max_len, -penalty, 0.0).to(dt)  # (B,)
    exceed = (lens - (max_len - buffer_len)).clamp(min=0.0, max=float(buffer_len))  # (B,)
    return -penalty * exceed / buffer_len  # (B,)


def dynamic_sampling_mask(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO dynamic sampling: (G,) bool, True for groups whose rewards are not all equal (keep them)."""
    return ~_all_equal(_grouped(rewards, group_size))  # (G,)
