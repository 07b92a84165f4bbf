"""The quadrature ELBO of masked diffusion: the ELBO's integral over the masking ratio t taken by Gauss-Legendre
nodes instead of Monte Carlo timesteps (the SDMC estimator of GDPO, arXiv 2510.08554, as NVIDIA-NeMo/RL runs it
with 3 nodes for LLaDA-8B).

With a completion y of L positions (the canvas the masks range over) and a clean prompt c,

    ELBO(y) = int_0^1 f(t) dt,   f(t) = E_{M ~ Bernoulli(t)^L} [ (1/t) sum_{j in M} log p(y_j | y with M masked, c) ]

and this estimator computes, with n = estimator.num_samples nodes t_i and weights w_i (Gauss-Legendre mapped to
[0, 1]: t = (x + 1) / 2, w = w_x / 2, so sum_i w_i = 1) and K = estimator.masks_per_timestep masks per node,

    Q(y) = sum_i w_i (1 / t_i) (1/K) sum_k sum_{j in M_ik} log p(y_j | y with M_ik masked, c),   M_ik ~ Bernoulli(t_i)^L

in n*K forwards, returned per token (the weight w_i / (t_i K) on each masked position of view (i, k)).

What it estimates, exactly: E[Q] = sum_i w_i f(t_i), because each node's masks are drawn from f's own
distribution. f is a polynomial in t of degree <= L - 1:

    f(t) = sum_{S nonempty} t^{|S|-1} (1 - t)^{L-|S|} g(S),   g(S) = sum_{j in S} log p(y_j | y_{not S}, c)

and n-point Gauss-Legendre integrates polynomials of degree <= 2n - 1 exactly. Hence
- L <= 2n: E[Q] = ELBO(y) exactly (unbiased; e.g. completions of up to 6 positions with 3 nodes);
- L > 2n: E[Q] - ELBO(y) = -f^(2n)(xi) (n!)^4 / ((2n + 1) ((2n)!)^3) for some xi in (0, 1), minus the
  Gauss-Legendre remainder on [0, 1] (the constant is 4.96e-7 for n = 3). The bias is deterministic given the
  model and y. Measured by enumeration on a tiny random model (tests/estimators/test_quadrature.py): with
  L = 8 and n = 3, biases of -0.0004 and +0.0015 nats on ELBOs of -26.1 and -23.6 (under 0.01%), each inside
  the remainder's range; n = 4 removes them. On the shipped Sudoku model (L = 20) benchmarks/dpo_variance.py
  measures it against 10 nodes (exact there). f is smooth in t, so a few nodes come close, but a long
  completion is never scored exactly: the bias is what the lower variance is traded for.
Variance: no 1/t tail. The largest weight is w_1 / t_1 (2.46 for n = 3), where the Monte Carlo ELBO with
t ~ U(0, 1) weighs a lone masked token by 1/t, whose second moment diverges logarithmically as t -> 0.

Block-causal models: the views are scored in the two-stream layout (estimators.base), where the masked copy of
block b (the model's attention blocks, counted from the completion's start) sees the clean blocks before it
and its own block only, so f(t) = sum_b f_b(t), f_b the f above for block b's L_b positions given the clean
blocks before it (degree <= L_b - 1), and E[Q] = sum_b sum_i w_i f_b(t_i): it equals sum_b ELBO(y_b | clean
y_<b) (estimators.elbo) exactly when the block length (not L) is <= 2n, with the bias above per block otherwise.

Masks cover every completion position (as the `elbo` estimator's); the trainer sums the positions its
completion mask counts. The prompt stays clean.

Departure from NeMo RL's implementation: it masks exactly max(1, floor(t_i L)) tokens with weight w_i / t_i, whose
node mean is not f(t_i) (for a model with constant log-probs the estimate is off by -13% at L = 16 and +30% at
L = 4); here the masks are Bernoulli(t_i) per token, so the node mean is exactly f(t_i), and an empty mask
correctly contributes 0 (no clamp to one masked token).
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import ConfigError
from .base import Estimator, Noise, scored


def gauss_legendre(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(nodes t_i, weights w_i) of n-point Gauss-Legendre on [0, 1]; the weights sum to 1. float64."""
    x, w = np.polynomial.legendre.leggauss(n)
    return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)


def draw_quadrature(
    shape: tuple[int, int], generator: torch.Generator, nodes: int = 3, masks_per_node: int = 1
) -> Noise:
    """Noise for the quadrature ELBO over completions of shape (N, Lc): view i*K + k masks each position
    independently with probability t_i and weighs its masked positions w_i / (t_i K)."""
    N, Lc = shape
    t, w = gauss_legendre(nodes)
    coef = (w / t / masks_per_node).float().repeat_interleave(masks_per_node)  # [V] V = n*K views: w_i / (t_i K)
    t = t.float().repeat_interleave(masks_per_node)  # [V]
    r = torch.rand(len(t), N, Lc, generator=generator)  # [V, N, Lc] one uniform per view and position
    mask = r < t[:, None, None]
    return Noise(mask, None, mask.float() * coef[:, None, None])


def build(cfg, tr) -> Estimator:
    """The `quadrature` estimator: estimator.num_samples Gauss-Legendre nodes, estimator.masks_per_timestep masks
    per node."""
    if cfg.num_samples < 1 or cfg.masks_per_timestep < 1:
        raise ConfigError(
            "estimator.name=quadrature needs estimator.num_samples >= 1 (the Gauss-Legendre nodes; 3 as GDPO) and "
            "estimator.masks_per_timestep >= 1 (masks per node)"
        )

    def draw(batch, generator: torch.Generator) -> Noise:
        return draw_quadrature(tuple(batch.completion_ids.shape), generator, cfg.num_samples, cfg.masks_per_timestep)

    views = cfg.num_samples * cfg.masks_per_timestep
    return Estimator(draw, scored(tr), views=lambda steps: views)
