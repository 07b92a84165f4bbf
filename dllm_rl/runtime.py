"""Process setup: the accelerate/DeepSpeed engine, threads, and the per-step torch.Generator.

The step generator is the only source of randomness for a training step: it derives from the recipe seed
and the step (and a stream id) in one place, so a resumed run draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import hashlib
import json
import os

import torch

from .config import Recipe
from .errors import ConfigError

STREAMS = {"data": 0, "noise": 1, "rollout": 2, "eval": 3}


def step_generator(seed: int, step: int, stream: str = "noise", device: str | torch.device = "cpu",
                   rank: int = 0) -> torch.Generator:
    """A generator seeded from (seed, step, stream, rank) by hashing: independent across all four."""
    key = f"{seed}:{step}:{STREAMS[stream]}:{rank}".encode()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1))
    return g


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def make_accelerator(recipe: Recipe):
    """An accelerate.Accelerator for the recipe: mixed precision, trackers, and DeepSpeed when configured."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    t = recipe.train
    kwargs: dict = {"mixed_precision": t.mixed_precision, "project_dir": t.output_dir,
                    "gradient_accumulation_steps": t.gradient_accumulation_steps}
    if t.report_to:
        kwargs["log_with"] = t.report_to
    handlers = []
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed and not torch.cuda.is_available():
        # without a GPU accelerate picks no backend and believes it runs one process (see
        # shared/reference/ecosystem.md section 3): gloo must be named explicitly
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    if t.deepspeed:
        from accelerate.utils import DeepSpeedPlugin

        if not os.path.isfile(t.deepspeed):
            raise ConfigError(f"train.deepspeed: {t.deepspeed!r} does not exist; point it at a DeepSpeed JSON "
                              f"such as recipes/deepspeed/zero2.json")
        with open(t.deepspeed) as f:
            ds_config = json.load(f)
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=ds_config)
    return Accelerator(kwargs_handlers=handlers, **kwargs)


class EpochSampler:
    """Example indices for step s: a fresh seeded permutation per epoch, so any step is reproducible."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._perms = n, seed, {}

    def indices(self, step: int, batch: int) -> list[int]:
        out = []
        for pos in range(step * batch, (step + 1) * batch):
            epoch = pos // self.n
            if epoch not in self._perms:
                self._perms = {epoch: torch.randperm(self.n, generator=step_generator(self.seed, epoch, "data"))}
            out.append(int(self._perms[epoch][pos % self.n]))
        return out
