"""SQL reward: extraction, comparison semantics, real Spider gold queries and perturbations, sandbox."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sqlite3
import time
from collections import Counter
from pathlib import Path

import pytest

from dphrl.data.example import Example
from dphrl.rewards import get_reward, score_batch
from dphrl.rewards import sql as sr
from dphrl.rewards.sql import extract_sql, has_top_level_order_by, results_match, score

try:
    from _shared import require_shared
    from _sql_bombs import BOMBS, STOPPED_BY, can_measure_peak, make_bomb_db, probe
except ImportError:
    from tests._shared import require_shared
    from tests._sql_bombs import BOMBS, STOPPED_BY, can_measure_peak, make_bomb_db, probe


# ----------------------------------------------------------------------------------------------------
# Units


@pytest.mark.parametrize(
    "text, want",
    [
        ("Here:\n```sql\nSELECT 1;\n```\nand\n```sql\nSELECT 2\n```", "SELECT 2"),
        ("```python\nx=1\n```\n```\nSELECT 3\n```", "SELECT 3"),
        ("```SQL\nSELECT 4\n```\n```\nnot sql\n```", "SELECT 4"),
        ("```sql\nSELECT 5 FROM t", "SELECT 5 FROM t"),
        ("SELECT 6", "SELECT 6"),
    ],
)
def test_extract_sql(text, want):
    assert extract_sql(text) == want


def test_top_level_order_by():
    assert has_top_level_order_by("SELECT a FROM t ORDER BY a")
    assert has_top_level_order_by("SELECT a FROM t UNION SELECT b FROM u ORDER BY 1")
    assert not has_top_level_order_by("SELECT * FROM (SELECT a FROM t ORDER BY a LIMIT 3)")
    assert not has_top_level_order_by("SELECT a FROM t WHERE b IN (SELECT b FROM u ORDER BY c LIMIT 1)")
    assert not has_top_level_order_by("WITH x AS (SELECT a FROM t ORDER BY a) SELECT a FROM x")
    assert not has_top_level_order_by("SELECT rank() OVER (ORDER BY a) FROM t")
    assert not has_top_level_order_by("SELECT 'order by' FROM t -- ORDER BY a")
    assert not has_top_level_order_by('SELECT "ORDER", "BY" FROM t')


# One lexer behind the single-statement check and the top-level ORDER BY search: cases where two
# scanners could disagree about what is inside a literal, a quoted identifier or a comment.
@pytest.mark.parametrize(
    "sql, single, ordered",
    [
        # single: the SQL check_single_query returns, or None when it must reject
        ("SELECT a FROM t WHERE b = ';' ORDER BY a", "SELECT a FROM t WHERE b = ';' ORDER BY a", True),
        ("SELECT a FROM t WHERE b = '; ORDER BY a'", "SELECT a FROM t WHERE b = '; ORDER BY a'", False),
        ("SELECT 'it''s; ORDER BY x' FROM t;", "SELECT 'it''s; ORDER BY x' FROM t", False),
        ("SELECT 'x'';' ; DROP TABLE t", None, False),  # the '' escape closes nothing: ';' is real
        ('SELECT "a;b" FROM t ORDER BY 1', 'SELECT "a;b" FROM t ORDER BY 1', True),
        ('SELECT "a"";ORDER BY" FROM t', 'SELECT "a"";ORDER BY" FROM t', False),
        ("SELECT [a;b] FROM t -- ; ORDER BY a", "SELECT [a;b] FROM t -- ; ORDER BY a", False),
        ("SELECT [a]]; DROP TABLE t", None, False),  # [..] has no escape: ']' then a real ';'
        ("SELECT `a``;ORDER BY` FROM t", "SELECT `a``;ORDER BY` FROM t", False),
        ("SELECT a FROM t /* ; ORDER BY a */", "SELECT a FROM t /* ; ORDER BY a */", False),
        ("SELECT a FROM t /* /* */ ORDER BY a", "SELECT a FROM t /* /* */ ORDER BY a", True),  # not nested
        ("SELECT a FROM t /* /* */ ; DROP TABLE t -- */", None, False),
        ("SELECT a FROM t; /* a */ ; -- b\n;", "SELECT a FROM t", False),
        ("SELECT a FROM t ORDER BY a; -- ORDER BY", "SELECT a FROM t ORDER BY a", True),
        ("SELECT a FROM t ORDER -- x\n BY a", "SELECT a FROM t ORDER -- x\n BY a", True),
        ("SELECT a FROM t ORDER/**/BY a;", "SELECT a FROM t ORDER/**/BY a", True),
        ("SELECT a FROM t ORDERBY", "SELECT a FROM t ORDERBY", False),
        # unterminated literals and identifiers: rejected (SQLite refuses them too)
        ("SELECT 'abc; DROP TABLE t", None, False),
        ("SELECT 'a'' ; DROP TABLE t", None, False),
        ('SELECT "abc; DROP TABLE t', None, False),
        ("SELECT [abc; DROP TABLE t", None, False),
        ("SELECT `abc; DROP TABLE t", None, False),
        # an unterminated block comment runs to the end, as in SQLite: nothing after it is run
        ("SELECT a FROM t /* ; DROP TABLE t", "SELECT a FROM t /* ; DROP TABLE t", False),
        ("SELECT a FROM t /* ORDER BY a", "SELECT a FROM t /* ORDER BY a", False),
        ("SELECT a FROM t -- ; DROP TABLE t", "SELECT a FROM t -- ; DROP TABLE t", False),
        ("/* ; */ -- ;\n  SELECT 1", "/* ; */ -- ;\n  SELECT 1", False),
        ("-- SELECT 1", None, False),  # only a comment
        ("; SELECT 1", None, False),
    ],
)
def test_one_lexer_for_separator_and_order_by(sql, single, ordered):
    assert has_top_level_order_by(sql) == ordered
    if single is None:
        with pytest.raises(sr.SQLRejected):
            sr.check_single_query(sql)
    else:
        assert sr.check_single_query(sql) == single
        assert has_top_level_order_by(single) == ordered  # the cut never changes the ORDER BY answer


def test_unterminated_comment_is_a_comment_when_run(tmp_path):
    """SQLite too treats an unclosed /* as a comment to the end: the check and the engine agree."""
    p = tmp_path / "x.sqlite"
    conn = sqlite3.connect(p)
    conn.executescript("CREATE TABLE t (a INTEGER); INSERT INTO t VALUES (2), (1);")
    conn.close()
    before = _sha(p)
    assert sr.execute_sql("SELECT a FROM t /* ; DROP TABLE t", str(p)).rows == [(2,), (1,)]
    assert sr.execute_sql("SELECT a FROM t ORDER BY a; /* ; DROP TABLE t", str(p)).rows == [(1,), (2,)]
    assert score("SELECT a FROM t ORDER BY a DESC /* ;", "SELECT a FROM t ORDER BY a -- ;", str(p)) == 0.0
    assert _sha(p) == before


# single characters and the multi-character tokens that matter, so boundaries meet often
_PIECES = list("[]'\"`;-*/\n x()") + [
    "/*",
    "*/",
    "/*/",
    "--",
    "]]",
    "''",
    "``",
    '""',
    " ORDER BY ",
    "SELECT ",
]


