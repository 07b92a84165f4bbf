"""Tasks: generated puzzles with disjoint held-out splits, dataset adapters on local files, verifiers."""

import json
from pathlib import Path

import pytest

from dllm_rl.config import DataConfig
from dllm_rl.errors import ConfigError
from dllm_rl.rewards.plugins import Reward, compute_rewards, resolve_reward
from dllm_rl.rewards.sudoku import all_grids, count_solutions, is_valid_solution, sudoku_cells_reward
from dllm_rl.tasks import load_task

DATA = Path(__file__).parents[1] / "data"


def verify(task, rows, completions):
    reward = [Reward(task.reward, resolve_reward(task.reward))]
    columns = {k: [r[k] for r in rows] for k in rows[0]}
    return compute_rewards(reward, [r["prompt"] for r in rows], completions, [[]] * len(rows), columns)[0].tolist()


def content_key(name):
    """What the train / held-out split is disjoint by: the solution grid (sudoku), the instance (countdown)."""
    return (lambda r: r["answer"]) if name == "sudoku" else (lambda r: (tuple(sorted(r["numbers"])), r["target"]))


@pytest.mark.parametrize("name", ["sudoku", "countdown"])
def test_procedural_tasks_split_and_verify(name):
    task = load_task(DataConfig(task=name, train_size=300, eval_size=40, seed=3))
    assert len(task.train) == 300 and len(task.eval) == 40
    key = content_key(name)
    assert not {key(r) for r in task.train} & {key(r) for r in task.eval}  # disjoint by content
    rows = task.eval.to_list()[:10]
    assert verify(task, rows, [r["completion"] for r in rows]) == [1.0] * 10  # targets are correct
    wrong = [r["completion"][::-1] + "1" if name == "countdown" else r["completion"].replace("1", "2") for r in rows]
    assert sum(verify(task, rows, wrong)) == 0.0
    again = load_task(DataConfig(task=name, train_size=300, eval_size=40, seed=3))
    assert again.train.to_list() == task.train.to_list()  # seeded
    other = load_task(DataConfig(task=name, train_size=300, eval_size=40, seed=4))
    assert other.eval.to_list() == task.eval.to_list()  # held-out set does not move with the training seed
    assert other.train.to_list() != task.train.to_list()


@pytest.mark.parametrize("name", ["sudoku", "countdown"])
def test_eval_seed_draws_another_held_out_set_still_disjoint_from_training(name):
    """data.eval_seed 0 is the shared held-out set; k > 0 an independent one that training still never sees."""
    cfg = lambda k: DataConfig(task=name, train_size=300, eval_size=40, seed=3, eval_seed=k)
    base, other = load_task(cfg(0)), load_task(cfg(1))
    assert base.eval.to_list() == load_task(DataConfig(task=name, train_size=300, eval_size=40, seed=3)).eval.to_list()
    assert other.train.to_list() == base.train.to_list()  # only the held-out set moves
    key = content_key(name)
    new = [key(r) for r in other.eval]
    assert new != [key(r) for r in base.eval]
    assert not set(new) & {key(r) for r in other.train}
    assert other.eval.to_list() == load_task(cfg(1)).eval.to_list()  # seeded


