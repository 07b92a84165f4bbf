"""Reward plugins: resolving them by name and calling them exactly as TRL 1.x does.

A reward is a plain function `fn(prompts, completions, **kwargs) -> list[float | None]`. Recipes name one
as a built-in (`dllm_rl.rewards.REWARDS`), as `path/to/file.py:function`, as an installed module's
`module:function` (`trl.rewards:accuracy_reward`), or as an installed entry point in the group
`dllm_rl.rewards`; Python callables (one, or a list) can be passed to a trainer directly.

The call and the handling of what comes back follow TRL 1.16's `GRPOTrainer._calculate_rewards` and
`_generate_and_score_completions` (trl/trainer/grpo_trainer.py):
- keywords: prompts, completions (chat messages when the prompts are conversational), completion_ids, every
  other dataset column (repeated per generation), trainer_state, log_extra and log_metric;
- a function returns one value per completion as a list, tuple, numpy array, torch tensor or any other iterable
  (a range, a generator) of floats, ints, bools or None; None (and NaN, which TRL cannot tell from None) means
  "not applicable": the function contributes nothing to that completion's weighted sum (TRL's nansum). Here,
  unlike TRL, +-inf and strings stop training with an error naming the reward and the prompt;
- a completion for which *every* function returns None is unscorable: its reward is NaN (with a warning, as
  TRL logs one), so the advantages leave it out of its group's mean and std and give it advantage 0
  (algorithms.advantages);
- async functions of one call run concurrently (asyncio.gather), on one event loop per process that every
  call reuses (TRL: one per trainer, in a daemon thread), so a reward's loop-bound state lasts from step to step;
- `log_metric(name, value)` values are averaged over every call of a rollout (on every process: sum and
  count are reduced together) and then over the logging window, NaN skipped (`RewardLog`); `log_extra(column,
  values)` columns join the completions table.
Two rewards with the same name (one function partially applied twice, one built-in with two sets of kwargs) are
kept apart: the later ones are renamed NAME_2, NAME_3, ... (TRL merges them into one metric key and one table
column, which loses one of them). Their weights stay with them by position.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.metadata
import importlib.util
import inspect
import logging
import math
import numbers
import sys
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from ..errors import ConfigError, DllmRlError, did_you_mean
from . import REWARDS

SKIP_COLUMNS = ("prompt", "completion", "completion_ids")
log = logging.getLogger(__name__)


@dataclass
class Reward:
    name: str
    fn: Callable
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)


def _is_file_reference(path: str) -> bool:
    """`path/to/file.py:function` names a file; `package.module:function` an importable module."""
    return path.endswith(".py") or "/" in path or "\\" in path or Path(path).is_file()


def _from_file(name: str, path: str, fn_name: str) -> Callable:
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


def _from_module(name: str, module_name: str, fn_name: str) -> Callable:
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(
            f"reward {name!r}: cannot import module {module_name!r} ({type(e).__name__}: {e}); install it, "
            f"or name a file as path/to/file.py:function"
        ) from None
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise ConfigError(f"reward {name!r}: module {module_name!r} has no function {fn_name!r}")
    return fn


def resolve_reward(name: str) -> Callable:
    """A built-in name, `path/to/file.py:function`, `package.module:function` (an installed module, e.g.
    `trl.rewards:accuracy_reward`), or an entry point of group `dllm_rl.rewards`."""
    if name in REWARDS:
        return REWARDS[name]
    if ":" in name:
        where, _, fn_name = name.rpartition(":")
        return _from_file(name, where, fn_name) if _is_file_reference(where) else _from_module(name, where, fn_name)
    for ep in importlib.metadata.entry_points(group="dllm_rl.rewards"):
        if ep.name == name:
            return ep.load()
    raise ConfigError(
        f"unknown reward {name!r}{did_you_mean(name, REWARDS)}; use a built-in "
        f"({', '.join(sorted(REWARDS))}), path/to/file.py:function, package.module:function, or an entry point "
        f"in group 'dllm_rl.rewards' (reward models, which TRL takes as a string, are not supported: pass a "
        f"function)"
    )


def callable_name(fn: Callable) -> str:
    """TRL's display name of a reward callable (trl.trainer.utils.get_callable_name): `__name__`, through
    functools.partial, else the class name of a callable object."""
    from trl.trainer.utils import get_callable_name

    return get_callable_name(fn)


def check_reward_weights(specs, weights: list[float] | None) -> None:
    """TRL's reward_weights over the recipe's rewards: one each, and not besides their own `weight`s."""
    if weights is None:
        return
    if len(weights) != len(specs):
        raise ConfigError(f"grpo.reward_weights has {len(weights)} weights for {len(specs)} rewards; give one each")
    if any(s.weight != 1.0 for s in specs):
        raise ConfigError("grpo.reward_weights and rewards[i].weight both weight the recipe's rewards; keep one")


def build_rewards(
    specs, funcs: dict[str, Callable] | list | Callable | str | None = None, weights: list[float] | None = None
) -> list[Reward]:
    """The rewards of a run: the recipe's `specs`, or, when `funcs` is given, those instead (TRL's
    `reward_funcs`: one callable, a list of them or of reward names, or {name: callable}); `weights` are
    TRL's `reward_weights`, one per reward (the recipe's rewards too, whose own `weight`s must then stay 1).
    A reward whose name an earlier one already has is renamed NAME_2, NAME_3, ... (the first free suffix) for its
    metrics (rewards/NAME_2/mean) and completions-table column; each keeps its own weight, by position."""
    if funcs is None or (isinstance(funcs, (list, tuple, dict)) and not funcs):
        check_reward_weights(specs, weights)
        weights = [s.weight for s in specs] if weights is None else weights
        rewards = [Reward(s.name, resolve_reward(s.name), w, dict(s.kwargs)) for s, w in zip(specs, weights)]
    else:
        if isinstance(funcs, dict):
            items = list(funcs.items())
        else:
            funcs = list(funcs) if isinstance(funcs, (list, tuple)) else [funcs]
            items = [(f, resolve_reward(f)) if isinstance(f, str) else (None, f) for f in funcs]
        for name, fn in items:
            if isinstance(fn, torch.nn.Module) or not callable(fn):
                raise ConfigError(
                    f"reward_funcs: {fn!r} is not a reward function; pass functions with TRL's signature "
                    f"(reward models are not supported)"
                )
        if weights is not None and len(weights) != len(items):
            raise ConfigError(
                f"grpo.reward_weights has {len(weights)} weights for {len(items)} reward functions; give one each"
            )
        weights = list(weights) if weights is not None else [1.0] * len(items)
        rewards = [Reward(name or callable_name(fn), fn, w) for (name, fn), w in zip(items, weights)]
    return distinct_names(rewards)


def distinct_names(rewards: list[Reward]) -> list[Reward]:
    """`rewards`, in order, each named apart: a name already used by an earlier reward gets the first suffix
    _2, _3, ... that no reward of the list has (TRL would merge both into one metric and one table column).

    >>> [r.name for r in distinct_names([Reward("f", len), Reward("f", len), Reward("f_2", len)])]
    ['f', 'f_3', 'f_2']
    """
    taken = {rw.name for rw in rewards}
    seen: set[str] = set()
    for rw in rewards:
        if rw.name in seen:
            k = 2
            while f"{rw.name}_{k}" in taken:
                k += 1
            log.info("two rewards are named %r: the later one is logged as %r", rw.name, f"{rw.name}_{k}")
            rw.name = f"{rw.name}_{k}"
            taken.add(rw.name)
        seen.add(rw.name)
    return rewards


class RewardLog:
    """What reward functions record through TRL's hooks during one rollout's scoring.

    `log_metric(name, value)` collects values; `metrics()` gives per name (sum, count), for the trainer to reduce
    over processes and divide (TRL: a call-weighted mean over every call on every process, once per generation
    batch). `log_extra(column, values)` collects one value per completion; `extra(n)` gives the columns, a
    column a function did not fill being None."""

    def __init__(self):
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._extra: dict[str, list] = defaultdict(list)

    def log_metric(self, name: str, value: float) -> None:
        self._metrics[name].append(float(value))

    def log_extra(self, column: str, values: list) -> None:
        self._extra[column].extend(values)

    def metrics(self) -> dict[str, tuple[float, int]]:
        return {k: (math.fsum(v), len(v)) for k, v in sorted(self._metrics.items())}

    def extra(self, n: int) -> dict[str, list]:
        return {k: (list(v) + [None] * n)[:n] for k, v in sorted(self._extra.items())}

    def clear(self) -> None:
        self._metrics.clear()
        self._extra.clear()


def as_completions(prompts: list, texts: list[str]) -> list:
    """TRL's completion format: chat messages when the prompt is conversational, else plain text."""
    return [[{"role": "assistant", "content": t}] if isinstance(p, list) else t for p, t in zip(prompts, texts)]


