"""Trajectory likelihood of any-process rollouts: every decision of every step, replayed from the trace.

An any-process rollout (rollout/anyprocess.py, AP-MDM arXiv 2510.06190) decides at each step, from one
forward of the canvas before the step: an op at every completion position and an insert count at every gap
(KEEP and 0 included: they are decisions too), which kept masks to fill (the ordering rule, when sampled) and
the token at each. The probability of the whole trajectory is the product over steps of
    prod_ops p(op) * prod_gaps p(count | earlier decisions) * P_order(chosen | candidates) * prod_fills p(token),
every factor a function of the pre-step canvas or of decisions already drawn in the step. This estimator
rebuilds each pre-step canvas from the trace (batches.Trace.replay: inserts and deletes included), forwards it
(one view per step, right-padded with its attention mask, as the sampler did) and returns that log-probability
per step: Estimate.logps [N, S] with Estimate.mask [N, S] (the steps a row took), so the sequence sum is
log P(trajectory) and its gradient the policy gradient (GRPO then trains when to remask, insert and delete,
alongside what to write). Tokens are scored at the sampler's temperature, top_k and top_p; tokens committed
and later taken back or deleted count too (they were decisions). The edit terms need the edit head (their
gradient reaches the head: it reads the hidden states detached); a learned order needs the order head.

Exact (tests/estimators/test_anyprocess_likelihood.py enumerates a tiny case) when the commit count and the order do
not depend on tokens drawn at positions that were not committed: commit=top_k with an order of the state
(top_prob, margin, entropy, left_to_right, random, policy), as for the fill-only trajectory estimator. For
rollout.order=random, whose keys are uniform noise, each step's order term is the uniform draw order's constant,
with or without order_temperature. Views are full forwards of each pre-step canvas: a rollout decoded with an
approximate KV cache (rollout.cache=prefix or dual, Fast-dLLM's) drew from slightly different logits, and its
recorded log-probs differ from these by that approximation (rollout.cache=none decodes exactly what is
scored). In GRPO the reference model's edit terms are scored with the current edit head (there is no reference
head), so the KL term does not hold the edit head near its start.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from ..batches import COMMIT, DELETE, INSERT, REMASK
from ..errors import ConfigError
from ..kernels.sampling import sampling_logprobs
from ..models.masks import padding_positions
from ..policy.edit_head import features
from ..policy.edits import DELETE_OP, REMASK_OP, EditState, decision_logprobs, edit_limits
from ..policy.order_head import stats_from_logits
from ..policy.orders import ORDERS, model_order_scores
from ..policy.plackett_luce import plackett_luce_logprob
from .base import Estimate, Noise


def draw(batch) -> Noise:
    """One view per step: view s holds every row's canvas before its step s (tokens [S, N, C], right-padded),
    weights 1 on its positions for rows that took step s (so a view's lengths are its weights' sums)."""
    trace = batch.trace
    N, C = batch.completion_ids.shape
    S = trace.edit_on.shape[1]
    tokens = torch.zeros(S, N, C, dtype=torch.long)
    weights = torch.zeros(S, N, C)
    mask_id = trace.mask_token_id
    for r in range(N):
        canvases = [torch.full((int(trace.lengths[r, 0]),), mask_id, dtype=torch.long)] + trace.replay(r)
        for s in range(int(trace.num_steps[r])):
            L = len(canvases[s])
            tokens[s, r, :L] = canvases[s]
            weights[s, r, :L] = 1.0
    return Noise((tokens == mask_id) & (weights > 0), None, weights, tokens)


def _view(model, prompt, prompt_mask, canvas, valid, shift: int, hidden: bool):
    """Logits at the completion [N, C, V] and (hidden) the last hidden states they are read from [N, C, D] (the
    position before each slot for logits-shifted models, as the sampler shows them to the heads) for one view."""
    P, C = prompt.shape[1], canvas.shape[1]
    attn = torch.cat([prompt_mask, valid.long()], 1)
    out = model(
        input_ids=torch.cat([prompt, canvas], 1),
        attention_mask=attn,
        position_ids=padding_positions(attn),
        logits_range=(P - shift, P + C - shift),
        output_hidden_states=hidden,
    )
    return out.logits, out.hidden_states[-1][:, P - shift : P + C - shift] if hidden else None


def _step_events(events: torch.Tensor, step: int, N: int, C: int):
    """A step's decisions as tensors: ops [N, C], counts [N, C+1], and its fills in draw order (rows, pos, tok)."""
    ev = events[events[:, 1] == step]
    rows, pos, tok, kind = ev[:, 0], ev[:, 2], ev[:, 3], ev[:, 4]
    ops = torch.zeros(N, C, dtype=torch.long)
    counts = torch.zeros(N, C + 1, dtype=torch.long)
    for k, op in ((REMASK, REMASK_OP), (DELETE, DELETE_OP)):
        ops[rows[kind == k], pos[kind == k]] = op
    ins = kind == INSERT
    counts[rows[ins], pos[ins] + 1] = tok[ins]
    fill = kind == COMMIT
    return ops, counts, (rows[fill], pos[fill], tok[fill])


