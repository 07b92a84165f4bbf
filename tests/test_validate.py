"""Every recipe value is validated when the recipe is loaded (config.load_recipe, then validate.validate_recipe as
the CLI and the trainers call it), before any model or data is built: a bad value is a ConfigError whose one
line names the key, in well under a second, and never another exception.

The property test walks the recipe's schema (the dataclass tree with its Annotated constraints) and draws, for
a field chosen at random, a value its type or its constraint rejects; the other tests name the cases the
schema cannot express (files, cross-field rules, keys a trainer would ignore, runtime-registered names)."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
import typing
from pathlib import Path
from typing import Any, Literal, Union

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dllm_rl.cli import main
from dllm_rl.config import Check, Recipe, RewardSpec, field_checks, load_recipe, recipe_from_dict, validate
from dllm_rl.errors import ConfigError, DllmRlError
from dllm_rl.validate import schedulers, validate_recipe

ROOT = Path(__file__).resolve().parents[1]
BASES = {"sft": ROOT / "recipes/tiny/sudoku-sft.yaml", "grpo": ROOT / "recipes/tiny/sudoku-tokens-grpo.yaml"}
# str fields whose value names an entry of a registry (checked by validate_recipe)
NAMED = {"data.task", "rollout.commit", "rollout.order", "estimator.name", "grpo.loss_type", "grpo.advantage"}
NAMED |= {"optim.lr_scheduler"}


def load_and_validate(path, overrides=()):
    return validate_recipe(load_recipe(path, list(overrides)))


# ------------------------------------------------------------------------------------------ the schema


def leaves(cls=Recipe, prefix=()):
    """(path of keys, annotated type) of every field under `cls`; list-of-section fields (rewards) go one item
    deep, as the tiny GRPO recipe has one reward."""
    hints = typing.get_type_hints(cls, include_extras=True)
    for f in dataclasses.fields(cls):
        tp, path = hints[f.name], (*prefix, f.name)
        bare = field_checks(tp)[0]
        if dataclasses.is_dataclass(bare):
            yield path, tp
            yield from leaves(bare, path)
        elif typing.get_origin(bare) is list and dataclasses.is_dataclass(typing.get_args(bare)[0]):
            yield path, tp
            yield from leaves(typing.get_args(bare)[0], (*path, 0))
        else:
            yield path, tp


LEAVES = list(leaves())
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=8)
JUNK = st.one_of(
    st.lists(st.integers(), min_size=1, max_size=3), st.dictionaries(TEXT, st.integers(), min_size=1, max_size=2)
)


def _is_float_text(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


def out_of_range(check: Check, integral: bool):
    """Strategies of numbers `check` rejects, one per bound (of the field's kind)."""
    if integral:
        below = {
            "ge": lambda a: st.integers(max_value=math.ceil(a) - 1),
            "gt": lambda a: st.integers(max_value=math.floor(a)),
        }
        above = {
            "le": lambda b: st.integers(min_value=math.floor(b) + 1),
            "lt": lambda b: st.integers(min_value=math.ceil(b)),
        }
    else:
        below = {
            "ge": lambda a: st.floats(max_value=a, exclude_max=True, allow_nan=False),
            "gt": lambda a: st.floats(max_value=a, allow_nan=False),
        }
        above = {
            "le": lambda b: st.floats(min_value=b, exclude_min=True, allow_nan=False),
            "lt": lambda b: st.floats(min_value=b, allow_nan=False),
        }
    return [make(getattr(check, name)) for name, make in {**below, **above}.items() if getattr(check, name) is not None]


def invalid(tp, key: str):
    """A strategy of values the field (annotated type `tp`, dotted `key`) must reject."""
    bare, checks = field_checks(tp)
    origin, args = typing.get_origin(bare), typing.get_args(bare)
    if dataclasses.is_dataclass(bare):  # a section: not a mapping, or a mapping with a key it does not have
        names = {f.name for f in dataclasses.fields(bare)}
        return st.one_of(
            st.lists(st.integers(), min_size=1, max_size=2),
            st.integers(),
            TEXT.filter(bool),
            st.dictionaries(TEXT.filter(lambda k: k not in names), st.integers(), min_size=1, max_size=1),
        )
    if origin is list:
        (item,) = args
        item_bare = field_checks(item)[0]
        if dataclasses.is_dataclass(item_bare):  # rewards: not a list, or an item that is not a mapping
            return st.one_of(st.integers(), TEXT.filter(bool), st.lists(st.integers(), min_size=1, max_size=2))
        wrong_items = st.lists(invalid(item, f"{key}[0]"), min_size=1, max_size=2)
        options = [st.integers(), st.booleans(), TEXT.filter(bool), wrong_items]
        for c in checks:
            if c.length is not None:
                good = st.floats(0, 0.5) if item_bare is float else TEXT.filter(bool)
                options.append(st.lists(good, max_size=5).filter(lambda v, n=c.length: len(v) != n))
            if c.min_items:
                options.append(st.just([]))
        return st.one_of(options)
    if bare is dict:
        return st.one_of(st.integers(), TEXT, st.lists(st.integers(), max_size=2), st.booleans())
    if origin in (Union,) or bare is Any:  # train.resume: bool or "force"
        return st.one_of(TEXT.filter(lambda s: s != "force"), st.integers(), st.floats(allow_nan=False), JUNK)
    if origin is Literal:
        return st.one_of(TEXT.filter(lambda s: s not in args), st.integers(), st.booleans(), JUNK)
    if bare is bool:
        return st.one_of(TEXT, st.integers(), st.floats(allow_nan=False), JUNK)
    if bare is int:
        ranges = [o for c in checks for o in out_of_range(c, integral=True)]
        return st.one_of(TEXT, st.floats(allow_nan=False), st.booleans(), JUNK, *ranges)
    if bare is float:
        ranges = [o for c in checks for o in out_of_range(c, integral=False)]
        special = st.sampled_from([math.nan, math.inf, -math.inf, 10**400])
        return st.one_of(TEXT.filter(lambda s: not _is_float_text(s)), st.booleans(), JUNK, special, *ranges)
    if bare is str:
        wrong = [st.integers(), st.floats(allow_nan=False), st.booleans(), JUNK, st.just("")]
        if key in NAMED or key.endswith(".name"):
            wrong.append(TEXT.filter(bool).map(lambda s: f"no-such-{s}"))
        return st.one_of(wrong)
    raise AssertionError(f"no strategy for {key}: {tp}")


def _set(data: dict, path, value) -> None:
    node = data
    for part in path[:-1]:
        node = node[part] if isinstance(part, int) else node.setdefault(part, {})
    node[path[-1]] = value


@st.composite
def broken_recipes(draw):
    """(base recipe name, dotted key, its YAML text) with one invalid value drawn over the schema."""
    algorithm = draw(st.sampled_from(sorted(BASES)))
    path, tp = draw(st.sampled_from([leaf for leaf in LEAVES if algorithm == "grpo" or leaf[0][0] != "rewards"]))
    key = ".".join(str(p) for p in path).replace(".0.", "[0].")
    value = draw(invalid(tp, key))
    data = yaml.safe_load(BASES[algorithm].read_text())  # the GRPO recipe has one reward: rewards[0] exists
    _set(data, path, value)
    return algorithm, key, yaml.safe_dump(data)


@pytest.fixture(scope="module")
def workdir():
    """A scratch folder, and the imports validation needs done once (the first load pays them, not a draw)."""
    old = os.getcwd()
    os.chdir(ROOT)  # recipes name the shipped checkpoints relative to the repository root
    load_and_validate(BASES["grpo"])
    schedulers()
    with tempfile.TemporaryDirectory() as tmp:
        yield Path(tmp)
    os.chdir(old)


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=broken_recipes())
def test_any_invalid_value_is_a_config_error_at_load_in_well_under_a_second(workdir, case):
    algorithm, key, text = case
    path = workdir / "recipe.yaml"
    path.write_text(text)
    start = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        load_and_validate(path)
    elapsed = time.perf_counter() - start
    message = str(e.value)
    assert "\n" not in message and key in message, (key, message)
    assert elapsed < 0.5, (key, elapsed)


