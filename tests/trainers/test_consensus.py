"""Consensus distillation (trainers/consensus.py) on the shipped tiny Sudoku checkpoint: targets are the model's
own samples with the winning answer (never the task's reference completions), distinct and capped; a vote
below min_share keeps nothing and changes nothing, and a run of such rounds goes on (the schedule too); frozen
votes (teacher=initial) do not move with training, nor with a resume; checkpoints fall on round boundaries, so a
resumed run logs what a run never stopped logs; a task without a verifier is refused."""

from __future__ import annotations

import json
import shutil
from collections import defaultdict
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load_file

from dllm_rl.config import recipe_from_dict
from dllm_rl.errors import ConfigError
from dllm_rl.tasks.answers import sudoku_answer
from dllm_rl.tasks.from_dataset import dataset_task
from dllm_rl.trainers.common import loss_postfix
from dllm_rl.trainers.consensus import ConsensusTrainer
from dllm_rl.validate import validate_recipe

ROOT = Path(__file__).resolve().parents[2]


def recipe(out, train=None, **consensus):
    return recipe_from_dict(
        {
            "algorithm": "consensus",
            "model": {"path": str(ROOT / "checkpoints/tiny/sudoku-sft")},
            "data": {"task": "sudoku", "train_size": 64, "eval_size": 4, "seed": 1},
            "consensus": {"steps_per_round": 2, "prompts_per_round": 8, "samples": 6, "max_paths": 3, **consensus},
            "rollout": {"max_completion_length": 20, "steps": 20},
            "optim": {"lr": 1e-3, "lr_scheduler": "constant"},
            "train": {
                "max_steps": 4,
                "batch_size": 4,
                "output_dir": str(out),
                "eval_steps": 0,
                "save_steps": 0,
                "num_threads": 1,
                **(train or {}),
            },
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


def test_a_run_whose_votes_keep_nothing_finishes_and_its_schedule_goes_on(tmp_path):
    """Every round keeps nothing: each step logs loss NaN (left out of the logged mean: no loss in the rows, and the
    progress bar shows none instead of failing on an empty window) and still steps the learning-rate schedule, so
    the lr of step k is the schedule's at step k whether or not step k trained."""
    r = recipe(tmp_path, min_share=1.0, train={"max_steps": 2, "logging_steps": 1})
    r.optim.lr_scheduler, r.optim.warmup_steps = "constant_with_warmup", 4
    trainer = ConsensusTrainer(r)
    trainer.recipe.consensus.min_share = 1.01  # a share no vote reaches (a recipe may not say it: shares are <= 1)
    assert trainer.train()["eval_accuracy"] is not None
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in rows if "skipped" in row]
    assert [row["step"] for row in steps] == [1, 2] and all(row["skipped"] == 1 for row in steps)
    assert not any("loss" in row for row in rows)
    assert [row["lr"] for row in steps] == pytest.approx([1e-3 / 4, 2e-3 / 4])  # warmup: (step / 4) * lr
    assert trainer.scheduler.last_epoch == 2


def test_the_progress_bar_shows_the_last_finite_loss_or_none():
    """Run.train_to_accuracy's postfix on a window whose steps trained nothing (NaN) or logged no loss."""
    assert loss_postfix(defaultdict(list, {"loss": [0.25, float("nan")]})) == {"loss": "0.250"}
    assert loss_postfix(defaultdict(list, {"loss": [float("nan")]})) == {}
    assert loss_postfix(defaultdict(list, {"skipped": [1.0]})) == {}


def test_consensus_samples_in_order_without_shuffle_dataset(tmp_path):
    """train.shuffle_dataset=false (TRL's): the round's prompts and the round's targets are taken in order."""
    trainer = ConsensusTrainer(recipe(tmp_path, train={"shuffle_dataset": False}))
    assert trainer.prompts.indices(0, 8) == list(range(8)) and trainer.prompts.indices(1, 8) == list(range(8, 16))
    trainer.targets = lambda r: ([("a prompt", str(i)) for i in range(6)], {})  # six targets, no decoding
    trainer.training_step(0)
    assert trainer.sampler.indices(0, 4) == [0, 1, 2, 3] and trainer.sampler.indices(1, 4) == [4, 5, 0, 1]


def test_each_round_draws_its_targets_from_the_start_of_a_pass(tmp_path):
    """A later round's targets are drawn from the start of a shuffled pass over them, indexed by the step within
    the round: 8 draws over 6 targets see every target, the first 6 draws each once. (Indexed by the global
    step, round 1 began part-way through a pass: a target was never drawn while others were drawn twice.)"""
    trainer = ConsensusTrainer(recipe(tmp_path))  # 2 steps a round of 4 rows: 8 draws a round
    trainer.targets = lambda r: ([("a prompt", str(i)) for i in range(6)], {})  # six targets, no decoding
    for r in (1, 2, 3):
        trainer.training_step(2 * r)
        drawn = trainer.sampler.indices(2 * r, 4) + trainer.sampler.indices(2 * r + 1, 4)
        assert sorted(drawn[:6]) == list(range(6)), (r, drawn)


def without_timing(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k != "steps_per_s"} for row in rows]


