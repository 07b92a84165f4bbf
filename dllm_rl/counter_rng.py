"""Counter-based randomness for rollouts: batch-invariant and drawn from the caller's torch.Generator.

Every random number a rollout uses is a hash of (row seed, row step, canvas position, stream), so the
same prompt with the same generator gets the same completion whatever else is in the batch, in any order,
with any padding (Fast-dLLM#39 and dInfer#31 are the failures this avoids). The row seeds come from one
draw of the caller's `torch.Generator` mixed with a hash of the prompt tokens and the copy index of that
prompt in the batch (so the G copies of a GRPO group differ). Nothing is drawn from global RNG state.

Hashing is done by hand (lowbias32, C. Wellons) because torch's generators are stateful streams: a row's
numbers would depend on how many numbers earlier rows consumed. One uniform per (row, step, position)
suffices for sampling (inverse CDF), so no [N, V] noise tensor is ever built (LLaDA's fp64 Gumbel noise is
33 GB at 64x512x126k).
"""

from __future__ import annotations

import hashlib

import torch

M32 = 0xFFFFFFFF
TOKEN_STREAM, ORDER_STREAM = 1, 2  # the engine also draws from ORDER_STREAM + 1 (sampled orders)
PLAN_STREAM = 8  # an autoregressive planner's tokens (models.ar)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for x < 2**32 held in int64, without int64 overflow (split x in 16-bit halves)."""
    return ((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c & M32


def mix(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding uint32 values."""
    x = x & M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def row_seeds(prompt_ids: list[list[int]], generator: torch.Generator | None) -> torch.Tensor:
    """One uint32 seed per row from (generator draw, prompt content, copy index of that prompt). [N] int64."""
    base = int(torch.randint(0, 2**31 - 1, (1,), generator=generator).item())
    seen: dict[bytes, int] = {}
    seeds = []
    for ids in prompt_ids:
        digest = hashlib.blake2b(torch.tensor(ids, dtype=torch.int64).numpy().tobytes(), digest_size=8).digest()
        copy = seen.get(digest, 0)
        seen[digest] = copy + 1
        seeds.append((int.from_bytes(digest[:4], "little") ^ base) * 31 + copy)
    return mix(torch.tensor(seeds, dtype=torch.int64) & M32)


def uniform(seed: torch.Tensor, step: torch.Tensor, pos: torch.Tensor, stream: int) -> torch.Tensor:
    """Uniform (0, 1) float64 for each (row seed, row step, position). seed, step: [n]; pos: [n, m] -> [n, m]."""
    h = mix(seed[:, None] ^ mix(step[:, None] * 0x9E3779B1 + stream))
    h = mix(h ^ mix(pos + 0x632BE5AB))
    h2 = mix(h ^ 0x5BD1E995)  # second word: 53 bits of resolution
    return ((h >> 5) * 2.0**26 + (h2 >> 6) + 0.5) / 2.0**53
