"""Reports over evaluation runs: Markdown, self-contained HTML and PNG plots.

A *run dir* holds ``eval/results.json`` (or ``results.json`` at its root; a path to the JSON file
itself also works) and optionally ``metrics.jsonl``, the training log (one JSON object per line;
the keys of :data:`TRAINING_PANELS` that are present get plotted against ``step``). Several dirs for
one name (seeds) are aggregated as mean ± sample std.
"""

from __future__ import annotations

import base64
import html
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASE_NAME = "base"

#: (panel title, keys tried in order) for training.png.
TRAINING_PANELS: list[tuple[str, list[str]]] = [
    ("Reward (mean)", ["reward/mean", "reward", "rewards/mean", "train/reward"]),
    ("Entropy", ["entropy", "entropy/mean", "actor/entropy"]),
    ("Divergence", ["div/value", "div/loss", "kl", "kl/value", "actor/kl"]),
    ("Response length", ["response_length/mean", "response_length", "length/mean"]),
]


@dataclass
class Run:
    """One named method: results (and training logs) of one or more seeds."""

    name: str
    dirs: list[Path]
    results: list[dict[str, Any]]
    training: list[list[dict[str, Any]]] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- loading
def find_results(run_dir: str | Path) -> Path:
    """``run_dir/eval/results.json``, else ``run_dir/results.json`` (or ``run_dir`` if it is a file)."""
    d = Path(run_dir)
    if d.is_file():
        return d
    for cand in (d / "eval" / "results.json", d / "results.json"):
        if cand.is_file():
            return cand
    raise FileNotFoundError(f"no eval/results.json or results.json in {d}")


