"""GRPOTrainer in TRL's form: a TRL script runs unchanged apart from its import, trl.GRPOConfig fields map onto
the recipe with their units converted (or are refused by name), and the batch is given in either unit.

What TRL does was read in trl 1.16: trl/trainer/grpo_trainer.py (GRPOTrainer.__init__: model, args,
train_dataset, processing_class, peft_config), trl/trainer/grpo_config.py (field meanings and __post_init__:
per_device_train_batch_size counts completions, steps_per_generation defaults to gradient_accumulation_steps).
"""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from trl import GRPOConfig

from dllm_rl.config import load_recipe, recipe_from_dict
from dllm_rl.errors import ConfigError
from dllm_rl.trainers.trl_inputs import trainer_inputs
from dllm_rl.trl_args import recipe_from_trl_args

ROOT = Path(__file__).resolve().parents[2]

# A TRL script as TRL's documentation writes one: a dataset with a prompt column (conversational) and an extra
# column its reward reads, a reward from trl.rewards, a LoraConfig. Only the GRPOTrainer import is changed.
TRL_SCRIPT = """
from datasets import Dataset
from peft import LoraConfig
from trl import GRPOConfig, GRPOTrainer
from trl.rewards import accuracy_reward

dataset = Dataset.from_list(
    [
        {
            "prompt": [{"role": "user", "content": f"What is {a} + {b}? Answer in \\\\boxed{{}}."}],
            "solution": f"${a + b}$",
        }
        for a in range(1, 4)
        for b in range(1, 4)
    ]
)
training_args = GRPOConfig(
    output_dir=OUTPUT_DIR,
    max_steps=2,
    per_device_train_batch_size=4,
    num_generations=4,
    max_completion_length=8,
    learning_rate=1e-4,
    logging_steps=1,
    save_strategy="no",
    bf16=False,
    report_to="none",
)
trainer = GRPOTrainer(
    model="checkpoints/tiny/sudoku-sft",
    reward_funcs=accuracy_reward,
    args=training_args,
    train_dataset=dataset,
    peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
)
trainer.train()
"""


