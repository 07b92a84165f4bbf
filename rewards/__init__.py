"""Reward plugins: plain functions with TRL's signature `fn(prompts, completions, **columns) -> list[float]`.

Installed as `dllm_rl.rewards`. A recipe names a reward from `REWARDS`, a file (`path/to/file.py:fn`), or an
installed entry point (group `dllm_rl.rewards`); see `dllm_rl.rewarding.resolve_reward`.
"""

from .countdown import countdown_reward
from .math import math_reward
from .sudoku import sudoku_reward

REWARDS = {
    "sudoku": sudoku_reward,
    "countdown": countdown_reward,
    "math": math_reward,
}

__all__ = ["REWARDS", "countdown_reward", "math_reward", "sudoku_reward"]
