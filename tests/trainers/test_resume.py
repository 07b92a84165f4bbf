"""A new run must not silently become an old one (train.resume).

true: the newest complete checkpoint of train.output_dir is continued only when its recorded recipe matches this
one (keys that only change how a run is watched or stored, such as train.max_steps, may differ); a differing key
stops with one line naming it and the two ways out. "force": continued whatever differs. false: a directory
that holds a run is refused. A finished run asked for again prints its recorded result and writes nothing."""

import json
import shutil
from pathlib import Path

import pytest
import yaml

from dllm_rl.cli import main
from dllm_rl.config import recipe_from_dict
from dllm_rl.errors import ConfigError
from dllm_rl.trainers.grpo import GRPOTrainer
from dllm_rl.trainers.sft import SFTTrainer

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "algorithm": "sft",
    "model": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}},
    "data": {"task": "sudoku", "train_size": 64, "eval_size": 4},
    "rollout": {"max_completion_length": 20, "steps": 10},
    "optim": {"lr": 3e-3, "lr_scheduler": "constant"},
    "train": {"max_steps": 2, "batch_size": 4, "logging_steps": 1, "eval_steps": 0, "save_steps": 1, "num_threads": 1},
}


def tiny(run_dir, **sections) -> dict:
    """TINY writing into `run_dir`, each section updated with `sections`' values."""
    data = json.loads(json.dumps(TINY))
    data["train"]["output_dir"] = str(run_dir)
    for section, values in sections.items():
        data[section].update(values)
    return data


def write_recipe(tmp_path, run_dir, name="r.yaml", **sections) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(tiny(run_dir, **sections)))
    return path


