"""The edit decisions of any-process decoding: which are legal, how they are drawn, and their exact log-probs.

One step of any-process decoding (AP-MDM, arXiv 2510.06190) decides, besides which masks to fill, an
operation for every completion position and a number of masks to open after every gap owner:

- op_i in {KEEP, REMASK, DELETE} at completion position i (REMASK: a committed token becomes a mask again;
  DELETE: the position disappears; both only where legal, below);
- n_g in {0..K}: masks inserted after gap owner g, where g = 0 is the last prompt token (the gap before the
  first completion token) and g = i + 1 is completion position i (a deleted position owns no gap).

The decisions are drawn one after another in a fixed order, gap 0 first, then op_0, n_1, op_1, n_2, ...,
each from softmax(logits / temperature) over its *legal set*, which depends on the decisions already drawn:

- REMASK only at committed tokens (not masks), DELETE at masks and committed tokens (`delete`), both only
  while the step's edit budget (`max_per_step`: non-KEEP ops plus non-zero counts) is not spent, and DELETE
  only while the completion would keep `min_length` positions if the rest were kept;
- n_g <= min(K, max_length - running length), and n_g = 0 once the budget is spent.

Conditioning on earlier draws makes the limits exact: no draw is ever dropped or renormalised afterwards, so
the probability of a step's decisions is the product of these conditionals, KEEPs and zero counts included
(a decision with one legal choice has probability 1). `decision_logprobs` computes them from the actions,
vectorised, for the sampler and the trajectory estimator alike; `sample_edits` draws them in order.

Departures from AP-MDM: one categorical op (it has two independent bits, remask and delete) and an insert
count (its expansion bit is K = 1); delete may hit a committed token directly (AP-MDM remasks first); the
limits are conditionals rather than absent; decisions are sampled with log-probs rather than thresholded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batches import Decoding

KEEP, REMASK_OP, DELETE_OP = 0, 1, 2  # op indices: the edit head's first three logits
NUM_OPS = 3
NEG = float("-inf")


@dataclass(frozen=True)
class EditLimits:
    """What a step may do (from the rollout's settings, recorded in Trace.decoding)."""

    remask: bool  # REMASK is legal at committed tokens
    delete: bool  # DELETE is legal at masks and committed tokens
    max_insert: int  # K: masks opened after one gap owner in one step (0: no inserts)
    max_length: int  # the completion never exceeds this many positions
    max_per_step: int  # edits per row and step: non-KEEP ops plus non-zero insert counts
    min_length: int = 1  # DELETE never leaves fewer positions than this


def edit_limits(d: Decoding) -> EditLimits:
    """The limits a rollout's edit decisions were drawn under, from its recorded settings (Trace.decoding)."""
    return EditLimits(
        remask=True,
        delete=d.edit == "any",
        max_insert=d.edit_max_insert if d.edit == "any" else 0,
        max_length=d.edit_max_length,
        max_per_step=d.edit_max_per_step,
    )


@dataclass
class EditState:
    """The pre-step canvas a step decides on: [n, L] each (L = canvas capacity), length [n]."""

    is_mask: torch.Tensor  # bool: a [MASK] within the completion
    committed: torch.Tensor  # bool: a committed token within the completion
    length: torch.Tensor  # [n] long: completion length

    @property
    def valid(self) -> torch.Tensor:
        return self.is_mask | self.committed


def _op_legal(is_mask, committed, len_before, budget_before, lim: EditLimits) -> torch.Tensor:
    """[..., 3] bool: the legal ops at positions with these facts and running counters."""
    spare = budget_before > 0
    remask = committed & spare & lim.remask
    delete = (is_mask | committed) & spare & (len_before > lim.min_length) & lim.delete
    keep = is_mask | committed
    return torch.stack([keep, remask, delete], -1)


def _count_legal(exists, len_before, budget_before, lim: EditLimits) -> torch.Tensor:
    """[..., K+1] bool: the legal insert counts at gap owners with these facts and running counters."""
    n = torch.arange(lim.max_insert + 1, device=len_before.device)
    room = (lim.max_length - len_before).clamp(min=0)[..., None]
    ok = (n <= room) & ((n == 0) | (budget_before > 0)[..., None])
    return ok & (exists[..., None] | (n == 0))


def _running(state: EditState, ops: torch.Tensor, counts: torch.Tensor, lim: EditLimits):
    """Length and budget before every decision, in draw order: (op slots [n, L], count slots [n, L+1])."""
    n, L = ops.shape
    d_len = torch.stack([-(ops == DELETE_OP).long(), counts[:, 1:]], -1).reshape(n, 2 * L)
    d_len = torch.cat([counts[:, :1], d_len], 1)  # [n, 2L+1]: n_0, op_0, n_1, op_1, n_2, ...
    d_bud = torch.stack([(ops != KEEP).long(), (counts[:, 1:] > 0).long()], -1).reshape(n, 2 * L)
    d_bud = torch.cat([(counts[:, :1] > 0).long(), d_bud], 1)
    length = state.length[:, None] + d_len.cumsum(-1) - d_len
    budget = lim.max_per_step - (d_bud.cumsum(-1) - d_bud)
    return (length[:, 1::2], budget[:, 1::2]), (length[:, 0::2], budget[:, 0::2])


def legal_sets(state: EditState, ops: torch.Tensor, counts: torch.Tensor, lim: EditLimits):
    """The legal set of every decision of a step whose actions were `ops` [n, L] and `counts` [n, L+1]:
    (ops legal [n, L, 3], counts legal [n, L+1, K+1]). Positions outside the completion have no op decision
    (an all-False row; their action is KEEP) and gaps without an owner only the count 0."""
    (len_op, bud_op), (len_ct, bud_ct) = _running(state, ops, counts, lim)
    op_ok = _op_legal(state.is_mask, state.committed, len_op, bud_op, lim)
    owner = torch.cat([torch.ones_like(state.valid[:, :1]), state.valid & (ops != DELETE_OP)], 1)  # [n, L+1]
    return op_ok, _count_legal(owner, len_ct, bud_ct, lim)


def _masked_logp(logits: torch.Tensor, legal: torch.Tensor, temperature: float) -> torch.Tensor:
    z = logits.float() / temperature
    return z.masked_fill(~legal, NEG).log_softmax(-1)


def decision_logprobs(
    op_logits: torch.Tensor,
    ins_logits: torch.Tensor,
    state: EditState,
    ops: torch.Tensor,
    counts: torch.Tensor,
    lim: EditLimits,
    temperature: float,
):
    """log-prob of each decision of a step: (ops [n, L], counts [n, L+1]), 0 where there was no decision or
    only one legal choice, -inf for an action outside its legal set. op_logits [n, L, 3], ins_logits
    [n, L+1, >= K+1] (the head's; count logits beyond K are ignored). Differentiable in the logits.
    temperature 0 (argmax decisions): all 0."""
    if temperature <= 0:
        return torch.zeros(ops.shape, device=ops.device), torch.zeros(counts.shape, device=ops.device)
    op_ok, ct_ok = legal_sets(state, ops, counts, lim)
    has_op = op_ok.any(-1)
    op_lp = _masked_logp(op_logits, op_ok | ~has_op[..., None], temperature).gather(-1, ops[..., None])[..., 0]
    K = lim.max_insert
    ct_lp = _masked_logp(ins_logits[..., : K + 1], ct_ok, temperature).gather(-1, counts[..., None])[..., 0]
    none = torch.where(ops == KEEP, 0.0, NEG)  # no decision: only KEEP is possible there
    return torch.where(has_op, op_lp, none), ct_lp


def _draw(logits: torch.Tensor, legal: torch.Tensor, u: torch.Tensor, temperature: float) -> torch.Tensor:
    """One categorical draw per row over the legal entries: [n, C] -> [n] (inverse CDF of one uniform;
    argmax at temperature 0). A row with no legal entry returns 0."""
    if temperature <= 0:
        return logits.float().masked_fill(~legal, NEG).argmax(-1).masked_fill(~legal.any(-1), 0)
    p = _masked_logp(logits, legal | ~legal.any(-1, keepdim=True), temperature).double().exp()
    cdf = p.cumsum(-1)
    target = (u.double() * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
    return idx.masked_fill(~legal.any(-1), 0)


@torch.no_grad()
def sample_edits(
    op_logits: torch.Tensor,
    ins_logits: torch.Tensor,
    state: EditState,
    lim: EditLimits,
    temperature: float,
    u_op: torch.Tensor,
    u_ins: torch.Tensor,
):
    """Draw a step's decisions in order (see the module docstring): ops [n, L] long, counts [n, L+1] long.
    u_op [n, L], u_ins [n, L+1]: one uniform per decision (counter-based, so batch-invariant).

    A loop over the L positions, vectorised over rows: each draw's legal set depends on the draws before it
    (the budget and the length bounds). `decision_logprobs` scores the result."""
    n, L = state.is_mask.shape
    K = lim.max_insert
    ops = torch.zeros(n, L, dtype=torch.long, device=op_logits.device)
    counts = torch.zeros(n, L + 1, dtype=torch.long, device=op_logits.device)
    length = state.length.clone()
    budget = torch.full_like(length, lim.max_per_step)
    owner = torch.ones(n, dtype=torch.bool, device=ops.device)

    def count_at(g: int, exists: torch.Tensor) -> None:
        nonlocal length, budget
        if K == 0:
            return
        c = _draw(ins_logits[:, g, : K + 1], _count_legal(exists, length, budget, lim), u_ins[:, g], temperature)
        counts[:, g] = c
        length = length + c
        budget = budget - (c > 0).long()

    count_at(0, owner)
    for i in range(L):
        legal = _op_legal(state.is_mask[:, i], state.committed[:, i], length, budget, lim)
        o = _draw(op_logits[:, i], legal, u_op[:, i], temperature)
        ops[:, i] = o
        length = length - (o == DELETE_OP).long()
        budget = budget - (o != KEEP).long()
        count_at(i + 1, state.valid[:, i] & (o != DELETE_OP))
    return ops, counts
