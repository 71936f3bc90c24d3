"""SQL execution-match reward on SQLite (Spider and BIRD conventions), run in a sandbox.

:func:`score` extracts the SQL from a response (:func:`extract_sql`), runs it and the gold query on the
database, and compares the results:

* ``mode="spider"``: equal multisets of rows, invariant to column order (a column permutation is
  searched for, so ``SELECT a, b`` matches ``SELECT b, a``); row order matters exactly when the gold
  query has a top-level ``ORDER BY`` (not one inside a subquery, CTE or window). As in the official
  Spider evaluation, two empty results match.
* ``mode="bird"``: equal sets of rows (BIRD's official rule; column order matters).
* ``partial_credit`` (default 0, off): a non-matching prediction with the right number of rows gets
  ``partial_credit * (fraction of gold columns found among the predicted columns)``.

Sandbox (every query, gold included): the database is opened read-only and immutable
(``file:...?mode=ro&immutable=1``); only a single ``SELECT``/``WITH``/``VALUES`` statement is run
(found by :func:`lex_sql`, the one SQL lexer, also behind the top-level ``ORDER BY`` test);
an authorizer denies every write, ATTACH/DETACH (hence ``VACUUM INTO``), DDL, transaction control,
non-introspection PRAGMA and the ``load_extension``/file functions; extension loading is disabled;
ATTACH, string/blob length and SQL length are capped with ``setlimit``; a progress handler enforces
the time-out; at most ``max_rows`` rows are fetched (more counts as a failure).

Memory (every query, both in this module and in :mod:`dphrl.rewards.sql_official`):

* SQLite's own heap is capped at :data:`SQLITE_HEAP_LIMIT_BYTES` (``PRAGMA hard_heap_limit``, set
  when the sandbox opens a connection, never raised; a soft limit at half of it makes page caches
  recycle pages first). A query whose values, aggregates or sorts need more fails with SQLite's
  out-of-memory error. The limit is process-wide: with in-process scoring it also applies to other
  SQLite users of the process.
* The fetched result is accounted in Python bytes (``sys.getsizeof`` of every row and value, row by
  row, so no batch can overshoot): past ``max_result_bytes`` (:data:`DEFAULT_MAX_RESULT_BYTES`)
  fetching stops. One row is bounded by the heap limit (its values live in SQLite until Python
  copies them), so a query holds at most about ``2 x heap limit + max_result_bytes``.
* Both raise :class:`SQLMemoryLimit`: the prediction scores 0 (:func:`score_with_reason` says why), a
  gold query raises :class:`GoldQueryError`. Gold results are cached up to :data:`GOLD_CACHE_BYTES`.
* Sorts, ``DISTINCT``, temporary tables and indexes stay in memory (``PRAGMA temp_store = MEMORY``),
  so they count against the heap limit instead of spilling to temporary files: disk use is bounded too
  (an ORDER BY over 2 M generated 300-byte rows wrote ~700 MB of temp files in 5.7 s before).
* Reward worker processes add ``RLIMIT_DATA`` as a backstop (:mod:`dphrl.rewards.sandbox`).

A failing prediction scores 0. A failing *gold* query raises :class:`GoldQueryError` (so that batch
scoring counts it as a failure instead of silently scoring 0). Gold results are cached per
``(database, gold query)``; connections are cached per thread and database.

The official Spider test-suite and BIRD rules, for evaluation, are in :mod:`dphrl.rewards.sql_official`.
"""

from __future__ import annotations

import functools
import math
import os
import re
import sqlite3
import sys
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote

from dphrl.data.example import Example
from dphrl.rewards.registry import RewardFn, register_reward

DEFAULT_TIMEOUT_S = 5.0
DEFAULT_GOLD_TIMEOUT_S = 60.0
DEFAULT_MAX_ROWS = 100_000
#: Python memory a query's fetched rows may take (``sys.getsizeof`` of rows and values).
DEFAULT_MAX_RESULT_BYTES = 64 * 2**20
#: SQLite's hard heap limit (process-wide), set whenever the sandbox opens a connection.
SQLITE_HEAP_LIMIT_BYTES = 256 * 2**20
#: Total size of the cached gold results (least recently used ones go first).
GOLD_CACHE_BYTES = 256 * 2**20
MODES = ("spider", "bird")


