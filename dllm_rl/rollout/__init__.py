"""The rollout engine: `generate(model, tokenizer, prompts, RolloutConfig(...), generator=g)`.

sampler.py (the denoising loop), schedules.py (commit rules, cache plans), remask.py (ordering rules,
self-correction), sampling.py (token choice and statistics), noise.py (batch-invariant randomness),
trace.py (the commit trace), reference.py (LLaDA's plain sampler: the test oracle and benchmark baseline).
"""

from ..config import RolloutConfig
from .remask import ORDERS
from .sampler import encode_prompts, generate
from .schedules import CACHE_PLANS, COMMIT_RULES
from .trace import Trace

__all__ = ["CACHE_PLANS", "COMMIT_RULES", "ORDERS", "RolloutConfig", "Trace", "encode_prompts", "generate"]
