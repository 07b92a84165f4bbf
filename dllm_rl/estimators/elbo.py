"""Monte Carlo ELBO of masked diffusion (LLaDA arXiv 2502.09992; MDLM arXiv 2406.07524):

    log p(x) >= E_{t ~ U(0,1)} E_{mask ~ Bern(t)^L} [ (1/t) sum_{i masked} log p(x_i | x_masked) ].

Noise options (estimator section):
- num_samples = n_t timesteps, masks_per_timestep = n_m masks each: the budget n = n_t * n_m; VRPO's
  optimal allocation (arXiv 2505.19223) is n_m = 1, the default.
- stratified: timesteps t_k = t_min + (t_max - t_min)(k + u)/n_t with one u per sequence (lower variance
  than i.i.d. timesteps; the same estimator in expectation).
- coupled (DiffuCoder arXiv 2506.20639): each draw is a mask and its complement, weighted 1/t and 1/(1-t),
  so every token is scored exactly once in a partially masked context; plus, as DiffuCoder does, the fully
  masked view, averaged in with weight 1/2 (full_view=False drops it; then, with t ~ U(0,1), the estimate
  stays unbiased for the ELBO).
The masked-diffusion SFT loss is this estimator with one sample and t ~ U(t_min, 1] (LLaDA's SFT).
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
    # each half (mask / t, complement / (1 - t)) is unbiased for the ELBO, so the pair is averaged: with the
    # full view this is DiffuCoder's per-token (one_step + pair) / 2, and dropping the full view leaves the
    # unbiased pair / 2 (scaling the pair by 1 there estimated 2 x ELBO)
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
