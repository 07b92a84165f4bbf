"""What a Countdown checkpoint's greedy decode gets wrong on the held-out set: solved, an expression over exactly
the given numbers that reaches another value, one over other numbers, or no readable expression.

    python benchmarks/countdown_failures.py checkpoints/tiny/countdown-sft
    python benchmarks/countdown_failures.py RUN/final --recipe recipes/tiny/countdown-dpo.yaml data.eval_seed=1

Prints the counts and the first examples (numbers, target, completion, a reference solution).
"""

from __future__ import annotations

import argparse
from collections import Counter
from dataclasses import replace

from dllm_rl.config import load_recipe
from dllm_rl.evaluate import evaluate_recipe
from dllm_rl.models.load import load_model
from dllm_rl.rewards.countdown import evaluate_expression, extract_expression
from dllm_rl.runtime import set_threads
from dllm_rl.tasks import load_task


def kind(row: dict, completion: str, score: float) -> str:
    parsed = evaluate_expression(extract_expression(completion))
    if score >= 1:
        return "solved"
    if parsed is None:
        return "no readable expression"
    if sorted(parsed[1]) != sorted(row["numbers"]):
        return "other numbers"
    return "the given numbers, another value"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--recipe", default="recipes/tiny/countdown-dpo.yaml")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--show", type=int, default=10, help="examples printed")
    ap.add_argument("overrides", nargs="*", help="recipe overrides (section.key=value)")
    args = ap.parse_args()
    set_threads(args.threads)
    recipe = load_recipe(args.recipe, args.overrides)
    recipe = replace(recipe, eval=replace(recipe.eval, temperature=0.0, num_samples=1))
    task = load_task(recipe.data)
    model, tokenizer = load_model(replace(recipe.model, path=args.checkpoint), seed=0)
    result = evaluate_recipe(model, tokenizer, task, recipe)
    rows = task.eval.select(range(result["n"])).to_list()
    kinds = [kind(r, c, s) for r, c, s in zip(rows, result["completions"], result["scores"])]
    print(f"greedy accuracy {result['accuracy']:.3f} over {len(rows)} held-out puzzles")
    for name, count in Counter(kinds).most_common():
        print(f"  {name}: {count}")
    shown = [(r, c) for r, c, k in zip(rows, result["completions"], kinds) if k != "solved"][: args.show]
    for r, c in shown:
        print(f"  {r['numbers']} -> {r['target']}: {c!r} (a solution: {r['answer']})")


if __name__ == "__main__":
    main()
