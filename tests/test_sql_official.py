"""Official SQL evaluation modes (Spider test-suite, BIRD) against our sandboxed SQL reward.

Each case where the modes differ names the documented difference it exercises; the Spider dev test
checks that on real gold queries and perturbations the two Spider modes differ only where one of the
documented differences explains it.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sqlite3
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from dphrl.data.example import Example
from dphrl.rewards import sql as sr
from dphrl.rewards import sql_official as so
from dphrl.rewards.sql import has_top_level_order_by, lex_sql, results_match

try:
    from _shared import require_shared
    from _sql_bombs import BOMBS, STOPPED_BY, can_measure_peak, make_bomb_db, probe
except ImportError:
    from tests._shared import require_shared
    from tests._sql_bombs import BOMBS, STOPPED_BY, can_measure_peak, make_bomb_db, probe

SLOW = (
    "WITH RECURSIVE r(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM r WHERE x < 2000000) SELECT count(*) FROM r"
)


def _make_db(path: Path, extra: str = "") -> str:
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE t (id INTEGER, name TEXT, score REAL);"
        "INSERT INTO t VALUES (1, 'a', 1.5), (2, 'b', 2.5), (3, 'c', 2.5), (4, 'd', NULL);"
        "CREATE TABLE u (v TEXT);"
        "INSERT INTO u VALUES (CAST(X'61FF' AS TEXT));" + extra  # 'a' + an invalid UTF-8 byte
    )
    conn.commit()
    conn.close()
    return str(path)


@pytest.fixture()
def db(tmp_path: Path) -> Iterator[str]:
    d = tmp_path / "tiny"
    d.mkdir()
    sr.clear_caches()
    yield _make_db(d / "tiny.sqlite")
    sr.clear_caches()


def _all(pred: str, gold: str, db: str) -> dict[str, float]:
    """Scores under the four modes: ours (sandboxed) and the official ones."""
    return {
        "spider": sr.score(pred, gold, db, "spider"),
        "spider-official": so.score_spider_official(pred, gold, db),
        "bird": sr.score(pred, gold, db, "bird"),
        "bird-official": so.score_bird_official(pred, gold, db),
    }


# ----------------------------------------------------------------------------------------------------
# Where the modes agree


@pytest.mark.parametrize(
    "pred, gold, spider, bird",
    [
        ("SELECT id, name FROM t", "SELECT id, name FROM t", 1.0, 1.0),  # identical
        ("SELECT id FROM t WHERE id > 1", "SELECT id FROM t WHERE id > 2", 0.0, 0.0),  # wrong WHERE
        ("SELECT id FROM t WHERE id > 9", "SELECT id FROM t WHERE 0", 1.0, 1.0),  # both empty
        ("SELECT score FROM t WHERE id = 4", "SELECT NULL", 1.0, 1.0),  # NULL == NULL
        ("SELECT '1'", "SELECT 1", 0.0, 0.0),  # types: text is not an integer
        ("SELECT 1.0", "SELECT 1", 1.0, 1.0),  # 1.0 == 1 everywhere
        ("SELECT id FROM t ORDER BY id DESC", "SELECT id FROM t", 1.0, 1.0),  # no ORDER BY in the gold
        # a top-level ORDER BY: Spider compares in order (ours and official), BIRD never does
        ("SELECT id FROM t ORDER BY id DESC", "SELECT id FROM t ORDER BY id", 0.0, 1.0),
    ],
)
def test_modes_agree(db, pred, gold, spider, bird):
    assert _all(pred, gold, db) == {
        "spider": spider,
        "spider-official": spider,
        "bird": bird,
        "bird-official": bird,
    }


def test_duplicates_set_vs_multiset_same_in_ours_and_official(db):
    """Duplicates: Spider counts them (multiset) and BIRD does not (set), in ours and official alike."""
    pred, gold = "SELECT id FROM t UNION ALL SELECT id FROM t", "SELECT id FROM t"
    assert _all(pred, gold, db) == {"spider": 0.0, "spider-official": 0.0, "bird": 1.0, "bird-official": 1.0}


def test_column_permutation_same_in_ours_and_official(db):
    """Column order: Spider searches a permutation (ours and official), BIRD compares tuples."""
    pred, gold = "SELECT name, id FROM t", "SELECT id, name FROM t"
    assert _all(pred, gold, db) == {"spider": 1.0, "spider-official": 1.0, "bird": 0.0, "bird-official": 0.0}
    # ordered gold: row i must match row i under some column permutation
    assert (
        so.score_spider_official(
            "SELECT name, id FROM t ORDER BY id", "SELECT id, name FROM t ORDER BY id", db
        )
        == 1
    )
    assert so.score_spider_official("SELECT name, id FROM t ORDER BY id DESC",
                                    "SELECT id, name FROM t ORDER BY id", db) == 0


# ----------------------------------------------------------------------------------------------------
# Where they differ, one documented difference each


def test_row_order_textual_order_by(db):
    """Row order: official = 'order by' anywhere in the gold text; ours = a top-level ORDER BY."""
    pred = "SELECT id FROM t WHERE id <= 3 ORDER BY id DESC"
    for gold in (
        "SELECT id FROM t WHERE id IN (SELECT id FROM t ORDER BY id LIMIT 3)",  # subquery
        "SELECT id FROM t WHERE id <= 3 AND name != 'order by'",  # inside a literal
        "SELECT id FROM t WHERE id <= 3 -- order by id",  # inside a comment
    ):
        assert not has_top_level_order_by(gold) and so.spider_official_order_matters(gold)
        s = _all(pred, gold, db)
        assert (s["spider"], s["spider-official"]) == (1.0, 0.0), gold
    # the converse: a top-level ORDER BY that the text search misses
    gold = "SELECT id FROM t ORDER\n  BY id"
    assert has_top_level_order_by(gold) and not so.spider_official_order_matters(gold)
    assert (sr.score("SELECT id FROM t ORDER BY id DESC", gold, db),
            so.score_spider_official("SELECT id FROM t ORDER BY id DESC", gold, db)) == (0.0, 1.0)


def test_distinct_is_removed_by_official_spider(db):
    """DISTINCT: the official Spider run deletes it from both queries (default --keep_distinct off)."""
    pred, gold = "SELECT DISTINCT score FROM t WHERE score > 0", "SELECT score FROM t WHERE score > 0"
    assert _all(pred, gold, db) == {"spider": 0.0, "spider-official": 1.0, "bird": 1.0, "bird-official": 1.0}
    # also inside aggregates: count(DISTINCT score) is run as count(score)
    pred, gold = "SELECT count(score) FROM t", "SELECT count(DISTINCT score) FROM t"
    assert (sr.score(pred, gold, db), so.score_spider_official(pred, gold, db)) == (0.0, 1.0)
    # --keep_distinct restores our behaviour
    assert so.score_spider_official(pred, gold, db, keep_distinct=True) == 0.0
    assert so.official_reward("spider-official", keep_distinct=True)(pred, Example(
        id="k", prompt=[], gold_sql=gold, db_path=db)) == 0.0


def test_remove_distinct_only_touches_the_keyword():
    q = "SELECT Distinct a, 'distinct', \"distinct\", [distinct], distinct_col FROM t -- distinct\n"
    assert (
        so.remove_distinct(q)
        == "SELECT  a, 'distinct', \"distinct\", [distinct], distinct_col FROM t -- distinct\n"
    )
    assert so.remove_distinct("SELECT count(DISTINCT(x)) FROM t") == "SELECT count((x)) FROM t"


def test_floats_exact_in_official(db):
    """Floats: ours rounds to 12 significant digits, the official scripts compare with ==."""
    assert _all("SELECT 0.1 + 0.2", "SELECT 0.3", db) == {
        "spider": 1.0, "spider-official": 0.0, "bird": 1.0, "bird-official": 0.0}


def test_official_spider_quick_reject_is_type_sensitive(db):
    """The official pre-check sorts each row's values by str(v) + str(type(v)): equal rows that mix an
    int and a float can sort differently and be rejected (reproduced); BIRD's set == accepts them."""
    assert so.spider_official_result_eq([(1, "1.5")], [(1.0, "1.5")], order_matters=False) is False
    assert results_match([(1.0, "1.5")], [(1, "1.5")])
    pred, gold = "SELECT 1.0, '1.5'", "SELECT 1, '1.5'"
    assert _all(pred, gold, db) == {"spider": 1.0, "spider-official": 0.0, "bird": 1.0, "bird-official": 1.0}


