"""Any dataset with a prompt column (data.dataset, TRL's train_dataset) and any reasoning-gym task with its own
verifier (data.task: reasoning_gym/NAME)."""

from __future__ import annotations

import dataclasses
import json

import datasets
import pytest

from dllm_rl.config import DataConfig, recipe_from_dict
from dllm_rl.errors import ConfigError
from dllm_rl.rewards import REWARDS
from dllm_rl.rewards.plugins import Reward, compute_rewards
from dllm_rl.tasks import check_task_name, load_task
from dllm_rl.tasks.from_dataset import dataset_task

ROWS = [
    {"question": "2+2?", "solution": "4", "level": 1},
    {"question": "3+3?", "solution": "6", "level": 2},
    {"question": "5+1?", "solution": "6", "level": 1},
]


def write(path, rows, kind):
    if kind == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif kind == "json":
        path.write_text(json.dumps(rows))
    else:
        datasets.Dataset.from_list(rows).to_parquet(str(path))
    return str(path)


@pytest.mark.parametrize("kind", ["jsonl", "json", "parquet"])
def test_a_local_file_with_a_prompt_column_and_extra_columns(tmp_path, kind):
    train = write(tmp_path / f"train.{kind}", ROWS, kind)
    held = write(tmp_path / f"held.{kind}", ROWS[:2], kind)
    data = {"dataset": train, "prompt_column": "question", "eval_path": held, "eval_size": 1}
    task = load_task(recipe_from_dict({"data": data}).data)
    assert task.reward is None and len(task.train) == 3 and len(task.eval) == 1
    assert task.train[1] == {"prompt": "3+3?", "solution": "6", "level": 2}  # extra columns kept as they are


def test_conversational_prompts_and_a_system_prompt():
    rows = [{"prompt": [{"role": "user", "content": r["question"]}], "solution": r["solution"]} for r in ROWS]
    task = dataset_task(datasets.Dataset.from_list(rows), system="Be brief.")
    assert task.train[0]["prompt"] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}]
    assert task.eval is None


