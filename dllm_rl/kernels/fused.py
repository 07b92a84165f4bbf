"""Fused transformer-block ops for the native models: RMSNorm, RoPE on q and k together, the SiLU gate.

Each is one kernel on CUDA (liger-kernel's Triton kernels, arXiv 2410.10989) where the eager torch code
launches 2 to 6, and the torch reference elsewhere, with the reference's exact numerics on CPU:

- `rms_norm(x, weight, eps)`: x / rms(x) in float32, cast back to x's dtype, then `weight *` (liger's "llama"
  casting mode is this order); liger only when weight and x share a dtype (else torch would promote);
- `rotary(q, k, cos, sin) -> (q, k)`: rotate-half RoPE in cos's dtype, results in q's dtype (liger loads q, k
  in cos's dtype too: float32 cos/sin is LLaDA's `rope_full_precision`); cos, sin: [B, 1, L, D];
- `silu_mul(gate, up)`: silu(gate) * up.

With gradients the liger autograd Functions run; without (rollouts) the ops are called through
`torch.library` custom ops (`torch.ops.dllm_rl.*`), so torch.compile traces each as one node without a graph
break and a CUDA graph captures them as they are. liger's kernels are written by hand in Triton; the CPU
reference is the models' own maths, kept here so the models call one function per op.

`one_op_per_kernel()` routes the CPU reference through the same custom ops: an op counter
(`dllm_rl.cost_proxies.OpCounter`) then sees one op per fused kernel, the count the CUDA path launches,
with the reference's numerics.
"""

from __future__ import annotations

import contextlib

import torch

from .logprobs import liger_usable

_ONE_OP = False  # one_op_per_kernel() is active


@contextlib.contextmanager
def one_op_per_kernel():
    """Route the CPU reference through the custom ops (an op counter sees the CUDA path's kernel count)."""
    global _ONE_OP
    saved, _ONE_OP = _ONE_OP, True
    try:
        yield
    finally:
        _ONE_OP = saved


def _fast(t: torch.Tensor) -> bool:
    from . import use_fast_path  # the package's dispatch rule (CUDA tensor, triton, DLLM_RL_KERNELS)

    return use_fast_path(t) and liger_usable()


def _needs_grad(*tensors: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(t.requires_grad for t in tensors)


# ------------------------------------------------------------------------------------------ references


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return weight * h


def rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def rotary_reference(q, k, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        rotate_half(q.to(cos.dtype), cos, sin).to(q.dtype),
        rotate_half(k.to(cos.dtype), cos, sin).to(k.dtype),
    )


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.silu(gate) * up


# ----------------------------------------------------------------------------- custom ops (no gradient)


@torch.library.custom_op("dllm_rl::rms_norm", mutates_args=())
def _rms_norm_op(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return rms_norm_reference(x, weight, eps)


@_rms_norm_op.register_fake
def _(x, weight, eps):
    return torch.empty_like(x)


@_rms_norm_op.register_kernel("cuda")
def _(x, weight, eps):
    from liger_kernel.ops.rms_norm import LigerRMSNormFunction

    return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)


@torch.library.custom_op("dllm_rl::rotary_", mutates_args=("q", "k"))
def _rotary_op(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """In place: liger's kernel writes q and k where they are."""
    q2, k2 = rotary_reference(q, k, cos, sin)
    q.copy_(q2)
    k.copy_(k2)


@_rotary_op.register_fake
def _(q, k, cos, sin):
    return None


@_rotary_op.register_kernel("cuda")
def _(q, k, cos, sin):
    from liger_kernel.ops.rope import LigerRopeFunction

    # liger rotates [B, L, H, D]-contiguous storage in place; other layouts go through a copy
    if q.transpose(1, 2).is_contiguous() and k.transpose(1, 2).is_contiguous():
        LigerRopeFunction.apply(q, k, cos, sin)
    else:
        q2, k2 = LigerRopeFunction.apply(q.clone(), k.clone(), cos, sin)
        q.copy_(q2)
        k.copy_(k2)


@torch.library.custom_op("dllm_rl::silu_mul", mutates_args=())
def _silu_mul_op(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return silu_mul_reference(gate, up)


@_silu_mul_op.register_fake
def _(gate, up):
    return torch.empty_like(gate)


@_silu_mul_op.register_kernel("cuda")
def _(gate, up):
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    return LigerSiLUMulFunction.apply(gate, up)


# ---------------------------------------------------------------------------------------- dispatching


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm without bias: x [..., D], weight [D] -> [..., D]."""
    if _fast(x) and weight.dtype == x.dtype:
        if _needs_grad(x, weight):
            from liger_kernel.ops.rms_norm import LigerRMSNormFunction

            return LigerRMSNormFunction.apply(x, weight, eps, 0.0, "llama", False)
        return _rms_norm_op(x, weight, eps)
    if _ONE_OP and not _needs_grad(x, weight):
        return _rms_norm_op(x, weight, eps)
    return rms_norm_reference(x, weight, eps)


def rotary(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q [B, H, L, D] and k [B, H_kv, L, D] with cos, sin [B, 1, L, D], in cos's dtype."""
    if _fast(q):
        if _needs_grad(q, k):
            from liger_kernel.ops.rope import LigerRopeFunction

            return LigerRopeFunction.apply(q, k, cos, sin)
        _rotary_op(q, k, cos, sin)
        return q, k
    if _ONE_OP and not _needs_grad(q, k):
        _rotary_op(q, k, cos, sin)
        return q, k
    return rotary_reference(q, k, cos, sin)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The SwiGLU gate silu(gate) * up."""
    if _fast(gate) and gate.dtype == up.dtype:
        if _needs_grad(gate, up):
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return LigerSiLUMulFunction.apply(gate, up)
        return _silu_mul_op(gate, up)
    if _ONE_OP and not _needs_grad(gate, up):
        return _silu_mul_op(gate, up)
    return silu_mul_reference(gate, up)
