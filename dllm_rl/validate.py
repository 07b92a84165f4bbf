"""Recipe checks that need more than the recipe's own types: names looked up in the registries of the floors
above config.py, and files a recipe points at.

`load_recipe` (config.py) already checked every value against its field's constraint and the rules across
fields. `validate_recipe(recipe)` adds what config.py cannot import: the registry names (data.task, rollout.commit,
rollout.order, estimator.name, grpo.loss_type, grpo.advantage, dpo.loss_type; a name registered at run time, as
examples/custom_estimator.py does, is found), for GRPO and DPO order_policy.train_model=false against an order with
no learned head and the rules of training the learned order (`learned_order_problem`), the learning-
rate scheduler (one transformers' get_scheduler builds from the recipe's keys alone), the trackers of
train.report_to, the reward specs (a built-in, an existing file that defines the function, or an installed entry
point; the file is read, not run), and the files and directories named by model.path, data.path / data.eval_path
and train.deepspeed. With the trainer named, it also rejects keys that trainer would silently ignore
(config.validate), and for consensus distillation a task without a verifier (data.dataset) and a
train.save_steps that would put a checkpoint mid-round (`_check_consensus`). The CLI calls it right after loading
a recipe to train, and `trainers.common.Run` calls it before it builds any model or data, so every mistake it knows
stops the run in one line (ConfigError, exit code 2) instead of a traceback minutes later.
"""

from __future__ import annotations

import ast
import functools
import importlib.metadata
import json
import os
from operator import attrgetter
from pathlib import Path
from typing import Optional

from .config import Recipe, tiny_model_problems, validate
from .errors import ConfigError, DllmRlError, did_you_mean, lookup

# first components of paths that runs write (train.output_dir), which also have the shape of a hub id (owner/name)
RUN_DIRS = ("outputs", "output", "checkpoints", "runs", "models")
REWARD_GROUP = "dllm_rl.rewards"  # entry-point group of installed reward plugins (rewards.plugins)


def _registries() -> list[tuple[str, dict]]:
    """(dotted recipe key, the dict its value names an entry of): the one list of named variants."""
    from .algorithms import ADVANTAGES, LOSSES
    from .estimators import ESTIMATORS
    from .policy.orders import ORDERS
    from .rollout.commit import COMMIT_RULES
    from .rollout.hybrid import PLAN_KINDS

    return [
        ("rollout.commit", COMMIT_RULES),
        ("hybrid.plan", PLAN_KINDS),
        ("rollout.order", ORDERS),
        ("estimator.name", ESTIMATORS),
        ("grpo.loss_type", LOSSES),
        ("grpo.advantage", ADVANTAGES),
    ]


@functools.cache
def schedulers() -> tuple[str, ...]:
    """transformers' scheduler names that `get_scheduler(name, optimizer, num_warmup_steps, num_training_steps)`
    builds and steps without further settings (the ones that need a metric, a minimum lr or a decay length have
    no recipe key). Found by building each once on a one-parameter optimizer: the library decides, not a list."""
    import torch
    from transformers import get_scheduler
    from transformers.trainer_utils import SchedulerType

    usable = []
    for kind in SchedulerType:
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        try:
            scheduler = get_scheduler(kind.value, optimizer, num_warmup_steps=1, num_training_steps=2)
            optimizer.step()
            scheduler.step()
        except (TypeError, ValueError):
            continue
        usable.append(kind.value)
    return tuple(usable)


def learned_order_problem(recipe: Recipe, num_processes: int, estimator=None) -> Optional[str]:
    """What stops GRPO or DPO from training the learned unmasking order (rollout.order=policy) with this recipe on
    `num_processes` processes, or None. Needs the recipe alone (without `estimator`, the recipe's is built without a
    model), so the recipe rules (`_check_orders`) ask it before any model is loaded; the trainers ask again with their
    estimator and the real process count."""
    from .estimators import build_estimator

    if estimator is None:
        estimator = build_estimator(recipe.estimator, None)
    if not estimator.replays_orders or recipe.rollout.order_temperature <= 0:
        return (
            "rollout.order=policy trains the learned order by the Plackett-Luce log-prob of "
            "sampled orders: set estimator.name=trajectory and rollout.order_temperature > 0 "
            "(e.g. 0.1; eval.order_temperature=0 evaluates the greedy order)"
        )
    if num_processes > 1 or recipe.train.deepspeed:
        return (
            "rollout.order=policy runs on one process without DeepSpeed for now (the order "
            "head is outside the prepared model); launch without deepspeed/accelerate "
            "or pick another rollout.order"
        )
    return None


