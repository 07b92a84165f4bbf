"""The host-driven denoising loop the engine's static step replaced: the oracle tests/rollout compares the
engine against, and the baseline of benchmarks/decode_proxies.py.

Semi-autoregressive blocks (LLaDA arXiv 2502.09992) decoded in lockstep across the batch: every row works
on block b; a row that finished the block waits without being forwarded; a row whose finished blocks
contain EOS stops and is never forwarded again (its later blocks are filled with EOS). Each step forwards
the slice its cache plan asks for (cache_plans.CACHE_PLANS) for the rows still decoding (a data-dependent
subset), draws a token for every masked position of the active block (kernels.choose_tokens), asks the
commit rule how many to commit and the ordering rule which, optionally takes back low-probability commits,
and records everything as it goes. The host reads the device ~16 times per step (which rows are active,
how many positions to rank, the events of the trace): on a GPU each read stalls it, which is why the engine
(rollout.engine, rollout.step) decides everything on the device instead; the decisions are the same.

Randomness comes from the caller's generator through counter-based hashing (counter_rng.py): batch-invariant.
"""

from __future__ import annotations

import time

import torch

from ..batches import COMMIT, FILL, REMASK, RolloutBatch, StepStats
from ..config import RolloutConfig
from ..counter_rng import ORDER_STREAM, TOKEN_STREAM, row_seeds, uniform
from ..kernels import choose_tokens  # fused Triton on CUDA, kernels.sampling.choose_tokens elsewhere
from ..kernels.sampling import repetition_context, sampling_logprobs
from ..models.base import ModelTraits, traits, unwrap
from ..models.masks import block_ids, mask_from_block_ids, padding_positions
from ..policy.orders import ORDERS, OrderInputs
from ..policy.plackett_luce import gumbel_topk, plackett_luce_logprob, topk_positions
from .cache_plans import CACHE_PLANS
from .commit import COMMIT_RULES
from .engine import OrderPolicy, _compiled, check_config, decode_ids, decoding, finish_batch
from .remask import self_correction
from .trace import TraceRecorder


class _Canvas:
    """The batch state: canvas tokens, masks and positions, and the per-row counters."""

    def __init__(self, prompt_ids: list[list[int]], Lc: int, tr: ModelTraits, pad_id: int, device):
        self.N, self.P, self.Lc = len(prompt_ids), max(len(p) for p in prompt_ids), Lc
        self.L = self.P + Lc
        x = torch.full((self.N, self.L), pad_id, dtype=torch.long)
        attn = torch.zeros(self.N, self.L, dtype=torch.long)
        for i, ids in enumerate(prompt_ids):
            x[i, self.P - len(ids) : self.P] = torch.tensor(ids, dtype=torch.long)
            attn[i, self.P - len(ids) :] = 1
        x[:, self.P :] = tr.mask_token_id
        self.x, self.attn = x.to(device), attn.to(device)
        self.pos = padding_positions(self.attn)  # [N, L]
        self.causal = tr.attention == "block_causal"
        self.bid = block_ids(self.attn, self.P, tr.block_size) if self.causal else None
        self.step = torch.zeros(self.N, dtype=torch.long, device=device)  # per-row step counter
        self.done = torch.zeros(self.N, dtype=torch.bool, device=device)


