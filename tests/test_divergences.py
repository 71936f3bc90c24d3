"""f-divergences: exact expectations by enumeration, sequence-level KL identity, limits, numerical guard."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dphrl import divergences as D

F64 = torch.float64

# (name, params) for every built-in, alpha at the values the paper reports
CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("js", {}),
    ("alpha", {"alpha": 0.2}),
    ("alpha", {"alpha": 0.5}),
    ("alpha", {"alpha": 0.8}),
    ("total_variation", {}),
    ("hellinger", {}),
    ("chi2", {}),
]
IDS = [n + "".join(f"-{k}{v}" for k, v in p.items()) for n, p in CASES]


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * (a / b).log()).sum()


def closed_form(name: str, p: torch.Tensor, q: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Textbook divergences with p = reference, q = policy (independent of the generator code)."""
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "js":
        m = (p + q) / 2
        return 2 * (0.5 * _kl(p, m) + 0.5 * _kl(q, m))
    if name == "alpha":  # Amari alpha-divergence in this parametrisation
        return (1 - (p**alpha * q ** (1 - alpha)).sum()) / (alpha * (1 - alpha))
    if name == "total_variation":
        return 0.5 * (p - q).abs().sum()
    if name == "hellinger":
        return ((q.sqrt() - p.sqrt()) ** 2).sum()
    if name == "chi2":
        return ((q - p) ** 2 / p).sum()
    raise AssertionError(name)


