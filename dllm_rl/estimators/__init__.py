"""Likelihood estimators for completions of a diffusion LM, under explicit noise (estimators.base)."""

from .base import Noise, score, token_logprobs, view_logprobs
from .elbo import draw_elbo
from .one_step import draw_one_step

__all__ = ["Noise", "draw_elbo", "draw_one_step", "score", "token_logprobs", "view_logprobs"]
