"""The reward plot says what it shows: a title, labelled axes, and no series drawn on top of another."""

from __future__ import annotations

import matplotlib.pyplot as plt

from dllm_rl.trainers.plots import plot_curves, reward_figure


def lines(fig):
    return {line.get_label(): list(line.get_ydata()) for line in fig.axes[0].lines}


def history(same: bool):
    rows = [{"step": 0, "eval_accuracy": 0.4}]
    for s in range(1, 5):
        rows.append({"step": s, "reward": s / 10, "accuracy": s / 10 if same else s / 20})
    return rows + [{"step": 4, "eval_accuracy": 0.6}]


def test_a_reward_that_is_the_solve_rate_is_drawn_once():
    fig = reward_figure(history(same=True), "GRPO on sudoku")
    assert lines(fig) == {
        "reward = solve rate (train rollouts)": [0.1, 0.2, 0.3, 0.4],
        "held-out solve rate (greedy)": [0.4, 0.6],
    }
    ax = fig.axes[0]
    assert ax.get_title().startswith("GRPO on sudoku") and ax.get_xlabel() and ax.get_ylabel()
    plt.close(fig)


def test_distinct_series_each_get_a_line_and_rewards_outside_0_1_are_not_cut(tmp_path):
    fig = reward_figure(history(same=False))
    assert set(lines(fig)) == {"reward (train rollouts)", "solve rate (train rollouts)", "held-out solve rate (greedy)"}
    plt.close(fig)
    negative = [{"step": s, "reward": -2.0 + s} for s in range(1, 4)] + [{"step": 3, "eval_reward": -0.5}]
    fig = reward_figure(negative)
    assert set(lines(fig)) == {"reward (train rollouts)", "held-out reward (greedy)"}
    low, high = fig.axes[0].get_ylim()
    assert low <= -1.0 and high >= 1.0 and fig.axes[0].get_ylabel() == "reward"
    plt.close(fig)
    plot_curves(negative, [tmp_path / "a" / "curve.png"])
    assert (tmp_path / "a" / "curve.png").stat().st_size > 1000


def test_the_legend_says_how_the_held_out_score_was_taken():
    from dllm_rl.config import EvalConfig
    from dllm_rl.trainers.plots import held_out_decoding

    cases = [
        ({}, "greedy"),
        ({"temperature": 1.0}, "T 1"),
        ({"temperature": 1.0, "num_samples": 8}, "mean of 8 samples, T 1"),
        ({"temperature": 0.7, "num_samples": 8, "majority": True}, "maj@8, T 0.7"),
    ]
    for cfg, said in cases:
        assert held_out_decoding(EvalConfig(**cfg)) == said
    fig = reward_figure(history(same=True), decoding="maj@8, T 0.7")
    assert "held-out solve rate (maj@8, T 0.7)" in lines(fig)
    plt.close(fig)
