"""Any-process decoding: a denoising loop whose learned edit head also remasks, deletes and inserts.

A fill-only masked diffusion model writes every cell once. With context S it can do at most polynomial serial
work, and its freedom of order adds nothing over left to right for a fixed number of tokens per step (AP-MDM,
arXiv 2510.06190). Remask frees cells for reuse, and insert / delete change the length: with them a model can
take back a wrong Sudoku digit, and need not know the length of a Countdown expression before writing it.

One step of a row, all decisions from one forward of the current canvas (`rollout.edit`: remask or any):
1. the edit head (policy.EditHead) scores an op per completion position (KEEP / REMASK / DELETE; REMASK only
   with edit=remask) and an insert count per gap owner (edit=any); the decisions are drawn in order under
   the step's limits (policy.edits: rollout.edit_max_per_step, the length bounds 1..max_completion_length,
   rollout.edit_max_insert), at rollout.edit_temperature;
2. the masks that were kept are filled as the fill-only engine fills them: kernels.choose_tokens draws a token
   at each, the commit rule (rollout.commit) says how many, the ordering rule (policy.orders) which; remasked
   positions and new masks wait for the next step;
3. the step applies together (batches.edit_canvas: AP-MDM's transition), and the row's canvas is compacted.
Edits are off on a row's last allowed step (rollout.steps + rollout.edit_extra_steps - 1). A row stops when
its canvas has no masks, unless edit_extra_steps > 0 and what the last step wrote has not been reviewed: a
step that edits nothing on a full canvas accepts it (AP-MDM's fixed point). So with edit_extra_steps 0 an
untrained head at edit_temperature 0 decodes exactly like the fill-only engine (tests/rollout/).

Every decision is in the trace (batches.Trace): COMMIT, REMASK, DELETE and INSERT events at pre-step
positions with their log-probs, and per step the edit decisions' total log-prob, KEEPs and zero counts
included, so the trajectory estimator (estimators/anyprocess.py) recomputes the probability of the whole
trajectory and GRPO trains when to edit.

Rows of a batch have different lengths: each row's canvas is [left pad | prompt | completion | right pad] of
fixed width, the attention mask hides both pads, and RoPE positions are the running count of real tokens, so
a row's logits do not depend on the others; every uniform is keyed by (row seed, row step, pre-step position,
stream), so rollouts stay batch-invariant.

Caches (rollout.cache): none is exact. prefix and dual keep the prompt's keys from the first forward and
re-forward the whole completion every step: edits only ever touch the completion, whose positions start
after the prompt's, so the cached keys stay exactly what the fill-only engine's prefix cache holds (the
same approximation for bidirectional models; with one block, dual has no suffix and equals prefix). The
exact block cache belongs to block-causal models, whose fixed attention blocks edits would reshuffle:
refused, as are several rollout blocks (v1 edits one block, the whole completion).

Departures from AP-MDM: masks are filled by the engine's commit and ordering rules rather than "every mask
not held back"; DELETE may hit a committed token directly; inserts are counts; decisions are sampled with
log-probs, under explicit limits and a step budget, from a prompt-conditioned canvas. Related schemes:
LLaDA2.1's token editing (arXiv 2602.08676), Edit Flows (arXiv 2506.09018), FlexMDM (arXiv 2509.01025).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from ..batches import COMMIT, DELETE, INSERT, REMASK, Decoding, RolloutBatch, StepStats, Trace
from ..config import EDIT_SAMPLER, RolloutConfig
from ..counter_rng import ORDER_STREAM, TOKEN_STREAM, row_seeds, uniform
from ..errors import ConfigError
from ..kernels import choose_tokens
from ..models.base import ModelTraits, traits, unwrap
from ..models.masks import padding_positions
from ..policy.edit_head import features
from ..policy.edits import DELETE_OP, KEEP, REMASK_OP, EditState, decision_logprobs, edit_limits, sample_edits
from ..policy.orders import ORDERS, OrderInputs
from ..policy.plackett_luce import gumbel_topk, plackett_luce_logprob, topk_positions
from .commit import COMMIT_RULES
from .trace import TraceRecorder, by_row

EDIT_STREAM, INSERT_STREAM = 5, 6  # counter_rng streams of the edit decisions (1-3 are the fill-only engine's)


def edit_decoding(cfg: RolloutConfig, base: Decoding) -> Decoding:
    """The fill-only engine's Decoding plus the edit settings (what Trace.decoding records)."""
    return replace(
        base,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        edit=cfg.edit,
        edit_temperature=cfg.edit_temperature,
        edit_max_per_step=cfg.edit_max_per_step,
        edit_max_insert=cfg.edit_max_insert,
        edit_max_length=cfg.max_completion_length,
    )