@torch.no_grad()
def generate_host_loop(
    model,
    tokenizer,
    prompts,
    cfg: RolloutConfig,
    generator: torch.Generator | None = None,
    order_policy: OrderPolicy | None = None,
    record_states: bool = False,
    forced: torch.Tensor | None = None,
) -> RolloutBatch:
    """`rollout.generate` as the host-driven loop (the same arguments and, up to float rounding, the same result).

    Args:
        model: a diffusion LM following models.base's protocol (tiny, LLaDA, Dream, or the HF wrapper).
        tokenizer: its tokenizer (chat template, pad/eos/mask tokens).
        prompts: list of prompts of any lengths.
        cfg: the `rollout:` section of a recipe.
        generator: the only source of randomness (same prompt + same generator state = same completion; None: one
            draw from torch's global generator).
        order_policy: the learned unmasking policy (policy.OrderHead) for rules that need one (rollout.order=policy).
        record_states: also return every intermediate completion canvas (stats["states"]; for tests).
        forced: [F, 4] long (row, step, position, token): decisions imposed on the rollout. A row's step that has
            forced entries commits exactly those tokens at those (masked) completion positions instead of what
            the commit and order rules choose; its other steps decode as usual. The trace records them as the
            step's commits, with the sampler's log-prob of each forced token. Branch search (rollout.branch:
            a greedy decode's prefix, one decision changed, then greedy again) is what it is for; it needs a
            state-only order (order_temperature 0) and no self-correction or repetition penalty.
    """
    if forced is not None and (cfg.order_temperature > 0 or cfg.self_correction or cfg.repetition_penalty != 1):
        raise ValueError(
            "forced decisions need rollout.order_temperature=0, self_correction=false and repetition_penalty=1"
        )
    tr = traits(model, tokenizer)
    ids = decode_ids(tokenizer, prompts, tr)
    check_config(cfg, tr, model, max(len(p) for p in ids), order_policy is not None)
    device = next(unwrap(model).parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    c = _Canvas(ids, cfg.max_completion_length, tr, pad_id, device)
    seeds = row_seeds(ids, generator).to(device)
    rec = TraceRecorder(c.N, c.Lc, tr.mask_token_id, decoding(cfg))
    states: list[list[torch.Tensor]] = [[] for _ in range(c.N)]
    Lb = cfg.block_length or c.Lc
    steps_per_block = cfg.steps // (c.Lc // Lb)
    cache = unwrap(model).new_cache(c.N, c.L) if cfg.cache != "none" else None
    forward = _compiled(model, cfg.compile)
    if cache is not None and cfg.compile != "none":
        cache.mark_static()
    stats = {"forwards": 0, "query_tokens": 0}
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        prev_bs = 0
        for bs in range(c.P, c.L, Lb):
            _decode_block(
                forward,
                c,
                cfg,
                tr,
                bs,
                bs + Lb,
                prev_bs,
                steps_per_block,
                seeds,
                cache,
                rec,
                states if record_states else None,
                order_policy,
                stats,
                forced,
            )
            if cfg.stop_at_eos and tokenizer.eos_token_id is not None:
                _stop_finished_rows(c, bs + Lb, tokenizer.eos_token_id, rec, states if record_states else None)
            prev_bs = bs
            if c.done.all():
                break
    finally:
        model.train(was_training)
    stats["seconds"] = time.perf_counter() - t0
    return _finish(c, tokenizer, rec, stats, states if record_states else None)


def _forward(model, c: _Canvas, rows, plan, cache, lo: int, hi: int, want_hidden: bool):
    sub = lambda t: t if rows is None else t[rows]
    qs, qe, kv = plan.q_start, plan.q_end, plan.kv_len
    if c.causal:
        bid = sub(c.bid)
        mask = mask_from_block_ids(bid[:, qs:qe], bid[:, :kv], causal_blocks=True)
    else:
        mask = sub(c.attn)[:, :kv]
    out = model(
        input_ids=sub(c.x)[:, qs:qe],
        attention_mask=mask,
        position_ids=sub(c.pos)[:, qs:qe],
        kv_cache=cache if plan.use_cache else None,
        cache_start=qs,
        kv_len=kv,
        cache_rows=rows if plan.use_cache else None,
        logits_range=(lo - qs, hi - qs),
        output_hidden_states=want_hidden,
    )
    hidden = out.hidden_states[-1][:, lo - qs : hi - qs] if want_hidden else None
    return out.logits, hidden  # [n, Lb, V], [n, Lb, D]


def _decode_block(
    model, c: _Canvas, cfg, tr, bs, be, prev_bs, steps_per_block, seeds, cache, rec, states, order_policy, stats, forced
):
    shift = tr.logits_shift
    offsets = torch.arange(bs - c.P, be - c.P, device=c.x.device)[None, :]  # [1, Lb] completion offsets
    block_step = torch.zeros(c.N, dtype=torch.long, device=c.x.device)
    first = True
    while True:
        masked_all = c.x[:, bs:be] == tr.mask_token_id  # [N, Lb]
        active = ~c.done & masked_all.any(-1)
        if not active.any():
            return
        rows = None if bool(active.all()) else active.nonzero().squeeze(-1)
        r_idx = torch.arange(c.N, device=c.x.device) if rows is None else rows
        plan = CACHE_PLANS[cfg.cache](c.L, bs, be, prev_bs, first)
        if plan.q_start > bs - shift:  # logits-shifted models read the position before the block
            plan = type(plan)(bs - shift, plan.q_end, plan.kv_len, plan.use_cache)
        logits, hidden = _forward(model, c, rows, plan, cache, bs - shift, be - shift, ORDERS[cfg.order].needs_hidden)
        stats["forwards"] += 1
        stats["query_tokens"] += len(r_idx) * (plan.q_end - plan.q_start)
        first = False

        m = masked_all[r_idx]  # [n, Lb]
        step = c.step[r_idx]
        u_tok = uniform(seeds[r_idx], step, offsets.expand(len(r_idx), -1), TOKEN_STREAM)
        choice = choose_tokens(
            logits[m],
            u_tok[m],
            cfg.temperature,
            cfg.top_k,
            cfg.top_p,
            tr.mask_token_id,
            cfg.min_p,
            cfg.repetition_penalty,
            repetition_context(c.x[r_idx], c.attn[r_idx], tr.mask_token_id, m) if cfg.repetition_penalty != 1 else None,
        )
        st = StepStats.scatter(choice, m, tr.mask_token_id)
        st.steps_left = (steps_per_block - block_step[r_idx]).clamp(min=1)
        st.progress = (c.x[r_idx, c.P :] != tr.mask_token_id).float().mean(-1)

        k = COMMIT_RULES[cfg.commit](st, cfg).clamp(max=m.sum(-1))  # [n]
        u_ord = uniform(seeds[r_idx], step, offsets.expand(len(r_idx), -1), ORDER_STREAM)
        scores = ORDERS[cfg.order].scores(OrderInputs(st, offsets, u_ord, hidden, order_policy))
        temp = cfg.order_temperature
        if temp > 0:
            u_g = uniform(seeds[r_idx], step, offsets.expand(len(r_idx), -1), ORDER_STREAM + 1)
            chosen, valid = gumbel_topk(scores / temp, m, k, u_g)
            rec.add_order(r_idx, step, plackett_luce_logprob(scores / temp, m, chosen, valid))
        else:
            chosen, valid = topk_positions(scores, m, k)
        sel = torch.zeros_like(m).scatter_(1, chosen, valid)  # [n, Lb] positions committed now
        # commits are recorded in draw order (row by row): a sampled order's Plackett-Luce log-prob depends on
        # it, and the trajectory estimator reads it back from the trace
        rr = torch.arange(len(r_idx), device=chosen.device)[:, None].expand_as(chosen)[valid]
        cc = chosen[valid]
        if forced is not None:
            rr, cc = _force(forced, c, cfg, tr, r_idx, step, bs, be, logits, m, sel, st, rr, cc)

        blk = c.x[r_idx, bs:be]
        new_blk = torch.where(sel, st.token, blk)
        rec.add(r_idx[rr], step[rr], offsets[0, cc], st.token[rr, cc], COMMIT, st.logprob[rr, cc])
        if cfg.self_correction:
            committed_before = ~m & (blk != tr.mask_token_id)
            prob = logits.float().log_softmax(-1).gather(-1, blk.clamp(min=0)[..., None]).squeeze(-1).exp()
            back = self_correction(prob, committed_before, cfg.correction_threshold, cfg.correction_max_per_step)
            back &= (st.steps_left > 1)[:, None]
            new_blk = torch.where(back, torch.full_like(new_blk, tr.mask_token_id), new_blk)
            rr, cc = back.nonzero(as_tuple=True)
            rec.add(r_idx[rr], step[rr], offsets[0, cc], torch.full_like(rr, tr.mask_token_id), REMASK)
        c.x[r_idx, bs:be] = new_blk
        c.step[r_idx] += 1
        block_step[r_idx] += 1
        if states is not None:
            for r in r_idx.tolist():
                states[r].append(c.x[r, c.P :].cpu().clone())


def _force(forced, c: _Canvas, cfg, tr, r_idx, step, bs, be, logits, m, sel, st, rr, cc):
    """Impose the forced decisions of this step (generate_host_loop's `forced`) on `sel` and `st` in place; returns
    the (row, column) pairs to record, the rules' choices for the other rows, then the forced ones."""
    local = torch.full((c.N,), -1, dtype=torch.long, device=c.x.device)
    local[r_idx] = torch.arange(len(r_idx), device=c.x.device)
    f = forced.to(c.x.device)
    lr = local[f[:, 0]]
    col = f[:, 2] - (bs - c.P)
    hit = (lr >= 0) & (step[lr.clamp(min=0)] == f[:, 1])  # this step's forced decisions of the rows decoded now
    f_row, f_col, tok = lr[hit], col[hit], f[hit, 3]
    if not len(f_row):
        return rr, cc
    if ((f_col < 0) | (f_col >= be - bs)).any() or not m[f_row, f_col.clamp(0, be - bs - 1)].all():
        raise ValueError("a forced decision names a position outside the active block or one already committed")
    rows = torch.zeros(len(r_idx), dtype=torch.bool, device=c.x.device)
    rows[f_row] = True
    sel[rows] = False
    sel[f_row, f_col] = True
    lp = sampling_logprobs(logits[f_row, f_col], cfg.temperature, cfg.top_k, cfg.top_p, tr.mask_token_id, cfg.min_p)
    st.token[f_row, f_col] = tok
    st.logprob[f_row, f_col] = lp.gather(-1, tok[:, None]).squeeze(-1)
    keep = ~rows[rr]
    return torch.cat([rr[keep], f_row]), torch.cat([cc[keep], f_col])


def _stop_finished_rows(c: _Canvas, be: int, eos_id: int, rec: TraceRecorder, states) -> None:
    """Rows with an EOS among their committed tokens stop: later blocks are filled with EOS, not decoded."""
    stop = ~c.done & (c.x[:, c.P : be] == eos_id).any(-1)
    c.done |= stop
    if be == c.L or not stop.any():
        return
    rows = stop.nonzero().squeeze(-1)
    c.x[rows, be:] = eos_id
    rr = rows.repeat_interleave(c.L - be)
    pos = torch.arange(be - c.P, c.Lc, device=c.x.device).repeat(len(rows))
    rec.add(rr, c.step[rr] - 1, pos, torch.full_like(rr, eos_id), FILL)
    if states is not None:
        for r in rows.tolist():
            states[r][-1] = c.x[r, c.P :].cpu().clone()


def _finish(c: _Canvas, tokenizer, rec: TraceRecorder, stats: dict, states) -> RolloutBatch:
    trace = rec.finish(c.step)
    return finish_batch(c.x[:, : c.P], c.attn[:, : c.P], c.x[:, c.P :], tokenizer, trace, stats, states)
