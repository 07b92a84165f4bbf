"""Tasks: procedural puzzles with verifiers (sudoku, countdown; from reasoning-gym) and dataset adapters
(gsm8k, math, code). `load_task(cfg.data)` returns a `Task` with train / held-out datasets and its reward name."""

from __future__ import annotations

from ..config import DataConfig
from ..errors import lookup
from . import code_data, countdown, math_data, sudoku
from .base import Task

TASKS = {
    "sudoku": sudoku.load,
    "countdown": countdown.load,
    "gsm8k": math_data.load_gsm8k,
    "math": math_data.load_math,
    "code": code_data.load_code,
}


def load_task(cfg: DataConfig) -> Task:
    return lookup(TASKS, cfg.task, "data.task")(cfg)


__all__ = ["TASKS", "Task", "load_task"]
