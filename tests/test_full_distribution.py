"""Full-distribution rehearsal over top-k + tail buckets: exact values,
gradients and variances by enumeration."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dphrl import divergences as D

F64 = torch.float64
NEG_INF = float("-inf")

CASES = [
    ("forward_kl", {}),
    ("reverse_kl", {}),
    ("js", {}),
    ("alpha", {"alpha": 0.5}),
    ("hellinger", {}),
    ("chi2", {}),
    ("total_variation", {}),
]
IDS = [n + "".join(f"-{k}{v}" for k, v in p.items()) for n, p in CASES]


def _kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * (a / b).log()).sum(-1)


def exact(name: str, p: torch.Tensor, q: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Textbook divergences over the last dim, p = reference, q = policy (probabilities)."""
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "js":
        m = (p + q) / 2
        return _kl(p, m) + _kl(q, m)  # 2 JS
    if name == "alpha":
        return (1 - (p**alpha * q ** (1 - alpha)).sum(-1)) / (alpha * (1 - alpha))
    if name == "hellinger":
        return ((q.sqrt() - p.sqrt()) ** 2).sum(-1)
    if name == "chi2":
        return ((q - p) ** 2 / p).sum(-1)
    if name == "total_variation":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(name)


def _logits(seed: int, shape=(2, 3, 6), scale: float = 1.5):
    g = torch.Generator().manual_seed(seed)
    ref = torch.randn(*shape, generator=g, dtype=F64) * scale
    pol = (torch.randn(*shape, generator=g, dtype=F64) * scale).requires_grad_()
    return ref, pol


