"""Isolation for reward code: a nestable wall-clock limit and a pool of killable worker processes.

* :func:`time_limit` interrupts Python code in the main thread after a wall-clock budget (``SIGALRM``
  via ``setitimer``; nests correctly; a no-op where signals cannot be used, see :func:`can_interrupt`).
* :class:`WorkerPool` runs ``fn(*args)`` items in separate worker processes, each item under its own
  wall-clock time-out. A hung worker (even one stuck inside C code) is killed with its process group
  and replaced; a crashed worker is replaced; nothing is dropped silently: every item comes back as an
  :class:`Outcome` with status ``ok``, ``error`` or ``timeout`` (``sys.exit``/``os._exit`` in an
  item included). Items time out concurrently, one per worker. Workers die with the process that
  started them (``PR_SET_PDEATHSIG`` on Linux, even while stuck in C code; a parent-pid poll
  elsewhere), and their stdout/stderr go to a pipe the pool drains, never to the terminal: the tail
  of an item's output is kept for its message.

Workers are plain ``python -c`` subprocesses talking over a socket pair, so they never re-import the
caller's ``__main__`` (unlike ``multiprocessing`` spawn) and never inherit a forked CUDA/torch state.
Functions must be importable by reference (module-level, not defined in ``__main__``).
"""

from __future__ import annotations

import atexit
import functools
import logging
import math
import os
import pickle
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
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

#: Bytes of an item's output (the worker's stdout and stderr) kept for its message: the last ones.
OUTPUT_TAIL_BYTES = 2048
#: Largest reply a worker may send back; a larger one fails the item (and replaces the worker).
MAX_REPLY_BYTES = 16 * 2**20
#: Bytes of worker output read per wake-up, so a flooding worker cannot starve the time-out checks.
_DRAIN_BYTES = 2**20

_HINTS = {
    "SystemExit": "the code called sys.exit()/exit()",
    "KeyboardInterrupt": "raised by the code itself, not by a Ctrl-C",
}


def describe_exception(e: BaseException) -> str:
    """``"Type: message"`` for any exception, even one whose ``__str__`` raises; at most 2000 chars.

    A :class:`TimeLimitExceeded` or :class:`KeyboardInterrupt` raised *while formatting* (a time-out
    or a Ctrl-C arriving meanwhile) propagates.
    """
    name = type(e).__name__
    try:
        msg = str(e)[:2000]
    except (TimeLimitExceeded, KeyboardInterrupt):
        raise
    except BaseException:  # noqa: BLE001 - a hostile __str__ must not escape
        msg = "<unprintable message>"
    hint = _HINTS.get(name) if type(e).__module__ == "builtins" else None
    text = f"{name}: {msg}" if msg else name
    return (f"{text} ({hint})" if hint else text)[:2000]


@dataclass
class Outcome:
    """Result of one pool item: ``status`` is ``"ok"`` (``value`` set), ``"error"`` or ``"timeout"``.

    ``output`` is the tail of what the item printed (stdout and stderr of its worker), if anything.
    """

    status: str
    value: Any = None
    error: str | None = None
    output: str = ""


_BOOT = (
    "import sys; from dphrl.rewards.sandbox import _worker_main; "
    "_worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])"
)

_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    """Make this worker exit when the process that started it dies, even while stuck in C code.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so the kernel kills the worker whatever it is doing.
    Everywhere: a thread that polls the parent pid every second (this one needs the GIL, so it cannot
    stop a worker stuck in a C call that holds it; the ``prctl`` can).
    """
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(
                ctypes.c_int(_PR_SET_PDEATHSIG), ctypes.c_ulong(int(signal.SIGKILL)),
                ctypes.c_ulong(0), ctypes.c_ulong(0), ctypes.c_ulong(0),
            )
        except Exception:  # the watchdog below still applies
            pass
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watchdog, name="dphrl-parent-watchdog", daemon=True).start()


def _flush_std() -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a reward may have replaced or closed them
            pass


def _safe_describe(e: BaseException) -> str:
    try:
        return describe_exception(e)
    except BaseException:  # noqa: BLE001
        return f"{type(e).__name__}: <unprintable message>"


def _worker_main(fd: int, parent: int, preload: Sequence[str] = ()) -> None:
    """Entry point of a worker process: receive ``(fn, args)``, send back ``(status, payload)``.

    Every ``BaseException`` an item raises (``sys.exit`` included) becomes an ``error`` reply. The
    worker ignores ``SIGINT`` (the parent handles Ctrl-C) and dies with its parent.
    """
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent(parent)
    conn = Connection(fd)
    for mod in preload:  # import before "ready": start-up time is not charged to the first item
        try:
            importlib.import_module(mod)
        except BaseException:  # noqa: BLE001 - reported when an item needs it
            pass
    _flush_std()
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
            reply = ("error", _safe_describe(e))
        _flush_std()  # what the item printed reaches the parent before its reply
        try:
            conn.send(reply)
        except Exception as e:  # unpicklable result
            conn.send(("error", f"cannot send the result back: {_safe_describe(e)}"))


