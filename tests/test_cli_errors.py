"""Bad input stops every command with one line naming the problem and the fix, exit code 2, before any model is
built: `load_model` is made to fail the test if it is reached, so each case shows the check comes first."""

from __future__ import annotations

from pathlib import Path

import pytest

import dllm_rl.models.load as model_loading
import dllm_rl.trainers.common as common
from dllm_rl.cli import main
from dllm_rl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
SFT = "recipes/tiny/sudoku-sft.yaml"
CKPT = "checkpoints/tiny/sudoku-sft"
# sudoku-dpo.yaml's pairs made offline, without the rewards and sampling temperature offline pairs never read
OFFLINE = ["dpo.pairs=offline", "rewards=[]", "rollout.temperature=0"]


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
        (["train", SFT, "hybrid.plan=reall"], "unknown hybrid.plan 'reall'"),
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
            ["train", "recipes/tiny/sudoku-dpo.yaml", *OFFLINE, "dpo.dataset_name=no/such.jsonl"],
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
        *OFFLINE,
        f"dpo.dataset_name={bad}",
        "estimator.name=elbo",
    )
    assert "dpo.dataset_name: could not read" in line


def test_offline_dpo_with_a_replaying_estimator_stops_before_any_model(capsys):
    line = stops(
        capsys,
        "train",
        "recipes/tiny/sudoku-dpo.yaml",
        *OFFLINE,
        "dpo.dataset_name=tests/data/sudoku_preferences.jsonl",
        "estimator.name=trajectory",
    )
    assert "replays a rollout's trace, which offline pairs do not have" in line


GRPO = "recipes/tiny/sudoku-tokens-grpo.yaml"
LONG = ["rollout.max_completion_length=100", "rollout.steps=100"]


@pytest.mark.parametrize(
    "argv, words",
    [
        # a canvas past a checkpoint's context, read from its config.json (it used to fail at the final evaluation)
        (
            ["train", SFT, f"model.path={CKPT}", *LONG, "optim.lr_scheduler=constant", "optim.warmup_steps=0"],
            "rollout.max_completion_length: 100 + a prompt (at least 1 token) exceeds the model's context of 64 "
            "positions (model.path checkpoints/tiny/sudoku-sft/final",
        ),
        (
            ["eval", SFT, "--checkpoint", CKPT, f"model.path={CKPT}", *LONG],
            "context of 64 positions (--checkpoint checkpoints/tiny/sudoku-sft/final",
        ),
        # the checkpoint's context, not the advice for a tiny model built from model.tiny (generate builds none)
        (["generate", CKPT, "--prompt", "hi", *LONG], "context of 64 positions (CHECKPOINT checkpoints/tiny"),
        # engine.py's rule for the exact block cache, on the tiny model the recipe builds
        (["train", SFT, "rollout.cache=block"], "rollout.cache=block is exact only for block-causal models"),
        (
            ["train", SFT, "rollout.cache=block", "model.tiny.attention=block_causal", "rollout.block_length=4"],
            "must be a multiple of the model's attention block size (model.tiny.block_size=8)",
        ),
        (["train", SFT, "hybrid.plan=content_free", "hybrid.template=nothing"], "hybrid.template: 'nothing' must"),
        (["train", SFT, "rollout.edit=any", "rollout.edit_initial_length=100"], "rollout.edit_initial_length: 100"),
        (
            ["train", SFT, "rollout.compile=graphs", "rollout.compile_backend=foo"],
            "rollout.compile_backend: 'foo' is not a torch.compile backend",
        ),
        (["train", SFT, "hybrid.sft_plans=[content_free, foo]"], "unknown hybrid.sft_plans[1] 'foo'; valid:"),
        (["train", GRPO, "edit_policy.heads=3"], "edit_policy.heads: 3 does not divide edit_policy.width (64)"),
        (["train", SFT, "model.path=README.md"], "model.path: 'README.md' is a file, not a model directory"),
        (["eval", SFT, "--checkpoint", "README.md"], "--checkpoint: 'README.md' is a file, not a model directory"),
        (["generate", "README.md", "--prompt", "hi"], "CHECKPOINT: 'README.md' is a file, not a model directory"),
        (["train", SFT, "model.load_in_4bit=true"], "model.load_in_4bit: the tiny model (model.path empty)"),
        (["train", SFT, "data.path=train.jsonl"], "data.path: set to 'train.jsonl', but data.task=sudoku generates"),
        (["train", SFT, "data.eval_split=validation"], "data.eval_split: set to 'validation', but data.task=sudoku"),
        (["train", GRPO, "rewards=[{name: sudoku, kwargs: {foo: 1}}]"], "rewards[0].kwargs: 'foo' is not a parameter"),
        (["train", SFT, "rollout={steps: 4, steps: 8}"], "key 'steps' is given twice in one mapping"),
    ],
)
def test_settings_that_failed_after_a_model_stop_before_it(capsys, argv, words):
    assert words in stops(capsys, *argv)


