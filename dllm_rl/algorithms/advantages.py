"""Group-relative advantages (pure functions over rewards [B*G], grouped consecutively by prompt).

Baselines: group_mean (d1 / GRPO: r - mean of the group) and leave_one_out (RLOO, DiffuCoder:
r - mean of the *other* G-1 rewards). Scaling (TRL's scale_rewards): "group" divides by the group's
standard deviation (the z-score of GRPO / dLLM-RL), "batch" by the batch's, "none" leaves it (d1, Dr.GRPO,
DiffuCoder). `zero_std_groups` finds groups whose rewards are all equal (they carry no signal).

A NaN reward marks an unscorable completion (every reward function returned None). As in TRL 1.16
(trl/trainer/grpo_trainer.py, `_generate_and_score_completions`: nanmean / nanstd over the group, then
nan_to_num(advantages, 0)), it is left out of its group's mean and standard deviation and gets advantage 0;
a group with fewer than two scorable completions has no standard deviation, so with "group" scaling all its
advantages are 0. Without NaN the results are exactly those of the plain mean / std.
"""

from __future__ import annotations

import torch

EPS = 1e-4


def nanstd(x: torch.Tensor, dim: int | None = None, keepdim: bool = False) -> torch.Tensor:
    """Bessel-corrected standard deviation over the non-NaN entries (NaN with fewer than two): TRL's
    trl.trainer.utils.nanstd, which torch lacks; written here to keep this module free of TRL's imports."""
    if not x.isnan().any():
        return x.std() if dim is None else x.std(dim, keepdim=keepdim)
    dims = () if dim is None else (dim,)
    mean = x.nanmean(dim=dims or None, keepdim=True)
    count = (~x.isnan()).sum(dim=dims or None, keepdim=True)
    var = ((x - mean) ** 2).nansum(dim=dims or None, keepdim=True) / (count - 1).clamp(min=1)
    std = torch.where(count > 1, var.sqrt(), torch.full_like(var, float("nan")))
    return std if keepdim else (std.squeeze() if dim is None else std.squeeze(dim))


def group_mean(rewards: torch.Tensor, G: int) -> torch.Tensor:
    r = rewards.view(-1, G)  # [B, G]
    return (r - r.nanmean(-1, keepdim=True)).view(-1)  # [B*G]


def leave_one_out(rewards: torch.Tensor, G: int) -> torch.Tensor:
    if G < 2:
        raise ValueError("leave_one_out needs grpo.num_generations >= 2")
    r = rewards.view(-1, G)  # [B, G]
    n = (~r.isnan()).sum(-1, keepdim=True)  # [B, 1] scorable completions
    others = (r.nansum(-1, keepdim=True) - r) / (n - 1)  # mean of the other scorable ones (NaN if none)
    return (r - others).view(-1)


ADVANTAGES = {"group_mean": group_mean, "leave_one_out": leave_one_out}


def scale(advantages: torch.Tensor, rewards: torch.Tensor, G: int, how: str) -> torch.Tensor:
    """Scaled advantages; NaN (unscorable completions, groups without a baseline) becomes 0, as in TRL."""
    if how == "group":
        std = nanstd(rewards.view(-1, G), -1, keepdim=True).expand(-1, G).reshape(-1)  # [B*G] (Bessel, as TRL)
        advantages = advantages / (std + EPS)
    elif how == "batch":
        advantages = advantages / (nanstd(rewards) + EPS)
    return advantages.nan_to_num(nan=0.0)


def zero_std_groups(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """[B*G] bool: the completion belongs to a group whose scorable rewards (at least two) are all equal. As
    TRL's frac_reward_zero_std, a group with fewer than two scorable rewards (no std) is not counted."""
    r = rewards.view(-1, G)
    seen = ~r.isnan()
    hi = r.masked_fill(~seen, float("-inf")).max(-1).values
    lo = r.masked_fill(~seen, float("inf")).min(-1).values
    return ((hi == lo) & (seen.sum(-1) > 1))[:, None].expand(-1, G).reshape(-1)
