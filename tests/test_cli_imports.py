"""The command line answers at once: help and recipe errors import neither torch nor transformers nor the trainers
(checked with `python -X importtime`, which lists every module a process imports; not a timing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "transformers", "accelerate", "datasets", "trl", "peft", "dllm_rl.trainers", "dllm_rl.models")


def imported(*args: str) -> tuple[set[str], subprocess.CompletedProcess]:
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "dllm_rl", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    modules = {line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    return modules, proc


@pytest.mark.parametrize(
    "args, code, says",
    [
        (["--help"], 0, "train"),
        (["train", "--help"], 0, "overrides"),
        (["train", "recipes/tiny/sudoku-sft.yaml", "optim.lrr=1"], 2, "unknown key 'optim.lrr'"),
        (["train", "no/such/recipe.yaml"], 2, "does not exist"),
    ],
)
def test_help_and_recipe_errors_import_nothing_heavy(args, code, says):
    modules, proc = imported(*args)
    assert proc.returncode == code, proc.stderr[-2000:]
    assert says in proc.stdout + proc.stderr
    assert "dllm_rl.cli" in modules  # the listing works
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY or m.startswith(HEAVY))
    assert not heavy, heavy
