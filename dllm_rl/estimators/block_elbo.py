"""SPG's block-wise likelihood bounds (Sandwiched Policy Gradient, arXiv 2510.09541).

Noise (SPG's `block_random`): for each of num_samples views pick a block j among the blocks the completion
reaches; blocks after j are fully masked, block j gets a uniformly random number of masks in
[max(1, floor(min_t * len)), floor(max_t * len)] at random positions, earlier blocks stay clean; tokens after
the first EOS are always masked; prompt tokens are masked with p_mask_prompt.

Bounds, per sequence (as SPG computes them):
- lower (ELBO proxy): mean over views of the mean log p over the view's masked completion tokens;
- upper (EUBO): (1/beta) * mean over tokens of log( mean over views of p^beta * masked / t_hat ), t_hat the
  view's masked fraction of the completion (tokens never masked in any view are left out);
- the policy gradient uses the lower bound for positive advantages and, for negative ones, the upper bound,
  the lower bound, or their mixture (grpo.spg_bound = eubo | elbo | mix, grpo.spg_mix_weight;
  estimator.eubo_beta).
Both are returned as per-token contributions whose sum over a sequence is the sequence bound.
"""

from __future__ import annotations

import torch

from .base import Estimate, Estimator, Noise, each_view


def build(cfg, tr) -> Estimator:
    """SPG's bounds for the recipe's estimator section (num_samples views, t_min/t_max, eubo_beta)."""
    return Estimator(
        lambda batch, generator: draw(batch, cfg, generator),
        lambda model, batch, noise, **extra: estimate(model, batch, noise, tr, cfg.eubo_beta),
        views=lambda steps: cfg.num_samples,
    )


def draw(batch, cfg, generator: torch.Generator) -> Noise:
    """The views for a batch. SPG's blocks: estimator.block_length, else the rollout's (batch.trace), else one."""
    N, Lc = batch.completion_ids.shape
    trace = getattr(batch, "trace", None)
    Lb = cfg.block_length or (trace.decoding.block_length if trace is not None else Lc)
    K = cfg.num_samples
    lengths = batch.completion_mask.sum(-1).cpu().clamp(min=1)  # [N]
    n_blocks = (lengths - 1) // Lb + 1  # blocks the completion reaches
    masks = torch.zeros(K, N, Lc, dtype=torch.bool)
    pos = torch.arange(Lc)
    for k in range(K):
        j = (torch.rand(N, generator=generator) * n_blocks).long()  # chosen block per sequence
        start = j * Lb
        span = torch.minimum(torch.full_like(lengths, Lb), lengths - start)  # real tokens in block j
        lo = (span.float() * cfg.t_min).long().clamp(min=1)
        hi = torch.maximum((span.float() * cfg.t_max).long().clamp(max=span), lo)
        count = lo + (torch.rand(N, generator=generator) * (hi - lo + 1).float()).long().clamp(max=hi - lo)
        keys = torch.rand(N, Lc, generator=generator)  # random positions inside block j
        in_block = (pos[None] >= start[:, None]) & (pos[None] < (start + span)[:, None])
        rank = torch.where(in_block, keys, torch.full_like(keys, 2.0)).argsort(-1).argsort(-1)
        partial = in_block & (rank < count[:, None])
        later = pos[None] >= (start + Lb)[:, None]
        after_eos = pos[None] >= lengths[:, None]
        masks[k] = partial | later | after_eos
    prompt = torch.rand(K, *batch.prompt_ids.shape, generator=generator) < cfg.p_mask_prompt
    return Noise(masks, prompt, torch.ones(K, N, Lc))  # weights unused: the bounds are built in estimate()


def estimate(model, batch, noise: Noise, tr, beta: float) -> Estimate:
    cmask = batch.completion_mask.bool()  # [N, Lc]
    K = noise.num_views
    lower = torch.zeros(cmask.shape, device=cmask.device)
    avg_p = torch.zeros(cmask.shape, device=cmask.device)
    for k, lp in each_view(model, batch, noise, tr):  # lp: [N, Lc]
        scored = noise.completion_masks[k] & cmask
        n_scored = scored.sum(-1, keepdim=True).clamp(min=1)
        lower = lower + torch.where(scored, lp, torch.zeros_like(lp)) / n_scored / K
        t_hat = n_scored / cmask.sum(-1, keepdim=True).clamp(min=1)
        avg_p = avg_p + torch.where(scored, (beta * lp).exp() / t_hat, torch.zeros_like(lp)) / K
    seen = avg_p > 0
    upper = torch.where(seen, avg_p.clamp(min=1e-30).log(), torch.zeros_like(avg_p))
    upper = upper / seen.sum(-1, keepdim=True).clamp(min=1) / beta
    return Estimate(lower, upper)
