"""A reward written for TRL behaves as under TRL 1.16, edge cases included.

Where TRL's behaviour was read (trl 1.16, trl/trainer/grpo_trainer.py): `_calculate_rewards` (the keywords, the
conversion of what a function returns, the warning for rows no function scored), `_generate_and_score_completions`
(weighted nansum, NaN for unscorable rows, nanmean / nanstd group statistics, nan_to_num of the advantages,
`log_metric`'s sum-and-count aggregation), `_log_metric` / `_log_completion_extra` and `log` (NaN-skipping
window means); trl/trainer/utils.py: `nanstd`, `get_callable_name`. Functions TRL exposes are called directly
(nanstd, get_callable_name); the inline expressions are restated next to their source.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math

import numpy as np
import pytest
import torch
from trl.trainer.utils import get_callable_name
from trl.trainer.utils import nanstd as trl_nanstd

from dllm_rl.algorithms import ADVANTAGES, scale, zero_std_groups
from dllm_rl.config import RewardSpec
from dllm_rl.metrics import call_weighted_means, window_mean
from dllm_rl.rewards.plugins import Reward, RewardLog, build_rewards, compute_rewards

N = 4
PROMPTS, TEXTS, IDS = ["p"] * N, ["c"] * N, [[1]] * N


def trl_conversion(out) -> torch.Tensor:
    """grpo_trainer.py `_calculate_rewards`: None -> NaN, then torch.tensor(..., dtype=float32)."""
    return torch.tensor([r if r is not None else torch.nan for r in out], dtype=torch.float32)


FORMS = {
    "list of floats, ints, bools, None, numpy scalars": [True, None, 2, np.float32(0.5)],
    "numpy float array": np.array([0.25, 1.0, np.nan, -2.0]),
    "numpy bool array": np.array([True, False, False, True]),
    "numpy object array with None": np.array([1.0, None, 0.5, None], dtype=object),
    "torch float tensor": torch.tensor([0.1, 0.2, 0.3, float("nan")]),
    "torch bool tensor": torch.tensor([False, True, True, False]),
    "list of 0-d tensors": [torch.tensor(1.5), torch.tensor(0.0), torch.tensor(True), torch.tensor(-1)],
    "tuple": (0.0, 1.0, None, 1),
}


@pytest.mark.parametrize("form", FORMS, ids=list(FORMS))
def test_every_return_form_trl_accepts_is_read_as_trl_reads_it(form):
    out = FORMS[form]
    _, per_fn = compute_rewards([Reward("r", lambda prompts, completions, **kw: out)], PROMPTS, TEXTS, IDS, {})
    torch.testing.assert_close(per_fn[0], trl_conversion(out), equal_nan=True)


@pytest.mark.parametrize("make", [lambda: (v for v in [1.0, None, 0, True]), lambda: map(float, [1, 0, 0, 1])])
def test_a_generator_or_map_is_read_once_as_trls_list_comprehension_reads_it(make):
    _, per_fn = compute_rewards([Reward("r", lambda prompts, completions, **kw: make())], PROMPTS, TEXTS, IDS, {})
    torch.testing.assert_close(per_fn[0], trl_conversion(make()), equal_nan=True)


def trl_advantages(rewards_per_func: torch.Tensor, weights: torch.Tensor, G: int, scale_rewards: str):
    """grpo_trainer.py `_generate_and_score_completions`, multi_objective_aggregation="sum_then_normalize":
    weighted nansum, unscorable rows NaN, group nanmean, group (or batch) nanstd, nan_to_num."""
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    rewards = (rewards_per_func * weights.unsqueeze(0)).nansum(dim=1)
    rewards[unscorable] = torch.nan
    mean = torch.nanmean(rewards.view(-1, G), dim=1).repeat_interleave(G)
    if scale_rewards == "batch":
        std = trl_nanstd(rewards).expand_as(rewards)
    else:
        std = trl_nanstd(rewards.view(-1, G), dim=1).repeat_interleave(G)
    advantages = rewards - mean
    if scale_rewards != "none":
        advantages = advantages / (std + 1e-4)
    return torch.nan_to_num(advantages, nan=0.0), rewards


def ours(per_fn_rows: list[list], weights: list[float], G: int, how: str):
    fns = [
        Reward(f"f{i}", (lambda row: lambda prompts, completions, **kw: row)(row), w)
        for i, (row, w) in enumerate(zip(per_fn_rows, weights))
    ]
    n = len(per_fn_rows[0])
    total, per_fn = compute_rewards(fns, ["p"] * n, ["c"] * n, [[1]] * n, {})
    return scale(ADVANTAGES["group_mean"](total, G), total, G, how), total, per_fn


@pytest.mark.parametrize("how", ["group", "batch", "none"])
def test_unscorable_completions_are_left_out_of_their_group_with_advantage_zero(how, caplog):
    # two functions over two groups of 4; completion 1 and 6 are scored by neither (all None); group 2 has one
    # function skipping other rows too
    a = [1.0, None, 0.0, 1.0, 0.5, 0.25, None, None]
    b = [None, None, 1.0, 0.0, None, 0.5, None, 1.0]
    w = [1.0, 0.5]
    with caplog.at_level(logging.WARNING):
        adv, total, per_fn = ours([a, b], w, 4, how)
    expected, trl_rewards = trl_advantages(per_fn.T, torch.tensor(w), 4, how)
    torch.testing.assert_close(total, trl_rewards, equal_nan=True)
    torch.testing.assert_close(adv, expected)
    assert adv[1] == 0 and adv[6] == 0
    assert "all reward functions returned None for 2 completion(s)" in caplog.text  # TRL warns too


def test_the_example_group_of_trl_md():
    """G = 4, rewards [1, None, 0, 1]: std over the three scorable ones 0.577, advantages [0.577, 0, -1.155, 0.577];
    a group with a single scorable completion has no std and gives all zeros."""
    adv, _, _ = ours([[1.0, None, 0.0, 1.0, None, 1.0, None, None]], [1.0], 4, "group")
    torch.testing.assert_close(adv, torch.tensor([0.5773, 0.0, -1.1545, 0.5773, 0, 0, 0, 0]), atol=1e-3, rtol=0)


def test_leave_one_out_baseline_uses_only_the_scorable_others():
    r = torch.tensor([1.0, float("nan"), 0.0, 4.0])
    adv = scale(ADVANTAGES["leave_one_out"](r, 4), r, 4, "none")
    assert adv.tolist() == [1.0 - 2.0, 0.0, 0.0 - 2.5, 4.0 - 0.5]


def test_zero_std_groups_counts_like_trls_frac_reward_zero_std():
    """frac_reward_zero_std = mean of isclose(group nanstd, 0): NaN std (fewer than two scorable) is not zero."""
    nan = float("nan")
    r = torch.tensor([1.0, nan, 1.0, 1.0, 0.0, 1.0, 1.0, 1.0, nan, nan, nan, 2.0])
    std = trl_nanstd(r.view(-1, 4), dim=1).repeat_interleave(4)
    assert zero_std_groups(r, 4).tolist() == torch.isclose(std, torch.zeros_like(std)).tolist()


def test_log_metric_is_a_mean_over_calls_per_rollout_then_over_the_logging_window():
    """TRL: per generation batch, sum and count of every log_metric call (every process) give one value; log()
    averages those values over the logging window, NaN skipped, and reports nothing when none is valid."""
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    per_rollout = []
    for values in ([1.0, 3.0, 5.0], [10.0], [math.nan]):  # three rollouts in one logging window
        hooks = RewardLog()

        def reward(prompts, completions, log_metric, **kw):
            for v in values:
                log_metric("judge/score", v)
            return [1.0] * len(completions)

        compute_rewards([Reward("r", reward)], PROMPTS, TEXTS, IDS, {}, log_metric=hooks.log_metric)
        per_rollout.append(call_weighted_means(acc, hooks.metrics())["judge/score"])
    assert per_rollout[:2] == [3.0, 10.0] and math.isnan(per_rollout[2])
    assert window_mean(per_rollout) == 6.5
    assert window_mean([math.nan]) is None


def test_log_extra_columns_are_recorded_one_value_per_completion():
    hooks = RewardLog()

    def reward(prompts, completions, answer, log_extra, **kw):
        log_extra("gold", answer)
        return [float(c == a) for c, a in zip(completions, answer)]

    compute_rewards(
        [Reward("r", reward)], PROMPTS, TEXTS, IDS, {"answer": ["c", "d", "c", "e"]}, log_extra=hooks.log_extra
    )
    hooks.log_extra("short", ["x"])  # a column filled for fewer rows is padded with None
    assert hooks.extra(N) == {"gold": ["c", "d", "c", "e"], "short": ["x", None, None, None]}


class Judge:
    def __call__(self, prompts, completions, **kw):
        return [0.5] * len(completions)


def exact(prompts, completions, **kw):
    return [1.0] * len(completions)


def test_a_single_callable_works_and_is_named_as_trl_names_it():
    partial = functools.partial(exact)
    for fn in (exact, partial, Judge()):
        (rw,) = build_rewards([RewardSpec("sudoku")], fn)  # reward_funcs replace the recipe's rewards, as in TRL
        assert rw.fn is fn and rw.name == get_callable_name(fn)


def test_two_rewards_with_one_name_are_accepted_as_trl_accepts_them_and_logged_apart():
    """TRL accepts two rewards of one name (and merges their metrics); here the later one is renamed NAME_2."""

    def other(prompts, completions, **kw):
        return [0.0] * len(completions)

    other.__name__ = "exact"
    assert [r.name for r in build_rewards([], [exact, other])] == ["exact", "exact_2"]
    rewards = build_rewards([RewardSpec("sudoku"), RewardSpec("sudoku", weight=2.0)])
    assert [(r.name, r.weight) for r in rewards] == [("sudoku", 1.0), ("sudoku_2", 2.0)]
    assert [r.name for r in build_rewards([], {"a": exact, "b": other})] == ["a", "b"]


def test_async_rewards_of_one_call_run_concurrently():
    """Each of the two waits for the other to start: awaited one after the other, they would never finish."""
    started = {}

    async def waits_for(me, other, prompts, completions, **kw):
        started[me] = asyncio.Event() if me not in started else started[me]
        started.setdefault(other, asyncio.Event())
        started[me].set()
        await asyncio.wait_for(started[other].wait(), timeout=5)
        return [1.0] * len(completions)

    fns = [Reward(n, functools.partial(waits_for, n, o)) for n, o in (("a", "b"), ("b", "a"))]
    total, _ = compute_rewards(fns, PROMPTS, TEXTS, IDS, {})
    assert total.tolist() == [2.0] * N


def test_async_reward_state_lives_from_one_step_to_the_next():
    """TRL runs every step's async rewards on one event loop, so a reward may keep loop-bound state (a rate limit,
    an async client) across steps; here a semaphore made on the first call is used at every call."""
    state = {}

    async def one(completion):
        async with state["limit"]:  # two calls at once: the second waits, which binds the semaphore to the loop
            await asyncio.sleep(0)
        return 1.0

    async def throttled(prompts, completions, **kw):
        state.setdefault("limit", asyncio.Semaphore(1))
        return list(await asyncio.gather(*(one(c) for c in completions)))

    for _ in range(3):  # three steps
        total, _ = compute_rewards([Reward("throttled", throttled)], PROMPTS, TEXTS, IDS, {})
        assert total.tolist() == [1.0] * N


def test_strings_and_infinities_are_errors_naming_the_reward():
    from dllm_rl.errors import DllmRlError

    for bad in (["a", 1.0, 1.0, 1.0], [math.inf] * N, np.ones((N, 2))):
        with pytest.raises(DllmRlError, match="reward 'bad'"):
            compute_rewards([Reward("bad", lambda prompts, completions, **kw: bad)], PROMPTS, TEXTS, IDS, {})