def test_lexer_agrees_with_sqlite_tokenizer_on_random_text():
    """SQLite's own tokenizer (``sqlite3.complete_statement``: does the text end with a ``;`` token,
    literals, identifiers and comments skipped) agrees with the lexer on every prefix of random
    hostile text; and cutting at the separator never changes the top-level ORDER BY answer."""
    import random

    rng = random.Random(7)
    checked = cut_checked = 0
    for _ in range(2500):
        s = "".join(rng.choice(_PIECES) for _ in range(rng.randint(1, 20)))
        for k in range(1, len(s) + 1):
            pre = s[:k]
            toks = sr.lex_sql(pre, comments=True)
            if any(t.kind == "comment" and not t.closed for t in toks):
                continue  # sqlite3_complete calls an unclosed /* incomplete; the engine reads it as a comment
            code = [t for t in toks if t.kind != "comment"]
            ends_with_semi = all(t.closed for t in code) and bool(code) and code[-1].kind == "semi"
            assert sqlite3.complete_statement(pre) == ends_with_semi, pre
            checked += 1
        q = "SELECT " + s
        try:
            cut = sr.check_single_query(q)
        except sr.SQLRejected:
            continue
        code = [t.text for t in sr.lex_sql(q) if t.kind != "semi"]
        assert [t.text for t in sr.lex_sql(cut)] == code, q  # only ';' and comments were cut
        assert has_top_level_order_by(cut) == has_top_level_order_by(q), q
        cut_checked += 1
    assert checked > 20_000 and cut_checked > 300, (checked, cut_checked)


