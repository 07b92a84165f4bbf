"""Policy losses over per-token log-likelihood estimates (pure functions over tensors).

Every loss takes a `LossInputs` and the `grpo` config section and returns (scalar loss, stats). Shapes:
N completions, Lc completion positions. The clipped family follows TRL 1.16's `_compute_loss`
(trl/trainer/grpo_trainer.py); for a diffusion LM the per-token log-likelihoods are the estimator's.
- grpo / dr_grpo / dapo / bnpo: PPO-clipped ratio (token level, or sequence level = GSPO's geometric mean
  ratio) with epsilon / epsilon_high and, when `delta` is set, INTELLECT-2's two-sided clip (the unclipped
  ratio capped at delta, arXiv 2505.07291), plus beta * KL(pi || ref) by the k3 estimator. The names are TRL's
  aggregations: grpo = mean over each sequence's tokens then over sequences; bnpo = over all tokens of the
  micro-batch; dapo = over all tokens of the optimizer step on every process (DAPO's token-level mean over
  the accumulated batch, arXiv 2503.14476: the trainer passes the normaliser, `token_normalizer`; without it,
  the micro-batch's tokens; when one rollout feeds several optimizer steps, steps_per_generation > GA, each
  step divides by its own tokens, where TRL divides by the rollout's tokens per step on average: the same at
  TRL's default steps_per_generation = GA); dr_grpo = sum / (N * Lc) (arXiv 2503.20783). With
  use_bias_correction_kl (TRL's default, not the recipe's) the k3 term is multiplied by the unclipped ratio
  (it is 1 when the rollout feeds a single optimizer step).
- cispo (MiniMax-M1, arXiv 2506.13585): REINFORCE weighted by the ratio clipped from above at epsilon_high
  (detached), -min(r, eps_high) * A * logp, aggregated like dapo.
- sapo (arXiv 2511.20347): a soft gate instead of the clip, -(4 / tau) * sigmoid(tau * (r - 1)) * A, with
  tau = sapo_temperature_pos for A > 0 and sapo_temperature_neg otherwise, aggregated like grpo.
- wd1 (arXiv 2507.08838): ratio-free weighted likelihood, w+ = softmax(A) and w- = softmax(-A) within each
  group, loss = sum_i (w-_i - w+_i) * sum_k logp_ik, averaged over groups.
- spg (arXiv 2510.09541): REINFORCE on likelihood bounds, -A * bound (lower bound for A > 0; the upper
  bound, lower bound or their mix for A < 0), weighted by completion length; no ratio, no KL.
`entropy_mask` (top_entropy_quantile) multiplies the policy term only, as in TRL, never the KL term.
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
    entropy_mask: torch.Tensor | None = None  # [N, Lc] bool: tokens whose policy term counts (top_entropy_quantile)
    token_normalizer: float | None = None  # dapo / cispo: the loss is sum(mask * l) / this (None: mask.sum())


def kl_k3(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """k3 estimator of KL(pi || ref) per token (Schulman 2020): exp(ref - logp) - (ref - logp) - 1 >= 0."""
    d = ref_logps - logps
    return d.exp() - d - 1


def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor, x: LossInputs) -> torch.Tensor:
    """grpo, sapo: the mean over each sequence's tokens, then over sequences."""
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()


def token_mean(per_token: torch.Tensor, mask: torch.Tensor, x: LossInputs) -> torch.Tensor:
    """bnpo: the mean over every token of the micro-batch."""
    return (per_token * mask).sum() / mask.sum().clamp(min=1)


def accumulated_token_mean(per_token: torch.Tensor, mask: torch.Tensor, x: LossInputs) -> torch.Tensor:
    """dapo, cispo: the sum over the micro-batch's tokens divided by the trainer's normaliser, so that the
    accumulated gradient of an optimizer step is the mean over all its tokens on every process (TRL's
    num_items_in_batch); without a normaliser, the micro-batch's own token count (= bnpo)."""
    if x.token_normalizer is None:
        return token_mean(per_token, mask, x)
    return (per_token * mask).sum() / max(x.token_normalizer, 1e-8)