def check_edit_config(cfg: RolloutConfig, tr: ModelTraits, edit_policy) -> None:
    """What any-process decoding cannot do, named with the recipe key and the fix."""
    Lc = cfg.max_completion_length
    if edit_policy is None:
        raise ConfigError(
            f"rollout.edit={cfg.edit} needs an edit head: pass edit_policy= to generate() (the trainers and "
            f"`dllm-rl eval` build or load one: policy.edit_head_for), or set rollout.edit=none"
        )
    if tr.attention == "block_causal":
        raise ConfigError(
            "rollout.edit needs a bidirectional model: edits would move tokens across a block-causal model's "
            "fixed attention blocks (and rollout.cache=block cannot follow them); set rollout.edit=none"
        )
    if cfg.block_length not in (None, Lc):
        raise ConfigError(
            f"rollout.edit decodes one block, the whole completion: set rollout.block_length to null (or "
            f"{Lc}), not {cfg.block_length}"
        )
    if cfg.cache not in ("none", "prefix", "dual"):
        raise ConfigError(f"rollout.cache={cfg.cache} cannot follow edits; use rollout.cache=none (exact) or prefix")
    if cfg.min_p > 0 or cfg.repetition_penalty != 1.0:
        raise ConfigError(EDIT_SAMPLER)
    if cfg.self_correction:
        raise ConfigError(
            "rollout.self_correction is the fixed-rule remasking of the fill-only engine; with rollout.edit the "
            "edit head decides what to remask: set rollout.self_correction=false"
        )
    L0 = cfg.edit_initial_length or Lc
    if not 1 <= L0 <= Lc:
        raise ConfigError(
            f"rollout.edit_initial_length ({L0}) must be between 1 and rollout.max_completion_length ({Lc}), "
            f"the most the completion can grow to"
        )
    K = cfg.edit_max_insert if cfg.edit == "any" else 0
    if K > edit_policy.cfg.max_insert:
        raise ConfigError(
            f"rollout.edit_max_insert ({K}) exceeds what the edit head scores ({edit_policy.cfg.max_insert}); "
            f"lower it or train a head with more insert counts"
        )
    if cfg.edit_temperature < 0 or cfg.edit_max_per_step < 0 or cfg.edit_extra_steps < 0 or K < 0:
        raise ConfigError(
            "rollout.edit_temperature, edit_max_per_step, edit_max_insert and edit_extra_steps must be >= 0"
        )