def _check_orders(recipe: Recipe) -> None:
    from .policy import ORDERS

    if not recipe.order_policy.train_model and not ORDERS[recipe.rollout.order].needs_hidden:
        raise ConfigError(
            f"order_policy.train_model: false trains only a learned unmasking order, and rollout.order="
            f"{recipe.rollout.order} has none; set rollout.order=policy (or drop the key to train the model)"
        )
    if ORDERS[recipe.rollout.order].needs_hidden and (problem := learned_order_problem(recipe, num_processes=1)):
        raise ConfigError(problem)


def _check_consensus(recipe: Recipe) -> None:
    """Consensus distillation votes with the task's verifier (a data.dataset has none), and its checkpoints fall on
    round boundaries, where a resumed run rebuilds the round's targets exactly (trainers/consensus.py)."""
    c, t = recipe.consensus, recipe.train
    if recipe.data.dataset:
        raise ConfigError(
            f"data.dataset: algorithm=consensus votes with the task's verifier, and data.dataset "
            f"({recipe.data.dataset!r}) has none; set data.task to a task with a verifier (sudoku, countdown, gsm8k, "
            f"math, code, reasoning_gym/NAME), or train this dataset with algorithm=sft or algorithm=grpo and rewards"
        )
    if t.save_steps % c.steps_per_round:
        multiple = max(t.save_steps // c.steps_per_round, 1) * c.steps_per_round
        raise ConfigError(
            f"train.save_steps={t.save_steps} is not a multiple of consensus.steps_per_round={c.steps_per_round}: a "
            f"checkpoint mid-round could not resume to the same targets; set train.save_steps={multiple} (or 0)"
        )


def _check_scheduler(recipe: Recipe) -> None:
    o = recipe.optim
    valid = schedulers()
    if o.lr_scheduler not in valid:
        raise ConfigError(
            f"optim.lr_scheduler: {o.lr_scheduler!r} is not a scheduler a recipe can build"
            f"{did_you_mean(o.lr_scheduler, valid)}; valid: {', '.join(valid)}"
        )
    if o.lr_scheduler == "constant" and o.warmup_steps > 0:  # transformers' "constant" ignores the warmup
        raise ConfigError(
            f"optim.warmup_steps: {o.warmup_steps} is ignored by optim.lr_scheduler=constant; set "
            f"optim.lr_scheduler=constant_with_warmup, or optim.warmup_steps=0"
        )


def _check_compile_backend(recipe: Recipe) -> None:
    """rollout.compile_backend: auto, none, or a torch.compile backend (rollout.engine._workspace hands any other
    name to torch.compile, which would fail at the first decode)."""
    backend = recipe.rollout.compile_backend
    if backend in ("auto", "none"):
        return
    from torch._dynamo import list_backends

    if backend not in list_backends(exclude_tags=()):  # the debug ones too (eager, aot_eager)
        valid = ["auto", "none", *list_backends(), "eager", "aot_eager"]
        raise ConfigError(
            f"rollout.compile_backend: {backend!r} is not a torch.compile backend{did_you_mean(backend, valid)}; "
            f"valid: {', '.join(valid)}"
        )


def _check_trackers(recipe: Recipe) -> None:
    from accelerate.utils import LoggerType

    valid = [t.value for t in LoggerType]
    for i, name in enumerate(recipe.train.report_to):
        if name not in valid:
            raise ConfigError(
                f"train.report_to[{i}]: {name!r} is not a tracker accelerate knows{did_you_mean(name, valid)}; "
                f"valid: {', '.join(valid)}"
            )


def _defines(path: Path, name: str) -> bool:
    """Whether the Python file defines (or imports, or assigns) `name` at its top level, read without running it.
    A star import or a module-level __getattr__ could define anything: then it is assumed to."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name in (name, "__getattr__"):
                return True
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            for alias in node.names:
                if alias.name == "*" or (alias.asname or alias.name.split(".")[0]) == name:
                    return True
        elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if any(isinstance(n, ast.Name) and n.id == name for n in ast.walk(target)):
                    return True
    return False


# what every reward is called with (rewards.plugins: TRL's keywords), not a recipe setting
CALL_KEYWORDS = {"prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"}


def _check_reward_kwargs(i: int, name: str, fn, kwargs: dict) -> None:
    """A built-in reward's kwargs are parameters it names: anything else would vanish into its **kwargs unread.
    A built-in that names none (it takes **kwargs only) and the user's own functions are not checked."""
    import inspect

    params = inspect.signature(fn).parameters.values()
    named = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD) and p.name not in CALL_KEYWORDS]
    unknown = [str(k) for k in kwargs if k not in named]
    if named and unknown:
        raise ConfigError(
            f"rewards[{i}].kwargs: {unknown[0]!r}{did_you_mean(unknown[0], named)} is not a parameter of the built-in "
            f"reward {name!r}, which would ignore it; valid: {', '.join(named)} (or remove it)"
        )


