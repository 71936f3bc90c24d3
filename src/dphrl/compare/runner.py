"""``dphrl compare``: plan an experiment, run its jobs, write the side-by-side report.

:func:`run_experiment` resolves and validates every job first (a bad experiment fails before any
file is written), claims the output directory (refused when it holds another run unless resumed or
overwritten; a resumed run refuses finished jobs whose spec changed), writes ``experiment.yaml`` and
``jobs.json``, runs the jobs (:mod:`dphrl.compare.execute`) and writes ``report/``: the evaluation
report of the base and the methods (Pass@k tables and curves, Pass@k over training steps, styles;
:func:`dphrl.evaluation.report.write_report`) and ``summary.md`` / ``summary.json`` / ``frontier.png``
(side-by-side table, claims on the mean and per seed, matched-Pass@1 frontier per family with seed
std, forgetting, wall time per job, failed jobs).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import yaml

from dphrl.compare.execute import execute, load_status
from dphrl.compare.experiment import Experiment
from dphrl.compare.jobs import Job, base_dir, check_unchanged, plan, write_jobs
from dphrl.compare.summary import summarize
from dphrl.compare.summary_md import plot_frontier, summary_markdown
from dphrl.compare.work import say

__all__ = ["run_experiment", "write_compare_report"]


def _main_process(backend: str) -> Any:
    """accelerate's process state under the sequential backend (``accelerate launch``), else None."""
    if backend != "sequential":
        return None
    from accelerate import PartialState

    return PartialState()


def run_experiment(exp: Experiment, out: str | Path, *, workers: int = 2, backend: str = "local",
                   resume: bool = False, overwrite: bool = False, plan_only: bool = False,
                   submitit_params: dict[str, Any] | None = None, log: Any = say) -> dict[str, Any]:
    """Run (or resume) the whole experiment into ``out``; returns the summary (also
    ``report/summary.json``)."""
    from dphrl.rundir import claim_dir

    out = Path(out)
    jobs = plan(exp, out)  # every config resolved and checked before anything is written
    state = _main_process(backend)
    main = state is None or state.is_main_process
    lock = None
    if main:
        lock = claim_dir(out, what="dphrl compare", resume=resume, overwrite=overwrite)
        added = check_unchanged(out, jobs)
        if added:
            keys = ", ".join(sorted({a.split(": ")[1] for a in added}))
            log(f"resuming: settings added to dphrl since finished jobs were made are not compared (their "
                f"defaults keep the old behaviour): {keys}")
        (out / "experiment.yaml").write_text(yaml.safe_dump(exp.to_dict(), sort_keys=False))
        write_jobs(out, jobs, exp.to_dict())
    try:
        if plan_only:
            log(f"{len(jobs)} jobs written to {out / 'jobs.json'}; run each with its cmd, "
                f"e.g. {' '.join(jobs[0].cmd)}")
            return {}
        t0 = time.time()
        seeds, runs = len(exp.seeds), len(exp.run_overrides())
        log(f"{seeds} seed(s) x ({runs} trainings + evaluations, base evaluation, prepare) = "
            f"{len(jobs)} jobs, backend {backend}"
            + (f", {workers} worker(s)" if backend != "sequential" else ""))
        status = execute(jobs, out, backend=backend, workers=workers,
                         prepare_threads=_prepare_threads(seeds, workers),
                         log=log, submitit_params=submitit_params)
        if state is not None:
            state.wait_for_everyone()
        if not main:
            return {}
        return write_compare_report(exp, out, jobs, status, time.time() - t0, log=log)
    finally:
        if lock is not None:
            lock.release()


def _prepare_threads(seeds: int, workers: int) -> int:
    """Torch threads of a ``prepare`` job in the local pool: with one seed nothing else can run while its
    base model is built, so it takes the workers' cores as threads, but only the cores that are idle
    (on a shared, busy machine extra threads make it several times slower, not faster)."""
    import os

    cpus = os.cpu_count() or 1
    idle = cpus - os.getloadavg()[0]
    return max(1, min(workers, cpus, round(idle))) if seeds == 1 else 1


def write_compare_report(exp: Experiment, out: str | Path, jobs: list[Job] | None = None,
                         status: dict[str, dict[str, Any]] | None = None, seconds: float = 0.0,
                         log: Any = say, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """``out/report``: the evaluation report of the base and the methods and the compare summary."""
    from dphrl.evaluation.report import print_table, write_report

    out = Path(out)
    jobs = jobs if jobs is not None else plan(exp, out)
    status = status if status is not None else load_status(out)
    rep = out / "report"
    if rep.exists():
        shutil.rmtree(rep)
    rep.mkdir(parents=True)
    every = ["base", *exp.run_overrides()]
    per_seed = [{n: base_dir(exp, out, s) if n == "base" else out / f"seed{s}" / "runs" / n for n in every}
                for s in exp.seeds]
    # a fixed base model's one evaluation is listed once (not once per seed)
    mapping = {n: list(dict.fromkeys(r[n] for r in per_seed if (r[n] / "eval" / "results.json").is_file()))
               for n in exp.main_runs()}
    mapping = {n: dirs for n, dirs in mapping.items() if dirs}
    paths = write_report(mapping, rep, title=exp.title) if mapping else {}
    summary = summarize(exp, per_seed, status, [j.to_dict() for j in jobs])
    labels = exp.eval_spec.labels()
    frontier = plot_frontier(summary, exp.sweep_runs(), {lab: name for name, lab in labels.items()},
                             exp.eval_spec.n, rep / "frontier.png")
    (rep / "summary.json").write_text(json.dumps({**summary, **(extra or {}), "experiment": exp.to_dict(),
                                                  "seconds": seconds}, indent=1, default=str))
    (rep / "summary.md").write_text(summary_markdown(summary, title=exp.title, k=exp.eval_spec.n,
                                                     description=exp.description, seconds=seconds,
                                                     frontier=frontier, experiment=exp.to_dict()))
    if mapping:
        print_table(mapping)
    word = {True: "PASS", False: "FAIL", None: "NOT CHECKED"}
    for c in summary["claims"]:
        log(f"{word[c['ok']]}  {c['claim']} ({c['detail']})")
    failed = summary["failed"]
    log(f"report: {paths.get('html', rep)} and {rep / 'summary.md'}"
        + (f"; {len(failed)} job(s) did not finish: {', '.join(failed)}" if failed else ""))
    return summary
