"""A TRL `GRPOConfig` (or any object with its fields) read as a dllm-rl recipe.

`recipe_from_trl_args(args, recipe)` maps every GRPOConfig / TrainingArguments field that has a meaning for
a diffusion LM onto the recipe (TRL_FIELDS: field -> recipe key, with the unit conversions), ignores the fields
that only steer TRL's or transformers' machinery (IGNORED: dataloaders, hub uploads, vLLM when off, ...), and
refuses any other field set to a value other than its default, naming each: silently dropping a setting would
train something else than the script says. Differences of meaning, field by field, are in TRL_FIELDS' comments
and README "Coming from TRL"; the main ones:
- per_device_train_batch_size counts completions per process and micro-batch; dllm-rl's train.batch_size
  counts prompts per process and optimizer step (= per_device * gradient_accumulation_steps / num_generations).
- max_steps counts optimizer steps; dllm-rl's train.max_steps counts rollouts, each followed by
  num_iterations * steps_per_generation / gradient_accumulation_steps optimizer steps.
- max_completion_length is the diffusion canvas (every completion is decoded on it), temperature/top_p/top_k/
  min_p/repetition_penalty act on each masked position's distribution at every denoising step.
Only standard-library and config imports: TRL itself is not imported here.
"""

from __future__ import annotations

import copy
import dataclasses
import math

from .config import LoraConfig, Recipe, _key_problems, resolve_batch_size
from .errors import ConfigError


def _scale_rewards(v):
    return {True: "group", False: "none"}.get(v, v)


def _value(v):
    return getattr(v, "value", v)  # transformers' enums (SchedulerType, IntervalStrategy, OptimizerNames)


def _optimizer(v):
    name = str(_value(v))
    if name.startswith("adamw"):
        return "adamw"
    if name == "sgd":
        return "sgd"
    raise ConfigError(f"GRPOConfig.optim={name!r}: dllm-rl has optim.name adamw or sgd; use optim='adamw_torch'")


def _report_to(v):
    v = [v] if isinstance(v, str) else list(v or [])
    return [] if v in (["none"], ["None"]) else v


