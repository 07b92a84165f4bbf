"""Loading the policy and its tokenizer: from a checkpoint directory, a run directory, a hub id, or from
scratch (the built-in tiny MDM); dtype, gradient checkpointing, LoRA through peft.

`model.path` may name a run directory (`outputs/run`): its `final/` model, else its newest checkpoint.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import DllmRlError
from ..rundir import resolve_model_dir
from .base import peft_of, traits, unwrap
from .diffusion_gemma import DiffusionGemmaLM, is_diffusion_gemma, model_class, sentinel_id
from .hf import HFDiffusionLM, follows_protocol
from .tiny import TinyMDM, TinyMDMConfig
from .tokenizer import build_char_tokenizer

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# what a LoRA adapter on a tiny model built from scratch records as its base (adapter_config.json's
# base_model_name_or_path), followed by the seed of the base's initialisation: there are no base weights on disk
# to name, and the seed with the checkpoint's recipe.yaml (model.tiny) and tokenizer rebuilds the same base
TINY_BASE = "dllm_rl:tiny-mdm:seed="
# peft's save looks the base up for a changed vocabulary, which TINY_BASE is not, and warns on every save
warnings.filterwarnings("ignore", r"Could not find a config file in dllm_rl:tiny-mdm:seed=", UserWarning)


def build_tiny(cfg: ModelConfig, tokenizer, seed: int = 0) -> TinyMDM:
    """A freshly initialised tiny MDM; the initialisation is drawn from `seed` (global RNG left untouched)."""
    t = cfg.tiny
    config = TinyMDMConfig(
        vocab_size=len(tokenizer),
        hidden_size=t.hidden_size,
        intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_layers,
        num_attention_heads=t.num_heads,
        max_position_embeddings=t.max_position_embeddings,
        attention=t.attention,
        block_size=t.block_size,
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyMDM(config)
    model.name_or_path = f"{TINY_BASE}{seed}"  # peft records it as a LoRA adapter's base (_adapter_base reads it)
    return model


def load_tokenizer(path: str | None, trust_remote_code: bool = False, key: str = "model.path"):
    """The tokenizer at `path` (a model, run or tokenizer directory, or a hub id); the character tokenizer of the
    tiny models for None. `key`: the setting errors name."""
    from transformers import AutoTokenizer

    if path is None:
        return build_char_tokenizer()
    p = Path(path).expanduser()
    directory = str(p) if p.is_dir() and any(p.glob("tokenizer*")) else resolve_model_dir(path, key=key)
    try:
        tok = AutoTokenizer.from_pretrained(directory, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise DllmRlError(
            f"could not load a tokenizer from {path!r} ({str(e).splitlines()[0][:160]}); set "
            f"model.tokenizer to a directory with tokenizer files"
        ) from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, path: str | None = None, seed: int = 0):
    """(model, tokenizer) for a recipe's model section; `path` overrides cfg.path (e.g. a checkpoint).
    `seed` draws the initialisation of a model built from scratch."""
    path = path or cfg.path
    if path is None:
        tokenizer = load_tokenizer(cfg.tokenizer, cfg.trust_remote_code, key="model.tokenizer")
        model = build_tiny(cfg, tokenizer, seed)
    else:
        model_dir = resolve_model_dir(path)
        if Path(model_dir).is_dir():  # absolute: a LoRA adapter records it as its base, to reload from any cwd
            model_dir = str(Path(model_dir).resolve())
        if Path(model_dir, "adapter_config.json").is_file():
            return _load_adapter(cfg, model_dir)
        tokenizer = _tokenizer_of(cfg, model_dir)
        kwargs = {"dtype": DTYPES[cfg.dtype], "trust_remote_code": cfg.trust_remote_code}
        if cfg.load_in_4bit:
            _four_bit()
            kwargs["quantization_config"] = four_bit_config(cfg.dtype)
        try:
            model = model_class(model_dir, cfg.trust_remote_code).from_pretrained(model_dir, **kwargs)
        except (OSError, ValueError) as e:
            raise DllmRlError(
                f"could not load a model from {model_dir!r} ({str(e).splitlines()[0][:200]}); "
                f"check model.path, or set model.trust_remote_code=true for remote-code "
                f"models"
            ) from None
    if getattr(model, "quantization_method", None) is None:  # a 4-bit model is loaded in its dtype and cannot be cast
        model.to(DTYPES[cfg.dtype])
    if is_diffusion_gemma(model):  # uniform noise, no [MASK]: the adapter's sentinel stands for undecided tokens
        model.config.mask_token_id = sentinel_id(model.config)
    elif getattr(model.config, "mask_token_id", None) is None and tokenizer.mask_token_id is not None:
        model.config.mask_token_id = tokenizer.mask_token_id
    traits(model, tokenizer)  # fails now, with the fix, if there is no mask token
    if cfg.gradient_checkpointing:  # acts in training mode only: the trainers put the model there for updates
        # transformers 5.x names it activation checkpointing (the old name warns); both honour a model's override
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
    if cfg.lora.r > 0:
        model = apply_lora(model, cfg, seed)
    return wrap_if_needed(model), tokenizer  # remote-code models get the protocol through HFDiffusionLM


def given_model(model: nn.Module, tokenizer):
    """A model object passed to a trainer (TRL's `model=` instance): its mask token set from the tokenizer when
    its config lacks one, checked for one, and wrapped to the engine's protocol when it has no native class."""
    if tokenizer is None:
        raise DllmRlError("a model object needs its tokenizer: pass processing_class= (or tokenizer=)")
    config = getattr(unwrap(model), "config", None)
    if config is not None and getattr(config, "mask_token_id", None) is None and tokenizer.mask_token_id is not None:
        config.mask_token_id = tokenizer.mask_token_id
    traits(model, tokenizer)  # fails now, with the fix, if there is no mask token
    return wrap_if_needed(model)


def apply_peft_config(model: nn.Module, peft_config, seed: int = 0):
    """TRL's `peft_config=`: peft.get_peft_model(model, peft_config) (the wrapped transformers model for
    models run through their own forward), initialised from `seed`; a model that already has adapters is
    refused, as TRL does."""
    from peft import PeftConfig, PeftModel

    if not isinstance(peft_config, PeftConfig):
        raise DllmRlError(
            f"peft_config: expected a peft.PeftConfig (e.g. LoraConfig), got {type(peft_config).__name__}"
        )
    inner = model.model if isinstance(model, (HFDiffusionLM, DiffusionGemmaLM)) else model
    if isinstance(inner, PeftModel) or peft_of(model) is not None:
        raise DllmRlError("peft_config was given for a model that already has adapters: pass one or the other")
    if inner is model:
        return seeded_peft(model, peft_config, seed)
    model.model = seeded_peft(inner, peft_config, seed)  # in place: the wrapper keeps its settings (mask format, ...)
    return model


def apply_lora(model, cfg: ModelConfig, seed: int = 0):
    """peft's LoRA adapters on `model`, their initialisation (lora_A is random) drawn from `seed`, not from the
    global generator: a run's train.seed fixes it, and every process of a distributed run starts alike."""
    from peft import LoraConfig

    targets = cfg.lora.target_modules
    lora = LoraConfig(
        r=cfg.lora.r,
        lora_alpha=cfg.lora.alpha,
        lora_dropout=cfg.lora.dropout,
        target_modules=targets[0] if targets == ["all-linear"] else targets,
    )
    return seeded_peft(model, lora, seed)


def seeded_peft(model: nn.Module, peft_config, seed: int):
    """peft.get_peft_model with the adapters' random initialisation drawn from `seed` (the global generators are
    left as they were)."""
    from peft import get_peft_model

    devices = [p.device for p in model.parameters() if p.device.type == "cuda"][:1]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_config)


