"""Progress bars that keep redirected logs readable.

On a terminal, a tqdm bar. When the output is a file or a pipe (``dphrl train ... > log``, a cluster
job), tqdm's carriage-return redraws would turn the whole run into one long line; there a plain line
is printed every 10 % (and at the end) instead, with the bar's postfix.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm.auto import tqdm

__all__ = ["LineProgress", "progress_bar", "quiet_library_bars"]


class LineProgress:
    """The part of tqdm's interface the loops use (update, set_postfix, close, iteration), printing one
    line per ``every`` fraction of ``total``."""

    def __init__(self, iterable: Iterable | None, *, total: int | None, desc: str, unit: str, initial: int,
                 stream: TextIO, every: float = 0.1):
        self.iterable, self.desc, self.unit, self.stream = iterable, desc, unit, stream
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        self.total, self.n, self.every = total, initial, every
        self.postfix: dict[str, Any] = {}
        self._t0 = time.time()
        self._next = self._mark_after(initial)
        self._closed = False

    def _mark_after(self, n: int) -> float:
        if not self.total:
            return float("inf")
        step = max(1.0, self.total * self.every)
        return (int(n / step) + 1) * step

    def __iter__(self) -> Iterator:
        for x in self.iterable or ():
            yield x
            self.update(1)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.n >= self._next or (self.total and self.n >= self.total):
            self._next = self._mark_after(self.n)
            self._line()

    def set_postfix(self, **kw: Any) -> None:
        self.postfix = kw

    def _line(self) -> None:
        total = f"/{self.total}" if self.total else ""
        pct = f" {100 * self.n / self.total:3.0f}%" if self.total else ""
        extra = "".join(f", {k}={v}" for k, v in self.postfix.items())
        print(f"{self.desc}:{pct} {self.n}{total} {self.unit}, {time.time() - self._t0:.0f} s{extra}",
              file=self.stream, flush=True)

    def close(self) -> None:
        if not self._closed and self.n and not (self.total and self.n >= self.total):
            self._line()  # where it stopped (an interrupted run)
        self._closed = True


def progress_bar(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "",
                 unit: str = "it", initial: int = 0, disable: bool = False,
                 stream: TextIO | None = None) -> Any:
    """A tqdm bar on a terminal, a :class:`LineProgress` (a line every 10 %) otherwise; silent when
    ``disable``."""
    out = stream if stream is not None else sys.stderr
    if disable or out.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=disable, file=out)
    return LineProgress(iterable, total=total, desc=desc, unit=unit, initial=initial, stream=out)


def quiet_library_bars(stream: TextIO | None = None) -> None:
    """Turn off transformers' and huggingface_hub's own tqdm bars ("Loading weights", "Writing model
    shards", downloads) when ``stream`` (default stderr) is not a terminal: in a redirected log each is
    a run of carriage-return redraws. On a terminal they are left as they are."""
    out = stream if stream is not None else sys.stderr
    if out.isatty():
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