def snapshot(run_dir: Path) -> dict:
    """Every file of a run directory with its bytes and modification time."""
    return {
        str(p.relative_to(run_dir)): (p.read_bytes(), p.stat().st_mtime_ns)
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


def steps_logged(run_dir: Path) -> list[int]:
    """The steps whose training loss metrics.jsonl holds."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in rows if "loss" in r]


def test_the_same_recipe_resumes_and_a_finished_run_is_not_retrained_or_rewritten(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, run)
    assert main(["sft", str(recipe)]) == 0
    first = capsys.readouterr().out
    accuracy = first.strip().splitlines()[-1].split("held-out accuracy ")[1].split(" ")[0]
    before = snapshot(run)
    assert main(["sft", str(recipe)]) == 0  # the same command again: nothing trained, nothing written
    again = capsys.readouterr().out
    assert "the run is complete: nothing to train" in again
    assert f"held-out accuracy {accuracy}, as recorded in" in again
    assert snapshot(run) == before
    # a longer run of the same recipe (train.max_steps may differ) continues from the last checkpoint
    assert main(["sft", str(recipe), "train.max_steps=3"]) == 0
    assert "checkpoint-2 at step 2" in capsys.readouterr().out
    assert steps_logged(run) == [1, 2, 3]
    assert yaml.safe_load((run / "final" / "recipe.yaml").read_text())["train"]["max_steps"] == 3


def test_a_differing_key_stops_with_one_line_naming_it_and_the_ways_out(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, run)
    assert main(["sft", str(recipe)]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main(["sft", str(recipe), "optim.lr=1e-3", "rollout.steps=20"]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("dllm-rl: error:")]
    assert len(lines) == 1, err
    assert "optim.lr" in lines[0] and "rollout.steps" in lines[0], lines[0]
    assert "train.output_dir" in lines[0] and "train.resume=force" in lines[0], lines[0]
    assert snapshot(run) == before  # the recorded recipe still describes the model beside it
    # the same through the Python API: ConfigError before anything is trained
    data = yaml.safe_load(recipe.read_text())
    data["optim"]["lr"] = 1e-3
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        SFTTrainer(recipe_from_dict(data))
    assert snapshot(run) == before


def test_force_continues_with_the_new_settings(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["sft", str(write_recipe(tmp_path, run))]) == 0
    capsys.readouterr()
    assert (
        main(["sft", str(write_recipe(tmp_path, run)), "optim.lr=1e-3", "train.max_steps=3", "train.resume=force"]) == 0
    )
    assert "checkpoint-2 at step 2" in capsys.readouterr().out
    assert steps_logged(run) == [1, 2, 3]
    assert yaml.safe_load((run / "final" / "recipe.yaml").read_text())["optim"]["lr"] == 1e-3


def test_force_on_a_finished_run_still_rewrites_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, run)
    assert main(["sft", str(recipe)]) == 0
    before = snapshot(run)
    assert main(["sft", str(recipe), "optim.lr=1e-3", "train.resume=force"]) == 0
    assert "as recorded in" in capsys.readouterr().out
    assert snapshot(run) == before


def test_resume_false_refuses_a_directory_that_holds_a_run(tmp_path, capsys):
    run = tmp_path / "run"
    recipe = write_recipe(tmp_path, run)
    assert main(["sft", str(recipe)]) == 0
    before = snapshot(run)
    capsys.readouterr()
    assert main(["sft", str(recipe), "train.resume=false"]) == 2
    err = capsys.readouterr().err
    assert "train.resume is false" in err and "train.output_dir" in err, err
    assert snapshot(run) == before
    # a run directory whose checkpoints were deleted (final/ kept) is still a run
    for ckpt in run.glob("checkpoint-*"):
        shutil.rmtree(ckpt)
    assert main(["sft", str(recipe), "train.resume=false"]) == 2
    before = snapshot(run)
    assert main(["sft", str(recipe), "optim.lr=1e-3"]) == 2  # differs from final/recipe.yaml
    assert "optim.lr" in capsys.readouterr().err
    assert main(["sft", str(recipe)]) == 0  # the same recipe: its recorded result, nothing trained
    assert "as recorded in" in capsys.readouterr().out
    assert snapshot(run) == before


def test_a_checkpoint_directory_a_trainer_did_not_write_is_never_overwritten(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoint-2").mkdir(parents=True)
    (run / "checkpoint-2" / "notes.txt").write_text("mine")
    assert main(["sft", str(write_recipe(tmp_path, run))]) == 2
    err = capsys.readouterr().err
    assert "checkpoint-2 without the COMPLETE marker" in err and "move it out" in err, err
    assert (run / "checkpoint-2" / "notes.txt").read_text() == "mine" and not (run / "final").exists()


def test_a_finished_grpo_run_reports_its_recorded_final_accuracy(tmp_path, capsys):
    """GRPO logs the held-out accuracy after the last checkpoint; asked again, the finished run reports that
    value (not an earlier one) and leaves its metrics.jsonl as it was."""
    data = {
        "algorithm": "grpo",
        "model": {"path": str(ROOT / "checkpoints/tiny/sudoku-sft")},
        "data": {"task": "sudoku", "train_size": 16, "eval_size": 4},
        "rollout": {"max_completion_length": 20, "steps": 10, "temperature": 1.0},
        "grpo": {"num_generations": 2},
        "rewards": [{"name": "sudoku_cells"}],
        "optim": {"lr": 1e-2, "lr_scheduler": "constant"},
        "train": {
            "max_steps": 2,
            "batch_size": 2,
            "output_dir": str(tmp_path / "run"),
            "eval_steps": 0,
            "save_steps": 0,
            "logging_steps": 1,
            "num_threads": 1,
        },
        "eval": {"temperature": 1.0},
    }
    first = GRPOTrainer(recipe_from_dict(data)).train()
    before = snapshot(tmp_path / "run")
    capsys.readouterr()
    again = GRPOTrainer(recipe_from_dict(data)).train()
    assert again == first
    assert f"-> after {first['after']:.3f}" in capsys.readouterr().out
    assert snapshot(tmp_path / "run") == before


def without_timing(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("seconds", "tokens_per_s", "steps_per_s"))} for r in rows]


def test_a_stale_final_is_rewritten_and_a_checkpoint_past_max_steps_is_refused(tmp_path, capsys):
    """A run extended from 2 to 4 steps and killed after checkpoint-4 but before final/ was rewritten holds the
    2-step final/: it is not a finished 4-step run. A checkpoint past train.max_steps is not published as a
    shorter run."""
    run = tmp_path / "run"
    recipe = str(write_recipe(tmp_path, run))
    assert main(["sft", recipe]) == 0
    shutil.copytree(run / "final", tmp_path / "final-2")
    assert main(["sft", recipe, "train.max_steps=4"]) == 0
    four = (run / "final" / "model.safetensors").read_bytes()
    shutil.rmtree(run / "final")
    shutil.copytree(tmp_path / "final-2", run / "final")  # the kill: final/ still the 2-step run's
    capsys.readouterr()
    assert main(["sft", recipe, "train.max_steps=4"]) == 0
    assert "nothing to train" not in capsys.readouterr().out
    assert (run / "final" / "model.safetensors").read_bytes() == four
    assert yaml.safe_load((run / "final" / "recipe.yaml").read_text())["train"]["max_steps"] == 4
    before = snapshot(run)
    assert main(["sft", recipe, "train.max_steps=3"]) == 2
    assert "holds checkpoint-4, past train.max_steps=3" in capsys.readouterr().err
    assert snapshot(run) == before


def test_a_new_horizon_under_a_decaying_schedule_needs_force(tmp_path, capsys):
    """cosine decays over train.max_steps: continuing 2 steps to 3 would follow neither schedule."""
    run = tmp_path / "run"
    recipe = str(write_recipe(tmp_path, run, optim={"lr_scheduler": "cosine"}))
    assert main(["sft", recipe]) == 0
    capsys.readouterr()
    assert main(["sft", recipe, "train.max_steps=3"]) == 2
    assert "optim.lr_scheduler=cosine decays over train.max_steps" in capsys.readouterr().err
    assert main(["sft", recipe, "train.max_steps=3", "train.resume=force"]) == 0
    assert steps_logged(run) == [1, 2, 3]


def test_a_resumed_run_logs_the_window_it_was_killed_in(tmp_path):
    """logging_steps 3, save_steps 2: the step-3 row averages steps 1-3 in a straight run, and in a run killed
    after checkpoint-2 too (the steps since the last row are saved with the checkpoint)."""
    train = {"max_steps": 4, "logging_steps": 3, "save_steps": 2}
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(["sft", str(write_recipe(tmp_path, straight, train=train))]) == 0
    shutil.copytree(straight, killed)
    for name in ("final", "checkpoint-4"):
        shutil.rmtree(killed / name)
    assert main(["sft", str(write_recipe(tmp_path, killed, train=train))]) == 0
    assert without_timing(killed) == without_timing(straight)
