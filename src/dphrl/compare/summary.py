"""The numbers of a compare report: the side-by-side table, the claims, the matched-Pass@1 frontier,
forgetting and wall time, all as plain data (``summary.json``); :mod:`dphrl.compare.summary_md` words it.

Every view reads one metric of one run on one seed with :func:`metric` and aggregates seeds the same
way (mean ± sample std, std 0 for one seed). Runs without results on a seed (a failed job) are left
out of that seed and the summary says which.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dphrl.compare.experiment import Claim, Experiment

__all__ = ["against_curves", "check_claim", "interp", "load_seed_results", "matched_frontier", "metric",
           "paired_differences", "summarize"]

#: run -> results.json content, one dict per seed
SeedResults = list[dict[str, dict[str, Any]]]
MS = tuple[float, float]


def load_seed_results(per_seed: Sequence[dict[str, Path]]) -> SeedResults:
    """Per seed, run name -> its ``eval/results.json`` (runs without one are left out)."""
    out = []
    for runs in per_seed:
        out.append({n: json.loads((d / "eval" / "results.json").read_text()) for n, d in runs.items()
                    if (d / "eval" / "results.json").is_file()})
    return out


def metric(results: dict[str, Any], set_name: str, name: str) -> float | None:
    """One number of one results.json: ``pass@K``, ``greedy``, ``styles`` (effective number), ``answer acc``
    on ``set_name``, or ``forgetting`` (forward KL per token from the base; no set)."""
    if name == "forgetting":
        return (results.get("forgetting") or {}).get("forgetting/kl_per_token")
    d = results.get("datasets", {}).get(set_name) or {}
    if name.startswith("pass@"):
        return (d.get("pass@k") or {}).get(name[5:])
    if name == "styles":
        return (d.get("styles") or {}).get("effective_styles")
    return d.get({"greedy": "greedy", "answer acc": "answer_accuracy"}[name])


def _ms(xs: Sequence[float]) -> MS:
    return (statistics.mean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0)


def _values(res: SeedResults, run: str, set_name: str, name: str) -> list[float]:
    return [v for r in res if run in r for v in [metric(r[run], set_name, name)] if v is not None]


def row_keys(exp: Experiment, res: SeedResults) -> list[tuple[str, str, str]]:
    """The table's columns as (key, set, metric): in domain Pass@1, Pass@K and effective styles (the
    collapse); per other set Pass@1, Pass@K and answer accuracy (lost skill vs narrowed solutions)."""
    ev, K = exp.eval_spec, exp.eval_spec.n
    any_run = [r for seed in res for r in seed.values()]

    def has(set_name: str, name: str) -> bool:
        return any(metric(r, set_name, name) is not None for r in any_run)

    cols = [("pass@1", ev.in_name, "pass@1"), (f"pass@{K}", ev.in_name, f"pass@{K}")]
    cols += [("styles", ev.in_name, "styles")] if has(ev.in_name, "styles") else []
    for name, label in list(ev.labels().items())[1:]:
        cols += [(f"{label} pass@1", name, "pass@1"), (f"{label} pass@{K}", name, f"pass@{K}")]
        cols += [(f"{label} answer acc", name, "answer acc")] if has(name, "answer acc") else []
    return cols


def _row(res: SeedResults, run: str, cols: list[tuple[str, str, str]]) -> dict[str, MS]:
    return {key: _ms(vals) for key, s, m in cols if (vals := _values(res, run, s, m))}


# ------------------------------------------------------------------------------------------------- claims
def check_claim(claim: Claim, exp: Experiment, res: SeedResults) -> tuple[bool | None, str]:
    """(holds, the numbers) of one claim on ``res`` (several seeds: their means; ``beyond_std`` then also
    needs each gap to exceed the larger seed std). None when a run it names has no results."""
    set_name = exp.set_of(claim.set) if claim.metric != "forgetting" else ""
    left = list(exp.methods) if claim.names("left") == ["*"] else claim.names("left")
    rights: list[str | float] = ([float(claim.right)] if isinstance(claim.right, int | float)
                                 else claim.names("right"))

    def stat(run: str) -> MS | None:
        vals = _values(res, run, set_name, claim.metric)
        return _ms(vals) if vals else None

    parts, ok = [], True
    for lrun in left:
        ls = stat(lrun)
        for r in rights:
            rs = (float(r), 0.0) if isinstance(r, float) else stat(r)
            if ls is None or rs is None:
                missing = lrun if ls is None else r
                return None, f"not checked: {missing} has no {claim.metric} results"
            target = claim.scale * rs[0] + claim.offset
            holds = {"<": ls[0] < target, "<=": ls[0] <= target,
                     ">": ls[0] > target, ">=": ls[0] >= target}[claim.op]
            rhs = f"{r:g}" if isinstance(r, float) else f"{r} {rs[0]:.3f}"
            if claim.scale != 1 or claim.offset:
                rhs = (f"{claim.scale:g} x " if claim.scale != 1 else "") + rhs
                rhs += (f" {'+' if claim.offset > 0 else '-'} {abs(claim.offset):g}" if claim.offset else "")
                rhs += f" = {target:.3f}"
            # the relation as it is: the claim's operator where it holds, its negation where it does not
            shown = claim.op if holds else {"<": ">=", "<=": ">", ">": "<=", ">=": "<"}[claim.op]
            text = f"{lrun} {ls[0]:.3f} {shown} {rhs}"
            if claim.beyond_std and isinstance(r, str):
                gap, std = ls[0] - claim.scale * rs[0], max(ls[1], rs[1])
                holds = holds and abs(gap) > std
                text += f" (gap {gap:+.3f}, std {std:.3f})"
            ok = ok and holds
            parts.append(text)
    return ok, "; ".join(parts)


# ------------------------------------------------------------------------------------ paired differences
def _diff_stats(diffs: Sequence[float]) -> dict[str, Any]:
    """mean, sample std, n, agree (differences with the mean's sign) and clear (2+ seeds, all agree,
    |mean| > std; None with one) of per-seed differences."""
    mean, std = _ms(diffs)
    agree = sum(1 for d in diffs if d * mean > 0)
    return {"mean": mean, "std": std, "n": len(diffs), "agree": agree,
            "clear": (agree == len(diffs) and abs(mean) > std) if len(diffs) > 1 else None}


def paired_differences(res: SeedResults, runs: Sequence[str],
                       cols: Sequence[tuple[str, str, str]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Every pair of ``runs`` (later minus earlier), every column of ``cols`` and ``forgetting``: the
    difference on each seed where both runs have the number, then over those seeds its mean, sample std
    (0 for one seed), ``n`` and ``agree`` (seeds whose difference has the mean's sign, a zero counting
    for neither). ``clear``: at least 2 seeds, all agree and |mean| > std; None with one seed.

    Pairing by seed removes what two runs of one seed share (store, data order, first rollouts), so a
    gap smaller than the spread of either run can still be consistent; ``clear`` asks for both.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    keys = [*cols, ("forgetting", "", "forgetting")]
    for j, a in enumerate(runs):
        for b in runs[:j]:
            row = {}
            for key, set_name, name in keys:
                diffs = [va - vb for r in res if a in r and b in r
                         for va, vb in [(metric(r[a], set_name, name), metric(r[b], set_name, name))]
                         if va is not None and vb is not None]
                if not diffs:
                    continue
                row[key] = _diff_stats(diffs)
            if row:
                out[f"{a} - {b}"] = row
    return out


def against_curves(res: SeedResults, families: dict[str, list[str]], runs: Sequence[str],
                   cols: Sequence[tuple[str, str, str]], in_set: str) -> dict[str, dict[str, dict[str, Any]]]:
    """Each run against each swept family's curve at the run's own in-domain Pass@1.

    Per seed: the family's runs give (Pass@1, metric) points; the metric is interpolated linearly at the
    run's Pass@1 when it lies inside the family's Pass@1 range on that seed (else the seed is left out
    and counted in ``outside``); the difference run − curve is aggregated as in
    :func:`paired_differences`. Every column of ``cols`` and ``forgetting``. A run of the family itself
    is not compared with it. Key ``"run vs family"``; {} when no family has 2 runs.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    keys = [*cols, ("forgetting", "", "forgetting")]
    for fam, members in families.items():
        for run in runs:
            if run in members:
                continue
            row = {}
            for key, set_name, name in keys:
                if set_name == in_set and name == "pass@1":
                    continue  # matched by construction
                diffs, outside = [], 0
                for r in res:
                    pts = _curve(r, members, in_set, set_name, name)
                    x, y = ((metric(r[run], in_set, "pass@1"), metric(r[run], set_name, name)) if run in r
                            else (None, None))
                    if len(pts) < 2 or x is None or y is None:
                        continue
                    at = interp(pts, x)
                    if at is None:
                        outside += 1
                    else:
                        diffs.append(y - at)
                if not diffs and not outside:
                    continue
                row[key] = {**(_diff_stats(diffs) if diffs else {"n": 0}), "outside": outside}
            if row:
                out[f"{run} vs {fam}"] = row
    return out


