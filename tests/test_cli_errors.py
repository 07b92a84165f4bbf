"""Bad input stops every command with one line naming the problem and the fix, exit code 2, before any model is
built: `load_model` is made to fail the test if it is reached, so each case shows the check comes first."""

from __future__ import annotations

from pathlib import Path

import pytest

import dllm_rl.models.load as model_loading
import dllm_rl.trainers.common as common
from dllm_rl.cli import main

ROOT = Path(__file__).resolve().parents[1]
SFT = "recipes/tiny/sudoku-sft.yaml"
CKPT = "checkpoints/tiny/sudoku-sft"


@pytest.fixture(autouse=True)
def no_model(monkeypatch, tmp_path):
    def built(*args, **kwargs):
        raise AssertionError("a model was built before the input was checked")

    monkeypatch.setattr(model_loading, "load_model", built)  # the CLI imports it when a command runs
    monkeypatch.setattr(common, "load_model", built)  # the trainers' Run bound it at import
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)


def stops(capsys, *argv) -> str:
    capsys.readouterr()
    assert main(list(argv)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dllm-rl: error:")]
    assert len(err) == 1
    return err[0]


@pytest.mark.parametrize(
    "argv, words",
    [
        (["eval", SFT, "--checkpoint", CKPT, "data.task=sudokuu"], "unknown data.task 'sudokuu'"),
        (["eval", SFT, "--checkpoint", CKPT, "--hybrid-axes", "--samples", "0"], "--samples 0: give at least 1"),
        (["plan", "recipes/llada-8b/gsm8k-diffu-grpo.yaml", "--prompt-length", "-5"], "--prompt-length -5"),
        (["plan", "recipes/llada-8b/gsm8k-diffu-grpo.yaml", "rollout.commit=topk"], "did you mean 'top_k'"),
        (["generate", CKPT, "--prompt", "hi", "train.max_steps=5"], "train.max_steps would be ignored"),
        (["generate", CKPT, "--prompt", ""], "--prompt number 1 is empty"),
        (["generate", "nobody/no-such-model", "--prompt", "hi"], "not in the local Hugging Face cache"),
        (["train", SFT, "model.path=GSAI-ML/LLaDA-8B-Instruct"], "model.path: 'GSAI-ML/LLaDA-8B-Instruct' is not in"),
        (["train", SFT, "train.output_dir=README.md"], "train.output_dir: 'README.md' is a file"),
        (["train", "recipes/tiny/sudoku-planner-sft.yaml", "hybrid.plan=reall"], "unknown hybrid.plan 'reall'"),
        (["train", SFT, "=3"], "is not of the form section.key=value"),
        (["train", SFT, "rollout..steps=3"], "is not of the form section.key=value"),
        (
            ["train", "recipes/tiny/sudoku-tokens-grpo.yaml", "grpo.reward_weights=[1.0, 2.0]"],
            "2 weights for 1 rewards",
        ),
        (
            [
                "train",
                "recipes/tiny/sudoku-tokens-grpo.yaml",
                "grpo.reward_weights=[1.0]",
                "rewards=[{name: sudoku, weight: 2.0}]",
            ],
            "both weight the recipe's rewards",
        ),
        (["train", SFT, "rollout.steps=abc"], "write rollout.steps=<int>"),
        (["train", "recipes"], "is a directory"),
        (["train", "recipes/tiny/sudoku-consensus.yaml", "consensus.samples=0"], "consensus.samples"),
        (
            ["train", SFT, "data.dataset=tests/data/preferences_plain.jsonl"],
            "are not all options of this dataset's loader",
        ),
        (
            ["train", "recipes/tiny/sudoku-dpo.yaml", "dpo.pairs=offline", "dpo.dataset_name=no/such.jsonl"],
            "dpo.dataset_name: 'no/such.jsonl' does not exist",
        ),
        (
            [
                "train",
                "recipes/tiny/sudoku-tokens-grpo.yaml",
                "grpo.steps_per_generation=3",
                "train.gradient_accumulation_steps=2",
            ],
            "grpo.steps_per_generation",
        ),
    ],
)
def test_bad_input_stops_before_any_model(capsys, argv, words):
    assert words in stops(capsys, *argv)


def test_a_malformed_data_file_is_named_not_a_traceback(capsys, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{not json\n')
    line = stops(capsys, "train", "recipes/tiny/sudoku-tokens-grpo.yaml", f"data.dataset={bad}", "data.options={}")
    assert f"could not read data file '{bad}' as json" in line and "fix the file" in line
    line = stops(
        capsys,
        "train",
        "recipes/tiny/sudoku-dpo.yaml",
        "dpo.pairs=offline",
        f"dpo.dataset_name={bad}",
        "estimator.name=elbo",
    )
    assert "dpo.dataset_name: could not read" in line


def test_offline_dpo_with_a_replaying_estimator_stops_before_any_model(capsys):
    line = stops(
        capsys,
        "train",
        "recipes/tiny/sudoku-dpo.yaml",
        "dpo.pairs=offline",
        "dpo.dataset_name=tests/data/sudoku_preferences.jsonl",
        "estimator.name=trajectory",
    )
    assert "replays a rollout's trace, which offline pairs do not have" in line
