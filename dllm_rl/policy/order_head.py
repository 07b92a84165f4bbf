"""A learned unmasking-order policy: a small head that scores the masked positions of the active block.

DCoLT (arXiv 2505.10446) trains such a module ("unmask policy module") jointly with the model by RL: at
each step the positions to commit are drawn Plackett-Luce over its scores, and the drawn order's exact
log-prob joins the trajectory likelihood (estimators/trajectory.py), so GRPO's gradient reaches the head.

The head reads, per position of the block: the model's last hidden state (detached: the head is its own
policy, the model is trained by its token log-probs only), the sampler's statistics of the model's
distribution there (top-1 probability, top-1 minus top-2, entropy; 0 at committed positions), whether the
position is still masked, and its offset in the completion (sinusoidal, so any length works). One
self-attention layer over the block lets a position's score depend on the others (which is what a rule such
as "commit only one uncertain cell per step" needs). The output is added to a base order (default top_prob)
and the last layer starts at zero, so an untrained head decodes exactly like `rollout.order=<base>`.

Written by hand: no library ships an unmasking-order policy for diffusion LMs; the layers are torch's.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from ..errors import ConfigError
from ..kernels.sampling import without_mask_token
from ..models.base import unwrap
from ..rundir import resolve_model_dir
from .orders import ORDERS

FILE = "order_policy.pt"  # beside the model files in a checkpoint / final directory


@dataclass
class OrderHeadConfig:
    hidden_size: int  # the model's hidden size
    width: int = 64
    heads: int = 4
    base: str = "top_prob"  # top_prob | none: the order the untrained head reproduces


class OrderHead(nn.Module):
    """`head(hidden [n, Lb, D], stats, offsets [1 | n, Lb]) -> scores [n, Lb]` (rollout.engine's OrderPolicy).

    `stats` has top_prob, margin, entropy and masked, each [n, Lb], as the sampler's StepStats."""

    def __init__(self, cfg: OrderHeadConfig):
        super().__init__()
        if cfg.base not in ("top_prob", "none"):
            raise ConfigError(f"order_policy.base: {cfg.base!r} is not one of ['top_prob', 'none']")
        if cfg.width % cfg.heads:
            raise ConfigError(f"order_policy.width ({cfg.width}) must be divisible by order_policy.heads ({cfg.heads})")
        self.cfg = cfg
        w = cfg.width
        self.hidden_in = nn.Sequential(nn.LayerNorm(cfg.hidden_size), nn.Linear(cfg.hidden_size, w))
        self.stats_in = nn.Linear(4, w)
        self.mix = nn.TransformerEncoderLayer(
            w, cfg.heads, dim_feedforward=2 * w, dropout=0.0, batch_first=True, norm_first=True
        )
        self.out = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, 1))
        nn.init.zeros_(self.out[1].weight)
        nn.init.zeros_(self.out[1].bias)

    def _positions(self, offsets: torch.Tensor) -> torch.Tensor:
        half = self.cfg.width // 2
        freq = torch.exp(-math.log(1000.0) * torch.arange(half, device=offsets.device) / half)
        angle = offsets.float()[..., None] * freq  # [., Lb, half]
        return torch.cat([angle.sin(), angle.cos()], -1)

    def forward(self, hidden: torch.Tensor, stats, offsets: torch.Tensor) -> torch.Tensor:
        masked = stats.masked
        feats = torch.stack([stats.top_prob, stats.margin, stats.entropy, masked], -1).float().detach()
        x = self.hidden_in(hidden.detach().float()) + self.stats_in(feats) + self._positions(offsets)
        x = self.mix(x)
        residual = self.out(x).squeeze(-1)  # [n, Lb]
        base = stats.top_prob.float().detach() if self.cfg.base == "top_prob" else torch.zeros_like(residual)
        return base + residual

    # ------------------------------------------------------------------------------------- save / load

    def save(self, directory: str | Path) -> None:
        torch.save({"config": asdict(self.cfg), "state_dict": self.state_dict()}, Path(directory) / FILE)

    @classmethod
    def load(cls, directory: str | Path, map_location="cpu") -> OrderHead:
        path = Path(directory) / FILE
        if not path.is_file():
            raise ConfigError(
                f"rollout.order=policy needs a trained order policy, and {path} does not exist: "
                f"evaluate a checkpoint written by a GRPO run with rollout.order=policy, or pick "
                f"another rollout.order"
            )
        blob = torch.load(path, map_location=map_location, weights_only=True)
        head = cls(OrderHeadConfig(**blob["config"]))
        head.load_state_dict(blob["state_dict"])
        return head.eval()

    def __repr__(self) -> str:  # the config, not the layer dump
        return f"OrderHead({json.dumps(asdict(self.cfg))})"


