"""Every example in examples/ runs as a user would run it, from the repository root, and prints what it claims."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, timeout: int = 600) -> str:
    proc = subprocess.run(
        list(args),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_python_trainer_api(tmp_path):
    out = run(sys.executable, "examples/train_with_python.py", "--steps", "2", "--output-dir", str(tmp_path))
    assert re.search(r"held-out solve rate \d\.\d{3} -> \d\.\d{3}", out)
    assert (tmp_path / "final" / "model.safetensors").is_file()


def test_reward_plugin_from_a_recipe(tmp_path):
    out = run(
        sys.executable,
        "-m",
        "dllm_rl",
        "train",
        "examples/reward_plugin.yaml",
        "train.max_steps=2",
        f"train.output_dir={tmp_path}",
    )
    assert "held-out accuracy: before" in out
    logged = (tmp_path / "metrics.jsonl").read_text()
    assert "rewards/examples/reward_plugin.py:closeness/mean" in logged  # the plugin was called and logged


def test_custom_estimator_matches_the_elbo_and_trains(tmp_path):
    out = run(
        sys.executable, "examples/custom_estimator.py", "--draws", "300", "--steps", "1", "--output-dir", str(tmp_path)
    )
    means = re.search(r"'uniform_count': \[([^\]]+)\], 'elbo': \[([^\]]+)\]", out)
    ours, elbo = ([float(v) for v in g.split(",")] for g in means.groups())
    # two unbiased estimates of one ELBO, 300 draws each: equal within a loose band (their spread is ~1 nat)
    assert all(abs(a - b) < 0.15 * abs(b) + 1.0 for a, b in zip(ours, elbo)), out
    assert "GRPO with estimator.name=uniform_count: held-out" in out


def test_custom_commit_rule():
    out = run(sys.executable, "examples/custom_commit_rule.py", "--puzzles", "20")
    found = dict(re.findall(r"rollout.commit=(\w+): .* (\d+) forwards", out))
    assert set(found) == {"top_k", "halve"} and int(found["halve"]) < int(found["top_k"]), out


def test_hybrid_planner():
    out = run(sys.executable, "examples/hybrid_planner.py", "--puzzles", "8")
    rates = dict(re.findall(r"plan=(\w+)\s+held-out solve rate ([\d.]+)", out))
    assert set(rates) == {"none", "content_free", "real", "first_row", "corrupted"}, out  # the added kind ran
    assert float(re.search(r"plan log-prob \(nats\): +(\S+)", out).group(1)) < 0, out  # the planner sampled it


def test_reward_plugin_scores_any_text_without_raising():
    # the plugin's docstring promises that no model text makes it raise (a raising reward stops the run)
    import doctest
    import importlib.util

    spec = importlib.util.spec_from_file_location("reward_plugin", ROOT / "examples" / "reward_plugin.py")
    plugin = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plugin)
    assert doctest.testmod(plugin).failed == 0
    texts = ["-" * 3000 + "1", "-" * 10_000 + "1", "(" * 300 + "1" + ")" * 300, "9" * 5000, "-" * 150 + "16"]
    assert plugin.closeness(["p"] * 5, texts, target=[16] * 5) == [0.0, 0.0, 0.0, 0.0, 1.0]
