"""Pure functions over tensors: advantages and policy losses (no models, devices or distributed state)."""

from .advantages import ADVANTAGES, scale, zero_std_groups
from .losses import AGGREGATIONS, LOSSES, LossInputs, kl_k3

__all__ = ["ADVANTAGES", "AGGREGATIONS", "LOSSES", "LossInputs", "kl_k3", "scale", "zero_std_groups"]