def test_a_trl_script_runs_two_steps_unchanged_apart_from_the_import(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    script = TRL_SCRIPT.replace(
        "from trl import GRPOConfig, GRPOTrainer", "from trl import GRPOConfig\nfrom dllm_rl import GRPOTrainer"
    )
    assert script.count("\n") == TRL_SCRIPT.count("\n") + 1  # nothing else differs
    exec(compile(script, "trl_script.py", "exec"), {"OUTPUT_DIR": str(tmp_path)})
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all("rewards/accuracy_reward/mean" in r for r in rows)  # trl.rewards' function scored every step
    saved = load_recipe(tmp_path / "final" / "recipe.yaml")
    assert saved.train.batch_size == 1 and saved.grpo.num_generations == 4  # 4 completions = 1 prompt x 4
    assert saved.model.lora.r == 8 and saved.grpo.loss_type == "dapo"  # the LoraConfig and TRL's default loss
    assert (tmp_path / "final" / "adapter_config.json").is_file()  # peft_config was applied: adapters are saved


def args(**kw):
    return GRPOConfig(**{"output_dir": "out", "bf16": False, "report_to": "none", **kw})


def test_grpo_config_fields_map_with_their_units():
    r = recipe_from_trl_args(
        args(
            per_device_train_batch_size=8,
            gradient_accumulation_steps=2,
            num_generations=4,
            steps_per_generation=4,
            num_iterations=2,
            max_steps=12,
            logging_steps=4,
            learning_rate=3e-6,
            adam_beta2=0.99,
            scale_rewards=False,
            min_p=0.1,
            epsilon_high=0.28,
            mask_truncated_completions=True,
        )
    )
    assert r.algorithm == "grpo" and r.train.per_device_train_batch_size == 8
    assert r.train.batch_size == 8 * 2 // 4  # prompts per optimizer step
    assert r.grpo.steps_per_generation == 4 and r.grpo.num_iterations == 2
    # 12 optimizer steps; each rollout feeds (4 / 2) x 2 = 4 of them -> 3 rollouts; logging every 4 -> every rollout
    assert r.train.max_steps == 3 and r.train.logging_steps == 1
    assert r.optim.lr == 3e-6 and r.optim.betas == [0.9, 0.99] and r.grpo.scale_rewards == "none"
    assert r.rollout.min_p == 0.1 and r.grpo.epsilon_high == 0.28 and r.grpo.mask_truncated_completions
    assert r.grpo.loss_type == "dapo" and r.rollout.temperature == 1.0  # TRL's defaults come with the args
    assert r.rollout.max_completion_length == 512 and r.rollout.block_length == 32 and r.rollout.steps == 256


def test_grpo_config_fields_without_a_meaning_are_refused_by_name():
    with pytest.raises(ConfigError, match="use_vllm=True"):
        recipe_from_trl_args(args(use_vllm=True))
    with pytest.raises(ConfigError, match="remove_unused_columns=True.*entropy_coef=0.1"):
        recipe_from_trl_args(args(remove_unused_columns=True, entropy_coef=0.1))
    with pytest.raises(ConfigError, match="multiple of grpo.num_generations"):
        recipe_from_trl_args(args(per_device_train_batch_size=6, gradient_accumulation_steps=2, num_generations=4))
    with pytest.raises(ConfigError, match="chat_template_kwargs=.*enable_thinking"):  # would change the prompts
        recipe_from_trl_args(args(chat_template_kwargs={"enable_thinking": False}))
    recipe_from_trl_args(args(run_name="x", push_to_hub=False, disable_tqdm=True))  # machinery only: accepted
    for strategy in ("no", "epoch"):  # dllm-rl logs every logging_steps: refused, not ignored
        with pytest.raises(ConfigError, match=f"logging_strategy='{strategy}': dllm-rl logs every logging_steps"):
            recipe_from_trl_args(args(logging_strategy=strategy))
    recipe_from_trl_args(args(logging_strategy="steps"))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers deprecates gradient_checkpointing
@pytest.mark.parametrize("field", ["gradient_checkpointing", "activation_checkpointing"])
def test_gradient_checkpointing_maps_by_either_name(field):
    """transformers 5 keeps gradient_checkpointing and activation_checkpointing in sync; both are the recipe's
    model.gradient_checkpointing (turning it off used to be refused as an unknown activation_checkpointing)."""
    off, on = args(**{field: False}), args(**{field: True})
    assert not recipe_from_trl_args(off).model.gradient_checkpointing
    assert recipe_from_trl_args(on).model.gradient_checkpointing


def test_args_override_a_recipe_and_epochs_become_steps():
    base = load_recipe(ROOT / "recipes/tiny/sudoku-tokens-grpo.yaml")
    r = recipe_from_trl_args(args(num_train_epochs=2, per_device_train_batch_size=16, num_generations=8), base, 40)
    assert r.estimator == base.estimator and r.rollout.steps == base.rollout.steps  # diffusion settings kept
    assert r.train.batch_size == 2 and r.train.max_steps == 40  # 2 epochs of 40 prompts, 2 per step
    assert base.train.batch_size != 2  # the recipe passed in is not modified


def test_an_epoch_is_one_pass_by_all_processes_together(monkeypatch):
    """TRL's epoch is a pass over the dataset by every process together: on 2 processes each rollout draws twice
    the prompts, so 2 epochs of 40 prompts take half the steps."""
    base = load_recipe(ROOT / "recipes/tiny/sudoku-tokens-grpo.yaml")
    a = args(num_train_epochs=2, per_device_train_batch_size=16, num_generations=8)
    monkeypatch.setattr(type(a), "world_size", property(lambda self: 2))
    assert recipe_from_trl_args(a, base, 40).train.max_steps == 20


def test_epochs_without_countable_rows_are_refused_not_dropped():
    """num_train_epochs over a recipe's dataset (rows unknown until it loads) used to leave the recipe's
    max_steps in place silently; a generated task counts data.train_size rows."""
    data = {"algorithm": "grpo", "data": {"dataset": "my.jsonl"}, "grpo": {"num_generations": 8}}
    with pytest.raises(ConfigError, match="num_train_epochs=2.*pass train_dataset="):
        recipe_from_trl_args(args(num_train_epochs=2), recipe_from_dict(data))
    assert recipe_from_trl_args(args(num_train_epochs=2, max_steps=8), recipe_from_dict(data)).train.max_steps == 8
    assert recipe_from_trl_args(args(), recipe_from_dict(data)).train.max_steps == 100  # TRL's default: the recipe's
    gsm8k = load_recipe(ROOT / "recipes/llada-8b/gsm8k-diffu-grpo.yaml")  # a hub dataset: rows known when loaded
    with pytest.raises(ConfigError, match="num_train_epochs=2"):
        trainer_inputs(gsm8k, None, None, None, args(num_train_epochs=2), None, None, None, None)


def test_the_recipe_takes_trls_batch_unit_too():
    r = recipe_from_dict(
        {
            "algorithm": "grpo",
            "grpo": {"num_generations": 4},
            "train": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 3},
        }
    )
    assert r.train.batch_size == 6  # 8 completions x 3 micro-batches / 4 generations
    with pytest.raises(ConfigError, match="disagrees"):
        recipe_from_dict(
            {
                "algorithm": "grpo",
                "grpo": {"num_generations": 4},
                "train": {"per_device_train_batch_size": 8, "batch_size": 5},
            }
        )
    with pytest.raises(ConfigError, match="whole|multiple"):
        recipe_from_dict(
            {"algorithm": "grpo", "grpo": {"num_generations": 4}, "train": {"per_device_train_batch_size": 6}}
        )


