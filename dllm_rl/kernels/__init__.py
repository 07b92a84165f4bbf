"""Fused ops: each = a fast path + a torch reference of identical signature.

Public ops (dispatching):
- `choose_tokens(logits, u, temperature, top_k=0, top_p=1.0, mask_token_id=None, min_p=0.0,
  repetition_penalty=1.0, context=None) -> TokenChoice`
  fast: Triton two-stage vocabulary reduction (sampling_triton.py; without min_p and repetition_penalty,
  for which the reference runs); reference: `sampling.choose_tokens` (torch).
- `linear_token_logprobs(hidden, weight, targets, bias=None, mask_token_id=None, temperature=1.0) -> [n]`
  fast: liger-kernel's fused linear cross-entropy; reference: a chunked torch.autograd.Function
  (dllm_rl/kernels/logprobs.py, where the docstring shows how an estimator calls it).
- `rms_norm`, `rotary`, `silu_mul`: the native models' RMSNorm, RoPE (q and k in one kernel) and SwiGLU gate;
  fast: liger-kernel's Triton kernels; reference: the models' torch maths (dllm_rl/kernels/fused.py).

Dispatch rule: the fast path runs when the tensor is on CUDA, `torch.cuda.is_available()`, and triton (for
logprobs: liger-kernel >= 0.8.2, and hidden/weight of one dtype) is installed; otherwise the reference.
Setting DLLM_RL_KERNELS=0 forces the references (for bisecting a suspected kernel bug).

Imports stay light: this module imports neither triton nor liger (they are found with importlib.util and
imported on the first CUDA call); on CPU they are never imported.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .fused import one_op_per_kernel, rms_norm, rotary, silu_mul
from .logprobs import liger_usable, linear_token_logprobs_liger, linear_token_logprobs_torch
from .sampling import TokenChoice
from .sampling import choose_tokens as choose_tokens_reference


@functools.cache
def triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def use_fast_path(t: torch.Tensor) -> bool:
    """The dispatch rule: a CUDA tensor, CUDA available, triton installed, and not disabled by env."""
    return (
        t.is_cuda and torch.cuda.is_available() and triton_installed() and os.environ.get("DLLM_RL_KERNELS", "1") != "0"
    )


def choose_tokens(
    logits: torch.Tensor,
    u: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    mask_token_id: int | None = None,
    min_p: float = 0.0,
    repetition_penalty: float = 1.0,
    context: torch.Tensor | None = None,
) -> TokenChoice:
    """logits: [n, V]; u: [n] uniforms in (0, 1) (unread when greedy) -> TokenChoice.
    See kernels.sampling.choose_tokens."""
    if use_fast_path(logits) and min_p == 0 and repetition_penalty == 1.0:
        from .sampling_triton import choose_tokens_triton  # imports triton: only on the CUDA path

        return choose_tokens_triton(logits, u, temperature, top_k, top_p, mask_token_id)
    return choose_tokens_reference(
        logits, u, temperature, top_k, top_p, mask_token_id, min_p, repetition_penalty, context
    )


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask_token_id: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """log p(target) [n] from hidden [n, D] and the LM head weight [V, D] (+ bias [V]), with gradient."""
    if use_fast_path(hidden) and hidden.dtype == weight.dtype and liger_usable():
        return linear_token_logprobs_liger(hidden, weight, targets, bias, mask_token_id, temperature)
    return linear_token_logprobs_torch(hidden, weight, targets, bias, mask_token_id, temperature)


__all__ = [
    "TokenChoice",
    "choose_tokens",
    "choose_tokens_reference",
    "linear_token_logprobs",
    "linear_token_logprobs_liger",
    "linear_token_logprobs_torch",
    "one_op_per_kernel",
    "rms_norm",
    "rotary",
    "silu_mul",
    "use_fast_path",
]
