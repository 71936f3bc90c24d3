"""KL estimators: expected values and expected LOSS gradients by exact enumeration (float64).

With y ~ pi_theta and d = log pi_theta(y) - log pi_ref(y), an estimator used as a loss is
differentiated through log pi_theta(y) with the sample fixed, so its expected gradient is
sum_y pi_theta(y) grad loss(y) with pi_theta(y) as a constant weight: ``(q.detach() * loss).sum()``.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dphrl import divergences as D
from dphrl import losses as L

F64 = torch.float64


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last dim from log-probs (independent of the estimator code)."""
    return (log_a.exp() * (log_a - log_b)).sum(-1)


def _single(seed: int, vocab: int):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(vocab, generator=g, dtype=F64).requires_grad_()
    log_p = torch.randn(vocab, generator=g, dtype=F64).log_softmax(-1)  # reference
    return theta, log_p


def _grad(x: torch.Tensor, wrt) -> torch.Tensor:
    wrt = list(wrt) if isinstance(wrt, (list, tuple)) else [wrt]
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(x, wrt, retain_graph=True)])


@pytest.mark.parametrize("seed,vocab", [(0, 5), (1, 6), (2, 7)])
def test_expected_values(seed, vocab):
    theta, log_p = _single(seed, vocab)
    log_q = theta.log_softmax(-1)
    q = log_q.exp()
    rev = _kl(log_q, log_p)
    e = {k: (q * L.kl_estimator(log_q, log_p, k)).sum() for k in ("k1", "k2", "k3")}
    assert e["k1"].item() == pytest.approx(rev.item(), rel=1e-12)
    assert e["k3"].item() == pytest.approx(rev.item(), rel=1e-12)
    half_sq = 0.5 * (q * (log_q - log_p).square()).sum()
    assert e["k2"].item() == pytest.approx(half_sq.item(), rel=1e-12)
    assert abs(e["k2"].item() - rev.item()) > 1e-2 * rev.item()  # biased: not the KL


