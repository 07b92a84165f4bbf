"""Likelihood estimators for completions of a diffusion LM, under explicit noise (estimators.base).

Each estimator is a `draw` (batch -> Noise, from a torch.Generator) and an `estimate` (model, batch, noise ->
Estimate); ESTIMATORS maps recipe names to them. Adding one = one module + one entry + one test.
"""

from dataclasses import dataclass
from typing import Callable

from . import block_elbo, elbo, one_step, trajectory
from .base import Estimate, Noise, score, token_logprobs, view_logprobs, weighted
from .elbo import draw_elbo
from .one_step import draw_one_step


@dataclass(frozen=True)
class Estimator:
    draw: Callable  # (batch, EstimatorConfig, RolloutConfig, ModelTraits, torch.Generator) -> Noise
    estimate: Callable  # (model, batch, Noise, ModelTraits, EstimatorConfig, RolloutConfig) -> Estimate


ESTIMATORS = {
    "one_step": Estimator(one_step.draw, weighted),
    "elbo": Estimator(elbo.draw, weighted),
    "block_elbo": Estimator(block_elbo.draw, block_elbo.estimate),
    "trajectory": Estimator(trajectory.draw, trajectory.estimate),
}

__all__ = ["ESTIMATORS", "Estimate", "Estimator", "Noise", "draw_elbo", "draw_one_step", "score",
           "token_logprobs", "view_logprobs", "weighted"]