def _ref_equal(pred, gold, ordered):
    """Brute-force reference: some column permutation makes the results equal (as lists or multisets)."""
    from _shared import brute_force_equal

    return brute_force_equal(pred, gold, ordered, norm=sr._norm)


def test_results_match_semantics():
    gold = [(1, "a"), (2, "b"), (2, "b")]
    assert results_match([("a", 1), ("b", 2), ("b", 2)], gold)  # column order
    assert results_match([(2, "b"), (1, "a"), (2, "b")], gold)  # row order, unordered
    assert not results_match([(2, "b"), (1, "a"), (2, "b")], gold, ordered=True)
    assert results_match([("a", 1), ("b", 2), ("b", 2)], gold, ordered=True)
    assert not results_match([(1, "a"), (2, "b")], gold)  # multiset, not set
    assert results_match([(1, "a"), (2, "b")], gold, mode="bird")  # set
    assert not results_match([("a", 1), ("b", 2)], gold, mode="bird")  # BIRD: column order matters
    assert results_match([(1.0,)], [(1,)]) and results_match([(0.1 + 0.2,)], [(0.3,)])
    assert not results_match([("1",)], [(1,)])
    assert results_match([], []) and not results_match([(1,)], [])
    # column multisets agree but no permutation matches the rows
    assert not results_match([(1, 1), (2, 2)], [(1, 2), (2, 1)])
    with pytest.raises(ValueError):
        results_match([], [], mode="nope")


def test_results_match_agrees_with_brute_force_on_random_tables():
    import random

    rng = random.Random(0)
    for _ in range(400):
        ncol, nrow = rng.randint(1, 4), rng.randint(1, 5)
        gold = [tuple(rng.randint(0, 2) for _ in range(ncol)) for _ in range(nrow)]
        perm = list(range(ncol))
        rng.shuffle(perm)
        pred = [tuple(r[i] for i in perm) for r in gold]
        if rng.random() < 0.5:
            rng.shuffle(pred)
        if rng.random() < 0.5:  # perturb one cell
            i, j = rng.randrange(nrow), rng.randrange(ncol)
            row = list(pred[i])
            row[j] = rng.randint(0, 2)
            pred[i] = tuple(row)
        for ordered in (False, True):
            assert results_match(pred, gold, ordered=ordered) == _ref_equal(pred, gold, ordered), (pred, gold)


@pytest.fixture()
def tiny_db(tmp_path: Path) -> str:
    p = tmp_path / "tiny.sqlite"
    conn = sqlite3.connect(p)
    conn.executescript(
        "CREATE TABLE t (id INTEGER, name TEXT, score REAL);"
        "INSERT INTO t VALUES (1, 'a', 1.5), (2, 'b', 2.5), (3, 'c', 2.5), (4, 'd', NULL);"
    )
    conn.commit()
    conn.close()
    return str(p)


def test_score_modes_and_partial_credit(tiny_db):
    gold = "SELECT id, name FROM t WHERE score > 2 ORDER BY id DESC"
    assert (
        score("```sql\nSELECT name, id FROM t WHERE score > 2 ORDER BY id DESC;\n```", gold, tiny_db) == 1.0
    )
    assert score("SELECT id, name FROM t WHERE score > 2 ORDER BY id", gold, tiny_db) == 0.0  # order matters
    unordered = "SELECT id, name FROM t WHERE score > 2"
    assert score("SELECT id, name FROM t WHERE score > 2 ORDER BY id", unordered, tiny_db) == 1.0
    # bird: set equality
    assert (
        score(
            "SELECT DISTINCT score FROM t WHERE score IS NOT NULL",
            "SELECT score FROM t WHERE score > 0",
            tiny_db,
            mode="bird",
        )
        == 1.0
    )
    assert (
        score(
            "SELECT DISTINCT score FROM t WHERE score IS NOT NULL",
            "SELECT score FROM t WHERE score > 0",
            tiny_db,
            mode="spider",
        )
        == 0.0
    )
    # partial credit: one of two gold columns right
    assert score("SELECT id, 'x' FROM t WHERE score > 2", unordered, tiny_db) == 0.0
    assert score(
        "SELECT id, 'x' FROM t WHERE score > 2", unordered, tiny_db, partial_credit=0.5
    ) == pytest.approx(0.25)
    assert score("SELECT nonsense FROM t", unordered, tiny_db, partial_credit=0.5) == 0.0
    with pytest.raises(ValueError):
        score("SELECT 1", "SELECT 1", tiny_db, mode="nope")


