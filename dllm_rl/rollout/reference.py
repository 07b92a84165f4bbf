"""The reference sampler: LLaDA's `generate` (arXiv 2502.09992) written as plainly as possible.

One prompt at a time, no padding, a full forward of [prompt | canvas] at every step, greedy tokens,
low-confidence selection of LLaDA's per-step token counts (`get_num_transfer_tokens`). One departure from
LLaDA: the [MASK] token is never proposed (see kernels.sampling; a random test model would propose it). It is the oracle
the engine's modes are tested against (where they must agree) and the baseline the benchmarks divide by.
Block-causal models get their mask built here independently of models.masks.
"""

from __future__ import annotations

import torch


def num_transfer_tokens(n_masked: int, steps: int) -> list[int]:
    base, rem = divmod(n_masked, steps)
    return [base + (1 if i < rem else 0) for i in range(steps)]


@torch.no_grad()
def reference_generate(
    model,
    prompt_ids: list[list[int]],
    gen_length: int,
    steps: int,
    block_length: int,
    mask_id: int,
    block_causal_size: int | None = None,
) -> torch.Tensor:
    """Greedy LLaDA decoding. Returns [N, gen_length] completion tokens."""
    device = next(model.parameters()).device
    out = []
    for ids in prompt_ids:
        P = len(ids)
        x = torch.tensor([ids + [mask_id] * gen_length], device=device)
        mask = None
        if block_causal_size:
            blk = [0] * P + [1 + j // block_causal_size for j in range(gen_length)]
            blk = torch.tensor(blk, device=device)
            mask = (blk[None, :] <= blk[:, None])[None, None]  # [1, 1, L, L]
        num_blocks = gen_length // block_length
        for b in range(num_blocks):
            lo, hi = P + b * block_length, P + (b + 1) * block_length
            for k in num_transfer_tokens(block_length, steps // num_blocks):
                logits = model(input_ids=x, attention_mask=mask).logits[0].float()  # [L, V]
                logits[:, mask_id] = float("-inf")
                x0 = logits.argmax(-1)
                p = logits.softmax(-1).gather(-1, x0[:, None]).squeeze(-1)
                conf = torch.full_like(p, float("-inf"))
                masked = x[0] == mask_id
                conf[lo:hi] = torch.where(masked[lo:hi], p[lo:hi], conf[lo:hi])
                if k:
                    pick = conf.topk(k).indices
                    x[0, pick] = x0[pick]
        out.append(x[0, P:])
    return torch.stack(out)