def constant_normalizer(per_token: torch.Tensor, mask: torch.Tensor, x: LossInputs) -> torch.Tensor:
    """dr_grpo: the sum divided by a constant, N * Lc (arXiv 2503.20783)."""
    return (per_token * mask).sum() / mask.numel()


AGGREGATIONS = {
    "grpo": sequence_mean,
    "dapo": accumulated_token_mean,
    "bnpo": token_mean,
    "dr_grpo": constant_normalizer,
    "cispo": accumulated_token_mean,
    "sapo": sequence_mean,
}


def _ratio(x: LossInputs, cfg) -> torch.Tensor:
    """[N, Lc] importance ratio pi / pi_old: per token, or GSPO's per-sequence geometric mean broadcast."""
    mask = x.mask.float()
    log_ratio = x.logps - x.old_logps  # [N, Lc]
    if cfg.importance_sampling_level == "sequence":  # GSPO: one ratio per sequence
        log_ratio = (log_ratio * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
        log_ratio = log_ratio.expand_as(x.logps)
    return log_ratio.exp()


def _eps_high(cfg) -> float:
    return cfg.epsilon_high if cfg.epsilon_high is not None else cfg.epsilon


def _finish(policy: torch.Tensor, x: LossInputs, cfg, stats: dict, ratio: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Entropy mask on the policy term, + beta * k3 KL (times the unclipped ratio with TRL's
    use_bias_correction_kl), then the loss type's aggregation."""
    mask = x.mask.float()
    if x.entropy_mask is not None:
        policy = policy * x.entropy_mask.float()
    if x.ref_logps is not None and cfg.beta != 0:
        kl = kl_k3(x.logps, x.ref_logps)
        if getattr(cfg, "use_bias_correction_kl", False):
            kl = kl * ratio
        policy = policy + cfg.beta * kl
        stats["kl"] = (kl * mask).sum().item() / max(mask.sum().item(), 1)
    return AGGREGATIONS[cfg.loss_type](policy, mask, x), stats


def clipped(x: LossInputs, cfg) -> tuple[torch.Tensor, dict]:
    ratio = _ratio(x, cfg)
    lo, hi = 1 - cfg.epsilon, 1 + _eps_high(cfg)
    adv = x.advantages[:, None]  # [N, 1]
    capped = ratio if cfg.delta is None else ratio.clamp(max=cfg.delta)  # two-sided clip: only the unclipped term
    per_token = -torch.min(capped * adv, ratio.clamp(lo, hi) * adv)  # [N, Lc]
    stats = {
        "clip_fraction": (((capped < lo) & (adv < 0)) | ((capped > hi) & (adv > 0)))
        .float()[x.mask.bool()]
        .mean()
        .item()
        if x.mask.any()
        else 0.0
    }
    return _finish(per_token, x, cfg, stats, ratio)


def cispo(x: LossInputs, cfg) -> tuple[torch.Tensor, dict]:
    ratio = _ratio(x, cfg)
    adv = x.advantages[:, None]
    weight = ratio.clamp(max=_eps_high(cfg)).detach()  # TRL: clamp(coef, max=epsilon_high), no gradient
    per_token = -weight * adv * x.logps
    clipped_ = ((ratio > _eps_high(cfg)) & (adv > 0)).float()[x.mask.bool()]
    return _finish(per_token, x, cfg, {"cispo_clip_ratio": clipped_.mean().item() if len(clipped_) else 0.0}, ratio)


def sapo(x: LossInputs, cfg) -> tuple[torch.Tensor, dict]:
    ratio = _ratio(x, cfg)
    adv = x.advantages[:, None]
    tau = torch.where(adv > 0, cfg.sapo_temperature_pos, cfg.sapo_temperature_neg)  # [N, 1]
    per_token = -(torch.sigmoid(tau * (ratio - 1)) * 4 / tau) * adv
    return _finish(per_token, x, cfg, {}, ratio)


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


LOSSES = {
    **{name: clipped for name in ("grpo", "dapo", "bnpo", "dr_grpo")},  # clipped: one per aggregation
    "cispo": cispo,
    "sapo": sapo,
    "wd1": wd1,
    "spg": spg,
}
