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
