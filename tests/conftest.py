"""Shared fixtures: the char tokenizer and tiny random diffusion LMs built in-process (no network)."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if not torch.cuda.is_available():
    # the Triton kernels run in Triton's interpreter on a machine without a GPU; the variable is read when
    # triton is first imported, so it is set here, before any test module imports it
    os.environ.setdefault("TRITON_INTERPRET", "1")

import dllm_rl.models as M  # noqa: E402


@pytest.fixture(scope="session")
def tokenizer():
    return M.build_char_tokenizer()


def make_model(tokenizer, attention="bidirectional", block_size=4, hidden=32, layers=2, heads=2, seed=0, vocab=None):
    torch.manual_seed(seed)
    cfg = M.TinyMDMConfig(
        vocab_size=vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        attention=attention,
        block_size=block_size,
        max_position_embeddings=128,
        mask_token_id=tokenizer.mask_token_id,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return M.TinyMDM(cfg).eval()


@pytest.fixture
def model_factory(tokenizer):
    return lambda **kw: make_model(tokenizer, **kw)


# small native LLaDA and Dream models (tests/models/test_native.py checks them against the released layouts)
LLADA_SMALL = {
    "d_model": 32,
    "n_heads": 4,
    "n_kv_heads": 2,
    "n_layers": 2,
    "mlp_hidden_size": 48,
    "vocab_size": 64,
    "embedding_size": 64,
    "max_sequence_length": 64,
    "mask_token_id": 63,
    "eos_token_id": 1,
    "pad_token_id": 0,
}
DREAM_SMALL = {
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 2,
    "intermediate_size": 48,
    "vocab_size": 64,
    "max_position_embeddings": 64,
    "mask_token_id": 63,
    "pad_token_id": 0,
    "bos_token_id": 0,
    "eos_token_id": 1,
}


def small_native(arch: str, seed: int = 0, **overrides):
    """A small native LLaDA ("llada") or Dream ("dream") model in eval mode, config overrides applied."""
    cfg_cls, model_cls, small = {
        "llada": (M.LLaDAConfig, M.LLaDAModelLM, LLADA_SMALL),
        "dream": (M.DreamConfig, M.DreamModel, DREAM_SMALL),
    }[arch]
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**{**small, **overrides})).eval()