class _Canvas:
    """The batch state: [left pad | prompt | completion (length[r]) | right pad] per row, W = P + capacity."""

    def __init__(self, prompt_ids, capacity: int, initial: int, mask_id: int, pad_id: int, device):
        self.N, self.P, self.C = len(prompt_ids), max(len(p) for p in prompt_ids), capacity
        self.W = self.P + capacity
        self.x = torch.full((self.N, self.W), pad_id, dtype=torch.long)
        self.prompt_attn = torch.zeros(self.N, self.P, dtype=torch.long)
        for i, ids in enumerate(prompt_ids):
            self.x[i, self.P - len(ids) : self.P] = torch.tensor(ids, dtype=torch.long)
            self.prompt_attn[i, self.P - len(ids) :] = 1
        self.x[:, self.P : self.P + initial] = mask_id
        self.x, self.prompt_attn = self.x.to(device), self.prompt_attn.to(device)
        self.length = torch.full((self.N,), initial, dtype=torch.long, device=device)
        self.pad_id, self.mask_id = pad_id, mask_id
        self.step = torch.zeros(self.N, dtype=torch.long, device=device)
        self.done = torch.zeros(self.N, dtype=torch.bool, device=device)
        self.review = torch.zeros(self.N, dtype=torch.bool, device=device)  # the canvas awaits an all-KEEP step
        self.commit_step = torch.full((self.N, capacity), -1, dtype=torch.long, device=device)
        self.token_lp = torch.zeros(self.N, capacity, device=device)

    def valid(self, rows=None) -> torch.Tensor:
        length = self.length if rows is None else self.length[rows]
        return torch.arange(self.C, device=length.device)[None, :] < length[:, None]  # [n, C]

    def attn(self) -> torch.Tensor:
        return torch.cat([self.prompt_attn, self.valid().long()], 1)  # [N, W]


