"""The hybrid rollout (rollout/hybrid.py): plan kinds, the template, batch invariance, and what the batch
carries (plans, their exact log-probs, the executor's trace)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from dllm_rl.config import HybridConfig, PlannerConfig, RolloutConfig, TinyModelConfig
from dllm_rl.errors import ConfigError
from dllm_rl.models.ar import ARPlanner, build_tiny_planner
from dllm_rl.rollout import generate
from dllm_rl.rollout.hybrid import hybrid_generate, place
from dllm_rl.tasks.plans import sudoku_corrupt, sudoku_oracle

ROWS = [
    {"puzzle": "12__\n34__\n____\n____", "answer": "1243\n3421\n2134\n4312"},
    {"puzzle": "1___\n__2_\n_3__\n___4", "answer": "1342\n4213\n2431\n3124"},
    {"puzzle": "_2_4\n____\n2___\n___1", "answer": "1234\n3412\n2143\n4321"},
]
for _r in ROWS:
    _r["prompt"] = [{"role": "user", "content": _r["puzzle"]}]
ROLLOUT = RolloutConfig(max_completion_length=8, steps=8, temperature=1.0, order="top_prob")
CFG = HybridConfig(template="{plan}\n{question}")


@pytest.fixture
def executor(model_factory):
    return model_factory(seed=0)


@pytest.fixture(scope="module")
def planner(tokenizer):
    cfg = PlannerConfig(
        tiny=TinyModelConfig(
            hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=128
        ),
        max_new_tokens=6,
    )
    model, tok = build_tiny_planner(cfg, tokenizer, seed=1)
    return ARPlanner(model.eval(), tok, cfg)


def run(executor, tokenizer, rows, kind, planner=None, seed=0, **cfg):
    return hybrid_generate(
        executor,
        tokenizer,
        [r["prompt"] for r in rows],
        rows,
        ROLLOUT,
        replace(CFG, plan=kind, **cfg),
        planner,
        "sudoku",
        torch.Generator().manual_seed(seed),
    )


def test_no_plan_is_the_plain_rollout(executor, tokenizer):
    batch = run(executor, tokenizer, ROWS, "none")
    plain = generate(executor, tokenizer, [r["prompt"] for r in ROWS], ROLLOUT, torch.Generator().manual_seed(0))
    assert batch.plan.executor_prompts == [r["prompt"] for r in ROWS]  # byte-identical prompts
    assert torch.equal(batch.prompt_ids, plain.prompt_ids) and batch.completions == plain.completions


def test_content_free_plan_and_empty_scaffold_are_different_prompts_to_the_executor(executor, tokenizer):
    empty = run(executor, tokenizer, ROWS, "none")
    free = run(executor, tokenizer, ROWS, "content_free")
    assert free.plan.texts == ["____\n____\n____\n____"] * 3  # the task's content-free plan: the empty hint grid
    assert free.plan.executor_prompts[0][0]["content"] == "____\n____\n____\n____\n" + ROWS[0]["puzzle"]
    assert free.prompt_ids.shape[1] > empty.prompt_ids.shape[1]
    decoded = tokenizer.decode(free.prompt_ids[0][free.prompt_mask[0].bool()])
    assert decoded.startswith("<|user|>____\n") and decoded.endswith(ROWS[0]["puzzle"] + "<|assistant|>")
    # what the scorer gets is the caller's prompts, untouched by the rollout
    assert ROWS[0]["prompt"] == [{"role": "user", "content": "12__\n34__\n____\n____"}]
    custom = run(executor, tokenizer, ROWS, "content_free", content_free="(none)")
    assert custom.plan.texts == ["(none)"] * 3


def test_oracle_corrupted_and_other_problem_plans(executor, tokenizer):
    oracle = run(executor, tokenizer, ROWS, "oracle")
    assert oracle.plan.texts == [sudoku_oracle(r) for r in ROWS]
    corrupted = run(executor, tokenizer, ROWS, "corrupted")  # without a planner: the oracle plan, corrupted
    assert corrupted.plan.texts == [sudoku_corrupt(sudoku_oracle(r)) for r in ROWS]
    other = run(executor, tokenizer, ROWS, "other_problem")  # the next distinct prompt of the batch
    assert other.plan.texts == [sudoku_oracle(ROWS[1]), sudoku_oracle(ROWS[2]), sudoku_oracle(ROWS[0])]
    given = [{**r, "other": ROWS[0]} for r in ROWS]  # the caller's choice wins (evaluate.with_other_problems)
    assert run(executor, tokenizer, given, "other_problem").plan.texts == [sudoku_oracle(ROWS[0])] * 3
    assert (oracle.plan.plan_mask.sum() == 0) and oracle.plan.kind == "oracle"  # not sampled: nothing to train


def test_real_plans_carry_the_planners_exact_logprobs_and_the_executors_trace(executor, tokenizer, planner):
    batch = run(executor, tokenizer, ROWS * 2, "real", planner)
    assert batch.plan.kind == "real" and batch.plan.plan_mask.sum() > 0
    assert torch.allclose(planner.logprobs(batch.plan), batch.plan.logprobs, atol=1e-5)
    assert batch.trace.commit_step.shape == batch.completion_ids.shape
    for r, text in enumerate(batch.plan.texts):
        assert batch.plan.executor_prompts[r][0]["content"] == f"{text}\n{ROWS[r % 3]['puzzle']}"
    rows = torch.tensor([4, 1])
    sub = batch.select(rows)  # micro-batching keeps each row's plan with it
    assert sub.plan.texts == [batch.plan.texts[4], batch.plan.texts[1]]
    assert torch.equal(sub.plan.logprobs, batch.plan.logprobs[rows])


def test_hybrid_rollouts_are_batch_invariant(executor, tokenizer, planner):
    alone = run(executor, tokenizer, ROWS[1:2], "real", planner, seed=5)
    mixed = run(executor, tokenizer, [ROWS[2], ROWS[1], ROWS[0]], "real", planner, seed=5)
    assert alone.plan.texts[0] == mixed.plan.texts[1]
    assert alone.completions[0] == mixed.completions[1]


def test_template_and_kind_errors(executor, tokenizer):
    with pytest.raises(ConfigError, match="plan"):
        place(ROWS[0]["prompt"], "x", "{question} only")
    with pytest.raises(ConfigError, match="planner"):
        run(executor, tokenizer, ROWS, "real")
    with pytest.raises(ConfigError, match="hybrid.plan"):
        run(executor, tokenizer, ROWS, "oracel")
    assert place("text prompt", "p", "Plan: {plan}\n{question}") == "Plan: p\ntext prompt"
    # the two fields are filled in one pass: a plan that says "{question}" keeps it
    assert place("What is 2+2?", "use {question}", "{plan} / {question}") == "use {question} / What is 2+2?"
    for prompt in ([5, 6, 7], [{"role": "system", "content": "s"}]):  # token ids; messages without a user turn
        with pytest.raises(ConfigError, match="a user turn"):
            place(prompt, "p", CFG.template)


def test_a_plan_that_leaves_no_room_is_cut_to_fit_the_executors_context(model_factory, tokenizer):
    """The oracle plan (a 19-character grid) placed before the puzzle overflows an executor whose context keeps
    room for the puzzle and 8 completion tokens plus 5 plan characters: the plan is cut to its longest prefix
    that fits, the rollout runs, and the cut plans are counted."""
    from dllm_rl.rollout.engine import encode_prompts

    executor = model_factory(seed=0)
    bare = [place(r["prompt"], "", CFG.template) for r in ROWS]
    longest = max(len(ids) for ids in encode_prompts(tokenizer, bare))
    executor.config.max_position_embeddings = longest + 5 + ROLLOUT.max_completion_length
    batch = run(executor, tokenizer, ROWS, "oracle")
    assert batch.stats["plans_cut"] == 3 and batch.plan.texts == [sudoku_oracle(r) for r in ROWS]
    room = executor.config.max_position_embeddings - ROLLOUT.max_completion_length
    for r, prompt in enumerate(batch.plan.executor_prompts):
        kept = prompt[0]["content"][: -len(ROWS[r]["puzzle"]) - 1]
        assert batch.plan.texts[r].startswith(kept) and len(kept) < len(batch.plan.texts[r])
        assert len(encode_prompts(tokenizer, [prompt])[0]) <= room
    executor.config.max_position_embeddings = 128
    assert run(executor, tokenizer, ROWS, "oracle").stats["plans_cut"] == 0
