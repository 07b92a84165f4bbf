"""The countdown verifier counts what reasoning-gym's own countdown scorer counts (+ - * /, unary minus,
parentheses, each number once), so every reference solution the generator writes scores 1; text it cannot read
scores 0 and never raises."""

import pytest
from reasoning_gym.games.countdown import CountdownConfig, CountdownDataset

from dllm_rl.config import DataConfig
from dllm_rl.rewards.countdown import countdown_reward, evaluate_expression
from dllm_rl.tasks import load_task


@pytest.mark.parametrize("n", [4, 6])
def test_every_reference_of_a_4_and_6_number_task_scores_1(n):
    options = {"min_numbers": n, "max_numbers": n}
    task = load_task(DataConfig(task="countdown", train_size=100, eval_size=20, seed=0, options=options))
    rows = task.train.to_list() + task.eval.to_list()
    assert any(r["answer"].startswith("-") for r in rows)  # reasoning-gym writes some with a leading minus
    scores = countdown_reward(
        ["p"] * len(rows), [r["completion"] for r in rows], [r["numbers"] for r in rows], [r["target"] for r in rows]
    )
    assert scores == [1.0] * len(rows), [r["answer"] for r, s in zip(rows, scores) if s < 1]


@pytest.mark.parametrize(
    "expression, numbers, target",
    [
        ("-3+(17+15)/(1*1)", [3, 17, 15, 1, 1], 29),
        ("3 - -4", [3, 4], 7),
        ("+3+4", [3, 4], 7),
        ("-(3-10)*2", [3, 10, 2], 14),
        ("(3+4)*2", [3, 4, 2], 14),
        ("3+4", [3, 4, 2], 7),  # a number left out
        ("3+4+4", [3, 4], 11),  # a number used twice
        ("0x3+4", [3, 4], 7),  # not a decimal number
        ("1_0+4", [10, 4], 14),
        ("3.0+4", [3, 4], 7),
        ("3 4", [3, 4], 12),
        ("12/(3-3)", [12, 3, 3], 0),
    ],
)
def test_it_scores_as_reasoning_gyms_scorer(expression, numbers, target):
    entry = {"metadata": {"numbers": numbers, "target": target}}
    theirs = CountdownDataset(CountdownConfig(seed=0, size=1)).score_answer(expression, entry)
    assert countdown_reward(["p"], [expression], [numbers], [target]) == [float(theirs == 1.0)]


def test_text_it_cannot_read_is_none_and_never_raises():
    # 6,000 nested signs: the parser's MemoryError; a 401-digit number: OverflowError as a float; too deep to walk
    texts = ["-" * 7000 + "1", "1" + "0" * 400, "(" * 300 + "1" + ")" * 300, "1+" * 3000 + "1", "9" * 20_000, ""]
    assert [evaluate_expression(t) for t in texts] == [None] * len(texts)
    assert countdown_reward(["p"] * len(texts), texts, [[1]] * len(texts), [1] * len(texts)) == [0.0] * len(texts)
