"""The prepared GPU check runs end to end: `benchmarks/gpu_check.sh --tiny` dry-runs every section (correctness,
rollout table, kernels, a GRPO step) on CPU with a tiny model and prints the report's sections."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    proc = subprocess.run(
        ["bash", str(ROOT / "benchmarks/gpu_check.sh"), "--tiny"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**os.environ, "PYTHON": sys.executable, "OUT": str(tmp_path)},
        timeout=900,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = (tmp_path / "gpu_check.md").read_text()
    for heading in ("## 1. Correctness", "## 2. Rollout", "## 3. One GRPO step", "## 4. Kernels"):
        assert heading in report
    assert "FAILED" not in report, report
    assert "same tokens True" in report and "| whole step |" in report


def test_training_curve_counts_each_window_at_its_mean_and_skips_evaluations(tmp_path):
    """The equal-wall-time clock (benchmarks/equal_time.py, hybrid_axes.py): each logged window's mean seconds
    per phase times the steps of the window; evaluations add no time."""
    from dllm_rl.metrics import training_curve

    rows = [
        {"step": 0, "eval_accuracy": 0.5},
        {"step": 10, "seconds/rollout": 1.0, "seconds/update": 2.0, "loss": 0.1},
        {"step": 10, "eval_accuracy": 0.6},
        {"step": 15, "seconds/rollout": 0.5, "seconds/update": 0.5},
        {"step": 15, "eval_accuracy": 0.7},
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert training_curve(tmp_path) == [(0, 0.0, 0.5), (10, 30.0, 0.6), (15, 35.0, 0.7)]


def test_seeds_table_means_standard_errors_and_difference(tmp_path):
    """benchmarks/seeds.py on finished runs (final/ present, so nothing trains): the mean curve over seeds, each
    seed's final accuracy, mean +- standard error, and the difference of two runs with its standard error."""
    finals = {0: [0.5, 0.6, 0.7], 1: [0.6, 0.6, 0.9]}
    for run, accs in finals.items():
        for seed, acc in enumerate(accs):
            d = tmp_path / f"run{run}-seed{seed}"
            (d / "final").mkdir(parents=True)
            rows = [{"step": 0, "eval_accuracy": 0.4}, {"step": 5, "eval_accuracy": acc}]
            (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    seeds = [sys.executable, str(ROOT / "benchmarks/seeds.py"), "--seeds", "3", "--work", str(tmp_path)]
    proc = subprocess.run([*seeds, "a.yaml", "b.yaml"], capture_output=True, text=True, check=True, timeout=120)
    out = proc.stdout
    # run 0: mean 0.6, sd 0.1, SE 0.1/sqrt(3) = 0.0577; run 1: mean 0.7, sd 0.1732, SE 0.1
    assert "| `a.yaml` | 0.400 (0) / 0.600 (5) | 0.500, 0.600, 0.700 | 0.600 +- 0.058 | +20.0 points |" in out
    assert "| `b.yaml` | 0.400 (0) / 0.700 (5) | 0.600, 0.600, 0.900 | 0.700 +- 0.100 | +30.0 points |" in out
    assert "second - first: +10.0 +- 11.5 points" in out  # hypot(5.77, 10.0) = 11.55
    assert not proc.stderr.count("$ dllm-rl")  # finished runs are not trained again
    (tmp_path / "run1-seed0.spec").write_text("b.yaml optim.lr=1e-3")  # the folder holds another spec's run
    again = subprocess.run([*seeds, "a.yaml", "b.yaml"], capture_output=True, text=True, timeout=120)
    assert (
        again.returncode == 2 and "holds a run of 'b.yaml optim.lr=1e-3', not of 'b.yaml train.seed=0'" in again.stderr
    )


def test_order_spread_splits_the_mean_into_solved_and_unsolved_rollouts():
    """benchmarks/order_spread.py on the shipped Sudoku model: the mean order log-prob over all rollouts is the
    reward-weighted mix of its solved and unsolved means (the 0/1 verifier's mean reward is the solved share)."""
    cmd = [sys.executable, str(ROOT / "benchmarks/order_spread.py"), str(ROOT / "checkpoints/tiny/sudoku-sft-multi")]
    proc = subprocess.run([*cmd, "--prompts", "4", "--samples", "8"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = [line for line in proc.stdout.splitlines() if line.startswith("| `")]
    assert len(row) == 1, proc.stdout
    _, head, everything, split, reward = [c.strip() for c in row[0].strip("|").split("|")]
    solved, unsolved = (float(x) for x in split.split(" / "))  # this model solves some of 32 rollouts, not all
    p = float(reward)
    assert head == "fresh" and 0 < p < 1 and solved < 0 and unsolved < 0
    assert float(everything) == pytest.approx(p * solved + (1 - p) * unsolved, abs=0.011)


def test_heldout_sets_scores_each_set_and_the_paired_gain():
    """benchmarks/heldout_sets.py: per-set accuracies of two shipped Sudoku models on independent held-out sets,
    'all' is their mean (equal sizes) and the gain is the difference of the 'all' columns."""
    cmd = [sys.executable, str(ROOT / "benchmarks/heldout_sets.py"), str(ROOT / "recipes/tiny/sudoku-dpo.yaml")]
    ckpts = [str(ROOT / "checkpoints/tiny/sudoku-sft"), str(ROOT / "checkpoints/tiny/sudoku-sft-multi")]
    proc = subprocess.run(
        [*cmd, *ckpts, "--sets", "1", "2", "--size", "24", "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [
        [c.strip() for c in line.strip("|").split("|")] for line in proc.stdout.splitlines() if "checkpoints/" in line
    ]
    assert [r[0] for r in rows] == ckpts and rows[0][4] == ""
    (a1, a2, a_all), (b1, b2, b_all) = ([float(x) for x in r[1:4]] for r in rows)
    assert a_all == pytest.approx((a1 + a2) / 2, abs=1e-3) and b_all == pytest.approx((b1 + b2) / 2, abs=1e-3)
    gain, se = rows[1][4].rstrip(")").split(" (")
    assert float(gain) == pytest.approx(100 * (b_all - a_all), abs=0.11) and float(se) >= 0


def test_rollout_modes_without_the_reference_are_refused():
    """Every speedup in benchmarks/rollout.py is a ratio against the reference sampler measured in the same run:
    a --modes list that leaves it out is refused before anything runs (it was silently the first mode)."""
    cmd = [sys.executable, str(ROOT / "benchmarks" / "rollout.py"), "--modes", "exact block"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "must include 'reference'" in proc.stderr
