"""Tasks: procedural puzzles with verifiers (sudoku, countdown; from reasoning-gym), any reasoning-gym task
(`reasoning_gym/NAME`), dataset adapters (gsm8k, math, code) and any dataset with a prompt column
(`data.dataset`). `load_task(cfg.data)` returns a `Task` with train / held-out datasets and its verifier's name."""

from __future__ import annotations

from ..config import DataConfig
from ..errors import ConfigError, lookup
from . import code_data, countdown, from_dataset, gym, math_data, sudoku
from .base import Task

TASKS = {
    "sudoku": sudoku.load,
    "countdown": countdown.load,
    "gsm8k": math_data.load_gsm8k,
    "math": math_data.load_math,
    "code": code_data.load_code,
    "dataset": from_dataset.load,  # data.dataset: any dataset with a prompt column
}
FAMILIES = {"reasoning_gym": gym.load}  # data.task: FAMILY/NAME
FAMILY_CHECKS = {"reasoning_gym": gym.check_config}  # (NAME, DataConfig): checked without building the task


def load_task(cfg: DataConfig) -> Task:
    if cfg.dataset:
        if cfg.task not in ("dataset", DataConfig.task):
            raise ConfigError(
                f"data.dataset ({cfg.dataset!r}) and data.task ({cfg.task!r}) both name the training data: keep one"
            )
        return TASKS["dataset"](cfg)
    if cfg.task == "dataset":
        raise ConfigError("data.task=dataset needs data.dataset: a hub name or a local .jsonl/.json/.parquet/.csv")
    family, _, name = cfg.task.partition("/")
    if name:
        return lookup(FAMILIES, family, "data.task (FAMILY/NAME)")(cfg, name)
    return lookup(TASKS, cfg.task, "data.task")(cfg)


def check_task_name(cfg: DataConfig) -> None:
    """data.task names a task (FAMILY/NAME: a task of that family, data.options its options), without building it."""
    family, _, name = cfg.task.partition("/")
    if name:
        lookup(FAMILY_CHECKS, family, "data.task (FAMILY/NAME)")(name, cfg)
    else:
        lookup(TASKS, cfg.task, "data.task")


__all__ = ["FAMILIES", "TASKS", "Task", "check_task_name", "load_task"]
