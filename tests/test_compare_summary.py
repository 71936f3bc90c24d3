"""Claims on compare results: the formula, seed means and stds, '*' and lists, runs without results."""

from __future__ import annotations

import pytest

from dphrl.compare import Experiment
from dphrl.compare.summary import check_claim

IN, OOD = "add", "sub"


def _exp(claims: list[dict]) -> Experiment:
    spec = {"type": "styles", "op": "add", "split": "test", "limit": 4}
    return Experiment(base={"model": "m", "dataset": spec},
                      methods={"a": {"algorithm": "grpo"}, "b": {"algorithm": "grpo"}},
                      evaluation={"in_domain": {IN: spec}, "out_of_domain": {OOD: {**spec, "op": "sub"}},
                                  "n": 4},
                      claims=claims)


def _res(p4: float, ood4: float = 0.5, styles: float = 2.0) -> dict:
    return {"datasets": {IN: {"pass@k": {"1": 0.5, "4": p4}, "styles": {"effective_styles": styles}},
                         OOD: {"pass@k": {"1": 0.4, "4": ood4}}}}


SEEDS = [{"base": _res(0.90, styles=3.0), "a": _res(0.80, 0.6, 1.4), "b": _res(0.88, 0.7)},
         {"base": _res(0.90, styles=3.0), "a": _res(0.84, 0.6, 1.6), "b": _res(0.86, 0.8)}]


@pytest.mark.parametrize("claim,ok", [
    ({"metric": "pass@4", "left": "a", "op": "<=", "right": "base", "offset": -0.03}, True),  # 0.82 <= 0.87
    ({"metric": "pass@4", "left": "a", "op": "<=", "right": "base", "offset": -0.09}, False),  # 0.82 > 0.81
    ({"metric": "styles", "left": "a", "op": "<=", "right": "base", "scale": 0.5}, True),  # 1.5 <= 1.5
    ({"metric": "styles", "left": "a", "op": "<", "right": "base", "scale": 0.5}, False),
    # 0.75 > 0.6, 0.5
    ({"metric": "pass@4", "set": "ood", "left": "b", "op": ">", "right": ["a", "base"]}, True),
    ({"metric": "pass@4", "left": "*", "op": ">", "right": 0.85}, False),  # a: 0.82
    ({"metric": "pass@4", "left": "b", "op": ">=", "right": "a", "offset": 0.03}, True),  # 0.87 >= 0.85
    # gap 0.05 > std 0.028
    ({"metric": "pass@4", "left": "b", "op": ">", "right": "a", "beyond_std": True}, True),
    # 0.15 > 0.07
    ({"metric": "pass@4", "set": "ood", "left": "b", "op": ">", "right": "a", "beyond_std": True}, True),
])
def test_claim_on_seed_means(claim: dict, ok: bool):
    exp = _exp([claim])
    assert check_claim(exp.claim_specs[0], exp, SEEDS)[0] is ok


def test_beyond_std_needs_a_gap_larger_than_the_seed_std():
    # b ahead by 0.02, std 0.085
    seeds = [{"a": _res(0.80), "b": _res(0.90)}, {"a": _res(0.84), "b": _res(0.78)}]
    exp = _exp([{"metric": "pass@4", "left": "b", "op": ">", "right": "a"},
                {"metric": "pass@4", "left": "b", "op": ">", "right": "a", "beyond_std": True}])
    plain, strict = (check_claim(c, exp, seeds) for c in exp.claim_specs)
    assert plain[0] is True and strict[0] is False and "std 0.085" in strict[1]
    assert check_claim(exp.claim_specs[1], exp, seeds[1:])[0] is False  # seed 1 alone: b is behind


def test_a_run_without_results_leaves_the_claim_unchecked():
    exp = _exp([{"metric": "pass@4", "left": "*", "op": ">", "right": "base"}])
    ok, detail = check_claim(exp.claim_specs[0], exp, [{"base": _res(0.9), "a": _res(0.95)}])
    assert ok is None and detail == "not checked: b has no pass@4 results"


# --------------------------------------------------------------------------------------------------
# resume: finished jobs against the spec planned now


def _finished_job(tmp_path, spec):
    from dphrl.compare.jobs import Job

    job = Job(id="seed0/eval/base", kind="eval", seed=0, run="base", out=str(tmp_path / "base"), spec=spec)
    job.marker().parent.mkdir(parents=True)
    job.marker().write_text("{}")
    return job


