"""Recording a rollout's decisions as it decodes; `finish()` builds the `batches.Trace` it returns."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..batches import COMMIT, Decoding, Trace


@dataclass
class TraceRecorder:
    """Accumulates events during decoding; `finish()` builds the Trace."""

    num_rows: int
    length: int
    mask_token_id: int
    decoding: Decoding = field(default_factory=Decoding)  # the sampler settings the Trace records
    _events: list = field(default_factory=list)
    _logprobs: list = field(default_factory=list)
    _order: list = field(default_factory=list)

    def add(
        self,
        rows: torch.Tensor,
        steps: torch.Tensor,
        pos: torch.Tensor,
        tokens: torch.Tensor,
        kind: int,
        logprob: torch.Tensor | None = None,
    ) -> None:
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
            0, rows * Lc + pos, torch.arange(len(events)), reduce="amax"
        )  # [N*Lc] index of the last event
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
        return Trace(
            commit_step, token_logprob, order_logprob, num_steps.cpu(), events, ev_lp, self.mask_token_id, self.decoding
        )
