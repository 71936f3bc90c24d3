"""Report figures (PNG): pass@k vs k, training curves, Pass@k over training steps and style shares.

Run, dataset and style names are untrusted: every plot is drawn by :func:`_plain_text_plot`, which
switches mathtext and TeX off (names print as plain text) and closes every figure it opened. Each
``plot_*`` returns the PNG path, or None when there is nothing to draw.
"""

from __future__ import annotations

import functools
import math
import statistics
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from dphrl.evaluation.curves import (
    Point,
    by_step,
    eval_datasets,
    eval_kmax,
    eval_series,
    has_eval_styles,
    run_eval_curves,
    training_series,
)
from dphrl.evaluation.escape import one_line
from dphrl.evaluation.report_data import BASE_NAME, Run, datasets, has, ks, mean_std, style_shares, styles_of

#: (panel title, keys tried in order) for training.png.
TRAINING_PANELS: list[tuple[str, list[str]]] = [
    ("Reward (mean)", ["reward/mean", "reward", "rewards/mean", "train/reward"]),
    ("Entropy", ["entropy", "entropy/mean", "actor/entropy"]),
    ("Divergence", ["div/value", "div/loss", "kl", "kl/value", "actor/kl"]),
    ("Response length", ["response_length/mean", "response_length", "length/mean"]),
]
_COLORS = [
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


def _plt():
    """``matplotlib.pyplot`` on the Agg backend, imported on first use (keeps imports light)."""
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


def _plain(text: object, limit: int = 60) -> str:
    """A label: one line, at most ``limit`` characters (mathtext is off, see :func:`_plain_text_plot`)."""
    s = one_line(text)
    return s if len(s) <= limit else s[: limit - 1] + "…"


def _grid(n: int) -> tuple[int, int]:
    cols = min(3, max(1, n))
    return math.ceil(n / cols), cols


def _style_for(run: Run, i: int, base_name: str) -> dict[str, Any]:
    """Line style of the ``i``-th run: dashed black for the base, else the i-th tab colour."""
    if run.name == base_name:
        return {"color": "black", "linestyle": "--"}
    return {"color": _COLORS[i % len(_COLORS)], "linestyle": "-"}


def _save(fig: Any, axes: Any, used: int, path: Path) -> Path:
    """Hide the unused panels of a subplot grid, write the PNG and free the figure."""
    for ax in list(axes.flat)[used:]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def _unzip(pts: Sequence[Point], scale: float = 1) -> tuple[list[float], list[float], list[float | None]]:
    """x, mean and std (None where one seed) of ``pts``, the values times ``scale``."""
    return (
        [p[0] for p in pts],
        [scale * p[1] for p in pts],
        [None if p[2] is None else scale * p[2] for p in pts],
    )


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
    dsets = [d for d in datasets(runs) if ks(runs, d)]
    if not dsets:
        return None
    plt = _plt()
    nr, nc = _grid(len(dsets))
    fig, axes = plt.subplots(nr, nc, figsize=(4.6 * nc, 3.6 * nr), squeeze=False)
    for ax, d in zip(axes.flat, dsets):
        d_ks = ks(runs, d)
        for i, run in enumerate(runs):
            pts = [(k, *s) for k in d_ks if (s := mean_std(run, d, "pass@k", str(k))) is not None]
            if not pts:
                continue
            x, y, sds = _unzip(pts, 100)
            st = _style_for(run, i, base_name)
            label = _plain(run.name) + (f" (n={len(run.results)})" if len(run.results) > 1 else "")
            ax.plot(x, y, marker="o", markersize=3, label=label, **st)
            _band(ax, x, y, sds, st["color"], 0.15)
        ax.set_xscale("log", base=2)
        ax.set_xticks(d_ks)
        ax.set_xticklabels([str(k) for k in d_ks])
        ax.set_xlabel("k")
        ax.set_ylabel("pass@k (%)")
        ax.set_title(_plain(d))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, axes, len(dsets), path)


