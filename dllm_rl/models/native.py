"""The body shared by the native, checkpoint-compatible diffusion LMs (LLaDA, Dream).

Both published architectures are pre-norm Llama-style Transformers run without a causal mask: RMSNorm, RoPE in
the rotate-half convention, (grouped-query) self-attention and a SiLU-gated MLP. They differ in parameter names
(kept exactly as published, so the released safetensors load as they are), biases, RoPE precision, weight tying
and the logits shift. This module holds what they share, so each model file only declares its modules and
names:

- `RMSNorm`: normalises in float32 and scales after casting back, the order of both reference implementations
  (`torch.nn.RMSNorm` scales first, which rounds differently in bfloat16);
- `attend`: project, rotate, attend through the cache-aware core of `layers.attention`;
- `NativeDiffusionLM`: the protocol forward of `models.base` (masks, positions, cache, `logits_range`, hidden
  states) and `new_cache`, over hooks the model classes fill in;
- `check_attention`: the `attention` / `block_size` config fields (bidirectional by default; block-causal for
  block-diffusion fine-tuning, arXiv 2503.09573).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from ..errors import DllmRlError
from ..kernels import rms_norm, rotary
from .cache import KVCache
from .layers import additive_mask, attention, expand_mask

ATTENTION_KINDS = ("bidirectional", "block_causal")


def check_attention(config) -> None:
    """Validate the `attention` / `block_size` fields every native config carries."""
    if config.attention not in ATTENTION_KINDS:
        raise ValueError(f"attention must be one of {ATTENTION_KINDS}, got {config.attention!r}")
    if config.attention == "block_causal" and not config.block_size:
        raise ValueError("attention='block_causal' needs block_size (the block length of block diffusion)")


class RMSNorm(nn.Module):
    """RMSNorm (arXiv 1910.07467): x / rms(x) in float32, cast back to x's dtype, then `weight * x (+ bias)`."""

    def __init__(self, size: int, eps: float, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))
        self.bias = nn.Parameter(torch.zeros(size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = rms_norm(x, self.weight, self.eps)  # one liger kernel on CUDA (kernels.fused)
        return h if self.bias is None else h + self.bias

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def attend(
    x: torch.Tensor,
    q_proj: nn.Module,
    k_proj: nn.Module,
    v_proj: nn.Module,
    heads: int,
    kv_heads: int,
    rope: tuple[torch.Tensor, torch.Tensor],
    mask,
    layer: int,
    cache: KVCache | None,
    cache_start: int,
    kv_len: int | None,
    cache_rows: torch.Tensor | None,
) -> torch.Tensor:
    """Self-attention before the output projection: x [B, L, D_model] -> [B, L, H * D].

    RoPE is applied in the dtype of `rope` (float32 for LLaDA's `rope_full_precision`, the activation dtype for
    Dream), and q, k are cast back before attention.
    """
    B, L, _ = x.shape
    q = q_proj(x).view(B, L, heads, -1).transpose(1, 2)  # [B, H, L, D]
    k = k_proj(x).view(B, L, kv_heads, -1).transpose(1, 2)  # [B, H_kv, L, D]
    v = v_proj(x).view(B, L, kv_heads, -1).transpose(1, 2)
    q, k = rotary(q, k, *rope)  # q and k in one liger kernel on CUDA (kernels.fused)
    out = attention(q, k, v, mask, layer, cache, cache_start, kv_len, cache_rows)  # [B, H, L, D]
    return out.transpose(1, 2).reshape(B, L, -1)


def default_mask(
    config, attention_mask: torch.Tensor | None, position_ids: torch.Tensor, q_len: int, cached: bool
) -> torch.Tensor | None:
    """The mask of a call without an explicit 4-D mask: key padding, plus blocks of `block_size` positions
    (SDAR's convention) when the model is block-causal."""
    mask = expand_mask(attention_mask, q_len)  # 2-D padding mask -> [B, 1, 1, Lk]
    if config.attention != "block_causal" or (attention_mask is not None and attention_mask.dim() == 4):
        return mask
    if cached:
        raise DllmRlError(
            "a block-causal forward with a KV cache needs an explicit 4-D attention mask "
            "(models.masks.mask_from_block_ids); pass attention_mask=[B, 1, Lq, Lk]"
        )
    blocks = position_ids // config.block_size  # [B, L]
    causal = (blocks[:, None, :] <= blocks[:, :, None])[:, None]  # [B, 1, L, L]
    return causal if mask is None else causal & mask


class NativeDiffusionLM(PreTrainedModel):
    """The protocol forward of `models.base` for a stack of pre-norm blocks.

    Subclasses build their modules under the published names, set `self.rotary` (a stateless
    `layers.RotaryEmbedding`) and implement the hooks: `_embed(ids)`, `_blocks()`, `_final_norm(x)`, `_head(x)`
    and `_geometry()` -> (layers, kv heads, head dim). A block is called as
    `block(x, rope, mask, cache, cache_start, kv_len, cache_rows)`.
    """

    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    rope_fp32 = False  # apply RoPE in float32 whatever the weights' dtype

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _blocks(self) -> nn.ModuleList:
        raise NotImplementedError

    def _final_norm(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _geometry(self) -> tuple[int, int, int]:
        raise NotImplementedError

    def new_cache(self, batch_size: int, length: int) -> KVCache:
        layers, kv_heads, head_dim = self._geometry()
        p = self.get_input_embeddings().weight
        return KVCache(layers, batch_size, kv_heads, length, head_dim, p.dtype, p.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        kv_cache: KVCache | None = None,
        cache_start: int | torch.Tensor = 0,
        kv_len: int | None = None,
        cache_rows: torch.Tensor | None = None,
        logits_range: tuple[int, int] | None = None,
        output_hidden_states: bool | str = False,
        logits_index: torch.Tensor | None = None,
        **kwargs,
    ) -> MaskedLMOutput:
        """Args:
            input_ids: [B, Lq] tokens (masked positions hold `config.mask_token_id`).
            attention_mask: [B, Lk] 1 = attend, or bool [B, 1, Lq, Lk] (models.masks), or None.
            position_ids: [B, Lq] RoPE positions; default cache_start .. cache_start + Lq - 1.
            kv_cache / cache_start / kv_len / cache_rows: see models.cache.KVCache.update (cache_start may be
                a [Lq] long tensor of canvas positions: static-shape decoding).
            logits_range: compute logits only for query positions [a, b) (the LM head is the costly part).
            logits_index: compute logits only for these query positions ([m] long tensor; after
                logits_range): the positions are data, so one captured graph serves every block.
        Returns MaskedLMOutput with logits [B, Lq or b - a, V]; hidden_states (embeddings, every block, the
        last one after the final norm) when output_hidden_states, only the last one when it is "last" (the other
        layers' outputs are then not kept alive).
        """
        B, L = input_ids.shape
        if position_ids is None and torch.is_tensor(cache_start):
            position_ids = cache_start.expand(B, L)
        elif position_ids is None:
            position_ids = torch.arange(cache_start, cache_start + L, device=input_ids.device).expand(B, L)
        x = self._embed(input_ids)  # [B, L, D]
        rope = self.rotary(position_ids, torch.float32 if self.rope_fp32 else x.dtype)
        mask = default_mask(self.config, attention_mask, position_ids, L, kv_cache is not None)
        mask = additive_mask(mask, x.dtype)  # once, not in every layer
        every_layer = output_hidden_states is True
        hidden = [x] if every_layer else []
        for block in self._blocks():
            x = block(x, rope, mask, kv_cache, cache_start, kv_len, cache_rows)
            if every_layer:
                hidden.append(x)
        x = self._final_norm(x)
        if output_hidden_states:
            hidden[-1:] = [x]
        if logits_range is not None:
            x = x[:, logits_range[0] : logits_range[1]]
        if logits_index is not None:
            x = x.index_select(1, logits_index)
        logits = self._head(x)  # [B, L, V]
        return MaskedLMOutput(logits=logits, hidden_states=tuple(hidden) if hidden else None)
