"""AR-order exact likelihood: score a completion left to right (JustGRPO, arXiv 2601.15165).

A masked diffusion LM decoded left to right, one token per forward, is an autoregressive policy: token i is
drawn from p(x_i | prompt, x_<i, [MASK] at i..Lc-1), the canvas keeping its full length. Its sequence
log-probability is the sum of those conditionals, exactly, so plain GRPO applies. This estimator returns
them per token: view i masks completion positions >= i (whatever they later held, EOS fill included) and
scores position i, at the temperature recorded in the batch's trace (1 without a trace), [MASK] excluded
from the support as the sampler excludes it.

Exactness and cost (what is exact for which rollout):
- Bidirectional models (LLaDA, Dream, the tiny MDM): every hidden state depends on the whole canvas, so
  no two conditionals share a forward: Lc forwards of length P + Lc. The result is the rollout's exact
  log-probability when the rollout decoded left to right one token per step (rollout.order=left_to_right
  with rollout.steps = max_completion_length, any block length; e.g. block_length 1 is JustGRPO's
  sampler): then it equals the trajectory estimator's value and the trace's token log-probs
  (tests/estimators/test_ar_order.py).
- Block-causal models (block diffusion): a clean block's states depend only on blocks at or before it, so
  one clean stream serves every query. In the two-stream layout [clean prompt + completion | noisy
  completion] (estimators.base), view o masks offsets >= o *inside every block* and scores offset o of
  every block at once: block_size forwards of length P + 2 Lc, independent of Lc, and still exactly the
  per-token conditionals above (future blocks are invisible to a block-causal query, as at rollout).
- estimator.merge_steps = k > 1 reveals k tokens per view (view j masks positions >= j*k, scores
  [j*k, (j+1)*k); block-causal: the same within each block): ceil(Lc / k) (ceil(block / k)) forwards. That
  is the exact likelihood of a sampler that commits the k leftmost tokens per step from one forward
  (left_to_right, rollout.steps = Lc / k); for a one-token-per-step rollout it is a surrogate.
- For a rollout decoded otherwise the AR-order likelihood is not the sampler's probability, and GRPO on it is
  off-policy (the first inner step's ratio is 1 either way, so nothing looks wrong): another order
  (low_confidence, top_prob, ...), a sampled order (rollout.order_temperature > 0), several commits per step
  (rollout.steps < max_completion_length / merge_steps), self-correction, or token filters (top_k, top_p,
  min_p, which this estimator does not apply). check() sees the order and its temperature only and notes
  those two; the rest is the recipe's to get right.

Departures from JustGRPO: the loss is the recipe's (JustGRPO: clipped ratio, no KL, Dr.GRPO-like
normalisation); with a trace only the positions the sampler committed are scored (the first EOS and any token
sampled after it; the EOS filled in after a row stopped is not), without one the completion_mask's (JustGRPO
scores the whole canvas); and views go through the shared each_view (activation checkpointing per view)
instead of one backward per token.
"""

from __future__ import annotations

import torch

from ..batches import Decoding
from .base import Estimate, Estimator, Noise, score


def build(cfg, tr) -> Estimator:
    """The AR-order estimator; estimator.merge_steps = tokens revealed per view (1 = exact per token)."""
    k = max(1, cfg.merge_steps)

    def views(steps: int, completion_length: int) -> int:  # as draw builds them: one per k reveal indices, the
        # completion's positions (bidirectional) or the offsets in a block (block-causal), whatever the steps
        if tr is not None and tr.attention == "block_causal":
            return -(-min(tr.block_size, completion_length) // k)
        return -(-completion_length // k)

    return Estimator(
        lambda batch, generator=None: draw(batch, tr, k),
        lambda model, batch, noise, **extra: estimate(model, batch, noise, tr),
        views=views,
        check=lambda decoding: check(decoding, k),
        counted=counted,
    )


def check(d: Decoding, k: int) -> list[str]:
    """Notes for rollouts whose probability the AR-order likelihood is not (nothing is refused: it is a
    well-defined likelihood of any completion)."""
    if d.order != "left_to_right" or d.order_temperature > 0:
        how = f"rollout.order={d.order}" + (
            f" sampled at order_temperature={d.order_temperature}" * (d.order_temperature > 0)
        )
        return [
            f"estimator.name=ar_order scores completions left to right, but {how}: the AR-order likelihood is not "
            "the rollout's probability (off-policy surrogate); rollout.order=left_to_right, order_temperature=0, "
            f"with rollout.steps = max_completion_length / {k} makes it exact"
        ]
    return []


def offsets(Lc: int, tr) -> torch.Tensor:
    """The reveal index of each completion position: its position (bidirectional) or its offset in its
    attention block (block-causal; completion blocks start at the completion, models.masks): [Lc]."""
    pos = torch.arange(Lc)
    if tr is not None and tr.attention == "block_causal":
        return pos % tr.block_size
    return pos


def draw(batch, tr, k: int = 1) -> Noise:
    """Views for left-to-right scoring (deterministic: nothing is drawn). View j masks completion positions
    whose reveal index is >= j*k and weights those in [j*k, (j+1)*k) that count: every position the sampler
    committed (the first EOS and the tokens sampled after it, as the trajectory estimator scores them; the EOS
    filled after a row stopped was not sampled and is not scored), or the completion_mask without a trace."""
    N, Lc = batch.completion_ids.shape
    off = offsets(Lc, tr)  # [Lc]
    K = -(-(int(off.max()) + 1) // k)
    j = torch.arange(K)[:, None]  # [K, 1]
    masks = (off[None, :] >= j * k)[:, None, :].expand(K, N, Lc)  # [K, N, Lc]
    here = ((off[None, :] >= j * k) & (off[None, :] < (j + 1) * k))[:, None, :]  # [K, 1, Lc]
    trace = getattr(batch, "trace", None)
    counted = batch.completion_mask.bool().cpu() if trace is None else trace.commit_step.cpu() >= 0
    weights = (here & counted[None]).float()  # [K, N, Lc]
    return Noise(masks.clone(), None, weights)


def estimate(model, batch, noise: Noise, tr) -> Estimate:
    trace = getattr(batch, "trace", None)
    t = trace.decoding.temperature if trace is not None and trace.decoding.temperature > 0 else 1.0
    return Estimate(score(model, batch, noise, tr, t), mask=counted(batch, noise).to(batch.completion_ids.device))


def counted(batch, noise: Noise) -> torch.Tensor:
    """Estimate.mask: [N, Lc] every position the sampler committed (EOS and what follows it too)."""
    return noise.weights.sum(0) > 0