def test_gold_failure_raises_and_is_counted(tiny_db):
    with pytest.raises(sr.GoldQueryError):
        score("SELECT 1", "SELECT missing FROM t", tiny_db)
    fn = get_reward("sql")
    ex = Example(id="g", prompt=[], gold_sql="SELECT missing FROM t", db_path=tiny_db, task="sql")
    ok = Example(id="o", prompt=[], gold_sql="SELECT count(*) FROM t", db_path=tiny_db, task="sql")
    res = score_batch(fn, ["SELECT 1", "SELECT 4"], [ex, ok])
    assert res.scores == [0.0, 1.0] and res.failures == 1
    with pytest.raises(ValueError, match="gold_sql and db_path"):
        fn("SELECT 1", Example(id="n", prompt=[]))


def test_registered_rewards(tiny_db):
    ex = Example(
        id="b", prompt=[], gold_sql="SELECT score FROM t WHERE score > 0", db_path=tiny_db, task="bird"
    )
    assert get_reward("bird")("SELECT DISTINCT score FROM t WHERE score > 0", ex) == 1.0
    assert get_reward("spider")("SELECT DISTINCT score FROM t WHERE score > 0", ex) == 0.0


def test_make_reward_options(tiny_db):
    ex = Example(id="m", prompt=[], gold_sql="SELECT id, name FROM t", db_path=tiny_db, task="sql")
    assert sr.make_reward("spider", partial_credit=0.5)("SELECT id, 'zz' FROM t", ex) == pytest.approx(0.25)
    assert sr.make_reward("bird")("SELECT id, name FROM t", ex) == 1.0
    with pytest.raises(ValueError, match="unknown SQL reward option"):
        sr.make_reward(timeout=1)
    with pytest.raises(ValueError, match="mode"):
        sr.make_reward("postgres")


def test_row_cap(tiny_db):
    q = "SELECT * FROM t a, t b"  # 16 rows
    assert score(q, q, tiny_db, max_rows=100) == 1.0
    sr.clear_caches()
    assert score(q, "SELECT 1", tiny_db, max_rows=10) == 0.0
    with pytest.raises(sr.SQLRowLimit):
        sr.execute_sql(q, tiny_db, max_rows=10)


# ----------------------------------------------------------------------------------------------------
# Spider dev


def _spider():
    root = require_shared("spider")
    dev = json.loads((root / "dev.json").read_text())
    schema = {t["db_id"]: t for t in json.loads((root / "tables.json").read_text())}
    exs = []
    for e in dev:
        p = root / "database" / e["db_id"] / f"{e['db_id']}.sqlite"
        if p.is_file():
            exs.append((e, str(p)))
    return exs, schema


def test_spider_gold_against_itself_all_972():
    exs, _ = _spider()
    assert len(exs) == 972
    bad = [(e["db_id"], e["query"]) for e, p in exs if score(e["query"], e["query"], p) != 1.0]
    assert bad == []
    # also through the registered reward with a fenced response
    fn = get_reward("spider")
    e, p = exs[0]
    assert fn(f"```sql\n{e['query']}\n```", Example(id="0", prompt=[], gold_sql=e["query"], db_path=p)) == 1.0


_AGG_SWAP = {"COUNT": "SUM", "SUM": "MAX", "MAX": "MIN", "MIN": "MAX", "AVG": "SUM"}
_CLAUSE_END = r"(?=\bGROUP BY\b|\bORDER BY\b|\bLIMIT\b|\bINTERSECT\b|\bUNION\b|\bEXCEPT\b|\)|$)"