def _check_rewards(recipe: Recipe) -> None:
    from .rewards import REWARDS
    from .rewards.plugins import _from_module, _is_file_reference

    for i, spec in enumerate(recipe.rewards):
        key, name = f"rewards[{i}].name", spec.name
        if name in REWARDS:
            _check_reward_kwargs(i, name, REWARDS[name], spec.kwargs)
            continue
        if ":" in name and not _is_file_reference(name.rpartition(":")[0]):  # package.module:function
            try:
                _from_module(name, *name.rsplit(":", 1))
            except ConfigError as e:
                raise ConfigError(f"{key}: {e}") from None
            continue
        if ":" in name:
            file, _, fn = name.rpartition(":")
            path = Path(file)
            if not path.is_file():
                raise ConfigError(f"{key}: {name!r}: file {file!r} does not exist (form: path/to/file.py:function)")
            try:
                found = _defines(path, fn)
            except (SyntaxError, UnicodeDecodeError, ValueError) as e:
                raise ConfigError(f"{key}: {name!r}: {file} is not valid Python ({e}); fix the file") from None
            if not found:
                raise ConfigError(f"{key}: {name!r}: {file} defines no {fn!r}; name a function defined in it")
            continue
        if any(ep.name == name for ep in importlib.metadata.entry_points(group=REWARD_GROUP)):
            continue
        raise ConfigError(
            f"{key}: unknown reward {name!r}{did_you_mean(name, REWARDS)}; use a built-in "
            f"({', '.join(sorted(REWARDS))}), path/to/file.py:function, package.module:function, or an entry point "
            f"in group {REWARD_GROUP!r}"
        )


def _looks_local(path: str) -> bool:
    return path.startswith((".", "/", "~")) or Path(path).suffix in (".json", ".jsonl", ".parquet", ".csv")


