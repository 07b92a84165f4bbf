"""DPO-family losses over per-sequence log-likelihood estimates (pure functions over tensors).

DPO (arXiv 2305.18290) needs log pi(y | x) of whole completions; a diffusion LM has no tractable one, so the
trainer passes an estimate of it instead (an ELBO: LLaDA 1.5's "DPO-E", arXiv 2505.19223), for the policy and
the reference, for the chosen (w) and the rejected (l) completion of each pair. With

    delta = (logpi_w - logref_w) - (logpi_l - logref_l)              (TRL's delta_score)
    delta_bar = the same with each log-ratio divided by its completion's token count

the losses per pair are the ones TRL 1.16's DPOTrainer computes under the same names:

    sigmoid       -log sigmoid(beta * delta)                                       DPO
    hinge         relu(1 - beta * delta)                                           SLiC, arXiv 2305.10425
    ipo           (delta_bar - 1 / (2 beta))^2, beta is IPO's tau                  arXiv 2310.12036
    robust        (-(1 - e) log sigmoid(beta delta) + e log sigmoid(-beta delta)) / (1 - 2e)
                  with e = label_smoothing in [0, 0.5): rDPO, arXiv 2403.00409
    sigmoid_norm  -log sigmoid(beta * delta_bar)
    sft           -logpi_w / |w|: the chosen completion's negative log-likelihood per token (no reference).
                  With sigmoid it is RPO (arXiv 2404.19733; TRL: loss_type [sigmoid, sft], loss_weights
                  [1, rpo_alpha]), which keeps DPO from lowering the chosen completion's likelihood. TRL averages
                  over the batch's chosen tokens, this over each pair's; the two agree for equal lengths.

Of the losses here only `robust` reads `label_smoothing`; TRL 1.16's `sigmoid` no longer mixes in cDPO's flipped
term either (TRL also reads it for its exo_pair and aot losses, which are not offered here). Where TRL
ignores a nonzero label_smoothing silently, `check` here refuses it with the fix.
Several loss types are summed with weights, as TRL's list-valued loss_type with loss_weights.

The metrics are TRL's: rewards/chosen = mean beta (logpi_w - logref_w), rewards/rejected likewise,
rewards/accuracies = share of pairs with reward_w > reward_l (strict), rewards/margins = mean of their
difference, logps/chosen and logps/rejected = mean policy estimates (here an ELBO, not an exact log-prob).
Estimates are sums over completion tokens, never length-normalised, except where a loss says so.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import ConfigError, lookup


@dataclass
class PreferenceInputs:
    """One batch of B pairs: sequence log-likelihood estimates [B] and completion token counts [B]."""

    chosen: torch.Tensor  # policy, chosen completion (with grad)
    rejected: torch.Tensor  # policy, rejected completion (with grad)
    ref_chosen: torch.Tensor  # reference, chosen (no grad)
    ref_rejected: torch.Tensor  # reference, rejected (no grad)
    chosen_tokens: torch.Tensor  # tokens scored in each chosen completion
    rejected_tokens: torch.Tensor

    def delta(self) -> torch.Tensor:
        return (self.chosen - self.ref_chosen) - (self.rejected - self.ref_rejected)  # [B]

    def delta_per_token(self) -> torch.Tensor:
        w = (self.chosen - self.ref_chosen) / self.chosen_tokens.clamp(min=1)
        return w - (self.rejected - self.ref_rejected) / self.rejected_tokens.clamp(min=1)  # [B]


def sigmoid(x: PreferenceInputs, beta: float, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(beta * x.delta())


def hinge(x: PreferenceInputs, beta: float, label_smoothing: float) -> torch.Tensor:
    return torch.relu(1 - beta * x.delta())


def ipo(x: PreferenceInputs, beta: float, label_smoothing: float) -> torch.Tensor:
    return (x.delta_per_token() - 1 / (2 * beta)) ** 2


def robust(x: PreferenceInputs, beta: float, label_smoothing: float) -> torch.Tensor:
    e, z = label_smoothing, beta * x.delta()
    return (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)


def sigmoid_norm(x: PreferenceInputs, beta: float, label_smoothing: float) -> torch.Tensor:
    return -F.logsigmoid(beta * x.delta_per_token())


def sft(x: PreferenceInputs, beta: float, label_smoothing: float) -> torch.Tensor:
    return -x.chosen / x.chosen_tokens.clamp(min=1)


DPO_LOSSES = {
    "sigmoid": sigmoid,
    "hinge": hinge,
    "ipo": ipo,
    "robust": robust,
    "sigmoid_norm": sigmoid_norm,
    "sft": sft,
}
USES_LABEL_SMOOTHING = {"robust"}


def loss_types(cfg) -> tuple[list[str], list[float]]:
    """(loss names, weights) of a `dpo` config section: a name or a list of names, weights default to 1."""
    names = [cfg.loss_type] if isinstance(cfg.loss_type, str) else list(cfg.loss_type)
    weights = list(cfg.loss_weights) if cfg.loss_weights is not None else [1.0] * len(names)
    return names, weights


def check(cfg) -> None:
    """Refuse a `dpo` section the losses cannot honour, naming the key and the fix."""
    names, weights = loss_types(cfg)
    if not names:
        raise ConfigError("dpo.loss_type is empty; name at least one loss, e.g. dpo.loss_type=sigmoid")
    for name in names:
        lookup(DPO_LOSSES, name, "dpo.loss_type")
    if len(weights) != len(names):
        raise ConfigError(
            f"dpo.loss_weights has {len(weights)} value(s) for {len(names)} loss type(s) {names}; give one "
            f"weight per loss type (or drop dpo.loss_weights for weights of 1)"
        )
    if cfg.beta <= 0:
        raise ConfigError(f"dpo.beta must be > 0 (got {cfg.beta}); TRL's default is 0.1")
    if not 0 <= cfg.label_smoothing < 0.5:
        raise ConfigError(f"dpo.label_smoothing must be in [0, 0.5) (got {cfg.label_smoothing})")
    if cfg.label_smoothing > 0 and not USES_LABEL_SMOOTHING & set(names):
        raise ConfigError(
            f"dpo.label_smoothing={cfg.label_smoothing} is read only by loss_type robust of the losses here (TRL "
            f"1.16's sigmoid no longer smooths labels); set dpo.loss_type=robust or dpo.label_smoothing=0"
        )


def dpo_loss(x: PreferenceInputs, cfg) -> torch.Tensor:
    """Per-pair loss [B]: the weighted sum of the `dpo.loss_type` losses (the batch loss is its mean)."""
    names, weights = loss_types(cfg)
    return sum(w * DPO_LOSSES[name](x, cfg.beta, cfg.label_smoothing) for name, w in zip(names, weights))


def preference_metrics(x: PreferenceInputs, beta: float) -> dict[str, torch.Tensor]:
    """TRL's per-pair metrics [B] (detached): averaged over pairs they are what TRL logs under these names."""
    chosen = beta * (x.chosen - x.ref_chosen).detach()
    rejected = beta * (x.rejected - x.ref_rejected).detach()
    return {
        "rewards/chosen": chosen,
        "rewards/rejected": rejected,
        "rewards/accuracies": (chosen > rejected).float(),
        "rewards/margins": chosen - rejected,
        "logps/chosen": x.chosen.detach(),
        "logps/rejected": x.rejected.detach(),
    }