def test_a_resumed_run_with_frozen_votes_logs_what_a_run_never_stopped_logs(tmp_path):
    """teacher=initial, 4 steps of 2-step rounds, a checkpoint every 2: a run killed after checkpoint-2 resumes to
    the same metrics (the vote of round 1 included, logged once) and weights as a run never stopped; its frozen
    teacher is the recipe's starting model, not the resumed one. A checkpoint mid-round is refused."""
    train = {"save_steps": 2, "logging_steps": 1, "eval_steps": 2}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ConsensusTrainer(recipe(straight, train, teacher="initial")).train()
    shutil.copytree(straight, killed)
    for name in ("final", "checkpoint-4"):
        shutil.rmtree(killed / name)
    ConsensusTrainer(recipe(killed, train, teacher="initial")).train()
    assert without_timing(killed) == without_timing(straight)
    assert sum("consensus/kept" in row for row in without_timing(killed)) == 2  # one vote per round
    a, b = (load_file(run / "final" / "model.safetensors") for run in (straight, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)

    mid = tmp_path / "mid"  # a checkpoint at step 3: what extending a 3-step run leaves
    shutil.copytree(killed / "checkpoint-2", mid / "checkpoint-3")
    state = json.loads((mid / "checkpoint-3" / "trainer_state.json").read_text())
    (mid / "checkpoint-3" / "trainer_state.json").write_text(json.dumps({**state, "step": 3}))
    with pytest.raises(ConfigError, match="step 3, mid-way through a round of consensus.steps_per_round=2"):
        ConsensusTrainer(recipe(mid, train, teacher="initial"))


def test_consensus_needs_a_verifier_and_checkpoints_on_round_boundaries(tmp_path):
    """Refused by validate_recipe, before any model is built: a data.dataset (no verifier to vote with), and a
    train.save_steps that would put a checkpoint mid-round (its targets could not be rebuilt on resume)."""
    validate_recipe(recipe(tmp_path, {"save_steps": 4}))
    with pytest.raises(ConfigError, match=r"train.save_steps=3 is not a multiple of consensus.steps_per_round=2.*=2"):
        validate_recipe(recipe(tmp_path, {"save_steps": 3}))
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "1+1", "completion": "2"}) + "\n")
    r = recipe(tmp_path)
    r.data.dataset, r.data.task = str(path), "dataset"
    with pytest.raises(ConfigError, match="data.dataset: algorithm=consensus votes with the task's verifier"):
        validate_recipe(r)
    task = dataset_task(datasets.Dataset.from_list([{"prompt": "1+1", "completion": "2"}]))  # given in Python
    with pytest.raises(ConfigError, match="votes with the task's verifier and this task has none"):
        ConsensusTrainer(recipe(tmp_path), task=task)


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


def test_greedy_targets_under_a_random_order_are_seeded_by_the_round(tmp_path):
    """consensus.target=greedy decodes at temperature 0, but a random unmasking order still draws: its targets
    come from the round's own generator, not torch's global one, so a resumed run rebuilds the same ones."""
    r = recipe(tmp_path, target="greedy")
    r.rollout.order = "random"
    trainer = ConsensusTrainer(r)
    torch.manual_seed(1)
    first, _ = trainer.targets(0)
    torch.manual_seed(2)
    again, _ = trainer.targets(0)
    assert first == again and first != trainer.targets(1)[0]


def test_consensus_under_deepspeed_has_sfts_micro_batch():
    """make_accelerator asks micro_batch_size for DeepSpeed's batch settings: consensus trains sequences as SFT
    does (it raised KeyError: 'consensus', so consensus could not start under train.deepspeed)."""
    from dllm_rl.runtime import micro_batch_size

    r = recipe("unused", train={"batch_size": 8, "gradient_accumulation_steps": 2})
    assert micro_batch_size(r) == 4