class SQLRejected(ValueError):
    """The SQL is not a single read-only query."""


class SQLTimeout(TimeoutError):
    """The query ran past its time-out."""


class SQLRowLimit(RuntimeError):
    """The query returned more rows than allowed."""


class SQLMemoryLimit(RuntimeError):
    """The query needed more memory than allowed: SQLite's heap limit, or the result's size in bytes."""


class GoldQueryError(RuntimeError):
    """The gold query could not be executed: the example (or database) is broken, not the response."""


# ----------------------------------------------------------------------------------------------------
# Extraction and lexing

_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_sql(text: str) -> str:
    """The SQL in a response: the last ```sql block, else the last ``` block, else the whole text."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in _FENCE_RE.finditer(text or "")]
    sql_blocks = [b for lang, b in blocks if lang in ("sql", "sqlite", "postgresql", "mysql")]
    if sql_blocks:
        return sql_blocks[-1].strip()
    if blocks:
        return blocks[-1][1].strip()
    return (text or "").strip().strip("`").strip()


@dataclass(frozen=True)
class SQLToken:
    """One token of :func:`lex_sql`.

    ``kind``: ``word`` (keyword, name or number), ``str`` ('...' literal), ``ident`` ("...", [...] or
    `...` identifier), ``punct``, ``semi`` (``;``) or ``comment`` (only with ``comments=True``).
    ``depth``: parenthesis depth (an opening parenthesis already counts itself). ``start``/``end``:
    its span in the text. ``closed``: False for a literal, quoted identifier or block comment that
    runs to the end of the text.
    """

    kind: str
    text: str
    depth: int
    start: int
    end: int
    closed: bool = True


def lex_sql(sql: str, *, comments: bool = False) -> list[SQLToken]:
    """Split SQL into tokens the way SQLite's tokenizer delimits them.

    The one lexer behind every accept/reject decision (:func:`check_single_query`) and the
    top-level ``ORDER BY`` search (:func:`has_top_level_order_by`), so both always agree on what is
    inside a literal or a comment. SQLite rules: '...' with '' escapes, "..." with "" escapes,
    `...` with `` escapes, [...] without escapes, ``--`` to the end of the line, ``/* */`` not
    nested (the first ``*/`` closes it; unclosed, it runs to the end of the text).
    """
    toks: list[SQLToken] = []
    i, n, depth = 0, len(sql), 0
    while i < n:
        c = sql[i]
        if c.isspace():
            i += 1
        elif sql.startswith("--", i):
            j = sql.find("\n", i)
            j = n if j < 0 else j
            if comments:
                toks.append(SQLToken("comment", sql[i:j], depth, i, j))
            i = j + 1
        elif sql.startswith("/*", i):
            j = sql.find("*/", i + 2)
            closed = j >= 0
            j = j + 2 if closed else n
            if comments:
                toks.append(SQLToken("comment", sql[i:j], depth, i, j, closed))
            i = j
        elif c in "'\"`[":
            close = "]" if c == "[" else c
            j = i + 1
            closed = False
            while j < n:
                if sql[j] == close:
                    if close != "]" and j + 1 < n and sql[j + 1] == close:  # doubled quote
                        j += 2
                        continue
                    closed = True
                    break
                j += 1
            j = j + 1 if closed else n
            toks.append(SQLToken("str" if c == "'" else "ident", sql[i:j], depth, i, j, closed))
            i = j
        elif c.isalnum() or c in "_$":
            j = i + 1
            while j < n and (sql[j].isalnum() or sql[j] in "_$"):
                j += 1
            toks.append(SQLToken("word", sql[i:j], depth, i, j))
            i = j
        elif c == ";":
            toks.append(SQLToken("semi", c, depth, i, i + 1))
            i += 1
        else:
            if c == "(":
                depth += 1
            elif c == ")":
                depth = max(depth - 1, 0)
            toks.append(SQLToken("punct", c, depth, i, i + 1))
            i += 1
    return toks


def has_top_level_order_by(sql: str) -> bool:
    """Whether ``sql`` orders its final result (``ORDER BY`` outside any parentheses)."""
    toks = [t for t in lex_sql(sql) if t.depth == 0]
    return any(
        a.kind == "word" and a.text.upper() == "ORDER" and b.kind == "word" and b.text.upper() == "BY"
        for a, b in zip(toks, toks[1:])
    )


def check_single_query(sql: str) -> str:
    """Return ``sql`` without trailing ``;``; raise :class:`SQLRejected` unless it is one read-only query.

    Nothing but ``;`` and comments may follow the first ``;`` outside literals and comments. An
    unterminated string literal or quoted identifier is rejected (SQLite would refuse it too), so the
    lexer never has to guess where it ends; an unterminated block comment is a comment to the end,
    as in SQLite.
    """
    toks = lex_sql(sql)
    if not toks:
        raise SQLRejected("empty SQL")
    for t in toks:
        if not t.closed:
            what = "string literal" if t.kind == "str" else "quoted identifier"
            raise SQLRejected(f"unterminated {what} at offset {t.start}")
    semis = [k for k, t in enumerate(toks) if t.kind == "semi"]
    if semis:
        if any(t.kind != "semi" for t in toks[semis[0] :]):
            raise SQLRejected("more than one SQL statement")
        sql = sql[: toks[semis[0]].start].rstrip()
    first = toks[0]
    if first.kind != "word" or first.text.upper() not in ("SELECT", "WITH", "VALUES"):
        raise SQLRejected(f"only SELECT/WITH/VALUES queries are allowed, got {first.text[:20]!r}")
    return sql


# ----------------------------------------------------------------------------------------------------
# Sandboxed execution

_ALLOWED_PRAGMAS = {
    "table_info",
    "table_xinfo",
    "index_list",
    "index_info",
    "index_xinfo",
    "foreign_key_list",
}
_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer", "sqlite_dbpage"}
_SELECT, _READ, _FUNCTION, _PRAGMA = (
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    sqlite3.SQLITE_PRAGMA,
)
_RECURSIVE = getattr(sqlite3, "SQLITE_RECURSIVE", 33)


def _authorizer(action: int, arg1: str | None, arg2: str | None, db: str | None, trigger: str | None) -> int:
    """Allow reading only: SELECT, column reads, recursive CTEs, ordinary functions."""
    if action in (_SELECT, _READ, _RECURSIVE):
        return sqlite3.SQLITE_OK
    if action == _FUNCTION:
        return sqlite3.SQLITE_DENY if (arg2 or "").lower() in _DENIED_FUNCTIONS else sqlite3.SQLITE_OK
    if action == _PRAGMA and (arg1 or "").lower() in _ALLOWED_PRAGMAS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY  # writes, DDL, ATTACH/DETACH (VACUUM INTO), transactions, other PRAGMA ...


_PRINTF_SPEC = re.compile(r"%[-+ 0#,!]*(\*|\d+)?(?:\.(\*|\d+))?(?:ll|l)?([a-zA-Z%])")
_MAX_PRINTF_WIDTH = 100_000


def _printf_proxy(*args: object) -> object:
    """SQLite's own ``printf``/``format``, refusing huge widths/precisions (``%.*c`` with 2e9 runs
    for many seconds inside one C call, out of reach of the progress handler)."""
    if not args or not isinstance(args[0], str):
        return _memdb().execute("SELECT printf(" + ",".join("?" * len(args)) + ")", args).fetchone()[0]
    k = 1
    for m in _PRINTF_SPEC.finditer(args[0]):
        for part in (m.group(1), m.group(2)):
            if part == "*":
                val = args[k] if k < len(args) else 0
                k += 1
            else:
                val = part or 0
            try:
                big = abs(int(float(val))) > _MAX_PRINTF_WIDTH  # type: ignore[arg-type]
            except (TypeError, ValueError, OverflowError):
                big = False
            if big:
                raise ValueError("printf width/precision too large")
        if m.group(3) != "%":
            k += 1
    return _memdb().execute("SELECT printf(" + ",".join("?" * len(args)) + ")", args).fetchone()[0]


def apply_heap_limit(conn: sqlite3.Connection, limit: int = SQLITE_HEAP_LIMIT_BYTES) -> int:
    """Lower SQLite's process-wide hard heap limit to ``limit`` bytes (never raise it; 0 is "none")
    and its soft limit to half of that; returns the hard limit now in force (0 if unsupported:
    SQLite < 3.31 has only the advisory soft limit)."""
    row = conn.execute("PRAGMA hard_heap_limit").fetchone()
    current = int(row[0]) if row else 0
    if current == 0 or current > limit:
        conn.execute(f"PRAGMA hard_heap_limit = {int(limit)}")
    soft = conn.execute("PRAGMA soft_heap_limit").fetchone()
    if soft is not None and (int(soft[0]) == 0 or int(soft[0]) > limit // 2):
        conn.execute(f"PRAGMA soft_heap_limit = {int(limit) // 2}")
    row = conn.execute("PRAGMA hard_heap_limit").fetchone()
    global _heap_limit
    _heap_limit = int(row[0]) if row else 0
    return _heap_limit


_heap_limit = 0  # as last set or seen by apply_heap_limit


def sqlite_heap_limit() -> int:
    """SQLite's hard heap limit in force in this process (0: none)."""
    conn = sqlite3.connect(":memory:")
    try:
        row = conn.execute("PRAGMA hard_heap_limit").fetchone()
        return int(row[0]) if row else 0
    finally:
        conn.close()


