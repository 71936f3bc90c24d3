"""Verifiable rewards: math, SQL, synthetic tasks, and user functions, behind one registry."""

from dphrl.rewards.registry import BatchScores, RewardFn, get_reward, register_reward, score_batch

__all__ = ["BatchScores", "RewardFn", "get_reward", "register_reward", "score_batch"]
