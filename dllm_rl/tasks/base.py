"""What a task is: prompt datasets (train and held-out) plus the reward that verifies a completion.

Rows are TRL's conversational prompt format: `prompt` (a list of chat messages), `completion` (the target
text for SFT), `answer` (the reference), and task columns that the reward reads (`puzzle`, `numbers`, ...).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import datasets

from ..config import DataConfig
from ..errors import ConfigError


@dataclass
class Task:
    name: str
    train: datasets.Dataset  # (or a lazy sequence of rows with the same len / [i] / select / to_list: tasks.gym)
    eval: datasets.Dataset | None  # None: no held-out set (a dataset given without one)
    reward: str | None  # name in dllm_rl.rewards.REWARDS: the verifier used for accuracy; None: none


def user_prompt(content: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": content}]


def held_out(key: str, fraction: float, salt: str) -> bool:
    """Deterministic split by a content key (e.g. the solution grid): the same key always lands on the same
    side, so train and held-out share no key, by construction, not just by index. What else they share depends on
    the key: sudoku with unique: false splits by the grid a puzzle was cut from, and the same puzzle text can be
    cut from a training grid and a held-out one (tasks/sudoku.py)."""
    digest = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < fraction


def check_eval_fraction(task: str, fraction) -> None:
    """data.options.eval_fraction: a number strictly between 0 and 1 (at 0 or 1 one side would get nothing)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction < 1:
        raise ConfigError(
            f"data.options.eval_fraction: {task} holds out this share of its instances, a number strictly between "
            f"0 and 1; got {fraction!r}: set e.g. data.options.eval_fraction=0.2"
        )


def eval_stream_seed(cfg: DataConfig) -> int:
    """The held-out stream's seed: fixed (10**6) for data.eval_seed 0, so every recipe is scored on the same
    puzzles; 10**6 * (k + 1) for the k-th other set. Item i of a reasoning-gym stream comes from Random(seed + i),
    so streams a few seeds apart would share items; 10**6 apart they share none unless one set takes more than
    10**6 draws (a set takes at least eval_size / eval_fraction: 5x eval_size for sudoku, 10x for countdown)."""
    return 10**6 * (cfg.eval_seed + 1)


def procedural_task(name: str, cfg: DataConfig, defaults: dict, rows_fn) -> Task:
    """A generated task: validate data.options against `defaults`, then draw the train stream (data.seed)
    and the held-out stream (a fixed seed unless data.eval_seed asks for another set: the held-out set depends
    only on the options, so runs with different seeds, and SFT and RL recipes, are scored on the same puzzles).

    rows_fn(cfg, opts, want_eval, size, seed) -> list of rows; the task's reward is named like the task.
    """
    unknown = set(cfg.options) - set(defaults)
    if unknown:
        raise ConfigError(f"data.options: unknown {name} option(s) {sorted(unknown)}; valid: {sorted(defaults)}")
    opts = {**defaults, **cfg.options}
    train = rows_fn(cfg, opts, False, cfg.train_size, cfg.seed * 1000 + 1)
    evals = rows_fn(cfg, opts, True, cfg.eval_size, eval_stream_seed(cfg))
    return Task(name, datasets.Dataset.from_list(train), datasets.Dataset.from_list(evals), name)
