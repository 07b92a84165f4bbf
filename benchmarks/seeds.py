"""A recipe over several training seeds, to tell a change from run-to-run divergence: each "RECIPE [override ...]" runs
with train.seed = FIRST..FIRST+N-1 (`dllm-rl train`, one thread each, --workers at a time), and the table gives, per
run, the held-out accuracy at each evaluation step as the mean over seeds, the final accuracy of every seed, their
mean with its standard error, and, for two runs, the difference of the means with the standard error of that
difference (independent seeds).

    python benchmarks/seeds.py --seeds 5 --work outputs/seeds \\
        "recipes/tiny/sudoku-dpo.yaml train.eval_steps=25" \\
        "recipes/tiny/sudoku-dpo.yaml train.eval_steps=25 dpo.greedy_candidate=true"

A run whose final/ is already in WORK is not run again (the table is rebuilt from its metrics), so more seeds
can be added later: `--first 5 --seeds 5` trains seeds 5-9 beside seeds 0-4's outputs, `--first 0 --seeds 10`
then tabulates all ten.
"""

from __future__ import annotations

import argparse
import math
import statistics

from equal_time import ROOT, train_all

from dllm_rl.metrics import training_curve


def mean_se(xs: list[float]) -> tuple[float, float]:
    return statistics.mean(xs), (statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan"))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help='"RECIPE [override ...]", one quoted argument per run')
    p.add_argument("--seeds", type=int, default=5, help="how many seeds: train.seed = first .. first+seeds-1")
    p.add_argument("--first", type=int, default=0, help="the first train.seed")
    p.add_argument("--workers", type=int, default=2, help="trainings at a time (one thread each)")
    p.add_argument("--work", default="outputs/seeds")
    a = p.parse_args()
    work = (ROOT / a.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    seeds = range(a.first, a.first + a.seeds)
    outs = {spec: [work / f"run{i}-seed{s}" for s in seeds] for i, spec in enumerate(a.runs)}
    # seed-major order: the runs' seed s train side by side, so each run meets the same loads
    train_all(
        [(f"{spec} train.seed={s}", outs[spec][k]) for k, s in enumerate(seeds) for spec in a.runs], work, a.workers
    )
    finals = {}
    print("| run | held-out at step (mean over seeds) | final, per seed | final: mean +- SE | gain over the start |")
    print("|---|---|---|---|---|")
    for spec, dirs in outs.items():
        curves = [{step: acc for step, _, acc in training_curve(d)} for d in dirs]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        start, last = steps[0], steps[-1]
        finals[spec] = [c[last] for c in curves]
        m, se = mean_se(finals[spec])
        at = " / ".join(f"{statistics.mean(c[s] for c in curves):.3f} ({s})" for s in steps)
        per = ", ".join(f"{x:.3f}" for x in finals[spec])
        gain = 100 * (m - statistics.mean(c[start] for c in curves))
        print(f"| `{spec}` | {at} | {per} | {m:.3f} +- {se:.3f} | {gain:+.1f} points |")
    if len(a.runs) == 2:
        (m0, s0), (m1, s1) = (mean_se(finals[spec]) for spec in a.runs)
        print(
            f"\nsecond - first: {100 * (m1 - m0):+.1f} +- {100 * math.hypot(s0, s1):.1f} points (SE of the difference)"
        )


if __name__ == "__main__":
    main()
