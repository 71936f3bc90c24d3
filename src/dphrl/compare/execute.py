"""Running a job list: ``local`` (N single-threaded CPU worker processes), ``sequential`` (one job after
another in this process: what ``accelerate launch`` runs on GPUs) or ``submitit`` (each job one
``dphrl compare --job`` command handed to Slurm, or to submitit's local mode).

A job starts when the jobs it depends on are done. A job that fails is recorded (error and the end of
its traceback) in ``OUT/jobs_status.json`` with the wall time of every job, the jobs that need it are
skipped, and every other job still runs. Finished jobs (their marker exists) are not run again.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
import traceback
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

from dphrl.compare.jobs import Job
from dphrl.compare.work import run_job

__all__ = ["BACKENDS", "STATUS_FILE", "execute", "load_status"]

STATUS_FILE = "jobs_status.json"
BACKENDS = ("local", "sequential", "submitit")
Log = Callable[[str], None]


def load_status(out: str | Path) -> dict[str, dict[str, Any]]:
    """``OUT/jobs_status.json``: job id -> {state, seconds, error, ...} ({} when absent)."""
    path = Path(out) / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


class _Book:
    """The status of every job, saved after each change (crash-safe: written aside, then renamed)."""

    def __init__(self, out: Path, jobs: list[Job], log: Log, writer: bool = True):
        self.out, self.log, self.total, self.writer = out, log, len(jobs), writer
        old = load_status(out)
        self.status: dict[str, dict[str, Any]] = {}
        for j in jobs:
            if j.done():
                before = old.get(j.id, {})
                self.status[j.id] = {"state": "done", "seconds": before.get("seconds"), "earlier": True}
        self.save()

    def save(self) -> None:
        """Write the status file (only the writer: the main process under ``accelerate launch``)."""
        from dphrl.fsutil import atomic_write_text

        if self.writer:
            atomic_write_text(self.out / STATUS_FILE, json.dumps(self.status, indent=1))

    def ok(self, job_id: str) -> bool:
        return self.status.get(job_id, {}).get("state") == "done"

    def finish(self, job: Job, result: dict[str, Any] | None, error: BaseException | None) -> None:
        rec = self.status.get(job.id, {})
        rec["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
        if error is None and result is not None:
            rec.update(state="done", seconds=result["seconds"], message=result["message"])
            self.log(f"done {sum(map(self.ok, self.status))}/{self.total}: {result['message']} "
                     f"({result['seconds']:.0f} s)")
        else:
            tb = "".join(traceback.format_exception(type(error), error, error.__traceback__)) if error else ""
            cause = getattr(error, "__cause__", None)  # a worker's traceback travels as the cause
            lines = str(error).strip().splitlines()  # a scheduler's error carries the job's whole stderr:
            rec.update(state="failed", error=f"{type(error).__name__}: {(lines[-1] if lines else '')[:300]}",
                       traceback=(str(cause) if cause is not None else tb)[-4000:])  # its last line says why
            self.log(f"FAILED {job.id}: {rec['error']}")
        self.status[job.id] = rec
        self.save()

    def skip(self, job: Job, why: str) -> None:
        self.status[job.id] = {"state": "skipped", "error": why}
        self.log(f"skipped {job.id}: {why}")
        self.save()

    def start(self, job: Job) -> None:
        self.status[job.id] = {"state": "running", "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.save()


def execute(jobs: list[Job], out: str | Path, *, backend: str = "local", workers: int = 2,
            prepare_threads: int = 1, log: Log, submitit_params: dict[str, Any] | None = None
            ) -> dict[str, dict[str, Any]]:
    """Run every job not done yet; returns the status of every job (also in ``OUT/jobs_status.json``).

    ``prepare_threads``: torch threads of a ``prepare`` job in the local pool (more than 1 only when
    nothing else can run meanwhile, e.g. one seed); ``submitit_params``: ``cluster`` (None: Slurm when
    available, else local; ``local``; ``slurm``) and any ``executor.update_parameters`` keyword
    (``timeout_min``, ``slurm_partition``, ``gpus_per_node``, ``cpus_per_task``, ...).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    writer = True
    if backend == "sequential":
        from accelerate import PartialState

        writer = PartialState().is_main_process
    book = _Book(Path(out), jobs, log, writer)
    todo = [j for j in jobs if not book.ok(j.id)]
    if backend == "sequential":
        _sequential(todo, book)
    elif backend == "local":
        _local(todo, book, workers, prepare_threads)
    else:
        _submitit(todo, book, Path(out), workers, dict(submitit_params or {}))
    return book.status


def _blocked(job: Job, book: _Book) -> str | None:
    bad = [d for d in job.deps if d in book.status and book.status[d]["state"] in ("failed", "skipped")]
    return f"needs {bad[0]}, which did not finish" if bad else None


