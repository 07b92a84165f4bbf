"""Monte Carlo ELBO of masked diffusion (LLaDA arXiv 2502.09992; MDLM arXiv 2406.07524).

One draw: a timestep t ~ U(t_min, t_max), each completion position masked independently with probability t
(mask M), and the estimate (1/t) sum_{i in M} log p(x_i | x with M masked) (per token: weight 1/t on M, 0
elsewhere). The prompt stays clean (estimator.p_mask_prompt is read by one_step and block_elbo only). Its
expectation, over the whole canvas x (every position, the tokens after an EOS included):
- t_min = 0, t_max = 1: the ELBO,
      ELBO(x) = E_t E_M [(1/t) sum_{i in M} log p(x_i | x_M)]
              = mean over orders sigma of sum_k log p(x_sigma_k | x_sigma_<k)
  (the any-order form, arXiv 2406.03736) <= log p(x), p(x) = the mean over orders of the product: the
  probability that the model produces x unmasking one position at a time in a uniformly random order
  (rollout.order=random, steps = the canvas length, temperature 1). tests/estimators/test_bounds_exact.py
  enumerates both forms and the orders.
- a narrower range [a, b]: ELBO_[a,b](x), the same sum over masks with a mask of size m weighted
  (1/(b - a)) int_a^b t^(m-1) (1-t)^(L-m) dt instead of (m-1)! (L-m)! / L! (each token's weights still sum to
  1): a truncated ELBO, not a bound of log p(x).

Noise options (estimator section):
- num_samples = n_t timesteps, masks_per_timestep = n_m masks each: the budget n = n_t * n_m; VRPO's
  optimal allocation (arXiv 2505.19223) is n_m = 1, the default. Same expectation.
- stratified: timesteps t_k = t_min + (t_max - t_min)(k + u)/n_t with one u per sequence (systematic
  sampling: the same expectation; usually lower variance than i.i.d. timesteps when the per-timestep value
  varies smoothly in t, not guaranteed in general; measured on two tiny models in tests/estimators).
- coupled (DiffuCoder arXiv 2506.20639): each draw is a mask M weighted 1/t and its complement weighted
  1/(1-t), so every token is scored exactly once in a partially masked context, and the pair is averaged
  (x 1/2). The complement masks with probability 1 - t ~ U(1 - t_max, 1 - t_min), so the pair's expectation
  is (ELBO_[t_min,t_max] + ELBO_[1-t_max,1-t_min]) / 2: the ELBO for t ~ U(0, 1), ELBO_[a,b] for a range
  symmetric about 1/2 such as DiffuCoder's U(0.2, 0.8).
- full_view (with coupled, on by default): DiffuCoder's exact form, kept as DiffuCoder computes it. The fully
  masked view is added with weight 1/2, so the per-token estimate is DiffuCoder's
  (p0 + where(mask, p1 / t, p2 / (1 - t))) / 2, and its expectation is the pair's plus one_step(x) / 2, where
  one_step(x) = sum_i log p(x_i | every completion position masked) (estimators.one_step without prompt
  masking): each token's weights sum to 1.5, so this is neither the ELBO nor a bound of log p(x), but the
  (truncated) ELBO plus half the one-step log-likelihood. full_view=False drops the view and leaves the pair.
The masked-diffusion SFT loss is this estimator with one sample and t ~ U(t_min, 1] (LLaDA's SFT).

Block-causal models: the views are scored in the two-stream layout (estimators.base), where the masked copy of
block b (the model's attention blocks, counted from the completion's start) sees the clean blocks before it
and its own block only. The mask restricted to block b is Bernoulli(t) per position, so everything above holds
block by block and the expectation is the sum of per-block quantities, not the ELBO of the whole canvas: with
t ~ U(0, 1), sum_b ELBO(x_b | clean x_<b), each the any-order ELBO of block b's positions given the clean
blocks before it (<= log p(x_b | x_<b), p the mean over orders of block b, as estimators.block_elbo's p(x));
with a narrower range, sum_b ELBO_[a,b](x_b | clean x_<b) (the weights above with L = block b's length); the
full view adds half of one_step's per-block value (estimators.one_step).

Positions: the estimate covers every canvas position; the GRPO trainer sums it up to and including the first
EOS (batch.completion_mask, d1's convention; the tokens after it are context, masked or visible per view),
which is those positions' share of the canvas ELBO, not the ELBO of the shorter sequence.
"""

from __future__ import annotations

import torch

from .base import Estimator, Noise, scored


def _timesteps(n: int, N: int, t_min: float, t_max: float, stratified: bool, g) -> torch.Tensor:
    u = torch.rand(N, generator=g) if stratified else None
    if stratified:
        k = torch.arange(n, dtype=torch.float32)[:, None]
        frac = (k + u[None, :]) / n  # [n, N]
    else:
        frac = torch.rand(n, N, generator=g)
    return t_min + (t_max - t_min) * frac  # [n, N]


def draw_elbo(
    shape: tuple[int, int],
    generator: torch.Generator,
    num_samples: int = 1,
    t_min: float = 0.0,
    t_max: float = 1.0,
    stratified: bool = False,
    masks_per_timestep: int = 1,
    coupled: bool = False,
    full_view: bool = True,
) -> Noise:
    """Noise for the ELBO estimator over completions of shape (N, Lc)."""
    N, Lc = shape
    t = _timesteps(num_samples, N, t_min, t_max, stratified, generator)  # [n_t, N]
    t = t.clamp(min=1e-6, max=1.0).repeat_interleave(masks_per_timestep, 0)  # [K, N]
    r = torch.rand(t.shape[0], N, Lc, generator=generator)  # [K, N, Lc]
    mask = r < t[..., None]
    K = t.shape[0]
    if not coupled:
        return Noise(mask, None, mask.float() / t[..., None] / K)
    comp = ~mask
    w_a = mask.float() / t[..., None]
    w_b = comp.float() / (1 - t).clamp(min=1e-6)[..., None]
    # each half (mask / t, complement / (1 - t)) is unbiased for the ELBO when t ~ U(0, 1), so the pair is
    # averaged; the full view, when kept, adds one_step / 2 on top (DiffuCoder's per-token (p0 + pair) / 2)
    masks, weights = [mask, comp], [0.5 * w_a / K, 0.5 * w_b / K]
    if full_view:
        masks.append(torch.ones(N, Lc, dtype=torch.bool)[None].expand(1, N, Lc))
        weights.append(torch.full((1, N, Lc), 0.5))
    return Noise(torch.cat(masks), None, torch.cat(weights))


def build(cfg, tr) -> Estimator:
    """The `elbo` estimator for the recipe's estimator section."""

    def draw(batch, generator: torch.Generator) -> Noise:
        return draw_elbo(
            tuple(batch.completion_ids.shape),
            generator,
            num_samples=cfg.num_samples,
            t_min=cfg.t_min,
            t_max=cfg.t_max,
            stratified=cfg.stratified,
            masks_per_timestep=cfg.masks_per_timestep,
            coupled=cfg.coupled,
            full_view=cfg.full_view,
        )

    views = cfg.num_samples * cfg.masks_per_timestep * (2 if cfg.coupled else 1) + (cfg.coupled and cfg.full_view)
    return Estimator(draw, scored(tr), views=lambda steps: int(views))
