"""The hybrid planner -> diffusion executor on 4x4 Sudoku: the three axes before and after fine-tuning, and
whether RL with the planner in the loop beats executor-only GRPO at equal wall time.

Stages (each skipped when its output is already in the work directory, so the script can be resumed):
  1. axes of the shipped SFT executor (checkpoints/tiny/sudoku-sft) with the shipped tiny planner
  2. the prefix-robustness LoRA (recipes/tiny/sudoku-prefix-lora.yaml) and its control (the same SFT on bare
     prompts only), and the axes of both
  3. GRPO from the prefix LoRA (recipes/tiny/sudoku-hybrid-grpo.yaml): executor-only (no plan), with the
     frozen planner's plans, and jointly with the planner, trained side by side (one load for the three clocks);
     held-out accuracy against training seconds, and the axes after each
Every command is a `dllm-rl` command line (printed), run in its own process with one thread.

    python benchmarks/hybrid_axes.py --work outputs/hybrid-bench            # hours on a shared 2-core machine
    python benchmarks/hybrid_axes.py --work outputs/hybrid-bench --stages 1   # the start's axes (~20 min, busy CPU)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from dllm_rl.metrics import training_curve

ROOT = Path(__file__).resolve().parents[1]
LORA = "recipes/tiny/sudoku-prefix-lora.yaml"
GRPO = "recipes/tiny/sudoku-hybrid-grpo.yaml"
RL_VARIANTS = {
    "executor-only GRPO (no plan)": ["hybrid.plan=none"],
    "GRPO with the frozen planner's plans": [],
    "joint GRPO (planner trained, plans sampled at T=1)": [
        "hybrid.planner.train=true",
        "hybrid.planner.temperature=1.0",
    ],
}


def start(log: Path, *args: str) -> tuple[subprocess.Popen, Path, Path, float]:
    """Start one dllm-rl command on one thread (stdout and stderr to `log`.part, renamed into place on success:
    a failed stage is rerun)."""
    print("$ dllm-rl " + " ".join(args), file=sys.stderr, flush=True)
    part = log.with_name(log.name + ".part")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    with open(part, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "dllm_rl", *args], cwd=ROOT, stdout=f, stderr=f, env=env)
    return proc, part, log, time.perf_counter()


def finish(started) -> float:
    """Wait for a started command; its wall seconds."""
    proc, part, log, t0 = started
    if proc.wait():
        raise SystemExit(f"{' '.join(proc.args)} failed:\n{part.read_text()[-3000:]}")
    part.rename(log)
    return time.perf_counter() - t0


def dllm_rl(log: Path, *args: str) -> float:
    """Run one dllm-rl command (output to `log`); returns its wall seconds."""
    return finish(start(log, *args))


def axes(work: Path, name: str, recipe: str, checkpoint: str, samples: int, *over: str) -> str:
    out = work / f"axes-{name}.md"
    if not out.exists():
        dllm_rl(out, "eval", recipe, "--checkpoint", checkpoint, "--hybrid-axes", "--samples", str(samples), *over)
    return out.read_text()


def train(work: Path, name: str, recipe: str, *over: str) -> Path:
    run = work / name
    if not (run / "final").is_dir():
        seconds = dllm_rl(work / f"train-{name}.log", "train", recipe, f"train.output_dir={run}", *over)
        (work / f"train-{name}.seconds").write_text(f"{seconds:.1f}")
    return run


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="outputs/hybrid-bench")
    p.add_argument("--stages", default="1,2,3")
    p.add_argument("--samples", type=int, default=8, help="samples per question for the diversity axis")
    p.add_argument("--rl-steps", type=int, default=60)
    p.add_argument("--lora", help="stage 3's start (default: WORK/lora, stage 2's prefix LoRA)")
    p.add_argument("--rl-override", action="append", default=[], help="a recipe override for every RL variant")
    a = p.parse_args()
    work = (ROOT / a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    stages = {int(s) for s in a.stages.split(",")}
    report = []
    if 1 in stages:
        report += ["## Shipped SFT executor", axes(work, "sft", LORA, "checkpoints/tiny/sudoku-sft", a.samples)]
    if 2 in stages:
        lora = train(work, "lora", LORA)
        plain = train(work, "lora-plain", LORA, "hybrid.sft_plans=[none]")
        report += ["## Prefix-robustness LoRA", axes(work, "lora", LORA, str(lora), a.samples)]
        report += [
            "## Control: the same LoRA SFT on bare prompts",
            axes(work, "lora-plain", LORA, str(plain), a.samples),
        ]
    if 3 in stages:
        lora = a.lora or work / "lora"
        variants = {name: [*a.rl_override, *over] for name, over in RL_VARIANTS.items()}
        started = {}  # the RL runs train side by side, so that their training seconds share one load
        for i, (name, over) in enumerate(variants.items()):
            run = work / f"rl{i}"
            if not (run / "final").is_dir():
                steps = f"train.max_steps={a.rl_steps}"
                started[i] = start(work / f"train-rl{i}.log", "train", GRPO, f"train.output_dir={run}",
                                   f"model.path={lora}", steps, *over)  # fmt: skip
        for i, s in started.items():
            (work / f"train-rl{i}.seconds").write_text(f"{finish(s):.1f}")
        curves = {}
        for i, (name, over) in enumerate(variants.items()):
            curves[name] = training_curve(work / f"rl{i}")
            report += [f"## After {name}", axes(work, f"rl{i}", GRPO, str(work / f"rl{i}"), a.samples, *over)]
        table = ["| variant | (step, seconds, held-out) at each evaluation |", "|---|---|"]
        table += [
            f"| {n} | " + "; ".join(f"{s}, {t:.0f} s, {acc:.3f}" for s, t, acc in c) + " |" for n, c in curves.items()
        ]
        budget = min(c[-1][1] for c in curves.values())
        at = [f"At equal wall time ({budget:.0f} s of training, the shortest run's):"]
        for n, c in curves.items():
            best = [x for x in c if x[1] <= budget * 1.05] or c[:1]
            at.append(f"- {n}: {best[-1][2]:.3f} (step {best[-1][0]})")
        report += ["## Held-out accuracy against training seconds (each in its own plan condition)"]
        report += ["\n".join(table), "\n".join(at)]
    text = "\n\n".join(report)
    (work / "report.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
