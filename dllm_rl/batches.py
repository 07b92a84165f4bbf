"""Data contracts between the rollout engine, rewards, estimators and trainers (shape-commented).

N = B*G completions (B prompts x G generations), P padded prompt length, Lc completion length, S steps,
Lb block length, E trace events.

- SequenceBatch: prompt + completion pairs to score (SFT targets, preference pairs).
- RolloutBatch: what a rollout returns: completions, their canvas and the commit trace.
- Trace: every decision the sampler made (TraceRL arXiv 2509.06949, DCoLT arXiv 2505.10446 replay it).
- StepStats: the per-step statistics the commit and ordering rules read.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

COMMIT, REMASK, FILL = 0, 1, 2  # event kinds: sampled commit; self-correction remask; filled after EOS


@dataclass(frozen=True)
class Decoding:
    """The sampler settings a replay of its decisions needs (recorded in every Trace)."""

    temperature: float = 0.0  # token temperature (0 = greedy)
    order: str = "low_confidence"  # the ordering rule (policy.orders.ORDERS)
    order_temperature: float = 0.0  # > 0: orders were sampled Plackett-Luce (Trace.order_logprob holds them)
    block_length: int = 0  # semi-autoregressive block length (the completion length for one block)


@dataclass
class Trace:
    """Every decision a rollout made, enough to replay the exact sequence of its canvases (`replay`).

    Steps are counted per row: step s of a row is its s-th forward, whatever the other rows did. Besides the
    decisions it records how they were made (the sampler settings a replay needs), so a likelihood
    estimator reads them from the trace rather than from a recipe.
    """

    commit_step: torch.Tensor  # [N, Lc] step of the final token's commit; -1 = filled after EOS (not sampled)
    token_logprob: torch.Tensor  # [N, Lc] sampler log-prob of the final token at its commit step
    order_logprob: torch.Tensor  # [N, S] log-prob of each step's unmasking decision (0 when not sampled)
    num_steps: torch.Tensor  # [N] steps taken per row
    events: torch.Tensor  # [E, 5] long: (row, step, position, token, kind), row by row in the order applied
    event_logprob: torch.Tensor  # [E] sampler log-prob of committed tokens (0 for remask / fill)
    mask_token_id: int
    decoding: Decoding = field(default_factory=lambda: Decoding())  # how the decisions were made

    EVENT_FIELDS = ("row", "step", "position", "token", "kind")  # the columns of `events`

    def replay(self, row: int) -> list[torch.Tensor]:
        """Completion canvases of `row` after each of its steps: a list of num_steps [Lc] tensors."""
        Lc = self.commit_step.shape[1]
        canvas = torch.full((Lc,), self.mask_token_id, dtype=torch.long)
        ev = self.events[self.events[:, 0] == row]
        states = []
        for s in range(int(self.num_steps[row])):
            for _, _, pos, tok, _ in ev[ev[:, 1] == s].tolist():
                canvas[pos] = tok
            states.append(canvas.clone())
        return states

    def to(self, device) -> "Trace":
        return replace(self, **{k: v.to(device) for k, v in self.__dict__.items() if torch.is_tensor(v)})

    def select(self, rows: torch.Tensor) -> "Trace":
        """The trace of a subset of rows (renumbered 0..len(rows)-1)."""
        rows = rows.cpu()
        remap = torch.full((self.commit_step.shape[0],), -1, dtype=torch.long)
        remap[rows] = torch.arange(len(rows))
        keep = remap[self.events[:, 0]] >= 0
        events = self.events[keep].clone()
        events[:, 0] = remap[events[:, 0]]
        return replace(
            self,
            commit_step=self.commit_step[rows],
            token_logprob=self.token_logprob[rows],
            order_logprob=self.order_logprob[rows],
            num_steps=self.num_steps[rows],
            events=events,
            event_logprob=self.event_logprob[keep],
        )

    @staticmethod
    def concat(parts: list["Trace"]) -> "Trace":
        """The traces of consecutive row ranges as one (rows renumbered; step columns padded to the longest)."""
        S = max(t.order_logprob.shape[1] for t in parts)
        first = [0]
        for t in parts[:-1]:
            first.append(first[-1] + t.commit_step.shape[0])
        events = [t.events + torch.tensor([o, 0, 0, 0, 0]) for t, o in zip(parts, first)]
        return replace(
            parts[0],
            commit_step=torch.cat([t.commit_step for t in parts]),
            token_logprob=torch.cat([t.token_logprob for t in parts]),
            order_logprob=torch.cat(
                [torch.nn.functional.pad(t.order_logprob, (0, S - t.order_logprob.shape[1])) for t in parts]
            ),
            num_steps=torch.cat([t.num_steps for t in parts]),
            events=torch.cat(events),
            event_logprob=torch.cat([t.event_logprob for t in parts]),
        )


@dataclass
class StepStats:
    """Dense per-position statistics of the active block for the rows decoded this step: [n, Lb] each."""

    masked: torch.Tensor  # bool: still masked
    token: torch.Tensor  # proposed token (valid where masked)
    logprob: torch.Tensor  # sampler log-prob of the proposed token
    confidence: torch.Tensor  # model probability of the proposed token (0 where not masked)
    top_prob: torch.Tensor  # model probability of the most likely token (equals confidence when greedy)
    margin: torch.Tensor
    gap: torch.Tensor
    entropy: torch.Tensor
    steps_left: torch.Tensor  # [n] planned steps left in this block, >= 1
    progress: torch.Tensor  # [n] fraction of the completion already committed


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
    trace: Trace  # every decision of the sampler
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
        pick = lambda t: None if t is None else t[rows.to(t.device)]
        return replace(
            self,
            prompt_ids=pick(self.prompt_ids),
            prompt_mask=pick(self.prompt_mask),
            completion_ids=pick(self.completion_ids),
            completion_mask=pick(self.completion_mask),
            completions=[self.completions[i] for i in idx],
            trace=self.trace.select(rows),
            rewards=pick(self.rewards),
            advantages=pick(self.advantages),
        )

    def __len__(self) -> int:
        return len(self.completions)

    @staticmethod
    def concat(parts: list["RolloutBatch"]) -> "RolloutBatch":
        """Batches as one, rows in order; prompts re-padded on the left to the longest (values under
        prompt_mask 0 are never read). Rewards, advantages and stats are not carried."""
        P = max(b.prompt_ids.shape[1] for b in parts)

        def left(t):  # [n, p] -> [n, P]
            return torch.nn.functional.pad(t, (P - t.shape[1], 0))

        return RolloutBatch(
            torch.cat([left(b.prompt_ids) for b in parts]),
            torch.cat([left(b.prompt_mask) for b in parts]),
            torch.cat([b.completion_ids for b in parts]),
            torch.cat([b.completion_mask for b in parts]),
            [c for b in parts for c in b.completions],
            Trace.concat([b.trace for b in parts]),
        )

    def to(self, device) -> "RolloutBatch":
        mv = lambda t: None if t is None else t.to(device)
        return replace(
            self,
            prompt_ids=mv(self.prompt_ids),
            prompt_mask=mv(self.prompt_mask),
            completion_ids=mv(self.completion_ids),
            completion_mask=mv(self.completion_mask),
            rewards=mv(self.rewards),
            advantages=mv(self.advantages),
        )
