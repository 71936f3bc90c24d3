"""Output directories are never clobbered: one claim per run, a lock, and clean signal handling.

Every command that writes a directory (``train``, ``presample``, ``eval``, ``report``, ``sft``,
``demo``) claims it with :func:`claim_dir` after it has validated its inputs, so nothing of an old
run is touched by a run that then fails to start:

* an empty or absent directory is claimed as is;
* a directory holding a finished or partial run is refused unless the caller resumes it
  (``--resume``) or replaces it (``--overwrite``); the error names the directory, what is in it
  and both options;
* ``--overwrite`` moves the old contents aside and deletes them (rename first: never half-deleted),
  only in a directory dphrl wrote (:data:`RUN_MARKERS`): a directory of other files is refused;
* a refused claim changes nothing, lock file included;
* a lock (``.dphrl.lock``, ``flock``) refuses a second concurrent run in the same directory; the
  kernel releases it when the process dies, so a crash never leaves a stale lock.

:class:`StopSignals` turns SIGTERM (what cluster schedulers send before killing) and SIGINT into a
flag the training loop reads at the next step boundary, where it writes a checkpoint and exits
cleanly; a second SIGINT interrupts at once.
"""

from __future__ import annotations

import fcntl
import os
import signal
import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from dphrl.errors import UserError
from dphrl.fsutil import remove_dir

__all__ = ["LOCK_NAME", "RUN_MARKERS", "RunDirError", "RunLock", "StopSignals", "check_claim", "claim_dir",
           "claimed_dir", "dir_contents", "is_dphrl_dir"]

LOCK_NAME = ".dphrl.lock"


class RunDirError(UserError, RuntimeError):
    """The output directory holds another run (or is in use); the message says how to proceed."""


def dir_contents(path: Path) -> list[str]:
    """Visible entries of ``path`` (what a new run would clobber), without our lock and temp files."""
    if not path.is_dir():
        return []
    return sorted(
        p.name for p in path.iterdir() if p.name != LOCK_NAME and not p.name.startswith(".deleting-")
    )


