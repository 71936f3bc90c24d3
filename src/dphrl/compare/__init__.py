"""``dphrl compare``: methods x seeds x coefficients on your model and data, evaluated in and out of
domain, with a side-by-side report (Pass@k, matched-Pass@1 frontier, forgetting, claims, wall time).

* :mod:`~dphrl.compare.experiment`: the experiment file (typed keys, errors with file and line);
* :mod:`~dphrl.compare.jobs`: the job list, plain data (``OUT/jobs.json``), every config resolved first;
* :mod:`~dphrl.compare.work`: what a job does (prepare a seed, train, evaluate);
* :mod:`~dphrl.compare.execute`: local CPU pool, sequential (``accelerate launch``) or submitit;
* :mod:`~dphrl.compare.summary` / :mod:`~dphrl.compare.summary_md`: the numbers and their report;
* :mod:`~dphrl.compare.runner`: :func:`run_experiment`, all of it.
"""

from __future__ import annotations

from dphrl.compare.experiment import Experiment, experiment_help, load_experiment
from dphrl.compare.runner import run_experiment, write_compare_report

__all__ = ["Experiment", "experiment_help", "load_experiment", "run_experiment", "write_compare_report"]
