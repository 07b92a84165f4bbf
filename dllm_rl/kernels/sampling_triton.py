"""Fused token choice over the vocabulary: the Triton fast path of `kernels.sampling.choose_tokens`.

For n rows of logits [n, V] (the masked positions being decoded) it returns the same `TokenChoice` as the
torch reference: the chosen token (greedy at temperature 0, else inverse-CDF sampling with one given uniform
per row: the first token whose cumulative tempered probability reaches u * total), its log-prob under the
sampling distribution (the model's own at T=0), its probability under the model (T=1, "confidence"), the
top-1 probability, top-1 minus top-2 probability (margin) and logit (gap), and the entropy; the [MASK] id is
never chosen.

Why hand-written: no library fuses sampling with these statistics. The reference materialises several [n, V]
fp32 tensors (upcast, log-softmax, tempered log-softmax, CDF), which at LLaDA scale (V = 126k) dominates the
sampler's memory traffic (reference/inference-anchors.md §1, §6.3; the two-stage vocabulary reduction follows
Diffulex's fused greedy+confidence kernel, extended to sampling and to the statistics). No [n, V]
intermediate exists here; logits are read in their own dtype and upcast in registers.

Design (two kernels, about 1 + 1/S passes over the logits):
  1. `_partials_kernel`, grid (n, S): split s of row r scans its V/S columns in BLOCK chunks with an online
     softmax and keeps, in fp32: the running max m, sum e^(z-m), sum e^(z-m)(z-m) (for the entropy),
     sum e^((z-m)/T) (sampling only), the top-1 value and index and the top-2 value. Partials: 7 x [n, S].
  2. `_finish_kernel`, grid (n,): merges the S partials of a row (log-sum-exp merge); greedy is done. For
     sampling it finds the split where the tempered CDF crosses u * total from the partial sums, then rescans
     only that split (V/S columns) with a block cumsum to locate the token.
  S depends on V only (splits of <= 4096 columns; 32 at LLaDA's V = 126464), never on n or the device, so
  a row's result is bit-identical whatever else is in the batch (the rollout's batch invariance) and n * S
  programs fill an H100 from n = 16 rows up. Memory: 7 x [n, S] partials + 6 x [n] outputs.

Departures from the reference, all at rounding level: fp32 sums are blocked rather than sequential, so a
uniform within ~1e-6 of a CDF boundary can pick the neighbouring token. Ties for the maximum logit resolve to
the lowest index, as in the reference (argmax). The entropy is the true entropy of the
[MASK]-free distribution, as the reference's.

Top-k / top-p filtering is not fused: with top_k > 0 (and < V) or top_p < 1 this falls back to the torch
reference (it needs a sort). Importing this module imports triton; `dllm_rl.kernels` imports it lazily.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl

from .sampling import TokenChoice
from .sampling import choose_tokens as choose_tokens_reference

MAX_SPLIT_COLS = 4096  # a split scans at most this many columns (bounds the sampling rescan to ~V/S)
MAX_SPLITS = 64


@triton.jit
def _partials_kernel(
    x_ptr,
    stride_row,
    V,
    split_len,
    mask_id,
    inv_t,
    m_out,
    s_out,
    w_out,
    st_out,
    t1_out,
    t1i_out,
    t2_out,
    NS: tl.constexpr,
    BLOCK: tl.constexpr,
    SAMPLE: tl.constexpr,
):
    row = tl.program_id(0)
    sp = tl.program_id(1)
    base = x_ptr + row.to(tl.int64) * stride_row
    lo = sp * split_len
    hi = tl.minimum(lo + split_len, V)
    cols = tl.arange(0, BLOCK)
    neg_inf = float("-inf")
    m = tl.full([], neg_inf, tl.float32)  # running max
    s = tl.zeros([], tl.float32)  # sum e^(z - m)
    w = tl.zeros([], tl.float32)  # sum e^(z - m) (z - m)
    st = tl.zeros([], tl.float32)  # sum e^((z - m) / T)
    t1 = tl.full([], neg_inf, tl.float32)
    t2 = tl.full([], neg_inf, tl.float32)
    t1i = tl.zeros([], tl.int32)
    for start in range(lo, hi, BLOCK):
        offs = start + cols  # [BLOCK]
        z = tl.load(base + offs, mask=(offs < hi) & (offs != mask_id), other=neg_inf).to(tl.float32)
        finite = z > neg_inf
        # top-2: the block's max (first index on ties) and the max of the rest
        bmax = tl.max(z, 0)
        bidx = tl.argmax(z, 0)
        b2 = tl.max(tl.where(cols == bidx, neg_inf, z), 0)
        new_top = bmax > t1
        t2 = tl.where(new_top, tl.maximum(t1, b2), tl.maximum(t2, bmax))
        t1i = tl.where(new_top, start + bidx, t1i)
        t1 = tl.maximum(t1, bmax)
        # online softmax; m_safe keeps exp() finite while every value seen so far is -inf
        m_new = tl.maximum(m, bmax)
        m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe)  # [BLOCK], 0 where z = -inf
        shift = tl.where(s > 0, m - m_safe, 0.0) * s  # rebase sum e(z-m) onto the new max
        w = alpha * (w + shift) + tl.sum(e * tl.where(finite, z - m_safe, 0.0), 0)
        s = alpha * s + tl.sum(e, 0)
        if SAMPLE:
            st = tl.exp((m - m_safe) * inv_t) * st + tl.sum(tl.exp((z - m_safe) * inv_t), 0)
        m = m_new
    out = row * NS + sp
    tl.store(m_out + out, m)
    tl.store(s_out + out, s)
    tl.store(w_out + out, w)
    tl.store(st_out + out, st)
    tl.store(t1_out + out, t1)
    tl.store(t1i_out + out, t1i)
    tl.store(t2_out + out, t2)


@triton.jit
def _finish_kernel(
    x_ptr,
    stride_row,
    V,
    split_len,
    mask_id,
    inv_t,
    u_ptr,
    m_in,
    s_in,
    w_in,
    st_in,
    t1_in,
    t1i_in,
    t2_in,
    tok_out,
    lp_out,
    conf_out,
    top_out,
    margin_out,
    gap_out,
    ent_out,
    NS: tl.constexpr,
    BLOCK: tl.constexpr,
    SAMPLE: tl.constexpr,
):
    row = tl.program_id(0)
    base = x_ptr + row.to(tl.int64) * stride_row
    neg_inf = float("-inf")
    j = tl.arange(0, NS)  # [NS] splits
    idx = row * NS + j
    m_j = tl.load(m_in + idx)
    s_j = tl.load(s_in + idx)
    w_j = tl.load(w_in + idx)
    t1_j = tl.load(t1_in + idx)
    t1i_j = tl.load(t1i_in + idx)
    t2_j = tl.load(t2_in + idx)
    # log-sum-exp merge of the splits (empty splits have m = -inf, s = 0)
    M = tl.max(m_j, 0)
    a_j = tl.exp(m_j - M)
    S = tl.sum(a_j * s_j, 0)
    W = tl.sum(a_j * (w_j + tl.where(s_j > 0, m_j - M, 0.0) * s_j), 0)
    lse = M + tl.log(S)
    entropy = tl.log(S) - W / S
    T1 = tl.max(t1_j, 0)
    jstar = tl.argmax(t1_j, 0)  # first split on ties = lowest index
    top_idx = tl.sum(tl.where(j == jstar, t1i_j, 0), 0)
    T2 = tl.maximum(tl.max(tl.where(j == jstar, neg_inf, t1_j), 0), tl.max(t2_j, 0))
    if SAMPLE:
        c_j = tl.load(st_in + idx) * tl.exp((m_j - M) * inv_t)  # [NS] tempered mass per split
        total = tl.sum(c_j, 0)
        target = tl.load(u_ptr + row) * total
        cum = tl.cumsum(c_j, 0)
        first = tl.min(tl.where((cum >= target) & (c_j > 0), j, NS), 0)
        last = tl.max(tl.where(c_j > 0, j, -1), 0)
        jt = tl.where(first < NS, first, last)  # rounding: past the end -> the last non-empty split
        run = tl.sum(tl.where(j < jt, c_j, 0.0), 0)
        lo = jt * split_len
        hi = tl.minimum(lo + split_len, V)
        cols = tl.arange(0, BLOCK)
        tok = tl.full([], -1, tl.int32)
        last_tok = lo
        for start in range(lo, hi, BLOCK):
            offs = start + cols  # [BLOCK]
            z = tl.load(base + offs, mask=(offs < hi) & (offs != mask_id), other=neg_inf).to(tl.float32)
            p = tl.exp((z - M) * inv_t)
            cdf = run + tl.cumsum(p, 0)
            hit = tl.min(tl.where((cdf >= target) & (z > neg_inf), offs, V), 0)
            tok = tl.where((tok < 0) & (hit < V), hit, tok)
            last_tok = tl.maximum(last_tok, tl.max(tl.where(z > neg_inf, offs, -1), 0))
            run += tl.sum(p, 0)
        tok = tl.where(tok < 0, last_tok, tok)
        z_tok = tl.load(base + tok).to(tl.float32)
        logprob = (z_tok - M) * inv_t - tl.log(total)
    else:
        tok = top_idx
        z_tok = T1
        logprob = z_tok - lse
    tl.store(tok_out + row, tok.to(tl.int64))
    tl.store(lp_out + row, logprob)
    tl.store(conf_out + row, tl.exp(z_tok - lse))
    tl.store(top_out + row, tl.exp(T1 - lse))
    tl.store(margin_out + row, tl.exp(T1 - lse) - tl.exp(T2 - lse))
    tl.store(gap_out + row, T1 - T2)
    tl.store(ent_out + row, entropy)


def _plan(V: int) -> tuple[int, int]:
    """(BLOCK, splits) from the vocabulary size alone: a function of n would break batch invariance."""
    block = min(1024, triton.next_power_of_2(V))
    return block, min(MAX_SPLITS, triton.next_power_of_2(triton.cdiv(V, MAX_SPLIT_COLS)))


def fused_choose_tokens(
    logits: torch.Tensor, u: torch.Tensor | None, temperature: float, mask_token_id: int | None, block: int, splits: int
) -> TokenChoice:
    """Launch the two kernels with an explicit plan (tests use it to cover several split counts).

    logits: [n, V] any float dtype, unit stride along V; u: [n] uniforms (unused when temperature == 0).
    """
    n, V = logits.shape
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    dev = logits.device
    sample = temperature > 0
    split_len = triton.cdiv(triton.cdiv(V, splits), block) * block  # whole blocks per split
    part = [torch.empty(n, splits, device=dev, dtype=torch.float32) for _ in range(6)]  # 6 x [n, S]
    m_p, s_p, w_p, st_p, t1_p, t2_p = part
    t1i_p = torch.empty(n, splits, device=dev, dtype=torch.int32)  # [n, S]
    # [n] as the reference; created on the device (a pageable host->device copy cannot be captured in a CUDA graph)
    u32 = u.to(device=dev, dtype=torch.float32).contiguous() if sample else torch.zeros(1, device=dev)
    inv_t = 1.0 / temperature if sample else 1.0
    mask_id = -1 if mask_token_id is None else int(mask_token_id)
    token = torch.empty(n, device=dev, dtype=torch.long)
    stats = [torch.empty(n, device=dev, dtype=torch.float32) for _ in range(6)]  # 6 x [n]
    with torch.cuda.device(dev) if dev.type == "cuda" else nullcontext():
        _partials_kernel[(n, splits)](
            logits,
            logits.stride(0),
            V,
            split_len,
            mask_id,
            inv_t,
            m_p,
            s_p,
            w_p,
            st_p,
            t1_p,
            t1i_p,
            t2_p,
            NS=splits,
            BLOCK=block,
            SAMPLE=sample,
            num_warps=4,
        )
        _finish_kernel[(n,)](
            logits,
            logits.stride(0),
            V,
            split_len,
            mask_id,
            inv_t,
            u32,
            m_p,
            s_p,
            w_p,
            st_p,
            t1_p,
            t1i_p,
            t2_p,
            token,
            *stats,
            NS=splits,
            BLOCK=block,
            SAMPLE=sample,
            num_warps=4,
        )
    logprob, confidence, top_prob, margin, gap, entropy = stats
    return TokenChoice(
        token=token, logprob=logprob, confidence=confidence, top_prob=top_prob, margin=margin, gap=gap, entropy=entropy
    )


def choose_tokens_triton(
    logits: torch.Tensor,
    u: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    mask_token_id: int | None = None,
) -> TokenChoice:
    """Same signature and result as `kernels.sampling.choose_tokens` (logits [n, V], u [n]).

    Top-k / top-p filtering falls back to the torch reference (not fused).
    """
    n, V = logits.shape
    filtered = temperature > 0 and ((top_k and top_k < V) or top_p < 1.0)
    if filtered or n == 0:
        return choose_tokens_reference(logits, u, temperature, top_k, top_p, mask_token_id)
    block, splits = _plan(V)
    return fused_choose_tokens(logits, u, temperature, mask_token_id, block, splits)
