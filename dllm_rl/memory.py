"""Per-GPU memory planner: `dllm-rl plan RECIPE --gpus N [--prompt-length P] [--fused-logprobs]`.

Every figure is an ESTIMATE from the formulas below, not a measurement. The formulas were checked against
measured peaks on CPU for the tiny model (tests/test_memory.py: parameter, gradient and optimizer bytes exactly;
activations and logits within a factor) and against one GPU measurement: a GRPO step of the 8B LLaDA shape
with LoRA r=128 (bf16 base, autocast, one_step, micro-batch 16 x 384 tokens) peaked at 72.6 GiB on an H200
and is planned at 71.9 GiB (the plan before the LoRA terms below were corrected said 96.3: it counted the
frozen base's linear and norm inputs, and LoRA's saved inputs in float32 where autocast keeps bf16 copies).
Confirm a plan with `torch.cuda.max_memory_allocated()` after a few steps before trusting a tight verdict.

The model's shape comes from its config, instantiated on the meta device (no weights are read): the recipe's
`model.tiny` for the built-in model, a local directory's config.json, or, for the known hub ids of LLaDA-8B /
LLaDA-1.5 / Dream-7B / DiffuCoder-7B (which cannot be downloaded offline), dllm_rl's native config classes
whose defaults are the released shapes (DiffuCoder-7B is assumed to have Dream-7B's Qwen2.5-7B shape).

Algorithms: sft, grpo, dpo and consensus (SFT whose targets are voted by decodes of the model); planner_sft
(TRL's SFTTrainer on hybrid.planner, an autoregressive model) is refused.

Notation: P params (P_t trainable), N GPUs (processes), n completions per micro-batch
(= train.batch_size * num_generations / gradient_accumulation_steps, whole groups; DPO: 2 rows per pair, chosen
and rejected, = 2 * ceil(train.batch_size * k / gradient_accumulation_steps) for up to k pairs a prompt, k =
dpo.pairs_per_prompt on-policy, else 1 (trainers.dpo._chunks splits the step's pairs into that many parts); SFT
and consensus: train.batch_size / gradient_accumulation_steps sequences), L tokens per scored
sequence (prompt + completion; prompt + 2 * completion for block-causal models, the two-stream layout),
Lc completion length, V vocab, D hidden, Dq = heads * head_dim, Dkv = kv_heads * head_dim, F MLP width,
H heads, l layers, a activation bytes (2 under bf16/fp16 weights, autocast or a DeepSpeed half engine, else
4), w weight bytes, t bytes of a trainable parameter.

Static (held for the whole run):
    weights      = P_frozen w + P_t t, / N under ZeRO-3 (0 with param offload). With 4-bit: linear weights at
                   0.5159 B (NF4 + double quantisation); the head, embeddings and norms stay at w.
                   t = w for full fine-tuning; LoRA adapters are fp32 (peft's autocast_adapter_dtype) unless
                   a DeepSpeed half engine casts the module to bf16/fp16.
    LoRA P_t     = sum over targeted linears of r (fan_in + fan_out)
                   ("all-linear" = every linear but the output head, peft's rule)
    frozen model = P_t = 0 (no gradients, optimizer states or step temporaries for the model; LoRA adapters
                   still count in the weights) when the trainer calls model.requires_grad_(False): GRPO with
                   a learned order head (rollout.order=policy) and order_policy.train_model=false, with
                   rollout.edit != none and edit_policy.train_model=false, or with hybrid.train_executor=false
                   (then the AR planner trains: not counted); DPO with an order head and
                   order_policy.train_model=false
    heads        = the order / edit head's parameters, built in fp32 (policy.OrderHead, EditHead; instantiated
                   on the meta device from order_policy / edit_policy): weights + gradients + optimizer states
                   at 4 B each, as plain torch steps them (+ DPO's frozen copy of the order head, its
                   reference); their optimizer step's temporaries are not counted (one head-sized tensor)
    gradients    = P_t t; / N under ZeRO-2/3; 0 on the GPU with offload_optimizer
    optimizer    = P_t s t, s the states per trained parameter (runtime.make_optimizer: AdamW m, v: s = 2; SGD:
                   s = 1 with optim.momentum > 0 (its momentum buffer), else 0), in the parameter dtype (plain
                   torch); under DeepSpeed the states are fp32 (4 s) beside an fp32 master copy (+ 4) with a
                   bf16/fp16 engine (Rajbhandari et al. arXiv 1910.02054), with ZeRO-1/2 in any dtype (its
                   optimizer clones the partition to fp32) and with ZeRO-3 on non-fp32 parameters; / N under
                   ZeRO-1/2/3; 0 on the GPU with offload_optimizer
    reference    = 0 when grpo.beta = 0 or reference none; 0 for GRPO whose order / edit head trains alone
                   (order_policy / edit_policy.train_model=false: the KL is 0, trainers.grpo._reference) and
                   for DPO's same_model (order head alone: the model is its own reference); 0 for LoRA with
                   the adapter disabled (the base is the reference); else a frozen copy of the base weights
                   at w, with LoRA also its adapters at t (trainers.common.reference_model deep-copies peft's
                   base model, which holds the injected lora_A / lora_B), placed like the policy
                   (runtime.prepare_frozen): / N under ZeRO-3, 0 on the GPU with param offload. DPO always
                   has one (dpo.reference), whose estimates are computed without gradient before the update
                   (so their activations never coexist with the policy's). Consensus with
                   consensus.teacher=initial: the starting model loaded again at model.dtype (4-bit linears
                   at 0.5159 B; LoRA adapters in fp32), whole on every GPU (moved with .to, not through DeepSpeed)
    CUDA context = 1.0 GB allowance (context, cuBLAS workspaces)
Update phase (one estimator view alive: estimators checkpoint each view when there are several, so the peak
is one view's forward + backward whatever the view count):
    activations per token and layer (tensors autograd saves; SDPA keeps no L x L matrix):
      all weights train:
        per_layer = 2 (4 + a) D   RMSNorms: fp32 input + normalised output
                  + 3a (Dq + Dkv)  q, k before and after RoPE, v, attention output, o_proj input
                  + 4H             log-sum-exp
                  + 4aF            gate, up, silu, product
      LoRA (the base's linears and norms are frozen, so they save none of their inputs):
        per_layer = 2 * 4 D        RMSNorms: fp32 input
                  + a (2Dq + 2Dkv) q, k, v after RoPE, attention output (SDPA's saved tensors)
                  + 4H + 3aF       log-sum-exp; gate, silu, up (the product feeds a frozen ff_out)
    LoRA extra per token (lora), summed over targeted linears, with w = a under autocast (accelerate's mixed
        precision without DeepSpeed: lora_A's input is saved as autocast's half copy) else t: r w (lora_A
        output); + fan_in (w + 1) when lora dropout > 0 (lora_A's input and the dropout mask: one byte, CUDA's
        bool mask); else + w fan_in when it is a cast copy (fp32 adapters on a half input, or autocast)
    tail = n L (4 + a) D (final norm) + n Lc D a (head input); LoRA: n L 4 D (both frozen)
    without gradient checkpointing: n L (l per_layer + lora) + tail
    with model.gradient_checkpointing: n L (l a D + per_layer + lora / l) + tail (one layer recomputed)
    frozen model (see above): autograd saves nothing of the model; one layer's forward transient
                   n L a (3F + 2D + 2Dq + 2Dkv) (as decoding's) instead
    block-causal: + n L^2 a (the [n, 1, L, L] mask as an additive bias, built once per forward)
    head input   = views n Lc D 4 with an order / edit head, frozen model or not: the head runs outside the
                   views' checkpoints and its LayerNorm saves the fp32 copy of each view's hidden states
                   until the backward (estimators.trajectory._policy_scores)
    logits       = n Lc V (a + 8): the model-dtype logits plus two fp32 [n, Lc, V] tensors alive at the
                   peak (forward: upcast copy and log-softmax; backward: saved log-softmax and its gradient;
                   estimators.base.token_logprobs). Fused (the default when the estimators take that path:
                   on CUDA, a native model, views without a sampled order's scores; `--no-fused-logprobs`
                   plans the logits path): liger-kernel's fused linear cross-entropy, whose transient is one
                   chunk of logits rows x V x a (rows: liger's rule, the next power of two of n Lc / ceil(V /
                   D)) + the input gradient it keeps from the forward (n Lc D a) + the per-row loss
                   (+ a V D when the head trains).
    ZeRO-3       = min(P, stage3_max_live_parameters) w gathered at once (an upper bound; default 1e9)
Decoding (no grad; R rows of a process decode together in one generate call, canvas C = prompt + Lc, block Lb):
    KV cache     = l 2 Dkv w_kv C R   (rollout.cache != none; w_kv = the embedding dtype)
    transient    = R C a (3F + 2D + 2Dq + 2Dkv) + R Lb V (a + 8)   (one forward + the block's logits)
    ZeRO-3       = the full weights (the trainer gathers them for the whole decode) minus the shard
Rollout phase (decoding while training), R = B G: B the prompts of one rollout, train.batch_size times the
    optimizer steps it feeds when grpo.steps_per_generation or grpo.generation_batch_size asks for more; DPO:
    G = dpo.num_generations for on-policy pairs, R = 0 for offline pairs; consensus: R =
    consensus.prompts_per_round x consensus.samples (every process votes on all of them); SFT: R = 0
Evaluation phase (held-out decoding, evaluate.evaluate_recipe, with the weights, gradients and optimizer states
    still on the GPU): R = min(rollout.batch_size, eval.size or data.eval_size) x eval.num_samples. Every
    trainer planned here evaluates whatever train.eval_steps says (GRPO and DPO before and after training, SFT
    and consensus after it, each also every train.eval_steps), so it is always planned; a task without a
    held-out set (or, for SFT, without a verifier) skips it, and the held-out set may be smaller than the
    bound. With rollout.compile=graphs the engine keeps the last decode's buffers between calls, so the larger
    of the rollout's and the evaluation's KV cache + transient is static instead of either phase
Optimizer step, with T one state-sized temporary of the optimizer's foreach step (AdamW: 1; SGD: 1 with
    optim.weight_decay > 0 (the decayed gradient), else 0):
    plain torch: P_t t T
    DeepSpeed (deepspeed/runtime/zero/stage_1_and_2.py and stage3.py, step): over the process's partition of
    S = P_t / N trained parameters (ZeRO-0: P_t; ZeRO-3: at most zero_optimization.sub_group_size at a time,
    default 1e9) the gradients are flattened and cast to an fp32 copy, on which the client optimizer steps:
    S 4 (the fp32 gradient partition) + S max(t for half gradients (the flattened half copy, freed once
    cast), 4 T); 0 on the GPU with offload_optimizer

    total per GPU = static + max(update, rollout, evaluation, optimizer step)

Not counted: allocator fragmentation (the verdict keeps 10% headroom), DeepSpeed communication buckets, the
old and reference log-probs ([mu, n, Lc] fp32, small), logits / temperature copies, CPU memory of offloaded
states, a hybrid recipe's planner and its plans (longer prompts), that plain torch frees the gradients after
each optimizer step (they are counted as held throughout) and that ZeRO-1 frees those outside its partition
before its step.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from .config import LoraConfig, Recipe
from .errors import ConfigError
from .runtime import micro_batch_rows, micro_batch_size

GB = 1e9
ALGORITHMS = ("sft", "grpo", "dpo", "consensus")  # what plan_memory plans (planner_sft trains another model)
H100_BYTES = int(79.1 * 2**30)  # what torch reports for an "80GB" H100 (84.9 GB)
CUDA_CONTEXT_BYTES = int(1.0e9)
HEADROOM = 0.9  # fraction of the card a plan may use and still "fit" (fragmentation, buckets)
DEFAULT_PROMPT_LENGTH = 256  # a guess for one-shot GSM8K / MATH chat prompts (d1 truncates prompts at 200)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # 4-bit + 8-bit absmax per 64 + fp32 per 256 absmax (double quant)
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
CHUNK_BYTES = 256 * 2**20  # kernels.logprobs.CHUNK_BYTES
KNOWN_MODELS = {  # hub id (lower case) -> native config class with the released shape as defaults
    "gsai-ml/llada-8b-instruct": "llada",
    "gsai-ml/llada-8b-base": "llada",
    "gsai-ml/llada-1.5": "llada",
    "dream-org/dream-v0-instruct-7b": "dream",
    "dream-org/dream-v0-base-7b": "dream",
    "apple/diffucoder-7b-instruct": "dream",
    "apple/diffucoder-7b-base": "dream",
    "apple/diffucoder-7b-cpgrpo": "dream",
}

# --------------------------------------------------------------------------------------------- model shape


@dataclass
class Linear:
    name: str
    fan_in: int
    fan_out: int


@dataclass
class ModelShape:
    source: str
    params: int
    layers: int
    hidden: int
    q_dim: int
    kv_dim: int
    heads: int
    ffn: int
    vocab: int
    max_positions: int | None
    block_causal: bool
    linears: list[Linear]  # every nn.Linear except the output head
    head: Linear | None
    adapter: LoraConfig | None = None  # model.path is a LoRA checkpoint: its adapter trains
    native: bool = True  # a dllm_rl model (estimators can take the fused log-prob path on CUDA)


def _hub_config(path: str):
    from .models import DreamConfig, LLaDAConfig

    config = LLaDAConfig() if KNOWN_MODELS[path.lower()] == "llada" else DreamConfig()
    return config, f"{path} (shape from dllm_rl's native {type(config).__name__} defaults)"


def _adapter_lora(model_dir: str) -> tuple[str, LoraConfig]:
    cfg = json.loads(Path(model_dir, "adapter_config.json").read_text())
    targets = cfg.get("target_modules") or ["all-linear"]
    targets = [targets] if isinstance(targets, str) else list(targets)
    return cfg["base_model_name_or_path"], LoraConfig(
        r=cfg["r"],
        alpha=cfg.get("lora_alpha", 16),
        dropout=cfg.get("lora_dropout", 0.0),
        target_modules=targets,
    )


def _build_meta(mcfg):
    """(meta-device model, source text, adapter LoraConfig or None) for a recipe's model section."""
    import torch
    from transformers import AutoConfig, AutoModel

    from .models.load import build_tiny, load_tokenizer, resolve_model_dir

    if mcfg.path is None:
        with torch.device("meta"):
            return build_tiny(mcfg, load_tokenizer(mcfg.tokenizer)), "built-in tiny MDM (model.tiny)", None
    path, adapter = mcfg.path, None
    if os.path.isdir(path) and Path(resolve_model_dir(path), "adapter_config.json").is_file():
        path, adapter = _adapter_lora(resolve_model_dir(path))  # plan the base it adapts
    if os.path.isdir(path):
        try:
            config = AutoConfig.from_pretrained(resolve_model_dir(path), trust_remote_code=mcfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ConfigError(_cannot_plan(path, e)) from None
        source = f"{path} (local config.json)"
    elif path.lower() in KNOWN_MODELS:
        config, source = _hub_config(path)
    else:
        raise ConfigError(
            f"cannot plan model.path {path!r}: it is not a local directory and not a "
            f"known hub id ({', '.join(sorted(KNOWN_MODELS))}); download it and pass its directory"
        )
    try:
        with torch.device("meta"):
            model = AutoModel.from_config(config, trust_remote_code=mcfg.trust_remote_code)
    except (OSError, ValueError, TypeError) as e:  # a config its class refuses; remote code not trusted
        raise ConfigError(_cannot_plan(path, e)) from None
    return model, source, adapter


def _cannot_plan(path: str, e: Exception) -> str:
    return (
        f"cannot plan model.path {path!r}: building its model from config.json failed ({type(e).__name__}: "
        f"{(str(e).strip().splitlines() or [''])[0][:200]}); fix the config, or set model.trust_remote_code=true "
        f"for a remote-code model"
    )


def model_shape(mcfg) -> ModelShape:
    """The shape facts the formulas need, read from a meta-device instance of the recipe's model."""
    from torch import nn

    model, source, adapter = _build_meta(mcfg)
    c = model.config.get_text_config()  # a composite config (DiffusionGemma: text + vision) plans its text model
    head_module = model.get_output_embeddings()
    linears, head = [], None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            lin = Linear(name, mod.in_features, mod.out_features)
            if mod is head_module:
                head = lin
            else:
                linears.append(lin)
    if hasattr(model, "_geometry"):
        layers, kv_heads, head_dim = model._geometry()
    else:
        layers, heads = c.num_hidden_layers, c.num_attention_heads
        kv_heads, head_dim = getattr(c, "num_key_value_heads", None) or heads, c.hidden_size // heads
    heads = c.num_attention_heads
    return ModelShape(
        source=source,
        params=sum(p.numel() for p in model.parameters()),
        layers=layers,
        hidden=c.hidden_size,
        q_dim=heads * head_dim,
        kv_dim=kv_heads * head_dim,
        heads=heads,
        ffn=max(lin.fan_out for lin in linears),
        vocab=head.fan_out if head is not None else c.vocab_size,
        max_positions=getattr(c, "max_position_embeddings", None),
        block_causal=getattr(c, "attention", "") == "block_causal",
        linears=linears,
        head=head,
        adapter=adapter,
        native=hasattr(model, "_geometry"),
    )


def lora_targets(shape: ModelShape, lora: LoraConfig) -> list[Linear]:
    """The linears peft adapts: "all-linear" = all but the output head; else names equal to or ending in
    "." + a target (peft's suffix match)."""
    if lora.r <= 0:
        return []
    keys = lora.target_modules
    if keys == ["all-linear"]:
        return list(shape.linears)
    candidates = shape.linears + ([shape.head] if shape.head else [])
    return [lin for lin in candidates if any(lin.name == k or lin.name.endswith("." + k) for k in keys)]


# ------------------------------------------------------------------------------------ precision and ZeRO


@dataclass
class Zero:
    enabled: bool = False
    stage: int = 0
    offload_optimizer: bool = False
    offload_param: bool = False
    half: bool = False  # DeepSpeed bf16/fp16 engine: module cast to half, fp32 master weights
    live_params: float = 1e9  # ZeRO-3 stage3_max_live_parameters (DeepSpeed's default 1e9)
    sub_group: float = 1e9  # ZeRO-3 sub_group_size: parameters the optimizer steps at a time (DeepSpeed's 1e9)
    note: str = "no DeepSpeed (accelerate DDP)"


def _enabled(section, mixed: str, name: str) -> bool:
    value = (section or {}).get("enabled", "auto") if isinstance(section, dict) else section
    return mixed == name if value in ("auto", None) else bool(value)


def read_zero(recipe: Recipe) -> Zero:
    """ZeRO stage, offload and half precision from the recipe's train.deepspeed JSON."""
    path, mixed = recipe.train.deepspeed, recipe.train.mixed_precision
    if not path:
        return Zero()
    if not os.path.isfile(path):
        m = re.search(r"zero[_-]?(\d)", os.path.basename(path))
        stage = int(m.group(1)) if m else 2
        return Zero(
            True,
            stage,
            half=mixed in ("bf16", "fp16"),
            note=f"ZeRO-{stage} GUESSED from the name: {path} not found; half precision from "
            f"train.mixed_precision={mixed}",
        )
    from .validate import read_deepspeed_json

    ds = read_deepspeed_json(path)
    zo = ds.get("zero_optimization", {})
    stage = zo.get("stage", 0)
    stage = 0 if stage == "auto" else int(stage)

    def dev(key: str) -> bool:  # an offload section naming a device
        return str((zo.get(key) or {}).get("device", "none")).lower() not in ("none", "auto")

    half = _enabled(ds.get("bf16", "auto"), mixed, "bf16") or _enabled(ds.get("fp16", "auto"), mixed, "fp16")
    z = Zero(True, stage, dev("offload_optimizer"), dev("offload_param") and stage == 3, half)
    live = zo.get("stage3_max_live_parameters", 1e9)
    z.live_params = float(live) if isinstance(live, (int, float)) else 1e9
    sub = zo.get("sub_group_size", 1e9)
    z.sub_group = float(sub) if isinstance(sub, (int, float)) else 1e9
    extras = [s for s, on in [("optimizer offload", z.offload_optimizer), ("param offload", z.offload_param)] if on]
    z.note = f"DeepSpeed ZeRO-{stage} ({path}), {'bf16/fp16 engine' if half else 'fp32'}" + (
        f", {', '.join(extras)}" if extras else ""
    )
    return z


@dataclass
class Precision:
    weight: int  # bytes per frozen parameter (non-quantized)
    trainable: int  # bytes per trainable parameter as stored
    optimizer: int  # bytes per trainable parameter of optimizer state (incl. fp32 master)
    act: int  # activation bytes
    autocast: bool = False  # forwards run under torch.autocast (accelerate's mixed precision without DeepSpeed)


def precision(recipe: Recipe, zero: Zero, lora: bool) -> Precision:
    dt = DTYPE_BYTES[recipe.model.dtype]
    w = 2 if zero.half else dt
    act = 2 if (zero.half or dt == 2 or recipe.train.mixed_precision != "no") else 4
    trainable = (2 if zero.half else 4) if lora else w
    autocast = recipe.train.mixed_precision != "no" and not zero.half
    return Precision(w, trainable, optimizer_state_bytes(recipe.optim, trainable, zero), act, autocast)


def optimizer_states(optim) -> int:
    """States the optimizer keeps per trained parameter (runtime.make_optimizer): AdamW m and v; SGD its
    momentum buffer when optim.momentum > 0, else none."""
    return 2 if optim.name == "adamw" else int(optim.momentum > 0)


def fp32_master(zero: Zero, t: int) -> bool:
    """Whether DeepSpeed keeps an fp32 master copy of the trained parameters: with a bf16/fp16 engine, with
    ZeRO-1/2 whatever the dtype (stage_1_and_2 clones its partition to fp32), with ZeRO-3 unless the parameters
    are fp32 already (stage3 then steps them in place)."""
    return zero.enabled and (zero.half or zero.stage in (1, 2) or (zero.stage == 3 and t != 4))


def optimizer_state_bytes(optim, t: int, zero: Zero) -> int:
    """Bytes of optimizer state per trained parameter (before ZeRO sharding): the states in the parameter dtype
    t under plain torch; under DeepSpeed fp32 states (on the fp32 partition), with the fp32 master copy."""
    states = optimizer_states(optim)
    if not zero.enabled:
        return states * t
    return 4 * fp32_master(zero, t) + 4 * states


def step_temporaries(optim) -> int:
    """State-sized temporaries of the optimizer's foreach step: AdamW's sqrt(v) (torch.optim.adam
    _multi_tensor_adam); SGD's decayed gradient when optim.weight_decay > 0 (torch.optim.sgd _multi_tensor_sgd:
    momentum and the update are in place)."""
    return 1 if optim.name == "adamw" or optim.weight_decay > 0 else 0


# ------------------------------------------------------------------------------------------- components


@dataclass
class Component:
    key: str
    label: str
    bytes: float
    phase: str  # static | update | rollout | eval | step


PEAK_PHASES = ("update", "rollout", "eval", "step")  # the phases that never coexist: the peak is the largest


@dataclass
class Plan:
    gpus: int
    components: list[Component] = field(default_factory=list)
    info: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    full_weights: float = 0.0  # the unsharded policy weights (what a ZeRO-3 gather materialises)

    def add(self, key, label, nbytes, phase):
        self.components.append(Component(key, label, float(nbytes), phase))

    def get(self, key: str) -> float:
        return sum(c.bytes for c in self.components if c.key == key)

    def phase(self, name: str) -> float:
        return sum(c.bytes for c in self.components if c.phase == name)

    @property
    def total(self) -> float:
        return self.phase("static") + max(self.phase(p) for p in PEAK_PHASES)


def activation_bytes(
    s: ModelShape,
    n: int,
    L: int,
    Lc: int,
    a: int,
    checkpointing: bool,
    targets: list[Linear],
    lora: LoraConfig,
    t: int,
    autocast: bool = False,
    frozen: bool = False,
) -> float:
    """Saved activations of one estimator view's forward (see the module docstring); frozen: the model trains
    nothing (requires_grad_(False)), so it saves none and one layer's forward transient is counted instead."""
    D = s.hidden
    mask = n * L * L * a if s.block_causal else 0  # the additive mask, built once per forward (models.layers)
    if frozen:
        return n * L * a * (3 * s.ffn + 2 * D + 2 * s.q_dim + 2 * s.kv_dim) + mask
    if targets:  # LoRA: frozen linears and norms save none of their inputs (no weight gradient to form)
        per_layer = 2 * 4 * D + a * (2 * s.q_dim + 2 * s.kv_dim) + 4 * s.heads + 3 * a * s.ffn
    else:
        per_layer = 2 * (4 + a) * D + 3 * a * (s.q_dim + s.kv_dim) + 4 * s.heads + 4 * a * s.ffn
    w = a if autocast else t  # bytes per element of what lora_A saves (autocast casts its input to half)
    extra = 0
    for lin in targets:
        extra += lora.r * w
        if lora.dropout > 0:
            extra += lin.fan_in * (w + 1)  # lora_A's input (the dropout output, cast) + the dropout mask
        elif w > a or autocast:
            extra += w * lin.fan_in  # a cast copy of the input: fp32 adapters on a half input, or autocast's
    if targets and lora.dropout == 0 and not autocast and t == a:
        extra += (2 * D + s.ffn) * a * s.layers  # lora_A saves the layer inputs themselves: 2 norm outputs, product
    head_input = 0 if targets else n * Lc * D * a  # a frozen head saves no input
    tail = n * L * (4 + (0 if targets else a)) * D + head_input
    if checkpointing:
        return n * L * (s.layers * a * D + per_layer + extra / s.layers) + tail + mask
    return n * L * (s.layers * per_layer + extra) + tail + mask


def logits_bytes(n: int, Lc: int, V: int, a: int, fused: bool, head_trains: bool, D: int) -> float:
    """The LM head's transient: n Lc V (a + 8) for logits + float32 log-softmax and its gradient; fused:
    liger-kernel's fused linear cross-entropy (kernels.linear_token_logprobs on CUDA), which builds the
    logits one chunk of rows at a time in the input dtype (rows = next power of two of n Lc / ceil(V / D),
    liger's rule), keeps the input gradient it computes in the forward (n Lc D a) and the per-row loss."""
    if fused:
        rows = 1 << max(0, math.ceil(math.log2(max(1, -(-n * Lc // -(-V // D))))))
        return rows * V * a + n * Lc * D * a + 4 * n * Lc + (a * V * D if head_trains else 0)
    return n * Lc * V * (a + 8)


def _base_bytes(s: ModelShape, recipe: Recipe, w: int) -> float:
    """The base model's weights at w bytes a parameter (4-bit linears at NF4_BYTES)."""
    linear_params = sum(lin.fan_in * lin.fan_out for lin in s.linears)
    if recipe.model.load_in_4bit:
        return linear_params * NF4_BYTES + (s.params - linear_params) * w
    return s.params * w


def _weights(plan: Plan, s: ModelShape, recipe: Recipe, p: Precision, z: Zero, adapter: int) -> float:
    """Adds the policy's weights (adapter: its LoRA parameters, 0 without LoRA); returns the base's bytes."""
    base = _base_bytes(s, recipe, p.weight)
    full = base + adapter * p.trainable
    plan.full_weights = full
    shard = 0 if z.offload_param else (full / plan.gpus if z.stage == 3 else full)
    plan.add(
        "weights",
        "policy weights" + (" (4-bit linears)" if recipe.model.load_in_4bit else ""),
        shard,
        "static",
    )
    return base


def _reference(plan: Plan, s: ModelShape, recipe: Recipe, p: Precision, base: float, z: Zero, adapter: int) -> None:
    """The reference model (see the module docstring); adapter: the policy's LoRA parameters (0 without LoRA)."""
    g, r = recipe.grpo, recipe.rollout
    mode = recipe.dpo.reference if recipe.algorithm == "dpo" else g.reference  # DPO always has a reference
    head_alone = (r.order == "policy" and not recipe.order_policy.train_model) or (
        r.edit != "none" and not recipe.edit_policy.train_model
    )  # trainers.grpo._reference: the model cannot move from its reference
    if recipe.algorithm == "consensus":
        if recipe.consensus.teacher == "current":
            plan.add("reference", "consensus teacher (the current model: no copy)", 0, "static")
        else:  # trainers.consensus: the starting model loaded again and moved with .to (never DeepSpeed's)
            teacher = _base_bytes(s, recipe, DTYPE_BYTES[recipe.model.dtype]) + adapter * 4
            plan.add("reference", "consensus teacher (initial model, whole)", teacher, "static")
    elif recipe.algorithm == "sft" or (recipe.algorithm == "grpo" and (g.beta == 0 or g.reference == "none")):
        plan.add("reference", "reference model (none: beta = 0)", 0, "static")
    elif recipe.algorithm == "grpo" and head_alone:
        plan.add("reference", "reference model (none: only the head trains)", 0, "static")
    elif recipe.algorithm == "dpo" and _order_head(recipe) and not recipe.order_policy.train_model:
        plan.add("reference", "reference model (same_model: only the head trains)", 0, "static")
    elif adapter and mode in ("auto", "adapter_disabled"):
        plan.add("reference", "reference model (adapter disabled: no copy)", 0, "static")
    else:  # trainers.common.reference_model: a deep copy of peft's base model, its LoRA layers included
        copy = base + adapter * p.trainable
        shard = 0 if z.offload_param else (copy / plan.gpus if z.stage == 3 else copy)
        what = "base + LoRA adapters" if adapter else "base"
        plan.add("reference", f"reference model (frozen copy of the {what})", shard, "static")


def _optimizer(plan: Plan, recipe: Recipe, p: Precision, z: Zero, trainable: int) -> None:
    N = plan.gpus
    grads = 0 if z.offload_optimizer else trainable * p.trainable / (N if z.stage >= 2 else 1)
    plan.add(
        "gradients",
        "gradients" + (" (offloaded with the optimizer)" if z.offload_optimizer else ""),
        grads,
        "static",
    )
    opt = 0 if z.offload_optimizer else trainable * p.optimizer / (N if z.stage >= 1 else 1)
    name = {"adamw": "AdamW states", "sgd": "SGD momentum" if recipe.optim.momentum > 0 else "SGD (no state)"}
    master = fp32_master(z, p.trainable)
    plan.add("optimizer", name[recipe.optim.name] + (" + fp32 master" if master else ""), opt, "static")
    plan.add("cuda", "CUDA context + workspaces (allowance)", CUDA_CONTEXT_BYTES, "static")
    temps, what = step_temporaries(recipe.optim), "AdamW" if recipe.optim.name == "adamw" else "SGD"
    if not z.enabled:
        plan.add("step", f"{what} foreach temporaries", trainable * p.trainable * temps, "step")
        return
    # DeepSpeed's step (zero/stage_1_and_2.py, stage3.py): the partition's gradients flattened, cast to fp32,
    # and the client optimizer stepped on the fp32 partition; ZeRO-3 steps sub_group_size parameters at a time
    part = 0 if z.offload_optimizer else trainable / (N if z.stage >= 1 else 1)
    if z.stage == 3:
        part = min(part, z.sub_group)
    plan.add("step_grad32", "ZeRO step: fp32 gradient partition", part * 4, "step")
    flat = p.trainable if p.trainable < 4 else 0  # half gradients: flattened, then cast to a new fp32 tensor
    label = f"ZeRO step: max({what} temporary, flat half grads)" if flat else f"ZeRO step: {what} foreach temporary"
    plan.add("step", label, part * max(flat, 4 * temps), "step")


def micro_batch(recipe: Recipe) -> int:
    """Rows per forward/backward on one process (runtime.micro_batch_size; consensus trains as SFT does; DPO:
    trainers.dpo._chunks splits the step's pairs, up to train.batch_size x dpo.pairs_per_prompt on-policy, into
    train.gradient_accumulation_steps parts, the first the largest, of 2 rows a pair)."""
    if recipe.algorithm == "consensus":
        return len(micro_batch_rows(recipe.train.batch_size, 1, recipe.train.gradient_accumulation_steps)[0])
    if recipe.algorithm == "dpo":
        k = recipe.dpo.pairs_per_prompt if recipe.dpo.pairs == "on_policy" else 1
        return 2 * -(-recipe.train.batch_size * k // recipe.train.gradient_accumulation_steps)
    return micro_batch_size(recipe)


def _order_head(recipe: Recipe) -> bool:
    """Whether the trainer builds a learned order head (policy.order_head_for: orders that read hidden states)."""
    from .policy.orders import ORDERS

    return recipe.algorithm in ("grpo", "dpo") and ORDERS[recipe.rollout.order].needs_hidden


def _edit_head(recipe: Recipe) -> bool:
    """Whether the trainer builds an edit head (GRPO with rollout.edit != none)."""
    return recipe.algorithm == "grpo" and recipe.rollout.edit != "none"


def model_frozen(recipe: Recipe) -> bool:
    """Whether the trainer freezes the model (model.requires_grad_(False): trainers.grpo, trainers.dpo): an order
    head that trains alone (order_policy.train_model=false), GRPO's edit head alike, or GRPO with
    hybrid.train_executor=false (the planner trains)."""
    if _order_head(recipe) and not recipe.order_policy.train_model:
        return True
    if recipe.algorithm != "grpo":
        return False
    return (_edit_head(recipe) and not recipe.edit_policy.train_model) or not recipe.hybrid.train_executor


def head_params(recipe: Recipe, hidden: int) -> list[tuple[str, int]]:
    """(name, parameter count) of the order / edit heads the trainer builds and trains, counted on meta-device
    instances built from the recipe's order_policy / edit_policy sections (as a fresh head is)."""
    import torch

    heads = []
    with torch.device("meta"):
        if _order_head(recipe):
            from .policy.order_head import OrderHead, OrderHeadConfig

            o = recipe.order_policy
            head = OrderHead(OrderHeadConfig(hidden_size=hidden, width=o.width, heads=o.heads, base=o.base))
            heads.append(("order head", sum(p.numel() for p in head.parameters())))
        if _edit_head(recipe):
            from .policy.edit_head import EditHead, EditHeadConfig

            e, r = recipe.edit_policy, recipe.rollout
            cfg = EditHeadConfig(hidden, e.width, e.heads, r.edit_max_insert if r.edit == "any" else 0, e.init_bias)
            heads.append(("edit head", sum(p.numel() for p in EditHead(cfg).parameters())))
    return heads


def _heads(plan: Plan, recipe: Recipe, heads: list[tuple[str, int]]) -> None:
    states = optimizer_states(recipe.optim)
    for name, count in heads:
        copies = 1 if recipe.algorithm == "dpo" and name == "order head" else 0  # DPO's reference head
        plan.add(
            "heads",
            f"{name} (fp32: weights, gradients, {states} state(s)" + (", reference copy)" if copies else ")"),
            count * 4 * (2 + states + copies),
            "static",
        )


def _update(plan: Plan, s, recipe, p, z, targets, lora_cfg, prompt_len, fused, frozen=False, heads=()) -> None:
    n, Lc = micro_batch(recipe), recipe.rollout.max_completion_length
    L = prompt_len + (2 * Lc if s.block_causal else Lc)
    gc = recipe.model.gradient_checkpointing
    args = (s, n, L, Lc, p.act)
    act = activation_bytes(*args, gc, targets, lora_cfg, p.trainable, p.autocast, frozen)
    other = activation_bytes(*args, not gc, targets, lora_cfg, p.trainable, p.autocast, frozen)
    what = "frozen model: forward transient" if frozen else f"checkpointing {'on' if gc else 'off'}"
    plan.add("activations", f"activations (one view; {what})", act, "update")
    if heads:  # each view's hidden states, saved in fp32 by the head's LayerNorm until the backward
        views = view_count(recipe)
        plan.add(
            "head_input", f"head input ({views} views x fp32 hidden states)", views * n * Lc * s.hidden * 4, "update"
        )
    plan.add(
        "logits",
        "log-probs" + (" (fused linear cross-entropy)" if fused else ": logits + fp32 log-softmax"),
        logits_bytes(n, Lc, s.vocab, p.act, fused, not targets and s.head is not None, s.hidden),
        "update",
    )
    if z.stage == 3:
        plan.add(
            "zero3_gather",
            "ZeRO-3 gathered parameters (max live)",
            min(s.params, z.live_params) * p.weight,
            "update",
        )
    text = (
        f"micro-batch {n} completions x {L} tokens (prompt {prompt_len} + completion {Lc}"
        f"{' x 2 streams' if s.block_causal else ''}); activations with checkpointing "
        f"{'off' if gc else 'on'} would be {other / GB:.2f} GB"
    )
    plan.info.append(("update", text))


def decode_bytes(s: ModelShape, recipe: Recipe, p: Precision, z: Zero, rows: int, prompt_len: int):
    """(KV cache, forward transient) of `rows` sequences decoded together (see the module docstring)."""
    r = recipe.rollout
    C, Lb = prompt_len + r.max_completion_length, r.block_length or r.max_completion_length
    kv_bytes = 2 if (z.half or recipe.model.dtype != "float32") else 4
    kv = 0 if r.cache == "none" else s.layers * 2 * s.kv_dim * kv_bytes * C * rows
    a, D = p.act, s.hidden
    transient = rows * C * a * (3 * s.ffn + 2 * D + 2 * s.q_dim + 2 * s.kv_dim) + rows * Lb * s.vocab * (a + 8)
    return kv, transient


def rollout_rows(recipe: Recipe, gpus: int) -> int:
    """Sequences one process decodes in one generate call while training (0: it decodes none)."""
    a = recipe.algorithm
    if a == "grpo":  # one generate call decodes every prompt of a rollout (grpo.steps_per_generation)
        from .trainers.grpo_options import geometry

        return geometry(recipe, gpus).prompts_per_rollout * recipe.grpo.num_generations
    if a == "dpo":  # offline pairs: nothing is decoded while training
        if recipe.dpo.pairs == "branch":  # the greedy decodes, then one branch per prompt a round (rollout.branch)
            return recipe.train.batch_size
        return 0 if recipe.dpo.pairs == "offline" else recipe.train.batch_size * recipe.dpo.num_generations
    if a == "consensus":  # every process samples all of a round's prompts (trainers.consensus.targets)
        return recipe.consensus.prompts_per_round * recipe.consensus.samples
    return 0  # sft: trains on the task's completions


def eval_rows(recipe: Recipe) -> int:
    """Sequences one held-out decode holds (evaluate.evaluate: rollout.batch_size prompts of the held-out set,
    eval.num_samples rows each; the set is eval.size or data.eval_size examples, at most)."""
    size = recipe.eval.size or recipe.data.eval_size
    return min(recipe.rollout.batch_size, size) * recipe.eval.num_samples


def _rollout(plan: Plan, s, recipe, p, z, prompt_len) -> None:
    r = recipe.rollout
    C = prompt_len + r.max_completion_length
    rows, held_out = rollout_rows(recipe, plan.gpus), eval_rows(recipe)
    kv, transient = decode_bytes(s, recipe, p, z, rows, prompt_len)
    eval_kv, eval_transient = decode_bytes(s, recipe, p, z, held_out, prompt_len)
    if r.compile == "graphs":  # the engine keeps the last decode's buffers and graph pool: the larger is static
        kept = "evaluation" if eval_kv + eval_transient > kv + transient else "rollout"
        if kept == "evaluation":
            kv, transient = eval_kv, eval_transient
        plan.add("kv_cache", f"{kept} KV cache (cache={r.cache}; kept by rollout.compile=graphs)", kv, "static")
        plan.add("rollout_forward", f"CUDA-graph pool ({kept} step's transient, kept)", transient, "static")
    else:
        plan.add("kv_cache", f"rollout KV cache (cache={r.cache})", kv, "rollout")
        plan.add("rollout_forward", "rollout forward transient", transient, "rollout")
        plan.add("eval_kv_cache", f"evaluation KV cache (cache={r.cache})", eval_kv, "eval")
        plan.add("eval_forward", "evaluation forward transient", eval_transient, "eval")
    if z.stage == 3:  # the trainers decode under runtime.generation_model: the whole policy gathered
        gathered = plan.full_weights - plan.get("weights")
        plan.add("zero3_rollout", "ZeRO-3 weights gathered for the rollout", gathered if rows else 0, "rollout")
        plan.add("zero3_eval", "ZeRO-3 weights gathered for the evaluation", gathered, "eval")
    what = f"{rows} sequences x canvas {C} (prompt {prompt_len} + {r.max_completion_length})" if rows else "none"
    plan.info.append(("rollout", what))
    plan.info.append(
        (
            "eval",
            f"{held_out} sequences x canvas {C}: min(rollout.batch_size {r.batch_size}, held-out "
            f"{recipe.eval.size or recipe.data.eval_size}) x eval.num_samples {recipe.eval.num_samples}; before "
            f"and/or after training and every train.eval_steps",
        )
    )


def view_count(recipe: Recipe) -> int:
    """Views (forwards) per estimate of the recipe's estimator."""
    from .estimators import build_estimator

    e, r = recipe.estimator, recipe.rollout
    views = build_estimator(e, None).views
    try:  # views(steps, completion_length); a custom estimator's may take the steps alone
        takes_length = len(inspect.signature(views).parameters) >= 2
    except (TypeError, ValueError):
        takes_length = False
    return views(r.steps, r.max_completion_length) if takes_length else views(r.steps)


def _views(recipe: Recipe) -> str:
    k = view_count(recipe)
    return f"{recipe.estimator.name}: {k} view(s) per estimate" + (
        ", one alive at a time (per-view checkpointing)" if k > 1 else ""
    )


def estimators_fuse(recipe: Recipe, s: ModelShape, targets: list[Linear]) -> bool:
    """Whether the estimators take per-token log-probs through the fused kernel on a GPU
    (estimators.base.fused_head): a native model whose head LoRA leaves alone, and views that need no logits
    (only a trajectory replaying a sampled order scored by the model or a learned head needs them)."""
    from .estimators import build_estimator
    from .policy.orders import ORDERS

    r = recipe.rollout
    scores_orders = (
        build_estimator(recipe.estimator, None).replays_orders
        and r.order_temperature > 0
        and ORDERS[r.order].replay in ("model", "learned")
    )
    return s.native and not scores_orders and not any(t is s.head for t in targets)


def plan_memory(
    recipe: Recipe, gpus: int = 1, prompt_length: int | None = None, fused_logprobs: bool | None = None
) -> Plan:
    """Per-GPU memory estimate of a recipe on `gpus` processes (see the module docstring). fused_logprobs:
    None = as the estimators do on a GPU (`estimators_fuse`); True / False forces the fused / logits path."""
    if gpus < 1:
        raise ConfigError(f"--gpus must be >= 1, got {gpus}")
    if recipe.algorithm not in ALGORITHMS:
        why = ""
        if recipe.algorithm == "planner_sft":
            why = " (it fine-tunes hybrid.planner, an autoregressive model, with TRL's SFTTrainer)"
        raise ConfigError(
            f"dllm-rl plan does not model algorithm={recipe.algorithm}{why}; "
            f"plan a recipe whose algorithm is {', '.join(ALGORITHMS[:-1])} or {ALGORITHMS[-1]}, or measure this "
            f"run's peak on the GPU with torch.cuda.max_memory_allocated()"
        )
    s = model_shape(recipe.model)
    lora_cfg = s.adapter or recipe.model.lora
    targets = lora_targets(s, lora_cfg)
    lora = bool(targets)
    z = read_zero(recipe)
    p = precision(recipe, z, lora)
    adapter = sum(lora_cfg.r * (t.fan_in + t.fan_out) for t in targets) if lora else 0
    frozen = model_frozen(recipe)
    trainable = 0 if frozen else (adapter if lora else s.params)
    heads = head_params(recipe, s.hidden)
    Lc = recipe.rollout.max_completion_length
    guessed = prompt_length is None
    if guessed:
        prompt_length = DEFAULT_PROMPT_LENGTH
        if s.max_positions:
            prompt_length = max(1, min(prompt_length, s.max_positions - Lc))
    plan = Plan(gpus)
    shape_text = (
        f"{s.source}: {s.params / 1e9:.3f} B params, {s.layers} layers, hidden {s.hidden}, MLP {s.ffn}, "
        f"heads {s.heads} (kv {s.kv_dim // max(1, s.q_dim // s.heads)}), vocab {s.vocab}"
    )
    plan.info += [
        ("model", shape_text),
        (
            "training",
            ("model frozen (requires_grad_(False))" if frozen else "")
            + (f"LoRA r={lora_cfg.r} on {len(targets)} linears" if lora and not frozen else "")
            + ("all weights" if not lora and not frozen else "")
            + f": {trainable / 1e6:.1f} M trainable; dtype {recipe.model.dtype}"
            + (", 4-bit NF4 linears" if recipe.model.load_in_4bit else "")
            + "".join(f"; {name} {count / 1e6:.3f} M (fp32)" for name, count in heads),
        ),
        ("engine", f"{z.note}; {gpus} GPU(s)"),
        ("estimator", _views(recipe)),
    ]
    if recipe.model.load_in_4bit and not lora:
        plan.notes.append("model.load_in_4bit without LoRA: quantized weights cannot train; set model.lora.r")
    base = _weights(plan, s, recipe, p, z, adapter)
    _reference(plan, s, recipe, p, base, z, adapter)
    _optimizer(plan, recipe, p, z, trainable)
    _heads(plan, recipe, heads)
    if fused_logprobs is None:
        fused_logprobs = estimators_fuse(recipe, s, targets)
    _update(plan, s, recipe, p, z, targets, lora_cfg, prompt_length, fused_logprobs, frozen, heads)
    _rollout(plan, s, recipe, p, z, prompt_length)
    if guessed:
        plan.notes.append(
            f"prompt length {prompt_length} tokens is a guess (default {DEFAULT_PROMPT_LENGTH}, capped "
            f"by the model's positions); pass --prompt-length"
        )
    return plan


# ------------------------------------------------------------------------------------------------ output


def verdict(total: float, budget: float = H100_BYTES) -> str:
    share = total / budget
    if share <= HEADROOM:
        return f"fits on one 80 GB H100 ({share:.0%} of {budget / GB:.1f} GB usable)"
    if share <= 1.0:
        return f"TIGHT on an 80 GB H100 ({share:.0%} of {budget / GB:.1f} GB; fragmentation may tip it over)"
    return f"does NOT fit on an 80 GB H100 ({share:.0%} of {budget / GB:.1f} GB)"


PHASES = {"static": "all", "update": "update", "rollout": "rollout", "eval": "eval", "step": "opt step"}


def format_plan(plan: Plan) -> str:
    lines = [
        (
            "ESTIMATE from formulas (dllm_rl/memory.py), not a measurement: check it on a GPU with "
            "torch.cuda.max_memory_allocated()."
        ),
        "",
    ]
    lines += [f"{k:<10} {v}" for k, v in plan.info]
    lines += ["", f"{'component':<52}{'GB':>9}  phase", "-" * 70]
    for c in plan.components:
        lines.append(f"{c.label:<52}{c.bytes / GB:>9.2f}  {PHASES[c.phase]}")
    lines.append("-" * 70)
    peaks = ", ".join(f"{p} {plan.phase(p) / GB:.2f}" for p in PEAK_PHASES)
    lines.append(
        f"{'total per GPU':<52}{plan.total / GB:>9.2f}  = static {plan.phase('static') / GB:.2f} + max({peaks})"
    )
    lines.append(f"verdict: {verdict(plan.total)}")
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)


def print_plan(
    recipe: Recipe, gpus: int = 1, prompt_length: int | None = None, fused_logprobs: bool | None = None
) -> None:
    """Print the per-GPU memory plan of a recipe (the `dllm-rl plan` command)."""
    print(format_plan(plan_memory(recipe, gpus, prompt_length, fused_logprobs)))
