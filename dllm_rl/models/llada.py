"""LLaDA (Large Language Diffusion with mAsking, arXiv 2502.09992; LLaDA 1.5, arXiv 2505.19223), native.

Checkpoint-compatible with GSAI-ML/LLaDA-8B-Instruct, LLaDA-8B-Base and LLaDA-1.5: the published config.json
(model_type "llada", OLMo-style keys such as d_model / n_heads / mlp_hidden_size) and safetensors load as they
are, under the published parameter names:

    model.transformer.wte.weight                 [embedding_size, d_model]
    model.transformer.blocks.{i}.attn_norm.weight, .ff_norm.weight                   [d_model]
    model.transformer.blocks.{i}.q_proj.weight   [d_model, d_model]
    model.transformer.blocks.{i}.k_proj.weight, .v_proj.weight   [n_kv_heads * head_dim, d_model]
    model.transformer.blocks.{i}.attn_out.weight [d_model, d_model]
    model.transformer.blocks.{i}.ff_proj.weight, .up_proj.weight [mlp_hidden_size, d_model]
    model.transformer.blocks.{i}.ff_out.weight   [d_model, mlp_hidden_size]
    model.transformer.ln_f.weight                [d_model]
    model.transformer.ff_out.weight              [embedding_size, d_model]   (absent when weight_tying)

The maths of the "llama" block of the reference: pre-norm RMSNorm (eps = rms_norm_eps, float32 normalisation),
RoPE (theta 500000 for the 8B models) applied in float32 when `rope_full_precision`, bidirectional attention
scaled by 1/sqrt(head_dim), MLP `ff_out(silu(ff_proj(x)) * up_proj(x))`, no biases in the 8B models, untied
output head. The [MASK] token is 126336 (`config.mask_token_id`).

Departures: only the configuration the released models use is implemented (block_type "llama", RoPE, RMS
norms, SiLU gating, no QK-norm, block_group_size 1); other values of those keys raise. Dropout is not applied
(the released configs set every dropout to 0). `attention` / `block_size` are added (defaults: bidirectional,
none) for block-causal fine-tuning; published configs load unchanged. The LLaDA-MoE models are a different
architecture (a Qwen-MoE-style layout with routed experts) and are not covered here.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from ..kernels import silu_mul
from .layers import RotaryEmbedding
from .native import NativeDiffusionLM, RMSNorm, attend, check_attention


class LLaDAConfig(PreTrainedConfig):
    """The published LLaDA config keys; defaults are those of LLaDA-8B-Instruct's config.json."""

    model_type = "llada"
    attribute_map: ClassVar[dict[str, str]] = {
        "hidden_size": "d_model",
        "num_attention_heads": "n_heads",
        "num_hidden_layers": "n_layers",
        "max_position_embeddings": "max_sequence_length",
        "intermediate_size": "mlp_hidden_size",
    }

    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = 32
    n_layers: int = 32
    mlp_ratio: int = 4
    mlp_hidden_size: int | None = 12288
    activation_type: str = "silu"
    block_type: str = "llama"
    block_group_size: int = 1
    alibi: bool = False
    alibi_bias_max: float = 8.0
    rope: bool = True
    rope_full_precision: bool = True
    flash_attention: bool = False
    attention_dropout: float = 0.0
    multi_query_attention: bool | None = None
    attention_layer_norm: bool = False
    attention_layer_norm_with_affine: bool = True
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0
    input_emb_norm: bool = False
    layer_norm_type: str = "rms"
    layer_norm_with_affine: bool = True
    rms_norm_eps: float = 1e-5
    max_sequence_length: int = 4096
    rope_theta: float = 500000.0
    include_qkv_bias: bool | None = False
    include_bias: bool = False
    bias_for_layer_norm: bool | None = False
    scale_logits: bool = False
    vocab_size: int = 126464
    embedding_size: int | None = 126464
    weight_tying: bool = False
    eos_token_id: int | None = 126081
    pad_token_id: int | None = 126081
    mask_token_id: int | None = 126336
    init_device: str | None = "meta"
    init_fn: str = "mitchell"
    init_std: float = 0.02
    init_cutoff_factor: float | None = None
    precision: str | None = "amp_bf16"
    use_cache: bool = False
    attention: str = "bidirectional"  # "bidirectional" | "block_causal" (not a published key)
    block_size: int | None = None  # block length of block-causal attention (not a published key)

    def __post_init__(self, **kwargs):
        check_attention(self)
        unsupported = [
            f"{key}={getattr(self, key)!r} (supported: {ok!r})"
            for key, ok in _SUPPORTED.items()
            if getattr(self, key) != ok
        ]
        if unsupported:
            raise ValueError(
                "dllm_rl's native LLaDA (registered for model_type 'llada') implements the released "
                f"LLaDA-8B configuration only; unsupported: {', '.join(unsupported)}"
            )
        super().__post_init__(**kwargs)


