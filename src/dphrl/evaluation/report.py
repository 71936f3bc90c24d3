"""Reports over evaluation runs: Markdown, self-contained HTML and PNG plots.

A *run dir* holds ``eval/results.json`` (or ``results.json`` at its root; a path to the JSON file
itself also works) and optionally ``metrics.jsonl``, the training log (one JSON object per line;
the keys of :data:`TRAINING_PANELS` that are present get plotted against ``step``; evaluation during
training, keys ``eval/<dataset>/<metric>``, gets its own Pass@k-over-steps figure and table). Several
dirs for one name (seeds) are aggregated as mean ± sample std.

Run names, dataset names, style names (model output) and config values are untrusted: the Markdown
escapes them (:func:`md_escape`), the HTML escapes them, and plots draw them as plain text (no
mathtext, no TeX). A plot that fails to draw is named in the report; the rest is still written.
"""

from __future__ import annotations

import base64
import functools
import html
import json
import logging
import math
import re
import statistics
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

_log = logging.getLogger(__name__)

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


# ------------------------------------------------------------------------------------------ text safety
_LINE_BREAKS = re.compile(r"\r\n|[\t\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]")
# C0/C1 controls and the bidi controls (which would show a name reversed or reordered, "Trojan source")
_CONTROLS = re.compile(r"[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
# Markdown/GFM inline syntax: escapes, code spans, emphasis, links/images, table cells, headings,
# strikethrough and GitHub math; ``<`` ``>`` ``&`` become entities (no raw HTML, autolinks or entities).
_MD_BACKSLASHED = set("\\`*_[]|#~$")
_MD_ENTITIES = {"&": "&amp;", "<": "&lt;", ">": "&gt;"}


def _one_line(text: object) -> str:
    """``str(text)`` on one line: line breaks and tabs become spaces, other control and bidi
    control characters U+FFFD (visible, so a name cannot hide or reorder what follows)."""
    return _CONTROLS.sub("\ufffd", _LINE_BREAKS.sub(" ", str(text)))


def md_escape(text: object, *, line_start: bool = False) -> str:
    """Untrusted text -> Markdown (CommonMark/GFM) that renders as exactly that text, on one line.

    No HTML, links, autolinks, emphasis, code, math or table cell breaks can come out of it: it is
    safe in a table cell, a heading and inside ``**...**``. ``line_start`` also escapes what would
    open a block at the start of a line (list items, ``1.`` lists, setext underlines), for text that
    begins a list item. Line breaks become spaces (see :func:`_one_line`).
    """
    s = "".join("\\" + c if c in _MD_BACKSLASHED else _MD_ENTITIES.get(c, c) for c in _one_line(text))
    s = s.replace("://", "\\://")  # GFM bare-URL autolinks (http://, https://, ftp://)
    s = re.sub(r"(?i)\b(www)\.", r"\1\\.", s)  # GFM www. autolinks
    if line_start:
        s = s.lstrip(" ")
        if s[:1] in ("-", "+", "="):
            s = "\\" + s
        s = re.sub(r"^(\d{1,9})([.)])", r"\1\\\2", s)
    return s


def _plain(text: object, limit: int = 60) -> str:
    """A label for matplotlib: one line, at most ``limit`` characters (mathtext is off, see _plots)."""
    s = _one_line(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


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
        rows = [[_one_line(c) for c in r] for r in [self.header] + self.rows]
        widths = [max(len(r[i]) for r in rows) for i in range(len(self.header))]
        fmt = [
            "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
            for r in rows
        ]
        fmt.insert(1, "-" * len(fmt[0]))
        return "\n".join(fmt)

    def html(self) -> str:
        """HTML table; cells are escaped and put on one line (as in :meth:`markdown`)."""
        head = "".join(f"<th>{html.escape(_one_line(h))}</th>" for h in self.header)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(_one_line(c))}</td>" for c in row) + "</tr>"
            for row in self.rows
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

    Changes of at most ``tol`` (fraction, default 1 point) at the largest k count as "kept". The
    notes carry ``**run**`` / ``*dataset*`` markers around the raw (unescaped) names.
    """
    return _notes(runs, base_name, tol, run=lambda s: f"**{s}**", data=lambda s: f"*{s}*", text=str)


def _notes(
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
    base = _base(runs, base_name)
    if base is None:
        return []
    notes = []
    for d in _datasets(runs):
        ks = _ks(runs, d)
        if not ks:
            continue
        for r in runs:
            if r is base or all(_get(res, d) is None for res in r.results):
                continue
            d1 = _delta(r, base, d, "pass@k", "1")
            dk = _delta(r, base, d, "pass@k", str(ks[-1]))
            if d1 is None or dk is None:
                continue
            curve = [(k, _delta(r, base, d, "pass@k", str(k))) for k in ks]
            cross = next((k for k, v in curve if v is not None and v[0] < 0), None)
            head = run(r.name) + text(" on ") + data(d)
            vs = f": pass@1 {100 * d1[0]:+.1f} pts, pass@{ks[-1]} {100 * dk[0]:+.1f} pts vs {base.name}: "
            if dk[0] < -tol and d1[0] > 0:
                tail = (
                    f"the pass@k curves cross at k = {cross}. RL narrowed the solutions "
                    "the model can reach (Pass@k collapse)."
                )
            elif dk[0] < -tol:
                tail = "worse at small and large k (forgetting)."
            else:
                tail = f"coverage at large k kept (within {100 * tol:.0f} pt)."
            notes.append(head + text(vs + tail))
    return notes


# ---------------------------------------------------------------------------- evaluation during training
EVAL_PREFIX = "eval/"
_PASS_AT = re.compile(r"pass@(\d+)")

Curves = dict[str, dict[str, list[tuple[float, float]]]]


def _number(v: Any) -> float | None:
    """``v`` as a finite float, else None (bools, strings, NaN and inf are not numbers here)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def eval_curves(metrics_lines: Iterable[Mapping[str, Any] | str]) -> Curves:
    """Evaluation-during-training series of one ``metrics.jsonl``: {dataset: {metric: [(step, value)]}}.

    Reads the keys ``eval/<dataset>/<metric>`` (``pass@<k>``, ``greedy_acc``, ``mean_reward``,
    ``effective_styles``, ``distinct_correct``, ...) of each record (a dict, or a JSON line). The metric
    is what follows the last ``/``, so dataset names may hold spaces, parentheses and slashes. Eval
    lines may be separate from the training line of the same step: each series is keyed by step only,
    sorted by step, and a (dataset, metric, step) logged twice keeps the last value. Records without
    a numeric ``step`` and values that are not finite numbers are skipped.
    """
    acc: dict[str, dict[str, dict[float, float]]] = {}
    for rec in metrics_lines:
        if isinstance(rec, str):
            try:
                rec = json.loads(rec)
            except json.JSONDecodeError:
                continue
        if not isinstance(rec, Mapping):
            continue
        step = _number(rec.get("step"))
        if step is None:
            continue
        for key, value in rec.items():
            if not isinstance(key, str) or not key.startswith(EVAL_PREFIX):
                continue
            dataset, _, metric = key[len(EVAL_PREFIX) :].rpartition("/")
            v = _number(value)
            if dataset and metric and v is not None:
                acc.setdefault(dataset, {}).setdefault(metric, {})[step] = v
    return {d: {m: sorted(pts.items()) for m, pts in ms.items()} for d, ms in acc.items()}


def _by_step(series: Iterable[Sequence[tuple[float, float]]]) -> list[tuple[float, float, float | None]]:
    """(step, mean, sample std or None for one value) over seeds' series, sorted by step."""
    by: dict[float, list[float]] = {}
    for s in series:
        for x, y in s:
            by.setdefault(x, []).append(y)
    return [
        (x, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None) for x, v in sorted(by.items())
    ]


def _run_eval_curves(runs: Sequence[Run]) -> dict[str, list[Curves]]:
    """Run name -> the :func:`eval_curves` of each of its seeds' training logs."""
    return {run.name: [eval_curves(log) for log in run.training] for run in runs}


def _eval_datasets(curves: Mapping[str, list[Curves]]) -> list[str]:
    """Datasets with a pass@k or effective-styles series in any run, in order of appearance."""
    out: list[str] = []
    for seeds in curves.values():
        for c in seeds:
            for d, ms in c.items():
                if d not in out and any(_PASS_AT.fullmatch(m) or m == "effective_styles" for m in ms):
                    out.append(d)
    return out


def _eval_kmax(seeds: Sequence[Curves], d: str) -> int | None:
    """The largest k of a ``pass@k`` series for dataset ``d`` in any seed (None: no pass@k)."""
    ks = [int(m.group(1)) for c in seeds for k in c.get(d, {}) if (m := _PASS_AT.fullmatch(k))]
    return max(ks) if ks else None


def _eval_series(seeds: Sequence[Curves], d: str, metric: str) -> list[tuple[float, float, float | None]]:
    return _by_step(c.get(d, {}).get(metric, []) for c in seeds)


def _step_str(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _ends(
    pts: Sequence[tuple[float, float, float | None]],
    first: float,
    last: float,
    *,
    pct: bool = True,
    digits: int = 1,
) -> str:
    """Cell text "value at step ``first`` → value at step ``last``" of a :func:`_by_step` series."""
    at = {x: (m, sd) for x, m, sd in pts}
    return f"{_fmt(at.get(first), pct=pct, digits=digits)} → {_fmt(at.get(last), pct=pct, digits=digits)}"


def eval_table(runs: Sequence[Run]) -> Table | None:
    """Dataset × method: first and last evaluation step during training, pass@1 and pass@n there.

    n is the largest k the run logged for the dataset; effective styles are added when logged. None
    when no run has ``eval/...`` keys in its metrics.jsonl.
    """
    curves = _run_eval_curves(runs)
    dsets = _eval_datasets(curves)
    if not dsets:
        return None
    has_sty = any(
        "effective_styles" in c.get(d, {}) for seeds in curves.values() for c in seeds for d in dsets
    )
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
            kmax = _eval_kmax(seeds, d)
            row = [d, run.name, str(len(steps)), _step_str(first), _step_str(last)]
            row.append(_ends(_eval_series(seeds, d, "pass@1"), first, last))
            row += (
                [str(kmax), _ends(_eval_series(seeds, d, f"pass@{kmax}"), first, last)]
                if kmax
                else ["-", "-"]
            )
            if has_sty:
                row.append(
                    _ends(_eval_series(seeds, d, "effective_styles"), first, last, pct=False, digits=2)
                )
            rows.append(row)
    return Table(header, rows)


# ------------------------------------------------------------------------------------------------ plots
def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _plain_text_plot(fn: Callable[_P, _R]) -> Callable[_P, _R]:
    """Draw ``fn``'s figure with every text as plain text and never leak a figure.

    Run, dataset and style names are untrusted: ``$...$`` would be parsed as mathtext (and ``$$`` or
    ``$\\undefined$`` raise at savefig), so mathtext and TeX are switched off for the whole drawing
    (titles, legends and tick labels are created and drawn inside). Figures the call opened are
    closed even when it raises; missing-glyph warnings (emoji, CJK) are silenced.
    """

    @functools.wraps(fn)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        plt = _plt()
        before = set(plt.get_fignums())
        try:
            with (
                plt.rc_context({"text.usetex": False, "text.parse_math": False}),
                warnings.catch_warnings(),
            ):
                warnings.filterwarnings("ignore", message=r"Glyph .* missing from")
                return fn(*args, **kwargs)
        finally:
            for num in set(plt.get_fignums()) - before:
                plt.close(num)

    return wrapper


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


def _band(
    ax: Any, xs: list[float], ys: list[float], sds: list[float | None], color: str, alpha: float
) -> None:
    """A ±std band when any point has a std (several seeds)."""
    if any(s is not None for s in sds):
        sd = [s or 0.0 for s in sds]
        lo, hi = [a - b for a, b in zip(ys, sd)], [a + b for a, b in zip(ys, sd)]
        ax.fill_between(xs, lo, hi, color=color, alpha=alpha, linewidth=0)


@_plain_text_plot
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
            label = _plain(run.name) + (f" (n={len(run.results)})" if len(run.results) > 1 else "")
            ax.plot(x, y, marker="o", markersize=3, label=label, **st)
            _band(ax, x, y, [None if s[1] is None else 100 * s[1] for _, s in pts], st["color"], 0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.set_title(_plain(d))
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


@_plain_text_plot
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
            pts = _by_step(s for s in series[run.name] if s)
            if not pts:
                continue
            xs, ys, sds = [p[0] for p in pts], [p[1] for p in pts], [p[2] for p in pts]
            st = _style_for(run, i, base_name)
            if len(xs) > 30:  # raw faint + moving average
                w = max(2, len(xs) // 20)
                ax.plot(xs, ys, color=st["color"], alpha=0.25, linewidth=0.8)
                sm = [statistics.fmean(ys[max(0, j - w + 1) : j + 1]) for j in range(len(ys))]
                ax.plot(xs, sm, label=_plain(run.name), **st)
            else:
                ax.plot(xs, ys, marker="o", markersize=2, label=_plain(run.name), **st)
            _band(ax, xs, ys, sds, st["color"], 0.12)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, axes, len(panels), path)


@_plain_text_plot
def plot_eval_steps(runs: Sequence[Run], path: Path, *, base_name: str = BASE_NAME) -> Path | None:
    """Pass@k over training steps: per eval dataset, pass@1 and pass@n vs step for every run.

    The picture of diversity collapse as it happens: pass@1 (solid) rising while pass@n (dashed, n
    the largest k the run logged) falls. A second panel shows the effective number of styles vs step
    where it was logged. Mean ± std over seeds. None when no run logged ``eval/...`` keys.
    """
    curves = _run_eval_curves(runs)
    dsets = _eval_datasets(curves)
    if not dsets:
        return None
    sty = {d for d in dsets if any("effective_styles" in c.get(d, {}) for s in curves.values() for c in s)}
    plt = _plt()
    nc = 2 if sty else 1
    fig, axes = plt.subplots(len(dsets), nc, figsize=(5.4 * nc, 3.8 * len(dsets)), squeeze=False)
    for row, d in zip(axes, dsets):
        ax_p, ax_s = row[0], (row[1] if nc == 2 else None)
        for i, run in enumerate(runs):
            seeds, color = curves[run.name], _style_for(run, i, base_name)["color"]
            kmax = _eval_kmax(seeds, d)
            metrics = [("pass@1", "-", "o")] + (
                [(f"pass@{kmax}", "--", "s")] if kmax not in (None, 1) else []
            )
            for metric, ls, mk in metrics:
                pts = _eval_series(seeds, d, metric)
                if pts:
                    xs, ys = [p[0] for p in pts], [100 * p[1] for p in pts]
                    lab = _plain(run.name, 40) + f" {metric}"
                    ax_p.plot(xs, ys, color=color, linestyle=ls, marker=mk, markersize=3, label=lab)
                    _band(ax_p, xs, ys, [None if p[2] is None else 100 * p[2] for p in pts], color, 0.12)
            pts = _eval_series(seeds, d, "effective_styles") if ax_s is not None else []
            if pts:
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                ax_s.plot(xs, ys, color=color, marker="o", markersize=3, label=_plain(run.name))
                _band(ax_s, xs, ys, [p[2] for p in pts], color, 0.12)
        for ax, title, ylabel in (
            (ax_p, "pass@1 (solid), pass@n (dashed)", "pass@k (%)"),
            (ax_s, "effective styles", "effective number of styles"),
        ):
            if ax is None:
                continue
            if not ax.lines:
                ax.set_visible(False)
                continue
            ax.set_title(_plain(d) + ": " + title, fontsize=10)
            ax.set_xlabel("step")
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
    return _save(fig, axes, axes.size, path)


@_plain_text_plot
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
        pos = list(range(len(names)))  # positions, not categories: names that print alike stay apart
        for s in _styles_of(runs, d):
            vals = [100 * sh[s] for sh in shares]
            ax.bar(pos, vals, bottom=bottom, label=_plain(s, 30), color=colors[s])
            bottom = [a + b for a, b in zip(bottom, vals)]
        ax.set_xticks(pos)
        ax.set_xticklabels([_plain(n, 30) for n in names], rotation=30, ha="right")
        ax.set_ylabel("share of labelled samples (%)")
        ax.set_title(_plain(d))
        ax.set_ylim(0, 100)
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


def _config_lines(runs: Sequence[Run]) -> list[str]:
    """One plain-text line per run (raw values: the caller escapes for Markdown or HTML)."""
    lines = []
    for run in runs:
        cfgs = [r.get("config", {}) for r in run.results]
        c = cfgs[0] if cfgs else {}
        fails = sum(sum((cf.get("reward_failures") or {}).values()) for cf in cfgs)
        touts = sum(sum((cf.get("reward_timeouts") or {}).values()) for cf in cfgs)
        seeds = ", ".join(str(cf.get("seed")) for cf in cfgs)
        lines.append(
            f"{run.name}: model {c.get('model')}, n = {c.get('n')}, temperature {c.get('temperature')}, "
            f"top_p {c.get('top_p')}, max_new_tokens {c.get('max_new_tokens')}, seeds [{seeds}], "
            f"reward failures {fails}, time-outs {touts}; dirs: {', '.join(str(d) for d in run.dirs)}"
        )
    return lines


def _legend(base: str) -> str:
    """The table legend around ``base``, the already formatted name of the base run."""
    return (
        "Values in percent; mean ± sample std over seeds where a method has several. "
        "pass@k: unbiased estimator from n samples at the run's temperature; greedy: one greedy response; "
        "maj@K: majority vote over the K = n samples; Δ: percentage points vs the run "
        f"named {base}."
    )


_EVAL_INTRO = (
    "Evaluation during training (the eval/<dataset>/... keys of each run's metrics.jsonl). Pass@1 rising "
    "while pass@n falls is diversity collapse as it happens. n: the largest k the run logged."
)
_DIVERSITY_INTRO = "Means over problems (similarity: Jaccard over word bigrams of correct solutions)."


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
    Returns {"md", "html", "passk", "training"?, "styles"?, "passk_steps"?: path}; a plot with
    nothing to show is absent, and so is one that failed to draw (the report names it and why).
    """
    runs = load_runs(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    images: dict[str, tuple[str, Path]] = {}
    failed: list[tuple[str, str]] = []  # (file name, error)
    plots: list[tuple[str, str, Callable[[Path], Path | None]]] = [
        (
            "passk",
            "Pass@k vs k (log2 axis); dashed black: base",
            lambda p: plot_passk(runs, p, base_name=base_name),
        ),
        ("training", "Training curves", lambda p: plot_training(runs, p, base_name=base_name)),
        ("styles", "Style shares (stacked, per run)", lambda p: plot_styles(runs, p)),
        (
            "passk_steps",
            "Pass@1 (solid) and pass@n (dashed) vs training step, per eval dataset",
            lambda p: plot_eval_steps(runs, p, base_name=base_name),
        ),
    ]
    for key, caption, fn in plots:
        target = out / f"{key}.png"
        try:
            p = fn(target)
        except Exception as e:  # noqa: BLE001 - one plot must not lose the report
            _log.warning("report: %s could not be drawn: %s: %s", target.name, type(e).__name__, e)
            failed.append((target.name, f"{type(e).__name__}: {e}"))
            target.unlink(missing_ok=True)  # no half-written or stale PNG next to the report
            continue
        if p is not None:
            paths[key] = p
            images[key] = (caption, p)
    steps_img = images.pop("passk_steps", None)

    main = main_table(runs, base_name=base_name)
    div = diversity_table(runs)
    sty = style_table(runs)
    evt = eval_table(runs)
    md_notes = _notes(
        runs,
        base_name,
        0.01,
        run=lambda s: f"**{md_escape(s)}**",
        data=lambda s: f"*{md_escape(s)}*",
        text=md_escape,
    )
    html_notes = _notes(
        runs,
        base_name,
        0.01,
        run=lambda s: f"<b>{html.escape(s)}</b>",
        data=lambda s: f"<i>{html.escape(s)}</i>",
        text=html.escape,
    )
    cfg = _config_lines(runs)

    # ---- Markdown: every untrusted string goes through md_escape (tables do it per cell)
    md = [
        f"# {md_escape(title)}",
        "",
        _legend(f"**{md_escape(base_name)}**"),
        "",
        "## Results",
        "",
        main.markdown(),
        "",
    ]
    if md_notes:
        md += ["## Findings", ""] + [f"- {n}" for n in md_notes] + [""]
    md += ["## Plots", ""] + [f"![{cap}]({p.name})" + "\n" for cap, p in images.values()]
    if failed:
        md += [f"- Plot {name} could not be drawn: {md_escape(err)}" for name, err in failed] + [""]
    if evt is not None:
        md += ["## Pass@k over training steps", "", md_escape(_EVAL_INTRO), "", evt.markdown(), ""]
        if steps_img is not None:
            md += [f"![{steps_img[0]}]({steps_img[1].name})", ""]
    md += ["## Diversity", "", _DIVERSITY_INTRO, "", div.markdown(), ""]
    if sty is not None:
        md += ["## Styles", "", sty.markdown(), ""]
    md += ["## Runs", ""] + [f"- {md_escape(line, line_start=True)}" for line in cfg] + [""]
    paths["md"] = out / "report.md"
    paths["md"].write_text("\n".join(md))

    # ---- HTML: every untrusted string goes through html.escape
    def figure(cap: str, p: Path) -> str:
        data = base64.b64encode(p.read_bytes()).decode("ascii")
        return (
            f"<figure><img alt='{html.escape(cap)}' src='data:image/png;base64,{data}'>"
            f"<figcaption>{html.escape(cap)}</figcaption></figure>"
        )

    h = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{_legend('<code>' + html.escape(base_name) + '</code>')}</p>",
        "<h2>Results</h2>",
        main.html(),
    ]
    if html_notes:
        h += ["<h2>Findings</h2>"] + [f"<div class='note'>{n}</div>" for n in html_notes]
    h.append("<h2>Plots</h2>")
    h += [figure(cap, p) for cap, p in images.values()]
    h += [
        f"<div class='note'>Plot {html.escape(name)} could not be drawn: {html.escape(err)}</div>"
        for name, err in failed
    ]
    if evt is not None:
        h += ["<h2>Pass@k over training steps</h2>", f"<p>{html.escape(_EVAL_INTRO)}</p>", evt.html()]
        if steps_img is not None:
            h.append(figure(*steps_img))
    h += ["<h2>Diversity</h2>", f"<p>{html.escape(_DIVERSITY_INTRO)}</p>", div.html()]
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
    notes = _notes(loaded, base_name, 0.01, run=_one_line, data=_one_line, text=_one_line)  # type: ignore[arg-type]
    if notes:
        text += "\n\n" + "\n".join("* " + n for n in notes)
    print(text)
    return text
