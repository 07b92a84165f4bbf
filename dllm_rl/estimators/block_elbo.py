"""SPG's block-wise likelihood bounds (Sandwiched Policy Gradient, arXiv 2510.09541; facebookresearch/SPG).

The likelihood they bound. x is the completion up to and including its first EOS (n tokens; the positions
after it stay masked, as SPG masks them). The model generates it block by block, left to right, and inside a
block one position at a time in a uniformly random order, each token drawn from the model's conditional
given what is visible (LLaDA's semi-autoregressive sampler with rollout.order=random, one token per step,
temperature 1). p(x) is the probability of that process producing x:

    p(x) = prod_b  mean over orders sigma of block b's positions of  prod_k p(x_sigma_k | x_<b, x_sigma_<k),

the block any-order (AO-ARM) marginal, a block-wise version of what masked diffusion models (arXiv 2406.03736)
generate. tests/estimators/test_bounds_exact.py computes it by enumerating every order.

Noise (SPG's `block_random`): for each of num_samples views pick a block j uniformly among the n_b blocks the
completion reaches; blocks after j are fully masked, block j (s real tokens) gets a uniformly random number m
of masks in [max(1, floor(min_t * s)), floor(max_t * s)] at random positions, earlier blocks stay clean;
tokens after the first EOS are always masked; prompt tokens are masked with p_mask_prompt. The view scores
block j's m masked tokens with weight w = n_b * s / m (Noise.weights).

Bounds, per sequence and at SPG's scale, about 1/n of the sequence value (SPG's loss multiplies them by n
again: algorithms.losses.spg), returned as per-token contributions that sum to the sequence value: the lower
one divided by the completion length n, the upper one a mean over the tokens scored in at least one view
(all n once the views are many; with few views and several blocks, fewer).
- lower = (1/n) mean over views of sum_i w * log p(x_i | view). With min_t = 0, max_t = 1 (SPG's settings,
  the defaults) and p_mask_prompt = 0 (the default is 0.15: last bullet) its expectation is exactly
  ELBO(x) / n, ELBO(x) = sum_b mean over orders of block b of the log of the product above <= log p(x)
  (Jensen): for each token, the ELBO averages its log-conditional
  uniformly over the mask sizes 1..s of its block (given that it is masked). With a narrower count range the
  average runs over the sizes in that range only, and is no bound.
- upper (SPG's EUBO) = (1/beta) mean over tokens of log( mean over views of w * p(x_i | view)^beta ), tokens
  never scored in any view left out (SPG's). As the number of views grows it tends to
  EUBO(x) / n, EUBO(x) = sum_i (1/beta) log E[ p(x_i | x_<b, positions of block b before i)^beta ] (the
  expectation over the orders of i's block b), nondecreasing in beta. EUBO(x) >= log p(x) for every model when
  beta >= the block length (Hoelder's inequality over the block's tokens), and for every beta >= 1 when the
  model's conditionals are those of one joint distribution (then ELBO(x) = log p(x) too). For beta below the
  block length a model whose conditionals are not consistent (any trained network's, to a degree) can have
  EUBO(x) < log p(x): on tiny random models it happens at beta = 1 (SPG's Sudoku value). A finite number of
  views estimates it with a downward bias (the log of a mean).
- With p_mask_prompt > 0 every expectation above also runs over the prompt masks (each view draws its own,
  d1's regulariser): the lower value's is then the mean over prompt masks B of ELBO(x | prompt masked by B),
  below the mean of log p(x | B) but no bound of log p(x | prompt), and the upper value's limit has the prompt
  masks inside its expectation.

Where this departs from SPG's code: with more than one block, SPG's code also scores the fully masked later
blocks' tokens and averages every masked token alike (its EUBO weight is 1 / masked fraction of the whole
completion). Computed exactly on tiny random models that lower value lies above log p(x) for some, and its
upper value below log p(x) even at beta = the block length: neither is a bound. Scoring block j only, with
w = n_b * s / m, makes them the bounds above. With one block (a completion no longer than the block length)
the two coincide exactly, view by view, whatever min_t and max_t.
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
        per_token_mean=True,
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
    weights = torch.zeros(K, N, Lc)
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
        weights[k] = partial.float() * (n_blocks * span / count).float()[:, None]  # block j's masked tokens only
    prompt = torch.rand(K, *batch.prompt_ids.shape, generator=generator) < cfg.p_mask_prompt
    return Noise(masks, prompt, weights)


def estimate(model, batch, noise: Noise, tr, beta: float) -> Estimate:
    """Per-token contributions of the lower bound and of SPG's EUBO (module docstring), at SPG's scale."""
    cmask = batch.completion_mask.bool()  # [N, Lc]
    n = cmask.sum(-1, keepdim=True).clamp(min=1)  # [N, 1] completion length, EOS included
    K = noise.num_views
    lower = torch.zeros(cmask.shape, device=cmask.device)
    terms = []  # per view: log(w * p^beta) where scored; a finite stand-in elsewhere (no NaN gradients)
    for k, lp in each_view(model, batch, noise, tr):  # lp: [N, Lc]
        w = noise.weights[k].to(lp.device)
        scored = w > 0
        lower = lower + torch.where(scored, w * lp, torch.zeros_like(lp)) / n / K
        terms.append(torch.where(scored, w.clamp(min=1e-30).log() + beta * lp, torch.full_like(lp, -1e30)))
    if not terms:
        return Estimate(lower, torch.zeros_like(lower))
    seen = (noise.weights > 0).any(0).to(lower.device)  # [N, Lc] tokens scored in some view
    log_mean = torch.stack(terms).logsumexp(0) - torch.log(torch.tensor(float(K)))
    upper = torch.where(seen, log_mean, torch.zeros_like(log_mean)) / beta
    upper = upper / seen.sum(-1, keepdim=True).clamp(min=1)
    return Estimate(lower, upper)
