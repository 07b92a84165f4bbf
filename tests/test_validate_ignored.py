"""Settings the algorithm that runs would never read are refused before any model is built, with the key and the
fix; the settings it does read stay accepted. Also: the batch arithmetic names the keys the user set, and recipes
built in Python (or from TRL's GRPOConfig) get the checks a YAML recipe gets."""

from __future__ import annotations

import pytest

from dllm_rl.cli import main
from dllm_rl.config import Recipe, load_recipe, validate
from dllm_rl.errors import ConfigError
from dllm_rl.validate import check_hub_model, validate_recipe

TINY = "recipes/tiny/"
GRPO, SFT, DPO = TINY + "sudoku-diffu-grpo.yaml", TINY + "sudoku-sft.yaml", TINY + "sudoku-dpo.yaml"
PLANNER, CONSENSUS = TINY + "sudoku-planner-sft.yaml", TINY + "sudoku-consensus.yaml"
TOKENS = TINY + "sudoku-tokens-grpo.yaml"  # GRPO with the trajectory estimator and a state-only order: any estimator
# sudoku-dpo.yaml with offline pairs: only what offline pairs read
OFFLINE = ["dpo.pairs=offline", "dpo.dataset_name=tests/data/sudoku_preferences.jsonl", "estimator.name=elbo"]
OFFLINE += ["rewards=[]", "rollout.temperature=0"]
BRANCH = ["dpo.pairs=branch", "estimator.name=trajectory"]
REAL = ["hybrid.plan=real", "hybrid.planner.path=checkpoints/tiny/sudoku-planner"]


@pytest.fixture(autouse=True)
def at_root(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[1])


def refused(path, overrides):
    with pytest.raises(ConfigError) as e:
        validate_recipe(load_recipe(path, overrides), check_data=False)
    assert "\n" not in str(e.value)
    return str(e.value)


