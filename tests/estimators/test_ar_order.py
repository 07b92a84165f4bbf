"""The AR-order likelihood (JustGRPO, arXiv 2601.15165): the product of left-to-right conditionals, each
computed here one token per forward from scratch; and, on a rollout decoded left to right one token per step,
the rollout's own probability (the trace's log-probs and the trajectory estimator's value)."""

from __future__ import annotations

import pytest
import torch

import dllm_rl.models as M
from dllm_rl import estimators as E
from dllm_rl.batches import SequenceBatch
from dllm_rl.config import EstimatorConfig, RolloutConfig
from dllm_rl.models.base import traits
from dllm_rl.rollout import generate

VOCAB = 12


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(tokenizer, attention="bidirectional", block_size=4, seed=0):
    """A random tiny MDM with weights large enough that its conditionals differ from position to position."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = M.TinyMDMConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            attention=attention,
            block_size=block_size,
            max_position_embeddings=64,
            mask_token_id=tokenizer.mask_token_id,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = M.TinyMDM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return model.eval()


def ar_order(model, k=1):
    return E.ESTIMATORS["ar_order"](EstimatorConfig(name="ar_order", merge_steps=k), traits(model))


def estimate(est, model, batch):
    with torch.no_grad():
        return est.estimate(model, batch, est.draw(batch)).logps


@torch.no_grad()
def left_to_right_by_hand(model, prompt: list[int], completion: list[int], reveal: int = 1) -> torch.Tensor:
    """log p(x_i | prompt, x_<j, [MASK] from j on) with j = i rounded down to a multiple of `reveal`, one
    forward per token, written from scratch: the row's own prompt (no padding), a plain forward with the
    block-causal mask built here (prompt = block 0, completion offset j in block 1 + j // block_size), the
    [MASK] column dropped before the softmax. [Lc] float64."""
    mask_id, P, Lc = model.config.mask_token_id, len(prompt), len(completion)
    out = torch.zeros(Lc, dtype=torch.float64)
    for i in range(Lc):
        j = i // reveal * reveal
        ids = torch.tensor([prompt + completion[:j] + [mask_id] * (Lc - j)])
        attn = None
        if model.config.attention == "block_causal":
            blk = torch.tensor([0] * P + [1 + c // model.config.block_size for c in range(Lc)])
            attn = (blk[None, :] <= blk[:, None])[None, None]
        logits = model(input_ids=ids, attention_mask=attn).logits[0, P + i].double()
        keep = [v for v in range(logits.shape[-1]) if v != mask_id]
        target = completion[i] - (completion[i] > mask_id)
        out[i] = logits[keep].log_softmax(-1)[target]
    return out


def padded_batch(prompts, completions, lengths) -> SequenceBatch:
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    pm = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, P - len(p) :] = torch.tensor(p)
        pm[r, P - len(p) :] = 1
    comp = torch.tensor(completions)
    cm = (torch.arange(comp.shape[1])[None] < torch.tensor(lengths)[:, None]).long()
    return SequenceBatch(ids, pm, comp, cm)


PROMPTS = [[5, 7, 4], [9, 6], [8, 3, 3, 10, 11]]


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_equals_the_product_of_left_to_right_conditionals(tokenizer, attention):
    """Per token (hence their product) the estimate is the conditional given the prefix and masks after it,
    for left-padded prompts of different lengths and a completion that stops early (not scored after)."""
    model = build(tokenizer, attention)
    g = torch.Generator().manual_seed(1)
    Lc = 10
    comps = torch.randint(3, VOCAB, (len(PROMPTS), Lc), generator=g).tolist()
    lengths = [10, 7, 10]
    batch = padded_batch(PROMPTS, comps, lengths)
    est = ar_order(model)
    noise = est.draw(batch)
    # views = forwards: one per token for a bidirectional model, one per block offset for a block-causal one
    assert noise.num_views == (Lc if attention == "bidirectional" else 4)
    logps = estimate(est, model, batch)
    for r, (p, c, n) in enumerate(zip(PROMPTS, comps, lengths)):
        ref = left_to_right_by_hand(model, p, c)
        assert torch.allclose(logps[r, :n].double(), ref[:n], atol=2e-5, rtol=0), (r, logps[r, :n], ref[:n])
        assert (logps[r, n:] == 0).all()
        assert abs(logps[r].sum().item() - ref[:n].sum().item()) < 1e-4  # the sequence log-likelihood


def test_k_tokens_per_view_is_another_factorisation(tokenizer):
    """merge_steps=k reveals k tokens per view: the exact likelihood of a k-leftmost-per-step sampler, and
    not the per-token one (a surrogate for it) on a bidirectional model."""
    model = build(tokenizer)
    g = torch.Generator().manual_seed(2)
    comps = torch.randint(3, VOCAB, (len(PROMPTS), 8), generator=g).tolist()
    batch = padded_batch(PROMPTS, comps, [8, 8, 8])
    two, one = estimate(ar_order(model, 2), model, batch), estimate(ar_order(model), model, batch)
    assert ar_order(model, 2).draw(batch).num_views == 4
    for r, (p, c) in enumerate(zip(PROMPTS, comps)):
        assert torch.allclose(two[r].double(), left_to_right_by_hand(model, p, c, reveal=2), atol=2e-5, rtol=0)
    assert (two - one).abs().max() > 1e-3


def _rollout(model, tokenizer, Lc, steps, block_length):
    cfg = RolloutConfig(
        max_completion_length=Lc,
        steps=steps,
        block_length=block_length,
        temperature=0.8,
        order="left_to_right",
    )
    return generate(model, tokenizer, [[5, 7, 4], [9, 6], [5, 7, 4], [8]], cfg, torch.Generator().manual_seed(0))


@pytest.mark.parametrize(
    "attention,block_length,k",
    [
        ("bidirectional", 1, 1),  # JustGRPO's sampler: one-token blocks
        ("bidirectional", 12, 1),  # one block, left_to_right order, one token per step: the same canvases
        ("bidirectional", 12, 2),  # two leftmost tokens per step: exact with merge_steps=2
        ("block_causal", 4, 1),
        ("block_causal", 1, 1),
    ],
)
def test_on_a_left_to_right_rollout_it_is_the_rollout_probability(tokenizer, attention, block_length, k):
    """Decoded left to right, k tokens per step, the rollout's log-probability (the trace's per-token
    sampler log-probs at its temperature) is the AR-order estimate with merge_steps=k, and for k = 1 also the
    trajectory estimator's (TraceRL's replay) value."""
    model = build(tokenizer, attention)
    Lc = 12
    batch = _rollout(model, tokenizer, Lc, Lc // k, block_length)
    trace = batch.trace
    scored = trace.commit_step >= 0  # every sampled position, the first EOS and what was sampled after it
    assert scored.sum() >= 12
    est = estimate(ar_order(model, k), model, batch)
    assert torch.allclose(est[scored], trace.token_logprob[scored], atol=1e-5, rtol=0)
    assert (est[~scored] == 0).all()
    assert not ar_order(model, k).check(trace.decoding)  # on-policy: no note
    if k == 1 and not (attention == "block_causal" and block_length != 4):  # trajectory needs rollout block = model's
        traj = E.ESTIMATORS["trajectory"](EstimatorConfig(name="trajectory"), traits(model))
        assert torch.allclose(est, estimate(traj, model, batch), atol=1e-5, rtol=0)


@pytest.mark.parametrize("order,order_temperature", [("top_prob", 0.0), ("left_to_right", 0.5)])
def test_another_order_is_flagged_off_policy(tokenizer, order, order_temperature):
    """Another order, or left to right sampled (a Plackett-Luce order over it, not left to right)."""
    model = build(tokenizer)
    cfg = RolloutConfig(
        max_completion_length=8, steps=8, temperature=0.8, order=order, order_temperature=order_temperature
    )
    batch = generate(model, tokenizer, [[5, 7, 4]], cfg, torch.Generator().manual_seed(0))
    notes = ar_order(model).check(batch.trace.decoding)
    assert len(notes) == 1 and "off-policy" in notes[0] and f"rollout.order={order}" in notes[0]


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
@pytest.mark.parametrize("k", [1, 3])
def test_views_count_the_forwards_draw_builds_whatever_the_steps(tokenizer, attention, k):
    """Estimator.views (what the memory planner reports) is the number of views draw builds: one per k reveal
    indices of the completion (bidirectional) or of a block (block-causal), not one per k rollout steps, even
    when the rollout took fewer steps than the completion has positions."""
    model = build(tokenizer, attention)
    Lc = 10
    comps = torch.randint(3, VOCAB, (len(PROMPTS), Lc), generator=torch.Generator().manual_seed(3)).tolist()
    batch = padded_batch(PROMPTS, comps, [Lc] * len(PROMPTS))
    est = ar_order(model, k)
    built = est.draw(batch).num_views
    assert built == -(-(Lc if attention == "bidirectional" else 4) // k)
    for steps in (2, 5, Lc):
        assert est.views(steps, Lc) == built, steps
