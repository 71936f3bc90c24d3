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
(``u > 4.85e8``) only a broken policy goes; there the loss is the C^1 continuation, not the exact ``f``. For
``d`` in ``[-50, 50]`` values and gradients are finite in float32 and bf16, and gradients are non-zero
wherever they are mathematically non-zero. (``expm1`` is differentiated as ``exp``: torch's own ``expm1``
backward rounds to 0 below ``d ~ -17``.)

Pull on a dropped token. The loss gradient w.r.t. the log-ratio is ``g'(d) = u f'(u)``: forward-KL
``u - 1`` (-> -1 as ``u -> 0``), JS ``u log(2u / (1 + u))`` (-> 0 like ``u d``). At ``d = -11``
(the policy gives a reference token e^-11 = 1.7e-5 of its reference probability) forward-KL pulls with
-0.99998 and JS with -1.72e-4, 5800x less: under JS a token the policy has dropped gets almost no pull
back (JS is bounded, so it stops caring), under forward-KL it keeps a pull of about 1 per sample
(``tests/test_kl_gradients.py``). This is a property of JS itself, not of sampling: the exact
(bucket) form below has the same expected gradient.

Full-distribution rehearsal (``rehearsal_form: topk``; beyond the paper). A sampled term sees one
token per position. Storing, per reference position, the reference's top-k ids and log-probs plus
the log of the remaining mass (:func:`reference_topk`), the policy's log-probs of the same K + 1
buckets (:func:`topk_buckets`) give the exact per-position divergence of the coarsened next-token
distributions, ``sum_b pi_ref(b) f(pi_theta(b) / pi_ref(b))`` (:func:`bucket_divergence`,
:func:`full_distribution_loss`). With K = V, summed over a sequence y ~ pi_ref, its expectation and
gradient equal those of the sampled form (both: the sequence-level divergence for forward-KL), it
is a conditional expectation of the sampled term at each position, so its per-position variance
is 0, and on the models we tried the per-sequence variance is lower (not a theorem: noise at an
early position can cancel noise at a later one, see ``tests/test_full_distribution.py``). With
K < V it is <= the full divergence (data processing) and never sees the tail's internal shape (the
benchmark's toy: top-16 holding 98% of the mass still misses 18% of the KL). The hybrid
:func:`topk_sampled_tail_divergence` adds to the bucket form a correction from the sampled token when
it falls in the tail, ``f(u_y) - f(u_tail)``: unbiased for the full divergence for any K, its noise
only the spread of f(u) inside the tail. ``REHEARSAL_FORMS`` maps ``sampled`` / ``topk`` /
``topk_sampled_tail`` to the loss; all take any registered divergence.

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
    "REHEARSAL_FORMS",
    "Divergence",
    "RehearsalForm",
    "bucket_divergence",
    "divergence_loss",
    "full_distribution_loss",
    "generator",
    "per_token_loss",
    "reference_topk",
    "register_divergence",
    "topk_buckets",
    "topk_sampled_tail_divergence",
    "topk_sampled_tail_loss",
]

LOG2 = math.log(2.0)
GUARD_LOW = -50.0
GUARD_HIGH = 20.0


@dataclass(frozen=True)
class Divergence:
    """A registered f-divergence: generator ``f(u, **params)`` and optional log-space ``g(d, **params)``."""

    generator: Callable[..., Tensor]
    log_space: Callable[..., Tensor] | None = None
    #: ``bounds(**params) -> (lo, hi)``: the exact region of the guard when it must be narrower than
    #: [GUARD_LOW, GUARD_HIGH] (e.g. alpha: exponents of (1 - alpha) d stay below EXP_ARG_MAX)
    bounds: Callable[..., tuple[float, float]] | None = None


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


# --------------------------------------------------------------------------- log-space forms g(d) = f(exp(d))


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
    """u log u - (u+1) log((u+1)/2) = u (log 2 - softplus(-d)) + (log 2 - softplus(d));
    no large cancellations."""
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


#: Largest argument the exact region of the guard lets any exponential see (float32 overflows at 88.7).
EXP_ARG_MAX = 60.0


def _alpha_bounds(alpha: float = 0.5) -> tuple[float, float]:
    """Exact region for alpha: the exponents d and (1 - alpha) d stay within EXP_ARG_MAX, so any finite
    alpha is finite everywhere (before: NaN for alpha >~ 2.8 at d = -50, or alpha <~ -3.4 at d = 20)."""
    a = _check_alpha(alpha)
    lo = GUARD_LOW if a <= 1.0 else max(GUARD_LOW, -EXP_ARG_MAX / (a - 1.0))
    hi = GUARD_HIGH if a >= 0.0 else min(GUARD_HIGH, EXP_ARG_MAX / (1.0 - a))
    return lo, hi


