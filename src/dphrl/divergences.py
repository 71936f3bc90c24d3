"""f-divergences between the policy and the reference policy, evaluated on reference samples (DPH-RL).

An f-divergence is given by its generator ``f`` (convex, ``f(1) = 0``):
``D_f = E_{y ~ pi_ref}[f(u)]`` with ``u = pi_theta(y) / pi_ref(y)``. DPH-RL evaluates it on stored
samples ``y_t ~ pi_ref`` with stored ``ref_logp``: with ``d = logp - ref_logp`` and ``u = exp(d)``,
the per-token loss is ``f(u)``, whose expectation under ``pi_ref`` is the divergence (per token; for
forward-KL, summed over a sequence it is an unbiased estimate of the sequence-level KL(pi_ref||pi_theta)
by the chain rule).

Built-ins (``name``: generator; expectation under pi_ref):

* ``forward_kl``: ``u - 1 - log u``; KL(pi_ref || pi_theta) (mass-covering, DPH-F).
* ``reverse_kl``: ``u log u - u + 1``; KL(pi_theta || pi_ref). The ``- u + 1`` term has zero
  expectation (both distributions sum to 1) but makes every per-token value >= 0 with ``f'(1) = 0``.
* ``js``: ``u log u - (u + 1) log((u + 1) / 2)``; 2 * JS(pi_theta, pi_ref) (DPH-JS, generator form).
* ``alpha`` (param ``alpha``, default 0.5): ``(u^(1-a) - (1-a) u - a) / (a (a - 1))``; tends to
  ``forward_kl`` as a -> 1 and ``reverse_kl`` as a -> 0 (a exactly 1 or 0 delegates to those).
* ``total_variation``: ``|u - 1| / 2``; TV distance.
* ``hellinger``: ``(sqrt(u) - 1)^2``; squared Hellinger distance sum (sqrt(p) - sqrt(q))^2.
* ``chi2``: ``(u - 1)^2``; Pearson chi^2(pi_theta || pi_ref).

Numerics. Built-ins are computed in log space (``u log u = exp(d) d``,
``log((u+1)/2) = softplus(d) - log 2``, ``u - 1 - log u = expm1(d) - d``, ...), in float32 for
bf16/fp16/fp32 inputs (float64 stays float64) and cast back to ``logp``'s dtype. Guard (linearized
tails): the per-token function ``g(d) = f(exp(d))`` is evaluated exactly for ``d`` in
``[GUARD_LOW, GUARD_HIGH] = [-50, 20]`` and continues as its tangent line outside (first-order Taylor
continuation: value and slope match at the boundary; slopes are taken by autograd in float64). So the
exponentials never see an argument above 20 (``u <= 4.85e8``) and values are finite for any finite
``d``; nothing is clamped to a constant, so no gradient is zeroed: e.g. the forward-KL gradient at
``d = -30`` is ``u - 1 ~ -1`` (the original code clamped the value at 10, which zeroed it below
``d ~ -11``). Below -50 the built-ins are already linear or constant up to ``O(e^-50)`` terms
(``alpha``: ``O(e^(-50 (1 - a)))``, e.g. 1% too high at ``d = -1000`` for a = 0.8), and above 20
(``u > 4.85e8``) only a broken policy goes; there the loss is the C^1 continuation, not the exact ``f``. For ``d`` in ``[-50, 50]``
values and gradients are finite in float32 and bf16, and gradients are non-zero wherever they are
mathematically non-zero. (``expm1`` is differentiated as ``exp``: torch's own ``expm1`` backward
rounds to 0 below ``d ~ -17``.)

User divergences: ``register_divergence(name, f, log_space=g)``. Without ``g``, ``per_token_loss``
uses ``g(d) = f(exp(d))`` under the same guard, i.e. ``f`` is only called on
``u in [e^-50, e^20]``; give ``g`` when ``f`` is inaccurate there (cancellation, ``log`` of tiny ``u``).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from dphrl.losses import aggregate, compute_dtype, masked_mean
from dphrl.registry import Registry

__all__ = [
    "DIVERGENCES",
    "GUARD_HIGH",
    "GUARD_LOW",
    "Divergence",
    "divergence_loss",
    "generator",
    "list_divergences",
    "per_token_loss",
    "register_divergence",
]

LOG2 = math.log(2.0)
GUARD_LOW = -50.0
GUARD_HIGH = 20.0


@dataclass(frozen=True)
class Divergence:
    """A registered f-divergence: generator ``f(u, **params)`` and optional log-space ``g(d, **params)``."""

    generator: Callable[..., Tensor]
    log_space: Callable[..., Tensor] | None = None


# ----------------------------------------------------------------------------- generators f(u)


def _f_forward_kl(u: Tensor) -> Tensor:
    return u - 1.0 - torch.log(u)


def _f_reverse_kl(u: Tensor) -> Tensor:
    return torch.xlogy(u, u) - u + 1.0


def _f_js(u: Tensor) -> Tensor:
    return torch.xlogy(u, u) - (u + 1.0) * torch.log((u + 1.0) / 2.0)


def _f_alpha(u: Tensor, alpha: float = 0.5) -> Tensor:
    alpha = _check_alpha(alpha)
    if alpha == 0.0:
        return _f_reverse_kl(u)
    if alpha == 1.0:
        return _f_forward_kl(u)
    return (u.pow(1.0 - alpha) - (1.0 - alpha) * u - alpha) / (alpha * (alpha - 1.0))


def _f_total_variation(u: Tensor) -> Tensor:
    return (u - 1.0).abs() / 2.0


def _f_hellinger(u: Tensor) -> Tensor:
    return (u.sqrt() - 1.0).square()


def _f_chi2(u: Tensor) -> Tensor:
    return (u - 1.0).square()


# ----------------------------------------------------------------------------- log-space forms g(d) = f(exp(d))


def _expm1(x: Tensor) -> Tensor:
    """``expm1(x)`` whose gradient is computed as ``exp(x)`` (torch's backward rounds to 0 for x < ~-17)."""
    e = torch.exp(x)  # (...)
    return torch.expm1(x).detach() + (e - e.detach())  # (...) value expm1(x), gradient exp(x)


def _g_forward_kl(d: Tensor) -> Tensor:
    """u - 1 - log u = expm1(d) - d (no cancellation near d = 0, no overflow for d << 0)."""
    return _expm1(d) - d


def _g_reverse_kl(d: Tensor) -> Tensor:
    """u log u - u + 1 = exp(d) d - expm1(d)."""
    return torch.exp(d) * d - _expm1(d)


def _g_js(d: Tensor) -> Tensor:
    """u log u - (u+1) log((u+1)/2) = u (log 2 - softplus(-d)) + (log 2 - softplus(d)); no large cancellations."""
    return torch.exp(d) * (LOG2 - F.softplus(-d)) + (LOG2 - F.softplus(d))


def _g_alpha(d: Tensor, alpha: float = 0.5) -> Tensor:
    """(expm1((1-a) d) - (1-a) expm1(d)) / (a (a-1)); the numerator equals u^(1-a) - (1-a) u - a."""
    alpha = _check_alpha(alpha)
    if alpha == 0.0:
        return _g_reverse_kl(d)
    if alpha == 1.0:
        return _g_forward_kl(d)
    num = _expm1((1.0 - alpha) * d) - (1.0 - alpha) * _expm1(d)
    return num / (alpha * (alpha - 1.0))


def _g_total_variation(d: Tensor) -> Tensor:
    return _expm1(d).abs() / 2.0


def _g_hellinger(d: Tensor) -> Tensor:
    """(sqrt(u) - 1)^2 = expm1(d/2)^2."""
    return _expm1(0.5 * d).square()


def _g_chi2(d: Tensor) -> Tensor:
    return _expm1(d).square()


def _check_alpha(alpha: float) -> float:
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    return alpha


def _as_divergence(obj: object) -> Divergence:
    """What ``divergence: package.module:attr`` may name: a :class:`Divergence` or a generator ``f(u)``."""
    if isinstance(obj, Divergence):
        return obj
    if callable(obj):
        return Divergence(obj)
    raise ValueError(f"a divergence must be a Divergence or a generator function f(u), got {type(obj).__name__}")


#: Registered f-divergences (config key ``divergence``); ``package.module:f`` names a user generator.
DIVERGENCES: Registry[Divergence] = Registry("divergence", config_key="divergence", adapt=_as_divergence)
for _name, _f, _g in (
    ("forward_kl", _f_forward_kl, _g_forward_kl),
    ("reverse_kl", _f_reverse_kl, _g_reverse_kl),
    ("js", _f_js, _g_js),
    ("alpha", _f_alpha, _g_alpha),
    ("total_variation", _f_total_variation, _g_total_variation),
    ("hellinger", _f_hellinger, _g_hellinger),
    ("chi2", _f_chi2, _g_chi2),
):
    DIVERGENCES.register(_name, Divergence(_f, _g))


# ----------------------------------------------------------------------------- registry API


def list_divergences() -> list[str]:
    """Registered names accepted by ``per_token_loss`` / ``divergence_loss`` (config values)."""
    return DIVERGENCES.names()


def register_divergence(
    name: str,
    f: Callable[..., Tensor] | None = None,
    *,
    log_space: Callable[..., Tensor] | None = None,
    overwrite: bool = False,
) -> Any:
    """Register a user f-divergence: generator ``f(u, **params)`` and optional log-space ``g(d, **params)``.

    ``g(d)`` must equal ``f(exp(d))``; give it when ``f`` is inaccurate for tiny or huge ``u``. Without it,
    ``per_token_loss`` uses ``f(exp(d))``. Either way the linearized-tail guard of the module docstring
    applies. Returns ``f``; without ``f``, a decorator (``@register_divergence("name")``). Without
    registering, ``divergence: package.module:f`` in a config uses ``f`` directly.
    """

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if not callable(fn) or (log_space is not None and not callable(log_space)):
            raise ValueError("f and log_space must be callables on tensors")
        DIVERGENCES.register(name, Divergence(fn, log_space), overwrite=overwrite)
        return fn

    return deco(f) if f is not None else deco


def _get(name: str) -> Divergence:
    return DIVERGENCES.get(name)


def _check_params(name: str, fn: Callable[..., Tensor], params: dict) -> None:
    """Reject parameters the divergence does not take (a config typo should fail loudly)."""
    if not params:
        return
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
        return
    accepted = list(sig.parameters)[1:]
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise ValueError(f"divergence {name!r} takes parameters {accepted}, got unknown {unknown}")


def generator(name: str, **params) -> Callable[[Tensor], Tensor]:
    """The generator ``f(u)`` of divergence ``name`` with its parameters bound (textbook u-space form)."""
    div = _get(name)
    _check_params(name, div.generator, params)
    return lambda u: div.generator(u, **params)


def _log_space_fn(div: Divergence) -> Callable[..., Tensor]:
    """``g(d, **params) = f(exp(d), **params)``: the registered log-space form, else built from ``f``."""
    if div.log_space is not None:
        return div.log_space
    return lambda d, **params: div.generator(torch.exp(d), **params)


def _boundary_slopes(name: str, g: Callable[..., Tensor], params: dict) -> tuple[float, float]:
    """``g'(GUARD_LOW)``, ``g'(GUARD_HIGH)`` by autograd in float64 (also under no_grad / inference_mode)."""
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.tensor([GUARD_LOW, GUARD_HIGH], dtype=torch.float64, requires_grad=True)  # (2,)
        (grad,) = torch.autograd.grad(g(x, **params).sum(), x)  # (2,)
    lo, hi = grad.tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(
            f"divergence {name!r} with {params}: slope not finite at the guard boundaries "
            f"d={GUARD_LOW}/{GUARD_HIGH} (parameters out of range?)"
        )
    return lo, hi


def _per_token(name: str, logp: Tensor, ref_logp: Tensor, params: dict) -> Tensor:
    """Per-token loss in the compute dtype (float32, or float64 for float64 inputs), with the tail guard."""
    div = _get(name)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp and ref_logp: shapes differ, {tuple(logp.shape)} vs {tuple(ref_logp.shape)}")
    _check_params(name, div.log_space or div.generator, params)
    g = _log_space_fn(div)
    slope_lo, slope_hi = _boundary_slopes(name, g, params)
    cdt = compute_dtype(logp)
    d = logp.to(cdt) - ref_logp.detach().to(cdt)  # (B, T) log-ratio; ref_logp is data
    dc = d.clamp(GUARD_LOW, GUARD_HIGH)  # (B, T) exact region
    # tangent-line continuation outside [GUARD_LOW, GUARD_HIGH]
    tail = slope_hi * torch.relu(d - GUARD_HIGH) - slope_lo * torch.relu(GUARD_LOW - d)  # (B, T)
    return g(dc, **params) + tail  # (B, T)


def per_token_loss(name: str, logp: Tensor, ref_logp: Tensor, **params) -> Tensor:
    """Elementwise ``f(pi_theta/pi_ref)`` on tokens sampled from pi_ref; E_{pi_ref} of it is D_f.

    Same shape and dtype as ``logp``; gradients flow into ``logp`` only. See the module docstring for
    the numerical guard.
    """
    return _per_token(name, logp, ref_logp, params).to(logp.dtype)


def divergence_loss(
    name: str,
    logp: Tensor,
    ref_logp: Tensor,
    mask: Tensor,
    *,
    agg: str = "token-mean",
    num_tokens: float | int | Tensor | None = None,
    num_seqs: float | int | Tensor | None = None,
    max_len: float | int | None = None,
    **params,
) -> tuple[Tensor, dict[str, float]]:
    """Aggregated divergence loss on reference samples, plus metrics.

    ``num_tokens`` / ``num_seqs`` / ``max_len`` are passed to ``losses.aggregate`` (global counts for
    micro-batching); other keyword arguments are divergence parameters (e.g. ``alpha``). Metrics over
    real tokens: ``div/value`` (mean per-token value), ``div/log_ratio_mean``, ``div/log_ratio_abs_max``.
    """
    per_tok = _per_token(name, logp, ref_logp, params)  # (B, T)
    loss = aggregate(per_tok, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    with torch.no_grad():
        m = mask != 0  # (B, T)
        d = logp.detach().to(per_tok.dtype) - ref_logp.detach().to(per_tok.dtype)  # (B, T)
        metrics = {
            "div/value": masked_mean(per_tok.detach(), m).item(),
            "div/log_ratio_mean": masked_mean(d, m).item(),
            "div/log_ratio_abs_max": d[m].abs().max().item() if m.any() else 0.0,
        }
    return loss, metrics