def test_sudoku_with_several_solutions_per_puzzle():
    """data.options unique: false blanks cells at random (up to 16): the target is one valid solution of its
    puzzle, many puzzles have several, the `sudoku` reward accepts any of them and `sudoku_cells` scores each
    grid against the closest one instead of marking a different valid grid wrong."""
    opts = {"min_empty": 10, "max_empty": 13, "unique": False}
    task = load_task(DataConfig(task="sudoku", train_size=200, eval_size=50, seed=3, options=opts))
    rows = task.eval.to_list() + task.train.to_list()
    blanks = [r["puzzle"].count("_") for r in rows]
    assert min(blanks) >= 10 and max(blanks) <= 13 and len(set(blanks)) == 4
    counts = [count_solutions(r["puzzle"]) for r in rows]
    assert min(counts) >= 1 and sum(c > 1 for c in counts) > len(rows) // 2  # measured: ~80% have several
    assert not {r["answer"] for r in task.train} & {r["answer"] for r in task.eval}
    # a valid grid other than the target still scores 1 under the task's verifier
    row = next(r for r in task.eval.to_list() if count_solutions(r["puzzle"]) > 1)
    other = next(
        g
        for g in all_grids()
        if is_valid_solution(list(g), row["puzzle"]) and "".join(map(str, g)) != row["answer"].replace("\n", "")
    )
    other_text = "\n".join("".join(map(str, other[4 * i : 4 * i + 4])) for i in range(4))
    assert verify(task, [row, row], [row["completion"], other_text]) == [1.0, 1.0]
    # partial credit counts against the closest valid solution: another solution scores 1, and that solution with
    # one blank changed (never valid: its row repeats a digit) scores 1 - 1/blanks, or more if a third is nearer
    i = row["puzzle"].replace("\n", "").index("_")
    changed = list(other)
    changed[i] = changed[i] % 4 + 1
    changed_text = "\n".join("".join(map(str, changed[4 * r : 4 * r + 4])) for r in range(4))
    scores = sudoku_cells_reward(["p"] * 3, [row["completion"], other_text, changed_text], puzzle=[row["puzzle"]] * 3)
    n_blank = row["puzzle"].count("_")
    assert scores[:2] == [1.0, 1.0] and 1 - 1 / n_blank <= scores[2] < 1.0, scores
    # the default (unique puzzles, reasoning-gym's) is unchanged and every puzzle has one solution
    unique = load_task(DataConfig(task="sudoku", train_size=50, eval_size=10, seed=3))
    assert all(count_solutions(r["puzzle"]) == 1 for r in unique.train.to_list())
    with pytest.raises(ConfigError, match="max_empty <= 12 with unique puzzles"):
        load_task(DataConfig(task="sudoku", train_size=4, eval_size=4, options={"max_empty": 14}))


def test_task_options_are_checked():
    with pytest.raises(ConfigError, match="unknown sudoku option"):
        load_task(DataConfig(task="sudoku", train_size=4, eval_size=4, options={"blanks": 3}))
    with pytest.raises(ConfigError, match="did you mean 'sudoku'"):
        load_task(DataConfig(task="sudok"))


def test_gsm8k_from_a_local_file():
    # one file is one split: its tail is held out and training never sees those rows
    task = load_task(DataConfig(task="gsm8k", path=str(DATA / "gsm8k_tiny.jsonl"), train_size=3, eval_size=1))
    row = task.train[0]
    assert row["answer"] == "72" and row["prompt"][-1]["role"] == "user"
    assert len(task.train) == 2 and task.eval["answer"] == ["950"]  # "1,200" style answers are normalised
    assert task.eval["prompt"][0] not in task.train["prompt"]
    # an explicit held-out file is read whole, as given
    path = str(DATA / "gsm8k_tiny.jsonl")
    task = load_task(DataConfig(task="gsm8k", path=path, eval_path=path, train_size=3, eval_size=3))
    rows = task.eval.to_list()
    assert len(task.train) == 3 and verify(task, rows, [r["completion"] for r in rows]) == [1.0] * 3
    assert verify(task, rows, ["<answer>71</answer>"] * 3) == [0.0] * 3


def test_math_from_a_local_file():
    task = load_task(DataConfig(task="math", path=str(DATA / "math_tiny.jsonl"), train_size=2, eval_size=2))
    assert task.train["answer"] == ["\\frac{3}{4}"] and task.eval["answer"] == ["9"]  # at most half held out
    rows = task.eval.to_list()
    assert verify(task, rows, ["\\boxed{9}"]) == [1.0]
    assert verify(task, task.train.to_list(), ["so \\boxed{0.75}"]) == [1.0]


