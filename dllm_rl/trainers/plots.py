"""The reward curve saved beside a GRPO checkpoint (matplotlib, headless)."""

from __future__ import annotations

from pathlib import Path


def plot_curves(history: list[dict], paths: list) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["reward"]) for h in history if "reward" in h]
    acc = [(h["step"], h["accuracy"]) for h in history if "accuracy" in h]
    evals = [(h["step"], h["eval_accuracy"]) for h in history if "eval_accuracy" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="reward (train rollouts)")
    if acc:
        ax.plot(*zip(*acc), label="solve rate (train rollouts)", alpha=0.6)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out solve rate (greedy)")
    ax.set_xlabel("step")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    for p in paths:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=100)
    plt.close(fig)
