"""Plackett-Luce over positions: sampling an ordered set of k positions and its exact log-probability.

A Plackett-Luce order draws positions one after another without replacement, each with probability
proportional to exp(score) among those left. Gumbel-top-k draws exactly that distribution in one shot
(Kool et al. 2019, arXiv 1903.06059); ties between keys go to the lowest position. The log-probability of
the drawn order sigma_1..sigma_k is
    sum_i [ s_{sigma_i} - log( sum_{unchosen} e^s + sum_{j >= i} e^{s_{sigma_j}} ) ],
computed with a reverse log-cumsum-exp as in DCoLT (arXiv 2505.10446). Used by the rollout engine (sampled
unmasking orders) and by the learned unmasking policy (its action log-probs, with gradient).
"""

from __future__ import annotations

import torch

NEG = float("-inf")


def gumbel_keys(scores: torch.Tensor, available: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Perturbed keys scores + Gumbel(u) in float64, -inf where unavailable: sorting them descending draws a
    Plackett-Luce order. scores, u: [n, m]; available: [n, m] bool."""
    gumbel = -torch.log(-torch.log(u.to(torch.float64)))  # [n, m]
    return torch.where(available, scores.double() + gumbel, torch.full_like(gumbel, NEG))


def rank_positions(keys: torch.Tensor, k: torch.Tensor, kmax: int | None = None):
    """Positions by descending key, ties to the lowest index, and which of them the k[i] best are.

    keys: [n, m]; k: [n] long. Returns chosen: [n, kmax or m] long (best first), valid: [n, kmax or m] bool
    (j < k[i]). With kmax=None every position is ranked (a static shape: no host read of k).
    The stable sort makes ties deterministic on every device (torch.topk leaves their order unspecified).
    """
    chosen = keys.sort(dim=-1, descending=True, stable=True).indices
    if kmax is not None:
        chosen = chosen[:, :kmax]
    valid = torch.arange(chosen.shape[1], device=k.device)[None, :] < k[:, None]
    return chosen, valid


def gumbel_topk(scores: torch.Tensor, available: torch.Tensor, k: torch.Tensor, u: torch.Tensor):
    """Sample k[i] positions per row without replacement, Plackett-Luce over `scores`.

    scores, u: [n, m] (u uniform in (0, 1)); available: [n, m] bool; k: [n] long (<= available count).
    Returns chosen: [n, kmax] long indices in draw order, valid: [n, kmax] bool (j < k[i]).
    """
    return rank_positions(gumbel_keys(scores, available, u), k, int(k.max()) if k.numel() else 0)


def order_keys(scores: torch.Tensor, available: torch.Tensor) -> torch.Tensor:
    """float32 scores, -inf where unavailable: sorting them descending gives the deterministic order."""
    return torch.where(available, scores.float(), torch.full_like(scores, NEG, dtype=torch.float32))


def topk_positions(scores: torch.Tensor, available: torch.Tensor, k: torch.Tensor):
    """Deterministic counterpart: the k[i] highest-scoring available positions, best first."""
    return rank_positions(order_keys(scores, available), k, int(k.max()) if k.numel() else 0)


def plackett_luce_logprob(
    scores: torch.Tensor, available: torch.Tensor, chosen: torch.Tensor, valid: torch.Tensor
) -> torch.Tensor:
    """log P(chosen order) under Plackett-Luce with logits `scores` over `available` positions. [n].

    Differentiable in `scores` (the learned policy trains through it).
    """
    s = scores.float().masked_fill(~available, NEG)  # [n, m]
    picked = s.gather(-1, chosen).masked_fill(~valid, NEG)  # [n, kmax]
    # chosen -> False. Summed, not overwritten: a padding entry (valid False) may repeat a chosen index, and a
    # scatter_ of both would let the padding's write win
    hit = torch.zeros_like(available, dtype=torch.long).scatter_add_(-1, chosen, valid.long()) > 0
    unchosen = available & ~hit
    lse_rest = s.masked_fill(~unchosen, NEG).logsumexp(-1, keepdim=True)  # [n, 1]
    tail = picked.flip(-1).logcumsumexp(-1).flip(-1)  # [n, kmax]: log sum_{j >= i} e^{picked_j}
    denom = torch.logaddexp(lse_rest.expand_as(tail), tail)
    terms = (picked - denom).masked_fill(~valid, 0.0)
    return terms.sum(-1)
