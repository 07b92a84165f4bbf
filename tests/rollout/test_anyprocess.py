"""Any-process decoding (rollout/anyprocess.py): a kept-only run is the fill-only engine exactly, the trace
replays every canvas through remasks, inserts and deletes, rows of changing lengths stay batch-invariant, the
limits hold, and what cannot work is refused with the key and the fix."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pytest
import torch
from conftest import small_native

from dllm_rl.batches import COMMIT, DELETE, INSERT, REMASK
from dllm_rl.config import RolloutConfig, recipe_from_dict
from dllm_rl.errors import ConfigError
from dllm_rl.policy import EditHead, EditHeadConfig, OrderHead, OrderHeadConfig
from dllm_rl.rollout import generate
from dllm_rl.validate import validate_recipe

PROMPTS = ["hi", "a longer prompt here", [{"role": "user", "content": "12_4\n__3_"}], "x"]


def run(model, tok, cfg, prompts=PROMPTS, seed=0, **kw):
    return generate(model, tok, prompts, cfg, torch.Generator().manual_seed(seed), **kw)


def head(model, K=2, keep_bias=4.0, std=0.0, seed=0):
    """An edit head over `model`: std 0 is an untrained head; std > 0 random last-layer weights (it edits);
    a huge keep_bias keeps everything with probability 1 (log-prob exactly 0) at any temperature."""
    torch.manual_seed(seed)
    h = EditHead(
        EditHeadConfig(hidden_size=model.config.hidden_size, width=16, heads=2, max_insert=K, init_bias=keep_bias)
    )
    if std:
        torch.nn.init.normal_(h.out[1].weight, std=std)
    return h


EDITING = dict(edit="any", edit_max_insert=2, edit_initial_length=5, edit_extra_steps=3, edit_max_per_step=3)


@pytest.mark.parametrize(
    "extra",
    [
        {"order": "top_prob"},
        {"order": "random", "order_temperature": 1.0, "temperature": 0.7},
        {"commit": "threshold", "threshold": 0.02},
        {"order": "margin", "order_temperature": 0.5, "cache": "prefix"},
        {"order": "policy", "order_temperature": 0.3},
    ],
)
@pytest.mark.parametrize("edit_temperature", [0.0, 1.0])
def test_kept_only_run_is_the_fill_only_engine(model_factory, tokenizer, extra, edit_temperature):
    """An any-process rollout whose head keeps everything and inserts nothing (an untrained head at edit
    temperature 0; a head that keeps with probability 1 at temperature 1) returns the fill-only engine's tokens,
    trace and log-probs, with the same forwards; every edit decision it recorded had log-prob 0."""
    m = model_factory()
    cfg = RolloutConfig(**{"max_completion_length": 12, "steps": 6, "temperature": 1.0, **extra})
    kw = {}
    if cfg.order == "policy":
        kw["order_policy"] = OrderHead(OrderHeadConfig(hidden_size=m.config.hidden_size, width=16, heads=2))
        torch.nn.init.normal_(kw["order_policy"].out[1].weight)
    fill = run(m, tokenizer, cfg, **kw)
    keeper = head(m) if edit_temperature == 0 else head(m, keep_bias=1e4)
    anyp = run(m, tokenizer, replace(cfg, edit="any", edit_temperature=edit_temperature), edit_policy=keeper, **kw)
    assert torch.equal(anyp.completion_ids, fill.completion_ids) and anyp.completions == fill.completions
    assert torch.equal(anyp.completion_mask, fill.completion_mask)
    a, b = anyp.trace, fill.trace
    for name in ("events", "event_logprob", "commit_step", "token_logprob", "order_logprob", "num_steps"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert anyp.stats["forwards"] == fill.stats["forwards"] and anyp.stats["edits"] == 0
    assert (a.edit_logprob == 0).all() and (a.lengths == 12).all()
    drawn = min(int(a.num_steps.min()), cfg.steps) - 1  # edits are off from a row's last allowed step on
    assert a.edit_on[:, :drawn].all() and not a.edit_on[:, drawn:].any()  # (drawn with probability 1)


def test_extra_steps_review_the_full_canvas(model_factory, tokenizer):
    """With edit_extra_steps, a canvas that has just been filled is reviewed by one more forward; a head that
    keeps everything accepts it: the same completion, one forward more, the review recorded as a step."""
    m = model_factory()
    cfg = RolloutConfig(max_completion_length=12, steps=6, temperature=1.0, order="top_prob")
    fill = run(m, tokenizer, cfg)
    anyp = run(m, tokenizer, replace(cfg, edit="any", edit_extra_steps=2), edit_policy=head(m, keep_bias=1e4))
    assert torch.equal(anyp.completion_ids, fill.completion_ids)
    assert torch.equal(anyp.trace.num_steps, fill.trace.num_steps + 1)
    assert anyp.stats["forwards"] == fill.stats["forwards"] + 1
    assert torch.equal(anyp.trace.events, fill.trace.events)  # the review step wrote nothing


@pytest.mark.parametrize("cache", ["none", "prefix"])
def test_trace_replays_every_canvas_through_edits(model_factory, tokenizer, cache):
    """A head that edits: Trace.replay (batches.edit_canvas, one event at a time per step, in Python) rebuilds
    every intermediate canvas the sampler's vectorised compaction produced, lengths changing included."""
    m = model_factory()
    cfg = RolloutConfig(max_completion_length=12, steps=6, temperature=1.0, order="top_prob", cache=cache, **EDITING)
    out = run(m, tokenizer, cfg, record_states=True, edit_policy=head(m, keep_bias=0.5, std=1.0))
    t = out.trace
    kinds = Counter(t.events[:, 4].tolist())
    assert kinds[INSERT] and kinds[DELETE] and kinds[REMASK] and kinds[COMMIT]
    for row in range(len(PROMPTS)):
        replayed, recorded = t.replay(row), out.stats["states"][row]
        assert len(replayed) == len(recorded) == int(t.num_steps[row])
        for s, (a, b) in enumerate(zip(replayed, recorded)):
            assert torch.equal(a, b)
            assert len(a) == int(t.lengths[row, s + 1])
        L = int(t.lengths[row, -1])
        assert torch.equal(replayed[-1], out.completion_ids[row, :L].cpu())
        assert (replayed[-1] != tokenizer.mask_token_id).all()  # the last step fills every mask
        assert (t.commit_step[row, :L] >= 0).all() and (t.commit_step[row, L:] == -1).all()
    assert len(set(t.lengths[:, -1].tolist())) > 1  # rows ended with different lengths