def _perturbations(q: str, db_schema: dict) -> list[tuple[str, str]]:
    out = []
    m = re.search(r"\bWHERE\b(.*?)" + _CLAUSE_END, q, re.I | re.S)
    if m and "select" not in m.group(1).lower():  # drop one WHERE condition (or the whole clause)
        parts = re.split(r"\s+(?:AND|OR)\s+", m.group(1), flags=re.I)
        if len(parts) >= 2:
            out.append(("where", q[: m.start(1)] + " " + parts[0] + " " + q[m.end(1) :]))
        else:
            out.append(("where", q[: m.start()] + " " + q[m.end() :]))
    m = re.search(r"\b(COUNT|SUM|MAX|MIN|AVG)\s*\(", q, re.I)
    if m:  # wrong aggregate
        out.append(("aggregate", q[: m.start(1)] + _AGG_SWAP[m.group(1).upper()] + q[m.end(1) :]))
    m = re.match(r"\s*SELECT\s+(DISTINCT\s+)?([A-Za-z_]\w*)\s+FROM\s+([A-Za-z_]\w*)", q, re.I)
    if m:  # wrong column: another column of the same table
        tables = [t.lower() for t in db_schema["table_names_original"]]
        if m.group(3).lower() in tables:
            ti = tables.index(m.group(3).lower())
            cols = [
                c
                for t, c in db_schema["column_names_original"]
                if t == ti and c.lower() != m.group(2).lower()
            ]
            if cols:
                out.append(("column", q[: m.start(2)] + cols[0] + q[m.end(2) :]))
    if has_top_level_order_by(q):  # reversed direction
        if re.search(r"\bDESC\b", q, re.I):
            out.append(("order", re.sub(r"\bDESC\b", "ASC", q, flags=re.I)))
        elif re.search(r"\bASC\b", q, re.I):
            out.append(("order", re.sub(r"\bASC\b", "DESC", q, flags=re.I)))
        else:
            m = re.search(r"\bORDER BY\b(.*?)(?=\bLIMIT\b|$)", q, re.I | re.S)
            out.append(("order", q[: m.end(1)].rstrip() + " DESC " + q[m.end(1) :]))
    return out


def test_spider_perturbations_agree_with_real_results():
    exs, schema = _spider()
    conns: dict[str, sqlite3.Connection] = {}

    def run(q, p):
        if p not in conns:
            conns[p] = sqlite3.connect(f"file:{p}?mode=ro&immutable=1", uri=True)
            conns[p].text_factory = lambda b: b.decode("utf-8", errors="replace")
        try:
            return conns[p].execute(q).fetchall()
        except sqlite3.Error:
            return None

    stats: Counter = Counter()
    disagreements = []
    for e, p in exs:
        gold = e["query"]
        gold_rows = run(gold, p)
        ordered = has_top_level_order_by(gold)
        for kind, q in _perturbations(gold, schema[e["db_id"]]):
            pred_rows = run(q, p)
            differs = pred_rows is None or not _ref_equal(pred_rows, gold_rows, ordered)
            stats[kind, differs] += 1
            if score(q, gold, p) != (0.0 if differs else 1.0):
                disagreements.append((kind, gold, q))
    for c in conns.values():
        c.close()
    assert disagreements == []
    for kind in ("where", "aggregate", "column", "order"):  # the check is not vacuous
        assert stats[kind, True] >= 100, stats


# ----------------------------------------------------------------------------------------------------
# Sandbox: hostile SQL against a copy of a Spider database


