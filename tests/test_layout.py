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
    return subprocess.run(
        [sys.executable, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


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


# The floors of DESIGN.md, bottom first: a module imports only from its own floor or below (at module level
# or inside a function alike), and the package-level import graph has no cycle.
FLOORS = [
    {"errors", "config", "batches", "counter_rng", "rundir", "trl_args", "evalstats", "cost_proxies"},
    {"models", "kernels"},
    {"rollout", "policy", "estimators", "algorithms", "rewards", "tasks"},
    {"runtime", "checkpoint", "metrics", "evaluate", "memory", "trainers", "validate", "axes"},
    {"cli", "__main__", "__init__"},
]


def _imports():
    """(importing unit, imported unit, where) for every import of a dllm_rl module by another, read with ast."""
    import ast

    pkg = ROOT / "dllm_rl"
    for f in sorted(pkg.rglob("*.py")):
        rel = f.relative_to(pkg).with_suffix("").parts
        unit = rel[0]
        here = ["dllm_rl", *rel[:-1]] if rel[-1] != "__init__" else ["dllm_rl", *rel[:-1]]
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                names = [target] + ([f"{target}.{a.name}" for a in node.names] if not node.module else [])
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for t in names:
                parts = t.split(".")
                if parts[0] == "dllm_rl" and len(parts) > 1 and parts[1] != unit:
                    yield unit, parts[1], f"{f.relative_to(ROOT)}:{node.lineno}"


def _floor(unit: str) -> int:
    found = [i for i, units in enumerate(FLOORS) if unit in units]
    assert found, f"dllm_rl/{unit} is on no floor of tests/test_layout.py FLOORS; add it where it belongs"
    return found[0]


def test_imports_go_down_the_floors_only():
    upward = [
        f"{where}: {a} (floor {_floor(a)}) imports {b} (floor {_floor(b)})"
        for a, b, where in _imports()
        if _floor(b) > _floor(a)
    ]
    assert not upward, "imports that go up a floor:\n" + "\n".join(upward)


def test_package_imports_have_no_cycle():
    edges: dict[str, set] = {}
    for a, b, _ in _imports():
        edges.setdefault(a, set()).add(b)

    def reach(start):
        seen, todo = set(), [start]
        while todo:
            for nxt in edges.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        return seen

    cycles = sorted(a for a in edges if a in reach(a))
    assert not cycles, f"units on an import cycle: {cycles}"