def _grad(x: torch.Tensor, wrt: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(x, wrt, retain_graph=True)
    return g


# ----------------------------------------------------------------------------- (a) K = V: exact per position


@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_full_support_equals_exact_divergence_value_and_gradient(name, params):
    ref, pol = _logits(0)
    ids, ref_b = D.reference_topk(ref, 6)
    assert ids.shape == (2, 3, 6) and ref_b.shape == (2, 3, 7)
    assert torch.isneginf(ref_b[..., -1]).all()  # the top-k cover everything: empty tail
    logp_b = D.topk_buckets(pol, ids)
    assert torch.isneginf(logp_b[..., -1]).all()
    got = D.bucket_divergence(name, logp_b, ref_b, **params)  # (2, 3)
    want = exact(name, ref.softmax(-1), pol.softmax(-1), **params)  # (2, 3)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)
    g_got, g_want = _grad(got.sum(), pol), _grad(want.sum(), pol)
    assert torch.isfinite(g_got).all()  # the empty tail bucket gives no NaN
    torch.testing.assert_close(g_got, g_want, rtol=1e-9, atol=1e-12)


def test_k_larger_than_vocab_is_clamped_and_ids_sorted():
    ref, _ = _logits(1)
    ids, ref_b = D.reference_topk(ref, 100)
    assert ids.shape == (2, 3, 6) and ids.dtype == torch.long
    lp = ref.log_softmax(-1)
    torch.testing.assert_close(ref_b[..., :-1], lp.gather(-1, ids))
    assert (ref_b[..., :-2] >= ref_b[..., 1:-1]).all()  # descending probability
    assert torch.isneginf(ref_b[..., -1]).all() and ref_b.grad_fn is None


# ------------------------------------------------------------------------- (b) K < V: coarsened distributions


@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_buckets_are_the_coarsened_distribution(k):
    ref, pol = _logits(2)
    ids, ref_b = D.reference_topk(ref, k)
    logp_b = D.topk_buckets(pol, ids)

    def coarsen(logits: torch.Tensor) -> torch.Tensor:  # probabilities of the K ids, then the rest summed
        p = logits.softmax(-1)
        top = p.gather(-1, ids)
        rest = p.scatter(-1, ids, 0.0).sum(-1, keepdim=True)  # a sum of positives: no cancellation
        return torch.cat([top, rest], -1)

    pc, qc = coarsen(ref), coarsen(pol)
    torch.testing.assert_close(ref_b.exp(), pc, rtol=1e-12, atol=0)
    torch.testing.assert_close(logp_b.exp(), qc, rtol=1e-12, atol=0)
    for name in ("forward_kl", "js"):
        got = D.bucket_divergence(name, logp_b, ref_b)
        torch.testing.assert_close(got, exact(name, pc, qc), rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(
            _grad(got.sum(), pol), _grad(exact(name, pc, qc).sum(), pol), rtol=1e-9, atol=1e-12
        )
        full = exact(name, ref.softmax(-1), pol.softmax(-1))
        assert (got < full).all()  # data processing (strict: the tails differ in shape here)


def test_tail_log_mass_is_exact_when_the_tail_is_tiny():
    # top-1 holds 1 - 5e-26 of the mass: log1p(-p_top) would give -inf (float32) or garbage (float64)
    for dtype in (torch.float32, F64):
        logits = torch.tensor([[[0.0, -60.0, -60.0, -60.0, -60.0, -60.0]]], dtype=dtype, requires_grad=True)
        ids, ref_b = D.reference_topk(logits, 1)
        want = -60.0 + math.log(5.0) - math.log1p(5.0 * math.exp(-60.0))
        assert ref_b[0, 0, -1].item() == pytest.approx(want, rel=1e-6)
        out = D.topk_buckets(logits, ids)
        (g,) = torch.autograd.grad(out[0, 0, -1], logits)
        assert torch.isfinite(g).all()
        # d tail / d z_j = softmax over the tail (1/5 each) - p_j
        torch.testing.assert_close(g[0, 0, 1:], torch.full((5,), 0.2, dtype=dtype), rtol=1e-5, atol=1e-6)


def test_buckets_normalised_and_temperature_and_logprob_inputs():
    ref, pol = _logits(3, shape=(2, 4, 9))
    ids, _ = D.reference_topk(ref, 3)
    before = pol.detach().clone()
    out = D.topk_buckets(pol, ids, temperature=0.7)
    assert torch.equal(D.topk_buckets(pol, ids).detach(), D.topk_buckets(pol, ids).detach())
    assert torch.equal(pol.detach(), before)  # the input is not modified (the mask works on a copy)
    torch.testing.assert_close(out.logsumexp(-1), torch.zeros(2, 4, dtype=F64), rtol=0, atol=1e-14)
    torch.testing.assert_close(out, D.topk_buckets(pol / 0.7, ids))
    torch.testing.assert_close(out, D.topk_buckets((pol / 0.7).log_softmax(-1), ids))
    ids_t, ref_t = D.reference_topk(ref, 3, temperature=0.7)
    torch.testing.assert_close(ref_t, D.reference_topk(ref / 0.7, 3)[1])
    assert torch.equal(ids_t, ids)  # temperature does not change the order
    assert D.topk_buckets(pol.float(), ids.int()).dtype == torch.float32
    with pytest.raises(ValueError, match="temperature"):
        D.topk_buckets(pol, ids, temperature=0.0)
    with pytest.raises(ValueError, match="k must be"):
        D.reference_topk(ref, 0)
    with pytest.raises(ValueError, match="leading shapes"):
        D.topk_buckets(pol, ids[:1])
    with pytest.raises(ValueError, match="shapes differ"):
        D.bucket_divergence("forward_kl", out, out[..., :-1])


# --------------------------------------------------------------- (c), (d) autoregressive model by enumeration


def _ar_model(seed: int, vocab: int = 3, length: int = 3, scale: float = 1.0):
    """Tabular autoregressive pi_theta, pi_ref (one logit row per prefix) and all vocab^length sequences."""
    g = torch.Generator().manual_seed(seed)
    prefixes = [p for t in range(length) for p in itertools.product(range(vocab), repeat=t)]
    index = {p: i for i, p in enumerate(prefixes)}
    ref_table = torch.randn(len(prefixes), vocab, generator=g, dtype=F64) * scale
    theta = (torch.randn(len(prefixes), vocab, generator=g, dtype=F64) * scale).requires_grad_()
    seqs = list(itertools.product(range(vocab), repeat=length))
    rows = torch.tensor([[index[s[:t]] for t in range(length)] for s in seqs])  # (N, T)
    toks = torch.tensor(seqs)  # (N, T)
    return theta, ref_table, rows, toks


def _per_sequence(name: str, theta, ref_table, rows, toks, k: int):
    """(weights pi_ref(y) (N,), sampled sum_t f(u_t) (N,), bucket sum_t D_t (N,))."""
    pol_logits, ref_logits = theta[rows], ref_table[rows]  # (N, T, V)
    ref_lp = ref_logits.log_softmax(-1).gather(-1, toks[..., None])[..., 0]  # (N, T)
    pol_lp = pol_logits.log_softmax(-1).gather(-1, toks[..., None])[..., 0]  # (N, T)
    sampled = D.per_token_loss(name, pol_lp, ref_lp).sum(-1)  # (N,)
    ids, ref_b = D.reference_topk(ref_logits, k)
    bucket = D.bucket_divergence(name, D.topk_buckets(pol_logits, ids), ref_b).sum(-1)  # (N,)
    return ref_lp.sum(-1).exp(), sampled, bucket


@pytest.mark.parametrize("seed", [0, 1])
def test_bucket_and_sampled_forms_have_the_same_expectation_and_gradient(seed):
    theta, ref_table, rows, toks = _ar_model(seed)
    w, sampled, bucket = _per_sequence("forward_kl", theta, ref_table, rows, toks, k=3)
    assert w.sum().item() == pytest.approx(1.0, rel=1e-12)
    e_sampled, e_bucket = (w * sampled).sum(), (w * bucket).sum()
    pol_seq = theta[rows].log_softmax(-1).gather(-1, toks[..., None])[..., 0].sum(-1)  # (N,) log pi_theta(y)
    seq_kl = (w * (w.log() - pol_seq)).sum()  # KL(pi_ref || pi_theta) over whole sequences
    assert e_bucket.item() == pytest.approx(seq_kl.item(), rel=1e-12)
    assert e_sampled.item() == pytest.approx(seq_kl.item(), rel=1e-12)
    g_kl = _grad(seq_kl, theta)
    torch.testing.assert_close(_grad(e_bucket, theta), g_kl, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(_grad(e_sampled, theta), g_kl, rtol=1e-10, atol=1e-13)

    # JS: not a sequence-level divergence, but both forms agree (sum over positions of E[2 JS_t])
    w, sampled, bucket = _per_sequence("js", theta, ref_table, rows, toks, k=3)
    assert (w * bucket).sum().item() == pytest.approx((w * sampled).sum().item(), rel=1e-12)
    torch.testing.assert_close(
        _grad((w * bucket).sum(), theta), _grad((w * sampled).sum(), theta), rtol=1e-10, atol=1e-13
    )

    # K < V - 1: the coarsened per-position KLs sum to strictly less (data processing), still > 0
    # (K = V - 1 leaves one token in the tail: no coarsening, the same value)
    w, _, bucket2 = _per_sequence("forward_kl", theta, ref_table, rows, toks, k=2)
    assert (w * bucket2).sum().item() == pytest.approx(seq_kl.item(), rel=1e-12)
    w, _, bucket1 = _per_sequence("forward_kl", theta, ref_table, rows, toks, k=1)
    assert 0 < (w * bucket1).sum().item() < seq_kl.item()


def _variance(w: torch.Tensor, x: torch.Tensor) -> float:
    mean = (w * x).sum()
    return (w * (x - mean) ** 2).sum().item()


# exact Var_{y ~ pi_ref} of the per-sequence sum (vocab 3, length 3): (sampled, bucket), measured once
VARIANCES = {
    ("forward_kl", 0): (3.8862, 1.2414),
    ("forward_kl", 1): (1.2676, 0.3106),
    ("js", 0): (1.7624, 0.2337),
    ("js", 1): (0.4116, 0.0477),
}


@pytest.mark.parametrize("name,seed", sorted(VARIANCES))
def test_bucket_form_has_lower_per_sequence_variance(name, seed):
    theta, ref_table, rows, toks = _ar_model(seed)
    w, sampled, bucket = (x.detach() for x in _per_sequence(name, theta, ref_table, rows, toks, k=3))
    v_sampled, v_bucket = _variance(w, sampled), _variance(w, bucket)
    assert (v_sampled, v_bucket) == pytest.approx(VARIANCES[name, seed], abs=1e-4)
    assert v_bucket < 0.5 * v_sampled


def test_bucket_form_has_lower_gradient_variance_with_tabular_parameters():
    """Per-sequence gradient w.r.t. theta: its total variance (trace of the covariance) over y ~ pi_ref.

    With one parameter row per prefix this is a theorem (sampled = bucket + orthogonal martingale
    noise); it is asserted here by enumeration.
    """
    theta, ref_table, rows, toks = _ar_model(0)
    for name in ("forward_kl", "js"):
        w, sampled, bucket = _per_sequence(name, theta, ref_table, rows, toks, k=3)
        w = w.detach()
        tr = []
        for x in (sampled, bucket):
            grads = torch.stack([_grad(x[i], theta).reshape(-1) for i in range(len(x))])  # (N, P)
            mean = (w[:, None] * grads).sum(0)  # (P,)
            tr.append((w * ((grads - mean) ** 2).sum(-1)).sum().item())
        assert tr[1] < 0.5 * tr[0], (name, tr)


def test_per_sequence_variance_is_not_always_lower():
    """Counterexample: an early position's noise can cancel a later one's, which the bucket form removes.

    Length 2, vocab 2. pi_ref: y1 uniform, y2 = 0 surely. pi_theta(y1) = (0.6, 0.4): f(1.2) < f(0.8);
    pi_theta(y2 = 0 | y1) = 0.05 after y1 = 0, 0.99 after y1 = 1: the sampled y1-term is low exactly
    when the y2-term is high.
    """
    log = math.log
    ref_lp = torch.tensor([[log(0.5), 0.0], [log(0.5), 0.0]], dtype=F64)  # (2 sequences (0,0), (1,0), T)
    pol_lp = torch.tensor([[log(0.6), log(0.05)], [log(0.4), log(0.99)]], dtype=F64)
    w = ref_lp.sum(-1).exp()  # (2,) the two sequences pi_ref can produce
    sampled = D.per_token_loss("forward_kl", pol_lp, ref_lp).sum(-1)
    ref_b = torch.tensor([[[log(0.5), log(0.5)], [0.0, NEG_INF]]] * 2, dtype=F64)  # (2, T, buckets {0, 1})
    pol_b = torch.tensor([[[log(0.6), log(0.4)], [log(0.05), log(0.95)]],
                          [[log(0.6), log(0.4)], [log(0.99), log(0.01)]]], dtype=F64)
    bucket = D.bucket_divergence("forward_kl", pol_b, ref_b).sum(-1)
    assert (w * bucket).sum().item() == pytest.approx((w * sampled).sum().item(), rel=1e-12)
    kl1 = 0.5 * log(0.5 / 0.6) + 0.5 * log(0.5 / 0.4)  # the bucket form's (constant) first position

    def f(u: float) -> float:
        return u - 1 - log(u)

    # two equally likely sequences: Var = (difference / 2)^2
    assert _variance(w, sampled) == pytest.approx(((f(1.2) + f(0.05) - f(0.8) - f(0.99)) / 2) ** 2, rel=1e-10)
    assert _variance(w, bucket) == pytest.approx(((kl1 + f(0.05) - kl1 - f(0.99)) / 2) ** 2, rel=1e-10)
    assert _variance(w, bucket) > _variance(w, sampled) + 5e-3  # 1.04620 vs 1.04062


# ------------------------------------------------------------------ top-k + sampled tail (unbiased for any K)


def _hybrid_per_sequence(name: str, theta, ref_table, rows, toks, k: int):
    pol_logits, ref_logits = theta[rows], ref_table[rows]  # (N, T, V)
    ref_lp = ref_logits.log_softmax(-1).gather(-1, toks[..., None])[..., 0]  # (N, T)
    pol_lp = pol_logits.log_softmax(-1).gather(-1, toks[..., None])[..., 0]  # (N, T)
    ids, ref_b = D.reference_topk(ref_logits, k)
    in_top = (ids == toks.unsqueeze(-1)).any(-1)  # (N, T)
    per = D.topk_sampled_tail_divergence(name, D.topk_buckets(pol_logits, ids), ref_b, pol_lp, ref_lp, in_top)
    return per.sum(-1)  # (N,)


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("name,params", CASES[:4], ids=IDS[:4])
def test_topk_sampled_tail_is_unbiased_for_the_full_divergence(name, params, k):
    """One position, vocab 6: E_{y ~ pi_ref} of the hybrid = the full divergence (value and gradient)."""
    ref, pol = _logits(7, shape=(1, 1, 6))
    ids, ref_b = D.reference_topk(ref, k)
    logp_b = D.topk_buckets(pol, ids)
    ys = torch.arange(6).view(6, 1)  # every token as the sample
    ref_lp = ref.log_softmax(-1)[0, 0, ys]  # (6, 1)
    pol_lp = pol.log_softmax(-1)[0, 0, ys]  # (6, 1)
    in_top = (ids[0, 0] == ys).any(-1, keepdim=True)  # (6, 1)
    per = D.topk_sampled_tail_divergence(
        name, logp_b.expand(6, 1, k + 1), ref_b.expand(6, 1, k + 1), pol_lp, ref_lp, in_top, **params
    )  # (6, 1)
    expectation = (ref_lp.exp() * per).sum()
    full = exact(name, ref.softmax(-1), pol.softmax(-1), **params).sum()
    assert expectation.item() == pytest.approx(full.item(), rel=1e-10)
    torch.testing.assert_close(_grad(expectation, pol), _grad(full, pol), rtol=1e-9, atol=1e-12)
    coarse = D.bucket_divergence(name, logp_b, ref_b, **params).sum()
    assert coarse.item() < full.item() - 1e-3  # what the plain top-k form gives instead


# exact Var_{y ~ pi_ref} of the per-sequence forward-KL sum, vocab 4, length 3: K -> (sampled, hybrid)
HYBRID_VARIANCES = {1: (3.98339, 4.28387), 2: (3.98339, 3.40816), 4: (3.98339, 0.49447)}


@pytest.mark.parametrize("k", sorted(HYBRID_VARIANCES))
def test_topk_sampled_tail_on_sequences_expectation_gradient_variance(k):
    """Unbiased for the sequence-level KL for every K; variance below the sampled form's except for
    a very coarse top-1 (its 3-token tail spreads f(u) widely around f(u_tail))."""
    theta, ref_table, rows, toks = _ar_model(0, vocab=4)
    w, sampled, bucket = _per_sequence("forward_kl", theta, ref_table, rows, toks, k=4)
    pol_seq = theta[rows].log_softmax(-1).gather(-1, toks[..., None])[..., 0].sum(-1)
    seq_kl = (w * (w.log() - pol_seq)).sum()
    hybrid = _hybrid_per_sequence("forward_kl", theta, ref_table, rows, toks, k=k)
    e = (w * hybrid).sum()
    assert e.item() == pytest.approx(seq_kl.item(), rel=1e-12)
    torch.testing.assert_close(_grad(e, theta), _grad(seq_kl, theta), rtol=1e-10, atol=1e-13)
    v_s, v_h = _variance(w.detach(), sampled.detach()), _variance(w.detach(), hybrid.detach())
    assert (v_s, v_h) == pytest.approx(HYBRID_VARIANCES[k], abs=1e-5)
    if k == 4:  # K = V: the bucket form itself
        torch.testing.assert_close(hybrid, bucket)


# ----------------------------------------------------------------------------- (e) extremes


@pytest.mark.parametrize("dtype", [F64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name,params", CASES, ids=IDS)
def test_no_nan_for_extreme_ratios_and_empty_reference_buckets(name, params, dtype):
    # 2 tokens: top-4 has 2 empty + empty tail
    ref = torch.tensor([[[0.0, -3.0, NEG_INF, NEG_INF, NEG_INF, NEG_INF],
                         [0.0, -1.0, -2.0, -3.0, -200.0, -300.0]]], dtype=dtype)  # tiny tail
    pol = torch.tensor([[[-1e4, 1e4, 0.0, 5.0, -5.0, 3e3],
                         [-1e3, 0.0, 1e3, -2e3, 2e3, 0.0]]], dtype=dtype, requires_grad=True)
    ids, ref_b = D.reference_topk(ref, 4)
    assert torch.isneginf(ref_b[0, 0, 2:]).all() and torch.isfinite(ref_b[0, 1]).all()
    logp_b = D.topk_buckets(pol, ids)
    per = D.bucket_divergence(name, logp_b, ref_b, **params)
    loss, metrics = D.full_distribution_loss(name, logp_b, ref_b, torch.ones(1, 2), **params)
    # position 0: a token pi_ref cannot produce (its tail is empty); 1: in the tail
    tok = torch.tensor([[5, 4]])
    in_top = (ids == tok.unsqueeze(-1)).any(-1)
    tok_lp = pol.float().log_softmax(-1).gather(-1, tok[..., None])[..., 0]
    tok_ref = ref.float().log_softmax(-1).gather(-1, tok[..., None])[..., 0]
    h_loss, h_metrics = D.topk_sampled_tail_loss(name, logp_b, ref_b, torch.ones(1, 2), tok_logp=tok_lp,
                                                 tok_ref_logp=tok_ref, tok_in_topk=in_top, **params)
    (loss + h_loss).backward()
    assert per.dtype == logp_b.dtype and torch.isfinite(per).all() and (per.float() >= 0).all()
    assert torch.isfinite(loss) and torch.isfinite(h_loss) and torch.isfinite(pol.grad).all()
    assert pol.grad.abs().sum() > 0
    assert all(math.isfinite(v) for v in (*metrics.values(), *h_metrics.values()))


def test_empty_reference_bucket_contributes_exactly_zero():
    # policy's last bucket ~ 0 mass
    logp_b = torch.tensor([[[-0.5, -1.2, -1e9]]], dtype=F64, requires_grad=True)
    ref_b = torch.tensor([[[math.log(0.3), math.log(0.7), NEG_INF]]], dtype=F64)
    out = D.bucket_divergence("forward_kl", logp_b, ref_b)
    manual = 0.3 * (math.expm1(-0.5 - math.log(0.3)) + 0.5 + math.log(0.3)) + 0.7 * (
        math.expm1(-1.2 - math.log(0.7)) + 1.2 + math.log(0.7))
    assert out.item() == pytest.approx(manual, rel=1e-12)
    (g,) = torch.autograd.grad(out.sum(), logp_b)
    assert g[0, 0, 2].item() == 0.0
    # pi_ref (u - 1) = pi_theta - pi_ref
    assert g[0, 0, 0].item() == pytest.approx(math.exp(-0.5) - 0.3, rel=1e-12)


# ------------------------------------------------------------------------- (f) aggregation, metrics, registry


def test_micro_batches_with_global_counts_match_full_batch():
    ref, pol = _logits(5, shape=(4, 5, 7))
    mask = (torch.arange(5) < torch.tensor([5, 2, 4, 1])[:, None]).to(F64)  # (4, 5)
    ids, ref_b = D.reference_topk(ref, 3)
    full, _ = D.full_distribution_loss("js", D.topk_buckets(pol, ids), ref_b, mask)
    g_full = _grad(full, pol)
    n = mask.sum()
    micro = sum(
        D.full_distribution_loss("js", D.topk_buckets(pol[s], ids[s]), ref_b[s], mask[s], num_tokens=n)[0]
        for s in (slice(0, 1), slice(1, 4))
    )
    assert micro.item() == pytest.approx(full.item(), rel=1e-12)
    torch.testing.assert_close(_grad(micro, pol), g_full, rtol=1e-12, atol=1e-15)
    per = D.bucket_divergence("js", D.topk_buckets(pol, ids), ref_b)
    assert full.item() == pytest.approx(((per * mask).sum() / n).item(), rel=1e-12)


def test_loss_metrics_padding_and_inputs_untouched():
    logp_b = torch.tensor(
        [[[-0.1, -2.5], [-1.0, -0.5]], [[-0.7, -0.7], [5.0, 5.0]]], dtype=F64, requires_grad=True
    )
    ref_b = torch.tensor([[[-0.2, -1.7], [NEG_INF, 0.0]], [[-0.3, -1.35], [1.0, 1.0]]], dtype=F64)
    mask = torch.tensor([[1, 1], [1, 0]], dtype=torch.bool)
    before = (logp_b.detach().clone(), ref_b.clone())
    loss, m = D.full_distribution_loss("forward_kl", logp_b, ref_b, mask)
    per = D.bucket_divergence("forward_kl", logp_b, ref_b).detach()
    assert loss.item() == pytest.approx((per[0, 0] + per[0, 1] + per[1, 0]).item() / 3, rel=1e-12)
    assert m["div/value"] == pytest.approx(loss.item(), rel=1e-12)
    assert m["div/ref_tail_mass"] == pytest.approx((math.exp(-1.7) + 1.0 + math.exp(-1.35)) / 3, rel=1e-12)
    assert m["div/policy_tail_mass"] == pytest.approx((math.exp(-2.5) + math.exp(-0.5) + math.exp(-0.7)) / 3)
    assert m["div/log_ratio_abs_max"] == pytest.approx(0.8)  # |-2.5 + 1.7|; the empty bucket is ignored
    loss.backward()
    assert (logp_b.grad[1, 1] == 0).all()  # padding
    assert torch.equal(logp_b.detach(), before[0]) and torch.equal(ref_b, before[1])
    with pytest.raises(ValueError, match="mask"):
        D.full_distribution_loss("forward_kl", logp_b, ref_b, mask[:, :1])
    with pytest.raises(ValueError, match="alpha"):
        D.full_distribution_loss("forward_kl", logp_b, ref_b, mask, alpha=0.5)


def test_rehearsal_forms_registry():
    assert D.REHEARSAL_FORMS.names() == ["sampled", "topk", "topk_sampled_tail"]
    assert D.REHEARSAL_FORMS.config_key == "rehearsal_form"
    assert D.REHEARSAL_FORMS.get("topk") == D.RehearsalForm(D.full_distribution_loss, topk=True)
    assert D.REHEARSAL_FORMS.get("sampled") == D.RehearsalForm(D.divergence_loss, topk=False)
    assert D.REHEARSAL_FORMS.get("topk_sampled_tail") == D.RehearsalForm(D.topk_sampled_tail_loss, True, True)
    with pytest.raises(ValueError, match="rehearsal_form.*'sampled'.*'topk'"):
        D.REHEARSAL_FORMS.get("top_k")
    with pytest.raises(ValueError, match="RehearsalForm"):
        D.REHEARSAL_FORMS.get("dphrl.divergences:full_distribution_loss")
    # one call signature for both forms: token log-probs (B, T) or bucket log-probs (B, T, K+1)
    ref, pol = _logits(6)
    tok = ref.argmax(-1, keepdim=True)
    mask = torch.ones(2, 3)
    kw = dict(agg="token-mean", num_tokens=6.0, num_seqs=2, max_len=3)
    s_loss, _ = D.REHEARSAL_FORMS["sampled"].loss(
        "forward_kl",
        pol.log_softmax(-1).gather(-1, tok)[..., 0],
        ref.log_softmax(-1).gather(-1, tok)[..., 0],
        mask,
        **kw,
    )
    ids, ref_b = D.reference_topk(ref, 6)
    t_loss, _ = D.REHEARSAL_FORMS["topk"].loss("forward_kl", D.topk_buckets(pol, ids), ref_b, mask, **kw)
    assert torch.isfinite(s_loss) and torch.isfinite(t_loss)
    want = exact("forward_kl", ref.softmax(-1), pol.softmax(-1)).mean()
    assert t_loss.item() == pytest.approx(want.item(), rel=1e-12)
    h_loss, h_m = D.REHEARSAL_FORMS["topk_sampled_tail"].loss(
        "forward_kl", D.topk_buckets(pol, ids), ref_b, mask, tok_logp=torch.zeros(2, 3, dtype=F64),
        tok_ref_logp=torch.zeros(2, 3, dtype=F64), tok_in_topk=torch.ones(2, 3, dtype=torch.bool), **kw)
    assert h_loss.item() == pytest.approx(want.item(), rel=1e-12)  # K = V: every token is in the top-k
    assert h_m["div/tok_in_topk_frac"] == 1.0
