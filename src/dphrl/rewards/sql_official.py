"""Official SQL evaluation modes: the execution-match rules of the Spider test-suite and BIRD evaluators.

The training reward (:mod:`dphrl.rewards.sql`: ``spider_reward``, ``bird_reward``, ``make_reward``)
keeps its own, sandboxed semantics. For reporting numbers comparable with published ones,
``dphrl eval`` can score with these modes instead:

* ``spider-official``: ``exec_eval.eval_exec_match`` of taoyds/test-suite-sql-eval as run by its
  ``evaluation.py --etype exec`` with default flags (no ``--plug_value``, no ``--keep_distinct``).
* ``bird-official``: ``evaluation_ex.py`` of the BIRD mini-dev / bird-bench evaluation
  (``set(predicted_res) == set(ground_truth_res)`` under ``func_timeout(meta_time_out=30.0)``).

Both run every query through the sandbox of :mod:`dphrl.rewards.sql` (read-only immutable
connection, authorizer, single ``SELECT``/``WITH``/``VALUES`` statement, progress-handler time-out,
row cap, SQLite heap limit, result-size cap), with the official time-outs. Use :func:`official_reward` (or
:data:`OFFICIAL_REWARDS`) to get a reward function ``fn(response, example)``;
its ``__name__`` and ``sql_mode`` name the mode.

Where our sandboxed semantics (middle) differ from the official ones (right). The official modes
reproduce the right-hand column, quirks included, except where it says "we ...": there the sandbox
constraint stays.

Spider (``spider`` vs ``spider-official``)

==============  ===============================  ================================================
aspect          ``spider`` (ours, sandboxed)     ``spider-official``
==============  ===============================  ================================================
row order       matters iff the gold has a       matters iff the text ``order by`` occurs anywhere
                *top-level* ``ORDER BY``         in the lower-cased gold: subqueries, windows,
                                                 literals, comments count; ``ORDER  BY`` does not
DISTINCT        kept                             the word is deleted from pred *and* gold before
                                                 running (``COUNT(DISTINCT x)`` -> ``COUNT(x)``),
                                                 so duplicates a DISTINCT would remove count
duplicates      multiset of rows                 multiset of rows (after the DISTINCT deletion)
column order    any permutation                  any permutation; a per-row pre-check that sorts
                                                 values by ``str(v) + str(type(v))`` can reject
                                                 equal rows mixing ints and floats (kept)
floats          12 significant digits            exact ``==``: ``1 == 1.0``, ``0.1+0.2 != 0.3``
                (``0.1+0.2`` matches ``0.3``)
NULL, types     ``None == None``, ``'1' != 1``   the same
both empty      match                            match
time-out        5 s pred, 60 s gold              60 s per query (``TIMEOUT``); the official
                                                 ``asyncio.wait_for`` cannot interrupt the blocking
                                                 call so it never fires there; we enforce it
gold fails      :class:`GoldQueryError`          the script asserts; we raise GoldQueryError
databases       the example's file               every file with ``.sqlite`` in its name in that
                                                 file's folder (test-suite layout), pred must
                                                 match on each
rewriting       none                             ``> =``, ``< =``, ``! =`` joined;
                                                 ``YEAR(CURDATE())`` -> 2020; `` value `` -> `` 1 ``
                                                 in the pred
statements      one read-only query (sandbox)    anything, on a writable connection (a ``DELETE``
                                                 matches an empty gold); we keep the sandbox: 0
row cap         100,000                          none; we cap at 1,000,000
memory          64 MiB of result, SQLite heap    none; we cap the result at 256 MiB and SQLite's
                256 MiB                          heap at 256 MiB: past them the pred scores 0
bad UTF-8       replaced by U+FFFD               dropped (``errors="ignore"``; kept)
partial credit  optional                         none
==============  ===============================  ================================================

BIRD (``bird`` vs ``bird-official``)

==============  ===============================  ================================================
aspect          ``bird`` (ours, sandboxed)       ``bird-official``
==============  ===============================  ================================================
rows            set, column order matters        the same: ``set(pred) == set(gold)``
floats          12 significant digits            exact ``==``
time-out        5 s pred, 60 s gold              30 s for pred and gold together
                                                 (``meta_time_out``): the pred gets 30 s minus the
                                                 gold's measured time
gold fails      :class:`GoldQueryError`          scores 0; we raise GoldQueryError (counted as a
                                                 failure by ``score_batch``, scored 0)
statements      one read-only query (sandbox)    anything, writable; we keep the sandbox: 0
row cap         100,000                          none; we cap at 1,000,000
memory          64 MiB of result, SQLite heap    none; we cap the result at 256 MiB and SQLite's
                256 MiB                          heap at 256 MiB: past them the pred scores 0
bad UTF-8       replaced by U+FFFD               an error (plain ``sqlite3``; kept): scores 0
partial credit  optional                         none
==============  ===============================  ================================================

Left out of the Spider mode: the official prediction file holds one query per line (the caller
flattens multi-line SQL; we score the extracted SQL as is), ``--plug_value`` and exact-set match.
The column-permutation search shares the sandboxed mode's node budget (200,000), beyond which it
gives up (the official search is unbounded); it is never reached on Spider or BIRD results.
"""

