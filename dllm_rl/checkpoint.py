"""Checkpoints: HF-format weights (or LoRA adapters), tokenizer, resolved recipe and trainer state.

Written into the run directory's layout (rundir.py):
    checkpoint-<step>/   model files (config.json, model.safetensors | adapter_*), tokenizer files,
                         recipe.yaml, trainer_state.json, accelerator_state/ (optimizer, scheduler, RNG),
                         order_policy.pt when a learned unmasking order is trained (rollout.order=policy),
                         edit_policy.pt when an edit head is trained (rollout.edit), and COMPLETE, written last
    final/               model files + recipe.yaml (+ order_policy.pt, edit_policy.pt, a trained planner/, GRPO's
                         reward_curve.png) only (what `dllm-rl generate` / `eval` and a later recipe's model.path
                         load; small enough to ship)
Every directory is written under a temporary name, flushed to disk (fsync) and renamed into place, and an old
checkpoint is renamed before it is deleted, so a killed run (or a machine that loses power) never leaves a
half-written or half-deleted checkpoint under a real name; resume picks the newest complete checkpoint-<step>.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .config import Recipe, save_recipe
from .models.base import unwrap
from .rundir import COMPLETE, checkpoints


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory`, and the directories themselves, to disk: a rename is durable before
    the data it names otherwise, so a crash after it could leave a complete-looking directory of empty files."""
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        fsync_dir(root)


def fsync_dir(directory) -> None:
    """Flush a directory's entries (the renames into it) to disk, where the platform can (not on Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def replace_dir(tmp: Path, final: Path) -> None:
    """Move the finished directory `tmp` to `final` by renames only (an older `final` is set aside first)."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    fsync_dir(final.parent)


def save_model_files(
    directory: Path, model, tokenizer, recipe: Recipe, accelerator, state=None, order_policy=None, edit_policy=None
) -> None:
    """Model weights in HF format (adapters only for peft models), tokenizer, resolved recipe, and the
    learned order head and edit head when there are.

    `state`: the full state dict when the caller already gathered it (ZeRO-3 gathers collectively).
    """
    target = accelerator.unwrap_model(model)
    if hasattr(target, "peft_config"):  # LoRA: save the adapter, the base model stays where it was
        target.save_pretrained(directory, state_dict=state)
    else:
        unwrap(target).save_pretrained(directory, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    save_recipe(recipe, directory / "recipe.yaml")
    if order_policy is not None:
        order_policy.save(directory)
    if edit_policy is not None:
        edit_policy.save(directory)


def save_checkpoint(
    run_dir,
    step: int,
    accelerator,
    model,
    tokenizer,
    recipe: Recipe,
    state: dict,
    keep: int = 2,
    order_policy=None,
    edit_policy=None,
    write=(),
) -> Path:
    """Atomically write checkpoint-<step> (all processes must call this; rank 0 writes the model files). write:
    callables(directory) that add their own files (a trained planner) before the COMPLETE marker."""
    run = Path(run_dir)
    final = run / f"checkpoint-{step}"
    tmp = run / f"checkpoint-{step}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp / "accelerator_state"))  # DeepSpeed: every rank writes its own shards
    accelerator.wait_for_everyone()  # ... and its RNG state, before rank 0 renames the directory
    state_dict = accelerator.get_state_dict(model)  # collective under ZeRO-3: every rank calls it
    if accelerator.is_main_process:
        save_model_files(tmp, model, tokenizer, recipe, accelerator, state_dict, order_policy, edit_policy)
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=1))
        for fn in write:
            fn(tmp)
        fsync_tree(tmp)  # the files on disk before the marker that vouches for them
        write_synced(tmp / COMPLETE, "")
        fsync_dir(tmp)
        replace_dir(tmp, final)
        for old in checkpoints(run)[:-keep] if keep > 0 else []:
            doomed = old.with_name(old.name + ".deleting")  # out of the listing at once, then deleted
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(path: Path, accelerator) -> dict:
    """Restore model/optimizer/scheduler/RNG into the prepared objects; return the trainer state."""
    accelerator.load_state(str(Path(path) / "accelerator_state"))
    return json.loads((Path(path) / "trainer_state.json").read_text())


def save_final(
    run_dir,
    accelerator,
    model,
    tokenizer,
    recipe: Recipe,
    extra: dict | None = None,
    order_policy=None,
    edit_policy=None,
    write=(),
) -> Path:
    """Atomically write run_dir/final: model files + recipe (no optimizer state). write: callables(directory)
    that add their own files (a trained planner, the reward curve) before the directory is renamed into place,
    so a finished run's final/ is whole or absent."""
    run = Path(run_dir)
    final, tmp = run / "final", run / "final.tmp"
    state = accelerator.get_state_dict(model)  # collective under DeepSpeed ZeRO-3: every rank calls it
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_model_files(tmp, model, tokenizer, recipe, accelerator, state, order_policy, edit_policy)
        for name, content in (extra or {}).items():
            (tmp / name).write_text(content)
        for fn in write:
            fn(tmp)
        fsync_tree(tmp)
        replace_dir(tmp, final)
    accelerator.wait_for_everyone()
    return final