def _dists(seed: int, k: int = 5):
    g = torch.Generator().manual_seed(seed)
    ref_logits = torch.randn(k, generator=g, dtype=F64)
    pol_logits = torch.randn(k, generator=g, dtype=F64).requires_grad_()
    return ref_logits, pol_logits


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expectation_under_ref_equals_closed_form_value_and_gradient(name, params, seed):
    ref_logits, pol_logits = _dists(seed)
    log_p = ref_logits.log_softmax(-1)  # reference
    log_q = pol_logits.log_softmax(-1)  # policy
    p, q = log_p.exp(), log_q.exp()

    enumerated = (p * D.per_token_loss(name, log_q, log_p, **params)).sum()
    exact = closed_form(name, p, q, **params)
    assert enumerated.item() == pytest.approx(exact.item(), rel=1e-10, abs=1e-12)

    (g_enum,) = torch.autograd.grad(enumerated, pol_logits, retain_graph=True)
    (g_exact,) = torch.autograd.grad(exact, pol_logits)
    torch.testing.assert_close(g_enum, g_exact, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_generator_matches_per_token_loss(name, params):
    d = torch.linspace(-8, 8, 33, dtype=F64)
    f = D.generator(name, **params)
    torch.testing.assert_close(D.per_token_loss(name, d, torch.zeros_like(d), **params), f(d.exp()))
    assert f(torch.ones(1, dtype=F64)).item() == pytest.approx(0.0, abs=1e-15)  # f(1) = 0


def test_sequence_level_forward_kl_identity():
    """Sum over tokens of the forward-KL per-token loss, averaged over pi_ref, is the sequence-level KL."""
    vocab, length = 3, 3
    g = torch.Generator().manual_seed(0)
    prefixes = [p for t in range(length) for p in itertools.product(range(vocab), repeat=t)]
    index = {p: i for i, p in enumerate(prefixes)}  # 1 + 3 + 9 = 13 conditional tables
    ref_table = torch.randn(len(prefixes), vocab, generator=g, dtype=F64).log_softmax(-1)
    theta = torch.randn(len(prefixes), vocab, generator=g, dtype=F64).requires_grad_()
    pol_table = theta.log_softmax(-1)

    seqs = list(itertools.product(range(vocab), repeat=length))  # all 27 sequences
    rows = torch.tensor([[index[s[:t]] for t in range(length)] for s in seqs])  # (27, 3)
    toks = torch.tensor(seqs)  # (27, 3)
    ref_lp = ref_table[rows, toks]  # (27, 3) per-token log pi_ref
    pol_lp = pol_table[rows, toks]  # (27, 3) per-token log pi_theta
    ref_seq = ref_lp.sum(-1).exp()  # (27,)
    assert ref_seq.sum().item() == pytest.approx(1.0)

    estimate = (ref_seq * D.per_token_loss("forward_kl", pol_lp, ref_lp).sum(-1)).sum()
    exact = (ref_seq * (ref_lp.sum(-1) - pol_lp.sum(-1))).sum()  # KL(pi_ref || pi_theta) over sequences
    assert estimate.item() == pytest.approx(exact.item(), rel=1e-10)
    (g_est,) = torch.autograd.grad(estimate, theta, retain_graph=True)
    (g_exact,) = torch.autograd.grad(exact, theta)
    torch.testing.assert_close(g_est, g_exact, rtol=1e-9, atol=1e-12)


def test_alpha_limits():
    d = torch.linspace(-5, 5, 41, dtype=F64)
    ref = torch.zeros_like(d)
    fwd = D.per_token_loss("forward_kl", d, ref)
    rev = D.per_token_loss("reverse_kl", d, ref)
    torch.testing.assert_close(D.per_token_loss("alpha", d, ref, alpha=0.999), fwd, rtol=5e-2, atol=2e-2)
    torch.testing.assert_close(D.per_token_loss("alpha", d, ref, alpha=1e-3), rev, rtol=5e-2, atol=2e-2)
    # closer alpha, closer value: the limit, not a coincidence
    err_far = (D.per_token_loss("alpha", d, ref, alpha=0.99) - fwd).abs().max()
    err_near = (D.per_token_loss("alpha", d, ref, alpha=0.9999) - fwd).abs().max()
    assert err_near < err_far / 50
    # exactly 0 / 1 delegate
    torch.testing.assert_close(D.per_token_loss("alpha", d, ref, alpha=1.0), fwd)
    torch.testing.assert_close(D.per_token_loss("alpha", d, ref, alpha=0), rev)
    torch.testing.assert_close(D.generator("alpha", alpha=1.0)(d.exp()), fwd)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_guard_finite_values_and_nonzero_gradients(name, params, dtype):
    d = torch.linspace(-50, 50, 101).to(dtype).requires_grad_()
    out = D.per_token_loss(name, d, torch.zeros_like(d), **params)
    assert out.dtype == dtype and out.shape == d.shape
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert torch.isfinite(d.grad).all()
    nonzero_expected = d.detach() != 0  # every built-in has f'(1) = 0 (TV: not differentiable there)
    assert (d.grad[nonzero_expected] != 0).all()
    assert (out.float() >= 0).all()  # all built-in per-token forms are non-negative


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_guard_no_nan_far_out(name, params, dtype):
    d = torch.tensor([-1000.0, -60.0, 60.0, 1000.0], dtype=dtype, requires_grad=True)
    out = D.per_token_loss(name, d, torch.zeros_like(d), **params)
    out.sum().backward()
    assert not torch.isnan(out).any() and not torch.isnan(d.grad).any()
    assert torch.isfinite(out).all() and torch.isfinite(d.grad).all()


def test_guard_tail_is_tangent_continuation():
    """Above the threshold the loss is linear with the slope it had at the threshold (C^1)."""
    t = D.GUARD_HIGH
    d = torch.tensor([t - 1e-6, t, t + 1.0, t + 30.0], dtype=F64, requires_grad=True)
    out = D.per_token_loss("forward_kl", d, torch.zeros_like(d))
    (grad,) = torch.autograd.grad(out.sum(), d)
    slope = math.expm1(t)  # g'(d) = u - 1
    torch.testing.assert_close(grad[1:], torch.full((3,), slope, dtype=F64))
    assert out[3].item() == pytest.approx(math.expm1(t) - t + 30 * slope, rel=1e-12)
    assert grad[0].item() == pytest.approx(slope, rel=1e-5)


def test_forward_kl_gradient_not_zeroed_at_minus_30():
    for dtype in (torch.float32, torch.bfloat16):
        logp = torch.tensor([-31.0], dtype=dtype, requires_grad=True)
        ref = torch.tensor([-1.0], dtype=dtype)  # d = -30
        D.per_token_loss("forward_kl", logp, ref).sum().backward()
        assert logp.grad.item() == pytest.approx(-1.0, abs=1e-6)  # dL/dd = u - 1 ~ -1


def test_gradient_flows_into_logp_only_and_inputs_untouched():
    logp = torch.randn(2, 4, requires_grad=True)
    ref = torch.randn(2, 4, requires_grad=True)
    logp0, ref0 = logp.detach().clone(), ref.detach().clone()
    for name, params in CASES:
        D.per_token_loss(name, logp, ref, **params).sum().backward()
    assert ref.grad is None
    assert torch.equal(logp.detach(), logp0) and torch.equal(ref.detach(), ref0)


def test_works_under_no_grad_and_inference_mode_and_bf16_loss():
    logp = torch.randn(2, 5).bfloat16()
    ref = torch.randn(2, 5).bfloat16()
    expected = D.per_token_loss("js", logp, ref)
    with torch.no_grad():
        torch.testing.assert_close(D.per_token_loss("js", logp, ref), expected)
    with torch.inference_mode():
        torch.testing.assert_close(D.per_token_loss("js", logp, ref), expected)
    loss, metrics = D.divergence_loss("js", logp, ref, torch.ones(2, 5))
    assert loss.dtype == torch.float32 and all(isinstance(v, float) for v in metrics.values())


def test_divergence_loss_aggregates_and_reports_metrics():
    logp = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]], requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0, 7.0], [-0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.bool)
    loss, metrics = D.divergence_loss("forward_kl", logp, ref, mask)
    d = torch.tensor([0.5, -1.0, 0.0])
    per = d.exp() - 1 - d
    assert loss.item() == pytest.approx(per.mean().item(), rel=1e-6)
    assert metrics["div/value"] == pytest.approx(per.mean().item(), rel=1e-6)
    assert metrics["div/log_ratio_mean"] == pytest.approx(-0.5 / 3, rel=1e-6)
    assert metrics["div/log_ratio_abs_max"] == pytest.approx(1.0)
    loss.backward()
    assert logp.grad[0, 2] == 0 and logp.grad[1, 1] == 0  # padding gets no gradient
    # divergence parameters and aggregation options pass through
    loss_a, _ = D.divergence_loss("alpha", logp, ref, mask, alpha=0.3, agg="seq-mean-token-mean")
    per_a = D.per_token_loss("alpha", logp, ref, alpha=0.3).detach()
    expected = ((per_a[0, 0] + per_a[0, 1]) / 2 + per_a[1, 0]) / 2
    assert loss_a.item() == pytest.approx(expected.item(), rel=1e-6)


