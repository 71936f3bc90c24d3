"""Synthetic tasks with known answers: seeded arithmetic (task ``math``) and a small SQLite shop
database with templated questions and gold SQL (task ``sql``). Everything is deterministic in the seed."""

from __future__ import annotations

import os
import random
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import quote

from dphrl.data.example import Example
from dphrl.data.templates import math_messages, sql_messages

OPS = ("+", "-", "*", "/")


def _operand(rng: random.Random, digits: int) -> int:
    lo = 1 if digits == 1 else 10 ** (digits - 1)
    return rng.randint(lo, 10**digits - 1)


def _divisor(rng: random.Random, value: int, digits: int) -> int | None:
    """A divisor of ``value`` (> 1) with ``digits`` digits, or None."""
    lo, hi = max(2, 1 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    v = abs(value)
    if v == 0:
        return rng.randint(lo, hi) if lo <= hi else None
    if hi - lo <= 10_000:
        cands = [d for d in range(lo, hi + 1) if v % d == 0]
    else:
        cands = [d for d in (rng.randint(lo, hi) for _ in range(200)) if v % d == 0]
    return rng.choice(cands) if cands else None


def arithmetic_problem(
    rng: random.Random, *, digits: int = 2, operands: int = 2, ops: Sequence[str] = ("+", "-", "*")
) -> tuple[str, int]:
    """One expression ``a op b op c ...`` and its integer value (usual precedence).

    Difficulty: ``digits`` per operand, number of ``operands``, and the operation set ``ops``
    (subset of ``+ - * /``). Divisions are always exact: the divisor is drawn among divisors of the
    running product (falling back to ``*`` when there is none).
    """
    if digits < 1 or operands < 1:
        raise ValueError("digits and operands must be >= 1")
    bad = [o for o in ops if o not in OPS]
    if bad or not ops:
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {list(ops)}")
    # A sum of terms; each term is a chain of * and / evaluated left to right.
    terms: list[tuple[str, int]] = []  # (sign, term value)
    text = []
    term_value = _operand(rng, digits)
    text.append(str(term_value))
    sign = "+"
    for _ in range(operands - 1):
        op = rng.choice(list(ops))
        if op == "/":
            d = _divisor(rng, term_value, digits)
            if d is None:
                op = "*" if "*" in ops or len(ops) == 1 else rng.choice([o for o in ops if o != "/"])
        if op in "+-":
            terms.append((sign, term_value))
            sign = op
            term_value = _operand(rng, digits)
            text += [op, str(term_value)]
        elif op == "*":
            x = _operand(rng, digits)
            term_value *= x
            text += ["*", str(x)]
        else:
            term_value //= d  # type: ignore[operator]  # exact by construction
            text += ["/", str(d)]
    terms.append((sign, term_value))
    value = sum(v if s == "+" else -v for s, v in terms)
    return " ".join(text), value


def make_arithmetic(
    n: int = 100,
    *,
    digits: int = 2,
    operands: int = 2,
    ops: Sequence[str] = ("+", "-", "*"),
    seed: int = 0,
    system: str | None = None,
) -> list[Example]:
    """``n`` arithmetic problems as math examples (answer = the integer value), deterministic in ``seed``."""
    rng = random.Random(f"arith-{seed}-{digits}-{operands}-{''.join(ops)}")
    out = []
    for i in range(n):
        expr, value = arithmetic_problem(rng, digits=digits, operands=operands, ops=ops)
        shown = expr.replace("*", "×").replace("/", "÷")
        out.append(
            Example(
                id=f"arith-s{seed}-d{digits}-k{operands}-{i}",
                prompt=math_messages(f"Compute {shown}.", system=system),
                answer=str(value),
                task="math",
                meta={
                    "source": "synthetic_arith",
                    "line": i,
                    "expr": expr,
                    "digits": digits,
                    "operands": operands,
                    "ops": "".join(ops),
                    "seed": seed,
                },
            )
        )
    return out


# ----------------------------------------------------------------------------------------------------
# Synthetic SQL

_CITIES = ["Lisbon", "Oslo", "Lima", "Kyoto", "Accra", "Perth", "Quito", "Tunis"]
_FIRST = [
    "Ana",
    "Ben",
    "Chen",
    "Dara",
    "Eli",
    "Fay",
    "Gus",
    "Hana",
    "Ivo",
    "Jin",
    "Kai",
    "Lea",
    "Mo",
    "Nia",
    "Oto",
    "Pia",
]
_LAST = ["Silva", "Berg", "Wong", "Okafor", "Novak", "Diaz", "Sato", "Haddad", "Moreau", "Kim"]
_CATEGORIES = ["books", "garden", "music", "toys", "kitchen"]
_PRODUCTS = [
    "lamp",
    "kettle",
    "guitar",
    "puzzle",
    "rake",
    "novel",
    "atlas",
    "drum",
    "spade",
    "blender",
    "kite",
    "violin",
]


def build_sql_db(directory: str | os.PathLike, *, seed: int = 0, n_customers: int = 40, n_products: int = 24,
                 n_orders: int = 150) -> Path:
    """Create (once) ``<directory>/synthetic_shop_<seed>.sqlite`` with customers, products and orders."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"synthetic_shop_{seed}.sqlite"
    if path.is_file():
        return path
    rng = random.Random(f"shop-{seed}")
    tmp = d / f".synthetic_shop_{seed}.{os.getpid()}.tmp"
    tmp.unlink(missing_ok=True)
    conn = sqlite3.connect(tmp)
    try:
        conn.executescript(
            """
            CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT NOT NULL, city TEXT NOT NULL, age INTEGER NOT NULL);
            CREATE TABLE products (id INTEGER PRIMARY KEY, name TEXT NOT NULL, category TEXT NOT NULL, price REAL NOT NULL);
            CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers(id),
                                 product_id INTEGER NOT NULL REFERENCES products(id), quantity INTEGER NOT NULL,
                                 order_date TEXT NOT NULL);
            """  # noqa: E501 - sqlite_master keeps this text and the prompts show it: not re-wrapped
        )
        names = rng.sample([f"{f} {ln}" for f in _FIRST for ln in _LAST], n_customers)
        conn.executemany(
            "INSERT INTO customers VALUES (?, ?, ?, ?)",
            [(i + 1, names[i], rng.choice(_CITIES), rng.randint(18, 80)) for i in range(n_customers)],
        )
        pnames = [f"{c} {p}" for c in _CATEGORIES for p in _PRODUCTS]
        chosen = rng.sample(pnames, n_products)
        conn.executemany(
            "INSERT INTO products VALUES (?, ?, ?, ?)",
            [(i + 1, nm, nm.split()[0], round(rng.uniform(2, 200), 2)) for i, nm in enumerate(chosen)],
        )
        conn.executemany(
            "INSERT INTO orders VALUES (?, ?, ?, ?, ?)",
            [(i + 1, rng.randint(1, n_customers), rng.randint(1, n_products), rng.randint(1, 5),
              f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}") for i in range(n_orders)],
        )
        conn.commit()
    finally:
        conn.close()
    os.replace(tmp, path)
    return path


def _q(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _templates(conn: sqlite3.Connection, rng: random.Random) -> list[tuple[str, str]]:
    """Candidate (question, gold SQL) pairs; ambiguous ones (ties under LIMIT 1) are left out."""
    city = rng.choice([r[0] for r in conn.execute("SELECT DISTINCT city FROM customers")])
    cat = rng.choice([r[0] for r in conn.execute("SELECT DISTINCT category FROM products")])
    cust = rng.choice([r[0] for r in conn.execute("SELECT name FROM customers")])
    prod = rng.choice([r[0] for r in conn.execute("SELECT name FROM products")])
    age = rng.randint(25, 70)
    month = rng.randint(1, 12)
    qs = [
        (f"How many customers live in {city}?", f"SELECT COUNT(*) FROM customers WHERE city = {_q(city)}"),
        (
            f"List the names of the products in the {cat} category.",
            f"SELECT name FROM products WHERE category = {_q(cat)}",
        ),
        (
            f"What is the average price of the products in the {cat} category?",
            f"SELECT AVG(price) FROM products WHERE category = {_q(cat)}",
        ),
        (
            f"How many orders did {cust} place?",
            "SELECT COUNT(*) FROM orders AS o JOIN customers AS c ON o.customer_id = c.id WHERE c.name = "
            f"{_q(cust)}",
        ),
        (
            f"List the names and ages of customers older than {age}, oldest first.",
            f"SELECT name, age FROM customers WHERE age > {age} ORDER BY age DESC, name ASC",
        ),
        (
            f"What is the total quantity ordered of the product '{prod}'?",
            f"SELECT COALESCE(SUM(o.quantity), 0) FROM orders AS o JOIN products AS p ON o.product_id = p.id "
            f"WHERE p.name = {_q(prod)}",
        ),
        ("How many distinct cities do the customers live in?", "SELECT COUNT(DISTINCT city) FROM customers"),
        (
            "For each city, how many customers live there?",
            "SELECT city, COUNT(*) FROM customers GROUP BY city",
        ),
        (
            f"How many orders were placed in month {month} of 2024?",
            f"SELECT COUNT(*) FROM orders WHERE order_date LIKE '2024-{month:02d}-%'",
        ),
        (
            "What is the name of the most expensive product?",
            "SELECT name FROM products ORDER BY price DESC LIMIT 1",
        ),
        (
            "Which customer placed the most orders? Give the name.",
            "SELECT c.name FROM customers AS c JOIN orders AS o ON o.customer_id = c.id GROUP BY c.id "
            "ORDER BY COUNT(*) DESC LIMIT 1",
        ),
        (
            f"List the names of customers from {city} who ordered something in the {cat} category.",
            f"SELECT DISTINCT c.name FROM customers AS c JOIN orders AS o ON o.customer_id = c.id "
            f"JOIN products AS p ON o.product_id = p.id WHERE c.city = {_q(city)} AND p.category = {_q(cat)}",
        ),
    ]
    tie_checks = {
        "What is the name of the most expensive product?": (
            "SELECT price FROM products ORDER BY price DESC LIMIT 2"
        ),
        "Which customer placed the most orders? Give the name.": (
            "SELECT COUNT(*) FROM orders GROUP BY customer_id ORDER BY COUNT(*) DESC LIMIT 2"
        ),
    }
    out = []
    for question, sql in qs:
        check = tie_checks.get(question)
        if check:
            top = [r[0] for r in conn.execute(check)]
            if len(top) == 2 and top[0] == top[1]:
                continue
        out.append((question, sql))
    return out


def make_sql_tasks(
    directory: str | os.PathLike,
    n: int = 50,
    *,
    seed: int = 0,
    sample_rows: int = 3,
    system: str | None = None,
) -> list[Example]:
    """``n`` text-to-SQL examples (task ``sql``) over a synthetic shop database built in ``directory``."""
    db = build_sql_db(directory, seed=seed)
    rng = random.Random(f"sqltasks-{seed}")
    out: list[Example] = []
    seen: set[str] = set()
    conn = sqlite3.connect(f"file:{quote(str(db))}?mode=ro", uri=True)
    try:
        attempts = 0
        while len(out) < n and attempts < 50 * max(n, 1):
            attempts += 1
            question, sql = rng.choice(_templates(conn, rng))
            if question in seen:
                continue
            seen.add(question)
            out.append(Example(
                id=f"synsql-s{seed}-{len(out)}",
                prompt=sql_messages(question, db, sample_rows=sample_rows, system=system),
                gold_sql=sql, db_path=str(db), task="sql",
                meta={"source": "synthetic_sql", "line": len(out), "question": question, "seed": seed},
            ))
    finally:
        conn.close()
    return out
