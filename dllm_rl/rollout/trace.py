"""The commit trace every rollout returns: what was decided, when, and with what probability.

Enough to replay the exact sequence of intermediate canvases (`Trace.replay`), which is what trajectory
likelihoods (TraceRL arXiv 2509.06949, DCoLT arXiv 2505.10446) and the learned unmasking policy need.
Steps are counted per row: step s of a row is its s-th forward, whatever the other rows did.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

COMMIT, REMASK, FILL = 0, 1, 2  # event kinds: sampled commit; self-correction remask; filled after EOS


@dataclass
class Trace:
    commit_step: torch.Tensor  # [N, Lc] step of the final token's commit; -1 = filled after EOS (not sampled)
    token_logprob: torch.Tensor  # [N, Lc] sampler log-prob of the final token at its commit step
    order_logprob: torch.Tensor  # [N, S] log-prob of each step's unmasking decision (0 when not sampled)
    num_steps: torch.Tensor  # [N] steps taken per row
    events: torch.Tensor  # [E, 5] long: (row, step, position, token, kind), in the order applied
    event_logprob: torch.Tensor  # [E] sampler log-prob of committed tokens (0 for remask / fill)
    mask_token_id: int

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
        return Trace(**{k: (v.to(device) if torch.is_tensor(v) else v) for k, v in self.__dict__.items()})

    def select(self, rows: torch.Tensor) -> "Trace":
        """The trace of a subset of rows (renumbered 0..len(rows)-1)."""
        rows = rows.cpu()
        remap = torch.full((self.commit_step.shape[0],), -1, dtype=torch.long)
        remap[rows] = torch.arange(len(rows))
        keep = remap[self.events[:, 0]] >= 0
        events = self.events[keep].clone()
        events[:, 0] = remap[events[:, 0]]
        return Trace(self.commit_step[rows], self.token_logprob[rows], self.order_logprob[rows],
                     self.num_steps[rows], events, self.event_logprob[keep], self.mask_token_id)


@dataclass
class TraceRecorder:
    """Accumulates events during decoding; `finish()` builds the Trace."""

    num_rows: int
    length: int
    mask_token_id: int
    _events: list = field(default_factory=list)
    _logprobs: list = field(default_factory=list)
    _order: list = field(default_factory=list)

    def add(self, rows: torch.Tensor, steps: torch.Tensor, pos: torch.Tensor, tokens: torch.Tensor,
            kind: int, logprob: torch.Tensor | None = None) -> None:
        """rows, steps, pos, tokens: [e] each (one entry per event)."""
        if rows.numel() == 0:
            return
        kinds = torch.full_like(rows, kind)
        self._events.append(torch.stack([rows, steps, pos, tokens, kinds], -1).cpu())
        self._logprobs.append((torch.zeros(rows.shape) if logprob is None else logprob.float()).cpu())

    def add_order(self, rows: torch.Tensor, steps: torch.Tensor, logprob: torch.Tensor) -> None:
        self._order.append(torch.stack([rows.cpu().float(), steps.cpu().float(), logprob.float().cpu()], -1))

    def finish(self, num_steps: torch.Tensor) -> Trace:
        N, Lc = self.num_rows, self.length
        events = torch.cat(self._events) if self._events else torch.zeros(0, 5, dtype=torch.long)
        ev_lp = torch.cat(self._logprobs) if self._logprobs else torch.zeros(0)
        commit_step = torch.full((N, Lc), -1, dtype=torch.long)
        token_logprob = torch.zeros(N, Lc)
        # the last event at each position decides it (a remask followed by a new commit leaves the new one)
        rows, steps, pos, _, kinds = events.unbind(-1)
        last = torch.full((N * Lc,), -1, dtype=torch.long).scatter_reduce(
            0, rows * Lc + pos, torch.arange(len(events)), reduce="amax")  # [N*Lc] index of the last event
        hit = last >= 0
        idx = last[hit]
        committed = kinds[idx] == COMMIT
        commit_step.view(-1)[hit] = torch.where(committed, steps[idx], -1)
        token_logprob.view(-1)[hit] = torch.where(committed, ev_lp[idx], 0.0)
        S = int(num_steps.max()) if N else 0
        order_logprob = torch.zeros(N, S)
        if self._order:
            o = torch.cat(self._order)
            order_logprob[o[:, 0].long(), o[:, 1].long()] = o[:, 2]
        return Trace(commit_step, token_logprob, order_logprob, num_steps.cpu(), events, ev_lp,
                     self.mask_token_id)
