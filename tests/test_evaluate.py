"""evaluate.py's held-out accuracy: the share of solved samples (score >= 1.0, as pass@n counts them), the mean
score beside it for a verifier with partial credit, and an empty held-out set refused."""

from pathlib import Path

import datasets
import pytest

import dllm_rl.evaluate as E
from dllm_rl.cli import main
from dllm_rl.config import RolloutConfig
from dllm_rl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
ROLLOUT = RolloutConfig(max_completion_length=4, steps=4)


def rows(credits):
    return datasets.Dataset.from_list([{"prompt": f"q{i}", "credit": c} for i, c in enumerate(credits)])


def partial_credit(prompts, completions, credit, **kwargs):
    """A verifier with partial credit (as `code`: the share of tests passed): each row's `credit` column."""
    return list(credit)


@pytest.fixture
def partial(monkeypatch):
    monkeypatch.setattr(E, "resolve_reward", lambda name: partial_credit)
    monkeypatch.setattr(E, "answer_key", lambda task: lambda completion: "same")  # every sample votes alike


def test_accuracy_counts_solved_samples_and_the_mean_score_counts_partial_credit(model_factory, tokenizer, partial):
    """Credits 1, 0.5, 0 with two samples each: one prompt of three is solved, so accuracy = pass@2 = maj@2 = 1/3
    (the half-solved prompt used to count 0.5 in accuracy and maj@2, putting them above pass@2); the mean score
    is 0.5."""
    model = model_factory()
    out = E.evaluate(model, tokenizer, rows([1.0, 0.5, 0.0]), "partial", ROLLOUT, num_samples=2)
    assert out["scores"] == [1.0, 1.0, 0.5, 0.5, 0.0, 0.0]
    assert out["accuracy"] == pytest.approx(1 / 3) and out["mean_score"] == pytest.approx(0.5)
    assert out["pass@2"] == pytest.approx(1 / 3) and out["maj@2"] == pytest.approx(1 / 3)
    voted = E.evaluate(model, tokenizer, rows([1.0, 0.5, 0.0]), "partial", ROLLOUT, num_samples=2, majority=True)
    assert voted["accuracy"] == pytest.approx(1 / 3)
    one = E.evaluate(model, tokenizer, rows([1.0, 0.5, 0.0, 1.0]), "partial", ROLLOUT)
    assert one["accuracy"] == 0.5 and one["mean_score"] == pytest.approx(0.625)


@pytest.mark.parametrize("num_samples", [1, 3])
def test_an_empty_held_out_set_is_refused(model_factory, tokenizer, num_samples):
    """It used to divide by zero (num_samples > 1) or report accuracy 0.0 over 0 examples."""
    with pytest.raises(ConfigError, match="the held-out set is empty"):
        E.evaluate(model_factory(), tokenizer, rows([]), "sudoku", ROLLOUT, num_samples=num_samples)


def test_dllm_rl_eval_prints_the_mean_score_only_when_partial_credit_makes_it_differ(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    argv = ["eval", "recipes/tiny/sudoku-sft.yaml", "--checkpoint", "checkpoints/tiny/sudoku-sft"]
    argv += ["data.eval_size=4", "data.train_size=8"]
    assert main(argv) in (0, None)
    assert "mean score" not in capsys.readouterr().out  # sudoku's verifier scores 0 or 1
    monkeypatch.setattr(E, "resolve_reward", lambda name: lambda prompts, completions, **kw: [0.5] * len(prompts))
    assert main(argv) in (0, None)
    out = capsys.readouterr().out
    assert "accuracy 0.0000 over 4 held-out sudoku examples; mean score 0.5000 (partial credit counted)" in out, out
    assert "[0.5] " in out  # the examples show their score, not a rounded one


def test_the_hybrid_axes_majority_vote_counts_solves_as_its_pass_at_k_does(monkeypatch):
    """Every sample half-solves its question and all vote alike: pass@k and maj@k are both 0 (maj@k used to
    average the raw scores of the winning answers, 0.5, above pass@k)."""
    from types import SimpleNamespace

    import dllm_rl.axes as A
    from dllm_rl.config import load_recipe

    def fake_evaluate(model, tokenizer, data, reward, rollout, num_samples=1, **kwargs):
        n = len(data) * num_samples
        return {"scores": [0.5] * n, "answers": ["a"] * n, "plans": [""] * n, "completions": [""] * n}

    monkeypatch.setattr(A, "evaluate", fake_evaluate)
    task = SimpleNamespace(name="toy", eval=rows([1.0, 1.0, 1.0]), reward="partial")
    recipe = load_recipe(ROOT / "recipes/tiny/sudoku-sft.yaml", ["eval.size=3"])
    out = A.hybrid_axes(None, None, task, recipe, samples=2)
    for row in out["diversity"].values():
        assert row["pass@2"][0] == 0.0 and row["maj@2"][0] == 0.0, row
    assert all(row["accuracy"] == 0.0 for row in out["greedy"].values())
