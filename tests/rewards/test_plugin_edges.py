"""Reward plugins in the cases TRL 1.16 accepts that the audit found refused or mishandled here: one reward name
twice (renamed NAME_2, weights kept by position), a verifier called apart from the run's rewards (the same
keywords as a reward), any iterable as a return value, a raising reward beside an async one (no coroutine left
unawaited), and log_extra columns logged on some processes only (gathered as TRL gathers them: no hang)."""

from __future__ import annotations

import collections
import functools
import gc
import threading
import warnings
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerState

from dllm_rl.config import RewardSpec
from dllm_rl.errors import DllmRlError
from dllm_rl.metrics import reward_metrics
from dllm_rl.rewards import REWARDS
from dllm_rl.rewards.plugins import Reward, build_rewards, compute_rewards, distinct_names, verifier_scores
from dllm_rl.trainers.consensus import ConsensusTrainer
from dllm_rl.trainers.grpo_options import CompletionsTable, gather_extra_columns

N = 4
PROMPTS, TEXTS, IDS = ["p"] * N, ["c"] * N, [[1]] * N


def scaled(prompts, completions, scale=1.0, **kw):
    return [scale] * len(completions)


def test_one_reward_twice_is_kept_apart_with_a_suffix_and_its_own_weight():
    """TRL accepts [partial(f, scale=1), partial(f, scale=2)] (and merges their metrics); here the second is
    logged as scaled_2, a name a third reward already holds is skipped, and weights follow position."""
    fns = [functools.partial(scaled, scale=1.0), functools.partial(scaled, scale=2.0), scaled]
    rewards = build_rewards([], fns, weights=[1.0, 10.0, 100.0])
    assert [r.name for r in rewards] == ["scaled", "scaled_2", "scaled_3"]
    assert [r.weight for r in rewards] == [1.0, 10.0, 100.0] and [r.fn for r in rewards] == fns
    total, per_fn = compute_rewards(rewards, PROMPTS, TEXTS, IDS, {})
    assert total.tolist() == [1.0 + 20.0 + 100.0] * N
    metrics = reward_metrics(total, per_fn, [r.name for r in rewards], torch.full((N,), float("nan")), 2)
    assert (metrics["rewards/scaled/mean"], metrics["rewards/scaled_2/mean"]) == (1.0, 2.0)
    assert [r.name for r in distinct_names([Reward(n, scaled) for n in ("f", "f_2", "f")])] == ["f", "f_2", "f_3"]


def test_a_recipe_may_use_one_builtin_reward_twice_with_different_kwargs():
    rewards = build_rewards([RewardSpec("sudoku"), RewardSpec("sudoku", weight=2.0)])
    assert [(r.name, r.weight) for r in rewards] == [("sudoku", 1.0), ("sudoku_2", 2.0)]
    # the task's verifier is still found by name: the first of them, not the renamed one
    per_fn = torch.tensor([[1.0] * N, [0.0] * N])
    assert verifier_scores("sudoku", rewards, per_fn, PROMPTS, TEXTS, IDS, {}).tolist() == [1.0] * N


def test_a_verifier_called_apart_gets_the_keywords_a_reward_gets(monkeypatch):
    """A TRL-style function used as the task's verifier (not one of the run's rewards) reads trainer_state,
    completion_ids and the log hooks, as it could as a reward."""
    seen = {}

    def verifier(prompts, completions, completion_ids, trainer_state, log_extra, log_metric, **kw):
        log_metric("calls", 1.0)
        log_extra("col", [0] * len(completions))
        seen.update(ids=completion_ids, step=trainer_state.global_step)
        return [float(len(i)) for i in completion_ids]

    monkeypatch.setitem(REWARDS, "trl_style_verifier", verifier)
    ids = [[1], [1, 2], [1, 2, 3], [4]]
    state = TrainerState(global_step=7)
    scores = verifier_scores("trl_style_verifier", [], torch.empty(0, N), PROMPTS, TEXTS, ids, {}, state)
    assert scores.tolist() == [1.0, 2.0, 3.0, 1.0] and seen == {"ids": ids, "step": 7}


