"""A run saved before a recipe key existed resumes when the key is at its default: a key one recipe lacks counts
as its default when the saved and the current recipe are compared."""

import pytest

from dllm_rl.config import Recipe, recipe_to_dict, save_recipe
from dllm_rl.errors import ConfigError
from dllm_rl.trainers.common import recipe_differences, saved_recipe


def test_a_key_the_saved_recipe_lacks_counts_as_its_default():
    saved = recipe_to_dict(Recipe(algorithm="grpo"))
    del saved["grpo"]["top_entropy_quantile"], saved["rollout"]["min_p"]  # written before these keys existed
    current = Recipe(algorithm="grpo")
    assert recipe_differences(saved, recipe_to_dict(current)) == []
    current.grpo.top_entropy_quantile = 0.2
    assert recipe_differences(saved, recipe_to_dict(current)) == ["grpo.top_entropy_quantile"]


def test_a_saved_recipe_that_cannot_be_read_is_named_with_the_fix(tmp_path):
    recipe = Recipe(algorithm="sft")
    save_recipe(recipe, tmp_path / "recipe.yaml")
    assert saved_recipe(tmp_path, recipe) == recipe_to_dict(recipe)
    for text, why in [
        ("rollout: {steps: 4\n", "cannot be read"),  # cut short
        ("rollout:\n  steps: 4\nrollout:\n  steps: 8\n", "given twice"),  # two sections: which one ran?
        ("- 1\n- 2\n", "is not a recipe"),
    ]:
        (tmp_path / "recipe.yaml").write_text(text)
        with pytest.raises(ConfigError, match=why) as e:
            saved_recipe(tmp_path, recipe)
        assert str(tmp_path / "recipe.yaml") in str(e.value) and "train.output_dir" in str(e.value)