# -------------------------------------------------------------------------------------- matched frontier
def interp(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear interpolation of y at x through the points sorted by x (None outside their range)."""
    pts = sorted(points)
    if not pts or x < pts[0][0] - 1e-12 or x > pts[-1][0] + 1e-12:
        return None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return pts[-1][1] if abs(x - pts[-1][0]) < 1e-12 else pts[0][1]


def _curve(r: dict[str, dict[str, Any]], members: Sequence[str], in_set: str, set_name: str,
           name: str) -> list[tuple[float, float]]:
    """One seed's (in-domain Pass@1, metric) points of a family's runs that have both numbers."""
    pts = [(metric(r[n], in_set, "pass@1"), metric(r[n], set_name, name)) for n in members if n in r]
    return [(x, y) for x, y in pts if x is not None and y is not None]


def family_gaps(res: SeedResults, families: dict[str, list[str]], cols: Sequence[tuple[str, str, str]],
                in_set: str, grid: int = 5) -> dict[str, dict[str, dict[str, Any]]]:
    """Every pair of swept families at matched in-domain Pass@1, over the Pass@1 range both cover.

    Per seed: each family's runs give a curve (in-domain Pass@1 against the metric, linear between
    points); on the overlap [lo, hi] of the two curves' Pass@1 ranges the difference later − earlier
    family is averaged over ``grid`` evenly spaced Pass@1 values (one value when lo == hi). A seed where
    the ranges do not overlap (or a family has fewer than 2 points) is left out; those that do not
    overlap are counted in ``outside``. Aggregated over seeds as :func:`paired_differences`, plus
    ``overlap``: the mean [lo, hi] over the seeds used. Unlike :func:`matched_frontier` this needs no
    range common to every family, so a family far along the frontier still meets its neighbours.
    Every column of ``cols`` but in-domain Pass@1 (matched) and ``forgetting``. Key ``"a vs b"``.
    """
    out: dict[str, dict[str, dict[str, Any]]] = {}
    keys = [c for c in [*cols, ("forgetting", "", "forgetting")] if (c[1], c[2]) != (in_set, "pass@1")]
    fams = list(families)
    for j, a in enumerate(fams):
        for b in fams[:j]:
            row: dict[str, Any] = {}
            for key, set_name, name in keys:
                diffs, outside, spans = [], 0, []
                for r in res:
                    ca = _curve(r, families[a], in_set, set_name, name)
                    cb = _curve(r, families[b], in_set, set_name, name)
                    if len(ca) < 2 or len(cb) < 2:
                        continue
                    lo = max(min(x for x, _ in ca), min(x for x, _ in cb))
                    hi = min(max(x for x, _ in ca), max(x for x, _ in cb))
                    if hi < lo:
                        outside += 1
                        continue
                    xs = [lo + (hi - lo) * i / (grid - 1) for i in range(grid)] if hi > lo else [lo]
                    diffs.append(sum(interp(ca, x) - interp(cb, x) for x in xs) / len(xs))
                    spans.append((lo, hi))
                if not diffs and not outside:
                    continue
                row[key] = {**(_diff_stats(diffs) if diffs else {"n": 0}), "outside": outside}
                if spans:  # the same for every column (in-domain Pass@1) unless a number is missing
                    row["overlap"] = [sum(x for x, _ in spans) / len(spans),
                                      sum(y for _, y in spans) / len(spans)]
            if row:
                out[f"{a} vs {b}"] = row
    return out


def matched_frontier(res: SeedResults, families: dict[str, list[str]], sets: dict[str, str], k: int,
                     grid: int = 4) -> dict[str, Any]:
    """Pass@K on every set of every family at matched in-domain Pass@1.

    ``families``: family -> its run names (its coefficients); ``sets``: label -> set name, the first the
    in-domain set. Per seed, each family's runs give (Pass@1, Pass@K) points; Pass@K is interpolated
    linearly in Pass@1 at ``grid`` Pass@1 values spread over the range every family covers on every
    seed, then averaged over seeds (mean ± std). Per set label ``d``: ``top_d`` is the family with the
    highest mean, ``margin_d`` its lead over ``second_d`` and ``clear_d`` whether that lead exceeds the
    larger of the two seed stds (None with one seed). {} with fewer than 2 families of 2 runs.
    """
    in_set = next(iter(sets.values()))
    fams = [f for f, runs in families.items()
            if all(sum(1 for n in runs if n in seed) >= 2 for seed in res)]
    if len(fams) < 2:
        return {}
    curves: dict[str, list[dict[str, list[tuple[float, float]]]]] = {f: [] for f in fams}
    for fam in fams:
        for seed in res:
            runs = [seed[n] for n in families[fam] if n in seed]
            p1 = [metric(r, in_set, "pass@1") for r in runs]
            curves[fam].append({lab: list(zip(p1, [metric(r, s, f"pass@{k}") for r in runs]))
                                for lab, s in sets.items()})
    lab_in = next(iter(sets))
    lo = max(min(x for x, _ in c[lab_in]) for f in fams for c in curves[f])
    hi = min(max(x for x, _ in c[lab_in]) for f in fams for c in curves[f])
    if hi <= lo:
        return {"families": fams, "overlap": None}
    out: dict[str, Any] = {"families": fams, "overlap": [lo, hi], "points": [], "sets": dict(sets)}
    for x in [lo + (hi - lo) * i / (grid - 1) for i in range(grid)]:
        row: dict[str, Any] = {"pass@1": x}
        for lab in sets:
            vals = {f: _ms([interp(c[lab], x) for c in curves[f]]) for f in fams}
            row[lab] = vals
            first, second = sorted(vals, key=lambda f: vals[f][0], reverse=True)[:2]
            row[f"top_{lab}"], row[f"second_{lab}"] = first, second
            row[f"margin_{lab}"] = vals[first][0] - vals[second][0]
            row[f"clear_{lab}"] = (row[f"margin_{lab}"] > max(vals[first][1], vals[second][1])
                                   if len(res) > 1 else None)
        out["points"].append(row)
    return out


# ---------------------------------------------------------------------------------------------- summary
def _timing(status: dict[str, dict[str, Any]], jobs: list[dict[str, Any]]) -> dict[str, Any]:
    """Wall time per job, per run (mean ± std over seeds of its training and its evaluation), in total."""
    by_run: dict[str, dict[str, list[float]]] = {}
    for j in jobs:
        sec = status.get(j["id"], {}).get("seconds")
        if sec is not None:
            by_run.setdefault(j["run"] or "(prepare)", {}).setdefault(j["kind"], []).append(sec)
    return {"runs": {r: {k: _ms(v) for k, v in kinds.items()} for r, kinds in by_run.items()},
            "total_job_seconds": sum(s.get("seconds") or 0 for s in status.values())}


def summarize(exp: Experiment, per_seed: Sequence[dict[str, Path]],
              status: dict[str, dict[str, Any]] | None = None,
              jobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything the summary shows: main table, sweep/ablation table, claims (on the mean and per seed),
    the methods' differences paired by seed, the matched-Pass@1 frontier, forgetting, wall time and the
    jobs that failed."""
    res = load_seed_results(per_seed)
    cols = row_keys(exp, res)
    names = exp.main_runs()
    every = list(dict.fromkeys([*names, *exp.run_overrides()]))
    table = {n: _row(res, n, cols) for n in names if any(n in r for r in res)}
    extra = {n: _row(res, n, cols) for n in every if n not in names and any(n in r for r in res)}
    claims = []
    for c in exp.claim_specs:
        ok, detail = check_claim(c, exp, res)
        per_seed_ok = [check_claim(c, exp, [r])[0] for r in res] if len(res) > 1 else [ok]
        claims.append({"claim": c.describe(), "ok": ok, "detail": detail, "per_seed": per_seed_ok})
    labels = exp.eval_spec.labels()
    families = {f: [n for _, n in pts] for f, pts in exp.sweep_runs().items()}
    forgetting = {n: _ms(v) for n in every if (v := _values(res, n, "", "forgetting"))}
    status = status or {}
    return {
        "seeds": len(res),
        "seed_ids": list(exp.seeds),
        "runs_per_seed": {n: sum(n in r for r in res) for n in every},
        "table": table,
        "sweep": extra,
        "checks": {f"{c['claim']} ({c['detail']})": c["ok"] for c in claims},
        "claims": claims,
        "paired": paired_differences(res, list(exp.methods), cols),
        "against_curves": against_curves(res, families, list(exp.methods), cols, exp.eval_spec.in_name),
        "matched": matched_frontier(res, families, {labels[s]: s for s in labels}, exp.eval_spec.n),
        "family_gaps": family_gaps(res, families, cols, exp.eval_spec.in_name),
        "forgetting": forgetting,
        "timing": _timing(status, jobs or []),
        "failed": {i: s.get("error") for i, s in status.items() if s.get("state") in ("failed", "skipped")},
    }
