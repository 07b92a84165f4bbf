"""Trajectory likelihood: replay the rollout's own denoising path (TraceRL arXiv 2509.06949; DCoLT arXiv
2505.10446).

Every decision the sampler made is scored by the model in the exact state it was made from: view s holds the
canvas as it was before step s (replayed from the trace's events, self-correction remasks included) and scores
every token committed at step s, with the sampler's temperature, so with merge_steps=1 the estimate equals the
log-probs the sampler recorded. That includes the first EOS and every token committed after it (the sampler
keeps decoding the block it is in, and, with rollout.stop_at_eos=false, the blocks after it), and a token that
self-correction later took back (scored at the step that committed it, its replacement at its own step). The
positions filled with EOS after a row stopped (rollout.stop_at_eos: Trace event kind FILL, commit_step -1)
were not sampled: given the stop rule they have probability 1 and are not scored. `Estimate.mask` marks the
scored positions, and the GRPO loss counts exactly those (not the batch's completion_mask, which stops at the
first EOS: the convention of the other estimators). merge_steps = m scores m consecutive steps from the state
before the first of them (TraceRL's `shrink`): m times fewer forwards, slightly less context.

The sum is the rollout's log-probability (so its gradient is the policy gradient) when the unmasking order
is a function of the state, such as rollout.order=top_prob, margin, entropy or left_to_right, or uniformly
random (rollout.order=random: every order of the k positions a step draws is equally likely, whatever the
order temperature, and its log-prob log((n - k)! / n!) for n masked positions, a constant of the trace, is
added). With a sampled order (rollout.order_temperature > 0: Plackett-Luce over the order's scores /
temperature) the rollout's probability also holds each step's order log-prob. For top_prob, margin and
entropy the scores are the model's own, so each view recomputes them and adds the Plackett-Luce log-prob of
the positions the step drew, in draw order, with gradient: RL then also trains *which* cells the model is
confident enough to commit first (DCoLT's unmasking policy, arXiv 2505.10446, with the model's confidence
as the policy instead of a separate head). With rollout.order=policy the scores are a learned order
head's (policy.OrderHead, DCoLT's separate module), recomputed block by block from each view's hidden
states and statistics, and the order term's gradient reaches the head only. A step's order log-prob is
shared equally among the tokens it committed (the per-token sum is exact). For left_to_right the sampled
order's scores do not depend on the model. Model-scored, learned and left_to_right sampled orders need
merge_steps=1 and a bidirectional model (their order term is computed view by view, one step per view, and
the packed block-causal views score several steps of different blocks at once); a sampled random order's
term is the constant above, read from the trace's events, so it holds for merged and packed views too.
tests/estimators/test_trajectory_exact.py enumerates every trajectory of a tiny sampler (EOS anywhere, with
and without stop_at_eos, greedy, Plackett-Luce and random orders): these probabilities sum to 1 and match
the sampler's frequencies (commit rule top_k). Not exact: rollout.top_k / top_p (the trace does not record
them, and the estimate scores the untruncated distribution at the rollout temperature); rollout.min_p and
rollout.repetition_penalty (recorded, with a note when a run uses them: the estimate scores, and the learned or
model-scored order reads, the distribution before them); and, at temperature
> 0, commit rules that count the sampled tokens' confidences (threshold, factor): how many positions a step
commits then depends on tokens drawn at positions it did not commit, as with low_confidence below.

LLaDA's low_confidence order with temperature > 0 ranks positions by the probability of the token just
sampled there, so which position is committed depends on the draws, and the product of committed-token
probabilities is not the probability of the rollout (tests/estimators/test_estimators.py counts it summing to ~2 over
trajectories; on the tiny Countdown model at temperature 1 a step along its large-batch gradient does not
raise the reward, while one along the gradient for a model-independent order does; on Sudoku at 0.5 both
rise: benchmarks/ascent.py, RESULTS.md). top_prob decodes exactly like low_confidence when greedy.

Block-causal models are packed as TraceRL does: in the two-stream layout (estimators.base) the noisy copy
of block b only sees clean blocks < b and itself, so one forward scores round r of *every* block; the
number of forwards is the number of steps per block, not the total. This needs the rollout block length to
equal the model's attention block (otherwise a block's queries saw a partially decoded neighbour that the
packed layout cannot show).

Any-process rollouts (rollout.edit: remask | any), whose canvases change length, are scored step by step by
estimators/anyprocess.py: every decision, edits included, one estimate per step (Estimate.mask).
"""

from __future__ import annotations

import torch

from ..batches import COMMIT, REMASK, Decoding
from ..errors import ConfigError
from ..policy.orders import ORDERS
from ..policy.plackett_luce import plackett_luce_logprob
from . import anyprocess
from .base import Estimate, Estimator, Noise, each_view, score