def refuse_other_shape(cfg, saved, keys: tuple[str, ...], path: Path, section: str) -> None:
    """A saved head is continued as it is: refuse a recipe that sets one of its shape keys (`section`.key, set to
    other than its default) to another value than the head at `path` has, which would be silently ignored."""
    default = type(cfg)()
    other = [k for k in keys if getattr(cfg, k) != getattr(default, k) and getattr(cfg, k) != getattr(saved, k)]
    if other:
        asked = ", ".join(f"{section}.{k}={getattr(cfg, k)!r}" for k in other)
        has = ", ".join(f"{k}={getattr(saved, k)!r}" for k in other)
        raise ConfigError(
            f"{asked}: model.path holds a trained head ({path}: {has}), which is continued as it is; drop "
            f"{'those keys' if len(other) > 1 else 'the key'}, or start from a model directory without {path.name}"
        )


def order_head_for(order: str, model, model_path: str | None, cfg=None, seed: int = 0) -> OrderHead | None:
    """The learned order head a rollout with rule `order` needs (None for rules without one): the head saved
    beside the model at `model_path` when there is one (evaluation; continuing a run's final/), else, when
    `cfg` (the recipe's order_policy section) is given, a fresh head that decodes like `cfg.base`, initialised
    from `seed`. The head is on the model's device; a loaded one in eval mode, a fresh one in training mode."""
    if not ORDERS[order].needs_hidden:
        return None
    base = unwrap(model)
    device = next(base.parameters()).device
    if model_path and Path(model_path).is_dir():
        model_path = resolve_model_dir(model_path)
    if cfg is None or (model_path and (Path(model_path) / FILE).is_file()):
        head = OrderHead.load(model_path).to(device)
        if cfg is not None:
            refuse_other_shape(cfg, head.cfg, ("width", "heads", "base"), Path(model_path) / FILE, "order_policy")
        return head
    head_cfg = OrderHeadConfig(hidden_size=base.config.hidden_size, width=cfg.width, heads=cfg.heads, base=cfg.base)
    with torch.random.fork_rng(devices=[]):  # the same initial head for the same seed
        torch.manual_seed(seed)
        return OrderHead(head_cfg).to(device)


def stats_from_logits(logits: torch.Tensor, masked: torch.Tensor, mask_token_id: int | None):
    """The head's `stats` from raw (untempered) logits [n, L, V], as the sampler computes them: what the
    trajectory estimator replays a step's order with. 0 where not masked. Without gradient (the head reads its
    inputs detached), so the estimator's backward keeps no [n, L, V] tensors for them; that is why this does
    not reuse policy.orders.model_order_scores, which is differentiable and computes one statistic."""
    with torch.no_grad():
        logp = without_mask_token(logits.float(), mask_token_id).log_softmax(-1)
        top = logp.topk(2, dim=-1).values.exp()
        entropy = torch.special.entr(logp.exp()).sum(-1)
    zero = torch.zeros_like(entropy)
    return SimpleNamespace(
        masked=masked,
        top_prob=torch.where(masked, top[..., 0], zero),
        margin=torch.where(masked, top[..., 0] - top[..., 1], zero),
        entropy=torch.where(masked, entropy, zero),
    )
