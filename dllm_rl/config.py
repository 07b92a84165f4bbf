"""The recipe: a typed dataclass tree loaded strictly from YAML.

`load_recipe(path, overrides)` reads a YAML file, applies dotted command-line overrides
(`optim.lr=1e-5`, `rollout.steps=64`), and converts the result into `Recipe`. Unknown keys fail with the
list of valid keys and a did-you-mean; a value of the wrong type fails naming the dotted key; a value outside
its field's constraint (`Annotated[type, Check(...)]`, next to the field) or against a rule across fields fails
in one line with the fix (`validate`; names kept in registries are checked by validate.py). The resolved
recipe is written beside every checkpoint (`save_recipe`), so a run can always be reproduced from its
output directory.

Names follow TRL's GRPOConfig where the meaning is the same (num_generations, num_iterations, beta,
epsilon, epsilon_high, loss_type, scale_rewards, max_completion_length, temperature), and TRL's DPOConfig in
the `dpo` section (beta, loss_type, loss_weights, label_smoothing, precompute_ref_log_probs, max_length,
truncation_mode); diffusion-specific knobs live in their own sections (rollout, estimator).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml

from .errors import ConfigError, did_you_mean

# ------------------------------------------------------------------------------------------- constraints


@dataclass(frozen=True)
class Check:
    """What a recipe value must satisfy, written next to its field as `Annotated[type, Check(...)]` and read by
    `validate` when a recipe is loaded.

    ge / gt / le / lt bound a number (each item of a list of numbers, when the item type carries the Check);
    `length` fixes a list's length and `min_items` bounds it; `ignored_by` names the algorithms whose trainer
    never reads the key: training with one of them, a value other than the default is an error (it would be
    ignored silently); `why` is the reason a message gives. Every float must also be finite, every string non-empty.
    """

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None
    length: Optional[int] = None
    min_items: int = 0
    ignored_by: tuple[str, ...] = ()
    why: str = ""

    def range_text(self) -> str:
        bounds = ((">=", self.ge), (">", self.gt), ("<=", self.le), ("<", self.lt))
        return " and ".join(f"{op} {int(v) if float(v).is_integer() else v}" for op, v in bounds if v is not None)

    def in_range(self, v: float) -> bool:
        return not (
            (self.ge is not None and not v >= self.ge)
            or (self.gt is not None and not v > self.gt)
            or (self.le is not None and not v <= self.le)
            or (self.lt is not None and not v < self.lt)
        )


# the constraints most fields share
Count = Annotated[int, Check(ge=1)]  # sizes and counts: at least 1
Cadence = Annotated[int, Check(ge=0, why="0 = never")]  # every N steps, 0 = never
Seed = Annotated[int, Check(ge=0, le=2**32 - 1, why="a seed torch, numpy and reasoning-gym all accept")]
Unit = Annotated[float, Check(ge=0, le=1)]  # probabilities, fractions, thresholds
NonNegative = Annotated[float, Check(ge=0)]
Positive = Annotated[float, Check(gt=0)]
LearningRate = Annotated[float, Check(gt=0, le=1, why="a learning rate")]
SFT_LIKE = ("sft", "planner_sft", "consensus")  # trainers of supervised targets: no rewards, no RL estimates
NOT_SFT = Check(ignored_by=SFT_LIKE)  # a section the SFT-like trainers do not read
NOT_SFT_DPO = Check(ignored_by=SFT_LIKE + ("dpo",))  # ... nor the DPO trainer
NOT_DPO_READERS = Check(ignored_by=SFT_LIKE + ("grpo",))  # read by the DPO trainer only
NOT_RL = ("grpo", "dpo")  # the RL trainers: no supervised targets
GRPO_ONLY = Check(ignored_by=("sft", "dpo", "consensus", "planner_sft"), why="read by GRPO only")
# planner_sft trains hybrid.planner with TRL's SFTTrainer: the executor's sections are not read
SFT_ONLY = Check(ignored_by=("grpo", "dpo", "consensus"), why="read by algorithm sft only")
PLANNER_GREEDY = Check(ignored_by=("planner_sft",), why="planner_sft scores the planner's greedy plans")
PLANNER_SFT = Check(ignored_by=("planner_sft",), why="planner_sft trains hybrid.planner with TRL's SFTTrainer")

# ----------------------------------------------------------------------------------------------- sections


@dataclass
class TinyModelConfig:
    """Shape of the built-in tiny masked diffusion LM, used when `model.path` is empty (train from scratch)."""

    hidden_size: Count = 128
    num_layers: Count = 4
    num_heads: Count = 4
    intermediate_size: Count = 384
    max_position_embeddings: Count = 256
    attention: Literal["bidirectional", "block_causal"] = "bidirectional"
    block_size: Count = 8  # block length of block-causal attention (block diffusion)


@dataclass
class LoraConfig:
    """LoRA through peft; r=0 trains all weights."""

    r: Annotated[int, Check(ge=0, why="0 = no LoRA")] = 0
    alpha: Count = 16
    dropout: Annotated[float, Check(ge=0, lt=1)] = 0.0
    target_modules: Annotated[list[str], Check(min_items=1)] = field(default_factory=lambda: ["all-linear"])


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
    task: str = "sudoku"  # sudoku | countdown | gsm8k | math | code (dllm_rl.tasks.TASKS) | reasoning_gym/NAME
    dataset: Optional[str] = None  # any dataset with a prompt column: hub name or local .jsonl/.json/.parquet/.csv
    prompt_column: str = "prompt"  # data.dataset: the column holding prompts (text or chat messages)
    train_size: Count = 20000  # procedural tasks: number of generated training examples
    # held-out examples; generated tasks hold out solution grids / instances (tasks.base.held_out), so with
    # sudoku's unique: false the same puzzle text can still occur in both
    eval_size: Count = 200
    seed: Seed = 0
    # generated tasks (sudoku, countdown, reasoning_gym/NAME): which held-out set. 0 = the one every recipe shares
    # (its stream seed is fixed, 10**6); k > 0 draws the k-th independent one (stream seed 10**6 * (k + 1)), still
    # disjoint from training where the task's split is, to check a result that was chosen on set 0
    eval_seed: Annotated[int, Check(ge=0, le=4000, why="the stream seed 10**6 * (k + 1) must fit 32 bits")] = 0
    options: dict = field(default_factory=dict)  # task options (min_empty; reasoning-gym config; load_dataset kwargs)
    path: Optional[str] = None  # dataset tasks: hub name, or a local .json/.jsonl/.parquet file
    eval_path: Optional[str] = None
    split: str = "train"
    eval_split: str = "test"
    system_prompt: Optional[str] = None


@dataclass
class RolloutConfig:
    """How completions are decoded (dllm_rl.rollout)."""

    max_completion_length: Count = 32  # the canvas length (LLaDA's gen_length)
    steps: Count = 32  # denoising steps over the whole canvas (split evenly over blocks)
    block_length: Optional[Count] = None  # semi-autoregressive block length; empty = one block
    # 0 = greedy. SFT does not read it: it evaluates at eval.temperature; consensus samples at consensus.temperature
    temperature: Annotated[
        float,
        Check(ge=0),
        Check(ignored_by=("sft",), why="SFT decodes at eval.temperature"),
        Check(
            ignored_by=("consensus",),
            why="consensus votes at consensus.temperature (greedy targets at 0) and evaluates at eval.temperature",
        ),
    ] = 0.0
    top_k: Annotated[int, Check(ge=0, why="0 = no top-k cut")] = 0
    top_p: Annotated[float, Check(gt=0, le=1, why="1 = no nucleus cut")] = 1.0
    min_p: Unit = 0.0  # TRL's min_p (0 = off): keep tokens with p >= min_p * p_max (after temperature)
    # TRL's (HF's): logits of prompt + committed canvas tokens /p (>0) or *p (<0)
    repetition_penalty: Annotated[float, Check(gt=0, why="1 = no penalty")] = 1.0
    commit: str = "top_k"  # top_k | threshold | factor | prophet (rollout.commit.COMMIT_RULES)
    threshold: Unit = 0.9  # threshold rule: commit every token with confidence >= threshold
    factor: Positive = 1.0  # factor rule (Fast-dLLM): n largest with conf_n >= 1 - factor / (n + 1)
    # early-commit schedule: the mean top-2 logit gap needed in the first, middle and last third of decoding
    prophet_gaps: Annotated[list[NonNegative], Check(length=3)] = field(default_factory=lambda: [7.5, 5.0, 2.5])
    order: str = "low_confidence"  # low_confidence | top_prob | margin | entropy | random | left_to_right | policy
    order_temperature: NonNegative = 0.0  # > 0: sample the unmasking order (Plackett-Luce over scores / temp)
    self_correction: bool = False  # remask committed tokens whose confidence fell below the threshold
    correction_threshold: Unit = 0.1
    correction_max_per_step: Count = 1
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
    batch_size: Count = 64  # prompts decoded together in eval / generate
    # any-process decoding (rollout/anyprocess.py, arXiv 2510.06190): a learned edit head (edit_policy) also
    # decides, each step, to remask committed tokens (remask), or to remask, delete and insert masks (any)
    edit: Literal["none", "remask", "any"] = "none"
    edit_temperature: NonNegative = 1.0  # the edit decisions are drawn from softmax(logits / this); 0 = argmax
    edit_max_per_step: Count = 2  # edits per row and step (non-KEEP ops + non-zero insert counts)
    edit_max_insert: Count = 1  # masks opened after one position in one step (1: AP-MDM's expansion)
    edit_initial_length: Optional[Count] = None  # the canvas starts this long; empty = max_completion_length,
    # which is the most the completion can grow to under edits
    edit_extra_steps: Annotated[int, Check(ge=0)] = 0  # forwards beyond rollout.steps to review and edit the canvas


@dataclass
class SFTConfig:
    # masking ratio t ~ U(t_min, 1]; prompt clean. Read by masked-diffusion SFT and consensus (its SFT step)
    t_min: Annotated[float, Check(ge=0, lt=1), Check(ignored_by=NOT_RL, why="read by SFT and consensus only")] = 1e-3
    # mdm: masked-diffusion SFT; edit: the edit head of rollout.edit (and the model) on corrupted drafts
    # (trainers/edit_sft.py; tasks/edit_drafts.py), each rate below the most a draft gets (0 in half of them).
    # Read by algorithm sft only (consensus trains masked-diffusion SFT whatever it says)
    objective: Annotated[Literal["mdm", "edit"], SFT_ONLY] = "mdm"
    edit_substitute: Annotated[Unit, SFT_ONLY] = 0.2  # shown tokens replaced by wrong ones (to remask)
    edit_missing: Annotated[Unit, SFT_ONLY] = 0.3  # hidden target tokens without a mask (to insert)
    edit_spurious: Annotated[Unit, SFT_ONLY] = 0.3  # extra masks and wrong tokens (to delete)
    # share of drafts that are all masks of a random length (rollout.edit=any)
    edit_wrong_length: Annotated[Unit, SFT_ONLY] = 0.3
    edit_vocab: Annotated[Optional[str], SFT_ONLY] = None  # the text wrong tokens are drawn from; empty = the targets'


@dataclass
class GRPOConfig:
    num_generations: Annotated[int, Check(ge=2, why="advantages are relative to the group")] = 8
    num_iterations: Count = 1  # inner updates per rollout (mu)
    beta: NonNegative = 0.0  # KL coefficient (k3 estimator); 0 = no reference model
    epsilon: Positive = 0.2  # clip range of the ratio: [1 - epsilon, 1 + epsilon_high]
    epsilon_high: Optional[Positive] = None  # empty = epsilon
    # grpo | dr_grpo | dapo | bnpo | cispo | sapo | wd1 | spg (algorithms.losses.LOSSES). TRL defaults to dapo; the
    # default here stays grpo, which recipes written before dapo was TRL's default expect (a GRPOConfig maps its own)
    loss_type: str = "grpo"
    importance_sampling_level: Literal["token", "sequence"] = "token"
    scale_rewards: Literal["group", "batch", "none"] = "group"
    advantage: str = "group_mean"  # group_mean | leave_one_out; z-score = group_mean + scale_rewards=group
    filter_zero_std: bool = False  # drop groups whose rewards are all equal
    reference: Literal["auto", "adapter_disabled", "frozen_copy", "none"] = "auto"
    spg_bound: Literal["elbo", "eubo", "mix", "zero"] = "mix"  # spg: bound for negative advantages (zero: none)
    spg_mix_weight: Unit = 0.5  # spg: weight of the upper bound in "mix"
    # two-sided clip (INTELLECT-2, TRL's delta): cap the unclipped ratio at delta
    delta: Optional[Annotated[float, Check(gt=1, why="a cap above the ratio 1")]] = None
    sapo_temperature_pos: Positive = 1.0  # sapo: gate temperature for positive advantages (TRL's)
    sapo_temperature_neg: Positive = 1.05  # sapo: ... for negative advantages
    # TRL's mask_truncated_completions: no loss for a completion with no EOS inside the canvas (a diffusion LM
    # fills the whole canvas, so "truncated" means it never ended); it still counts in its group's statistics
    mask_truncated_completions: bool = False
    # < 1: policy loss only on tokens whose entropy is in this top quantile
    top_entropy_quantile: Annotated[float, Check(gt=0, le=1, why="1 = every token")] = 1.0
    sync_ref_model: bool = False  # TRL's: ref <- alpha * policy + (1 - alpha) * ref every ref_model_sync_steps
    ref_model_mixup_alpha: Unit = 0.6
    ref_model_sync_steps: Count = 512  # optimizer steps
    # TRL's: micro-batches (of train.batch_size / gradient_accumulation_steps prompts' completions) per rollout;
    # empty = gradient_accumulation_steps (one rollout per optimizer step). A multiple of it: one rollout feeds
    # steps_per_generation / gradient_accumulation_steps optimizer steps (x num_iterations)
    steps_per_generation: Optional[Count] = None
    generation_batch_size: Optional[Count] = None  # TRL's: completions per rollout on all processes (or the above)
    disable_dropout: bool = False  # TRL's: set every nn.Dropout of the policy (and reference) to p = 0
    use_bias_correction_kl: bool = False  # TRL's (its default: true): KL term x the importance ratio
    reward_weights: Optional[list[float]] = None  # TRL's: one weight per reward (or each reward's own weight)


@dataclass
class DPOConfig:
    """DPO on log-likelihood estimates (trainers.dpo). Names are TRL's DPOConfig's where the meaning is the same;
    the estimate itself is configured in `estimator` (quadrature, elbo with VRPO's allocation, ...)."""

    beta: Positive = 0.1
    # sigmoid | hinge | ipo | robust | sigmoid_norm | sft (algorithms.dpo.DPO_LOSSES); a list sums them
    loss_type: Union[str, list[str]] = "sigmoid"
    loss_weights: Optional[list[float]] = None  # one per loss_type (default 1 each)
    label_smoothing: Annotated[float, Check(ge=0, lt=0.5)] = 0.0  # robust: assumed rate of flipped labels
    precompute_ref_log_probs: bool = False  # score the reference once per example, cached beside the run
    max_length: Optional[Count] = 1024  # prompt + completion tokens; longer pairs are truncated (truncation_mode)
    max_prompt_length: Optional[Count] = None  # prompts keep their last max_prompt_length tokens
    truncation_mode: Literal["keep_start", "keep_end"] = "keep_start"  # keep_end: cut the prompt's start instead
    # offline: dataset_name; on_policy: best vs worst of G samples; branch: the greedy decode against its nearest
    # branch with another reward (rollout.branch: one decision changed, then greedy again; step-level pairs)
    pairs: Literal["offline", "on_policy", "branch"] = "offline"
    dataset_name: Optional[str] = None  # offline: hub name or local .json/.jsonl/.parquet (prompt/chosen/rejected)
    dataset_train_split: str = "train"
    # on_policy: completions sampled per prompt (G)
    num_generations: Annotated[int, Check(ge=2, why="a pair needs two samples")] = 8
    # on_policy: the first of each prompt's candidates is its greedy decode (temperature 0, the rest of `rollout`),
    # the others sampled; ties go to it, so a pair then sets the greedy decode against a sample that scored otherwise
    greedy_candidate: bool = False
    # on_policy: up to this many disjoint pairs per prompt: candidates ranked by reward, the i-th best against the
    # i-th worst while the first scores higher (1: the best against the worst)
    pairs_per_prompt: Count = 1
    # branch: each decision of the greedy decode is tried with its next branch_alternatives most likely tokens, the
    # nearest first (smallest drop in log-prob), at most branch_rounds of them per prompt; the first that scores
    # above the greedy decode is the chosen, else (branch_anchors) the nearest that scores below is the rejected
    branch_alternatives: Count = 2
    branch_rounds: Count = 4
    branch_anchors: bool = True
    reference: Literal["auto", "adapter_disabled", "frozen_copy"] = "auto"  # auto: adapter_disabled under LoRA
    # TRL's (TR-DPO, arXiv 2404.09656): ref <- alpha * policy + (1 - alpha) * ref every ref_model_sync_steps
    # optimizer steps; the reference order head too (rollout.order=policy)
    sync_ref_model: bool = False
    ref_model_mixup_alpha: Unit = 0.6
    ref_model_sync_steps: Count = 512
    antithetic: bool = True  # VRPO: policy and reference scored under the same noise (false: independent draws)
    pair_noise: Literal["independent", "shared"] = "independent"  # shared: chosen and rejected under the same noise
    # noise draws for the logged std of the preference score (0: not logged)
    score_std_draws: Annotated[int, Check(ge=0)] = 4
    disable_dropout: bool = True  # as TRL: policy and reference then agree exactly under the same noise


@dataclass
class EstimatorConfig:
    """The likelihood estimator GRPO and DPO score completions with. Each key is read by the estimators its comment
    names (ESTIMATOR_KEYS, which refuses a key set for another estimator, as that one would ignore it)."""

    name: str = "one_step"  # one_step | elbo | block_elbo | trajectory | quadrature | ar_order (estimators.ESTIMATORS)
    # one_step, block_elbo: prompt tokens masked at this rate; the others keep the prompt clean (0 says so: accepted)
    p_mask_prompt: Unit = 0.15
    # one_step: masked views; elbo: Monte Carlo timesteps n_t; block_elbo: views; quadrature: Gauss-Legendre nodes
    num_samples: Count = 1
    masks_per_timestep: Count = 1  # elbo: n_m masks per timestep (VRPO's optimal allocation is 1); quadrature: per node
    t_min: Unit = 0.0  # elbo, block_elbo: masking-ratio range (block_elbo: fraction of the chosen block)
    t_max: Unit = 1.0  # elbo, block_elbo (quadrature integrates over [0, 1])
    stratified: bool = False  # elbo: stratified timesteps t_k = t_min + (t_max - t_min)(k + u) / n_t
    coupled: bool = False  # elbo: DiffuCoder's complementary mask pairs
    full_view: bool = True  # elbo, with coupled only: also average in the fully masked view (DiffuCoder)
    eubo_beta: Positive = 1.0  # block_elbo: beta of SPG's upper bound (1.5 math, 2.0 countdown, 1.0 sudoku)
    block_length: Optional[Count] = None  # block_elbo: SPG's block length; empty = the rollout's (else one block)
    # trajectory: consecutive commit steps scored by one forward (TraceRL's shrink); ar_order: tokens per view
    merge_steps: Count = 1


@dataclass
class OrderPolicyConfig:
    """The learned unmasking-order head (policy.OrderHead), trained with the model when rollout.order=policy (by
    GRPO, or by on-policy DPO)."""

    width: Count = 64
    heads: Count = 4
    base: Literal["top_prob", "none"] = "top_prob"  # the order an untrained head reproduces
    lr: LearningRate = 1e-3  # its own learning rate (same scheduler as the model)
    train_model: bool = True  # false: the trainer trains the order head only; the model's weights stay as loaded


@dataclass
class PlannerConfig:
    """An autoregressive planner (models.ar): any transformers causal LM, optionally sampled by vLLM."""

    path: Optional[str] = None  # causal LM dir / hub id / pkg:<package>/<file>.gguf; empty = a fresh tiny Llama
    backend: Literal["transformers", "vllm"] = "transformers"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    system_prompt: Optional[str] = None  # prepended to the task's prompt for the planner
    # the planner's own sampling settings (0 = greedy); planner_sft scores greedy plans and samples none
    temperature: Annotated[NonNegative, PLANNER_GREEDY] = 1.0
    top_k: Annotated[int, Check(ge=0, why="0 = off"), PLANNER_GREEDY] = 0
    top_p: Annotated[float, Check(gt=0, le=1), PLANNER_GREEDY] = 1.0
    max_new_tokens: Count = 32  # the plan's token budget
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)  # shape of a fresh tiny planner (planner_sft)
    train: Annotated[bool, GRPO_ONLY] = False  # GRPO: the planner's log-probs join the objective with the same group
    # advantage. Its own learning rate in GRPO (same scheduler as the executor); planner_sft trains at optim.lr
    lr: Annotated[LearningRate, GRPO_ONLY] = 1e-4
    lora: LoraConfig = field(default_factory=LoraConfig)  # r > 0: train adapters only


