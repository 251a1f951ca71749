"""group_advantages / process_advantages on hand-worked cases."""

import math

import pytest
import torch

from fastgrpo import group_advantages, process_advantages

EPS = 1e-4


def test_hand_computed_groups_of_two_and_three():
    # group 0: [1, 0]      mean 0.5, unbiased std sqrt(0.5)       -> +-0.5 / (sqrt(.5) + eps)
    # group 1: [2.1, 0.1, 1.1]  mean 1.1, unbiased std sqrt((1 + 1 + 0) / 2) = 1 -> [1, -1, 0]/(1+eps)
    adv = group_advantages(torch.tensor([1.0, 0.0]), group_size=2)
    a = 0.5 / (math.sqrt(0.5) + EPS)
    torch.testing.assert_close(adv, torch.tensor([a, -a]))
    adv = group_advantages([2.1, 0.1, 1.1], group_size=3)
    torch.testing.assert_close(adv, torch.tensor([1.0, -1.0, 0.0]) / (1 + EPS), atol=1e-6,
                               rtol=1e-6)
    assert adv.dtype == torch.float32


def test_all_equal_group_and_group_of_one_give_exact_zero():
    # 0.1 * 3 / 3 != 0.1 in floating point: the result must still be exactly 0, never nan
    r = torch.tensor([0.1, 0.1, 0.1, 2.1, 2.1, 2.1, 5.0])
    adv = group_advantages(r, group_ids=[0, 0, 0, 1, 1, 1, 2])
    assert (adv == 0).all()
    adv = group_advantages(torch.tensor([3.0]), group_size=1)
    assert adv.tolist() == [0.0]


def test_group_ids_in_any_order_match_consecutive_groups():
    r = torch.randn(12, generator=torch.Generator().manual_seed(0))
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    gid = torch.arange(12) // 4
    a = group_advantages(r, group_size=4)
    b = group_advantages(r[perm], group_ids=gid[perm] * 7 + 3)  # arbitrary labels
    torch.testing.assert_close(b, a[perm])


def test_batch_and_none_scales():
    r = torch.tensor([1.0, 0.0, 3.0, 3.0])
    # none: r - group mean -> [0.5, -0.5, 0, 0]
    assert group_advantages(r, group_size=2, scale="none").tolist() == [0.5, -0.5, 0.0, 0.0]
    # batch: divide by the batch's unbiased std: mean 1.75, sum sq dev = .5625*2 + 3.0625 + 1.5625
    std = math.sqrt((0.5625 + 3.0625 + 1.5625 + 1.5625) / 3)
    torch.testing.assert_close(group_advantages(r, group_size=2, scale="batch"),
                               torch.tensor([0.5, -0.5, 0, 0]) / (std + EPS))


def test_reward_components_with_weights():
    comps = torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    # weights [1, 0.5]: totals [1.5, 0.5, 1.0, 1.5]
    a = group_advantages(comps, group_size=2, weights=[1.0, 0.5])
    b = group_advantages(torch.tensor([1.5, 0.5, 1.0, 1.5]), group_size=2)
    torch.testing.assert_close(a, b)


def test_against_float64_reference_random():
    g = torch.Generator().manual_seed(2)
    r = torch.randn(8, 6, generator=g, dtype=torch.float64)
    ref = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + EPS)
    torch.testing.assert_close(group_advantages(r.flatten(), group_size=6).double(),
                               ref.flatten(), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(rewards=[1.0, float("nan")], group_size=2), r"reward of completion 1 is nan"),
    (dict(rewards=[1.0, 2.0, 3.0], group_size=2), r"3 completions do not split into groups of 2"),
    (dict(rewards=[1.0, 2.0], group_size=0), r"group_size must be a positive int, got 0"),
    (dict(rewards=[1.0, 2.0]), r"exactly one of group_size"),
    (dict(rewards=[1.0, 2.0], group_ids=[0]), r"group_ids must have one entry per completion"),
    (dict(rewards=[1.0, 2.0], group_size=2, scale="std"), r"scale must be one of .* 'std'"),
    (dict(rewards=[[1.0, 2.0]], group_size=1, weights=[1.0]), r"one entry per reward component"),
])
def test_bad_input(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        group_advantages(kwargs.pop("rewards"), **kwargs)


def test_process_advantages_hand_computed():
    # one group of two completions; step rewards: c0 = [1, 0], c1 = [0.5] (second step absent)
    # all steps of the group: [1, 0, 0.5] -> mean 0.5, unbiased std sqrt((.25+.25+0)/2) = 0.5
    # normalized (s = 0.5 + eps): c0 = [0.5/s, -0.5/s], c1 = [0]
    # token advantage = sum of normalized rewards of its step and every later step:
    #   c0 step 0 -> 0.5/s - 0.5/s = 0 ; c0 step 1 -> -0.5/s ; c1 step 0 -> 0
    s = 0.5 + EPS
    step_rewards = torch.tensor([[1.0, 0.0], [0.5, float("nan")]])
    token_step = torch.tensor([[-1, 0, 0, 1, 1, -1], [-1, 0, 0, 0, -1, -1]])
    adv = process_advantages(step_rewards, token_step, group_size=2)
    expect = torch.tensor([[0, 0, 0, -0.5 / s, -0.5 / s, 0], [0, 0, 0, 0, 0, 0]])
    torch.testing.assert_close(adv, expect)


def test_process_advantages_bad_index():
    with pytest.raises(ValueError, match=r"token_step_index 2 is outside \[-1, 2\)"):
        process_advantages(torch.zeros(2, 2), torch.tensor([[0, 2], [0, 1]]), group_size=2)


def test_triton_backend_matches_torch_under_interpreter():
    """The CUDA path (Triton group z-score) agrees with the torch path; here interpreted."""
    pytest.importorskip("triton")
    import os
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs TRITON_INTERPRET=1 (set by tests/conftest.py) on a CPU machine")
    r = torch.randn(6 * 5, generator=torch.Generator().manual_seed(3))
    r[5:10] = 0.7  # an all-equal group -> exactly 0
    for scale in ("group", "none"):
        a = group_advantages(r, group_size=5, scale=scale, backend="triton")
        b = group_advantages(r, group_size=5, scale=scale, backend="torch")
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
        assert (a[5:10] == 0).all()
