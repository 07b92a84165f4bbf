"""Likelihood estimators for completions of a diffusion LM, under explicit noise (estimators.base).

`build_estimator(recipe.estimator, traits)` returns an `Estimator`: `draw(batch, generator) -> Noise` and
`estimate(model, batch, noise) -> Estimate`, closed over its recipe section (they never read the rollout
config: what a rollout decided is in its trace). ESTIMATORS maps recipe names to the builders; adding one =
one `build(cfg, traits) -> Estimator` function + one entry here + one test (examples/custom_estimator.py).
"""

from ..errors import lookup
from . import ar_order, block_elbo, elbo, one_step, quadrature, trajectory
from .base import Estimate, Estimator, Noise, score, scored, token_logprobs, view_logprobs
from .elbo import draw_elbo
from .one_step import draw_one_step
from .quadrature import draw_quadrature, gauss_legendre

ESTIMATORS = {
    "one_step": one_step.build,
    "elbo": elbo.build,
    "block_elbo": block_elbo.build,
    "trajectory": trajectory.build,
    "quadrature": quadrature.build,
    "ar_order": ar_order.build,
}


def build_estimator(cfg, tr) -> Estimator:
    """The estimator named by `cfg.name` (recipe estimator section), for a model with traits `tr`."""
    return lookup(ESTIMATORS, cfg.name, "estimator.name")(cfg, tr)


__all__ = [
    "ESTIMATORS",
    "Estimate",
    "Estimator",
    "Noise",
    "build_estimator",
    "draw_elbo",
    "draw_one_step",
    "draw_quadrature",
    "gauss_legendre",
    "score",
    "scored",
    "token_logprobs",
    "view_logprobs",
]
