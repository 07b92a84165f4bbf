"""The rollout engine: `generate(model, tokenizer, prompts, RolloutConfig(...), generator=g)`.

engine.py (blocks and the host's one look per block), step.py (the denoising step: static shapes, no host
synchronisation), graphs.py (running the step eagerly, compiled, or as CUDA graphs), commit.py (commit rules),
cache_plans.py (what each step forwards per cache mode), remask.py (self-correction), trace.py (building the
commit trace), eager_loop.py (the host-driven loop the step replaced: the engine's oracle), reference.py
(LLaDA's plain sampler: the test oracle and benchmark baseline). Ordering rules live in policy.orders, token
choice in kernels.
"""

from ..batches import Trace
from ..config import RolloutConfig
from .cache_plans import CACHE_PLANS
from .commit import COMMIT_RULES
from .engine import decoding, encode_prompts, generate

__all__ = ["CACHE_PLANS", "COMMIT_RULES", "RolloutConfig", "Trace", "decoding", "encode_prompts", "generate"]