# ------------------------------------------------------------------------------------------ named cases


@pytest.fixture
def at_root(monkeypatch):
    monkeypatch.chdir(ROOT)


def _write(tmp_path, content: bytes | str, name="r.yaml") -> Path:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


@pytest.mark.parametrize(
    "content,words",
    [
        ("", "is empty"),
        ("# only a comment\n", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not a text file"),
        (b"\xff\xfe\xfd", "not a text file"),
        ("- algorithm: sft\n", "holds a list"),
        ("just a string\n", "holds a str"),
        ("42\n", "holds a int"),
        ("algorithm: sft\ntrain: [1, 2]\n", "train: expected a mapping"),
    ],
)
def test_empty_binary_and_non_mapping_files(tmp_path, content, words):
    with pytest.raises(ConfigError, match=words):
        load_recipe(_write(tmp_path, content))


@pytest.mark.parametrize(
    "overrides,key",
    [
        (["train.max_steps=0"], "train.max_steps"),
        (["train.max_steps=-5"], "train.max_steps"),
        (["optim.lr=-1e-4"], "optim.lr"),
        (["optim.lr=3"], "optim.lr"),
        (["order_policy.lr=0"], "order_policy.lr"),
        (["optim.lr=.nan"], "optim.lr"),
        (["optim.betas=[0.9, 1.5]"], r"optim.betas\[1\]"),
        (["grpo.num_generations=1"], "grpo.num_generations"),
        (["rollout.top_p=0"], "rollout.top_p"),
        (["estimator.p_mask_prompt=1.5"], "estimator.p_mask_prompt"),
        (["estimator.t_min=0.9", "estimator.t_max=0.1"], "estimator.t_min"),
        (["rollout.block_length=7"], "rollout.block_length"),
        (["rollout.steps=3", "rollout.block_length=10"], "rollout.steps"),
        (["train.gradient_accumulation_steps=3"], "train.batch_size"),
        (["eval.size=1000"], "eval.size"),
        (["optim.lr_scheduler=cosine_with_min_lr"], "optim.lr_scheduler"),
        (["optim.lr_scheduler=warmup_stable_decay"], "optim.lr_scheduler"),
        (["optim.lr_scheduler=constant", "optim.warmup_steps=5"], "optim.warmup_steps"),
        (["estimator.name=elbow"], "estimator.name"),
        (["rollout.commit=fastest"], "rollout.commit"),
        (["data.task=sudoku9"], "data.task"),
        (["train.report_to=[tensorbord]"], "train.report_to"),
        (["rewards=[{name: examples/reward_plugin.py:no_such_function}]"], r"rewards\[0\].name"),
        (["rewards=[{name: no/such/file.py:fn}]"], r"rewards\[0\].name"),
        (["rewards=[{name: sudokku}]"], r"rewards\[0\].name"),
        (["rewards=[{weight: 1.0}]"], r"rewards\[0\].name"),
        (["model.path=checkpoints/tiny/no-such-model"], "model.path"),
        (["train.deepspeed=recipes/deepspeed/zero9.json"], "train.deepspeed"),
        (["optim.name=sgd", "train.deepspeed=recipes/deepspeed/zero3_offload.json"], "DeepSpeed's CPU Adam"),
        (["model.load_in_4bit=true"], "model.load_in_4bit: 4-bit weights cannot be trained"),  # no LoRA
        (["estimator.name=quadrature", "estimator.t_min=0.1"], "integrates the masking ratio over"),
        (["rollout.edit=remask", "grpo.loss_type=dr_grpo"], "grpo.loss_type=dr_grpo divides by a constant"),
        (["rollout.edit=remask", "grpo.top_entropy_quantile=0.2"], "grpo.top_entropy_quantile: 0.2 masks per-tok"),
        (["rollout.edit=remask", "rollout.edit_temperature=0"], "rollout.edit_temperature: 0 takes the edit head"),
        (["sft.t_min=0.01"], "sft.t_min"),  # GRPO never reads it
        (["optim.momentum=0.9"], "optim.momentum"),  # adamw never reads it
        (["optim.name=sgd", "optim.betas=[0.8, 0.9]"], "optim.betas"),
        (["grpo.loss_type=spg", "grpo.beta=0.04"], "grpo.beta"),
        (["grpo.loss_type=wd1", "grpo.top_entropy_quantile=0.2", "grpo.beta=0"], "grpo.top_entropy_quantile"),
        (["grpo.loss_type=wd1"], r"grpo.beta: 0.04 with grpo.loss_type=wd1, which has no KL term"),  # base: 0.04
        (["hybrid.planner.train=true"], "hybrid.planner.train"),  # hybrid.plan is none
        (["hybrid.train_executor=false"], "hybrid.train_executor"),
        (["order_policy.train_model=false"], "order_policy.train_model"),  # rollout.order=top_prob has no head
        (["train.resume=maybe"], "train.resume"),
        (["data.path=no/such/file.jsonl"], "data.path"),
        (["data.task=gsm8k", "data.eval_seed=2"], "data.eval_seed"),  # a fixed split has no other held-out set
        (["data.eval_seed=-1"], "data.eval_seed"),
        (["grpo.beta=0.04", "grpo.sync_ref_model=true", "model.lora.r=8"], "grpo.sync_ref_model"),  # LoRA's base
        (["grpo.beta=0", "grpo.sync_ref_model=true"], r"set grpo.beta != 0"),  # beta 0 loads no reference
        (["data.task=reasoning_gym/mini_sudokku"], r"data.task: reasoning-gym has no task 'mini_sudokku'"),
        (["data.task=reasoning_gym/mini_sudoku"], r"data.options: \['unique'\] are not options"),  # a sudoku knob
        (["data.task=gym/mini_sudoku"], r"data.task \(FAMILY/NAME\) 'gym'"),
        (["rewards=[{name: 'trl.rewards:no_such_reward'}]"], r"rewards\[0\].name: .*has no function 'no_such_reward'"),
        (["rewards=[{name: 'no_such_pkg.mod:fn'}]"], r"rewards\[0\].name: .*cannot import module 'no_such_pkg.mod'"),
        (["model.path=ckpt/run--1"], "neither an existing path nor a hub model id"),
        (["hybrid.planner.max_new_tokens=-3"], "hybrid.planner.max_new_tokens"),  # failed only at sampling
        (["hybrid.planner.top_p=7"], "hybrid.planner.top_p"),
        (["consensus.samples=0"], "consensus.samples"),
        (["consensus.min_share=5"], "consensus.min_share"),
    ],
)
def test_each_bad_value_names_its_key(at_root, overrides, key):
    with pytest.raises(ConfigError, match=key) as e:
        load_and_validate(BASES["grpo"], overrides)
    assert "\n" not in str(e.value)


def _other_value(value, tp):
    """A value the field's own type and constraint accept, other than its default (None for names and strings:
    the named cases cover them)."""
    bare, checks = field_checks(tp)
    if bare is bool:
        return not value
    if typing.get_origin(bare) is Literal:
        return next(c for c in typing.get_args(bare) if c != value)
    if bare in (int, float):
        candidates = (2, 4, 16) if bare is int else (0.5, 0.25, 2.0)
        return next(c for c in candidates if c != value and all(ch.in_range(c) for ch in checks))
    return None


def _grpo_only_fields():
    hints = typing.get_type_hints(Recipe, include_extras=True)
    for section in ("grpo", "estimator", "order_policy"):
        cls = field_checks(hints[section])[0]
        sub = typing.get_type_hints(cls, include_extras=True)
        for f in dataclasses.fields(cls):
            value = _other_value(getattr(cls(), f.name), sub[f.name])
            if value is not None:
                yield f"{section}.{f.name}", value


@pytest.mark.parametrize("key,value", list(_grpo_only_fields()) + [("rollout.temperature", 0.7)])
def test_a_key_sft_would_ignore_is_rejected_for_sft_and_accepted_for_grpo(at_root, key, value):
    over = f"{key}={json.dumps(value)}"
    recipe = load_recipe(BASES["sft"], [over])  # loading alone (eval, generate) does not judge the trainer
    with pytest.raises(ConfigError, match=rf"{key}: set to .* but algorithm sft never reads it"):
        validate_recipe(recipe)
    grpo = load_recipe(BASES["grpo"])
    section, name = key.split(".")
    try:
        validate(dataclasses.replace(grpo, **{section: dataclasses.replace(getattr(grpo, section), **{name: value})}))
    except ConfigError as e:  # a rule across fields may still object (t_min vs t_max); never the trainer rule
        assert "never reads it" not in str(e), e


def test_a_reasoning_gym_task_and_a_module_reward_pass_the_recipe_checks(at_root):
    """data.task FAMILY/NAME and rewards named package.module:function are what the runtime loads, so the checks
    that run before any model is built accept them (they used to look data.task up among the built-in tasks only
    and read every NAME:function as a file)."""
    r = load_and_validate(
        BASES["grpo"],
        ["data.task=reasoning_gym/mini_sudoku", "data.options={}", "rewards=[{name: 'trl.rewards:accuracy_reward'}]"],
    )
    assert r.data.task == "reasoning_gym/mini_sudoku" and r.rewards[0].name == "trl.rewards:accuracy_reward"


def test_eval_and_plan_check_what_they_read_not_what_training_needs(at_root, tmp_path):
    """training=False (`dllm-rl eval`, `plan`): a checkpoint is evaluated under another order, into an output_dir
    nothing is written to, without the DPO pairs file; names and data paths are still checked."""
    order = ROOT / "recipes/tiny/sudoku-order-dpo.yaml"
    over = [
        "rollout.order=low_confidence",
        "train.output_dir=README.md/x",
        "dpo.pairs=offline",
        "dpo.dataset_name=x.jsonl",
    ]
    with pytest.raises(ConfigError):
        validate_recipe(load_recipe(order, over), check_model=False)
    validate_recipe(load_recipe(order, over), check_model=False, training=False)
    with pytest.raises(ConfigError, match="unknown rollout.order"):
        validate_recipe(load_recipe(order, ["rollout.order=low_confidense"]), check_model=False, training=False)


def test_a_gguf_planner_file_is_a_planner(at_root, tmp_path):
    gguf = tmp_path / "planner.gguf"
    gguf.write_bytes(b"GGUF")
    hybrid = ["hybrid.plan=real", "hybrid.template='{plan} {question}'"]
    load_and_validate(BASES["grpo"], [*hybrid, f"hybrid.planner.path={gguf}"])
    with pytest.raises(ConfigError, match="neither a directory nor a .gguf file"):
        load_and_validate(BASES["grpo"], [*hybrid, f"hybrid.planner.path={tmp_path / 'planner.bin'}"])


def test_rewards_in_an_sft_recipe_are_rejected(at_root):
    with pytest.raises(ConfigError, match="rewards: set to .* algorithm sft never reads it"):
        load_and_validate(BASES["sft"], ["rewards=[{name: sudoku}]"])
    with pytest.raises(ConfigError, match="rollout.order: 'policy' needs a learned order head"):
        load_and_validate(BASES["sft"], ["rollout.order=policy"])


def test_a_name_registered_at_run_time_is_valid(at_root):
    from dllm_rl.estimators import ESTIMATORS

    with pytest.raises(ConfigError, match="estimator.name"):
        load_and_validate(BASES["grpo"], ["estimator.name=registered_later"])
    ESTIMATORS["registered_later"] = ESTIMATORS["elbo"]
    try:
        assert (
            load_and_validate(BASES["grpo"], ["estimator.name=registered_later"]).estimator.name == "registered_later"
        )
    finally:
        del ESTIMATORS["registered_later"]


SHIPPED = sorted(
    [
        *(ROOT / "recipes").rglob("*.yaml"),
        *(ROOT / "examples").glob("*.yaml"),
        *(ROOT / "checkpoints").rglob("recipe.yaml"),
    ]
)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_shipped_recipe_validates(at_root, path):
    recipe = load_recipe(path)
    local_model = recipe.model.path is None or not recipe.model.path.count("/") == 1  # hub ids are not checked
    validate_recipe(recipe, check_model=local_model)


def test_a_recipe_built_in_python_is_validated_too():
    recipe = Recipe()
    recipe.train.max_steps = 0
    with pytest.raises(ConfigError, match="train.max_steps"):
        validate_recipe(recipe)
    recipe = recipe_from_dict({"algorithm": "sft"})
    recipe.rewards = [RewardSpec("sudoku")]
    with pytest.raises(ConfigError, match="rewards: set to"):
        validate_recipe(recipe)


def test_cli_reports_each_in_one_line_with_exit_code_2(tmp_path, capsys, at_root):
    cases = [
        ["train", str(_write(tmp_path, "", "empty.yaml"))],
        ["train", str(_write(tmp_path, b"\x00\x01binary", "bin.yaml"))],
        ["train", str(BASES["grpo"]), "train.max_steps=0"],
        ["train", str(BASES["grpo"]), "rewards=[{name: examples/reward_plugin.py:nope}]"],
        ["train", str(BASES["grpo"]), "optim.lr_scheduler=cosine_with_min_lr"],
        ["train", str(BASES["sft"]), "grpo.beta=0.1"],
        ["sft", str(BASES["grpo"])],  # `dllm-rl sft` on a GRPO recipe
        ["train", str(BASES["grpo"]), "rollout.steps=[1"],  # an override that is not YAML
    ]
    for args in cases:
        capsys.readouterr()
        assert main(args) == 2, args
        err = capsys.readouterr().err
        lines = [ln for ln in err.splitlines() if ln.startswith("dllm-rl: error:")]
        assert len(lines) == 1 and "Traceback" not in err, (args, err)


def test_a_list_of_dpo_losses_loads_and_a_wrong_name_in_it_is_named(at_root):
    """dpo.loss_type takes a name or a list of names (TRL's list-valued loss_type, e.g. RPO's [sigmoid, sft])."""
    dpo = ROOT / "recipes/tiny/sudoku-dpo.yaml"
    r = load_and_validate(dpo, ["dpo.loss_type=[sigmoid, sft]", "dpo.loss_weights=[1.0, 0.5]"])
    assert r.dpo.loss_type == ["sigmoid", "sft"] and r.dpo.loss_weights == [1.0, 0.5]
    with pytest.raises(ConfigError, match=r"dpo.loss_type 'sfft' \(did you mean 'sft'\?\)"):
        load_and_validate(dpo, ["dpo.loss_type=[sigmoid, sfft]"])


@pytest.mark.parametrize(
    "overrides, words",
    [
        (["dpo.sync_ref_model=true", "model.lora.r=8"], "set dpo.reference=frozen_copy or drop sync_ref_model"),
        (["dpo.sync_ref_model=true", "dpo.precompute_ref_log_probs=true"], "precomputed once go stale"),
    ],
)
def test_a_dpo_reference_that_cannot_move_is_refused_before_any_model_is_built(at_root, capsys, overrides, words):
    """TR-DPO (dpo.sync_ref_model) needs a reference copy to move: LoRA's adapter-disabled base cannot, and
    precomputed reference log-probs would go stale; `dllm-rl train` stops with exit code 2 naming the fix."""
    dpo = str(ROOT / "recipes/tiny/sudoku-dpo.yaml")
    with pytest.raises(ConfigError, match=words):
        load_and_validate(dpo, overrides)
    capsys.readouterr()
    assert main(["train", dpo, *overrides]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize("recipe", ["sudoku-diffu-grpo.yaml", "sudoku-order-dpo.yaml", "sudoku-joint-dpo.yaml"])
@pytest.mark.parametrize(
    "override, words",
    [
        ("rollout.order_temperature=0", "rollout.order=policy trains the learned order"),
        ("estimator.name=quadrature", "rollout.order=policy trains the learned order"),
        ("train.deepspeed=recipes/deepspeed/zero2.json", "without DeepSpeed"),
    ],
)
def test_learned_order_rules_stop_the_cli_before_any_model_is_built(
    at_root, capsys, monkeypatch, recipe, override, words
):
    """GRPO and DPO train the learned order head under the same rules (validate.learned_order_problem); the
    recipe alone decides them, so `dllm-rl train` stops with exit code 2 before loading the model."""
    import dllm_rl.trainers.common as common

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the recipe was refused")

    monkeypatch.setattr(common, "load_model", no_model)
    with pytest.raises(ConfigError, match=words):
        load_and_validate(ROOT / "recipes/tiny" / recipe, [override])
    capsys.readouterr()
    assert main(["train", str(ROOT / "recipes/tiny" / recipe), override]) == 2
    assert words in capsys.readouterr().err


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["rollout.edit=any", "rollout.edit_initial_length=100"], "rollout.edit_initial_length: 100 must be between"),
        (["hybrid.plan=content_free", "hybrid.template=nothing"], "hybrid.template: 'nothing' must contain"),
        (["hybrid.sft_plans=[content_free]", "hybrid.template=just text"], "must contain {plan} and {question}"),
    ],
)
def test_settings_the_decoder_refuses_are_refused_with_the_recipe(overrides, match):
    """Refused when the recipe is read, not when an SFT run first decodes (its final evaluation, after training)."""
    with pytest.raises(ConfigError, match=match):
        load_recipe(ROOT / "recipes/tiny/sudoku-sft.yaml", overrides)