@dataclass
class HybridConfig:
    """AR planner -> diffusion executor (rollout.hybrid): a plan placed in the executor's prompt."""

    # none | content_free | real | oracle | other_problem | corrupted (rollout.hybrid.PLAN_KINDS)
    plan: Annotated[str, PLANNER_SFT] = "none"
    # the executor's user turn with a plan; {plan} and {question}
    template: Annotated[str, PLANNER_SFT] = "Plan: {plan}\n{question}"
    content_free: Annotated[Optional[str], PLANNER_SFT] = (
        None  # the content-free plan; empty = the task's (tasks.plans)
    )
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    # false: GRPO trains the planner only (the executor's weights stay as loaded)
    train_executor: Annotated[bool, GRPO_ONLY] = True
    # SFT: render training prompts with these kinds in turn
    sft_plans: Annotated[
        list[str], Check(ignored_by=("grpo", "dpo", "consensus", "planner_sft"), why="read by SFT only")
    ] = field(default_factory=list)


@dataclass
class ConsensusConfig:
    """Consensus distillation (trainers/consensus.py): SFT toward the majority vote of the model's samples."""

    steps_per_round: Count = 50  # optimizer steps per round; targets are rebuilt at the start of each round
    prompts_per_round: Count = 256  # fresh training prompts voted on per round
    samples: Count = 8  # votes per prompt
    temperature: NonNegative = 1.0  # the voters' sampling temperature
    min_share: Unit = 0.5  # keep a prompt when its winning answer has this share of the samples (unreadable ones count)
    max_paths: Count = 4  # distinct completions with the winning answer kept as targets per prompt
    target: Literal["majority", "greedy"] = "majority"  # greedy: distil the teacher's greedy decode (no vote)
    teacher: Literal["current", "initial"] = "current"  # initial: votes of the starting model (frozen targets)


