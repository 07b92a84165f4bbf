"""The recipe: a typed dataclass tree loaded strictly from YAML.

`load_recipe(path, overrides)` reads a YAML file, applies dotted command-line overrides
(`optim.lr=1e-5`, `rollout.steps=64`), and converts the result into `Recipe`. Unknown keys fail with the
list of valid keys and a did-you-mean; a value of the wrong type fails naming the dotted key. The resolved
recipe is written beside every checkpoint (`save_recipe`), so a run can always be reproduced from its
output directory.

Names follow TRL's GRPOConfig where the meaning is the same (num_generations, num_iterations, beta,
epsilon, epsilon_high, loss_type, scale_rewards, max_completion_length, temperature); diffusion-specific
knobs live in their own sections (rollout, estimator).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError, did_you_mean

# ----------------------------------------------------------------------------------------------- sections


@dataclass
class TinyModelConfig:
    """Shape of the built-in tiny masked diffusion LM, used when `model.path` is empty (train from scratch)."""

    hidden_size: int = 128
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    max_position_embeddings: int = 256
    attention: Literal["bidirectional", "block_causal"] = "bidirectional"
    block_size: int = 8  # block length of block-causal attention (block diffusion)


@dataclass
class LoraConfig:
    """LoRA through peft; r=0 trains all weights."""

    r: int = 0
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])


@dataclass
class ModelConfig:
    path: Optional[str] = None  # HF directory or hub id; empty = build the tiny model from `tiny`
    tokenizer: Optional[str] = None  # default: the model's own; the char tokenizer when built from scratch
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    load_in_4bit: bool = False
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    task: str = "sudoku"  # sudoku | countdown | gsm8k | math (dllm_rl.tasks.TASKS)
    train_size: int = 20000  # procedural tasks: number of generated training examples
    eval_size: int = 200  # held-out examples (disjoint from training by construction)
    seed: int = 0
    options: dict = field(default_factory=dict)  # task-specific generator options (e.g. min_empty)
    path: Optional[str] = None  # dataset tasks: hub name, or a local .json/.jsonl/.parquet file
    eval_path: Optional[str] = None
    split: str = "train"
    eval_split: str = "test"
    system_prompt: Optional[str] = None


@dataclass
class RolloutConfig:
    """How completions are decoded (dllm_rl.rollout)."""

    max_completion_length: int = 32  # the canvas length (LLaDA's gen_length)
    steps: int = 32  # denoising steps over the whole canvas (split evenly over blocks)
    block_length: Optional[int] = None  # semi-autoregressive block length; empty = one block
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0
    top_p: float = 1.0
    commit: str = "top_k"  # top_k | threshold | factor | prophet (rollout.commit.COMMIT_RULES)
    threshold: float = 0.9  # threshold rule: commit every token with confidence >= threshold
    factor: float = 1.0  # factor rule (Fast-dLLM): n largest with conf_n >= 1 - factor / (n + 1)
    prophet_gaps: list[float] = field(default_factory=lambda: [7.5, 5.0, 2.5])  # early-commit schedule
    order: str = "low_confidence"  # low_confidence | top_prob | margin | entropy | random | left_to_right | policy
    order_temperature: float = 0.0  # > 0: sample the unmasking order (Plackett-Luce over scores / temp)
    self_correction: bool = False  # remask committed tokens whose confidence fell below the threshold
    correction_threshold: float = 0.1
    correction_max_per_step: int = 1
    cache: Literal["none", "prefix", "dual", "block"] = "none"
    # torch.compile the sampler's model call (mode name; dynamic shapes). reduce-overhead adds CUDA graphs (GPU
    # only); the KV cache is marked static for it. graphs: the whole denoising step (model, sampler, commit
    # rule, order, trace) captured once per batch bucket and step kind as a CUDA graph and replayed for every
    # block and rollout (rollout.graphs); without CUDA, torch.compile(fullgraph=True) of the step
    compile: Literal["none", "default", "reduce-overhead", "max-autotune", "graphs"] = "none"
    # compile=graphs: the torch.compile backend that traces the step first ("auto": none on CUDA, i.e. capture
    # the eager step, seconds for an 8B model; inductor on CPU. inductor on CUDA fuses more, compiles minutes;
    # none on CPU runs the step eagerly with the buckets and shapes graphs replay)
    compile_backend: str = "auto"
    stop_at_eos: bool = True
    batch_size: int = 64  # prompts decoded together in eval / generate


@dataclass
class SFTConfig:
    t_min: float = 1e-3  # masking ratio t ~ U(t_min, 1]; the prompt stays clean (LLaDA's SFT)


@dataclass
class GRPOConfig:
    num_generations: int = 8
    num_iterations: int = 1  # inner updates per rollout (mu)
    beta: float = 0.0  # KL coefficient (k3 estimator); 0 = no reference model
    epsilon: float = 0.2
    epsilon_high: Optional[float] = None
    loss_type: str = "grpo"  # grpo | dr_grpo | dapo | bnpo | wd1 | spg (algorithms.losses.LOSSES)
    importance_sampling_level: Literal["token", "sequence"] = "token"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    advantage: str = "group_mean"  # group_mean | leave_one_out; z-score = group_mean + scale_rewards=group
    filter_zero_std: bool = False  # drop groups whose rewards are all equal
    reference: Literal["auto", "adapter_disabled", "frozen_copy", "none"] = "auto"
    spg_bound: Literal["elbo", "eubo", "mix", "zero"] = "mix"  # spg: bound for negative advantages (zero: none)
    spg_mix_weight: float = 0.5  # spg: weight of the upper bound in "mix"


@dataclass
class EstimatorConfig:
    name: str = "one_step"  # one_step | elbo | block_elbo | trajectory (estimators.ESTIMATORS)
    p_mask_prompt: float = 0.15
    num_samples: int = 1  # Monte Carlo timesteps n_t (elbo) / masked views (one_step, block_elbo)
    masks_per_timestep: int = 1  # elbo: n_m masks per timestep (VRPO's optimal allocation is 1)
    t_min: float = 0.0  # masking-ratio range (elbo; block_elbo: fraction of the chosen block)
    t_max: float = 1.0
    stratified: bool = False  # elbo: stratified timesteps t_k = t_min + (t_max - t_min)(k + u) / n_t
    coupled: bool = False  # elbo: DiffuCoder's complementary mask pairs
    full_view: bool = True  # elbo + coupled: also average in the fully masked view (DiffuCoder)
    eubo_beta: float = 1.0  # block_elbo: beta of SPG's upper bound (1.5 math, 2.0 countdown, 1.0 sudoku)
    block_length: Optional[int] = None  # block_elbo: SPG's block length; empty = the rollout's (else one block)
    merge_steps: int = 1  # trajectory: consecutive commit steps scored by one forward (TraceRL's shrink)


@dataclass
class OrderPolicyConfig:
    """The learned unmasking-order head (policy.OrderHead), trained with the model when rollout.order=policy."""

    width: int = 64
    heads: int = 4
    base: Literal["top_prob", "none"] = "top_prob"  # the order an untrained head reproduces
    lr: float = 1e-3  # its own learning rate (same scheduler as the model)
    train_model: bool = True  # false: GRPO trains the order head only; the model's weights stay as loaded


@dataclass
class RewardSpec:
    name: str = ""  # built-in name, path/to/file.py:function, or an installed entry point
    weight: float = 1.0
    kwargs: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    name: Literal["adamw", "sgd"] = "adamw"  # sgd: steps proportional to the gradient (runtime.make_optimizer)
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant_with_warmup"  # any transformers.get_scheduler name
    warmup_steps: int = 0


@dataclass
class TrainConfig:
    seed: int = 0
    max_steps: int = 100
    batch_size: int = 8  # per process and optimizer step: sequences (sft) or prompts (grpo)
    gradient_accumulation_steps: int = 1  # split each step's batch into this many micro-batches (memory)
    output_dir: str = "outputs/run"
    save_steps: int = 50
    eval_steps: int = 50
    logging_steps: int = 10
    resume: bool = True  # continue from the newest checkpoint in output_dir when one exists
    save_total_limit: int = 2  # checkpoints kept (oldest deleted)
    report_to: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    deepspeed: Optional[str] = None  # path to a DeepSpeed JSON (recipes/deepspeed/zero2.json)
    num_threads: int = 0  # torch CPU threads; 0 = torch's default


@dataclass
class EvalConfig:
    size: Optional[int] = None  # held-out examples to score; empty = data.eval_size
    num_samples: int = 1  # completions per prompt (pass@1 averaged over samples)
    temperature: float = 0.0  # decoding temperature for evaluation (the rest of `rollout` applies)
    order_temperature: Optional[float] = None  # unmasking-order temperature; empty = rollout.order_temperature


@dataclass
class Recipe:
    algorithm: Literal["sft", "grpo"] = "sft"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    estimator: EstimatorConfig = field(default_factory=EstimatorConfig)
    order_policy: OrderPolicyConfig = field(default_factory=OrderPolicyConfig)
    rewards: list[RewardSpec] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


# ------------------------------------------------------------------------------------------- conversion


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp, key: str):
    """Convert a YAML value to type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}{did_you_mean(value, choices)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads "1e-5" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is Any:
        return value
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")


def _from_dict(cls, data: Any, prefix: str = ""):
    if data is None:
        data = {}
    where = prefix or "the recipe"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(
                f"unknown key {dotted!r}{did_you_mean(key, fields)}; valid keys in {where}: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _convert(value, hints[key], dotted)
    return cls(**kwargs)


def recipe_from_dict(data: dict) -> Recipe:
    """Build a Recipe from plain data, strictly (unknown keys and wrong types raise ConfigError)."""
    return _from_dict(Recipe, data)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=1e-5)")
        dotted, raw = item.split("=", 1)
        value = yaml.safe_load(raw) if raw != "" else None
        node = data
        parts = dotted.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe with optional dotted overrides into a typed `Recipe`."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(
            f"recipe file {str(path)!r} does not exist; pass a YAML file such as recipes/tiny/sudoku-sft.yaml"
        )
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    return recipe_from_dict(apply_overrides(data, list(overrides or [])))


def recipe_to_dict(recipe) -> dict:
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
