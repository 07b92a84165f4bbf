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

from torch import nn
from transformers import PreTrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from ..kernels import silu_mul
from .layers import RotaryEmbedding
from .native import NativeDiffusionLM, RMSNorm, attend, check_attention


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
        check_attention(self)
        super().__post_init__(**kwargs)


class TinyAttention(nn.Module):
    def __init__(self, config: TinyMDMConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.h, self.h_kv = config.num_attention_heads, config.num_key_value_heads
        d = config.hidden_size // config.num_attention_heads
        self.q_proj = nn.Linear(config.hidden_size, self.h * d, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, self.h_kv * d, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, self.h_kv * d, bias=False)
        self.o_proj = nn.Linear(self.h * d, config.hidden_size, bias=False)

    def forward(self, x, rope, mask, cache, cache_start, kv_len, cache_rows):
        h = attend(
            x,
            self.q_proj,
            self.k_proj,
            self.v_proj,
            self.h,
            self.h_kv,
            rope,
            mask,
            self.layer,
            cache,
            cache_start,
            kv_len,
            cache_rows,
        )
        return self.o_proj(h)


class TinyMLP(nn.Module):
    def __init__(self, config: TinyMDMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class TinyBlock(GradientCheckpointingLayer):
    def __init__(self, config: TinyMDMConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = TinyAttention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = TinyMLP(config)

    def forward(self, x, rope, mask, cache=None, cache_start=0, kv_len=None, cache_rows=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, cache_start, kv_len, cache_rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyMDM(NativeDiffusionLM):
    """Mask predictor: logits[b, i] is the distribution of token i given the (partially masked) input.

    The forward is the protocol forward of `models.native.NativeDiffusionLM` (shared with LLaDA and Dream).
    """

    config_class = TinyMDMConfig
    _no_split_modules = ["TinyBlock"]

    def __init__(self, config: TinyMDMConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList([TinyBlock(config, i) for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary = RotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed_tokens

    def set_input_embeddings(self, value):
        self.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def _embed(self, input_ids):
        return self.embed_tokens(input_ids)

    def _blocks(self):
        return self.layers

    def _final_norm(self, x):
        return self.norm(x)

    def _head(self, x):
        return self.lm_head(x)

    def _geometry(self):
        c = self.config
        return c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
