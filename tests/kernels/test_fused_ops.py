"""kernels.fused: liger's RMSNorm, RoPE and SiLU gate against the models' torch maths.

On CPU the dispatch keeps the torch reference, exactly (the custom ops run the same code). liger's RoPE
kernel runs in Triton's interpreter (conftest sets TRITON_INTERPRET=1 without a GPU), so its layout contract is
checked here: q and k as the transposed [B, L, H, D] views the models make, cos and sin [B, 1, L, D] per row.
liger's RMSNorm and SiLU kernels do not run in the interpreter: GPU tests."""

import importlib.util

import pytest
import torch

from dllm_rl.kernels import fused
from dllm_rl.models.layers import RotaryEmbedding

needs_liger = pytest.mark.skipif(importlib.util.find_spec("liger_kernel") is None, reason="liger-kernel")
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def qk_cos_sin(B=2, L=6, H=4, Hkv=2, D=16, device="cpu", dtype=torch.float32, theta=500000.0):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(B, L, H, D, generator=g).to(device, dtype).transpose(1, 2)  # [B, H, L, D], as models.native
    k = torch.randn(B, L, Hkv, D, generator=g).to(device, dtype).transpose(1, 2)
    pos = torch.tensor([[0, 0, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5]], device=device)  # left padding: per-row positions
    cos, sin = RotaryEmbedding(D, theta)(pos, torch.float32)  # [B, 1, L, D] float32: rope_full_precision
    return q, k, cos, sin


def test_cpu_dispatch_is_the_reference():
    q, k, cos, sin = qk_cos_sin()
    x, w = torch.randn(3, 16), torch.randn(16)
    a, b = torch.randn(3, 8), torch.randn(3, 8)
    with fused.one_op_per_kernel():  # the custom ops' CPU implementation: the same numbers
        got = (fused.rms_norm(x, w, 1e-5), *fused.rotary(q.clone(), k.clone(), cos, sin), fused.silu_mul(a, b))
    want = (
        fused.rms_norm_reference(x, w, 1e-5),
        *fused.rotary_reference(q, k, cos, sin),
        fused.silu_mul_reference(a, b),
    )
    plain = (fused.rms_norm(x, w, 1e-5), *fused.rotary(q, k, cos, sin), fused.silu_mul(a, b))
    for g, w_, p in zip(got, want, plain):
        assert torch.equal(g, w_) and torch.equal(p, w_)


@needs_liger
def test_liger_rope_matches_the_reference_layout():
    """liger's kernel on the models' layout (Triton interpreter on CPU): float32 is exact."""
    from liger_kernel.ops.rope import LigerRopeFunction

    q, k, cos, sin = qk_cos_sin()
    want_q, want_k = fused.rotary_reference(q, k, cos, sin)
    got_q, got_k = LigerRopeFunction.apply(q.clone(), k.clone(), cos, sin)
    torch.testing.assert_close(got_q, want_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(got_k, want_k, atol=1e-6, rtol=1e-6)


@gpu
@needs_liger
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_fused_ops_match_the_reference(dtype):
    """On CUDA the dispatch takes liger: within a unit of the last place in bf16, with and without gradient."""
    tol = dict(atol=1e-2, rtol=1e-2) if dtype == torch.bfloat16 else dict(atol=1e-5, rtol=1e-5)
    q, k, cos, sin = qk_cos_sin(device="cuda", dtype=dtype)
    x = torch.randn(5, 64, device="cuda", dtype=dtype)
    w = torch.randn(64, device="cuda", dtype=dtype)
    a, b = (torch.randn(5, 96, device="cuda", dtype=dtype) for _ in range(2))
    with torch.no_grad():
        torch.testing.assert_close(fused.rms_norm(x, w, 1e-5), fused.rms_norm_reference(x, w, 1e-5), **tol)
        got = fused.rotary(q.clone(), k.clone(), cos, sin)
        for g, r in zip(got, fused.rotary_reference(q, k, cos, sin)):
            torch.testing.assert_close(g, r, **tol)
        torch.testing.assert_close(fused.silu_mul(a, b), fused.silu_mul_reference(a, b), **tol)
    xg = x.clone().requires_grad_()
    fused.rms_norm(xg, w, 1e-5).square().sum().backward()
    xr = x.clone().requires_grad_()
    fused.rms_norm_reference(xr, w, 1e-5).square().sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, **tol)
