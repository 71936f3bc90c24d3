"""Policy-gradient loss, KL estimators, entropy and loss aggregation: small pure tensor functions.

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

from collections.abc import Callable

import torch
from torch import Tensor

from dphrl.registry import Registry

EXP_TAIL_THRESHOLD = 20.0

__all__ = [
    "AGGREGATIONS",
    "EXP_TAIL_THRESHOLD",
    "KL_ESTIMATORS",
    "POLICY_LOSSES",
    "aggregate",
    "compute_dtype",
    "entropy_from_logits",
    "exp_linear_tail",
    "expm1_linear_tail",
    "get_policy_loss",
    "kl_estimator",
    "masked_mean",
    "ppo_clip_loss",
]


# ----------------------------------------------------------------------------- helpers


def compute_dtype(t: Tensor) -> torch.dtype:
    """Dtype to compute in: float64 stays float64, everything else (bf16, fp16, fp32) uses float32."""
    if not t.is_floating_point():
        raise ValueError(f"expected a floating-point tensor, got dtype {t.dtype}")
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def exp_linear_tail(x: Tensor, threshold: float = EXP_TAIL_THRESHOLD) -> Tensor:
    """``exp(x)`` for ``x <= threshold``, its tangent line ``e^th (1 + x - th)`` beyond: finite, slope never 0."""
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
    """Each sequence's token sum / a constant ``max_len``, averaged over sequences (Dr. GRPO, no length bias)."""
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
    _check_same_shape(logp, old_logp, "logp and old_logp")
    _check_same_shape(logp, mask, "logp and mask")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip must be > 1 (e.g. 3.0), got {dual_clip}")
    if clip_low < 0 or clip_high < 0:
        raise ValueError(f"clip_low/clip_high must be >= 0, got {clip_low}, {clip_high}")
    cdt = compute_dtype(logp)
    adv = advantages.detach().to(cdt)
    if adv.dim() == logp.dim() - 1:
        adv = adv.unsqueeze(-1)  # (B, 1)
    adv = adv.expand_as(logp)  # (B, T)

    log_ratio = logp.to(cdt) - old_logp.detach().to(cdt)  # (B, T)
    ratio = exp_linear_tail(log_ratio)  # (B, T)
    loss_unclipped = -adv * ratio  # (B, T)
    loss_clipped = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)  # (B, T)
    per_token = torch.maximum(loss_unclipped, loss_clipped)  # (B, T)
    clipped = loss_clipped > loss_unclipped  # (B, T)
    dual = torch.zeros_like(clipped)  # (B, T)
    if dual_clip is not None:
        loss_dual = -adv * dual_clip  # (B, T)
        dual = (adv < 0) & (per_token > loss_dual)  # (B, T)
        per_token = torch.where(dual, loss_dual, per_token)  # (B, T)

    loss = aggregate(per_token, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)

    with torch.no_grad():
        m = mask != 0  # (B, T)
        k3 = expm1_linear_tail(log_ratio) - log_ratio  # (B, T)
        metrics = {
            "pg/clip_frac": masked_mean(clipped.to(cdt), m).item(),
            "pg/dual_clip_frac": masked_mean(dual.to(cdt), m).item(),
            "pg/approx_kl": masked_mean(k3, m).item(),
            "pg/ratio_mean": masked_mean(ratio, m).item(),
            "pg/ratio_max": ratio[m].max().item() if m.any() else 0.0,
        }
    return loss, metrics


def get_policy_loss(name: str) -> Callable[..., tuple[Tensor, dict[str, float]]]:
    """Look up a policy loss by config name (or ``package.module:fn``)."""
    return POLICY_LOSSES.get(name)


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


# ----------------------------------------------------------------------------- entropy


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of softmax(logits) over the last dim, (..., V) -> (...); stable, -inf logits allowed."""
    logp = torch.log_softmax(logits.to(compute_dtype(logits)), dim=-1)  # (..., V) via logsumexp
    p = logp.exp()  # (..., V)
    logp_safe = torch.where(p > 0, logp, torch.zeros_like(logp))  # (..., V) 0 * log 0 := 0
    return (-(p * logp_safe).sum(-1)).to(logits.dtype)  # (...)
