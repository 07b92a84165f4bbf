"""The quadrature ELBO (estimators.quadrature) against the exact ELBO by enumeration of every mask, and every
ELBO-type estimator of estimators.ESTIMATORS against the same exact value through the public Estimator API.

With g(S) = sum_{j in S} log p(y_j | y with S masked) enumerated for every subset S of the L completion
positions, f(t) = sum_S t^{|S|-1} (1 - t)^{L-|S|} g(S) is a polynomial of degree <= L - 1 built exactly
(numpy.polynomial), the ELBO is its integral over [0, 1], and the quadrature estimator's exact mean is
sum_i w_i f(t_i). Helpers (tiny models, enumeration, exact moments of the Monte Carlo ELBO) are
test_estimators.py's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from numpy.polynomial import Polynomial
from test_estimators import all_masks, build, exact_elbo, exact_moments, make_batch, masked_sums, repeat

from dllm_rl import estimators as E
from dllm_rl.config import EstimatorConfig
from dllm_rl.models.base import traits

SHORT = make_batch([[5, 7, 4], [9, 6]], [[3, 8, 5, 11, 4], [10, 10, 6, 3, 9]])  # L = 5
LONG = make_batch([[5, 7, 4], [9, 6]], [[3, 8, 5, 11, 4, 6, 7, 9], [10, 10, 6, 3, 9, 4, 5, 8]])  # L = 8


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model(tokenizer):
    return build(tokenizer)


def integrand(S_row: torch.Tensor, L: int) -> Polynomial:
    """f(t) = sum_S t^{|S|-1} (1-t)^{L-|S|} g(S) as an exact polynomial (S_row: g of every mask, all_masks order)."""
    sizes = all_masks(L).sum(-1)
    f = Polynomial([0.0])
    for m in range(1, L + 1):
        G = S_row[sizes == m].sum().item()
        f = f + G * Polynomial([0.0, 1.0]) ** (m - 1) * Polynomial([1.0, -1.0]) ** (L - m)
    return f


def remainder_constant(n: int) -> float:
    """Gauss-Legendre on [0, 1]: int f - sum w_i f(t_i) = f^(2n)(xi) * this, for some xi in (0, 1)."""
    return math.factorial(n) ** 4 / ((2 * n + 1) * math.factorial(2 * n) ** 3)


def quadrature_moments(S_row: torch.Tensor, L: int, n: int, K: int = 1) -> tuple[float, float]:
    """Exact mean and variance of the quadrature estimator's sequence estimate (enumeration over masks)."""
    t, w = E.gauss_legendre(n)
    size = all_masks(L).sum(-1).double()
    mean = var = 0.0
    for ti, wi in zip(t.tolist(), w.tolist()):
        p = ti**size * (1 - ti) ** (L - size)  # P(M | t_i)
        m1 = (p * S_row).sum().item()
        mean += wi / ti * m1
        var += (wi / ti) ** 2 * ((p * S_row**2).sum().item() - m1**2) / K
    return mean, var


@torch.no_grad()
def sample(model, batch, D: int, seed: int, n: int, K: int = 1) -> torch.Tensor:
    """D independent quadrature estimates per row: [N, D]."""
    N, Lc = batch.completion_ids.shape
    noise = E.draw_quadrature((N * D, Lc), torch.Generator().manual_seed(seed), n, K)
    return E.score(model, repeat(batch, D), noise, traits(model)).double().sum(-1).view(N, D)


def test_gauss_legendre_nodes_and_exactness():
    t, w = E.gauss_legendre(3)
    torch.testing.assert_close(t, torch.tensor([0.5 - 0.5 * math.sqrt(0.6), 0.5, 0.5 + 0.5 * math.sqrt(0.6)]).double())
    torch.testing.assert_close(w, torch.tensor([5 / 18, 8 / 18, 5 / 18]).double())
    for n in range(1, 6):
        t, w = E.gauss_legendre(n)
        assert w.sum().item() == pytest.approx(1, abs=1e-14)
        assert (w * t ** (2 * n - 1)).sum().item() == pytest.approx(1 / (2 * n), abs=1e-14)  # exact to degree 2n-1
        assert (w * t ** (2 * n)).sum().item() != pytest.approx(1 / (2 * n + 1), abs=1e-6)  # not beyond


def test_noise_masks_bernoulli_per_node_with_weights_w_over_t():
    noise = E.draw_quadrature((2000, 16), torch.Generator().manual_seed(0), nodes=3, masks_per_node=2)
    t, w = E.gauss_legendre(3)
    assert noise.num_views == 6 and noise.prompt_masks is None
    for v in range(6):
        i = v // 2
        rate = noise.completion_masks[v].float().mean().item()
        assert rate == pytest.approx(t[i].item(), abs=0.01)
        masked = noise.completion_masks[v]
        assert torch.all(noise.weights[v][~masked] == 0)
        assert torch.allclose(noise.weights[v][masked], torch.tensor(w[i].item() / t[i].item() / 2))
    assert not noise.completion_masks.all(0).all(-1).any()  # no clamp: an empty or full mask is left as drawn


