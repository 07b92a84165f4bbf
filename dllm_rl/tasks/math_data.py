"""GSM8K and MATH adapters over `datasets.load_dataset`.

`data.path` is a hub name (default `openai/gsm8k` / `HuggingFaceH4/MATH-500`) or a local `.json`, `.jsonl`,
`.parquet` or `.csv` file (how the tests and offline machines use them). GSM8K rows need `question` and `answer`
(`... #### 72`); MATH rows need `problem` and `solution` (the answer is the `answer` column where it has one, else
the solution's last \\boxed{}). The held-out set is `data.eval_path` at `data.eval_split` (by default the hub
dataset's test split); a local `data.path` without `data.eval_path` is one split, so its last `data.eval_size` rows
(at most half of the file) are held out and training draws from the rows before them. A local file is one split with
no config name: a data.split / data.eval_split other than the default is refused for it (and so is data.eval_split
when no split is read). Rows whose reference answer is empty (a GSM8K answer with nothing after `####`, a MATH row
with neither an answer nor a \\boxed{} in its solution) can never be scored correct: they are dropped when loaded,
with a printed note of how many. These tasks take no data.options (any is refused).
"""

from __future__ import annotations

import dataclasses
import os

import datasets

from ..config import DataConfig
from ..errors import ConfigError
from .base import Task, user_prompt

_LOCAL = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}
GSM8K_SUFFIX = "\nGive the final answer as <answer>number</answer>."
MATH_SUFFIX = "\nPut the final answer in \\boxed{}."
# data.split / data.eval_split as the config leaves them: the only values a local file (one split) accepts
SPLIT_DEFAULTS = {f.name: f.default for f in dataclasses.fields(DataConfig) if f.name in ("split", "eval_split")}


def load_split(
    path: str, split: str, name: str | None = None, *, split_key: str = "split", **kwargs
) -> datasets.Dataset:
    """A hub dataset's split, or a local file (one split); kwargs go to datasets.load_dataset.

    `split` is the recipe's data.<split_key> (`split` or `eval_split`) and `name` the hub dataset's config name
    (data.options.name). A local file is one split with no config name, so it is read whole; a `split` other than
    data.<split_key>'s default, or any `name`, would be ignored there and is refused instead.

    >>> load_split("rows.jsonl", "test")
    Traceback (most recent call last):
    ...
    dllm_rl.errors.ConfigError: data.split='test', but 'rows.jsonl' is a local file, which is one split with no \
config name (read whole): drop data.split (or point data.path / data.dataset at a hub dataset that has that split)
    """
    ext = os.path.splitext(path)[1].lower()
    if ext in _LOCAL:
        _check_local(path, split, name, split_key)
        if not os.path.isfile(path):
            raise ConfigError(f"data file {path!r} does not exist; fix data.dataset / data.path / data.eval_path")
        args, kw = (_LOCAL[ext],), {"data_files": path, "split": "train"}
        what, fix = f"read data file {path!r} as {_LOCAL[ext]}", "fix the file (.jsonl: one JSON object per line)"
    else:
        args, kw = (path, name), {"split": split}
        what = f"load dataset {path!r} split {split!r}"
        fix = "check the name, split and network, or give a local .jsonl/.parquet file (data.dataset, data.path)"
    try:
        return datasets.load_dataset(*args, **kw, **kwargs)
    except Exception as e:  # options the loader refuses (a procedural task's knobs); a bad file; an unreachable hub
        if kwargs and isinstance(e, TypeError):
            raise _bad_options(kwargs, e) from None
        raise ConfigError(f"could not {what} ({type(e).__name__}: {_first_line(e)}); {fix}") from None


