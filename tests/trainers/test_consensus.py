"""Consensus distillation (trainers/consensus.py) on the shipped tiny Sudoku checkpoint: targets are the model's
own samples with the winning answer (never the task's reference completions), distinct and capped; a vote
below min_share keeps nothing and changes nothing; frozen votes (teacher=initial) do not move with training."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dllm_rl.config import recipe_from_dict
from dllm_rl.tasks.answers import sudoku_answer
from dllm_rl.trainers.consensus import ConsensusTrainer

ROOT = Path(__file__).resolve().parents[2]


def recipe(out, **consensus):
    return recipe_from_dict(
        {
            "algorithm": "consensus",
            "model": {"path": str(ROOT / "checkpoints/tiny/sudoku-sft")},
            "data": {"task": "sudoku", "train_size": 64, "eval_size": 4, "seed": 1},
            "consensus": {"steps_per_round": 2, "prompts_per_round": 8, "samples": 6, "max_paths": 3, **consensus},
            "rollout": {"max_completion_length": 20, "steps": 20},
            "optim": {"lr": 1e-3, "lr_scheduler": "constant"},
            "train": {"max_steps": 4, "batch_size": 4, "output_dir": str(out), "eval_steps": 0, "save_steps": 0},
        }
    )


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_targets_are_the_models_own_samples_with_the_winning_answer(tmp_path):
    trainer = ConsensusTrainer(recipe(tmp_path))
    pairs, stats = trainer.targets(0)
    assert pairs and 0 < stats["consensus/kept"] <= 1
    gold = {str(r["prompt"]): r["completion"] for r in trainer.task.train.to_list()}
    by_prompt = {}
    for prompt, text in pairs:
        by_prompt.setdefault(str(prompt), []).append(text)
    for prompt, texts in by_prompt.items():
        assert len({sudoku_answer(t) for t in texts}) == 1 and sudoku_answer(texts[0]) is not None  # one answer
        assert len(set(texts)) == len(texts) <= 3  # distinct paths, at most max_paths
    # not the reference completions: where the vote's winner is wrong, the target is wrong too
    assert stats["consensus/target_accuracy"] < 1 or all(gold[p] in t for p, t in by_prompt.items())


def test_a_vote_below_min_share_keeps_nothing_and_trains_nothing(tmp_path):
    trainer = ConsensusTrainer(recipe(tmp_path, min_share=1.0))
    trainer.recipe.consensus.min_share = 1.01  # a share no vote reaches (a recipe may not say it: shares are <= 1)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    out = trainer.training_step(0)
    assert out["skipped"] == 1.0 and out["consensus/kept"] == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


@pytest.mark.slow  # ~2 minutes on a shared 2-core machine
def test_frozen_votes_do_not_move_with_training(tmp_path):
    frozen = ConsensusTrainer(recipe(tmp_path / "frozen", teacher="initial"))
    first, _ = frozen.targets(1)
    for step in range(2):
        frozen.training_step(step)
    again, _ = frozen.targets(1)
    assert again == first  # the initial model's votes, whatever the student learned
    live = ConsensusTrainer(recipe(tmp_path / "live"))
    assert live.targets(1)[0] == first  # the same model before training votes the same
    for step in range(2):
        live.training_step(step)
    assert live.targets(1)[0] != first  # the current model's votes move as it learns
