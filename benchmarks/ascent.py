"""Is an estimator's gradient an ascent direction for the reward? A line search along the large-batch gradient.

For each (estimator, unmasking order) pair: accumulate the GRPO loss's gradient over many rollouts (no KL, one
update's worth of data, --batches x train.batch_size prompts x num_generations), then move the weights by
alpha * (-g / |g|) and measure the on-policy reward on a fixed set of training prompts (the same prompts and
the same rollout seeds at every alpha: common random numbers, so the differences are far less noisy than the
rewards) and the held-out greedy solve rate. A gradient that points uphill raises the reward at small alpha.
This separates "the estimator points the wrong way" from "the steps are too noisy" when RL does not learn.

    python benchmarks/ascent.py recipes/tiny/countdown-diffu-grpo.yaml      # ~4 minutes per pair, 1 thread

Prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import replace

import torch

PAIRS = {  # name: overrides
    "trajectory (merge 1), low_confidence": [
        "estimator.name=trajectory",
        "estimator.merge_steps=1",
        "rollout.order=low_confidence",
    ],
    "trajectory (merge 1), top_prob": [
        "estimator.name=trajectory",
        "estimator.merge_steps=1",
        "rollout.order=top_prob",
    ],
    "trajectory (merge 1), random": ["estimator.name=trajectory", "estimator.merge_steps=1", "rollout.order=random"],
    "one_step, low_confidence": ["estimator.name=one_step", "rollout.order=low_confidence"],
    "one_step, top_prob": ["estimator.name=one_step", "rollout.order=top_prob"],
}


def gradient(trainer, batches: int) -> list[torch.Tensor]:
    """The loss gradient averaged over `batches` GRPO batches (the trainer's own phases, no optimizer step)."""
    from dllm_rl.runtime import step_generator

    r, model = trainer.recipe, trainer.model
    for s in range(batches):
        examples = [trainer.task.train[i] for i in trainer.sampler.indices(s, r.train.batch_size, 0, 1)]
        batch, prompts = trainer.rollout(examples, s)
        rewards, _, _ = trainer.reward(batch, prompts, examples, s)
        batch.rewards, batch.advantages = rewards, trainer.advantages(rewards)
        noise = trainer.draw_noise(batch, batch, step_generator(r.train.seed, s, "noise"))
        loss, _ = trainer.loss(batch, noise)
        (loss / batches).backward()
    return [p.grad.detach().clone() for p in model.parameters() if p.requires_grad]


def line_search(
    recipe_path: str, overrides: list[str], batches: int, alphas: list[float], prompts: int, samples: int
) -> dict:
    from dllm_rl.config import load_recipe
    from dllm_rl.evaluate import evaluate
    from dllm_rl.trainers.grpo import GRPOTrainer

    out_dir = tempfile.mkdtemp(prefix="ascent-")
    r = load_recipe(recipe_path, [*overrides, "grpo.beta=0", f"train.output_dir={out_dir}", "train.resume=false"])
    trainer = GRPOTrainer(r)
    g = gradient(trainer, batches)
    norm = torch.sqrt(sum((x.float() ** 2).sum() for x in g))
    params = [p for p in trainer.model.parameters() if p.requires_grad]
    theta = [p.detach().clone() for p in params]
    task = trainer.task
    probe = task.train.select(range(len(task.train) - prompts, len(task.train)))  # fixed (batches may share a few)
    rewards, heldout = [], []
    for alpha in [0.0, *alphas]:
        with torch.no_grad():
            for p, t, d in zip(params, theta, g):
                p.copy_(t - alpha * d / norm)
        rewards.append(
            evaluate(trainer.model, trainer.tokenizer, probe, task.reward, r.rollout, seed=123, num_samples=samples)[
                "accuracy"
            ]
        )
        heldout.append(
            evaluate(
                trainer.model, trainer.tokenizer, task.eval, task.reward, replace(r.rollout, temperature=0.0), seed=0
            )["accuracy"]
        )
        print(
            f"  alpha {alpha}: on-policy reward {rewards[-1]:.4f}, held-out greedy {heldout[-1]:.3f}",
            file=sys.stderr,
            flush=True,
        )
    return {"rewards": rewards, "heldout": heldout}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe")
    p.add_argument("--batches", type=int, default=8, help="GRPO batches averaged into the gradient")
    p.add_argument("--alphas", default="0.03,0.1,0.3", help="step lengths (L2 norm of the weight change)")
    p.add_argument("--prompts", type=int, default=256, help="training prompts the on-policy reward is measured on")
    p.add_argument("--samples", type=int, default=4, help="rollouts per probe prompt")
    p.add_argument("--pairs", default="all", help="comma-separated substrings of the pair names")
    p.add_argument("overrides", nargs="*", help="recipe overrides applied to every pair (key=value)")
    args = p.parse_intermixed_args()
    alphas = [float(a) for a in args.alphas.split(",")]
    names = [n for n in PAIRS if args.pairs == "all" or any(s in n for s in args.pairs.split(","))]
    rows = []
    for name in names:
        print(name, file=sys.stderr, flush=True)
        rows.append(
            (
                name,
                line_search(
                    args.recipe, [*args.overrides, *PAIRS[name]], args.batches, alphas, args.prompts, args.samples
                ),
            )
        )
    print(
        f"\n{args.recipe} {' '.join(args.overrides)}; gradient over {args.batches} batches; on-policy reward on "
        f"{args.prompts} training prompts x {args.samples} rollouts (same seeds at every alpha); torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads\n"
    )
    head = " | ".join(f"alpha {a}" for a in alphas)
    print(f"| estimator, order | reward at 0 | {head} | held-out greedy at 0 / {alphas[-1]} |")
    print("|---|---|" + "---|" * len(alphas) + "---|")
    for name, res in rows:
        r0 = res["rewards"][0]
        deltas = " | ".join(f"{v - r0:+.4f}" for v in res["rewards"][1:])
        print(f"| {name} | {r0:.4f} | {deltas} | {res['heldout'][0]:.3f} / {res['heldout'][-1]:.3f} |")


if __name__ == "__main__":
    main()