def _is_local(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in _LOCAL


def _check_local(path: str, split: str, name: str | None, split_key: str) -> None:
    """Refuse what a local file cannot honour: a config name, or a split the recipe set (not the key's default)."""
    where = "data.eval_path" if split_key == "eval_split" else "data.path / data.dataset"
    local = f"{path!r} is a local file, which is one split with no config name (read whole)"
    if name is not None:
        raise ConfigError(
            f"data.options.name={name!r}, but {local}: drop data.options.name (or point {where} at a hub dataset "
            f"that has that config)"
        )
    if split != SPLIT_DEFAULTS[split_key]:
        raise ConfigError(
            f"data.{split_key}={split!r}, but {local}: drop data.{split_key} (or point {where} at a hub dataset "
            f"that has that split)"
        )


def split_tail(source: datasets.Dataset, train_size: int, eval_size: int):
    """(train, held_out) from one split: the last eval_size rows (at most half) held out, training from the rest."""
    n_eval = min(eval_size, len(source) // 2)
    held = source.select(range(len(source) - n_eval, len(source)))
    return source.select(range(min(train_size, len(source) - n_eval))), held


def _bad_options(options: dict, e: TypeError) -> ConfigError:
    return ConfigError(
        f"data.options {sorted(options)} are not all options of this dataset's loader (datasets.load_dataset: "
        f"{_first_line(e)}); keep only the loader's keyword arguments (e.g. {{name: main}}) or remove data.options"
    )


def _first_line(e: Exception) -> str:
    """The first line of an exception's message, with its cause's when it has none of its own (datasets wraps)."""
    text = str(e).strip() or str(e.__cause__ or "").strip()
    return (text.splitlines() or [""])[0][:200]


def _require(ds: datasets.Dataset, columns: list[str], path: str):
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ConfigError(
            f"dataset {path!r} lacks column(s) {missing} (has {ds.column_names}); rename them or pick another data.task"
        )


def _gsm8k_row(row, system):
    solution, _, final = row["answer"].rpartition("####")
    final = final.strip().replace(",", "")
    return {
        "prompt": user_prompt(row["question"] + GSM8K_SUFFIX, system),
        "completion": f"{solution.strip()}\n<answer>{final}</answer>",
        "answer": final,
    }


def _math_row(row, system):
    from ..rewards.math import last_boxed

    answer = row.get("answer")
    if answer is None or not str(answer).strip():  # no answer column, or an empty cell: the solution's last box
        answer = last_boxed(row["solution"]) or ""
    return {
        "prompt": user_prompt(row["problem"] + MATH_SUFFIX, system),
        "completion": row["solution"],
        "answer": str(answer),
    }


def _answered(ds: datasets.Dataset, fn, path: str) -> datasets.Dataset:
    """`ds` without the rows whose reference answer is empty (`fn` gives it), which no completion can match: they
    would be noise in training and a certain miss in the held-out accuracy. Prints how many went."""
    keep = [i for i, row in enumerate(ds) if str(fn(row, None)["answer"]).strip()]
    if len(keep) < len(ds):
        print(f"note: dropped {len(ds) - len(keep)} of {len(ds)} rows of {path!r} with an empty reference answer")
        ds = ds.select(keep)
    return ds


def _load(cfg: DataConfig, default_path: str, name, columns, fn, task: str, eval_default: str | None) -> Task:
    if cfg.options:
        raise ConfigError(
            f"data.options: {task} takes no options (got {sorted(cfg.options)}, which nothing would read); remove "
            f"data.options (data.path, data.split, data.eval_path and data.eval_split choose the data)"
        )
    path = cfg.path or default_path
    one_file = cfg.path is not None and cfg.eval_path is None and _is_local(path)
    if one_file and cfg.eval_split != SPLIT_DEFAULTS["eval_split"]:
        raise ConfigError(
            f"data.eval_split={cfg.eval_split!r}, but the local data.path {path!r} without data.eval_path is one "
            f"split whose last rows are held out, so no split is read: drop data.eval_split (or give data.eval_path)"
        )
    source = load_split(path, cfg.split, None if _is_local(path) else name)  # `name`: the default hub config
    _require(source, columns, path)
    source = _answered(source, fn, path)
    if one_file:  # a local file is one split: hold out its tail, never rows training sees
        train, held = split_tail(source, cfg.train_size, cfg.eval_size)
    else:
        eval_path = cfg.eval_path or (eval_default if not cfg.path else path)
        held = load_split(eval_path, cfg.eval_split, None if _is_local(eval_path) else name, split_key="eval_split")
        _require(held, columns, eval_path)
        held = _answered(held, fn, eval_path)
        train, held = (
            source.select(range(min(cfg.train_size, len(source)))),
            held.select(range(min(cfg.eval_size, len(held)))),
        )
    out = [
        ds.map(lambda r: fn(r, cfg.system_prompt), remove_columns=[c for c in ds.column_names if c != "answer"])
        for ds in (train, held)
    ]
    return Task(task, out[0], out[1], "math")


def load_gsm8k(cfg: DataConfig) -> Task:
    return _load(cfg, "openai/gsm8k", "main", ["question", "answer"], _gsm8k_row, "gsm8k", "openai/gsm8k")


def load_math(cfg: DataConfig) -> Task:
    return _load(
        cfg, "HuggingFaceH4/MATH-500", None, ["problem", "solution"], _math_row, "math", "HuggingFaceH4/MATH-500"
    )
