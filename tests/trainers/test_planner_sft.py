"""The planner's SFT (algorithm: planner_sft, trainers/planner.py, TRL's SFTTrainer) keeps the run-directory rules of
the other trainers: a finished run is reported, not retrained; another recipe is refused; a killed run resumes from
its newest complete checkpoint to the uninterrupted run's weights, with each step logged once."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file

from dllm_rl.config import recipe_from_dict
from dllm_rl.errors import ConfigError
from dllm_rl.trainers.planner import PlannerSFTTrainer


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """TRL's SFTTrainer sets accelerate's process-wide state its own way; the next trainer in this process builds
    its own (as a new process would)."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def recipe(out, lr=1e-3, **train):
    return recipe_from_dict(
        {
            "algorithm": "planner_sft",
            "data": {"task": "sudoku", "train_size": 64, "eval_size": 4, "options": {"min_empty": 8, "max_empty": 12}},
            "hybrid": {
                "planner": {
                    "tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
                    "max_new_tokens": 24,
                }
            },
            "optim": {"lr": lr, "lr_scheduler": "constant"},
            "train": {
                "seed": 0,
                "max_steps": 4,
                "batch_size": 8,
                "logging_steps": 1,
                "save_steps": 2,
                "num_threads": 1,
                "output_dir": str(out),
                **train,
            },
        }
    )


def test_planner_sft_runs_on_train_num_threads(tmp_path):
    """train.num_threads sets torch's thread count, as in the other trainers."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        PlannerSFTTrainer(recipe(tmp_path / "run", num_threads=1))
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(n)


def weights(run):
    return load_file(next((run / "final").glob("*.safetensors")))


def steps(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def test_finished_changed_and_killed_planner_runs(tmp_path, capsys):
    straight = tmp_path / "straight"
    PlannerSFTTrainer(recipe(straight)).train()
    assert steps(straight) == [1, 2, 3, 4]
    before = (straight / "metrics.jsonl").read_text()
    capsys.readouterr()
    PlannerSFTTrainer(recipe(straight)).train()  # finished: reported, nothing retrained or logged again
    assert "the run is complete" in capsys.readouterr().out
    assert (straight / "metrics.jsonl").read_text() == before and not (straight / "checkpoint-5").exists()
    with pytest.raises(ConfigError, match=r"another recipe: optim.lr \(0.001 -> 0.05\)"):
        PlannerSFTTrainer(recipe(straight, lr=0.05)).train()
    with pytest.raises(ConfigError, match="past train.max_steps=2"):
        PlannerSFTTrainer(recipe(straight, max_steps=2)).train()

    # killed after checkpoint-2, with a half-written checkpoint-3 left behind
    killed = tmp_path / "killed"
    shutil.copytree(straight, killed)
    for name in ("final", "checkpoint-4", "metrics.jsonl"):
        shutil.rmtree(killed / name) if (killed / name).is_dir() else (killed / name).unlink()
    (killed / "checkpoint-3").mkdir()
    (killed / "checkpoint-3" / "config.json").write_text("{}")
    PlannerSFTTrainer(recipe(killed)).train()
    assert steps(killed) == [1, 2, 3, 4]
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
