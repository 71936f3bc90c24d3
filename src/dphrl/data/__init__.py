"""Datasets: one common example record, loaders, prompt templates, synthetic tasks.

Only standard-library modules load here (reward worker processes import ``dphrl.data`` too);
``dphrl.data.chat`` and ``dphrl.data.tokenizer`` (transformers) are imported explicitly.
"""

from dphrl.data.example import Example
from dphrl.data.loaders import (
    Examples,
    load_bird,
    load_dataset_spec,
    load_gsm8k,
    load_hf,
    load_jsonl,
    load_math,
    load_parquet,
    load_spider,
)
from dphrl.data.synthetic import build_sql_db, make_arithmetic, make_sql_tasks
from dphrl.data.templates import math_messages, sql_messages, sql_schema

__all__ = [
    "Example",
    "Examples",
    "build_sql_db",
    "load_bird",
    "load_dataset_spec",
    "load_gsm8k",
    "load_hf",
    "load_jsonl",
    "load_math",
    "load_parquet",
    "load_spider",
    "make_arithmetic",
    "make_sql_tasks",
    "math_messages",
    "sql_messages",
    "sql_schema",
]
