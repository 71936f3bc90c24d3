"""Outcome-reward advantages (GRPO, Dr. GRPO, RLOO) and DAPO reward shaping / filtering.

Rewards are one scalar per response, shape (B,), with ``B = G * group_size`` and each prompt's
``group_size`` responses contiguous (rows ``g*n .. g*n + n - 1``). Every advantage function returns
``(advantages (B,), metrics)``; the registry ``ADVANTAGES`` maps config names to them
(``@ADVANTAGES.register("name")`` adds one). Groups whose rewards are all
equal carry no learning signal and get exactly 0 advantage.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from dphrl.registry import Registry

__all__ = [
    "ADVANTAGES",
    "compute_advantages",
    "dynamic_sampling_mask",
    "grpo_advantages",
    "grpo_no_std_advantages",
    "overlong_penalty",
    "rloo_advantages",
]


def _grouped(rewards: Tensor, group_size: int) -> Tensor:
    """(B,) -> (G, group_size) in a floating dtype (float64 kept, else float32)."""
    if rewards.dim() != 1:
        raise ValueError(f"rewards must have shape (B,), got {tuple(rewards.shape)}")
    if group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size} must be >= 1 and divide the batch size {rewards.numel()}")
    dt = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    return rewards.detach().to(dt).reshape(-1, group_size)  # (G, n)


def _all_equal(grouped: Tensor) -> Tensor:
    """(G, n) -> (G,) True where every reward of the group is identical."""
    return grouped.amax(-1) == grouped.amin(-1)  # (G,)


def _metrics(adv: Tensor, zero_group: Tensor) -> dict[str, float]:
    return {
        "adv/mean": adv.mean().item(),
        "adv/std": adv.std(correction=0).item(),
        "adv/zero_std_frac": zero_group.float().mean().item(),
    }


ADVANTAGES: Registry[Callable[..., tuple[Tensor, dict[str, float]]]] = Registry(
    "advantage estimator", config_key="advantage"
)


@ADVANTAGES.register("grpo")
def grpo_advantages(
    rewards: Tensor, group_size: int, *, std_normalize: bool = True, eps: float = 1e-6
) -> tuple[Tensor, dict[str, float]]:
    """GRPO: ``(r - mean_g) / (std_g + eps)``; without std (Dr. GRPO) ``r - mean_g``.

    ``std_g`` is the unbiased sample std (``torch.std`` default, as in verl). Metrics: ``adv/mean``,
    ``adv/std`` (population std over the batch), ``adv/zero_std_frac`` (fraction of all-equal groups).
    """
    r = _grouped(rewards, group_size)  # (G, n)
    zero = _all_equal(r)  # (G,)
    adv = r - r.mean(-1, keepdim=True)  # (G, n)
    if std_normalize and group_size > 1:
        adv = adv / (r.std(-1, keepdim=True) + eps)  # (G, n)
    adv = torch.where(zero.unsqueeze(-1), torch.zeros_like(adv), adv)  # (G, n) exactly 0, not rounding noise
    adv = adv.reshape(-1)  # (B,)
    return adv, _metrics(adv, zero)


@ADVANTAGES.register("grpo_no_std")
def grpo_no_std_advantages(
    rewards: Tensor, group_size: int, *, eps: float = 1e-6
) -> tuple[Tensor, dict[str, float]]:
    """Dr. GRPO: ``r - mean_g`` (no std normalisation, no difficulty bias)."""
    return grpo_advantages(rewards, group_size, std_normalize=False, eps=eps)


@ADVANTAGES.register("rloo")
def rloo_advantages(rewards: Tensor, group_size: int) -> tuple[Tensor, dict[str, float]]:
    """RLOO: ``r_i - mean of the other responses of the group`` (= n/(n-1) (r_i - mean_g))."""
    if group_size < 2:
        raise ValueError(f"rloo needs group_size >= 2, got {group_size}")
    r = _grouped(rewards, group_size)  # (G, n)
    zero = _all_equal(r)  # (G,)
    loo_mean = (r.sum(-1, keepdim=True) - r) / (group_size - 1)  # (G, n)
    adv = torch.where(zero.unsqueeze(-1), torch.zeros_like(r), r - loo_mean).reshape(-1)  # (B,)
    return adv, _metrics(adv, zero)


def compute_advantages(name: str, rewards: Tensor, group_size: int, **kw) -> tuple[Tensor, dict[str, float]]:
    """Dispatch to the advantage estimator registered as ``name`` (or ``package.module:fn``)."""
    return ADVANTAGES.get(name)(rewards, group_size, **kw)


def overlong_penalty(lengths: Tensor, max_len: int, buffer_len: int, penalty: float = 1.0) -> Tensor:
    """DAPO soft overlong punishment, added to the reward.

    0 for ``len <= max_len - buffer_len``, then linear down to ``-penalty`` at ``max_len``, ``-penalty``
    beyond. ``buffer_len = 0`` gives a hard ``-penalty`` for ``len > max_len``.
    """
    if not 0 <= buffer_len <= max_len:
        raise ValueError(f"need 0 <= buffer_len <= max_len, got buffer_len={buffer_len}, max_len={max_len}")
    lengths = torch.as_tensor(lengths)
    dt = torch.float64 if lengths.dtype == torch.float64 else torch.float32
    lens = lengths.to(dt)  # (B,)
    if buffer_len == 0:
        return torch.where(lens > max_len, -penalty, 0.0).to(dt)  # (B,)
    exceed = (lens - (max_len - buffer_len)).clamp(min=0.0, max=float(buffer_len))  # (B,)
    return -penalty * exceed / buffer_len  # (B,)


def dynamic_sampling_mask(rewards: Tensor, group_size: int) -> Tensor:
    """DAPO dynamic sampling: (G,) bool, True for groups whose rewards are not all equal (keep them)."""
    return ~_all_equal(_grouped(rewards, group_size))  # (G,)