@dataclass
class EditPolicyConfig:
    """The edit head (policy.EditHead) of any-process decoding, built when rollout.edit is remask or any."""

    width: Count = 64
    heads: Count = 4
    init_bias: float = 4.0  # KEEP and insert-0 start this many logits above the other choices
    lr: LearningRate = 1e-3  # its own learning rate (same scheduler as the model)
    train_model: bool = True  # false: only the edit head (and an order head) learn; the model stays as loaded


@dataclass
class RewardSpec:
    # a built-in name, path/to/file.py:function, or an installed entry point (checked by validate.validate_recipe)
    name: Annotated[str, Check(why="a built-in reward name, path/to/file.py:function or an entry point")] = ""
    weight: float = 1.0  # any finite number: a negative weight penalises
    kwargs: dict = field(default_factory=dict)


@dataclass
class OptimConfig:
    # sgd: steps proportional to the gradient (runtime.make_optimizer); planner_sft trains with TRL's AdamW
    name: Annotated[
        Literal["adamw", "sgd"], Check(ignored_by=("planner_sft",), why="TRL's SFTTrainer trains with AdamW")
    ] = "adamw"
    lr: Annotated[float, Check(ge=0, le=1, why="a learning rate; 0 freezes the model's weights")] = 1e-4
    weight_decay: NonNegative = 0.0
    betas: Annotated[list[Annotated[float, Check(ge=0, lt=1)]], Check(length=2)] = field(
        default_factory=lambda: [0.9, 0.999]
    )  # adamw only
    eps: Positive = 1e-8  # adamw only
    momentum: Annotated[float, Check(ge=0, lt=1), Check(ignored_by=("planner_sft",), why="sgd only")] = 0.0  # sgd
    max_grad_norm: Annotated[float, Check(ge=0, why="0 = no clipping")] = 1.0
    lr_scheduler: str = "constant_with_warmup"  # a transformers.get_scheduler name (validate.SCHEDULERS)
    warmup_steps: Annotated[int, Check(ge=0)] = 0


