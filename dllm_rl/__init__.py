"""dllm-rl: reinforcement-learning post-training for masked diffusion language models.

Public API: `load_recipe`, the trainers, `generate` (the rollout engine), and the data contracts.
Importing the package is light (the recipe and errors only: no torch, transformers or trainers), so that the
command line answers at once; every other name loads on first use. Using the models (any trainer,
`generate`, `dllm_rl.models.load`) registers the native model classes with transformers' Auto classes;
`import dllm_rl.models` does it alone (for `AutoModel.from_pretrained` on a dllm-rl checkpoint).
"""

import importlib

from .config import Recipe, RolloutConfig, load_recipe
from .errors import ConfigError, DllmRlError

__version__ = "0.1.0"

_LAZY = {  # name -> (module, attribute); imported when first asked for
    "RolloutBatch": ("batches", "RolloutBatch"),
    "SequenceBatch": ("batches", "SequenceBatch"),
    "generate": ("rollout", "generate"),
    "GRPOTrainer": ("trainers.grpo", "GRPOTrainer"),
    "SFTTrainer": ("trainers.sft", "SFTTrainer"),
    "DPOTrainer": ("trainers.dpo", "DPOTrainer"),
}


def __getattr__(name):
    if name in _LAZY:
        module, attr = _LAZY[name]
        importlib.import_module(f"{__name__}.models")  # Auto-class registration, as before any model is used
        value = getattr(importlib.import_module(f"{__name__}.{module}"), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "DPOTrainer",
    "DllmRlError",
    "GRPOTrainer",
    "Recipe",
    "RolloutConfig",
    "RolloutBatch",
    "SFTTrainer",
    "SequenceBatch",
    "generate",
    "load_recipe",
]
