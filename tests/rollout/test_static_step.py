"""The engine's static step (rollout.step): the same decisions as the host-driven loop it replaced, no host
synchronisation inside a block, one graph per step kind (no graph break, no recompile across blocks or
rollouts), batch buckets that change nothing, and the CPU proxies that measure all this."""

import pytest
import torch

from dllm_rl.config import RolloutConfig
from dllm_rl.cost_proxies import OpCounter, SyncCounter, graph_breaks
from dllm_rl.counter_rng import row_seeds
from dllm_rl.kernels import one_op_per_kernel
from dllm_rl.models.base import traits
from dllm_rl.rollout import engine, generate
from dllm_rl.rollout.commit import COMMIT_RULES
from dllm_rl.rollout.eager_loop import generate_host_loop
from dllm_rl.rollout.graphs import batch_bucket
from dllm_rl.rollout.step import step_kind

PROMPTS = ["12+7=", "hello there, ", "a", "zzz", "q", "longer prompt here"]


def eos_prone(model_factory, tokenizer, attention="bidirectional", seed=0):
    """A tiny model that emits EOS often enough that rows stop after different blocks."""
    m = model_factory(attention=attention, block_size=4, seed=seed)
    with torch.no_grad():
        m.lm_head.weight[tokenizer.eos_token_id] += 1.2 * m.norm.weight.sign()
    return m


def assert_same(a, b):
    """Two RolloutBatches of the same decode: tokens, trace (events compared row by row), texts."""
    t, u = a.trace, b.trace
    by_row = lambda e: e[e[:, 0].argsort(stable=True)]
    assert torch.equal(a.completion_ids, b.completion_ids)
    assert torch.equal(a.prompt_ids, b.prompt_ids) and torch.equal(a.prompt_mask, b.prompt_mask)
    assert a.completions == b.completions
    assert torch.equal(t.commit_step, u.commit_step) and torch.equal(t.num_steps, u.num_steps)
    assert torch.equal(by_row(t.events), by_row(u.events))
    torch.testing.assert_close(t.token_logprob, u.token_logprob, atol=1e-5, rtol=0)
    torch.testing.assert_close(t.order_logprob, u.order_logprob, atol=1e-5, rtol=0)


CASES = [
    ("dual", {"temperature": 1.0}),
    ("dual", {"commit": "threshold", "threshold": 0.1, "temperature": 1.0}),
    ("prefix", {"commit": "prophet", "prophet_gaps": [0.5, 0.3, 0.1]}),
    ("none", {"temperature": 1.0, "order": "top_prob", "order_temperature": 0.5, "top_p": 0.9}),
    ("none", {"temperature": 1.0, "self_correction": True, "correction_threshold": 0.3}),
    ("block", {"commit": "factor", "factor": 2.0, "order": "random", "temperature": 0.7}),
    ("block", {"temperature": 1.0, "top_k": 5}),
]


@pytest.mark.parametrize("cache,extra", CASES, ids=[f"{c}-{'-'.join(e)}" for c, e in CASES])
def test_same_decisions_as_the_host_loop(model_factory, tokenizer, cache, extra):
    m = eos_prone(model_factory, tokenizer, "block_causal" if cache == "block" else "bidirectional")
    cfg = RolloutConfig(max_completion_length=24, steps=12, block_length=8, cache=cache, **extra)
    out = generate(m, tokenizer, PROMPTS, cfg, torch.Generator().manual_seed(1))
    ref = generate_host_loop(m, tokenizer, PROMPTS, cfg, torch.Generator().manual_seed(1))
    assert_same(out, ref)
    assert out.stats["forwards"] == ref.stats["forwards"]
    stopped = (ref.completion_ids == tokenizer.eos_token_id).any(-1)
    assert stopped.any() or cfg.self_correction  # the EOS path is exercised


def _workspace(model, tokenizer, cfg, prompts=PROMPTS):
    tr = traits(model, tokenizer)
    ws, run, _ = engine._workspace(model, tr, cfg, len(prompts), max(map(len, prompts)), None)
    ids = engine.encode_prompts(tokenizer, prompts)
    ws.load(ids, row_seeds(ids, torch.Generator().manual_seed(0)), tokenizer.pad_token_id)
    ws.start_block(0)
    return ws, run, tr


SYNC_FREE = [
    ("dual", {"temperature": 1.0, "order": "top_prob", "order_temperature": 0.5}),
    ("block", {"commit": "threshold", "threshold": 0.1}),
    ("none", {"temperature": 1.0, "self_correction": True, "top_p": 0.9, "order": "random"}),
    ("prefix", {"commit": "factor", "temperature": 1.0, "top_k": 3}),
]


