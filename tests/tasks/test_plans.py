"""Plans and answers on the procedural tasks (tasks/plans.py, tasks/answers.py): on real task rows the oracle
plan is right and the answer follows it, a corrupted plan is wrong, and answers normalise for voting."""

from __future__ import annotations

import doctest

import pytest

from dllm_rl.config import DataConfig
from dllm_rl.tasks import answers, load_task, plans


@pytest.mark.parametrize("module", [plans, answers])
def test_doctests(module):
    assert doctest.testmod(module).failed == 0


@pytest.mark.parametrize(
    "task,options",
    [("sudoku", {"min_empty": 8, "max_empty": 12}), ("countdown", {})],
)
def test_oracle_plans_are_right_and_corrupted_ones_wrong_on_real_rows(task, options):
    rows = load_task(DataConfig(task=task, train_size=40, eval_size=10, options=options)).train.to_list()
    p = plans.task_plans(task)
    for row in rows:
        oracle = p.oracle(row)
        assert p.correct(row, oracle), (row, oracle)
        assert not p.correct(row, p.corrupt(oracle)), (row, p.corrupt(oracle))
        assert p.follows(oracle, row["answer"])
        assert not p.correct(row, p.content_free)
    if task == "sudoku":  # two cells, in the puzzle's layout
        assert all(sum(c.isdigit() for c in p.oracle(r)) == 2 and len(p.oracle(r)) == 19 for r in rows)


def test_answer_keys_normalise_and_abstain():
    key = answers.answer_key("countdown")
    assert key([{"role": "assistant", "content": "9 * 2 + 3"}]) == key("9*2+3") == "9*2+3"
    assert answers.answer_key("sudoku")("12") is None
    assert answers.answer_key("gsm8k")("so #### 1,000") == "1000"
    assert answers.answer_key("anything else")("  x ") == "x"
