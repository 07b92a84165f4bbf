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