# TRL field -> (dotted recipe key, conversion). Fields whose meaning needs more than one field are in
# `recipe_from_trl_args` (batch size, steps, warmup, mixed precision, scheduling of saves and evaluations).
TRL_FIELDS = {
    "output_dir": ("train.output_dir", str),
    "seed": ("train.seed", int),
    "learning_rate": ("optim.lr", float),
    "weight_decay": ("optim.weight_decay", float),
    "adam_epsilon": ("optim.eps", float),
    "max_grad_norm": ("optim.max_grad_norm", float),
    "lr_scheduler_type": ("optim.lr_scheduler", lambda v: str(_value(v))),
    "optim": ("optim.name", _optimizer),
    "gradient_accumulation_steps": ("train.gradient_accumulation_steps", int),
    "report_to": ("train.report_to", _report_to),
    "deepspeed": ("train.deepspeed", lambda v: v if v is None or isinstance(v, str) else _refuse("deepspeed", v)),
    "gradient_checkpointing": ("model.gradient_checkpointing", bool),
    "activation_checkpointing": ("model.gradient_checkpointing", bool),  # transformers' newer name, kept in sync
    "trust_remote_code": ("model.trust_remote_code", bool),
    "shuffle_dataset": ("train.shuffle_dataset", bool),
    "log_completions": ("train.log_completions", bool),
    "num_completions_to_print": ("train.num_completions_to_print", lambda v: v),
    "num_generations": ("grpo.num_generations", int),
    "max_completion_length": ("rollout.max_completion_length", int),
    "temperature": ("rollout.temperature", float),
    "top_p": ("rollout.top_p", float),
    "top_k": ("rollout.top_k", lambda v: int(v or 0)),
    "min_p": ("rollout.min_p", lambda v: float(v or 0.0)),
    "repetition_penalty": ("rollout.repetition_penalty", float),
    "beta": ("grpo.beta", float),
    "num_iterations": ("grpo.num_iterations", int),
    "epsilon": ("grpo.epsilon", float),
    "epsilon_high": ("grpo.epsilon_high", lambda v: v),
    "delta": ("grpo.delta", lambda v: v),
    "sapo_temperature_pos": ("grpo.sapo_temperature_pos", float),
    "sapo_temperature_neg": ("grpo.sapo_temperature_neg", float),
    "importance_sampling_level": ("grpo.importance_sampling_level", str),
    "reward_weights": ("grpo.reward_weights", lambda v: None if v is None else [float(w) for w in v]),
    "scale_rewards": ("grpo.scale_rewards", _scale_rewards),
    "loss_type": ("grpo.loss_type", str),
    "mask_truncated_completions": ("grpo.mask_truncated_completions", bool),
    "top_entropy_quantile": ("grpo.top_entropy_quantile", float),
    "sync_ref_model": ("grpo.sync_ref_model", bool),
    "ref_model_mixup_alpha": ("grpo.ref_model_mixup_alpha", float),
    "ref_model_sync_steps": ("grpo.ref_model_sync_steps", int),
    "disable_dropout": ("grpo.disable_dropout", bool),
    "use_bias_correction_kl": ("grpo.use_bias_correction_kl", bool),
}
# read by recipe_from_trl_args itself
COMBINED = {
    "per_device_train_batch_size",
    "max_steps",
    "num_train_epochs",
    "warmup_steps",
    "bf16",
    "fp16",
    "adam_beta1",
    "adam_beta2",
    "logging_steps",
    "save_strategy",
    "save_steps",
    "logging_strategy",
    "save_total_limit",
    "eval_strategy",
    "eval_steps",
    "steps_per_generation",
    "generation_batch_size",
    "model_init_kwargs",
}
# fields that steer only TRL's / transformers' machinery, which dllm-rl does not use: any value is fine
# fmt: off
IGNORED = {
    "run_name", "project", "logging_dir", "logging_first_step", "logging_nan_inf_filter",
    "log_level", "log_level_replica", "log_on_each_node", "disable_tqdm", "use_cpu", "local_rank", "do_train",
    "do_eval", "do_predict", "per_device_eval_batch_size", "eval_accumulation_steps", "eval_delay", "eval_on_start",
    "prediction_loss_only", "dataloader_drop_last", "dataloader_num_workers", "dataloader_pin_memory",
    "dataloader_persistent_workers", "dataloader_prefetch_factor", "dataloader_multiprocessing_context",
    "dataloader_in_order", "ddp_backend", "ddp_broadcast_buffers", "ddp_bucket_cap_mb",
    "ddp_find_unused_parameters", "ddp_static_graph", "ddp_timeout", "skip_memory_metrics", "push_to_hub",
    "hub_model_id", "hub_strategy", "hub_token", "hub_private_repo", "hub_always_push", "hub_revision",
    "save_only_model", "save_on_each_node", "restore_callback_states_from_checkpoint", "resume_from_checkpoint",
    "ignore_data_skip", "tf32", "torch_empty_cache_steps", "use_liger_kernel", "liger_kernel_config",
    "ds3_gather_for_generation", "cast_lm_head_to_fp32", "pad_to_multiple_of", "num_generations_eval",
    "log_multimodal", "log_unique_prompts", "cache_implementation", "gradient_checkpointing_kwargs",
    "activation_checkpointing_kwargs", "include_num_input_tokens_seen", "average_tokens_across_devices",
    "accelerator_config", "full_determinism", "data_seed", "bf16_full_eval", "fp16_full_eval", "trackio_space_id",
    "trackio_bucket_id", "trackio_static_space_id", "batch_eval_metrics", "eval_use_gather_object",
    "eval_do_concat_batches", "label_names", "include_for_metrics", "load_best_model_at_end",
    "metric_for_best_model", "greater_is_better", "length_column_name", "enable_jit_checkpoint", "debug",
    "use_cache"
}
# fmt: on


def _refuse(name, value):
    raise ConfigError(f"GRPOConfig.{name}={value!r} has no dllm-rl meaning here; see README 'Coming from TRL'")


def _set(recipe: Recipe, dotted: str, value) -> None:
    section, key = dotted.split(".")
    setattr(getattr(recipe, section), key, value)


