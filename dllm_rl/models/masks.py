"""Attention masks for diffusion LMs, defined once for training, rollouts and likelihood estimators.

Layout convention (the same everywhere, so a block-causal model sees at inference exactly the masks it
was trained with): a sequence is `[left padding | prompt | completion]`. Prompt tokens form block 0 (they
attend to each other bidirectionally); completion token j belongs to block 1 + j // block_size; padding is
block -1 and is never attended to. Block-causal attention (block diffusion, arXiv 2503.09573): a query in
block b attends to every key in blocks 0..b. Bidirectional attention: every valid key.

Masks are boolean, True = may attend, shaped [B, 1, Lq, Lk] for SDPA.
"""

from __future__ import annotations

import torch


def block_ids(attention_mask: torch.Tensor, prompt_len: int, block_size: int) -> torch.Tensor:
    """Block index per position. attention_mask: [B, L] (1 = real token); positions < prompt_len are prompt.

    Returns [B, L] long: -1 padding, 0 prompt, 1 + j // block_size for completion offset j.
    """
    B, L = attention_mask.shape
    pos = torch.arange(L, device=attention_mask.device)
    ids = torch.where(pos < prompt_len, 0, 1 + (pos - prompt_len).clamp(min=0) // block_size)  # [L]
    ids = ids.expand(B, L)
    return torch.where(attention_mask.bool(), ids, torch.full_like(ids, -1))  # [B, L]


def mask_from_block_ids(q_blocks: torch.Tensor, k_blocks: torch.Tensor, causal_blocks: bool) -> torch.Tensor:
    """[B, 1, Lq, Lk] bool mask from per-position block ids of queries [B, Lq] and keys [B, Lk].

    Padding keys (-1) are hidden. A query that would see no key (a padding query) sees itself only when
    Lq == Lk, else the first valid key, so SDPA never produces NaN rows.
    """
    valid = (k_blocks >= 0)[:, None, :]  # [B, 1, Lk]
    if causal_blocks:
        allowed = valid & (k_blocks[:, None, :] <= q_blocks[:, :, None].clamp(min=0))  # [B, Lq, Lk]
    else:
        allowed = valid.expand(-1, q_blocks.shape[1], -1)
    empty = ~allowed.any(-1, keepdim=True)  # [B, Lq, 1]
    # applied whether or not any row is empty: reading `empty.any()` on the host would stall a GPU every step
    if q_blocks.shape[1] == k_blocks.shape[1]:
        fallback = torch.eye(q_blocks.shape[1], dtype=torch.bool, device=allowed.device)  # [Lq, Lk]
    else:
        fallback = torch.arange(k_blocks.shape[1], device=allowed.device) == 0  # [Lk]
    return torch.where(empty, fallback, allowed)[:, None]  # [B, 1, Lq, Lk]


def padding_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """RoPE position ids that start at 0 on the first real token of each left-padded row: [B, L]."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
