"""The rollout engine: exactness against the reference sampler, caches, trace replay, batch invariance,
commit rules, statistics of temperature sampling, and the errors a user can hit."""

import math

import pytest
import torch
from conftest import small_native

from dllm_rl import counter_rng as noise
from dllm_rl.batches import FILL, REMASK
from dllm_rl.config import RolloutConfig
from dllm_rl.errors import ConfigError, DllmRlError
from dllm_rl.rollout import generate
from dllm_rl.rollout.engine import encode_prompts
from dllm_rl.rollout.reference import reference_generate

PROMPTS = ["hi", "a longer prompt here", [{"role": "user", "content": "12_4\n__3_"}], "x"]


def run(model, tok, cfg, prompts=PROMPTS, seed=0, **kw):
    return generate(model, tok, prompts, cfg, torch.Generator().manual_seed(seed), **kw)


@pytest.mark.parametrize(
    "attention,cache", [("bidirectional", "none"), ("block_causal", "none"), ("block_causal", "block")]
)
@pytest.mark.parametrize("steps", [16, 8])  # k = 1 and k = 2 tokens per step
def test_matches_reference_sampler(model_factory, tokenizer, attention, cache, steps):
    m = model_factory(attention=attention, block_size=4)
    cfg = RolloutConfig(max_completion_length=16, steps=steps, block_length=8, cache=cache, stop_at_eos=False)
    out = run(m, tokenizer, cfg)
    ref = reference_generate(
        m,
        encode_prompts(tokenizer, PROMPTS),
        16,
        steps,
        8,
        tokenizer.mask_token_id,
        4 if attention == "block_causal" else None,
    )
    assert torch.equal(out.completion_ids, ref)
    assert out.stats["forwards"] == steps


def test_block_cache_forwards_less(model_factory, tokenizer):
    m = model_factory(attention="block_causal", block_size=4)
    base = RolloutConfig(max_completion_length=16, steps=16, block_length=4, stop_at_eos=False)
    full = run(m, tokenizer, base)
    cached = run(m, tokenizer, RolloutConfig(**{**base.__dict__, "cache": "block"}))
    assert torch.equal(full.completion_ids, cached.completion_ids)
    assert cached.stats["query_tokens"] < full.stats["query_tokens"] / 2


def test_approximate_caches_differ_on_bidirectional_models(model_factory, tokenizer):
    """Prefix/dual caches reuse stale keys within a block: exact for block-causal models, not for
    bidirectional ones. Show where: the logits of later steps in a block differ from a full forward."""
    bi = model_factory(attention="bidirectional", seed=3)
    bc = model_factory(attention="block_causal", block_size=8, seed=3)
    base = dict(max_completion_length=16, steps=16, block_length=8, stop_at_eos=False)
    for cache in ("prefix", "dual"):
        for m, exact in ((bi, False), (bc, True)):
            ref = run(m, tokenizer, RolloutConfig(**base))
            out = run(m, tokenizer, RolloutConfig(**base, cache=cache))
            # the first step of each block follows a full refresh, so it always agrees
            first = out.trace.commit_step.view(len(PROMPTS), 2, 8).min(-1).values
            ref_first = ref.trace.commit_step.view(len(PROMPTS), 2, 8).min(-1).values
            assert torch.equal(first, ref_first)
            if exact:
                assert torch.equal(out.completion_ids, ref.completion_ids)
                assert torch.allclose(out.trace.token_logprob, ref.trace.token_logprob, atol=1e-5)
            else:  # stale keys change the later steps' log-probs (and usually the tokens)
                assert not torch.allclose(out.trace.token_logprob, ref.trace.token_logprob, atol=1e-4)


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"self_correction": True, "correction_threshold": 0.3},
        {"order": "random", "order_temperature": 1.0},
        {"commit": "threshold", "threshold": 0.02},
    ],
)
def test_trace_replays_every_state(model_factory, tokenizer, extra):
    m = model_factory()
    cfg = RolloutConfig(max_completion_length=12, steps=6, block_length=6, temperature=1.0, **extra)
    out = run(m, tokenizer, cfg, record_states=True)
    for row in range(len(PROMPTS)):
        replayed = out.trace.replay(row)
        recorded = out.stats["states"][row]
        assert len(replayed) == len(recorded) == int(out.trace.num_steps[row])
        for a, b in zip(replayed, recorded):
            assert torch.equal(a, b)
        assert torch.equal(replayed[-1], out.completion_ids[row].cpu())
    if extra.get("self_correction"):
        assert (out.trace.events[:, 4] == REMASK).any()
    if extra.get("order_temperature"):
        assert (out.trace.order_logprob < 0).any()  # sampled orders carry their Plackett-Luce log-prob