def completion_id_lists(completion_ids: torch.Tensor, completion_mask: torch.Tensor) -> list[list[int]]:
    """TRL's `completion_ids` keyword: per completion, its token ids where the mask is set (up to and including
    the first EOS)."""
    return [row[m.bool()].tolist() for row, m in zip(completion_ids.cpu(), completion_mask.cpu())]


def _extras(trainer_state=None, log_extra=None, log_metric=None) -> dict:
    """The keywords TRL passes to every reward call besides the data: trainer_state and the two log hooks (a
    missing hook records nothing)."""
    return {
        "trainer_state": trainer_state,
        "log_extra": log_extra or (lambda *a, **k: None),
        "log_metric": log_metric or (lambda *a, **k: None),
    }


def _invoke(reward: Reward, prompts, completions, completion_ids, columns, extras):
    """What the function returns (a coroutine for async functions, awaited by the caller)."""
    kwargs = {**columns, **extras, **reward.kwargs}
    try:
        return reward.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
    except Exception as e:
        raise _raised(reward, e, prompts) from e


def _raised(reward: Reward, e: Exception, prompts) -> DllmRlError:
    return DllmRlError(
        f"reward {reward.name!r} raised {type(e).__name__}: {e} (first prompt: {str(prompts[0])[:120]!r}); fix the "
        f"reward function"
    )


