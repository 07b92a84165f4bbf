"""Which masked positions to commit (ordering rules) and which committed ones to take back (self-correction).

Ordering rules score each masked position of the active block; the engine commits the k best (or samples
k of them, Plackett-Luce, when `order_temperature` > 0, recording the log-prob).
- low_confidence: model probability of the proposed token (LLaDA's default "low_confidence remasking").
- top_prob: model probability of the most likely token. Greedy, the same order as low_confidence; when
  sampling it depends on the state only, not on the tokens just drawn. That matters for RL: with
  low_confidence a position is committed *because* its sampled token came out probable, so the
  probability of a step is not the product of the committed tokens' probabilities and the trajectory
  estimator's gradient is not the policy gradient (benchmarks/ascent.py: on the tiny Countdown model at
  temperature 1 a step along it does not raise the reward; RESULTS.md).
  With top_prob (or margin, entropy, random, left_to_right) the order is fixed by the state, and the
  trajectory log-likelihood is the exact log-probability of the rollout (tests/test_estimators.py).
- margin: top-1 minus top-2 probability. entropy: negative entropy. random: uniform keys (LLaDA "random").
- left_to_right: earliest position first (autoregressive order inside the block).
- policy: scores from a learned unmasking policy (dllm_rl.policy.OrderHead) passed to
  `generate(order_policy=...)`; sampled when order_temperature > 0 (training), the k best when 0.

Self-correction (ReMDM arXiv 2503.00307, in the any-process spirit of arXiv 2510.06190): after a step's
commits, tokens committed at earlier steps of the active block whose probability under the current logits
fell below `correction_threshold` are remasked (the lowest first, at most `correction_max_per_step`), while
steps remain in the block; the trace records each remask.
"""

from __future__ import annotations

import torch

from .sampling import without_mask_token
from .schedules import StepStats


def order_low_confidence(st: StepStats, offsets: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return st.confidence


def order_top_prob(st: StepStats, offsets: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return st.top_prob


def order_margin(st: StepStats, offsets: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return st.margin


def order_entropy(st: StepStats, offsets: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return -st.entropy


def order_random(st: StepStats, offsets: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return u.float()


def order_left_to_right(st: StepStats, offsets: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    return -offsets.float().expand_as(st.confidence)


def model_order_scores(logits: torch.Tensor, mask_token_id: int | None, order: str) -> torch.Tensor:
    """The scores of the orders that are a function of the model's distribution (top_prob, margin, entropy)
    from raw logits [..., V], differentiable: what the sampler ranked, recomputed by the trajectory estimator
    to score a sampled order's Plackett-Luce log-prob with gradient. Same numbers as choose_tokens' stats."""
    logp = without_mask_token(logits.float(), mask_token_id).log_softmax(-1)
    if order == "entropy":
        return -torch.special.entr(logp.exp()).sum(-1)
    top = logp.topk(2, dim=-1).values.exp()
    if order == "top_prob":
        return top[..., 0]
    if order == "margin":
        return top[..., 0] - top[..., 1]
    raise ValueError(f"order {order!r} is not a function of the model's distribution")


MODEL_ORDERS = ("top_prob", "margin", "entropy")  # scores that model_order_scores recomputes

ORDERS = {
    "low_confidence": order_low_confidence,
    "top_prob": order_top_prob,
    "margin": order_margin,
    "entropy": order_entropy,
    "random": order_random,
    "left_to_right": order_left_to_right,
    "policy": None,  # scores come from the order_policy passed to generate()
}


def self_correction(token_prob: torch.Tensor, committed_before: torch.Tensor, threshold: float,
                    max_per_step: int) -> torch.Tensor:
    """Positions to remask: [n, Lb] bool. token_prob: current model probability of each committed token."""
    low = committed_before & (token_prob < threshold)
    if max_per_step <= 0 or not low.any():
        return torch.zeros_like(low)
    keys = torch.where(low, -token_prob, torch.full_like(token_prob, float("-inf")))
    k = min(max_per_step, low.shape[-1])
    idx = keys.topk(k, dim=-1).indices  # lowest probabilities first
    pick = torch.zeros_like(low).scatter_(-1, idx, True)
    return pick & low
