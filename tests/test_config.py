import re
from pathlib import Path

import pytest

from dllm_rl.config import Recipe, load_recipe, recipe_from_dict, save_recipe
from dllm_rl.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_key_lists_valid_keys_and_suggests():
    with pytest.raises(ConfigError) as e:
        recipe_from_dict({"optim": {"lrr": 1e-3}})
    msg = str(e.value)
    assert "'optim.lrr'" in msg and "did you mean 'lr'" in msg and "weight_decay" in msg


def test_unknown_section():
    with pytest.raises(ConfigError, match="did you mean 'rollout'"):
        recipe_from_dict({"rolout": {}})


@pytest.mark.parametrize(
    "data,key",
    [
        ({"train": {"max_steps": "ten"}}, "train.max_steps"),
        ({"rollout": {"cache": "dual_cache"}}, "rollout.cache"),
        ({"optim": {"betas": 0.9}}, "optim.betas"),
        ({"train": {"resume": "yes"}}, "train.resume"),
    ],
)
def test_wrong_type_names_the_key(data, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        recipe_from_dict(data)


def test_types_are_converted():
    r = recipe_from_dict({"optim": {"lr": "1e-5", "warmup_steps": 3}, "rewards": [{"name": "sudoku"}]})
    assert r.optim.lr == 1e-5 and isinstance(r.optim.lr, float)
    assert r.rewards[0].name == "sudoku" and r.rewards[0].weight == 1.0


def test_dotted_overrides(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("optim: {lr: 0.1}\n")
    r = load_recipe(p, ["optim.lr=1e-5", "rollout.steps=64", "train.report_to=[tensorboard]"])
    assert r.optim.lr == 1e-5 and r.rollout.steps == 64 and r.train.report_to == ["tensorboard"]
    with pytest.raises(ConfigError, match="did you mean 'steps'"):
        load_recipe(p, ["rollout.stepz=3"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_recipe(p, ["rollout.steps"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("optim: {lr: [1, \n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(bad)


def test_resolved_recipe_round_trip(tmp_path):
    r = recipe_from_dict({"rollout": {"steps": 7}, "rewards": [{"name": "math", "weight": 2.0}]})
    save_recipe(r, tmp_path / "recipe.yaml")
    assert load_recipe(tmp_path / "recipe.yaml") == r
    assert Recipe() == recipe_from_dict({})


@pytest.mark.parametrize("path", sorted((ROOT / "recipes").rglob("*.yaml")), ids=lambda p: p.name)
def test_every_recipe_loads(path):
    load_recipe(path)


def test_a_key_given_twice_is_refused_with_its_lines(tmp_path):
    recipe = tmp_path / "twice.yaml"
    recipe.write_text("algorithm: sft\nrollout:\n  steps: 20\ntrain:\n  max_steps: 3\nrollout:\n  steps: 10\n")
    with pytest.raises(
        ConfigError, match=r"twice\.yaml: key 'rollout' is given twice in one mapping \(lines 2 and 6\)"
    ):
        load_recipe(recipe)
    recipe.write_text("algorithm: sft\nalgorithm: grpo\n")
    with pytest.raises(ConfigError, match=r"key 'algorithm' is given twice .*lines 1 and 2.*merge the two into one"):
        load_recipe(recipe)
    with pytest.raises(ConfigError, match=r"override 'data.options=\{a: 1, a: 2\}': key 'a' is given twice"):
        load_recipe(ROOT / "recipes/tiny/sudoku-sft.yaml", ["data.options={a: 1, a: 2}"])
    # a merge key's entries may be overridden, as YAML intends
    recipe.write_text("base: &b {steps: 20, max_completion_length: 20}\nrollout:\n  <<: *b\n  steps: 10\n")
    with pytest.raises(ConfigError, match="unknown key 'base'"):  # only the stray anchor key, not a duplicate
        load_recipe(recipe)


def test_per_device_batch_size_under_dpo_counts_pairs_or_samples():
    def dpo(pairs, per_device, **extra):
        data = {"algorithm": "dpo", "dpo": {"pairs": pairs, **extra}}
        data["train"] = {"per_device_train_batch_size": per_device, "gradient_accumulation_steps": 2}
        return recipe_from_dict(data).train.batch_size

    assert dpo("offline", 3) == 6  # TRL's DPOConfig: pairs per device and micro-batch, not divided by any group
    assert dpo("on_policy", 8, num_generations=4) == 4  # 8 samples = 2 prompts x 4, twice
    with pytest.raises(ConfigError, match=r"multiple of dpo.num_generations \(4\).*per_device_train_batch_size=8"):
        dpo("on_policy", 6, num_generations=4)


@pytest.mark.parametrize("algorithm", ["sft", "planner_sft", "consensus"])
def test_per_device_batch_size_of_the_sft_trainers_counts_sequences(algorithm):
    data = {"algorithm": algorithm, "train": {"per_device_train_batch_size": 3, "gradient_accumulation_steps": 2}}
    assert recipe_from_dict(data).train.batch_size == 6  # not divided by grpo.num_generations, which none reads


@pytest.mark.parametrize(
    "overrides",
    [
        ["data.task=gsm8k", "data.split=train[:10]", "data.eval_path=x.jsonl", "data.eval_split=validation"],
        ["data.task=code", "data.path=x.jsonl"],
        ["data.dataset=x.jsonl", "data.split=validation", "data.eval_path=y.jsonl", "data.eval_split=train"],
    ],
)
def test_dataset_keys_stay_allowed_where_they_are_read(overrides):
    load_recipe(ROOT / "recipes/tiny/sudoku-sft.yaml", overrides)


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["data.dataset=x.jsonl", "data.path=y.jsonl"], "data.path: set to 'y.jsonl', but the training rows come"),
        (
            ["data.task=countdown", "data.eval_path=y.jsonl"],
            "data.eval_path: set to 'y.jsonl', but data.task=countdown",
        ),
        (["hybrid.sft_plans=[none, oracle]", "hybrid.template=x"], "hybrid.template: 'x' must contain"),
    ],
)
def test_settings_nothing_reads_or_that_fail_later_are_refused(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_recipe(ROOT / "recipes/tiny/sudoku-sft.yaml", overrides)


def test_a_template_only_matters_when_a_plan_is_placed():
    load_recipe(ROOT / "recipes/tiny/sudoku-sft.yaml", ["hybrid.sft_plans=[none]", "hybrid.template=x"])


@pytest.mark.parametrize(
    "override,example",
    [
        ("rewards=sudoku", "e.g. rewards=[{name: sudoku}]"),
        ("train.report_to=wandb", "e.g. train.report_to=[wandb]"),
        ("rollout.cache=dual_cache", "e.g. rollout.cache=none"),
        ("train.resume=maybe", "e.g. train.resume=true"),
        ("data.options=3", "e.g. data.options={name: value}"),
    ],
)
def test_a_value_of_the_wrong_shape_is_answered_with_an_example(override, example):
    with pytest.raises(ConfigError, match=re.escape(example)):
        load_recipe(ROOT / "recipes/tiny/sudoku-sft.yaml", [override])
