"""Choosing a token for each masked position, and the statistics the commit and ordering rules read.

One pass over the logits of the positions being decoded (never the whole canvas): the sampled token
(temperature, top-k, top-p, min-p; greedy at temperature 0), its log-probability under the distribution actually
sampled from (recorded in the trace), its probability under the model (LLaDA's "confidence"), the top-1
probability, the top-1 / top-2 probability margin and logit gap (Prophet, arXiv 2508.19982), and the entropy.

The [MASK] token is never a valid output: its logit is removed before anything else (MDLM's "zero masking
probabilities", arXiv 2406.07524); LLaDA's sampler relies on a trained model never predicting it, but a
young or random model does, and committing [MASK] would stall decoding. The estimators use the same rule.

Sampling is by inverse CDF with one uniform per position (counter_rng), so no [N, V] noise tensor exists.
This torch function is the reference of the fused Triton kernel in `sampling_triton.py` (which does not
implement min_p and repetition_penalty: kernels.choose_tokens takes this reference when they are set).

min_p and repetition_penalty are TRL's (transformers' MinPLogitsWarper and RepetitionPenaltyLogitsProcessor):
min_p keeps the tokens whose probability after temperature is at least min_p times the largest; the
repetition penalty divides the positive logits (multiplies the negative ones) of tokens already present. For
a diffusion LM "already present" is the prompt and every token committed on the canvas so far (decoding is
not left to right, so there is no "generated so far" prefix); like transformers' processor it changes the
distribution every choice is made from (greedy included), and the model's confidences the ordering rules read.
The likelihood estimators score the model's own distribution, without these, as they do for top-k and top-p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TokenChoice:
    token: torch.Tensor  # [n] long
    logprob: torch.Tensor  # [n] log-prob of token under the sampling distribution (T=0: the model's)
    confidence: torch.Tensor  # [n] p(token) under the model
    top_prob: torch.Tensor  # [n] p(top1): the confidence of the greedy token, whatever was sampled
    margin: torch.Tensor  # [n] p(top1) - p(top2)
    gap: torch.Tensor  # [n] logit(top1) - logit(top2)
    entropy: torch.Tensor  # [n] entropy of the model's distribution


def without_mask_token(logits: torch.Tensor, mask_token_id: int | None) -> torch.Tensor:
    """Logits with the [MASK] entry set to -inf (a copy when it changes anything)."""
    if mask_token_id is None:
        return logits
    logits = logits.clone()
    logits[..., mask_token_id] = float("-inf")
    return logits


def filter_logits(z: torch.Tensor, top_k: int, top_p: float, min_p: float = 0.0) -> torch.Tensor:
    """Top-k, top-p (nucleus) then min-p filtering of [n, V] logits (already divided by the temperature, as
    transformers' warpers see them), in transformers' order (generation/utils.py `_get_logits_processor`:
    TopK, TopP, MinP); filtered entries become -inf."""
    if top_k and top_k < z.shape[-1]:
        kth = z.topk(top_k, dim=-1).values[:, -1:]  # [n, 1]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = z.sort(dim=-1, descending=True)  # [n, V]
        probs = sorted_z.softmax(-1)
        # keep the smallest prefix with mass >= top_p: drop a token once the mass before it reaches top_p
        drop = probs.cumsum(-1) - probs >= top_p
        z = z.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    if min_p > 0:  # transformers' MinPLogitsWarper: p >= min_p * p_max (it keeps at least one token)
        probs = z.softmax(-1)
        z = z.masked_fill(probs < min_p * probs.max(-1, keepdim=True).values, float("-inf"))
    return z


def penalize_repetition(logits: torch.Tensor, context: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor on [n, V] logits: for every token id in row i of
    `context` [n, C] (negative ids: none), a logit < 0 is multiplied by `penalty`, else divided by it."""
    # a presence mask, not a scatter of penalised values: the -1 entries would write token 0's own (unpenalised)
    # logit at index 0 too, and which of two writes to one index lands is undefined (CPU: the last one)
    counts = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
    present = counts.scatter_add_(-1, context.clamp(min=0), (context >= 0).float()) > 0
    return torch.where(present, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def repetition_context(x: torch.Tensor, attn: torch.Tensor, mask_token_id: int, masked: torch.Tensor) -> torch.Tensor:
    """The repetition penalty's context for every masked position `masked` [n, Lb] of the rows x [n, L]: the
    row's prompt and committed canvas tokens (-1 at padding and still-masked positions) -> [masked.sum(), L]."""
    ctx = torch.where((attn == 0) | (x == mask_token_id), torch.full_like(x, -1), x)  # [n, L]
    return ctx[:, None, :].expand(-1, masked.shape[1], -1)[masked]


def sampling_logprobs(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    mask_token_id: int | None = None,
    min_p: float = 0.0,
):
    """Log-probabilities of the distribution a token is drawn from (the model's own at temperature 0)."""
    z = without_mask_token(logits.float(), mask_token_id)
    if temperature > 0:
        z = filter_logits(z / temperature, top_k, top_p, min_p)
    return z.log_softmax(-1)


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
    """logits: [n, V]; u: [n] uniforms in (0, 1). Greedy when temperature == 0. context: [n, C] token ids the
    repetition penalty applies to (negative = none), needed when repetition_penalty != 1."""
    logits = without_mask_token(logits.float(), mask_token_id)
    if repetition_penalty != 1.0 and context is not None:
        logits = penalize_repetition(logits, context, repetition_penalty)
    logp = logits.log_softmax(-1)  # [n, V]
    top = logits.topk(2, dim=-1)
    if temperature > 0:
        slogp = sampling_logprobs(logits, temperature, top_k, top_p, None, min_p)  # [n, V] (mask already removed)
        cdf = slogp.exp().cumsum(-1)  # [n, V]
        target = (u.to(cdf.dtype) * cdf[:, -1]).unsqueeze(-1)  # scaled by the total: rounding-safe
        token = torch.searchsorted(cdf, target).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
        logprob = slogp.gather(-1, token[:, None]).squeeze(-1)
    else:
        token = logits.argmax(-1)  # the first maximum, as the Triton kernel (topk leaves the order of ties open)
        logprob = logp.gather(-1, token[:, None]).squeeze(-1)
    p_top = logp.gather(-1, top.indices).exp()  # [n, 2]
    return TokenChoice(
        token=token,
        logprob=logprob,
        confidence=logp.gather(-1, token[:, None]).squeeze(-1).exp(),
        top_prob=p_top[:, 0],
        margin=p_top[:, 0] - p_top[:, 1],
        gap=top.values[:, 0] - top.values[:, 1],
        entropy=torch.special.entr(logp.exp()).sum(-1),  # 0 * log 0 = 0 at the removed [MASK] entry
    )
