"""dllm-rl: reinforcement-learning post-training for masked diffusion language models.

Public API: `load_recipe`, the trainers, `generate` (the rollout engine), and the data contracts.
Importing the package registers the native model classes with transformers' Auto classes.
"""

from . import models as models  # noqa: F401  (Auto-class registration)
from .batches import RolloutBatch, SequenceBatch
from .config import Recipe, RolloutConfig, load_recipe
from .errors import ConfigError, DllmRlError
from .rollout import generate

__version__ = "0.1.0"


def __getattr__(name):  # trainers import accelerate/datasets: load them only when asked for
    if name == "SFTTrainer":
        from .trainers.sft import SFTTrainer

        return SFTTrainer
    if name == "GRPOTrainer":
        from .trainers.grpo import GRPOTrainer

        return GRPOTrainer
    raise AttributeError(name)


__all__ = [
    "ConfigError",
    "DllmRlError",
    "GRPOTrainer",
    "Recipe",
    "RolloutBatch",
    "RolloutConfig",
    "SFTTrainer",
    "SequenceBatch",
    "generate",
    "load_recipe",
]
