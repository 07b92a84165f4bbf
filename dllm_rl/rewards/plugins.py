"""Reward plugins: resolving them by name and calling them exactly as TRL 1.x does.

A reward is a plain function `fn(prompts, completions, **kwargs) -> list[float | None]`. Recipes name one
as a built-in (`dllm_rl.rewards.REWARDS`), as `path/to/file.py:function`, or as an installed entry point in
the group `dllm_rl.rewards`; Python callables can be passed to a trainer directly. The call mirrors TRL's
`_calculate_rewards`: prompts, completions (chat messages when the prompts are conversational),
completion_ids, every other dataset column (repeated per generation), trainer_state, log_extra and
log_metric. None means "not applicable" and contributes nothing to the weighted sum (TRL's nansum).
"""

from __future__ import annotations

import asyncio
import importlib.metadata
import importlib.util
import inspect
import math
import numbers
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError, DllmRlError, did_you_mean
from . import REWARDS

SKIP_COLUMNS = ("prompt", "completion", "completion_ids")


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)


def resolve_reward(name: str) -> Callable:
    """A built-in name, `file.py:function`, or an entry point of group `dllm_rl.rewards`."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        path, _, fn_name = name.rpartition(":")
        if not Path(path).is_file():
            raise ConfigError(f"reward {name!r}: file {path!r} does not exist (form: path/to/file.py:function)")
        spec = importlib.util.spec_from_file_location(f"dllm_rl_reward_{Path(path).stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # as `import` does: dataclasses and pickle look the module up there
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(spec.name, None)
            raise
        if not callable(getattr(module, fn_name, None)):
            raise ConfigError(f"reward {name!r}: {path} has no function {fn_name!r}")
        return getattr(module, fn_name)
    for ep in importlib.metadata.entry_points(group="dllm_rl.rewards"):
        if ep.name == name:
            return ep.load()
    raise ConfigError(
        f"unknown reward {name!r}{did_you_mean(name, REWARDS)}; use a built-in "
        f"({', '.join(sorted(REWARDS))}), path/to/file.py:function, or an entry point in group "
        f"'dllm_rl.rewards'"
    )


def build_rewards(specs, extra: dict[str, Callable] | list[Callable] | None = None) -> list[Reward]:
    rewards = [Reward(s.name, resolve_reward(s.name), s.weight, dict(s.kwargs)) for s in specs]
    if isinstance(extra, dict):
        rewards += [Reward(n, f) for n, f in extra.items()]
    elif extra:
        rewards += [Reward(getattr(f, "__name__", f"reward_{i}"), f) for i, f in enumerate(extra)]
    return rewards


def as_completions(prompts: list, texts: list[str]) -> list:
    """TRL's completion format: chat messages when the prompt is conversational, else plain text."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]


def _call(reward: Reward, prompts, completions, completion_ids, columns, extras):
    kwargs = {**columns, **extras, **reward.kwargs}
    try:
        out = reward.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
        if inspect.isawaitable(out):
            out = asyncio.run(out)
    except Exception as e:
        raise DllmRlError(
            f"reward {reward.name!r} raised {type(e).__name__}: {e} (first prompt: "
            f"{str(prompts[0])[:120]!r}); fix the reward function"
        ) from e
    if not isinstance(out, (list, tuple)) or len(out) != len(completions):
        got = f"{type(out).__name__} of length {len(out)}" if isinstance(out, (list, tuple)) else repr(out)[:80]
        raise DllmRlError(
            f"reward {reward.name!r} returned {got} (first prompt: {str(prompts[0])[:120]!r}); "
            f"it must return a list of {len(completions)} floats (one per completion; None = "
            f"not applicable)"
        )
    values = []
    for i, v in enumerate(out):
        if v is None:
            values.append(math.nan)
            continue
        # numbers.Real admits numpy scalars (np.float32 is no float subclass), as TRL's torch.tensor does
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(float(v)):
            raise DllmRlError(
                f"reward {reward.name!r} returned {v!r} for completion {i} (prompt "
                f"{str(prompts[i])[:120]!r}); return a finite float, or None if not applicable"
            )
        values.append(float(v))
    return values


def compute_rewards(
    rewards: list[Reward],
    prompts: list,
    texts: list[str],
    completion_ids: list[list[int]],
    columns: dict[str, list],
    trainer_state=None,
    log_extra=None,
    log_metric=None,
):
    """Weighted rewards [N] and per-function values [F, N] (NaN where a function returned None)."""
    completions = as_completions(prompts, texts)
    columns = {k: v for k, v in columns.items() if k not in SKIP_COLUMNS}
    extras = {
        "trainer_state": trainer_state,
        "log_extra": log_extra or (lambda *a, **k: None),
        "log_metric": log_metric or (lambda *a, **k: None),
    }
    per_fn = torch.tensor(
        [_call(r, prompts, completions, completion_ids, columns, extras) for r in rewards], dtype=torch.float32
    ).reshape(len(rewards), len(texts))  # [F, N]
    weights = torch.tensor([r.weight for r in rewards], dtype=torch.float32)[:, None]
    return (per_fn * weights).nansum(0), per_fn


def verifier_scores(
    name: str, rewards: list[Reward], per_fn: torch.Tensor, prompts, texts, completion_ids, columns
) -> torch.Tensor:
    """The task verifier `name`'s scores [N]: its row of `per_fn` when it is among the rewards, else called."""
    names = [rw.name for rw in rewards]
    if name in names:
        return per_fn[names.index(name)]
    return compute_rewards([Reward(name, resolve_reward(name))], prompts, texts, completion_ids, columns)[0]
