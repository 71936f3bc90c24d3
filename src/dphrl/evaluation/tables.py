"""Report tables: a :class:`Table` (Markdown, plain text, HTML; all escaped) and the tables built from
runs: results (pass@k, Δ vs base), diversity, style shares, forgetting and Pass@k over training steps."""

from __future__ import annotations

import html
from collections.abc import Sequence
from dataclasses import dataclass

from dphrl.evaluation.curves import (
    Point,
    eval_datasets,
    eval_kmax,
    eval_series,
    has_eval_styles,
    run_eval_curves,
)
from dphrl.evaluation.escape import md_escape, one_line
from dphrl.evaluation.report_data import (
    BASE_NAME,
    Run,
    Stat,
    base_run,
    datasets,
    delta,
    has,
    ks,
    lookup,
    mean_std,
    stats,
    style_shares,
    styles_of,
)


@dataclass
class Table:
    """A header and rows of cell strings, rendered as Markdown, plain text or HTML (all escaped)."""

    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        """GFM table; every cell goes through :func:`md_escape`, so each row keeps the header's columns."""
        lines = [
            "| " + " | ".join(md_escape(h) for h in self.header) + " |",
            "|" + "|".join("---" for _ in self.header) + "|",
        ]
        lines += ["| " + " | ".join(md_escape(c) for c in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def text(self) -> str:
        """Aligned plain-text table for a terminal (cells on one line, control characters replaced)."""
        rows = [[one_line(c) for c in r] for r in [self.header] + self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.header))]
        fmt = [
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows
        ]
        fmt.insert(1, "-" * len(fmt[0]))
        return "\n".join(fmt)

    def html(self) -> str:
        """HTML table; cells are escaped and put on one line (as in :meth:`markdown`)."""
        head = "".join(f"<th>{html.escape(one_line(h))}</th>" for h in self.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(one_line(c))}</td>" for c in row) + "</tr>"
            for row in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def fmt(s: Stat | None, *, pct: bool = True, digits: int = 1, sign: bool = False) -> str:
    """Cell text of a mean ± std: in percent unless ``pct`` is False, "-" when there is no value."""
    if s is None:
        return "-"
    scale = 100.0 if pct else 1.0
    mean = s[0] * scale
    txt = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    if s[1] is not None:
        txt += f" ± {s[1] * scale:.{digits}f}"
    return txt


def _count(s: Stat | None) -> str:
    """A count or ratio cell (not a percentage): two decimals."""
    return fmt(s, pct=False, digits=2)


def main_table(runs: Sequence[Run], *, base_name: str = BASE_NAME) -> Table:
    """Method × dataset rows: greedy, pass@k for every k, maj@K, effective styles, Δ vs base (points)."""
    base = base_run(runs, base_name)
    dsets = datasets(runs)
    all_ks = sorted({k for d in dsets for k in ks(runs, d)})
    has_maj = any(lookup(r, d, "maj@k") for run in runs for r in run.results for d in dsets)
    has_sty = any(lookup(r, d, "styles") for run in runs for r in run.results for d in dsets)
    kmaxes = {ks(runs, d)[-1] for d in dsets if ks(runs, d)}
    big_k = str(kmaxes.pop()) if len(kmaxes) == 1 else "K"  # K: each dataset's largest k
    header = ["dataset", "method", "seeds", "greedy"] + [f"pass@{k}" for k in all_ks]
    if has_maj:
        header.append(f"maj@{big_k}")
    if has_sty:
        header.append("eff. styles")
    if base is not None:
        header += ["Δ greedy", "Δ pass@1", f"Δ pass@{big_k}"]
    rows = []
    for d in dsets:
        d_ks = ks(runs, d)
        kmax = str(d_ks[-1]) if d_ks else None
        for run in runs:
            if not has(run, d):
                continue
            row = [d, run.name, str(len(run.results)), fmt(mean_std(run, d, "greedy"))]
            row += [fmt(mean_std(run, d, "pass@k", str(k))) for k in all_ks]
            if has_maj:
                row.append(fmt(mean_std(run, d, "maj@k", kmax)) if kmax else "-")
            if has_sty:
                row.append(_count(mean_std(run, d, "styles", "effective_styles")))
            if base is run:
                row += ["", "", ""]
            elif base is not None:
                row += [
                    fmt(delta(run, base, d, "greedy"), sign=True),
                    fmt(delta(run, base, d, "pass@k", "1"), sign=True),
                    fmt(delta(run, base, d, "pass@k", kmax), sign=True) if kmax else "-",
                ]
            rows.append(row)
    return Table(header, rows)