from __future__ import annotations

import functools
import os
import re
from collections import Counter
from collections.abc import Sequence

from dphrl.data.example import Example
from dphrl.rewards import sql as _sql
from dphrl.rewards.registry import RewardFn
from dphrl.rewards.sql import (
    PRED_ERRORS,
    GoldQueryError,
    _example_fields,
    bird_reward,
    extract_sql,
    lex_sql,
    spider_reward,
)

SPIDER_OFFICIAL = "spider-official"
BIRD_OFFICIAL = "bird-official"

#: test-suite-sql-eval ``exec_eval.TIMEOUT`` (seconds per query, gold and prediction alike).
SPIDER_OFFICIAL_TIMEOUT_S = 60.0
#: BIRD ``evaluation_ex.py --meta_time_out`` default (seconds for prediction and gold together).
BIRD_OFFICIAL_TIMEOUT_S = 30.0
#: Rows fetched at most per query (the official scripts have no cap; the sandbox needs one).
OFFICIAL_MAX_ROWS = 1_000_000
#: Python bytes a query's fetched rows may take (the official scripts have no cap; see ``sql``).
OFFICIAL_MAX_RESULT_BYTES = 256 * 2**20

_PRED_ERRORS = PRED_ERRORS  # the name before the memory limits


# ----------------------------------------------------------------------------------------------------
# Spider test-suite semantics

_CUR_YEAR_RE = re.compile(r"YEAR\s*\(\s*CURDATE\s*\(\s*\)\s*\)\s*", re.IGNORECASE)


def remove_distinct(sql: str) -> str:
    """``sql`` without its ``DISTINCT`` keywords (literals, quoted names and comments untouched), as
    the official ``parse.remove_distinct`` does by default (its ``--keep_distinct`` is off)."""
    out, last = [], 0
    for t in lex_sql(sql):
        if t.kind == "word" and t.text.lower() == "distinct":
            out.append(sql[last : t.start])
            last = t.end
    return "".join(out) + sql[last:]


def spider_official_queries(pred_sql: str, gold_sql: str, *, keep_distinct: bool = False) -> tuple[str, str]:
    """The (prediction, gold) pair the official Spider evaluation executes: `` value `` -> `` 1 `` in the
    prediction, ``> =``/``< =``/``! =`` joined, ``DISTINCT`` removed, ``YEAR(CURDATE())`` -> 2020."""
    pred = pred_sql.replace(" value ", " 1 ")
    out = []
    for q in (pred, gold_sql):
        q = q.replace("> =", ">=").replace("< =", "<=").replace("! =", "!=")
        if not keep_distinct:
            q = remove_distinct(q)
        out.append(q)
    return out[0], out[1]