def _defaults(args) -> dict:
    """The field values of a default instance of args' class (after its __post_init__), to tell what was set."""
    cls = type(args)
    try:
        default = cls(output_dir=getattr(args, "output_dir", "out"), bf16=False, fp16=False)
    except Exception:  # not a TrainingArguments (a plain dataclass of the same fields): its declared defaults
        default = None
    out = {}
    for f in dataclasses.fields(cls):
        if default is not None:
            out[f.name] = getattr(default, f.name)
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def recipe_from_trl_args(args, recipe: Recipe | None = None, num_rows: int | None = None) -> Recipe:
    """`recipe` with the fields of a trl.GRPOConfig `args` mapped onto it. Without a recipe: every default, and
    what GRPOConfig has no field for decoded as d1 does (rollout.steps = max_completion_length / 2; blocks of
    32 tokens when the canvas is a longer multiple of 32). num_rows: training rows, to turn num_train_epochs
    into steps when max_steps is not set."""
    if not dataclasses.is_dataclass(args):
        raise ConfigError(f"args: expected a trl.GRPOConfig, got {type(args).__name__}")
    r = copy.deepcopy(recipe) if recipe is not None else Recipe(algorithm="grpo")
    r.algorithm = "grpo"
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(args)}
    defaults = _defaults(args)
    unknown = [
        f"{k}={v!r}"
        for k, v in fields.items()
        if k not in TRL_FIELDS
        and k not in COMBINED
        and k not in IGNORED
        and not _same(v, defaults.get(k, v))
        and not (k.startswith("vllm_") and not fields.get("use_vllm"))
    ]
    if unknown:
        raise ConfigError(
            f"GRPOConfig fields without a dllm-rl meaning: {', '.join(unknown)}; remove them (README 'Coming from "
            f"TRL' lists what maps to what)"
        )
    epochs = not _same(fields.get("num_train_epochs"), defaults.get("num_train_epochs"))
    if epochs and num_rows is None and not (fields.get("max_steps") or -1) > 0:
        raise ConfigError(
            f"num_train_epochs={fields['num_train_epochs']} counts passes over the training rows, which are unknown "
            f"until the recipe's dataset loads; pass train_dataset=, or set max_steps (TRL's) or train.max_steps"
        )
    for name, (dotted, convert) in TRL_FIELDS.items():
        if name in fields:
            _set(r, dotted, _converted(name, dotted, convert, fields[name]))
    _combined(r, fields, num_rows, max(1, int(getattr(args, "world_size", 1) or 1)))
    if recipe is None:  # what GRPOConfig cannot say: decode as d1 does (2 tokens per step, blocks of 32)
        Lc = r.rollout.max_completion_length
        r.rollout.block_length = 32 if Lc > 32 and Lc % 32 == 0 else None
        r.rollout.steps = max(Lc // 2, Lc // (r.rollout.block_length or Lc))
    return r


def _converted(name: str, dotted: str, convert, value):
    """TRL field `name`'s value converted for recipe key `dotted`, refused (naming the TRL field) when it cannot be
    converted (None where dllm-rl needs a value) or its recipe key's type or Check refuses it."""
    try:
        out = convert(value)
    except (TypeError, ValueError):
        raise ConfigError(
            f"GRPOConfig.{name}={value!r}: dllm-rl needs a value here ({dotted}); set it (e.g. "
            f"{name}={_field_default(dotted)!r}) or leave it out"
        ) from None
    for problem in _key_problems_of(dotted, out):
        raise ConfigError(f"GRPOConfig.{name}={value!r} (dllm-rl's {problem})")
    return out


def _field_default(dotted: str):
    section, key = dotted.split(".")
    return getattr(getattr(Recipe(), section), key)


def _key_problems_of(dotted: str, value):
    """What the recipe's checks say of `value` at `dotted` (its type, Literal choices and Check)."""
    r = Recipe(algorithm="grpo")
    _set(r, dotted, value)
    return _key_problems(r, dotted)


def _same(a, b) -> bool:
    try:
        return bool(a == b) or (isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b))
    except Exception:
        return False