@pytest.mark.parametrize("cache,extra", SYNC_FREE, ids=[c for c, _ in SYNC_FREE])
def test_step_has_no_host_sync(model_factory, tokenizer, cache, extra):
    m = model_factory(attention="block_causal" if cache == "block" else "bidirectional", block_size=4)
    cfg = RolloutConfig(max_completion_length=16, steps=8, block_length=8, cache=cache, **extra)
    ws, run, tr = _workspace(m, tokenizer, cfg)
    with torch.no_grad():
        for first in (True, False):
            with SyncCounter() as s:
                ws.step(step_kind(cfg, tr, ws.L, ws.P, 0, first))
            assert s.total == 0, s.sites


def test_step_has_no_graph_break(model_factory, tokenizer):
    """One graph per step kind under TorchDynamo (what a CUDA graph captures), for the richest step: a
    block-causal model, the exact block cache (two kinds after the first block), a sampled Plackett-Luce order,
    self-correction."""
    m = model_factory(attention="block_causal", block_size=4, layers=1)
    cfg = RolloutConfig(
        max_completion_length=16,
        steps=8,
        block_length=8,
        cache="block",
        temperature=1.0,
        order="top_prob",
        order_temperature=0.5,
        self_correction=True,
    )
    ws, _, tr = _workspace(m, tokenizer, cfg)
    with torch.no_grad():
        for first in (True, False):
            breaks, reasons = graph_breaks(ws.step, step_kind(cfg, tr, ws.L, ws.P + 8, ws.P, first))
            assert breaks == 0, reasons


def test_a_decode_looks_at_the_device_once_per_block(model_factory, tokenizer, monkeypatch):
    """top_k: no host read inside a block; between blocks one look (which rows are done); the rest is setup
    and building the trace at the end, whatever the number of steps."""
    m = model_factory()
    counts, original = {}, engine._decode_block

    def counted(*args, **kwargs):
        before = s.total
        original(*args, **kwargs)
        inside.append(s.total - before)

    monkeypatch.setattr(engine, "_decode_block", counted)
    for steps in (8, 16):
        cfg = RolloutConfig(max_completion_length=16, steps=steps, block_length=8, cache="dual", temperature=1.0)
        inside = []
        with SyncCounter() as s:
            generate(m, tokenizer, PROMPTS, cfg, torch.Generator().manual_seed(0))
        assert inside == [0, 0]
        counts[steps] = s.total
    assert counts[8] == counts[16]  # per-step cost: none


def test_the_sync_counter_sees_a_sync_added_to_the_step(model_factory, tokenizer, monkeypatch):
    m = model_factory()
    cfg = RolloutConfig(max_completion_length=16, steps=8, block_length=8, cache="dual", commit="probe")

    def probe(st, cfg):  # a commit rule that reads the device: what the counter must catch
        k = COMMIT_RULES["top_k"](st, cfg)
        return k.clamp(max=int(k.max().item()))

    monkeypatch.setitem(COMMIT_RULES, "probe", probe)
    ws, _, tr = _workspace(m, tokenizer, cfg)
    with torch.no_grad(), SyncCounter() as s:
        ws.step(step_kind(cfg, tr, ws.L, ws.P, 0, True))
    assert s.hits["_local_scalar_dense"] == 1
    assert any("test_static_step.py" in site for site in s.sites)
    with SyncCounter() as s:  # the Python-level device-to-host reads a TorchDispatchMode cannot see
        torch.ones(3).tolist()
        torch.ones(3)[torch.tensor([True, False, True])].cpu()
    assert s.hits["tolist"] == 1 and s.hits["index"] == 1 and s.hits["cpu"] == 1


def test_compiled_step_matches_eager_without_recompiling(model_factory, tokenizer):
    """rollout.compile=graphs without CUDA: torch.compile(fullgraph=True) of the step (backend eager: tracing
    only). The same tokens, commit steps and log-probs as the eager engine; a second rollout after a weight
    update reuses the graphs (a recompile would raise) and decodes with the new weights."""
    m = eos_prone(model_factory, tokenizer, seed=3)
    base = dict(max_completion_length=16, steps=8, block_length=8, cache="dual", temperature=1.0)
    graphs = RolloutConfig(**base, compile="graphs", compile_backend="eager")
    try:
        for round_ in range(2):
            out = generate(m, tokenizer, PROMPTS, graphs, torch.Generator().manual_seed(round_))
            ref = generate(m, tokenizer, PROMPTS, RolloutConfig(**base), torch.Generator().manual_seed(round_))
            assert_same(out, ref)
            if round_ == 0:
                assert out.stats["compile_seconds"] > 0
                torch.compiler.set_stance("fail_on_recompile")
            with torch.no_grad():  # a training update, in place
                m.lm_head.weight.add_(0.5 * torch.randn_like(m.lm_head.weight))
    finally:
        torch.compiler.set_stance("default")
        engine._GRAPHS.clear()