def test_register_user_divergence():
    name = "test_user_forward_kl"
    try:
        D.register_divergence(name, lambda u: u - 1 - torch.log(u))
        assert name in D.DIVERGENCES.names()
        d = torch.linspace(-10, 10, 21, dtype=F64, requires_grad=True)
        ref = torch.zeros_like(d)
        user = D.per_token_loss(name, d, ref)
        torch.testing.assert_close(user, D.per_token_loss("forward_kl", d, ref))
        far = torch.tensor([-1000.0, 1000.0], requires_grad=True)  # guarded: finite even for a naive f
        out = D.per_token_loss(name, far, torch.zeros(2))
        out.sum().backward()
        assert torch.isfinite(out).all() and torch.isfinite(far.grad).all()
        with pytest.raises(ValueError, match="already registered"):
            D.register_divergence(name, lambda u: u)
        # with a log-space form and a parameter
        D.register_divergence(
            name,
            lambda u, k=1.0: k * (u - 1) ** 2,
            log_space=lambda d, k=1.0: k * torch.expm1(d) ** 2,
            overwrite=True,
        )
        torch.testing.assert_close(
            D.per_token_loss(name, d, ref, k=2.0), 2 * D.per_token_loss("chi2", d, ref)
        )
        with pytest.raises(ValueError, match="unknown"):
            D.per_token_loss(name, d, ref, kk=2.0)
    finally:
        D.DIVERGENCES.pop(name, None)


def test_unknown_names_and_params():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="forward_kl"):
        D.per_token_loss("kl_forward", x, x)
    with pytest.raises(ValueError, match="js"):
        D.generator("jensen")
    with pytest.raises(ValueError, match="alpha"):
        D.per_token_loss("forward_kl", x, x, alpha=0.5)
    with pytest.raises(ValueError, match="shapes"):
        D.per_token_loss("js", torch.zeros(2, 3), torch.zeros(3))
    assert set(D.DIVERGENCES.names()) >= {
        "forward_kl",
        "reverse_kl",
        "js",
        "alpha",
        "total_variation",
        "hellinger",
        "chi2",
    }


@pytest.mark.parametrize("alpha", [2.8, 3.0, 5.0, 10.0, -4.0, -10.0])
def test_alpha_is_finite_for_any_alpha_and_exact_inside_its_guard(alpha):
    """alpha >~ 2.8 (or <~ -3.4) used to give NaN everywhere: (1 - alpha) d overflowed at the guard."""
    d = torch.linspace(-80, 40, 241, requires_grad=True)
    v = D.per_token_loss("alpha", d, torch.zeros_like(d), alpha=alpha)
    v.sum().backward()
    assert torch.isfinite(v).all() and torch.isfinite(d.grad).all()
    lo, hi = D._alpha_bounds(alpha)
    inside = torch.linspace(lo, hi, 50, dtype=F64)
    u = inside.exp()
    exact = (u.pow(1 - alpha) - (1 - alpha) * u - alpha) / (alpha * (alpha - 1))
    torch.testing.assert_close(
        D.per_token_loss("alpha", inside, torch.zeros_like(inside), alpha=alpha), exact, rtol=1e-9, atol=1e-9
    )
    # outside, the tangent line: slope at the boundary equals the exact derivative there
    x = torch.tensor([lo - 5.0, lo], dtype=F64, requires_grad=True)
    y = D.per_token_loss("alpha", x, torch.zeros_like(x), alpha=alpha)
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert gx[0].item() == pytest.approx(gx[1].item(), rel=1e-6)
