"""An autoregressive planner feeding the diffusion executor, and a plan kind of your own.

    python examples/hybrid_planner.py --puzzles 40

The shipped tiny planner (a tiny Llama, checkpoints/tiny/sudoku-planner) writes two cells of each puzzle's
solution; rollout.hybrid places the plan before the puzzle and the shipped executor decodes. A plan kind is one
function + one dict entry (rollout.hybrid.PLAN_KINDS): here `first_row`, the solution's first row as a hint
grid. Each kind's held-out solve rate is printed; the verifier always sees the bare puzzle.

The shipped executor (checkpoints/tiny/sudoku-sft) was never shown a prefix and breaks on any plan (the first of
the three axes). The prefix-robustness LoRA makes plans harmless, not helpful: with it every kind scores about
what no plan does (benchmarks/RESULTS.md, "Hybrid planner -> executor: the three axes": content gain +0.0):

    dllm-rl train recipes/tiny/sudoku-prefix-lora.yaml
    python examples/hybrid_planner.py --executor outputs/tiny-sudoku-prefix-lora
"""

import argparse

import torch

from dllm_rl.config import DataConfig, HybridConfig, ModelConfig, PlannerConfig, RolloutConfig
from dllm_rl.evaluate import evaluate
from dllm_rl.models.ar import load_planner
from dllm_rl.models.load import load_model
from dllm_rl.rollout.hybrid import PLAN_KINDS, PlanContext, hybrid_generate, plans_from_texts
from dllm_rl.tasks import load_task
from dllm_rl.tasks.plans import hint_grid


def first_row(ctx: PlanContext):
    """The first row of each row's reference solution, as a hint grid (a plan kind of your own)."""
    grids = [[c for c in row["answer"] if c != "\n"] for row in ctx.rows]
    return plans_from_texts([hint_grid({i: int(g[i]) for i in range(4)}) for g in grids], "first_row")


PLAN_KINDS["first_row"] = first_row  # the one dict entry: `hybrid.plan: first_row` works now


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--puzzles", type=int, default=40)
    parser.add_argument("--executor", default="checkpoints/tiny/sudoku-sft", help="a diffusion model or run directory")
    args = parser.parse_args(argv)

    executor, tok = load_model(ModelConfig(path=args.executor))
    planner = load_planner(PlannerConfig(path="checkpoints/tiny/sudoku-planner", temperature=0.0, max_new_tokens=24))
    task = load_task(DataConfig(task="sudoku", train_size=8, eval_size=args.puzzles))
    rollout = RolloutConfig(max_completion_length=20, steps=20)
    hybrid = HybridConfig(template="{plan}\n{question}")

    rows = task.eval.to_list()[:1]
    batch = hybrid_generate(
        executor,
        tok,
        [r["prompt"] for r in rows],
        rows,
        rollout,
        HybridConfig(plan="real", template=hybrid.template),
        planner,
        "sudoku",
        torch.Generator().manual_seed(0),
    )
    print("the executor's prompt:", repr(batch.plan.executor_prompts[0][-1]["content"]))
    print("its completion:       ", repr(batch.completions[0]))
    print("plan log-prob (nats): ", round(float(batch.plan.logprobs[0].sum()), 3))
    for kind in ("none", "content_free", "real", "first_row", "corrupted"):
        cfg = HybridConfig(plan=kind, template=hybrid.template)
        result = evaluate(executor, tok, task.eval, "sudoku", rollout, task_name="sudoku", hybrid=cfg, planner=planner)
        print(f"plan={kind:<13} held-out solve rate {result['accuracy']:.3f} over {result['n']} puzzles")


if __name__ == "__main__":
    main()