def _sequential(todo: list[Job], book: _Book) -> None:
    """One job after another in this process. Under ``accelerate launch`` every process trains (the
    trainer is distributed) and the main process alone prepares and evaluates, the others wait."""
    from accelerate import PartialState
    from accelerate.utils import broadcast_object_list

    state = PartialState()
    for job in todo:
        why = _blocked(job, book)
        if why:
            book.skip(job, why)
            continue
        result, error = None, None
        if job.kind == "train" or state.is_main_process:
            book.start(job)
            try:
                result = run_job(job, log=book.log)
            except Exception as e:  # noqa: BLE001 - one failing job must not lose the others
                error = e
        if state.num_processes > 1:  # every process learns whether the main one's job failed
            flag = [error is None]
            broadcast_object_list(flag)
            state.wait_for_everyone()
            if not flag[0] and error is None:
                error = RuntimeError("failed on the main process")
        book.finish(job, result, error)


def _schedule(todo: list[Job], book: _Book, capacity: int, submit: Callable[[Job], Any],
              wait_any: Callable[[list[Any]], list[Any]], result: Callable[[Any], dict[str, Any]],
              retry: Callable[[BaseException], bool] = lambda e: False) -> None:
    """Start ready jobs (dependencies done) up to ``capacity`` at a time; record each end.
    ``retry(error)``: the error says the worker died, not the job (run it once more)."""
    waiting, running, tries = list(todo), {}, {}
    while waiting or running:
        while blocked := [j for j in waiting if _blocked(j, book)]:  # until no job waits on a failed one
            for job in blocked:
                waiting.remove(job)
                book.skip(job, _blocked(job, book) or "")
        ready = [j for j in waiting if all(book.ok(d) for d in j.deps)]
        for job in ready[: max(0, capacity - len(running))]:
            waiting.remove(job)
            book.start(job)
            running[submit(job)] = job
        if not running:
            for job in waiting:
                book.skip(job, f"its dependencies {job.deps} are not in the job list")
            return
        for handle in wait_any(list(running)):
            job = running.pop(handle)
            try:
                book.finish(job, result(handle), None)
            except Exception as e:  # noqa: BLE001 - one failing job must not lose the others
                tries[job.id] = tries.get(job.id, 0) + 1
                if retry(e) and tries[job.id] < 2:
                    book.log(f"{job.id}: its worker process died; running it again")
                    waiting.insert(0, job)
                else:
                    book.finish(job, None, e)


def _die_with_parent(parent: int) -> None:
    """Pool worker initializer: exit when the runner that started it is gone (killed, even by SIGKILL), so
    no orphan keeps training into a directory that a resumed runner will use."""
    import threading

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(2.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="die-with-parent").start()


def _local(todo: list[Job], book: _Book, workers: int, prepare_threads: int) -> None:
    """A pool of ``workers`` spawned processes, each job single-threaded: for small models two processes
    use two cores far better than one process with two threads."""
    ctx = multiprocessing.get_context("spawn")

    def new_pool() -> ProcessPoolExecutor:
        return ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_die_with_parent,
                                   initargs=(os.getpid(),))

    pool = [new_pool()]

    def submit(job: Job) -> Future:
        try:
            return pool[0].submit(run_job, job.to_dict(),
                                  threads=prepare_threads if job.kind == "prepare" else 1)
        except BrokenProcessPool:
            pool[0] = new_pool()
            return pool[0].submit(run_job, job.to_dict(),
                                  threads=prepare_threads if job.kind == "prepare" else 1)

    def wait_any(handles: list[Future]) -> list[Future]:
        return list(wait(handles, return_when=FIRST_COMPLETED)[0])

    try:
        _schedule(todo, book, workers, submit, wait_any, lambda f: f.result(),
                  retry=lambda e: isinstance(e, BrokenProcessPool))
    finally:
        pool[0].shutdown(wait=True, cancel_futures=True)


def _submitit(todo: list[Job], book: _Book, out: Path, workers: int, params: dict[str, Any]) -> None:
    """Each job one ``dphrl compare --out OUT --job ID`` command, submitted with submitit (Slurm, or its
    local mode with ``cluster: local``); at most ``workers`` in flight."""
    try:
        import submitit
    except ImportError as e:
        raise RuntimeError(
            "--backend submitit needs submitit: pip install 'dphrl[compare]' (or submitit)"
        ) from e
    cluster = params.pop("cluster", None)
    executor = submitit.AutoExecutor(folder=out / "submitit", cluster=cluster)
    threads = int(params.get("cpus_per_task", 1))
    executor.update_parameters(**{"timeout_min": 24 * 60, **params})
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}

    def submit(job: Job) -> Any:
        cmd = [sys.executable, "-m", "dphrl.cli", *job.cmd[1:], "--threads", str(threads)]
        return executor.submit(submitit.helpers.CommandFunction(cmd, verbose=False, env=env))

    def wait_any(handles: list[Any]) -> list[Any]:
        while True:
            done = [h for h in handles if h.done()]
            if done:
                return done
            time.sleep(1.0)

    def result(handle: Any) -> dict[str, Any]:
        stdout = handle.result()
        return json.loads(stdout.strip().splitlines()[-1])  # `dphrl compare --job` prints its result last

    _schedule(todo, book, workers, submit, wait_any, result)