def test_spider_result_eq_matches_brute_force_on_exact_values():
    """Apart from that pre-check, official result_eq is "some column permutation makes the results
    equal" (as lists or multisets), on raw values."""
    import random

    from _shared import brute_force_equal

    def brute(gold, pred, ordered):
        return brute_force_equal(pred, gold, ordered)

    rng = random.Random(1)
    for _ in range(300):
        ncol, nrow = rng.randint(1, 4), rng.randint(1, 5)
        gold = [tuple(rng.choice([0, 1, "x", None]) for _ in range(ncol)) for _ in range(nrow)]
        perm = rng.sample(range(ncol), ncol)
        pred = [tuple(r[i] for i in perm) for r in gold]
        if rng.random() < 0.5:
            rng.shuffle(pred)
        if rng.random() < 0.5:
            i, j = rng.randrange(nrow), rng.randrange(ncol)
            pred[i] = pred[i][:j] + (rng.choice([0, 1, "x", None]),) + pred[i][j + 1 :]
        for ordered in (False, True):
            assert so.spider_official_result_eq(gold, pred, order_matters=ordered) == brute(
                gold, pred, ordered
            )


def test_time_outs(db):
    """Time-out: ours 5 s by default (here 0.05 s), official 60 s (Spider) / 30 s (BIRD); enforced."""
    assert (so.SPIDER_OFFICIAL_TIMEOUT_S, so.BIRD_OFFICIAL_TIMEOUT_S) == (60.0, 30.0)
    gold = "SELECT 2000000"
    assert sr.score(SLOW, gold, db, timeout_s=0.05) == 0.0
    assert so.score_spider_official(SLOW, gold, db) == 1.0
    assert so.score_spider_official(SLOW, gold, db, timeout_s=0.05) == 0.0  # the official time-out applies


