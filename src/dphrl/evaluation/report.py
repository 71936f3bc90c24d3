"""Reports over evaluation runs: Markdown, self-contained HTML and PNG plots.

:func:`write_report` loads run dirs (:mod:`~dphrl.evaluation.report_data`: ``eval/results.json`` and
the ``metrics.jsonl`` training log; several dirs for one name are seeds, shown as mean ± sample std),
draws the figures (:mod:`~dphrl.evaluation.plots`), builds the tables (:mod:`~dphrl.evaluation.tables`)
and findings (:mod:`~dphrl.evaluation.findings`) and writes them as ``report.md`` and ``report.html``.

Run names, dataset names, style names (model output) and config values are untrusted: the Markdown
escapes them (:func:`~dphrl.evaluation.escape.md_escape`), the HTML escapes them, and plots draw them
as plain text (no mathtext, no TeX). A plot that fails to draw is named in the report; the rest is
still written.
"""

from __future__ import annotations

import base64
import html
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from dphrl.evaluation.curves import eval_curves
from dphrl.evaluation.escape import md_escape, one_line
from dphrl.evaluation.findings import TOL, findings, notes
from dphrl.evaluation.plots import plot_eval_steps, plot_passk, plot_styles, plot_training
from dphrl.evaluation.report_data import BASE_NAME, Run, RunDirs, load_runs
from dphrl.evaluation.tables import (
    Table,
    diversity_table,
    eval_table,
    forgetting_table,
    main_table,
    style_table,
)

__all__ = [
    "BASE_NAME",
    "Run",
    "Table",
    "diversity_table",
    "eval_curves",
    "eval_table",
    "findings",
    "forgetting_table",
    "load_runs",
    "main_table",
    "md_escape",
    "plot_eval_steps",
    "plot_passk",
    "plot_styles",
    "plot_training",
    "print_table",
    "style_table",
    "write_report",
]

_log = logging.getLogger(__name__)

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
_EVAL_INTRO = (
    "Evaluation during training (the eval/<dataset>/... keys of each run's metrics.jsonl). Pass@1 rising "
    "while pass@n falls is diversity collapse as it happens. n: the largest k the run logged."
)
_DIVERSITY_INTRO = "Means over problems (similarity: Jaccard over word bigrams of correct solutions)."
_FORGETTING_INTRO = (
    "Forward KL(base || model) per token on the base model's own samples of held-out prompts of another "
    "domain (label-free forgetting, RL's Razor: dphrl.evaluation.forgetting); 0 for the base. Mean ± std "
    "over seeds; the std. error is the sampling error of one seed's estimate."
)


def _legend(base: str) -> str:
    """The table legend around ``base``, the already formatted name of the base run."""
    return (
        "Values in percent; mean ± sample std over seeds where a method has several. "
        "pass@k: unbiased estimator from n samples at the run's temperature; greedy: one greedy response; "
        "maj@K: majority vote over the K = n samples; Δ: percentage points vs the run "
        f"named {base}."
    )


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


def _draw_plots(
    runs: Sequence[Run], out: Path, base_name: str
) -> tuple[dict[str, tuple[str, Path]], list[tuple[str, str]]]:
    """Draw every figure into ``out``: ({key: (caption, png)} of those drawn, [(file name, error)]).

    A figure with nothing to show is left out; one that raises is logged, listed and its file removed,
    so one broken plot never loses the report.
    """
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
    images: dict[str, tuple[str, Path]] = {}
    failed: list[tuple[str, str]] = []
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
            images[key] = (caption, p)
    return images, failed


@dataclass
class _Content:
    """Everything a report shows, unescaped: each writer escapes it for its format."""

    runs: Sequence[Run]
    title: str
    base_name: str
    main: Table
    diversity: Table
    styles: Table | None
    forgetting: Table | None
    steps: Table | None
    images: dict[str, tuple[str, Path]]  # the "Plots" section
    steps_image: tuple[str, Path] | None  # shown with the steps table
    failed: list[tuple[str, str]]
    config: list[str]