def _as_divergence(obj: object) -> Divergence:
    """What ``divergence: package.module:attr`` may name: a :class:`Divergence` or a generator ``f(u)``."""
    if isinstance(obj, Divergence):
        return obj
    if callable(obj):
        return Divergence(obj)
    raise ValueError(
        f"a divergence must be a Divergence or a generator function f(u), got {type(obj).__name__}"
    )


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
    DIVERGENCES.register(_name, Divergence(_f, _g, _alpha_bounds if _name == "alpha" else None))


# ----------------------------------------------------------------------------- registry API


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


def _guard_bounds(div: Divergence, params: dict) -> tuple[float, float]:
    return div.bounds(**params) if div.bounds is not None else (GUARD_LOW, GUARD_HIGH)


def _boundary_slopes(name: str, g: Callable[..., Tensor], params: dict,
                     bounds: tuple[float, float] = (GUARD_LOW, GUARD_HIGH)) -> tuple[float, float]:
    """``g'`` at the two guard boundaries by autograd in float64 (also under no_grad / inference_mode)."""
    with torch.inference_mode(False), torch.enable_grad():
        x = torch.tensor(list(bounds), dtype=torch.float64, requires_grad=True)  # (2,)
        (grad,) = torch.autograd.grad(g(x, **params).sum(), x)  # (2,)
    lo, hi = grad.tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(
            f"divergence {name!r} with {params}: slope not finite at the guard boundaries "
            f"d={bounds[0]}/{bounds[1]} (parameters out of range?)"
        )
    return lo, hi


def _per_token(name: str, logp: Tensor, ref_logp: Tensor, params: dict) -> Tensor:
    """Per-token loss in the compute dtype (float32, or float64 for float64 inputs), with the tail guard."""
    div = _get(name)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"logp and ref_logp: shapes differ, {tuple(logp.shape)} vs {tuple(ref_logp.shape)}")
    _check_params(name, div.log_space or div.generator, params)
    g = _log_space_fn(div)
    lo, hi = _guard_bounds(div, params)
    slope_lo, slope_hi = _boundary_slopes(name, g, params, (lo, hi))
    cdt = compute_dtype(logp)
    d = logp.to(cdt) - ref_logp.detach().to(cdt)  # (B, T) log-ratio; ref_logp is data
    dc = d.clamp(lo, hi)  # (B, T) exact region
    # tangent-line continuation outside [lo, hi]
    tail = slope_hi * torch.relu(d - hi) - slope_lo * torch.relu(lo - d)  # (B, T)
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


# ----------------------------------------------------------------------------- full-distribution rehearsal


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature}")
    return temperature


def _logsumexp_excluding(z: Tensor, ids: Tensor) -> Tensor:
    """``log sum_{j not in ids} exp(z_j)`` over the last dim, (..., V), (..., K) -> (...).

    A masked logsumexp (no ``log1p(-sum)``, which cancels when the top-k hold almost all the mass).
    ``-inf`` with gradient exactly 0, never NaN, where nothing is left (torch.logsumexp's backward is
    NaN on an all ``-inf`` row).
    """
    masked = z.scatter(-1, ids, float("-inf"))  # (B, T, V) top-k entries removed
    with torch.no_grad():
        m = masked.amax(-1, keepdim=True)  # (B, T, 1)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # (B, T, 1) 0 on empty rows
    # in place: scatter's backward does not need its output, exp_'s saves its own; one (B, T, V) temporary
    s = masked.sub_(m).exp_().sum(-1)  # (B, T) exp(-inf) = 0 with gradient 0
    has = s > 0  # (B, T)
    log_s = torch.log(torch.where(has, s, torch.ones_like(s)))  # (B, T) log(1) on empty rows
    return torch.where(has, log_s + m.squeeze(-1), torch.full_like(s, float("-inf")))  # (B, T)