def load_training_log(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` training log; malformed lines are skipped."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def _run_root(d: Path) -> Path:
    if d.is_file():
        d = d.parent
        if d.name == "eval":
            d = d.parent
    return d


def _default_name(d: Path) -> str:
    d = _run_root(Path(d))
    return d.parent.name if d.name == "eval" else d.name


def load_runs(run_dirs: Sequence[str | Path] | Mapping[str, str | Path | Sequence[str | Path]]) -> list[Run]:
    """Load runs from a list of dirs (named after the dir) or a mapping name -> dir or list of dirs."""
    if isinstance(run_dirs, Mapping):
        items = [(str(k), [v] if isinstance(v, (str, Path)) else list(v)) for k, v in run_dirs.items()]
    else:
        items, seen = [], set()
        for d in run_dirs:
            name = base = _default_name(Path(d))
            i = 2
            while name in seen:
                name, i = f"{base}-{i}", i + 1
            seen.add(name)
            items.append((name, [d]))
    runs = []
    for name, dirs in items:
        if not dirs:
            raise ValueError(f"run {name!r} has no directories")
        paths = [Path(d) for d in dirs]
        results = [json.loads(find_results(p).read_text()) for p in paths]
        training = []
        for p in paths:
            root = _run_root(p)
            log = root / "metrics.jsonl"
            training.append(load_training_log(log) if log.is_file() else [])
        runs.append(Run(name, paths, results, training))
    return runs


# ------------------------------------------------------------------------------------------ aggregation
def _stats(values: Sequence[float | None]) -> tuple[float, float | None] | None:
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def _get(res: dict[str, Any], dataset: str, *path: str) -> Any:
    v: Any = res.get("datasets", {}).get(dataset)
    for p in path:
        if not isinstance(v, dict) or p not in v:
            return None
        v = v[p]
    return v


def _agg(run: Run, dataset: str, *path: str) -> tuple[float, float | None] | None:
    return _stats([_get(r, dataset, *path) for r in run.results])


def _datasets(runs: Sequence[Run]) -> list[str]:
    out: list[str] = []
    for run in runs:
        for r in run.results:
            for name in r.get("datasets", {}):
                if name not in out:
                    out.append(name)
    return out


def _ks(runs: Sequence[Run], dataset: str) -> list[int]:
    return sorted({int(k) for run in runs for r in run.results for k in (_get(r, dataset, "pass@k") or {})})


def _fmt(
    s: tuple[float, float | None] | None, *, pct: bool = True, digits: int = 1, sign: bool = False
) -> str:
    if s is None:
        return "-"
    scale = 100.0 if pct else 1.0
    mean = s[0] * scale
    txt = f"{mean:+.{digits}f}" if sign else f"{mean:.{digits}f}"
    if s[1] is not None:
        txt += f" ± {s[1] * scale:.{digits}f}"
    return txt


def _delta(run: Run, base: Run, dataset: str, *path: str) -> tuple[float, float | None] | None:
    """Mean over the run's seeds of (run − mean of base); std over the run's seeds."""
    b = _agg(base, dataset, *path)
    if b is None:
        return None
    return _stats([None if v is None else v - b[0] for v in (_get(r, dataset, *path) for r in run.results)])


# ----------------------------------------------------------------------------------------------- tables
@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.header) + " |", "|" + "|".join("---" for _ in self.header) + "|"]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def text(self) -> str:
        rows = [self.header] + self.rows
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.header))]
        fmt = [
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows
        ]
        fmt.insert(1, "-" * len(fmt[0]))
        return "\n".join(fmt)

    def html(self) -> str:
        head = "".join(f"<th>{html.escape(h)}</th>" for h in self.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in self.rows
        )
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _base(runs: Sequence[Run], base_name: str) -> Run | None:
    return next((r for r in runs if r.name == base_name), None)


def main_table(runs: Sequence[Run], *, base_name: str = BASE_NAME) -> Table:
    """Method × dataset rows: greedy, pass@k for every k, maj@K, effective styles, Δ vs base (points)."""
    base = _base(runs, base_name)
    dsets = _datasets(runs)
    all_ks = sorted({k for d in dsets for k in _ks(runs, d)})
    has_maj = any(_get(r, d, "maj@k") for run in runs for r in run.results for d in dsets)
    has_sty = any(_get(r, d, "styles") for run in runs for r in run.results for d in dsets)
    kmaxes = {_ks(runs, d)[-1] for d in dsets if _ks(runs, d)}
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
        ks = _ks(runs, d)
        kmax = str(ks[-1]) if ks else None
        for run in runs:
            if all(_get(r, d) is None for r in run.results):
                continue
            row = [d, run.name, str(len(run.results)), _fmt(_agg(run, d, "greedy"))]
            row += [_fmt(_agg(run, d, "pass@k", str(k))) for k in all_ks]
            if has_maj:
                row.append(_fmt(_agg(run, d, "maj@k", kmax)) if kmax else "-")
            if has_sty:
                row.append(_fmt(_agg(run, d, "styles", "effective_styles"), pct=False, digits=2))
            if base is not None:
                if run is base:
                    row += ["", "", ""]
                else:
                    row += [
                        _fmt(_delta(run, base, d, "greedy"), sign=True),
                        _fmt(_delta(run, base, d, "pass@k", "1"), sign=True),
                        _fmt(_delta(run, base, d, "pass@k", kmax), sign=True) if kmax else "-",
                    ]
            rows.append(row)
    return Table(header, rows)


def diversity_table(runs: Sequence[Run]) -> Table:
    """Method × dataset: distinct correct answers/solutions, distinct-1/2, pairwise similarity."""
    header = [
        "dataset",
        "method",
        "distinct correct answers",
        "distinct correct solutions",
        "distinct-1",
        "distinct-2",
        "pairwise sim. (Jaccard bigrams)",
    ]
    rows = []
    for d in _datasets(runs):
        for run in runs:
            if all(_get(r, d) is None for r in run.results):
                continue
            rows.append(
                [d, run.name]
                + [
                    _fmt(_agg(run, d, "diversity", key), pct=False, digits=2)
                    for key in (
                        "distinct_correct_answers",
                        "distinct_correct_solutions",
                        "distinct_1",
                        "distinct_2",
                        "pairwise_similarity",
                    )
                ]
            )
    return Table(header, rows)


def _styles_of(runs: Sequence[Run], d: str) -> list[str]:
    out: list[str] = []
    for run in runs:
        for r in run.results:
            for s in _get(r, d, "styles", "shares") or {}:
                if s not in out:
                    out.append(s)
    return sorted(out)


def style_table(runs: Sequence[Run]) -> Table | None:
    """Method × dataset: share of each style (percent) and the effective number of styles."""
    dsets = [d for d in _datasets(runs) if _styles_of(runs, d)]
    if not dsets:
        return None
    styles = sorted({s for d in dsets for s in _styles_of(runs, d)})
    header = ["dataset", "method"] + [f"{s} %" for s in styles] + ["eff. styles"]
    rows = []
    for d in dsets:
        for run in runs:
            if all(_get(r, d, "styles") is None for r in run.results):
                continue
            shares = [
                _fmt(
                    _stats(
                        [
                            (_get(r, d, "styles", "shares") or {}).get(s, 0.0)
                            for r in run.results
                            if _get(r, d, "styles") is not None
                        ]
                    )
                )
                for s in styles
            ]
            rows.append(
                [d, run.name]
                + shares
                + [_fmt(_agg(run, d, "styles", "effective_styles"), pct=False, digits=2)]
            )
    return Table(header, rows)


def findings(runs: Sequence[Run], *, base_name: str = BASE_NAME, tol: float = 0.01) -> list[str]:
    """Plain-language notes: where a method beats the base at pass@1 but loses at large k.

    Changes of at most ``tol`` (fraction, default 1 point) at the largest k count as "kept".
    """
    base = _base(runs, base_name)
    if base is None:
        return []
    notes = []
    for d in _datasets(runs):
        ks = _ks(runs, d)
        if not ks:
            continue
        for run in runs:
            if run is base or all(_get(r, d) is None for r in run.results):
                continue
            d1 = _delta(run, base, d, "pass@k", "1")
            dk = _delta(run, base, d, "pass@k", str(ks[-1]))
            if d1 is None or dk is None:
                continue
            curve = [(k, _delta(run, base, d, "pass@k", str(k))) for k in ks]
            cross = next((k for k, v in curve if v is not None and v[0] < 0), None)
            head = f"**{run.name}** on *{d}*: pass@1 {100 * d1[0]:+.1f} pts, pass@{ks[-1]} {100 * dk[0]:+.1f} pts"
            if dk[0] < -tol and d1[0] > 0:
                notes.append(
                    f"{head} vs {base.name}: the pass@k curves cross at k = {cross}. RL narrowed the solutions "
                    "the model can reach (Pass@k collapse)."
                )
            elif dk[0] < -tol:
                notes.append(f"{head} vs {base.name}: worse at small and large k (forgetting).")
            else:
                notes.append(f"{head} vs {base.name}: coverage at large k kept (within {100 * tol:.0f} pt).")
    return notes


# ------------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, max(1, n))
    return math.ceil(n / cols), cols


def _style_for(run: Run, i: int, base_name: str) -> dict[str, Any]:
    if run.name == base_name:
        return {"color": "black", "linestyle": "--"}
    colors = [
        "tab:blue",
        "tab:orange",
        "tab:green",
        "tab:red",
        "tab:purple",
        "tab:brown",
        "tab:pink",
        "tab:olive",
        "tab:cyan",
        "tab:gray",
    ]
    return {"color": colors[i % len(colors)], "linestyle": "-"}


def _save(fig: Any, axes: Any, used: int, path: Path) -> Path:
    """Hide the unused panels of a subplot grid, write the PNG and free the figure."""
    for ax in list(axes.flat)[used:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_passk(runs: Sequence[Run], path: Path, *, base_name: str = BASE_NAME) -> Path | None:
    """pass@k vs k (log2 axis): one subplot per dataset, one line per run, ±std band for seeds."""
    dsets = [d for d in _datasets(runs) if _ks(runs, d)]
    if not dsets:
        return None
    plt = _plt()
    nr, nc = _grid(len(dsets))
    fig, axes = plt.subplots(nr, nc, figsize=(4.6 * nc, 3.6 * nr), squeeze=False)
    for ax, d in zip(axes.flat, dsets):
        ks = _ks(runs, d)
        for i, run in enumerate(runs):
            pts = [(k, _agg(run, d, "pass@k", str(k))) for k in ks]
            pts = [(k, s) for k, s in pts if s is not None]
            if not pts:
                continue
            x = [k for k, _ in pts]
            y = [100 * s[0] for _, s in pts]
            st = _style_for(run, i, base_name)
            label = run.name + (f" (n={len(run.results)})" if len(run.results) > 1 else "")
            ax.plot(x, y, marker="o", markersize=3, label=label, **st)
            if any(s[1] is not None for _, s in pts):
                sd = [100 * (s[1] or 0.0) for _, s in pts]
                ax.fill_between(
                    x,
                    [a - b for a, b in zip(y, sd)],
                    [a + b for a, b in zip(y, sd)],
                    color=st["color"],
                    alpha=0.15,
                    linewidth=0,
                )
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.set_title(d)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, axes, len(dsets), path)


def _training_series(log: list[dict[str, Any]], keys: list[str]) -> list[tuple[float, float]]:
    key = next((k for k in keys if any(k in rec for rec in log)), None)
    if key is None:
        return []
    out = []
    for i, rec in enumerate(log):
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out.append((float(rec.get("step", i)), float(v)))
    return out


def plot_training(runs: Sequence[Run], path: Path, *, base_name: str = BASE_NAME) -> Path | None:
    """Training curves (reward, entropy, divergence, response length vs step) of runs that have logs."""
    panels = []
    for title, keys in TRAINING_PANELS:
        series = {run.name: [_training_series(log, keys) for log in run.training] for run in runs}
        if any(s for v in series.values() for s in v):
            panels.append((title, series))
    if not panels:
        return None
    plt = _plt()
    nr, nc = _grid(len(panels)) if len(panels) != 4 else (2, 2)
    fig, axes = plt.subplots(nr, nc, figsize=(4.8 * nc, 3.4 * nr), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        for i, run in enumerate(runs):
            seeds = [s for s in series[run.name] if s]
            if not seeds:
                continue
            by_step: dict[float, list[float]] = {}
            for s in seeds:
                for x, y in s:
                    by_step.setdefault(x, []).append(y)
            xs = sorted(by_step)
            ys = [statistics.fmean(by_step[x]) for x in xs]
            st = _style_for(run, i, base_name)
            if len(xs) > 30:  # raw faint + moving average
                w = max(2, len(xs) // 20)
                ax.plot(xs, ys, color=st["color"], alpha=0.25, linewidth=0.8)
                sm = [statistics.fmean(ys[max(0, j - w + 1) : j + 1]) for j in range(len(ys))]
                ax.plot(xs, sm, label=run.name, **st)
            else:
                ax.plot(xs, ys, marker="o", markersize=2, label=run.name, **st)
            if len(seeds) > 1:
                sd = [statistics.stdev(by_step[x]) if len(by_step[x]) > 1 else 0.0 for x in xs]
                ax.fill_between(
                    xs,
                    [a - b for a, b in zip(ys, sd)],
                    [a + b for a, b in zip(ys, sd)],
                    color=st["color"],
                    alpha=0.12,
                    linewidth=0,
                )
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, axes, len(panels), path)


def plot_styles(runs: Sequence[Run], path: Path) -> Path | None:
    """Stacked bars of style shares per run (mean over seeds), one subplot per dataset."""
    dsets = [d for d in _datasets(runs) if _styles_of(runs, d)]
    if not dsets:
        return None
    plt = _plt()
    nr, nc = _grid(len(dsets))
    fig, axes = plt.subplots(nr, nc, figsize=(max(4.6, 1.0 * len(runs) + 2.5) * nc, 3.8 * nr), squeeze=False)
    all_styles = sorted({s for d in dsets for s in _styles_of(runs, d)})
    cmap = plt.get_cmap("tab20")
    colors = {s: cmap(i % 20) for i, s in enumerate(all_styles)}
    for ax, d in zip(axes.flat, dsets):
        names, shares = [], []
        for run in runs:
            res = [r for r in run.results if _get(r, d, "styles") is not None]
            if not res:
                continue
            names.append(run.name)
            shares.append(
                {
                    s: statistics.fmean([(_get(r, d, "styles", "shares") or {}).get(s, 0.0) for r in res])
                    for s in _styles_of(runs, d)
                }
            )
        bottom = [0.0] * len(names)
        for s in _styles_of(runs, d):
            vals = [100 * sh[s] for sh in shares]
            ax.bar(names, vals, bottom=bottom, label=s, color=colors[s])
            bottom = [a + b for a, b in zip(bottom, vals)]
        ax.set_ylabel("share of labelled samples (%)")
        ax.set_title(d)
        ax.set_ylim(0, 100)
        ax.tick_params(axis="x", labelrotation=30)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, axes, len(dsets), path)


# ------------------------------------------------------------------------------------------------ report
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1200px;
color:#222;padding:0 1em}
table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;white-space:nowrap}
th{background:#f2f2f2}
td:nth-child(1),td:nth-child(2){text-align:left}
img{max-width:100%;border:1px solid #eee;margin:0.5em 0}
.note{background:#fff8e1;border-left:4px solid #f0ad4e;padding:0.5em 1em;margin:0.5em 0}
code{background:#f5f5f5;padding:1px 3px}
"""


def _md_inline_to_html(text: str) -> str:
    import re

    t = html.escape(text)
    t = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", t)
    return re.sub(r"\*(.+?)\*", r"<i>\1</i>", t)


def _config_lines(runs: Sequence[Run]) -> list[str]:
    lines = []
    for run in runs:
        cfgs = [r.get("config", {}) for r in run.results]
        c = cfgs[0] if cfgs else {}
        fails = sum(sum((cf.get("reward_failures") or {}).values()) for cf in cfgs)
        touts = sum(sum((cf.get("reward_timeouts") or {}).values()) for cf in cfgs)
        seeds = ", ".join(str(cf.get("seed")) for cf in cfgs)
        lines.append(
            f"{run.name}: model `{c.get('model')}`, n = {c.get('n')}, temperature {c.get('temperature')}, "
            f"top_p {c.get('top_p')}, max_new_tokens {c.get('max_new_tokens')}, seeds [{seeds}], "
            f"reward failures {fails}, time-outs {touts}; dirs: {', '.join(str(d) for d in run.dirs)}"
        )
    return lines


def write_report(
    run_dirs: Sequence[str | Path] | Mapping[str, str | Path | Sequence[str | Path]],
    out_dir: str | Path,
    *,
    title: str = "DPH-RL evaluation report",
    base_name: str = BASE_NAME,
) -> dict[str, Path]:
    """Write ``report.md``, ``report.html`` (self-contained) and PNG plots into ``out_dir``.

    ``run_dirs`` is a list of run dirs (named after the dir) or a mapping name -> dir or list of
    dirs (seeds, shown as mean ± std). A run named ``base_name`` gives the Δ columns and findings.
    Returns {"md", "html", "passk", "training"?, "styles"?: path}.
    """
    runs = load_runs(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    images: list[tuple[str, str, Path]] = []
    for key, caption, fn in (
        (
            "passk",
            "Pass@k vs k (log2 axis); dashed black: base",
            lambda p: plot_passk(runs, p, base_name=base_name),
        ),
        ("training", "Training curves", lambda p: plot_training(runs, p, base_name=base_name)),
        ("styles", "Style shares (stacked, per run)", lambda p: plot_styles(runs, p)),
    ):
        p = fn(out / f"{key}.png")
        if p is not None:
            paths[key] = p
            images.append((key, caption, p))

    main = main_table(runs, base_name=base_name)
    div = diversity_table(runs)
    sty = style_table(runs)
    notes = findings(runs, base_name=base_name)
    cfg = _config_lines(runs)
    legend = (
        "Values in percent; mean ± sample std over seeds where a method has several. "
        "pass@k: unbiased estimator from n samples at the run's temperature; greedy: one greedy response; "
        "maj@K: majority vote over the K = n samples; Δ: percentage points vs the run "
        f"named `{base_name}`."
    )

    md = [f"# {title}", "", legend, "", "## Results", "", main.markdown(), ""]
    if notes:
        md += ["## Findings", ""] + [f"- {n}" for n in notes] + [""]
    md += ["## Plots", ""] + [f"![{cap}]({p.name})" + "\n" for _, cap, p in images]
    md += [
        "## Diversity",
        "",
        "Means over problems (similarity: Jaccard over word bigrams of correct solutions).",
        "",
        div.markdown(),
        "",
    ]
    if sty is not None:
        md += ["## Styles", "", sty.markdown(), ""]
    md += ["## Runs", ""] + [f"- {line}" for line in cfg] + [""]
    paths["md"] = out / "report.md"
    paths["md"].write_text("\n".join(md))

    h = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{_md_inline_to_html(legend).replace('`', '')}</p>",
        "<h2>Results</h2>",
        main.html(),
    ]
    if notes:
        h += ["<h2>Findings</h2>"] + [f"<div class='note'>{_md_inline_to_html(n)}</div>" for n in notes]
    h.append("<h2>Plots</h2>")
    for _, cap, p in images:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        h.append(
            f"<figure><img alt='{html.escape(cap)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        )
    h += [
        "<h2>Diversity</h2>",
        "<p>Means over problems (similarity: Jaccard over word bigrams of correct solutions).</p>",
        div.html(),
    ]
    if sty is not None:
        h += ["<h2>Styles</h2>", sty.html()]
    h += ["<h2>Runs</h2><ul>"] + [f"<li>{html.escape(line)}</li>" for line in cfg] + ["</ul></body></html>"]
    paths["html"] = out / "report.html"
    paths["html"].write_text("\n".join(h))
    return paths


def print_table(
    runs: Sequence[str | Path] | Mapping[str, str | Path | Sequence[str | Path]] | Sequence[Run],
    *,
    base_name: str = BASE_NAME,
) -> str:
    """Print (and return) the method × dataset table of run dirs (same input as :func:`write_report`)."""
    items = list(runs.items()) if isinstance(runs, Mapping) else list(runs)
    loaded = items if items and all(isinstance(r, Run) for r in items) else load_runs(runs)  # type: ignore[arg-type]
    text = main_table(loaded, base_name=base_name).text()  # type: ignore[arg-type]
    notes = findings(loaded, base_name=base_name)  # type: ignore[arg-type]
    if notes:
        text += "\n\n" + "\n".join("* " + n.replace("**", "").replace("*", "") for n in notes)
    print(text)
    return text
