"""Isolation for reward code: a nestable wall-clock limit and a pool of killable worker processes.

* :func:`time_limit` interrupts Python code in the main thread after a wall-clock budget (``SIGALRM``
  via ``setitimer``; nests correctly; a no-op where signals cannot be used, see :func:`can_interrupt`).
* :class:`WorkerPool` runs ``fn(*args)`` items in separate worker processes, each item under its own
  wall-clock time-out. A hung worker (even one stuck inside C code) is killed with its process group
  and replaced; a crashed worker is replaced; nothing is dropped silently: every item comes back as an
  :class:`Outcome` with status ``ok``, ``error`` or ``timeout``.

Workers are plain ``python -c`` subprocesses talking over a socket pair, so they never re-import the
caller's ``__main__`` (unlike ``multiprocessing`` spawn) and never inherit a forked CUDA/torch state.
Functions must be importable by reference (module-level, not defined in ``__main__``).
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from typing import Any

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------------------
# In-process time limit (main thread)


class TimeLimitExceeded(BaseException):
    """Raised inside a :func:`time_limit` block when its budget is spent.

    Derives from ``BaseException`` so that library code with ``except Exception`` (sympy,
    math_verify, ...) cannot swallow it; :func:`time_limit` turns it into :class:`TimeoutError`
    at its own boundary.
    """

    def __init__(self, token: object) -> None:
        super().__init__("time limit exceeded")
        self.token = token


_stack: list[tuple[object, float]] = []  # (token, monotonic deadline), outermost first
_saved: dict[str, Any] = {}


def can_interrupt() -> bool:
    """True where :func:`time_limit` can interrupt code (POSIX, main thread of the main interpreter)."""
    return hasattr(signal, "setitimer") and threading.current_thread() is threading.main_thread()


def _on_alarm(signum: int, frame: Any) -> None:
    now = time.monotonic()
    for token, deadline in _stack:  # outermost expired limit unwinds furthest
        if deadline <= now:
            raise TimeLimitExceeded(token)
    _arm()  # early wake-up (timer granularity): re-arm for the nearest deadline


def _arm() -> None:
    if _stack:
        remaining = min(d for _, d in _stack) - time.monotonic()
        signal.setitimer(signal.ITIMER_REAL, max(remaining, 1e-4))
    else:
        signal.setitimer(signal.ITIMER_REAL, 0)


@contextmanager
def time_limit(seconds: float | None) -> Iterator[None]:
    """Raise :class:`TimeoutError` if the block runs longer than ``seconds`` of wall-clock time.

    Works in the main thread only (a no-op elsewhere, or with ``seconds`` None/<= 0); check
    :func:`can_interrupt`. Blocks nest: an inner limit never extends an outer one, and an outer
    limit firing inside an inner block propagates through it unchanged. A pre-existing
    ``ITIMER_REAL`` timer and ``SIGALRM`` handler are restored afterwards. Code stuck in a single C
    call (a huge integer power) is only interrupted when that call returns: use a
    :class:`WorkerPool` where that matters.
    """
    if seconds is None or seconds <= 0 or not can_interrupt():
        yield
        return
    token = object()
    outermost = not _stack
    if outermost:
        _saved["handler"] = signal.signal(signal.SIGALRM, _on_alarm)
        _saved["timer"] = signal.getitimer(signal.ITIMER_REAL)
        _saved["t0"] = time.monotonic()
    _stack.append((token, time.monotonic() + seconds))
    try:
        _arm()
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            _stack[:] = [e for e in _stack if e[0] is not token]
    except TimeLimitExceeded as e:
        if e.token is not token:
            raise
        raise TimeoutError(f"time limit of {seconds:g} s exceeded") from None
    finally:
        if _stack:
            _arm()
        elif outermost:
            signal.signal(signal.SIGALRM, _saved["handler"])
            delay, interval = _saved["timer"]
            if delay > 0:  # someone else's timer was pending: give it back what is left
                left = delay - (time.monotonic() - _saved["t0"])
                signal.setitimer(signal.ITIMER_REAL, max(left, 1e-4), interval)


# ----------------------------------------------------------------------------------------------------
# Worker processes


@dataclass
class Outcome:
    """Result of one pool item: ``status`` is ``"ok"`` (``value`` set), ``"error"`` or ``"timeout"``."""

    status: str
    value: Any = None
    error: str | None = None


_BOOT = "import sys; from dphrl.rewards.sandbox import _worker_main; _worker_main(int(sys.argv[1]), sys.argv[2:])"


def _worker_main(fd: int, preload: Sequence[str] = ()) -> None:
    """Entry point of a worker process: receive ``(fn, args)``, send back ``(status, payload)``."""
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    conn = Connection(fd)
    for mod in preload:  # import before "ready": start-up time is not charged to the first item
        try:
            importlib.import_module(mod)
        except Exception:  # reported when an item needs it
            pass
    parent = os.getppid()

    def watchdog() -> None:  # exit if the parent disappears, even while an item hangs
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watchdog, daemon=True).start()
    conn.send(("ready", os.getpid()))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            fn, args = pickle.loads(data)
            reply: tuple[str, Any] = ("ok", fn(*args))
        except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
            reply = ("error", f"{type(e).__name__}: {e}"[:2000])
        try:
            conn.send(reply)
        except Exception as e:  # unpicklable result
            conn.send(("error", f"cannot send result back: {type(e).__name__}: {e}"[:2000]))


class _Worker:
    def __init__(self, env: dict[str, str], preload: Sequence[str] = ()) -> None:
        parent_sock, child_sock = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _BOOT, str(child_sock.fileno()), *preload],
            pass_fds=(child_sock.fileno(),),
            env=env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # own process group: killed as a whole, immune to terminal ^C
        )
        child_sock.close()
        self.conn = Connection(parent_sock.detach())
        self.ready = False
        self.started = time.monotonic()
        self.item: int | None = None
        self.deadline = float("inf")

    def kill(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass
        self.proc.wait()
        self.conn.close()


class WorkerPool:
    """A persistent pool of worker processes with a per-item wall-clock time-out.

    ``map`` is thread-safe (calls are serialized). Workers start lazily and survive between calls;
    a worker that times out or dies is killed and replaced. ``startup_timeout_s`` bounds how long a
    fresh worker may take to become ready (the item time-out only starts once a worker is ready).
    """

    def __init__(self, num_workers: int, *, startup_timeout_s: float = 120.0) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.startup_timeout_s = startup_timeout_s
        self._workers: list[_Worker] = []
        self._preload: list[str] = []  # modules of the functions run so far, imported by new workers
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.killed = 0  # workers killed for a time-out, over the pool's life
        self.crashed = 0  # workers that died on their own

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        paths = [p for p in sys.path if p] + [env.get("PYTHONPATH", "")]
        env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
        return env

    def map(self, fn: Callable[..., Any], items: Sequence[tuple], timeout_s: float) -> list[Outcome]:
        """Run ``fn(*item)`` for every item; never raises for a failing item."""
        try:
            payloads = [pickle.dumps((fn, tuple(a))) for a in items]
        except Exception as e:
            raise TypeError(
                f"cannot send {fn!r} to worker processes ({e}); use a module-level function "
                "(not a lambda, closure or function defined in __main__), or num_workers=0"
            ) from e
        target = fn
        while isinstance(target, functools.partial):
            target = target.func
        mod = getattr(target, "__module__", None)
        if mod == "__main__":
            raise TypeError(f"{fn!r} is defined in __main__; worker processes cannot import it")
        with self._lock:
            if os.getpid() != self._pid:  # forked copy: the workers belong to the parent
                self._workers, self._pid = [], os.getpid()
            if mod and mod not in self._preload:
                self._preload.append(mod)
            return self._run(payloads, timeout_s)

    def _run(self, payloads: list[bytes], timeout_s: float) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(payloads)
        pending = deque(range(len(payloads)))
        env = self._env()
        start_failures = 0
        want = min(self.num_workers, len(payloads))
        while len(self._workers) < want:
            self._workers.append(_Worker(env, self._preload))

        def replace(w: _Worker) -> None:
            w.kill()
            self._workers.remove(w)
            if pending or w.ready:  # a healthy slot is refilled at once, so the next call finds it warm
                self._workers.append(_Worker(env, self._preload))

        while pending or any(w.item is not None for w in self._workers):
            for w in self._workers:  # dispatch to idle ready workers
                if w.ready and w.item is None and pending:
                    i = pending.popleft()
                    try:
                        w.conn.send_bytes(payloads[i])
                    except OSError:
                        results[i] = Outcome("error", error="worker died before the item was sent")
                        self.crashed += 1
                        replace(w)
                        break
                    w.item, w.deadline = i, time.monotonic() + timeout_s
            if not self._workers:
                if pending and start_failures < 3:
                    self._workers.append(_Worker(env, self._preload))
                    continue
                break
            now = time.monotonic()
            deadlines = [w.deadline if w.ready else w.started + self.startup_timeout_s for w in self._workers]
            ready = wait([w.conn for w in self._workers], timeout=max(0.0, min(deadlines) - now))
            for w in [w for w in self._workers if w.conn in ready]:
                try:
                    status, payload = w.conn.recv()
                except (EOFError, OSError):
                    self.crashed += 1
                    if w.item is not None:
                        results[w.item] = Outcome("error", error=f"worker crashed (exit {w.proc.poll()})")
                    else:
                        start_failures += 1
                        log.warning("reward worker exited during start-up (exit %s)", w.proc.poll())
                    replace(w)
                    continue
                if not w.ready:
                    w.ready, start_failures = True, 0
                    continue
                assert w.item is not None
                results[w.item] = Outcome("ok", value=payload) if status == "ok" else Outcome("error", error=payload)
                w.item, w.deadline = None, float("inf")
            now = time.monotonic()
            for w in list(self._workers):
                if w.ready and w.item is not None and now >= w.deadline:
                    results[w.item] = Outcome("timeout", error=f"no result within {timeout_s:g} s; worker killed")
                    self.killed += 1
                    replace(w)
                elif not w.ready and now >= w.started + self.startup_timeout_s:
                    start_failures += 1
                    log.warning("reward worker did not start within %.0f s", self.startup_timeout_s)
                    replace(w)
            if start_failures >= 3 and not any(w.ready for w in self._workers):
                log.error("reward workers fail to start; %d items not scored", len(pending))
                break
        return [r if r is not None else Outcome("error", error="reward worker could not be started") for r in results]

    def close(self) -> None:
        """Kill all workers (they are restarted by a later ``map``)."""
        with self._lock:
            if os.getpid() == self._pid:
                for w in self._workers:
                    w.kill()
            self._workers = []


_pools: dict[tuple[str, int], WorkerPool] = {}
_pools_lock = threading.Lock()


def get_pool(num_workers: int, name: str = "default") -> WorkerPool:
    """A process-wide persistent :class:`WorkerPool` (one per ``name`` and size)."""
    with _pools_lock:
        key = (name, num_workers)
        if key not in _pools:
            _pools[key] = WorkerPool(num_workers)
        return _pools[key]


def run_isolated(fn: Callable[..., Any], args: tuple, timeout_s: float) -> Outcome:
    """Run one ``fn(*args)`` in a separate (persistent, single) worker process with a time-out."""
    return get_pool(1, "isolated").map(fn, [args], timeout_s)[0]


@atexit.register
def shutdown_pools() -> None:
    """Kill the workers of every pool created by :func:`get_pool`."""
    with _pools_lock:
        for pool in _pools.values():
            pool.close()