BAD = [
    # 1 + 2: the batch arithmetic's keys are checked first, named as set (no ZeroDivisionError, no train.batch_size)
    (GRPO, ["grpo.num_generations=0", "train.per_device_train_batch_size=16"], r"^grpo.num_generations: 0 is out of"),
    (DPO, ["dpo.num_generations=0", "train.per_device_train_batch_size=16"], r"^dpo.num_generations: 0 is out of"),
    (GRPO, ["train.per_device_train_batch_size=0"], r"^train.per_device_train_batch_size: 0 is out of range"),
    (
        GRPO,
        ["train.per_device_train_batch_size=16", "train.gradient_accumulation_steps=0"],
        r"^train.gradient_accumulation_steps: 0 is out of range",
    ),
    # 4: planner_sft (TRL's SFTTrainer on hybrid.planner) reads neither the executor's sections nor these
    (PLANNER, ["optim.name=sgd"], r"^optim.name: set to 'sgd', but algorithm planner_sft never reads it.*AdamW"),
    (PLANNER, ["optim.name=sgd", "optim.betas=[0.5, 0.9]"], r"^optim.name: set to 'sgd'"),
    (PLANNER, ["optim.momentum=0.9"], r"^optim.momentum: .* planner_sft never reads it"),
    (PLANNER, ["train.mixed_precision=bf16"], r"^train.mixed_precision: .* planner_sft never reads it"),
    (PLANNER, ["train.deepspeed=recipes/deepspeed/zero2.json"], r"^train.deepspeed: .* planner_sft never reads it"),
    (PLANNER, ["train.eval_steps=10"], r"^train.eval_steps: .* planner_sft never reads it"),
    (PLANNER, ["train.shuffle_dataset=false"], r"^train.shuffle_dataset: .* planner_sft never reads it"),
    (PLANNER, ["train.log_completions=true"], r"^train.log_completions: .* planner_sft never reads it"),
    (PLANNER, ["hybrid.planner.lr=0.01"], r"^hybrid.planner.lr: .* planner_sft never reads it"),
    (PLANNER, ["hybrid.planner.train=true"], r"^hybrid.planner.train: .* planner_sft never reads it"),
    (PLANNER, ["hybrid.plan=oracle"], r"^hybrid.plan: .* planner_sft never reads it"),
    (PLANNER, ["model.lora.r=8"], r"^model.lora.r: .* planner_sft never reads it"),
    (PLANNER, ["rollout.max_completion_length=300"], r"^rollout.max_completion_length: .* planner_sft never reads"),
    (PLANNER, ["eval.num_samples=4"], r"^eval.num_samples: .* planner_sft never reads it"),
    (PLANNER, ["sft.t_min=0.1"], r"^sft.t_min: .* planner_sft never reads it"),
    # 5: sft.* outside the trainers that read it
    (GRPO, ["sft.objective=edit"], r"^sft.objective: .* algorithm grpo never reads it"),
    (GRPO, ["sft.edit_substitute=0.5"], r"^sft.edit_substitute: .* algorithm grpo never reads it"),
    (DPO, ["sft.t_min=0.1"], r"^sft.t_min: .* algorithm dpo never reads it"),
    (DPO, ["sft.objective=edit"], r"^sft.objective: .* algorithm dpo never reads it"),
    (CONSENSUS, ["sft.objective=edit"], r"^sft.objective: .* algorithm consensus never reads it"),
    (SFT, ["sft.edit_substitute=0.5"], r"^sft.edit_substitute: .* sft.objective=mdm never reads it"),
    # 6: consensus samples at consensus.temperature
    (CONSENSUS, ["rollout.temperature=0.7"], r"^rollout.temperature: .* consensus never reads it .*consensus.temp"),
    # 7: the planner's training switches are GRPO's; SFT/DPO/consensus evaluate without a planner
    (SFT, ["hybrid.train_executor=false"], r"^hybrid.train_executor: .* algorithm sft never reads it"),
    (SFT, ["hybrid.planner.train=true"], r"^hybrid.planner.train: .* algorithm sft never reads it"),
    (DPO, ["hybrid.train_executor=false"], r"^hybrid.train_executor: .* algorithm dpo never reads it"),
    (DPO, ["hybrid.planner.train=true"], r"^hybrid.planner.train: .* algorithm dpo never reads it"),
    (CONSENSUS, ["hybrid.train_executor=false"], r"^hybrid.train_executor: .* consensus never reads it"),
    (CONSENSUS, ["hybrid.planner.lr=0.01"], r"^hybrid.planner.lr: .* consensus never reads it"),
    (SFT, REAL, r"^hybrid.plan=real: algorithm sft evaluates without a planner"),
    (DPO, REAL, r"^hybrid.plan=real: algorithm dpo evaluates without a planner"),
    (SFT, ["hybrid.sft_plans=[real]"], r"^hybrid.sft_plans: 'real' .* set hybrid.planner.path"),
    (GRPO, ["hybrid.sft_plans=[oracle]"], r"^hybrid.sft_plans: .* algorithm grpo never reads it"),
    # 8: what each dpo.pairs mode never reads
    (DPO, [*OFFLINE, "rewards=[{name: sudoku}]"], r"^rewards: set, but dpo.pairs=offline never reads them"),
    (DPO, [*OFFLINE, "rollout.temperature=1.0"], r"^rollout.temperature: .* dpo.pairs=offline samples nothing"),
    (DPO, [*OFFLINE, "dpo.num_generations=4"], r"^dpo.num_generations: .* dpo.pairs=offline never reads it"),
    (DPO, [*OFFLINE, "dpo.branch_rounds=2"], r"^dpo.branch_rounds: .* dpo.pairs=offline never reads it"),
    (DPO, ["dpo.dataset_name=tests/data/sudoku_preferences.jsonl"], r"^dpo.dataset_name: .* dpo.pairs=on_policy"),
    (DPO, [*BRANCH, "dpo.num_generations=4"], r"^dpo.num_generations: .* dpo.pairs=branch never reads it"),
    # 9: what each estimator never reads (ESTIMATOR_KEYS), for GRPO and DPO alike
    (GRPO, ["estimator.name=one_step", "estimator.coupled=true"], r"^estimator.coupled: .* estimator.name=one_step"),
    (GRPO, ["estimator.num_samples=4"], r"^estimator.num_samples: set to 4, but estimator.name=trajectory never"),
    (GRPO, ["estimator.name=elbo", "estimator.eubo_beta=2"], r"^estimator.eubo_beta: .* estimator.name=elbo never"),
    (GRPO, ["estimator.name=block_elbo", "estimator.merge_steps=2"], r"^estimator.merge_steps: .*=block_elbo never"),
    (GRPO, ["estimator.name=ar_order", "estimator.t_max=0.9"], r"^estimator.t_max: .* estimator.name=ar_order never"),
    (DPO, ["estimator.num_samples=3"], r"^estimator.num_samples: set to 3, but estimator.name=trajectory never"),
    (DPO, [*OFFLINE, "estimator.p_mask_prompt=0.3"], r"^estimator.p_mask_prompt: .* estimator.name=elbo never"),
    (DPO, [*OFFLINE, "estimator.name=quadrature", "estimator.stratified=true"], r"^estimator.stratified: .*quadrature"),
    # 10: the fix a message gives is one that works, and a range message gives a range's reason
    (GRPO, ["optim.betas=0.9"], r"^optim.betas: expected a list, .* e.g. optim.betas=\[0.9, 0.999\]$"),
]


