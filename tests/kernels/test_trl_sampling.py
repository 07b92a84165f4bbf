"""min_p and repetition_penalty (TRL's sampling options) in the torch sampler, against transformers' own
MinPLogitsWarper and RepetitionPenaltyLogitsProcessor (what TRL's generation uses), and in the rollout engine."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from dllm_rl.config import RolloutConfig
from dllm_rl.kernels import choose_tokens
from dllm_rl.kernels.sampling import sampling_logprobs
from dllm_rl.rollout import generate

V = 40


@pytest.mark.parametrize("min_p", [0.05, 0.3, 0.9])
def test_min_p_keeps_what_transformers_min_p_keeps(min_p):
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(1)) * 3
    ours = sampling_logprobs(logits, temperature=0.7, min_p=min_p)
    warped = MinPLogitsWarper(min_p)(None, logits / 0.7)
    torch.testing.assert_close(ours, warped.log_softmax(-1))


def test_top_k_top_p_and_min_p_together_filter_in_transformers_order():
    # p = [0.5, 0.2, 10 x 0.03]: top-p 0.65 keeps the first two; min-p 0.3 of the kept two's max keeps both. Min-p
    # first (0.3 x 0.5 drops the 0.03s, the two left renormalise to 0.71 / 0.29) would leave top-p only the first
    probs = torch.tensor([[0.5, 0.2] + [0.03] * 10])
    logits = probs.log()
    ours = sampling_logprobs(logits, temperature=1.0, top_p=0.65, min_p=0.3)
    assert torch.isfinite(ours[0]).tolist() == [True, True] + [False] * 10
    logits = torch.randn(6, V, generator=torch.Generator().manual_seed(4)) * 3
    for k, p, m in [(0, 0.9, 0.2), (10, 0.8, 0.1), (25, 0.95, 0.5)]:
        z = logits / 0.7
        if k:
            z = TopKLogitsWarper(k)(None, z)
        warped = MinPLogitsWarper(m)(None, TopPLogitsWarper(p)(None, z))
        torch.testing.assert_close(sampling_logprobs(logits, 0.7, k, p, min_p=m), warped.log_softmax(-1))


@pytest.mark.parametrize(
    "probs,top_p",
    [
        ([0.5, 0.25, 0.125, 0.0625, 0.0625], 0.5),
        ([0.5, 0.25, 0.125, 0.0625, 0.0625], 0.75),
        ([0.5, 0.25, 0.125, 0.0625, 0.0625], 0.875),
        ([0.25, 0.75, 0.0, 0.0], 0.75),
    ],
)
def test_top_p_on_an_exact_boundary_keeps_what_transformers_keeps(probs, top_p):
    """A prefix whose mass is exactly top_p is the nucleus: the next token is dropped, as transformers'
    TopPLogitsWarper drops it (binary fractions, so the sums are exact; no tie straddles the boundary, where the
    two break ties differently)."""
    logits = torch.tensor([probs]).log().clamp(min=-30.0)
    kept = torch.isfinite(sampling_logprobs(logits, 1.0, top_p=top_p))
    assert kept.tolist() == torch.isfinite(TopPLogitsWarper(top_p)(None, logits.clone())).tolist()


def test_greedy_ties_go_to_the_first_maximum():
    """Exact ties for the largest logit (common in bf16) resolve to the lowest index, as the Triton kernel
    resolves them, so a greedy decode does not depend on which path ran."""
    logits = torch.full((3, 50), -1.0)
    logits[0, [3, 40]] = 2.0
    logits[1, [5, 6, 7]] = 1.0
    logits[2, [0, 49]] = 0.5
    assert choose_tokens(logits, torch.full((3,), 0.5), 0.0).token.tolist() == [3, 5, 0]


def test_repetition_penalty_matches_transformers_processor():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(5, V, generator=g) * 2
    context = torch.randint(0, V, (5, 7), generator=g)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(context, logits.clone())
    u = torch.full((5,), 0.5)
    greedy = choose_tokens(logits, u, 0.0, repetition_penalty=1.7, context=context)
    assert greedy.token.tolist() == expected.argmax(-1).tolist()
    sampled = choose_tokens(logits, u, 1.0, repetition_penalty=1.7, context=context)
    torch.testing.assert_close(sampled.logprob, expected.log_softmax(-1).gather(-1, sampled.token[:, None])[:, 0])
    padded = torch.cat([context, torch.full((5, 3), -1)], 1)  # -1: no token (padding, masked positions)
    assert choose_tokens(logits, u, 0.0, repetition_penalty=1.7, context=padded).token.tolist() == greedy.token.tolist()


def test_repetition_penalty_reaches_token_0_beside_padding():
    """-1 entries (padding, still-masked positions) are no token: token 0 in the context is penalised as any other,
    and absent from it is left alone, exactly as transformers' processor does on the context without the -1s."""
    from dllm_rl.kernels.sampling import penalize_repetition

    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0], [2.0, 1.0, 0.5, -1.0]])
    context = torch.tensor([[0, 2, -1, -1], [-1, 3, 2, -1]])
    expected = [
        RepetitionPenaltyLogitsProcessor(2.0)(c[c >= 0][None], z[None].clone())[0] for c, z in zip(context, logits)
    ]
    torch.testing.assert_close(penalize_repetition(logits, context, 2.0), torch.stack(expected), rtol=0, atol=0)
    assert penalize_repetition(logits, context, 2.0)[0, 0] == 1.0  # 2.0 / 2: token 0 was written, so penalised


def test_a_strong_repetition_penalty_keeps_a_greedy_rollout_from_repeating(tokenizer, model_factory):
    """One token per step, greedy: a token already in the prompt or on the canvas has its logit divided by 1e6
    (to ~0) or multiplied by it (to -huge), below any unseen token with a positive logit, which this random
    model always has: no token repeats and none is copied from the prompt. Without the penalty, tokens repeat."""
    model = model_factory(hidden=32, seed=3)
    prompts = ["aaaa", "abcabc"]
    cfg = RolloutConfig(max_completion_length=8, steps=8, temperature=0.0, stop_at_eos=False)
    plain = generate(model, tokenizer, prompts, cfg, generator=torch.Generator().manual_seed(0))
    strong = RolloutConfig(**{**cfg.__dict__, "repetition_penalty": 1e6})
    out = generate(model, tokenizer, prompts, strong, generator=torch.Generator().manual_seed(0))
    for prompt, ids in zip(prompts, out.completion_ids.tolist()):
        seen = set(tokenizer(prompt).input_ids)
        assert len(set(ids)) == len(ids) and not seen & set(ids), (prompt, ids)
    assert any(len(set(r)) < len(r) for r in plain.completion_ids.tolist())  # without it, the model repeats
