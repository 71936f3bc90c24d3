"""Prompt templates: chat messages for math problems and text-to-SQL questions.

The SQL prompt shows the schema as the database's own ``CREATE TABLE`` statements (from
``sqlite_master``) followed by a few example rows per table, then the question, and asks for a
single fenced ```sql block (what :func:`dphrl.rewards.sql.extract_sql` reads back).
"""

from __future__ import annotations

import os
import sqlite3
from functools import lru_cache
from urllib.parse import quote

MATH_INSTRUCTION = (
    "Solve the problem step by step. Put the final answer in \\boxed{}, "
    "e.g. \\boxed{42}, with nothing else inside the box."
)
SQL_INSTRUCTION = (
    "Write one SQLite query that answers the question. Think briefly if needed, then answer with a "
    "single ```sql code block containing only the query."
)


def _messages(user: str, system: str | None) -> list[dict[str, str]]:
    msgs = [{"role": "system", "content": system}] if system else []
    msgs.append({"role": "user", "content": user})
    return msgs


def math_messages(
    problem: str, *, instruction: str = MATH_INSTRUCTION, system: str | None = None
) -> list[dict[str, str]]:
    """Chat messages for a math problem: the problem followed by the step-by-step/``\\boxed{}``
    instruction."""
    return _messages(f"{problem.strip()}\n\n{instruction}", system)


def _fmt_value(v: object, max_chars: int) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, bytes):
        return f"<{len(v)} bytes>"
    s = str(v).replace("\n", " ")
    return s if len(s) <= max_chars else s[: max_chars - 3] + "..."


@lru_cache(maxsize=256)
def _schema_cached(db_path: str, mtime: float, sample_rows: int, max_value_chars: int) -> str:
    conn = sqlite3.connect(f"file:{quote(db_path)}?mode=ro&immutable=1", uri=True)
    conn.text_factory = lambda b: b.decode("utf-8", errors="replace")
    try:
        tables = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' "
            "AND sql IS NOT NULL ORDER BY rowid"
        ).fetchall()
        parts = []
        for name, ddl in tables:
            block = ddl.strip().rstrip(";") + ";"
            if sample_rows > 0:
                qname = '"' + name.replace('"', '""') + '"'
                cur = conn.execute(f"SELECT * FROM {qname} LIMIT {int(sample_rows)}")
                cols = [d[0] for d in cur.description]
                rows = cur.fetchall()
                if rows:
                    lines = [" | ".join(cols)] + [
                        " | ".join(_fmt_value(v, max_value_chars) for v in r) for r in rows
                    ]
                    block += (
                        f"\n/*\n{len(rows)} example row{'s' if len(rows) > 1 else ''} from {name}:\n"
                        + "\n".join(lines) + "\n*/"
                    )
            parts.append(block)
        return "\n\n".join(parts)
    finally:
        conn.close()


def sql_schema(db_path: str | os.PathLike, *, sample_rows: int = 3, max_value_chars: int = 60) -> str:
    """The schema of a SQLite database as ``CREATE TABLE`` statements plus ``sample_rows`` example rows
    per table (cached per database file)."""
    path = os.path.abspath(db_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SQLite database not found: {path}")
    return _schema_cached(path, os.path.getmtime(path), sample_rows, max_value_chars)


def sql_messages(
    question: str,
    db_path: str | os.PathLike,
    *,
    evidence: str | None = None,
    sample_rows: int = 3,
    instruction: str = SQL_INSTRUCTION,
    system: str | None = None,
) -> list[dict[str, str]]:
    """Chat messages for a text-to-SQL question: schema (+ example rows), question, optional
    evidence (BIRD's external knowledge), and the single-```sql-block instruction."""
    schema = sql_schema(db_path, sample_rows=sample_rows)
    text = f"Database schema (SQLite):\n\n{schema}\n\nQuestion: {question.strip()}"
    if evidence and evidence.strip():
        text += f"\nExternal knowledge: {evidence.strip()}"
    return _messages(f"{text}\n\n{instruction}", system)