@pytest.mark.parametrize("n", [3, 4])
def test_quadrature_is_the_exact_elbo_when_L_le_2n(model, n):
    """L = 5 <= 2n: the exact mean sum_i w_i f(t_i) equals the ELBO (enumeration), and the estimator's sample mean
    over D draws matches it (z-test with the exact standard error)."""
    L, D = 5, 3000
    S = masked_sums(model, SHORT)
    elbo = exact_elbo(S, L)
    est = sample(model, SHORT, D, seed=n, n=n)
    for row in range(2):
        f = integrand(S[row], L)
        integral = f.integ()(1.0) - f.integ()(0.0)
        assert integral == pytest.approx(elbo[row].item(), abs=1e-9)  # f is the integrand the ELBO integrates
        mean, var = quadrature_moments(S[row], L, n)
        t, w = E.gauss_legendre(n)
        assert mean == pytest.approx(sum(wi * f(ti) for ti, wi in zip(t.tolist(), w.tolist())), abs=1e-9)
        assert mean == pytest.approx(elbo[row].item(), abs=1e-9)
        z = (est[row].mean().item() - mean) / math.sqrt(var / D)
        print(f"n={n} row {row}: ELBO {elbo[row]:.4f}, quadrature mean {est[row].mean():.4f} (z = {z:+.2f})")
        assert abs(z) < 4


def test_quadrature_bias_when_L_gt_2n_is_the_gauss_legendre_remainder(model):
    """L = 8 > 2n = 6: the estimator's mean is sum_i w_i f(t_i), which misses the ELBO by minus the Gauss-Legendre
    remainder, -f^(6)(xi) (3!)^4 / (7 (6!)^3) for some xi in (0, 1), as the module docstring states; the sampled
    mean confirms the biased value; 4 nodes (2n = 8 >= L) are exact again."""
    L, n, D = 8, 3, 3000
    S = masked_sums(model, LONG)
    elbo = exact_elbo(S, L)
    est = sample(model, LONG, D, seed=0, n=n)
    grid = np.linspace(0, 1, 10001)
    for row in range(2):
        f = integrand(S[row], L)
        mean, var = quadrature_moments(S[row], L, n)
        bias = mean - elbo[row].item()
        d6 = f.deriv(2 * n)(grid)
        lo, hi = -d6.max() * remainder_constant(n), -d6.min() * remainder_constant(n)
        print(
            f"row {row}: ELBO {elbo[row]:.4f}, quadrature mean {mean:.4f}, bias {bias:+.5f} "
            f"({100 * bias / abs(elbo[row].item()):+.3f}%), remainder range [{lo:+.5f}, {hi:+.5f}]"
        )
        assert abs(bias) > 1e-4  # biased ...
        assert lo - 1e-9 <= bias <= hi + 1e-9  # ... by exactly the Gauss-Legendre remainder
        assert abs(bias) < 1e-4 * abs(elbo[row].item())  # and by little: the docstring's "under 0.01%"
        z = (est[row].mean().item() - mean) / math.sqrt(var / D)
        assert abs(z) < 4, z
        assert quadrature_moments(S[row], L, 4)[0] == pytest.approx(elbo[row].item(), abs=1e-9)


ELBO_TYPE = {
    "elbo": {"name": "elbo", "num_samples": 2},
    "elbo stratified": {"name": "elbo", "num_samples": 4, "stratified": True},
    "elbo n_t=1 n_m=2": {"name": "elbo", "num_samples": 1, "masks_per_timestep": 2},
    "elbo coupled": {"name": "elbo", "num_samples": 1, "coupled": True, "full_view": False},
    "quadrature": {"name": "quadrature", "num_samples": 3},
    "quadrature K=2": {"name": "quadrature", "num_samples": 3, "masks_per_timestep": 2},
}


@pytest.mark.parametrize("which", list(ELBO_TYPE))
def test_every_elbo_type_estimator_has_the_exact_elbo_as_its_mean(model, which):
    """Through the registry and the Estimator API (draw + estimate), as GRPO and DPO call them: the mean of D
    estimates equals the exact ELBO (L = 5), by a z-test with each estimator's exact standard error."""
    cfg = EstimatorConfig(**ELBO_TYPE[which])
    est = E.ESTIMATORS[cfg.name](cfg, traits(model))
    L, D = 5, 3000
    big = repeat(SHORT, D)
    with torch.no_grad():
        noise = est.draw(big, torch.Generator().manual_seed(11))
        values = est.estimate(model, big, noise).logps.double().sum(-1).view(2, D)
    S = masked_sums(model, SHORT)
    elbo = exact_elbo(S, L)
    for row in range(2):
        if cfg.name == "quadrature":
            mean, var = quadrature_moments(S[row], L, cfg.num_samples, cfg.masks_per_timestep)
        else:
            mean, var = exact_moments(S[row], L, **{k: v for k, v in ELBO_TYPE[which].items() if k != "name"})
        assert mean == pytest.approx(elbo[row].item(), abs=1e-3)
        z = (values[row].mean().item() - elbo[row].item()) / math.sqrt(var / D)
        print(
            f"{which} row {row}: ELBO {elbo[row]:.3f}, mean {values[row].mean():.3f}, "
            f"sd {math.sqrt(var):.2f}, z {z:+.2f}"
        )
        assert abs(z) < 4
