"""Commit rules: how many masked tokens of the active block each row commits this step.

Commit rules (one function each, one dict entry each) return how many masked tokens of the active block
each row commits this step; the unmasking order (rollout.order, policy/orders.py) decides which ones, so under
an order other than top_prob the committed tokens need not be those whose confidence passed a threshold.
- top_k (LLaDA, arXiv 2502.09992): ceil(masked / steps left), i.e. LLaDA's even split of each block's
  tokens over its steps (the first `remainder` steps take one more).
- threshold (Fast-dLLM, arXiv 2505.22618): every token whose confidence >= threshold, at least one.
- factor (Fast-dLLM): the largest n whose n-th highest confidence c_n >= 1 - factor / (n + 1).
- prophet (arXiv 2508.19982): top_k, until the mean top-1/top-2 logit gap over the block's remaining masks
  passes the schedule prophet_gaps (by progress < 1/3, < 2/3, later); then everything at once. Prophet
  measures the gap over the whole canvas of a single-block sampler; with several blocks we measure and
  commit within the active block.
"""

from __future__ import annotations

import torch

from ..batches import StepStats
from ..config import RolloutConfig


def commit_top_k(st: StepStats, cfg: RolloutConfig) -> torch.Tensor:
    n_masked = st.masked.sum(-1)
    return torch.div(n_masked + st.steps_left - 1, st.steps_left, rounding_mode="floor")  # ceil


def commit_threshold(st: StepStats, cfg: RolloutConfig) -> torch.Tensor:
    above = ((st.confidence >= cfg.threshold) & st.masked).sum(-1)
    return above.clamp(min=1)


def commit_factor(st: StepStats, cfg: RolloutConfig) -> torch.Tensor:
    conf = torch.where(st.masked, st.confidence, torch.zeros_like(st.confidence))
    c_sorted = conf.sort(-1, descending=True).values  # [n, Lb]
    n = torch.arange(1, conf.shape[-1] + 1, device=conf.device)
    ok = ((n + 1) * (1 - c_sorted) <= cfg.factor) & (n <= st.masked.sum(-1, keepdim=True))
    # largest n with the condition (as Fast-dLLM: scan the sorted confidences)
    largest = torch.where(ok, n, torch.zeros_like(n)).amax(-1)
    return largest.clamp(min=1)


def commit_prophet(st: StepStats, cfg: RolloutConfig) -> torch.Tensor:
    k = commit_top_k(st, cfg)
    n_masked = st.masked.sum(-1)
    mean_gap = torch.where(st.masked, st.gap, torch.zeros_like(st.gap)).sum(-1) / n_masked.clamp(min=1)
    g = cfg.prophet_gaps
    need = torch.where(st.progress < 1 / 3, g[0], torch.where(st.progress < 2 / 3, g[1], g[2]))
    return torch.where(mean_gap >= need, n_masked, k)


COMMIT_RULES = {
    "top_k": commit_top_k,
    "threshold": commit_threshold,
    "factor": commit_factor,
    "prophet": commit_prophet,
}
