"""One trainer per algorithm family. TRAINERS maps a recipe's `algorithm` to "module:Class"; the trainer's module
(which imports accelerate and datasets) is imported only when it is asked for."""

from __future__ import annotations

import importlib

from ..errors import lookup

TRAINERS = {
    "sft": "sft:sft_trainer",  # SFTTrainer, or EditSFTTrainer for sft.objective=edit
    "grpo": "grpo:GRPOTrainer",
    "dpo": "dpo:DPOTrainer",
    "planner_sft": "planner:PlannerSFTTrainer",  # the autoregressive planner of the hybrid, by TRL's SFTTrainer
    "consensus": "consensus:ConsensusTrainer",  # consensus distillation (majority-vote SFT rounds)
}


def trainer_class(algorithm: str):
    """The trainer class of `algorithm` (a bad name lists the valid ones)."""
    module, _, name = lookup(TRAINERS, algorithm, "algorithm").partition(":")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
