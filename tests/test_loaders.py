"""Loaders (every format, errors, skip counts), prompt templates and synthetic tasks."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from dphrl.data.example import Example
from dphrl.data.loaders import (
    DatasetSpecError,
    Examples,
    check_dataset_spec,
    dataset_loader,
    load_bird,
    load_dataset_spec,
    load_gsm8k,
    load_hf,
    load_jsonl,
    load_math,
    load_parquet,
    load_spider,
)
from dphrl.data.synthetic import arithmetic_problem, build_sql_db, make_arithmetic, make_sql_tasks
from dphrl.data.templates import math_messages, sql_messages, sql_schema
from dphrl.rewards import get_reward, score_batch

try:
    from _shared import require_shared
except ImportError:
    from tests._shared import require_shared


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _make_db(path: Path, rows: int = 5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE pets (id INTEGER PRIMARY KEY, kind TEXT, age INTEGER)")
    conn.executemany(
        "INSERT INTO pets VALUES (?, ?, ?)", [(i, ["cat", "dog"][i % 2], i + 1) for i in range(rows)]
    )
    conn.commit()
    conn.close()
    return path


# ----------------------------------------------------------------------------------------------------
# Math formats


def test_gsm8k(tmp_path):
    p = _write_jsonl(tmp_path / "g.jsonl", [
        {"question": "What is 2+2?", "answer": "2+2=4\n#### 4"},
        "",
        {"question": "Big?", "answer": "so\n#### 1,000"},
    ])
    exs = load_gsm8k(p)
    assert isinstance(exs, Examples) and len(exs) == 2 and exs.skipped == 0
    assert [e.answer for e in exs] == ["4", "1000"]
    e = exs[1]
    assert e.task == "math" and e.meta["source"] == str(p) and e.meta["line"] == 3
    assert (
        e.prompt[-1]["role"] == "user"
        and "\\boxed{}" in e.prompt[-1]["content"]
        and "Big?" in e.prompt[-1]["content"]
    )
    assert get_reward(e.task)("\\boxed{1000}", e) == 1.0
    assert len(load_gsm8k(p, limit=1)) == 1


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"question": "q"}, r"line 2: missing field 'answer'"),
        ({"question": "q", "answer": "no final line"}, r"line 2: .*####"),
        ("{not json", r"line 2: invalid JSON"),
    ],
)
def test_gsm8k_malformed_row_names_file_line_and_field(tmp_path, bad, match):
    p = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "answer": "#### 1"}, bad])
    with pytest.raises(ValueError, match=match) as ei:
        load_gsm8k(p)
    assert str(p) in str(ei.value)
    assert "fix" in str(ei.value).lower() or "must" in str(ei.value).lower()


def test_math_answer_or_boxed_solution(tmp_path):
    p = _write_jsonl(tmp_path / "m.jsonl", [
        {"problem": "P1", "answer": "\\frac{1}{2}", "level": "Level 2", "unique_id": "u1"},
        {"problem": "P2", "solution": "so we get \\boxed{\\sqrt{2}}."},
    ])
    exs = load_math(p)
    assert [e.answer for e in exs] == ["\\frac{1}{2}", "\\sqrt{2}"]
    assert exs[0].id == "u1" and exs[0].meta["level"] == "Level 2" and exs[1].meta["line"] == 2
    bad = _write_jsonl(tmp_path / "mb.jsonl", [{"problem": "P", "solution": "no box"}])
    with pytest.raises(ValueError, match=r"mb.jsonl, line 1: .*boxed"):
        load_math(bad)
    bad2 = _write_jsonl(tmp_path / "mb2.jsonl", [{"answer": "1"}])
    with pytest.raises(ValueError, match=r"line 1: missing field 'problem'"):
        load_math(bad2)


# ----------------------------------------------------------------------------------------------------
# SQL formats and templates


def _spider_dir(tmp_path: Path) -> Path:
    d = tmp_path / "spider"
    _make_db(d / "database" / "zoo" / "zoo.sqlite")
    rows = [
        {"db_id": "zoo", "question": "How many pets?", "query": "SELECT count(*) FROM pets"},
        {"db_id": "gone", "question": "Missing db", "query": "SELECT 1"},
        {"db_id": "zoo", "question": "Ages of cats", "query": "SELECT age FROM pets WHERE kind = 'cat'"},
        {"db_id": "gone", "question": "Missing again", "query": "SELECT 2"},
    ]
    (d / "dev.json").write_text(json.dumps(rows))
    (d / "tables.json").write_text("[]")
    return d


def test_spider_skips_missing_databases(tmp_path, caplog):
    d = _spider_dir(tmp_path)
    exs = load_spider(d)
    assert len(exs) == 2 and exs.skipped == 2 and exs.skip_reasons == {"missing database gone": 2}
    assert "skipped 2" in caplog.text
    e = exs[1]
    assert e.task == "sql" and e.gold_sql.startswith("SELECT age") and Path(e.db_path).is_file()
    assert e.meta["line"] == 2 and e.meta["db_id"] == "zoo"
    text = e.prompt[-1]["content"]
    assert "CREATE TABLE pets" in text and "Ages of cats" in text and "```sql" in text
    assert "3 example rows from pets" in text
    assert get_reward(e.task)(f"```sql\n{e.gold_sql}\n```", e) == 1.0
    # malformed entry
    (d / "dev.json").write_text(json.dumps([{"db_id": "zoo", "question": "q"}]))
    with pytest.raises(ValueError, match=r"dev.json, entry 0 .*missing field 'query'"):
        load_spider(d)


def test_bird_appends_evidence(tmp_path):
    d = tmp_path / "bird"
    _make_db(d / "dev_databases" / "zoo" / "zoo.sqlite")
    (d / "dev.json").write_text(
        json.dumps(
            [
                {
                    "question_id": 7,
                    "db_id": "zoo",
                    "question": "How many old pets?",
                    "evidence": "old refers to age > 3",
                    "SQL": "SELECT count(*) FROM pets WHERE age > 3",
                    "difficulty": "simple",
                },
                {"question_id": 8, "db_id": "nope", "question": "x", "evidence": "", "SQL": "SELECT 1"},
            ]
        )
    )
    exs = load_bird(d)
    assert len(exs) == 1 and exs.skipped == 1
    e = exs[0]
    assert e.task == "bird" and e.id == "bird-dev-7" and e.meta["difficulty"] == "simple"
    text = e.prompt[-1]["content"]
    assert "How many old pets?" in text and "old refers to age > 3" in text
    assert text.index("How many old pets?") < text.index("old refers to age > 3")
    assert get_reward("bird")(e.gold_sql, e) == 1.0


def test_templates(tmp_path):
    db = _make_db(tmp_path / "t.sqlite")
    assert "example rows" not in sql_schema(db, sample_rows=0)
    assert sql_schema(db, sample_rows=1).count("\n") < sql_schema(db, sample_rows=3).count("\n")
    msgs = sql_messages("Q?", db, evidence="E!", system="You write SQL.")
    assert [m["role"] for m in msgs] == ["system", "user"] and "E!" in msgs[1]["content"]
    assert "single ```sql" in msgs[1]["content"]
    m = math_messages("What is 1+1?")
    assert m == [{"role": "user", "content": m[0]["content"]}] and "step by step" in m[0]["content"]
    with pytest.raises(FileNotFoundError):
        sql_schema(tmp_path / "none.sqlite")


# ----------------------------------------------------------------------------------------------------
# Generic formats


def test_jsonl_generic(tmp_path):
    db = _make_db(tmp_path / "dbs" / "a.sqlite")
    p = _write_jsonl(tmp_path / "d.jsonl", [
        {"q": "plain", "a": "1", "uid": "x1", "level": 3},
        {"q": [{"role": "system", "content": "s"}, {"role": "user", "content": "chat"}], "a": "2"},
    ])
    exs = load_jsonl(p, prompt_field="q", answer_field="a", id_field="uid")
    assert exs[0].prompt == [{"role": "user", "content": "plain"}] and exs[0].id == "x1"
    assert exs[0].meta == {"level": 3, "source": str(p), "line": 1}
    assert exs[1].prompt[0]["role"] == "system" and exs[1].answer == "2"
    math_ex = load_jsonl(p, prompt_field="q", answer_field="a", template="math", limit=1)
    assert len(math_ex) == 1 and "\\boxed{}" in math_ex[0].prompt[0]["content"]
    sp = _write_jsonl(
        tmp_path / "s.jsonl", [{"question": "n?", "sql": "SELECT count(*) FROM pets", "db": "dbs/a.sqlite"}]
    )
    sx = load_jsonl(sp, prompt_field="question", answer_field=None, gold_sql_field="sql", db_path_field="db",
                    task="sql", template="sql")
    assert sx[0].db_path == str(db) and "CREATE TABLE pets" in sx[0].prompt[0]["content"]
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"q": "a", "a": "1"}, {"q": "b", "a": "2"}, {"a": "3"}])
    with pytest.raises(ValueError, match=r"bad.jsonl, line 3: missing field 'q'.*prompt_field="):
        load_jsonl(bad, prompt_field="q", answer_field="a")
    with pytest.raises(FileNotFoundError):
        load_jsonl(tmp_path / "missing.jsonl")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b", "c"], "answer": ["1", "2", None]}), p)
    with pytest.raises(ValueError, match=r"d.parquet, row 2: missing field 'answer'"):
        load_parquet(p)
    exs = load_parquet(p, limit=2)
    assert [e.answer for e in exs] == ["1", "2"] and exs[1].meta["line"] == 1


def test_hf_local(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"prompt": ["x", "y"], "answer": ["1", "2"]})
    ds.save_to_disk(str(tmp_path / "saved"))
    exs = load_hf(tmp_path / "saved")
    assert [e.answer for e in exs] == ["1", "2"]
    dd = datasets.DatasetDict({"test": ds})
    dd.save_to_disk(str(tmp_path / "saved_dict"))
    assert len(load_hf(tmp_path / "saved_dict", split="test", limit=1)) == 1
    with pytest.raises(ValueError, match="no split"):
        load_hf(tmp_path / "saved_dict", split="train")
    j = _write_jsonl(tmp_path / "h.jsonl", [{"prompt": "p", "answer": "3"}])
    assert load_hf(j)[0].answer == "3"


# ----------------------------------------------------------------------------------------------------
# Spec dispatch


def test_load_dataset_spec_dispatch(tmp_path):
    g = _write_jsonl(tmp_path / "g.jsonl", [{"question": f"q{i}", "answer": f"#### {i}"} for i in range(10)])
    a = load_dataset_spec({"type": "gsm8k", "path": str(g), "limit": 3})
    assert [e.answer for e in a] == ["0", "1", "2"]
    s1 = load_dataset_spec({"type": "gsm8k", "path": "g.jsonl", "limit": 4, "seed": 1}, base_dir=tmp_path)
    s2 = load_dataset_spec({"type": "gsm8k", "path": str(g), "limit": 4, "seed": 1})
    assert [e.id for e in s1] == [e.id for e in s2] and len(s1) == 4
    assert [e.id for e in s1] != [
        e.id for e in load_dataset_spec({"type": "gsm8k", "path": str(g), "limit": 4})
    ]
    assert len(load_dataset_spec(f"gsm8k:{g}")) == 10
    plain = _write_jsonl(tmp_path / "plain.jsonl", [{"prompt": "hi", "answer": "1"}])
    assert load_dataset_spec(str(plain))[0].prompt == [{"role": "user", "content": "hi"}]  # jsonl inferred
    with pytest.raises(ValueError, match=r"g.jsonl, line 1: missing field 'prompt'"):
        load_dataset_spec(str(g))
    d = _spider_dir(tmp_path)
    sp = load_dataset_spec({"type": "spider", "path": str(d)})
    assert len(sp) == 2 and sp.skipped == 2
    assert load_dataset_spec(str(d)).skipped == 2  # type inferred from the layout
    m = _write_jsonl(tmp_path / "m.jsonl", [{"problem": "p", "answer": "1"}])
    assert load_dataset_spec({"type": "math", "path": str(m)})[0].answer == "1"
    j = load_dataset_spec(
        {"type": "jsonl", "path": str(g), "prompt_field": "question", "answer_field": "answer"}
    )
    assert len(j) == 10
    ar = load_dataset_spec({"type": "synthetic_arith", "n": 5, "digits": 3, "seed": 2})
    assert len(ar) == 5 and ar[0].task == "math"
    sq = load_dataset_spec(
        {"type": "synthetic_sql", "path": str(tmp_path / "syn"), "n": 4, "seed": 1, "limit": 2}
    )
    assert len(sq) == 2 and sq[0].task == "sql"
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['bogus'\]"):
        load_dataset_spec({"type": "gsm8k", "path": str(g), "bogus": 1})
    with pytest.raises(ValueError, match="unknown dataset type"):
        load_dataset_spec({"type": "csv", "path": str(g)})
    with pytest.raises(ValueError, match="needs 'path'"):
        load_dataset_spec({"type": "gsm8k"})


# ----------------------------------------------------------------------------------------------------
# Synthetic tasks


def test_synthetic_arithmetic():
    import random

    a = make_arithmetic(30, digits=3, operands=4, ops="+-*/", seed=5)
    b = make_arithmetic(30, digits=3, operands=4, ops="+-*/", seed=5)
    assert [e.to_dict() for e in a] == [e.to_dict() for e in b]
    assert [e.answer for e in make_arithmetic(30, digits=3, operands=4, ops="+-*/", seed=6)] != [
        e.answer for e in a
    ]
    for e in a:
        expr = e.meta["expr"]
        nums = [t for t in expr.split() if t.isdigit()]
        assert len(nums) == 4 and all(len(t) == 3 for t in nums)
        assert eval(expr) == int(e.answer)  # exact divisions: true division gives the integer
        assert get_reward(e.task)(f"\\boxed{{{e.answer}}}", e) == 1.0
    rng = random.Random(0)
    expr, val = arithmetic_problem(rng, digits=1, operands=1)
    assert expr == str(val)
    with pytest.raises(ValueError):
        arithmetic_problem(rng, ops=["^"])


def test_synthetic_sql(tmp_path):
    exs = make_sql_tasks(tmp_path, 12, seed=3)
    assert len(exs) == 12 and len({e.meta["question"] for e in exs}) == 12
    again = make_sql_tasks(tmp_path, 12, seed=3)
    assert [e.gold_sql for e in again] == [e.gold_sql for e in exs]
    assert build_sql_db(tmp_path, seed=3) == Path(exs[0].db_path)
    res = score_batch(get_reward("sql"), [f"```sql\n{e.gold_sql}\n```" for e in exs], exs)
    assert res.scores == [1.0] * 12 and res.failures == 0
    wrong = score_batch(get_reward("sql"), ["SELECT 12345"] * 12, exs)
    assert wrong.scores == [0.0] * 12
    assert isinstance(exs[0], Example) and "CREATE TABLE customers" in exs[0].prompt[0]["content"]


# ----------------------------------------------------------------------------------------------------
# Real data


def test_real_data_loaders():
    sp = load_spider(require_shared("spider"))
    assert len(sp) == 972 and sp.skipped == 62
    g = load_gsm8k(require_shared("gsm8k", "test.jsonl"))
    assert len(g) == 1319 and all(e.answer.lstrip("-").replace(".", "").isdigit() for e in g)
    m = load_math(require_shared("math500", "test.jsonl"))
    assert len(m) == 500 and m[0].meta["unique_id"] == m[0].id


# ----------------------------------------------------------------------------------------------------
# Input errors: encoding, empty data, spec checks before reading


def test_invalid_utf8_names_file_and_line(tmp_path):
    p = tmp_path / "latin1.jsonl"
    p.write_bytes(b'{"question": "ok", "answer": "#### 1"}\n\n{"question": "caf\xe9", "answer": "#### 2"}\n')
    for load in (load_gsm8k, lambda q: load_jsonl(q, prompt_field="question")):
        with pytest.raises(
            ValueError, match=r"latin1\.jsonl, line 3: invalid UTF-8 \(byte 0xe9 at column 18\)"
        ):
            load(p)
    d = _spider_dir(tmp_path)
    (d / "dev.json").write_bytes(b'[\n  {"db_id": "zoo",\n   "question": "\xff"}\n]')
    with pytest.raises(ValueError, match=r"dev\.json, line 3: invalid UTF-8"):
        load_spider(d)
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"question": "q", "answer": "#### 5"}\n')
    assert load_gsm8k(bom)[0].answer == "5"  # a leading byte-order mark is tolerated


def test_empty_dataset_is_a_clear_error(tmp_path):
    empty = _write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    assert load_gsm8k(empty) == []  # the loader itself returns what there is
    with pytest.raises(ValueError, match=r"gave no examples: .*empty\.jsonl has no data rows"):
        load_dataset_spec({"type": "gsm8k", "path": str(empty)})
    d = _spider_dir(tmp_path)
    (d / "dev.json").write_text(json.dumps([{"db_id": "gone", "question": "q", "query": "SELECT 1"}]))
    with pytest.raises(
        ValueError, match=r"gave no examples: all 1 were skipped \(missing database gone: 1\)"
    ):
        load_dataset_spec({"type": "spider", "path": str(d)})
    with pytest.raises(ValueError, match="gave no examples"):
        load_dataset_spec({"type": "synthetic_arith", "n": 0})


def test_spec_check_reads_no_data_and_suggests(tmp_path):
    absent = str(tmp_path / "absent.jsonl")
    check_dataset_spec({"type": "gsm8k", "path": absent, "limit": 3})  # keys only: the file is not opened
    check_dataset_spec({"type": "gsm8k"})  # a partial spec: 'path' is required when loading
    with pytest.raises(ValueError, match="needs 'path'"):
        load_dataset_spec({"type": "gsm8k"})
    with pytest.raises(
        DatasetSpecError, match=r"unknown option\(s\) \['limt'\].*Did you mean 'limit'\?"
    ) as e:
        check_dataset_spec({"type": "gsm8k", "path": absent, "limt": 3})
    assert e.value.key == "limt"
    with pytest.raises(DatasetSpecError, match=r"Did you mean 'path'\?"):
        check_dataset_spec({"type": "jsonl", "file": absent})
    # type not known: any loader's keys
    with pytest.raises(DatasetSpecError, match="no loader takes them") as e:
        check_dataset_spec({"path": str(tmp_path / "absent_dir"), "promt_field": "q"})
    assert e.value.key == "promt_field"
    for bad, key in (({"limit": 0}, "limit"), ({"limit": "5"}, "limit"), ({"seed": 1.5}, "seed"),
                     ({"type": "gsm8"}, "type"), ({"type": "synthetic_arith", "path": absent}, "path")):
        with pytest.raises(DatasetSpecError) as e:
            check_dataset_spec({"type": "gsm8k", "path": absent, **bad})
        assert e.value.key == key
    _, params = dataset_loader("synthetic_arith")
    assert "digits" in params and "n" in params