def test_bird_budget_is_shared_with_the_gold(db):
    """BIRD: prediction and gold share one 30 s budget; the prediction gets what the gold left."""
    gold = "SELECT 2000000"
    assert so.score_bird_official(SLOW, gold, db) == 1.0
    cached = sr.gold_result(gold, db, max_rows=so.OFFICIAL_MAX_ROWS, text_errors="strict")
    cached.elapsed_s = so.BIRD_OFFICIAL_TIMEOUT_S - 0.01  # as if the gold had taken 29.99 s
    assert so.score_bird_official(SLOW, gold, db) == 0.0
    assert so.score_bird_official("SELECT 2000000", gold, db) == 1.0  # a fast prediction still fits
    cached.elapsed_s = so.BIRD_OFFICIAL_TIMEOUT_S + 1
    with pytest.raises(sr.GoldQueryError, match="budget"):
        so.score_bird_official("SELECT 1", gold, db)


def test_sandbox_kept_for_non_select(db, tmp_path):
    """Statements: officially a DELETE returning no rows matches an empty gold; the sandbox keeps it 0."""
    before = Path(db).read_bytes()
    for pred in ("DELETE FROM t WHERE 0", "SELECT 1; DELETE FROM t", "PRAGMA user_version = 3"):
        assert _all(pred, "SELECT id FROM t WHERE 0", db) == dict.fromkeys(
            ["spider", "spider-official", "bird", "bird-official"], 0.0), pred
    assert Path(db).read_bytes() == before


def test_gold_failure_raises(db):
    for mode in so.OFFICIAL_REWARDS:
        with pytest.raises(sr.GoldQueryError):
            so.score_official("SELECT 1", "SELECT missing FROM t", db, mode)


def test_invalid_utf8(db):
    """Bad UTF-8: Spider official drops the bytes ('a'), ours replaces them ('a\\ufffd'), BIRD errors."""
    assert sr.score("SELECT 'a'", "SELECT v FROM u", db) == 0.0
    assert so.score_spider_official("SELECT 'a'", "SELECT v FROM u", db) == 1.0
    assert so.score_bird_official("SELECT v FROM u", "SELECT 1", db) == 0.0
    with pytest.raises(sr.GoldQueryError):
        so.score_bird_official("SELECT 'a'", "SELECT v FROM u", db)


