"""Output directories are never clobbered: one claim per run, a lock, and clean signal handling.

Every command that writes a directory (``train``, ``presample``, ``eval``, ``sft``, ``demo``) claims it
with :func:`claim_dir` after it has validated its inputs, so nothing of an old run is touched by a
run that then fails to start:

* an empty or absent directory is claimed as is;
* a directory holding a finished or partial run is refused unless the caller resumes it
  (``--resume``) or replaces it (``--overwrite``); the error names the directory, what is in it
  and both options;
* ``--overwrite`` moves the old contents aside and deletes them (rename first: never half-deleted);
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
from pathlib import Path
from typing import Any

from dphrl.fsutil import remove_dir

__all__ = ["LOCK_NAME", "RunDirError", "RunLock", "StopSignals", "claim_dir", "dir_contents"]

LOCK_NAME = ".dphrl.lock"


class RunDirError(RuntimeError):
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

    def acquire(self, what: str) -> RunLock:
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirError(
                f"{what}: {self.path} is in use by {holder}; wait for it to finish or use another "
                "output directory"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def claim_dir(path: str | Path, *, what: str, resume: bool = False, overwrite: bool = False,
              lock: bool = True) -> RunLock | None:
    """Claim ``path`` for a new run (see the module docstring); returns the held lock (or None).

    ``what`` names the command in messages (e.g. ``"dphrl train"``). ``resume`` accepts a directory
    holding a run (the caller continues it); ``overwrite`` replaces it.
    """
    path = Path(path)
    held = RunLock(path).acquire(what) if lock else None
    try:
        old = dir_contents(path)
        if old and not resume:
            if not overwrite:
                shown = ", ".join(old[:6]) + (", ..." if len(old) > 6 else "")
                raise RunDirError(
                    f"{what}: {path} already holds a run ({shown}). Nothing was changed. Pass --resume to "
                    "continue it, --overwrite to replace it, or choose another output directory."
                )
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
