"""Reward registry: names (or ``module:function``) -> ``fn(response, example) -> float``.

Also :func:`score_batch`, which scores many responses with a time-out per item, in-process or in a
pool of killable worker processes, and counts every failure and time-out.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from dphrl.data.example import Example

log = logging.getLogger(__name__)

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


def list_rewards() -> list[str]:
    """Names of all registered rewards (built-ins included)."""
    _load_builtins()
    return sorted(_REWARDS)


def _load_builtins() -> None:
    """Import the built-in reward modules so they register themselves."""
    for mod in ("dphrl.rewards.math", "dphrl.rewards.sql", "dphrl.tasks.styles"):
        try:
            importlib.import_module(mod)
        except ImportError as e:
            if e.name is None or not mod.startswith(e.name):  # a broken module, not a missing one
                log.warning("built-in reward module %s failed to import: %s", mod, e)


@dataclass
class BatchScores:
    """Scores of a batch; failed or timed-out items score 0 and are counted here."""

    scores: list[float]
    failures: int = 0  # reward function raised (or its worker crashed)
    timeouts: int = 0  # reward function exceeded its time-out
    errors: dict[int, str] = field(default_factory=dict)  # item index -> message, for failed/timed-out items

    @property
    def mean(self) -> float:
        return sum(self.scores) / len(self.scores) if self.scores else 0.0


def _as_score(x: object) -> float:
    v = float(x)  # type: ignore[arg-type]
    if not math.isfinite(v):
        raise ValueError(f"reward returned a non-finite value {v!r}")
    return v


def score_batch(
    fn: RewardFn, responses: list[str], examples: list[Example], *, timeout_s: float = 10.0, num_workers: int = 0
) -> BatchScores:
    """Score many responses; a failing item scores 0 and is counted, never silently.

    ``num_workers == 0``: in-process, one item after another; in the main thread each item is bounded
    by ``timeout_s`` (SIGALRM), elsewhere it runs unbounded (the reward's own time-outs still apply).
    ``num_workers > 0``: a persistent pool of worker processes (see :mod:`dphrl.rewards.sandbox`);
    each item gets ``timeout_s`` of wall-clock time, after which its worker is killed and replaced.
    ``fn`` must then be importable by reference (a registered reward or a module-level function).
    """
    from dphrl.rewards.sandbox import get_pool, time_limit

    if len(responses) != len(examples):
        raise ValueError(f"score_batch: {len(responses)} responses but {len(examples)} examples")
    out = BatchScores([0.0] * len(responses))
    if num_workers > 0 and responses:
        outcomes = get_pool(num_workers).map(fn, list(zip(responses, examples)), timeout_s)
        for i, o in enumerate(outcomes):
            if o.status == "ok":
                try:
                    out.scores[i] = _as_score(o.value)
                    continue
                except (TypeError, ValueError) as e:
                    o.error = f"bad reward value: {e}"
            if o.status == "timeout":
                out.timeouts += 1
            else:
                out.failures += 1
            out.errors[i] = o.error or o.status
    else:
        for i, (r, ex) in enumerate(zip(responses, examples)):
            try:
                with time_limit(timeout_s):
                    out.scores[i] = _as_score(fn(r, ex))
            except TimeoutError as e:
                out.timeouts += 1
                out.errors[i] = str(e)
            except Exception as e:
                out.failures += 1
                out.errors[i] = f"{type(e).__name__}: {e}"[:2000]
    if out.failures or out.timeouts:
        log.warning(
            "score_batch(%s): %d of %d items failed, %d timed out (scored 0); first: %s",
            getattr(fn, "__name__", fn), out.failures, len(responses), out.timeouts,
            next(iter(out.errors.values())),
        )
    return out