async def _await_all(pending: dict[int, tuple[Reward, object]], prompts) -> dict[int, object]:
    """Every async reward of one call, awaited together (TRL runs them concurrently with asyncio.gather)."""

    async def one(reward, coroutine):
        try:
            return await coroutine
        except Exception as e:
            raise _raised(reward, e, prompts) from e

    done = await asyncio.gather(*(one(rw, co) for rw, co in pending.values()))
    return dict(zip(pending, done))


_LOOP = None  # (thread, loop): the one event loop of this process's async rewards, started on first use


def _run(coroutine):
    """Run the rewards' coroutine on one event loop that lives as long as the process, in a daemon thread, as TRL's
    GRPOTrainer does (trl.trainer.utils.start_event_loop_in_daemon; run_coroutine_threadsafe per step): state a
    reward binds to its loop (an asyncio.Semaphore, an async HTTP client) stays valid from one step to the next,
    and it works from a thread that already runs a loop (a notebook) too. The loop is stopped at exit."""
    global _LOOP
    if _LOOP is None:
        import atexit

        from trl.trainer.utils import shutdown_event_loop_in_daemon, start_event_loop_in_daemon

        thread, loop, ready = start_event_loop_in_daemon(name="dllm-rl-rewards")
        ready.wait()
        _LOOP = (thread, loop)
        atexit.register(shutdown_event_loop_in_daemon, thread, loop)
    return asyncio.run_coroutine_threadsafe(coroutine, _LOOP[1]).result()


