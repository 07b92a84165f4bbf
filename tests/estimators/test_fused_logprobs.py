"""The estimators' fused log-prob path (estimators.base.fused_head / head_logprobs): on CUDA, per-token log-probs
come from the final hidden states through kernels.linear_token_logprobs instead of [N, Lc, V] logits. On CPU
the logits path runs as before; with the dispatch forced on CPU (linear_token_logprobs then takes its chunked
torch path) the fused branch gives the logits path's values and gradients."""

from types import SimpleNamespace

import pytest
import torch

from dllm_rl.estimators import base
from dllm_rl.models.base import traits
from dllm_rl.models.load import apply_lora


def _batch(tokenizer, N=3, P=5, Lc=8, seed=0):
    """A batch (prompt_ids, prompt_mask, completion_ids) and one view's completion mask [N, Lc]."""
    g = torch.Generator().manual_seed(seed)
    V = len(tokenizer)
    prompt_mask = torch.ones(N, P, dtype=torch.long)
    prompt_mask[0, :2] = 0  # a left-padded prompt
    batch = SimpleNamespace(
        prompt_ids=torch.randint(4, V - 4, (N, P), generator=g),
        prompt_mask=prompt_mask,
        completion_ids=torch.randint(4, V - 4, (N, Lc), generator=g),
    )
    return batch, torch.rand(N, Lc, generator=g) < 0.5


def test_cpu_keeps_the_logits_path(model_factory, tokenizer):
    m = model_factory()
    assert base.fused_head(m, traits(m, tokenizer), torch.zeros(1)) is None


@pytest.mark.parametrize(
    "attention,shift,temperature,retargeted",
    [
        ("bidirectional", 0, 1.0, False),
        ("block_causal", 0, 0.7, False),
        ("bidirectional", 1, 0.9, False),
        ("bidirectional", 0, 0.8, True),  # self-correction: tokens taken back are scored as they were committed
    ],
)
def test_fused_branch_matches_the_logits_path(
    model_factory, tokenizer, monkeypatch, attention, shift, temperature, retargeted
):
    m = model_factory(attention=attention, block_size=4).train()
    m.config.logits_shift = shift  # a Dream-style model: logits[i - 1] predicts token i
    tr = traits(m, tokenizer)
    batch, masked = _batch(tokenizer)
    args = (m, batch, masked, None, tr, temperature)
    targets = _batch(tokenizer, seed=1)[0].completion_ids if retargeted else None

    def run(fused: bool):
        monkeypatch.setattr(base, "use_fast_path", lambda t: fused)
        m.zero_grad()
        lp = base.view_logprobs(*args, targets_k=targets)
        (lp * torch.linspace(-1, 1, lp.numel()).view_as(lp)).sum().backward()
        return lp.detach(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    lp, grads = run(False)
    lp_f, grads_f = run(True)
    torch.testing.assert_close(lp_f, lp, atol=1e-5, rtol=1e-5)
    assert grads.keys() == grads_f.keys()
    for name in grads:
        torch.testing.assert_close(grads_f[name], grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_an_adapted_head_keeps_the_logits_path(model_factory, tokenizer, monkeypatch):
    """A LoRA on the LM head changes the head's maths: the fused kernel (plain weight and bias) does not apply."""
    from dllm_rl.config import LoraConfig, ModelConfig

    monkeypatch.setattr(base, "use_fast_path", lambda t: True)
    m = model_factory()
    assert base.fused_head(m, traits(m, tokenizer), torch.zeros(1)) is not None
    cfg = ModelConfig(lora=LoraConfig(r=4, target_modules=["lm_head", "q_proj"]))
    adapted = apply_lora(m, cfg)
    assert base.fused_head(adapted, traits(adapted, tokenizer), torch.zeros(1)) is None
