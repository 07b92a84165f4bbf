"""Every Python example of the README runs as a script and prints what its `# prints:` comments claim.

Each ```python block is written to a file and run from a fresh directory that sees the repository's recipes/,
checkpoints/ and examples/ (so its outputs/ land in a temporary directory). The TRL block of "Coming from TRL"
is TRL's own trainer on an autoregressive hub model (no network here) and is not run; its dllm-rl twin is.
Blocks that train are marked slow (tests/trainers/test_trl_api.py runs the same TRL-style script by default).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
TRL_ONLY = "from trl import GRPOConfig, GRPOTrainer"  # TRL's trainer itself: not run here

# what each block prints (checked line by line), keyed by a line that identifies the block
CLAIMS = {
    "def starts_with_one": [r"\{'before': 0\.\d+, 'after': 0\.\d+, 'final': 'outputs/readme/final'\}"],
    "from dllm_rl import RolloutConfig, generate": [
        r"[1-4]{4}",
        r"[1-4]{4}",
        r"[1-4]{4}",
        r"[1-4]{4}",
        r"\[(\d, ){19}\d\]",
        r"\[(-\d\.\d+(e-\d+)?, ){19}-\d\.\d+(e-\d+)?\]",
    ],
    "# my_rewards.py": [r"\[1\.0, 0\.0\]"],
    "from dllm_rl import GRPOTrainer  # changed": [
        r"\{'before': None, 'after': None, 'final': 'outputs/coming-from-trl/final'\}",
        r"1 dapo",
    ],
}


def runnable():
    for block in BLOCKS:
        if TRL_ONLY in block:
            continue
        key = next((k for k in CLAIMS if k in block), None)
        trains = ".train()" in block
        yield pytest.param(block, key, id=key or block.splitlines()[0], marks=[pytest.mark.slow] if trains else [])


def test_every_runnable_block_has_its_claims():
    keys = [next((k for k in CLAIMS if k in b), None) for b in BLOCKS if TRL_ONLY not in b]
    assert None not in keys and sorted(keys) == sorted(CLAIMS), "add the new README block's output to CLAIMS"
    assert sum(TRL_ONLY in b for b in BLOCKS) == 1


@pytest.mark.parametrize("block, key", list(runnable()))
def test_the_block_prints_what_it_claims(block, key, tmp_path):
    for name in ("recipes", "checkpoints", "examples"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "block.py").write_text(block)
    proc = subprocess.run(
        [sys.executable, "block.py"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = [line for line in proc.stdout.splitlines() if line.strip()]
    claims = CLAIMS[key]
    assert len(printed) >= len(claims), proc.stdout
    for pattern, line in zip(claims, printed[-len(claims) :]):
        assert re.fullmatch(pattern, line.strip()), (pattern, line)