_spawn_lock = threading.Lock()
_spawn_queue: queue.SimpleQueue | None = None
_spawn_pid = -1


def _spawn_loop(q: queue.SimpleQueue) -> None:
    while True:
        fut, args, kwargs = q.get()
        if fut.set_running_or_notify_cancel():
            try:
                fut.set_result(subprocess.Popen(args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - handed to the caller
                fut.set_exception(e)


def _popen(args: list[str], **kwargs: Any) -> subprocess.Popen:
    """``subprocess.Popen`` from a thread that lives as long as this process.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that started the worker exits, so a worker started by
    a short-lived thread (a caller's thread pool) would die with that thread. The main thread lives as
    long as the process; other callers hand the start to one daemon thread.
    """
    if threading.current_thread() is threading.main_thread():
        return subprocess.Popen(args, **kwargs)
    global _spawn_queue, _spawn_pid
    with _spawn_lock:
        if _spawn_queue is None or _spawn_pid != os.getpid():
            _spawn_queue, _spawn_pid = queue.SimpleQueue(), os.getpid()
            threading.Thread(target=_spawn_loop, args=(_spawn_queue,), name="dphrl-worker-spawner", daemon=True).start()
        q = _spawn_queue
    fut: Future = Future()
    q.put((fut, args, kwargs))
    return fut.result()


class _Tail:
    """The last ``cap`` bytes written to a stream, and the number of bytes written in all."""

    def __init__(self, cap: int = OUTPUT_TAIL_BYTES) -> None:
        self.cap = cap
        self.buf = bytearray()
        self.total = 0

    def add(self, chunk: bytes) -> None:
        self.total += len(chunk)
        self.buf += chunk[-self.cap :]
        del self.buf[: max(0, len(self.buf) - self.cap)]

    def text(self) -> str:
        s = self.buf.decode("utf-8", "replace").strip()
        if self.total > len(self.buf):
            return f"[last {len(self.buf)} of {self.total} bytes] ...{s}"
        return s

    def reset(self) -> None:
        self.buf.clear()
        self.total = 0


def _exit_text(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class _Worker:
    def __init__(self, env: dict[str, str], preload: Sequence[str] = ()) -> None:
        parent_sock, child_sock = socket.socketpair()
        try:
            self.proc = _popen(
                [sys.executable, "-c", _BOOT, str(child_sock.fileno()), str(os.getpid()), *preload],
                pass_fds=(child_sock.fileno(),),
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,  # drained by the pool: never the terminal, never a full pipe
                stderr=subprocess.STDOUT,
                start_new_session=True,  # own process group: killed as a whole, immune to terminal ^C
            )
        except BaseException:
            parent_sock.close()
            raise
        finally:
            child_sock.close()
        self.conn = Connection(parent_sock.detach())
        assert self.proc.stdout is not None
        self.out = self.proc.stdout
        os.set_blocking(self.out.fileno(), False)
        self.out_open = True
        self.tail = _Tail()
        self.ready = False
        self.started = time.monotonic()
        self.item: int | None = None
        self.deadline = math.inf

    def drain(self, limit: int = _DRAIN_BYTES) -> None:
        """Read up to ``limit`` bytes the worker has printed (never blocks); keep the tail."""
        got = 0
        while self.out_open and got < limit:
            try:
                chunk = os.read(self.out.fileno(), 65536)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:  # EOF: the worker (and anything it started) closed its output
                self.out_open = False
                return
            self.tail.add(chunk)
            got += len(chunk)

    def exit_text(self) -> str:
        try:
            self.proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            pass
        return _exit_text(self.proc.poll())

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
        self.out.close()


def _with_output(msg: str, w: _Worker) -> str:
    out = w.tail.text()
    return f"{msg}; its output: {out}" if out else msg


class WorkerPool:
    """A persistent pool of worker processes with a per-item wall-clock time-out.

    ``map`` is thread-safe (calls are serialized). Workers start lazily and survive between calls;
    a worker that times out or dies is killed and replaced, and items time out concurrently (N
    hanging items on N workers cost one time-out, not N). Workers die with this process (see
    :func:`_die_with_parent`); their stdout/stderr go to a pipe the pool drains, keeping the tail
    of each item's output for its message. ``startup_timeout_s`` bounds how long a fresh worker may
    take to become ready (the item time-out only starts once a worker is ready).
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
        env["PYTHONUNBUFFERED"] = "1"  # what a killed worker printed last is not lost in a buffer
        return env

    def pids(self) -> list[int]:
        """Process ids of the current workers."""
        return [w.proc.pid for w in self._workers]

    def map(
        self, fn: Callable[..., Any], items: Sequence[tuple], timeout_s: float | None, *, preload: Sequence[str] = ()
    ) -> list[Outcome]:
        """Run ``fn(*item)`` for every item; never raises for a failing item.

        ``preload``: extra modules new workers import before taking items (the module of ``fn`` is
        added automatically). ``timeout_s`` None or <= 0: no time-out.
        """
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
            for m in [*preload, mod]:
                if m and m != "__main__" and m not in self._preload:
                    self._preload.append(m)
            limit = timeout_s if timeout_s is not None and timeout_s > 0 else math.inf
            return self._run(payloads, limit)

    def _run(self, payloads: list[bytes], timeout_s: float) -> list[Outcome]:
        results: list[Outcome | None] = [None] * len(payloads)
        pending = deque(range(len(payloads)))
        env = self._env()
        start_failures = 0
        why_not = "reward worker could not be started"
        requeued: set[int] = set()

        def start() -> None:
            nonlocal start_failures, why_not
            try:
                self._workers.append(_Worker(env, self._preload))
            except Exception as e:  # e.g. out of processes or file descriptors
                start_failures += 1
                why_not = f"cannot start a reward worker: {describe_exception(e)}"
                log.warning("%s", why_not)

        def replace(w: _Worker) -> None:
            w.kill()
            self._workers.remove(w)
            if pending or w.ready:  # a healthy slot is refilled at once, so the next call finds it warm
                start()

        def settle(w: _Worker, outcome: Outcome) -> None:
            assert w.item is not None
            w.drain()
            outcome.output = w.tail.text()
            results[w.item] = outcome
            w.item, w.deadline = None, math.inf

        try:
            want = min(self.num_workers, len(payloads))
            while len(self._workers) < want and start_failures < 3:
                start()
            while pending or any(w.item is not None for w in self._workers):
                for w in list(self._workers):  # dispatch to idle ready workers
                    if w.ready and w.item is None and pending:
                        i = pending.popleft()
                        w.drain()
                        w.tail.reset()
                        try:
                            w.conn.send_bytes(payloads[i])
                        except OSError:  # it died while idle: the item never left, so requeue it (once)
                            if i in requeued:
                                results[i] = Outcome("error", error="worker died before the item was sent")
                            else:
                                requeued.add(i)
                                pending.appendleft(i)
                            self.crashed += 1
                            replace(w)
                            continue
                        w.item, w.deadline = i, time.monotonic() + timeout_s
                if not self._workers:
                    if pending and start_failures < 3:
                        start()
                        continue
                    break
                now = time.monotonic()
                deadlines = [w.deadline if w.ready else w.started + self.startup_timeout_s for w in self._workers]
                wait_s = min(deadlines) - now
                objs: list[Any] = [w.conn for w in self._workers] + [w.out for w in self._workers if w.out_open]
                ready = wait(objs, timeout=None if math.isinf(wait_s) else max(0.0, wait_s))
                for w in self._workers:
                    if w.out_open and w.out in ready:
                        w.drain()
                for w in [w for w in self._workers if w.conn in ready]:
                    try:
                        data = w.conn.recv_bytes(MAX_REPLY_BYTES)
                    except (EOFError, OSError) as e:
                        too_big = isinstance(e, OSError) and w.proc.poll() is None and "length" in str(e)
                        if w.item is not None:
                            msg = (
                                f"its result is larger than {MAX_REPLY_BYTES} bytes" if too_big
                                else f"its worker process died ({w.exit_text()}: os._exit, a signal or a crash in C code)"
                            )
                            settle(w, Outcome("error", error=msg))
                        elif not w.ready:
                            start_failures += 1
                            why_not = _with_output(f"reward worker exited during start-up ({w.exit_text()})", w)
                            log.warning("%s", why_not)
                        self.crashed += not too_big
                        replace(w)
                        continue
                    try:
                        status, payload = pickle.loads(data)
                    except Exception as e:
                        status, payload = "error", f"cannot read the result: {describe_exception(e)}"
                    if not w.ready:
                        w.ready, start_failures = True, 0
                        continue
                    if w.item is None:  # a reply nobody waits for: out of step, so replace the worker
                        replace(w)
                        continue
                    settle(w, Outcome("ok", value=payload) if status == "ok" else Outcome("error", error=str(payload)))
                now = time.monotonic()
                for w in list(self._workers):
                    if w.ready and w.item is not None and now >= w.deadline:
                        settle(w, Outcome("timeout", error=f"no result within {timeout_s:g} s; worker killed"))
                        self.killed += 1
                        replace(w)
                    elif not w.ready and now >= w.started + self.startup_timeout_s:
                        start_failures += 1
                        why_not = _with_output(f"reward worker did not start within {self.startup_timeout_s:g} s", w)
                        log.warning("%s", why_not)
                        replace(w)
                if start_failures >= 3 and not any(w.ready for w in self._workers):
                    log.error("reward workers fail to start; %d items not scored", len(pending))
                    break
        except BaseException:
            # Interrupted (Ctrl-C) or failed: a worker still busy would answer into the next call.
            for w in [w for w in self._workers if w.item is not None]:
                w.kill()
                self._workers.remove(w)
            raise
        return [r if r is not None else Outcome("error", error=why_not) for r in results]

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
