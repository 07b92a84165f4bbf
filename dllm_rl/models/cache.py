"""A KV cache for masked diffusion LMs.

An autoregressive cache only ever appends. A diffusion canvas is rewritten in place: a step forwards a slice
[start, start + Lq) of the canvas and its fresh keys/values replace that slice, while attention reads the
cache over [0, kv_len). One mechanism therefore serves every caching schedule of the rollout engine:

- exact block cache (block-causal models, BD3-LM / D2F): finished blocks are written once and never change;
  a step forwards only the active block and reads keys up to its end.
- prefix cache (Fast-dLLM): a full forward at each block start writes everything; later steps forward
  [block_start, L) and reuse the prefix.
- dual cache (Fast-dLLM): later steps forward only the active block; prefix *and* suffix keys are reused
  (the suffix is stale until the next block start: approximate).

Storage is preallocated [B, H_kv, L, D] per layer, so a step never concatenates.
"""

from __future__ import annotations

import torch


class KVCache:
    """Per-layer key/value storage over a canvas of fixed length.

    Args:
        num_layers, batch_size, num_kv_heads, length, head_dim: storage shape.
    """

    def __init__(
        self,
        num_layers: int,
        batch_size: int,
        num_kv_heads: int,
        length: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str,
    ):
        shape = (batch_size, num_kv_heads, length, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.length = length

    @property
    def batch_size(self) -> int:
        return self.keys[0].shape[0]

    def update(
        self,
        layer: int,
        k: torch.Tensor,
        v: torch.Tensor,
        start: int | torch.Tensor,
        kv_len: int,
        rows: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v [b, H, Lq, D] at canvas positions [start, start+Lq) and return keys/values over [0, kv_len).

        `start` may instead be a long tensor [Lq] of canvas positions (static-shape decoding: the positions
        are data, so one captured graph serves every block; written with index_copy_, all rows).
        `rows` (b,) selects which cache rows the b query rows belong to (a subset of the batch that is
        still decoding); None means all rows in order.
        """
        K, V = self.keys[layer], self.values[layer]
        if torch.is_tensor(start):
            if rows is not None:
                raise ValueError("cache positions given as a tensor write every row (rows must be None)")
            K.index_copy_(2, start, k)
            V.index_copy_(2, start, v)
            return K[:, :, :kv_len], V[:, :, :kv_len]
        end = start + k.shape[2]
        if end > self.length or kv_len > self.length:
            raise ValueError(f"cache write [{start}, {end}) / read {kv_len} beyond canvas length {self.length}")
        if rows is None:
            K[:, :, start:end] = k
            V[:, :, start:end] = v
            return K[:, :, :kv_len], V[:, :, :kv_len]
        K[rows, :, start:end] = k
        V[rows, :, start:end] = v
        return K[rows, :, :kv_len], V[rows, :, :kv_len]

    def prefix(self, rows: int) -> "KVCache":
        """The cache of the first `rows` batch rows, sharing this one's storage (a smaller batch bucket)."""
        view = object.__new__(KVCache)
        view.keys = [k[:rows] for k in self.keys]
        view.values = [v[:rows] for v in self.values]
        view.length = self.length
        return view

    def mark_static(self) -> None:
        """Tell torch.compile the storage never moves, so CUDA graphs can write it in place (as transformers'
        StaticCache does) instead of skipping graphs over a mutated input."""
        for t in self.keys + self.values:
            torch._dynamo.mark_static_address(t)

    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() * 2 for k in self.keys)
