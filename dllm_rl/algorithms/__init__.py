"""Pure functions over tensors: advantages, policy losses and DPO losses (no models, devices or distributed state)."""

from .advantages import ADVANTAGES, scale, zero_std_groups
from .dpo import DPO_LOSSES, PreferenceInputs, dpo_loss, preference_metrics
from .losses import AGGREGATIONS, LOSSES, LossInputs, kl_k3

__all__ = [
    "ADVANTAGES",
    "AGGREGATIONS",
    "DPO_LOSSES",
    "LOSSES",
    "LossInputs",
    "PreferenceInputs",
    "dpo_loss",
    "kl_k3",
    "preference_metrics",
    "scale",
    "zero_std_groups",
]
