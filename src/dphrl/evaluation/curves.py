"""Series over training steps from ``metrics.jsonl``: training curves and evaluation during training.

Evaluation during training is logged as ``eval/<dataset>/<metric>`` keys; :func:`eval_curves` turns
one log into {dataset: {metric: [(step, value)]}} and :func:`by_step` merges seeds into mean ± std.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from dphrl.evaluation.report_data import Run

EVAL_PREFIX = "eval/"
_PASS_AT = re.compile(r"pass@(\d+)")

Curves = dict[str, dict[str, list[tuple[float, float]]]]
#: (step, mean over seeds, sample std or None for one seed)
Point = tuple[float, float, float | None]


def _number(v: Any) -> float | None:
    """``v`` as a finite float, else None (bools, strings, NaN and inf are not numbers here)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    return None


def training_series(log: list[dict[str, Any]], keys: list[str]) -> list[tuple[float, float]]:
    """(step, value) of the first of ``keys`` present in the log (step: the line index if absent)."""
    key = next((k for k in keys if any(k in rec for rec in log)), None)
    if key is None:
        return []
    out = []
    for i, rec in enumerate(log):
        v = _number(rec.get(key))
        if v is not None:
            out.append((float(rec.get("step", i)), v))
    return out


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


def by_step(series: Iterable[Sequence[tuple[float, float]]]) -> list[Point]:
    """(step, mean, sample std or None for one value) over seeds' series, sorted by step."""
    by: dict[float, list[float]] = {}
    for s in series:
        for x, y in s:
            by.setdefault(x, []).append(y)
    return [
        (x, statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else None) for x, v in sorted(by.items())
    ]


def run_eval_curves(runs: Sequence[Run]) -> dict[str, list[Curves]]:
    """Run name -> the :func:`eval_curves` of each of its seeds' training logs."""
    return {run.name: [eval_curves(log) for log in run.training] for run in runs}


def eval_datasets(curves: Mapping[str, list[Curves]]) -> list[str]:
    """Datasets with a pass@k or effective-styles series in any run, in order of appearance."""
    out: list[str] = []
    for seeds in curves.values():
        for c in seeds:
            for d, ms in c.items():
                if d not in out and any(_PASS_AT.fullmatch(m) or m == "effective_styles" for m in ms):
                    out.append(d)
    return out


def has_eval_styles(curves: Mapping[str, list[Curves]], dsets: Sequence[str]) -> bool:
    """Whether any seed of any run logged effective styles for any of ``dsets``."""
    return any("effective_styles" in c.get(d, {}) for seeds in curves.values() for c in seeds for d in dsets)


def eval_kmax(seeds: Sequence[Curves], d: str) -> int | None:
    """The largest k of a ``pass@k`` series for dataset ``d`` in any seed (None: no pass@k)."""
    ks = [int(m.group(1)) for c in seeds for k in c.get(d, {}) if (m := _PASS_AT.fullmatch(k))]
    return max(ks) if ks else None


def eval_series(seeds: Sequence[Curves], d: str, metric: str) -> list[Point]:
    """One metric of dataset ``d`` over steps, mean ± std over the seeds that logged it."""
    return by_step(c.get(d, {}).get(metric, []) for c in seeds)
