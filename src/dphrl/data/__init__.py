"""Datasets: one common example record, loaders, prompt templates, synthetic tasks.

Only standard-library modules load here (reward worker processes import ``dphrl.data`` too);
``dphrl.data.chat`` and ``dphrl.data.tokenizer`` (transformers) and ``dphrl.data.sampler`` (torch) are
imported explicitly. Dataset types are :data:`dphrl.tasks.TASKS` entries.
"""

from __future__ import annotations

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
    "load_examples",
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


def load_examples(spec: dict) -> list[Example]:
    """Build the training examples from a dataset spec (``type`` picks the loader)."""
    if not spec:
        raise ValueError("config key 'dataset' is empty: give a spec such as {type: gsm8k, path: ...}")
    from dphrl.config import ConfigError  # lazily: data loads only standard-library modules

    try:
        examples = load_dataset_spec(spec)
    except (ValueError, FileNotFoundError) as e:  # a data problem is a config problem: no traceback
        raise ConfigError(f"config key 'dataset' {spec}: {e}") from e
    if not examples:
        raise ConfigError(f"config key 'dataset' {spec} gave no examples; check its path and filters")
    return examples
