"""Runs for a report: loading run dirs and reading one metric as mean ± std over a run's seeds.

A *run dir* holds ``eval/results.json`` (or ``results.json`` at its root; a path to the JSON file
itself also works) and optionally ``metrics.jsonl``, the training log. Several dirs for one name
(seeds) make one :class:`Run`; tables, findings and plots read metrics through :func:`mean_std` and
:func:`delta`, so every view aggregates seeds the same way.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BASE_NAME = "base"

#: (mean, sample std or None for a single value)
Stat = tuple[float, float | None]
RunDirs = Sequence[str | Path] | Mapping[str, str | Path | Sequence[str | Path]]


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
    from dphrl.errors import PathNotFoundError

    d = Path(run_dir)
    if d.is_file():
        return d
    if not d.exists():
        raise PathNotFoundError(f"report: {d} does not exist; give a run directory (holding "
                                "eval/results.json or results.json, as `dphrl eval --out` writes) or a "
                                "results.json file")
    for cand in (d / "eval" / "results.json", d / "results.json"):
        if cand.is_file():
            return cand
    raise PathNotFoundError(f"report: {d} holds no eval/results.json or results.json; evaluate it first "
                            f"(`dphrl eval --model ... --out {d}`) or give the directory `dphrl eval` wrote")


def _read_results(path: Path) -> dict[str, Any]:
    """A results.json as a mapping; an unreadable one is refused by name."""
    from dphrl.errors import UserError

    try:
        res = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"report: {path} is not valid JSON ({e}); re-run the evaluation that wrote it") from e
    if not isinstance(res, dict):
        raise UserError(f"report: {path} holds a {type(res).__name__}, not an evaluation's results (a "
                        "mapping); re-run the evaluation that wrote it")
    return res


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
    """The run dir of a results path (``.../run/eval/results.json`` -> ``.../run``)."""
    if d.is_file():
        d = d.parent
        if d.name == "eval":
            d = d.parent
    return d


def _default_name(d: Path) -> str:
    d = _run_root(Path(d))
    return d.parent.name if d.name == "eval" else d.name


def load_runs(run_dirs: RunDirs) -> list[Run]:
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
        results = [_read_results(find_results(p)) for p in paths]
        training = []
        for p in paths:
            log = _run_root(p) / "metrics.jsonl"
            training.append(load_training_log(log) if log.is_file() else [])
        runs.append(Run(name, paths, results, training))
    return runs


# ------------------------------------------------------------------------------------------ aggregation
def stats(values: Iterable[float | None]) -> Stat | None:
    """Mean and sample std of the values that are there (None and NaN skipped); None if none are."""
    vals = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)


def lookup(res: dict[str, Any], dataset: str, *path: str) -> Any:
    """``res["datasets"][dataset][path...]`` of one results.json, or None where any step is missing."""
    v: Any = res.get("datasets", {}).get(dataset)
    for p in path:
        if not isinstance(v, dict) or p not in v:
            return None
        v = v[p]
    return v


def has(run: Run, dataset: str, *path: str) -> bool:
    """Whether any seed of ``run`` has ``dataset`` (and ``path`` under it) in its results."""
    return any(lookup(r, dataset, *path) is not None for r in run.results)


def mean_std(run: Run, dataset: str, *path: str) -> Stat | None:
    """One metric of ``run`` as mean ± std over its seeds."""
    return stats(lookup(r, dataset, *path) for r in run.results)


def delta(run: Run, base: Run, dataset: str, *path: str) -> Stat | None:
    """Mean over the run's seeds of (run − mean of base); std over the run's seeds."""
    b = mean_std(base, dataset, *path)
    if b is None:
        return None
    return stats(None if v is None else v - b[0] for v in (lookup(r, dataset, *path) for r in run.results))


def per_problem_passk(res: dict[str, Any], dataset: str, k: int) -> dict[str, float] | None:
    """Problem id -> its unbiased pass@k from the correct count of ``n`` samples (results.json's
    ``per_problem``), or None when the results do not carry them."""
    from dphrl.evaluation.metrics import pass_at_k

    pp, n = lookup(res, dataset, "per_problem"), lookup(res, dataset, "n")
    if not isinstance(pp, dict) or not n or k > n or not pp.get("id") or not pp.get("correct"):
        return None
    return {i: pass_at_k(n, c, k) for i, c in zip(pp["id"], pp["correct"])}


def paired_se(run: Run, base: Run, dataset: str, k: int) -> tuple[float, int] | None:
    """(standard error, problems) of ``run``'s pass@k minus the base's, paired by problem.

    Per seed of ``run``: the per-problem differences to the base's per-problem mean over its seeds,
    their sample std / sqrt(problems); then the mean over seeds (not shrunk by sqrt(seeds): a shared
    base's sampling noise does not average out). None without per-problem counts or under 2 problems.
    """
    bases = [b for r in base.results if (b := per_problem_passk(r, dataset, k)) is not None]
    if not bases:
        return None
    ref = {i: statistics.mean(b[i] for b in bases) for i in set.intersection(*(set(b) for b in bases))}
    ses, counts = [], []
    for r in run.results:
        mine = per_problem_passk(r, dataset, k)
        diffs = [v - ref[i] for i, v in (mine or {}).items() if i in ref]
        if len(diffs) >= 2:
            ses.append(statistics.stdev(diffs) / math.sqrt(len(diffs)))
            counts.append(len(diffs))
    return (statistics.mean(ses), min(counts)) if ses else None


def base_run(runs: Sequence[Run], base_name: str) -> Run | None:
    """The run named ``base_name`` (the reference of Δ columns and findings), if there is one."""
    return next((r for r in runs if r.name == base_name), None)


def datasets(runs: Sequence[Run]) -> list[str]:
    """Every dataset in any run's results, in order of first appearance."""
    return list(dict.fromkeys(name for run in runs for r in run.results for name in r.get("datasets", {})))


def ks(runs: Sequence[Run], dataset: str) -> list[int]:
    """The sorted k of every ``pass@k`` any run has for ``dataset``."""
    return sorted({int(k) for run in runs for r in run.results for k in (lookup(r, dataset, "pass@k") or {})})


def styles_of(runs: Sequence[Run], dataset: str) -> list[str]:
    """Sorted names of the styles any run labelled on ``dataset``."""
    return sorted(
        {s for run in runs for r in run.results for s in lookup(r, dataset, "styles", "shares") or {}}
    )


def style_shares(run: Run, dataset: str, style: str) -> list[float]:
    """The share of ``style`` in each seed of ``run`` that labelled styles on ``dataset`` (0 if absent)."""
    return [
        (lookup(r, dataset, "styles", "shares") or {}).get(style, 0.0)
        for r in run.results
        if lookup(r, dataset, "styles") is not None
    ]
