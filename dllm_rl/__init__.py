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


_TRAINERS = {"SFTTrainer": "sft", "GRPOTrainer": "grpo", "DPOTrainer": "dpo"}


def __getattr__(name):  # trainers import accelerate/datasets: load them only when asked for
    if name in _TRAINERS:
        from .trainers import trainer_class

        return trainer_class(_TRAINERS[name])
    raise AttributeError(name)


__all__ = [
    "ConfigError",
    "DPOTrainer",
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