def _check_files(recipe: Recipe, model: bool, data: bool, training: bool = True) -> None:
    from .rundir import resolve_model_dir

    if model and recipe.model.path:
        try:
            resolved = resolve_model_dir(recipe.model.path, key="model.path")
        except DllmRlError as e:
            raise ConfigError(str(e) if str(e).startswith("model.path") else f"model.path: {e}") from None
        if not Path(resolved).is_dir():
            check_hub_model(resolved, "model.path")
        check_context(recipe, resolved, "model.path")
        adapter = Path(resolved, "adapter_config.json").is_file()  # a LoRA checkpoint trains its own adapters
        if training and recipe.model.load_in_4bit and recipe.model.lora.r == 0 and not adapter:
            raise ConfigError(
                "model.load_in_4bit: 4-bit weights cannot be trained, only LoRA adapters over them; set "
                "model.lora.r (e.g. 64) or model.load_in_4bit=false"
            )
    planner = recipe.hybrid.planner.path
    if model and recipe.hybrid.plan == "real" and planner and _looks_local(planner):
        p = Path(planner).expanduser()
        if not (p.is_dir() or (p.suffix == ".gguf" and p.is_file())):
            raise ConfigError(
                f"hybrid.planner.path: {planner!r} is neither a directory nor a .gguf file; give a causal LM "
                f"directory, a .gguf file, a hub id, or pkg:<package>/<file>.gguf"
            )
    if data:
        keys = ["data.path", "data.eval_path", "data.dataset"]
        if training and recipe.algorithm == "dpo" and recipe.dpo.pairs == "offline":
            keys.append("dpo.dataset_name")
        for key in keys:
            value = attrgetter(key)(recipe)
            if value and _looks_local(value) and not Path(value).expanduser().exists():
                raise ConfigError(
                    f"{key}: {value!r} does not exist; give a local .json/.jsonl/.parquet file or a hub name"
                )
    if not training:
        return
    _check_output_dir(recipe.train.output_dir)
    ds = recipe.train.deepspeed
    if ds and not Path(ds).is_file():
        raise ConfigError(
            f"train.deepspeed: {ds!r} does not exist; point it at a DeepSpeed JSON such as recipes/deepspeed/zero2.json"
        )
    if ds:
        zero = read_deepspeed_json(ds)["zero_optimization"]
        offload = str((zero.get("offload_optimizer") or {}).get("device", "none")).lower()
        if recipe.optim.name != "adamw" and offload not in ("none", "auto"):
            raise ConfigError(
                f"optim.name={recipe.optim.name} with {ds!r}, which offloads the optimizer to {offload}: accelerate "
                f"then swaps in DeepSpeed's CPU Adam, so the run would not be {recipe.optim.name}; use "
                f"optim.name=adamw or a DeepSpeed file without offload_optimizer (recipes/deepspeed/zero3.json)"
            )


def check_context(recipe: Recipe, model_dir: str, key: str) -> None:
    """The canvas (rollout.max_completion_length) against the context of the model at `model_dir` (`key` names
    where it came from), read from its config.json before the model is built. The decoder refuses prompt tokens
    + rollout.max_completion_length > max_position_embeddings (rollout.engine.check_config), and a prompt has
    at least one token. A hub id, a directory without config.json (a LoRA adapter) or a config without
    max_position_embeddings is left to that check."""
    try:
        max_pos = json.loads(Path(model_dir, "config.json").read_text()).get("max_position_embeddings")
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return
    Lc = recipe.rollout.max_completion_length
    if isinstance(max_pos, int) and not isinstance(max_pos, bool) and Lc >= max_pos:
        raise ConfigError(
            f"rollout.max_completion_length: {Lc} + a prompt (at least 1 token) exceeds the model's context of "
            f"{max_pos} positions ({key} {model_dir}: max_position_embeddings in its config.json); the decoder "
            f"needs prompt tokens + rollout.max_completion_length <= {max_pos}: lower rollout.max_completion_length "
            f"(to at most {max_pos} minus the longest prompt's tokens)"
        )


