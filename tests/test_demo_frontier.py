"""The demo's matched-Pass@1 comparison: interpolation, mean ± std over seeds, who is on top and by how
much."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dphrl.compare.summary import interp as _interp
from dphrl.compare.summary import load_seed_results
from dphrl.compare.summary import matched_frontier as _matched
from dphrl.compare.summary_md import summary_markdown
from dphrl.demo import IND, OOD

#: two families, each its method (eta 0.0) and one sweep point (eta 1.0)
FAMILIES = {"a": ["a", "a@eta=1.0"], "b": ["b", "b@eta=1.0"]}


def matched_frontier(seeds: list[dict[str, Path]], grid: int = 4) -> dict:
    return _matched(load_seed_results(seeds), FAMILIES, {"in": IND, "ood": OOD}, 16, grid=grid)


def _summary_md(summary: dict) -> str:
    return summary_markdown(summary, title="demo", k=16)


def _run(root: Path, name: str, p1: float, p16: float, ood16: float) -> Path:
    run = root / name
    (run / "eval").mkdir(parents=True)
    res = {"datasets": {IND: {"pass@k": {"1": p1, "16": p16}}, OOD: {"pass@k": {"1": p1, "16": ood16}}}}
    (run / "eval" / "results.json").write_text(json.dumps(res))
    return run


def test_interp():
    pts = [(0.5, 1.0), (0.7, 0.0), (0.6, 0.4)]
    assert _interp(pts, 0.55) == pytest.approx(0.7)
    assert _interp(pts, 0.65) == pytest.approx(0.2)
    assert _interp(pts, 0.7) == pytest.approx(0.0)
    assert _interp(pts, 0.71) is None and _interp(pts, 0.49) is None


def test_matched_frontier_by_hand(tmp_path):
    seeds = []
    # two seeds; family a's Pass@16 is 0.1 higher, b's OOD 0.01 higher
    for s, shift in enumerate((0.0, 0.02)):
        d = tmp_path / f"seed{s}"
        seeds.append({
            "a": _run(d, "a", 0.5, 0.8 + shift, 0.70),
            "a@eta=1.0": _run(d, "a@eta=1.0", 0.7, 0.6 + shift, 0.50),
            "b": _run(d, "b", 0.5, 0.7 + shift, 0.71),
            "b@eta=1.0": _run(d, "b@eta=1.0", 0.7, 0.5 + shift, 0.51),
        })
    m = matched_frontier(seeds, grid=3)
    assert m["families"] == ["a", "b"] and m["overlap"] == pytest.approx([0.5, 0.7])
    mid = m["points"][1]  # Pass@1 0.6: a = 0.7 / 0.72 (mean 0.71, std 0.0141), b = 0.61
    assert mid["pass@1"] == pytest.approx(0.6)
    assert mid["in"]["a"][0] == pytest.approx(0.71) and mid["in"]["a"][1] == pytest.approx(0.02 / 2**0.5)
    assert (mid["top_in"], mid["second_in"], mid["clear_in"]) == ("a", "b", True)
    assert mid["margin_in"] == pytest.approx(0.1)
    # out of domain b leads by 0.01 with zero seed std: on top, and clearly
    assert (mid["top_ood"], mid["clear_ood"]) == ("b", True) and mid["margin_ood"] == pytest.approx(0.01)
    summary = {"seeds": 2, "table": {}, "checks": {}, "sweep": {}, "matched": m}
    md = _summary_md(summary)
    assert "a is on top at 3 of 3 matched Pass@1 values, by more than the seed std at 3 of them." in md
    assert "b is on top at 3 of 3" in md


def test_matched_frontier_within_noise(tmp_path):
    seeds = []
    for s, (da, db) in enumerate(((0.05, 0.0), (0.0, 0.04))):  # a ahead on one seed, b on the other
        d = tmp_path / f"seed{s}"
        seeds.append({
            "a": _run(d, "a", 0.5, 0.8 + da, 0.7), "a@eta=1.0": _run(d, "a@eta=1.0", 0.7, 0.6 + da, 0.5),
            "b": _run(d, "b", 0.5, 0.8 + db, 0.7), "b@eta=1.0": _run(d, "b@eta=1.0", 0.7, 0.6 + db, 0.5),
        })
    row = matched_frontier(seeds, grid=2)["points"][0]
    assert row["top_in"] == "a" and row["margin_in"] == pytest.approx(0.005) and row["clear_in"] is False


def test_one_seed_claims_no_std_comparison(tmp_path):
    d = tmp_path / "seed0"
    runs = {"a": _run(d, "a", 0.5, 0.8, 0.7), "a@eta=1.0": _run(d, "a@eta=1.0", 0.7, 0.6, 0.5),
            "b": _run(d, "b", 0.5, 0.7, 0.7), "b@eta=1.0": _run(d, "b@eta=1.0", 0.7, 0.5, 0.5)}
    m = matched_frontier([runs], grid=2)
    assert m["points"][0]["clear_in"] is None
    md = _summary_md({"seeds": 1, "table": {}, "checks": {}, "sweep": {}, "matched": m})
    assert "one seed: no seed std to compare the lead with" in md and "by more than" not in md


def test_without_sweep_there_is_no_matched_comparison(tmp_path):
    """`make demo` (no --sweep): each family has one point, so no curve and no comparison (was a KeyError)."""
    d = tmp_path / "seed0"
    runs = {"a": _run(d, "a", 0.5, 0.8, 0.7), "b": _run(d, "b", 0.5, 0.7, 0.7)}
    assert matched_frontier([runs]) == {}
    md = _summary_md({"seeds": 1, "table": {}, "checks": {}, "sweep": {}, "matched": {}})
    assert "matched Pass@1" not in md


def test_more_families_join_the_sweep_at_three_coefficients(tmp_path):
    """``dphrl demo --more-families --sweep``: passk, pkpo, w-reinforce, kl-cov and clip-cov train under
    the shared policy loss at 3 coefficients each, beside the divergence families (same seeds, same
    frontier); every run's config is valid."""
    from dphrl.compare.jobs import plan
    from dphrl.config import TrainConfig
    from dphrl.demo import MORE_METHODS, SHARED_LOSS, demo_experiment, demo_size

    exp = demo_experiment(demo_size(more_families=True), seeds=2, sweep=True)
    families = exp.sweep_runs()
    for fam in MORE_METHODS:
        assert fam in exp.main_runs() and len(families[fam]) >= 3, fam
        shared = {k: v for k, v in SHARED_LOSS.items() if not (fam == "w-reinforce-tm" and k == "loss_agg")}
        assert all(MORE_METHODS[fam][k] == v for k, v in shared.items()), fam
    assert MORE_METHODS["w-reinforce-tm"]["loss_agg"] == "token-mean"  # the authors' aggregation
    assert {"rkl", "rkl-k3", "dph-f", "dph-js", "dph-f-topk"} <= set(families)
    trains = [j for j in plan(exp, tmp_path) if j.kind == "train"]
    assert len(trains) == 2 * len(exp.run_overrides())
    for j in trains:
        TrainConfig(**j.spec["config"])  # validates
    assert "passk" not in demo_experiment(demo_size(), seeds=1, sweep=True).run_overrides()


