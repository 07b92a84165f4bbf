"""The completions table over two real CPU processes (torchrun, gloo): a log_extra column that one rank logged
and the other did not is gathered as TRL 1.16 gathers it (the union of the names first, None for the rank that
did not log it), instead of leaving the ranks in different numbers of gather calls (a hang). About 20-40 s on
2 cores (process start and imports)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
import torch
from types import SimpleNamespace
from accelerate import Accelerator
from dllm_rl.rewards.plugins import Reward
from dllm_rl.trainers.grpo_options import CompletionsTable

acc = Accelerator(cpu=True)
r = acc.process_index
extra = {"a": ["a0", "a1"], "b": [0, 1]} if r == 0 else {"b": [2, 3]}  # rank 1 never logged column a
table = CompletionsTable(SimpleNamespace(), sys.argv[1])
rewards = [Reward("r", lambda prompts, completions, **kw: [0.0] * len(completions))]
per_fn = torch.tensor([[float(r), float(r)]])
table.record_rollout(acc, 1, [f"p{r}", f"q{r}"], ["c", "d"], rewards, per_fn, torch.zeros(4), extra)
columns, rows = table.table()
with open(f"{sys.argv[1]}/rank{r}.json", "w") as f:
    json.dump({"columns": columns, "rows": rows}, f)
acc.wait_for_everyone()
"""


@pytest.mark.slow
def test_a_column_logged_on_one_rank_only_is_gathered_on_both(tmp_path):
    script = tmp_path / "gather.py"
    script.write_text(SCRIPT)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    out = subprocess.run(
        [*command, str(script), str(tmp_path)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300
    )
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-6000:])
    tables = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert tables[0] == tables[1]
    assert tables[0]["columns"] == ["step", "prompt", "completion", "r", "a", "b", "advantage"]
    assert [row[4:6] for row in tables[0]["rows"]] == [["a0", 0], ["a1", 1], [None, 2], [None, 3]]