def test_trace_records_sampler_logprobs(model_factory, tokenizer):
    m = model_factory()
    cfg = RolloutConfig(max_completion_length=8, steps=8, temperature=0.7, stop_at_eos=False)
    out = run(m, tokenizer, cfg, record_states=True)
    ids = encode_prompts(tokenizer, PROMPTS)
    for row in range(len(PROMPTS)):  # recompute each committed token's log-prob from its replayed state
        states = [torch.full((8,), tokenizer.mask_token_id)] + out.trace.replay(row)
        for pos in range(8):
            s = int(out.trace.commit_step[row, pos])
            x = torch.tensor([ids[row] + states[s].tolist()])
            logits = m(x).logits[0, len(ids[row]) + pos].float()
            logits[tokenizer.mask_token_id] = float("-inf")
            expected = (logits / 0.7).log_softmax(-1)[out.completion_ids[row, pos]]
            assert abs(float(expected) - float(out.trace.token_logprob[row, pos])) < 1e-4


def test_batch_invariance(model_factory, tokenizer):
    m = model_factory()
    cfg = RolloutConfig(max_completion_length=12, steps=6, block_length=6, temperature=1.0, order="random", top_p=0.9)
    alone = run(m, tokenizer, cfg, prompts=[PROMPTS[2]], seed=5)
    crowd = run(m, tokenizer, cfg, prompts=["zzz" * 5, PROMPTS[0], PROMPTS[2], PROMPTS[1]], seed=5)
    assert crowd.completions[2] == alone.completions[0]
    assert torch.equal(crowd.completion_ids[2], alone.completion_ids[0])
    # copies of one prompt (a GRPO group) get different samples, in any batch
    group = run(m, tokenizer, cfg, prompts=[PROMPTS[2]] * 4, seed=5)
    assert group.completions[0] == alone.completions[0]
    assert len(set(group.completions)) > 1


def test_reproducible_from_the_generator_only(model_factory, tokenizer):
    m = model_factory()
    cfg = RolloutConfig(max_completion_length=8, steps=4, temperature=1.0)
    torch.manual_seed(123)  # global RNG state must not matter
    a = run(m, tokenizer, cfg, seed=7)
    torch.manual_seed(456)
    b = run(m, tokenizer, cfg, seed=7)
    c = run(m, tokenizer, cfg, seed=8)
    assert a.completions == b.completions and a.completions != c.completions