@pytest.mark.parametrize("path, overrides, match", BAD, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_a_setting_the_run_would_not_read_or_could_not_use_is_refused(path, overrides, match):
    import re

    message = refused(path, overrides)
    assert re.search(match, message), message


def test_a_range_message_gives_no_ignored_by_reason():
    message = refused(GRPO, ["rollout.temperature=-1"])
    assert message.startswith("rollout.temperature: -1.0 is out of range (it must be >= 0)") and "SFT" not in message


GOOD = [
    # 4: what planner_sft reads
    (
        PLANNER,
        ["train.per_device_train_batch_size=32", "train.gradient_accumulation_steps=2", "optim.betas=[0.8, 0.99]"]
        + ["optim.eps=1e-6", "optim.max_grad_norm=0.5", "train.save_steps=100", "train.save_total_limit=3"]
        + ["train.report_to=[tensorboard]", "train.num_threads=1", "train.resume=false", "train.seed=3"]
        + ["hybrid.planner.max_new_tokens=30", "hybrid.planner.lora.r=4", "hybrid.planner.dtype=bfloat16"]
        + ["hybrid.planner.system_prompt=Plan.", "data.train_size=100", "train.logging_steps=5"],
    ),
    # 5-7: what SFT, consensus and DPO read
    (SFT, ["sft.t_min=0.01", "hybrid.plan=oracle", "hybrid.sft_plans=[none, content_free]", "eval.temperature=0.5"]),
    (CONSENSUS, ["consensus.temperature=0.5", "sft.t_min=0.01", "eval.temperature=0.3", "hybrid.plan=content_free"]),
    (DPO, ["hybrid.plan=oracle", "dpo.num_generations=4", "rewards=[{name: sudoku}]", "rollout.temperature=0.7"]),
    # 8: each pair mode with its own keys
    (DPO, [*OFFLINE, "dpo.dataset_train_split=train", "rollout.steps=10", "eval.temperature=0.5", "rollout.top_k=3"]),
    (DPO, [*BRANCH, "dpo.branch_rounds=2", "dpo.branch_alternatives=3", "dpo.branch_anchors=false"]),
    # each estimator with the keys it reads; p_mask_prompt=0 states what the estimators that keep the prompt clean do
    (TOKENS, ["estimator.name=elbo", "estimator.coupled=true", "estimator.full_view=false", "estimator.t_min=0.2"]),
    (TOKENS, ["estimator.name=elbo", "estimator.p_mask_prompt=0", "estimator.num_samples=2"]),
    (TOKENS, ["estimator.name=one_step", "estimator.p_mask_prompt=0.3", "estimator.num_samples=2"]),
    (TOKENS, ["estimator.name=block_elbo", "estimator.eubo_beta=2", "estimator.block_length=5", "estimator.t_max=0.9"]),
    (TOKENS, ["estimator.merge_steps=2", "estimator.p_mask_prompt=0"]),
    (TOKENS, ["estimator.name=ar_order", "estimator.merge_steps=2"]),
    (DPO, [*OFFLINE, "estimator.name=quadrature", "estimator.num_samples=3", "estimator.masks_per_timestep=2"]),
    # GRPO reads the planner's and the sampling keys
    (GRPO, ["rollout.temperature=0.7", *REAL, "hybrid.planner.train=true", "hybrid.planner.lr=0.001"]),
    (GRPO, ["grpo.num_generations=4", "train.per_device_train_batch_size=64"]),
]


@pytest.mark.parametrize("path, overrides", GOOD, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_what_the_algorithm_reads_stays_accepted(path, overrides):
    validate_recipe(load_recipe(path, overrides), check_data=False)


def test_bad_batch_arithmetic_stops_the_cli_with_exit_code_2_before_any_model(capsys, monkeypatch, tmp_path):
    import dllm_rl.trainers.common as common

    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("a model was built"))
    out = f"train.output_dir={tmp_path / 'out'}"
    for recipe, key in ((GRPO, "grpo.num_generations"), (DPO, "dpo.num_generations")):
        capsys.readouterr()
        assert main(["train", recipe, f"{key}=0", "train.per_device_train_batch_size=16", out]) == 2
        assert f"{key}: 0 is out of range" in capsys.readouterr().err


def test_reward_weights_without_rewards_count_the_tasks_own_reward(capsys, monkeypatch, tmp_path):
    """rewards: [] scores with the task's verifier, one reward: grpo.reward_weights needs one weight, checked before
    any model is built."""
    import dllm_rl.trainers.common as common
    from dllm_rl.trainers.grpo import GRPOTrainer

    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("a model was built"))
    out = f"train.output_dir={tmp_path / 'out'}"
    capsys.readouterr()
    assert main(["train", GRPO, "rewards=[]", "grpo.reward_weights=[1, 2]", out]) == 2
    assert "grpo.reward_weights has 2 weights, but rewards is empty" in capsys.readouterr().err
    trainer = GRPOTrainer.__new__(GRPOTrainer)  # the recipe check alone, as __init__ runs it first
    trainer.recipe = load_recipe(GRPO, ["rewards=[]", "grpo.reward_weights=[2]", out])
    trainer._check_recipe(None, None)