@dataclass
class TrainConfig:
    seed: Seed = 0
    max_steps: Count = 100
    batch_size: Count = 8  # per process and optimizer step: sequences (sft) or PROMPTS (grpo; TRL counts completions)
    gradient_accumulation_steps: Count = 1  # split each step's batch into this many micro-batches (memory)
    output_dir: str = "outputs/run"
    save_steps: Cadence = 50  # a checkpoint every N steps (and at the last)
    eval_steps: Annotated[Cadence, Check(ignored_by=("planner_sft",), why="it scores its plans once, at the end")] = 50
    logging_steps: Count = 10
    # true: continue the newest checkpoint in output_dir when its recipe matches this one (trainers.common);
    # "force": continue it whatever differs; false: refuse a directory that already holds a run
    resume: Union[bool, Literal["force"]] = True
    save_total_limit: Annotated[int, Check(ge=0, why="0 = keep all")] = 2  # checkpoints kept (oldest deleted)
    report_to: list[str] = field(default_factory=list)  # accelerate trackers: tensorboard, wandb (+ completions table)
    # TRL's: print a sample of the completions table and save it as parquet
    log_completions: Annotated[bool, PLANNER_SFT] = False
    num_completions_to_print: Annotated[Optional[Count], PLANNER_SFT] = None  # rows of that sample; empty = all
    # TRL's: a seeded permutation of the training rows per epoch; false = in order
    shuffle_dataset: Annotated[bool, PLANNER_SFT] = True
    # TRL's spelling of the batch: completions per process per micro-batch (forward/backward). When set,
    # batch_size = per_device_train_batch_size * gradient_accumulation_steps / grpo.num_generations prompts
    per_device_train_batch_size: Optional[Count] = None
    mixed_precision: Annotated[Literal["no", "bf16", "fp16"], PLANNER_SFT] = "no"
    deepspeed: Annotated[Optional[str], PLANNER_SFT] = None  # path to a DeepSpeed JSON (recipes/deepspeed/zero2.json)
    num_threads: Annotated[int, Check(ge=0)] = 0  # torch CPU threads; 0 = torch's default


@dataclass
class EvalConfig:
    size: Optional[Count] = None  # held-out examples to score; empty = data.eval_size
    num_samples: Count = 1  # completions per prompt (pass@1 averaged over samples)
    temperature: NonNegative = 0.0  # decoding temperature for evaluation (the rest of `rollout` applies)
    order_temperature: Optional[NonNegative] = None  # unmasking-order temperature; empty = rollout.order_temperature
    majority: bool = False  # with num_samples > 1: accuracy = majority vote over the samples' answers (maj@n)
    edit_temperature: Optional[NonNegative] = None  # edit decisions' temperature; empty = rollout.edit_temperature


@dataclass
class Recipe:
    algorithm: Literal["sft", "grpo", "dpo", "planner_sft", "consensus"] = "sft"
    # planner_sft reads none of model, rollout, sft and eval: it trains hybrid.planner and scores its greedy plans
    model: Annotated[ModelConfig, PLANNER_SFT] = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: Annotated[RolloutConfig, PLANNER_SFT] = field(default_factory=RolloutConfig)
    sft: Annotated[SFTConfig, PLANNER_SFT] = field(default_factory=SFTConfig)
    grpo: Annotated[GRPOConfig, NOT_SFT_DPO] = field(default_factory=GRPOConfig)
    dpo: Annotated[DPOConfig, NOT_DPO_READERS] = field(default_factory=DPOConfig)
    estimator: Annotated[EstimatorConfig, NOT_SFT] = field(default_factory=EstimatorConfig)
    order_policy: Annotated[OrderPolicyConfig, NOT_SFT] = field(default_factory=OrderPolicyConfig)  # GRPO and DPO
    # read by GRPO and edit SFT (rollout.edit)
    edit_policy: Annotated[EditPolicyConfig, Check(ignored_by=("dpo", "planner_sft", "consensus"))] = field(
        default_factory=EditPolicyConfig
    )
    hybrid: HybridConfig = field(default_factory=HybridConfig)
    consensus: Annotated[ConsensusConfig, Check(ignored_by=("sft", "grpo", "dpo", "planner_sft"))] = field(
        default_factory=ConsensusConfig
    )
    # GRPO's and on-policy DPO's rewards; SFT scores its held-out set with the task's own verifier
    rewards: Annotated[list[RewardSpec], NOT_SFT] = field(default_factory=list)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: Annotated[EvalConfig, PLANNER_SFT] = field(default_factory=EvalConfig)


# ------------------------------------------------------------------------------------------- conversion


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _sample(tp) -> str:
    """A value of type `tp` as a command-line override writes it, for messages (`optim.betas=[0.5]`)."""
    tp = field_checks(tp)[0]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return str(args[0]).lower() if isinstance(args[0], bool) else str(args[0])
    if origin in (Union, types.UnionType):
        return _sample(next(a for a in args if a is not type(None)))
    if origin is list:
        return f"[{_sample(args[0] if args else str)}]"
    if dataclasses.is_dataclass(tp):
        first = dataclasses.fields(tp)[0]
        return f"{{{first.name}: {_sample(typing.get_type_hints(tp)[first.name])}}}"
    if tp is dict or origin is dict:
        return "{name: value}"
    return {bool: "true", int: "1", float: "0.5", str: "text"}.get(tp, "...")


