"""GRPOTrainer's arguments in TRL's form: what `GRPOTrainer(model, reward_funcs, args=GRPOConfig(...),
train_dataset=..., eval_dataset=..., processing_class=..., peft_config=...)` means here.

- `model`: a hub id / directory (becomes model.path) or a model object (with `processing_class`, its tokenizer);
  TRL's positional order (model, reward_funcs, args, train_dataset, eval_dataset) is understood too.
- `args`: a trl.GRPOConfig, mapped onto the recipe field by field (dllm_rl.trl_args), or a dllm-rl Recipe.
- `train_dataset` / `eval_dataset`: datasets.Dataset with a `prompt` column (tasks.from_dataset).
- `peft_config`: a peft.PeftConfig applied with get_peft_model, as TRL does; the recipe records a LoraConfig's
  r / alpha / dropout / target modules in model.lora.
A recipe can be given as well: the args' fields then override its values.
"""

from __future__ import annotations

import dataclasses

from ..config import Recipe
from ..errors import ConfigError
from ..models.load import apply_peft_config, given_model, load_model
from ..tasks.from_dataset import dataset_task
from ..trl_args import lora_from_peft, recipe_from_trl_args


def _is_dataset(x) -> bool:
    import datasets

    return isinstance(x, (datasets.Dataset, datasets.IterableDataset))


PROCEDURAL = ("sudoku", "countdown")  # tasks generated to data.train_size rows (and reasoning_gym/NAME)


def trainer_inputs(
    recipe, model, tokenizer, task, args, train_dataset, eval_dataset, processing_class, peft_config
) -> tuple[Recipe, object, object, object]:
    """(recipe, model or None, tokenizer or None, task or None) from either calling convention."""
    if recipe is not None and not isinstance(recipe, Recipe):  # TRL's order: (model, reward_funcs, args, ...)
        model, third, recipe = recipe, model, None
        if isinstance(third, Recipe):
            recipe = third
        elif dataclasses.is_dataclass(third) and args is None:
            args = third
        if _is_dataset(tokenizer):
            train_dataset, tokenizer = tokenizer, None
        if _is_dataset(task):
            eval_dataset, task = task, None
    if isinstance(args, Recipe):
        recipe, args = args, None
    tokenizer = tokenizer if tokenizer is not None else processing_class
    if train_dataset is not None:
        system = recipe.data.system_prompt if recipe is not None else None
        task = dataset_task(
            train_dataset, eval_dataset, recipe.data.prompt_column if recipe else "prompt", system=system
        )
    elif eval_dataset is not None:
        raise ConfigError("eval_dataset= needs train_dataset= (or a recipe's data section for both)")
    if args is not None:
        rows = len(task.train) if task is not None else None
        generated = recipe is not None and not recipe.data.dataset and recipe.data.task in PROCEDURAL
        if rows is None and (generated or recipe is not None and recipe.data.task.startswith("reasoning_gym/")):
            rows = recipe.data.train_size  # a generated task: data.train_size rows, known before it is built
        recipe = recipe_from_trl_args(args, recipe, num_rows=rows)
    if recipe is None:
        raise ConfigError(
            "GRPOTrainer needs a recipe (dllm_rl.load_recipe(PATH)) or TRL's args=GRPOConfig(...) with a model"
        )
    if train_dataset is not None:
        recipe.data.task = "dataset"  # the data came from Python: the recipe records that, not a task it names
    if isinstance(model, str):
        recipe.model.path, model = model, None
    if peft_config is not None:
        if recipe.model.lora.r > 0:
            raise ConfigError("peft_config= and model.lora.r > 0 both ask for LoRA: keep one")
        if model is None:
            model, tokenizer = load_model(recipe.model, seed=recipe.train.seed)
        model = apply_peft_config(model, peft_config, recipe.train.seed)
        recipe.model.lora = lora_from_peft(peft_config) or recipe.model.lora
    if model is not None:
        model = given_model(model, tokenizer)
    return recipe, model, tokenizer, task
