"""Scoring completions under an explicit corruption (`Noise`): the machinery every estimator shares.

An estimator = a way to draw `Noise` (which positions each view masks, and the weight each completion
token's log-probability gets in the estimate) + `score(model, batch, noise)`, which runs one forward per
view and returns the weighted per-token estimate [N, Lc]. Because the noise is an explicit object drawn from
a `torch.Generator`, the old policy, the reference and the current policy are scored under the same
corruption (antithetic in VRPO's sense, arXiv 2505.19223), and a batch can be shuffled safely.

On CUDA the per-token log-probs of a native model come straight from its final hidden states through
liger-kernel's fused linear cross-entropy (kernels.linear_token_logprobs; `fused_head`): the [N, Lc, V]
logits and their float32 log-softmax, the largest tensors of an update, are never built. On CPU, and for
views that also need the logits (a sampled order's scores), the logits path.

Block-causal models (block diffusion) are scored in the two-stream layout of BD3-LM (arXiv 2503.09573) and
TraceRL: [clean prompt + completion | noisy completion]; a noisy token of block b attends to clean blocks
< b and to its own noisy block, which is exactly what it saw at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.utils.checkpoint
from torch import nn

from ..kernels import linear_token_logprobs, use_fast_path
from ..models.base import ModelTraits, unwrap
from ..models.masks import block_ids, padding_positions
from ..policy.order_head import stats_from_logits
from ..policy.orders import model_order_scores


@dataclass
class Noise:
    completion_masks: torch.Tensor  # [K, N, Lc] bool: completion positions replaced by [MASK] in view k
    prompt_masks: torch.Tensor | None  # [K, N, P] bool: prompt positions masked (d1's p_mask_prompt), or None
    weights: torch.Tensor  # [K, N, Lc] float: weight of token i's log-prob from view k (0 = not scored)
    tokens: torch.Tensor | None = None  # [K, N, Lc] canvas of view k where unmasked (default: the completion)
    targets: torch.Tensor | None = None  # [K, N, Lc] token view k scores at each position (default: the completion)

    @property
    def num_views(self) -> int:
        return self.completion_masks.shape[0]

    def select(self, rows: torch.Tensor) -> "Noise":
        pick = lambda t: None if t is None else t[:, rows.to(t.device)]
        return Noise(
            *(pick(t) for t in (self.completion_masks, self.prompt_masks, self.weights, self.tokens, self.targets))
        )

    def with_prompt_length(self, P: int) -> "Noise":
        """The prompt masks' last P columns: the noise for left-padded prompts of length P (drawn for longer)."""
        pm = None if self.prompt_masks is None else self.prompt_masks[..., -P:]
        return Noise(self.completion_masks, pm, self.weights, self.tokens, self.targets)

    def to(self, device) -> "Noise":
        move = lambda t: None if t is None else t.to(device)
        return Noise(
            *(move(t) for t in (self.completion_masks, self.prompt_masks, self.weights, self.tokens, self.targets))
        )


@dataclass
class Estimate:
    """Per-token log-likelihood estimates [N, Lc]; `upper` is an upper bound where the estimator has one
    (SPG). Summed over the positions a sequence counts they give the sequence estimate (block_elbo: at SPG's
    scale, the bound divided by the completion length; each estimator's docstring states its expectation).

    mask: which entries count, when the estimator decides them itself. The trajectory estimator: [N, Lc] bool,
    every position the sampler committed (EOS and tokens after it included); of an any-process rollout, [N, K]
    with logps [N, K], one entry per step, since edits move tokens around. None: the entries are the completion's
    positions and the batch's completion_mask applies (up to and including the first EOS, d1's convention)."""

    logps: torch.Tensor
    upper: torch.Tensor | None = None
    mask: torch.Tensor | None = None


@dataclass(frozen=True)
class Estimator:
    """A likelihood estimator bound to its recipe section and the model's traits (what `build` returns).

    draw(batch, generator) -> Noise: the corruption, drawn for a batch (anything with prompt_ids, prompt_mask,
        completion_ids, completion_mask; trajectories also read batch.trace).
    estimate(model, batch, noise, **extra) -> Estimate: per-token estimates under that noise, with gradient
        when enabled (extra: order_policy for a learned order).
    views(steps, completion_length) -> int: forwards per estimate for a rollout of `steps` denoising steps of
        completions of `completion_length` positions (the memory planner); one that takes a single argument
        (views(steps)) is called with the steps alone.
    check(decoding) -> list of notes: refuse (ConfigError) rollout settings the estimator cannot score, before
        anything is built; the notes are printed.
    counted(batch, noise) -> bool tensor or None: the entries the loss counts when the estimator decides them
        itself (its Estimate.mask, known from the noise before any forward, so a trainer can count a step's loss
        tokens up front: dapo's normaliser); None: the batch's completion_mask.
    """

    draw: Callable
    estimate: Callable
    views: Callable[[int], int]
    check: Callable = field(default=lambda decoding: [])
    replays_orders: bool = False  # scores a sampled unmasking order's log-prob (what trains a learned order)
    counted: Callable = field(default=lambda batch, noise: None)
    # the per-token estimates sum to the sequence value divided by the completion length (block_elbo: SPG's
    # scale); a trainer that needs the sequence value itself (DPO) multiplies by the length
    per_token_mean: bool = False