def spider_official_order_matters(gold_sql: str, *, keep_distinct: bool = False) -> bool:
    """Whether the official Spider evaluation compares rows in order: ``'order by' in gold.lower()``
    (on the rewritten gold), a plain text search, unlike our top-level ``ORDER BY`` test."""
    return "order by" in spider_official_queries("", gold_sql, keep_distinct=keep_distinct)[1].lower()


def _unordered_row(row: Sequence[object]) -> tuple:
    return tuple(sorted(row, key=lambda v: str(v) + str(type(v))))


def spider_official_result_eq(gold_rows: Sequence[Sequence[object]], pred_rows: Sequence[Sequence[object]], *,
                              order_matters: bool) -> bool:
    """The official ``result_eq``: equal as lists (``order_matters``) or as multisets of rows, up to a
    permutation of the columns; raw values, compared with Python ``==`` (no float rounding)."""
    gold, pred = [tuple(r) for r in gold_rows], [tuple(r) for r in pred_rows]
    if not gold and not pred:
        return True
    if len(gold) != len(pred) or len(gold[0]) != len(pred[0]):
        return False
    # the official necessary condition (rows with their values sorted by str + type); keeps its quirks
    g_un, p_un = [_unordered_row(r) for r in gold], [_unordered_row(r) for r in pred]
    if (g_un != p_un) if order_matters else (set(g_un) != set(p_un)):
        return False
    if order_matters:  # row i must be row i: the columns must agree as whole sequences
        return Counter(zip(*gold)) == Counter(zip(*pred))
    return Counter(gold) == Counter(pred) or _sql._find_permutation(pred, gold)


def _test_suite_databases(db_path: str) -> list[str]:
    """The official test-suite set: every file in the database's folder whose name has ``.sqlite``."""
    folder = os.path.dirname(os.path.abspath(db_path))
    try:
        names = sorted(n for n in os.listdir(folder) if ".sqlite" in n)
    except OSError:
        names = []
    return [os.path.join(folder, n) for n in names] or [db_path]


def score_spider_official(
    response: str,
    gold_sql: str,
    db_path: str,
    *,
    keep_distinct: bool = False,
    timeout_s: float = SPIDER_OFFICIAL_TIMEOUT_S,
    max_rows: int = OFFICIAL_MAX_ROWS,
    max_result_bytes: int = OFFICIAL_MAX_RESULT_BYTES,
    test_suite: bool = True,
) -> float:
    """1.0 when the SQL in ``response`` matches ``gold_sql`` under the Spider test-suite rules on every
    database of the suite (``test_suite``; else only ``db_path``), else 0.0. Raises
    :class:`GoldQueryError` when the gold fails on one of them."""
    return _spider_official(response, gold_sql, db_path, keep_distinct=keep_distinct, timeout_s=timeout_s,
                            max_rows=max_rows, max_result_bytes=max_result_bytes, test_suite=test_suite)[0]


def _spider_official(response: str, gold_sql: str, db_path: str, *, keep_distinct: bool, timeout_s: float,
                     max_rows: int, max_result_bytes: int, test_suite: bool) -> tuple[float, str]:
    pred, gold = spider_official_queries(extract_sql(response), gold_sql, keep_distinct=keep_distinct)
    order_matters = "order by" in gold.lower()
    pred, gold = _CUR_YEAR_RE.sub("2020", pred), _CUR_YEAR_RE.sub("2020", gold)
    limits = {"timeout_s": timeout_s, "max_rows": max_rows, "max_result_bytes": max_result_bytes}
    for path in _test_suite_databases(db_path) if test_suite else [db_path]:
        g = _sql.gold_result(gold, path, text_errors="ignore", **limits)  # type: ignore[arg-type]
        try:
            p = _sql.execute_sql(pred, path, text_errors="ignore", **limits)  # type: ignore[arg-type]
        except PRED_ERRORS as e:
            return 0.0, f"{type(e).__name__}: {e}"
        if not spider_official_result_eq(g.rows, p.rows, order_matters=order_matters):
            return 0.0, f"results differ on {os.path.basename(path)}"
    return 1.0, "match"


