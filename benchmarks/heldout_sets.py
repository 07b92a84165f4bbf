"""Greedy held-out accuracy of checkpoints on several independent held-out sets (data.eval_seed), with the gain
of each over the first and its standard error.

A recipe compared and tuned on the shared held-out set (data.eval_seed 0, 200 examples in the tiny recipes) is
chosen partly on that set's noise; independent sets of the same generator (eval_seed 1, 2, ...) are drawn the same
way and seen by no run, so a gain that holds there is not a selection effect. Every set is disjoint from training
(for sudoku and countdown, by content).

    python benchmarks/heldout_sets.py recipes/tiny/countdown-dpo.yaml checkpoints/tiny/countdown-sft RUN/final
    python benchmarks/heldout_sets.py RECIPE BEFORE AFTER --sets 1 2 3 4 5 --size 200 --threads 2

The standard error of a gain is that of the paired per-example difference (after - before) over all examples of
all sets. The checkpoint's learned order or edit head is used as `dllm-rl eval` uses it (a start without an
order head gets the fresh head a run of the recipe starts from); a hybrid recipe (a planner) is refused. Prints
markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from dllm_rl.config import load_recipe
from dllm_rl.evaluate import evaluate_recipe
from dllm_rl.models.load import load_model
from dllm_rl.policy import edit_head_for, order_head_for
from dllm_rl.rundir import resolve_model_dir
from dllm_rl.runtime import set_threads
from dllm_rl.tasks import load_task


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe", help="the recipe whose task, decoding and evaluation settings apply")
    ap.add_argument("checkpoints", nargs="+", help="checkpoint directories; gains are against the first")
    ap.add_argument("--sets", type=int, nargs="+", default=[1, 2, 3, 4, 5], help="data.eval_seed values")
    ap.add_argument("--size", type=int, default=None, help="examples per set (default: the recipe's data.eval_size)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    set_threads(args.threads)
    r = load_recipe(args.recipe)
    if r.hybrid.plan != "none":
        ap.error("a hybrid recipe needs its planner: use `dllm-rl eval RECIPE --checkpoint C data.eval_seed=K`")
    size = args.size or r.data.eval_size
    r = replace(
        r, data=replace(r.data, eval_size=size), eval=replace(r.eval, size=size, temperature=0.0, num_samples=1)
    )
    tasks = [load_task(replace(r.data, eval_seed=k)) for k in args.sets]
    scores = []  # per checkpoint: [sets, size] solved (0/1)
    for path in args.checkpoints:
        model, tok = load_model(r.model, path=path)
        # the learned order (rollout.order=policy) or edit head saved with the checkpoint, as dllm-rl eval uses it; a
        # checkpoint without an order head (a run's start) gets the fresh head its run started from, as at step 0
        heads = {
            "order_policy": order_head_for(r.rollout.order, model, path, r.order_policy, r.train.seed),
            "edit_policy": edit_head_for(r.rollout, model, resolve_model_dir(path)),
        }
        per_set = [torch.tensor(evaluate_recipe(model, tok, t, r, **heads)["scores"]) >= 1.0 for t in tasks]
        scores.append(torch.stack(per_set).float())
    print(f"greedy held-out accuracy, {len(args.sets)} sets of {size} (data.eval_seed {args.sets})\n")
    print("| checkpoint | " + " | ".join(f"set {k}" for k in args.sets) + " | all | gain over the first (SE) |")
    print("|---" * (len(args.sets) + 3) + "|")
    for path, s in zip(args.checkpoints, scores):
        diff = (s - scores[0]).flatten()
        gain = "" if s is scores[0] else f"{100 * diff.mean():+.1f} ({100 * diff.std() / len(diff) ** 0.5:.1f})"
        cells = " | ".join(f"{v:.3f}" for v in s.mean(1).tolist())
        print(f"| {path} | {cells} | {s.mean():.3f} | {gain} |")


if __name__ == "__main__":
    main()