def _convert(value: Any, tp, key: str, fit: Optional[list] = None):
    """Convert a YAML value to type `tp`, or raise ConfigError naming `key`. fit: a list of the length the field
    requires (its default), the example a message gives when a single value is written for the list."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key, fit)
            except ConfigError as e:
                errors.append(str(e))
        if len(errors) == 1:
            raise ConfigError(errors[0])
        wanted = " or ".join(
            repr(list(typing.get_args(a))) if typing.get_origin(a) is Literal else _type_name(a) for a in args
        )
        raise ConfigError(f"{key}: expected {wanted}, got {type(value).__name__} {value!r}; e.g. {key}={_sample(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(
                f"{key}: {value!r} is not one of {list(choices)}{did_you_mean(value, choices)}; "
                f"e.g. {key}={_sample(tp)}"
            )
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            example = _sample(tp)
            if fit is not None:  # a list of fixed length: the default shows it
                example = "[" + ", ".join(str(v) for v in fit) + "]"
            elif isinstance(value, (str, int, float)) and not isinstance(value, bool):  # the value given, in a list
                item = field_checks(typing.get_args(tp)[0])[0]
                first = dataclasses.fields(item)[0].name if dataclasses.is_dataclass(item) else None
                example = f"[{{{first}: {value}}}]" if first else f"[{value}]"
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}; e.g. {key}={example}")
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(
                f"{key}: expected a mapping, got {type(value).__name__} {value!r}; e.g. {key}={_sample(tp)}"
            )
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                return float(value)
            except OverflowError:  # an integer beyond any float
                raise ConfigError(
                    f"{key}: an integer of {len(str(value))} digits is too large; set a finite {key}"
                ) from None
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
    raise ConfigError(
        f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}; write {key}=<{_type_name(tp)}>"
    )


def _from_dict(cls, data: Any, prefix: str = ""):
    if data is None:
        data = {}
    where = prefix or "the recipe"
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    extras = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            raise ConfigError(
                f"unknown key {dotted!r}{did_you_mean(key, fields)}; valid keys in {where}: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _convert(value, hints[key], dotted, _fixed_length_default(fields[key], extras[key]))
    return cls(**kwargs)


def _fixed_length_default(f: dataclasses.Field, tp) -> Optional[list]:
    """The default of a list field whose Check fixes its length (optim.betas), else None."""
    lengths = [c.length for c in field_checks(tp)[1] if c.length is not None]
    if not lengths or f.default_factory is dataclasses.MISSING:
        return None
    default = f.default_factory()
    return default if isinstance(default, list) and len(default) == lengths[0] else None


def recipe_from_dict(data: dict) -> Recipe:
    """Build a Recipe from plain data, strictly: unknown keys, wrong types and values that break their field's
    Check or a rule across fields raise ConfigError (`validate`)."""
    recipe = _from_dict(Recipe, data)
    resolve_batch_size(recipe, "batch_size" in ((data or {}).get("train") or {}))
    return validate(recipe)


# ------------------------------------------------------------------------------------------- validation


def field_checks(tp) -> tuple[Any, list[Check]]:
    """(the type without Annotated and Optional, the Checks it carries)."""
    checks: list[Check] = []
    while True:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Annotated:
            tp, checks = args[0], checks + [m for m in args[1:] if isinstance(m, Check)]
        elif origin in (Union, types.UnionType) and type(None) in args and len(args) == 2:
            tp = next(a for a in args if a is not type(None))
        else:
            return tp, checks


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _example(key: str, default, check: Check) -> str:
    ok = isinstance(default, (int, float)) and not isinstance(default, bool) and check.in_range(default)
    return f" (e.g. {key}={default})" if ok else ""


def _problems(value, tp, key: str, default, trainer: Optional[str]):
    """One-line messages for what in `value` (of annotated type `tp`) breaks a Check, walking sections and lists."""
    tp, checks = field_checks(tp)
    if value is None:
        return
    if (wrong := _wrong_type(value, tp, key)) is not None:  # a recipe built or changed in Python skipped _convert
        yield wrong
        return
    for c in checks:
        if trainer in c.ignored_by and value != default:
            why = f" ({c.why})" if c.why else ""
            where, shown = key, value
            if dataclasses.is_dataclass(value):  # name the first key of the section that was set (a leaf)
                where, shown = key, value
                while dataclasses.is_dataclass(shown) and dataclasses.is_dataclass(default):
                    name = next(
                        f.name for f in dataclasses.fields(shown) if getattr(shown, f.name) != getattr(default, f.name)
                    )
                    where, shown, default = f"{where}.{name}", getattr(shown, name), getattr(default, name)
                why = f" (nor anything in {key}){why}"
            yield (
                f"{where}: set to {_show(shown)}, but algorithm {trainer} never reads it{why}; remove it from the "
                f"recipe (or train with an algorithm that reads it)"
            )
            return
    if dataclasses.is_dataclass(tp):
        hints = typing.get_type_hints(tp, include_extras=True)
        for f in dataclasses.fields(tp):
            sub = getattr(default, f.name, None) if default is not None else None
            yield from _problems(
                getattr(value, f.name), hints[f.name], f"{key}.{f.name}" if key else f.name, sub, trainer
            )
        return
    if isinstance(value, list):
        for c in checks:
            if c.length is not None and len(value) != c.length:
                yield f"{key}: {_show(value)} has {len(value)} items; give exactly {c.length}" + (
                    f" (e.g. {key}={default})" if isinstance(default, list) and len(default) == c.length else ""
                )
            if len(value) < c.min_items:
                yield f"{key}: {_show(value)} has {len(value)} items; give at least {c.min_items} (e.g. {default})"
        item = _list_item(tp)
        item_default = field_checks(item)[0]() if dataclasses.is_dataclass(field_checks(item)[0]) else None
        for i, v in enumerate(value):
            yield from _problems(v, item, f"{key}[{i}]", item_default, trainer)
        return
    if isinstance(value, float) and not math.isfinite(value):
        yield f"{key}: {_show(value)} is not a finite number; set {key} to a finite value" + (
            f" (e.g. {key}={default})" if isinstance(default, float) and math.isfinite(default) else ""
        )
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        for c in checks:
            if not c.in_range(value):
                why = f": {c.why}" if c.why and not c.ignored_by else ""  # an ignored_by's why is not a range's
                yield (
                    f"{key}: {_show(value)} is out of range (it must be {c.range_text()}{why}); set {key} to a value "
                    f"{c.range_text()}{_example(key, default, c)}"
                )
                return
    if isinstance(value, str) and value == "":
        named = [c.why for c in checks if c.why and not c.ignored_by]
        if named:
            fix = f"set {key} to {named[0]}"
        elif default:
            fix = f"leave {key} out for its default ({default!r})"
        else:
            fix = f"give {key} a value or leave it out"
        yield f"{key}: the empty string is not a value here; {fix}"


def _type_ok(value, tp) -> bool:
    """Whether `value` is of the recipe type `tp` as _convert would have made it (basic types, Literal choices)."""
    tp = field_checks(tp)[0]
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        return any(value is None if a is type(None) else _type_ok(value, a) for a in args)
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if origin is list or tp is list:
        return isinstance(value, (list, tuple))
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    return True


def _wrong_type(value, tp, key: str) -> Optional[str]:
    """The message for a value of the wrong type or outside a Literal's choices (a recipe built in Python), or None."""
    if _type_ok(value, tp):
        return None
    bare = field_checks(tp)[0]
    if typing.get_origin(bare) is Literal:
        choices = typing.get_args(bare)
        return (
            f"{key}: {_show(value)} is not one of {list(choices)}{did_you_mean(value, choices)}; "
            f"e.g. {key}={_sample(bare)}"
        )
    return f"{key}: expected {_type_name(bare)}, got {type(value).__name__} {_show(value)}; e.g. {key}={_sample(bare)}"


DATASET_KEYS = ("path", "split", "eval_path", "eval_split")  # the data.* keys of the dataset tasks
PLACEHOLDERS = ("{plan}", "{question}")  # the fields of hybrid.template (rollout.hybrid.place)
EDIT_SAMPLER = (
    "rollout.min_p and rollout.repetition_penalty are samplers of the fill-only engine; any-process decoding "
    "(rollout.edit) samples with temperature, top_k and top_p only: set rollout.min_p=0 and "
    "rollout.repetition_penalty=1.0, or rollout.edit=none"
)