def _memdb() -> sqlite3.Connection:
    db = getattr(_local, "memdb", None)
    if db is None:
        db = _local.memdb = sqlite3.connect(":memory:", check_same_thread=False)
        apply_heap_limit(db)
        db.execute("PRAGMA temp_store = MEMORY")  # temporary b-trees under the heap limit, not on disk
        db.text_factory = lambda b: b.decode("utf-8", errors="replace")
        if hasattr(db, "setlimit"):
            db.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 10_000_000)
    return db


class _Conn:
    """A sandboxed read-only connection and its current deadline."""

    def __init__(self, db_path: str) -> None:
        uri = f"file:{quote(db_path)}?mode=ro&immutable=1"
        self.conn = sqlite3.connect(uri, uri=True, isolation_level=None, check_same_thread=False)
        apply_heap_limit(self.conn)  # before the authorizer, which denies PRAGMA writes
        # sorts and temporary tables in memory, under the heap limit: SQLite's default spills them to
        # temp files, so an ORDER BY over generated rows could write gigabytes to disk within the time-out
        self.conn.execute("PRAGMA temp_store = MEMORY")
        if hasattr(self.conn, "enable_load_extension"):
            self.conn.enable_load_extension(False)
        if hasattr(self.conn, "setlimit"):  # Python >= 3.11
            self.conn.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
            self.conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, 10_000_000)
            self.conn.setlimit(sqlite3.SQLITE_LIMIT_SQL_LENGTH, 1_000_000)
        self.conn.text_factory = lambda b: b.decode("utf-8", errors="replace")
        for name in ("printf", "format"):
            self.conn.create_function(name, -1, _printf_proxy, deterministic=True)
        self.conn.set_authorizer(_authorizer)
        self.deadline = 0.0
        self.conn.set_progress_handler(self._progress, 1000)

    def _progress(self) -> int:
        return 1 if time.monotonic() > self.deadline else 0


