"""One denoising step over preallocated buffers: static shapes, no host synchronisation.

Everything a decode reads or writes lives in tensors allocated once per batch shape (`Workspace`): the
canvas, masks and positions, the KV cache (full length), the per-row counters and the trace. The block being
decoded is a 0-d device tensor (`bs`) and the canvas positions a step forwards are data (a tensor
`cache_start`, `logits_index`), so `Workspace.step(kind)` is one function of the buffers for every block and
every rollout of a shape: torch.compile traces it into one graph, and a CUDA graph captured once replays it,
with the weights of the moment (rollout.graphs).

Every decision is made on the device with masks. All rows of the working set are forwarded at every step; a
row with nothing left to do in the block (or finished at EOS, or padding) commits nothing (`active`). The
commit count k is a tensor, and the block's positions are ranked by one stable sort of their keys, the
first k committed (the static-shape rule of sgl-project/sglang's dllm joint-threshold graph step). Trace
events go into dense buffers [rows, steps, Lb] (draw rank, token, log-prob), read once at the end
(rollout.trace.trace_from_buffers).

The decisions are exactly those of the host-driven loop this replaced (rollout.eager_loop, the test oracle):
the same counter-based uniforms per (row, row step, position), commit rules, orders and Plackett-Luce draws,
ties broken toward the lowest position in both.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..batches import StepStats
from ..config import RolloutConfig
from ..counter_rng import ORDER_STREAM, TOKEN_STREAM, uniform
from ..kernels import choose_tokens  # fused Triton on CUDA, kernels.sampling.choose_tokens elsewhere
from ..models.base import ModelTraits, unwrap
from ..models.masks import block_ids, mask_from_block_ids, padding_positions
from ..policy.orders import ORDERS, OrderInputs
from ..policy.plackett_luce import gumbel_keys, order_keys, plackett_luce_logprob, rank_positions
from .cache_plans import CACHE_PLANS
from .commit import COMMIT_RULES
from .remask import self_correction

# built-in orders whose scores never read OrderInputs.u: their uniforms are not computed (~65 kernels a step)
NO_UNIFORM = frozenset({"low_confidence", "top_prob", "margin", "entropy", "left_to_right", "policy"})


@dataclass(frozen=True)
class StepKind:
    """Which canvas positions a step forwards: [lo, lo + length) when `absolute`, else [bs + lo, bs + lo +
    length) for the block start bs (a tensor: one kind, and one graph, serves every block)."""

    absolute: bool
    lo: int
    length: int
    use_cache: bool


def step_kind(cfg: RolloutConfig, tr: ModelTraits, L: int, bs: int, prev_bs: int, first: bool) -> StepKind:
    """The kind of a step of the block starting at bs, from its cache plan (rollout.cache_plans)."""
    Lb = cfg.block_length or cfg.max_completion_length
    plan = CACHE_PLANS[cfg.cache](L, bs, bs + Lb, prev_bs, first)
    q_start = min(plan.q_start, bs - tr.logits_shift)  # logits-shifted models read the position before the block
    if q_start == 0:
        return StepKind(True, 0, plan.q_end, plan.use_cache)
    return StepKind(False, q_start - bs, plan.q_end - q_start, plan.use_cache)


def trace_steps(cfg: RolloutConfig, Lc: int, Lb: int) -> int:
    """An upper bound on any row's step count (the trace buffers' length). top_k finishes a block in its
    steps; other rules commit >= 1 token per active step, plus remasks while steps are left."""
    nb = Lc // Lb
    spb = cfg.steps // nb
    if cfg.commit == "top_k":
        return cfg.steps
    remasks = min(max(0, cfg.correction_max_per_step), Lb)  # remask.py picks at most Lb positions a step
    extra = (spb - 1) * (1 + remasks) if cfg.self_correction else 0
    return nb * (Lb + extra)


class Workspace:
    """The buffers of one batch shape and the step over them.

    Rows: `capacity` rows are allocated; the first `n` are the working set a step forwards (a bucket: padding
    rows are done from the start; rows that finished are dropped at block boundaries by `compact`). Trace
    buffers are indexed by each working row's `row_id` (its row in the batch; padding rows have ids >= N).
    """

    def __init__(
        self, model, tr: ModelTraits, cfg: RolloutConfig, capacity: int, P: int, order_policy=None, forward=None
    ):
        base = unwrap(model)
        dev = next(base.parameters()).device
        Lc = cfg.max_completion_length
        self.model = model if forward is None else forward  # what a step calls (a compiled wrapper, maybe)
        self.tr, self.cfg, self.order_policy = tr, cfg, order_policy
        self.capacity, self.P, self.Lc, self.L = capacity, P, Lc, P + Lc
        self.Lb = cfg.block_length or Lc
        self.spb = cfg.steps // (Lc // self.Lb)
        self.S = trace_steps(cfg, Lc, self.Lb)
        self.device, self.causal = dev, tr.attention == "block_causal"
        R, L, Lb, S = capacity, self.L, self.Lb, self.S
        z = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device=dev)
        # per working row (permuted together by `compact`)
        self.rows = {
            "x": z(R, L),  # canvas
            "attn": z(R, L),  # 1 = real token
            "pos": z(R, L),  # RoPE positions
            "bid": z(R, L),  # block ids (block-causal models)
            "seeds": z(R),
            "row_step": z(R),  # per-row step counter (the step index of counter_rng and the trace)
            "block_step": z(R),  # steps taken in the current block
            "done": z(R, dtype=torch.bool),  # stopped at EOS (or padding)
            "row_id": z(R),
            "active": z(R, dtype=torch.bool),  # committed at the last step
        }
        # per batch row (indexed by row_id); slot S is the scratch slot inactive rows write to
        self.trace = {
            "rank": torch.full((R, S + 1, Lb), -1, dtype=torch.int16, device=dev),  # draw order, -1 = none
            "token": z(R, S + 1, Lb),
            "logprob": z(R, S + 1, Lb, dtype=torch.float32),
            "block": z(R, S + 1),  # block start of each row step
            "order": z(R, S + 1, dtype=torch.float32),  # Plackett-Luce log-prob of the step's draw
            "remask": z(R, S + 1, Lb, dtype=torch.bool),
            "fill_step": torch.full((R,), -1, dtype=torch.long, device=dev),  # EOS stop: step and first offset
            "fill_from": z(R),
        }
        self.final = z(R, L)  # canvases by row id, saved when rows leave the working set
        self.final_step = z(R)  # steps taken, by row id
        self.bs = z(())  # block start: a device scalar, never a Python int inside the step
        self.block_host = 0  # the same, for models that only take Python ints (eager only)
        self.pending = z((), dtype=torch.bool)  # any row still has masked positions in the block
        self.ar = torch.arange(Lb, device=dev)
        self._aranges: dict[int, torch.Tensor] = {}
        self.cache = base.new_cache(R, L) if cfg.cache != "none" else None
        self.n = capacity
        self._views()

    # ------------------------------------------------------------------------------ host-side bookkeeping

    def _views(self) -> None:
        n = self.n
        for name, t in self.rows.items():
            setattr(self, name, t[:n])
        self.kv = None if self.cache is None else self.cache.prefix(n)

    def load(self, prompt_ids: list[list[int]], seeds: torch.Tensor, pad_id: int) -> None:
        """Write a batch of N <= capacity prompts (left-padded to P) and reset counters and trace."""
        N, R, P, L = len(prompt_ids), self.capacity, self.P, self.L
        x = torch.full((R, L), pad_id, dtype=torch.long)
        attn = torch.zeros(R, L, dtype=torch.long)
        for i, ids in enumerate(prompt_ids):
            x[i, P - len(ids) : P] = torch.tensor(ids, dtype=torch.long)
            attn[i, P - len(ids) :] = 1
        attn[N:, P - 1 :] = 1  # padding rows: a one-token prompt, done from the start
        x[:, P:] = self.tr.mask_token_id
        self.n = R
        self._views()
        r = self.rows
        r["x"].copy_(x)
        r["attn"].copy_(attn)
        r["pos"].copy_(padding_positions(attn))
        r["bid"].copy_(block_ids(attn, P, self.tr.block_size) if self.causal else attn)
        r["seeds"].zero_()
        r["seeds"][:N] = seeds.to(self.device)
        r["row_step"].zero_()
        r["block_step"].zero_()
        r["done"].copy_(torch.arange(R) >= N)
        r["row_id"].copy_(torch.arange(R))
        r["active"].zero_()
        t = self.trace
        t["rank"].fill_(-1)
        t["order"].zero_()
        t["remask"].zero_()
        t["fill_step"].fill_(-1)
        t["fill_from"].fill_(self.Lc)

    def start_block(self, b: int) -> None:
        self.block_host = self.P + b * self.Lb
        self.bs.fill_(self.block_host)
        self.block_step.zero_()

    def compact(self, keep: list[int], n: int) -> None:
        """Working rows `keep` (host indices into the working set, then filler rows that are done) become the
        first n rows; the canvases of all current rows are saved by row id first."""
        self.save_rows()
        idx = torch.tensor(keep, dtype=torch.long, device=self.device)  # [n]
        for t in self.rows.values():
            t[:n] = t.index_select(0, idx)
        if self.cache is not None and self.cfg.cache == "block":  # dual / prefix refresh every key next block
            for t in self.cache.keys + self.cache.values:
                t[:n] = t.index_select(0, idx)
        self.n = n
        self._views()

    def save_rows(self) -> None:
        """Canvases and step counts of the working rows, by row id (`final`, `final_step`)."""
        self.final.index_copy_(0, self.row_id, self.x)
        self.final_step.index_copy_(0, self.row_id, self.row_step)

    def snapshot(self) -> list[torch.Tensor]:
        """Copies of everything a step writes except the KV cache (a step rewrites the keys of the positions
        it forwards before reading them, so a replayed step leaves the cache as the real one will)."""
        return [t.clone() for t in (*self.rows.values(), *self.trace.values(), self.pending)]

    def restore(self, saved: list[torch.Tensor]) -> None:
        for t, s in zip((*self.rows.values(), *self.trace.values(), self.pending), saved):
            t.copy_(s)

    def arange(self, n: int) -> torch.Tensor:
        if n not in self._aranges:
            self._aranges[n] = torch.arange(n, device=self.device)
        return self._aranges[n]

    # ----------------------------------------------------------------------------- the step (no host sync)

    def forward(self, kind: StepKind):
        """Logits [n, Lb, V] of the block's positions (and hidden states [n, Lb, D] when the order needs them)."""
        tr, shift = self.tr, self.tr.logits_shift
        want_hidden = ORDERS[self.cfg.order].needs_hidden
        if kind.absolute:
            start = kind.lo
            query = lambda t: t[:, kind.lo : kind.lo + kind.length]
            lidx = self.bs + (self.ar - shift - kind.lo)  # [Lb] block rows of the query
        else:
            start = self.bs + kind.lo + self.arange(kind.length)  # [Lq] canvas positions
            query = lambda t: t.index_select(1, start)
            lidx = self.ar - shift - kind.lo
        ids, pos = query(self.x), query(self.pos)
        mask = mask_from_block_ids(query(self.bid), self.bid, causal_blocks=True) if self.causal else self.attn
        if not tr.static_shapes:  # a model through its own forward (models.hf): Python ints, no cache
            a = self.block_host - shift - (kind.lo if kind.absolute else self.block_host + kind.lo)
            out = self.model(
                input_ids=ids,
                attention_mask=mask,
                position_ids=pos,
                logits_range=(a, a + self.Lb),
                output_hidden_states=want_hidden,
            )
            return out.logits, (out.hidden_states[-1][:, a : a + self.Lb] if want_hidden else None)
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            kv_cache=self.kv if kind.use_cache else None,
            cache_start=start,
            kv_len=self.L,
            logits_index=lidx,
            output_hidden_states="last" if want_hidden else False,
        )
        return out.logits, (out.hidden_states[-1].index_select(1, lidx) if want_hidden else None)

    def step(self, kind: StepKind) -> None:
        """One denoising step of every working row, in place. No host synchronisation, no data-dependent shape."""
        cfg, mask_id = self.cfg, self.tr.mask_token_id
        logits, hidden = self.forward(kind)  # [n, Lb, V]
        n, Lb = logits.shape[0], self.Lb
        bidx = self.bs + self.ar  # [Lb] canvas positions of the block
        blk = self.x.index_select(1, bidx)  # [n, Lb]
        m = blk == mask_id
        active = ~self.done & m.any(-1)  # [n]
        offsets = (bidx - self.P)[None, :]  # [1, Lb] completion offsets
        where = offsets.expand(n, -1)
        # greedy choice reads no uniform: none is drawn (the counter-based stream stays the same)
        u_tok = uniform(self.seeds, self.row_step, where, TOKEN_STREAM).reshape(-1) if cfg.temperature > 0 else None
        choice = choose_tokens(logits.reshape(n * Lb, -1), u_tok, cfg.temperature, cfg.top_k, cfg.top_p, mask_id)
        st = StepStats.where(choice, m, mask_id)
        st.steps_left = (self.spb - self.block_step).clamp(min=1)
        st.progress = (self.x[:, self.P :] != mask_id).float().mean(-1)

        k = COMMIT_RULES[cfg.commit](st, cfg).clamp(max=m.sum(-1))  # [n]
        k = torch.where(active, k, torch.zeros_like(k))
        u_ord = None if cfg.order in NO_UNIFORM else uniform(self.seeds, self.row_step, where, ORDER_STREAM)
        scores = ORDERS[cfg.order].scores(OrderInputs(st, offsets, u_ord, hidden, self.order_policy))
        if cfg.order_temperature > 0:  # Plackett-Luce: Gumbel-perturbed keys
            scores = scores / cfg.order_temperature
            keys = gumbel_keys(scores, m, uniform(self.seeds, self.row_step, where, ORDER_STREAM + 1))
        else:
            keys = order_keys(scores, m)
        chosen, valid = rank_positions(keys, k)  # [n, Lb]: every position ranked, the first k[i] committed
        sel = torch.zeros_like(m).scatter_(1, chosen, valid)
        new_blk = torch.where(sel, st.token, blk)

        t, rid, slot = self.trace, self.row_id, self.row_step.clamp(max=self.S)  # inactive rows: their next slot
        t["rank"][rid, slot] = torch.full_like(chosen, -1).scatter_(1, chosen, torch.where(valid, self.ar, -1)).short()
        t["token"][rid, slot] = st.token
        t["logprob"][rid, slot] = st.logprob.float()
        t["block"][rid, slot] = self.bs
        if cfg.order_temperature > 0:
            drawn = plackett_luce_logprob(scores, m, chosen, valid)
            t["order"][rid, slot] = torch.where(active, drawn, torch.zeros_like(drawn))
        if cfg.self_correction:
            before = ~m & (blk != mask_id)  # committed at earlier steps
            prob = logits.float().log_softmax(-1).gather(-1, blk.clamp(min=0)[..., None]).squeeze(-1).exp()
            back = self_correction(prob, before, cfg.correction_threshold, cfg.correction_max_per_step)
            back &= ((st.steps_left > 1) & active)[:, None]
            new_blk = torch.where(back, torch.full_like(new_blk, mask_id), new_blk)
            t["remask"][rid, slot] = back
        self.x.index_copy_(1, bidx, new_blk)
        self.row_step += active.long()
        self.block_step += active.long()
        self.active.copy_(active)
        if cfg.commit != "top_k":  # data-dependent rules: the host learns when the block is finished
            self.pending.copy_((~self.done & (new_blk == mask_id).any(-1)).any())

    def stop_rows(self, eos_id: int) -> None:
        """After a block: rows with an EOS among their committed tokens stop; their later blocks are filled
        with EOS, recorded as fills at their last step (no host synchronisation)."""
        be = self.bs + self.Lb
        col = self.arange(self.L)
        stop = ~self.done & ((self.x == eos_id) & (col >= self.P) & (col < be)).any(-1)  # [n]
        fill = stop[:, None] & (col >= be)
        self.x.copy_(torch.where(fill, torch.full_like(self.x, eos_id), self.x))
        t, rid = self.trace, self.row_id
        recorded = stop & (be < self.L)
        t["fill_step"][rid] = torch.where(recorded, self.row_step - 1, t["fill_step"][rid])
        t["fill_from"][rid] = torch.where(recorded, be - self.P, t["fill_from"][rid])
        self.done |= stop
        self.active.copy_(recorded)  # which rows' last state changed (record_states)