def test_temperature_sampling_matches_model_distribution(tokenizer, model_factory):
    """Chi-square: one masked position decoded many times vs softmax(logits / T) without [MASK]."""
    m = model_factory(hidden=16, layers=1, vocab=12, seed=1)
    with torch.no_grad():
        m.lm_head.weight.mul_(40)  # a spread-out but non-uniform distribution over 12 tokens
    prompt = [5, 6, 7]
    n, T = 6000, 0.8
    cfg = RolloutConfig(max_completion_length=1, steps=1, temperature=T, stop_at_eos=False)
    out = generate(m, tokenizer, [prompt] * n, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = m(torch.tensor([prompt + [tokenizer.mask_token_id]])).logits[0, -1].float()
    logits[tokenizer.mask_token_id] = float("-inf")
    p = (logits / T).softmax(-1)
    counts = torch.bincount(out.completion_ids[:, 0], minlength=12).float()
    keep = p * n >= 5
    expected = p[keep] * n
    chi2 = float(((counts[keep] - expected) ** 2 / expected).sum())
    dof = int(keep.sum()) - 1
    assert counts[tokenizer.mask_token_id] == 0
    assert chi2 < dof + 4 * math.sqrt(2 * dof) + 10, (chi2, dof)  # far in the tail if sampling were wrong
    # top-k keeps only the k most likely tokens
    out = generate(
        m, tokenizer, [prompt] * 500, RolloutConfig(**{**cfg.__dict__, "top_k": 2}), torch.Generator().manual_seed(1)
    )
    assert set(out.completion_ids[:, 0].tolist()) <= set(p.topk(2).indices.tolist())


def test_uniform_noise_is_uniform():
    seeds = noise.row_seeds([[i] for i in range(200)], torch.Generator().manual_seed(0))
    u = noise.uniform(seeds, torch.zeros(200, dtype=torch.long), torch.arange(100).expand(200, 100), 1)
    assert (u > 0).all() and (u < 1).all()
    hist = torch.histc(u.float(), bins=10, min=0, max=1)
    assert (hist - 2000).abs().max() < 200  # 20000 draws, 10 bins: sd ~ 42
    assert abs(float(torch.corrcoef(torch.stack([u[:, :-1].flatten(), u[:, 1:].flatten()]))[0, 1])) < 0.03


def _commit_counts(out, rows):
    steps = out.trace.commit_step
    return [torch.bincount(steps[r][steps[r] >= 0]).tolist() for r in rows]


def test_commit_rules(model_factory, tokenizer):
    m = model_factory()
    base = dict(max_completion_length=12, steps=4, block_length=12, stop_at_eos=False)
    # top_k: LLaDA's even split, 12 tokens over 4 steps
    out = run(m, tokenizer, RolloutConfig(**base))
    assert all(c == [3, 3, 3, 3] for c in _commit_counts(out, range(4)))
    # threshold: a random model is never confident, so exactly one token per step; tau=0 commits all at once
    out = run(m, tokenizer, RolloutConfig(**base, commit="threshold", threshold=0.99))
    assert int(out.trace.num_steps.max()) == 12
    out = run(m, tokenizer, RolloutConfig(**base, commit="threshold", threshold=0.0))
    assert int(out.trace.num_steps.max()) == 1
    out = run(m, tokenizer, RolloutConfig(**base, commit="factor", factor=100.0))
    assert int(out.trace.num_steps.max()) == 1
    # prophet: a gap schedule of 0 commits everything at the first step; an impossible one never early-commits
    out = run(m, tokenizer, RolloutConfig(**base, commit="prophet", prophet_gaps=[0.0, 0.0, 0.0]))
    assert int(out.trace.num_steps.max()) == 1
    out = run(m, tokenizer, RolloutConfig(**base, commit="prophet", prophet_gaps=[1e9, 1e9, 1e9]))
    assert all(c == [3, 3, 3, 3] for c in _commit_counts(out, range(4)))


def test_left_to_right_order(model_factory, tokenizer):
    m = model_factory()
    out = run(m, tokenizer, RolloutConfig(max_completion_length=8, steps=8, order="left_to_right", stop_at_eos=False))
    assert torch.equal(out.trace.commit_step, torch.arange(8).expand(len(PROMPTS), 8))


def test_top_prob_order_is_low_confidence_when_greedy(model_factory, tokenizer):
    """top_prob ranks positions by the most likely token's probability: greedy, the same decode as LLaDA's
    low_confidence; sampling, a different order (the sampled token no longer picks its position)."""
    m = model_factory(seed=2)
    base = dict(max_completion_length=16, steps=16, block_length=8, stop_at_eos=False)
    lc = run(m, tokenizer, RolloutConfig(**base))
    top = run(m, tokenizer, RolloutConfig(**base, order="top_prob"))
    assert torch.equal(top.completion_ids, lc.completion_ids) and torch.equal(
        top.trace.commit_step, lc.trace.commit_step
    )
    lc = run(m, tokenizer, RolloutConfig(**base, temperature=1.0))
    top = run(m, tokenizer, RolloutConfig(**base, temperature=1.0, order="top_prob"))
    assert not torch.equal(top.trace.commit_step, lc.trace.commit_step)


def test_rows_stop_at_eos_and_cost_nothing_after(model_factory, tokenizer):
    m = model_factory()
    with torch.no_grad():  # make EOS the overwhelming prediction everywhere
        m.lm_head.weight[tokenizer.eos_token_id] += 100 * m.norm.weight.sign()
    cfg = RolloutConfig(max_completion_length=16, steps=16, block_length=4)
    out = run(m, tokenizer, cfg)
    assert (out.trace.num_steps == 4).all()  # one block, then stopped
    assert out.stats["forwards"] == 4
    assert (out.trace.events[:, 4] == FILL).sum() == len(PROMPTS) * 12
    assert (out.completion_mask.sum(-1) == 1).all() and out.completions == [""] * len(PROMPTS)


@pytest.mark.parametrize("attention,cache", [("block_causal", "block"), ("bidirectional", "dual")])
def test_compiled_sampler_matches_eager(model_factory, tokenizer, attention, cache):
    """rollout.compile runs the same model through torch.compile (dynamic shapes, static KV cache): the same
    completions and trace log-probs as eager, prompts of different lengths and several blocks (so the KV
    length changes under one graph); the wrapper is built once per model and sees weight updates."""
    from torch._dynamo.utils import counters

    from dllm_rl.rollout.engine import _COMPILED

    m = model_factory(attention=attention, block_size=4, seed=5)
    base = dict(max_completion_length=16, steps=16, block_length=4, cache=cache, stop_at_eos=False, temperature=1.0)
    counters.clear()
    compiled_frames = []
    for _ in range(2):
        eager = run(m, tokenizer, RolloutConfig(**base), seed=7)
        compiled = run(m, tokenizer, RolloutConfig(**base, compile="default"), seed=7)
        assert torch.equal(compiled.completion_ids, eager.completion_ids)
        assert torch.equal(compiled.trace.commit_step, eager.trace.commit_step)
        torch.testing.assert_close(compiled.trace.token_logprob, eager.trace.token_logprob, atol=1e-4, rtol=0)
        compiled_frames.append(counters["frames"]["ok"])
        with torch.no_grad():  # a training update: the compiled wrapper must decode with the new weights
            m.lm_head.weight.add_(0.5 * torch.randn_like(m.lm_head.weight))
    assert _COMPILED["default"][0] is m  # one wrapper, built for this model, reused by both decodes
    # dynamo compiled the model call (not a silent eager fallback), and a second decode with a fresh cache
    # and new weights reused the graphs instead of recompiling
    assert compiled_frames[0] >= 1 and compiled_frames[1] == compiled_frames[0]


def test_errors_name_the_fix(model_factory, tokenizer):
    m = model_factory()
    with pytest.raises(ConfigError, match="not divisible by rollout.block_length"):
        run(m, tokenizer, RolloutConfig(max_completion_length=10, steps=10, block_length=4))
    with pytest.raises(ConfigError, match="multiple of the number of blocks"):
        run(m, tokenizer, RolloutConfig(max_completion_length=8, steps=3, block_length=4))
    with pytest.raises(ConfigError, match="use rollout.cache=prefix or dual"):
        run(m, tokenizer, RolloutConfig(max_completion_length=8, steps=8, cache="block"))
    with pytest.raises(ConfigError, match="did you mean 'threshold'"):
        run(m, tokenizer, RolloutConfig(max_completion_length=8, steps=8, commit="treshold"))
    with pytest.raises(DllmRlError, match="exceeds the model's context"):
        run(m, tokenizer, RolloutConfig(max_completion_length=100, steps=100), prompts=["y" * 40])
    m.config.mask_token_id = None  # and a tokenizer without a mask token
    tok = tokenizer.__class__(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|eos|>", pad_token="<|pad|>")
    with pytest.raises(DllmRlError, match="no mask token"):
        run(m, tok, RolloutConfig(max_completion_length=8, steps=8))


def test_empty_prompts_are_refused_where_nothing_can_predict_the_first_token(model_factory, tokenizer):
    """A logits-shifted model (Dream) predicts a token from the position before it: an empty prompt has none
    (it crashed in an index, or read a padding position beside longer prompts). No prompts at all is an error
    too; empty ids are ids, not a conversation. A model without the shift decodes an empty prompt."""
    over = {"vocab_size": len(tokenizer), "mask_token_id": tokenizer.mask_token_id}
    over |= {"pad_token_id": tokenizer.pad_token_id, "eos_token_id": tokenizer.eos_token_id}
    dream = small_native("dream", **over)
    cfg = RolloutConfig(max_completion_length=4, steps=4)
    for cache in ("none", "prefix"):
        for prompts in ([""], ["", "ab"], [[]]):
            with pytest.raises(ConfigError, match="prompt 0 has 0 tokens.*needs at least 1"):
                run(dream, tokenizer, RolloutConfig(**{**cfg.__dict__, "cache": cache}), prompts=prompts)
    assert run(dream, tokenizer, cfg, prompts=["ab"]).completion_ids.shape == (1, 4)
    with pytest.raises(ConfigError, match="no prompts"):
        run(model_factory(), tokenizer, cfg, prompts=[])
    assert run(model_factory(), tokenizer, cfg, prompts=[[]]).completion_ids.shape == (1, 4)