def test_batch_invariant_with_rows_of_changing_lengths(model_factory, tokenizer):
    """A row decodes the same alone and among rows of other prompt lengths whose canvases grow and shrink
    differently: tokens, lengths, events and log-probs."""
    m = model_factory()
    h = head(m, keep_bias=0.5, std=1.0)
    cfg = RolloutConfig(max_completion_length=12, steps=6, temperature=1.0, order="top_prob", **EDITING)
    alone = run(m, tokenizer, cfg, prompts=[PROMPTS[2]], seed=5, edit_policy=h)
    crowd = run(m, tokenizer, cfg, prompts=["zzz" * 5, PROMPTS[0], PROMPTS[2], PROMPTS[1]], seed=5, edit_policy=h)
    assert len(set(crowd.trace.lengths[:, 1:].flatten().tolist())) > 2  # lengths really change
    assert crowd.completions[2] == alone.completions[0]
    assert torch.equal(crowd.completion_ids[2], alone.completion_ids[0])
    a, b = alone.trace, crowd.trace.select(torch.tensor([2]))
    assert torch.equal(a.events, b.events) and torch.equal(a.lengths, b.lengths[:, : a.lengths.shape[1]])
    assert torch.allclose(a.event_logprob, b.event_logprob, atol=1e-5)
    assert torch.allclose(a.edit_logprob, b.edit_logprob[:, : a.edit_logprob.shape[1]], atol=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_limits_hold(model_factory, tokenizer, seed):
    """Lengths stay within 1..max_completion_length, a step edits at most edit_max_per_step times, the last
    allowed step draws no edits, remask-only decoding never changes the length, and no budget no edits."""
    m = model_factory()
    h = head(m, keep_bias=-1.0, std=1.0)  # eager to edit
    cfg = RolloutConfig(max_completion_length=8, steps=4, temperature=1.0, order="top_prob", **EDITING)
    out = run(m, tokenizer, cfg, seed=seed, edit_policy=h)
    t = out.trace
    assert (t.lengths >= 1).all() and (t.lengths <= 8).all()
    ev = t.events[t.events[:, 4] != COMMIT]
    per_step = Counter(map(tuple, ev[:, :2].tolist()))
    assert per_step and max(per_step.values()) <= 3
    assert (t.num_steps <= cfg.steps + cfg.edit_extra_steps).all()  # top_k fills every kept mask once steps run out
    last = t.num_steps - 1
    assert not t.edit_on[torch.arange(len(last)), last].any()
    remask = run(m, tokenizer, replace(cfg, edit="remask"), seed=seed, edit_policy=h)
    kinds = set(remask.trace.events[:, 4].tolist())
    assert REMASK in kinds and not kinds & {DELETE, INSERT} and (remask.trace.lengths == 5).all()
    frozen = run(m, tokenizer, replace(cfg, edit_max_per_step=0), seed=seed, edit_policy=h)
    assert set(frozen.trace.events[:, 4].tolist()) == {COMMIT} and (frozen.trace.edit_logprob == 0).all()


def test_native_models_take_the_edit_head(tokenizer):
    """The head is an adapter over any model with hidden states: native LLaDA and Dream (logits shifted by one)
    decode with edits, their traces replay, and the trajectory estimator gives each step the log-prob the sampler
    recorded. The head reads the hidden state the slot's logits come from (Dream: the position before it), as the
    fill-only engine shows the order head."""
    from dllm_rl.config import EstimatorConfig
    from dllm_rl.estimators import build_estimator
    from dllm_rl.models.base import traits
    from dllm_rl.rollout import encode_prompts

    over = {
        "vocab_size": len(tokenizer),
        "mask_token_id": tokenizer.mask_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
    }
    for arch, shift in (("llada", 0), ("dream", 1)):
        m = small_native(arch, **over, **({"embedding_size": len(tokenizer)} if arch == "llada" else {}))
        assert traits(m).logits_shift == shift
        cfg = RolloutConfig(max_completion_length=8, steps=4, temperature=1.0, order="top_prob", **EDITING)
        h = head(m, std=1.0)
        seen = []
        hook = h.register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
        out = run(m, tokenizer, cfg, prompts=["1+2="], record_states=True, edit_policy=h)
        hook.remove()
        assert (out.trace.events[:, 4] != COMMIT).any()
        assert all(torch.equal(a, b) for a, b in zip(out.trace.replay(0), out.stats["states"][0]))
        prompt = torch.tensor(encode_prompts(tokenizer, ["1+2="]))
        P, C = prompt.shape[1], cfg.edit_initial_length
        first = torch.cat([prompt, torch.full((1, C), tokenizer.mask_token_id)], 1)  # the canvas of step 0
        with torch.no_grad():
            states = m(input_ids=first, output_hidden_states=True).hidden_states[-1]
        # the canvas holds max_completion_length slots, the first edit_initial_length of them valid
        torch.testing.assert_close(seen[0][:, :C], states[:, P - shift : P + C - shift], rtol=1e-4, atol=1e-5)
        est = build_estimator(EstimatorConfig(name="trajectory"), traits(m))
        with torch.no_grad():
            e = est.estimate(m, out, est.draw(out), edit_policy=h)
        t, fills = out.trace, out.trace.events[:, 4] == COMMIT
        per_step = (t.order_logprob + t.edit_logprob).index_put(
            (t.events[fills, 0], t.events[fills, 1]), t.event_logprob[fills], accumulate=True
        )
        assert torch.allclose(e.logps * e.mask, per_step, atol=1e-4)


def test_errors_name_the_fix(model_factory, tokenizer):
    m = model_factory()
    cfg = RolloutConfig(max_completion_length=8, steps=4, edit="any")
    with pytest.raises(ConfigError, match="edit_policy="):
        run(m, tokenizer, cfg)
    with pytest.raises(ConfigError, match="bidirectional"):
        bc = model_factory(attention="block_causal", block_size=4)
        run(bc, tokenizer, replace(cfg, cache="block", block_length=4), edit_policy=head(bc))
    with pytest.raises(ConfigError, match="rollout.block_length"):
        run(m, tokenizer, replace(cfg, block_length=4), edit_policy=head(m))
    with pytest.raises(ConfigError, match="rollout.self_correction=false"):
        run(m, tokenizer, replace(cfg, self_correction=True), edit_policy=head(m))
    for sampler in ({"min_p": 0.9}, {"repetition_penalty": 50.0}):  # samplers edits do not apply: refused
        with pytest.raises(ConfigError, match="rollout.min_p=0 and rollout.repetition_penalty=1.0"):
            run(m, tokenizer, replace(cfg, **sampler), edit_policy=head(m))
        recipe = {"rollout": {"max_completion_length": 8, "steps": 4, "edit": "remask", **sampler}}
        with pytest.raises(ConfigError, match="any-process decoding"):
            validate_recipe(recipe_from_dict(recipe))
    with pytest.raises(ConfigError, match="rollout.edit_initial_length"):
        run(m, tokenizer, replace(cfg, edit_initial_length=9), edit_policy=head(m))
    with pytest.raises(ConfigError, match="rollout.edit_max_insert"):
        run(m, tokenizer, replace(cfg, edit_max_insert=3), edit_policy=head(m, K=2))


def test_concatenated_traces_hold_each_rows_final_length(model_factory, tokenizer):
    """Rollouts of different step counts concatenate (RolloutBatch.concat) with the shorter's step columns padded:
    a row's completion length stays what its last step left, as within one rollout (finish_edits), not 0."""
    from dllm_rl.batches import RolloutBatch

    m = model_factory()
    h = head(m, keep_bias=0.5, std=1.0)
    cfg = RolloutConfig(max_completion_length=12, steps=6, temperature=1.0, order="top_prob", **EDITING)
    short = run(m, tokenizer, cfg, prompts=[PROMPTS[3]], seed=5, edit_policy=h)
    long = run(m, tokenizer, replace(cfg, steps=12), prompts=[PROMPTS[0], PROMPTS[1]], seed=5, edit_policy=h)
    S_short, S_long = short.trace.lengths.shape[1], long.trace.lengths.shape[1]
    assert S_short < S_long
    both = RolloutBatch.concat([short, long]).trace
    assert both.lengths.shape == (3, S_long)
    assert torch.equal(both.lengths[0, :S_short], short.trace.lengths[0])
    assert (both.lengths[0, S_short:] == short.trace.lengths[0, -1]).all()
    assert torch.equal(both.lengths[1:], long.trace.lengths)
    assert both.lengths.min() >= 1
