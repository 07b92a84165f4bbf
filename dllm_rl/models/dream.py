"""Dream 7B (Diffusion REAsoning Model, arXiv 2508.15487), native.

Checkpoint-compatible with Dream-org/Dream-v0-Instruct-7B and Dream-v0-Base-7B (and models with the same
layout, e.g. DiffuCoder): the published config.json (model_type "Dream", Qwen2-style keys) and safetensors
load as they are, under the published parameter names:

    model.embed_tokens.weight                              [vocab_size, hidden_size]
    model.layers.{i}.input_layernorm.weight, .post_attention_layernorm.weight   [hidden_size]
    model.layers.{i}.self_attn.q_proj.weight / .bias       [H * head_dim, hidden_size] / [H * head_dim]
    model.layers.{i}.self_attn.k_proj.weight / .bias       [H_kv * head_dim, hidden_size] / [H_kv * head_dim]
    model.layers.{i}.self_attn.v_proj.weight / .bias       (as k_proj)
    model.layers.{i}.self_attn.o_proj.weight               [hidden_size, H * head_dim]   (no bias)
    model.layers.{i}.mlp.gate_proj.weight, .up_proj.weight [intermediate_size, hidden_size]
    model.layers.{i}.mlp.down_proj.weight                  [hidden_size, intermediate_size]
    model.norm.weight                                      [hidden_size]
    lm_head.weight                                         [vocab_size, hidden_size]

The architecture is Qwen2.5-7B's (Dream is initialised from it), run without a causal mask: RMSNorm (eps 1e-6,
float32 normalisation), RoPE (theta 1e6, cos/sin cast to the activation dtype), grouped-query attention with
q/k/v biases, MLP `down(silu(gate(x)) * up(x))`. The [MASK] token is 151666.

Dream keeps the autoregressive convention of its initialisation: the logit at position i - 1 predicts token i.
The model does not shift anything itself; it returns logits for the requested `logits_range` like every
native model, and declares the shift as `config.logits_shift = 1` (read by `models.base.traits`), which the
rollout engine and the estimators apply through their `logits_range` offsets.

Departures: only the default RoPE without sliding-window attention is implemented (what the released models
use); other values raise. Attention dropout is not applied (released configs: 0). `attention` / `block_size`
(defaults: bidirectional, none) and `logits_shift` are added config fields; published configs load unchanged.
"""

from __future__ import annotations

from typing import ClassVar

from torch import nn
from transformers import PreTrainedConfig
from transformers.modeling_layers import GradientCheckpointingLayer

from ..kernels import silu_mul
from .layers import RotaryEmbedding
from .native import NativeDiffusionLM, RMSNorm, attend, check_attention


class DreamConfig(PreTrainedConfig):
    """The published Dream config keys; defaults are those of Dream-v0-Instruct-7B's config.json."""

    model_type = "Dream"

    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int | None = 4
    hidden_act: str = "silu"
    max_position_embeddings: int = 131072
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = False
    tie_word_embeddings: bool = False
    rope_theta: float = 1000000.0
    use_sliding_window: bool = False
    sliding_window: int | None = None
    max_window_layers: int = 28
    attention_dropout: float = 0.0
    mask_token_id: int | None = 151666
    pad_token_id: int | None = 151643
    bos_token_id: int | None = 151643
    eos_token_id: int | None = 151643
    logits_shift: int = 1  # logits[i - 1] predicts token i (not a published key)
    attention: str = "bidirectional"  # "bidirectional" | "block_causal" (not a published key)
    block_size: int | None = None  # block length of block-causal attention (not a published key)

    def __post_init__(self, **kwargs):
        # Published configs carry `rope_scaling: null`; transformers 5 deprecates the key, and only the default
        # RoPE is implemented here, so it is checked and dropped rather than stored.
        rope_scaling = kwargs.pop("rope_scaling", None)
        if rope_scaling and rope_scaling.get("rope_type", rope_scaling.get("type")) != "default":
            raise ValueError(
                "dllm_rl's native Dream (registered for model_type 'Dream') implements the default "
                f"RoPE only, got rope_scaling={rope_scaling}"
            )
        if self.use_sliding_window or self.hidden_act != "silu":
            raise ValueError(
                "dllm_rl's native Dream (registered for model_type 'Dream') implements full "
                f"attention and SiLU gating only, got use_sliding_window={self.use_sliding_window}, "
                f"hidden_act={self.hidden_act!r}"
            )
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_attention(self)
        super().__post_init__(**kwargs)


class DreamAttention(nn.Module):
    def __init__(self, c: DreamConfig, layer: int):
        super().__init__()
        self.layer, self.heads, self.kv_heads = layer, c.num_attention_heads, c.num_key_value_heads
        head_dim = c.hidden_size // c.num_attention_heads
        self.q_proj = nn.Linear(c.hidden_size, self.heads * head_dim, bias=True)
        self.k_proj = nn.Linear(c.hidden_size, self.kv_heads * head_dim, bias=True)
        self.v_proj = nn.Linear(c.hidden_size, self.kv_heads * head_dim, bias=True)
        self.o_proj = nn.Linear(self.heads * head_dim, c.hidden_size, bias=False)

    def forward(self, x, rope, mask, cache, cache_start, kv_len, cache_rows):
        h = attend(
            x,
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
        return self.o_proj(h)


class DreamMLP(nn.Module):
    def __init__(self, c: DreamConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=False)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(silu_mul(self.gate_proj(x), self.up_proj(x)))


class DreamDecoderLayer(GradientCheckpointingLayer):
    def __init__(self, c: DreamConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.self_attn = DreamAttention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps)
        self.mlp = DreamMLP(c)

    def forward(self, x, rope, mask, cache=None, cache_start=0, kv_len=None, cache_rows=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, mask, cache, cache_start, kv_len, cache_rows)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamBackbone(nn.Module):
    """The reference's DreamBaseModel: embeddings, decoder layers, final norm (parameter prefix `model.`)."""

    def __init__(self, c: DreamConfig):
        super().__init__()
        # The reference gives the embedding padding_idx = pad_token_id (its row gets no gradient); kept so that
        # fine-tuning matches, when the pad id lies inside the vocabulary.
        pad = c.pad_token_id if c.pad_token_id is not None and 0 <= c.pad_token_id < c.vocab_size else None
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size, padding_idx=pad)
        self.layers = nn.ModuleList([DreamDecoderLayer(c, i) for i in range(c.num_hidden_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps)


class DreamModel(NativeDiffusionLM):
    """Dream mask predictor. Logits are shifted: logits[b, i - 1] is the distribution of token i."""

    config_class = DreamConfig
    _no_split_modules: ClassVar[list[str]] = ["DreamDecoderLayer"]
    # applied by transformers only when config.tie_word_embeddings (False in the released models)
    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DreamConfig):
        super().__init__(config)
        self.model = DreamBackbone(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(config.hidden_size // config.num_attention_heads, config.rope_theta)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.embed_tokens

    def set_input_embeddings(self, value):
        self.model.embed_tokens = value

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, value):
        self.lm_head = value

    def _embed(self, input_ids):
        return self.model.embed_tokens(input_ids)

    def _blocks(self):
        return self.model.layers

    def _final_norm(self, x):
        return self.model.norm(x)

    def _head(self, x):
        return self.lm_head(x)

    def _geometry(self):
        c = self.config
        return c.num_hidden_layers, c.num_key_value_heads, c.hidden_size // c.num_attention_heads


__all__ = ["DreamConfig", "DreamModel"]
