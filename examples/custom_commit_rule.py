"""A commit rule of your own: how many masked tokens of the active block a denoising step commits.

    python examples/custom_commit_rule.py         # held-out solve rate and forwards: top_k vs "halve"

A commit rule is `fn(stats, cfg) -> [n] counts`, one dict entry in `rollout.commit.COMMIT_RULES`; the ordering
rule (rollout.order) then picks which positions. `stats` (batches.StepStats) holds, per position of the
active block, whether it is still masked and the model's confidence, top-1 probability, margin and entropy.
The rule here commits half of what is left in the block each step (at least one), so a block of n tokens
takes about log2(n) forwards, whatever rollout.steps says.
"""

import argparse
from dataclasses import replace

import torch

from dllm_rl import load_recipe
from dllm_rl.evaluate import evaluate_recipe
from dllm_rl.models.load import load_model
from dllm_rl.rollout import COMMIT_RULES
from dllm_rl.tasks import load_task


def halve(stats, cfg) -> torch.Tensor:
    left = stats.masked.sum(-1)  # [n] masked positions left in the block
    return ((left + 1) // 2).clamp(min=1)


COMMIT_RULES["halve"] = halve  # the one dict entry: `rollout.commit: halve` works now


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--puzzles", type=int, default=50)
    args = parser.parse_args(argv)
    recipe = load_recipe("recipes/tiny/sudoku-sft.yaml", [f"data.eval_size={args.puzzles}"])
    model, tok = load_model(recipe.model, path="checkpoints/tiny/sudoku-sft")
    task = load_task(recipe.data)
    for commit, steps in (("top_k", recipe.rollout.steps), ("halve", recipe.rollout.steps)):
        r = replace(recipe, rollout=replace(recipe.rollout, commit=commit, steps=steps))
        result = evaluate_recipe(model, tok, task, r)
        print(
            f"rollout.commit={commit}: solve rate {result['accuracy']:.3f} over {result['n']} puzzles, "
            f"{result['forwards']} forwards"
        )


if __name__ == "__main__":
    main()