def _combined(r: Recipe, f: dict, num_rows: int | None, world: int = 1) -> None:
    """The fields whose dllm-rl meaning takes arithmetic or several fields; `world`: the processes (each rollout
    draws train.batch_size prompts on each of them)."""
    GA = r.train.gradient_accumulation_steps
    if f.get("per_device_train_batch_size") is not None:
        r.train.per_device_train_batch_size = int(f["per_device_train_batch_size"])
        resolve_batch_size(r)
    if f.get("steps_per_generation") is not None and f.get("steps_per_generation") != GA:
        r.grpo.steps_per_generation = int(f["steps_per_generation"])
    r.train.mixed_precision = "bf16" if f.get("bf16") else "fp16" if f.get("fp16") else "no"
    if "adam_beta1" in f or "adam_beta2" in f:
        r.optim.betas = [float(f.get("adam_beta1", 0.9)), float(f.get("adam_beta2", 0.999))]
    if (kwargs := f.get("model_init_kwargs")) and "dtype" in kwargs:
        r.model.dtype = str(kwargs["dtype"]).replace("torch.", "")
    chunks = (r.grpo.steps_per_generation or GA) // GA
    updates_per_rollout = max(1, chunks * r.grpo.num_iterations)
    max_steps = f.get("max_steps", -1)
    if max_steps is not None and max_steps > 0:
        r.train.max_steps = max(1, math.ceil(max_steps / updates_per_rollout))
    elif num_rows:  # an epoch is one pass over the rows by all processes together, as in TRL
        epochs = float(f.get("num_train_epochs", 1.0))
        r.train.max_steps = max(1, math.ceil(epochs * num_rows / (r.train.batch_size * chunks * world)))
    total_updates = r.train.max_steps * updates_per_rollout
    warmup = f.get("warmup_steps", 0) or 0
    r.optim.warmup_steps = int(round(warmup * total_updates)) if 0 < warmup < 1 else int(warmup)

    def steps(v):  # TRL counts optimizer steps (a float < 1 is a fraction of training); dllm-rl rollouts
        if v is None:
            return 0
        v = v * total_updates if 0 < v < 1 else v
        return max(1, round(v / updates_per_rollout))

    for name in ("save_strategy", "eval_strategy"):
        if str(_value(f.get(name, "no"))) not in ("no", "steps"):
            raise ConfigError(
                f"GRPOConfig.{name}={_value(f[name])!r}: dllm-rl saves and evaluates every N steps "
                f"or not at all; use 'steps' (with {name.split('_')[0]}_steps) or 'no'"
            )
    if str(_value(f.get("logging_strategy", "steps"))) != "steps":
        raise ConfigError(
            f"GRPOConfig.logging_strategy={_value(f['logging_strategy'])!r}: dllm-rl logs every logging_steps "
            f"steps (and the last); use 'steps'"
        )
    if "logging_steps" in f:
        r.train.logging_steps = steps(f["logging_steps"])
    if str(_value(f.get("save_strategy", "steps"))) == "no":
        r.train.save_steps = 0
    elif "save_steps" in f:
        r.train.save_steps = steps(f["save_steps"])
    if f.get("save_total_limit") is not None:
        r.train.save_total_limit = int(f["save_total_limit"])
    if str(_value(f.get("eval_strategy", "no"))) == "no":
        r.train.eval_steps = 0
    elif f.get("eval_steps") is not None:
        r.train.eval_steps = steps(f["eval_steps"])
    elif f.get("logging_steps") is not None:  # transformers: eval_steps defaults to logging_steps
        r.train.eval_steps = steps(f["logging_steps"])


def lora_from_peft(peft_config) -> LoraConfig | None:
    """The recipe's record of a peft LoraConfig (r, alpha, dropout, target modules), or None for other types."""
    if not all(hasattr(peft_config, k) for k in ("r", "lora_alpha", "lora_dropout", "target_modules")):
        return None
    targets = peft_config.target_modules
    targets = [targets] if isinstance(targets, str) else sorted(targets or [])
    return LoraConfig(int(peft_config.r), int(peft_config.lora_alpha), float(peft_config.lora_dropout), targets)
