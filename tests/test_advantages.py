"""Group advantages (GRPO, Dr. GRPO, RLOO), DAPO overlong penalty and dynamic-sampling mask.

pass@k, PKPO and W-REINFORCE: tests/test_advantages_passk.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from dphrl import advantages as A

# two groups of 4: a mixed group and an all-correct group
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def test_grpo_hand_values():
    adv, m = A.grpo_advantages(REWARDS, 4)
    std = math.sqrt((4 * 0.25) / 3)  # unbiased std of [1, 0, 0, 1]
    a = 0.5 / (std + 1e-6)
    torch.testing.assert_close(adv, torch.tensor([a, -a, -a, a, 0.0, 0.0, 0.0, 0.0]))
    assert adv[:4].abs().max().item() == pytest.approx(math.sqrt(3) / 2, rel=1e-5)
    assert m["adv/zero_std_frac"] == pytest.approx(0.5)
    assert m["adv/mean"] == pytest.approx(0.0, abs=1e-7)
    assert m["adv/std"] == pytest.approx(adv.std(correction=0).item())


def test_grpo_no_std_and_registry():
    adv, _ = A.compute_advantages("grpo_no_std", REWARDS, 4)
    torch.testing.assert_close(adv, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))
    adv2, _ = A.grpo_advantages(REWARDS, 4, std_normalize=False)
    torch.testing.assert_close(adv, adv2)
    adv3, _ = A.compute_advantages("grpo", REWARDS, 4, eps=0.0)
    assert adv3[0].item() == pytest.approx(math.sqrt(3) / 2)


# keyword arguments some estimators need for a group of 3 (their default k is 4)
SMALL_GROUP_KW = {"passk": {"k": 2}, "pkpo": {"k": 2}}


def test_all_equal_groups_get_exactly_zero():
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7, 0.7])  # mean of 0.1s is not exactly 0.1 in float
    for name in A.ADVANTAGES:
        adv, m = A.compute_advantages(name, r, 3, **SMALL_GROUP_KW.get(name, {}))
        assert m["adv/zero_std_frac"] == 1.0
        if name == "w_reinforce":  # no baseline by design: every response is incorrect here -> -1
            assert torch.equal(adv, -torch.ones(6))
            continue
        assert torch.equal(adv, torch.zeros(6)), name
    adv, _ = A.grpo_advantages(torch.tensor([1.0, 0.0, 1.0]), 1)  # group_size 1: every group is all-equal
    assert torch.equal(adv, torch.zeros(3))


def test_grpo_graded_rewards_and_dtypes():
    r = torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64)
    adv, _ = A.grpo_advantages(r, 3, eps=0.0)
    torch.testing.assert_close(adv, torch.tensor([-1.0, 0.0, 1.0], dtype=torch.float64))  # std = 0.5
    adv_int, _ = A.grpo_advantages(torch.tensor([1, 0, 0, 1]), 4)  # integer rewards accepted
    assert adv_int.dtype == torch.float32


def test_rloo():
    adv, m = A.compute_advantages("rloo", REWARDS, 4)
    torch.testing.assert_close(adv, torch.tensor([2 / 3, -2 / 3, -2 / 3, 2 / 3, 0, 0, 0, 0]))
    r = torch.tensor([3.0, 1.0, 2.0])
    adv, _ = A.rloo_advantages(r, 3)
    torch.testing.assert_close(adv, torch.tensor([3 - 1.5, 1 - 2.5, 2 - 2.0]))
    with pytest.raises(ValueError, match="group_size"):
        A.rloo_advantages(r, 1)


def test_inputs_not_modified():
    r = REWARDS.clone()
    for name in A.ADVANTAGES:
        A.compute_advantages(name, r, 4)
    assert torch.equal(r, REWARDS)


def test_overlong_penalty():
    lengths = torch.tensor([50, 80, 81, 90, 100, 120])
    out = A.overlong_penalty(lengths, max_len=100, buffer_len=20)
    torch.testing.assert_close(out, torch.tensor([0.0, 0.0, -0.05, -0.5, -1.0, -1.0]))
    out2 = A.overlong_penalty(lengths, max_len=100, buffer_len=20, penalty=2.0)
    torch.testing.assert_close(out2, 2 * out)
    hard = A.overlong_penalty(torch.tensor([100, 101]), max_len=100, buffer_len=0)
    torch.testing.assert_close(hard, torch.tensor([0.0, -1.0]))
    with pytest.raises(ValueError, match="buffer_len"):
        A.overlong_penalty(lengths, max_len=10, buffer_len=20)


def test_dynamic_sampling_mask():
    r = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.25])
    mask = A.dynamic_sampling_mask(r, 3)
    assert mask.dtype == torch.bool
    assert mask.tolist() == [True, False, True]


def test_bad_shapes_and_unknown_names():
    with pytest.raises(ValueError, match="grpo_no_std"):
        A.compute_advantages("ppo", REWARDS, 4)
    with pytest.raises(ValueError, match="divide"):
        A.grpo_advantages(REWARDS, 3)
    with pytest.raises(ValueError, match="shape"):
        A.grpo_advantages(REWARDS.reshape(2, 4), 4)
