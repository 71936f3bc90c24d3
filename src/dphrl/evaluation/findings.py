"""Findings in plain language: where a method beats the base at pass@1 but loses coverage at large k
(Pass@k collapse), loses everywhere (forgetting), keeps its large-k coverage or widens it.

A change at the largest k counts only beyond the larger of a fixed tolerance and, where the results
carry per-problem counts, two standard errors of the difference paired by problem: on 100 problems a
Pass@8 change of one problem is sampling noise, not a collapse."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from dphrl.evaluation.report_data import BASE_NAME, Run, base_run, datasets, delta, has, ks, paired_se

#: A change at the largest k of at most this (a fraction: 1 point) counts as "kept".
TOL = 0.01


def findings(runs: Sequence[Run], *, base_name: str = BASE_NAME, tol: float = TOL) -> list[str]:
    """Plain-language notes: where a method beats the base at pass@1 but loses at large k.

    Changes of at most ``tol`` (fraction, default 1 point), or of at most two paired standard errors
    where the results carry per-problem counts, at the largest k count as "kept". The
    notes carry ``**run**`` / ``*dataset*`` markers around the raw (unescaped) names.
    """
    return notes(runs, base_name, tol, run=lambda s: f"**{s}**", data=lambda s: f"*{s}*", text=str)


def notes(
    runs: Sequence[Run],
    base_name: str,
    tol: float,
    *,
    run: Callable[[str], str],
    data: Callable[[str], str],
    text: Callable[[str], str],
) -> list[str]:
    """:func:`findings` with the formatting of run names, dataset names and other text given.

    Every piece of a note goes through one of the three, so Markdown and HTML escape all of it.
    """
    base = base_run(runs, base_name)
    if base is None:
        return []
    out = []
    for d in datasets(runs):
        d_ks = ks(runs, d)
        if not d_ks:
            continue
        for r in runs:
            if r is base or not has(r, d):
                continue
            d1 = delta(r, base, d, "pass@k", "1")
            dk = delta(r, base, d, "pass@k", str(d_ks[-1]))
            if d1 is None or dk is None:
                continue
            curve = [(k, delta(r, base, d, "pass@k", str(k))) for k in d_ks]
            cross = next((k for k, v in curve if v is not None and v[0] < 0), None)
            head = run(r.name) + text(" on ") + data(d)
            vs = f": pass@1 {100 * d1[0]:+.1f} pts, pass@{d_ks[-1]} {100 * dk[0]:+.1f} pts vs {base.name}: "
            se = paired_se(r, base, d, d_ks[-1])
            bound = max(tol, 2 * se[0]) if se else tol
            within = (f"within ±{100 * bound:.1f} pts, 2 standard errors over {se[1]} problems" if se
                      and 2 * se[0] > tol else f"within {100 * tol:.0f} pt")
            if dk[0] < -bound and d1[0] > 0:
                tail = (
                    f"the pass@k curves cross at k = {cross}. RL narrowed the solutions "
                    "the model can reach (Pass@k collapse)."
                )
            elif dk[0] < -bound:
                tail = "worse at small and large k (forgetting)."
            elif dk[0] > bound:
                tail = "coverage at large k widened."
            else:
                tail = f"coverage at large k kept ({within})."
            out.append(head + text(vs + tail))
    return out
