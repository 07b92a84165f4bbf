"""The repository's layout keeps working from a fresh checkout: launches from the repository root, and no
folder or script that Python puts at the head of sys.path shadows an installed package."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, check=False,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


@pytest.mark.parametrize("args", [("-c", "import dllm_rl, transformers.modeling_utils"), ("-m", "dllm_rl", "--help")])
def test_launches_from_the_repository_root(args):
    """`python -m dllm_rl` (torchrun -m, deepspeed --module, accelerate launch -m) puts the root first on
    sys.path; a top-level package folder there would shadow a PyPI package of the same name."""
    proc = _run(*args)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_no_top_level_folder_or_script_shadows_an_installed_module():
    """Top-level folders with an __init__.py (imported by bare name from the root) and the scripts of
    benchmarks/ and examples/ (their folder heads sys.path when they run) must not be named like an
    installed module: `benchmarks/kernels.py` once shadowed the PyPI package `kernels` that transformers imports."""
    ours = [p for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file() and p.name != "dllm_rl"]
    for folder in ("benchmarks", "examples"):
        ours += sorted((ROOT / folder).glob("*.py"))
    local = {ROOT, ROOT / "benchmarks", ROOT / "examples", ROOT / "tests"}
    saved, sys.path = sys.path, [p for p in sys.path if Path(p or ".").resolve() not in local]
    try:
        taken = [str(p.relative_to(ROOT)) for p in ours if importlib.util.find_spec(p.stem) is not None]
    finally:
        sys.path = saved
    assert not taken, f"{taken} shadow installed modules of the same name; rename them"
