"""train.report_to: every metric and the completions table reach TensorBoard (its event files read back) and W&B
(offline, its run files read back; skipped without wandb); a tracker that cannot start is a ConfigError."""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import struct

import datasets
import pytest

from dllm_rl.config import recipe_from_dict
from dllm_rl.errors import ConfigError
from dllm_rl.runtime import check_trackers

PROMPTS = datasets.Dataset.from_list([{"prompt": f"{i}|{i}=", "answer": str(2 * i)} for i in range(8)])


def judged(prompts, completions, answer, log_extra, log_metric, **kw):
    log_extra("gold", list(answer))
    log_metric("judge/calls", 1.0)
    return [len(c) / 8 for c in completions]


def run(tmp_path, model_factory, tokenizer, report_to, **train):
    from dllm_rl.trainers.grpo import GRPOTrainer

    recipe = recipe_from_dict(
        {
            "algorithm": "grpo",
            "rollout": {"max_completion_length": 6, "steps": 3, "temperature": 1.0},
            "grpo": {"num_generations": 2},
            "train": {
                "max_steps": 2,
                "batch_size": 2,
                "output_dir": str(tmp_path),
                "logging_steps": 1,
                "save_steps": 0,
                "report_to": report_to,
                **train,
            },
        }
    )
    GRPOTrainer(
        recipe, reward_funcs=judged, model=model_factory(hidden=32), tokenizer=tokenizer, train_dataset=PROMPTS
    ).train()
    return [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_every_metric_and_the_completions_table(tmp_path, model_factory, tokenizer):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rows = run(tmp_path, model_factory, tokenizer, ["tensorboard"])
    events = EventAccumulator(str(tmp_path / "dllm-rl"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    logged = {k for r in rows for k, v in r.items() if k != "step" and isinstance(v, (int, float))}
    assert logged <= set(events.Tags()["scalars"])  # every metric of metrics.jsonl
    assert {"reward", "rewards/judged/mean", "judge/calls", "completions/clipped_ratio"} <= logged
    assert [(e.step, round(e.value, 4)) for e in events.Scalars("reward")] == [
        (r["step"], round(r["reward"], 4)) for r in rows if "reward" in r
    ]
    tables = events.Tensors("completions/text_summary")
    assert [t.step for t in tables] == [1, 2]
    text = tables[-1].tensor_proto.string_val[0].decode()
    lines = text.strip().splitlines()
    assert lines[0] == "| step | prompt | completion | judged | gold | advantage |"
    assert len(lines) == 2 + 4  # header, rule, 2 prompts x 2 generations
    assert "\\|" in lines[2]  # a | in a cell is escaped, not a column break


def test_a_resumed_run_leaves_tensorboard_one_value_per_step(tmp_path, model_factory, tokenizer):
    """A run killed after logging steps 3-4 but before checkpointing them resumes from checkpoint 2: TensorBoard
    drops the killed run's steps 3-4 (purge_step), as metrics.jsonl does, instead of showing them twice."""
    import shutil

    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run(tmp_path, model_factory, tokenizer, ["tensorboard"], max_steps=4, save_steps=2)
    for gone in ("checkpoint-4", "final"):  # as if killed after step 4 was logged, before it was saved
        shutil.rmtree(tmp_path / gone)
    rows = run(tmp_path, model_factory, tokenizer, ["tensorboard"], max_steps=4, save_steps=2)
    events = EventAccumulator(str(tmp_path / "dllm-rl"), size_guidance={"scalars": 0})
    events.Reload()
    assert [e.step for e in events.Scalars("reward")] == [r["step"] for r in rows if "reward" in r] == [1, 2, 3, 4]


def wandb_records(path):
    """The records of an offline W&B run file (a LevelDB-style log of protobuf records; own reader, as wandb
    0.31 ships none)."""
    from wandb.proto import wandb_internal_pb2 as pb

    buf = open(path, "rb").read()
    ident, magic, _ = struct.unpack("<4sHB", buf[:7])
    assert ident == b":W&B" and magic == 0xBEE1
    pos, pending, block = 7, b"", 32768
    while pos + 7 <= len(buf):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", buf[pos : pos + 7])
        if n == 0 and kind == 0:
            pos += left
            continue
        data, pos = buf[pos + 7 : pos + 7 + n], pos + 7 + n
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending + data if kind == 4 else data)
            pending = b""
            yield rec
        elif kind == 2:
            pending = data
        elif kind == 3:
            pending += data


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (dllm-rl[wandb])")
def test_wandb_offline_gets_every_metric_and_the_completions_table(tmp_path, model_factory, tokenizer, monkeypatch):
    for key, value in {
        "WANDB_MODE": "offline",
        "WANDB_DIR": str(tmp_path),
        "WANDB_SILENT": "true",
        "WANDB_CONSOLE": "off",
    }.items():
        monkeypatch.setenv(key, value)
    rows = run(tmp_path / "run", model_factory, tokenizer, ["wandb"])
    (run_file,) = glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "run-*.wandb"))
    wandb_id = json.loads((tmp_path / "run" / "trackers.json").read_text())["wandb"]  # what a resume continues
    assert run_file.endswith(f"run-{wandb_id}.wandb")
    history = []
    for rec in wandb_records(run_file):
        if rec.WhichOneof("record_type") == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
    by_step = {h["_step"]: h for h in history}
    for r in rows:
        for key, value in r.items():
            if key != "step" and isinstance(value, (int, float)):
                assert by_step[r["step"]][key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    tables = sorted(glob.glob(str(tmp_path / "wandb" / "offline-run-*" / "files" / "media" / "table" / "*.json")))
    table = json.loads(open(tables[-1]).read())
    assert table["columns"] == ["step", "prompt", "completion", "judged", "gold", "advantage"]
    assert len(table["data"]) == 4


def test_a_tracker_that_cannot_start_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown tracker 'tensorbord'"):
        check_trackers(["tensorbord"])
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, filter_trackers

    missing = [n for n in sorted(LOGGER_TYPE_TO_CLASS) if not filter_trackers([n], logging_dir=".")]
    if not missing:
        pytest.skip("every tracker accelerate knows is installed here")
    with pytest.raises(ConfigError, match=f"{missing[0]}.*cannot start: not installed; pip install"):
        check_trackers([missing[0]])
    assert check_trackers(["none"]) == []
    assert os.environ.get("WANDB_MODE") != "offline"  # the W&B test's settings did not leak


def test_a_resumed_run_continues_its_wandb_run_and_a_fresh_one_does_not(tmp_path):
    """W&B gets the same run id when a run resumes from a checkpoint (kept in the run directory), a new one when it
    starts afresh; TensorBoard purges from the step after the checkpoint, or everything on a fresh start (a run
    killed before its first checkpoint logged steps that its restart logs again)."""
    from dllm_rl.metrics import tracker_init_kwargs

    first = tracker_init_kwargs(tmp_path, {"wandb", "tensorboard"}, 0)
    assert first["tensorboard"] == {"purge_step": 0}
    assert first["wandb"]["resume"] == "allow" and len(first["wandb"]["id"]) == 8
    resumed = tracker_init_kwargs(tmp_path, {"wandb", "tensorboard"}, 20)
    assert resumed["wandb"]["id"] == first["wandb"]["id"] and resumed["tensorboard"] == {"purge_step": 21}
    again = tracker_init_kwargs(tmp_path, {"wandb"}, 0)  # train.resume=false after the directory was cleared
    assert again["wandb"]["id"] != first["wandb"]["id"]
