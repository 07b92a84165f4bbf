"""What a resume and a run directory guarantee beyond the recipe check (tests/trainers/test_resume.py):
train.resume=force trains with the recipe's optimizer settings, not the checkpoint's; a checkpoint of other
objects is refused by name; a finished run without its metrics is a ConfigError; trackers purge by the resumed
step; checkpoints are on disk before they are renamed into place; one run at a time uses a directory; a refused
consensus resume and a killed planner run leave the directory as it was."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_resume import TINY, tiny
from test_resume import write_recipe as resume_recipe

from dllm_rl.cli import main
from dllm_rl.config import recipe_from_dict, save_recipe
from dllm_rl.errors import ConfigError
from dllm_rl.rundir import COMPLETE, LOCK


def write_recipe(tmp_path, run_dir, **sections) -> str:
    return str(resume_recipe(tmp_path, run_dir, **sections))


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------- optimizer on force


def test_force_trains_with_the_recipes_optimizer_settings(tmp_path):
    from dllm_rl.trainers.sft import SFTTrainer

    run = tmp_path / "run"
    SFTTrainer(recipe_from_dict(tiny(run))).train()
    optim = {"lr": 1e-3, "weight_decay": 0.05, "betas": [0.8, 0.9], "eps": 1e-6, "lr_scheduler": "constant"}
    trainer = SFTTrainer(recipe_from_dict(tiny(run, optim=optim, train={"max_steps": 3, "resume": "force"})))
    (group,) = trainer.optimizer.param_groups
    assert (group["lr"], group["weight_decay"], tuple(group["betas"]), group["eps"]) == (1e-3, 0.05, (0.8, 0.9), 1e-6)
    assert trainer.scheduler.base_lrs == [1e-3]
    assert trainer.optimizer.state  # the checkpoint's moments are kept
    trainer.train()
    assert [r["lr"] for r in rows(run) if "lr" in r] == [3e-3, 3e-3, 1e-3]  # step 3 trained at the new lr


def _run(recipe, model, tokenizer, groups, checkpointed=(), steps=None):
    """A Run of `recipe` over `groups` (each: a list of parameters and its own lr or None), trained to its
    train.max_steps by a step that moves every parameter; the Run, prepared."""
    from dllm_rl.trainers.common import Run

    run = Run(recipe, model, tokenizer)
    run.prepare([{"params": p, **({"lr": lr} if lr else {})} for p, lr in groups], recipe.train.max_steps, checkpointed)

    def step(_):
        for g in run.optimizer.param_groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        run.optimizer.step()
        run.optimizer.zero_grad()
        run.scheduler.step()
        return {"lr": run.scheduler.get_last_lr()[0]}

    run.loop("t", step, None, lambda w: {})
    return run


def test_force_takes_each_groups_lr_and_continues_the_schedule_from_the_new_base(tmp_path, model_factory, tokenizer):
    """A second group with its own lr (an order head's) gets the recipe's; a warmup schedule continues at its
    step from the new base learning rates; the checkpoint's optimizer state of the head stays."""
    out = tmp_path / "run"
    model, head = model_factory(), torch.nn.Linear(2, 2)
    optim = {"lr": 1e-2, "lr_scheduler": "linear", "warmup_steps": 4}
    first = recipe_from_dict(tiny(out, optim=optim, train={"max_steps": 2, "save_steps": 1}))
    _run(first, model, tokenizer, [(list(model.parameters()), None), (list(head.parameters()), 0.5)], (head,))
    again = recipe_from_dict(tiny(out, optim={**optim, "lr": 2e-2}, train={"max_steps": 10, "resume": "force"}))
    from dllm_rl.trainers.common import Run

    run = Run(again, model, tokenizer)
    groups = [{"params": list(model.parameters())}, {"params": list(head.parameters()), "lr": 0.25}]
    run.prepare(groups, 10, (head,))
    factor = 2 / 4  # linear warmup over 4 steps, at step 2
    assert run.scheduler.base_lrs == [2e-2, 0.25]
    assert [g["lr"] for g in run.optimizer.param_groups] == pytest.approx([2e-2 * factor, 0.25 * factor])
    assert run.scheduler.get_last_lr() == [g["lr"] for g in run.optimizer.param_groups]
    head_state = run.optimizer.state[run.optimizer.param_groups[1]["params"][0]]
    assert int(head_state["step"]) == 2


def test_a_checkpoint_of_other_objects_is_refused_by_name(tmp_path, model_factory, tokenizer):
    """An order head added under force (another parameter group, another checkpointed object), or one
    checkpointed object swapped for another of the same count: a ConfigError naming them, not accelerate's
    error or a silent load into the wrong object."""
    out = tmp_path / "run"
    model, head = model_factory(), torch.nn.Linear(2, 2)
    _run(recipe_from_dict(tiny(out)), model, tokenizer, [(list(model.parameters()), None)])
    again = recipe_from_dict(tiny(out, train={"max_steps": 3, "resume": "force"}))
    from dllm_rl.trainers.common import Run

    run = Run(again, model, tokenizer)
    with pytest.raises(ConfigError, match=r"checkpoint-2 holds the state of other objects .*param_groups: 1 in"):
        run.prepare([{"params": list(model.parameters())}, {"params": list(head.parameters()), "lr": 0.5}], 3, (head,))
    swapped = recipe_from_dict(tiny(tmp_path / "swap"))  # the same number of objects, of other kinds
    _run(swapped, model, tokenizer, [(list(model.parameters()), None)], (torch.nn.Linear(2, 2),))
    run = Run(recipe_from_dict(tiny(tmp_path / "swap", train={"max_steps": 3, "resume": "force"})), model, tokenizer)
    with pytest.raises(ConfigError, match=r"checkpointed: \['LambdaLR', 'Linear'\] in checkpoint-2, .*'Conv1d'"):
        run.prepare([{"params": list(model.parameters())}], 3, (torch.nn.Conv1d(1, 1, 1),))


# ------------------------------------------------------------------------------------------- finished runs


def test_a_finished_run_without_its_metrics_is_a_config_error(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["sft", write_recipe(tmp_path, run)]) == 0
    bare = tmp_path / "bare"
    shutil.copytree(run / "final", bare / "final")
    capsys.readouterr()
    assert main(["sft", write_recipe(tmp_path, bare)]) == 2
    err = capsys.readouterr().err
    assert "holds a finished run whose metrics.jsonl is missing" in err and "pick a new train.output_dir" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------------------------------- trackers


def _purge_steps(monkeypatch) -> list:
    import dllm_rl.metrics as metrics

    seen, real = [], metrics.tracker_init_kwargs
    monkeypatch.setattr(
        metrics, "tracker_init_kwargs", lambda *a: seen.append(real(*a)["tensorboard"]["purge_step"]) or real(*a)
    )
    return seen


def test_tensorboard_purges_by_the_resumed_step_not_by_the_history(tmp_path, monkeypatch):
    """A run killed before its first checkpoint restarts fresh: purge everything it logged (0). A checkpoint
    whose history is empty (logging_steps past it) resumes: purge after its step, not nothing."""
    pytest.importorskip("tensorboard")
    from dllm_rl.trainers.sft import SFTTrainer

    seen = _purge_steps(monkeypatch)
    run = tmp_path / "run"
    train = {"report_to": ["tensorboard"], "max_steps": 3, "logging_steps": 2, "save_total_limit": 0}
    SFTTrainer(recipe_from_dict(tiny(run, train=train))).train()
    for name in ("checkpoint-2", "checkpoint-3", "final"):  # killed after checkpoint-1, which logged nothing
        shutil.rmtree(run / name)
    SFTTrainer(recipe_from_dict(tiny(run, train=train))).train()
    for name in ("checkpoint-1", "checkpoint-2", "checkpoint-3", "final"):  # killed before any checkpoint
        shutil.rmtree(run / name)
    SFTTrainer(recipe_from_dict(tiny(run, train=train))).train()
    assert seen == [0, 2, 0]


def test_a_run_with_an_empty_history_keeps_its_wandb_id(tmp_path):
    from dllm_rl.metrics import tracker_init_kwargs

    first = tracker_init_kwargs(tmp_path, {"wandb"}, 0)["wandb"]["id"]
    assert tracker_init_kwargs(tmp_path, {"wandb"}, 1)["wandb"]["id"] == first


def test_the_metrics_rewrite_on_resume_is_renamed_into_place(tmp_path, monkeypatch):
    """A kill while metrics.jsonl is rewritten (here: before the rename) leaves the old file whole."""
    from accelerate import Accelerator

    import dllm_rl.metrics as metrics

    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')

    def killed(*a):
        raise KeyboardInterrupt

    monkeypatch.setattr(metrics.os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        metrics.MetricsLogger(Accelerator(cpu=True), str(tmp_path), [{"step": 1}], start_step=1)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'


# ------------------------------------------------------------------------------------------- durability


def test_a_checkpoint_is_on_disk_before_it_is_marked_and_renamed(tmp_path, monkeypatch):
    from dllm_rl.checkpoint import save_checkpoint, save_final
    from dllm_rl.models.load import load_model
    from dllm_rl.runtime import make_accelerator

    tmp_path = Path(os.path.realpath(tmp_path))  # as /proc/self/fd names it
    recipe = recipe_from_dict(tiny(tmp_path))
    model, tok = load_model(recipe.model)
    acc = make_accelerator(recipe)
    model, opt = acc.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3))
    acc.register_for_checkpointing(torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0))
    events, fsync, replace = [], os.fsync, os.replace

    def synced(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return fsync(fd)

    def renamed(src, dst):
        events.append(("replace", str(src), str(dst)))
        return replace(src, dst)

    monkeypatch.setattr(os, "fsync", synced)
    monkeypatch.setattr(os, "replace", renamed)
    saves = (
        lambda: save_checkpoint(tmp_path, 1, acc, model, tok, recipe, {}),
        lambda: save_final(tmp_path, acc, model, tok, recipe),
    )
    for save in saves:
        events.clear()
        final = save()
        tmp = str(final) + ".tmp"
        moved = events.index(("replace", tmp, str(final)))
        synced_before = [p for e, p, *_ in events[:moved] if e == "fsync"]
        entries = {str(p).replace(str(final), tmp): p.is_file() for p in final.rglob("*")}
        assert set(entries) <= set(synced_before), sorted(set(entries) - set(synced_before))  # files and directories
        assert ("fsync", str(tmp_path)) in events[moved:]  # the rename itself
        if final.name != "final":  # the files before the marker that vouches for them
            files = [p for p in synced_before if entries.get(p)]
            assert files[-1] == os.path.join(tmp, COMPLETE) and len(files) == sum(entries.values())


# ------------------------------------------------------------------------------------------- one run at a time


@contextlib.contextmanager
def held(lock_file: Path):
    """Another process holding lock_file's flock while the block runs; yields its pid."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a'); fcntl.flock(f, fcntl.LOCK_EX); print(1, flush=True);"
            " time.sleep(60)",
            str(lock_file),
        ],
        stdout=subprocess.PIPE,
    )
    try:
        holder.stdout.readline()
        yield holder.pid
    finally:
        holder.kill()
        holder.wait()


def is_free(run: Path) -> bool:
    with open(run / LOCK) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def test_a_directory_in_use_by_another_run_is_refused_untouched(tmp_path):
    from dllm_rl.trainers.sft import SFTTrainer

    run = tmp_path / "run"
    (run / "checkpoint-5.tmp").mkdir(parents=True)  # the other run's checkpoint being written
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    with held(run / LOCK) as pid:
        with pytest.raises(ConfigError, match=rf"in use by another run \(process {pid} holds .*run.lock\)"):
            SFTTrainer(recipe_from_dict(tiny(run)))
        assert (run / "checkpoint-5.tmp").is_dir() and (run / "metrics.jsonl").read_text() == '{"step": 1}\n'
    SFTTrainer(recipe_from_dict(tiny(run))).train()  # the holder is gone: the directory is free
    assert is_free(run)  # and a finished run holds it no longer


def test_the_planner_trainer_holds_its_directory_too(tmp_path):
    """The planner's SFT (TRL's trainer) takes the same lock: a directory in use is refused before tidy removes
    the live run's half-written final; its own run holds the lock while it trains and frees it at the end."""
    from accelerate.state import AcceleratorState

    from dllm_rl.trainers.planner import PlannerSFTTrainer

    run = tmp_path / "run"
    (run / "final.tmp").mkdir(parents=True)  # the other run's final/ being written
    data = {
        "algorithm": "planner_sft",
        "data": TINY["data"],
        "hybrid": {"planner": {"tiny": {"hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64}}},
        "train": {"max_steps": 2, "batch_size": 8, "save_steps": 0, "num_threads": 1, "output_dir": str(run)},
    }
    try:
        with held(run / LOCK) as pid:
            with pytest.raises(ConfigError, match=rf"in use by another run \(process {pid} holds .*run.lock\)"):
                PlannerSFTTrainer(recipe_from_dict(data))
            assert (run / "final.tmp").is_dir()
        trainer = PlannerSFTTrainer(recipe_from_dict(data))
        assert not is_free(run)  # held from the check of the directory on
        trainer.train()
        assert (run / "final").is_dir() and is_free(run)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # TRL's trainer set the process-wide state


def test_a_run_that_raised_frees_its_directory(tmp_path):
    from dllm_rl.trainers.sft import SFTTrainer

    trainer = SFTTrainer(recipe_from_dict(tiny(tmp_path / "run")))

    def broken(step):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError):
        trainer.run.loop("sft", broken, None, lambda w: {})
    assert is_free(tmp_path / "run")


# ------------------------------------------------------------------------------------------- trainers


def test_a_mid_round_consensus_checkpoint_is_refused_before_the_directory_changes(tmp_path, monkeypatch):
    import dllm_rl.trainers.common as common
    from dllm_rl.trainers.consensus import ConsensusTrainer

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(common, "load_model", no_model)
    data = tiny(tmp_path, train={"max_steps": 4, "save_steps": 2})
    data["algorithm"], data["consensus"] = "consensus", {"steps_per_round": 2}
    recipe = recipe_from_dict(data)
    ckpt = tmp_path / "checkpoint-3"
    ckpt.mkdir()
    save_recipe(recipe, ckpt / "recipe.yaml")
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 3}))
    (ckpt / COMPLETE).write_text("")
    (tmp_path / "metrics.jsonl").write_text('{"step": 3}\n{"step": 4}\n')
    with pytest.raises(ConfigError, match="step 3, mid-way through a round of consensus.steps_per_round=2"):
        ConsensusTrainer(recipe)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 3}\n{"step": 4}\n'


def test_the_planner_trainer_puts_back_a_final_whose_replacement_never_arrived(tmp_path):
    """Killed between replace_dir's two renames: final.old, no final/. The planner trainer tidies first, as the
    others do, and so finds its finished run."""
    from dllm_rl.trainers.planner import PlannerSFTTrainer

    data = {"algorithm": "planner_sft", "data": TINY["data"], "train": {"max_steps": 4, "output_dir": str(tmp_path)}}
    recipe = recipe_from_dict(data)
    (tmp_path / "final.old").mkdir()
    save_recipe(recipe, tmp_path / "final.old" / "recipe.yaml")
    (tmp_path / "metrics.jsonl").write_text('{"step": 4, "plan_accuracy": 0.5}\n')
    trainer = PlannerSFTTrainer.__new__(PlannerSFTTrainer)
    trainer.recipe = recipe
    assert trainer._check_run_dir(tmp_path) == "finished"
    assert (tmp_path / "final" / "recipe.yaml").is_file() and not (tmp_path / "final.old").exists()
