"""pass@k: exact agreement with brute-force enumeration, stability at large n, input validation."""

from __future__ import annotations

import math
import subprocess
import sys
from fractions import Fraction
from itertools import combinations

import pytest

import dphrl.evaluation
from dphrl.evaluation import pass_at_k
from dphrl.evaluation.metrics import ks_for, pass_at_k_curve


def brute_force(n: int, c: int, k: int) -> Fraction:
    """Fraction of k-subsets of n samples (the first c correct) containing at least one correct."""
    subsets = list(combinations(range(n), k))
    hits = sum(1 for s in subsets if any(i < c for i in s))
    return Fraction(hits, len(subsets))


def test_exported_name():
    assert dphrl.evaluation.pass_at_k is pass_at_k


@pytest.mark.parametrize("n", range(1, 13))
def test_matches_brute_force_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            exact = brute_force(n, c, k)
            got = pass_at_k(n, c, k)
            assert got == float(exact), (n, c, k, got, exact)  # correctly rounded, not just close


def exact_fraction(n: int, c: int, k: int) -> Fraction:
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


@pytest.mark.parametrize(
    "n,c,k",
    [
        (1024, 1, 1),
        (1024, 1, 1024),
        (1024, 1, 512),
        (1024, 3, 7),
        (1024, 512, 512),
        (1024, 1000, 16),
        (1024, 10, 1000),
        (1024, 1023, 1),
        (1000, 1, 999),
        (777, 5, 300),
    ],
)
def test_large_n_exact_points(n, c, k):
    got = pass_at_k(n, c, k)
    assert math.isfinite(got) and 0.0 <= got <= 1.0
    assert got == float(exact_fraction(n, c, k))


def test_large_n_grid_finite_monotone():
    n = 1024
    ks = ks_for(n)
    for c in (0, 1, 2, 5, 50, 500, 1000, 1024):
        vals = [pass_at_k(n, c, k) for k in ks]
        assert all(math.isfinite(v) and 0.0 <= v <= 1.0 for v in vals)
        assert vals == sorted(vals)  # non-decreasing in k
        assert vals[0] == pytest.approx(c / n, abs=1e-15)  # pass@1 = c/n
    for k in (1, 8, 64, 1024):
        vals = [pass_at_k(n, c, k) for c in range(0, n + 1, 31)]
        assert vals == sorted(vals)  # non-decreasing in c


def test_product_form_beyond_exact_range():
    # n > 4096 uses the log-space product; compare with the exact rational value.
    for n, c, k in [(5000, 1, 1), (5000, 3, 100), (5000, 100, 4000), (8192, 1, 8192 - 1), (6000, 2, 10)]:
        got = pass_at_k(n, c, k)
        assert math.isfinite(got) and 0.0 <= got <= 1.0
        assert got == pytest.approx(float(exact_fraction(n, c, k)), rel=1e-12, abs=1e-300)


def test_edge_values():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c < k: every 3-subset has a correct one
    assert pass_at_k(4, 1, 2) == 0.5
    assert pass_at_k(16.0, 4, 2) == pass_at_k(16, 4, 2)  # integral floats accepted


@pytest.mark.parametrize(
    "n,c,k",
    [
        (4, 5, 1),
        (4, -1, 1),
        (4, 2, 0),
        (4, 2, 5),
        (0, 0, 1),
        (4, 2, -1),
        (4, 2, 1.5),
        (4, "2", 1),
        (4, True, 1),
    ],
)
def test_bad_input_raises(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_ks_for():
    assert ks_for(1) == [1]
    assert ks_for(16) == [1, 2, 4, 8, 16]
    assert ks_for(12) == [1, 2, 4, 8, 12]
    assert ks_for(1024)[-1] == 1024 and len(ks_for(1024)) == 11
    with pytest.raises(ValueError):
        ks_for(0)


def test_curve_is_mean_over_problems():
    counts = [0, 1, 4]
    curve = pass_at_k_curve(4, counts)
    assert list(curve) == [1, 2, 4]
    assert curve[1] == pytest.approx((0 + 0.25 + 1) / 3)
    assert curve[2] == pytest.approx((0 + 0.5 + 1) / 3)
    assert curve[4] == pytest.approx(2 / 3)
    assert pass_at_k_curve(4, counts, ks=[3]) == {3: pytest.approx((0 + 0.75 + 1) / 3)}


def test_import_is_light():
    code = (
        "import sys, dphrl.evaluation as e; e.pass_at_k(4, 1, 2); "
        "print(sorted(m for m in ('torch', 'transformers', 'matplotlib') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
