"""Per-token log-probabilities of given targets straight from final hidden states, with gradient, without
the [n, V] fp32 logits of all positions at once: the likelihood estimators' memory hot spot.

    log p(target_i) = log_softmax((hidden_i @ weight.T + bias) / T)[target_i], with [MASK] removed from
    the support (its logit is -inf, as in `dllm_rl.estimators.base.token_logprobs` and the sampler).

Two implementations of one signature `(hidden, weight, targets, bias=None, mask_token_id=None,
temperature=1.0) -> [n]`:

- `linear_token_logprobs_torch` (the reference and the CPU path; also correct on GPU): a
  torch.autograd.Function over chunks of positions (rows = CHUNK_BYTES / 4V). Forward keeps only the
  log-sum-exp per row; backward recomputes each chunk's logits and turns them into the logits gradient in
  place. Transient memory: about two fp32 [rows, V] chunks (logsumexp's temporary; a model-dtype copy for the
  matmuls) and, when the weight needs a gradient, an fp32 [V, D] accumulator; instead of several [n, V] fp32
  tensors (logits, upcast, log-softmax, its gradient). It is hand-written because liger-kernel's version is
  Triton-only (it cannot run on CPU) and has neither temperature nor class exclusion.
- `linear_token_logprobs_liger` (the CUDA fast path): liger-kernel's fused linear cross-entropy
  (`LigerFusedLinearCrossEntropyFunction`, reduction="none"), which chunks positions, keeps the transient
  logits in the input dtype and computes the softmax gradient in place in one Triton kernel. It has no
  temperature and no class exclusion, so: temperature is applied to the inputs ((h/T) W^T + b/T equals the
  tempered logits), and [MASK] is excluded through the bias: bias[mask] = -inf (zeroing the weight row
  would give logit 0, not -inf). Needs liger-kernel >= 0.8.2: older releases returned silently wrong
  weight gradients for reduction="none" with a per-token upstream gradient (linkedin/Liger-Kernel#1298).

How an estimator uses it (instead of `model(...).logits` + `token_logprobs`); `estimators.base.view_logprobs`
does this on CUDA (`fused_head`, `head_logprobs`):

    base = unwrap(model)                                  # models.base.unwrap
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos,
                logits_range=(lo, lo), output_hidden_states=True)   # empty logits: skip the LM head
    h = out.hidden_states[-1][:, lo - shift:lo + Lc - shift]        # [N, Lc, D] final-norm output
    head = base.get_output_embeddings()                   # lm_head (or the tied embedding): weight [V, D]
    keep = weights_k != 0                                 # [N, Lc] score only the positions that count
    lp = torch.zeros(N, Lc, device=h.device)
    lp[keep] = linear_token_logprobs(h[keep], head.weight, batch.completion_ids[keep],
                                     getattr(head, "bias", None), tr.mask_token_id,
                                     temperature)         # [n_keep] float32, with gradient

`hidden_states[-1]` must be exactly the LM head's input (true for the native tiny/LLaDA/Dream models and
HF Llama-style models: the final norm is applied before it is returned), and logits must be
F.linear(hidden, weight, bias) / s for a constant s: pass temperature * s (LLaDA's `scale_logits` option has
s = sqrt(d_model); softcapped heads do not fit). Under ZeRO-3 gather the head first
(deepspeed.zero.GatheredParameters([head.weight])). Targets equal to [MASK] give -inf, as the reference does.
tests/kernels/test_kernels.py checks this recipe against `view_logprobs` on the tiny model.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk of positions (torch path); backward holds ~3 of these
LIGER_MIN_VERSION = (0, 8, 2)  # first release whose reduction="none" weight gradient is per-token-correct


def _chunk_logits(
    h: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    mask_token_id: int | None,
    temperature: float,
    acc: torch.dtype,
) -> torch.Tensor:
    z = F.linear(h, weight, bias).to(acc)  # [c, V] matmul in the model's dtype, then upcast
    if temperature != 1.0:
        z.div_(temperature)  # a fresh tensor: in place is safe and saves a [c, V] copy
    if mask_token_id is not None:
        z[:, mask_token_id] = float("-inf")
    return z


class ChunkedLinearLogprobs(torch.autograd.Function):
    """apply(hidden [n, D], weight [V, D], bias [V] | None, targets [n], mask_token_id, temperature, rows)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")  # backward recomputes under the forward's autocast state
    def forward(ctx, hidden, weight, bias, targets, mask_token_id, temperature, rows):
        acc = torch.promote_types(hidden.dtype, torch.float32)  # fp32, or fp64 for gradcheck
        n = hidden.shape[0]
        out = torch.empty(n, device=hidden.device, dtype=acc)  # [n]
        lse = torch.empty(n, device=hidden.device, dtype=acc)  # [n] all that is kept for backward
        for a in range(0, n, rows):
            z = _chunk_logits(hidden[a : a + rows], weight, bias, mask_token_id, temperature, acc)  # [c, V]
            lse[a : a + rows] = z.logsumexp(-1)
            out[a : a + rows] = z.gather(-1, targets[a : a + rows, None]).squeeze(-1) - lse[a : a + rows]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.conf = (mask_token_id, temperature, rows, acc)
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    @once_differentiable
    def backward(ctx, grad):  # grad: [n]
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        mask_token_id, temperature, rows, acc = ctx.conf
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        gh = torch.zeros_like(hidden) if need_h else None  # [n, D]
        gw = torch.zeros(weight.shape, device=weight.device, dtype=acc) if need_w else None  # [V, D]
        gb = torch.zeros(weight.shape[0], device=weight.device, dtype=acc) if need_b else None  # [V]
        for a in range(0, hidden.shape[0], rows):
            h = hidden[a : a + rows]  # [c, D]
            g = grad[a : a + rows, None].to(acc) / temperature  # [c, 1]; 1/T: d(z/T)/dz
            z = _chunk_logits(h, weight, bias, mask_token_id, temperature, acc)  # [c, V]
            dz = z.sub_(lse[a : a + rows, None]).exp_().mul_(-g)  # [c, V] -g * softmax, in place of z
            dz.scatter_add_(-1, targets[a : a + rows, None], g)  # + g at the target: g * (onehot - p)
            if mask_token_id is not None:
                dz[:, mask_token_id] = 0.0  # the -inf logit is a constant, as in the reference's index_put
            if gb is not None:
                gb += dz.sum(0)
            dz = dz.to(weight.dtype)  # matmuls in the model's dtype (what autograd does for the lm_head)
            if gh is not None:
                gh[a : a + rows] = dz @ weight
            if gw is not None and gw.dtype == dz.dtype:
                gw.addmm_(dz.t(), h)  # no [V, D] temporary
            elif gw is not None:
                gw += (dz.t() @ h).to(acc)
        return (
            gh,
            None if gw is None else gw.to(weight.dtype),
            None if gb is None else gb.to(bias.dtype),
            None,
            None,
            None,
            None,
        )


