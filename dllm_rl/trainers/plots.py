"""The reward curve saved beside a GRPO checkpoint (matplotlib, headless).

One axis, the logged step on x: the training reward (the mean over each logging window's rollouts), the
training solve rate by the task's verifier when it differs from the reward (when the verifier is the reward,
one line says both, so that no series hides another), and the held-out score at each evaluation.
"""

from __future__ import annotations

from pathlib import Path


def _series(history: list[dict], key: str) -> list[tuple[int, float]]:
    return [(h["step"], h[key]) for h in history if key in h]


def held_out_decoding(eval_cfg) -> str:
    """How the held-out score is taken (a recipe's eval section), for the legend."""
    n, T = eval_cfg.num_samples, eval_cfg.temperature
    if n > 1 and eval_cfg.majority:
        return f"maj@{n}, T {T:g}"
    if n > 1:
        return f"mean of {n} samples, T {T:g}"
    return "greedy" if T == 0 else f"T {T:g}"


def reward_figure(history: list[dict], title: str = "GRPO", decoding: str = "greedy"):
    """The figure (not saved): a title, both axes labelled, one line per distinct series; `decoding`: how the
    held-out score was taken (held_out_decoding)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, acc = _series(history, "reward"), _series(history, "accuracy")
    held, held_label = _series(history, "eval_accuracy"), f"held-out solve rate ({decoding})"
    if not held:
        held, held_label = _series(history, "eval_reward"), f"held-out reward ({decoding})"
    same = len(train) == len(acc) and all(s == t and abs(a - b) < 1e-9 for (s, a), (t, b) in zip(train, acc))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(
            *zip(*train), label="reward = solve rate (train rollouts)" if same and acc else "reward (train rollouts)"
        )
    if acc and not same:
        ax.plot(*zip(*acc), "--", label="solve rate (train rollouts)", alpha=0.7)
    if held:
        ax.plot(*zip(*held), "o-", label=held_label)
    values = [v for s in (train, acc, held) for _, v in s]
    if values and all(-1e-9 <= v <= 1 + 1e-9 for v in values):
        ax.set_ylim(-0.02, 1.02)
    ax.set_title(f"{title}: reward and held-out score by step")
    ax.set_xlabel("step (rollouts)")
    rates = bool(acc) or bool(held) and "solve rate" in held_label
    ax.set_ylabel("reward / solve rate" if rates else "reward")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(loc="best")
    fig.tight_layout()
    return fig


def plot_curves(history: list[dict], paths: list, title: str = "GRPO", decoding: str = "greedy") -> None:
    import matplotlib.pyplot as plt

    fig = reward_figure(history, title, decoding)
    for p in paths:
        Path(p).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(p, dpi=100)
    plt.close(fig)