def test_consensus_scores_pass_the_completions_token_ids():
    seen = []

    def verifier(prompts, completions, completion_ids, **kw):
        seen.append(completion_ids)
        return [1.0] * len(completions)

    out = SimpleNamespace(
        completions=["a", "b"],
        completion_ids=torch.tensor([[5, 6, 2], [7, 2, 2]]),
        completion_mask=torch.tensor([[1, 1, 1], [1, 1, 0]]),
    )
    trainer = SimpleNamespace(verifier=[Reward("v", verifier)])
    rows = [{"prompt": "p", "answer": "x"}]
    assert ConsensusTrainer._scores(trainer, rows, out, 2) == [1.0, 1.0]
    assert seen == [[[5, 6, 2], [7, 2]]]


@pytest.mark.parametrize(
    "make",
    [lambda n: range(n), lambda n: collections.deque([1.0] * n), lambda n: dict.fromkeys(range(n)).keys()],
    ids=["range", "deque", "dict_keys"],
)
def test_any_iterable_of_scores_is_read_as_trl_reads_it(make):
    total, _ = compute_rewards([Reward("it", lambda prompts, completions, **kw: make(N))], PROMPTS, TEXTS, IDS, {})
    assert total.tolist() == [float(v) for v in make(N)]


def test_wrong_lengths_and_non_scores_stay_clear_errors():
    for bad, match in [
        (range(N + 1), "returned range of length 5.*must return 4 values"),
        ({"a": 1.0}, "must return 4 values"),
        ("abcd", "must return 4 values"),
        (collections.deque(["x"] * N), "returned 'x' for completion 0"),
    ]:
        with pytest.raises(DllmRlError, match=match):
            compute_rewards([Reward("bad", lambda prompts, completions, **kw: bad)], PROMPTS, TEXTS, IDS, {})


def test_a_raising_reward_leaves_no_async_reward_unawaited():
    async def slow(prompts, completions, **kw):
        return [1.0] * len(completions)

    def broken(prompts, completions, **kw):
        raise ValueError("boom")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(DllmRlError, match="reward 'broken' raised ValueError: boom"):
            compute_rewards([Reward("slow", slow), Reward("broken", broken)], PROMPTS, TEXTS, IDS, {})
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)]


class FakeWorld:
    """Two ranks as two threads: each collective waits for both (a rank that calls one gather more than the
    other times out instead of hanging, as a real process group would)."""

    def __init__(self, size: int = 2):
        self.slots, self.barrier, self.rank = [None] * size, threading.Barrier(size, timeout=10), threading.local()

    def all_gather(self, obj) -> list:
        self.slots[self.rank.value] = obj
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()
        return out

    def acc(self):
        world = self
        return SimpleNamespace(num_processes=2, device="cpu", gather=lambda t: torch.cat(world.all_gather(t)))


def test_log_extra_on_some_processes_only_is_gathered_as_trl_gathers_it(monkeypatch, tmp_path):
    """Rank 0 logged columns a and b, rank 1 only b: both gather the union, rank 1's rows are None under a."""
    import accelerate.utils

    world = FakeWorld()
    monkeypatch.setattr(
        accelerate.utils, "gather_object", lambda xs: [x for part in world.all_gather(xs) for x in part]
    )
    extras = [{"a": ["a0", "a1"], "b": [0, 1]}, {"b": [2, 3]}]
    tables, errors = [None, None], []

    def rank(r: int):
        world.rank.value = r
        try:
            table = CompletionsTable(SimpleNamespace(), str(tmp_path))
            rewards, per_fn = [Reward("r", scaled)], torch.tensor([[float(r), float(r)]])
            prompts = [f"p{r}", f"q{r}"]
            table.record_rollout(world.acc(), 1, prompts, ["c", "d"], rewards, per_fn, torch.zeros(4), extras[r])
            tables[r] = table.table()
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)
            world.barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    columns, rows = tables[0]
    assert tables[1] == tables[0] and columns == ["step", "prompt", "completion", "r", "a", "b", "advantage"]
    assert [row[4:6] for row in rows] == [["a0", 0], ["a1", 1], [None, 2], [None, 3]]
    assert [row[1] for row in rows] == ["p0", "q0", "p1", "q1"] and [row[3] for row in rows] == [0.0, 0.0, 1.0, 1.0]


def test_gather_extra_columns_on_one_process_is_the_columns_themselves():
    assert gather_extra_columns({"a": [1, 2], "b": [None, 3]}, 2, list) == {"a": [1, 2], "b": [None, 3]}
