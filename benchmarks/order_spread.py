"""How concentrated a learned unmasking order is where it trains: for each checkpoint, the Plackett-Luce log-prob
of the orders its head samples at the recipe's rollout.order_temperature, summed over a trajectory's steps and
averaged over trajectories (closer to 0: fewer orders carry the probability; a checkpoint without a saved head gets
the recipe's fresh head, which decodes like top_prob), on the same training prompts and seed for every checkpoint.
The same mean over the rollouts the verifier solves and over the rest is printed beside it: where the solving
rollouts' orders are the more spread, moving toward "the reference conditioned on solving" spreads the order.

    python benchmarks/order_spread.py checkpoints/tiny/sudoku-sft-multi RUN_A/final RUN_B/final
    python benchmarks/order_spread.py CKPT --recipe recipes/tiny/sudoku-diffu-grpo.yaml --prompts 64 --samples 16

Prints markdown for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch

from dllm_rl.config import load_recipe
from dllm_rl.models.load import load_model
from dllm_rl.policy import order_head_for
from dllm_rl.rewards.plugins import resolve_reward
from dllm_rl.rollout import generate
from dllm_rl.runtime import set_threads
from dllm_rl.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoints", nargs="+", help="model directories (with order_policy.pt when a head was trained)")
    ap.add_argument("--recipe", default=str(ROOT / "recipes/tiny/sudoku-order-dpo.yaml"))
    ap.add_argument("--prompts", type=int, default=32, help="the first N training prompts")
    ap.add_argument("--samples", type=int, default=16, help="rollouts per prompt")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    set_threads(args.threads)
    r = load_recipe(args.recipe)
    if r.rollout.order != "policy" or r.rollout.order_temperature <= 0:
        raise SystemExit(f"{args.recipe}: needs rollout.order=policy with rollout.order_temperature > 0")
    task = load_task(r.data)
    rows = task.train.select(range(args.prompts)).to_list()
    prompts = [row["prompt"] for row in rows for _ in range(args.samples)]
    print(
        f"{args.prompts} training prompts x {args.samples} rollouts, order temperature {r.rollout.order_temperature}, "
        f"{r.rollout.steps} steps\n"
    )
    columns = {k: [row[k] for row in rows for _ in range(args.samples)] for k in rows[0]}
    verifier = resolve_reward(task.reward)
    print("| checkpoint | head | order log-prob per trajectory: mean | solved / unsolved trajectories | reward |")
    print("|---|---|---|---|---|")
    for path in args.checkpoints:
        model, tokenizer = load_model(replace(r.model, path=path), seed=0)
        head = order_head_for("policy", model, path, r.order_policy, r.train.seed)
        saved = not head.training  # order_head_for: a saved head comes in eval mode, a fresh one in training mode
        head.train()  # as the trainers sample with it
        with torch.no_grad():
            batch = generate(
                model, tokenizer, prompts, r.rollout, generator=torch.Generator().manual_seed(0), order_policy=head
            )
        per_traj = batch.trace.order_logprob.sum(-1)
        reward = torch.tensor(verifier(prompts, batch.completions, **columns), dtype=torch.float)
        solved = reward == 1
        split = " / ".join(f"{per_traj[m].mean():.2f}" if m.any() else "-" for m in (solved, ~solved))
        print(f"| `{path}` | {'saved' if saved else 'fresh'} | {per_traj.mean():.2f} | {split} | {reward.mean():.3f} |")


if __name__ == "__main__":
    main()