def scored(tr: ModelTraits, temperature: float = 1.0) -> Callable:
    """`estimate` for estimators that are nothing more than the weighted `score` of their noise's views."""
    return lambda model, batch, noise, **extra: Estimate(score(model, batch, noise, tr, temperature))


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask_token_id: int | None) -> torch.Tensor:
    """log p(target) per position, with [MASK] excluded from the support (as the sampler does).

    logits: [..., V]; targets: [...] -> [...] float32.
    """
    logits = logits.float()
    if mask_token_id is not None:
        logits = logits.clone()
        logits[..., mask_token_id] = float("-inf")
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


def view_logprobs(
    model,
    batch,
    completion_mask_k: torch.Tensor,
    prompt_mask_k: torch.Tensor | None,
    tr: ModelTraits,
    temperature: float = 1.0,
    tokens_k: torch.Tensor | None = None,
    order: str | None = None,
    targets_k: torch.Tensor | None = None,
):
    """log p(completion token | view) at every completion position for one view: [N, Lc].

    batch: anything with prompt_ids [N, P], prompt_mask [N, P], completion_ids [N, Lc]. tokens_k: the view's
    canvas where unmasked, when it differs from the final completion (trajectories with self-correction).
    targets_k: the tokens to score, when they differ from the final completion (a token committed and later
    taken back by self-correction is scored at the step it was committed).
    order: also return the sampler's ordering scores at every position (policy.orders.model_order_scores,
    from the untempered logits), as a second [N, Lc] tensor; order="policy": instead, what a learned order
    head reads, (stats, last hidden states [N, Lc, D]) (policy.order_head.stats_from_logits).
    """
    P, Lc = batch.prompt_ids.shape[1], batch.completion_ids.shape[1]
    mask_id = tr.mask_token_id
    prompt = batch.prompt_ids
    if prompt_mask_k is not None:
        prompt = torch.where(prompt_mask_k & batch.prompt_mask.bool(), mask_id, prompt)
    canvas = batch.completion_ids if tokens_k is None else tokens_k
    noisy = torch.where(completion_mask_k, mask_id, canvas)  # [N, Lc]
    attn = torch.cat([batch.prompt_mask, torch.ones_like(noisy)], 1)  # [N, P+Lc]
    pos = padding_positions(attn)
    shift = tr.logits_shift
    if tr.attention == "block_causal":
        bid = block_ids(attn, P, tr.block_size)  # [N, P+Lc]
        ids = torch.cat([prompt, batch.completion_ids, noisy], 1)  # [N, P+2Lc]: clean stream | noisy stream
        mask = two_stream_mask(bid, bid[:, P:])
        pos = torch.cat([pos, pos[:, P:]], 1)
        lo = P + Lc
    else:
        ids, mask, lo = torch.cat([prompt, noisy], 1), attn, P
    head = fused_head(model, tr, ids) if order is None else None
    if head is not None:  # CUDA: log-probs straight from the final hidden states, no [N, Lc, V] logits
        out = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            logits_range=(lo - shift, lo - shift),  # no logits
            output_hidden_states="last",
        )
        targets = batch.completion_ids if targets_k is None else targets_k
        return head_logprobs(out.hidden_states[-1][:, lo - shift : lo + Lc - shift], head, targets, tr, temperature)
    out = model(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        logits_range=(lo - shift, lo + Lc - shift),
        output_hidden_states=order == "policy",
    )
    logits = out.logits  # [N, Lc, V]
    if order == "policy":
        scores = (
            stats_from_logits(logits, completion_mask_k, mask_id),
            out.hidden_states[-1][:, lo - shift : lo + Lc - shift],
        )
    else:
        scores = None if order is None else model_order_scores(logits, mask_id, order)
    if temperature != 1.0:
        logits = logits / temperature
    lp = token_logprobs(logits, batch.completion_ids if targets_k is None else targets_k, mask_id)  # [N, Lc]
    return lp if order is None else (lp, scores)


