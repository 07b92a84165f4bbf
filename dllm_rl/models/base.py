"""What the rollout engine, trainers and estimators need from a diffusion LM.

The protocol is the forward signature of the native models (tiny, LLaDA, Dream):

    model(input_ids [B, Lq], attention_mask=None | [B, Lk] | bool [B, 1, Lq, Lk], position_ids=[B, Lq],
          kv_cache=KVCache | None, cache_start=int, kv_len=int | None, cache_rows=[b] | None,
          logits_range=(a, b) | None, output_hidden_states=bool) -> output with .logits [B, *, V]

plus `model.new_cache(batch_size, length)` when the model can cache. The native models also take
`cache_start` as a [Lq] long tensor of canvas positions and `logits_index=[m]` (logits of those query positions
only): with positions as data rather than Python ints, one captured decoding step serves every block
(`traits().static_shapes`). Models that only exist as remote code
are adapted to it by `models.hf.HFDiffusionLM` (their own forward, no cache). `traits()` reads the rest:
mask token, attention kind, block size, cache support, and the logits shift of Dream-style models.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from torch import nn

from ..errors import DllmRlError


@dataclass(frozen=True)
class ModelTraits:
    mask_token_id: int
    attention: str  # "bidirectional" | "block_causal"
    block_size: int | None  # block length of block-causal attention
    supports_cache: bool
    logits_shift: int  # 0: logits[i] predicts token i; 1 (Dream): logits[i-1] predicts token i
    static_shapes: bool = False  # takes tensor cache positions and `logits_index` (native models)


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying transformers model behind DeepSpeed / DDP / peft wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DeepSpeed, DDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        else:
            return model


def peft_of(model: nn.Module) -> nn.Module | None:
    """The peft model holding `model`'s adapters (the one whose `disable_adapter()` turns them off), looking
    through DeepSpeed / DDP and the protocol wrappers (HFDiffusionLM, DiffusionGemmaLM run a `.model`), or None."""
    while True:
        if hasattr(model, "disable_adapter"):
            return model
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DeepSpeed, DDP
            model = model.module
        elif getattr(model, "wraps_transformers_model", False):  # models.hf.ProtocolWrapper
            model = model.model
        else:
            return None


def traits(model: nn.Module, tokenizer=None) -> ModelTraits:
    """Read the engine-relevant facts of a model (and its tokenizer, for the mask token)."""
    base = unwrap(model)
    cfg = base.config
    mask_id = getattr(cfg, "mask_token_id", None)
    if mask_id is None and tokenizer is not None:
        mask_id = tokenizer.mask_token_id
    if mask_id is None:
        raise DllmRlError(
            f"{type(base).__name__} has no mask token: neither config.mask_token_id nor the tokenizer's "
            "mask_token is set; set config.mask_token_id (or tokenizer.mask_token) to the [MASK] id the "
            "model was trained with"
        )
    attention = getattr(cfg, "attention", "bidirectional")
    return ModelTraits(
        mask_token_id=int(mask_id),
        attention=attention,
        block_size=getattr(cfg, "block_size", None) if attention == "block_causal" else None,
        supports_cache=hasattr(base, "new_cache"),
        logits_shift=int(getattr(cfg, "logits_shift", 0) or 0),
        static_shapes="logits_index" in inspect.signature(base.forward).parameters,
    )