_local = threading.local()
_MAX_CONNS = 64


def _connection(db_path: str) -> _Conn:
    cache: OrderedDict[str, _Conn] | None = getattr(_local, "conns", None)
    if cache is None:
        cache = _local.conns = OrderedDict()
    c = cache.get(db_path)
    if c is None:
        if not os.path.isfile(db_path):
            raise FileNotFoundError(f"SQLite database not found: {db_path}")
        c = cache[db_path] = _Conn(db_path)
        while len(cache) > _MAX_CONNS:
            cache.popitem(last=False)[1].conn.close()
    cache.move_to_end(db_path)
    return c


@dataclass
class QueryResult:
    """Column names and rows of a query; ``elapsed_s``: how long it ran (execution and fetching);
    ``nbytes``: the rows' Python size as accounted against ``max_result_bytes``."""

    columns: list[str]
    rows: list[tuple]
    elapsed_s: float = 0.0
    nbytes: int = 0


def _decode_replace(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def _decode_ignore(b: bytes) -> str:
    return b.decode("utf-8", errors="ignore")


#: How TEXT values that are not valid UTF-8 are decoded: ``replace`` (U+FFFD, ours), ``ignore`` (drop
#: the bad bytes, as the Spider test-suite evaluation) or ``strict`` (an error, as plain ``sqlite3``).
TEXT_DECODERS: dict[str, Callable[[bytes], str]] = {
    "replace": _decode_replace,
    "ignore": _decode_ignore,
    "strict": str,
}


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def execute_sql(
    sql: str, db_path: str, *, timeout_s: float = DEFAULT_TIMEOUT_S, max_rows: int = DEFAULT_MAX_ROWS,
    text_errors: str = "replace", max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
) -> QueryResult:
    """Run one read-only query in the sandbox. Raises :class:`SQLRejected`, :class:`SQLTimeout`,
    :class:`SQLRowLimit`, :class:`SQLMemoryLimit`, ``sqlite3.Error`` or ``FileNotFoundError``.
    ``text_errors``: a key of :data:`TEXT_DECODERS`. Rows are fetched one at a time and their size
    accounted, so at most one row past ``max_result_bytes`` is ever held."""
    if text_errors not in TEXT_DECODERS:
        raise ValueError(f"unknown text_errors {text_errors!r}; valid: {sorted(TEXT_DECODERS)}")
    sql = check_single_query(sql)
    c = _connection(os.path.abspath(db_path))
    c.conn.text_factory = TEXT_DECODERS[text_errors]
    t0 = time.monotonic()
    c.deadline = t0 + timeout_s
    cur = None
    rows: list[tuple] = []
    try:
        cur = c.conn.execute(sql)
        size, sizeof = 0, sys.getsizeof
        for row in cur:
            size += 8 + sizeof(row) + sum(map(sizeof, row))  # the list slot, the tuple, its values
            rows.append(row)
            if size > max_result_bytes:
                raise SQLMemoryLimit(f"query result is larger than {_mib(max_result_bytes)} "
                                     f"(stopped after {len(rows)} rows)")
            if len(rows) > max_rows:
                raise SQLRowLimit(f"query returned more than {max_rows} rows")
        columns = [d[0] for d in (cur.description or [])]
        return QueryResult(columns, rows, time.monotonic() - t0, size)
    except MemoryError:  # SQLite's heap limit (sqlite3 turns SQLITE_NOMEM into MemoryError) or the process's
        rows.clear()
        limit = f"SQLite heap limit {_mib(_heap_limit)}" if _heap_limit else "no SQLite heap limit in force"
        raise SQLMemoryLimit(
            f"query needs more memory than allowed ({limit}, or the process is out of memory)"
        ) from None
    except sqlite3.OperationalError as e:
        if "interrupted" in str(e) and time.monotonic() > c.deadline:
            raise SQLTimeout(f"query exceeded {timeout_s:g} s") from None
        raise
    except sqlite3.Warning as e:  # "You can only execute one statement at a time."
        raise SQLRejected(str(e)) from None
    finally:
        c.deadline = 0.0
        if cur is not None:
            cur.close()


_GOLD: OrderedDict[tuple[str, str, int, str], QueryResult] = OrderedDict()
_GOLD_LOCK = threading.Lock()
_GOLD_MAX = 20_000
_gold_bytes = 0


def gold_result(gold_sql: str, db_path: str, *, timeout_s: float = DEFAULT_GOLD_TIMEOUT_S,
                max_rows: int = DEFAULT_MAX_ROWS, text_errors: str = "replace",
                max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES) -> QueryResult:
    """The (cached) result of a gold query; raises :class:`GoldQueryError` if it cannot run."""
    global _gold_bytes
    key = (os.path.abspath(db_path), gold_sql, max_rows, text_errors)
    with _GOLD_LOCK:
        hit = _GOLD.get(key)
        if hit is not None:
            _GOLD.move_to_end(key)
    if hit is not None:
        if hit.nbytes > max_result_bytes:  # what running it again under this cap would do
            raise GoldQueryError(
                f"gold query failed on {db_path}: SQLMemoryLimit: query result is larger than "
                f"{_mib(max_result_bytes)}; query: {gold_sql[:300]}"
            )
        return hit
    try:
        res = execute_sql(gold_sql, db_path, timeout_s=timeout_s, max_rows=max_rows, text_errors=text_errors,
                          max_result_bytes=max_result_bytes)
    except (sqlite3.Error, SQLRejected, SQLTimeout, SQLRowLimit, SQLMemoryLimit, FileNotFoundError) as e:
        raise GoldQueryError(
            f"gold query failed on {db_path}: {type(e).__name__}: {e}; query: {gold_sql[:300]}"
        ) from e
    with _GOLD_LOCK:
        if key not in _GOLD:
            _GOLD[key] = res
            _gold_bytes += res.nbytes
        while len(_GOLD) > 1 and (len(_GOLD) > _GOLD_MAX or _gold_bytes > GOLD_CACHE_BYTES):
            _gold_bytes -= _GOLD.popitem(last=False)[1].nbytes
    return res


def clear_caches() -> None:
    """Forget cached gold results and this thread's connections."""
    global _gold_bytes
    with _GOLD_LOCK:
        _GOLD.clear()
        _gold_bytes = 0
    for c in getattr(_local, "conns", {}).values():
        c.conn.close()
    _local.conns = OrderedDict()


# ----------------------------------------------------------------------------------------------------
# Comparison


def _norm(v: object) -> object:
    """Floats to 12 significant digits (summation-order noise); integral floats compare equal to ints."""
    if isinstance(v, float) and math.isfinite(v):
        return float(f"{v:.12g}")
    return v


def _normalize_rows(rows: Sequence[Sequence[object]]) -> list[tuple]:
    return [tuple(_norm(v) for v in r) for r in rows]


def _find_permutation(pred: list[tuple], gold: list[tuple], max_nodes: int = 200_000) -> bool:
    """Whether some column permutation of ``pred`` has the same multiset of rows as ``gold``.

    Backtracking over gold columns; a pred column is a candidate for a gold column when their value
    multisets agree; a partial assignment is kept only while the row multisets projected onto the
    assigned columns agree; pred columns with identical contents are tried once.
    """
    ncol = len(gold[0])
    gcols = list(zip(*gold))
    pcols = list(zip(*pred))
    gcount = [Counter(c) for c in gcols]
    pcount = [Counter(c) for c in pcols]
    cands = [[j for j in range(ncol) if pcount[j] == gcount[i]] for i in range(ncol)]
    if any(not c for c in cands):
        return False
    order = sorted(range(ncol), key=lambda i: len(cands[i]))  # most constrained gold column first
    assign: dict[int, int] = {}
    used: set[int] = set()
    nodes = 0

    def consistent() -> bool:
        gi = list(assign)
        pj = [assign[i] for i in gi]
        return Counter(tuple(r[i] for i in gi) for r in gold) == Counter(
            tuple(r[j] for j in pj) for r in pred
        )

    def search(k: int) -> bool:
        nonlocal nodes
        if k == ncol:
            return True
        i = order[k]
        tried: set[tuple] = set()
        for j in cands[i]:
            if j in used or pcols[j] in tried:
                continue
            tried.add(pcols[j])
            nodes += 1
            if nodes > max_nodes:
                return False
            assign[i] = j
            used.add(j)
            if (k == 0 or consistent()) and search(k + 1):
                return True
            del assign[i]
            used.discard(j)
        return False

    return search(0)


def results_match(pred_rows: Sequence[Sequence[object]], gold_rows: Sequence[Sequence[object]], *,
                  mode: str = "spider", ordered: bool = False) -> bool:
    """Compare two query results under the ``spider`` or ``bird`` convention (see module doc)."""
    pred, gold = _normalize_rows(pred_rows), _normalize_rows(gold_rows)
    if mode == "bird":
        return set(pred) == set(gold)
    if mode != "spider":
        raise ValueError(f"unknown SQL comparison mode {mode!r}; valid: {MODES}")
    if not pred and not gold:
        return True
    if len(pred) != len(gold) or len(pred[0]) != len(gold[0]):
        return False
    if pred == gold or (not ordered and Counter(pred) == Counter(gold)):
        return True
    if ordered:  # row i must match row i: columns must agree as whole sequences
        return Counter(zip(*pred)) == Counter(zip(*gold))
    return _find_permutation(pred, gold)


def column_overlap(pred_rows: Sequence[Sequence[object]], gold_rows: Sequence[Sequence[object]]) -> float:
    """Fraction of gold columns whose values (as a multiset) appear as a distinct predicted column."""
    pred, gold = _normalize_rows(pred_rows), _normalize_rows(gold_rows)
    if not gold or not pred or len(pred) != len(gold):
        return 0.0
    avail = Counter(frozenset(Counter(c).items()) for c in zip(*pred))
    hit = 0
    for c in zip(*gold):
        key = frozenset(Counter(c).items())
        if avail[key] > 0:
            avail[key] -= 1
            hit += 1
    return hit / len(gold[0])


# ----------------------------------------------------------------------------------------------------
# Reward


#: What makes a *prediction* score 0 rather than fail the item.
PRED_ERRORS = (
    sqlite3.Error,
    SQLRejected,
    SQLTimeout,
    SQLRowLimit,
    SQLMemoryLimit,
    MemoryError,
    OverflowError,
)


def score_with_reason(
    response: str,
    gold_sql: str,
    db_path: str,
    mode: str = "spider",
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    gold_timeout_s: float = DEFAULT_GOLD_TIMEOUT_S,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    partial_credit: float = 0.0,
) -> tuple[float, str]:
    """:func:`score` and why: ``"match"``, ``"results differ"``, ``"partial credit"`` or the error that
    stopped the prediction (``"SQLMemoryLimit: ..."``, ``"SQLTimeout: ..."``, ...)."""
    if mode not in MODES:
        raise ValueError(f"unknown SQL comparison mode {mode!r}; valid: {MODES}")
    gold = gold_result(gold_sql, db_path, timeout_s=gold_timeout_s, max_rows=max_rows,
                       max_result_bytes=max_result_bytes)
    sql = extract_sql(response)
    try:
        pred = execute_sql(
            sql, db_path, timeout_s=timeout_s, max_rows=max_rows, max_result_bytes=max_result_bytes
        )
    except PRED_ERRORS as e:
        return 0.0, f"{type(e).__name__}: {e}"
    ordered = mode == "spider" and has_top_level_order_by(gold_sql)
    if results_match(pred.rows, gold.rows, mode=mode, ordered=ordered):
        return 1.0, "match"
    if partial_credit > 0:
        return partial_credit * column_overlap(pred.rows, gold.rows), "partial credit"
    return 0.0, "results differ"


def score(
    response: str,
    gold_sql: str,
    db_path: str,
    mode: str = "spider",
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    gold_timeout_s: float = DEFAULT_GOLD_TIMEOUT_S,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    partial_credit: float = 0.0,
) -> float:
    """Execution match of the SQL in ``response`` against ``gold_sql`` on ``db_path``: 1.0 or 0.0
    (or a partial score, see ``partial_credit``). Raises :class:`GoldQueryError` if the gold fails.
    A prediction that is rejected, times out or passes a row or memory limit scores 0."""
    return score_with_reason(
        response,
        gold_sql,
        db_path,
        mode,
        timeout_s=timeout_s,
        gold_timeout_s=gold_timeout_s,
        max_rows=max_rows,
        max_result_bytes=max_result_bytes,
        partial_credit=partial_credit,
    )[0]


def _example_fields(example: Example) -> tuple[str, str]:
    if not example.gold_sql or not example.db_path:
        raise ValueError(f"example {example.id!r} needs gold_sql and db_path for the SQL reward")
    return example.gold_sql, example.db_path


@register_reward("sql")
def spider_reward(response: str, example: Example) -> float:
    """Registered ``sql``/``spider`` reward: Spider execution match (column-order invariant)."""
    gold_sql, db_path = _example_fields(example)
    return score(response, gold_sql, db_path, "spider")


register_reward("spider", spider_reward)


@register_reward("bird")
def bird_reward(response: str, example: Example) -> float:
    """Registered ``bird`` reward: BIRD execution match (set equality of rows)."""
    gold_sql, db_path = _example_fields(example)
    return score(response, gold_sql, db_path, "bird")


def _configured_reward(response: str, example: Example, **options: object) -> float:
    gold_sql, db_path = _example_fields(example)
    return score(response, gold_sql, db_path, **options)  # type: ignore[arg-type]


def make_reward(mode: str = "spider", **options: object) -> RewardFn:
    """A reward function with non-default options (``timeout_s``, ``max_rows``, ``max_result_bytes``,
    ``partial_credit``, ``gold_timeout_s``); picklable, so it also works with
    ``score_batch(num_workers>0)``."""
    if mode not in MODES:
        raise ValueError(f"unknown SQL comparison mode {mode!r}; valid: {MODES}")
    valid = {"timeout_s", "gold_timeout_s", "max_rows", "max_result_bytes", "partial_credit"}
    if set(options) - valid:
        raise ValueError(
            f"unknown SQL reward option(s) {sorted(set(options) - valid)}; valid: {sorted(valid)}"
        )
    return functools.partial(_configured_reward, mode=mode, **options)
