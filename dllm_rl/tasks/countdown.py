"""Countdown from reasoning-gym's `countdown` generator: reach the target with + - * / over the numbers.

Prompt: `Numbers: 9 2 3\nTarget: 21`; target completion: a solving expression (`9*2+3`). The reward accepts
any expression that uses each number exactly once and hits the target. Train and held-out are disjoint
by the (sorted numbers, target) instance. Options (data.options): min_numbers, max_numbers, min_value,
max_value, min_target, max_target (reasoning-gym's knobs; what its generator refuses is a ConfigError), eval_fraction
(about that share of the instances is held out, picked by a hash of the instance: strictly between 0 and 1).
"""

from __future__ import annotations

import reasoning_gym

from ..config import DataConfig
from ..errors import ConfigError
from .base import Task, check_eval_fraction, held_out, procedural_task, user_prompt

OPTIONS = {
    "min_numbers": 3,
    "max_numbers": 3,
    "min_value": 1,
    "max_value": 20,
    "min_target": 10,
    "max_target": 100,
    "eval_fraction": 0.1,
}


def _generated(gen_opts: dict, seed: int):
    """reasoning-gym's countdown stream, its refusals of the options (at the start or on an item) as ConfigError."""
    try:
        yield from reasoning_gym.create_dataset("countdown", size=10**9, seed=seed, **gen_opts)
    except (AssertionError, TypeError, ValueError) as e:  # its config checks; "Failed to generate valid expression"
        raise ConfigError(
            f"data.options for reasoning-gym's 'countdown': {type(e).__name__}: {e}; change those options (defaults: "
            f"{ {k: v for k, v in OPTIONS.items() if k != 'eval_fraction'} })"
        ) from None


def _rows(cfg: DataConfig, opts: dict, want_eval: bool, size: int, seed: int) -> list[dict]:
    check_eval_fraction("countdown", opts["eval_fraction"])
    gen_opts = {k: v for k, v in opts.items() if k != "eval_fraction"}
    # reasoning-gym items are generated lazily, item i from Random(seed + i): one long stream, cut at `size`
    rows, seen, budget = [], set(), 200 * size + 10_000
    for i, entry in enumerate(_generated(gen_opts, seed)):
        if i == budget:
            fix = "raise" if want_eval else "lower"
            raise ConfigError(
                f"countdown: could not generate enough {'distinct held-out' if want_eval else 'training'} puzzles "
                f"({len(rows)} of {size} in {budget} draws); {fix} data.options.eval_fraction "
                f"(now {opts['eval_fraction']}), widen data.options (max_value / max_target) or lower "
                f"data.{'eval' if want_eval else 'train'}_size"
            )
        meta = entry["metadata"]
        key = f"{sorted(meta['numbers'])}->{meta['target']}"
        if held_out(key, opts["eval_fraction"], "countdown") != want_eval or (want_eval and key in seen):
            continue
        seen.add(key)
        expression = meta["expression"].replace(" ", "")
        prompt = f"Numbers: {' '.join(map(str, meta['numbers']))}\nTarget: {meta['target']}"
        rows.append(
            {
                "prompt": user_prompt(prompt, cfg.system_prompt),
                "completion": expression,
                "answer": expression,
                "numbers": meta["numbers"],
                "target": meta["target"],
            }
        )
        if len(rows) == size:
            break
    return rows


def load(cfg: DataConfig) -> Task:
    return procedural_task("countdown", cfg, OPTIONS, _rows)