_SUPPORTED = {
    "block_type": "llama",
    "rope": True,
    "alibi": False,
    "layer_norm_type": "rms",
    "activation_type": "silu",
    "attention_layer_norm": False,
    "block_group_size": 1,
    "layer_norm_with_affine": True,
}


def kv_heads(c: LLaDAConfig) -> int:
    """Key/value heads as the reference resolves them (n_kv_heads, else 1 for multi-query, else n_heads)."""
    if c.n_kv_heads is not None:
        return c.n_kv_heads
    return 1 if c.multi_query_attention else c.n_heads


def _norm(c: LLaDAConfig) -> RMSNorm:
    bias = c.include_bias if c.bias_for_layer_norm is None else c.bias_for_layer_norm
    return RMSNorm(c.d_model, c.rms_norm_eps, bias=bool(bias))


class LLaDABlock(GradientCheckpointingLayer):
    """One "llama" block: x + attn_out(attn(attn_norm(x))), then + ff_out(silu(ff_proj(h)) * up_proj(h))."""

    def __init__(self, c: LLaDAConfig, layer: int):
        super().__init__()
        self.layer, self.heads, self.kv_heads = layer, c.n_heads, kv_heads(c)
        head_dim = c.d_model // c.n_heads
        ff = c.mlp_hidden_size if c.mlp_hidden_size is not None else c.mlp_ratio * c.d_model
        qkv_bias = bool(c.include_bias or c.include_qkv_bias)
        self.attn_norm = _norm(c)
        self.q_proj = nn.Linear(c.d_model, c.d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(c.d_model, self.kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(c.d_model, self.kv_heads * head_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(c.d_model, c.d_model, bias=c.include_bias)
        self.ff_norm = _norm(c)
        self.ff_proj = nn.Linear(c.d_model, ff, bias=c.include_bias)  # the gate
        self.up_proj = nn.Linear(c.d_model, ff, bias=c.include_bias)
        self.ff_out = nn.Linear(ff, c.d_model, bias=c.include_bias)

    def forward(self, x, rope, mask, cache=None, cache_start=0, kv_len=None, cache_rows=None):
        h = attend(
            self.attn_norm(x),
            self.q_proj,
            self.k_proj,
            self.v_proj,
            self.heads,
            self.kv_heads,
            rope,
            mask,
            self.layer,
            cache,
            cache_start,
            kv_len,
            cache_rows,
        )
        x = x + self.attn_out(h)
        h = self.ff_norm(x)
        return x + self.ff_out(silu_mul(self.ff_proj(h), self.up_proj(h)))


class LLaDABackbone(nn.Module):
    """Holds the `transformer` dict of the reference's LLaDAModel, so parameter names match the release."""

    def __init__(self, c: LLaDAConfig):
        super().__init__()
        vocab = c.embedding_size or c.vocab_size
        self.transformer = nn.ModuleDict(
            {
                "wte": nn.Embedding(vocab, c.d_model),
                "blocks": nn.ModuleList([LLaDABlock(c, i) for i in range(c.n_layers)]),
                "ln_f": _norm(c),
            }
        )
        if not c.weight_tying:
            self.transformer["ff_out"] = nn.Linear(c.d_model, vocab, bias=c.include_bias)


class LLaDAModelLM(NativeDiffusionLM):
    """LLaDA mask predictor: logits[b, i] is the distribution of token i given the partially masked input."""

    config_class = LLaDAConfig
    _no_split_modules: ClassVar[list[str]] = ["LLaDABlock"]

    def __init__(self, config: LLaDAConfig):
        super().__init__(config)
        self.model = LLaDABackbone(config)
        self.rotary = RotaryEmbedding(config.d_model // config.n_heads, config.rope_theta)
        self.post_init()

    @property
    def rope_fp32(self) -> bool:
        return bool(self.config.rope_full_precision)

    def get_input_embeddings(self):
        return self.model.transformer.wte

    def set_input_embeddings(self, value):
        self.model.transformer.wte = value

    def get_output_embeddings(self):
        t = self.model.transformer
        return t.wte if self.config.weight_tying else t.ff_out

    def _embed(self, input_ids):
        x = self.model.transformer.wte(input_ids)
        return x * math.sqrt(self.config.d_model) if self.config.input_emb_norm else x

    def _blocks(self):
        return self.model.transformer.blocks

    def _final_norm(self, x):
        return self.model.transformer.ln_f(x)

    def _head(self, x):
        t = self.model.transformer
        logits = F.linear(x, t.wte.weight) if self.config.weight_tying else t.ff_out(x)
        return logits / math.sqrt(self.config.d_model) if self.config.scale_logits else logits

    def _geometry(self):
        c = self.config
        return c.n_layers, kv_heads(c), c.d_model // c.n_heads


__all__ = ["LLaDAConfig", "LLaDAModelLM"]
