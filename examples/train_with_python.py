"""The Python trainer API: GRPO from a recipe, a reward function of your own, one override.

    python examples/train_with_python.py                 # 4 steps on the tiny Sudoku task (CPU, ~1 minute)
    python examples/train_with_python.py --steps 150     # the recipe's step count (batch 4, 16 held-out puzzles)

It overrides the recipe's batch (4 prompts), held-out set (16 puzzles) and evaluation schedule to stay small,
and its own reward replaces the recipe's `sudoku`, so even at 150 steps it is not the recipe's run.

A reward has TRL's signature, `fn(prompts, completions, **columns) -> list[float]`; every dataset column
(here the task's `puzzle` and `answer`) arrives as a keyword argument, one value per completion.
"""

import argparse

from dllm_rl import GRPOTrainer, load_recipe


def exact_grid(prompts, completions, answer, **kwargs):
    """1 for a completion equal to the grid the puzzle was cut from (any valid grid would also do: `sudoku`)."""
    return [float(c[0]["content"].strip() == a) for c, a in zip(completions, answer)]


def main(argv=None):
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--output-dir", default="outputs/example-python-api")
    args = parser.parse_args(argv)
    recipe = load_recipe(
        "recipes/tiny/sudoku-tokens-grpo.yaml",
        [
            f"train.max_steps={args.steps}",
            f"train.output_dir={args.output_dir}",
            "train.batch_size=4",
            "data.eval_size=16",
            "train.eval_steps=0",
        ],
    )
    result = GRPOTrainer(recipe, reward_funcs=exact_grid).train()  # replaces the recipe's rewards, as in TRL
    print(f"held-out solve rate {result['before']:.3f} -> {result['after']:.3f}; model in {result['final']}")


if __name__ == "__main__":
    main()
