"""Native LLaDA and Dream: published checkpoint layout, maths against plain reference implementations, the
protocol (masks, cache, logits_range), Auto loading of published-style directories, LoRA, gradient
checkpointing; and the HF wrapper for remote-code dLLMs.

The expected parameter layouts are those of the public releases: GSAI-ML/LLaDA-8B-Instruct
(model.safetensors.index.json: 9 tensors per block, total_size 16,031,162,368 bytes in bf16) and
Dream-org/Dream-v0-Instruct-7B (Qwen2.5-7B layout, 12 tensors per layer).
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import DREAM_SMALL, LLADA_SMALL, small_native
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM

import dllm_rl  # noqa: F401  (Auto registration)
from dllm_rl.errors import DllmRlError
from dllm_rl.models import DreamConfig, DreamModel, HFDiffusionLM, LLaDAConfig, LLaDAModelLM, traits
from dllm_rl.models.hf import follows_protocol
from dllm_rl.models.load import wrap_if_needed
from dllm_rl.models.masks import block_ids, mask_from_block_ids

# --------------------------------------------------------------------------------------- published layouts

LLADA_8B_LAYER0 = {  # GSAI-ML/LLaDA-8B-Instruct, name -> shape
    "model.transformer.blocks.0.attn_norm.weight": (4096,),
    "model.transformer.blocks.0.q_proj.weight": (4096, 4096),
    "model.transformer.blocks.0.k_proj.weight": (4096, 4096),
    "model.transformer.blocks.0.v_proj.weight": (4096, 4096),
    "model.transformer.blocks.0.attn_out.weight": (4096, 4096),
    "model.transformer.blocks.0.ff_norm.weight": (4096,),
    "model.transformer.blocks.0.ff_proj.weight": (12288, 4096),
    "model.transformer.blocks.0.up_proj.weight": (12288, 4096),
    "model.transformer.blocks.0.ff_out.weight": (4096, 12288),
}
LLADA_8B_OTHER = {
    "model.transformer.wte.weight": (126464, 4096),
    "model.transformer.ln_f.weight": (4096,),
    "model.transformer.ff_out.weight": (126464, 4096),
}
DREAM_7B_LAYER0 = {  # Dream-org/Dream-v0-Instruct-7B, name -> shape
    "model.layers.0.input_layernorm.weight": (3584,),
    "model.layers.0.self_attn.q_proj.weight": (3584, 3584),
    "model.layers.0.self_attn.q_proj.bias": (3584,),
    "model.layers.0.self_attn.k_proj.weight": (512, 3584),
    "model.layers.0.self_attn.k_proj.bias": (512,),
    "model.layers.0.self_attn.v_proj.weight": (512, 3584),
    "model.layers.0.self_attn.v_proj.bias": (512,),
    "model.layers.0.self_attn.o_proj.weight": (3584, 3584),
    "model.layers.0.post_attention_layernorm.weight": (3584,),
    "model.layers.0.mlp.gate_proj.weight": (18944, 3584),
    "model.layers.0.mlp.up_proj.weight": (18944, 3584),
    "model.layers.0.mlp.down_proj.weight": (3584, 18944),
}
DREAM_7B_OTHER = {
    "model.embed_tokens.weight": (152064, 3584),
    "model.norm.weight": (3584,),
    "lm_head.weight": (152064, 3584),
}

# The published config.json files (key sets and values of the releases), used with small sizes below.
LLADA_PUBLISHED = {
    "activation_type": "silu",
    "alibi": False,
    "alibi_bias_max": 8.0,
    "architectures": ["LLaDAModelLM"],
    "attention_dropout": 0.0,
    "attention_layer_norm": False,
    "attention_layer_norm_with_affine": True,
    "auto_map": {
        "AutoConfig": "configuration_llada.LLaDAConfig",
        "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM",
        "AutoModel": "modeling_llada.LLaDAModelLM",
    },
    "bias_for_layer_norm": False,
    "block_group_size": 1,
    "block_type": "llama",
    "d_model": 4096,
    "embedding_dropout": 0.0,
    "embedding_size": 126464,
    "eos_token_id": 126081,
    "flash_attention": False,
    "include_bias": False,
    "include_qkv_bias": False,
    "init_cutoff_factor": None,
    "init_device": "meta",
    "init_fn": "mitchell",
    "init_std": 0.02,
    "input_emb_norm": False,
    "layer_norm_type": "rms",
    "layer_norm_with_affine": True,
    "mask_token_id": 126336,
    "max_sequence_length": 4096,
    "mlp_hidden_size": 12288,
    "mlp_ratio": 4,
    "model_type": "llada",
    "multi_query_attention": None,
    "n_heads": 32,
    "n_kv_heads": 32,
    "n_layers": 32,
    "pad_token_id": 126081,
    "precision": "amp_bf16",
    "residual_dropout": 0.0,
    "rms_norm_eps": 1e-05,
    "rope": True,
    "rope_full_precision": True,
    "rope_theta": 500000.0,
    "scale_logits": False,
    "transformers_version": "4.46.3",
    "use_cache": False,
    "vocab_size": 126464,
    "weight_tying": False,
}
DREAM_PUBLISHED = {
    "architectures": ["DreamModel"],
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
    "bos_token_id": 151643,
    "eos_token_id": 151643,
    "hidden_act": "silu",
    "hidden_size": 3584,
    "initializer_range": 0.02,
    "intermediate_size": 18944,
    "mask_token_id": 151666,
    "max_position_embeddings": 131072,
    "max_window_layers": 28,
    "model_type": "Dream",
    "num_attention_heads": 28,
    "num_hidden_layers": 28,
    "num_key_value_heads": 4,
    "pad_token_id": 151643,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 1000000.0,
    "sliding_window": None,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.46.2",
    "use_cache": False,
    "use_sliding_window": False,
    "vocab_size": 152064,
}


def llada_layout(c: dict) -> dict:
    d, hd, kv, ff = c["d_model"], c["d_model"] // c["n_heads"], c["n_kv_heads"], c["mlp_hidden_size"]
    per_layer = {
        "attn_norm.weight": (d,),
        "q_proj.weight": (d, d),
        "k_proj.weight": (kv * hd, d),
        "v_proj.weight": (kv * hd, d),
        "attn_out.weight": (d, d),
        "ff_norm.weight": (d,),
        "ff_proj.weight": (ff, d),
        "up_proj.weight": (ff, d),
        "ff_out.weight": (d, ff),
    }
    out = {f"model.transformer.blocks.{i}.{k}": s for i in range(c["n_layers"]) for k, s in per_layer.items()}
    V = c["embedding_size"]
    return {
        **out,
        "model.transformer.wte.weight": (V, d),
        "model.transformer.ln_f.weight": (d,),
        "model.transformer.ff_out.weight": (V, d),
    }


def dream_layout(c: dict) -> dict:
    d, hd, ff = c["hidden_size"], c["hidden_size"] // c["num_attention_heads"], c["intermediate_size"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    per_layer = {
        "input_layernorm.weight": (d,),
        "self_attn.q_proj.weight": (q, d),
        "self_attn.q_proj.bias": (q,),
        "self_attn.k_proj.weight": (kv, d),
        "self_attn.k_proj.bias": (kv,),
        "self_attn.v_proj.weight": (kv, d),
        "self_attn.v_proj.bias": (kv,),
        "self_attn.o_proj.weight": (d, q),
        "post_attention_layernorm.weight": (d,),
        "mlp.gate_proj.weight": (ff, d),
        "mlp.up_proj.weight": (ff, d),
        "mlp.down_proj.weight": (d, ff),
    }
    out = {f"model.layers.{i}.{k}": s for i in range(c["num_hidden_layers"]) for k, s in per_layer.items()}
    V = c["vocab_size"]
    return {**out, "model.embed_tokens.weight": (V, d), "model.norm.weight": (d,), "lm_head.weight": (V, d)}


# ----------------------------------------------------------------------- plain reference implementations


def _rms(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, theta):  # x [B, H, L, D], positions 0..L-1; (x1, x2) halves rotated by angle pos * theta^(-2j/D)
    D, L = x.shape[-1], x.shape[2]
    ang = torch.arange(L).float()[:, None] * theta ** (-torch.arange(0, D, 2).float() / D)[None]  # [L, D/2]
    cos, sin = ang.cos(), ang.sin()
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)


def _attention(q, k, v, heads, kv_heads, theta, allowed):
    B, L, _ = q.shape
    D = q.shape[-1] // heads
    q = _rope(q.view(B, L, heads, D).transpose(1, 2), theta)
    k = _rope(k.view(B, L, kv_heads, D).transpose(1, 2), theta).repeat_interleave(heads // kv_heads, 1)
    v = v.view(B, L, kv_heads, D).transpose(1, 2).repeat_interleave(heads // kv_heads, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(D)  # [B, H, L, L]
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2).reshape(B, L, heads * D)


def llada_reference(p: dict, c: dict, ids, allowed=None):
    eps, x = c["rms_norm_eps"], p["model.transformer.wte.weight"][ids]
    for i in range(c["n_layers"]):
        w = {k.split(f"blocks.{i}.")[1]: t for k, t in p.items() if f"blocks.{i}." in k}
        h = _rms(x, w["attn_norm.weight"], eps)
        a = _attention(
            h @ w["q_proj.weight"].T,
            h @ w["k_proj.weight"].T,
            h @ w["v_proj.weight"].T,
            c["n_heads"],
            c["n_kv_heads"],
            c["rope_theta"],
            allowed,
        )
        x = x + a @ w["attn_out.weight"].T
        h = _rms(x, w["ff_norm.weight"], eps)
        x = x + (F.silu(h @ w["ff_proj.weight"].T) * (h @ w["up_proj.weight"].T)) @ w["ff_out.weight"].T
    return _rms(x, p["model.transformer.ln_f.weight"], eps) @ p["model.transformer.ff_out.weight"].T


def dream_reference(p: dict, c: dict, ids, allowed=None):
    eps, x = c["rms_norm_eps"], p["model.embed_tokens.weight"][ids]
    for i in range(c["num_hidden_layers"]):
        w = {k.split(f"layers.{i}.")[1]: t for k, t in p.items() if f"layers.{i}." in k}
        h = _rms(x, w["input_layernorm.weight"], eps)
        q, k, v = (h @ w[f"self_attn.{n}.weight"].T + w[f"self_attn.{n}.bias"] for n in ("q_proj", "k_proj", "v_proj"))
        a = _attention(q, k, v, c["num_attention_heads"], c["num_key_value_heads"], c["rope_theta"], allowed)
        x = x + a @ w["self_attn.o_proj.weight"].T
        h = _rms(x, w["post_attention_layernorm.weight"], eps)
        gated = F.silu(h @ w["mlp.gate_proj.weight"].T) * (h @ w["mlp.up_proj.weight"].T)
        x = x + gated @ w["mlp.down_proj.weight"].T
    return _rms(x, p["model.norm.weight"], eps) @ p["lm_head.weight"].T


ARCHS = {
    "llada": (LLaDAConfig, LLaDAModelLM, LLADA_PUBLISHED, LLADA_SMALL, llada_layout, llada_reference),
    "dream": (DreamConfig, DreamModel, DREAM_PUBLISHED, DREAM_SMALL, dream_layout, dream_reference),
}


def published_dir(arch, path, seed=0):
    """A directory as the release ships it (config.json with auto_map, safetensors under published names),
    with small sizes and random weights; returns (params, full config dict)."""
    _, _, published, small_cfg, layout, _ = ARCHS[arch]
    cfg = {**published, **small_cfg}
    g = torch.Generator().manual_seed(seed)
    params = {
        k: (1.0 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else 0.2 * torch.randn(s, generator=g)
        for k, s in layout(cfg).items()
    }
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(params, str(path / "model.safetensors"), metadata={"format": "pt"})
    return params, cfg


# ------------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_real_config_layout_matches_release(arch):
    cfg_cls, model_cls, published, _, layout, _ = ARCHS[arch]
    layer0, other, per_layer, total = {
        "llada": (LLADA_8B_LAYER0, LLADA_8B_OTHER, 9, 8_015_581_184),
        "dream": (DREAM_7B_LAYER0, DREAM_7B_OTHER, 12, 7_615_616_512),
    }[arch]
    config = cfg_cls(**{k: v for k, v in published.items() if k not in ("model_type", "transformers_version")})
    with torch.device("meta"):
        model = model_cls(config)
    got = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    assert {n: s for n, s in got.items() if "layers.0." in n or "blocks.0." in n} == layer0
    assert {n: s for n, s in got.items() if "layers." not in n and "blocks." not in n} == other
    n_layers = published.get("n_layers", published.get("num_hidden_layers"))
    assert len(got) == per_layer * n_layers + len(other)
    assert got == layout(published)
    assert sum(p.numel() for p in model.parameters()) == total


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_forward_shapes(arch, attention):
    m = small_native(arch, attention=attention, block_size=4)
    x = torch.randint(2, 60, (3, 11))
    out = m(x, output_hidden_states=True)
    assert out.logits.shape == (3, 11, 64)
    assert len(out.hidden_states) == 3 and out.hidden_states[-1].shape == (3, 11, 32)
    assert m(x, logits_range=(4, 9)).logits.shape == (3, 5, 64)
    torch.testing.assert_close(m(x, logits_range=(4, 9)).logits, out.logits[:, 4:9])


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_block_causal_hides_later_blocks(arch):
    m = small_native(arch, attention="block_causal", block_size=4)
    P = 5
    x = torch.randint(2, 60, (2, P + 12))
    bid = block_ids(torch.ones_like(x), P, 4)
    mask = mask_from_block_ids(bid, bid, causal_blocks=True)
    y = x.clone()
    y[:, P + 8 :] = torch.randint(2, 60, (2, 4))  # perturb the last block
    base, pert = m(x, attention_mask=mask).logits, m(y, attention_mask=mask).logits
    torch.testing.assert_close(base[:, : P + 8], pert[:, : P + 8], rtol=0, atol=0)
    assert not torch.allclose(base[:, P + 8 :], pert[:, P + 8 :])
    # without a mask, block-causal models use blocks of block_size positions; bidirectional ones see everything
    z = x.clone()
    z[:, -1] = (z[:, -1] + 1) % 60
    torch.testing.assert_close(m(x).logits[:, :16], m(z).logits[:, :16], rtol=0, atol=0)
    b = small_native(arch)
    assert not torch.allclose(b(x).logits[:, 0], b(z).logits[:, 0])


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_matches_plain_reference_from_published_checkpoint(arch, tmp_path):
    """A release-style directory (auto_map included) loads into the native class, with or without
    trust_remote_code, and computes what a plain implementation of the published maths computes."""
    params, cfg = published_dir(arch, tmp_path)
    reference = ARCHS[arch][5]
    x = torch.randint(2, 60, (2, 9))
    attn = torch.ones_like(x)
    attn[1, :3] = 0  # left padding in row 1
    allowed = attn.bool()[:, None, None, :]
    want = reference(params, cfg, x, allowed)
    for cls, trust in [(AutoModel, None), (AutoModel, True), (AutoModelForMaskedLM, False)]:
        model = cls.from_pretrained(tmp_path, dtype=torch.float32, trust_remote_code=trust).eval()
        assert type(model) is ARCHS[arch][1]
        torch.testing.assert_close(model(x, attention_mask=attn).logits, want, rtol=1e-4, atol=1e-4)
    assert traits(model).mask_token_id == cfg["mask_token_id"]
    assert traits(model).logits_shift == (1 if arch == "dream" else 0)
    assert traits(model).supports_cache and traits(model).attention == "bidirectional"


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_cached_block_equals_full_forward(arch):
    """Write the whole canvas into the cache, then forward one block against it: same logits."""
    m = small_native(arch)
    P, L = 6, 14
    x = torch.randint(2, 60, (2, L))
    full = m(x).logits
    cache = m.new_cache(2, L)
    torch.testing.assert_close(m(x, kv_cache=cache, cache_start=0, kv_len=L).logits, full)
    block = m(x[:, P : P + 4], kv_cache=cache, cache_start=P, kv_len=L).logits
    torch.testing.assert_close(block, full[:, P : P + 4], rtol=1e-5, atol=1e-5)
    # one row of the batch only (cache_rows), as the engine does for rows still decoding
    row = m(x[1:, P : P + 4], kv_cache=cache, cache_start=P, kv_len=L, cache_rows=torch.tensor([1])).logits
    torch.testing.assert_close(row, full[1:, P : P + 4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_block_causal_cache_equals_recompute(arch):
    m = small_native(arch, attention="block_causal", block_size=4)
    P, Lc = 6, 8
    x = torch.randint(2, 60, (2, P + Lc))
    bid = block_ids(torch.ones_like(x), P, 4)
    full = m(x, attention_mask=mask_from_block_ids(bid, bid, True)).logits
    cache = m.new_cache(2, P + Lc)
    pieces = []
    for lo, hi in [(0, P), (P, P + 4), (P + 4, P + 8)]:
        mask = mask_from_block_ids(bid[:, lo:hi], bid[:, :hi], True)
        pieces.append(m(x[:, lo:hi], attention_mask=mask, kv_cache=cache, cache_start=lo, kv_len=hi).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)
    with pytest.raises(DllmRlError, match="explicit 4-D attention mask"):
        m(x[:, P : P + 4], kv_cache=cache, cache_start=P, kv_len=P + 4)


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_save_load_round_trip_is_exact(arch, tmp_path):
    m = small_native(arch, attention="block_causal", block_size=4)
    m.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == {"llada": "llada", "dream": "Dream"}[arch]
    x = torch.randint(2, 60, (2, 10))
    for cls in (AutoModel, AutoModelForMaskedLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert type(loaded) is type(m) and loaded.config.attention == "block_causal"
        assert torch.equal(loaded(x).logits, m(x).logits)


LORA_TARGETS = {
    # a regex, so that the per-block ff_out is adapted and the LM head model.transformer.ff_out is not
    "llada": r".*blocks\.\d+\.(q_proj|k_proj|v_proj|attn_out|ff_proj|up_proj|ff_out)",
    "dream": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


@pytest.mark.parametrize("arch", ["llada", "dream"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_forward_backward(arch, checkpointing):
    from peft import LoraConfig, get_peft_model

    base = small_native(arch)
    if checkpointing:  # frozen embeddings: the checkpointed blocks must still pass gradients to LoRA
        base.activation_checkpointing_enable()
    m = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=LORA_TARGETS[arch]))
    adapted = {n.split(".lora_A")[0] for n, _ in m.named_parameters() if "lora_A" in n}
    assert len(adapted) == 7 * 2  # 7 projections x 2 layers, LM head excluded
    m.train()
    x = torch.randint(2, 60, (2, 9))
    m(input_ids=x).logits.logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in m.named_parameters() if p.requires_grad}
    assert grads and all("lora_" in n for n in grads)
    # lora_B starts at zero, so at the first step only it receives a gradient
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if "lora_B" in n)
    assert traits(m).supports_cache


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_gradient_checkpointing_matches_plain_backward(arch):
    x = torch.randint(2, 60, (2, 9))
    grads = []
    for ckpt in (False, True):
        m = small_native(arch, seed=1).train()
        if ckpt:
            m.activation_checkpointing_enable()  # transformers 5's name for gradient_checkpointing_enable
            assert all(b.gradient_checkpointing for b in m._blocks())
        m(x).logits.logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-6)


def test_unsupported_published_variants_are_refused():
    with pytest.raises(ValueError, match="block_type='sequential'"):
        LLaDAConfig(**{**LLADA_SMALL, "block_type": "sequential"})
    with pytest.raises(ValueError, match="block_size"):
        DreamConfig(**DREAM_SMALL, attention="block_causal")
    with pytest.raises(ValueError, match="default RoPE"):
        DreamConfig(**DREAM_SMALL, rope_scaling={"rope_type": "yarn", "factor": 4.0})


@pytest.mark.parametrize("arch", ["llada", "dream"])
def test_rollout_engine_runs_native_models(arch, tokenizer):
    """The engine decodes with both models, with and without the cache (Dream's shift included)."""
    from dllm_rl.config import RolloutConfig
    from dllm_rl.rollout.engine import generate

    over = {
        "vocab_size": len(tokenizer),
        "mask_token_id": tokenizer.mask_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    if arch == "llada":
        over["embedding_size"] = len(tokenizer)
    m = small_native(arch, **over)
    prompts = ["1+2=", "hello there"]
    outs = {}
    for cache in ("none", "prefix"):
        cfg = RolloutConfig(max_completion_length=8, steps=8, block_length=4, temperature=0.0, cache=cache)
        outs[cache] = generate(m, tokenizer, prompts, cfg, generator=torch.Generator().manual_seed(0))
        assert outs[cache].completion_ids.shape == (2, 8)
        assert not (outs[cache].completion_ids == tokenizer.mask_token_id).any()


# ------------------------------------------------------------------------------ remote-code models (hf.py)

TOY_CONFIG = """
from transformers import PreTrainedConfig


class ToyDLMConfig(PreTrainedConfig):
    model_type = "toy_remote_dlm"
    vocab_size: int = 64
    hidden_size: int = 16
    mask_token_id: int | None = 63
"""
TOY_MODEL = """
import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_toy import ToyDLMConfig


class ToyDLM(PreTrainedModel):
    config_class = ToyDLMConfig

    def __init__(self, config):
        super().__init__(config)
        self.emb = nn.Embedding(config.vocab_size, config.hidden_size)
        self.head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, output_hidden_states=False, **kwargs):
        x = self.emb(input_ids)
        m = torch.ones(input_ids.shape) if attention_mask is None else attention_mask.float()
        h = x + (x * m[..., None]).sum(1, keepdim=True) / m.sum(1)[:, None, None]
        return MaskedLMOutput(logits=self.head(h), hidden_states=(x, h) if output_hidden_states else None)
"""


@pytest.fixture
def remote_dir(tmp_path, tokenizer):
    (tmp_path / "configuration_toy.py").write_text(TOY_CONFIG)
    (tmp_path / "modeling_toy.py").write_text(TOY_MODEL)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "toy_remote_dlm",
                "vocab_size": len(tokenizer),
                "hidden_size": 16,
                "mask_token_id": tokenizer.mask_token_id,
                "architectures": ["ToyDLM"],
                "auto_map": {"AutoConfig": "configuration_toy.ToyDLMConfig", "AutoModel": "modeling_toy.ToyDLM"},
            }
        )
    )
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(tmp_path, trust_remote_code=True)
    AutoModel.from_config(config, trust_remote_code=True).save_pretrained(tmp_path)  # random weights
    tokenizer.save_pretrained(tmp_path)
    return tmp_path