def test_an_sft_run_checks_its_evaluation_decoding_before_training(tmp_path):
    """A canvas past the model's context (read from the checkpoint) or an exact block cache on a bidirectional
    model stops an SFT run before its first step, not after training at its final evaluation."""
    from dllm_rl.trainers.sft import SFTTrainer

    base = [f"train.output_dir={tmp_path / 'a'}", "train.num_threads=1", "data.train_size=16", "eval.size=4"]
    long = ["model.path=" + str(ROOT / "checkpoints/tiny/sudoku-sft"), "rollout.max_completion_length=100"]
    long += ["rollout.steps=100", "optim.lr_scheduler=constant", "optim.warmup_steps=0"]
    with pytest.raises(DllmRlError, match="exceeds the model's context of 64 positions"):
        SFTTrainer(load_recipe(ROOT / "recipes/tiny/sudoku-sft.yaml", base + long))
    with pytest.raises(ConfigError, match="rollout.cache=block is exact only for block-causal models"):
        SFTTrainer(load_recipe(ROOT / "recipes/tiny/sudoku-sft.yaml", base + ["rollout.cache=block"]))
    assert not (tmp_path / "a" / "metrics.jsonl").exists()


def test_what_the_new_early_checks_leave_alone(tmp_path):
    """The checks of settings that used to fail after a model was built accept what the decoder accepts: user
    reward functions' kwargs, the debug compile backends, an exact block cache on a block-causal tiny model,
    a model directory whose config.json has no max_position_embeddings."""
    grpo, sft = BASES["grpo"], BASES["sft"]
    out = f"train.output_dir={tmp_path / 'out'}"
    load_and_validate(grpo, [out, "rewards=[{name: examples/reward_plugin.py:short, kwargs: {anything: 1}}]"])
    load_and_validate(grpo, [out, "rewards=[{name: format_strict, kwargs: {tag: think}}]"])
    load_and_validate(grpo, [out, "rollout.compile=graphs", "rollout.compile_backend=eager"])
    load_and_validate(
        sft,
        [out, "rollout.cache=block", "model.tiny.attention=block_causal", "rollout.block_length=4"]
        + ["model.tiny.block_size=4", "rollout.max_completion_length=20", "rollout.steps=20"],
    )
    model = tmp_path / "model"
    model.mkdir()
    config = json.loads((ROOT / "checkpoints/tiny/sudoku-sft/final/config.json").read_text())
    (model / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "max_position_embeddings"}))
    recipe = load_recipe(sft, [out, f"model.path={model}", "rollout.max_completion_length=100", "rollout.steps=100"])
    validate_recipe(recipe, check_data=False)
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"rollout.max_completion_length: 100 .* prompt tokens \+ rollout"):
        validate_recipe(recipe, check_data=False)
    ok = load_recipe(sft, [out, f"model.path={model}", "rollout.max_completion_length=63", "rollout.steps=63"])
    validate_recipe(ok, check_data=False)  # one position is left for a one-token prompt, as the decoder allows


