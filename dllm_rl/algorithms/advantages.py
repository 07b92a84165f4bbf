"""Group-relative advantages (pure functions over rewards [B*G], grouped consecutively by prompt).

Baselines: group_mean (d1 / GRPO: r - mean of the group) and leave_one_out (RLOO, DiffuCoder:
r - mean of the *other* G-1 rewards). Scaling (TRL's scale_rewards): "group" divides by the group's
standard deviation (the z-score of GRPO / dLLM-RL), "batch" by the batch's, "none" leaves it (d1, Dr.GRPO,
DiffuCoder). `zero_std_groups` finds groups whose rewards are all equal (they carry no signal).
"""

from __future__ import annotations

import torch

EPS = 1e-4


def group_mean(rewards: torch.Tensor, G: int) -> torch.Tensor:
    r = rewards.view(-1, G)  # [B, G]
    return (r - r.mean(-1, keepdim=True)).view(-1)  # [B*G]


def leave_one_out(rewards: torch.Tensor, G: int) -> torch.Tensor:
    if G < 2:
        raise ValueError("leave_one_out needs grpo.num_generations >= 2")
    r = rewards.view(-1, G)  # [B, G]
    others = (r.sum(-1, keepdim=True) - r) / (G - 1)
    return (r - others).view(-1)


ADVANTAGES = {"group_mean": group_mean, "leave_one_out": leave_one_out}


def scale(advantages: torch.Tensor, rewards: torch.Tensor, G: int, how: str) -> torch.Tensor:
    if how == "group":
        std = rewards.view(-1, G).std(-1, keepdim=True).expand(-1, G).reshape(-1)  # [B*G] (Bessel, as TRL)
        return advantages / (std + EPS)
    if how == "batch":
        return advantages / (rewards.std() + EPS)
    return advantages


def zero_std_groups(rewards: torch.Tensor, G: int) -> torch.Tensor:
    """[B*G] bool: the completion belongs to a group whose rewards are all equal."""
    r = rewards.view(-1, G)
    return (r.max(-1).values == r.min(-1).values)[:, None].expand(-1, G).reshape(-1)