@pytest.mark.parametrize("seed,vocab", [(0, 5), (1, 6), (2, 7)])
def test_expected_loss_gradients(seed, vocab):
    theta, log_p = _single(seed, vocab)
    log_q = theta.log_softmax(-1)
    w = log_q.exp().detach()  # sample weights: the sample is fixed
    g = {k: _grad((w * L.kl_estimator(log_q, log_p, k)).sum(), theta) for k in ("k1", "k2", "k3")}
    g_rev = _grad(_kl(log_q, log_p), theta)  # grad KL(pi_theta || pi_ref)
    g_fwd = _grad(_kl(log_p, log_q), theta)  # grad KL(pi_ref || pi_theta)

    torch.testing.assert_close(g["k1"], torch.zeros_like(g_rev), rtol=0, atol=1e-15)
    torch.testing.assert_close(g["k2"], g_rev, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(g["k3"], g_fwd, rtol=1e-10, atol=1e-13)
    # the directions really differ here, so the assertions above discriminate
    assert (g_fwd - g_rev).norm() > 0.05 * g_rev.norm()
    assert g_rev.norm() > 1e-2


@pytest.mark.parametrize("beta", [0.05, 1.0])
def test_k1_as_reward_reinforce_gives_minus_beta_reverse_kl_gradient(beta):
    theta, log_p = _single(3, 6)
    log_q = theta.log_softmax(-1)
    w = log_q.exp().detach()
    reward = -beta * L.kl_estimator(log_q, log_p, "k1").detach()  # penalty in the reward, no gradient
    reinforce = _grad((w * reward * log_q).sum(), theta)  # E[r grad log pi]
    torch.testing.assert_close(reinforce, -beta * _grad(_kl(log_q, log_p), theta), rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------- sequences


def _two_step(seed: int = 4, vocab: int = 3):
    """pi_theta(y1) = softmax(a), pi_theta(y2 | y1) = softmax(a + W[y1]): parameters shared by positions."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(vocab, generator=g, dtype=F64).requires_grad_()
    w = torch.randn(vocab, vocab, generator=g, dtype=F64).requires_grad_()
    ref1 = torch.randn(vocab, generator=g, dtype=F64).log_softmax(-1)  # (V,)
    ref2 = torch.randn(vocab, vocab, generator=g, dtype=F64).log_softmax(-1)  # (V, V) row = y1
    return a, w, ref1, ref2


def test_per_position_gradient_at_a_fixed_prefix():
    a, w, ref1, ref2 = _two_step()
    params = [a, w]
    for y1 in range(3):
        log_q = (a + w[y1]).log_softmax(-1)  # pi_theta(. | y1)
        weight = log_q.exp().detach()
        g = {
            k: _grad((weight * L.kl_estimator(log_q, ref2[y1], k)).sum(), params) for k in ("k1", "k2", "k3")
        }
        torch.testing.assert_close(g["k1"], torch.zeros_like(g["k1"]), rtol=0, atol=1e-15)
        torch.testing.assert_close(g["k2"], _grad(_kl(log_q, ref2[y1]), params), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(g["k3"], _grad(_kl(ref2[y1], log_q), params), rtol=1e-10, atol=1e-13)


def test_summed_k2_is_not_the_sequence_reverse_kl_gradient_but_the_reward_form_is():
    a, w, ref1, ref2 = _two_step()
    params = [a, w]
    seqs = list(itertools.product(range(3), repeat=2))
    y1 = torch.tensor([s[0] for s in seqs])
    y2 = torch.tensor([s[1] for s in seqs])
    q1 = a.log_softmax(-1)  # (V,)
    q2 = (a + w).log_softmax(-1)  # (V, V)
    lq = torch.stack([q1[y1], q2[y1, y2]], -1)  # (9, 2) per-token log pi_theta
    lp = torch.stack([ref1[y1], ref2[y1, y2]], -1)  # (9, 2) per-token log pi_ref
    weight = lq.sum(-1).exp().detach()  # (9,) pi_theta(y), a constant
    seq_rev = (lq.sum(-1).exp() * (lq - lp).sum(-1)).sum()  # sequence-level KL(pi_theta || pi_ref)
    g_seq = _grad(seq_rev, params)

    g_k2 = _grad((weight[:, None] * L.kl_estimator(lq, lp, "k2")).sum(), params)
    # = sum over positions of the per-position reverse-KL gradient at prefixes drawn from pi_theta ...
    per_pos = _kl(q1, ref1) + (q1.exp().detach() * _kl(q2, ref2)).sum()
    torch.testing.assert_close(g_k2, _grad(per_pos, params), rtol=1e-10, atol=1e-13)
    # ... which misses E[grad log pi_theta(y1) * KL_2(y1)]: not the sequence-level gradient
    assert (g_k2 - g_seq).norm() > 0.05 * g_seq.norm()

    beta = 0.1
    ret = -beta * L.kl_estimator(lq, lp, "k1").detach().sum(-1)  # (9,) sequence return
    g_reinforce = _grad((weight * ret * lq.sum(-1)).sum(), params)
    torch.testing.assert_close(g_reinforce, -beta * g_seq, rtol=1e-10, atol=1e-14)


# -------------------------------------------------------------------------- rehearsal pull on a dropped token


@pytest.mark.parametrize("dtype", [F64, torch.float32])
def test_js_barely_pulls_back_a_dropped_token_forward_kl_does(dtype):
    d = -11.0
    logp = torch.tensor([d - 1.0], dtype=dtype, requires_grad=True)
    ref = torch.tensor([-1.0], dtype=dtype)
    u = math.exp(d)
    (g_js,) = torch.autograd.grad(D.per_token_loss("js", logp, ref).sum(), logp)
    (g_fkl,) = torch.autograd.grad(D.per_token_loss("forward_kl", logp, ref).sum(), logp)
    expected_js = u * math.log(2 * u / (1 + u))  # g'(d) = u f'(u), f'(u) = log(2u / (1 + u))
    assert expected_js == pytest.approx(-1.7214e-4, rel=1e-4)
    assert g_js.item() == pytest.approx(expected_js, rel=1e-5)
    assert g_fkl.item() == pytest.approx(u - 1, rel=1e-6)  # -0.99998
    assert abs(g_js.item() / g_fkl.item()) < 2e-4
