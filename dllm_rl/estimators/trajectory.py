"""Trajectory likelihood: replay the rollout's own denoising path (TraceRL arXiv 2509.06949; DCoLT arXiv
2505.10446).

Each token is scored by the model in the exact state the sampler committed it from: view s holds the canvas
as it was before step s (replayed from the trace's events, self-correction remasks included), and scores
the tokens whose final commit happened at step s, with the sampler's temperature, so with merge_steps=1 the
estimate equals the log-probs the sampler recorded. merge_steps = m scores m consecutive steps from the
state before the first of them (TraceRL's `shrink`): m times fewer forwards, slightly less context.

The sum is the rollout's log-probability (so its gradient is the policy gradient) when the unmasking order
is a function of the state, such as rollout.order=top_prob, margin, entropy, left_to_right or random (a
sampled order from a learned policy adds its Plackett-Luce log-probs, recorded in the trace). LLaDA's
low_confidence order with temperature > 0 ranks positions by the probability of the token just sampled
there, so which position is committed depends on the draws, and the product of committed-token probabilities
is not the probability of the rollout (tests/test_estimators.py counts it summing to ~2 over trajectories;
on the tiny Countdown model at temperature 1 a step along its large-batch gradient does not raise the reward,
while one along the gradient for a model-independent order does; on Sudoku at 0.5 both rise: benchmarks/
ascent.py, RESULTS.md). top_prob decodes exactly
like low_confidence when greedy.

Block-causal models are packed as TraceRL does: in the two-stream layout (estimators.base) the noisy copy
of block b only sees clean blocks < b and itself, so one forward scores round r of *every* block; the
number of forwards is the number of steps per block, not the total. This needs the rollout block length to
equal the model's attention block (otherwise a block's queries saw a partially decoded neighbour that the
packed layout cannot show).
"""

from __future__ import annotations

import torch

from ..errors import ConfigError
from ..rollout.trace import COMMIT
from .base import Estimate, Noise, score


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


def draw(batch, cfg, rollout, tr, generator=None) -> Noise:
    """Views replaying the trace (deterministic: the generator is not used)."""
    trace = batch.trace
    if trace is None:
        raise ConfigError("estimator.name=trajectory needs rollouts with a commit trace (the GRPO trainer's own "
                          "rollouts); pick one_step, elbo or block_elbo for other data")
    N, Lc = batch.completion_ids.shape
    block = None
    if tr.attention == "block_causal":
        Lb = rollout.block_length or Lc
        if Lb != tr.block_size:
            raise ConfigError(f"estimator.name=trajectory on a block-causal model needs rollout.block_length "
                              f"({Lb}) equal to the model's attention block ({tr.block_size})")
        block = Lb
    ev_local, local = _local_steps(trace, Lc, block)
    m = max(1, cfg.merge_steps)
    K = int(local.max().item()) // m + 1 if local.numel() and local.max() >= 0 else 1
    ev = trace.events
    key = ev[:, 0] * Lc + ev[:, 2]  # [E] (row, pos)
    order = torch.arange(len(ev))
    scored = batch.completion_mask.bool().cpu() & (local >= 0)
    masks, weights, tokens = [], [], []
    remasks = bool((ev[:, 4] != COMMIT).any())
    for j in range(K):
        before = ev_local < j * m
        last = torch.full((N * Lc,), -1, dtype=torch.long).scatter_reduce(
            0, key[before], order[before], reduce="amax")  # last event before the view, per position
        visible = torch.zeros(N * Lc, dtype=torch.bool)
        canvas = batch.completion_ids.cpu().reshape(-1).clone()
        hit = last >= 0
        visible[hit] = ev[last[hit], 4] == COMMIT
        canvas[hit] = ev[last[hit], 3]  # the token the canvas held then (self-correction may change it)
        masks.append(~visible.view(N, Lc))
        tokens.append(canvas.view(N, Lc))
        weights.append((scored & (local >= j * m) & (local < (j + 1) * m)).float())
    return Noise(torch.stack(masks), None, torch.stack(weights), torch.stack(tokens) if remasks else None)


def estimate(model, batch, noise: Noise, tr, cfg, rollout) -> Estimate:
    temperature = rollout.temperature if rollout.temperature > 0 else 1.0
    return Estimate(score(model, batch, noise, tr, temperature))
