"""Estimator comparison on the tiny Sudoku demo: held-out solve rate after N steps, seconds per step and the
estimator's standard deviation, for every likelihood estimator, all from the same SFT checkpoint, seed and
data order (one `dllm-rl train` subprocess each).

    python benchmarks/estimators.py --steps 100            # ~ minutes per estimator on 2 CPU cores
    python benchmarks/estimators.py --recipe recipes/tiny/sudoku-d1-grpo.yaml --steps 20   # d1's setting

Prints a markdown table for benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from dllm_rl.config import load_recipe

ROOT = Path(__file__).resolve().parents[1]
MAIN = ROOT / "recipes/tiny/sudoku-tokens-grpo.yaml"  # GRPO on the tokens (the main job before 2026-11-24)

VARIANTS = {  # name: overrides on top of the token-GRPO recipe
    "one_step (d1)": ["estimator.name=one_step"],
    "elbo, 2 timesteps (VRPO allocation)": ["estimator.name=elbo", "estimator.num_samples=2"],
    "elbo, coupled (DiffuCoder)": ["estimator.name=elbo", "estimator.coupled=true"],
    "block_elbo + spg loss (SPG)": [
        "estimator.name=block_elbo",
        "estimator.num_samples=2",
        "grpo.loss_type=spg",
        "grpo.beta=0",
    ],
    "trajectory, merge 1": ["estimator.name=trajectory", "estimator.merge_steps=1"],
    "trajectory, merge 2 (TraceRL)": ["estimator.name=trajectory", "estimator.merge_steps=2"],
    "one_step + wd1 loss": ["estimator.name=one_step", "grpo.loss_type=wd1", "grpo.beta=0"],
}


def run(recipe: Path, name: str, overrides: list[str], steps: int, out: Path) -> dict:
    model = ROOT / load_recipe(recipe).model.path  # the recipe's checkpoint, made absolute
    args = [
        sys.executable,
        "-m",
        "dllm_rl",
        "train",
        str(recipe),
        f"train.max_steps={steps}",
        f"train.output_dir={out}",
        "train.save_steps=0",
        f"train.eval_steps={steps}",
        f"train.logging_steps={max(1, steps // 10)}",
        "train.resume=false",
        f"model.path={model}",
        *overrides,
    ]  # run from a temp dir (see cwd)
    proc = subprocess.run(
        args,
        cwd=tempfile.gettempdir(),
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    if proc.returncode and "loss is not finite" not in proc.stderr:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "eval_accuracy" in r]
    logged = [r for r in rows if "seconds/update" in r]
    per_step = [sum(r[k] for k in r if k.startswith("seconds/")) for r in logged]
    std = [r["estimator_std"] for r in logged if "estimator_std" in r]
    if proc.returncode:  # the trainer stopped on an overflow: a result for the table, not a crash of the script
        last = logged[-1]["step"] if logged else 0
        return {
            "name": f"{name} (stopped after step {last}: non-finite loss)",
            "before": evals[0]["eval_accuracy"],
            "after": float("nan"),
            "s_per_step": statistics.median(per_step) if per_step else float("nan"),
            "estimator_std": float("nan"),
            "train_reward": logged[-1]["reward"] if logged else float("nan"),
        }
    return {
        "name": name,
        "before": evals[0]["eval_accuracy"],
        "after": evals[-1]["eval_accuracy"],
        "s_per_step": statistics.median(per_step),
        "estimator_std": statistics.mean(std) if std else 0.0,
        "train_reward": logged[-1]["reward"],
    }


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", type=Path, default=MAIN, help="the GRPO recipe the variants override")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--only", default="", help="comma-separated substrings of variant names")
    p.add_argument("--workdir", default=None)
    a = p.parse_args()
    recipe = a.recipe.resolve()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="dllm-rl-estimators-"))
    est = load_recipe(recipe).estimator
    rows = []
    for i, (name, overrides) in enumerate(VARIANTS.items()):
        if a.only and not any(s in name for s in a.only.split(",")):
            continue
        if name == f"trajectory, merge {est.merge_steps}" and est.name == "trajectory":
            name += " (the recipe's own)"
        rows.append(run(recipe, name, overrides, a.steps, work / str(i)))
        print(f"{name}: {rows[-1]}", file=sys.stderr)
    print(f"\n{a.steps} GRPO steps, recipe {recipe.relative_to(ROOT)} (its checkpoint, seed and data order)\n")
    print(
        "| estimator | held-out before | held-out after | seconds / step | estimator std (nats) | train reward (last) |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['name']} | {r['before']:.3f} | {r['after']:.3f} | {r['s_per_step']:.2f} | "
            f"{r['estimator_std']:.2f} | {r['train_reward']:.3f} |"
        )


if __name__ == "__main__":
    main()
