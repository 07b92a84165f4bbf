"""Any transformers diffusion LM that only exists as remote code, adapted to the protocol of `models.base`.

`HFDiffusionLM` calls the wrapped model's own forward, so nothing about its architecture needs to be known.
What is lost against a native model (tiny, LLaDA, Dream):

- no KV cache: there is no `new_cache`, so `traits().supports_cache` is False and the rollout engine refuses
  `rollout.cache` modes other than `none` with an error that says so; every step forwards the whole canvas;
- no block-causal packing: a 4-D mask is passed on only if the wrapped model takes one (`mask="bool"` or
  `"additive"`); by default (`mask="padding"`) a 4-D mask must reduce to key padding, which bidirectional
  masks do and block-causal / two-stream masks do not (a DllmRlError then names the problem);
- `logits_range` saves nothing: the full logits are computed and sliced afterwards;
- positions: `position_ids` are passed on only if the wrapped forward accepts them.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.modeling_outputs import MaskedLMOutput

from ..errors import DllmRlError, lookup
from .base import unwrap

PROTOCOL_KWARGS = ("kv_cache", "cache_start", "kv_len", "cache_rows", "logits_range")


def follows_protocol(model: nn.Module) -> bool:
    """Whether a model's forward takes the protocol's keyword arguments (our native classes do)."""
    params = inspect.signature(unwrap(model).forward).parameters
    return all(name in params for name in PROTOCOL_KWARGS)


def padding_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Reduce a bool [B, 1, L, L] mask to key padding [B, L] when it is one; raise DllmRlError otherwise.

    The key set is the widest query row. Every query that is itself a key in that set must see exactly that
    set; the rows of padding queries (models.masks gives them a fallback key) are ignored.
    """
    m = mask[:, 0]  # [B, Lq, Lk]
    if m.shape[1] != m.shape[2]:
        raise DllmRlError("a model run through its own forward needs query length == key length (no cache)")
    keys = m.gather(1, m.sum(-1).argmax(-1)[:, None, None].expand(-1, 1, m.shape[2]))[:, 0]  # [B, L]
    ok = (m == keys[:, None, :]).all(-1) | ~keys  # [B, L]: every real query row equals the key set
    if not bool(ok.all()):
        raise DllmRlError(
            "this model runs through its own forward and takes only a key-padding attention mask; "
            "the engine passed a block-causal (or two-stream) mask it cannot express. Use a "
            "bidirectional setup, or a native dllm_rl model for block-causal attention"
        )
    return keys.long()


def _padding(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return padding_from_mask(mask)


def _bool(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return mask


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


MASK_FORMATS = {"padding": _padding, "bool": _bool, "additive": _additive}


class ProtocolWrapper(nn.Module):
    """What a wrapper around a transformers model (`self.model`) forwards to it: config, saving (a state dict
    gathered from the wrapper loses its `model.` prefix, so the checkpoint reloads into the bare model),
    gradient checkpointing, embeddings."""

    wraps_transformers_model = True  # models.base.peft_of looks inside for adapters

    @property
    def config(self):
        return unwrap(self.model).config

    def save_pretrained(self, directory, state_dict: dict | None = None, **kwargs):
        if state_dict is not None:
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        return self.model.save_pretrained(directory, state_dict=state_dict, **kwargs)

    def gradient_checkpointing_enable(self, **kwargs):
        return self.model.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self):
        return self.model.gradient_checkpointing_disable()

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()


class HFDiffusionLM(ProtocolWrapper):
    """A remote-code dLLM behind the protocol forward (see the module docstring for what is lost).

    Args:
        model: the loaded transformers model (or a peft model around it).
        mask: how a 4-D bool mask reaches it: "padding" (reduced to [B, L], the default: every HF model takes
            a padding mask), "bool" (passed as is), "additive" (0 / dtype-min floats).
    """

    def __init__(self, model: nn.Module, mask: str = "padding"):
        super().__init__()
        if getattr(unwrap(model).config, "canvas_length", None) is not None:
            raise DllmRlError(
                f"{type(unwrap(model)).__name__} is an encoder-decoder block-diffusion model (prompt "
                "encoder + uniform-noise canvas decoder); its plain forward does not fit the engine. "
                "DiffusionGemma has an adapter: models.diffusion_gemma.DiffusionGemmaLM "
                "(wrap_if_needed / load_model choose it)"
            )
        self.model = model
        self._convert = lookup(MASK_FORMATS, mask, "HFDiffusionLM mask format")
        params = inspect.signature(unwrap(model).forward).parameters
        self._takes_positions = "position_ids" in params or any(
            p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache=None,
        cache_start: int = 0,
        kv_len: int | None = None,
        cache_rows: torch.Tensor | None = None,
        logits_range: tuple[int, int] | None = None,
        output_hidden_states: bool = False,
        **kwargs,
    ) -> MaskedLMOutput:
        if (
            kv_cache is not None
            or cache_start
            or cache_rows is not None
            or (kv_len is not None and kv_len != input_ids.shape[1])
        ):
            raise DllmRlError(
                f"{type(unwrap(self.model)).__name__} runs through its own forward and has no KV "
                "cache; set rollout.cache=none (or load a native dllm_rl model)"
            )
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = self._convert(attention_mask.bool(), next(self.model.parameters()).dtype)
        extra = {"position_ids": position_ids} if self._takes_positions and position_ids is not None else {}
        out = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            output_hidden_states=output_hidden_states,
            **extra,
            **kwargs,
        )
        logits = out.logits if hasattr(out, "logits") else out[0]  # [B, L, V]
        if logits.shape[:2] != input_ids.shape:
            raise DllmRlError(
                f"{type(unwrap(self.model)).__name__} returned logits of shape {tuple(logits.shape)} "
                f"for input_ids {tuple(input_ids.shape)}; the protocol needs one distribution per "
                "input position (a mask predictor)"
            )
        if logits_range is not None:
            logits = logits[:, logits_range[0] : logits_range[1]]
        hidden = getattr(out, "hidden_states", None) if output_hidden_states else None
        return MaskedLMOutput(logits=logits, hidden_states=hidden)