@dataclass
class _Recorder(TraceRecorder):
    """The fill-only recorder's events and order log-probs, plus each step's length after it, whether it drew
    edits and their log-prob. The per-position fields follow the positions through edits (the sampler tracks
    them), so finish_edits() takes them as given."""

    _steps: list = field(default_factory=list)

    def add_step(self, rows, steps, length_after, edit_on, edit_lp) -> None:
        cols = torch.stack([rows, steps, length_after, edit_on.long()], -1)
        self._steps.append((cols.cpu(), edit_lp.float().cpu()))

    def finish_edits(self, c: _Canvas, initial: int) -> Trace:
        # TraceRecorder.finish reads each position's last event, which positions that move cannot use: build
        # the same events, event log-probs and order log-probs here, and take the tracked per-position fields
        events = torch.cat(self._events) if self._events else torch.zeros(0, 5, dtype=torch.long)
        ev_lp = torch.cat(self._logprobs) if self._logprobs else torch.zeros(0)
        events, ev_lp = by_row(events, ev_lp)
        S = int(c.step.max())
        order_lp = torch.zeros(c.N, S)
        if self._order:
            o = torch.cat(self._order)
            order_lp[o[:, 0].long(), o[:, 1].long()] = o[:, 2]
        lengths = torch.full((c.N, S + 1), initial, dtype=torch.long)
        edit_on = torch.zeros(c.N, S, dtype=torch.bool)
        edit_lp = torch.zeros(c.N, S)
        for cols, lp in self._steps:
            rows, steps, after, on = cols.unbind(-1)
            lengths[rows, steps + 1] = after
            edit_on[rows, steps] = on.bool()
            edit_lp[rows, steps] = lp
        for r in range(c.N):  # after a row's last step its length stays
            lengths[r, int(c.step[r]) + 1 :] = int(c.length[r])
        return Trace(
            c.commit_step.cpu(),
            c.token_lp.cpu(),
            order_lp,
            c.step.cpu(),
            events,
            ev_lp,
            self.mask_token_id,
            self.decoding,
            lengths=lengths,
            edit_on=edit_on,
            edit_logprob=edit_lp,
        )


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts,
    cfg: RolloutConfig,
    generator: torch.Generator | None = None,
    order_policy=None,
    record_states: bool = False,
    edit_policy=None,
) -> RolloutBatch:
    """rollout.engine.generate for rollout.edit = remask | any (same arguments, plus the edit head)."""
    from .engine import check_config, decode_ids, decoding  # engine dispatches here: import at call time

    tr = traits(model, tokenizer)
    ids = decode_ids(tokenizer, prompts, tr)
    check_config(cfg, tr, model, max(len(p) for p in ids), order_policy is not None)
    check_edit_config(cfg, tr, edit_policy)
    device = next(unwrap(model).parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    Lc = cfg.max_completion_length
    c = _Canvas(ids, Lc, cfg.edit_initial_length or Lc, tr.mask_token_id, pad_id, device)
    seeds = row_seeds(ids, generator).to(device)
    d = edit_decoding(cfg, decoding(cfg))
    rec = _Recorder(c.N, Lc, tr.mask_token_id, d)
    states: list[list[torch.Tensor]] | None = [[] for _ in range(c.N)] if record_states else None
    cache = unwrap(model).new_cache(c.N, c.W) if cfg.cache != "none" else None
    stats = {"forwards": 0, "query_tokens": 0, "edits": 0}
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        while _step(model, c, cfg, d, tr, seeds, cache, rec, states, order_policy, edit_policy, stats):
            pass
    finally:
        model.train(was_training)
    stats["seconds"] = time.perf_counter() - t0
    trace = rec.finish_edits(c, cfg.edit_initial_length or Lc)
    return _finish(c, tokenizer, trace, stats, states)


def _forward(model, c: _Canvas, rows, cache, first: bool, shift: int):
    """Logits at the completion [n, C, V], the last hidden states they are read from [n, C, D] (for
    logits-shifted models the position before each slot, as the fill-only engine shows the order head), and the
    number of query positions. With a cache, as the fill-only engine's prefix plan: the first forward writes every
    position, later ones re-forward the completion (from the position before it for logits-shifted models)."""
    sub = lambda t: t[rows]
    attn = c.attn()
    q0 = 0 if cache is None or first else c.P - shift
    out = model(
        input_ids=sub(c.x)[:, q0:],
        attention_mask=sub(attn),
        position_ids=sub(padding_positions(attn))[:, q0:],
        kv_cache=cache,
        cache_start=q0,
        kv_len=c.W,
        cache_rows=rows if cache is not None else None,
        logits_range=(c.P - shift - q0, c.W - shift - q0),
        output_hidden_states=True,
    )
    return out.logits, out.hidden_states[-1][:, c.P - shift - q0 : c.W - shift - q0], c.W - q0


def _step(model, c: _Canvas, cfg, d, tr, seeds, cache, rec, states, order_policy, edit_policy, stats) -> bool:
    """One step of every active row; False when no row is active."""
    T = cfg.steps + cfg.edit_extra_steps
    mask_id = tr.mask_token_id
    comp_all = c.x[:, c.P :]
    has_mask = ((comp_all == mask_id) & c.valid()).any(-1)
    review = c.review & (c.step < T - 1) & (cfg.edit_extra_steps > 0)
    active = ~c.done & (has_mask | review)
    c.done |= ~active
    if not active.any():
        return False
    r_idx = active.nonzero().squeeze(-1)
    logits, hidden, q = _forward(model, c, r_idx, cache, stats["forwards"] == 0, tr.logits_shift)
    stats["forwards"] += 1
    stats["query_tokens"] += len(r_idx) * q

    n, C = len(r_idx), c.C
    comp = c.x[r_idx, c.P :]  # [n, C]
    valid = c.valid(r_idx)
    is_mask = (comp == mask_id) & valid
    step = c.step[r_idx]
    offsets = torch.arange(C, device=comp.device)[None, :]  # [1, C] pre-step completion positions
    state = EditState(is_mask, valid & ~is_mask, c.length[r_idx])
    ops, counts, op_lp, ct_lp, on = _edits(d, logits, hidden, comp, state, seeds[r_idx], step, T, edit_policy, mask_id)

    cand = is_mask & (ops == KEEP)  # masks kept this step: the ones that may be filled now
    u_tok = uniform(seeds[r_idx], step, offsets.expand(n, -1), TOKEN_STREAM)
    choice = choose_tokens(logits[cand], u_tok[cand], cfg.temperature, cfg.top_k, cfg.top_p, mask_id)
    st = StepStats.scatter(choice, cand, mask_id)
    st.steps_left = (cfg.steps - step).clamp(min=1)
    st.progress = state.committed.float().sum(-1) / state.length.float()
    k = COMMIT_RULES[cfg.commit](st, cfg).clamp(max=cand.sum(-1))
    u_ord = uniform(seeds[r_idx], step, offsets.expand(n, -1), ORDER_STREAM)
    # a learned order head reads every slot of the canvas: its padding is zeroed, so the trajectory estimator,
    # whose views are padded with other tokens, replays the same scores
    seen = hidden * valid[..., None]
    scores = ORDERS[cfg.order].scores(OrderInputs(st, offsets, u_ord, seen, order_policy))
    if cfg.order_temperature > 0:
        u_g = uniform(seeds[r_idx], step, offsets.expand(n, -1), ORDER_STREAM + 1)
        chosen, ok = gumbel_topk(scores / cfg.order_temperature, cand, k, u_g)
        rec.add_order(r_idx, step, plackett_luce_logprob(scores / cfg.order_temperature, cand, chosen, ok))
    else:
        chosen, ok = topk_positions(scores, cand, k)
    sel = torch.zeros_like(cand).scatter_(1, chosen, ok)  # [n, C] filled now

    rr = torch.arange(n, device=chosen.device)[:, None].expand_as(chosen)[ok]
    cc = chosen[ok]
    rec.add(r_idx[rr], step[rr], cc, st.token[rr, cc], COMMIT, st.logprob[rr, cc])
    _record_edits(rec, r_idx, step, comp, ops, counts, op_lp, ct_lp, mask_id)
    stats["edits"] += int((ops != KEEP).sum() + (counts > 0).sum())

    remask = ops == REMASK_OP
    new = torch.where(sel, st.token, torch.where(remask, torch.full_like(comp, mask_id), comp))
    cstep = torch.where(sel, step[:, None], torch.where(remask, -1, c.commit_step[r_idx]))
    tlp = torch.where(sel, st.logprob, torch.where(remask, 0.0, c.token_lp[r_idx]))
    new, length, (cstep, tlp) = _compact(new, valid, ops, counts, mask_id, c.pad_id, [(cstep, -1), (tlp, 0.0)])
    c.x[r_idx, c.P :], c.length[r_idx] = new, length
    c.commit_step[r_idx], c.token_lp[r_idx] = cstep, tlp
    edited = (ops != KEEP).any(-1) | (counts > 0).any(-1)
    c.review[r_idx] = edited | sel.any(-1)  # an all-KEEP step that fills nothing accepts the canvas
    c.step[r_idx] += 1
    rec.add_step(r_idx, step, length, on, op_lp.sum(-1) + ct_lp.sum(-1))
    if states is not None:
        for j, r in enumerate(r_idx.tolist()):
            states[r].append(new[j, : int(length[j])].cpu().clone())
    return True


def _edits(d: Decoding, logits, hidden, comp, state: EditState, seeds, step, T: int, edit_policy, mask_id: int):
    """The step's edit decisions: ops [n, C], counts [n, C+1], their log-probs, and which rows drew them [n]."""
    n, C = comp.shape
    on = step < T - 1  # a row's last allowed step fills what is left, without edits
    ops = torch.zeros(n, C, dtype=torch.long, device=comp.device)
    counts = torch.zeros(n, C + 1, dtype=torch.long, device=comp.device)
    op_lp, ct_lp = torch.zeros(n, C, device=comp.device), torch.zeros(n, C + 1, device=comp.device)
    if not on.any():
        return ops, counts, op_lp, ct_lp, on
    lim = edit_limits(d)
    valid = state.valid
    op_logits, ins_logits = edit_policy(hidden, features(logits, comp, valid, mask_id), valid)
    offsets = torch.arange(C + 1, device=comp.device)[None, :].expand(n, -1)
    u_op = uniform(seeds, step, offsets[:, :C], EDIT_STREAM)
    u_ins = uniform(seeds, step, offsets, INSERT_STREAM)
    o, k = sample_edits(op_logits, ins_logits, state, lim, d.edit_temperature, u_op, u_ins)
    ops = torch.where(on[:, None], o, ops)
    counts = torch.where(on[:, None], k, counts)
    a, b = decision_logprobs(op_logits, ins_logits, state, ops, counts, lim, d.edit_temperature)
    return ops, counts, a * on[:, None], b * on[:, None], on


def _record_edits(rec, r_idx, step, comp, ops, counts, op_lp, ct_lp, mask_id: int) -> None:
    for op, kind in ((REMASK_OP, REMASK), (DELETE_OP, DELETE)):
        rr, ii = (ops == op).nonzero(as_tuple=True)
        tok = torch.full_like(rr, mask_id) if kind == REMASK else comp[rr, ii]
        rec.add(r_idx[rr], step[rr], ii, tok, kind, op_lp[rr, ii])
    rr, gg = (counts > 0).nonzero(as_tuple=True)
    rec.add(r_idx[rr], step[rr], gg - 1, counts[rr, gg], INSERT, ct_lp[rr, gg])


def _compact(tokens, valid, ops, counts, mask_id: int, pad_id: int, carried):
    """Apply a step's deletions and insertions to rows [n, C] (tokens already hold the step's fills and remasks):
    position i moves to counts[0] + (sum over kept j < i of 1 + counts[j+1]); inserted slots are masks.
    carried: [(per-position tensor, fill for new slots)] moved the same way. Returns (tokens, lengths, carried)."""
    n, C = tokens.shape
    keep = valid & (ops != DELETE_OP)
    emit = torch.where(keep, 1 + counts[:, 1:], torch.zeros_like(counts[:, 1:]))
    start = counts[:, :1] + emit.cumsum(-1) - emit  # [n, C] new index of each kept position
    length = counts[:, 0] + emit.sum(-1)
    inside = torch.arange(C, device=tokens.device)[None, :] < length[:, None]
    rr, ii = keep.nonzero(as_tuple=True)
    dest = start[rr, ii]

    def move(t, fill, default):
        out = torch.where(inside, torch.full_like(t, fill), torch.full_like(t, default))
        out[rr, dest] = t[rr, ii]
        return out

    return move(tokens, mask_id, pad_id), length, [move(t, f, f) for t, f in carried]


def _finish(c: _Canvas, tokenizer, trace: Trace, stats: dict, states) -> RolloutBatch:
    """The final canvases as fill-only completions: [N, capacity], EOS after each row's length (the fill-only
    engine's EOS padding), completion_mask up to and including the first EOS."""
    eos = tokenizer.eos_token_id
    comp = c.x[:, c.P :].clone()
    valid = c.valid()
    if eos is not None:
        comp = torch.where(valid, comp, torch.full_like(comp, eos))
        is_eos = (comp == eos).long()
        completion_mask = ((is_eos.cumsum(-1) - is_eos) == 0).long()
        text_mask = completion_mask.bool() & ~is_eos.bool()
    else:
        completion_mask = valid.long()
        text_mask = valid
    texts = [
        tokenizer.decode(row[keep].tolist(), skip_special_tokens=True) for row, keep in zip(comp.cpu(), text_mask.cpu())
    ]
    stats["committed_tokens"] = int((trace.commit_step >= 0).sum())
    stats["lengths"] = c.length.cpu()
    if states is not None:
        stats["states"] = states
    return RolloutBatch(
        prompt_ids=c.x[:, : c.P],
        prompt_mask=c.prompt_attn,
        completion_ids=comp,
        completion_mask=completion_mask,
        completions=texts,
        trace=trace,
        stats=stats,
    )