def test_query_rewriting(db):
    """Official Spider rewriting: '> =' joined, ' value ' -> ' 1 ', YEAR(CURDATE()) -> 2020."""
    cases = [
        ("SELECT id FROM t WHERE id > = 2", "SELECT id FROM t WHERE id >= 2"),
        ("SELECT id FROM t WHERE id = value LIMIT 5", "SELECT id FROM t WHERE id = 1"),
        ("SELECT YEAR(CURDATE())", "SELECT 2020"),
    ]
    for pred, gold in cases:
        assert (sr.score(pred, gold, db), so.score_spider_official(pred, gold, db)) == (0.0, 1.0), pred


def test_test_suite_databases(tmp_path):
    """Databases: official Spider checks every *.sqlite* file of the folder (test-suite layout)."""
    d = tmp_path / "suite"
    d.mkdir()
    main = _make_db(d / "suite.sqlite")
    _make_db(d / "suite_variant.sqlite", "INSERT INTO t VALUES (5, 'a', 9.0);")
    (d / "schema.sql").write_text("not a database")
    pred, gold = "SELECT id FROM t WHERE name = 'a' AND id < 5", "SELECT id FROM t WHERE name = 'a'"
    sr.clear_caches()
    assert sr.score(pred, gold, main) == 1.0  # ours: the one database
    assert so.score_spider_official(pred, gold, main, test_suite=False) == 1.0
    assert so.score_spider_official(pred, gold, main) == 0.0  # the variant tells them apart
    assert so.score_spider_official(gold, gold, main) == 1.0


# ----------------------------------------------------------------------------------------------------
# API


def test_mode_lookup_and_names(db):
    ex = Example(id="x", prompt=[], gold_sql="SELECT id FROM t", db_path=db, task="sql")
    for mode in ("spider-official", "bird-official"):
        fn = so.official_reward(mode)
        assert fn is so.OFFICIAL_REWARDS[mode] and fn.sql_mode == mode
        assert fn.__name__ == mode.replace("-", "_") + "_reward"
        assert fn("SELECT id FROM t", ex) == 1.0
        assert pickle.loads(pickle.dumps(fn)) is fn
    fn = so.official_reward("spider-official", keep_distinct=True, timeout_s=10.0)
    assert fn.sql_mode == "spider-official" and fn.__name__ == "spider_official_reward"
    fn2 = pickle.loads(pickle.dumps(fn))
    assert fn2.sql_mode == "spider-official" and fn2("SELECT id FROM t", ex) == 1.0
    with pytest.raises(ValueError, match="valid: spider-official, bird-official"):
        so.official_reward("spider")
    with pytest.raises(ValueError, match="valid: spider, bird, spider-official, bird-official"):
        so.sql_eval_reward("postgres")
    with pytest.raises(ValueError, match="keep_distinct"):
        so.official_reward("bird-official", keep_distinct=True)
    with pytest.raises(ValueError, match="unknown option"):
        so.score_official("SELECT 1", "SELECT 1", db, "bird-official", keep_distinct=True)
    assert so.sql_eval_reward("spider") is sr.spider_reward and so.sql_eval_reward("bird") is sr.bird_reward
    assert so.sql_eval_reward("bird-official") is so.bird_official_reward
    with pytest.raises(ValueError, match="gold_sql and db_path"):
        so.spider_official_reward("SELECT 1", Example(id="n", prompt=[]))


# ----------------------------------------------------------------------------------------------------
# Real Spider dev data: every disagreement is a documented difference


def _select_golds(exs: list[tuple[dict, str]]) -> list[tuple[str, str]]:
    """About 40 distinct gold queries, rich in the constructs where the modes differ."""
    seen: set[str] = set()
    picked: dict[str, list[tuple[str, str]]] = {
        "distinct": [],
        "order_text": [],
        "order_top": [],
        "plain": [],
    }
    quota = {"distinct": 15, "order_text": 10, "order_top": 10, "plain": 12}
    for e, p in exs:
        q = e["query"]
        if q in seen:
            continue
        seen.add(q)
        if re.search(r"\bdistinct\b", q, re.I):
            kind = "distinct"
        elif "order by" in q.lower() and not has_top_level_order_by(q):
            kind = "order_text"
        elif has_top_level_order_by(q):
            kind = "order_top"
        else:
            kind = "plain"
        if len(picked[kind]) < quota[kind]:
            picked[kind].append((q, p))
    return [x for v in picked.values() for x in v]


