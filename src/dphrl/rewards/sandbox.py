"""Isolation for reward code: a nestable wall-clock limit and a pool of killable worker processes.

* :func:`time_limit` interrupts Python code in the main thread after a wall-clock budget (``SIGALRM``
  via ``setitimer``; nests correctly; a no-op where signals cannot be used, see :func:`can_interrupt`).
* :class:`WorkerPool` runs ``fn(*args)`` items in separate worker processes, each item under its own
  wall-clock time-out. A hung worker (even one stuck inside C code) is killed with everything it
  started and replaced; a crashed worker is replaced; nothing is dropped silently: every item comes
  back as an :class:`Outcome` with status ``ok``, ``error`` or ``timeout`` (``sys.exit``/``os._exit``
  in an item included). Items time out concurrently, one per worker. Their stdout/stderr go to a pipe
  the pool drains, never to the terminal: the tail of an item's output is kept for its message.

Containment: workers and everything they start die with the run
-----------------------------------------------------------------

A process group alone does not contain a reward: a child that calls ``setsid`` (a daemon) leaves it,
and ``PR_SET_PDEATHSIG`` is not inherited by the children a worker forks. On Linux every worker
therefore runs under its own *supervisor*, a small process of ours that never runs reward code::

    pool (trainer) ── supervisor ── worker ── whatever the reward starts (forks, setsid daemons, ...)

* The supervisor is a ``PR_SET_CHILD_SUBREAPER``: a descendant whose parent exits (a double-forked
  ``setsid`` daemon) is re-parented to it instead of to init, so the whole tree stays below it
  and is found by walking ``/proc/<pid>/task/*/children`` (a ``/proc`` scan where that file is
  missing). Session or group changes cannot take a process out of that tree.
* The supervisor kills the whole tree (``SIGKILL``, repeated until nothing is left, so a process
  forking meanwhile is caught; through a pidfd checked against the tree, so no recycled pid is hit),
  then exits, when: the pool asks (``SIGTERM``: a time-out, :meth:`WorkerPool.close`, the ``atexit``
  hook on a normal exit or an exception); the worker dies (a crash, ``os._exit``); or the trainer dies
  in any way, ``SIGKILL`` included: ``PR_SET_PDEATHSIG`` (``SIGTERM``, which the supervisor waits for
  with ``sigtimedwait``: it is never stuck in reward code) plus a parent-pid poll every second.
* The worker gets ``PR_SET_PDEATHSIG(SIGKILL)`` towards its supervisor, so it cannot outlive it.
* The supervisor's own exit status mirrors the worker's (``exit code 0``, ``killed by SIGKILL``),
  so messages describe the worker; it holds no copy of the worker's socket, so the pool sees a dying
  worker at once.
* Cost: one forked process per worker (no extra interpreter start); nothing per item (items go
  straight to the worker over its socket pair); killing a worker walks its tree once.

Limits: code that deliberately ``SIGKILL``\\ s its own supervisor first (same user) re-parents its
children to init; nothing without root or a delegated cgroup can stop that. Elsewhere than Linux
the worker is started directly and killed with its process group (daemons escape there).

Memory: every worker (and what it starts) runs under ``RLIMIT_DATA`` (:data:`DEFAULT_MEMORY_LIMIT_MB`,
environment ``DPHRL_REWARD_MEMORY_MB``, 0 for none), so a runaway reward gets a ``MemoryError``
instead of exhausting the machine. ``RLIMIT_DATA`` counts heap and private writable mappings, not
reserved address space (``RLIMIT_AS`` would also count what CUDA and some allocators reserve);
importing torch and running it on CPU works under the default limit (tested).

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
    "_worker_main(int(sys.argv[1]), int(sys.argv[2]), sys.argv[4:], int(sys.argv[3]))"
)

_PR_SET_PDEATHSIG = 1
_PR_SET_CHILD_SUBREAPER = 36
_LINUX = sys.platform.startswith("linux")

#: ``RLIMIT_DATA`` of a worker, in MiB, unless ``DPHRL_REWARD_MEMORY_MB`` says otherwise (0: no limit).
DEFAULT_MEMORY_LIMIT_MB = 4096
#: How long the pool waits for a supervisor to kill its worker's tree before killing its group itself.
_STOP_GRACE_S = 5.0
#: How long a supervisor keeps killing a tree that will not die (processes in uninterruptible sleep).
_KILL_TREE_S = 5.0


def default_memory_limit_mb() -> int:
    """``DPHRL_REWARD_MEMORY_MB`` if set (0: no limit), else :data:`DEFAULT_MEMORY_LIMIT_MB`."""
    raw = os.environ.get("DPHRL_REWARD_MEMORY_MB", "").strip()
    if not raw:
        return DEFAULT_MEMORY_LIMIT_MB
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(
            f"DPHRL_REWARD_MEMORY_MB must be a whole number of MiB (0: no limit), got {raw!r}"
        ) from None
    if value < 0:
        raise ValueError(f"DPHRL_REWARD_MEMORY_MB must be >= 0, got {value}")
    return value


def _prctl(option: int, arg: int) -> bool:
    """``prctl(option, arg, 0, 0, 0) == 0`` (False where it is unavailable)."""
    if not _LINUX:
        return False
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        zero = ctypes.c_ulong(0)
        return libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg), zero, zero, zero) == 0
    except Exception:
        return False


def _die_with_parent(parent: int) -> None:
    """Make this worker exit when its parent (its supervisor, or the pool) dies, even while stuck in C.

    Linux: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``, so the kernel kills the worker whatever it is doing.
    Everywhere: a thread that polls the parent pid every second (this one needs the GIL, so it cannot
    stop a worker stuck in a C call that holds it; the ``prctl`` can).
    """
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
    if os.getppid() != parent:  # the parent died before the prctl took effect
        os._exit(1)

    def watchdog() -> None:
        while True:
            time.sleep(1.0)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watchdog, name="dphrl-parent-watchdog", daemon=True).start()


def _limit_memory(limit_mb: int) -> None:
    """``RLIMIT_DATA`` of this process (and what it starts) to ``limit_mb`` MiB; 0: unchanged."""
    if limit_mb <= 0:
        return
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
        want = limit_mb * 2**20
        if hard != resource.RLIM_INFINITY:
            want = min(want, hard)
        if soft == resource.RLIM_INFINITY or soft > want:
            resource.setrlimit(resource.RLIMIT_DATA, (want, hard))
    except (ImportError, OSError, ValueError):  # not POSIX, or not allowed: the SQL/time limits still apply
        pass


# --- supervisor (Linux) ------------------------------------------------------------------------------

_SUPERVISOR_SIGNALS = {signal.SIGTERM, signal.SIGHUP, signal.SIGCHLD} if _LINUX else set()


def _children(pid: int, scan: dict[int, list[int]] | None) -> list[int]:
    """Child pids of ``pid``: from ``/proc/<pid>/task/*/children``, or from ``scan`` (ppid -> pids)."""
    if scan is not None:
        return scan.get(pid, [])
    out: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                out.extend(int(x) for x in f.read().split())
        except (OSError, ValueError):
            pass
    return out


def _ppid(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _scan_proc() -> dict[int, list[int]]:
    """ppid -> child pids of every process in ``/proc`` (where ``task/*/children`` is missing)."""
    tree: dict[int, list[int]] = {}
    try:
        names = os.listdir("/proc")
    except OSError:  # no /proc: only the worker itself (our child) is killed
        return tree
    for name in names:
        if name.isdigit():
            pp = _ppid(int(name))
            if pp is not None:
                tree.setdefault(pp, []).append(int(name))
    return tree


def _descendants(root: int) -> dict[int, int]:
    """Every descendant of ``root`` (zombies included), as pid -> parent pid."""
    me = os.getpid()
    scan = None if os.path.exists(f"/proc/{me}/task/{me}/children") else _scan_proc()
    found: dict[int, int] = {}
    todo = [root]
    while todo:
        parent = todo.pop()
        for c in _children(parent, scan):
            if c not in found and c != root:
                found[c] = parent
                todo.append(c)
    return found


def _kill_pid(pid: int, parents: set[int]) -> None:
    """``SIGKILL`` ``pid`` if it is still the child of one of ``parents`` (a pidfd, where available,
    makes the check and the signal refer to the same process even if the pid is recycled)."""
    pidfd = -1
    try:
        if hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal"):
            pidfd = os.pidfd_open(pid)
        if _ppid(pid) not in parents:
            return
        if pidfd >= 0:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        else:
            os.kill(pid, signal.SIGKILL)
    except OSError:  # gone already (ProcessLookupError), or no pidfd support: checked above
        pass
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _reap(statuses: dict[int, int]) -> None:
    """Collect every child that has ended (orphans re-parented to us included) into ``statuses``."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        statuses[pid] = status


