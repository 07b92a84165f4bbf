"""Consensus distillation on 4x4 Sudoku (recipes/tiny/sudoku-consensus.yaml): does training one decode toward the
majority vote of eight plateau, and which design choice decides it? Each variant runs from the same checkpoint,
seed and prompts; the table gives the held-out greedy solve rate at each evaluation and, per round, what the
vote produced (kept share, winning share, accuracy of the distilled answers, distinct answers, pass@8).

    python benchmarks/consensus.py --steps 100          # 11 minutes on a shared 2-core machine
    python benchmarks/consensus.py --steps 100 --override "model.lora={r: 8, alpha: 16}"   # as a LoRA
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RECIPE = "recipes/tiny/sudoku-consensus.yaml"
VARIANTS = {
    "online votes, up to 4 distinct majority paths (the recipe)": [],
    "frozen votes (the initial model's, every round)": ["consensus.teacher=initial"],
    "the model's own greedy decode (no vote)": ["consensus.target=greedy"],
}


def run(name: str, overrides: list[str], steps: int, out: Path) -> dict:
    args = [
        sys.executable,
        "-m",
        "dllm_rl",
        "train",
        RECIPE,
        f"train.max_steps={steps}",
        f"train.output_dir={out}",
        "train.save_steps=0",
        "train.resume=false",
        *overrides,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [(r["step"], r["eval_accuracy"]) for r in rows if "eval_accuracy" in r]
    rounds = [r for r in rows if "consensus/kept" in r]
    return {"name": name, "evals": evals, "rounds": rounds}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--only", default="")
    p.add_argument("--override", action="append", default=[], help="a recipe override for every variant")
    a = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="dllm-rl-consensus-"))
    results = []
    for i, (name, over) in enumerate(VARIANTS.items()):
        if a.only and a.only not in name:
            continue
        results.append(run(name, [*a.override, *over], a.steps, work / str(i)))
        print(results[-1], file=sys.stderr, flush=True)
    print("| variant | held-out greedy at steps " + ", ".join(str(s) for s, _ in results[0]["evals"]) + " |")
    print("|---|---|")
    for r in results:
        print(f"| {r['name']} | " + " / ".join(f"{acc:.3f}" for _, acc in r["evals"]) + " |")
    keys = ["consensus/kept", "consensus/vote_share", "consensus/target_accuracy", "consensus/distinct_answers"]
    print("\n| variant | window (step) | kept | winning share | distilled answers right | distinct answers | pass@8 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for row in r["rounds"]:
            cells = " | ".join(f"{row.get(k, float('nan')):.3f}" for k in keys + ["consensus/pass@8"])
            print(f"| {r['name']} | {row['step']} | {cells} |")


if __name__ == "__main__":
    main()
