"""The `code` task adapter (dllm_rl/tasks/code_data.py) on a local jsonl fixture: columns, the held-out split,
and rows the `code` reward scores with their own tests."""

from pathlib import Path

import pytest

from dllm_rl.config import DataConfig
from dllm_rl.errors import ConfigError
from dllm_rl.rewards import code_reward
from dllm_rl.tasks import load_task

FIXTURE = str(Path(__file__).parents[1] / "fixtures" / "code_tasks.jsonl")  # 8 rows, one without tests


def test_code_task_rows_and_split():
    task = load_task(DataConfig(task="code", path=FIXTURE, train_size=100, eval_size=2))
    assert task.name == "code" and task.reward == "code"
    assert len(task.eval) == 2 and len(task.train) == 5  # 6 rows before the held-out tail, one has no tests
    assert set(task.train.column_names) == {"prompt", "completion", "test_list"}
    train_prompts = {r["prompt"][-1]["content"] for r in task.train}
    assert not train_prompts & {r["prompt"][-1]["content"] for r in task.eval}
    row = task.train[0]
    assert row["prompt"][0]["role"] == "user" and "```python" in row["prompt"][0]["content"]
    assert row["completion"].startswith("def add")


def test_code_reward_reads_the_rows_tests():
    rows = load_task(DataConfig(task="code", path=FIXTURE, train_size=2, eval_size=2)).train.to_list()
    right = [f"```python\n{r['completion']}```" for r in rows]
    wrong = ["```python\ndef nothing():\n    pass\n```"] * len(rows)
    tests = [r["test_list"] for r in rows]
    assert code_reward([r["prompt"] for r in rows], right, test_list=tests, max_workers=1) == [1.0, 1.0]
    assert code_reward([r["prompt"] for r in rows], wrong, test_list=tests, max_workers=1) == [0.0, 0.0]


def test_code_task_errors_name_the_fix():
    with pytest.raises(ConfigError, match="needs data.path"):
        load_task(DataConfig(task="code"))
    with pytest.raises(ConfigError, match="valid: "):
        load_task(DataConfig(task="code", path=FIXTURE, options={"prompt_col": "question"}))
    with pytest.raises(ConfigError, match="no prompt column 'text'"):
        load_task(DataConfig(task="code", path=FIXTURE, options={"prompt_column": "text"}))