def test_literal_choices_and_types_are_checked_for_recipes_built_in_python():
    for section, name, value, match in [
        ("grpo", "reference", "bogus", r"^grpo.reference: 'bogus' is not one of \['auto'"),
        ("grpo", "scale_rewards", True, r"^grpo.scale_rewards: True is not one of"),
        ("rollout", "steps", "32", r"^rollout.steps: expected int, got str"),
    ]:
        recipe = Recipe(algorithm="grpo")
        setattr(getattr(recipe, section), name, value)
        with pytest.raises(ConfigError, match=match):
            validate(recipe)
    validate(Recipe(algorithm="grpo"))


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("scale_rewards", "bogus", r"^GRPOConfig.scale_rewards='bogus' \(dllm-rl's grpo.scale_rewards: 'bogus' is not"),
        ("importance_sampling_level", "sequence_token", r"^GRPOConfig.importance_sampling_level='sequence_token'"),
        ("num_generations", None, r"^GRPOConfig.num_generations=None: dllm-rl needs a value here"),
        ("max_completion_length", None, r"^GRPOConfig.max_completion_length=None: dllm-rl needs a value here"),
    ],
)
def test_trl_args_are_checked_naming_the_trl_field(tmp_path, field, value, match):
    from trl import GRPOConfig

    from dllm_rl.trl_args import recipe_from_trl_args

    args = GRPOConfig(output_dir=str(tmp_path), bf16=False, report_to="none")
    setattr(args, field, value)  # TRL checks some of these in __post_init__, not when set later
    with pytest.raises(ConfigError, match=match):
        recipe_from_trl_args(args)


def test_a_run_directory_not_yet_written_is_called_one(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"no such local directory \(a run writes it: run the recipe that produces"):
        check_hub_model("outputs/tiny-sudoku-prefix-lora", "model.path")
    with pytest.raises(ConfigError) as e:
        check_hub_model("nobody-here/no-such-model", "model.path")
    assert "no such local directory" not in str(e.value)


# a non-default value of each estimator key, valid under Recipe()'s rollout (32 positions)
ESTIMATOR_VALUES = {
    "p_mask_prompt": 0.3,
    "num_samples": 2,
    "masks_per_timestep": 2,
    "t_min": 0.1,
    "t_max": 0.9,
    "stratified": True,
    "coupled": True,
    "full_view": False,
    "eubo_beta": 2.0,
    "block_length": 8,
    "merge_steps": 2,
}