def test_a_checkpoints_own_bad_recipe_is_named_with_the_fix(capsys, tmp_path):
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((ROOT / CKPT / "final" / "config.json").read_text())
    (ckpt / "recipe.yaml").write_text("rollout:\n  foo: 1\n")
    line = stops(capsys, "generate", str(ckpt), "--prompt", "hi")
    assert f"{ckpt / 'recipe.yaml'} (the recipe saved with CHECKPOINT): unknown key 'rollout.foo'" in line
    assert "fix or delete that file" in line
    (ckpt / "recipe.yaml").write_text("rollout:\n  steps: 4\n")  # the overrides' own mistakes are not the file's
    line = stops(capsys, "generate", str(ckpt), "--prompt", "hi", "rollout.top_p=2")
    assert line.startswith("dllm-rl: error: rollout.top_p: 2") and "recipe.yaml" not in line


@pytest.mark.parametrize("where", ["before", "after"])
def test_traceback_before_or_after_the_command_shows_it_and_still_exits_2(capsys, where):
    argv = ["train", SFT, "rollout.steps=abc"]
    argv = ["--traceback", *argv] if where == "before" else [*argv[:2], "--traceback", *argv[2:]]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.rstrip().splitlines()[-1].startswith("dllm-rl: error: rollout.steps:")
    assert main(["train", SFT, "rollout.steps=abc"]) == 2
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize(
    "override",
    ["model.path=/other", "model.lora.r=8", "model.lora={r: 8}", "model.tiny.hidden_size=64", " model.path = x"],
)
def test_generate_refuses_model_settings_that_checkpoint_overrides(capsys, override):
    line = stops(capsys, "generate", CKPT, "--prompt", "hi", override)
    key = override.split("=")[0].strip()
    assert f"{key} would be ignored: CHECKPOINT ({CKPT}) is the model" in line and f"drop {key}" in line


def test_generate_honours_the_settings_of_loading_the_checkpoint(capsys, monkeypatch):
    seen = {}

    def load(cfg, path=None, seed=0):
        seen.update(cfg=cfg, path=path)
        raise ConfigError("loaded")

    monkeypatch.setattr(model_loading, "load_model", load)
    assert "loaded" in stops(capsys, "generate", CKPT, "--prompt", "hi", "model.dtype=bfloat16")
    assert seen["cfg"].dtype == "bfloat16" and seen["path"].endswith("sudoku-sft/final")


@pytest.mark.parametrize("seed", ["99999999999999999999999", str(2**63), "-1"])
def test_generate_refuses_a_seed_out_of_range(capsys, seed):
    assert f"--seed {seed}: give a seed from 0 to 2**63 - 1" in stops(
        capsys, "generate", CKPT, "--prompt", "hi", "--seed", seed
    )


@pytest.mark.parametrize(
    "override, words",
    [
        ("rollout.order=policy", "rollout.order=policy needs the order policy trained with the model"),
        ("rollout.edit=remask", "rollout.edit=remask needs the edit head trained with the model"),
    ],
)
def test_generate_checks_the_learned_heads_file_before_the_weights_load(capsys, override, words):
    line = stops(capsys, "generate", CKPT, "--prompt", "hi", override)
    assert words in line and "CHECKPOINT (checkpoints/tiny/sudoku-sft/final) has no" in line
