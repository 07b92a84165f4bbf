"""Masked-diffusion SFT end to end on a tiny model: the loss falls, checkpoints load, a killed run resumes
onto the same loss trajectory, and the CLI reports bad input in one line."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from dllm_rl.config import recipe_from_dict
from dllm_rl.errors import ConfigError, DllmRlError
from dllm_rl.trainers.sft import SFTTrainer

ROOT = Path(__file__).resolve().parents[2]
TINY = {
    "model": {
        "tiny": {
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
        }
    },
    "data": {"task": "sudoku", "train_size": 256, "eval_size": 8},
    "rollout": {"max_completion_length": 20, "steps": 10},
    "optim": {"lr": 3e-3, "lr_scheduler": "constant"},
    "train": {"max_steps": 30, "batch_size": 16, "logging_steps": 5, "eval_steps": 0, "save_steps": 10},
}


def recipe(tmp_path, **train):
    data = json.loads(json.dumps(TINY))
    data["train"].update({"output_dir": str(tmp_path / "run"), **train})
    return recipe_from_dict(data)


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_loss_falls_and_checkpoint_loads(tmp_path):
    r = recipe(tmp_path)
    result = SFTTrainer(r).train()
    curve = losses(r.train.output_dir)
    assert curve[30] < 0.7 * curve[5], curve
    final = Path(result["final"])
    assert {"config.json", "model.safetensors", "tokenizer.json", "recipe.yaml"} <= set(os.listdir(final))
    model, tok = AutoModel.from_pretrained(final), AutoTokenizer.from_pretrained(final)
    assert type(model).__name__ == "TinyMDM" and tok.mask_token_id == model.config.mask_token_id
    assert (Path(r.train.output_dir) / "checkpoint-30" / "accelerator_state").is_dir()
    assert not list(Path(r.train.output_dir).glob("*.tmp"))


def test_a_non_finite_loss_stops_sft_before_it_reaches_the_weights(tmp_path):
    """As in GRPO: an inf loss at step 12 raises an error naming the fix; the weights and checkpoint-10 stay finite
    and no later checkpoint is written."""
    from safetensors.torch import load_file

    trainer = SFTTrainer(recipe(tmp_path, max_steps=20))
    real, calls = trainer.loss, {"n": 0}

    def overflowing(batch, noise):  # the real loss, made inf from step 12 on (one micro-batch per step)
        calls["n"] += 1
        loss = real(batch, noise)
        return loss * float("inf") if calls["n"] >= 12 else loss

    trainer.loss = overflowing
    with pytest.raises(DllmRlError, match="SFT: the loss is not finite.*step 12.*no update was applied.*optim.lr"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    saved = load_file(tmp_path / "run" / "checkpoint-10" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values()) and not (tmp_path / "run" / "checkpoint-20").exists()


def dataset_recipe(tmp_path, columns=("prompt", "completion"), **data):
    """TINY on a local prompt/completion jsonl (no verifier), four steps with an evaluation due every two."""
    path = tmp_path / "pairs.jsonl"
    rows = [dict(zip(columns, (f"add {a} {b}", str(a + b)))) for a in range(5) for b in range(4)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    spec = json.loads(json.dumps(TINY))
    spec["data"] = {"dataset": str(path), **data}
    spec["rollout"] = {"max_completion_length": 8, "steps": 4}
    spec["train"].update(
        {"output_dir": str(tmp_path / "run"), "max_steps": 4, "batch_size": 4, "eval_steps": 2, "save_steps": 2}
    )
    spec["train"]["num_threads"] = 1
    return recipe_from_dict(spec), path


@pytest.mark.parametrize("held_out", [False, True])
def test_sft_on_a_dataset_without_a_verifier_finishes_and_says_why_there_is_no_accuracy(tmp_path, capsys, held_out):
    """data.dataset has no verifier: without data.eval_path there is no held-out set, with it nothing to score the
    set with; either way the run trains, writes final/ and its last line says why there is no accuracy (it used to
    stop with a traceback at the first evaluation, before final/)."""
    r, path = dataset_recipe(tmp_path)
    if held_out:
        r.data.eval_path = str(path)
    result = SFTTrainer(r).train()
    assert result["eval_accuracy"] is None and (Path(result["final"]) / "model.safetensors").is_file()
    assert sorted(losses(r.train.output_dir)) == [4]  # logging_steps 5: the last step's row
    line = capsys.readouterr().out.strip().splitlines()[-1]
    why = "no verifier to score the held-out set" if held_out else "no held-out set"
    assert line.startswith(why) and "last training loss" in line and str(result["final"]) in line, line
    rows = [json.loads(x) for x in (Path(r.train.output_dir) / "metrics.jsonl").read_text().splitlines()]
    assert not any("eval_accuracy" in row for row in rows)
    again = SFTTrainer(r).train()  # a finished run: reported as recorded
    assert again == {"eval_accuracy": None, "final": f"{r.train.output_dir}/final"}
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith(why)


def test_a_dataset_without_completions_is_refused_before_a_model_is_built(tmp_path, monkeypatch):
    import dllm_rl.trainers.common as common

    def no_model(*args, **kwargs):
        raise AssertionError("a model was built")

    monkeypatch.setattr(common, "load_model", no_model)
    r, _ = dataset_recipe(tmp_path, columns=("prompt", "answer"))
    with pytest.raises(ConfigError, match=r"data.dataset '.*pairs.jsonl' has no 'completion' column.*'answer'"):
        SFTTrainer(r)
    assert not (tmp_path / "run").exists()


def test_sgd_optimizer_steps_along_the_gradient(tmp_path):
    """optim.name=sgd: the first update is exactly -lr * gradient (no Adam normalisation), and it learns."""
    data = json.loads(json.dumps(TINY))
    data["optim"] = {"name": "sgd", "lr": 0.5, "lr_scheduler": "constant", "max_grad_norm": 0}
    data["train"].update({"output_dir": str(tmp_path / "one"), "save_steps": 0, "max_steps": 1})
    trainer = SFTTrainer(recipe_from_dict(data))
    assert isinstance(trainer.optimizer.optimizer, torch.optim.SGD)
    params = list(trainer.model.parameters())
    before = [p.detach().clone() for p in params]
    grads = {}
    for i, p in enumerate(params):
        p.register_post_accumulate_grad_hook(lambda t, i=i: grads.__setitem__(i, t.grad.clone()))
    trainer.train()
    for i, (p, p0) in enumerate(zip(params, before)):
        torch.testing.assert_close(p.detach(), p0 - 0.5 * grads[i], atol=1e-6, rtol=1e-5)
    data["train"].update({"output_dir": str(tmp_path / "run"), "max_steps": 30})
    SFTTrainer(recipe_from_dict(data)).train()
    curve = losses(data["train"]["output_dir"])
    assert curve[30] < 0.8 * curve[5], curve


def test_gradient_accumulation_matches_full_batch(tmp_path):
    """Splitting a step's batch into micro-batches changes memory, not the update.

    (Trainers run one after the other: accelerate keeps gradient-accumulation state per process.)"""
    a = SFTTrainer(recipe(tmp_path / "a", max_steps=1, save_steps=0))
    start = {k: v.clone() for k, v in a.model.state_dict().items()}
    a.training_step(0)
    after_a = {k: v.clone() for k, v in a.model.state_dict().items()}
    b = SFTTrainer(recipe(tmp_path / "b", max_steps=1, save_steps=0, gradient_accumulation_steps=4))
    b.model.load_state_dict(start)
    b.training_step(0)
    for name, value in b.model.state_dict().items():
        assert not torch.equal(value, start[name]) or name.endswith("norm.weight"), name  # it did step
        torch.testing.assert_close(value, after_a[name], rtol=1e-4, atol=2e-6, msg=name)


def _cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "dllm_rl", *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        **kw,
    )


def _write_recipe(tmp_path, run_dir, steps):
    import yaml

    data = json.loads(json.dumps(TINY))
    data["train"].update({"output_dir": str(run_dir), "max_steps": steps, "save_steps": 5, "logging_steps": 1})
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.slow
def test_killed_run_resumes_on_the_same_trajectory(tmp_path):
    """Kill a real `dllm-rl sft` process after its step-10 checkpoint; the resumed run's losses equal those
    of an uninterrupted run with the same seed."""
    straight = tmp_path / "straight"
    assert _cli("sft", str(_write_recipe(tmp_path, straight, 20))).returncode == 0
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dllm_rl", "sft", str(_write_recipe(tmp_path, killed, 20))],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    deadline = time.time() + 240
    while not (killed / "checkpoint-10" / "trainer_state.json").exists():
        assert time.time() < deadline and proc.poll() is None, "run ended before its step-10 checkpoint"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "final").exists()
    assert _cli("sft", str(_write_recipe(tmp_path, killed, 20))).returncode == 0
    a, b = losses(straight), losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, 21))
    for step in a:
        assert abs(a[step] - b[step]) < 1e-5, (step, a[step], b[step])


def test_cli_bad_input_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lrr: 1}\n")
    for args in (
        ["sft", str(bad)],
        ["sft", str(tmp_path / "missing.yaml")],
        ["generate", str(tmp_path), "--prompt", "x"],
        ["train", str(ROOT / "recipes/tiny/sudoku-sft.yaml"), "rollout.cache=fast"],
    ):
        out = _cli(*args)
        assert out.returncode == 2, (args, out.stderr)
        lines = [ln for ln in out.stderr.splitlines() if ln.startswith("dllm-rl: error:")]
        assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "did you mean 'lr'" in _cli("sft", str(bad)).stderr
    assert "is not a model directory" in _cli("generate", str(tmp_path), "--prompt", "x").stderr


def test_generate_and_eval_on_a_checkpoint(tmp_path):
    r = recipe(tmp_path, max_steps=2, save_steps=0)
    final = SFTTrainer(r).train()["final"]
    out = _cli("generate", final, "--prompt", "1___\n____\n__1_\n___2", "rollout.steps=5")
    assert out.returncode == 0, out.stderr
    assert "### completion" in out.stdout
    path = _write_recipe(tmp_path, tmp_path / "unused", 1)
    out = _cli("eval", str(path), "--checkpoint", final, "eval.size=4")
    assert out.returncode == 0, out.stderr
    assert "accuracy" in out.stdout and "over 4 held-out sudoku" in out.stdout


def _eval_line(*overrides):
    """(accuracy, pass@n or None, the printed line) of `dllm-rl eval` on the shipped Sudoku checkpoint."""
    out = _cli(
        "eval",
        str(ROOT / "recipes/tiny/sudoku-sft.yaml"),
        "--checkpoint",
        str(ROOT / "checkpoints/tiny/sudoku-sft"),
        "eval.size=16",
        *overrides,
    )
    assert out.returncode == 0, out.stderr
    line = out.stdout.strip().splitlines()[-1]
    passn = re.search(r"pass@\d+ ([0-9.]+)", line)
    return float(re.match(r"accuracy ([0-9.]+)", line).group(1)), passn and float(passn.group(1)), line


def test_eval_reports_pass_at_n_over_prompts():
    """Greedy samples of a prompt are identical, so pass@3 equals the accuracy; with sampling, pass@4 is at
    least the mean accuracy (and on the shipped checkpoint strictly more: some puzzles are solved by only some
    samples)."""
    acc, passn, line = _eval_line("eval.num_samples=3")
    assert "over 16 held-out" in line and "(the mean of 3 samples each)" in line and "pass@3" in line, line
    assert passn == acc > 0, line
    acc, passn, line = _eval_line("eval.num_samples=4", "eval.temperature=1.0")
    assert passn > acc, line
    assert _eval_line()[1] is None  # one sample: no pass@n
    acc, passn, line = _eval_line("eval.num_samples=4", "eval.temperature=1.0", "eval.majority=true")
    assert "over 16 held-out" in line and "(maj@4)" in line and f"maj@4 {acc:.4f}" in line, line


def test_a_training_prompt_past_the_model_context_is_refused_before_training(tmp_path):
    """Training rows are prompt + a canvas of rollout.max_completion_length; one past max_position_embeddings is
    refused naming the row and the fix (the tiny model is rotary and would not raise: training would silently run
    past its context). A data.dataset without a held-out set is decoded never, so nothing else checks it."""
    r, path = dataset_recipe(tmp_path)  # context 64, canvas 8
    refuses_a_prompt_past_the_context(SFTTrainer, r, path, tmp_path / "run")
    assert len(SFTTrainer(r).pairs) == 1  # a prompt that fits trains


def refuses_a_prompt_past_the_context(make, r, path, run_dir) -> None:
    """Write two rows to `path`, the second past the tiny model's 64 positions: `make(r)` refuses it naming row 1
    before the run logs anything; then leave the first row alone in `path`."""
    rows = [{"prompt": "add 1 2", "completion": "3"}, {"prompt": "add " + "1 " * 30 + "2", "completion": "3"}]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ConfigError, match=r"training row 1 has the longest prompt, \d+ tokens .*past the model's "):
        make(r)
    assert not (run_dir / "metrics.jsonl").exists()
    path.write_text(json.dumps(rows[0]) + "\n")


def test_training_prompts_with_sft_plans_are_checked_against_the_context(tmp_path):
    """hybrid.sft_plans lengthens the training prompts (the held-out prompts, checked by check_eval_decoding, have
    no plan): a template that pushes them past the context is refused, naming the plans."""
    spec = json.loads(json.dumps(TINY))  # sudoku: 21 prompt tokens + 20 completion tokens in a context of 64
    spec["hybrid"] = {"template": "{plan}\n{question}", "sft_plans": ["none", "content_free"]}
    spec["train"].update({"output_dir": str(tmp_path / "run"), "num_threads": 1})
    spec["data"].update({"train_size": 8})
    assert len(SFTTrainer(recipe_from_dict(spec)).pairs) == 8  # the plans fit
    spec["hybrid"]["template"] = "A plan to follow, then the puzzle.\n{plan}\n{question}"
    spec["train"]["output_dir"] = str(tmp_path / "long")
    with pytest.raises(ConfigError, match=r"training row 1 has the longest prompt with its plan placed \(hybrid.sft"):
        SFTTrainer(recipe_from_dict(spec))
