"""Self-correction: which committed tokens of the active block to take back (remask).

ReMDM (arXiv 2503.00307), in the any-process spirit of arXiv 2510.06190: after a step's commits, tokens
committed at earlier steps of the active block whose probability under the current logits fell below
`correction_threshold` are remasked (the lowest first, at most `correction_max_per_step`), while steps remain
in the block; the trace records each remask. Which positions to commit is policy.orders' business.
"""

from __future__ import annotations

import torch


def self_correction(
    token_prob: torch.Tensor, committed_before: torch.Tensor, threshold: float, max_per_step: int
) -> torch.Tensor:
    """Positions to remask: [n, Lb] bool. token_prob: current model probability of each committed token."""
    low = committed_before & (token_prob < threshold)
    if max_per_step <= 0:  # (no `low.any()` shortcut: reading it would stall a GPU every step)
        return torch.zeros_like(low)
    keys = torch.where(low, -token_prob, torch.full_like(token_prob, float("-inf")))
    k = min(max_per_step, low.shape[-1])
    idx = keys.topk(k, dim=-1).indices  # lowest probabilities first
    pick = torch.zeros_like(low).scatter_(-1, idx, True)
    return pick & low