_DIVERSITY = {
    "distinct_correct_answers": "distinct correct answers",
    "distinct_correct_solutions": "distinct correct solutions",
    "distinct_1": "distinct-1",
    "distinct_2": "distinct-2",
    "pairwise_similarity": "pairwise sim. (Jaccard bigrams)",
}


def diversity_table(runs: Sequence[Run]) -> Table:
    """Method × dataset: distinct correct answers/solutions, distinct-1/2, pairwise similarity."""
    rows = [
        [d, run.name] + [_count(mean_std(run, d, "diversity", key)) for key in _DIVERSITY]
        for d in datasets(runs)
        for run in runs
        if has(run, d)
    ]
    return Table(["dataset", "method", *_DIVERSITY.values()], rows)


def style_table(runs: Sequence[Run]) -> Table | None:
    """Method × dataset: share of each style (percent) and the effective number of styles."""
    dsets = [d for d in datasets(runs) if styles_of(runs, d)]
    if not dsets:
        return None
    styles = sorted({s for d in dsets for s in styles_of(runs, d)})
    header = ["dataset", "method"] + [f"{s} %" for s in styles] + ["eff. styles"]
    rows = [
        [d, run.name]
        + [fmt(stats(style_shares(run, d, s))) for s in styles]
        + [_count(mean_std(run, d, "styles", "effective_styles"))]
        for d in dsets
        for run in runs
        if has(run, d, "styles")
    ]
    return Table(header, rows)


def forgetting_table(runs: Sequence[Run]) -> Table | None:
    """Method: forgetting, the forward KL from the base per token on the base's own samples of held-out
    prompts (``results["forgetting"]``, :mod:`dphrl.evaluation.forgetting`); None when no run has it."""
    def values(run: Run, key: str) -> list[float | None]:
        return [(r.get("forgetting") or {}).get(f"forgetting/{key}") for r in run.results]

    rows = [[run.name, str(sum(v is not None for v in values(run, "kl_per_token"))),
             fmt(stats(values(run, "kl_per_token")), pct=False, digits=4),
             fmt(stats(values(run, "stderr_per_token")), pct=False, digits=4),
             fmt(stats(values(run, "kl_per_seq")), pct=False, digits=3),
             _count(stats(values(run, "sequences")))]
            for run in runs if any(v is not None for v in values(run, "kl_per_token"))]
    if not rows:
        return None
    return Table(["method", "seeds", "KL per token", "its std. error", "KL per sequence", "base samples"],
                 rows)


def _step_str(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _ends(pts: Sequence[Point], first: float, last: float, *, pct: bool = True, digits: int = 1) -> str:
    """Cell text "value at step ``first`` → value at step ``last``" of a :func:`by_step` series."""
    at = {x: (m, sd) for x, m, sd in pts}
    return f"{fmt(at.get(first), pct=pct, digits=digits)} → {fmt(at.get(last), pct=pct, digits=digits)}"


def eval_table(runs: Sequence[Run]) -> Table | None:
    """Dataset × method: first and last evaluation step during training, pass@1 and pass@n there.

    n is the largest k the run logged for the dataset; effective styles are added when logged. None
    when no run has ``eval/...`` keys in its metrics.jsonl.
    """
    curves = run_eval_curves(runs)
    dsets = eval_datasets(curves)
    if not dsets:
        return None
    has_sty = has_eval_styles(curves, dsets)
    header = ["dataset", "method", "evals", "first step", "last step", "pass@1 first → last", "n"]
    header += ["pass@n first → last"] + (["eff. styles first → last"] if has_sty else [])
    rows = []
    for d in dsets:
        for run in runs:
            seeds = curves[run.name]
            steps = sorted({x for c in seeds for pts in c.get(d, {}).values() for x, _ in pts})
            if not steps:
                continue
            first, last = steps[0], steps[-1]
            kmax = eval_kmax(seeds, d)
            row = [d, run.name, str(len(steps)), _step_str(first), _step_str(last)]
            row.append(_ends(eval_series(seeds, d, "pass@1"), first, last))
            row += (
                [str(kmax), _ends(eval_series(seeds, d, f"pass@{kmax}"), first, last)] if kmax else ["-", "-"]
            )
            if has_sty:
                row.append(_ends(eval_series(seeds, d, "effective_styles"), first, last, pct=False, digits=2))
            rows.append(row)
    return Table(header, rows)
