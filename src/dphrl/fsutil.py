"""Crash-safe file operations: every artifact is replaced by rename, never deleted first.

A kill at any moment leaves either the old or the new version of a file or directory in place,
never neither and never a half-written one under the final name:

* :func:`atomic_write_text` / :func:`atomic_write_bytes`: write a temp file in the same directory,
  fsync, ``os.replace``.
* :func:`replace_dir`: swap a fully written temp directory into place. On Linux the two directories
  are exchanged atomically (``renameat2(RENAME_EXCHANGE)``) and the old one, now under the temp name,
  is deleted afterwards; elsewhere the old directory is first renamed aside (``<name>.old-<pid>``),
  which :func:`recover_dir` puts back if the process died before the new one took its place.
* :func:`remove_dir`: rename to a hidden ``.deleting-*`` name first, then delete, so a directory is
  never visible half-deleted under its real name.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import uuid
from pathlib import Path

__all__ = [
    "atomic_write_bytes",
    "atomic_write_text",
    "recover_dir",
    "remove_dir",
    "replace_dir",
    "sha256_file",
    "sweep_leftovers",
]

_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file + fsync + rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    rc = fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE)
    return rc == 0


def replace_dir(tmp: str | Path, dst: str | Path) -> None:
    """Put the complete directory ``tmp`` at ``dst``, replacing any old ``dst`` without a moment where
    neither exists under a findable name (see the module docstring)."""
    tmp, dst = Path(tmp), Path(dst)
    if not dst.exists():
        os.replace(tmp, dst)
        return
    if _exchange(tmp, dst):  # dst is now the new dir, tmp the old one
        remove_dir(tmp)
        return
    aside = dst.with_name(f"{dst.name}.old-{os.getpid()}")
    os.replace(dst, aside)
    os.replace(tmp, dst)
    remove_dir(aside)


def recover_dir(dst: str | Path) -> bool:
    """If ``dst`` is missing but an ``<dst>.old-*`` left by an interrupted :func:`replace_dir` exists,
    move it back; returns whether something was recovered."""
    dst = Path(dst)
    if dst.exists():
        return False
    olds = sorted(dst.parent.glob(f"{dst.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if not olds:
        return False
    os.replace(olds[-1], dst)
    return True


def remove_dir(path: str | Path) -> None:
    """Delete a directory tree, renaming it to a hidden name first (never half-deleted under its name)."""
    path = Path(path)
    if not path.exists():
        return
    doomed = path.with_name(f".deleting-{path.name}-{uuid.uuid4().hex[:8]}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes (streamed)."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sweep_leftovers(path: str | Path) -> list[str]:
    """Delete what an interrupted write left in ``path`` (not recursive): hidden ``.*.tmp*`` files and
    dirs and ``.deleting-*`` dirs. Only for a directory the caller owns (holds its lock)."""
    path = Path(path)
    gone = []
    if path.is_dir():
        for p in path.iterdir():
            if p.name.startswith(".") and (".tmp" in p.name or p.name.startswith(".deleting-")):
                if p.is_dir():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
                gone.append(p.name)
    return gone