def test_dataset_errors_name_the_fix(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_task(DataConfig(task="gsm8k", path=str(tmp_path / "nope.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"q": "x", "a": "y"}\n')
    with pytest.raises(ConfigError, match="lacks column"):
        load_task(DataConfig(task="gsm8k", path=str(bad)))


@pytest.mark.parametrize("name", ["sudoku", "countdown"])
@pytest.mark.parametrize("fraction", [0, 1, -1, "0.1", True])
def test_eval_fraction_is_a_number_strictly_between_0_and_1(name, fraction):
    # at 0 or 1 one side draws nothing: sudoku read its stream forever, countdown failed after ~20 s naming the
    # wrong stream; a string failed with a raw TypeError
    with pytest.raises(ConfigError, match="data.options.eval_fraction: .* strictly between 0 and 1"):
        load_task(DataConfig(task=name, train_size=4, eval_size=4, options={"eval_fraction": fraction}))


@pytest.mark.parametrize("fraction, side", [(0.001, "held-out"), (0.003, "held-out"), (0.9995, "training")])
def test_sudoku_refuses_an_eval_fraction_that_leaves_a_side_without_solution_grids(fraction, side):
    with pytest.raises(ConfigError, match=f"eval_fraction={fraction} leaves no 4x4 solution grid .* {side} side"):
        load_task(DataConfig(task="sudoku", train_size=4, eval_size=4, options={"eval_fraction": fraction}))
    task = load_task(DataConfig(task="sudoku", train_size=4, eval_size=4, options={"eval_fraction": 0.99}))
    assert len({r["answer"] for r in task.train}) <= 3  # 3 of the 288 grids are left for training: it still loads


@pytest.mark.parametrize("options", [{"min_empty": "3"}, {"max_empty": None}, {"unique": "false"}])
def test_sudoku_options_of_the_wrong_type_are_named(options):
    # a string min_empty raised a raw TypeError; unique: "false" (a string, so true) silently drew unique puzzles
    with pytest.raises(ConfigError, match="sudoku needs whole numbers 0 <= min_empty <= max_empty"):
        load_task(DataConfig(task="sudoku", train_size=4, eval_size=4, options=options))


def fake_stream(metadata):
    """A reasoning-gym stream that repeats one entry forever (a stand-in for one whose entries all land on one side)."""
    return lambda name, **kwargs: ({"metadata": metadata} for _ in iter(int, 1))


def test_sudoku_stops_reading_a_stream_that_never_reaches_its_side(monkeypatch):
    import reasoning_gym

    grid = [[1, 2, 3, 4], [3, 4, 1, 2], [2, 1, 4, 3], [4, 3, 2, 1]]
    monkeypatch.setattr(reasoning_gym, "create_dataset", fake_stream({"solution": grid, "puzzle": grid}))
    # this grid is a training grid at the default eval_fraction: the held-out stream would never end
    with pytest.raises(ConfigError, match=r"sudoku: \d+ draws gave 0 of 4 held-out puzzles"):
        load_task(DataConfig(task="sudoku", train_size=4, eval_size=4))


def test_countdown_names_the_stream_that_ran_out(monkeypatch):
    import reasoning_gym

    from dllm_rl.tasks.base import held_out

    entry = {"numbers": [2, 2], "target": 4, "expression": "2+2"}
    monkeypatch.setattr(reasoning_gym, "create_dataset", fake_stream(entry))
    assert not held_out("[2, 2]->4", 0.1, "countdown") and held_out("[2, 2]->4", 0.9, "countdown")
    with pytest.raises(ConfigError, match="enough distinct held-out puzzles"):  # one instance, two wanted
        load_task(DataConfig(task="countdown", train_size=4, eval_size=2))
    with pytest.raises(ConfigError, match="enough training puzzles .* lower data.options.eval_fraction"):
        load_task(DataConfig(task="countdown", train_size=4, eval_size=1, options={"eval_fraction": 0.9}))


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"min_numbers": 5, "max_numbers": 3}, "max_numbers must be >= min_numbers"),
        ({"min_target": 9000, "max_target": 9999}, "Failed to generate valid expression"),  # out of reach of 3x20
        ({"max_value": "20"}, "TypeError"),
    ],
)
def test_countdown_generator_refusals_are_config_errors(options, problem):
    with pytest.raises(ConfigError, match=f"data.options for reasoning-gym's 'countdown': .*{problem}"):
        load_task(DataConfig(task="countdown", train_size=4, eval_size=4, options=options))