ADDITION = datasets.Dataset.from_list([{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(8)])


def tiny_trainer(tmp_path, model_factory, tokenizer, reward, max_steps=1, eval_dataset=None, **config):
    """TRL's call on a tiny model object: GRPOTrainer(model=, reward_funcs=, args=GRPOConfig, processing_class=),
    4 completions per step in groups of 4; `config`: further GRPOConfig fields."""
    from dllm_rl import GRPOTrainer

    return GRPOTrainer(
        model=model_factory(hidden=32),
        reward_funcs=reward,
        args=args(
            output_dir=str(tmp_path),
            max_steps=max_steps,
            per_device_train_batch_size=4,
            num_generations=4,
            max_completion_length=4,
            save_strategy="no",
            **config,
        ),
        train_dataset=ADDITION,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
    )


def test_a_model_object_with_its_tokenizer_and_trl_args(tmp_path, tokenizer, model_factory):
    from dllm_rl import GRPOTrainer

    seen = {}

    def exact(prompts, completions, answer, **kw):
        seen["completions"] = completions
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    trainer = tiny_trainer(tmp_path, model_factory, tokenizer, exact)
    assert trainer.recipe.data.task == "dataset" and trainer.recipe.model.path is None
    trainer.train()
    assert all(isinstance(c, str) for c in seen["completions"])  # plain prompts give plain completions (TRL)
    with pytest.raises(ConfigError, match="needs a recipe"):
        GRPOTrainer(reward_funcs=exact, train_dataset=ADDITION)


def test_rewards_get_the_trainer_state_in_evaluation_too(tmp_path, tokenizer, model_factory):
    # TRL passes its state to rewards when it scores an eval_dataset, as in training; a reward that reads it (a
    # curriculum) must not fail on the held-out set of a task without a verifier
    steps = []

    def curriculum(prompts, completions, answer, trainer_state, **kw):
        steps.append((len(prompts), trainer_state.global_step, trainer_state.max_steps))
        return [float(c.strip() == a) for c, a in zip(completions, answer)]

    trainer = tiny_trainer(
        tmp_path,
        model_factory,
        tokenizer,
        curriculum,
        max_steps=2,
        eval_strategy="steps",
        eval_steps=1,
        eval_dataset=ADDITION.select(range(3)),
    )
    result = trainer.train()
    assert result["before"] is not None and result["after"] is not None
    # held-out calls (3 prompts) at steps 0, 1 and the end; training calls (4 completions) before steps 1 and 2
    assert [s for s in steps if s[0] == 3] == [(3, 0, 2), (3, 1, 2), (3, 2, 2)]
    assert [s for s in steps if s[0] == 4] == [(4, 0, 2), (4, 1, 2)]
