"""User rewards cannot stall, kill or outlive a run: score_batch contains what a reward does.

``sys.exit``/``os._exit``/odd exceptions fail one item (in-process and in workers), a hang inside
one C call is stopped by the default mode, time-outs run concurrently, output is captured, workers
die with a SIGKILLed parent, everything a reward starts (``setsid`` daemons, forked children) dies
with its worker and on every exit path of the trainer, and workers run under a memory limit.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from dphrl.data.example import Example
from dphrl.rewards import sandbox
from dphrl.rewards.registry import AUTO_WORKERS, auto_num_workers, score_batch
from dphrl.rewards.sandbox import WorkerPool, shutdown_pools

try:
    import _spawn_reward as spawn
except ImportError:
    from tests import _spawn_reward as spawn

SRC = Path(__file__).resolve().parents[1] / "src"


class _Custom(BaseException):
    """A BaseException subclass, as a library might define."""


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("__str__ blew up")


_FLOOD_FAIL_TEXT = "y" * 1_000_000 + "\nlast words of the reward\n"


def containment_reward(response: str, example: Example) -> float:
    """Misbehaves as ``response`` says; module-level so worker processes can import it."""
    kind = response
    if kind == "exit0":
        sys.exit(0)
    if kind == "exit_msg":
        raise SystemExit("bye from the reward")
    if kind == "kbd":
        raise KeyboardInterrupt
    if kind == "custom":
        raise _Custom("custom base exception")
    if kind == "generator_exit":
        raise GeneratorExit
    if kind == "unprintable":
        raise _Unprintable()
    if kind == "huge_int":
        return 10**400  # type: ignore[return-value]
    if kind == "huge_str":
        return "7" * 10**7 + "x"  # type: ignore[return-value]
    if kind == "os_exit":
        os._exit(0)
    if kind == "self_kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "sigint":  # what a user's Ctrl-C does while the reward runs
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(3)
    if kind == "c_sleep":  # glibc's system() retries waitpid on EINTR: SIGALRM cannot stop it
        ctypes.CDLL(None).system(b"exec sleep 20")
    if kind == "flood":
        print("x" * 20_000_000)
        os.write(2, b"e" * 5_000_000)
        return 1.0
    if kind == "flood_fail":
        sys.stdout.write(_FLOOD_FAIL_TEXT)
        raise RuntimeError("failed after printing")
    return 1.0 if kind == "ok" else 0.0


def _exs(n: int) -> list[Example]:
    return [Example(id=str(i), prompt=[{"role": "user", "content": "q"}], answer="1") for i in range(n)]


_CONTAINED = ["exit0", "exit_msg", "kbd", "custom", "generator_exit", "unprintable", "huge_int", "huge_str"]


def _check_contained(res, items: list[str]) -> None:
    assert res.timeouts == 0, res.errors
    assert res.failures == len(items) - items.count("ok"), res.errors
    for i, kind in enumerate(items):
        if kind == "ok":
            assert res.scores[i] == 1.0 and i not in res.errors
            continue
        assert res.scores[i] == 0.0
        msg = res.errors[i]
        assert "containment_reward" in msg, msg  # the message names the reward
        assert len(msg) < 3000, len(msg)
    by_kind = {k: res.errors.get(i, "") for i, k in enumerate(items)}
    assert "SystemExit" in by_kind["exit0"] and "sys.exit" in by_kind["exit0"]
    assert "bye from the reward" in by_kind["exit_msg"]
    assert "KeyboardInterrupt" in by_kind["kbd"]
    assert "_Custom: custom base exception" in by_kind["custom"]
    assert "GeneratorExit" in by_kind["generator_exit"]
    assert "_Unprintable" in by_kind["unprintable"] and "unprintable" in by_kind["unprintable"]
    assert "not a number" in by_kind["huge_int"] and "not a number" in by_kind["huge_str"]


def test_in_process_contains_base_exceptions():
    items = ["ok", *_CONTAINED, "ok"]
    res = score_batch(containment_reward, items, _exs(len(items)), timeout_s=5, num_workers=0)
    assert res.workers == 0
    _check_contained(res, items)


def test_in_process_real_ctrl_c_still_stops_the_run():
    before = signal.getsignal(signal.SIGINT)
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        score_batch(containment_reward, ["ok", "sigint", "ok"], _exs(3), timeout_s=10, num_workers=0)
    assert time.monotonic() - t0 < 2.5  # stopped at once, not after the reward's sleep
    assert signal.getsignal(signal.SIGINT) is before  # the handler is restored


def test_pool_contains_base_exceptions_and_crashes():
    items = ["ok", *_CONTAINED, "os_exit", "self_kill", "ok"]
    res = score_batch(containment_reward, items, _exs(len(items)), timeout_s=10, num_workers=2)
    assert res.workers == 2
    _check_contained(res, items)
    assert (
        "died" in res.errors[items.index("os_exit")] and "exit code 0" in res.errors[items.index("os_exit")]
    )
    assert "SIGKILL" in res.errors[items.index("self_kill")]


def test_pool_ctrl_c_stops_the_run_and_leaves_the_pool_consistent():
    pool_items = ["c_sleep", "ok"]
    timer = threading.Timer(1.5, os.kill, (os.getpid(), signal.SIGINT))
    score_batch(containment_reward, ["ok"] * 2, _exs(2), num_workers=2)  # warm: the Ctrl-C comes mid-item
    t0 = time.monotonic()
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            score_batch(containment_reward, pool_items, _exs(2), timeout_s=30, num_workers=2)
    finally:
        timer.cancel()
    assert time.monotonic() - t0 < 5
    # the worker still busy with "c_sleep" was killed: its reply cannot land in the next call
    res = score_batch(containment_reward, ["ok"] * 4, _exs(4), timeout_s=5, num_workers=2)
    assert res.scores == [1.0] * 4 and res.failures == res.timeouts == 0, res.errors


def test_default_mode_stops_a_hang_inside_c():
    assert AUTO_WORKERS == -1 and 2 <= auto_num_workers() <= 8
    t0 = time.monotonic()
    res = score_batch(containment_reward, ["c_sleep", "ok", "exit0"], _exs(3), timeout_s=1.0)  # default mode
    elapsed = time.monotonic() - t0
    assert res.workers >= 2
    assert res.scores == [0.0, 1.0, 0.0] and (res.timeouts, res.failures) == (1, 1), res.errors
    assert "no result within 1 s" in res.errors[0]
    assert elapsed < 10, elapsed  # in-process, the C call would hold the batch for its full 20 s


def test_auto_mode_falls_back_in_process_for_local_functions(caplog):
    def local_reward(response: str, example: Example) -> float:
        if response == "exit":
            sys.exit(3)
        return 0.5

    with caplog.at_level(logging.WARNING, logger="dphrl.rewards.registry"):
        res = score_batch(local_reward, ["a", "exit"], _exs(2), num_workers=AUTO_WORKERS)
    assert res.workers == 0 and res.scores == [0.5, 0.0] and res.failures == 1
    assert any("scored in-process" in r.getMessage() for r in caplog.records)
    with pytest.raises(TypeError, match="module-level"):
        score_batch(local_reward, ["a"], _exs(1), num_workers=2)


def test_auto_num_workers_splits_cpus_between_local_ranks(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(32)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert auto_num_workers() == 8
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert auto_num_workers() == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert auto_num_workers() == 2


@pytest.mark.parametrize(("workers", "bound_s"), [(8, 3.0), (4, 5.0)])
def test_timeouts_run_concurrently(workers: int, bound_s: float):
    n, timeout = 8, 1.0
    score_batch(containment_reward, ["ok"] * workers, _exs(workers), num_workers=workers)  # start the pool
    t0 = time.monotonic()
    res = score_batch(containment_reward, ["c_sleep"] * n, _exs(n), timeout_s=timeout, num_workers=workers)
    elapsed = time.monotonic() - t0
    assert res.timeouts == n, res.errors
    # one round of time-outs per `workers` items (plus a worker restart between rounds; about 1.1 s
    # and 2.5 s on an idle machine); one after another it would take n * timeout = 8 s
    assert elapsed < bound_s, elapsed


def test_output_flood_is_captured_not_printed(capfd):
    shutdown_pools()  # workers started now write where capfd looks (a worker inherits its start-time fds)
    t0 = time.monotonic()
    res = score_batch(containment_reward, ["flood", "flood_fail", "ok"], _exs(3), timeout_s=20, num_workers=2)
    elapsed = time.monotonic() - t0
    out, err = capfd.readouterr()
    assert len(out) + len(err) < 20_000, (len(out), len(err))  # nothing reached the terminal
    assert res.scores == [1.0, 0.0, 1.0] and res.failures == 1 and res.timeouts == 0, res.errors
    msg = res.errors[1]
    assert "failed after printing" in msg and "last words of the reward" in msg  # the output's tail
    assert f"of {len(_FLOOD_FAIL_TEXT)} bytes" in msg and len(msg) < 3000
    assert elapsed < 15, elapsed


def test_oversized_reply_fails_its_item_only():
    pool = WorkerPool(1)
    try:
        out = pool.map(bytes, [(20 * 2**20,), (3,)], timeout_s=20)
        assert out[0].status == "error" and "larger than" in (out[0].error or "")
        assert out[1].status == "ok" and out[1].value == b"\0\0\0"
    finally:
        pool.close()


def test_workers_started_by_a_finished_thread_survive_it():
    pool = WorkerPool(1)
    try:
        box: list = []
        t = threading.Thread(
            target=lambda: box.extend(pool.map(containment_reward, [("ok", _exs(1)[0])], 10))
        )
        t.start()
        t.join()
        pid = pool.pids()[0]
        time.sleep(0.5)  # a worker tied to the thread (PR_SET_PDEATHSIG) would be dead by now
        again = pool.map(containment_reward, [("ok", _exs(1)[0])], 10)
        assert box[0].status == again[0].status == "ok"
        assert pool.crashed == 0 and pool.pids() == [pid]
    finally:
        pool.close()


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie has stopped running
    except FileNotFoundError:
        return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_sigkilled_parent(tmp_path: Path):
    (tmp_path / "stuck_reward.py").write_text(textwrap.dedent("""
        import os
        from pathlib import Path

        def stuck(response, example):
            Path(os.environ["PID_DIR"], f"{os.getpid()}.pid").write_text("")
            return float(sum(range(10**13)) > 0)  # one C loop holding the GIL: no Python thread can run
    """))
    (tmp_path / "parent.py").write_text(textwrap.dedent("""
        import sys
        from dphrl.data.example import Example
        from dphrl.rewards.registry import score_batch
        from stuck_reward import stuck

        ex = Example(id="0", prompt=[])
        score_batch(stuck, ["a", "b"], [ex, ex], timeout_s=600, num_workers=2)
    """))
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = {**os.environ, "PID_DIR": str(pid_dir), "PYTHONPATH": os.pathsep.join([str(SRC), str(tmp_path)])}
    parent = subprocess.Popen([sys.executable, str(tmp_path / "parent.py")], env=env, cwd=tmp_path)
    pids: list[int] = []
    try:
        deadline = time.monotonic() + 60
        while len(pids) < 2 and time.monotonic() < deadline and parent.poll() is None:
            time.sleep(0.1)
            pids = [int(p.stem) for p in pid_dir.glob("*.pid")]
        assert len(pids) == 2, f"workers did not start (parent exit {parent.poll()})"
        time.sleep(0.3)  # both are inside the C loop
        parent.kill()
        parent.wait()
        deadline = time.monotonic() + 5
        while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(_gone(p) for p in pids), "reward workers outlived their SIGKILLed parent"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        for p in pids:  # never leave a CPU-burning worker behind, even when the test fails
            try:
                if "_worker_main" in Path(f"/proc/{p}/cmdline").read_text():
                    os.kill(p, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass


# ----------------------------------------------------------------------------------------------------
# Everything a reward starts dies with its worker and with the run (setsid daemons and forks included)

_linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="supervisors need Linux (/proc)"
)


@pytest.fixture()
def spawn_dir(tmp_path: Path, monkeypatch):
    """A folder for pid files; workers started meanwhile carry a mark, and whatever is left is killed."""
    mark = f"{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv(spawn.MARK_VAR, mark)
    d = tmp_path / "pids"
    d.mkdir()
    yield d
    spawn.kill_marked(spawn.recorded_pids(d), mark)  # never leave a process behind, even when a test fails


@_linux_only
def test_timeout_kills_everything_the_item_started(spawn_dir: Path):
    pool = WorkerPool(1)
    try:
        ex = _exs(1)[0]
        spec = spawn.spawn_spec(spawn_dir, daemons=2, forks=2, then="hang")
        out = pool.map(spawn.spawn_reward, [(spec, ex)], timeout_s=4)
        assert out[0].status == "timeout", out
        pids = spawn.recorded_pids(spawn_dir)
        assert len(pids) == 5  # the worker, 2 setsid daemons, 2 forked children
        assert spawn.wait_gone(pids, 2.0) == []  # killed with the worker, not left to init
        again = pool.map(containment_reward, [("ok", ex)], timeout_s=10)  # the pool is healthy
        assert again[0].status == "ok"
    finally:
        pool.close()


@_linux_only
def test_a_crashing_worker_takes_its_processes_along(spawn_dir: Path):
    pool = WorkerPool(1)
    try:
        out = pool.map(
            spawn.spawn_reward,
            [(spawn.spawn_spec(spawn_dir, daemons=1, forks=1, then="exit"), _exs(1)[0])],
            timeout_s=30,
        )
        assert (
            out[0].status == "error"
            and "died" in (out[0].error or "")
            and "exit code 3" in (out[0].error or "")
        )
        pids = spawn.recorded_pids(spawn_dir)
        assert len(pids) == 3 and spawn.wait_gone(pids, 2.0) == []
    finally:
        pool.close()


@_linux_only
def test_daemons_live_with_the_pool_and_die_at_close(spawn_dir: Path):
    pool = WorkerPool(2)
    try:
        specs = [(spawn.spawn_spec(spawn_dir, daemons=2, forks=1), ex) for ex in _exs(4)]
        out = pool.map(spawn.spawn_reward, specs, timeout_s=30)
        assert [o.status for o in out] == ["ok"] * 4, out
        daemons = spawn.recorded_pids(spawn_dir, "daemon")
        forks = spawn.recorded_pids(spawn_dir, "fork")
        assert len(daemons) == 8 and len(forks) == 4
        assert not any(spawn.gone(p) for p in daemons + forks)  # contained for the run, not per item
        t0 = time.monotonic()
        pool.close()
        assert time.monotonic() - t0 < 5
        assert spawn.wait_gone(spawn.recorded_pids(spawn_dir), 1.0) == []
    finally:
        pool.close()


_TRAINER = """
import json, os, sys
from dphrl.data.example import Example
from dphrl.rewards.registry import score_batch
from _spawn_reward import spawn_reward, spawn_spec