def test_every_estimator_key_is_accepted_by_the_estimators_that_read_it_and_refused_by_the_others():
    """The table ESTIMATOR_KEYS (key -> the estimators that read it) covers every estimator key; GRPO and DPO accept
    a key set for each estimator it names and refuse it, naming the key and the fix, for every other one."""
    import dataclasses

    from dllm_rl.config import ESTIMATOR_KEYS, EstimatorConfig
    from dllm_rl.estimators import ESTIMATORS

    keys = {f.name for f in dataclasses.fields(EstimatorConfig)} - {"name"}
    assert set(ESTIMATOR_KEYS) == keys == set(ESTIMATOR_VALUES)
    for key, names in ESTIMATOR_KEYS.items():
        assert names and set(names) <= set(ESTIMATORS), key
        for name in ESTIMATORS:
            for trainer in ("grpo", "dpo"):
                recipe = Recipe(algorithm=trainer)
                recipe.estimator = EstimatorConfig(name=name, **{key: ESTIMATOR_VALUES[key]})
                if name in names:
                    validate(recipe, trainer)
                    continue
                with pytest.raises(ConfigError) as e:
                    validate(recipe, trainer)
                if name == "quadrature" and key in ("t_min", "t_max"):  # the older rule, with its own reason
                    assert "integrates the masking ratio over [0, 1]" in str(e.value)
                    continue
                assert str(e.value).startswith(
                    f"estimator.{key}: set to {str(ESTIMATOR_VALUES[key]).lower()}, but estimator.name={name} never "
                    f"reads it (read by estimator.name="
                ), str(e.value)
                assert str(e.value).endswith("); remove it or pick one of those estimators"), str(e.value)
                assert all(n in str(e.value) for n in names)


def test_an_estimator_key_message_names_the_key_the_readers_and_the_fix():
    message = refused(GRPO, ["estimator.name=one_step", "estimator.coupled=true"])
    assert message == (
        "estimator.coupled: set to true, but estimator.name=one_step never reads it (read by estimator.name=elbo); "
        "remove it or pick one of those estimators"
    )
    message = refused(GRPO, ["estimator.num_samples=4"])
    assert message == (
        "estimator.num_samples: set to 4, but estimator.name=trajectory never reads it (read by estimator.name="
        "one_step, elbo, block_elbo or quadrature); remove it or pick one of those estimators"
    )


def test_estimator_keys_are_judged_for_the_trainers_that_read_the_section_only(monkeypatch):
    """Evaluation and loading alone do not judge the trainer; SFT and consensus refuse the whole section (NOT_SFT);
    a name registered at run time (examples/custom_estimator.py) may read any key."""
    from dllm_rl.estimators import ESTIMATORS

    over = ["estimator.name=one_step", "estimator.merge_steps=4"]
    validate_recipe(load_recipe(TOKENS, over), check_data=False, training=False)  # dllm-rl eval / plan
    with pytest.raises(ConfigError, match=r"^estimator.merge_steps: .* algorithm sft never reads it"):
        validate_recipe(load_recipe(SFT, over), check_data=False)
    with pytest.raises(ConfigError, match=r"^estimator.merge_steps: .* algorithm consensus never reads it"):
        validate_recipe(load_recipe(CONSENSUS, over), check_data=False)
    monkeypatch.setitem(ESTIMATORS, "uniform_count", ESTIMATORS["elbo"])
    validate_recipe(load_recipe(TOKENS, ["estimator.name=uniform_count", "estimator.num_samples=2"]), check_data=False)


def test_an_unread_estimator_key_stops_the_cli_with_exit_code_2_before_any_model(capsys, monkeypatch, tmp_path):
    import dllm_rl.trainers.common as common

    monkeypatch.setattr(common, "load_model", lambda *a, **k: pytest.fail("a model was built"))
    out = f"train.output_dir={tmp_path / 'out'}"
    for recipe, over in ((GRPO, "estimator.num_samples=4"), (DPO, "estimator.coupled=true")):
        capsys.readouterr()
        assert main(["train", recipe, over, out]) == 2
        assert f"{over.split('=')[0]}: set to " in capsys.readouterr().err