def _rules(r: Recipe, trainer: Optional[str]):
    """Messages for rules that tie several keys together; with `trainer`, also what that trainer would ignore."""
    ro, est = r.rollout, r.estimator
    Lc, Lb = ro.max_completion_length, ro.block_length or ro.max_completion_length
    if Lc % Lb:
        yield (
            f"rollout.block_length: {Lb} does not divide rollout.max_completion_length ({Lc}); choose a block "
            f"length that divides it (e.g. rollout.block_length={Lc})"
        )
    elif ro.steps % (Lc // Lb):
        nb = Lc // Lb
        yield (
            f"rollout.steps: {ro.steps} is not a multiple of the number of blocks ({nb} = {Lc} / {Lb}); "
            f"set e.g. rollout.steps={nb * max(1, round(ro.steps / nb))}"
        )
    if ro.edit != "none" and (ro.min_p > 0 or ro.repetition_penalty != 1.0):
        yield EDIT_SAMPLER
    if ro.edit != "none" and not 1 <= (ro.edit_initial_length or Lc) <= Lc:
        yield (
            f"rollout.edit_initial_length: {ro.edit_initial_length} must be between 1 and "
            f"rollout.max_completion_length ({Lc}); lower it or raise the canvas"
        )
    h = r.hybrid  # the template places a plan: hybrid.plan's (eval, GRPO) and hybrid.sft_plans' (SFT) but none
    if any(kind != "none" for kind in [h.plan, *h.sft_plans]) and not all(f in h.template for f in PLACEHOLDERS):
        yield (
            f"hybrid.template: {h.template!r} must contain {{plan}} and {{question}} (where each goes in the "
            f"executor's prompt); add both, or leave hybrid.template out for the default {HybridConfig.template!r}"
        )
    if r.train.batch_size % r.train.gradient_accumulation_steps:
        yield (
            f"train.batch_size: {r.train.batch_size} is not divisible by train.gradient_accumulation_steps "
            f"({r.train.gradient_accumulation_steps}); make it a multiple"
        )
    generated = r.data.dataset is None and (r.data.task in ("sudoku", "countdown") or "/" in r.data.task)
    if r.data.eval_seed and not generated:
        yield (
            f"data.eval_seed: {r.data.dataset or r.data.task} has a fixed held-out split; only generated tasks "
            f"(sudoku, countdown, reasoning_gym/NAME) draw another: drop data.eval_seed"
        )
    # the dataset keys: read by gsm8k, math and code (path, split, eval_path, eval_split) and by data.dataset (split,
    # eval_path, eval_split: its training data is data.dataset itself); a generated task reads none of them
    read = () if generated else ("split", "eval_path", "eval_split") if r.data.dataset else DATASET_KEYS
    for name in DATASET_KEYS:
        value, default = getattr(r.data, name), getattr(DataConfig, name)
        if name not in read and value != default:
            yield (
                f"data.path: set to {value!r}, but the training rows come from data.dataset ({r.data.dataset!r}), "
                f"so it is never read (data.path is the source of gsm8k, math and code); remove it"
                if r.data.dataset
                else f"data.{name}: set to {value!r}, but data.task={r.data.task} generates its examples and never "
                f"reads it (only gsm8k, math, code and data.dataset read data.path / eval_path / split / eval_split); "
                f"remove it"
            )
    if r.eval.size is not None and r.eval.size > r.data.eval_size:
        yield (
            f"eval.size: {r.eval.size} is more than the {r.data.eval_size} held-out examples (data.eval_size); "
            f"lower eval.size or raise data.eval_size"
        )
    if (trainer or r.algorithm) not in SFT_LIKE:  # sections SFT does not read (there `ignored_by` rejects what is set)
        if est.block_length and Lc % est.block_length:
            yield (
                f"estimator.block_length: {est.block_length} does not divide rollout.max_completion_length ({Lc}); "
                f"choose one that does, or leave it out (the rollout's block length)"
            )
        if est.t_min >= est.t_max:
            yield f"estimator.t_min: {est.t_min} is not below estimator.t_max ({est.t_max}); set t_min < t_max"
        if est.name == "quadrature" and (est.t_min, est.t_max) != (0.0, 1.0):
            yield (
                f"estimator.t_min / t_max ({est.t_min}, {est.t_max}): the quadrature estimator integrates the "
                f"masking ratio over [0, 1] at its Gauss-Legendre nodes; remove them (elbo and block_elbo read them)"
            )
        if r.order_policy.width % r.order_policy.heads:
            yield (
                f"order_policy.heads: {r.order_policy.heads} does not divide order_policy.width "
                f"({r.order_policy.width}); pick a divisor"
            )
    if r.edit_policy.width % r.edit_policy.heads:
        yield (
            f"edit_policy.heads: {r.edit_policy.heads} does not divide edit_policy.width ({r.edit_policy.width}); "
            f"pick a divisor"
        )
    if trainer is None:
        return
    if trainer == "grpo":
        yield from _grpo_rules(r)
    yield from _unread_rules(r, trainer)
    if trainer == "dpo" and r.dpo.pairs_per_prompt > 1 and r.dpo.pairs != "on_policy":
        yield "dpo.pairs_per_prompt > 1 mines pairs from on-policy samples; set dpo.pairs=on_policy (or drop the key)"
    if trainer == "dpo" and r.dpo.pairs_per_prompt > r.dpo.num_generations // 2:
        yield (
            f"dpo.pairs_per_prompt={r.dpo.pairs_per_prompt}: {r.dpo.num_generations} samples per prompt "
            f"(dpo.num_generations) make at most {r.dpo.num_generations // 2} disjoint pairs; lower it or raise "
            f"dpo.num_generations"
        )
    if trainer == "dpo" and r.dpo.pairs == "branch":
        if ro.order == "random" or ro.order_temperature > 0:
            yield (
                "dpo.pairs=branch changes decisions of the greedy decode, which needs a state-only unmasking order: "
                "set rollout.order_temperature=0 and an order other than random"
            )
        if ro.self_correction or ro.repetition_penalty != 1:
            yield (
                "dpo.pairs=branch replays greedy decodes exactly: set rollout.self_correction=false and "
                "rollout.repetition_penalty=1"
            )
        if ro.edit != "none":
            yield "dpo.pairs=branch branches fixed-length decodes: set rollout.edit=none"
    if trainer == "dpo" and r.dpo.greedy_candidate:
        if r.dpo.pairs != "on_policy":
            yield "dpo.greedy_candidate: true decodes candidates of on-policy pairs; set dpo.pairs=on_policy"
        elif ro.temperature == 0:
            yield (
                "dpo.greedy_candidate: true with rollout.temperature=0 makes every candidate the greedy decode; "
                "sample the others (rollout.temperature > 0) or set it false"
            )
        elif ro.order == "policy":
            yield (
                "dpo.greedy_candidate decodes the greedy order, which the sampler (rollout.order_temperature > 0) "
                "scores as one of its draws only for a state-only order: set dpo.greedy_candidate=false with "
                "rollout.order=policy"
            )
    if trainer in ("grpo", "dpo") and getattr(r, trainer).sync_ref_model:
        sec = getattr(r, trainer)
        head_only = trainer == "dpo" and ro.order == "policy" and not r.order_policy.train_model  # syncs the head
        lora_base = sec.reference == "adapter_disabled" or (sec.reference == "auto" and r.model.lora.r > 0)
        if lora_base and not head_only:
            yield (
                f"{trainer}.sync_ref_model: the reference under LoRA is the base with the adapter disabled, which "
                f"cannot move (TRL refuses it too); set {trainer}.reference=frozen_copy or drop sync_ref_model"
            )
        if sec.beta == 0:  # GRPO's beta 0 loads no reference at all
            yield f"{trainer}.sync_ref_model needs a reference: set {trainer}.beta != 0 (TRL refuses it too)"
        if trainer == "dpo" and sec.precompute_ref_log_probs:
            yield (
                "dpo.sync_ref_model moves the reference, so reference log-probs precomputed once go stale (TRL "
                "refuses the two together too); set dpo.precompute_ref_log_probs=false or dpo.sync_ref_model=false"
            )
    if trainer == "sft" and ro.order == "policy":
        yield "rollout.order: 'policy' needs a learned order head, which SFT does not train; pick another order"
    o, d = r.optim, OptimConfig()
    if o.name == "adamw" and o.momentum != d.momentum:
        yield f"optim.momentum: {o.momentum} is read by optim.name=sgd only; remove it or set optim.name=sgd"
    if o.name == "sgd":
        for name in ("betas", "eps"):
            if getattr(o, name) != getattr(d, name):
                yield f"optim.{name}: {getattr(o, name)!r} is read by optim.name=adamw only; remove it for sgd"


PLANNER_KINDS = ("real", "other_problem", "corrupted")  # plan kinds that sample hybrid.planner when it is given
# the keys of each dpo.pairs mode that the other modes never read (rollout.temperature: offline pairs are not sampled,
# and the held-out evaluation decodes at eval.temperature)
DPO_PAIR_KEYS = {
    "dataset_name": ("offline",),
    "dataset_train_split": ("offline",),
    "num_generations": ("on_policy",),
    "branch_alternatives": ("branch",),
    "branch_rounds": ("branch",),
    "branch_anchors": ("branch",),
}
# the estimator.* keys and the estimators that read them (estimators/*.py: build, draw, views; the memory planner and
# the trainers read an estimator's keys only through those); GRPO and DPO refuse a key set for an estimator not
# named here, which would ignore it. A name registered at run time (examples/custom_estimator.py) is not judged.
# estimator.full_view is read by elbo with estimator.coupled only, kept otherwise (coupled=false switches it off)
ESTIMATOR_KEYS = {
    "p_mask_prompt": ("one_step", "block_elbo"),  # the others keep the prompt clean: 0 says so and is accepted
    "num_samples": ("one_step", "elbo", "block_elbo", "quadrature"),
    "masks_per_timestep": ("elbo", "quadrature"),
    "t_min": ("elbo", "block_elbo"),  # quadrature: refused in _rules with its own reason
    "t_max": ("elbo", "block_elbo"),
    "stratified": ("elbo",),
    "coupled": ("elbo",),
    "full_view": ("elbo",),
    "eubo_beta": ("block_elbo",),
    "block_length": ("block_elbo",),
    "merge_steps": ("trajectory", "ar_order"),
}


def _unread_rules(r: Recipe, trainer: str):
    """What `trainer` would silently ignore, where whether it reads a key depends on other keys (dpo.pairs,
    sft.objective, hybrid.sft_plans, estimator.name). hybrid.planner is kept for SFT, DPO and consensus although their
    training may not load it: the recipe written beside the checkpoint is what `dllm-rl eval` (hybrid.plan=real,
    --hybrid-axes) plans with."""
    h, s, d, e = r.hybrid, r.sft, r.dpo, r.estimator
    if trainer in ("sft", "dpo", "consensus"):  # evaluate_recipe without a planner: real plans cannot be drawn
        if h.plan == "real":
            yield (
                f"hybrid.plan=real: algorithm {trainer} evaluates without a planner (only GRPO loads "
                f"hybrid.planner for training), so its held-out evaluation cannot draw real plans; set hybrid.plan to "
                f"none, content_free, oracle, other_problem or corrupted, and evaluate with real plans afterwards "
                f"(dllm-rl eval CHECKPOINT hybrid.plan=real hybrid.planner.path=...)"
            )
    if trainer == "sft" and s.objective == "mdm" and "real" in h.sft_plans and not h.planner.path:
        yield (
            "hybrid.sft_plans: 'real' renders prompts with the planner's plans, and no planner is set; set "
            "hybrid.planner.path (e.g. checkpoints/tiny/sudoku-planner) or drop 'real'"
        )
    if trainer == "sft" and s.objective == "mdm":
        default = SFTConfig()
        for name in ("edit_substitute", "edit_missing", "edit_spurious", "edit_wrong_length", "edit_vocab"):
            if getattr(s, name) != getattr(default, name):
                yield (
                    f"sft.{name}: set to {_show(getattr(s, name))}, but sft.objective=mdm never reads it (it "
                    f"corrupts the drafts of sft.objective=edit); remove it or set sft.objective=edit"
                )
    if trainer == "sft" and s.objective == "edit":
        if s.t_min != SFTConfig.t_min:
            yield (
                f"sft.t_min: set to {s.t_min}, but sft.objective=edit never reads it (it trains on corrupted "
                f"drafts, not on masking ratios); remove it or set sft.objective=mdm"
            )
        if h.sft_plans:
            yield (
                "hybrid.sft_plans: sft.objective=edit trains on the task's prompts as they are and never reads it; "
                "remove it or set sft.objective=mdm"
            )
    if trainer == "dpo":
        default = DPOConfig()
        for name, modes in DPO_PAIR_KEYS.items():
            if d.pairs not in modes and getattr(d, name) != getattr(default, name):
                yield (
                    f"dpo.{name}: set to {_show(getattr(d, name))}, but dpo.pairs={d.pairs} never reads it (read "
                    f"by dpo.pairs={' or '.join(modes)}); remove it or set dpo.pairs={modes[0]}"
                )
        if d.pairs == "offline" and r.rewards:
            yield (
                "rewards: set, but dpo.pairs=offline never reads them (its pairs come from dpo.dataset_name, and the "
                "held-out evaluation scores with the task's verifier); remove them or set dpo.pairs=on_policy"
            )
        if d.pairs == "offline" and r.rollout.temperature != RolloutConfig.temperature:
            yield (
                f"rollout.temperature: set to {r.rollout.temperature}, but dpo.pairs=offline samples nothing (the "
                f"held-out evaluation decodes at eval.temperature); remove it, or set eval.temperature, or "
                f"dpo.pairs=on_policy"
            )
    builtin = {name for names in ESTIMATOR_KEYS.values() for name in names}
    if trainer in ("grpo", "dpo") and e.name in builtin:  # the trainers that read the estimator section
        default = EstimatorConfig()
        for key, names in ESTIMATOR_KEYS.items():
            value = getattr(e, key)
            if e.name in names or value == getattr(default, key) or (key == "p_mask_prompt" and value == 0):
                continue
            shown = str(value).lower() if isinstance(value, bool) else _show(value)
            readers = " or ".join(filter(None, [", ".join(names[:-1]), names[-1]]))  # "a, b or c"
            yield (
                f"estimator.{key}: set to {shown}, but estimator.name={e.name} never reads it (read by "
                f"estimator.name={readers}); remove it or pick one of those estimators"
            )


def _list_item(tp):
    """The item type of a list annotation, also inside a union (Union[str, list[str]]: dpo.loss_type)."""
    if typing.get_origin(tp) is not list:
        tp = next((a for a in typing.get_args(tp) if typing.get_origin(a) is list), list)
    (item,) = typing.get_args(tp) or (Any,)
    return item


def _grpo_rules(r: Recipe):
    g, h = r.grpo, r.hybrid
    if g.filter_zero_std and r.train.gradient_accumulation_steps > 1:
        yield (
            f"grpo.filter_zero_std leaves a varying number of groups per optimizer step, which "
            f"train.gradient_accumulation_steps={r.train.gradient_accumulation_steps} micro-batches would weigh "
            f"unevenly; set train.gradient_accumulation_steps=1 (grpo.steps_per_generation still splits a rollout "
            f"into several optimizer steps) or drop grpo.filter_zero_std"
        )
    if g.loss_type in ("spg", "wd1") and g.beta != 0:
        paper = "SPG" if g.loss_type == "spg" else "wd1's objective"
        yield (
            f"grpo.beta: {g.beta} with grpo.loss_type={g.loss_type}, which has no KL term (as {paper}); set grpo.beta=0"
        )
    if g.top_entropy_quantile < 1 and g.loss_type in ("wd1", "spg"):
        yield (
            f"grpo.top_entropy_quantile: {g.top_entropy_quantile} masks a per-token policy loss, which "
            f"grpo.loss_type={g.loss_type} does not have; set it to 1 or pick another loss"
        )
    if g.loss_type == "dr_grpo" and r.rollout.edit != "none":
        yield (
            "grpo.loss_type=dr_grpo divides by a constant (N x the completion length); with rollout.edit the "
            "any-process likelihood is per step and a batch's step count varies, so no constant exists: use "
            "grpo.loss_type=dapo or grpo"
        )
    if g.top_entropy_quantile < 1 and r.rollout.edit != "none":
        yield (
            f"grpo.top_entropy_quantile: {g.top_entropy_quantile} masks per-token losses by each position's entropy; "
            "with rollout.edit the any-process loss is per decoding step, not per position: set it to 1 or "
            "rollout.edit=none"
        )
    if r.rollout.edit != "none" and r.rollout.edit_temperature == 0:
        yield (
            "rollout.edit_temperature: 0 takes the edit head's argmax, whose log-prob has no gradient, so GRPO "
            "would never train the edit head; sample the edits (e.g. rollout.edit_temperature=1.0) and evaluate "
            "the argmax with eval.edit_temperature=0"
        )
    if h.planner.train and h.plan != "real":
        yield (
            f"hybrid.planner.train: true trains the planner on its own sampled plans; set hybrid.plan=real "
            f"(now {h.plan})"
        )
    if h.planner.train and (h.planner.temperature == 0 or h.planner.top_k == 1):
        yield (
            "hybrid.planner.train: true with a greedy planner (hybrid.planner.temperature=0 or top_k=1) gives every "
            "sample of a group the same plan, so the group-relative advantages cancel on it and it learns nothing; "
            "sample its plans (e.g. hybrid.planner.temperature=1.0)"
        )
    if h.planner.train and h.planner.backend == "vllm":
        yield (
            "hybrid.planner.train: true with hybrid.planner.backend=vllm: vLLM samples from the weights it loaded "
            "while the transformers copy trains, so the plans would come from a stale planner; use "
            "hybrid.planner.backend=transformers to train it (vLLM is for frozen planners)"
        )
    if not h.train_executor and not h.planner.train:
        yield "hybrid.train_executor: false leaves nothing to train; set hybrid.planner.train=true"


def tiny_model_problems(r: Recipe):
    """Messages for the tiny model a run builds from model.tiny (model.path empty); nothing when model.path is set.
    Checked by validate.validate_recipe when the run builds its model (not when a model is passed to a trainer)."""
    if r.model.path is not None:
        return
    ro, t = r.rollout, r.model.tiny
    Lc, Lb = ro.max_completion_length, ro.block_length or ro.max_completion_length
    if t.hidden_size % t.num_heads or (t.hidden_size // t.num_heads) % 2:
        yield (
            f"model.tiny.num_heads: {t.num_heads} heads do not split model.tiny.hidden_size ({t.hidden_size}) "
            f"into even head sizes (rotary embeddings); pick a divisor with an even quotient"
        )
    if Lc >= t.max_position_embeddings:
        yield (
            f"rollout.max_completion_length: {Lc} leaves no room for the prompt in the tiny model's "
            f"{t.max_position_embeddings} positions; raise model.tiny.max_position_embeddings"
        )
    # the decoder's rule for the exact block cache (rollout.engine.check_config), on the model built from here
    if ro.cache == "block" and t.attention != "block_causal":
        yield (
            f"rollout.cache=block is exact only for block-causal models (block diffusion), and the tiny model "
            f"attends {t.attention}ly (model.tiny.attention); use rollout.cache=prefix or dual, or set "
            f"model.tiny.attention=block_causal"
        )
    elif ro.cache == "block" and Lb % t.block_size:
        yield (
            f"rollout.block_length ({Lb}) must be a multiple of the model's attention block size "
            f"(model.tiny.block_size={t.block_size}) for the exact block cache (rollout.cache=block); set "
            f"rollout.block_length to a multiple of {t.block_size} that divides {Lc}, or change "
            f"model.tiny.block_size"
        )
    if r.model.load_in_4bit:
        yield (
            "model.load_in_4bit: the tiny model (model.path empty) is built in full precision and never "
            "quantized; drop model.load_in_4bit, or set model.path to the model to load in 4 bits"
        )


def validate(recipe: Recipe, trainer: Optional[str] = None) -> Recipe:
    """Raise ConfigError (one line: the key, the value, the fix) for the first value that breaks its field's
    Check or a rule across fields; return the recipe.

    With `trainer` (the algorithm about to train), a value that trainer would silently ignore is an error too.
    Per key (`Check.ignored_by` at the field): the SFT trainer reads neither the grpo, estimator and order_policy
    sections nor `rewards` nor rollout.temperature (it evaluates at eval.temperature with the task's verifier);
    the GRPO trainer does not read sft.t_min; optim.momentum is read by sgd only and optim.betas / optim.eps by
    adamw only; planner_sft (TRL's SFTTrainer on hybrid.planner) reads none of model, rollout, sft and eval, nor
    optim.name=sgd; what a dpo.pairs mode, an sft.objective or an estimator.name (ESTIMATOR_KEYS) never reads is
    refused by `_unread_rules`. Each is rejected when set to a non-default value for a trainer that does not read it.
    Kept on purpose although not read: model.tiny when model.path is set, the other model.lora keys when
    model.lora.r=0, estimator.full_view when estimator.coupled=false, and order_policy's keys (but
    train_model=false, which would train nothing) when rollout.order builds no learned head, so that one override
    (model.path=..., model.lora.r=0, estimator.coupled=false, rollout.order=top_prob) switches a recipe's mode. Names
    looked up in registries (tasks, estimators, losses, orders, rewards, schedulers) are checked by
    `dllm_rl.validate.validate_recipe`, above this floor.
    """
    for problem in _problems(recipe, Recipe, "", Recipe(), trainer):
        raise ConfigError(problem)
    for problem in _rules(recipe, trainer):
        raise ConfigError(problem)
    return recipe


def resolve_batch_size(recipe: Recipe, batch_size_given: bool = False) -> None:
    """train.per_device_train_batch_size (TRL's: completions per process and micro-batch; pairs for DPOConfig)
    -> train.batch_size (per process and optimizer step: sequences for SFT, planner SFT and consensus, pairs for
    offline DPO, prompts for GRPO and on-policy DPO, each sampled num_generations times), in place; both given
    must agree."""
    t = recipe.train
    per_device = t.per_device_train_batch_size
    if per_device is None:
        return
    if recipe.algorithm in ("sft", "planner_sft", "consensus"):  # these train on sequences (SFTConfig's count)
        G, group, unit, each = 1, "", "sequences", "sequences"
    elif recipe.algorithm == "dpo" and recipe.dpo.pairs == "offline":  # TRL's DPOConfig counts pairs
        G, group, unit, each = 1, "", "pairs", "pairs"
    elif recipe.algorithm == "dpo":  # on-policy: each prompt's dpo.num_generations samples
        G, group, unit, each = recipe.dpo.num_generations, "dpo.num_generations", "prompts", "samples"
    else:
        G, group, unit, each = recipe.grpo.num_generations, "grpo.num_generations", "prompts", "completions"
    # the keys the arithmetic reads, checked first: a bad one is named as itself (not as the train.batch_size it
    # would make) and never divides by zero
    for dotted in ("train.per_device_train_batch_size", "train.gradient_accumulation_steps", group):
        for problem in _key_problems(recipe, dotted) if dotted else ():
            raise ConfigError(problem)
    if per_device % G:
        raise ConfigError(
            f"train.per_device_train_batch_size ({per_device} {each} per micro-batch) must be a multiple of "
            f"{group} ({G}): dllm-rl keeps each prompt's group in one micro-batch; set e.g. "
            f"train.per_device_train_batch_size={G * max(1, round(per_device / G))}"
        )
    size = per_device * t.gradient_accumulation_steps // G
    if batch_size_given and t.batch_size != size:
        per_group = f" / {group} ({G})" if G > 1 else ""
        raise ConfigError(
            f"train.batch_size ({t.batch_size} {unit}) disagrees with train.per_device_train_batch_size "
            f"({per_device} {each}) x gradient_accumulation_steps ({t.gradient_accumulation_steps}){per_group} = "
            f"{size} {unit}; give only one of them"
        )
    t.batch_size = size


def _key_problems(recipe: Recipe, dotted: str):
    """_problems of one dotted key of `recipe` (its field's Checks and type), without a trainer."""
    *sections, name = dotted.split(".")
    value, cls = recipe, Recipe
    for part in sections:
        value, cls = getattr(value, part), field_checks(typing.get_type_hints(cls, include_extras=True)[part])[0]
    hint = typing.get_type_hints(cls, include_extras=True)[name]
    return _problems(getattr(value, name), hint, dotted, getattr(cls(), name), None)


class RecipeLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (PyYAML keeps the last one silently: a
    second `rollout:` section would drop the first). Keys brought in by a merge (`<<: *base`) may be overridden,
    as YAML intends."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                    seen[key] = line
                except TypeError:  # an unhashable key: construct_mapping below names it
                    continue
                if first is not None:
                    where = f"both on line {line}" if first == line else f"lines {first} and {line}"
                    raise ConfigError(
                        f"key {key!r} is given twice in one mapping ({where}); YAML would keep only the last "
                        f"one silently: merge the two into one"
                    )
        return super().construct_mapping(node, deep=deep)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides (value parsed as YAML) to a nested dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=1e-5)")
        dotted, raw = item.split("=", 1)
        try:
            value = yaml.load(raw, Loader=RecipeLoader) if raw != "" else None
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
        except yaml.YAMLError as e:
            raise ConfigError(
                f"override {item!r}: the value is not valid YAML ({str(e).splitlines()[0]}); quote or fix it"
            ) from None
        node = data
        parts = dotted.strip().split(".")
        if not all(parts):
            raise ConfigError(f"override {item!r} is not of the form section.key=value (e.g. optim.lr=1e-5)")
        for part in parts[:-1]:
            if node.get(part) is None:  # absent, or an empty section in the YAML (`rollout:`)
                node[part] = {}
            node = node[part]
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
        node[parts[-1]] = value
    return data


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None) -> Recipe:
    """Load a YAML recipe with optional dotted overrides into a typed `Recipe`."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(
            f"recipe file {str(path)!r} is a directory; pass a YAML file such as recipes/tiny/sudoku-sft.yaml"
        )
    if not path.is_file():
        raise ConfigError(
            f"recipe file {str(path)!r} does not exist; pass a YAML file such as recipes/tiny/sudoku-sft.yaml"
        )
    raw = path.read_bytes()
    try:
        if b"\0" in raw:
            raise UnicodeDecodeError("utf-8", raw, raw.index(b"\0"), raw.index(b"\0") + 1, "a NUL byte")
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"recipe file {str(path)!r} is not a text file; pass a YAML recipe") from None
    try:
        data = yaml.load(text, Loader=RecipeLoader)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]}); fix the syntax") from None
    if data is None:
        raise ConfigError(
            f"recipe file {str(path)!r} is empty; write the sections to change (e.g. copy recipes/tiny/sudoku-sft.yaml)"
        )
    if not isinstance(data, dict):
        raise ConfigError(
            f"recipe file {str(path)!r} holds a {type(data).__name__}, not a mapping of sections "
            f"(model:, data:, train: ...); write the recipe as YAML keys"
        )
    return recipe_from_dict(apply_overrides(data, list(overrides or [])))


def recipe_to_dict(recipe) -> dict:
    return dataclasses.asdict(recipe)


def save_recipe(recipe: Recipe, path: str | os.PathLike) -> None:
    """Write the resolved recipe (every default filled in) as YAML."""
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))
