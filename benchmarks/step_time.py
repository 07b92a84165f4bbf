"""Seconds per training step of two recipes, measured in one process with their steps interleaved.

On a shared machine the load changes from minute to minute; running the two trainers' steps alternately (A, B,
A, B, ...) gives both the same conditions, so the ratio holds even when the absolute figures do not. Used to put
a DPO run and a GRPO run from the same start on one wall-clock axis (RESULTS.md, "DPO").

    python benchmarks/step_time.py recipes/tiny/sudoku-dpo.yaml recipes/tiny/sudoku-tokens-grpo.yaml [--steps 6]
    python benchmarks/step_time.py "recipes/tiny/sudoku-dpo.yaml dpo.loss_type=sigmoid" \\
        recipes/tiny/sudoku-diffu-grpo.yaml

Each recipe argument is a path, optionally followed (in the same quoted argument) by KEY=VALUE overrides.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from dllm_rl.config import load_recipe
from dllm_rl.trainers import trainer_class


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipes", nargs=2, help='"RECIPE [KEY=VALUE ...]", twice')
    ap.add_argument("--steps", type=int, default=6, help="steps of each, after one warm-up step each")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        trainers = []
        for i, spec in enumerate(args.recipes):
            path, *overrides = spec.split()
            r = load_recipe(path, [*overrides, f"train.output_dir={out}/{i}", "train.resume=false"])
            trainers.append(trainer_class(r.algorithm)(r))
        seconds = [[], []]
        for step in range(args.steps + 1):
            for i, tr in enumerate(trainers):
                t0 = time.perf_counter()
                tr.step(step)
                if step:  # step 0 warms up (allocations, first-call overheads)
                    seconds[i].append(time.perf_counter() - t0)
    mean = [sum(s) / len(s) for s in seconds]
    for path, m, s in zip(args.recipes, mean, seconds):
        print(f"{path}: {m:.2f} s/step over {len(s)} steps ({', '.join(f'{x:.1f}' for x in s)})")
    print(f"ratio {args.recipes[0]} / {args.recipes[1]}: {mean[0] / mean[1]:.2f}")


if __name__ == "__main__":
    main()