def _local_steps(trace, Lc: int, block: int | None):
    """Per-event and per-position step indices: global, or relative to the first step of their block."""
    ev = trace.events  # [E, 5] (row, step, pos, token, kind)
    rows, steps, pos, kinds = ev[:, 0], ev[:, 1], ev[:, 2], ev[:, 4]
    commit = trace.commit_step  # [N, Lc]
    if block is None:
        return steps, commit
    N = commit.shape[0]
    nb = (Lc + block - 1) // block
    first = torch.full((N * nb,), 2**62, dtype=torch.long)
    is_commit = kinds == COMMIT
    first = first.scatter_reduce(0, (rows * nb + pos // block)[is_commit], steps[is_commit], reduce="amin")
    first = first.view(N, nb)
    ev_local = steps - first[rows, pos // block]
    blk = (torch.arange(Lc) // block).expand(N, Lc)
    local = torch.where(commit >= 0, commit - first.gather(1, blk), commit)
    return ev_local, local


def build(cfg, tr) -> Estimator:
    """The trajectory estimator for the recipe's estimator section (merge_steps); the rollout's settings come
    from each batch's trace."""
    return Estimator(
        lambda batch, generator=None: draw(batch, cfg.merge_steps, tr),
        lambda model, batch, noise, order_policy=None, edit_policy=None, **extra: estimate(
            model, batch, noise, tr, order_policy, edit_policy
        ),
        views=lambda steps: -(-steps // max(1, cfg.merge_steps)),
        check=lambda decoding: check(decoding, cfg.merge_steps, tr),
        replays_orders=True,
        counted=counted,
    )


def counted(batch, noise: Noise) -> torch.Tensor:
    """Estimate.mask: [N, Lc] every position the sampler committed; of an any-process rollout [N, S], every step
    a row took."""
    if batch.trace.edit_on is not None:
        return anyprocess.counted(noise)
    return noise.weights.sum(0) > 0


def check(d: Decoding, merge_steps: int, tr) -> list[str]:
    """Refuse rollouts whose decisions this estimator cannot replay; notes for the ones it replays inexactly."""
    block_causal = tr is not None and tr.attention == "block_causal"
    if d.edit != "none" and merge_steps > 1:  # any-process rollouts: estimators/anyprocess.py
        raise ConfigError(
            f"estimator.name=trajectory scores each step of a rollout.edit={d.edit} rollout from the canvas "
            f"before it: set estimator.merge_steps=1"
        )
    if block_causal and d.block_length != tr.block_size:
        raise ConfigError(
            f"estimator.name=trajectory on a block-causal model needs rollout.block_length "
            f"({d.block_length}) equal to the model's attention block ({tr.block_size})"
        )
    rule = ORDERS[d.order]
    if d.order_temperature > 0:
        if rule.replay == "tokens":
            raise ConfigError(
                f"estimator.name=trajectory cannot replay a sampled rollout.order={d.order}: "
                "its scores depend on tokens drawn at positions that were not committed; use "
                "rollout.order=top_prob (or margin, entropy), or rollout.order_temperature=0"
            )
        # a uniform order's term is a constant read from the trace's events (_uniform_order_logprob), which holds
        # for merged and packed views; the others are scored view by view, one step per view
        if rule.replay != "uniform" and (merge_steps > 1 or block_causal):
            raise ConfigError(
                f"estimator.name=trajectory with a sampled rollout.order={d.order} (rollout.order_temperature > 0) "
                "scores each step's order from the state before it: set estimator.merge_steps=1, "
                "and use a bidirectional model (block-causal packing scores several steps at once)"
            )
    notes = []
    if d.min_p > 0 or d.repetition_penalty != 1.0:
        notes.append(
            f"estimator.name=trajectory with rollout.min_p={d.min_p} / rollout.repetition_penalty="
            f"{d.repetition_penalty}: the replay scores tokens and orders under the model's distribution before "
            "these samplers, so the likelihood is not the rollout's probability; set min_p=0 and "
            "repetition_penalty=1.0 for an exact one"
        )
    if rule.replay == "tokens" and d.temperature > 0:
        return notes + [
            f"estimator.name=trajectory with rollout.order={d.order} and temperature > 0: positions are picked "
            "by their sampled token, so the replayed likelihood is not the rollout's probability and its "
            "gradient is not the policy gradient (estimators/trajectory.py); rollout.order=top_prob decodes "
            "the same when greedy and keeps it exact"
        ]
    return notes


def draw(batch, merge_steps: int, tr) -> Noise:
    """Views replaying the trace (deterministic: no randomness is drawn).

    View j holds the canvas before step j (before the first of its merged steps) and scores every token the
    sampler committed in its steps, with the committed token as the target: EOS and the tokens committed after
    it included, and a token that self-correction later took back at the step that committed it. Positions
    filled with EOS after a row stopped (events of kind FILL) were not sampled and are never scored."""
    trace = getattr(batch, "trace", None)
    if trace is None:
        raise ConfigError(
            "estimator.name=trajectory needs rollouts with a commit trace (the GRPO trainer's own "
            "rollouts); pick one_step, elbo or block_elbo for other data"
        )
    check(trace.decoding, merge_steps, tr)
    if trace.edit_on is not None:  # any-process rollouts: every decision, step by step
        return anyprocess.draw(batch)
    N, Lc = batch.completion_ids.shape
    block = trace.decoding.block_length if tr.attention == "block_causal" else None
    ev_local, _ = _local_steps(trace, Lc, block)
    m = max(1, merge_steps)
    ev = trace.events
    commit = ev[:, 4] == COMMIT
    K = int(ev_local[commit].max().item()) // m + 1 if commit.any() else 1
    key = ev[:, 0] * Lc + ev[:, 2]  # [E] (row, pos)
    order = torch.arange(len(ev))
    final = batch.completion_ids.cpu().reshape(-1)
    masks, weights, tokens, targets = [], [], [], []
    remasks = bool((ev[:, 4] == REMASK).any())
    for j in range(K):
        before = ev_local < j * m
        last = torch.full((N * Lc,), -1, dtype=torch.long).scatter_reduce(
            0, key[before], order[before], reduce="amax"
        )  # last event before the view, per position
        visible = torch.zeros(N * Lc, dtype=torch.bool)
        canvas = final.clone()
        hit = last >= 0
        visible[hit] = ev[last[hit], 4] == COMMIT
        canvas[hit] = ev[last[hit], 3]  # the token the canvas held then (self-correction may change it)
        masks.append(~visible.view(N, Lc))
        tokens.append(canvas.view(N, Lc))
        # the commits of this view's steps (with merge_steps > 1 a position committed twice within one merged
        # view, taken back in between, is scored once: its later commit)
        now = commit & (ev_local >= j * m) & (ev_local < (j + 1) * m)
        last_now = torch.full((N * Lc,), -1, dtype=torch.long).scatter_reduce(0, key[now], order[now], reduce="amax")
        scored = last_now >= 0
        target = final.clone()
        target[scored] = ev[last_now[scored], 3]
        weights.append(scored.float().view(N, Lc))
        targets.append(target.view(N, Lc))
    return Noise(
        torch.stack(masks),
        None,
        torch.stack(weights),
        torch.stack(tokens) if remasks else None,
        torch.stack(targets) if remasks else None,
    )


def estimate(model, batch, noise: Noise, tr, order_policy=None, edit_policy=None) -> Estimate:
    """order_policy: the learned order head the rollout was decoded with (rollout.order=policy); edit_policy: its
    edit head (rollout.edit).

    Estimate.mask marks the positions the sampler committed (every scored token): the loss counts them all; of an
    any-process rollout, one entry per step (estimators.anyprocess)."""
    if batch.trace.edit_on is not None:
        return anyprocess.estimate(model, batch, noise, tr, order_policy, edit_policy)
    d = batch.trace.decoding
    temperature = d.temperature if d.temperature > 0 else 1.0
    replay = ORDERS[d.order].replay
    if d.order_temperature > 0 and replay in ("model", "learned", "fixed"):
        if replay == "learned" and order_policy is None:
            raise ConfigError(
                f"estimator.name=trajectory with rollout.order={d.order} scores the order with the "
                "learned policy: pass order_policy= (the GRPO trainer does)"
            )
        logps = _score_with_order(model, batch, noise, tr, temperature, d, order_policy)
    else:
        logps = score(model, batch, noise, tr, temperature)
    if replay == "uniform":  # greedy or sampled, uniform keys draw every order of k positions alike
        N, Lc = batch.completion_ids.shape
        logps = logps + _uniform_order_logprob(batch.trace, N, Lc, d.block_length).to(logps.device)
    return Estimate(logps, mask=counted(batch, noise).to(logps.device))


def _uniform_order_logprob(trace, N: int, Lc: int, Lb: int) -> torch.Tensor:
    """log P(draw order) of each step under uniform keys, log((n - k)! / n!) for k positions drawn from the
    n masked ones of the active block, shared equally among the step's commits: [N, Lc]. A constant of the
    trace (no model): read from its events alone, so it holds for merged and packed views too."""
    ev = trace.events.cpu()
    out = torch.zeros(N * Lc, dtype=torch.float64)
    commit = ev[:, 4] == COMMIT
    if not commit.any():
        return out.view(N, Lc).float()
    rows, steps, pos, kinds = ev[:, 0], ev[:, 1], ev[:, 2], ev[:, 4]
    S, nb = int(steps.max()) + 1, Lc // Lb
    # positions of each (row, block) made visible (+1 commit) or masked again (-1 remask) at each step
    delta = torch.where(commit, 1.0, torch.where(kinds == REMASK, -1.0, 0.0)).double()
    change = torch.zeros(N, S, nb, dtype=torch.float64).index_put_((rows, steps, pos // Lb), delta, accumulate=True)
    visible_before = change.cumsum(1) - change  # [N, S, nb] visible before step s
    k = torch.zeros(N, S, dtype=torch.float64).index_put_(
        (rows[commit], steps[commit]), torch.ones(int(commit.sum())).double(), accumulate=True
    )
    r, s, b = rows[commit], steps[commit], pos[commit] // Lb
    n = Lb - visible_before[r, s, b]
    kk = k[r, s]
    term = (torch.lgamma(n - kk + 1) - torch.lgamma(n + 1)) / kk  # each commit's share of its step's order
    out.index_add_(0, r * Lc + pos[commit], term)
    return out.view(N, Lc).float()


def _step_draws(trace, step: int, N: int):
    """Positions each row committed at `step`, in draw order: chosen [N, kmax] long, valid [N, kmax] bool."""
    ev = trace.events.cpu()
    ev = ev[(ev[:, 1] == step) & (ev[:, 4] == COMMIT)]  # recorded row by row, in draw order within a row
    rows = ev[:, 0]
    counts = torch.bincount(rows, minlength=N)
    kmax = int(counts.max()) if len(ev) else 0
    start = torch.cumsum(counts, 0) - counts
    rank = torch.arange(len(ev)) - start[rows]
    chosen = torch.zeros(N, kmax, dtype=torch.long)
    valid = torch.zeros(N, kmax, dtype=torch.bool)
    chosen[rows, rank] = ev[:, 2]
    valid[rows, rank] = True
    return chosen, valid


def _policy_scores(head, stats, hidden, Lb: int) -> torch.Tensor:
    """The head's scores at every completion position [N, Lc], block by block as the sampler called it."""
    N, Lc = stats.masked.shape
    nb = Lc // Lb

    def blocks(t):
        return t.reshape(N * nb, Lb, *t.shape[2:])

    offsets = torch.arange(Lc, device=hidden.device).view(nb, Lb).repeat(N, 1)  # [N*nb, Lb]
    per_block = type(stats)(**{k: blocks(v) for k, v in vars(stats).items()})
    return head(blocks(hidden), per_block, offsets).reshape(N, Lc)


def _score_with_order(model, batch, noise: Noise, tr, temperature: float, d: Decoding, head=None) -> torch.Tensor:
    """score() plus each step's Plackett-Luce order log-prob, shared among the tokens the step committed."""
    trace = batch.trace
    N, Lc = batch.completion_ids.shape
    device = batch.completion_ids.device
    replay = ORDERS[d.order].replay
    scored_order = replay in ("model", "learned")
    Lb = d.block_length
    total = torch.zeros(N, Lc, device=device)
    for j, out in each_view(model, batch, noise, tr, temperature, d.order if scored_order else None):
        w = noise.weights[j].to(device)
        chosen, valid = _step_draws(trace, j, N)
        lp = out[0] if scored_order else out
        if replay == "learned":  # the head runs outside the view's activation checkpoint: it is small
            out = (lp, _policy_scores(head, *out[1], Lb))
        total = total + torch.where(w != 0, lp * w, torch.zeros_like(lp))
        # the sampler drew from the masked positions of the active block (the one the step committed in)
        pos = torch.arange(Lc)
        available = noise.completion_masks[j].cpu() & (pos[None, :] // Lb == chosen[:, :1].clamp(min=0) // Lb)
        r = (valid.any(-1) & (w.sum(-1) > 0).cpu()).nonzero().squeeze(-1)
        order_lp = torch.zeros(N, device=device)
        if len(r):
            scores = out[1][r.to(device)] if scored_order else -pos.float().expand(len(r), Lc).to(device)
            order_lp = order_lp.index_put(
                (r.to(device),),
                plackett_luce_logprob(
                    scores / d.order_temperature, available[r].to(device), chosen[r].to(device), valid[r].to(device)
                ),
            )
        share = w / w.sum(-1, keepdim=True).clamp(min=1e-12)
        total = total + order_lp[:, None] * share
    return total
