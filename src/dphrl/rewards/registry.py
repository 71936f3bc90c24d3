"""Reward registry: names (or ``module:function``) -> ``fn(response, example) -> float``."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

from dphrl.data.example import Example

RewardFn = Callable[[str, Example], float]
_REWARDS: dict[str, RewardFn] = {}


def register_reward(name: str, fn: RewardFn | None = None):
    """Register ``fn`` under ``name``; usable as a decorator."""

    def deco(f: RewardFn) -> RewardFn:
        _REWARDS[name] = f
        return f

    return deco(fn) if fn is not None else deco


def get_reward(spec: str) -> RewardFn:
    """Look up a reward by registered name or ``package.module:function``."""
    if ":" in spec:
        mod, _, attr = spec.partition(":")
        try:
            return getattr(importlib.import_module(mod), attr)
        except (ImportError, AttributeError) as e:
            raise ValueError(f"reward {spec!r}: cannot import {attr!r} from module {mod!r} ({e})") from e
    _load_builtins()
    if spec not in _REWARDS:
        raise ValueError(f"unknown reward {spec!r}; valid names: {sorted(_REWARDS)} or 'module:function'")
    return _REWARDS[spec]


def _load_builtins() -> None:
    """Import the built-in reward modules so they register themselves."""
    for mod in ("dphrl.rewards.math", "dphrl.rewards.sql", "dphrl.tasks.styles"):
        try:
            importlib.import_module(mod)
        except ImportError:
            pass


@dataclass
class BatchScores:
    scores: list[float]
    failures: int = 0  # reward function raised
    timeouts: int = 0  # reward function exceeded its time-out


def score_batch(
    fn: RewardFn, responses: list[str], examples: list[Example], *, timeout_s: float = 10.0, num_workers: int = 0
) -> BatchScores:
    """Score many responses; a failing item scores 0 and is counted, never silently."""
    scores, failures = [], 0
    for r, ex in zip(responses, examples, strict=True):
        try:
            scores.append(float(fn(r, ex)))
        except Exception:
            scores.append(0.0)
            failures += 1
    return BatchScores(scores, failures, 0)
