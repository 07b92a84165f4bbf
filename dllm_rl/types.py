"""Data contracts between the rollout engine, rewards, estimators and trainers (shape-commented).

N = B*G completions (B prompts x G generations), P padded prompt length, Lc completion length.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from .rollout.trace import Trace


@dataclass
class SequenceBatch:
    """Prompt + completion pairs to score (SFT targets, preference pairs)."""

    prompt_ids: torch.Tensor  # [N, P] left-padded
    prompt_mask: torch.Tensor  # [N, P]
    completion_ids: torch.Tensor  # [N, Lc]
    completion_mask: torch.Tensor  # [N, Lc] positions that count in the loss


@dataclass
class RolloutBatch:
    prompt_ids: torch.Tensor  # [N, P] left-padded prompt tokens
    prompt_mask: torch.Tensor  # [N, P] 1 = real token
    completion_ids: torch.Tensor  # [N, Lc] the final canvas (EOS-filled after the first EOS)
    completion_mask: torch.Tensor  # [N, Lc] 1 up to and including the first EOS
    completions: list[str]  # decoded completions (text up to the first EOS)
    trace: Trace  # every commit decision (rollout.trace)
    stats: dict = field(default_factory=dict)  # forwards, tokens forwarded, seconds
    rewards: torch.Tensor | None = None  # [N]
    advantages: torch.Tensor | None = None  # [N]

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], 1)  # [N, P + Lc]

    @property
    def attention_mask(self) -> torch.Tensor:
        # completion positions are all attendable (EOS padding is part of the canvas the model saw)
        return torch.cat([self.prompt_mask, torch.ones_like(self.completion_ids)], 1)  # [N, P + Lc]

    def select(self, rows: torch.Tensor) -> "RolloutBatch":
        """Rows `rows` of the batch (micro-batching); tensors and lists alike."""
        idx = rows.tolist()
        pick = (lambda t: None if t is None else t[rows.to(t.device)])
        return replace(self, prompt_ids=pick(self.prompt_ids), prompt_mask=pick(self.prompt_mask),
                       completion_ids=pick(self.completion_ids), completion_mask=pick(self.completion_mask),
                       completions=[self.completions[i] for i in idx], trace=self.trace.select(rows),
                       rewards=pick(self.rewards), advantages=pick(self.advantages))

    def to(self, device) -> "RolloutBatch":
        mv = (lambda t: None if t is None else t.to(device))
        return replace(self, prompt_ids=mv(self.prompt_ids), prompt_mask=mv(self.prompt_mask),
                       completion_ids=mv(self.completion_ids), completion_mask=mv(self.completion_mask),
                       rewards=mv(self.rewards), advantages=mv(self.advantages))
