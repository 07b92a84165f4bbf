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


def test_countdown_follows_decides_by_the_expression_tree():
    follows = plans.countdown_follows
    assert not follows("9+2=11", "3*9+2")  # the text 9+2 is there, but the completion computes 27+2
    assert follows("9*2=18", "<answer>\n9*2+3\n</answer>")  # the expression the reward reads, not the first line
    assert follows("9*2=18", "(2 * 9) + 3 = 21") and follows("9-2=7", "9-2+3") and not follows("9-2=7", "2-9+3")
    assert not follows("9*2=18", "9*(2*3)")  # 2*3 first, then 9*6
    assert not follows("9*2=18", "1+" * 1000 + "-" * 3000 + "9*2")  # too long or deep: not an expression, no error


def test_countdown_answer_keys_follow_the_verifier():
    from dllm_rl.rewards.countdown import countdown_reward

    key = answers.answer_key("countdown")
    texts = ["1 2+9", "12+9", "(12+9)", "12 + 9", "12+ 9=21", "9+12"]
    scores = countdown_reward(["p"] * 6, texts, numbers=[[12, 9]] * 6, target=[21] * 6)
    assert scores == [0.0] + [1.0] * 5
    keys = [key(t) for t in texts]
    assert keys[0] != keys[1] == keys[2] == keys[3] == keys[4] != keys[5]  # 1 2+9 is not 12+9
    assert key("-3+(17+15)/(1*1)") == "-3+(17+15)/(1*1)"