def test_batch_buckets_change_nothing(model_factory, tokenizer):
    """compile=graphs pads the batch to a bucket (padding rows are done from the start), drops finished rows to
    smaller buckets between blocks and left-pads prompts to a multiple of 64: a prompt decodes alike alone and
    in any batch, and alike with and without buckets."""
    m = eos_prone(model_factory, tokenizer, seed=1)
    base = dict(max_completion_length=24, steps=12, block_length=8, cache="dual", temperature=1.0, order="random")
    bucketed = RolloutConfig(**base, compile="graphs", compile_backend="none")
    try:
        crowd = generate(m, tokenizer, PROMPTS, bucketed, torch.Generator().manual_seed(5))
        assert_same(crowd, generate(m, tokenizer, PROMPTS, RolloutConfig(**base), torch.Generator().manual_seed(5)))
        alone = generate(m, tokenizer, [PROMPTS[3]], bucketed, torch.Generator().manual_seed(5))
        assert torch.equal(crowd.completion_ids[3], alone.completion_ids[0])
        assert crowd.completions[3] == alone.completions[0]
    finally:
        engine._GRAPHS.clear()
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 7, 9, 13, 33, 64, 65)] == [1, 2, 3, 4, 6, 8, 12, 16, 48, 64, 96]


def test_fused_ops_cut_kernels_with_the_same_numerics(model_factory, tokenizer):
    """kernels.one_op_per_kernel counts RMSNorm, RoPE and the SiLU gate as the one kernel each the CUDA path
    launches: at least 40% fewer kernels per forward, with the reference's numbers exactly."""
    m = model_factory(layers=4)
    x = torch.randint(0, 40, (2, 24))
    with torch.no_grad():
        with OpCounter() as plain:
            a = m(x).logits
        with one_op_per_kernel(), OpCounter() as fused:
            b = m(x).logits
    assert torch.equal(a, b)
    assert fused.kernels <= 0.6 * plain.kernels, (fused.kernels, plain.kernels)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cache", ["dual", "block"])
def test_cuda_graphs_decode_like_eager(model_factory, tokenizer, cache):
    """CUDA graphs captured in the first rollout replay every block of later rollouts, after a weight update
    too (new bucket sizes are captured when finished rows shrink the batch), with the eager engine's decisions."""
    m = eos_prone(model_factory, tokenizer, "block_causal" if cache == "block" else "bidirectional").cuda()
    base = dict(max_completion_length=24, steps=12, block_length=8, cache=cache, temperature=1.0)
    try:
        for round_ in range(2):
            out = generate(
                m, tokenizer, PROMPTS, RolloutConfig(**base, compile="graphs"), torch.Generator().manual_seed(0)
            )
            ref = generate(m, tokenizer, PROMPTS, RolloutConfig(**base), torch.Generator().manual_seed(0))
            assert_same(out, ref)
            assert out.stats["compile_seconds"] > 0 or round_  # captured in the first rollout
            with torch.no_grad():
                m.lm_head.weight.add_(0.5 * torch.randn_like(m.lm_head.weight))
    finally:
        engine._GRAPHS.clear()


def test_the_trace_bound_caps_remasks_per_step_at_the_block(model_factory, tokenizer):
    """remask.py remasks at most Lb positions a step, so a larger correction_max_per_step must not grow the trace
    buffers (at Lc 256, Lb 32, 256 steps, 1000 per step would have asked for 248,504 steps); the bound still
    holds for a decode that remasks a whole block a step."""
    from dllm_rl.rollout.step import trace_steps

    big = RolloutConfig(max_completion_length=256, steps=256, block_length=32, commit="threshold")
    big = RolloutConfig(**{**big.__dict__, "self_correction": True})
    at = lambda n: trace_steps(RolloutConfig(**{**big.__dict__, "correction_max_per_step": n}), 256, 32)
    assert at(1) == 752 and at(1000) == at(32) == 8440  # 8 blocks x (32 + 31 steps x (1 + 32))
    cfg = RolloutConfig(
        max_completion_length=8,
        steps=8,
        block_length=4,
        temperature=1.0,
        self_correction=True,
        correction_threshold=1.0,  # every committed token is a candidate
        correction_max_per_step=1000,
    )
    out = generate(model_factory(), tokenizer, PROMPTS, cfg, generator=torch.Generator().manual_seed(0))
    assert (out.trace.num_steps <= trace_steps(cfg, 8, 4)).all() and (out.completion_ids >= 0).all()