def test_resume_refuses_a_changed_spec_and_ignores_settings_added_since(tmp_path):
    import pytest

    from dphrl.compare.jobs import SpecChanged, check_unchanged, write_jobs

    made = {"n": 8, "sets": {"add": {"path": "a.jsonl", "limit": 100}}}
    write_jobs(tmp_path, [_finished_job(tmp_path, made)], {})
    # a setting dphrl gained since (at its default): not compared, reported
    grown = {"n": 8, "gpu_memory_utilization": 0.3,
             "sets": {"add": {"path": "a.jsonl", "limit": 100, "x": 1}}}
    job = _finished_job(tmp_path / "again", grown)
    job.out = str(tmp_path / "base")
    assert check_unchanged(tmp_path, [job]) == ["seed0/eval/base: gpu_memory_utilization",
                                                "seed0/eval/base: sets.add.x"]
    for changed in ({**made, "n": 4}, {"sets": made["sets"]},  # a value changed; a key removed
                    {**made, "sets": {"add": {"path": "b.jsonl", "limit": 100}}}):
        job.spec = changed
        with pytest.raises(SpecChanged, match="seed0/eval/base is finished but was made with another spec"):
            check_unchanged(tmp_path, [job])
    job.spec = {**made, "n": 4}
    job.marker().unlink()  # an unfinished job may change freely
    assert check_unchanged(tmp_path, [job]) == []


# --------------------------------------------------------------------------------------------------
# differences paired by seed


def test_paired_differences_by_hand():
    from dphrl.compare.summary import paired_differences
    from dphrl.compare.summary_md import summary_markdown

    cols = [("pass@1", IN, "pass@1"), ("pass@4", IN, "pass@4"), ("ood pass@4", OOD, "pass@4")]
    seeds = [{**s, n: {**s[n], "forgetting": {"forgetting/kl_per_token": f}}}
             for s, n, f in [(SEEDS[0], "a", 0.02), (SEEDS[1], "a", 0.03)]]
    seeds = [{**s, "b": {**s["b"], "forgetting": {"forgetting/kl_per_token": f}}}
             for s, f in zip(seeds, (0.01, 0.005))]
    out = paired_differences(seeds, ["a", "b"], cols)
    assert list(out) == ["b - a"]
    row = out["b - a"]
    # pass@4: b - a = 0.08 (seed 0), 0.02 (seed 1): mean 0.05, std sqrt(2 * 0.03^2) = 0.0424
    assert row["pass@4"]["mean"] == pytest.approx(0.05)
    assert row["pass@4"]["std"] == pytest.approx(0.042426, 1e-4)
    assert row["pass@4"]["agree"] == 2 and row["pass@4"]["clear"] is True
    assert row["ood pass@4"]["mean"] == pytest.approx(0.15) and row["ood pass@4"]["clear"] is True
    # equal Pass@1 on both seeds: a zero difference agrees with nothing, and is not clear
    assert row["pass@1"]["mean"] == 0 and row["pass@1"]["agree"] == 0 and row["pass@1"]["clear"] is False
    # forgetting: -0.01, -0.025: mean -0.0175, std 0.0106 < 0.0175, both negative
    assert row["forgetting"]["mean"] == pytest.approx(-0.0175) and row["forgetting"]["clear"] is True
    # seeds that disagree in sign: not clear even with a mean gap
    mixed = paired_differences([{"a": _res(0.80), "b": _res(0.90)}, {"a": _res(0.84), "b": _res(0.78)}],
                               ["a", "b"], cols)["b - a"]["pass@4"]
    assert mixed["mean"] == pytest.approx(0.02) and mixed["agree"] == 1 and mixed["clear"] is False
    # one seed: no spread to compare with; a run missing on a seed leaves that seed out
    assert paired_differences(SEEDS[:1], ["a", "b"], cols)["b - a"]["pass@4"]["clear"] is None
    partial = paired_differences([SEEDS[0], {"a": SEEDS[1]["a"]}], ["a", "b"], cols)["b - a"]["pass@4"]
    assert partial["n"] == 1 and partial["mean"] == pytest.approx(0.08)
    md = summary_markdown({"seeds": 2, "table": {}, "sweep": {}, "paired": out}, title="t", k=4)
    assert "| b − a | +0.000 ± 0.000 (0/2) | **+0.050 ± 0.042 (2/2)** |" in md


def test_a_failed_claim_shows_the_relation_that_holds():
    exp = _exp([{"metric": "pass@4", "left": "a", "op": ">", "right": "base"}])
    ok, detail = check_claim(exp.claim_specs[0], exp, SEEDS)
    assert ok is False and detail == "a 0.820 <= base 0.900"


