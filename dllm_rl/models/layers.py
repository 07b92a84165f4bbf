"""Building blocks shared by the native diffusion LMs (tiny, LLaDA, Dream): rotary embeddings (cos, sin; the
rotation itself is `kernels.rotary`) and the cache-aware attention core.

Written here rather than borrowed from transformers' Llama modules because the attention must read and
rewrite a diffusion KV cache in place (see cache.py) and take arbitrary block masks; transformers' cache
classes only append.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .cache import KVCache


class RotaryEmbedding(nn.Module):
    """RoPE (arXiv 2104.09864) in the rotate-half convention used by Llama, LLaDA and Qwen2."""

    # inv_freq is recomputed per call (D/2 numbers) instead of kept as a buffer: transformers 5 builds models
    # on the meta device and would leave a non-persistent buffer uninitialised after from_pretrained.

    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        exponent = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=position_ids.device) / self.head_dim
        inv_freq = 1.0 / (self.theta**exponent)  # [D/2]
        freqs = position_ids[..., None].float() * inv_freq  # [B, L, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)  # [B, L, D]
        return emb.cos().to(dtype)[:, None], emb.sin().to(dtype)[:, None]  # [B, 1, L, D]


def expand_mask(attention_mask: torch.Tensor | None, q_len: int) -> torch.Tensor | None:
    """A 2-D key mask [B, Lk] (1 = attend) becomes [B, 1, 1, Lk] bool; a 4-D bool mask passes through."""
    if attention_mask is None or attention_mask.dim() == 4:
        return attention_mask
    return attention_mask.bool()[:, None, None, :]


def additive_mask(mask: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A bool mask as the additive float mask (0 / -inf) SDPA builds from it: built once per forward instead of
    by every layer (3 kernels a layer; the same values, so the same attention)."""
    if mask is None or mask.dtype != torch.bool:
        return mask
    return torch.where(mask, torch.zeros((), dtype=dtype, device=mask.device), float("-inf"))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None,
    layer: int,
    cache: KVCache | None,
    cache_start: int | torch.Tensor,
    kv_len: int | None,
    cache_rows: torch.Tensor | None,
) -> torch.Tensor:
    """Scaled dot-product attention with an optional in-place diffusion cache.

    q: [B, H, Lq, D]; k, v: [B, H_kv, Lq, D]; mask: bool or additive [B, 1, Lq, Lk], or None (all keys). With a
    cache the fresh k, v are written at [cache_start, cache_start + Lq) (or at the positions of a [Lq] tensor
    cache_start) and attention reads keys [0, kv_len).
    """
    if cache is not None:
        if kv_len is None:
            kv_len = cache.length if torch.is_tensor(cache_start) else cache_start + q.shape[2]
        k, v = cache.update(layer, k, v, cache_start, kv_len, cache_rows)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])
    return out  # [B, H, Lq, D]
