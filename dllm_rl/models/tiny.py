"""The built-in tiny masked diffusion LM (MDM): a small Llama-shaped mask predictor.

A real `transformers.PreTrainedModel` (registered with AutoConfig / AutoModel / AutoModelForMaskedLM as
model_type "tiny_mdm"), so checkpoints save and load with `save_pretrained` / `AutoModel.from_pretrained`.
It follows LLaDA's recipe (arXiv 2502.09992): a Transformer without a causal mask that predicts every
masked token at once; RMSNorm, RoPE, SwiGLU, no biases.

Attention is bidirectional, or block-causal (block diffusion, arXiv 2503.09573) when
`config.attention == "block_causal"`; the rollout engine and trainers pass explicit masks built by
`models.masks`, and a plain call without a mask uses bidirectional attention (block-causal configs fall
back to blocks of `block_size` positions, SDAR's convention). Both kinds accept the in-place KV cache of
`models.cache` for cached rollouts.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import MaskedLMOutput

from .cache import KVCache
from .layers import RotaryEmbedding, apply_rotary, attention, expand_mask


class TinyMDMConfig(PreTrainedConfig):
    model_type = "tiny_mdm"

    vocab_size: int = 128
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 256
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    attention: str = "bidirectional"  # "bidirectional" | "block_causal"
    block_size: int = 8
    mask_token_id: int | None = None
    pad_token_id: int | None = None
    eos_token_id: int | None = None
    bos_token_id: int | None = None
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.attention not in ("bidirectional", "block_causal"):
            raise ValueError(f"attention must be 'bidirectional' or 'block_causal', got {self.attention!r}")
        super().__post_init__(**kwargs)


class TinyAttention(nn.Module):
    def __init__(self, config: TinyMDMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.h, self.h_kv = config.num_attention_heads, config.num_key_value_heads
        self.d = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, self.h * self.d, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.h_kv * self.d, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.h_kv * self.d, bias=False)
        self.o_proj = nn.Linear(self.h * self.d, config.hidden_size, bias=False)

    def forward(self, x, rope, mask, cache, cache_start, kv_len, cache_rows):
        B, L, _ = x.shape
        q = self.q_proj(x).view(B, L, self.h, self.d).transpose(1, 2)  # [B, H, L, D]
        k = self.k_proj(x).view(B, L, self.h_kv, self.d).transpose(1, 2)  # [B, H_kv, L, D]
        v = self.v_proj(x).view(B, L, self.h_kv, self.d).transpose(1, 2)
        cos, sin = rope
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = attention(q, k, v, mask, self.layer, cache, cache_start, kv_len, cache_rows)
        return self.o_proj(out.transpose(1, 2).reshape(B, L, self.h * self.d))


class TinyMLP(nn.Module):
    def __init__(self, config: TinyMDMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyBlock(GradientCheckpointingLayer):
    def __init__(self, config: TinyMDMConfig, layer: int):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = TinyAttention(config, layer)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = TinyMLP(config)

    def forward(self, x, rope, mask, cache=None, cache_start=0, kv_len=None, cache_rows=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, cache_start, kv_len, cache_rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyMDM(PreTrainedModel):
    """Mask predictor: logits[b, i] is the distribution of token i given the (partially masked) input."""

    config_class = TinyMDMConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["TinyBlock"]
    _supports_sdpa = True

    def __init__(self, config: TinyMDMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([TinyBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def new_cache(self, batch_size: int, length: int) -> KVCache:
        c = self.config
        p = self.embed_tokens.weight
        return KVCache(c.num_hidden_layers, batch_size, c.num_key_value_heads, length,
                       c.hidden_size // c.num_attention_heads, p.dtype, p.device)

    def _default_mask(self, attention_mask, position_ids, q_len):
        """Mask for a plain call (no explicit 4-D mask): padding, plus SDAR-style blocks if block-causal."""
        mask = expand_mask(attention_mask, q_len)
        if self.config.attention == "block_causal" and (mask is None or mask.dim() != 4):
            blocks = position_ids // self.config.block_size  # [B, L]
            causal = (blocks[:, None, :] <= blocks[:, :, None])[:, None]  # [B, 1, L, L]
            mask = causal if mask is None else causal & mask
        return mask

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, kv_cache: KVCache | None = None,
                cache_start: int = 0, kv_len: int | None = None, cache_rows: torch.Tensor | None = None,
                logits_range: tuple[int, int] | None = None, output_hidden_states: bool = False,
                **kwargs) -> MaskedLMOutput:
        """Args:
            input_ids: [B, Lq] tokens (masked positions hold `config.mask_token_id`).
            attention_mask: [B, Lk] 1 = attend, or bool [B, 1, Lq, Lk] (models.masks), or None.
            position_ids: [B, Lq] RoPE positions; default 0..Lq-1 (+ cache_start).
            kv_cache / cache_start / kv_len / cache_rows: see models.cache.KVCache.update.
            logits_range: compute logits only for query positions [a, b) (saves the LM head elsewhere).
        Returns MaskedLMOutput with logits [B, Lq or b-a, V] (float32 when the weights are float32).
        """
        B, L = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(cache_start, cache_start + L, device=input_ids.device).expand(B, L)
        x = self.embed_tokens(input_ids)  # [B, L, D]
        rope = self.rotary(position_ids, x.dtype)
        mask = self._default_mask(attention_mask, position_ids, L)
        hidden = [x] if output_hidden_states else None
        for block in self.layers:
            x = block(x, rope, mask, kv_cache, cache_start, kv_len, cache_rows)
            if output_hidden_states:
                hidden.append(x)
        x = self.norm(x)
        if output_hidden_states:
            hidden[-1] = x
        if logits_range is not None:
            x = x[:, logits_range[0]:logits_range[1]]
        logits = self.lm_head(x)  # [B, L, V]
        return MaskedLMOutput(logits=logits, hidden_states=tuple(hidden) if hidden else None)
