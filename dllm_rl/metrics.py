"""Metrics: console lines, a metrics.jsonl in the run directory, and accelerate trackers when asked."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLogger:
    def __init__(self, accelerator, run_dir: str, history: list[dict] | None = None, project: str = "dllm-rl",
                 config: dict | None = None):
        self.acc = accelerator
        self.path = Path(run_dir) / "metrics.jsonl"
        self.history = list(history or [])
        if accelerator.is_main_process:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # rewrite from the resumed history: drop lines a killed run wrote after its last checkpoint
            self.path.write_text("".join(json.dumps(h) + "\n" for h in self.history))
        if accelerator.log_with:
            accelerator.init_trackers(project, config=config or {})

    def log(self, step: int, metrics: dict, echo: bool = True) -> None:
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

    def close(self) -> None:
        if self.acc.log_with:
            self.acc.end_training()