def topk_buckets(logits: Tensor, ids: Tensor, *, temperature: float = 1.0) -> Tensor:
    """Log-probs of the buckets ``ids[..., 0], ..., ids[..., K-1], tail``:
    (B, T, V), (B, T, K) -> (B, T, K+1).

    ``logits`` are the policy's logits at the response positions, sampled at ``temperature``
    (log-probs also work: ``log_softmax`` is idempotent, use temperature 1 for them); ``ids`` are the
    reference's top-k ids of each position (from :func:`reference_topk`), distinct per position (the
    normaliser is the sum of the K + 1 parts; repeated ids, e.g. a store's padding, count twice).
    The last bucket is the log of the remaining mass, a masked logsumexp over the non-top-k entries
    (exact even when the tail holds 1e-30 of the mass; ``-inf`` with zero gradient when the top-k
    cover the whole vocabulary). Gradients flow into ``logits``. Computed in float32 (float64 stays
    float64); needs one extra (B, T, V) temporary for the mask.
    """
    if ids.shape[:-1] != logits.shape[:-1]:
        raise ValueError(
            f"logits and ids: leading shapes differ, {tuple(logits.shape)} vs {tuple(ids.shape)}"
        )
    temperature = _check_temperature(temperature)
    z = logits.to(compute_dtype(logits))  # (B, T, V)
    if temperature != 1.0:
        z = z / temperature  # (B, T, V)
    ids = ids.long()  # (B, T, K)
    top = z.gather(-1, ids)  # (B, T, K)
    tail = _logsumexp_excluding(z, ids)  # (B, T)
    # the normaliser from the two disjoint parts: no second pass over V, no cancellation
    lse = torch.logaddexp(top.logsumexp(-1), tail)  # (B, T)
    return torch.cat([top, tail.unsqueeze(-1)], -1) - lse.unsqueeze(-1)  # (B, T, K+1)


def reference_topk(logits: Tensor, k: int, *, temperature: float = 1.0) -> tuple[Tensor, Tensor]:
    """What to store per reference position at presample time: ``(ids (B, T, K), ref_logp (B, T, K+1))``.

    ``logits`` (B, T, V) are the reference's logits (or log-probs, temperature 1) at the positions of a
    response sampled at ``temperature``; ``ids`` are its ``K = min(k, V)`` most likely tokens (long,
    sorted by probability; cast to int32 to store), ``ref_logp`` their log-probs plus the tail bucket
    (``-inf`` when ``K = V``), exactly as :func:`topk_buckets` computes the policy's side. Data: no
    gradient. Store size per token: ``4 K + 4 (K + 1)`` bytes in int32/float32 (132 for K = 16).
    """
    if int(k) < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    with torch.no_grad():
        z = logits.detach().to(compute_dtype(logits)) / _check_temperature(temperature)  # (B, T, V)
        ids = z.topk(min(int(k), z.shape[-1]), dim=-1).indices  # (B, T, K)
        return ids, topk_buckets(z, ids)  # (B, T, K), (B, T, K+1)


def _bucket_terms(name: str, logp_b: Tensor, ref_logp_b: Tensor, params: dict) -> Tensor:
    """``pi_ref(b) g(log pi_theta(b) - log pi_ref(b))`` per bucket, (B, T, K+1), compute dtype;
    0 where pi_ref(b) = 0."""
    if logp_b.shape != ref_logp_b.shape:
        raise ValueError(
            f"logp_b and ref_logp_b: shapes differ, {tuple(logp_b.shape)} vs {tuple(ref_logp_b.shape)}"
        )
    cdt = compute_dtype(logp_b)
    ref = ref_logp_b.detach().to(cdt)  # (B, T, K+1) data
    valid = ref > float("-inf")  # (B, T, K+1) buckets with pi_ref(b) > 0
    zero = torch.zeros((), dtype=cdt, device=ref.device)
    # where() before the loss: empty buckets see d = 0, so neither value nor gradient can be NaN there
    lp = torch.where(valid, logp_b.to(cdt), zero)  # (B, T, K+1)
    r = torch.where(valid, ref, zero)  # (B, T, K+1)
    per = _per_token(name, lp, r, params)  # (B, T, K+1) g(d) with the linear-tail guard
    return torch.where(valid, torch.exp(r) * per, zero)  # (B, T, K+1)


def _bucket_values(name: str, logp_b: Tensor, ref_logp_b: Tensor, params: dict) -> Tensor:
    """``sum_b pi_ref(b) g(log pi_theta(b) - log pi_ref(b))`` per position, (B, T, K+1) ->
    (B, T), compute dtype."""
    return _bucket_terms(name, logp_b, ref_logp_b, params).sum(-1)  # (B, T)