def rows_per_chunk(V: int, chunk_bytes: int | None = None) -> int:
    return max(1, (CHUNK_BYTES if chunk_bytes is None else chunk_bytes) // (4 * V))


def linear_token_logprobs_torch(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask_token_id: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """hidden [n, D], weight [V, D], targets [n] (long), bias [V] -> log p(target) [n] float32 (fp64 in)."""
    rows = rows_per_chunk(weight.shape[0])
    return ChunkedLinearLogprobs.apply(hidden, weight, bias, targets, mask_token_id, float(temperature), rows)


def linear_token_logprobs_liger(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    bias: torch.Tensor | None = None,
    mask_token_id: int | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Same contract through liger-kernel's fused linear cross-entropy (Triton; CUDA, or TRITON_INTERPRET=1).

    hidden and weight must share a dtype (liger's matmul); returns float32 [n].
    """
    from liger_kernel.ops.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyFunction

    if temperature != 1.0:
        hidden = hidden / temperature  # [n, D]: (h/T) W^T + b/T = logits / T
        bias = None if bias is None else bias / temperature
    if mask_token_id is not None:
        if bias is None:
            bias = torch.zeros(weight.shape[0], device=weight.device, dtype=hidden.dtype)  # [V]
        bias = bias.index_fill(0, torch.tensor([mask_token_id], device=bias.device), float("-inf"))
    loss = LigerFusedLinearCrossEntropyFunction.apply(
        hidden.contiguous(), weight, targets.contiguous(), bias, None, -100, 0.0, 0.0, "none"
    )[0]  # [n]
    return -loss


@functools.cache
def liger_usable() -> bool:
    """liger-kernel installed, recent enough for per-token gradients (checked without importing it)."""
    from importlib import metadata

    try:
        version = metadata.version("liger-kernel")
    except metadata.PackageNotFoundError:
        return False
    parts = []
    for piece in version.split(".")[:3]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts) >= LIGER_MIN_VERSION