def test_a_partial_report_marks_rows_with_fewer_seeds():
    """Mid-experiment (seed 1 of 3 finished for one method) the summary must not pass a one-seed row's
    ± 0 for agreement between seeds."""
    summary = {"seeds": 3, "runs_per_seed": {"base": 3, "grpo": 3, "dph": 1},
               "table": {"base": {"pass@1": (0.4, 0.0)}, "grpo": {"pass@1": (0.8, 0.02)},
                         "dph": {"pass@1": (0.6, 0.0)}},
               "sweep": {}, "checks": {}, "claims": [], "matched": {},
               "forgetting": {"grpo": (0.02, 0.005), "dph": (0.006, 0.0)},
               "timing": {"per_run": {}, "total_job_seconds": 0.0}, "failed": {}}
    md = _summary_md(summary)
    assert "| dph (1 of 3 seeds) | 0.600 ± 0.000 |" in md
    assert "| grpo | 0.800 ± 0.020 |" in md and "| base |" in md
    assert "not comparable in spread" in md
    assert "| dph (1 of 3 seeds) | 0.0060 ± 0.0000 |" in md and "| grpo | 0.0200 ± 0.0050 |" in md
    summary["runs_per_seed"]["dph"] = 3
    md = _summary_md(summary)
    assert "| dph | 0.600" in md and "seeds) |" not in md and "not comparable" not in md
