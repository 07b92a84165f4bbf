"""Where token GRPO's gain (recipes/tiny/sudoku-tokens-grpo.yaml) comes from, puzzle by puzzle: for each
checkpoint, every held-out puzzle's greedy result and its solve rate over n samples at temperature 1, under the
recipe's own sampler (a fixed order: a recipe with rollout.order=policy needs its head, not passed here); with two
checkpoints (before / after RL), how puzzles moved between solve-rate bins and how many greedy solves were won
and lost.

    python benchmarks/headroom.py checkpoints/tiny/sudoku-sft-multi outputs/tiny-sudoku-tokens-grpo/final
    python benchmarks/headroom.py CKPT --recipe recipes/tiny/sudoku-tokens-grpo.yaml --eval-size 400 --samples 16
    python benchmarks/headroom.py BEFORE AFTER --split train     # the first 400 training puzzles instead

Greedy decoding solves a puzzle almost exactly when more than about half of the temperature-1 samples do, so
the greedy rate is the share of puzzles above that line, and a puzzle's sampled rate says how far it is from it.
Prints markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from dllm_rl.config import load_recipe
from dllm_rl.evaluate import evaluate_recipe
from dllm_rl.models.load import load_model
from dllm_rl.runtime import set_threads
from dllm_rl.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
EDGES = [0.0, 0.25, 0.5, 0.75, 0.999]  # bins: 0 | (0, .25] | (.25, .5] | (.5, .75] | (.75, 1) | 1
NAMES = ["0", "(0, 1/4]", "(1/4, 1/2]", "(1/2, 3/4]", "(3/4, 1)", "1"]


def per_puzzle(path: str, recipe, task, samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(greedy score, solve rate over `samples` draws at T 1) per held-out puzzle."""
    model, tok = load_model(replace(recipe.model, path=path), seed=0)
    greedy = evaluate_recipe(
        model, tok, task, replace(recipe, eval=replace(recipe.eval, temperature=0.0, num_samples=1))
    )
    sampled = evaluate_recipe(
        model, tok, task, replace(recipe, eval=replace(recipe.eval, temperature=1.0, num_samples=samples))
    )
    g = torch.tensor(greedy["scores"]) >= 1.0
    p = (torch.tensor(sampled["scores"]) >= 1.0).float().view(-1, samples).mean(-1)
    return g, p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="one or two checkpoint directories (before, after)")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/tiny/sudoku-tokens-grpo.yaml"))
    ap.add_argument("--eval-size", type=int, default=400)
    ap.add_argument("--samples", type=int, default=16)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument(
        "--split",
        choices=["eval", "train"],
        default="eval",
        help="held-out puzzles, or the first --eval-size training puzzles (did RL fit what it trained on?)",
    )
    args = ap.parse_args()
    set_threads(args.threads)
    r = load_recipe(args.recipe)
    r = replace(r, data=replace(r.data, eval_size=args.eval_size), eval=replace(r.eval, size=args.eval_size))
    task = load_task(r.data)
    if args.split == "train":
        task = replace(task, eval=task.train.select(range(min(args.eval_size, len(task.train)))))
    edges = torch.tensor(EDGES)
    results = []
    which = "held-out" if args.split == "eval" else "training"
    print(
        f"{len(task.eval)} {which} puzzles, {r.rollout.max_completion_length} tokens in {r.rollout.steps} steps, "
        f"order {r.rollout.order}; solve rate over {args.samples} samples at T 1\n"
    )
    print(
        f"| checkpoint | greedy | T 1: mean | T 1: pass@{args.samples} | "
        + " | ".join(f"puzzles with rate {n} (greedy solves)" for n in NAMES)
        + " |"
    )
    print("|---" * (4 + len(NAMES)) + "|")
    for path in args.checkpoints:
        g, p = per_puzzle(path, r, task, args.samples)
        bins = torch.bucketize(p, edges)
        cells = [f"{int((bins == b).sum())} ({int(g[bins == b].sum())})" for b in range(len(NAMES))]
        print(
            f"| {path} | {g.float().mean():.3f} | {p.mean():.3f} | {(p > 0).float().mean():.3f} | "
            + " | ".join(cells)
            + " |"
        )
        results.append((g, bins))
    if len(results) == 2:
        (g0, b0), (g1, b1) = results
        print(
            f"\nGreedy: {int((~g0 & g1).sum())} puzzles won, {int((g0 & ~g1).sum())} lost "
            f"(net {int(g1.sum()) - int(g0.sum()):+d} of {len(g0)}).\n"
        )
        print("| rate before \\ after | " + " | ".join(NAMES) + " |")
        print("|---" * (1 + len(NAMES)) + "|")
        for a in range(len(NAMES)):
            print(
                f"| {NAMES[a]} | "
                + " | ".join(str(int(((b0 == a) & (b1 == b)).sum())) for b in range(len(NAMES)))
                + " |"
            )


if __name__ == "__main__":
    main()