def _sampled_tail_values(
    name: str,
    logp_b: Tensor,
    ref_logp_b: Tensor,
    tok_logp: Tensor,
    tok_ref_logp: Tensor,
    tok_in_topk: Tensor,
    params: dict,
) -> Tensor:
    """Bucket form + the sampled token's tail correction ``[y in tail] (g(d_y) - g(d_tail))``, (B, T)."""
    if tok_logp.shape != logp_b.shape[:-1] or tok_in_topk.shape != tok_logp.shape:
        raise ValueError(f"token inputs must be {tuple(logp_b.shape[:-1])}, got {tuple(tok_logp.shape)}, "
                         f"{tuple(tok_in_topk.shape)}")
    buckets = _bucket_values(name, logp_b, ref_logp_b, params)  # (B, T)
    cdt = buckets.dtype
    ref_tail = ref_logp_b[..., -1].detach().to(cdt)  # (B, T)
    has_tail = ref_tail > float("-inf")  # (B, T)
    zero = torch.zeros((), dtype=cdt, device=buckets.device)
    g_tail = _per_token(name, torch.where(has_tail, logp_b[..., -1].to(cdt), zero),
                        torch.where(has_tail, ref_tail, zero), params)  # (B, T) g(d) of the tail bucket
    g_tok = _per_token(name, tok_logp, tok_ref_logp, params)  # (B, T) g(d) of the sampled token
    in_tail = ~tok_in_topk.bool() & has_tail  # (B, T)
    return buckets + torch.where(in_tail, g_tok.to(cdt) - g_tail, zero)  # (B, T)


def bucket_divergence(name: str, logp_b: Tensor, ref_logp_b: Tensor, **params) -> Tensor:
    """Exact per-position ``D_f(pi_ref || pi_theta)`` over buckets: (B, T, K+1) x2 -> (B, T).

    ``sum_b pi_ref(b) f(pi_theta(b) / pi_ref(b))`` with ``f`` the registered divergence ``name``, in
    its log-space form with the same guard as :func:`per_token_loss`. Buckets with ``pi_ref(b) = 0``
    (``ref_logp_b = -inf``) contribute exactly 0, with zero gradient. With ``K = V`` this is the
    divergence of the two next-token distributions (forward-KL: KL(pi_ref || pi_theta); js:
    2 JS); with ``K < V`` that of the coarsened distributions, which is <= it (data processing).
    Gradients flow into ``logp_b`` only; same dtype as ``logp_b``.
    """
    return _bucket_values(name, logp_b, ref_logp_b, params).to(logp_b.dtype)