# ----------------------------------------------------------------------------------------------------
# BIRD semantics


def bird_official_result_eq(pred_rows: Sequence[Sequence[object]],
                            gold_rows: Sequence[Sequence[object]]) -> bool:
    """The official BIRD rule: ``set(pred) == set(gold)`` of raw row tuples (column order matters)."""
    return {tuple(r) for r in pred_rows} == {tuple(r) for r in gold_rows}


def score_bird_official(
    response: str,
    gold_sql: str,
    db_path: str,
    *,
    timeout_s: float = BIRD_OFFICIAL_TIMEOUT_S,
    max_rows: int = OFFICIAL_MAX_ROWS,
    max_result_bytes: int = OFFICIAL_MAX_RESULT_BYTES,
) -> float:
    """1.0 when the SQL in ``response`` returns the same set of rows as ``gold_sql``, both within
    ``timeout_s`` together, else 0.0. Raises :class:`GoldQueryError` when the gold fails or alone
    takes longer than ``timeout_s`` (the official script scores that item 0)."""
    return _bird_official(response, gold_sql, db_path, timeout_s=timeout_s, max_rows=max_rows,
                          max_result_bytes=max_result_bytes)[0]


def _bird_official(response: str, gold_sql: str, db_path: str, *, timeout_s: float, max_rows: int,
                   max_result_bytes: int) -> tuple[float, str]:
    g = _sql.gold_result(gold_sql, db_path, timeout_s=timeout_s, max_rows=max_rows, text_errors="strict",
                         max_result_bytes=max_result_bytes)
    if g.elapsed_s >= timeout_s:  # a cached result from a run with a longer time-out
        raise GoldQueryError(f"gold query took {g.elapsed_s:.1f} s, over the {timeout_s:g} s budget; "
                             f"query: {gold_sql[:300]}")
    try:
        p = _sql.execute_sql(extract_sql(response), db_path, timeout_s=timeout_s - g.elapsed_s,
                             max_rows=max_rows, text_errors="strict", max_result_bytes=max_result_bytes)
    except PRED_ERRORS as e:
        return 0.0, f"{type(e).__name__}: {e}"
    return (1.0, "match") if bird_official_result_eq(p.rows, g.rows) else (0.0, "results differ")


# ----------------------------------------------------------------------------------------------------
# Modes and reward functions


def spider_official_reward(response: str, example: Example) -> float:
    """Reward ``spider-official``: Spider test-suite execution match (see the module doc)."""
    gold_sql, db_path = _example_fields(example)
    return score_spider_official(response, gold_sql, db_path)


def bird_official_reward(response: str, example: Example) -> float:
    """Reward ``bird-official``: BIRD execution match, set of rows, 30 s (see the module doc)."""
    gold_sql, db_path = _example_fields(example)
    return score_bird_official(response, gold_sql, db_path)


spider_official_reward.sql_mode = SPIDER_OFFICIAL  # type: ignore[attr-defined]
bird_official_reward.sql_mode = BIRD_OFFICIAL  # type: ignore[attr-defined]

