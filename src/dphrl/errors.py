"""User-facing refusals: what the command line prints as one ``dphrl: <message>`` paragraph, exit 2.

A :class:`UserError` is a problem the user can fix (a wrong path, a damaged file, a value out of
range); its message names the file, key or path at fault and the fix. Everything else that escapes a
command is a bug of ours and keeps its traceback. ``dphrl --debug`` (or ``DPHRL_DEBUG=1``) shows the
traceback of a refusal too.

The existing error classes (``ConfigError``, ``RunDirError``, ``CheckpointError``, the store errors,
``RewardFailureError``, ...) subclass :class:`UserError` *and* keep their old base class
(``ValueError``, ``RuntimeError``, ``FileNotFoundError``), so code that catches those still does.
"""

from __future__ import annotations

__all__ = ["Interrupted", "PathNotFoundError", "UserError", "UserValueError"]


class UserError(Exception):
    """A refusal the user can fix; the message names what is wrong and how to fix it."""


class PathNotFoundError(UserError, FileNotFoundError):
    """A file or directory the user named does not exist (or lacks what it must hold)."""


class UserValueError(UserError, ValueError):
    """A value the user gave (an option, a key) is out of range or inconsistent."""


class Interrupted(BaseException):
    """SIGTERM arrived outside the training loop (start-up, evaluation, after the final save): the
    command stops where it is. A ``BaseException``, like ``KeyboardInterrupt``, so that no ``except
    Exception`` on the way swallows it; files are written atomically, so each is complete or absent."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name