def _markdown(c: _Content) -> str:
    """``report.md``: every untrusted string goes through md_escape (tables do it per cell)."""
    md_notes = notes(
        c.runs,
        c.base_name,
        TOL,
        run=lambda s: f"**{md_escape(s)}**",
        data=lambda s: f"*{md_escape(s)}*",
        text=md_escape,
    )
    md = [f"# {md_escape(c.title)}", "", _legend(f"**{md_escape(c.base_name)}**"), ""]
    md += ["## Results", "", c.main.markdown(), ""]
    if md_notes:
        md += ["## Findings", ""] + [f"- {n}" for n in md_notes] + [""]
    md += ["## Plots", ""] + [f"![{cap}]({p.name})" + "\n" for cap, p in c.images.values()]
    if c.failed:
        md += [f"- Plot {name} could not be drawn: {md_escape(err)}" for name, err in c.failed] + [""]
    if c.steps is not None:
        md += ["## Pass@k over training steps", "", md_escape(_EVAL_INTRO), "", c.steps.markdown(), ""]
        if c.steps_image is not None:
            md += [f"![{c.steps_image[0]}]({c.steps_image[1].name})", ""]
    md += ["## Diversity", "", _DIVERSITY_INTRO, "", c.diversity.markdown(), ""]
    if c.styles is not None:
        md += ["## Styles", "", c.styles.markdown(), ""]
    if c.forgetting is not None:
        md += ["## Forgetting", "", _FORGETTING_INTRO, "", c.forgetting.markdown(), ""]
    md += ["## Runs", ""] + [f"- {md_escape(line, line_start=True)}" for line in c.config] + [""]
    return "\n".join(md)


def _figure(cap: str, p: Path) -> str:
    """An HTML figure with the PNG inlined (the page needs no other file)."""
    data = base64.b64encode(p.read_bytes()).decode("ascii")
    return (
        f"<figure><img alt='{html.escape(cap)}' src='data:image/png;base64,{data}'>"
        f"<figcaption>{html.escape(cap)}</figcaption></figure>"
    )


def _html(c: _Content) -> str:
    """``report.html``, self-contained: every untrusted string goes through html.escape."""
    html_notes = notes(
        c.runs,
        c.base_name,
        TOL,
        run=lambda s: f"<b>{html.escape(s)}</b>",
        data=lambda s: f"<i>{html.escape(s)}</i>",
        text=html.escape,
    )
    title = html.escape(c.title)
    h = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title>"
        f"<style>{_CSS}</style></head><body>",
        f"<h1>{title}</h1>",
        f"<p>{_legend('<code>' + html.escape(c.base_name) + '</code>')}</p>",
        "<h2>Results</h2>",
        c.main.html(),
    ]
    if html_notes:
        h += ["<h2>Findings</h2>"] + [f"<div class='note'>{n}</div>" for n in html_notes]
    h.append("<h2>Plots</h2>")
    h += [_figure(cap, p) for cap, p in c.images.values()]
    h += [
        f"<div class='note'>Plot {html.escape(name)} could not be drawn: {html.escape(err)}</div>"
        for name, err in c.failed
    ]
    if c.steps is not None:
        h += ["<h2>Pass@k over training steps</h2>", f"<p>{html.escape(_EVAL_INTRO)}</p>", c.steps.html()]
        if c.steps_image is not None:
            h.append(_figure(*c.steps_image))
    h += ["<h2>Diversity</h2>", f"<p>{html.escape(_DIVERSITY_INTRO)}</p>", c.diversity.html()]
    if c.styles is not None:
        h += ["<h2>Styles</h2>", c.styles.html()]
    if c.forgetting is not None:
        h += ["<h2>Forgetting</h2>", f"<p>{html.escape(_FORGETTING_INTRO)}</p>", c.forgetting.html()]
    h += ["<h2>Runs</h2><ul>"] + [f"<li>{html.escape(line)}</li>" for line in c.config]
    return "\n".join(h + ["</ul></body></html>"])


def write_report(
    run_dirs: RunDirs,
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
    images, failed = _draw_plots(runs, out, base_name)
    paths = {key: p for key, (_, p) in images.items()}
    steps_image = images.pop("passk_steps", None)
    content = _Content(
        runs=runs,
        title=title,
        base_name=base_name,
        main=main_table(runs, base_name=base_name),
        diversity=diversity_table(runs),
        styles=style_table(runs),
        forgetting=forgetting_table(runs),
        steps=eval_table(runs),
        images=images,
        steps_image=steps_image,
        failed=failed,
        config=_config_lines(runs),
    )
    paths["md"] = out / "report.md"
    paths["md"].write_text(_markdown(content))
    paths["html"] = out / "report.html"
    paths["html"].write_text(_html(content))
    return paths


def print_table(runs: RunDirs | Sequence[Run], *, base_name: str = BASE_NAME) -> str:
    """Print (and return) the method × dataset table of run dirs (same input as :func:`write_report`)."""
    items = [] if isinstance(runs, Mapping) else list(runs)
    if items and all(isinstance(r, Run) for r in items):
        loaded = [r for r in items if isinstance(r, Run)]
    else:
        loaded = load_runs(runs if isinstance(runs, Mapping) else items)  # type: ignore[arg-type]
    text = main_table(loaded, base_name=base_name).text()
    found = notes(loaded, base_name, TOL, run=one_line, data=one_line, text=one_line)
    if found:
        text += "\n\n" + "\n".join("* " + n for n in found)
    print(text)
    return text
