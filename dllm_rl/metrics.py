"""Metrics: console lines, a metrics.jsonl in the run directory, and accelerate trackers when asked.

With several processes every row is reduced across ranks before it is written (reduce_across_ranks), so
the file and the trackers show one value per metric for the whole run.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path

from .algorithms import zero_std_groups
from .algorithms.advantages import nanstd

TRACKER_IDS = "trackers.json"


def tracker_init_kwargs(run_dir, names, start_step: int) -> dict:
    """accelerate's init_kwargs for a run's trackers. A run resumed from its checkpoint at `start_step` continues
    there: TensorBoard purges what the killed run logged after it (steps > start_step, as metrics.jsonl drops those
    lines), and W&B continues the same run (its id is kept in run_dir/trackers.json). A fresh run (start_step 0)
    purges every step a run killed before its first checkpoint logged, and draws a new W&B id."""
    kwargs = {}
    if "tensorboard" in names:
        kwargs["tensorboard"] = {"purge_step": start_step + 1 if start_step else 0}
    if "wandb" in names:
        path = Path(run_dir) / TRACKER_IDS
        ids = json.loads(path.read_text()) if start_step and path.is_file() else {}
        if "wandb" not in ids:
            import secrets

            ids["wandb"] = secrets.token_hex(4)  # W&B run ids: 8 characters, letters and digits
            path.write_text(json.dumps(ids))
        kwargs["wandb"] = {"id": ids["wandb"], "resume": "allow", "name": Path(run_dir).resolve().name}
    return kwargs


class MetricsLogger:
    def __init__(
        self,
        accelerator,
        run_dir: str,
        history: list[dict] | None = None,
        project: str = "dllm-rl",
        config: dict | None = None,
        start_step: int = 0,
    ):
        """`history`: the rows of the checkpoint the run resumed at `start_step` (0: a fresh run)."""
        self.acc = accelerator
        self.path = Path(run_dir) / "metrics.jsonl"
        self.history = list(history or [])
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # rewrite from the resumed history: drop lines a killed run wrote after its last checkpoint; renamed
            # into place, so a kill meanwhile leaves the old file, never a truncated one
            tmp = self.path.with_name(self.path.name + ".tmp")
            tmp.write_text("".join(json.dumps(h) + "\n" for h in self.history))
            os.replace(tmp, self.path)
        if accelerator.log_with:
            names = {str(getattr(t, "value", t)) for t in accelerator.log_with}
            kwargs = tracker_init_kwargs(run_dir, names, start_step) if accelerator.is_main_process else {}
            try:
                accelerator.init_trackers(project, config=hparams(config or {}), init_kwargs=kwargs)
            except Exception as e:  # e.g. W&B online without a login: say so now, not as a traceback
                from .errors import ConfigError

                names = [str(getattr(t, "value", t)) for t in accelerator.log_with]
                raise ConfigError(
                    f"train.report_to {names}: a tracker could not start ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:200]}); fix its setup (W&B: `wandb login`, or WANDB_MODE=offline) "
                    f"or drop it from train.report_to"
                ) from None

    def log(self, step: int, metrics: dict, echo: bool = True) -> None:
        """Record `metrics` at `step`; every rank calls it at the same points (the reduction is collective)."""
        metrics = reduce_across_ranks(self.acc, metrics)
        row = {"step": step, **{k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}}
        self.history.append(row)
        if not self.acc.is_main_process:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self.acc.log_with:
            self.acc.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)
        if echo:
            from tqdm.auto import tqdm

            tqdm.write(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()))

    def log_table(self, name: str, columns: list[str], rows: list[list], step: int) -> None:
        """A table to every tracker (main process): TensorBoard as a markdown table in its Text tab (it has no
        tables), W&B (and any tracker with accelerate's log_table) as a table."""
        if not self.acc.is_main_process or not self.acc.log_with:
            return
        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                tracker.tracker.add_text(name, markdown_table(columns, rows), global_step=step)
                tracker.tracker.flush()
            elif hasattr(tracker, "log_table"):
                tracker.log_table(name, columns=columns, data=[[_cell(v) for v in r] for r in rows], step=step)

    def close(self) -> None:
        if self.acc.log_with:
            self.acc.end_training()


def _cell(v):
    """A table cell a tracker can store: numbers and text as they are, anything else (chat messages) as JSON."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return json.dumps(v, default=str)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """A markdown pipe table (TensorBoard's Text tab renders it); | and newlines in cells are escaped."""

    def esc(v) -> str:
        text = f"{v:.4g}" if isinstance(v, float) else str(_cell(v))
        return text.replace("|", "\\|").replace("\n", "<br>")

    head = "| " + " | ".join(map(esc, columns)) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(esc(v) for v in row) + " |\n" for row in rows)


def hparams(config: dict, prefix: str = "") -> dict:
    """A nested recipe as flat scalars (TensorBoard's hparams take numbers, text and bools only)."""
    out = {}
    for k, v in config.items():
        if isinstance(v, dict) and v:
            out.update(hparams(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v if isinstance(v, (bool, int, float, str)) else json.dumps(v)
    return out


def reduce_across_ranks(accelerator, metrics: dict) -> dict:
    """One value per metric over all ranks: the mean (ranks hold equal shares of the batch), or the sum for
    throughputs (`tokens_per_s/...`). A key some ranks lack is averaged over the ranks that have it."""
    if accelerator.num_processes == 1:
        return metrics
    from accelerate.utils import gather_object

    ranks = gather_object([metrics])
    out = {}
    for key in dict.fromkeys(k for m in ranks for k in m):
        values = [m[key] for m in ranks if key in m]
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            out[key] = values[0]
        else:
            out[key] = float(sum(values)) if key.startswith("tokens_per_s/") else sum(values) / len(values)
    return out


def window_mean(values: list) -> float | None:
    """The mean of a metric over a logging window, NaN skipped; None when nothing valid remains (TRL's log)."""
    valid = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    return sum(valid) / len(valid) if valid else None


def call_weighted_means(accelerator, sums_counts: dict[str, tuple[float, int]]) -> dict[str, float]:
    """Reward functions' `log_metric` values of one rollout, as TRL 1.16 aggregates them
    (trl/trainer/grpo_trainer.py, `_generate_and_score_completions`): per name, the sum and the number of calls
    are added over every process, and the metric is their ratio (a mean over calls, not over completions)."""
    parts = [sums_counts]
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object

        parts = gather_object([sums_counts])
    total: dict = defaultdict(lambda: [0.0, 0])
    for part in parts:
        for name, (s, c) in part.items():
            total[name][0] += s
            total[name][1] += c
    return {name: s / c for name, (s, c) in sorted(total.items()) if c}


def reward_metrics(rewards, per_fn, names: list[str], correct, group_size: int) -> dict:
    """A GRPO step's reward statistics over the global batch: rewards [N] (weighted; NaN for a completion no
    function scored), per_fn: one [N] per reward function (NaN where it returned None), correct [N] (the task
    verifier; all NaN when the task has none, and then no `accuracy` is reported). NaN is skipped, as in TRL."""
    out = {
        "reward": rewards.nanmean().item(),
        "reward_std": nanstd(rewards).item() if (~rewards.isnan()).sum() > 1 else 0.0,
        # TRL's name: the share of groups whose rewards are all equal, i.e. that give no signal
        "frac_reward_zero_std": zero_std_groups(rewards, group_size).float().mean().item(),
    }
    if not correct.isnan().all():
        out["accuracy"] = correct.nanmean().item()
    for name, values in zip(names, per_fn):
        seen = values[~values.isnan()]
        out[f"rewards/{name}/mean"] = values.nanmean().item()
        out[f"rewards/{name}/std"] = seen.std().item() if len(seen) > 1 else 0.0
    return out


def throughput_metrics(
    seconds: dict[str, float], committed: float, tokens: float, length: float, estimate_passes: int, update_passes: int
) -> dict:
    """Seconds and tokens/s per phase: rollout (committed tokens), estimate (`tokens`: the entries one scoring
    pass computes, i.e. the completions up to EOS, or every committed decision for the trajectory estimator; times
    the scoring passes the phase ran: old policy, reference; no key when it ran none) and update (times its
    passes; no key when it was skipped), and `length`: the mean completion length."""
    out = {
        "completion_length": length,
        "tokens_per_s/rollout": committed / max(seconds.get("rollout", 0.0), 1e-9),
        **{f"seconds/{k}": v for k, v in seconds.items()},
    }
    if update_passes:  # a skipped update (nothing to learn from) has no rate, rather than a 0 in the window mean
        out["tokens_per_s/update"] = tokens * update_passes / max(seconds.get("update", 0.0), 1e-9)
    if estimate_passes:
        out["tokens_per_s/estimate"] = tokens * estimate_passes / max(seconds.get("estimate", 0.0), 1e-9)
    return out


def training_curve(run_dir, key: str = "eval_accuracy") -> list[tuple[int, float, float]]:
    """(step, training seconds so far, held-out value) at each evaluation of a run, from its metrics.jsonl.
    Training seconds are the logged `seconds/<phase>` (window means) times the steps of their window, so
    evaluations, checkpoints and start-up are not counted: the clock on which runs compare at equal wall time."""
    seconds, last, out = 0.0, 0, []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        phases = [v for k, v in row.items() if k.startswith("seconds/")]
        if phases:
            seconds += sum(phases) * (row["step"] - last)
            last = row["step"]
        if key in row:
            out.append((row["step"], seconds, row[key]))
    return out