def _tokenizer_of(cfg: ModelConfig, model_dir: str):
    if cfg.tokenizer:
        return load_tokenizer(cfg.tokenizer, cfg.trust_remote_code, key="model.tokenizer")
    return load_tokenizer(model_dir, cfg.trust_remote_code)


def adapter_base_path(adapter_dir) -> str:
    """The base model a LoRA checkpoint names in its adapter_config.json."""
    import json

    return json.loads(Path(adapter_dir, "adapter_config.json").read_text())["base_model_name_or_path"]


def _adapter_base(cfg: ModelConfig, adapter_dir: str) -> tuple[ModelConfig, int]:
    """(the model section of the base a LoRA checkpoint names in adapter_config.json, the seed that builds it).
    A base built from scratch (TINY_BASE) is rebuilt from the seed recorded there, the checkpoint's recipe.yaml
    (model.tiny) and its tokenizer; a checkpoint that names no base is refused, not put on a random model."""
    base = adapter_base_path(adapter_dir)
    if isinstance(base, str) and base.startswith(TINY_BASE):
        return _tiny_adapter_base(cfg, adapter_dir, base)
    if not base:
        raise DllmRlError(
            f"LoRA checkpoint {adapter_dir} names no base model (adapter_config.json base_model_name_or_path is "
            f"{base!r}), so the weights it adapts are unknown and a fresh model would make its outputs garbage; set "
            f"that field to the base model's directory, or retrain the adapter with model.path set to a saved base"
        )
    try:
        resolve_model_dir(base)
    except DllmRlError as e:
        if Path(base).expanduser().exists():
            raise DllmRlError(
                f"LoRA checkpoint {adapter_dir} names base {base!r} (adapter_config.json base_model_name_or_path): {e}"
            ) from None
        raise DllmRlError(
            f"LoRA checkpoint {adapter_dir} names base {base!r} (adapter_config.json base_model_name_or_path), "
            f"which does not exist; restore it or edit that field"
        ) from None
    return ModelConfig(**{**cfg.__dict__, "path": base, "lora": type(cfg.lora)()}), 0


