"""Branch search around a greedy decode: every decision of the greedy trajectory changed to each of its next most
likely tokens, then decoded greedily again.

A branch shares the greedy decode's prefix up to the changed decision, so a preference pair of the greedy decode
and one of its branches differs from that decision on (step-level pairs, Step-DPO arXiv 2406.18629, here along a
diffusion model's denoising path): under the trajectory likelihood the shared prefix cancels from the pair's
score and the preference falls on the decision that changed and what followed from it. trainers.dpo's
`dpo.pairs: branch` sets each greedy decode against its nearest branch with another reward.

Both are decoded by rollout.eager_loop's host loop (the engine's decisions up to float rounding), the branches
with the prefix imposed through its `forced` decisions. The alternatives at a decision are ranked by the model's
distribution in the state the decision was made from, read by one full forward of that state (the same as the
decode's with rollout.cache=none; a cached decode reads approximately the same).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..batches import COMMIT, RolloutBatch
from ..config import RolloutConfig
from ..kernels.sampling import sampling_logprobs
from ..models.base import traits, unwrap
from ..models.masks import padding_positions
from .eager_loop import generate_host_loop


@dataclass
class Candidates:
    """A greedy decode's branch points: candidate j changes greedy row `source[j]`'s decision at step `step[j]`,
    completion position `position[j]`, to `token[j]`; `gap[j]` = log p(greedy token) - log p(token[j]) there
    (>= 0, how far from greedy the branch departs). Sorted by row, then by gap."""

    greedy: RolloutBatch
    source: torch.Tensor  # [M] long
    step: torch.Tensor
    position: torch.Tensor
    token: torch.Tensor
    gap: torch.Tensor  # [M] float
    forced: list[list[tuple[int, int, int]]]  # [M] the branch's decisions up to the changed one: (step, pos, token)


def check_branchable(cfg: RolloutConfig, tr) -> None:
    """Branch search needs a deterministic greedy decode of a bidirectional model (ValueError otherwise)."""
    if cfg.order == "random" or cfg.order_temperature > 0:
        raise ValueError("branch search needs a state-only unmasking order: rollout.order_temperature=0, not random")
    if cfg.self_correction or cfg.repetition_penalty != 1:
        raise ValueError("branch search needs rollout.self_correction=false and rollout.repetition_penalty=1")
    if tr.attention != "bidirectional":
        raise ValueError("branch search reads each decision's state with a full forward: a bidirectional model")


def _fixed() -> torch.Generator:
    return torch.Generator().manual_seed(0)  # nothing random is drawn: keeps torch's global RNG untouched


@torch.no_grad()
def branch_candidates(model, tokenizer, prompts, cfg: RolloutConfig, alternatives: int, order_policy=None):
    """Greedy-decode `prompts` (cfg at temperature 0) and list every committed decision's `alternatives` next
    most likely tokens (the [MASK] token excluded) as branch candidates."""
    tr = traits(model, tokenizer)
    cfg = replace(cfg, temperature=0.0)
    check_branchable(cfg, tr)
    greedy = generate_host_loop(model, tokenizer, prompts, cfg, _fixed(), order_policy, record_states=True)
    states = greedy.stats.pop("states")
    ev = greedy.trace.events
    commits = ev[ev[:, 4] == COMMIT]  # (row, step, position, token, kind), row by row in the order applied
    Lc = greedy.completion_ids.shape[1]
    # one forward per (row, step): the canvas the step's decisions were made from, read at their positions
    views, view_of = torch.unique(commits[:, :2], dim=0, return_inverse=True)
    chunk = max(1, cfg.batch_size)
    lp = torch.full((len(commits), 1), float("-inf"))  # [C, V] at each decision's position
    for lo in range(0, len(views), chunk):
        v = views[lo : lo + chunk]
        before = torch.stack(
            [
                torch.full((Lc,), tr.mask_token_id, dtype=torch.long) if s == 0 else states[r][s - 1].cpu()
                for r, s in v.tolist()
            ]
        )  # [n, Lc]
        logp = _completion_logprobs(model, tr, greedy, v[:, 0], before)  # [n, Lc, V]
        here = ((view_of >= lo) & (view_of < lo + len(v))).nonzero().squeeze(-1)
        if lo == 0:
            lp = torch.empty(len(commits), logp.shape[-1])
        lp[here] = logp[view_of[here] - lo, commits[here, 2]]
    top = lp.topk(min(alternatives + 1, lp.shape[-1]), dim=-1)
    keep = top.indices != commits[:, 3:4]  # the greedy token is among the top alternatives + 1 (first unless tied)
    keep &= keep.cumsum(-1) <= alternatives
    keep &= top.values > float("-inf")
    c_idx, a_idx = keep.nonzero(as_tuple=True)
    gap = (lp[c_idx, commits[c_idx, 3]] - top.values[c_idx, a_idx]).float()
    source = commits[c_idx, 0]
    order = torch.argsort(gap, stable=True)
    order = order[torch.argsort(source[order], stable=True)]  # by row, then by gap
    c_idx, a_idx, gap, source = c_idx[order], a_idx[order], gap[order], source[order]
    token = top.indices[c_idx, a_idx]
    forced = []
    for ci, tok in zip(c_idx.tolist(), token.tolist()):
        r, s, pos = commits[ci, :3].tolist()
        mine = commits[(commits[:, 0] == r) & (commits[:, 1] <= s)]
        forced.append([(s2, p2, tok if (s2, p2) == (s, pos) else t2) for _, s2, p2, t2, _ in mine.tolist()])
    return Candidates(greedy, source, commits[c_idx, 1], commits[c_idx, 2], token, gap, forced)


@torch.no_grad()
def decode_branches(
    model, tokenizer, prompts, cfg: RolloutConfig, cand: Candidates, which: list[int], order_policy=None
):
    """The branches `which` (candidate indices) decoded greedily after their forced prefix: a RolloutBatch [len]."""
    forced = [(j, s, p, t) for j, c in enumerate(which) for s, p, t in cand.forced[c]]
    return generate_host_loop(
        model,
        tokenizer,
        [prompts[i] for i in cand.source[which].tolist()],
        replace(cfg, temperature=0.0),
        _fixed(),
        order_policy,
        forced=torch.tensor(forced, dtype=torch.long).view(-1, 4),
    )


@dataclass
class Nearest:
    """Per prompt: the greedy decode's reward, and the nearest branch (smallest gap) that scores higher, or else
    the nearest that scores lower among those tried; `branch_index[b]` is -1 where none was found."""

    greedy: RolloutBatch  # [B]
    greedy_reward: torch.Tensor  # [B]
    branches: RolloutBatch | None  # [F] the branches found, one per prompt with branch_index >= 0
    branch_index: torch.Tensor  # [B] row in `branches` or -1
    branch_reward: torch.Tensor  # [B] (nan where none)
    gap: torch.Tensor  # [B] (nan where none)
    decoded: int  # branches decoded in the search


def nearest_branches(model, tokenizer, prompts, cfg, score, alternatives: int, rounds: int, order_policy=None):
    """Branch search by rounds: round k decodes each prompt's k-th nearest candidate (branch_candidates'
    order), for the prompts that have not yet found a branch scoring above their greedy decode; `score(rows,
    batch)` -> rewards [n] of the completions `batch` of prompts `rows`. Returns a `Nearest`."""
    cand = branch_candidates(model, tokenizer, prompts, cfg, alternatives, order_policy)
    B = len(prompts)
    g_reward = torch.as_tensor(score(list(range(B)), cand.greedy), dtype=torch.float)
    first = torch.searchsorted(cand.source, torch.arange(B))  # each prompt's first candidate
    count = torch.bincount(cand.source, minlength=B)
    up, down = [None] * B, [None] * B  # (gap, reward, batch, row) of the nearest higher / lower branch
    decoded = 0
    for k in range(rounds):
        rows = [b for b in range(B) if up[b] is None and k < count[b]]
        if not rows:
            break
        which = [int(first[b]) + k for b in rows]
        batch = decode_branches(model, tokenizer, prompts, cfg, cand, which, order_policy)
        decoded += len(rows)
        rewards = torch.as_tensor(score(rows, batch), dtype=torch.float)
        for i, (b, c) in enumerate(zip(rows, which)):
            hit = (float(cand.gap[c]), float(rewards[i]), batch, i)
            if rewards[i] > g_reward[b]:
                up[b] = hit
            elif rewards[i] < g_reward[b] and down[b] is None:
                down[b] = hit
    found = [u if u is not None else d for u, d in zip(up, down)]
    parts = [f[2].select(torch.tensor([f[3]])) for f in found if f is not None]
    index = torch.full((B,), -1, dtype=torch.long)
    index[[b for b, f in enumerate(found) if f is not None]] = torch.arange(len(parts))
    nan = float("nan")
    return Nearest(
        cand.greedy,
        g_reward,
        RolloutBatch.concat(parts) if parts else None,
        index,
        torch.tensor([nan if f is None else f[1] for f in found]),
        torch.tensor([nan if f is None else f[0] for f in found]),
        decoded,
    )


def _completion_logprobs(model, tr, batch: RolloutBatch, rows: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """log p(token | prompt of `rows`, completion canvas) at every completion position: [n, Lc, V] (the
    model's own distribution, [MASK] excluded)."""
    device = next(unwrap(model).parameters()).device
    prompt, pmask = batch.prompt_ids[rows].to(device), batch.prompt_mask[rows].to(device)
    P, Lc = prompt.shape[1], canvas.shape[1]
    ids = torch.cat([prompt, canvas.to(device)], 1)
    attn = torch.cat([pmask, torch.ones_like(canvas, device=device)], 1)
    shift = tr.logits_shift
    out = model(
        input_ids=ids,
        attention_mask=attn,
        position_ids=padding_positions(attn),
        logits_range=(P - shift, P + Lc - shift),
    )
    return sampling_logprobs(out.logits, 0.0, mask_token_id=tr.mask_token_id).cpu()