def test_a_file_given_as_a_model_is_called_a_file():
    from dllm_rl.rundir import resolve_model_dir

    with pytest.raises(DllmRlError, match=r"^--checkpoint: '.*README.md' is a file, not a model directory \(a dir"):
        resolve_model_dir(str(ROOT / "README.md"), key="--checkpoint")
    with pytest.raises(DllmRlError, match="does not exist"):
        resolve_model_dir(str(ROOT / "no-such-file"), key="--checkpoint")


def test_filter_zero_std_with_gradient_accumulation_is_refused_before_any_model(tmp_path, capsys):
    """grpo.filter_zero_std leaves a rollout a varying number of groups, so with gradient_accumulation_steps > 1 an
    optimizer step would get fewer micro-batches than accelerate counts (its step skipped, the gradient carried into
    the next rollout): refused from a recipe, from the CLI (exit 2, no run directory written) and when a GRPOConfig's
    gradient_accumulation_steps meets a recipe's filter_zero_std."""
    from trl import GRPOConfig

    from dllm_rl import GRPOTrainer

    out = tmp_path / "out"
    both = [f"train.output_dir={out}", "grpo.filter_zero_std=true", "train.gradient_accumulation_steps=2"]
    fix = r"gradient_accumulation_steps=2 .*set train.gradient_accumulation_steps=1 .*or drop grpo.filter_zero_std"
    with pytest.raises(ConfigError, match=r"^grpo.filter_zero_std .*" + fix):
        load_and_validate(BASES["grpo"], both)
    capsys.readouterr()
    assert main(["train", str(BASES["grpo"]), *both]) == 2
    assert "or drop grpo.filter_zero_std" in capsys.readouterr().err and not out.exists()
    recipe = load_and_validate(BASES["grpo"], both[:2])  # the filter alone, one micro-batch per step: accepted
    trl = dict(per_device_train_batch_size=8, num_generations=8, max_steps=2, bf16=False, report_to="none")
    args = GRPOConfig(output_dir=str(out), gradient_accumulation_steps=2, **trl)
    with pytest.raises(ConfigError, match=fix):
        GRPOTrainer(recipe, args=args)
    assert not out.exists()
