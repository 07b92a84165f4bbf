"""A run saved before a recipe key existed resumes when the key is at its default: a key one recipe lacks counts
as its default when the saved and the current recipe are compared."""

from dllm_rl.config import Recipe, recipe_to_dict
from dllm_rl.trainers.common import recipe_differences


def test_a_key_the_saved_recipe_lacks_counts_as_its_default():
    saved = recipe_to_dict(Recipe(algorithm="grpo"))
    del saved["grpo"]["top_entropy_quantile"], saved["rollout"]["min_p"]  # written before these keys existed
    current = Recipe(algorithm="grpo")
    assert recipe_differences(saved, recipe_to_dict(current)) == []
    current.grpo.top_entropy_quantile = 0.2
    assert recipe_differences(saved, recipe_to_dict(current)) == ["grpo.top_entropy_quantile"]
