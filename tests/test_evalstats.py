"""Evaluation statistics (evalstats.py): majority vote on hand-made samples, pass@k and maj@k against brute
force over every subset, Wilson's interval against its formula's known values, the bootstrap's coverage;
and the majority-vote evaluation mode of evaluate.py on the shipped Sudoku checkpoint."""

from __future__ import annotations

import doctest
import itertools
import random
from pathlib import Path

import pytest

from dllm_rl import evalstats as S

ROOT = Path(__file__).resolve().parents[1]


def test_doctests():
    assert doctest.testmod(S).failed == 0


@pytest.mark.parametrize(
    "answers,scores,expected",
    [
        (["12", "12", "7"], [1, 1, 0], 1.0),  # a clear majority of right answers
        (["7", "7", "12"], [0, 0, 1], 0.0),  # a clear majority of wrong answers: the right minority loses
        (["12", "7"], [1, 0], 0.5),  # a tie: the expected score of a random tie-break
        (["12", "7", "9", "9", "12"], [1, 0, 0, 0, 1], 0.5),
        ([None, None, "7"], [0, 0, 0], 0.0),  # unreadable answers abstain; one vote decides
        ([None, None, "12"], [0, 0, 1], 1.0),
        ([None, None], [0, 0], 0.0),  # everyone abstains: wrong
    ],
)
def test_majority_vote_on_hand_made_samples(answers, scores, expected):
    assert S.vote(answers, scores) == expected


def test_pass_and_maj_at_k_average_over_every_k_subset():
    """pass@k is the probability that a uniformly random k-subset holds a right sample; maj@k the mean vote
    over k-subsets: both checked against the brute-force enumeration."""
    rng = random.Random(0)
    for _ in range(30):
        n = rng.randint(1, 7)
        answers = [rng.choice(["a", "b", "c", None]) for _ in range(n)]
        right = {"a": 1.0, "b": 0.0, "c": 0.0, None: 0.0}
        scores = [right[a] for a in answers]
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(range(n), k))
            brute_pass = sum(any(scores[i] >= 1 for i in s) for s in subsets) / len(subsets)
            assert abs(S.pass_at_k(n, int(sum(scores)), k) - brute_pass) < 1e-12
            brute_maj = sum(S.vote([answers[i] for i in s], [scores[i] for i in s]) for s in subsets) / len(subsets)
            assert abs(S.maj_at_k(answers, scores, k) - brute_maj) < 1e-12


def test_wilson_interval():
    lo, hi = S.wilson(0, 20)
    assert lo == 0.0 and abs(hi - 0.1611) < 1e-3  # the textbook value for 0/20
    lo, hi = S.wilson(20, 20)
    assert hi == 1.0 and abs(lo - 0.8389) < 1e-3


def test_paired_bootstrap_covers_the_true_difference():
    """Two conditions on the same 120 questions (correlated, true difference 0.2): the 95% paired interval
    covers 0.2 in about 95% of 150 simulated evaluations. (With few discordant questions, e.g. 60 questions
    and a difference of 0.1, the percentile bootstrap covers only ~87%: read small differences with care.)"""
    rng = random.Random(1)
    covered = 0
    for t in range(150):
        a, b = [], []
        for _ in range(120):
            u = rng.random()
            a.append(float(u < 0.6))
            b.append(float(u < 0.4))  # b right implies a right: strongly paired
        d, lo, hi = S.paired_difference(a, b, draws=300, seed=t)
        covered += lo <= 0.2 <= hi
    assert 0.89 <= covered / 150 <= 0.995


def test_majority_is_an_evaluation_mode_of_every_recipe():
    from dllm_rl.config import load_recipe
    from dllm_rl.evaluate import evaluate_recipe
    from dllm_rl.models.load import load_model
    from dllm_rl.tasks import load_task

    over = ["data.eval_size=6", "eval.num_samples=4", "eval.temperature=1.0", "data.train_size=8"]
    recipe = load_recipe(ROOT / "recipes/tiny/sudoku-d1-grpo.yaml", over)
    model, tok = load_model(recipe.model, path=str(ROOT / recipe.model.path))
    task = load_task(recipe.data)
    plain = evaluate_recipe(model, tok, task, recipe)
    voted = evaluate_recipe(
        model, tok, task, load_recipe(ROOT / "recipes/tiny/sudoku-d1-grpo.yaml", over + ["eval.majority=true"])
    )
    votes = [
        S.maj_at_k(a, s, 4) for a, s in zip(S.per_question(plain["answers"], 4), S.per_question(plain["scores"], 4))
    ]
    assert plain["maj@4"] == sum(votes) / 6 == voted["accuracy"]  # same samples (same seed), voted
    assert plain["accuracy"] == sum(plain["scores"]) / 24  # without eval.majority: the mean over samples
    assert len(plain["answers"]) == 24 and all(a is None or len(a) == 16 for a in plain["answers"])


def test_a_bootstrap_of_no_values_is_nan():
    import math

    from dllm_rl.evalstats import bootstrap_mean

    assert all(math.isnan(x) for x in bootstrap_mean([]))