def _kill_tree(statuses: dict[int, int], budget_s: float = _KILL_TREE_S) -> None:
    """``SIGKILL`` every descendant of this process and reap them, until none is left (or the budget
    is spent: processes in uninterruptible sleep). Processes that fork meanwhile are re-parented to
    this subreaper when their parent dies, so the next round finds their children."""
    me = os.getpid()
    end = time.monotonic() + budget_s
    while True:
        _reap(statuses)
        tree = _descendants(me)
        if not tree or time.monotonic() > end:
            return
        parents = {me, *tree}
        for pid in tree:
            _kill_pid(pid, parents)
        try:
            signal.sigtimedwait({signal.SIGCHLD}, 0.01)
        except OSError:
            time.sleep(0.01)


def _exit_like(status: int | None) -> None:
    """End this process the way the worker ended (exit code or signal), so the pool's message is right."""
    _flush_std()
    code = os.waitstatus_to_exitcode(status) if status is not None else 1
    if code < 0:
        sig = -code
        try:
            import resource

            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # mirroring a SIGSEGV must not dump a core
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
            os.kill(os.getpid(), sig)
        except (OSError, ValueError, ImportError):
            pass
        os._exit(128 + sig)
    os._exit(code)


def _supervise(parent: int, worker: int) -> None:
    """The supervisor's loop (never returns): wait for a stop request, the worker's end or the
    parent's death, then kill every descendant and exit like the worker."""
    statuses: dict[int, int] = {}
    try:
        while worker not in statuses:
            info = signal.sigtimedwait(_SUPERVISOR_SIGNALS, 1.0)
            _reap(statuses)
            if (info is not None and info.si_signo != signal.SIGCHLD) or os.getppid() != parent:
                break
    finally:
        if worker not in statuses:  # first the worker itself: our child, so its pid cannot be recycled yet
            try:
                os.kill(worker, signal.SIGKILL)
            except OSError:
                pass
        _kill_tree(statuses)
    if worker not in statuses:  # still unreaped after the budget: one last blocking-free look
        _reap(statuses)
    _exit_like(statuses.get(worker))


