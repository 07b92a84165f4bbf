"""Building the `batches.Trace` a rollout returns: from dense per-step buffers written on the device
(`trace_from_buffers`, the engine), or from events recorded as they happen (`TraceRecorder`, the host loop of
rollout.eager_loop)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..batches import COMMIT, FILL, REMASK, Decoding, Trace


def by_row(events: torch.Tensor, event_logprob: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Events (and their log-probs) row by row, each row's in the order applied (Trace.events' layout): a stable
    sort on the row, for recorders that append step by step across rows."""
    order = torch.sort(events[:, 0], stable=True).indices
    return events[order], event_logprob[order]


def trace_from_events(
    events: torch.Tensor,
    event_logprob: torch.Tensor,
    order_logprob: torch.Tensor,
    num_steps: torch.Tensor,
    length: int,
    mask_token_id: int,
    decoding: Decoding,
) -> Trace:
    """events [E, 5] in the order applied within each row, event_logprob [E], order_logprob [N, S] -> Trace."""
    N, Lc = num_steps.shape[0], length
    events, event_logprob = by_row(events, event_logprob)
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
    token_logprob.view(-1)[hit] = torch.where(committed, event_logprob[idx], 0.0)
    return Trace(
        commit_step, token_logprob, order_logprob, num_steps.cpu(), events, event_logprob, mask_token_id, decoding
    )


def trace_from_buffers(
    buffers: dict[str, torch.Tensor],
    num_steps: torch.Tensor,
    prompt_len: int,
    length: int,
    mask_token_id: int,
    eos_token_id: int | None,
    decoding: Decoding,
    remasks: bool,
) -> Trace:
    """The Trace of the first N = len(num_steps) rows of the engine's dense buffers (rollout.step.Workspace):
    rank / token / logprob / remask [R, S+1, Lb] and block [R, S+1] per row step, order [R, S+1], fill_step
    and fill_from [R]. One copy to the host; events come out row by row and, within a row, step by step:
    commits in draw order, then remasks, then the EOS fills of the row's last step, by position (the order
    in which they were applied)."""
    N = num_steps.shape[0]
    steps = num_steps.cpu()
    b = {k: v[:N].cpu() for k, v in buffers.items()}
    rank = b["rank"].long()  # [N, S1, Lb]
    S1, Lb = rank.shape[1], rank.shape[2]
    W = max(Lb, length) + 1
    in_range = torch.arange(S1)[None, :, None] < steps[:, None, None]  # [N, S1, 1] steps each row took
    parts = []  # (sort key, events [e, 5], log-probs [e])

    def add(r, s, pos, tok, kind, key_minor, lp=None):
        key = ((r * S1 + s) * 3 + kind) * W + key_minor
        ev = torch.stack([r, s, pos, tok, torch.full_like(r, kind)], -1)
        parts.append((key, ev, torch.zeros(len(r)) if lp is None else lp))

    r, s, o = ((b["rank"] >= 0) & in_range).nonzero(as_tuple=True)
    add(r, s, b["block"][r, s] - prompt_len + o, b["token"][r, s, o], COMMIT, rank[r, s, o], b["logprob"][r, s, o])
    if remasks:
        r, s, o = (b["remask"] & in_range).nonzero(as_tuple=True)
        pos = b["block"][r, s] - prompt_len + o
        add(r, s, pos, torch.full_like(r, mask_token_id), REMASK, pos)
    fill = (b["fill_step"][:, None] >= 0) & (torch.arange(length)[None, :] >= b["fill_from"][:, None])  # [N, Lc]
    r, pos = fill.nonzero(as_tuple=True)
    add(r, b["fill_step"][r], pos, torch.full_like(r, -1 if eos_token_id is None else eos_token_id), FILL, pos)
    order = torch.cat([p[0] for p in parts]).argsort()
    events = torch.cat([p[1] for p in parts])[order]
    event_logprob = torch.cat([p[2] for p in parts]).float()[order]
    S = int(steps.max()) if N else 0
    order_logprob = torch.where(torch.arange(S)[None, :] < steps[:, None], b["order"][:, :S], 0.0)
    return trace_from_events(events, event_logprob, order_logprob, steps, length, mask_token_id, decoding)


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
        N = self.num_rows
        events = torch.cat(self._events) if self._events else torch.zeros(0, 5, dtype=torch.long)
        ev_lp = torch.cat(self._logprobs) if self._logprobs else torch.zeros(0)
        S = int(num_steps.max()) if N else 0
        order_logprob = torch.zeros(N, S)
        if self._order:
            o = torch.cat(self._order)
            order_logprob[o[:, 0].long(), o[:, 1].long()] = o[:, 2]
        return trace_from_events(
            events, ev_lp, order_logprob, num_steps.cpu(), self.length, self.mask_token_id, self.decoding
        )