def read_deepspeed_json(path: str) -> dict:
    """A DeepSpeed config file as a dict, refused with the fix when it is not JSON or has no zero_optimization
    section (accelerate's DeepSpeed plugin requires one)."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(
            f"train.deepspeed: {path!r} is not a readable JSON file ({type(e).__name__}: {e}); fix it (JSON has no "
            f"trailing commas or comments), or start from recipes/deepspeed/zero2.json"
        ) from None
    if not isinstance(config, dict) or not isinstance(config.get("zero_optimization"), dict):
        raise ConfigError(
            f"train.deepspeed: {path!r} has no zero_optimization section; add one, e.g. "
            f'"zero_optimization": {{"stage": 2}} (recipes/deepspeed/zero2.json)'
        )
    return config


def check_hub_model(repo: str, key: str) -> None:
    """A hub model id is in the local cache or reachable: otherwise loading it would retry for minutes and then
    blame the tokenizer."""
    from huggingface_hub import HfApi, try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(try_to_load_from_cache(repo, "config.json"), str):
            return
    except HFValidationError:
        raise ConfigError(
            f"{key}: {repo!r} is neither an existing path nor a hub model id (owner/name); check the path"
        ) from None
    where = f"download it where there is a network (`hf download {repo}`) and give its directory"
    first, local = repo.split("/")[0], ""
    if Path(first).is_dir() or first in RUN_DIRS:  # the shape of a hub id, but most likely a run not yet made
        local = (
            f"no such local directory (a run writes it: run the recipe that produces it, with "
            f"train.output_dir={repo}, or fix the path); as a hub id, "
        )
    head = f"{key}: {repo!r}: {local}it" if local else f"{key}: {repo!r}"
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        raise ConfigError(f"{head} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {where}")
    try:
        HfApi().model_info(repo, timeout=10)
    except RepositoryNotFoundError:
        raise ConfigError(
            f"{key}: {repo!r}: {local}the hub has no such model (or it is private: log in); check the id"
            if local
            else f"{key}: the hub has no model {repo!r} (or it is private: log in); check the id"
        ) from None
    except Exception as e:  # no network, a proxy, a time-out
        raise ConfigError(
            f"{head} is not in the local Hugging Face cache and the hub cannot be reached ({type(e).__name__}); {where}"
        ) from None


def _check_output_dir(output_dir: str) -> None:
    """train.output_dir is a directory, or can be made one: its nearest existing parent is a writable directory."""
    path = Path(output_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"train.output_dir: {output_dir!r} is a file, not a directory; pick another train.output_dir")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(
            f"train.output_dir: {output_dir!r} cannot be created ({parent} is not a writable directory); pick "
            f"another train.output_dir"
        )


def validate_recipe(
    recipe: Recipe,
    trainer: Optional[str] = None,
    *,
    check_model: bool = True,
    check_data: bool = True,
    training: bool = True,
) -> Recipe:
    """Raise ConfigError for the first mistake in `recipe` that loading it cannot see (module docstring); return
    the recipe. `trainer`: the algorithm about to train (default: recipe.algorithm). check_model / check_data:
    whether the model (model.path, or the tiny model built from model.tiny) / data paths will be loaded (not when
    the caller hands the trainer its own). training
    false (`eval`, `plan`): what only a training run needs (its trainer's rules, the learned order's training
    settings, train.output_dir, the DPO pairs file, the DeepSpeed JSON) is not checked."""
    trainer = (trainer or recipe.algorithm) if training else None
    validate(recipe, trainer)  # the field checks again: a recipe built or changed in Python did not pass load
    # the tiny model built from model.tiny, not a model handed to the trainer (planner_sft builds hybrid.planner's)
    if check_model and recipe.algorithm != "planner_sft":
        for problem in tiny_model_problems(recipe):
            raise ConfigError(problem)
    from .tasks import check_task_name

    check_task_name(recipe.data)
    for key, table in _registries():
        lookup(table, attrgetter(key)(recipe), key)
    plan_kinds = dict(_registries())["hybrid.plan"]
    for i, kind in enumerate(recipe.hybrid.sft_plans):  # each a hybrid.plan kind (rollout.hybrid.scaffold_rows)
        lookup(plan_kinds, kind, f"hybrid.sft_plans[{i}]")
    from .algorithms.dpo import DPO_LOSSES

    losses = recipe.dpo.loss_type
    for name in [losses] if isinstance(losses, str) else losses:
        lookup(DPO_LOSSES, name, "dpo.loss_type")
    if trainer in ("grpo", "dpo"):
        _check_orders(recipe)
    if trainer == "consensus":
        _check_consensus(recipe)
    _check_scheduler(recipe)
    _check_compile_backend(recipe)
    _check_trackers(recipe)
    _check_rewards(recipe)
    _check_files(recipe, check_model, check_data, training)
    return recipe
