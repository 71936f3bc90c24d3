"""The one example record every loader produces and every reward function consumes."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Example:
    """A training or evaluation problem.

    ``prompt`` is a list of chat messages (``{"role": ..., "content": ...}``); it is turned into
    token ids with the model's chat template. ``answer`` is the reference answer (math, synthetic
    tasks); ``gold_sql``/``db_path`` are set for SQL tasks. ``task`` names the reward to use when
    the config does not override it. ``meta`` holds anything else (source file and line, level...).
    """

    id: str
    prompt: list[dict[str, str]]
    answer: str | None = None
    gold_sql: str | None = None
    db_path: str | None = None
    task: str = "math"
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Example:
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})