def _top_level_words(q: str) -> list[str]:
    return [t.text.upper() for t in lex_sql(q) if t.depth == 0 and t.kind == "word"]


def _spider_perturbations(q: str) -> list[tuple[str, str]]:
    q = q.strip().rstrip(";").strip()
    out = [("gold", q)]
    if has_top_level_order_by(q):  # rows re-ordered
        if re.search(r"\bDESC\b", q, re.I):
            out.append(("order", re.sub(r"\bDESC\b", "ASC", q, flags=re.I)))
        elif re.search(r"\bASC\b", q, re.I):
            out.append(("order", re.sub(r"\bASC\b", "DESC", q, flags=re.I)))
        else:
            m = re.search(r"\bORDER BY\b(.*?)(?=\bLIMIT\b|$)", q, re.I | re.S)
            out.append(("order", q[: m.end(1)].rstrip() + " DESC " + q[m.end(1) :]))
    elif "LIMIT" not in _top_level_words(q):
        out.append(("order", q + " ORDER BY 1 DESC"))
    if re.search(r"\bDISTINCT\b", q, re.I):  # DISTINCT removed / added
        out.append(("distinct", re.sub(r"\bDISTINCT\b", "", q, flags=re.I)))
    else:
        out.append(("distinct", re.sub(r"^SELECT\s+", "SELECT DISTINCT ", q, count=1, flags=re.I)))
    m = re.match(r"SELECT\s+(DISTINCT\s+)?([^()]+?)\s+FROM\s", q, re.I)
    if m and "," in m.group(2):  # two columns swapped
        cols = [c.strip() for c in m.group(2).split(",")]
        cols[0], cols[1] = cols[1], cols[0]
        out.append(("swap", q[: m.start(2)] + " , ".join(cols) + q[m.end(2) :]))
    if re.search(r"\bWHERE\b", q, re.I):  # wrong WHERE
        out.append(("where", re.sub(r"\bWHERE\b", "WHERE NOT", q, count=1, flags=re.I)))
    return out


def _rows(sql: str, db: str):
    try:
        return sr.execute_sql(sql, db).rows
    except (sqlite3.Error, sr.SQLRejected, sr.SQLTimeout, sr.SQLRowLimit):
        return None


def _explanations(pred: str, gold: str, db: str, official: float) -> set[str]:
    """The documented differences that, switched alone to the official behaviour in our sandboxed
    Spider semantics, give the ``official`` score."""
    found = set()
    p_nd, g_nd = so.remove_distinct(pred), so.remove_distinct(gold)
    if (p_nd, g_nd) != (pred, gold) and sr.score(p_nd, g_nd, db) == official:
        found.add("distinct")  # our rules on the DISTINCT-stripped queries
    p_rows, g_rows = _rows(pred, db), _rows(gold, db)
    if p_rows is None or g_rows is None:
        return found
    ours_order, official_order = has_top_level_order_by(gold), so.spider_official_order_matters(gold)
    if (
        official_order != ours_order
        and float(results_match(p_rows, g_rows, ordered=official_order)) == official
    ):
        found.add("order")  # our rules with the official row-order decision
    if float(so.spider_official_result_eq(g_rows, p_rows, order_matters=ours_order)) == official:
        found.add("exact")  # our rules on raw values: no float rounding, type-sensitive pre-check
    return found


def test_spider_dev_modes_differ_only_where_documented():
    root = require_shared("spider")
    dev = json.loads((root / "dev.json").read_text())
    exs = []
    for e in dev:
        p = root / "database" / e["db_id"] / f"{e['db_id']}.sqlite"
        if p.is_file():
            exs.append((e, str(p)))
    golds = _select_golds(exs)
    assert len(golds) >= 38
    kinds: Counter = Counter()
    diffs: Counter = Counter()
    unexplained = []
    for gold, db in golds:
        # one database per folder (no test-suite variants), so both modes see the same database
        assert [n for n in os.listdir(os.path.dirname(db)) if ".sqlite" in n] == [os.path.basename(db)]
        for kind, pred in _spider_perturbations(gold):
            ours, official = sr.score(pred, gold, db), so.score_spider_official(pred, gold, db)
            kinds[kind] += 1
            if ours != official:
                why = _explanations(pred, gold, db, official)
                diffs.update(why)
                if not why:
                    unexplained.append((kind, gold, pred, ours, official))
            elif kind == "gold":
                assert ours == 1.0, gold
            # BIRD: ours and official differ only by float rounding (no such case in these queries)
            assert sr.score(pred, gold, db, "bird") == so.score_bird_official(pred, gold, db), (gold, pred)
    assert unexplained == []
    assert min(kinds.values()) >= 10 and len(kinds) == 5, kinds  # every perturbation kind ran
    assert diffs["distinct"] >= 5 and diffs["order"] >= 1, diffs  # the differences do occur


