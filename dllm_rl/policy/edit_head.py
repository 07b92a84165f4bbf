"""The edit head of any-process decoding: per-position operation and insert-count logits over a model.

AP-MDM (arXiv 2510.06190) adds to a masked diffusion model per-position linear heads on its last hidden state
for remask, insert ("expansion") and delete ("contraction"). This head is the same idea as a separate small
module, so it works over any model that returns hidden states (the tiny MDM, and as an adapter the native
LLaDA and Dream classes) without changing the model's weights or its files:

    head(hidden [n, L, D], feats [n, L, F], valid [n, L]) -> op_logits [n, L, 3], ins_logits [n, L+1, K+1]

The inputs are the completion positions. op_logits score KEEP / REMASK / DELETE there (policy.edits),
ins_logits the number of masks 0..K to open after each, with row 0 for the gap before the first completion
token, read off a learned start slot that the head's attention layer places before the completion (so the
head needs no hidden state outside the completion, and a cached rollout forwards exactly what the fill-only
engine forwards). The features (`features`)
are the model's view of each position: mask or committed, the model's probability of the token there, its
top-1 probability and entropy (the signals ReMDM-style self-correction reads, arXiv 2503.00307). One
self-attention layer over the canvas lets a decision depend on the other positions (a Sudoku cell is wrong
because of the others). The last layer starts at zero with KEEP and count 0 `init_bias` above the rest
(AP-MDM biases its heads to "do nothing" the same way), so an untrained head at edit temperature 0 decodes
exactly like the fill-only engine.

Departures from AP-MDM: a separate head rather than heads inside the model; one 3-way categorical op instead
of two bits; a count K >= 1 instead of one inserted mask. In GRPO the head reads the hidden states detached,
as the learned order head does (its log-probs train the head, not the model's trunk).
Written by hand: no library ships edit heads for diffusion LMs; the layers are torch's.
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
from .edits import NUM_OPS
from .order_head import refuse_other_shape

FILE = "edit_policy.pt"  # beside the model files in a checkpoint / final directory
NUM_FEATURES = 5  # mask, committed, p(current token), top-1 probability, entropy


@dataclass
class EditHeadConfig:
    hidden_size: int  # the model's hidden size
    width: int = 64
    heads: int = 4
    max_insert: int = 1  # K: the head scores insert counts 0..K (1: AP-MDM's one-mask expansion)
    init_bias: float = 4.0  # KEEP and count 0 start this many logits above the other choices


class EditHead(nn.Module):
    """See the module docstring."""

    def __init__(self, cfg: EditHeadConfig):
        super().__init__()
        if cfg.width % cfg.heads:
            raise ConfigError(f"edit_policy.width ({cfg.width}) must be divisible by edit_policy.heads ({cfg.heads})")
        if cfg.max_insert < 0:
            raise ConfigError(f"the edit head's max_insert must be >= 0, got {cfg.max_insert}")
        self.cfg = cfg
        w = cfg.width
        self.hidden_in = nn.Sequential(nn.LayerNorm(cfg.hidden_size), nn.Linear(cfg.hidden_size, w))
        self.feats_in = nn.Linear(NUM_FEATURES, w)
        self.start = nn.Parameter(torch.zeros(w))  # the gap before the first completion token
        self.mix = nn.TransformerEncoderLayer(
            w, cfg.heads, dim_feedforward=2 * w, dropout=0.0, batch_first=True, norm_first=True
        )
        self.out = nn.Sequential(nn.LayerNorm(w), nn.Linear(w, NUM_OPS + cfg.max_insert + 1))
        nn.init.zeros_(self.out[1].weight)
        with torch.no_grad():
            bias = torch.zeros(NUM_OPS + cfg.max_insert + 1)
            bias[0] = bias[NUM_OPS] = cfg.init_bias  # KEEP, and count 0
            self.out[1].bias.copy_(bias)

    def _positions(self, L: int, device) -> torch.Tensor:
        half = self.cfg.width // 2
        freq = torch.exp(-math.log(1000.0) * torch.arange(half, device=device) / half)
        angle = torch.arange(L, device=device).float()[:, None] * freq  # [L, half]
        return torch.cat([angle.sin(), angle.cos()], -1)

    def forward(self, hidden: torch.Tensor, feats: torch.Tensor, valid: torch.Tensor, detach: bool = True):
        """hidden [n, L, D], feats [n, L, F], valid [n, L] bool -> (op_logits [n, L, 3], ins_logits [n, L+1, K+1]).
        detach: read the hidden states without gradient into the model."""
        h = hidden.detach() if detach else hidden
        x = self.hidden_in(h.float()) + self.feats_in(feats.float().detach())  # [n, L, w]
        x = torch.cat([self.start.expand(len(x), 1, -1), x], 1)  # [n, L+1, w]
        x = x + self._positions(x.shape[1], x.device)
        x = self.mix(x, src_key_padding_mask=~torch.cat([torch.ones_like(valid[:, :1]), valid], 1))
        out = self.out(x)  # [n, L+1, 3 + K + 1]
        return out[:, 1:, :NUM_OPS], out[..., NUM_OPS:]

    # ------------------------------------------------------------------------------------- save / load

    def save(self, directory: str | Path) -> None:
        torch.save({"config": asdict(self.cfg), "state_dict": self.state_dict()}, Path(directory) / FILE)

    @classmethod
    def load(cls, directory: str | Path, map_location="cpu") -> EditHead:
        path = Path(directory) / FILE
        if not path.is_file():
            raise ConfigError(
                f"rollout.edit needs a trained edit head, and {path} does not exist: use a checkpoint written by "
                f"an edit SFT or GRPO run (recipes/tiny/*-edit-*.yaml), or set rollout.edit=none"
            )
        blob = torch.load(path, map_location=map_location, weights_only=True)
        head = cls(EditHeadConfig(**blob["config"]))
        head.load_state_dict(blob["state_dict"])
        return head

    def __repr__(self) -> str:  # the config, not the layer dump
        return f"EditHead({json.dumps(asdict(self.cfg))})"


def edit_head_for(rollout, model, model_path: str | None, cfg=None, seed: int = 0) -> EditHead | None:
    """The edit head a rollout with these settings needs (None for rollout.edit=none): the head saved beside the
    model at `model_path` when there is one, else, when `cfg` (the recipe's edit_policy section) is given, a
    fresh head (insert counts up to rollout.edit_max_insert; none for edit=remask) from `seed`. On the model's
    device, in training mode (its attention layer then has one code path, the one the estimator replays)."""
    if rollout.edit == "none":
        return None
    base = unwrap(model)
    device = next(base.parameters()).device
    if model_path and Path(model_path).is_dir():
        model_path = resolve_model_dir(model_path)
    if cfg is None or (model_path and (Path(model_path) / FILE).is_file()):
        head = EditHead.load(model_path or ".").to(device).train()
        if cfg is not None:
            refuse_other_shape(cfg, head.cfg, ("width", "heads", "init_bias"), Path(model_path) / FILE, "edit_policy")
        return head
    head_cfg = EditHeadConfig(
        hidden_size=base.config.hidden_size,
        width=cfg.width,
        heads=cfg.heads,
        max_insert=rollout.edit_max_insert if rollout.edit == "any" else 0,
        init_bias=cfg.init_bias,
    )
    with torch.random.fork_rng(devices=[]):  # the same initial head for the same seed
        torch.manual_seed(seed)
        return EditHead(head_cfg).to(device).train()


@torch.no_grad()
def features(logits: torch.Tensor, canvas: torch.Tensor, valid: torch.Tensor, mask_token_id: int) -> torch.Tensor:
    """The head's per-position features [n, L, 5] from the model's logits at the completion [n, L, V] (untempered)
    and the canvas [n, L] (valid [n, L]). Without gradient (the head reads them detached), so a likelihood's
    backward keeps no [n, L, V] tensors for them."""
    logp = without_mask_token(logits.float(), mask_token_id).log_softmax(-1)
    is_mask = (canvas == mask_token_id) & valid
    committed = valid & ~is_mask
    current = logp.gather(-1, canvas.clamp(min=0, max=logp.shape[-1] - 1)[..., None])[..., 0].exp()
    zero = torch.zeros_like(current)
    cols = SimpleNamespace(
        mask=is_mask.float(),
        committed=committed.float(),
        current=torch.where(committed, current, zero),
        top=torch.where(valid, logp.max(-1).values.exp(), zero),
        entropy=torch.where(valid, torch.special.entr(logp.exp()).sum(-1), zero),
    )
    return torch.stack(list(vars(cols).values()), -1)  # [n, L, 5]
