"""Two or more training recipes at equal wall time: each runs as `dllm-rl train` on one thread, all at once (so
they share the machine's load alike), and the table gives each run's held-out accuracy against its own training
seconds (the logged seconds of its phases: evaluations, checkpoints and start-up excluded), its whole-run seconds
per step, and each run's held-out accuracy at the training time of the shortest run.

    python benchmarks/equal_time.py --work outputs/equal-time \
        "recipes/tiny/sudoku-dpo.yaml train.eval_steps=25" \
        "recipes/tiny/sudoku-tokens-grpo.yaml train.max_steps=50 train.eval_steps=10"

A run whose final/ is already in WORK is not run again (the table is rebuilt from its metrics).
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

from dllm_rl.metrics import training_curve

ROOT = Path(__file__).resolve().parents[1]


def train_all(runs: list[tuple[str, Path]], work: Path, workers: int | None = None) -> None:
    """Train each (spec "RECIPE [override ...]", output dir) as `dllm-rl train` on one thread, `workers` at a time
    (all at once when None); a run whose final/ exists is skipped. Logs go to WORK/<output dir name>.log, the spec
    to WORK/<output dir name>.spec, so that a folder holding another spec's run is refused, not taken as done."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for spec, out in runs:
        held = work / f"{out.name}.spec"
        if held.is_file() and held.read_text() != spec:
            print(
                f"{out} holds a run of {held.read_text()!r}, not of {spec!r}: pick another --work folder "
                f"(or remove {out} and {held})",
                file=sys.stderr,
            )
            raise SystemExit(2)
    todo = [(spec, out) for spec, out in runs if not (out / "final").is_dir()]
    running = []
    while todo or running:
        while todo and (workers is None or len(running) < workers):
            spec, out = todo.pop(0)
            recipe, *over = shlex.split(spec)
            cmd = [sys.executable, "-m", "dllm_rl", "train", recipe, *over, f"train.output_dir={out}"]
            cmd.append("train.num_threads=1")
            print("$ dllm-rl " + " ".join(cmd[3:]), file=sys.stderr, flush=True)
            (work / f"{out.name}.spec").write_text(spec)
            log = open(work / f"{out.name}.log", "w")
            running.append((spec, subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)))
        time.sleep(1)
        for spec, proc in [x for x in running if x[1].poll() is not None]:
            running.remove((spec, proc))
            if proc.returncode:
                raise SystemExit(f"{spec} failed (exit {proc.returncode}); see its log in {work}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help='"RECIPE [override ...]", one quoted argument per run')
    p.add_argument("--work", default="outputs/equal-time")
    a = p.parse_args()
    work = (ROOT / a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    runs = [(spec, work / f"run{i}") for i, spec in enumerate(a.runs)]
    train_all(runs, work)
    curves = {spec: training_curve(out) for spec, out in runs}
    budget = min(c[-1][1] for c in curves.values())
    print(
        "| run | held-out at (step, training seconds) | seconds per step, whole run | at the shortest run's "
        f"{budget:.0f} s |"
    )
    print("|---|---|---|---|")
    for spec, c in curves.items():
        at = [x for x in c if x[1] <= budget * 1.02] or c[:1]
        points = "; ".join(f"{acc:.3f} ({s}, {t:.0f} s)" for s, t, acc in c)
        print(f"| `{spec}` | {points} | {c[-1][1] / max(c[-1][0], 1):.2f} | {at[-1][2]:.3f} (step {at[-1][0]}) |")


if __name__ == "__main__":
    main()
