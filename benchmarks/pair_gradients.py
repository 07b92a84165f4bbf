"""Where DPO's order-head gradient points, against GRPO's, on the very same rollouts.

GRPO's main job (recipes/tiny/sudoku-diffu-grpo.yaml) and DPO of the order head (recipes/tiny/sudoku-order-dpo.yaml)
are run with the same geometry (16 prompts x 16 samples, the same step generator, so the same rollouts) from the
same initial head; each takes one step, and the head's gradient that reaches the optimizer (after clipping) is
read. Printed per step: both rollouts' mean reward (equal when the rollouts are), the gradient norms, and the
cosine between GRPO's gradient and DPO's, with one pair per prompt (the best against the worst) and with every
disjoint pair (dpo.pairs_per_prompt = 8). Before each step every head is reset to the same head: the initial one,
or with --head a trained one (a run's final/order_policy.pt), to see whether the two objectives still agree where a
run ended and how much gradient is left there.

    python benchmarks/pair_gradients.py [--steps 3] [--threads 1] [--head RUN/final/order_policy.pt ...]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from dllm_rl.config import load_recipe
from dllm_rl.trainers.dpo import DPOTrainer
from dllm_rl.trainers.grpo import GRPOTrainer

GRPO = "recipes/tiny/sudoku-diffu-grpo.yaml"
DPO = "recipes/tiny/sudoku-order-dpo.yaml"


def head_gradient(trainer, step: int) -> tuple[torch.Tensor, dict]:
    """(the order head's gradient as the optimizer sees it, the step's metrics) of one training step."""
    seen = []
    real = trainer.optimizer.step

    def record(*args, **kwargs):
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in trainer.order_policy.parameters()]
        seen.append(torch.cat([g.flatten() for g in grads]).clone())
        return real(*args, **kwargs)

    trainer.optimizer.step = record
    try:
        metrics = trainer.step(step)
    finally:
        trainer.optimizer.step = real
    return seen[0], metrics


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--head", action="append", default=[], help="a trained order_policy.pt to start each step from")
    ap.add_argument("--dpo-beta", type=float, default=None, help="DPO's beta (default: the recipe's)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    geometry = ["dpo.num_generations=16", "train.batch_size=16"]
    geometry += [] if args.dpo_beta is None else [f"dpo.beta={args.dpo_beta}"]
    with tempfile.TemporaryDirectory() as out:
        grpo = GRPOTrainer(load_recipe(GRPO, [f"train.output_dir={out}/g"]))
        one = DPOTrainer(load_recipe(DPO, [f"train.output_dir={out}/d1", *geometry, "dpo.pairs_per_prompt=1"]))
        every = DPOTrainer(load_recipe(DPO, [f"train.output_dir={out}/d8", *geometry, "dpo.pairs_per_prompt=8"]))
        initial = {k: v.clone() for k, v in one.ref_order_policy.state_dict().items()}
        heads = [("initial", initial)] + [(h, torch.load(h)["state_dict"]) for h in args.head]
        print(
            "| head | step | reward (GRPO / DPO) | gradient norm: GRPO / DPO 1 pair / DPO all pairs "
            "| cos(GRPO, DPO 1 pair) | cos(GRPO, DPO all pairs) | cos(DPO 1 pair, DPO all pairs) |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, start in heads:
            for step in range(args.steps):
                for tr in (grpo, one, every):
                    tr.order_policy.load_state_dict(start)
                g, mg = head_gradient(grpo, step)
                d1, m1 = head_gradient(one, step)
                d8, _ = head_gradient(every, step)
                print(
                    f"| {name} | {step} | {mg['reward']:.3f} / {m1['reward']:.3f} | {g.norm():.3f} / {d1.norm():.3f} / "
                    f"{d8.norm():.3f} | {cosine(g, d1):.2f} | {cosine(g, d8):.2f} | {cosine(d1, d8):.2f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
