"""benchmarks/divergence_optimum.py: exact Pass@k, the three optima (closed form, KKT, L-BFGS), limits."""

from __future__ import annotations

import importlib.util
import io
import math
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "divergence_optimum.py"
_spec = importlib.util.spec_from_file_location("divergence_optimum", SCRIPT)
dopt = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(dopt)

V3 = np.array([0.7, 0.5, 0.4])
P3 = np.array([0.05, 0.45, 0.50])


def test_pass_at_k_two_styles_by_enumeration():
    q, v = np.array([0.3, 0.7]), np.array([0.6, 0.2])
    # valid sets: {1,2} 0.12 -> always solved; {1} 0.48 -> miss w.p. 0.7; {2} 0.08 -> miss 0.3;
    # {} 0.32 -> never
    by_hand = 0.12 * 1 + 0.48 * (1 - 0.7**3) + 0.08 * (1 - 0.3**3)
    assert dopt.pass_at_k(q, v, 3) == pytest.approx(by_hand, abs=1e-15)
    assert dopt.pass_at_k(q, v, 1) == pytest.approx(dopt.pass_at_1(q, v)) == pytest.approx(0.32)
    # batched, and a single style: Pass@k = its validity for every k
    qs = np.array([[1.0, 0.0], [0.0, 1.0], [0.3, 0.7]])
    np.testing.assert_allclose(dopt.pass_at_k(qs, v, 5)[:2], [0.6, 0.2], atol=1e-15)


def test_pass_at_k_matches_monte_carlo():
    rng = np.random.default_rng(0)
    q, v, k = np.array([0.2, 0.5, 0.3]), V3, 4
    valid = rng.random((200_000, 3)) < v
    styles = rng.choice(3, size=(200_000, k), p=q)
    solved = np.take_along_axis(valid, styles, axis=1).any(axis=1)
    assert solved.mean() == pytest.approx(dopt.pass_at_k(q, v, k), abs=4e-3)


def test_reverse_kl_closed_form_by_hand_and_against_lbfgs():
    q = dopt.optimum("rkl", [0.5, 0.5], [1.0, 0.0], 1.0)
    assert q[0] == pytest.approx(math.e / (1 + math.e), abs=1e-14)
    for beta in (0.05, 0.3, 2.0):
        exact = dopt.optimum("rkl", P3, V3, beta)
        np.testing.assert_allclose(exact, P3 * np.exp(V3 / beta) / (P3 * np.exp(V3 / beta)).sum(), atol=1e-14)
        np.testing.assert_allclose(dopt.optimum_numeric("rkl", P3, V3, beta), exact, atol=1e-7)


def test_forward_kl_by_hand_and_kkt():
    # p = (1/2, 1/2), v = (1, 0), beta = 1: q_s = p_s / (x + gap_s), x^2 = 1/2 -> q_1 = 1/sqrt(2)
    q = dopt.optimum("fkl", [0.5, 0.5], [1.0, 0.0], 1.0)
    np.testing.assert_allclose(q, [1 / math.sqrt(2), 1 - 1 / math.sqrt(2)], atol=1e-14)
    for beta in (1e-3, 0.05, 0.3, 2.0, 50.0):
        q = dopt.optimum("fkl", P3, V3, beta)
        assert q.sum() == pytest.approx(1.0, abs=1e-14) and (q > 0).all()
        g = V3 + beta * P3 / q  # stationarity: the same multiplier for every style
        assert np.ptp(g) / g.mean() < 1e-9
        assert dopt.kkt_residual("fkl", q, P3, V3, beta) < 1e-9
    np.testing.assert_allclose(
        dopt.optimum_numeric("fkl", P3, V3, 0.1), dopt.optimum("fkl", P3, V3, 0.1), atol=1e-7
    )


@pytest.mark.parametrize("family", dopt.FAMILIES)
def test_every_family_is_the_maximiser(family):
    rng = np.random.default_rng(1)
    p4, v4 = np.array([0.006, 0.022, 0.059, 0.913]), np.array([0.35, 0.52, 0.45, 0.28])
    for beta in (0.02, 0.2, 1.0):
        q = dopt.optimum(family, p4, v4, beta)
        assert dopt.kkt_residual(family, q, p4, v4, beta) < 1e-9
        best = dopt.objective(family, q, p4, v4, beta)
        others = rng.dirichlet(np.ones(4), size=2000)
        assert (dopt.objective(family, others, p4, v4, beta) <= best + 1e-12).all()
        np.testing.assert_allclose(dopt.optimum_numeric(family, p4, v4, beta), q, atol=1e-6)


@pytest.mark.parametrize("family", dopt.FAMILIES)
def test_beta_limits(family):
    np.testing.assert_allclose(dopt.optimum(family, P3, V3, 1e5), P3, atol=1e-5)  # beta -> inf: the base
    assert dopt.optimum(family, P3, V3, 1e-5)[0] > 0.999  # beta -> 0: the best style alone
    # and a batched grid: Pass@1 non-increasing in beta
    fr = dopt.frontier(family, P3, V3, dopt.betas_grid(50), 16)
    assert np.all(np.diff(fr["pass1"]) <= 1e-12) and fr["kkt"].max() < 1e-9


def test_js_is_twice_jensen_shannon():
    q, p = np.array([0.2, 0.8]), np.array([0.6, 0.4])
    m = (q + p) / 2
    js = 0.5 * (q * np.log(q / m)).sum() + 0.5 * (p * np.log(p / m)).sum()
    assert dopt.divergence("js", q, p) == pytest.approx(2 * js, abs=1e-15)
    assert dopt.divergence("fkl", q, p) == pytest.approx(dopt.divergence("rkl", p, q), abs=1e-15)


def test_beta_for_pass1_hits_the_target():
    for family in dopt.FAMILIES:
        b = dopt.beta_for_pass1(family, P3, V3, np.array([0.5, 0.65]))
        np.testing.assert_allclose(
            dopt.pass_at_1(dopt.optimum(family, P3, V3, b), V3), [0.5, 0.65], atol=1e-9
        )


def test_findings_even_base_coincides_uneven_separates():
    even = dopt.compare([1 / 3] * 3, V3, 16, grid=120, exact_peaks=False)
    weak = dopt.compare(
        [0.006, 0.022, 0.059, 0.913], [0.35, 0.52, 0.45, 0.28], 16, grid=120, exact_peaks=False
    )
    assert even["pairs"]["rkl-fkl"]["max_abs"] < 1.0  # points of Pass@16
    assert dopt.signed_peaks(weak)["signed"] > 5.0  # reverse-KL well ahead of forward-KL
    i = int(np.argmin(np.abs(np.asarray(weak["matched"]["pass1"]) - dopt.signed_peaks(weak)["at"])))
    r, f, j = (weak["matched"][name][i] for name in ("rkl", "fkl", "js"))
    assert f < j < r  # JS between
    assert dopt.weak_mass_index([0.006, 0.022, 0.059, 0.913], [0.35, 0.52, 0.45, 0.28]) > 0
    assert dopt.weak_mass_index([0.05, 0.8, 0.15], V3) < 0 < dopt.weak_mass_index([0.05, 0.15, 0.8], V3)
    buf = io.StringIO()
    dopt.print_base("even", even, out=buf)
    assert "rkl-fkl" in buf.getvalue() and "fkl-js" in buf.getvalue()
