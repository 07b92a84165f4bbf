"""What each denoising step forwards, one plan per cache mode (rollout.cache).

Forward plans (one per cache mode)say which canvas slice a step forwards and which keys it reads:
none = the whole canvas every step (the reference); prefix / dual = Fast-dLLM's caches, refreshed by a full
forward at each block start; block = the exact cache of block-causal models (finished blocks are written
once, by the first forward of the next block, as D2F does: no separate commit pass).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ForwardPlan:
    q_start: int  # forward canvas positions [q_start, q_end)
    q_end: int
    kv_len: int  # attention reads keys [0, kv_len)
    use_cache: bool


def plan_none(L, bs, be, prev_bs, first):
    return ForwardPlan(0, L, L, False)


def plan_prefix(L, bs, be, prev_bs, first):
    return ForwardPlan(0, L, L, True) if first else ForwardPlan(bs, L, L, True)


def plan_dual(L, bs, be, prev_bs, first):
    return ForwardPlan(0, L, L, True) if first else ForwardPlan(bs, be, L, True)


def plan_block(L, bs, be, prev_bs, first):
    # the first step of a block re-forwards the previous block with its final tokens, writing its exact K/V
    return ForwardPlan(prev_bs, be, be, True) if first else ForwardPlan(bs, be, be, True)


CACHE_PLANS = {"none": plan_none, "prefix": plan_prefix, "dual": plan_dual, "block": plan_block}
