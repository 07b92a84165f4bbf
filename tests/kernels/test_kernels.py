"""Equivalence tests of dllm_rl.kernels: every fast path against its torch reference.

On a CPU box the Triton kernels (ours and liger-kernel's) run through the Triton interpreter. It must be on
before triton itself is imported (the test session imports triton early: transformers -> torch._dynamo), so
tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU. With TRITON_INTERPRET=0 in the shell the
`triton` tests skip and `test_triton_kernels_in_a_fresh_interpreter` (slow) reruns them in a subprocess that
sets it; the sm_90 lowering check, which needs the compiler rather than the interpreter, reruns itself in a
subprocess with TRITON_INTERPRET=0. Everything skips when triton is not installed. `gpu` tests run the
compiled kernels on CUDA at LLaDA's vocabulary size.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import dllm_rl.kernels as K
from dllm_rl.estimators.base import token_logprobs
from dllm_rl.kernels.logprobs import ChunkedLinearLogprobs
from dllm_rl.kernels.sampling import choose_tokens as reference

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
STATS = ("logprob", "confidence", "top_prob", "margin", "gap")


def interpreter_active() -> bool:
    """Triton's own jit'd library (tl.max, tl.cumsum, ...) was built for the interpreter."""
    import triton.language as tl

    return os.environ.get("TRITON_INTERPRET") == "1" and type(tl.cumsum).__name__ == "InterpretedFunction"


@pytest.fixture(scope="module")
def triton_ok():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and not interpreter_active():
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1: run with it set in the shell, or -m slow "
            "(test_triton_kernels_in_a_fresh_interpreter)"
        )


@pytest.fixture(scope="module")
def ks(triton_ok):
    from dllm_rl.kernels import sampling_triton as sampling

    return sampling


def true_entropy(logits: torch.Tensor, mask_id: int | None) -> torch.Tensor:
    z = logits.float()
    if mask_id is not None:
        z = z.index_fill(-1, torch.tensor([mask_id], device=z.device), float("-inf"))
    return torch.distributions.Categorical(logits=z).entropy()  # treats -inf entries as 0 * log 0 = 0


def make_case(n, V, dtype, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(n, V, generator=g)).to(dtype).to(device)  # [n, V]
    u = torch.rand(n, generator=g, dtype=torch.float64)  # [n] as counter_rng gives them
    u[:2] = torch.tensor([1e-12, 0.9999], dtype=torch.float64)[:n]  # near both ends of the CDF
    return logits, u.to(device)


def assert_matches(got, want, logits, mask_id, greedy, atol=2e-5):
    z = logits.float().index_fill(-1, torch.tensor([mask_id], device=logits.device), float("-inf"))
    top2 = z.topk(2, -1).values  # [n, 2]
    tie = (top2[:, 0] == top2[:, 1]) & greedy  # bf16 logits can tie at the top; topk's order is unspecified
    assert torch.equal(got.token[~tie], want.token[~tie])
    assert (z.gather(-1, got.token[:, None]).squeeze(-1)[tie] == top2[tie, 0]).all()
    for k in STATS:
        torch.testing.assert_close(getattr(got, k), getattr(want, k), atol=atol, rtol=1e-5)
    torch.testing.assert_close(got.entropy, true_entropy(logits, mask_id), atol=atol, rtol=1e-5)
    assert (got.token != mask_id).all()


# ---------------------------------------------------------------------------------------------------------
# dispatch and imports (no triton needed)


def test_import_is_light():
    """`import dllm_rl.kernels` imports neither triton nor liger (module-level imports of the eager modules)."""
    eager = {
        "dllm_rl.kernels": K.__file__,
        "dllm_rl.kernels.logprobs": K.logprobs.__file__,
        "dllm_rl.kernels.sampling": K.sampling.__file__,
        "dllm_rl.kernels.fused": K.fused.__file__,
    }
    for name, path in eager.items():
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in tree.body:  # module level only: function-local imports are lazy
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                modules = ["." * node.level + (node.module or "")]
            else:
                continue
            for module in modules:
                assert not module.startswith(("triton", "liger_kernel", ".sampling_triton")), (name, module)
                if module.startswith("."):
                    assert "dllm_rl.kernels" + module in eager, (name, module)


def test_cpu_dispatch_is_the_reference_bit_for_bit():
    logits, u = make_case(12, 97, torch.float32)
    assert not K.use_fast_path(logits)
    for temperature, top_k, top_p in [(0.0, 0, 1.0), (0.8, 0, 1.0), (1.0, 5, 0.9)]:
        got = K.choose_tokens(logits, u, temperature, top_k, top_p, mask_token_id=4)
        want = reference(logits, u, temperature, top_k, top_p, mask_token_id=4)
        for k in ("token",) + STATS + ("entropy",):
            torch.testing.assert_close(getattr(got, k), getattr(want, k), rtol=0, atol=0, equal_nan=True)


# ---------------------------------------------------------------------------------------------------------
# fused sampling (Triton; interpreter on CPU)


@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.6])
@pytest.mark.parametrize("splits,block", [(1, 128), (4, 64), (8, 32)])
def test_triton_sampling_matches_reference(ks, temperature, splits, block):
    logits, u = make_case(12, 509, torch.float32, seed=splits)  # V not a multiple of the block
    mask_id = 200
    logits[3, mask_id] = 50.0  # a [MASK] logit far above the rest must still never be chosen
    got = ks.fused_choose_tokens(logits, u, temperature, mask_id, block=block, splits=splits)
    assert_matches(got, reference(logits, u, temperature, mask_token_id=mask_id), logits, mask_id, temperature == 0)


@pytest.mark.parametrize("temperature", [0.0, 0.9])
def test_triton_sampling_bf16_and_planned(ks, temperature):
    logits, u = make_case(16, 1000, torch.bfloat16, seed=3)
    got = ks.choose_tokens_triton(logits, u, temperature, mask_token_id=999)  # uses _plan's splits
    assert_matches(got, reference(logits, u, temperature, mask_token_id=999), logits, 999, temperature == 0)


def test_triton_sampling_without_mask_id_and_tiny_vocab(ks):
    logits, u = make_case(8, 3, torch.float32, seed=5)
    for temperature in (0.0, 1.3):
        got = ks.fused_choose_tokens(logits, u, temperature, None, block=4, splits=1)
        want = reference(logits, u, temperature)
        assert torch.equal(got.token, want.token)
        for k in STATS + ("entropy",):
            torch.testing.assert_close(getattr(got, k), getattr(want, k), atol=2e-6, rtol=1e-5)


def test_triton_sampling_is_batch_invariant(ks):
    logits, u = make_case(12, 509, torch.float32, seed=9)
    for temperature in (0.0, 0.8):
        full = ks.fused_choose_tokens(logits, u, temperature, 5, block=64, splits=4)
        part = ks.fused_choose_tokens(logits[3:7], u[3:7], temperature, 5, block=64, splits=4)
        for k in ("token",) + STATS + ("entropy",):  # bit-identical, not merely close
            assert torch.equal(getattr(full, k)[3:7], getattr(part, k)), k
    assert ks._plan(126464) == (1024, 32) and ks._plan(1000) == (1024, 1)  # depends on V only


def test_triton_sampling_u_rounding_to_one_picks_a_valid_token(ks):
    logits, _ = make_case(6, 300, torch.float32, seed=11)
    logits[:, 250:] -= 30.0  # a tail of tiny probabilities the fp32 CDF cannot resolve near 1
    u = torch.full((6,), 1 - 1e-12, dtype=torch.float64)  # rounds to 1.0 in fp32, as in the reference
    for splits in (1, 4):
        got = ks.fused_choose_tokens(logits, u, 1.0, 7, block=32, splits=splits)
        want = reference(logits, u, 1.0, mask_token_id=7)
        # both pick a token where the CDF saturates; which one is a matter of fp32 rounding
        assert (got.token != 7).all() and (got.token >= want.token).all() and (got.confidence > 0).all()


def test_triton_sampling_filters_fall_back_to_reference(ks):
    logits, u = make_case(8, 64, torch.float32, seed=7)
    got = ks.choose_tokens_triton(logits, u, 0.7, 5, 0.8, mask_token_id=1)
    want = reference(logits, u, 0.7, 5, 0.8, mask_token_id=1)
    assert torch.equal(got.token, want.token) and torch.equal(got.logprob, want.logprob)


def test_sampling_kernels_compile_for_h100():
    """Without a GPU: lower both kernels to an sm_90 cubin (catches what the interpreter does not check)."""
    triton = pytest.importorskip("triton")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from dllm_rl.kernels import sampling_triton as sampling

    if type(sampling._partials_kernel).__name__ != "JITFunction":  # defined for the interpreter here
        env = {**os.environ, "TRITON_INTERPRET": "0"}
        run = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                f"{__file__}::test_sampling_kernels_compile_for_h100",
                "-p",
                "no:cacheprovider",
                "-rs",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
        assert re.search(r"1 (passed|skipped)", run.stdout), run.stdout[-2000:]
        return

    scalars = {"x_ptr": "*bf16", "stride_row": "i32", "V": "i32", "split_len": "i32", "mask_id": "i32", "inv_t": "fp32"}
    names = ["m", "s", "w", "st", "t1", "t1i", "t2"]
    partials = {f"{k}_out": "*i32" if k == "t1i" else "*fp32" for k in names}
    finish = {f"{k}_in": "*i32" if k == "t1i" else "*fp32" for k in names}
    finish.update(tok_out="*i64", **{f"{k}_out": "*fp32" for k in ("lp", "conf", "top", "margin", "gap", "ent")})
    const = {"NS": "constexpr", "BLOCK": "constexpr", "SAMPLE": "constexpr"}
    for sample in (False, True):
        for splits in (1, 32):
            constexprs = {"NS": splits, "BLOCK": 1024, "SAMPLE": sample}
            for fn, sig in (
                (sampling._partials_kernel, {**scalars, **partials, **const}),
                (sampling._finish_kernel, {**scalars, "u_ptr": "*fp32", **finish, **const}),
            ):
                try:
                    k = triton.compile(
                        ASTSource(fn, sig, constexprs),
                        target=GPUTarget("cuda", 90, 32),
                        options={"num_warps": 4, "enable_fp_fusion": True},
                    )
                except (FileNotFoundError, RuntimeError) as e:  # no ptxas / CUDA toolchain in this triton
                    if "ptxas" in str(e).lower():
                        pytest.skip(f"no usable ptxas: {e}")
                    raise
                assert k.asm["cubin"]


# ---------------------------------------------------------------------------------------------------------
# per-token log-probs from hidden states


def linear_reference(h, W, b, targets, mask_id, temperature):
    if h.dtype != torch.float64:
        return token_logprobs(F.linear(h, W, b) / temperature, targets, mask_id)  # what the estimators do
    z = F.linear(h, W, b) / temperature  # [n, V] token_logprobs without its fp32 upcast
    if mask_id is not None:
        z = z.index_fill(-1, torch.tensor([mask_id]), float("-inf"))
    return z.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


def logprob_case(n, D, V, dtype, bias=True, seed=0, mask_id=3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, D, generator=g, dtype=dtype, requires_grad=True)  # [n, D]
    W = (torch.randn(V, D, generator=g, dtype=dtype) / D**0.5).requires_grad_()  # [V, D]
    b = torch.randn(V, generator=g, dtype=dtype, requires_grad=True) if bias else None  # [V]
    t = torch.randint(0, V, (n,), generator=g)  # [n]
    t[t == mask_id] = mask_id + 1
    return h, W, b, t


def grads(out, inputs, upstream):
    return torch.autograd.grad(out, [x for x in inputs if x is not None], upstream)


@pytest.mark.parametrize(
    "bias,mask_id,temperature,rows",
    [(True, 3, 0.7, 3), (False, None, 1.0, 4), (True, None, 1.5, 100), (False, 3, 1.0, 1)],
)
def test_chunked_logprobs_match_log_softmax_gather_and_autograd(bias, mask_id, temperature, rows):
    h, W, b, t = logprob_case(10, 6, 13, torch.float64, bias, mask_id=3)
    got = ChunkedLinearLogprobs.apply(h, W, b, t, mask_id, temperature, rows)  # [n]
    want = linear_reference(h, W, b, t, mask_id, temperature)  # [n], unchunked autograd
    torch.testing.assert_close(got, want.to(got.dtype), atol=1e-12, rtol=1e-12)
    up = torch.randn(10, dtype=torch.float64)
    for a, e in zip(grads(got, (h, W, b), up), grads(want, (h, W, b), up)):
        torch.testing.assert_close(a, e, atol=1e-12, rtol=1e-10)


def test_chunked_logprobs_gradcheck():
    h, W, b, t = logprob_case(5, 4, 7, torch.float64, mask_id=2)
    fn = lambda h, W, b: ChunkedLinearLogprobs.apply(h, W, b, t, 2, 0.8, 2)
    assert torch.autograd.gradcheck(fn, (h, W, b))


def test_public_torch_path_chunks_fp32_and_frozen_head(monkeypatch):
    monkeypatch.setattr("dllm_rl.kernels.logprobs.CHUNK_BYTES", 4 * 50 * 3)  # 3 rows per chunk
    h, W, _, t = logprob_case(11, 8, 50, torch.float32, bias=False)
    W.requires_grad_(False)  # a frozen LM head (LoRA elsewhere): only the hidden-state gradient
    got = K.linear_token_logprobs(h, W, t, None, 3, 0.9)
    want = linear_reference(h, W, None, t, 3, 0.9)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    up = torch.randn(11)
    torch.testing.assert_close(grads(got, (h,), up)[0], grads(want, (h,), up)[0], atol=1e-5, rtol=1e-4)


def test_torch_path_bf16_weights_close_to_fp32():
    h, W, b, t = logprob_case(8, 16, 40, torch.float32)
    hb, Wb, bb = (x.detach().bfloat16().requires_grad_() for x in (h, W, b))
    got = K.linear_token_logprobs_torch(hb, Wb, t, bb, 3, 1.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, linear_reference(hb, Wb, bb, t, 3, 1.0), atol=2e-2, rtol=0)
    got.sum().backward()
    assert Wb.grad.dtype == torch.bfloat16 and torch.isfinite(Wb.grad.float()).all()


def test_docstring_recipe_matches_view_logprobs(model_factory, tokenizer):
    """The estimator recipe in kernels/logprobs.py's docstring, on the tiny model, against view_logprobs."""
    from dllm_rl.estimators.base import view_logprobs
    from dllm_rl.models.base import traits, unwrap
    from dllm_rl.models.masks import padding_positions

    model = model_factory()
    tr = traits(model, tokenizer)
    N, P, Lc, V = 3, 5, 6, model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    completion = torch.randint(0, V, (N, Lc), generator=g)  # [N, Lc]
    completion[completion == tr.mask_token_id] = (tr.mask_token_id + 1) % V
    batch = SimpleNamespace(
        prompt_ids=torch.randint(0, V, (N, P), generator=g),
        prompt_mask=torch.ones(N, P, dtype=torch.long),
        completion_ids=completion,
    )
    masked = torch.rand(N, Lc, generator=g) < 0.5  # [N, Lc] the view's [MASK] positions = the scored ones
    want = view_logprobs(model, batch, masked, None, tr, 0.8)  # [N, Lc]
    (w_want,) = torch.autograd.grad(want[masked].sum(), unwrap(model).get_output_embeddings().weight)

    ids = torch.cat([batch.prompt_ids, torch.where(masked, tr.mask_token_id, completion)], 1)  # [N, P+Lc]
    attn = torch.ones_like(ids)
    out = model(
        input_ids=ids,
        attention_mask=attn,
        position_ids=padding_positions(attn),
        logits_range=(P, P),
        output_hidden_states=True,
    )
    shift = tr.logits_shift
    h = out.hidden_states[-1][:, P - shift : P + Lc - shift]  # [N, Lc, D]
    head = unwrap(model).get_output_embeddings()
    lp = torch.zeros(N, Lc)
    lp[masked] = K.linear_token_logprobs(
        h[masked], head.weight, completion[masked], getattr(head, "bias", None), tr.mask_token_id, 0.8
    )
    torch.testing.assert_close(lp[masked], want[masked], atol=1e-5, rtol=1e-5)
    (w_got,) = torch.autograd.grad(lp[masked].sum(), head.weight)
    torch.testing.assert_close(w_got, w_want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("bias,temperature", [(True, 0.8), (False, 1.0)])
def test_triton_liger_logprobs_match_torch_path(triton_ok, bias, temperature):
    pytest.importorskip("liger_kernel")
    assert K.logprobs.liger_usable()
    h, W, b, t = logprob_case(16, 32, 300, torch.float32, bias)
    got = K.linear_token_logprobs_liger(h, W, t, b, 3, temperature)
    want = K.linear_token_logprobs_torch(h, W, t, b, 3, temperature)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    up = torch.randn(16)  # per-token upstream gradient: the case older liger releases got wrong
    for a, e in zip(grads(got, (h, W, b), up), grads(want, (h, W, b), up)):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_triton_kernels_in_a_fresh_interpreter():
    pytest.importorskip("triton")
    if torch.cuda.is_available() or interpreter_active():
        pytest.skip("the triton tests run in this process")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-p", "no:cacheprovider", "-k", "triton and not fresh_interpreter"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert int(re.search(r"(\d+) passed", run.stdout).group(1)) >= 10, run.stdout[-2000:]


# ---------------------------------------------------------------------------------------------------------
# the compiled kernels on a GPU


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("temperature", [0.0, 1.0, 0.7])
@pytest.mark.parametrize("n", [1, 32, 2048])
def test_gpu_fused_sampling_llada_vocab(temperature, n):
    pytest.importorskip("triton")
    mask_id = 126336
    logits, u = make_case(n, 126464, torch.bfloat16, device="cuda")
    assert K.use_fast_path(logits)
    got = K.choose_tokens(logits, u, temperature, mask_token_id=mask_id)
    want = reference(logits, u, temperature, mask_token_id=mask_id)
    z = logits.float().index_fill(-1, torch.tensor([mask_id], device="cuda"), float("-inf"))
    top2 = z.topk(2, -1).values  # [n, 2]
    tie = (top2[:, 0] == top2[:, 1]) & (temperature == 0)  # bf16 ties at the top are common at this V
    same = got.token == want.token
    # sampled tokens may differ where u falls within fp32 rounding of a CDF boundary (blocked vs serial sums)
    assert (same | tie).float().mean().item() >= (1.0 if n < 2048 else 0.999)
    assert (z.gather(-1, got.token[:, None]).squeeze(-1)[tie] == top2[tie, 0]).all()
    assert (got.token != mask_id).all()
    for k in ("logprob", "confidence"):
        torch.testing.assert_close(getattr(got, k)[same], getattr(want, k)[same], atol=1e-4, rtol=1e-4)
    for k in ("top_prob", "margin", "gap"):  # independent of the chosen token
        torch.testing.assert_close(getattr(got, k), getattr(want, k), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got.entropy, true_entropy(logits, mask_id), atol=1e-3, rtol=1e-4)
    sub = K.choose_tokens(logits[: n // 2 + 1], u[: n // 2 + 1], temperature, mask_token_id=mask_id)
    assert torch.equal(sub.token, got.token[: n // 2 + 1])  # batch-invariant on the device too
    assert torch.equal(sub.logprob, got.logprob[: n // 2 + 1])


@pytest.mark.gpu
@gpu
def test_gpu_liger_logprobs_bf16():
    pytest.importorskip("liger_kernel")
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(4096, 1024, device="cuda", generator=g).bfloat16().requires_grad_()
    W = (torch.randn(32000, 1024, device="cuda", generator=g) / 32).bfloat16().requires_grad_()
    t = torch.randint(0, 32000, (4096,), device="cuda", generator=g)
    t[t == 7] = 8
    got = K.linear_token_logprobs(h, W, t, None, 7, 0.9)  # dispatches to liger
    want = K.linear_token_logprobs_torch(h, W, t, None, 7, 0.9)
    torch.testing.assert_close(got, want, atol=5e-2, rtol=1e-2)
    up = torch.randn(4096, device="cuda")
    for a, e in zip(grads(got, (h, W), up), grads(want, (h, W), up)):
        assert (a.float() - e.float()).norm() / e.float().norm() < 2e-2