def test_dataset_mistakes_name_the_fix(tmp_path):
    train = write(tmp_path / "t.jsonl", ROWS, "jsonl")
    with pytest.raises(ConfigError, match="no column 'prompt'.*data.prompt_column"):
        load_task(DataConfig(dataset=train))
    with pytest.raises(ConfigError, match="both name the training data"):
        load_task(DataConfig(dataset=train, task="countdown", prompt_column="question"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_task(DataConfig(dataset=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ConfigError, match="expected a datasets.Dataset"):
        dataset_task(ROWS)


# ------------------------------------------------------------------------------------------------ reasoning-gym

# tasks with a single right answer (the oracle must score 1); answer-None tasks (several valid answers) and
# game_of_life_halting (its scorer accepts anything) are checked separately
ORACLE_TASKS = ["chain_sum", "basic_arithmetic", "mini_sudoku", "word_sorting", "prime_factorization", "spell_backward"]


def gym_scores(task, rows, answers):
    completions = [f"thinking...\n<answer>{a}</answer>" for a in answers]
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    reward = [Reward(task.reward, REWARDS[task.reward])]
    return compute_rewards(reward, [r["prompt"] for r in rows], completions, [[]] * len(rows), columns)[0].tolist()


@pytest.mark.parametrize("name", ORACLE_TASKS)
def test_a_reasoning_gym_task_is_verified_by_its_own_scorer(name):
    task = load_task(DataConfig(task=f"reasoning_gym/{name}", train_size=4, eval_size=3, seed=2))
    rows = [task.train[i] for i in range(4)] + task.eval.to_list()
    assert task.reward == "reasoning_gym" and rows[0]["prompt"][-1]["role"] == "user"
    assert gym_scores(task, rows, [r["answer"] for r in rows]) == [1.0] * 7  # the oracle answers score 1
    assert max(gym_scores(task, rows, ["@@@ not an answer @@@"] * 7)) < 0.5


def test_reasoning_gym_rows_are_seeded_and_the_held_out_set_does_not_follow_the_training_seed():
    cfg = lambda seed: DataConfig(task="reasoning_gym/chain_sum", train_size=5, eval_size=5, seed=seed)
    a, b, c = load_task(cfg(0)), load_task(cfg(0)), load_task(cfg(1))
    assert a.train.to_list() == b.train.to_list() and a.train.to_list() != c.train.to_list()
    assert a.eval.to_list() == c.eval.to_list()
    other = load_task(dataclasses.replace(cfg(0), eval_seed=1))
    assert other.eval.to_list() != a.eval.to_list() and other.train.to_list() == a.train.to_list()


def test_a_training_seed_that_would_replay_the_held_out_stream_is_refused():
    # entry i of a reasoning-gym stream comes from Random(seed + i): data.seed 999 trains on seeds 999001..1001000,
    # the held-out set's 1000000..1000199 among them (200 of 200 questions would be trained on)
    cfg = lambda seed, k=0: DataConfig(
        task="reasoning_gym/chain_sum", train_size=2000, eval_size=200, seed=seed, eval_seed=k
    )
    for seed, k in [(998, 0), (999, 0), (1000, 0), (1999, 1)]:
        with pytest.raises(
            ConfigError, match=f"data.seed={seed}:.*at most {997 + 1000 * k} or at least {1001 + 1000 * k}"
        ):
            check_task_name(cfg(seed, k))
    for seed in (997, 1001):  # just outside: the training stream ends before, or starts after, the held-out one
        check_task_name(cfg(seed))
        task = load_task(cfg(seed))
        drawn = lambda rows, n: {rows[i]["rg_seed"] + rows[i]["rg_index"] for i in range(0, n, 7)}
        assert not drawn(task.train, 2000) & drawn(task.eval, 200)


def test_a_seed_whose_entries_pass_numpys_seed_range_is_refused_before_anything_is_drawn():
    # pool_matrix draws entry i after np.random.seed(stream seed + i), which takes at most 2**32 - 1: data.seed
    # 5,000,000 (training seed 5,000,000,001) loaded and then failed on the first training row
    cfg = lambda seed, n, **kw: DataConfig(task="reasoning_gym/pool_matrix", seed=seed, train_size=n, eval_size=2, **kw)
    with pytest.raises(ConfigError, match="data.seed=5000000: .*passes 4294967295.*at most 4294967"):
        load_task(cfg(5_000_000, 4))
    with pytest.raises(ConfigError, match="data.seed=4294967: .*at most 4294966"):
        check_task_name(cfg(4_294_967, 296))
    with pytest.raises(ConfigError, match="data.eval_size=300000000: .*at most 293967296"):
        check_task_name(dataclasses.replace(cfg(0, 2, eval_seed=4000), eval_size=300_000_000))
    task = load_task(cfg(4_294_967, 295))  # its last training entry is seeded with 2**32 - 1 exactly
    assert task.train[294]["rg_seed"] + 294 == 2**32 - 1 and task.train[294]["prompt"]


def test_answer_none_tasks_and_scorers_that_raise_score_instead_of_failing():
    task = load_task(DataConfig(task="reasoning_gym/graph_color", train_size=2, eval_size=1))
    rows = [task.train[0], task.train[1]]
    assert rows[0]["answer"] is None  # several colourings are valid: the scorer checks a proposal
    assert max(gym_scores(task, rows, ["garbage", "{}"])) < 0.05  # at most its small format credit
    task = load_task(DataConfig(task="reasoning_gym/prime_factorization", train_size=1, eval_size=1))
    assert gym_scores(task, [task.train[0]], ["not * a * number"]) == [0.0]  # its scorer raises on this


def test_reasoning_gym_mistakes_name_the_fix():
    with pytest.raises(ConfigError, match="no task 'chain_summ'.*did you mean 'chain_sum'"):
        load_task(DataConfig(task="reasoning_gym/chain_summ"))
    with pytest.raises(ConfigError, match=r"\['min_term'\] are not options.*min_terms"):
        load_task(DataConfig(task="reasoning_gym/chain_sum", options={"min_term": 2}))
    with pytest.raises(ConfigError, match="max_terms must be >= min_terms"):
        load_task(DataConfig(task="reasoning_gym/chain_sum", options={"min_terms": 5, "max_terms": 2}, train_size=2))
    with pytest.raises(ConfigError, match="data.task"):
        load_task(DataConfig(task="nowhere/chain_sum"))


@pytest.mark.slow
def test_every_reasoning_gym_task_builds_and_scores_its_oracle():
    from reasoning_gym.factory import DATASETS

    for name in sorted(set(DATASETS) - {"composite"}):
        task = load_task(DataConfig(task=f"reasoning_gym/{name}", train_size=2, eval_size=1))
        rows = [task.train[0], task.train[1]]
        scores = gym_scores(task, rows, [r["answer"] or "" for r in rows])
        if rows[0]["answer"] is not None and name != "game_of_life_halting":
            assert scores == [1.0, 1.0], name


@pytest.mark.parametrize("name", ["chain_sum", "countdown"])
def test_a_completion_without_an_answer_tag_is_scored_as_reasoning_gyms_own_eval_scores_it(name):
    # reasoning-gym's eval scores score_answer(extract_answer(response), entry): None when there is no tag, which is
    # 0 (countdown: its 0.01 floor), never the whole text (its default scorer gives text containing the answer credit)
    from reasoning_gym.utils import extract_answer

    from dllm_rl.rewards.gym import gym_dataset, gym_entry

    task = load_task(DataConfig(task=f"reasoning_gym/{name}", train_size=2, eval_size=1, seed=1))
    rows = [task.train[0], task.train[1]]
    oracle = [r["answer"] or "" for r in rows] if name == "chain_sum" else ["1 + 2", "3"]
    untagged = [oracle[0], f"so the answer is {oracle[1]}"]
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    got = compute_rewards(
        [Reward(task.reward, REWARDS[task.reward])], [r["prompt"] for r in rows], untagged, [[]] * 2, columns
    )[0].tolist()
    r = rows[0]
    ds, entry = (
        gym_dataset(name, r["rg_options"], r["rg_seed"], r["rg_size"]),
        gym_entry(name, r["rg_options"], r["rg_seed"], r["rg_size"], r["rg_index"]),
    )
    assert extract_answer(untagged[0]) is None
    floor = ds.score_answer(None, entry)
    assert floor == (0.0 if name == "chain_sum" else 0.01) and got == pytest.approx([floor] * 2)
    if name == "chain_sum":  # the same answers inside the tag are right
        assert gym_scores(task, rows, oracle) == [1.0, 1.0]


@pytest.mark.parametrize("system", [None, ""])
def test_sft_targets_take_the_format_the_prompt_asks_for_and_score_full(system):
    """With reasoning-gym's default system prompt (it asks for <answer> tags) the SFT target is the answer in the
    tag, which the reward scores 1; with the system prompt dropped it is the bare answer, and the reward, whose
    prompt then does not ask for the tag, scores the whole text."""
    task = load_task(
        DataConfig(task="reasoning_gym/chain_sum", train_size=2, eval_size=1, seed=1, system_prompt=system)
    )
    rows = [task.train[0], task.train[1]]
    want = [f"<answer>{r['answer']}</answer>" if system is None else r["answer"] for r in rows]
    assert [r["completion"] for r in rows] == want
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    got = compute_rewards(
        [Reward(task.reward, REWARDS[task.reward])], [r["prompt"] for r in rows], want, [[]] * 2, columns
    )[0].tolist()
    assert got == [1.0, 1.0]
