"""Unmasking orders: which masked positions of the active block a step commits first.

An ordering rule scores each masked position (higher first); the engine commits the k best, or samples k of
them Plackett-Luce over scores / `order_temperature` when that is > 0, recording the draw's log-prob.
- low_confidence: model probability of the proposed token (LLaDA's default "low_confidence remasking").
- top_prob: model probability of the most likely token. Greedy, the same order as low_confidence; when
  sampling it depends on the state only, not on the tokens just drawn. That matters for RL: with
  low_confidence a position is committed *because* its sampled token came out probable, so the
  probability of a step is not the product of the committed tokens' probabilities and the trajectory
  estimator's gradient is not the policy gradient (benchmarks/ascent.py measures it).
  With top_prob (or margin, entropy, random, left_to_right) the order is fixed by the state, and the
  trajectory log-likelihood is the exact log-probability of the rollout (tests/estimators/).
- margin: top-1 minus top-2 probability. entropy: negative entropy. random: uniform keys (LLaDA "random").
- left_to_right: earliest position first (autoregressive order inside the block).
- policy: a learned unmasking policy (policy.OrderHead, DCoLT arXiv 2505.10446) passed to
  `generate(order_policy=...)`; sampled when order_temperature > 0 (training), the k best when 0.

Each rule also says how a trajectory estimator replays a sampled draw of it (`Order.replay`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..batches import StepStats
from ..kernels.sampling import without_mask_token


@dataclass
class OrderInputs:
    """What an ordering rule may read at one step, for the n rows decoded: [n, Lb] unless noted."""

    stats: StepStats
    offsets: torch.Tensor  # [1, Lb] completion offsets of the block's positions
    u: torch.Tensor  # uniforms in (0, 1), one per position (counter-based: batch-invariant)
    hidden: torch.Tensor | None = None  # [n, Lb, D] last hidden states (only for rules with needs_hidden)
    head: Callable | None = None  # the learned order head (rollout.order=policy)


@dataclass(frozen=True)
class Order:
    scores: Callable[[OrderInputs], torch.Tensor]  # -> [n, Lb]
    # how the trajectory estimator scores a sampled draw: "model" (recomputed from the model's distribution,
    # with gradient: `from_logp`), "learned" (the order head), "uniform" (a constant: every draw order equally
    # likely), "fixed" (model-independent scores: `scores` of the state), "tokens" (depends on the tokens just
    # sampled at positions that were not committed: not replayable)
    replay: str
    from_logp: Callable[[torch.Tensor], torch.Tensor] | None = None  # log-probs [..., V] -> scores [...]
    needs_hidden: bool = False  # reads the model's hidden states and a learned head


def _top_prob(logp: torch.Tensor) -> torch.Tensor:
    return logp.max(-1).values.exp()


def _margin(logp: torch.Tensor) -> torch.Tensor:
    top = logp.topk(2, dim=-1).values.exp()
    return top[..., 0] - top[..., 1]


def _neg_entropy(logp: torch.Tensor) -> torch.Tensor:
    return -torch.special.entr(logp.exp()).sum(-1)


ORDERS = {
    "low_confidence": Order(lambda x: x.stats.confidence, "tokens"),
    "top_prob": Order(lambda x: x.stats.top_prob, "model", _top_prob),
    "margin": Order(lambda x: x.stats.margin, "model", _margin),
    "entropy": Order(lambda x: -x.stats.entropy, "model", _neg_entropy),
    "random": Order(lambda x: x.u.float(), "uniform"),
    "left_to_right": Order(lambda x: -x.offsets.float().expand_as(x.stats.confidence), "fixed"),
    "policy": Order(lambda x: x.head(x.hidden, x.stats, x.offsets).float(), "learned", needs_hidden=True),
}


def model_order_scores(logits: torch.Tensor, mask_token_id: int | None, order: str) -> torch.Tensor:
    """A "model" order's scores from raw logits [..., V], differentiable: what the sampler ranked, recomputed
    by the trajectory estimator to score a sampled order's Plackett-Luce log-prob with gradient."""
    rule = ORDERS[order]
    if rule.from_logp is None:
        raise ValueError(f"order {order!r} is not a function of the model's distribution")
    return rule.from_logp(without_mask_token(logits.float(), mask_token_id).log_softmax(-1))