def _draw_order(rows: torch.Tensor, pos: torch.Tensor, N: int):
    """The positions each row filled, in draw order (events are recorded row by row): chosen, valid [N, kmax]."""
    counts = torch.bincount(rows, minlength=N)
    kmax = int(counts.max()) if len(rows) else 0
    rank = torch.arange(len(rows)) - (torch.cumsum(counts, 0) - counts)[rows]
    chosen = torch.zeros(N, kmax, dtype=torch.long)
    valid = torch.zeros(N, kmax, dtype=torch.bool)
    chosen[rows, rank] = pos
    valid[rows, rank] = True
    return chosen, valid


def estimate(model, batch, noise: Noise, tr, order_policy=None, edit_policy=None) -> Estimate:
    """log P(step s of row r's trajectory) [N, S], with gradient when enabled (module docstring)."""
    trace, d = batch.trace, batch.trace.decoding
    if edit_policy is None and trace.edit_on.any():
        raise ConfigError(
            f"estimator.name=trajectory scores rollout.edit={d.edit} decisions with the edit head: pass "
            f"edit_policy= (the GRPO trainer does)"
        )
    rule = ORDERS[d.order]
    sampled_order = d.order_temperature > 0
    if sampled_order and rule.replay == "learned" and order_policy is None:
        raise ConfigError(f"rollout.order={d.order} is scored with the learned order head: pass order_policy=")
    device = batch.completion_ids.device
    N, C = batch.completion_ids.shape
    S = noise.num_views
    mask_id, shift = tr.mask_token_id, tr.logits_shift
    events = trace.events.cpu()
    lim = edit_limits(d)
    checkpointed = torch.is_grad_enabled() and S > 1
    steps = []
    for s in range(S):
        valid = noise.weights[s].to(device) > 0  # [N, C]
        took = valid.any(-1)  # rows that took step s
        if not took.any():
            steps.append(torch.zeros(N, device=device))
            continue
        canvas = noise.tokens[s].to(device)
        args = (model, batch.prompt_ids, batch.prompt_mask, canvas, valid, shift, True)
        logits, hidden = (
            torch.utils.checkpoint.checkpoint(_view, *args, use_reentrant=False) if checkpointed else _view(*args)
        )
        ops, counts, (rows, pos, tok) = _step_events(events, s, N, C)
        ops, counts = ops.to(device), counts.to(device)
        total = torch.zeros(N, device=device)
        # the fills: each committed token under the distribution it was drawn from
        if len(rows):
            # greedy fills (temperature 0): the model's own distribution, unfiltered, as the sampler records it
            lp = sampling_logprobs(logits[rows.to(device), pos.to(device)], d.temperature, d.top_k, d.top_p, mask_id)
            total = total.index_add(0, rows.to(device), lp.gather(-1, tok.to(device)[:, None])[:, 0])
        is_mask = (canvas == mask_id) & valid
        candidates = is_mask & (ops == 0)  # masks kept this step: the ones the order chose from
        if sampled_order or rule.replay == "uniform":  # random: uniform draw orders, greedy or sampled alike
            total = total + _order_logprob(logits, hidden, valid, candidates, rows, pos, N, d, order_policy, mask_id)
        on = trace.edit_on[:, s].to(device)
        if on.any():
            state = EditState(is_mask, valid & ~is_mask, valid.sum(-1))
            op_logits, ins_logits = edit_policy(hidden, features(logits, canvas, valid, mask_id), valid)
            a, b = decision_logprobs(op_logits, ins_logits, state, ops, counts, lim, d.edit_temperature)
            total = total + torch.where(on, a.sum(-1) + b.sum(-1), torch.zeros_like(total))
        steps.append(torch.where(took, total, torch.zeros_like(total)))
    logps = torch.stack(steps, -1)  # [N, S]
    return Estimate(logps, mask=counted(noise).to(device))


def counted(noise: Noise) -> torch.Tensor:
    """[N, S]: the steps each row took (the entries of its Estimate)."""
    return (noise.weights.sum(-1) > 0).T


def _order_logprob(logits, hidden, valid, candidates, rows, pos, N: int, d, order_policy, mask_id: int):
    """Each row's Plackett-Luce log-prob of the positions it filled, in draw order, among the candidates: [N]."""
    device = logits.device
    chosen, ok = _draw_order(rows, pos, N)
    chosen, ok = chosen.to(device), ok.to(device)
    rule = ORDERS[d.order]
    C = candidates.shape[1]
    if rule.replay == "uniform":  # uniform keys: every draw order equally likely
        n, k = candidates.sum(-1).double(), ok.sum(-1).double()
        return (torch.lgamma(n - k + 1) - torch.lgamma(n + 1)).float()
    if rule.replay == "model":
        scores = model_order_scores(logits, mask_id, d.order)
    elif rule.replay == "learned":
        offsets = torch.arange(C, device=device)[None, :]
        seen = hidden * valid[..., None]  # the padding zeroed, as the sampler shows it to the head
        scores = order_policy(seen, stats_from_logits(logits, candidates, mask_id), offsets)
    elif rule.replay == "fixed":  # left_to_right
        scores = -torch.arange(C, device=device).float().expand(N, C)
    else:
        raise ConfigError(
            f"estimator.name=trajectory cannot replay a sampled rollout.order={d.order}: its scores depend on "
            "tokens drawn at positions that were not filled; use rollout.order=top_prob (or margin, entropy)"
        )
    return plackett_luce_logprob(scores / d.order_temperature, candidates, chosen, ok)
