"""Checkpoints survive a kill at any moment, rotation included: every checkpoint a run directory lists loads
(model, tokenizer, trainer state), and a restart resumes and finishes on the uninterrupted run's weights.

Two tests: the slow one kills a real `dllm-rl sft` process with SIGKILL at random moments, many times over; the
fast one stops `save_checkpoint` at each of its file-system mutations in turn (every rename, every file deleted
while an old checkpoint is rotated out), which a kill -9 can hit only by chance."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModel, AutoTokenizer

from dllm_rl.rundir import checkpoints, tidy

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "algorithm": "sft",
    "model": {"tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}},
    "data": {"task": "sudoku", "train_size": 256, "eval_size": 4},
    "rollout": {"max_completion_length": 20, "steps": 10},
    "optim": {"lr": 3e-3, "lr_scheduler": "constant"},
    "train": {"batch_size": 8, "logging_steps": 1, "eval_steps": 0, "save_steps": 1, "num_threads": 1},
}


def assert_loads(ckpt: Path) -> int:
    """Load everything a checkpoint holds, as `generate` and resume would; return its step."""
    model = AutoModel.from_pretrained(ckpt)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.mask_token_id == model.config.mask_token_id
    yaml.safe_load((ckpt / "recipe.yaml").read_text())
    state = json.loads((ckpt / "trainer_state.json").read_text())
    acc = ckpt / "accelerator_state"
    files = sorted(p.name for p in acc.iterdir())
    assert {"optimizer.bin", "random_states_0.pkl", "custom_checkpoint_0.pkl"} <= set(files), (ckpt, files)
    for p in acc.iterdir():
        if p.suffix == ".safetensors":
            load_file(p)
        else:
            torch.load(p, weights_only=False)
    assert ckpt.name == f"checkpoint-{state['step']}"
    return state["step"]


def _write(tmp_path, run_dir, max_steps, keep, name="r.yaml") -> Path:
    data = json.loads(json.dumps(TINY))
    data["train"].update({"output_dir": str(run_dir), "max_steps": max_steps, "save_total_limit": keep})
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


def _launch(recipe: Path) -> subprocess.Popen:
    """The run, its stderr (the progress bar: more than a pipe holds) in a file beside the recipe: proc.log()."""
    log = recipe.with_suffix(".log")
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "dllm_rl", "sft", str(recipe)],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=err,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"},
        )
    proc.log = lambda: log.read_text(errors="replace")[-2000:]
    return proc


def _newest(run: Path) -> int:
    found = checkpoints(run)
    return int(found[-1].name.split("-")[1]) if found else 0


@pytest.mark.slow
def test_kill_9_at_random_moments_leaves_only_loadable_checkpoints_and_resumes(tmp_path):
    rng = random.Random(0)
    steps, kills = 200, 12  # a step takes 0.03-0.1 s: twelve kills land well before the end
    straight = tmp_path / "straight"
    proc = _launch(_write(tmp_path, straight, steps, 2, "straight.yaml"))
    assert proc.wait(timeout=600) == 0, proc.log()
    run = tmp_path / "killed"
    killed_at = []
    for i in range(kills):
        keep = 1 + i % 2  # save_total_limit 1 and 2 in turn (a key a resumed run may change)
        proc = _launch(_write(tmp_path, run, steps, keep))
        start = _newest(run)
        deadline = time.time() + 300
        while _newest(run) == start and proc.poll() is None:  # wait until it resumed and saved once
            assert time.time() < deadline, "no checkpoint written"
            time.sleep(0.01)
        assert proc.poll() is None, f"the run ended before it was killed: {proc.log()}"
        time.sleep(rng.uniform(0.0, 0.6))  # steps save and rotate every ~0.1 s: any moment of either
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(_newest(run))
        listed = checkpoints(run)
        assert listed, "no complete checkpoint after a kill"
        for ckpt in listed:
            assert_loads(ckpt)
        # what a killed rotation leaves under a real name is only ever a complete checkpoint
        for p in run.iterdir():
            if p.name.startswith("checkpoint-") and "." not in p.name:
                assert p in listed, sorted(x.name for x in run.iterdir())
    assert killed_at[-1] < steps, killed_at  # every kill landed before the end
    proc = _launch(_write(tmp_path, run, steps, 2))
    assert proc.wait(timeout=600) == 0, proc.log()
    assert [c.name for c in checkpoints(run)] == [f"checkpoint-{steps - 1}", f"checkpoint-{steps}"]
    assert not [p.name for p in run.iterdir() if p.name.endswith((".tmp", ".old", ".deleting"))]
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, steps + 1))
    a, b = load_file(straight / "final" / "model.safetensors"), load_file(run / "final" / "model.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=name)


class Killed(BaseException):
    """A stand-in for SIGKILL inside the process: nothing catches it (rmtree's ignore_errors catches OSError)."""


MUTATIONS = ("replace", "rename", "unlink", "rmdir", "remove")


def _stop_at(monkeypatch, k: int | None) -> dict:
    """Make the k-th file-system mutation (rename, replace, unlink, rmdir) raise Killed; count them all."""
    seen = {"n": 0}
    for name in MUTATIONS:
        real = getattr(os, name)

        def wrapped(*args, _real=real, **kwargs):
            seen["n"] += 1
            if seen["n"] == k:
                raise Killed
            return _real(*args, **kwargs)

        monkeypatch.setattr(os, name, wrapped)
    return seen


@pytest.mark.parametrize("keep", [1, 2])
def test_a_save_stopped_at_any_file_operation_leaves_only_loadable_checkpoints(tmp_path, monkeypatch, keep):
    from dllm_rl.checkpoint import save_checkpoint
    from dllm_rl.config import recipe_from_dict
    from dllm_rl.models.load import load_model
    from dllm_rl.runtime import make_accelerator

    recipe = recipe_from_dict({**TINY, "train": {**TINY["train"], "output_dir": str(tmp_path)}})
    model, tok = load_model(recipe.model)
    acc = make_accelerator(recipe)  # as the trainers make it
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    acc.register_for_checkpointing(sched)

    def save(run, step):
        save_checkpoint(run, step, acc, model, tok, recipe, {"history": []}, keep=keep)

    # how many mutations one save with rotation makes (the third save rotates out an old checkpoint at keep <= 2)
    probe = tmp_path / "probe"
    save(probe, 1), save(probe, 2)
    with monkeypatch.context() as m:
        seen = _stop_at(m, None)
        save(probe, 3)
    total = seen["n"]
    assert total > 10  # renames plus every file of the rotated-out checkpoint

    for k in range(1, total + 1):
        run = tmp_path / f"k{k}"
        save(run, 1), save(run, 2)
        with monkeypatch.context() as m:
            _stop_at(m, k)
            with pytest.raises(Killed):
                save(run, 3)
        tidy(run)  # what a restarted trainer does first
        listed = checkpoints(run)
        steps = [assert_loads(c) for c in listed]
        assert steps and steps[-1] >= 2, (k, steps)  # the newest complete checkpoint before the save survives
        assert not [p.name for p in run.iterdir() if p.name.endswith((".tmp", ".old", ".deleting"))], k
        for p in run.iterdir():  # nothing incomplete under a real name
            assert p in listed, (k, p.name)
        save(run, 3)  # and the next save works
        assert [c.name for c in checkpoints(run)][-1] == "checkpoint-3"
        shutil.rmtree(run)


def test_tidy_touches_only_what_a_run_writes(tmp_path):
    """tidy removes final.tmp / checkpoint-N.tmp / checkpoint-N.deleting and puts back a final.old whose
    replacement never arrived; a user's own directories with those endings stay as they are."""
    names = ["final.old", "checkpoint-3.tmp", "checkpoint-2.deleting", "notes.tmp", "data.old", "x.deleting"]
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(name)
    tidy(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.old", "final", "notes.tmp", "x.deleting"]
    assert (tmp_path / "final" / "f").read_text() == "final.old"