@_plain_text_plot
def plot_training(runs: Sequence[Run], path: Path, *, base_name: str = BASE_NAME) -> Path | None:
    """Training curves (reward, entropy, divergence, response length vs step) of runs that have logs."""
    panels = []
    for title, keys in TRAINING_PANELS:
        series = {run.name: [training_series(log, keys) for log in run.training] for run in runs}
        if any(s for v in series.values() for s in v):
            panels.append((title, series))
    if not panels:
        return None
    plt = _plt()
    nr, nc = _grid(len(panels)) if len(panels) != 4 else (2, 2)
    fig, axes = plt.subplots(nr, nc, figsize=(4.8 * nc, 3.4 * nr), squeeze=False)
    for ax, (title, series) in zip(axes.flat, panels):
        for i, run in enumerate(runs):
            pts = by_step(s for s in series[run.name] if s)
            if not pts:
                continue
            xs, ys, sds = _unzip(pts)
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
    curves = run_eval_curves(runs)
    dsets = eval_datasets(curves)
    if not dsets:
        return None
    plt = _plt()
    nc = 2 if has_eval_styles(curves, dsets) else 1
    fig, axes = plt.subplots(len(dsets), nc, figsize=(5.4 * nc, 3.8 * len(dsets)), squeeze=False)
    for row, d in zip(axes, dsets):
        ax_p, ax_s = row[0], (row[1] if nc == 2 else None)
        for i, run in enumerate(runs):
            seeds, color = curves[run.name], _style_for(run, i, base_name)["color"]
            kmax = eval_kmax(seeds, d)
            metrics = [("pass@1", "-", "o")] + (
                [(f"pass@{kmax}", "--", "s")] if kmax not in (None, 1) else []
            )
            for metric, ls, mk in metrics:
                pts = eval_series(seeds, d, metric)
                if pts:
                    xs, ys, sds = _unzip(pts, 100)
                    lab = _plain(run.name, 40) + f" {metric}"
                    ax_p.plot(xs, ys, color=color, linestyle=ls, marker=mk, markersize=3, label=lab)
                    _band(ax_p, xs, ys, sds, color, 0.12)
            pts = eval_series(seeds, d, "effective_styles") if ax_s is not None else []
            if pts:
                xs, ys, sds = _unzip(pts)
                ax_s.plot(xs, ys, color=color, marker="o", markersize=3, label=_plain(run.name))
                _band(ax_s, xs, ys, sds, color, 0.12)
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
    dsets = [d for d in datasets(runs) if styles_of(runs, d)]
    if not dsets:
        return None
    plt = _plt()
    nr, nc = _grid(len(dsets))
    fig, axes = plt.subplots(nr, nc, figsize=(max(4.6, 1.0 * len(runs) + 2.5) * nc, 3.8 * nr), squeeze=False)
    all_styles = sorted({s for d in dsets for s in styles_of(runs, d)})
    cmap = plt.get_cmap("tab20")
    colors = {s: cmap(i % 20) for i, s in enumerate(all_styles)}
    for ax, d in zip(axes.flat, dsets):
        styles = styles_of(runs, d)
        shown = [run for run in runs if has(run, d, "styles")]
        shares = [{s: statistics.fmean(style_shares(run, d, s)) for s in styles} for run in shown]
        bottom = [0.0] * len(shown)
        pos = list(range(len(shown)))  # positions, not categories: names that print alike stay apart
        for s in styles:
            vals = [100 * sh[s] for sh in shares]
            ax.bar(pos, vals, bottom=bottom, label=_plain(s, 30), color=colors[s])
            bottom = [a + b for a, b in zip(bottom, vals)]
        ax.set_xticks(pos)
        ax.set_xticklabels([_plain(run.name, 30) for run in shown], rotation=30, ha="right")
        ax.set_ylabel("share of labelled samples (%)")
        ax.set_title(_plain(d))
        ax.set_ylim(0, 100)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, axes, len(dsets), path)
