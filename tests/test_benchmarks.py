"""The prepared GPU check runs end to end: `benchmarks/gpu_check.sh --tiny` dry-runs every section (correctness,
rollout table, kernels, a GRPO step) on CPU with a tiny model and prints the report's sections."""

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