how, d = sys.argv[1], sys.argv[2]
ex = Example(id="0", prompt=[])
res = score_batch(spawn_reward, [spawn_spec(d, daemons=2, forks=1)] * 4, [ex] * 4, timeout_s=60,
                  num_workers=2)
assert res.scores == [1.0] * 4, res.errors
if how == "normal":
    sys.exit(0)
if how == "exception":
    raise RuntimeError("the trainer failed")
# killed from outside while both workers are busy with items that started more processes
score_batch(spawn_reward, [spawn_spec(d, daemons=2, forks=1, then="hang")] * 2, [ex] * 2, timeout_s=600,
            num_workers=2)
"""


@_linux_only
@pytest.mark.parametrize("how", ["normal", "exception", "sigterm", "sigkill"])
def test_everything_a_reward_started_dies_with_the_trainer(how: str, spawn_dir: Path, tmp_path: Path):
    """Every exit path of the trainer: a normal exit and an uncaught exception (the atexit hook),
    SIGTERM with its default action and SIGKILL (no Python code runs: the kernel's death signal to
    the supervisors). setsid daemons and forked children of idle and of busy workers all die."""
    script = tmp_path / "trainer.py"
    script.write_text(_TRAINER)
    tests_dir = Path(__file__).resolve().parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), str(tests_dir)]), "OMP_NUM_THREADS": "1"}
    trainer = subprocess.Popen([sys.executable, str(script), how, str(spawn_dir)], env=env, cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        want_daemons, want_forks = (8, 4) if how in ("normal", "exception") else (12, 6)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and trainer.poll() is None:
            if (len(spawn.recorded_pids(spawn_dir, "daemon")) >= want_daemons
                    and len(spawn.recorded_pids(spawn_dir, "fork")) >= want_forks):
                break
            time.sleep(0.1)
        if how in ("sigterm", "sigkill"):
            assert trainer.poll() is None, trainer.stderr.read().decode()[-3000:] if trainer.stderr else ""
            time.sleep(0.3)  # both workers are inside their hanging items
            trainer.send_signal(signal.SIGTERM if how == "sigterm" else signal.SIGKILL)
        rc = trainer.wait(timeout=60)
        err = trainer.stderr.read().decode() if trainer.stderr else ""
        expect = {"normal": 0, "exception": 1, "sigterm": -signal.SIGTERM, "sigkill": -signal.SIGKILL}[how]
        assert rc == expect, err[-3000:]
        daemons = spawn.recorded_pids(spawn_dir, "daemon")
        forks = spawn.recorded_pids(spawn_dir, "fork")
        workers = spawn.recorded_pids(spawn_dir, "worker")
        assert (len(daemons), len(forks)) == (want_daemons, want_forks)
        assert len(workers) == 2 if how in ("sigterm", "sigkill") else 1 <= len(workers) <= 2
        alive = spawn.wait_gone(daemons + forks + workers, 5.0)
        assert alive == [], f"{len(alive)} processes started by rewards outlived the trainer ({how})"
    finally:
        if trainer.poll() is None:
            trainer.kill()
            trainer.wait()


@_linux_only
def test_worker_memory_limit(monkeypatch):
    import resource

    pool = WorkerPool(1, memory_limit_mb=512)
    try:
        out = pool.map(resource.getrlimit, [(resource.RLIMIT_DATA,)], timeout_s=30)
        assert out[0].status == "ok" and out[0].value[0] == 512 * 2**20
        t0 = time.monotonic()
        out = pool.map(bytearray, [(2**30,), (2**20,)], timeout_s=30)
        assert time.monotonic() - t0 < 10
        assert out[0].status == "error" and "MemoryError" in (out[0].error or "")
        assert "512 MiB" in (out[0].error or "") and "DPHRL_REWARD_MEMORY_MB" in (out[0].error or "")
        assert out[1].status == "ok" and len(out[1].value) == 2**20  # the same worker goes on
    finally:
        pool.close()
    monkeypatch.setenv("DPHRL_REWARD_MEMORY_MB", "0")
    assert WorkerPool(1).memory_limit_mb == 0
    monkeypatch.setenv("DPHRL_REWARD_MEMORY_MB", "lots")
    with pytest.raises(ValueError, match="DPHRL_REWARD_MEMORY_MB"):
        WorkerPool(1)


@_linux_only
def test_torch_runs_under_the_default_memory_limit(monkeypatch):
    pytest.importorskip("torch")
    monkeypatch.delenv("DPHRL_REWARD_MEMORY_MB", raising=False)
    pool = WorkerPool(1)
    try:
        assert pool.memory_limit_mb == sandbox.DEFAULT_MEMORY_LIMIT_MB
        out = pool.map(spawn.torch_probe, [()], timeout_s=120)
        assert out[0].status == "ok" and out[0].value == 256.0, out
    finally:
        pool.close()
