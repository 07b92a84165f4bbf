"""Policy losses over per-token log-likelihood estimates (pure functions over tensors).

Every loss takes a `LossInputs` and the `grpo` config section and returns (scalar loss, stats). Shapes:
N completions, Lc completion positions.
- grpo / dr_grpo / dapo / bnpo: PPO-clipped ratio (token level, or sequence level = GSPO's geometric mean
  ratio) with epsilon / epsilon_high, plus beta * KL(pi || ref) by the k3 estimator; the names are TRL's
  aggregations: grpo = mean over each sequence's tokens then over sequences; dapo / bnpo = over all tokens;
  dr_grpo = sum / (N * Lc) (arXiv 2503.20783). Aggregation is per micro-batch.
- wd1 (arXiv 2507.08838): ratio-free weighted likelihood, w+ = softmax(A) and w- = softmax(-A) within each
  group, loss = sum_i (w-_i - w+_i) * sum_k logp_ik, averaged over groups.
- spg (arXiv 2510.09541): REINFORCE on likelihood bounds, -A * bound (lower bound for A > 0; the upper
  bound, lower bound or their mix for A < 0), weighted by completion length; no ratio, no KL.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class LossInputs:
    logps: torch.Tensor  # [N, Lc] current policy (with grad)
    old_logps: torch.Tensor  # [N, Lc] the policy that sampled (same noise), no grad
    ref_logps: torch.Tensor | None  # [N, Lc] reference policy (same noise), or None when beta == 0
    advantages: torch.Tensor  # [N]
    mask: torch.Tensor  # [N, Lc] completion tokens that count
    group_size: int
    upper: torch.Tensor | None = None  # [N, Lc] upper-bound contributions (spg)


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token (Schulman 2020): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logps - logps
    return d.exp() - d - 1


def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """grpo: the mean over each sequence's tokens, then over sequences."""
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def token_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """dapo / bnpo: the mean over every token of the micro-batch."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def constant_normalizer(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """dr_grpo: the sum divided by a constant, N * Lc (arXiv 2503.20783)."""
    return (per_token * mask).sum() / mask.numel()


AGGREGATIONS = {"grpo": sequence_mean, "dapo": token_mean, "bnpo": token_mean, "dr_grpo": constant_normalizer}


def clipped(x: LossInputs, cfg) -> tuple[torch.Tensor, dict]:
    mask = x.mask.float()
    log_ratio = x.logps - x.old_logps  # [N, Lc]
    if cfg.importance_sampling_level == "sequence":  # GSPO: one ratio per sequence
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = log_ratio.expand_as(x.logps)
    ratio = log_ratio.exp()
    lo, hi = 1 - cfg.epsilon, 1 + (cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon)
    adv = x.advantages[:, None]  # [N, 1]
    per_token = -torch.min(ratio * adv, ratio.clamp(lo, hi) * adv)  # [N, Lc]
    stats = {
        "clip_fraction": (((ratio < lo) & (adv < 0)) | ((ratio > hi) & (adv > 0))).float()[x.mask.bool()].mean().item()
        if x.mask.any()
        else 0.0
    }
    if x.ref_logps is not None and cfg.beta != 0:
        kl = kl_k3(x.logps, x.ref_logps)
        per_token = per_token + cfg.beta * kl
        stats["kl"] = (kl * mask).sum().item() / max(mask.sum().item(), 1)
    return AGGREGATIONS[cfg.loss_type](per_token, mask), stats


def wd1(x: LossInputs, cfg) -> tuple[torch.Tensor, dict]:
    G = x.group_size
    seq = (x.logps * x.mask).sum(-1).view(-1, G)  # [B, G] sequence log-likelihoods
    a = x.advantages.view(-1, G)
    w_pos, w_neg = a.softmax(-1), (-a).softmax(-1)  # [B, G]
    loss = ((w_neg - w_pos) * seq).sum(-1).mean()
    return loss, {"wd1_weight_max": w_pos.max().item()}


def spg(x: LossInputs, cfg) -> tuple[torch.Tensor, dict]:
    lower = (x.logps * x.mask).sum(-1)  # [N] sequence lower bound
    upper = (x.upper * x.mask).sum(-1) if x.upper is not None else lower
    w = cfg.spg_mix_weight
    if cfg.spg_bound == "zero":  # SPG's logp_estimation=zero: negative-advantage sequences give no gradient
        negative = torch.zeros_like(lower)
    else:
        negative = {"elbo": lower, "eubo": upper, "mix": w * upper + (1 - w) * lower}[cfg.spg_bound]
    bound = torch.where(x.advantages > 0, lower, negative)
    length = x.mask.float().sum(-1)
    loss = (-x.advantages * bound * length).sum() / length.sum().clamp(min=1)
    return loss, {"bound_gap": (upper - lower).mean().item()}


LOSSES = {**{name: clipped for name in AGGREGATIONS}, "wd1": wd1, "spg": spg}  # clipped: one per aggregation