def fused_head(model, tr: ModelTraits, like: torch.Tensor):
    """(weight [V, D], bias [V] | None, logit scale) of the LM head when `view_logprobs` takes per-token
    log-probs from the final hidden states through kernels.linear_token_logprobs (liger-kernel's fused linear
    cross-entropy: the [n, V] logits exist one chunk at a time, in forward and backward alike); else None.

    That is on CUDA (kernels.use_fast_path, so DLLM_RL_KERNELS=0 turns it off) for a native model (its forward
    returns the final-norm hidden states: models.base traits().static_shapes) whose head is a plain linear
    layer or tied embedding (not adapted by LoRA, not partitioned by ZeRO-3). Elsewhere, on CPU included, the
    logits path runs as before."""
    if not (use_fast_path(like) and tr.static_shapes):
        return None
    base = unwrap(model)
    head = base.get_output_embeddings()
    if type(head) not in (nn.Linear, nn.Embedding) or hasattr(head.weight, "ds_id"):
        return None
    scale = math.sqrt(base.config.d_model) if getattr(base.config, "scale_logits", False) else 1.0  # LLaDA's option
    return head.weight, getattr(head, "bias", None), scale


def head_logprobs(h: torch.Tensor, head, targets: torch.Tensor, tr: ModelTraits, temperature: float = 1.0):
    """log p(target) [N, Lc] from the final hidden states h [N, Lc, D] and `fused_head`'s (weight, bias, scale):
    what `token_logprobs` computes from logits = (h W^T + b) / scale, [MASK] excluded, at `temperature`."""
    N, Lc, D = h.shape
    weight, bias, scale = head
    flat = linear_token_logprobs(
        h.reshape(N * Lc, D), weight, targets.reshape(-1), bias, tr.mask_token_id, temperature * scale
    )
    return flat.view(N, Lc)


def two_stream_mask(clean_bid: torch.Tensor, noisy_bid: torch.Tensor) -> torch.Tensor:
    """[N, 1, L+Lc, L+Lc] bool mask for [clean (L) | noisy completion (Lc)] under block-causal attention.

    Clean queries of block b see clean keys of blocks <= b. Noisy queries of block b see clean keys of
    blocks < b and noisy keys of block b. Padding (-1) is never seen.
    """
    cq = clean_bid[:, :, None]  # [N, L, 1]
    nq = noisy_bid[:, :, None]  # [N, Lc, 1]
    ck, nk = clean_bid[:, None, :], noisy_bid[:, None, :]
    clean_to_clean = (ck >= 0) & (ck <= cq.clamp(min=0))
    clean_to_noisy = torch.zeros(cq.shape[0], cq.shape[1], nk.shape[2], dtype=torch.bool, device=cq.device)
    noisy_to_clean = (ck >= 0) & (ck < nq)
    noisy_to_noisy = nk == nq
    top = torch.cat([clean_to_clean, clean_to_noisy], 2)
    bottom = torch.cat([noisy_to_clean, noisy_to_noisy], 2)
    mask = torch.cat([top, bottom], 1)  # [N, L+Lc, L+Lc]
    eye = torch.eye(mask.shape[1], dtype=torch.bool, device=mask.device)
    mask = mask | (~mask.any(-1, keepdim=True) & eye)  # padding queries see themselves (no NaN rows)
    return mask[:, None]


def each_view(model, batch, noise: Noise, tr: ModelTraits, temperature: float = 1.0, order: str | None = None):
    """Yield (k, log p(completion | view k) [N, Lc]) for every view that scores something; with `order`,
    (k, (log-probs, ordering scores)) as view_logprobs returns them.

    With gradients enabled and several views, each view's forward runs under activation checkpointing:
    its activations are recomputed during backward, so a K-view estimate (trajectory: one view per step)
    holds one view's activations at a time instead of K, at the cost of one extra forward per view.
    """
    checkpointed = torch.is_grad_enabled() and noise.num_views > 1
    for k in range(noise.num_views):
        if not noise.weights[k].any():
            continue
        pm = None if noise.prompt_masks is None else noise.prompt_masks[k]
        tk = None if noise.tokens is None else noise.tokens[k]
        tg = None if noise.targets is None else noise.targets[k]
        args = (model, batch, noise.completion_masks[k], pm, tr, temperature, tk, order, tg)
        if checkpointed:
            yield k, torch.utils.checkpoint.checkpoint(view_logprobs, *args, use_reentrant=False)
        else:
            yield k, view_logprobs(*args)


def score(model, batch, noise: Noise, tr: ModelTraits, temperature: float = 1.0) -> torch.Tensor:
    """The weighted estimate sum_k w[k] * log p(x | view k): [N, Lc] (gradients flow into the model)."""
    total = None
    for k, lp in each_view(model, batch, noise, tr, temperature):
        term = torch.where(noise.weights[k] != 0, lp * noise.weights[k], torch.zeros_like(lp))
        total = term if total is None else total + term
    if total is None:
        total = torch.zeros(noise.weights.shape[1:], device=batch.completion_ids.device)
    return total