def test_sudoku_with_unique_false_can_show_a_held_out_puzzle_in_training():
    """What tasks/sudoku.py and tasks/base.held_out state: the split is by solution grid, so grids and targets are
    disjoint, but a puzzle with several solutions can be cut from a grid on each side, its text then in both."""
    opts = {"unique": False, "min_empty": 14, "max_empty": 15}
    task = load_task(DataConfig(task="sudoku", train_size=200, eval_size=50, seed=1, options=opts))
    assert not {r["answer"] for r in task.train} & {r["answer"] for r in task.eval}
    train_prompts = [r["prompt"] for r in task.train]
    assert any(r["prompt"] in train_prompts for r in task.eval)


@pytest.mark.parametrize("task, path", [("gsm8k", "gsm8k_tiny.jsonl"), ("math", "math_tiny.jsonl")])
def test_gsm8k_and_math_refuse_options_they_would_ignore(task, path):
    with pytest.raises(ConfigError, match=f"data.options: {task} takes no options"):
        load_task(DataConfig(task=task, path=str(DATA / path), train_size=2, eval_size=1, options={"name": "socratic"}))


def test_a_local_file_refuses_a_split_or_config_name_it_would_ignore(tmp_path):
    path, held = str(DATA / "gsm8k_tiny.jsonl"), str(DATA / "math_tiny.jsonl")
    with pytest.raises(ConfigError, match=r"data.split='test', but .* is a local file, which is one split.*drop"):
        load_task(DataConfig(task="gsm8k", path=path, split="test", train_size=2, eval_size=1))
    with pytest.raises(ConfigError, match=r"data.eval_split='validation', but .* local file.*drop data.eval_split"):
        load_task(DataConfig(task="math", path=held, eval_path=held, eval_split="validation", train_size=1))
    with pytest.raises(ConfigError, match=r"data.eval_split='validation', but the local data.path .* no split is"):
        load_task(DataConfig(task="gsm8k", path=path, eval_split="validation", train_size=2, eval_size=1))
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "2+2?"}\n')
    with pytest.raises(ConfigError, match=r"data.options.name='main', but .* no config name.*drop data.options.name"):
        load_task(DataConfig(dataset=str(rows), options={"name": "main"}))
    # the defaults (split train, eval_split test) are what every local-file recipe passes: still accepted
    assert load_task(DataConfig(task="gsm8k", path=path, eval_path=path, train_size=3, eval_size=3)).eval
    assert len(load_task(DataConfig(dataset=str(rows), eval_path=str(rows))).eval) == 1
    with pytest.raises(ConfigError, match=r"data.eval_split='validation' names the held-out split of data.eval_path"):
        load_task(DataConfig(dataset=str(rows), eval_split="validation"))  # no eval_path: nothing would read it


@pytest.mark.parametrize("task", ["math", "gsm8k"])
def test_rows_with_an_empty_reference_answer_are_dropped_with_a_note(tmp_path, capsys, task):
    if task == "math":
        good = [{"problem": f"p{i}", "solution": f"so \\boxed{{{i}}}"} for i in range(4)]
        bad = [{"problem": "q", "solution": "no box here"}, {"problem": "r", "solution": "\\boxed{}", "answer": " "}]
    else:
        good = [{"question": f"q{i}", "answer": f"work #### {i}"} for i in range(4)]
        bad = [{"question": "x", "answer": "work ####"}, {"question": "y", "answer": "#### "}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [good[0], bad[0], *good[1:3], bad[1], good[3]]))
    loaded = load_task(DataConfig(task=task, path=str(path), train_size=10, eval_size=2))
    assert loaded.train["answer"] == ["0", "1"] and loaded.eval["answer"] == ["2", "3"]
    assert "dropped 2 of 6 rows" in capsys.readouterr().out
    # an explicit held-out file is filtered too; a file without such rows prints nothing
    loaded = load_task(DataConfig(task=task, path=str(path), eval_path=str(path), train_size=10, eval_size=10))
    assert len(loaded.train) == len(loaded.eval) == 4 and capsys.readouterr().out.count("dropped 2 of 6") == 2
