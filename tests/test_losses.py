"""Aggregation, PPO-clip, KL estimators, entropy: hand-computed values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from dphrl import losses as L

F64 = torch.float64

VALUES = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=F64)
MASK = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=F64)


# ----------------------------------------------------------------------------- aggregation


@pytest.mark.parametrize(
    "mode,kw,expected",
    [
        ("token-mean", {}, (1 + 2 + 4) / 3),
        ("seq-mean-token-mean", {}, ((1 + 2) / 2 + 4 / 1) / 2),
        ("seq-mean-token-sum-norm", {}, ((1 + 2) / 3 + 4 / 3) / 2),
        ("seq-mean-token-sum-norm", {"max_len": 4}, ((1 + 2) / 4 + 4 / 4) / 2),
        ("token-mean", {"num_tokens": 7}, (1 + 2 + 4) / 7),
        ("seq-mean-token-mean", {"num_seqs": 4}, (1.5 + 4) / 4),
    ],
)
def test_aggregate_hand_values(mode, kw, expected):
    assert L.aggregate(VALUES, MASK, mode, **kw).item() == pytest.approx(expected, rel=1e-12)
    assert L.aggregate(VALUES, MASK.bool(), mode, **kw).item() == pytest.approx(expected, rel=1e-12)


def test_aggregate_ignores_nonfinite_padding():
    bad = torch.tensor(
        [[1.0, 2.0, float("inf")], [4.0, float("nan"), float("nan")]], dtype=F64, requires_grad=True
    )
    out = L.aggregate(bad, MASK, "token-mean")
    out.backward()
    assert out.item() == pytest.approx(7 / 3)
    torch.testing.assert_close(bad.grad, MASK / 3)


@pytest.mark.parametrize("mode", sorted(L.AGGREGATIONS))
def test_micro_batches_with_global_counts_match_full_batch(mode):
    g = torch.Generator().manual_seed(0)
    values = torch.randn(4, 5, generator=g, dtype=F64, requires_grad=True)
    lengths = torch.tensor([5, 2, 4, 1])
    mask = (torch.arange(5) < lengths[:, None]).to(F64)  # (4, 5)

    full = L.aggregate(values * 1.0, mask, mode)
    (g_full,) = torch.autograd.grad(full, values)

    counts = {"num_tokens": mask.sum(), "num_seqs": 4, "max_len": 5}
    micro = sum(L.aggregate(values[s] * 1.0, mask[s], mode, **counts) for s in (slice(0, 2), slice(2, 4)))
    (g_micro,) = torch.autograd.grad(micro, values)
    assert micro.item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(g_micro, g_full)


def test_aggregate_empty_mask_is_zero_not_nan():
    for mode in L.AGGREGATIONS:
        assert L.aggregate(VALUES, torch.zeros_like(MASK), mode).item() == 0.0


def test_masked_mean():
    assert L.masked_mean(VALUES, MASK).item() == pytest.approx(7 / 3)
    torch.testing.assert_close(L.masked_mean(VALUES, MASK, dim=-1), torch.tensor([1.5, 4.0], dtype=F64))


# ----------------------------------------------------------------------------- PPO clip


def _ppo(ratios, adv, mask=None, **kw):
    logp = torch.tensor(ratios, dtype=F64).log().requires_grad_()
    old = torch.zeros_like(logp)
    mask = torch.ones_like(logp) if mask is None else mask
    loss, metrics = L.ppo_clip_loss(logp, old, torch.as_tensor(adv, dtype=F64), mask, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, metrics, grad


def test_ppo_clip_hand_values_and_gradients():
    # range [0.8, 1.28]; row 0: A = +1, row 1: A = -1 (advantages given per sequence, shape (B,))
    ratios = [[0.7, 1.1, 1.4], [0.7, 1.1, 1.4]]
    loss, m, grad = _ppo(ratios, [1.0, -1.0])
    per_token = torch.tensor([[-0.7, -1.1, -1.28], [0.8, 1.1, 1.4]], dtype=F64)
    assert loss.item() == pytest.approx(per_token.mean().item(), rel=1e-12)
    # gradient: -A * ratio / num_tokens where the unclipped branch is active, 0 where clipped
    expected = torch.tensor([[-0.7, -1.1, 0.0], [0.0, 1.1, 1.4]], dtype=F64) / 6
    torch.testing.assert_close(grad, expected)
    assert m["pg/clip_frac"] == pytest.approx(2 / 6)
    assert m["pg/dual_clip_frac"] == 0.0
    assert m["pg/ratio_mean"] == pytest.approx(sum(ratios[0]) / 3)
    assert m["pg/ratio_max"] == pytest.approx(1.4)
    k3 = [r - 1 - math.log(r) for r in ratios[0]]
    assert m["pg/approx_kl"] == pytest.approx(sum(k3) / 3)


def test_ppo_clip_asymmetric_range():
    # 1.25 is inside [0.8, 1.28] (would be clipped with a symmetric 0.2); 0.79 is below 0.8
    loss, m, grad = _ppo([[1.25, 0.79]], [[1.0, -1.0]])
    assert loss.item() == pytest.approx((-1.25 + 0.8) / 2)
    torch.testing.assert_close(grad, torch.tensor([[-1.25 / 2, 0.0]], dtype=F64))
    assert m["pg/clip_frac"] == pytest.approx(0.5)
    loss_sym, _, _ = _ppo([[1.25, 0.79]], [[1.0, -1.0]], clip_high=0.2)
    assert loss_sym.item() == pytest.approx((-1.2 + 0.8) / 2)


def test_ppo_dual_clip():
    # A = -1: ratio 4 -> max(4, 1.28) = 4 -> min(4, 3) = 3 (dual clip, no gradient); ratio 1.1 untouched
    loss, m, grad = _ppo([[4.0, 1.1]], [-1.0], dual_clip=3.0)
    assert loss.item() == pytest.approx((3.0 + 1.1) / 2)
    torch.testing.assert_close(grad, torch.tensor([[0.0, 1.1 / 2]], dtype=F64))
    assert m["pg/dual_clip_frac"] == pytest.approx(0.5)
    # positive advantages are never dual-clipped
    loss_pos, m_pos, _ = _ppo([[4.0]], [2.0], dual_clip=3.0)
    assert loss_pos.item() == pytest.approx(-2.0 * 1.28)
    assert m_pos["pg/dual_clip_frac"] == 0.0
    with pytest.raises(ValueError, match="dual_clip"):
        _ppo([[1.0]], [1.0], dual_clip=0.5)


def test_ppo_mask_and_agg_passthrough():
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=F64)
    loss, m, grad = _ppo([[1.1, 1.0, 50.0]], [1.0], mask=mask)
    assert loss.item() == pytest.approx((-1.1 - 1.0) / 2)
    assert grad[0, 2] == 0.0 and m["pg/ratio_max"] == pytest.approx(1.1)
    loss_g, _, _ = _ppo([[1.1, 1.0, 50.0]], [1.0], mask=mask, num_tokens=4)
    assert loss_g.item() == pytest.approx((-1.1 - 1.0) / 4)
    loss_s, _, _ = _ppo([[1.1, 1.0, 50.0]], [1.0], mask=mask, agg="seq-mean-token-sum-norm", max_len=10)
    assert loss_s.item() == pytest.approx((-1.1 - 1.0) / 10)


def test_ppo_extreme_log_ratio_is_finite():
    logp = torch.tensor([[-200.0, 0.0, 200.0]], requires_grad=True)
    old = torch.zeros_like(logp)
    loss, m = L.ppo_clip_loss(logp, old, torch.tensor([-1.0]), torch.ones_like(logp))
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logp.grad).all() and math.isfinite(m["pg/ratio_max"])
    assert logp.grad[0, 2] != 0  # the exploded negative-advantage token still gets pushed down


def test_policy_loss_registry():
    assert L.get_policy_loss("ppo_clip") is L.ppo_clip_loss
    assert L.POLICY_LOSSES == {"ppo_clip": L.ppo_clip_loss}
    with pytest.raises(ValueError, match="ppo_clip"):
        L.get_policy_loss("ppo")


# ----------------------------------------------------------------------------- KL estimators


def test_kl_estimators_by_enumeration():
    g = torch.Generator().manual_seed(3)
    log_q = torch.randn(6, generator=g, dtype=F64).log_softmax(-1)  # policy (sampling distribution)
    log_p = torch.randn(6, generator=g, dtype=F64).log_softmax(-1)  # reference
    q = log_q.exp()
    kl_qp = (q * (log_q - log_p)).sum()
    for kind in ("k1", "k3"):
        est = (q * L.kl_estimator(log_q, log_p, kind)).sum()
        assert est.item() == pytest.approx(kl_qp.item(), rel=1e-12)
    torch.testing.assert_close(L.kl_estimator(log_q, log_p, "k2"), 0.5 * (log_q - log_p) ** 2)


def test_k3_nonnegative_and_gradients_finite():
    d = torch.linspace(-50, 50, 101, requires_grad=True)
    k3 = L.kl_estimator(d, torch.zeros_like(d), "k3")
    k3.sum().backward()
    assert (k3 >= 0).all() and torch.isfinite(k3).all()
    assert torch.isfinite(d.grad).all() and (d.grad[d.detach() != 0] != 0).all()
    assert d.grad[-1].item() == pytest.approx(1.0)  # d/dd [e^-d + d - 1] = 1 - e^-d
    far = torch.tensor([-1000.0, 1000.0], requires_grad=True)
    out = L.kl_estimator(far, torch.zeros(2), "k3")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(far.grad).all()
    bf = L.kl_estimator(torch.linspace(-50, 50, 11).bfloat16(), torch.zeros(11).bfloat16())
    assert bf.dtype == torch.bfloat16 and torch.isfinite(bf).all()


def test_kl_estimator_unknown_kind():
    with pytest.raises(ValueError, match="k3"):
        L.kl_estimator(torch.zeros(2), torch.zeros(2), "low_var")


# ----------------------------------------------------------------------------- entropy / helpers


def test_entropy_from_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g, dtype=F64) * 5
    p = logits.softmax(-1)
    torch.testing.assert_close(L.entropy_from_logits(logits), -(p * p.log()).sum(-1))
    assert L.entropy_from_logits(torch.zeros(4, dtype=F64)).item() == pytest.approx(math.log(4))
    masked = torch.tensor([0.0, 0.0, float("-inf"), 1e4], requires_grad=True)
    h = L.entropy_from_logits(masked)
    h.backward()
    assert torch.isfinite(h) and torch.isfinite(masked.grad).all()
    masked2 = torch.tensor([0.0, 0.0, float("-inf")])
    assert L.entropy_from_logits(masked2).item() == pytest.approx(math.log(2), rel=1e-6)


def test_linear_tail_helpers():
    x = torch.tensor([-5.0, 0.0, 20.0, 30.0], dtype=F64, requires_grad=True)
    e = L.exp_linear_tail(x)
    (g,) = torch.autograd.grad(e.sum(), x)
    t = math.exp(20.0)
    torch.testing.assert_close(e.detach(), torch.tensor([math.exp(-5), 1.0, t, t * 11], dtype=F64))
    torch.testing.assert_close(g, torch.tensor([math.exp(-5), 1.0, t, t], dtype=F64))
    x2 = torch.tensor([-30.0, 1e-8], requires_grad=True)
    y2 = L.expm1_linear_tail(x2)
    y2.sum().backward()
    assert x2.grad[0].item() == pytest.approx(math.exp(-30), rel=1e-5)  # torch's expm1 backward would give 0
    assert y2[1].item() == pytest.approx(1e-8, rel=1e-6)


def test_unknown_aggregation_mode():
    with pytest.raises(ValueError, match="token-mean"):
        L.aggregate(VALUES, MASK, "mean")
    with pytest.raises(ValueError, match="shapes"):
        L.aggregate(VALUES, MASK[:, :2], "token-mean")
