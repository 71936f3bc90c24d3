"""SQL memory bombs and a probe that scores one in a worker process and reports its peak memory
(module-level, so worker processes can import it)."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path

_R = "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r WHERE x < {n}) "

#: name -> query. Each one would hold gigabytes without the memory limits.
BOMBS: dict[str, str] = {
    # the review's case: 300 rows of a 9 MB value (2.7 GB of rows; the row cap alone allows ~1 TB)
    "zeroblob_rows": _R.format(n=300) + "SELECT zeroblob(9000000) FROM r",
    # one row of 60 values of 9 MB (540 MB at once inside SQLite): the heap limit
    "zeroblob_columns": "SELECT " + ", ".join(["zeroblob(9000000)"] * 60),
    # the same as text (the text decoder path)
    "text_columns": "SELECT " + ", ".join(["hex(zeroblob(4500000))"] * 60),
    # a group_concat past the value length cap
    "group_concat": _R.format(n=3000) + "SELECT group_concat(hex(zeroblob(2000))) FROM r",
    # 40 aggregates of 8 MB each in one group (320 MB of aggregate state)
    "group_concat_columns": _R.format(n=2000) + "SELECT "
    + ", ".join(["group_concat(hex(zeroblob(2000)))"] * 40) + " FROM r",
    # a cartesian product of 3.7 M rows of 16 columns (~5 GB of Python objects): the result size cap
    # stops it long before either row cap
    "cartesian": "SELECT * FROM singer a, singer b, singer c, singer d",
    # an ORDER BY over 2 M generated rows of 300 random bytes: ~700 MB of sorter data, which SQLite's
    # default temp_store writes to temporary files (disk); in memory the heap limit stops it
    "disk_sort": _R.format(n=2_000_000)
    + "SELECT count(*) FROM (SELECT x, randomblob(300) AS b FROM r ORDER BY b)",
    # 200,000 rows of 2 KB text (400 MB)
    "wide_rows": _R.format(n=200_000) + "SELECT x, printf('%.2000c', 'x') FROM r",
}

#: What stops each bomb (in the reason a prediction scores 0 for).
STOPPED_BY = dict.fromkeys(BOMBS, "SQLMemoryLimit") | {"group_concat": "string or blob too big"}


def make_bomb_db(path: Path) -> str:
    """A small database with a ``singer`` table of 44 rows of ~200 bytes (the cartesian bomb's input)."""
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE singer (id INTEGER, name TEXT, country TEXT, age INTEGER)")
    conn.executemany(
        "INSERT INTO singer VALUES (?, ?, ?, ?)",
        [(i, f"singer number {i} " + "n" * 80, "country " + "c" * 80, 20 + i) for i in range(44)],
    )
    conn.commit()
    conn.close()
    return str(path)


def _rss_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def probe(mode: str, pred: str, gold: str, db: str, options: dict) -> tuple[float, str, float, float]:
    """Score ``pred`` under ``mode`` (``spider``/``bird`` or an official mode) in this process and
    return ``(score, reason, peak memory growth in MiB, seconds)``; the peak is ``VmHWM`` after a reset
    to the current RSS (``/proc/self/clear_refs``)."""
    from dphrl.rewards import sql as sr
    from dphrl.rewards import sql_official as so

    def run(q: str) -> tuple[float, str]:
        if mode in so.OFFICIAL_REWARDS:
            return so.score_official_with_reason(q, gold, db, mode, **options)
        return sr.score_with_reason(q, gold, db, mode, **options)

    run(gold)  # warm: the connection, the gold result and the imports are not charged to the bomb
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS
    base = _rss_kb("VmRSS")
    t0 = time.monotonic()
    value, reason = run(pred)
    elapsed = time.monotonic() - t0
    return value, reason, (_rss_kb("VmHWM") - base) / 1024, elapsed


def can_measure_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return os.path.exists("/proc/self/status")
    except OSError:
        return False