def test_lexer_shared_by_remove_distinct_and_sandbox(db):
    """remove_distinct and the sandbox read the text with the same lexer: a DISTINCT in a literal
    survives, and an unterminated literal is still rejected after the rewrite."""
    assert so.score_spider_official("SELECT 'distinct'", "SELECT 'distinct'", db) == 1.0
    assert so.score_spider_official("SELECT 'distinct", "SELECT 1", db) == 0.0


def test_copy_of_shared_db_unchanged(tmp_path):
    """The official modes leave a real Spider database byte-identical (read-only sandbox)."""
    src = require_shared("spider", "database", "concert_singer", "concert_singer.sqlite")
    d = tmp_path / "concert_singer"
    d.mkdir()
    dbp = d / "concert_singer.sqlite"
    shutil.copyfile(src, dbp)
    before = dbp.read_bytes()
    for mode in so.OFFICIAL_REWARDS:
        assert (
            so.score_official("SELECT count(*) FROM singer", "SELECT count(*) FROM singer", str(dbp), mode)
            == 1
        )
        assert so.score_official("DROP TABLE singer", "SELECT count(*) FROM singer", str(dbp), mode) == 0
    assert dbp.read_bytes() == before and os.listdir(d) == ["concert_singer.sqlite"]


@pytest.mark.skipif(not can_measure_peak(), reason="needs /proc/self/clear_refs to measure peak memory")
def test_memory_bombs_in_official_modes(tmp_path):
    """The official modes keep the memory limits (their result cap is 256 MiB): every bomb scores 0
    fast, with its reason, within the documented memory bound, and the database is unchanged."""
    from dphrl.rewards.sandbox import WorkerPool

    d = tmp_path / "bombs"
    d.mkdir()
    db = make_bomb_db(d / "bombs.sqlite")
    before = Path(db).read_bytes()
    gold = "SELECT count(*) FROM singer"
    cases = [("spider-official", n) for n in BOMBS] + [
        ("bird-official", n) for n in ("zeroblob_rows", "zeroblob_columns", "cartesian")]
    pool = WorkerPool(1, memory_limit_mb=0)  # no RLIMIT_DATA backstop: the sandbox's limits alone
    try:
        out = pool.map(probe, [(mode, BOMBS[n], gold, db, {}) for mode, n in cases], timeout_s=120)
    finally:
        pool.close()
    bound_mib = (2 * sr.SQLITE_HEAP_LIMIT_BYTES + so.OFFICIAL_MAX_RESULT_BYTES) / 2**20 + 64
    for (mode, name), o in zip(cases, out):
        assert o.status == "ok", (mode, name, o.error)
        value, reason, growth_mib, elapsed = o.value
        assert value == 0.0 and STOPPED_BY[name] in reason, (mode, name, reason)
        assert elapsed < 6.0, (mode, name, elapsed)  # not the official 30/60 s time-outs
        assert growth_mib < bound_mib, (mode, name, growth_mib)
    reasons = {(m, n): o.value[1] for (m, n), o in zip(cases, out)}
    assert "larger than 256 MiB" in reasons["bird-official", "cartesian"]
    assert Path(db).read_bytes() == before and os.listdir(d) == ["bombs.sqlite"]
    for mode in so.OFFICIAL_REWARDS:
        assert so.score_official_with_reason(gold, gold, db, mode) == (1.0, "match")
        assert so.score_official(gold, gold, db, mode, max_result_bytes=2**20) == 1.0
        value, reason = so.score_official_with_reason(
            BOMBS["zeroblob_rows"], gold, db, mode, max_result_bytes=2**20
        )
        assert value == 0.0 and "larger than 1 MiB" in reason, reason