def test_remote_code_model_is_wrapped_on_load(remote_dir, caplog):
    from dllm_rl.config import ModelConfig
    from dllm_rl.models.load import load_model

    with caplog.at_level(logging.WARNING, logger="dllm_rl.models.hf"):
        model, tok = load_model(ModelConfig(path=str(remote_dir), trust_remote_code=True))
    assert isinstance(model, HFDiffusionLM) and not follows_protocol(model.model)
    assert [r.getMessage() for r in caplog.records if "no KV cache" in r.getMessage()]
    tr = traits(model, tok)
    assert not tr.supports_cache and tr.mask_token_id == tok.mask_token_id and tr.logits_shift == 0
    assert wrap_if_needed(model) is model and wrap_if_needed(small_native("llada")).__class__ is LLaDAModelLM


def test_wrapper_follows_the_protocol(remote_dir):
    inner = AutoModel.from_pretrained(remote_dir, trust_remote_code=True).eval()
    model = HFDiffusionLM(inner)
    P, L = 4, 10
    x = torch.randint(2, 60, (2, L))
    attn = torch.ones_like(x)
    attn[0, :2] = 0
    want = inner(input_ids=x, attention_mask=attn).logits
    out = model(
        x,
        attention_mask=attn,
        position_ids=(attn.cumsum(-1) - 1).clamp(min=0),
        logits_range=(P, L),
        output_hidden_states=True,
    )
    torch.testing.assert_close(out.logits, want[:, P:])
    assert out.hidden_states[-1].shape == (2, L, 16)
    bid = block_ids(attn, P, 3)
    bidirectional = mask_from_block_ids(bid, bid, causal_blocks=False)  # reduces to the padding mask
    torch.testing.assert_close(model(x, attention_mask=bidirectional).logits, want)
    with pytest.raises(DllmRlError, match="block-causal"):
        model(x, attention_mask=mask_from_block_ids(bid, bid, causal_blocks=True))
    with pytest.raises(DllmRlError, match="no KV cache"):
        model(x[:, P:], cache_start=P, kv_len=L)


