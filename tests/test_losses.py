"""Aggregation, PPO-clip, KL-Cov / Clip-Cov, KL estimators, entropy: hand-computed values and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from dphrl import losses as L
from dphrl.batching import token_logprobs

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
    assert L.POLICY_LOSSES.get("ppo_clip") is L.ppo_clip_loss
    assert L.POLICY_LOSSES == {
        "ppo_clip": L.ppo_clip_loss, "kl_cov": L.kl_cov_loss, "clip_cov": L.clip_cov_loss,
    }
    with pytest.raises(ValueError, match="ppo_clip"):
        L.POLICY_LOSSES.get("ppo")


# ----------------------------------------------------------------------------- KL-Cov / Clip-Cov
# One hand-built batch: 2 sequences, 5 real tokens, A = +1 / -1 per sequence, known log-probs and
# log-ratios. Padding carries a large finite log-prob that must not move any mean or get selected.

COV_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]], dtype=F64)
COV_LOGP = [[-0.5, -1.0, -2.0], [-0.2, -3.0, 50.0]]
COV_DELTA = torch.tensor([[0.3, -0.2, 0.05], [0.3, -0.1, 0.0]], dtype=F64)  # logp - old_logp
COV_ADV = torch.tensor([1.0, -1.0], dtype=F64)
# by hand: mean A over real tokens = (3 - 2) / 5 = 0.2; mean logp = -6.7 / 5 = -1.34
COV = torch.tensor(
    [
        [(-0.5 + 1.34) * 0.8, (-1.0 + 1.34) * 0.8, (-2.0 + 1.34) * 0.8],  # 0.672, 0.272, -0.528
        [(-0.2 + 1.34) * -1.2, (-3.0 + 1.34) * -1.2, 0.0],  # -1.368, 1.992, padding
    ],
    dtype=F64,
)


def _cov_batch():
    logp = torch.tensor(COV_LOGP, dtype=F64, requires_grad=True)
    old = (logp.detach() - COV_DELTA).clone()
    return logp, old


def test_token_covariance_hand_values():
    logp, _ = _cov_batch()
    torch.testing.assert_close(L.token_covariance(logp, COV_ADV, COV_MASK), COV)
    torch.testing.assert_close(L.token_covariance(logp, COV_ADV[:, None].expand(2, 3), COV_MASK.bool()), COV)
    assert not L.token_covariance(logp, COV_ADV, COV_MASK).requires_grad


def _kl_cov(ratio, **kw):
    logp, old = _cov_batch()
    loss, m = L.kl_cov_loss(logp, old, COV_ADV, COV_MASK, kl_cov_ratio=ratio, dual_clip=None, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, m, grad


@pytest.mark.parametrize(
    "ratio,selected",
    [
        (0.2, [(1, 1)]),  # floor(0.2 * 5) = 1: the largest covariance, 1.992
        (0.01, [(1, 1)]),  # floor(0.05) = 0 -> max(1, .) = 1 (the paper's code's rounding)
        (2e-3, [(1, 1)]),  # the paper's default on a small batch
        (0.4, [(1, 1), (0, 0)]),  # 1.992, 0.672
        (0.6, [(1, 1), (0, 0), (0, 1)]),
    ],
)
def test_kl_cov_selects_top_covariance_tokens(ratio, selected):
    loss, m, grad = _kl_cov(ratio, ppo_kl_coef=0.5)
    sel = torch.zeros(2, 3, dtype=F64)
    for i, j in selected:
        sel[i, j] = 1.0
    adv = COV_ADV[:, None].expand(2, 3)
    r = COV_DELTA.exp()
    per_token = (-adv * r + 0.5 * COV_DELTA.abs() * sel) * COV_MASK  # (B, T)
    assert loss.item() == pytest.approx(per_token.sum().item() / 5, rel=1e-12)
    # gradient: -A r / N everywhere, plus coef * sign(log-ratio) / N on the selected tokens, 0 on padding
    expected = (-adv * r + 0.5 * COV_DELTA.sign() * sel) * COV_MASK / 5
    torch.testing.assert_close(grad, expected)
    assert m["pg/kl_cov_frac"] == pytest.approx(len(selected) / 5)
    assert m["pg/abs_log_ratio"] == pytest.approx((0.3 + 0.2 + 0.05 + 0.3 + 0.1) / 5)


def test_kl_cov_ratio_zero_is_the_unclipped_policy_gradient():
    loss, m, grad = _kl_cov(0.0)
    adv = COV_ADV[:, None].expand(2, 3)
    r = COV_DELTA.exp()
    assert loss.item() == pytest.approx(((-adv * r) * COV_MASK).sum().item() / 5, rel=1e-12)
    torch.testing.assert_close(grad, -adv * r * COV_MASK / 5)
    assert m["pg/kl_cov_frac"] == 0.0
    # = ppo_clip with a range that never binds (ratio in [0, 1e9]): exactly, value and gradient
    logp, old = _cov_batch()
    ref, _ = L.ppo_clip_loss(logp, old, COV_ADV, COV_MASK, clip_low=1.0, clip_high=1e9)
    (g_ref,) = torch.autograd.grad(ref, logp)
    assert loss.item() == ref.item()
    assert torch.equal(grad, g_ref)


def test_kl_cov_options_and_refusals():
    logp, old = _cov_batch()
    loss_s, _ = L.kl_cov_loss(logp, old, COV_ADV, COV_MASK, kl_cov_ratio=0.2, agg="seq-mean-token-mean")
    r = COV_DELTA.exp()
    row0 = (-r[0]).sum() / 3
    row1 = (r[1, 0] + r[1, 1] + 1.0 * 0.1) / 2  # (1, 1) selected: + |-0.1|
    assert loss_s.item() == pytest.approx(((row0 + row1) / 2).item(), rel=1e-12)
    with pytest.raises(ValueError, match="dual_clip"):
        L.kl_cov_loss(logp, old, COV_ADV, COV_MASK, dual_clip=3.0)
    with pytest.raises(ValueError, match="kl_cov_ratio"):
        L.kl_cov_loss(logp, old, COV_ADV, COV_MASK, kl_cov_ratio=1.5)
    # equal covariances (all advantages equal): ties go to the lowest flat index
    _, m = L.kl_cov_loss(logp, old, torch.ones(2, dtype=F64), COV_MASK, kl_cov_ratio=0.2)
    assert m["pg/kl_cov_frac"] == pytest.approx(1 / 5)


def _clip_cov(ratio, generator=None, **kw):
    logp, old = _cov_batch()
    loss, m = L.clip_cov_loss(logp, old, COV_ADV, COV_MASK, clip_cov_ratio=ratio, generator=generator, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, m, grad


def _ppo_reference(**kw):
    logp, old = _cov_batch()
    loss, m = L.ppo_clip_loss(logp, old, COV_ADV, COV_MASK, **kw)
    (grad,) = torch.autograd.grad(loss, logp)
    return loss, m, grad


# PPO range [0.8, 1.28]: (0, 0) has A = +1 and r = e^0.3 = 1.35 -> clipped, never a Clip-Cov candidate
E = math.exp
PPO_TOKENS = torch.tensor([[-1.28, -E(-0.2), -E(0.05)], [E(0.3), E(-0.1), 0.0]], dtype=F64)  # per-token loss
PPO_GRAD = torch.tensor([[0.0, -E(-0.2), -E(0.05)], [E(0.3), E(-0.1), 0.0]], dtype=F64) / 5  # d loss / d logp


def test_clip_cov_default_band_detaches_the_one_candidate():
    # covariances in (1, 5): only (1, 1) (1.992); ratio 2e-4 * 5 -> max(1, 0) = 1 token
    loss, m, grad = _clip_cov(2e-4, torch.Generator().manual_seed(0))
    zero = torch.ones(2, 3, dtype=F64)
    zero[1, 1] = 0.0
    assert loss.item() == pytest.approx((PPO_TOKENS * zero).sum().item() / 5, rel=1e-12)
    torch.testing.assert_close(grad, PPO_GRAD * zero)
    assert grad[1, 1] == 0.0 and grad[1, 0] != 0.0
    assert m["pg/clip_cov_frac"] == pytest.approx(1 / 5)
    assert m["pg/clip_frac"] == pytest.approx(1 / 5)  # (0, 0), by the PPO clip itself


def test_clip_cov_random_choice_among_candidates():
    # band (0.2, 5): (0, 1) 0.272 and (1, 1) 1.992; (0, 0) 0.672 is excluded (already PPO-clipped)
    loss_all, m_all, grad_all = _clip_cov(1.0, clip_cov_lb=0.2)
    zero = torch.ones(2, 3, dtype=F64)
    zero[0, 1] = zero[1, 1] = 0.0
    torch.testing.assert_close(grad_all, PPO_GRAD * zero)
    assert loss_all.item() == pytest.approx((PPO_TOKENS * zero).sum().item() / 5, rel=1e-12)
    assert m_all["pg/clip_cov_frac"] == pytest.approx(2 / 5)
    # one of the two, chosen by the generator: deterministic per seed, both occur over seeds
    picks = set()
    for seed in range(20):
        _, m, grad = _clip_cov(0.2, torch.Generator().manual_seed(seed), clip_cov_lb=0.2)
        _, _, again = _clip_cov(0.2, torch.Generator().manual_seed(seed), clip_cov_lb=0.2)
        assert torch.equal(grad, again)
        dropped = {(i, j) for i, j in [(0, 1), (1, 1)] if grad[i, j] == 0.0}
        assert len(dropped) == 1 and m["pg/clip_cov_frac"] == pytest.approx(1 / 5)
        picks |= dropped
        kept = torch.ones(2, 3, dtype=F64)
        kept[next(iter(dropped))] = 0.0
        torch.testing.assert_close(grad, PPO_GRAD * kept)
    assert picks == {(0, 1), (1, 1)}


@pytest.mark.parametrize("kw", [{}, {"dual_clip": 3.0}, {"clip_high": 0.2, "agg": "seq-mean-token-mean"}])
def test_clip_cov_ratio_zero_is_ppo_clip(kw):
    loss, m, grad = _clip_cov(0.0, clip_cov_lb=-10.0, **kw)  # every token a candidate, none selected
    ref, m_ref, g_ref = _ppo_reference(**kw)
    assert loss.item() == ref.item() and torch.equal(grad, g_ref)
    assert m["pg/clip_cov_frac"] == 0.0
    assert {k: v for k, v in m.items() if k in m_ref} == m_ref


def test_clip_cov_refusals_and_inputs_untouched():
    logp, old = _cov_batch()
    with pytest.raises(ValueError, match="clip_cov_lb < clip_cov_ub"):
        L.clip_cov_loss(logp, old, COV_ADV, COV_MASK, clip_cov_lb=5.0, clip_cov_ub=1.0)
    with pytest.raises(ValueError, match="clip_cov_ratio"):
        L.clip_cov_loss(logp, old, COV_ADV, COV_MASK, clip_cov_ratio=-0.1)
    copies = [t.detach().clone() for t in (logp, old, COV_ADV, COV_MASK)]
    for name in ("ppo_clip", "kl_cov", "clip_cov"):
        loss_fn = L.POLICY_LOSSES.get(name)
        loss_fn(logp, old, COV_ADV, COV_MASK, clip_low=0.2, clip_high=0.28, agg="token-mean")
    for t, c in zip((logp, old, COV_ADV, COV_MASK), copies):
        assert torch.equal(t.detach(), c)


def test_covariance_losses_bf16_and_no_valid_tokens():
    logp, old = _cov_batch()
    for fn in (L.kl_cov_loss, L.clip_cov_loss):
        loss, _ = fn(logp.detach().bfloat16().requires_grad_(), old.bfloat16(), COV_ADV.bfloat16(), COV_MASK)
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        empty, m = fn(logp, old, COV_ADV, torch.zeros_like(COV_MASK))
        assert empty.item() == 0.0 and m["pg/ratio_max"] == 0.0


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


def test_entropy_of_the_logprob_head():
    """The trainer's entropy is ``batching.token_logprobs``'s (both paths); it replaced the unused
    ``losses.entropy_from_logits``, whose assertions these are."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 7, generator=g, dtype=F64) * 5
    ids = torch.zeros(2, 3, dtype=torch.long)
    p = logits.softmax(-1)
    for grad in (False, True):
        _, h = token_logprobs(logits, ids, with_entropy=True, entropy_grad=grad)
        torch.testing.assert_close(h, -(p * p.log()).sum(-1))
        uniform = torch.zeros(1, 1, 4, dtype=F64)
        _, h4 = token_logprobs(uniform, ids[:1, :1], with_entropy=True, entropy_grad=grad)
        assert h4.item() == pytest.approx(math.log(4))
        masked2 = torch.tensor([[[0.0, 0.0, float("-inf")]]])
        _, h2 = token_logprobs(masked2, ids[:1, :1], with_entropy=True, entropy_grad=grad)
        assert h2.item() == pytest.approx(math.log(2), rel=1e-6)
    masked = torch.tensor([[[0.0, 0.0, float("-inf"), 1e4]]], requires_grad=True)
    _, h = token_logprobs(masked, ids[:1, :1], with_entropy=True, entropy_grad=True)
    h.sum().backward()
    assert torch.isfinite(h).all() and torch.isfinite(masked.grad).all()


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
