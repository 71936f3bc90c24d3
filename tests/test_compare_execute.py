"""Running a job list: a failing job is recorded and loses nothing else, finished jobs are not run again,
and the sequential and submitit backends run every job end to end (submitit in its local mode: each job
one `dphrl compare --job` command)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dphrl.compare import execute as ex
from dphrl.compare.jobs import Job


def _jobs(root: Path) -> list[Job]:
    return [Job("p", "prepare", 0, "", str(root / "p")),
            Job("t1", "train", 0, "a", str(root / "a"), ["p"]),
            Job("e1", "eval", 0, "a", str(root / "a"), ["t1"]),
            Job("t2", "train", 0, "b", str(root / "b"), ["p"]),
            Job("e2", "eval", 0, "b", str(root / "b"), ["t2"])]


def test_a_failing_job_is_recorded_and_the_others_run_then_resume_runs_only_it(tmp_path: Path, monkeypatch):
    calls: list[str] = []

    def fake(job: Job, **kw) -> dict:
        calls.append(job.id)
        if job.id == "t1":
            raise RuntimeError("boom")
        job.marker().parent.mkdir(parents=True, exist_ok=True)
        job.marker().write_text("{}")
        return {"seconds": 0.5, "message": job.id}

    monkeypatch.setattr(ex, "run_job", fake)
    jobs = _jobs(tmp_path)
    status = ex.execute(jobs, tmp_path, backend="sequential", log=lambda m: None)
    assert calls == ["p", "t1", "t2", "e2"]
    assert status["t1"]["state"] == "failed" and status["t1"]["error"] == "RuntimeError: boom"
    assert "RuntimeError: boom" in status["t1"]["traceback"]
    assert status["e1"] == {"state": "skipped", "error": "needs t1, which did not finish"}
    assert all(status[i]["state"] == "done" and status[i]["seconds"] == 0.5 for i in ("p", "t2", "e2"))
    assert json.loads((tmp_path / ex.STATUS_FILE).read_text()) == status

    calls.clear()
    status = ex.execute(jobs, tmp_path, backend="sequential", log=lambda m: None)
    assert calls == ["t1"]  # finished jobs are kept; the failed one runs again (and fails again)
    assert status["p"] == {"state": "done", "seconds": 0.5, "earlier": True}
    assert status["e1"]["state"] == "skipped"


@pytest.fixture(scope="module")
def tiny_experiment(tmp_path_factory) -> Path:
    """A one-method experiment on a barely trained tiny model (seconds per job)."""
    from dphrl.demo import build_base_model

    root = tmp_path_factory.mktemp("exp")
    base = build_base_model(root / "base", steps=2, hidden=32, layers=2, batch=8, hi=9)

    def styles(op: str) -> dict:
        return {"type": "styles", "op": op, "split": "test", "hi": 9, "n_test": 20, "limit": 4}

    exp = {"base": {"model": str(base), "dataset": {**styles("add"), "split": "train"}, "reward": "styles",
                    "max_steps": 1, "prompts_per_step": 2, "rollout_n": 2, "max_new_tokens": 8,
                    "reward_workers": 0, "micro_batch_size": 8},
           "methods": {"grpo": {"algorithm": "grpo"}},
           "evaluation": {"in_domain": {"add": styles("add")}, "out_of_domain": {"sub": styles("sub")},
                          "n": 2}}
    (root / "exp.yaml").write_text(yaml.safe_dump(exp))
    return root / "exp.yaml"


BACKENDS = [
    # what `accelerate launch -m dphrl.cli compare --backend sequential` runs, on one process
    ("sequential", []),
    pytest.param("submitit", ["--cluster", "local"], marks=pytest.mark.skipif(
        importlib.util.find_spec("submitit") is None,
        reason="submitit is not installed (pip install 'dphrl[compare]')")),
]


@pytest.mark.parametrize("backend,extra", BACKENDS)
def test_backend_runs_every_job(tmp_path: Path, tiny_experiment: Path, backend: str, extra: list[str]):
    """sequential: in this process; submitit (local mode): each job one `dphrl compare --job` command."""
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "dphrl.cli", "compare", "--config", str(tiny_experiment),
                           "--out", str(out), "--backend", backend, *extra, "--workers", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    status = json.loads((out / ex.STATUS_FILE).read_text())
    assert set(status) == {"seed0/prepare", "seed0/eval/base", "seed0/train/grpo", "seed0/eval/grpo"}
    assert all(s["state"] == "done" and s["seconds"] > 0 for s in status.values())
    if backend == "submitit":
        assert len(list((out / "submitit").glob("*_log.out"))) == 4  # submitit ran each of them
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert set(summary["table"]) == {"base", "grpo"}


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the field after the state: the parent's pid
            out.append(int(stat.parent.name))
    return out


def test_local_workers_exit_when_the_runner_is_killed(tmp_path: Path, tiny_experiment: Path):
    """No orphan keeps training after its runner died (even by SIGKILL): a resumed runner reuses the dirs."""
    import os
    import signal
    import time

    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "dphrl.cli", "compare", "--config", str(tiny_experiment),
                             "--out", str(out), "--workers", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and not any(
                s.get("state") == "running" for s in ex.load_status(out).values()
                if (out / ex.STATUS_FILE).is_file()):
            time.sleep(0.2)
        workers = [p for p in _children(proc.pid) if "spawn_main" in Path(f"/proc/{p}/cmdline").read_text()]
        assert workers, "no worker process found"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{p}").exists() for p in workers):
        time.sleep(0.5)
    alive = [p for p in workers if Path(f"/proc/{p}").exists()]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their runner"
