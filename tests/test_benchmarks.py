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
