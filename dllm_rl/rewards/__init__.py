"""Reward plugins: plain functions with TRL's signature `fn(prompts, completions, **columns) -> list[float]`.

Installed as `dllm_rl.rewards`. A recipe names a reward from `REWARDS`, a file (`path/to/file.py:fn`), or an
installed entry point (group `dllm_rl.rewards`); see `plugins.resolve_reward`. Options go in the
recipe's `kwargs` (e.g. `{name: code, kwargs: {binary: true, timeout: 5}}`).

| name            | scores                                                               | range      |
|-----------------|----------------------------------------------------------------------|------------|
| `sudoku`        | valid 4x4 solution keeping the givens (`puzzle` column)              | 0 / 1      |
| `sudoku_cells`  | fraction of blanks filled as in the closest valid solution (d1, SPG) | 0..1       |
| `countdown`     | expression over `numbers` reaching `target`                          | 0 / 1      |
| `math`          | final answer equals `answer` (math-verify)                           | 0 / 1      |
| `code`          | fraction of the row's tests passed in a sandbox (`code.py`)          | 0..1, None |
| `code_format`   | ends with one parsable ```python block (DiffuCoder)                  | 0/0.5/1    |
| `format_strict` | exact `<reasoning>`/`<answer>` layout (d1)                           | 0 / 0.5    |
| `format_soft`   | starts with `<reasoning>...</reasoning><answer>...</answer>` (d1)    | 0 / 0.5    |
| `xml_count`     | partial credit per tag, minus trailing text (d1's `xmlcount`)        | <= 0.5     |
| `format_think`  | `format_strict` with `<think>` tags                                  | 0 / 0.5    |
| `reasoning_gym` | the reasoning-gym task's own `score_answer` (`rg_*` columns, gym.py) | 0..1       |
"""

from .code import code_reward
from .countdown import countdown_reward
from .format import code_format_reward, soft_format_reward, strict_format_reward, think_format_reward, xml_count_reward
from .gym import reasoning_gym_reward
from .math import math_reward
from .sudoku import sudoku_cells_reward, sudoku_reward

REWARDS = {
    "sudoku": sudoku_reward,
    "sudoku_cells": sudoku_cells_reward,
    "countdown": countdown_reward,
    "math": math_reward,
    "code": code_reward,
    "code_format": code_format_reward,
    "format_strict": strict_format_reward,
    "format_soft": soft_format_reward,
    "xml_count": xml_count_reward,
    "format_think": think_format_reward,
    "reasoning_gym": reasoning_gym_reward,
}

__all__ = [
    "REWARDS",
    "code_format_reward",
    "code_reward",
    "countdown_reward",
    "math_reward",
    "reasoning_gym_reward",
    "soft_format_reward",
    "strict_format_reward",
    "sudoku_cells_reward",
    "sudoku_reward",
    "think_format_reward",
    "xml_count_reward",
]