def reward_values(reward: Reward, out, prompts) -> list[float]:
    """A reward function's return value as floats, NaN for None, in the forms TRL accepts: a list or tuple,
    a numpy array or a torch tensor, of floats, ints, bools, numpy or 0-d torch scalars, or None (TRL converts
    them with torch.tensor(..., dtype=float32), grpo_trainer.py `_calculate_rewards`); any other iterable (a
    range, a deque, a generator or `map(...)`) is read once into a list, as TRL's list comprehension over it does
    (a str or a dict, whose items are not scores, is an error). TRL also lets +-inf through, which would turn
    every advantage of the group into NaN; here that is an error."""
    n, kind = len(prompts), type(out).__name__
    if torch.is_tensor(out) or (hasattr(out, "tolist") and hasattr(out, "dtype")):  # torch / numpy arrays
        out = out.tolist() if not torch.is_tensor(out) else out.detach().cpu().tolist()
    elif isinstance(out, Iterable) and not isinstance(out, (list, tuple, str, bytes, Mapping)):
        out = list(out)
    if not isinstance(out, (list, tuple)) or len(out) != n:
        got = f"{kind} of length {len(out)}" if isinstance(out, (list, tuple)) else repr(out)[:80]
        raise DllmRlError(
            f"reward {reward.name!r} returned {got} (first prompt: {str(prompts[0])[:120]!r}); it must return "
            f"{n} values, one per completion (a list or other iterable, numpy array or tensor of floats; None = "
            f"not applicable)"
        )
    values = []
    for i, v in enumerate(out):
        if torch.is_tensor(v) and v.numel() == 1:
            v = v.item()
        elif hasattr(v, "item") and hasattr(v, "dtype") and getattr(v, "shape", None) == ():  # numpy scalar
            v = v.item()
        if v is None:
            values.append(math.nan)
        elif isinstance(v, numbers.Real) and not math.isinf(float(v)):  # bools are Reals: True -> 1.0, as TRL
            values.append(float(v))
        else:
            raise DllmRlError(
                f"reward {reward.name!r} returned {v!r} for completion {i} (prompt {str(prompts[i])[:120]!r}); "
                f"return a finite number (or a bool), or None if not applicable"
            )
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
    """(weighted rewards [N], per-function values [F, N]) with NaN where a function returned None; a completion
    every function skipped gets a NaN reward (unscorable, as in TRL: it is left out of its group's baseline and
    gets advantage 0), with a warning naming its row. When a function raises, the coroutines of the async
    functions called before it are closed (never run) and the error propagates."""
    completions = as_completions(prompts, texts)
    columns = {k: v for k, v in columns.items() if k not in SKIP_COLUMNS}
    extras = _extras(trainer_state, log_extra, log_metric)
    outs = {}
    try:
        for i, r in enumerate(rewards):
            outs[i] = _invoke(r, prompts, completions, completion_ids, columns, extras)
    except BaseException:
        for o in outs.values():
            if inspect.iscoroutine(o):
                o.close()  # else Python warns that it was never awaited
        raise
    pending = {i: (rewards[i], o) for i, o in outs.items() if inspect.isawaitable(o)}
    if pending:
        outs.update(_run(_await_all(pending, prompts)))
    per_fn = torch.tensor(
        [reward_values(r, outs[i], prompts) for i, r in enumerate(rewards)], dtype=torch.float32
    ).reshape(len(rewards), len(texts))  # [F, N]
    weights = torch.tensor([r.weight for r in rewards], dtype=torch.float32)[:, None]
    total = (per_fn * weights).nansum(0)  # [N]
    unscorable = per_fn.isnan().all(0)  # [N]
    if unscorable.any():
        i = int(unscorable.nonzero()[0, 0])
        row = {k: v[i] for k, v in columns.items()}
        log.warning(
            "all reward functions returned None for %d completion(s), e.g. prompt %r, completion %r, columns %s: "
            "they get advantage 0 and are left out of their group's statistics; make at least one reward "
            "function score every completion",
            int(unscorable.sum()),
            str(prompts[i])[:120],
            str(completions[i])[:120],
            {k: str(v)[:60] for k, v in row.items()},
        )
        total = total.masked_fill(unscorable, math.nan)
    return total, per_fn


def verifier_scores(
    name: str | None,
    rewards: list[Reward],
    per_fn: torch.Tensor,
    prompts,
    texts,
    completion_ids,
    columns,
    trainer_state=None,
) -> torch.Tensor:
    """The task verifier `name`'s scores [N] (NaN where it does not apply, or everywhere when the task has no
    verifier): its row of `per_fn` when a reward of the run has its name, else the verifier called with the
    keywords compute_rewards passes (completion_ids, the columns, trainer_state, and log_extra / log_metric
    hooks that record nothing: the verifier is not one of the run's rewards)."""
    if name is None:
        return torch.full((len(texts),), math.nan)
    names = [rw.name for rw in rewards]
    if name in names:
        return per_fn[names.index(name)]
    verifier = Reward(name, resolve_reward(name))
    columns = {k: v for k, v in columns.items() if k not in SKIP_COLUMNS}
    out = _invoke(verifier, prompts, as_completions(prompts, texts), completion_ids, columns, _extras(trainer_state))
    if inspect.isawaitable(out):
        out = _run(_await_all({0: (verifier, out)}, prompts))[0]
    return torch.tensor(reward_values(verifier, out, prompts), dtype=torch.float32)
