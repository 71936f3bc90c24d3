"""Policy-gradient losses, KL estimators and loss aggregation: small pure tensor functions.

Conventions (as in verl's ``core_algos.py``):

* Every function takes tensors and plain keyword arguments, never a config object, and never
  modifies its inputs.
* Masks are explicit ``(B, T)`` float or bool tensors, 1 = real response token (EOS included),
  0 = padding. Padding positions are removed with ``torch.where`` before any product, so a
  non-finite value on a padding token cannot leak into the loss.
* Low-precision inputs (bf16/fp16) are computed in float32; float64 stays float64 (tests).
* Registries (``AGGREGATIONS``, ``POLICY_LOSSES``, ``KL_ESTIMATORS``, :class:`dphrl.registry.Registry`)
  are keyed by the names users write in configs; register with ``@POLICY_LOSSES.register("name")``;
  an unknown name raises ``ValueError`` listing the valid ones; ``package.module:fn`` reaches user code.

Exponential guard: ``exp_linear_tail`` / ``expm1_linear_tail`` equal ``exp`` / ``expm1`` for
``x <= EXP_TAIL_THRESHOLD`` (20) and continue as the tangent line beyond it (value and slope match
at the threshold). Values stay finite for any finite ``x`` and, unlike a clamp, the gradient is
never zeroed.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

from dphrl.registry import Registry, config_params

EXP_TAIL_THRESHOLD = 20.0

__all__ = [
    "AGGREGATIONS",
    "EXP_TAIL_THRESHOLD",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "aggregate",
    "clip_cov_loss",
    "compute_dtype",
    "exp_linear_tail",
    "expm1_linear_tail",
    "kl_cov_loss",
    "kl_estimator",
    "masked_mean",
    "ppo_clip_loss",
    "token_covariance",
]


# ----------------------------------------------------------------------------- helpers


def compute_dtype(t: Tensor) -> torch.dtype:
    """Dtype to compute in: float64 stays float64, everything else (bf16, fp16, fp32) uses float32."""
    if not t.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got dtype {t.dtype}")
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def exp_linear_tail(x: Tensor, threshold: float = EXP_TAIL_THRESHOLD) -> Tensor:
    """``exp(x)`` for ``x <= threshold``, its tangent line ``e^th (1 + x - th)`` beyond:
    finite, slope never 0."""
    xc = x.clamp(max=threshold)  # (...) clamp's gradient is 1 at x == threshold, 0 above
    return torch.exp(xc) * (1.0 + torch.relu(x - threshold))  # (...) relu's gradient is 0 at 0


def expm1_linear_tail(x: Tensor, threshold: float = EXP_TAIL_THRESHOLD) -> Tensor:
    """``expm1(x)`` (accurate near 0) with the same linear continuation above ``threshold``.

    The gradient is taken from ``exp(x)`` rather than torch's ``expm1`` backward (``grad * (expm1(x) + 1)``),
    which rounds to 0 for ``x < ~-17`` in float32; the value is exactly ``expm1``.
    """
    xc = x.clamp(max=threshold)  # (...)
    e = torch.exp(xc)  # (...)
    em1 = torch.expm1(xc).detach() + (e - e.detach())  # (...) value expm1(xc), gradient exp(xc)
    return em1 + e * torch.relu(x - threshold)  # (...)


def _check_same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def _masked_values(values: Tensor, mask: Tensor) -> Tensor:
    """``values * mask`` with padding positions set to exactly 0 (even if ``values`` is inf/NaN there)."""
    _check_same_shape(values, mask, "values and mask")
    if mask.dtype == torch.bool:
        return torch.where(mask, values, torch.zeros_like(values))
    return torch.where(mask != 0, values * mask.to(values.dtype), torch.zeros_like(values))


def _upcast(values: Tensor) -> Tensor:
    return values.to(compute_dtype(values))


def _denominator(given: float | int | Tensor | None, default: Tensor, what: str) -> Tensor | float:
    """A normaliser: the caller's (global) count if given, else ``default`` clamped away from 0."""
    if given is None:
        return default.clamp(min=1e-8)
    if not isinstance(given, Tensor) and given <= 0:
        raise ValueError(f"{what} must be positive, got {given}")
    return given


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over positions where ``mask`` is non-zero (0 where there are none)."""
    v = _masked_values(_upcast(values), mask)  # (B, T)
    m = mask.to(v.dtype)  # (B, T)
    if dim is None:
        return v.sum() / m.sum().clamp(min=1e-8)
    return v.sum(dim) / m.sum(dim).clamp(min=1e-8)


# ----------------------------------------------------------------------------- aggregation


AGGREGATIONS: Registry[Callable[..., Tensor]] = Registry("loss aggregation", config_key="loss_agg")


@AGGREGATIONS.register("token-mean")
def _agg_token_mean(values: Tensor, mask: Tensor, *, num_tokens=None, num_seqs=None, max_len=None) -> Tensor:
    """Sum over all real tokens / number of tokens (global count if given: micro-batches then add up)."""
    v = _masked_values(values, mask)  # (B, T)
    return v.sum() / _denominator(num_tokens, mask.to(v.dtype).sum(), "num_tokens")


@AGGREGATIONS.register("seq-mean-token-mean")
def _agg_seq_mean_token_mean(
    values: Tensor, mask: Tensor, *, num_tokens=None, num_seqs=None, max_len=None
) -> Tensor:
    """Each sequence's token mean, averaged over sequences (global sequence count if given)."""
    v = _masked_values(values, mask)  # (B, T)
    seq_tokens = mask.to(v.dtype).sum(-1)  # (B,)
    seq_means = v.sum(-1) / seq_tokens.clamp(min=1e-8)  # (B,)
    return seq_means.sum() / _denominator(num_seqs, (seq_tokens > 0).sum().to(v.dtype), "num_seqs")


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def _agg_seq_mean_token_sum_norm(
    values: Tensor, mask: Tensor, *, num_tokens=None, num_seqs=None, max_len=None
) -> Tensor:
    """Each sequence's token sum / a constant ``max_len``, averaged over sequences
    (Dr. GRPO, no length bias)."""
    v = _masked_values(values, mask)  # (B, T)
    norm = _denominator(max_len, torch.tensor(float(mask.shape[-1])), "max_len")
    seq_tokens = mask.to(v.dtype).sum(-1)  # (B,)
    seq_sums = v.sum(-1) / norm  # (B,)
    return seq_sums.sum() / _denominator(num_seqs, (seq_tokens > 0).sum().to(v.dtype), "num_seqs")


