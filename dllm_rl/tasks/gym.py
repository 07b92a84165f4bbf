"""Any reasoning-gym task (`data.task: reasoning_gym/NAME`, about a hundred procedural tasks), with its own
verifier as the reward (`rewards/gym.py`: the task's `score_answer`).

Prompts are the task's questions as a user message after reasoning-gym's "default" system prompt (answer in
`<answer>...</answer>`; `data.system_prompt` replaces it, "" drops it). `data.options` are the task's config
fields (reasoning_gym.create_dataset(NAME, **options)); `size` and `seed` are set here, always (reasoning-gym
draws a random seed when none is given): training entries from seed data.seed * 1000 + 1, data.train_size of
them, generated lazily as they are drawn (some tasks take tens of milliseconds per entry); held-out entries
from a fixed seed (10**6; data.eval_seed k > 0 draws another set: base.eval_stream_seed), so they do not move
with data.seed. Entry i of a stream is drawn from Random(stream seed + i), so a data.seed whose training entries
would reach the held-out stream's seeds (data.seed near 1000 * (data.eval_seed + 1), e.g. 999 or 1000 for set 0)
is refused, and so is one whose training entries' seeds would pass 2**32 - 1 (some tasks seed numpy with them: entry
i of pool_matrix calls np.random.seed(stream seed + i)). Otherwise the two streams are independent draws, not
disjoint by construction: a task with a small space of questions can repeat a training question in the held-out
set. `answer` is None for tasks with several valid answers (their scorer checks a proposal). The SFT target
(`completion`) is the answer inside `<answer>...</answer>` when the system prompt asks for that tag, else the bare
answer.
"""

from __future__ import annotations

import dataclasses
import functools
import json

import datasets

from ..config import DataConfig
from ..errors import ConfigError, did_you_mean
from .base import Task, eval_stream_seed, user_prompt


class LazyRows:
    """The rows of a generated task, each built when first read: len(), rows[i], select(indices) (a
    datasets.Dataset of those rows), to_list() and iteration, which is what the trainers use."""

    def __init__(self, n: int, row):
        self.n, self._row = n, functools.lru_cache(maxsize=None)(row)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return self._row(i % self.n)

    def __iter__(self):
        return (self[i] for i in range(self.n))

    def select(self, indices) -> datasets.Dataset:
        return datasets.Dataset.from_list([self[i] for i in indices])

    def to_list(self) -> list[dict]:
        return list(self)

    @property
    def column_names(self) -> list[str]:
        return list(self[0])


def check(name: str, options: dict) -> None:
    """That reasoning-gym has task `name` and `options` are its config fields, without generating anything."""
    from reasoning_gym.factory import DATASETS

    if name not in DATASETS:
        raise ConfigError(
            f"data.task: reasoning-gym has no task {name!r}{did_you_mean(name, DATASETS)} ({len(DATASETS)} tasks: "
            f"python -c 'from reasoning_gym.factory import DATASETS; print(sorted(DATASETS))')"
        )
    fields = {f.name for f in dataclasses.fields(DATASETS[name][1])} - {"size", "seed"}
    if unknown := sorted(set(options) - fields):
        raise ConfigError(
            f"data.options: {unknown} are not options of reasoning-gym's {name!r}; valid: {sorted(fields)} "
            f"(size and seed come from data.train_size / data.eval_size and data.seed)"
        )


SEED_LIMIT = 2**32 - 1  # the largest seed numpy's np.random.seed takes


def stream_seeds(cfg: DataConfig) -> tuple[int, int]:
    """(training, held-out) stream seeds; refuses a data.seed whose training entries reach the held-out ones, and
    streams whose last entry's seed (stream seed + size - 1) passes SEED_LIMIT."""
    train_seed, eval_seed = cfg.seed * 1000 + 1, eval_stream_seed(cfg)
    if eval_seed + cfg.eval_size - 1 > SEED_LIMIT:
        raise ConfigError(
            f"data.eval_size={cfg.eval_size}: reasoning-gym seeds held-out entry i with {eval_seed} + i "
            f"(data.eval_seed={cfg.eval_seed}), past {SEED_LIMIT} (numpy's largest seed, which some tasks use); "
            f"use a data.eval_size of at most {SEED_LIMIT - eval_seed + 1} or a lower data.eval_seed"
        )
    if train_seed + cfg.train_size - 1 > SEED_LIMIT:
        largest = (SEED_LIMIT - cfg.train_size) // 1000
        raise ConfigError(
            f"data.seed={cfg.seed}: reasoning-gym seeds training entry i with {train_seed} + i, which with "
            f"data.train_size={cfg.train_size} passes {SEED_LIMIT} (numpy's largest seed, which some tasks use); "
            f"use a data.seed of at most {largest}"
            + ("" if largest >= 0 else f" (none fits: lower data.train_size to at most {SEED_LIMIT})")
        )
    if train_seed < eval_seed + cfg.eval_size and eval_seed < train_seed + cfg.train_size:
        at_most, at_least = (eval_seed - 1 - cfg.train_size) // 1000, -(-(eval_seed + cfg.eval_size - 1) // 1000)
        raise ConfigError(
            f"data.seed={cfg.seed}: reasoning-gym draws training entry i from Random({train_seed} + i), which with "
            f"data.train_size={cfg.train_size} reaches the held-out seeds {eval_seed}..{eval_seed + cfg.eval_size - 1}"
            f" (data.eval_seed={cfg.eval_seed}): held-out questions would be trained on; use a data.seed of at most "
            f"{at_most} or at least {at_least}"
        )
    return train_seed, eval_seed


def check_config(name: str, cfg: DataConfig) -> None:
    """data.task=reasoning_gym/NAME with cfg's options and seeds, checked without generating anything."""
    check(name, cfg.options)
    stream_seeds(cfg)


def load(cfg: DataConfig, name: str) -> Task:
    from reasoning_gym.utils import SYSTEM_PROMPTS

    from ..rewards.gym import gym_dataset, gym_entry

    check(name, cfg.options)
    options = json.dumps(cfg.options, sort_keys=True)
    system = SYSTEM_PROMPTS["default"] if cfg.system_prompt is None else cfg.system_prompt
    asks = "<answer>" in (system or "")
    tagged = lambda answer: f"<answer>{answer}</answer>" if answer else ""

    def rows(seed: int, size: int):
        try:
            gym_dataset(name, options, seed, size)
        except Exception as e:  # the task's config validation (assertions, type errors)
            raise ConfigError(f"data.options for reasoning-gym's {name!r}: {type(e).__name__}: {e}") from None

        def row(i: int) -> dict:
            entry = gym_entry(name, options, seed, size, i)
            return {
                "prompt": user_prompt(entry["question"], system or None),
                # the SFT target in the format the prompt asks for (rewards/gym.py scores a missing tag as no answer)
                "completion": tagged(entry["answer"]) if asks else entry["answer"] or "",
                "answer": entry["answer"],
                "rg_task": name,
                "rg_options": options,
                "rg_seed": seed,
                "rg_size": size,
                "rg_index": i,
            }

        return LazyRows(size, row)

    train_seed, eval_seed = stream_seeds(cfg)
    train = rows(train_seed, cfg.train_size)
    held_out = rows(eval_seed, cfg.eval_size)
    return Task(f"reasoning_gym/{name}", train, held_out.select(range(len(held_out))), "reasoning_gym")