def test_engine_refuses_cache_for_wrapped_models(remote_dir, tokenizer):
    from dllm_rl.config import RolloutConfig
    from dllm_rl.errors import ConfigError
    from dllm_rl.rollout.engine import generate

    model = HFDiffusionLM(AutoModel.from_pretrained(remote_dir, trust_remote_code=True))
    cfg = RolloutConfig(max_completion_length=4, steps=4, cache="prefix")
    with pytest.raises(ConfigError, match="cannot use a KV cache"):
        generate(model, tokenizer, ["ab"], cfg, generator=torch.Generator().manual_seed(0))
    out = generate(
        model,
        tokenizer,
        ["ab", "cde"],
        RolloutConfig(max_completion_length=4, steps=4),
        generator=torch.Generator().manual_seed(0),
    )
    assert out.completion_ids.shape == (2, 4)


def test_diffusion_gemma_goes_to_its_adapter():
    """transformers' DiffusionGemma (prompt encoder + uniform-noise canvas decoder) does not fit the generic
    wrapper, which refuses it with an explanation; wrap_if_needed picks its adapter instead."""
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
        pytest.skip("this transformers has no DiffusionGemma")
    text = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=64,
        sliding_window=16,
        num_experts=2,
        top_k_experts=1,
        moe_intermediate_size=32,
    )
    vision = dict(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        head_dim=8,
    )
    cfg = transformers.DiffusionGemmaConfig(
        text_config=text, vision_config=vision, canvas_length=8, boi_token_id=297, eoi_token_id=298, image_token_id=299
    )
    model = transformers.DiffusionGemmaForBlockDiffusion(cfg)
    assert not follows_protocol(model)
    with pytest.raises(DllmRlError, match="encoder-decoder block-diffusion"):
        HFDiffusionLM(model)
    from dllm_rl.models.diffusion_gemma import DiffusionGemmaLM

    assert isinstance(wrap_if_needed(model), DiffusionGemmaLM)