def test_against_curves_reads_the_family_at_the_methods_own_pass1():
    from dphrl.compare.summary import against_curves
    from dphrl.compare.summary_md import summary_markdown

    def res(p1: float, p4: float, kl: float) -> dict:
        return {"datasets": {IN: {"pass@k": {"1": p1, "4": p4}}},
                "forgetting": {"forgetting/kl_per_token": kl}}

    cols = [("pass@1", IN, "pass@1"), ("pass@4", IN, "pass@4")]
    fam = {"g": ["g", "g@max_steps=6"]}
    seeds = [
        # curve through (0.6, 0.95 / 0.01) and (0.8, 0.90 / 0.02); d at 0.7: 0.96 - 0.925, 0.005 - 0.015
        {"g": res(0.8, 0.90, 0.02), "g@max_steps=6": res(0.6, 0.95, 0.01), "d": res(0.7, 0.96, 0.005)},
        # the same curve; d at 0.65: 0.90 - 0.9375, 0.004 - 0.0125
        {"g": res(0.8, 0.90, 0.02), "g@max_steps=6": res(0.6, 0.95, 0.01), "d": res(0.65, 0.90, 0.004)},
        # d above the family's range: left out, counted
        {"g": res(0.8, 0.90, 0.02), "g@max_steps=6": res(0.6, 0.95, 0.01), "d": res(0.9, 0.99, 0.001)},
    ]
    out = against_curves(seeds, fam, ["g", "d"], cols, IN)
    assert list(out) == ["d vs g"]  # a run of the family is not compared with its own curve
    row = out["d vs g"]
    assert "pass@1" not in row  # matched by construction
    p4, kl = row["pass@4"], row["forgetting"]
    assert p4["n"] == 2 and p4["outside"] == 1 and p4["agree"] == 1 and p4["clear"] is False
    assert p4["mean"] == pytest.approx((0.035 - 0.0375) / 2)
    assert kl["mean"] == pytest.approx((-0.010 - 0.0085) / 2) and kl["clear"] is True  # std 0.00106
    md = summary_markdown({"seeds": 3, "table": {}, "sweep": {}, "against_curves": out}, title="t", k=4)
    assert "| d vs g | -0.001 ± 0.051 (1/2); outside on 1 | **-0.0092 ± 0.0011 (2/2)**; outside on 1 |" in md


def test_family_gaps_average_two_curves_over_the_pass1_range_both_cover():
    """Family vs family at matched Pass@1 needs no range common to every family: each pair is read over
    its own overlap, per seed, and a seed whose ranges do not meet is counted, not extrapolated."""
    from dphrl.compare.summary import family_gaps
    from dphrl.compare.summary_md import summary_markdown

    def res(p1: float, p4: float) -> dict:
        return {"datasets": {IN: {"pass@k": {"1": p1, "4": p4}}}}

    cols = [("pass@1", IN, "pass@1"), ("pass@4", IN, "pass@4")]
    fams = {"a": ["a1", "a2"], "b": ["b1", "b2", "b3"], "c": ["c1", "c2"]}
    a = {"a1": res(0.5, 0.90), "a2": res(0.7, 0.80)}  # y_a = 0.90 - 0.5 (x - 0.5)
    seeds = [
        # b: y = 0.70 + (x - 0.6) on [0.6, 0.8]; overlap [0.6, 0.7]; b - a linear: its value at 0.65,
        # 0.75 - 0.825 = -0.075. c: overlap with a is the single point 0.7: 0.5 - 0.8 = -0.3; with b
        # [0.7, 0.75], at its middle 0.725: 0.55 - 0.825 = -0.275
        {**a, "b1": res(0.6, 0.70), "b2": res(0.8, 0.90), "c1": res(0.7, 0.5), "c2": res(0.75, 0.6)},
        # b bends at 0.6; overlap [0.5, 0.7]; at 0.5, 0.55, 0.6, 0.65, 0.7: b - a = 0, 0, 0, 0.025, 0.05
        {**a, "b1": res(0.4, 0.95), "b2": res(0.6, 0.85), "b3": res(0.9, 0.85)},
        # b entirely above a's range: counted in outside; c absent: not counted
        {**a, "b1": res(0.8, 0.95), "b2": res(0.9, 0.90)},
    ]
    out = family_gaps(seeds, fams, cols, IN)
    assert list(out) == ["b vs a", "c vs a", "c vs b"]
    ba = out["b vs a"]
    assert "pass@1" not in ba and "forgetting" not in ba  # matched by construction; not measured
    p4 = ba["pass@4"]
    assert p4["mean"] == pytest.approx((-0.075 + 0.015) / 2)
    assert p4["std"] == pytest.approx(0.09 / 2**0.5)
    assert (p4["n"], p4["agree"], p4["outside"], p4["clear"]) == (2, 1, 1, False)
    assert ba["overlap"] == pytest.approx([0.55, 0.7])
    assert out["c vs a"]["pass@4"]["mean"] == pytest.approx(-0.3) and out["c vs a"]["pass@4"]["n"] == 1
    assert out["c vs b"]["pass@4"]["mean"] == pytest.approx(-0.275)
    assert out["c vs b"]["overlap"] == pytest.approx([0.7, 0.75])
    md = summary_markdown({"seeds": 3, "table": {}, "sweep": {}, "family_gaps": out}, title="t", k=4)
    assert "| b vs a | 0.550-0.700 | -0.030 ± 0.064 (1/2); outside on 1 |" in md
    assert "| c vs a | 0.700-0.700 | -0.300 ± 0.000 (1/1) |" in md