def _tiny_adapter_base(cfg: ModelConfig, adapter_dir: str, base: str) -> tuple[ModelConfig, int]:
    from ..config import load_recipe
    from ..errors import ConfigError

    fix = f"restore {adapter_dir}'s recipe.yaml (a run writes it next to the adapter), or retrain with model.path set"
    try:
        seed = int(base[len(TINY_BASE) :])
        saved = load_recipe(Path(adapter_dir, "recipe.yaml")).model
    except (ValueError, ConfigError) as e:
        raise DllmRlError(
            f"LoRA checkpoint {adapter_dir} adapts the tiny model built from scratch ({base!r} in adapter_config.json "
            f"base_model_name_or_path), which is rebuilt from that seed and the checkpoint's recipe.yaml, and they "
            f"cannot be read ({str(e).splitlines()[0][:200]}); {fix}"
        ) from None
    if saved.path is not None:
        raise DllmRlError(
            f"LoRA checkpoint {adapter_dir}: adapter_config.json names the tiny model built from scratch as its base, "
            f"but its recipe.yaml loads model.path {saved.path!r}; {fix}"
        )
    tokenizer = str(adapter_dir) if any(Path(adapter_dir).glob("tokenizer*")) else saved.tokenizer
    lora = type(cfg.lora)()
    return ModelConfig(**{**cfg.__dict__, "path": None, "tokenizer": tokenizer, "tiny": saved.tiny, "lora": lora}), seed


def recipe_tokenizer(cfg: ModelConfig):
    """The tokenizer load_model gives for this model section, without building the model, so that data can be
    checked against it first."""
    if cfg.path is None:
        return load_tokenizer(cfg.tokenizer, cfg.trust_remote_code, key="model.tokenizer")
    model_dir = resolve_model_dir(cfg.path)
    if Path(model_dir).is_dir() and Path(model_dir, "adapter_config.json").is_file():
        return recipe_tokenizer(_adapter_base(cfg, model_dir)[0])
    return _tokenizer_of(cfg, model_dir)


def _load_adapter(cfg: ModelConfig, adapter_dir: str):
    """A LoRA checkpoint: the base model named in adapter_config.json plus the trained adapter."""
    from peft import PeftModel

    base_cfg, seed = _adapter_base(cfg, adapter_dir)
    base, tokenizer = load_model(base_cfg, seed=seed)
    if isinstance(base, (HFDiffusionLM, DiffusionGemmaLM)):  # peft wraps the transformers model, the protocol peft
        return type(base)(PeftModel.from_pretrained(base.model, adapter_dir, is_trainable=True)), tokenizer
    return PeftModel.from_pretrained(base, adapter_dir, is_trainable=True), tokenizer


def _four_bit() -> None:
    """model.load_in_4bit's requirement: bitsandbytes' 4-bit weights need a CUDA GPU."""
    if not torch.cuda.is_available():
        raise DllmRlError("model.load_in_4bit needs a CUDA GPU (bitsandbytes); set model.load_in_4bit=false")


def four_bit_config(dtype: str):
    """bitsandbytes' NF4 settings (double quantization) for model.dtype `dtype`: the matmuls compute in the recipe's
    dtype when it is bfloat16 or float16, and in bfloat16 for float32 (float32 matmuls over weights stored in 4 bits
    would cost time and memory for precision the weights do not have)."""
    from transformers import BitsAndBytesConfig

    compute = DTYPES[dtype] if dtype in ("bfloat16", "float16") else torch.bfloat16
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute,
    )


def wrap_if_needed(model: nn.Module) -> nn.Module:
    """The model itself when it follows the protocol, a DiffusionGemmaLM around a DiffusionGemma, else an
    HFDiffusionLM around it (with one warning)."""
    if isinstance(model, (HFDiffusionLM, DiffusionGemmaLM)) or follows_protocol(model):
        return model
    if is_diffusion_gemma(model):
        return DiffusionGemmaLM(model)
    log.warning(
        "%s has no native dllm_rl implementation: running it through its own forward (no KV cache, no "
        "block-causal packing, full logits computed then sliced)",
        type(unwrap(model)).__name__,
    )
    return HFDiffusionLM(model)
