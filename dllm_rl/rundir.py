"""The layout of a run directory (train.output_dir), read by loading and resume, written by checkpoint.py.

    checkpoint-<step>/   model files, tokenizer, recipe.yaml, trainer_state.json, accelerator_state/, and,
                         written last, COMPLETE: only a directory holding it counts as a checkpoint
    final/               model files + recipe.yaml, and what the run trained besides the model: order_policy.pt
                         (a learned unmasking order), edit_policy.pt (an edit head), planner/ (a trained planner);
                         for GRPO also reward_curve.png. What `generate` / `eval` load (resolve_model_dir: a run
                         directory stands for its final/, else its newest checkpoint)
    metrics.jsonl        the logged rows (trackers.json: the W&B run id a resumed run continues)
    run.lock             locked (flock) by the process whose run uses the directory, while it runs
    <name>.tmp           a directory being written (renamed into place when complete)
    <name>.old           the previous version of <name> while it is being replaced
    <name>.deleting      a checkpoint being rotated out (renamed first, then deleted)

A kill -9 at any moment leaves only complete checkpoints under their real names; `tidy` (run when a trainer
starts) removes the leftovers and puts back a <name>.old whose replacement never arrived (only for the names
above: final and checkpoint-<step>; other directories are left as they are). A checkpoint-<step>
without COMPLETE is never listed and never deleted (it is not ours to judge): a trainer refuses to start in a
directory that holds one, rather than overwrite it.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

from .errors import DllmRlError

try:
    import fcntl
except ImportError:  # Windows: no flock, runs are not guarded against each other
    fcntl = None

COMPLETE = "COMPLETE"
LOCK = "run.lock"
_HELD: dict[str, object] = {}  # run directories this process holds: real path -> the open lock file
_CKPT = re.compile(r"^checkpoint-(\d+)$")
# what a writer here leaves half-done (checkpoint.py, trainers/planner.py); anything else in a run directory,
# a user's "notes.tmp/" or "data.old/", is not ours to remove or rename
_OURS = re.compile(r"^(final|checkpoint-\d+)\.(tmp|old|deleting)$")


def is_complete(path: str | os.PathLike) -> bool:
    return (Path(path) / COMPLETE).is_file()


def checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint directories of a run, oldest first."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.iterdir() if (m := _CKPT.match(p.name)) and is_complete(p)]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = checkpoints(run_dir)
    return found[-1] if found else None


def tidy(run_dir: str | os.PathLike) -> None:
    """Remove what a killed run left half-done; restore a replaced directory whose new version is missing."""
    run = Path(run_dir)
    if not run.is_dir():
        return
    for p in run.iterdir():
        if not p.is_dir() or not (m := _OURS.match(p.name)):
            continue
        live = p.with_name(m.group(1))
        if m.group(2) == "old" and not live.exists():
            os.replace(p, live)
        else:
            shutil.rmtree(p, ignore_errors=True)


def lock(run_dir: str | os.PathLike) -> str | None:
    """Hold run_dir's lock (an exclusive flock on run_dir/run.lock, which the system drops when the process ends,
    kill -9 included); None when held, else who holds it. One process's later run of the same directory takes the
    lock over from an earlier one (a run that raised, whose traceback may still reference it)."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    unlock(run)
    if fcntl is None:
        return None
    f = open(run / LOCK, "a")  # "a": never truncates nor touches a finished run's file
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(run / LOCK)
        f.close()
        return f"process {pid} holds {run / LOCK}" if pid else f"a process holds {run / LOCK}"
    except OSError:  # a filesystem without flock (some network mounts): unguarded, as on Windows
        f.close()
        return None
    _HELD[os.path.realpath(run)] = f
    return None


def unlock(run_dir: str | os.PathLike) -> None:
    """Release run_dir's lock if this process holds it."""
    f = _HELD.pop(os.path.realpath(run_dir), None)
    if f is not None:
        f.close()


def _holder(path: Path) -> int | None:
    """The process holding `path`'s flock, from Linux's /proc/locks (None elsewhere or when it is gone)."""
    try:
        inode = str(os.stat(path).st_ino)
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()  # "1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF"
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == inode:
                return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


def _is_hub_id(path: str) -> bool:
    parts = path.split("/")
    return len(parts) == 2 and all(parts) and not path.startswith((".", "~", "/"))


def resolve_model_dir(path: str, key: str = "model.path (or the CHECKPOINT argument)") -> str:
    """A directory with config.json (itself, its final/, or its newest checkpoint), or a hub id as given; `key`:
    the setting errors name."""
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in [p, p / "final"]:
            if (candidate / "config.json").is_file() or (candidate / "adapter_config.json").is_file():
                return str(candidate)
        ckpt = latest_checkpoint(p)
        if ckpt is not None:
            return str(ckpt)
        raise DllmRlError(
            f"{path!r} is not a model directory (no config.json, final/ or checkpoint-*/ "
            f"inside); pass a directory written by `dllm-rl sft/train` or a hub model id"
        )
    if p.exists():
        raise DllmRlError(
            f"{key}: {path!r} is a file, not a model directory (a directory with config.json, a run directory, or "
            f"a hub id); give one of those"
        )
    if not _is_hub_id(path):
        raise DllmRlError(f"model path {path!r} does not exist; check {key}")
    return path  # a hub id such as GSAI-ML/LLaDA-8B-Instruct