def _fork_supervised(fd: int, parent: int) -> int | None:
    """Split this process into a supervisor and the worker (see the module doc).

    Returns in the worker only, with the supervisor's pid; the supervisor never returns. Returns
    None (no supervisor; the caller is the worker) where subreapers are unavailable.
    """
    if not _LINUX or not _prctl(_PR_SET_CHILD_SUBREAPER, 1):
        return None
    signal.pthread_sigmask(signal.SIG_BLOCK, _SUPERVISOR_SIGNALS)  # taken by sigtimedwait, never lost
    _prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:  # the pool died before the prctl took effect
        os._exit(1)
    supervisor = os.getpid()
    try:
        worker = os.fork()
    except OSError:
        _prctl(_PR_SET_CHILD_SUBREAPER, 0)
        _prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SUPERVISOR_SIGNALS)
        return None
    if worker == 0:  # the worker: the subreaper flag and the death signal are not inherited
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SUPERVISOR_SIGNALS)
        return supervisor
    os.close(fd)  # only the worker holds the socket: its death is an EOF for the pool at once
    _supervise(parent, worker)
    os._exit(1)  # not reached


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


def _worker_main(fd: int, parent: int, preload: Sequence[str] = (), memory_limit_mb: int = 0) -> None:
    """Entry point of a worker process: receive ``(fn, args)``, send back ``(status, payload)``.

    On Linux it first forks: the parent stays behind as the worker's supervisor (:func:`_supervise`).
    Every ``BaseException`` an item raises (``sys.exit`` included) becomes an ``error`` reply. The
    worker ignores ``SIGINT`` (the parent handles Ctrl-C), dies with its parent, and runs under
    ``RLIMIT_DATA`` of ``memory_limit_mb`` MiB (0: none).
    """
    import importlib

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    supervisor = _fork_supervised(fd, parent)
    _die_with_parent(supervisor if supervisor is not None else parent)
    _limit_memory(memory_limit_mb)
    conn = Connection(fd)
    for mod in preload:  # import before "ready": start-up time is not charged to the first item
        try:
            importlib.import_module(mod)
        except BaseException:  # noqa: BLE001 - reported when an item needs it
            pass
    _flush_std()
    conn.send(("ready", (os.getpid(), supervisor is not None)))
    while True:
        try:
            data = conn.recv_bytes()
        except (EOFError, OSError):
            return
        try:
            fn, args = pickle.loads(data)
            reply: tuple[str, Any] = ("ok", fn(*args))
        except MemoryError as e:
            reply = ("error", _memory_message(e, memory_limit_mb))
        except BaseException as e:  # noqa: BLE001 - everything is reported to the parent
            reply = ("error", _safe_describe(e))
        _flush_std()  # what the item printed reaches the parent before its reply
        try:
            conn.send(reply)
        except Exception as e:  # unpicklable result
            conn.send(("error", f"cannot send the result back: {_safe_describe(e)}"))