def full_distribution_loss(
    name: str,
    logp_b: Tensor,
    ref_logp_b: Tensor,
    mask: Tensor,
    *,
    agg: str = "token-mean",
    num_tokens: float | int | Tensor | None = None,
    num_seqs: float | int | Tensor | None = None,
    max_len: float | int | None = None,
    **params,
) -> tuple[Tensor, dict[str, float]]:
    """Rehearsal loss over top-k + tail buckets: ``agg`` of :func:`bucket_divergence` over real positions.

    Same signature and aggregation convention as :func:`divergence_loss` (pass the whole batch's
    ``num_tokens`` when micro-batching: the micro-batch losses then add up to the full-batch loss), with
    bucket log-probs (B, T, K+1) instead of token log-probs (B, T). Metrics over real positions:
    ``div/value`` (mean per-position divergence), ``div/ref_tail_mass``, ``div/policy_tail_mass``
    (mean tail probability) and ``div/log_ratio_abs_max`` (over buckets with pi_ref > 0).
    """
    _check_mask(logp_b, mask)
    per_pos = _bucket_values(name, logp_b, ref_logp_b, params)  # (B, T)
    loss = aggregate(per_pos, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    return loss, _bucket_metrics(per_pos, logp_b, ref_logp_b, mask)


def topk_sampled_tail_divergence(
    name: str,
    logp_b: Tensor,
    ref_logp_b: Tensor,
    tok_logp: Tensor,
    tok_ref_logp: Tensor,
    tok_in_topk: Tensor,
    **params,
) -> Tensor:
    """Unbiased for any K: the bucket form plus a tail correction from the sampled token, (B, T).

    ``bucket_divergence + [y not in top-k] (f(u_y) - f(u_tail))`` with ``y ~ pi_ref`` the stored token,
    ``tok_logp``/``tok_ref_logp`` (B, T) its log-probs (as for the ``sampled`` form), ``tok_in_topk``
    (B, T) bool ``(ids == tokens.unsqueeze(-1)).any(-1)`` and ``u_tail = pi_theta(tail) / pi_ref(tail)``.
    Over y ~ pi_ref the correction averages to ``sum_{y in tail} pi_ref(y) f(u_y) - pi_ref(tail) f(u_tail)``
    (the data-processing gap), so the expectation is the FULL divergence of the next-token
    distributions; the noise is only the spread of ``f(u_y)`` around ``f(u_tail)`` inside the tail.
    (Adding ``[y in tail] f(u_y)`` to the top-k buckets without the tail bucket is also unbiased but
    was noisier than the sampled form itself on small test models.) Gradients flow into ``logp_b`` and
    ``tok_logp``.
    """
    return _sampled_tail_values(name, logp_b, ref_logp_b, tok_logp, tok_ref_logp, tok_in_topk, params).to(
        logp_b.dtype
    )


def topk_sampled_tail_loss(
    name: str,
    logp_b: Tensor,
    ref_logp_b: Tensor,
    mask: Tensor,
    *,
    tok_logp: Tensor,
    tok_ref_logp: Tensor,
    tok_in_topk: Tensor,
    agg: str = "token-mean",
    num_tokens: float | int | Tensor | None = None,
    num_seqs: float | int | Tensor | None = None,
    max_len: float | int | None = None,
    **params,
) -> tuple[Tensor, dict[str, float]]:
    """Rehearsal loss of :func:`topk_sampled_tail_divergence`, aggregated as :func:`full_distribution_loss`.

    Metrics: those of :func:`full_distribution_loss` plus ``div/tok_in_topk_frac``.
    """
    _check_mask(logp_b, mask)
    # (B, T)
    per_pos = _sampled_tail_values(name, logp_b, ref_logp_b, tok_logp, tok_ref_logp, tok_in_topk, params)
    loss = aggregate(per_pos, mask, agg, num_tokens=num_tokens, num_seqs=num_seqs, max_len=max_len)
    metrics = _bucket_metrics(per_pos, logp_b, ref_logp_b, mask)
    metrics["div/tok_in_topk_frac"] = masked_mean(tok_in_topk.to(per_pos.dtype), mask != 0).item()
    return loss, metrics


def _check_mask(logp_b: Tensor, mask: Tensor) -> None:
    if logp_b.shape[:-1] != mask.shape:
        raise ValueError(
            f"logp_b and mask: shapes differ, {tuple(logp_b.shape)} vs {tuple(mask.shape)} + (K+1,)"
        )


def _bucket_metrics(per_pos: Tensor, logp_b: Tensor, ref_logp_b: Tensor, mask: Tensor) -> dict[str, float]:
    with torch.no_grad():
        m = mask != 0  # (B, T)
        lp = logp_b.detach().to(per_pos.dtype)  # (B, T, K+1)
        ref = ref_logp_b.detach().to(per_pos.dtype)  # (B, T, K+1)
        d = torch.where(ref > float("-inf"), lp - ref, torch.zeros_like(lp)).abs().amax(-1)  # (B, T)
        return {
            "div/value": masked_mean(per_pos.detach(), m).item(),
            "div/ref_tail_mass": masked_mean(ref[..., -1].exp(), m).item(),
            "div/policy_tail_mass": masked_mean(lp[..., -1].exp(), m).item(),
            "div/log_ratio_abs_max": d[m].max().item() if m.any() else 0.0,
        }


@dataclass(frozen=True)
class RehearsalForm:
    """How the rehearsal term sees the reference (config key ``rehearsal_form``).

    ``loss(name, logp, ref_logp, mask, *, agg, num_tokens, num_seqs, max_len, **params) -> (loss, metrics)``.
    ``topk`` False: ``logp``/``ref_logp`` are the sampled tokens' log-probs (B, T) (the paper's form);
    True: bucket log-probs (B, T, K+1) from :func:`topk_buckets` / stored :func:`reference_topk`.
    ``tokens`` True: the loss also takes ``tok_logp``, ``tok_ref_logp`` and ``tok_in_topk`` (B, T).
    """

    loss: Callable[..., tuple[Tensor, dict[str, float]]]
    topk: bool
    tokens: bool = False


def _as_rehearsal_form(obj: object) -> RehearsalForm:
    if isinstance(obj, RehearsalForm):
        return obj
    raise ValueError(f"a rehearsal form must be a dphrl.divergences.RehearsalForm, got {type(obj).__name__}")


#: Rehearsal forms (config key ``rehearsal_form``): ``sampled`` (one token per position, the paper's),
#: ``topk`` (exact over the reference's top-k + tail buckets: the coarsened divergence) and
#: ``topk_sampled_tail`` (the buckets + a tail correction from the sampled token: unbiased for the
#: full divergence). Any registered divergence works in all three.
REHEARSAL_FORMS: Registry[RehearsalForm] = Registry(
    "rehearsal form", config_key="rehearsal_form", adapt=_as_rehearsal_form
)
REHEARSAL_FORMS.register("sampled", RehearsalForm(divergence_loss, topk=False))
REHEARSAL_FORMS.register("topk", RehearsalForm(full_distribution_loss, topk=True))
REHEARSAL_FORMS.register("topk_sampled_tail", RehearsalForm(topk_sampled_tail_loss, topk=True, tokens=True))
