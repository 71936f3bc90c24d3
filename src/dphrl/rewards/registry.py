"""Reward registry: names (or ``module:function``) -> ``fn(response, example) -> float``.

Also :func:`score_batch`, which scores many responses with a time-out per item, in-process or in a
pool of killable worker processes, and counts every failure and time-out.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from dphrl.data.example import Example
from dphrl.registry import Registry

log = logging.getLogger(__name__)

RewardFn = Callable[[str, Example], float]

#: Rewards by config name (config key ``reward``); built-ins register themselves on first lookup.
REWARDS: Registry[RewardFn] = Registry(
    "reward", config_key="reward", builtin_modules=("dphrl.rewards.math", "dphrl.rewards.sql", "dphrl.tasks.styles")
)

#: A response is *correct* when its reward is >= this: the one definition used by training metrics
#: (``reward/pass_rate``), presample's D_pef split and stored samples, and evaluation (Pass@k). Full
#: credit: partial-credit rewards (e.g. SQL ``partial_credit``) never count as solved, and 0/1 and
#: -1/+1 rewards both work.
CORRECT_THRESHOLD = 1.0


def register_reward(name: str, fn: RewardFn | None = None, *, overwrite: bool = False) -> Any:
    """Register ``fn(response, example) -> float`` under ``name``; usable as a decorator."""
    return REWARDS.register(name, fn, overwrite=overwrite)


def get_reward(spec: str) -> RewardFn:
    """Look up a reward by registered name or ``package.module:function``."""
    fn = REWARDS.get(spec)
    if not callable(fn):
        raise ValueError(f"reward {spec!r} is not callable")
    return fn


def list_rewards() -> list[str]:
    """Names of all registered rewards (built-ins included)."""
    return REWARDS.names()


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