def aggregate(
    values: Tensor,
    mask: Tensor,
    mode: str = "token-mean",
    *,
    num_tokens: float | int | Tensor | None = None,
    num_seqs: float | int | Tensor | None = None,
    max_len: float | int | None = None,
) -> Tensor:
    """Reduce per-token ``values`` (B, T) to a scalar loss according to ``mode``.

    ``num_tokens`` / ``num_seqs`` default to this batch's counts (sequences = rows with at least one
    real token). When a batch is split into micro-batches, pass the counts of the whole batch: the sum
    of the micro-batch losses (and of their gradients) then equals the full-batch loss exactly.
    ``max_len`` (``seq-mean-token-sum-norm`` only) defaults to ``mask.shape[-1]``; pass the configured
    maximum response length so that micro-batches padded to different lengths agree.
    """
    return AGGREGATIONS.get(mode)(
        _upcast(values), mask, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len
    )


# ----------------------------------------------------------------------------- policy loss


POLICY_LOSSES: Registry[Callable[..., tuple[Tensor, dict[str, float]]]] = Registry(
    "policy loss", config_key="policy_loss"
)


def _pg_inputs(
    logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Checked inputs of every policy loss: (adv (B, T) detached, log_ratio (B, T), ratio (B, T)) in the
    compute dtype; ``advantages`` is (B,) (one per sequence) or (B, T)."""
    _check_same_shape(logp, old_logp, "logp and old_logp")
    _check_same_shape(logp, mask, "logp and mask")
    cdt = compute_dtype(logp)
    adv = advantages.detach().to(cdt)
    if adv.dim() == logp.dim() - 1:
        adv = adv.unsqueeze(-1)  # (B, 1)
    adv = adv.expand_as(logp)  # (B, T)
    log_ratio = logp.to(cdt) - old_logp.detach().to(cdt)  # (B, T)
    ratio = exp_linear_tail(log_ratio)  # (B, T)
    return adv, log_ratio, ratio


def _ppo_per_token(
    adv: Tensor, ratio: Tensor, clip_low: float, clip_high: float, dual_clip: float | None
) -> tuple[Tensor, Tensor, Tensor]:
    """PPO-clip per-token loss (B, T), the clipped-branch mask (B, T) and the dual-clip mask (B, T)."""
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (e.g. 3.0), got {dual_clip}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low/clip_high must be >= 0, got {clip_low}, {clip_high}")
    loss_unclipped = -adv * ratio  # (B, T)
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    per_token = torch.maximum(loss_unclipped, loss_clipped)  # (B, T)
    clipped = loss_clipped > loss_unclipped  # (B, T)
    dual = torch.zeros_like(clipped)  # (B, T)
    if dual_clip is not None:
        loss_dual = -adv * dual_clip  # (B, T)
        dual = (adv < 0) & (per_token > loss_dual)  # (B, T)
        per_token = torch.where(dual, loss_dual, per_token)  # (B, T)
    return per_token, clipped, dual


@torch.no_grad()
def _ratio_metrics(log_ratio: Tensor, ratio: Tensor, m: Tensor) -> dict[str, float]:
    """``pg/approx_kl`` (mean k3 = r - 1 - log r >= 0), ``pg/ratio_mean``, ``pg/ratio_max`` (real tokens)."""
    k3 = expm1_linear_tail(log_ratio) - log_ratio  # (B, T)
    return {
        "pg/approx_kl": masked_mean(k3, m).item(),
        "pg/ratio_mean": masked_mean(ratio, m).item(),
        "pg/ratio_max": ratio[m].max().item() if m.any() else 0.0,
    }


@POLICY_LOSSES.register("ppo_clip")
def ppo_clip_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    num_tokens: float | int | Tensor | None = None,
    num_seqs: float | int | Tensor | None = None,
    max_len: float | int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """PPO clipped surrogate with asymmetric (clip-higher) range and optional dual clip.

    Per token: ``max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high))`` with ``r = exp(logp - old_logp)``;
    with ``dual_clip = c > 1``, tokens with ``A < 0`` are further capped at ``-A c`` (bounds the loss of
    a negative-advantage token whose ratio exploded). ``advantages`` is (B,) or (B, T).

    Metrics (python floats, over real tokens): ``pg/clip_frac`` (clipped branch strictly active),
    ``pg/dual_clip_frac``, ``pg/approx_kl`` (mean k3 = r - 1 - log r, a non-negative estimate of
    KL(pi_old || pi_theta) on tokens sampled from pi_old), ``pg/ratio_mean``, ``pg/ratio_max``.
    The ratio uses ``exp_linear_tail``: finite for any log-ratio, gradient never zeroed.
    """
    adv, log_ratio, ratio = _pg_inputs(logp, old_logp, advantages, mask)  # (B, T) x3
    per_token, clipped, dual = _ppo_per_token(adv, ratio, clip_low, clip_high, dual_clip)  # (B, T) x3
    loss = aggregate(per_token, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    with torch.no_grad():
        m = mask != 0  # (B, T)
        metrics = {
            "pg/clip_frac": masked_mean(clipped.to(ratio.dtype), m).item(),
            "pg/dual_clip_frac": masked_mean(dual.to(ratio.dtype), m).item(),
            **_ratio_metrics(log_ratio, ratio, m),
        }
    return loss, metrics


# ----------------------------------------------------------------------------- covariance-based (Cui et al.)


@torch.no_grad()
def token_covariance(logp: Tensor, advantages: Tensor, mask: Tensor) -> Tensor:
    """Cui et al.'s per-token covariance term, detached: (B, T), 0 on padding.

    ``cov_t = (logp_t - mean logp) * (A_t - mean A)``, both means over the real tokens of the batch
    (token-weighted: a long response counts once per token). Its mean is the covariance between the
    log-probability and the advantage that, by the paper's analysis, drives the entropy change.
    """
    _check_same_shape(logp, mask, "logp and mask")
    cdt = compute_dtype(logp)
    m = mask != 0  # (B, T)
    adv = advantages.detach().to(cdt)
    adv = (adv.unsqueeze(-1) if adv.dim() == logp.dim() - 1 else adv).expand_as(logp)  # (B, T)
    lp = logp.detach().to(cdt)  # (B, T)
    cov = (lp - masked_mean(lp, m)) * (adv - masked_mean(adv, m))  # (B, T)
    return torch.where(m, cov, torch.zeros_like(cov))  # (B, T)


def _cov_count(ratio: float, n_valid: int, what: str) -> int:
    """Tokens to select: 0 for ratio 0, else max(1, floor(ratio * N)) as the authors' code (1e-9 slack for
    float rounding, so 0.29 * 100 gives 29, not 28)."""
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"{what} must be in [0, 1], got {ratio}")
    if ratio == 0 or n_valid == 0:
        return 0
    return max(1, math.floor(ratio * n_valid + 1e-9))


@POLICY_LOSSES.register("kl_cov")
@config_params(kl_cov_ratio="kl_cov_ratio", ppo_kl_coef="ppo_kl_coef")
def kl_cov_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    kl_cov_ratio: float = 2e-3,
    ppo_kl_coef: float = 1.0,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    num_tokens: float | int | Tensor | None = None,
    num_seqs: float | int | Tensor | None = None,
    max_len: float | int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """KL-Cov (Cui et al. 2025, "The Entropy Mechanism of Reinforcement Learning for Reasoning Language
    Models", arXiv 2505.22617): a KL penalty on the few tokens with the largest covariance.

    Per token, with r = exp(logp - old_logp) and I_KL the ``max(1, floor(kl_cov_ratio * N))`` real tokens
    of this call with the largest ``token_covariance`` (N real tokens; ties: lower flat index first;
    ratio 0 selects none):

        l_t = -A_t r_t                                       t not in I_KL
        l_t = -A_t r_t + ppo_kl_coef * |logp_t - old_logp_t|  t in I_KL

    then aggregated by ``agg``. No ratio clipping (as the paper's objective and the authors' verl code):
    the penalty is the only trust region, so ``clip_low`` / ``clip_high`` are accepted for a uniform call
    and ignored, and ``dual_clip`` is refused. Paper defaults: kl_cov_ratio 2e-3 (Qwen2.5-7B; 2e-4 for
    32B), ppo_kl_coef 1. The |log-ratio| has gradient sign(logp - old_logp): 0 where logp == old_logp
    exactly, but on-policy with pi_old from the rollout engine the two differ by rounding (~3e-7 in the
    demo), so the penalty acts only through that noise's sign; it is meant for updates where pi leaves
    pi_old (ppo_epochs > 1 or mini_batches > 1). Selection is per call, i.e. per micro-batch, as in verl.
    Metrics: ``pg/kl_cov_frac`` (selected / real tokens), ``pg/abs_log_ratio`` (mean |logp - old_logp|),
    ``pg/approx_kl``, ``pg/ratio_mean``, ``pg/ratio_max``.
    """
    if dual_clip is not None:
        raise ValueError("kl_cov has no ratio clipping (Cui et al.); dual_clip does not apply: set it to 0")
    if ppo_kl_coef < 0:
        raise ValueError(f"ppo_kl_coef must be >= 0, got {ppo_kl_coef}")
    adv, log_ratio, ratio = _pg_inputs(logp, old_logp, advantages, mask)  # (B, T) x3
    m = mask != 0  # (B, T)
    n_sel = _cov_count(kl_cov_ratio, int(m.sum().item()), "kl_cov_ratio")
    cov = torch.where(m, token_covariance(logp, adv, mask), -torch.inf)  # (B, T) padding never selected
    top = torch.sort(cov.reshape(-1), descending=True, stable=True).indices[:n_sel]  # (n_sel,)
    selected = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)  # (B*T,)
    selected[top] = True
    selected = selected.view_as(cov)  # (B, T)
    abs_log_ratio = log_ratio.abs()  # (B, T)
    penalty = torch.where(selected, ppo_kl_coef * abs_log_ratio, torch.zeros_like(abs_log_ratio))  # (B, T)
    per_token = -adv * ratio + penalty  # (B, T)
    loss = aggregate(per_token, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    with torch.no_grad():
        metrics = {
            "pg/kl_cov_frac": masked_mean(selected.to(ratio.dtype), m).item(),
            "pg/abs_log_ratio": masked_mean(abs_log_ratio, m).item(),
            **_ratio_metrics(log_ratio, ratio, m),
        }
    return loss, metrics


@POLICY_LOSSES.register("clip_cov")
@config_params(clip_cov_ratio="clip_cov_ratio", clip_cov_lb="clip_cov_lb", clip_cov_ub="clip_cov_ub")
def clip_cov_loss(
    logp: Tensor,
    old_logp: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    generator: torch.Generator | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = None,
    agg: str = "token-mean",
    num_tokens: float | int | Tensor | None = None,
    num_seqs: float | int | Tensor | None = None,
    max_len: float | int | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """Clip-Cov (Cui et al. 2025, arXiv 2505.22617): drop the policy-gradient term of a few random
    tokens whose covariance lies in a band.

    Candidates: real tokens with ``clip_cov_lb < token_covariance < clip_cov_ub`` (strict, as the
    authors' verl code; the paper writes the interval closed: only a token exactly on a bound differs)
    that the PPO clip has not already cut (clipped branch active, or dual-clipped). I_clip: a uniformly
    random ``max(1, floor(clip_cov_ratio * N))`` of them (N real tokens of this call; all of them if
    fewer; ratio 0 selects none), drawn with ``generator`` (None: torch's default generator). Per token:

        l_t = ppo_clip_t(A_t, r_t)   t not in I_clip      l_t = 0   t in I_clip

    so a selected token contributes neither value nor gradient (the paper's objective; verl multiplies
    by 0); everything else is exactly ``ppo_clip_loss`` (same clip range, dual clip, aggregation).
    Paper defaults: clip_cov_ratio 2e-4, bounds 1 and 5. Selection is per call (per micro-batch).
    Metrics: ``pg/clip_cov_frac`` (selected / real tokens), then those of ``ppo_clip_loss``.
    """
    if not clip_cov_lb < clip_cov_ub:
        raise ValueError(f"need clip_cov_lb < clip_cov_ub, got {clip_cov_lb}, {clip_cov_ub}")
    adv, log_ratio, ratio = _pg_inputs(logp, old_logp, advantages, mask)  # (B, T) x3
    per_token, clipped, dual = _ppo_per_token(adv, ratio, clip_low, clip_high, dual_clip)  # (B, T) x3
    m = mask != 0  # (B, T)
    n_sel = _cov_count(clip_cov_ratio, int(m.sum().item()), "clip_cov_ratio")
    cov = token_covariance(logp, adv, mask)  # (B, T)
    candidates = m & ~clipped & ~dual & (cov > clip_cov_lb) & (cov < clip_cov_ub)  # (B, T)
    idx = candidates.reshape(-1).nonzero().squeeze(-1)  # (M,) flat indices
    dev = generator.device if generator is not None else torch.device("cpu")
    perm = torch.randperm(idx.numel(), generator=generator, device=dev)[:n_sel].to(idx.device)  # (<= n_sel,)
    selected = torch.zeros(cov.numel(), dtype=torch.bool, device=cov.device)  # (B*T,)
    selected[idx[perm]] = True
    selected = selected.view_as(cov)  # (B, T)
    per_token = torch.where(selected, torch.zeros_like(per_token), per_token)  # (B, T)
    loss = aggregate(per_token, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    with torch.no_grad():
        metrics = {
            "pg/clip_cov_frac": masked_mean(selected.to(ratio.dtype), m).item(),
            "pg/clip_frac": masked_mean(clipped.to(ratio.dtype), m).item(),
            "pg/dual_clip_frac": masked_mean(dual.to(ratio.dtype), m).item(),
            **_ratio_metrics(log_ratio, ratio, m),
        }
    return loss, metrics


# ----------------------------------------------------------------------------- KL estimators
# What each estimator's value and LOSS gradient are in expectation: see ``kl_estimator``'s docstring
# (proved by exact enumeration in tests/test_kl_gradients.py).


KL_ESTIMATORS: Registry[Callable[[Tensor], Tensor]] = Registry("KL estimator", config_key="kl_estimator")


@KL_ESTIMATORS.register("k1")
def _kl_k1(d: Tensor) -> Tensor:
    """k1 = log(pi/pi_ref): unbiased value, can be negative; as a loss its expected gradient is 0."""
    return d


@KL_ESTIMATORS.register("k2")
def _kl_k2(d: Tensor) -> Tensor:
    """k2 = (log-ratio)^2 / 2: biased value, >= 0; as a loss its expected gradient is that of reverse KL."""
    return 0.5 * d.square()


@KL_ESTIMATORS.register("k3")
def _kl_k3(d: Tensor) -> Tensor:
    """k3 = pi_ref/pi - 1 - log(pi_ref/pi) = expm1(-d) + d: unbiased value, >= 0 (Schulman's low-variance
    estimator); as a loss its expected gradient is that of the FORWARD KL(pi_ref || pi_theta)."""
    return expm1_linear_tail(-d) + d


def kl_estimator(logp: Tensor, ref_logp: Tensor, kind: str = "k3") -> Tensor:
    """Per-token estimate of reverse KL(pi_theta || pi_ref) on tokens sampled from pi_theta.

    Elementwise, same shape and dtype as ``logp``; gradients flow into ``logp`` only. k3 uses expm1 with
    the linear-tail guard (no clamp), so its gradient stays finite and non-zero for any log-ratio.

    An unbiased VALUE is not an unbiased GRADIENT. With y ~ pi_theta and d = log pi_theta(y) -
    log pi_ref(y), used as a loss (differentiated through log pi_theta(y), the sample fixed, as the
    ``live_reference`` algorithms do), in expectation over y:

    ==================  ========================  ======================================
    estimator           E[value]                  E[gradient as a loss]
    ==================  ========================  ======================================
    k1 = d              KL(pi_theta || pi_ref)    0 (no regularisation at all)
    k2 = d^2 / 2        E[d^2] / 2 (!= KL)        grad KL(pi_theta || pi_ref) (reverse)
    k3 = e^-d - 1 + d   KL(pi_theta || pi_ref)    grad KL(pi_ref || pi_theta) (FORWARD)
    -beta d as reward   (REINFORCE, d detached)   -beta grad KL(pi_theta || pi_ref)
    ==================  ========================  ======================================

    Why: the loss gradient is l'(d) grad log pi_theta(y), and E[h(y) grad log pi_theta(y)] =
    sum_y h(y) grad pi_theta(y); with l' = 1, d, 1 - pi_ref/pi_theta this is 0, the reverse-KL
    gradient, and -sum_y pi_ref(y) grad log pi_theta(y) = the forward-KL gradient (Tang & Munos 2025,
    "On a few pitfalls in KL divergence gradient estimation for RL", arXiv 2506.09477).
    Sequences: at a fixed prefix the token-level term gives the per-position gradient of that
    divergence; the prefix distribution is not differentiated, so summed k2 is NOT the gradient of
    the sequence-level reverse KL (it misses E[grad log pi_theta(y_<t) KL_t]); REINFORCE with the
    sequence's summed -beta d as the return is. k3 as a loss (verl's ``low_var_kl`` kl loss, the
    paper's RKL baseline) therefore pulls, per position at on-policy prefixes, along forward KL. No
    further estimator is registered: k2 already gives the per-position reverse-KL gradient, and the
    sequence-level one needs the reward form, not a per-token loss.
    """
    fn = KL_ESTIMATORS.get(kind)
    _check_same_shape(logp, ref_logp, "logp and ref_logp")
    cdt = compute_dtype(logp)
    d = logp.to(cdt) - ref_logp.detach().to(cdt)  # (B, T)
    return fn(d).to(logp.dtype)  # (B, T)