#: Official mode name -> reward function ``fn(response, example)`` (module-level: picklable for
#: ``score_batch(num_workers>0)``).
OFFICIAL_REWARDS: dict[str, RewardFn] = {
    SPIDER_OFFICIAL: spider_official_reward,
    BIRD_OFFICIAL: bird_official_reward,
}
_SCORERS = {SPIDER_OFFICIAL: score_spider_official, BIRD_OFFICIAL: score_bird_official}
_DEFAULTS: dict[str, dict[str, object]] = {
    SPIDER_OFFICIAL: {
        "keep_distinct": False,
        "timeout_s": SPIDER_OFFICIAL_TIMEOUT_S,
        "max_rows": OFFICIAL_MAX_ROWS,
        "max_result_bytes": OFFICIAL_MAX_RESULT_BYTES,
        "test_suite": True,
    },
    BIRD_OFFICIAL: {
        "timeout_s": BIRD_OFFICIAL_TIMEOUT_S,
        "max_rows": OFFICIAL_MAX_ROWS,
        "max_result_bytes": OFFICIAL_MAX_RESULT_BYTES,
    },
}
_OPTIONS = {mode: set(d) for mode, d in _DEFAULTS.items()}
#: Every SQL evaluation mode: the sandboxed training semantics and the official ones.
SQL_EVAL_MODES: tuple[str, ...] = ("spider", "bird", SPIDER_OFFICIAL, BIRD_OFFICIAL)


def _check_mode(mode: str, valid: Sequence[str]) -> None:
    if mode not in valid:
        raise ValueError(f"unknown SQL evaluation mode {mode!r}; valid: {', '.join(valid)}")


def _check_options(mode: str, options: dict[str, object]) -> None:
    bad = set(options) - _OPTIONS[mode]
    if bad:
        valid = sorted(_OPTIONS[mode])
        raise ValueError(f"unknown option(s) {sorted(bad)} for SQL mode {mode!r}; valid: {valid}")


def score_official(response: str, gold_sql: str, db_path: str, mode: str = SPIDER_OFFICIAL,
                   **options: object) -> float:
    """Score one response under an official mode (``options``: see :func:`score_spider_official`
    and :func:`score_bird_official`)."""
    _check_mode(mode, list(_SCORERS))
    _check_options(mode, options)
    return _SCORERS[mode](response, gold_sql, db_path, **options)  # type: ignore[operator]


def score_official_with_reason(response: str, gold_sql: str, db_path: str, mode: str = SPIDER_OFFICIAL,
                               **options: object) -> tuple[float, str]:
    """:func:`score_official` and why: ``"match"``, ``"results differ ..."`` or the error that stopped
    the prediction (``"SQLMemoryLimit: ..."``, ``"SQLTimeout: ..."``, ...)."""
    _check_mode(mode, list(_SCORERS))
    _check_options(mode, options)
    kwargs = {**_DEFAULTS[mode], **options}
    fn = _spider_official if mode == SPIDER_OFFICIAL else _bird_official
    return fn(response, gold_sql, db_path, **kwargs)  # type: ignore[arg-type]


def _configured_official(response: str, example: Example, *, mode: str, **options: object) -> float:
    gold_sql, db_path = _example_fields(example)
    return score_official(response, gold_sql, db_path, mode, **options)


def official_reward(mode: str, **options: object) -> RewardFn:
    """The reward function of an official mode (``spider-official`` or ``bird-official``); with
    ``options`` (e.g. ``keep_distinct=True``, ``timeout_s``) a picklable configured variant. Its
    ``sql_mode`` attribute and ``__name__`` state the mode."""
    _check_mode(mode, list(OFFICIAL_REWARDS))
    if not options:
        return OFFICIAL_REWARDS[mode]
    _check_options(mode, options)
    fn = functools.partial(_configured_official, mode=mode, **options)
    fn.__name__ = OFFICIAL_REWARDS[mode].__name__  # type: ignore[attr-defined]
    fn.sql_mode = mode  # type: ignore[attr-defined]
    return fn


def sql_eval_reward(mode: str) -> RewardFn:
    """The reward for ``dphrl eval --sql-mode MODE``: ``spider``/``bird`` (the sandboxed training
    rewards) or ``spider-official``/``bird-official``; an unknown name lists the valid ones."""
    _check_mode(mode, SQL_EVAL_MODES)
    return {"spider": spider_reward, "bird": bird_reward, **OFFICIAL_REWARDS}[mode]