def _memory_message(e: BaseException, limit_mb: int) -> str:
    text = _safe_describe(e)
    if limit_mb > 0:
        text += (f" (the reward worker's memory limit is {limit_mb} MiB of RLIMIT_DATA; "
                 "set DPHRL_REWARD_MEMORY_MB to change it, 0 for none)")
    return text


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
            threading.Thread(
                target=_spawn_loop, args=(_spawn_queue,), name="dphrl-worker-spawner", daemon=True
            ).start()
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
    def __init__(self, env: dict[str, str], preload: Sequence[str] = (), memory_limit_mb: int = 0) -> None:
        parent_sock, child_sock = socket.socketpair()
        try:
            self.proc = _popen(
                [
                    sys.executable,
                    "-c",
                    _BOOT,
                    str(child_sock.fileno()),
                    str(os.getpid()),
                    str(memory_limit_mb),
                    *preload,
                ],
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
        self.worker_pid: int | None = None  # the worker itself (self.proc is its supervisor on Linux)
        self.supervised = _LINUX  # until the worker says otherwise

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

    def stop(self) -> None:
        """Start killing the worker and everything it started; :meth:`finish` waits for it.

        Supervised: ``SIGTERM`` to the supervisor, which kills the whole tree and exits. Otherwise:
        ``SIGKILL`` to the worker's process group.
        """
        if not self.supervised:
            self._kill_group()
        elif self.proc.poll() is None:
            try:
                os.kill(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def finish(self) -> None:
        if self.supervised:
            try:
                self.proc.wait(timeout=_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("reward worker supervisor %d did not stop within %g s; killing its process group",
                            self.proc.pid, _STOP_GRACE_S)
        if self.proc.poll() is None:
            self._kill_group()
        self.proc.wait()
        self.conn.close()
        self.out.close()

    def kill(self) -> None:
        self.stop()
        self.finish()

    def _kill_group(self) -> None:
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.proc.kill()
        except ProcessLookupError:
            pass


def _with_output(msg: str, w: _Worker) -> str:
    out = w.tail.text()
    return f"{msg}; its output: {out}" if out else msg


class WorkerPool:
    """A persistent pool of worker processes with a per-item wall-clock time-out.

    ``map`` is thread-safe (calls are serialized). Workers start lazily and survive between calls;
    a worker that times out or dies is killed and replaced, and items time out concurrently (N
    hanging items on N workers cost one time-out, not N). Workers, and every process they start,
    die with this process and whenever the pool kills them (see the module doc); their
    stdout/stderr go to a pipe the pool drains, keeping the tail of each item's output for its
    message. ``startup_timeout_s`` bounds how long a fresh worker may take to become ready (the item
    time-out only starts once a worker is ready). ``memory_limit_mb``: each worker's
    ``RLIMIT_DATA`` in MiB (None: :func:`default_memory_limit_mb`; 0: no limit).
    """

    def __init__(self, num_workers: int, *, startup_timeout_s: float = 120.0,
                 memory_limit_mb: int | None = None) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        self.num_workers = num_workers
        self.startup_timeout_s = startup_timeout_s
        self.memory_limit_mb = default_memory_limit_mb() if memory_limit_mb is None else int(memory_limit_mb)
        if self.memory_limit_mb < 0:
            raise ValueError(f"memory_limit_mb must be >= 0, got {memory_limit_mb}")
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
        """Process ids of the current workers' top processes (their supervisors on Linux)."""
        return [w.proc.pid for w in self._workers]

    def worker_pids(self) -> list[int]:
        """Process ids of the processes that run the items (known once a worker is ready)."""
        return [w.worker_pid if w.worker_pid is not None else w.proc.pid for w in self._workers]

    def map(
        self,
        fn: Callable[..., Any],
        items: Sequence[tuple],
        timeout_s: float | None,
        *,
        preload: Sequence[str] = (),
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
                self._workers.append(_Worker(env, self._preload, self.memory_limit_mb))
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
                deadlines = [
                    w.deadline if w.ready else w.started + self.startup_timeout_s for w in self._workers
                ]
                wait_s = min(deadlines) - now
                objs: list[Any] = [w.conn for w in self._workers] + [
                    w.out for w in self._workers if w.out_open
                ]
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
                                f"its result is larger than {MAX_REPLY_BYTES} bytes"
                                if too_big
                                else (
                                    f"its worker process died ({w.exit_text()}: os._exit, a signal or a "
                                    "crash in C code)"
                                )
                            )
                            settle(w, Outcome("error", error=msg))
                        elif not w.ready:
                            start_failures += 1
                            why_not = _with_output(
                                f"reward worker exited during start-up ({w.exit_text()})", w
                            )
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
                        if status == "ready" and isinstance(payload, tuple) and len(payload) == 2:
                            w.worker_pid, w.supervised = int(payload[0]), bool(payload[1])
                        continue
                    if w.item is None:  # a reply nobody waits for: out of step, so replace the worker
                        replace(w)
                        continue
                    settle(
                        w,
                        Outcome("ok", value=payload)
                        if status == "ok"
                        else Outcome("error", error=str(payload)),
                    )
                now = time.monotonic()
                for w in list(self._workers):
                    if w.ready and w.item is not None and now >= w.deadline:
                        settle(
                            w, Outcome("timeout", error=f"no result within {timeout_s:g} s; worker killed")
                        )
                        self.killed += 1
                        replace(w)
                    elif not w.ready and now >= w.started + self.startup_timeout_s:
                        start_failures += 1
                        why_not = _with_output(
                            f"reward worker did not start within {self.startup_timeout_s:g} s", w
                        )
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
                for w in self._workers:  # all trees are killed in parallel
                    w.stop()
                for w in self._workers:
                    w.finish()
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