class RunLock:
    """An exclusive ``flock`` on ``<dir>/.dphrl.lock`` held for the life of the run."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fd: int | None = None

    def _busy(self, fd: int, what: str) -> RunDirError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        return RunDirError(
            f"{what}: {self.path} is in use by {holder}; wait for it to finish or use another "
            "output directory"
        )

    def check_free(self, what: str) -> None:
        """Refuse a directory whose lock another process holds, creating and writing nothing."""
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDONLY)
        except OSError:
            return  # no lock file: nobody holds it
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy(fd, what) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def acquire(self, what: str) -> RunLock:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise self._busy(fd, what) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


#: Names that mark a directory as written by dphrl (a run, a store, an evaluation, an experiment):
#: ``--overwrite`` replaces only such a directory, never one holding other files.
RUN_MARKERS = (LOCK_NAME, "metrics.jsonl", "run_info.json", "checkpoints", "final", "manifest.json",
               "results.json", "jobs.json", "jobs_status.json", "demo_size.json", "sft_log.json", "report.md")


def is_dphrl_dir(path: Path) -> bool:
    """Whether ``path`` holds something dphrl wrote (one of :data:`RUN_MARKERS`)."""
    return any((Path(path) / name).exists() for name in RUN_MARKERS)


def _refusal(path: Path, what: str, old: list[str], *, resume: bool, overwrite: bool,
             resumable: bool = True, noun: str = "a run") -> RunDirError | None:
    """Why ``path`` cannot be claimed as asked, or None."""
    shown = ", ".join(old[:6]) + (", ..." if len(old) > 6 else "")
    if not old or resume:
        return None
    if not overwrite:
        how = "--overwrite to replace it"
        how = f"--resume to continue it, {how}" if resumable else how
        return RunDirError(
            f"{what}: {path} already holds {noun} ({shown}). Nothing was changed. Pass {how}, or choose "
            "another output directory."
        )
    if not is_dphrl_dir(path):
        return RunDirError(
            f"{what}: {path} holds files that are not a dphrl run ({shown}); --overwrite only replaces a "
            "directory dphrl wrote. Nothing was changed: move those files away or choose another output "
            "directory."
        )
    return None


def check_claim(path: str | Path, *, what: str, resume: bool = False, overwrite: bool = False,
                lock: bool = True, resumable: bool = True, noun: str = "a run") -> None:
    """Refuse, reading only, what :func:`claim_dir` with the same arguments would refuse now: a
    command checks its output directory this way before its slow work, and claims it after."""
    path = Path(path)
    if lock:
        RunLock(path).check_free(what)  # a running run is reported as such (read only)
    err = _refusal(path, what, dir_contents(path), resume=resume, overwrite=overwrite, resumable=resumable,
                   noun=noun)
    if err is not None:
        raise err


def claim_dir(path: str | Path, *, what: str, resume: bool = False, overwrite: bool = False,
              lock: bool = True, clear: bool = True, resumable: bool = True,
              noun: str = "a run") -> RunLock | None:
    """Claim ``path`` for a new run (see the module docstring); returns the held lock (or None).

    ``what`` names the command in messages (e.g. ``"dphrl train"``). ``resume`` accepts a directory
    holding a run (the caller continues it); ``overwrite`` replaces it, but only a directory that
    dphrl wrote (:func:`is_dphrl_dir`). A refused claim changes nothing, lock file included: the
    contents are checked before the lock is taken, and again under it. With ``clear=False`` an
    accepted ``overwrite`` leaves the old contents for the caller to replace file by file (``eval``,
    ``presample``, ``report``: a command that then fails keeps the old result). ``resumable`` and
    ``noun`` only shape the refusal (whether ``--resume`` is offered; what the directory holds).
    """
    path = Path(path)
    check_claim(path, what=what, resume=resume, overwrite=overwrite, lock=lock, resumable=resumable,
                noun=noun)
    held = RunLock(path).acquire(what) if lock else None
    try:
        old = dir_contents(path)  # again, under the lock: another process may have written meanwhile
        err = _refusal(path, what, old, resume=resume, overwrite=overwrite, resumable=resumable, noun=noun)
        if err is not None:
            raise err
        if old and not resume and clear:
            aside = path / f".deleting-overwritten-{uuid.uuid4().hex[:8]}"
            aside.mkdir()
            for name in old:
                os.replace(path / name, aside / name)
            remove_dir(aside)
    except BaseException:
        if held is not None:
            held.release()
        raise
    return held


@contextmanager
def claimed_dir(path: str | Path, *, what: str, overwrite: bool = False, clear: bool = False,
                noun: str = "a previous result") -> Iterator[RunLock | None]:
    """:func:`claim_dir` (no ``--resume``) for the life of a ``with`` block; the lock is released at
    its end. A block that raises leaves no trace of a directory it created: if the directory did not
    exist and holds nothing but the lock, both go."""
    path = Path(path)
    existed = path.exists()
    held = claim_dir(path, what=what, overwrite=overwrite, clear=clear, resumable=False, noun=noun)
    ok = False
    try:
        yield held
        ok = True
    finally:
        if not ok and not existed and path.is_dir() and not dir_contents(path):
            (path / LOCK_NAME).unlink(missing_ok=True)  # under the lock: nobody else can hold it
        if held is not None:
            held.release()
        if not ok and not existed and path.is_dir() and not any(path.iterdir()):
            path.rmdir()


class StopSignals:
    """SIGTERM / SIGINT -> ``self.requested`` (the signal's name), read by the loop at step boundaries.

    Installed only in the main thread (signal handlers cannot be set elsewhere); restores the previous
    handlers on exit. A second SIGINT raises KeyboardInterrupt at once.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        import threading

        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.requested == "SIGINT":
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old.clear()