def _hostile(tmp: Path) -> list[str]:
    return [
        "DROP TABLE singer",
        "DELETE FROM singer",
        "UPDATE singer SET Name = 'x'",
        "INSERT INTO singer (Name) VALUES ('x')",
        "REPLACE INTO singer (Singer_ID, Name) VALUES (1, 'x')",
        f"ATTACH DATABASE '{tmp / 'evil.db'}' AS evil",
        "ATTACH 'evil_cwd.db' AS e",
        "DETACH main",
        "PRAGMA journal_mode = WAL",
        "PRAGMA user_version = 5",
        "PRAGMA writable_schema = ON",
        "SELECT * FROM pragma_user_version",
        "SELECT load_extension('/tmp/libevil.so')",
        "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT count(*) FROM r",
        "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r) SELECT x FROM r",
        "SELECT count(*) FROM singer a, singer b, singer c, singer d, singer e, singer f, singer g, singer "
        "h, singer i, singer j, singer k",
        "SELECT * FROM singer a, singer b, singer c, singer d, singer e, singer f, singer g",
        "SELECT count(*) FROM singer; DROP TABLE singer",
        "SELECT 1; SELECT 2",
        "CREATE TABLE t (x)",
        "CREATE TEMP TABLE t (x)",
        "CREATE VIEW v AS SELECT 1",
        "CREATE INDEX i ON singer (Name)",
        "CREATE TRIGGER tr AFTER INSERT ON singer BEGIN DELETE FROM singer; END",
        "ALTER TABLE singer ADD COLUMN z",
        f"VACUUM INTO '{tmp / 'copy.db'}'",
        "VACUUM INTO 'copy_cwd.db'",
        "VACUUM",
        "REINDEX",
        "ANALYZE",
        "BEGIN IMMEDIATE",
        "WITH x AS (SELECT 1) DELETE FROM singer",
        "SELECT zeroblob(2000000000)",
        "SELECT printf('%.*c', 2000000000, 'x')",
        # memory bombs (tests/_sql_bombs.py): each would hold gigabytes without the memory limits
        BOMBS["zeroblob_rows"],
        BOMBS["zeroblob_columns"],
        BOMBS["group_concat"],
        "SELECT * FROM singer a, singer b, singer c, singer d, singer e, singer f, singer g",
    ]


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_hostile_sql_cannot_harm(tmp_path: Path, monkeypatch):
    src = require_shared("spider", "database", "concert_singer", "concert_singer.sqlite")
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    db = db_dir / "concert_singer.sqlite"
    shutil.copyfile(src, db)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    before = _sha(db)
    gold = "SELECT count(*) FROM singer"
    timeout = 1.0
    for q in _hostile(db_dir):
        t0 = time.monotonic()
        s = score(f"```sql\n{q}\n```", gold, str(db), timeout_s=timeout)
        elapsed = time.monotonic() - t0
        assert s == 0.0, q
        assert elapsed < timeout + 1.0, (q, elapsed)
    assert _sha(db) == before
    assert sorted(os.listdir(db_dir)) == ["concert_singer.sqlite"]
    assert os.listdir(cwd) == []
    assert score(gold, gold, str(db)) == 1.0  # still readable and intact


def test_hostile_sql_in_worker_pool(tmp_path: Path):
    """The same corpus through score_batch with a process pool: all 0, nothing leaks, nothing hangs."""
    src = require_shared("spider", "database", "concert_singer", "concert_singer.sqlite")
    db = tmp_path / "concert_singer.sqlite"
    shutil.copyfile(src, db)
    before = _sha(db)
    qs = _hostile(tmp_path)
    ex = Example(id="h", prompt=[], gold_sql="SELECT count(*) FROM singer", db_path=str(db), task="sql")
    fn = sr.make_reward("spider", timeout_s=1.0)
    t0 = time.monotonic()
    res = score_batch(fn, qs, [ex] * len(qs), timeout_s=5.0, num_workers=2)
    assert res.scores == [0.0] * len(qs)
    assert res.failures == 0 and res.timeouts == 0, res.errors  # the reward's own 1 s time-out fires first
    assert time.monotonic() - t0 < 15
    assert _sha(db) == before and sorted(os.listdir(tmp_path)) == ["concert_singer.sqlite"]


# ----------------------------------------------------------------------------------------------------
# Memory: SQLite's heap limit and the result size cap


@pytest.fixture(scope="module")
def bomb_pool():
    """One worker without the RLIMIT_DATA backstop: the SQL sandbox's own limits must bound memory."""
    from dphrl.rewards.sandbox import WorkerPool

    pool = WorkerPool(1, memory_limit_mb=0)
    yield pool
    pool.close()


def run_bombs(pool, mode: str, db: str, options: dict, names=tuple(BOMBS)) -> dict[str, tuple]:
    """Score every bomb in ``pool`` (one worker); ``name -> (score, reason, peak growth MiB, seconds)``."""
    gold = "SELECT count(*) FROM singer"
    out = pool.map(probe, [(mode, BOMBS[n], gold, db, options) for n in names], timeout_s=120)
    assert all(o.status == "ok" for o in out), [o.error for o in out]
    return {n: o.value for n, o in zip(names, out)}


def check_bombs(results: dict[str, tuple], max_result_bytes: int) -> None:
    # what one query may hold: SQLite's heap, one row's copy in Python, the result (module doc of sql)
    bound_mib = (2 * sr.SQLITE_HEAP_LIMIT_BYTES + max_result_bytes) / 2**20 + 64
    for name, (value, reason, growth_mib, elapsed) in results.items():
        assert value == 0.0, (name, reason)
        assert STOPPED_BY[name] in reason, (name, reason)
        assert elapsed < 4.0, (name, elapsed, reason)  # stopped by a limit, not by the 5 s time-out
        assert growth_mib < bound_mib, (name, growth_mib, reason)


