"""Verifiable rewards: math, SQL, synthetic tasks, and user functions, behind one registry.

Built-in names: ``math``/``gsm8k`` (:mod:`dphrl.rewards.math`), ``sql``/``spider`` and ``bird``
(:mod:`dphrl.rewards.sql`); ``package.module:function`` names any other function
``fn(response, example) -> float``. :func:`score_batch` scores many responses with per-item time-outs
(optionally in a pool of killable worker processes) and counts failures and time-outs.
"""

from dphrl.rewards.registry import (
    BatchScores,
    RewardFn,
    get_reward,
    list_rewards,
    register_reward,
    score_batch,
)
from dphrl.rewards.sandbox import shutdown_pools

__all__ = [
    "BatchScores",
    "RewardFn",
    "get_reward",
    "list_rewards",
    "register_reward",
    "score_batch",
    "shutdown_pools",
]
