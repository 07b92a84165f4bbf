"""d1 / diffu-GRPO's one-step mean-field estimate (arXiv 2504.12216): mask the whole completion, mask each
prompt token with probability p_mask_prompt (0.15), one forward; log p(y_k | prompt~, all masked) per token.
A fresh prompt mask per inner iteration, shared by the old, reference and current policy (d1's mask seeds).

What it is. With p_mask_prompt = 0 it is exact and deterministic: sum_k log p(y_k | prompt, every completion
position masked), the log-probability of y under the sampler that commits the whole canvas in one step
(rollout.steps=1: every token drawn independently from the fully masked state, temperature 1), i.e. the
mean-field likelihood. It is not an ELBO of the model's any-order likelihood (estimators.elbo,
tests/estimators/test_bounds_exact.py): the likelihood of a different sampler, above that log p(y) for some
sequences and below it for others. With p_mask_prompt > 0 its expectation is the average of that quantity
over prompt masks (each prompt token masked independently), d1's regulariser.

Block-causal models: the view is scored in the two-stream layout (estimators.base), where the masked copy of
block b (the model's attention blocks, counted from the completion's start) sees the clean blocks before it,
so with p_mask_prompt = 0 the value is sum_b sum_{k in b} log p(y_k | prompt, clean y_<b, every position of
block b masked): per block, the mean-field likelihood given the clean blocks before it (the sampler that
commits each block whole in one step, rollout.block_length = the attention block), not the above.

Positions: every completion position gets its term; the GRPO trainer sums them up to and including the first
EOS (batch.completion_mask, d1's convention).
"""

from __future__ import annotations

import torch

from .base import Estimator, Noise, scored


def draw_one_step(
    shape: tuple[int, int],
    prompt_shape: tuple[int, int],
    generator: torch.Generator,
    p_mask_prompt: float = 0.15,
    num_samples: int = 1,
) -> Noise:
    N, Lc = shape
    K = num_samples
    prompt = torch.rand(K, *prompt_shape, generator=generator) < p_mask_prompt  # [K, N, P]
    return Noise(torch.ones(K, N, Lc, dtype=torch.bool), prompt, torch.full((K, N, Lc), 1.0 / K))


def build(cfg, tr) -> Estimator:
    """The `one_step` estimator for the recipe's estimator section (p_mask_prompt, num_samples masked views)."""

    def draw(batch, generator: torch.Generator) -> Noise:
        return draw_one_step(
            tuple(batch.completion_ids.shape),
            tuple(batch.prompt_ids.shape),
            generator,
            cfg.p_mask_prompt,
            cfg.num_samples,
        )

    return Estimator(draw, scored(tr), views=lambda steps: cfg.num_samples)