@pytest.mark.skipif(not can_measure_peak(), reason="needs /proc/self/clear_refs to measure peak memory")
def test_memory_bombs_fail_fast_with_bounded_memory(tmp_path: Path, bomb_pool):
    d = tmp_path / "bombs"
    d.mkdir()
    db = make_bomb_db(d / "bombs.sqlite")
    before = _sha(Path(db))
    results = run_bombs(bomb_pool, "spider", db, {"timeout_s": 5.0})
    check_bombs(results, sr.DEFAULT_MAX_RESULT_BYTES)
    assert max(r[2] for r in results.values()) > 100  # the measurement sees real allocations
    assert "result is larger than 64 MiB" in results["zeroblob_rows"][1]
    assert "SQLite heap limit 256 MiB" in results["zeroblob_columns"][1]
    results = run_bombs(bomb_pool, "bird", db, {"timeout_s": 5.0}, names=("zeroblob_rows", "cartesian"))
    check_bombs(results, sr.DEFAULT_MAX_RESULT_BYTES)
    assert _sha(Path(db)) == before and os.listdir(d) == ["bombs.sqlite"]
    gold = "SELECT count(*) FROM singer"
    assert score(gold, gold, db) == 1.0  # the database and the sandbox still work


def test_memory_limits_in_process(tmp_path: Path):
    """The same limits without a worker: the heap limit is set for this process, a bomb scores 0 with
    its reason, a gold bomb fails the example, and the connection keeps working."""
    db = make_bomb_db(tmp_path / "bombs.sqlite")
    gold = "SELECT count(*) FROM singer"
    assert score(gold, gold, db) == 1.0
    assert 0 < sr.sqlite_heap_limit() <= sr.SQLITE_HEAP_LIMIT_BYTES
    for name in ("zeroblob_rows", "zeroblob_columns"):
        value, reason = sr.score_with_reason(BOMBS[name], gold, db)
        assert value == 0.0 and "SQLMemoryLimit" in reason, reason
        with pytest.raises(sr.SQLMemoryLimit):
            sr.execute_sql(BOMBS[name], db)
    assert sr.score_with_reason(gold, gold, db) == (1.0, "match")
    assert sr.score_with_reason("SELECT 1", gold, db) == (0.0, "results differ")
    with pytest.raises(sr.GoldQueryError, match="SQLMemoryLimit"):
        score(gold, BOMBS["zeroblob_rows"], db)
    # the cap is a parameter; the accounting counts Python objects (44 rows of ~200 bytes: ~20 KB)
    res = sr.execute_sql("SELECT * FROM singer", db)
    assert 10_000 < res.nbytes < 40_000
    with pytest.raises(sr.SQLMemoryLimit, match="stopped after"):
        sr.execute_sql("SELECT * FROM singer", db, max_result_bytes=5_000)
    value, reason = sr.score_with_reason("SELECT * FROM singer", gold, db, max_result_bytes=5_000)
    assert value == 0.0 and reason.startswith("SQLMemoryLimit: query result is larger than"), reason
    fn = sr.make_reward("spider", max_result_bytes=10**6)
    assert fn(gold, Example(id="m", prompt=[], gold_sql=gold, db_path=db)) == 1.0


def test_gold_cache_is_bounded_in_bytes(tmp_path: Path, monkeypatch):
    db = make_bomb_db(tmp_path / "bombs.sqlite")
    sr.clear_caches()
    monkeypatch.setattr(sr, "GOLD_CACHE_BYTES", 100_000)
    for i in range(20):  # ~20 KB each
        sr.gold_result(f"SELECT *, {i} FROM singer", db)
    assert sum(r.nbytes for r in sr._GOLD.values()) <= 100_000 and 1 <= len(sr._GOLD) <= 5
    assert sr._gold_bytes == sum(r.nbytes for r in sr._GOLD.values())
    # a cached result larger than a smaller cap fails as running it under that cap would
    with pytest.raises(sr.GoldQueryError, match="SQLMemoryLimit"):
        sr.gold_result("SELECT *, 19 FROM singer", db, max_result_bytes=1_000)
    sr.clear_caches()
    assert sr._gold_bytes == 0
