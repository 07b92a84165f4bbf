"""Any dataset with a prompt column, as TRL's GRPOTrainer takes it (`train_dataset=`), or named in a recipe:

    data: {dataset: NAME_OR_PATH, split: train, prompt_column: question, eval_path: ..., eval_split: test}

`data.dataset` is a hub name or a local .json / .jsonl / .parquet / .csv file; `data.options` go to
`datasets.load_dataset` (e.g. `{name: main}`). The prompt column (renamed to `prompt`) holds plain text or a
conversation (a list of {"role", "content"} messages: TRL's `is_conversational`); the engine applies the chat
template to conversations and tokenises text as it is, and rewards get completions in the same form, as in TRL.
Every other column reaches the reward functions unchanged. All training rows are used (data.train_size is for
generated tasks); the held-out set is `data.eval_path` at `data.eval_split` (its first data.eval_size rows),
or none. Such a task has no verifier of its own: the run's rewards score the held-out set.
"""

from __future__ import annotations

import datasets

from ..config import DataConfig
from ..errors import ConfigError
from .base import Task
from .math_data import SPLIT_DEFAULTS, load_split


def prepare(ds, prompt_column: str = "prompt", where: str = "train_dataset", system: str | None = None):
    """`ds` with its prompt column named `prompt`; conversational prompts get `system` first when given."""
    if not isinstance(ds, datasets.Dataset):
        raise ConfigError(
            f"{where}: expected a datasets.Dataset, got {type(ds).__name__} (datasets.Dataset.from_list(rows) "
            f"makes one from a list of dicts)"
        )
    if prompt_column not in ds.column_names:
        raise ConfigError(
            f"{where} has no column {prompt_column!r} (columns: {ds.column_names}); name the prompt column with "
            f"data.prompt_column"
        )
    if prompt_column != "prompt":
        if "prompt" in ds.column_names:
            raise ConfigError(f"{where} has both 'prompt' and {prompt_column!r}: drop one or rename it")
        ds = ds.rename_column(prompt_column, "prompt")
    if system:
        ds = ds.map(lambda r: {"prompt": _with_system(r["prompt"], system)})
    return ds


def _with_system(prompt, system: str):
    if isinstance(prompt, list) and not (prompt and prompt[0].get("role") == "system"):
        return [{"role": "system", "content": system}] + list(prompt)
    return prompt


def dataset_task(train, eval=None, prompt_column: str = "prompt", name: str = "dataset", system=None) -> Task:
    """A Task over datasets given in Python (TRL's train_dataset / eval_dataset); reward None: no verifier."""
    train = prepare(train, prompt_column, "train_dataset", system)
    eval = None if eval is None else prepare(eval, prompt_column, "eval_dataset", system)
    return Task(name, train, eval, None)


def load(cfg: DataConfig) -> Task:
    if not cfg.eval_path and cfg.eval_split != SPLIT_DEFAULTS["eval_split"]:
        raise ConfigError(
            f"data.eval_split={cfg.eval_split!r} names the held-out split of data.eval_path, which is not set, so no "
            f"held-out set would be read: set data.eval_path (data.dataset's name for another split of it), or drop "
            f"data.eval_split"
        )
    train = load_split(cfg.dataset, cfg.split, **cfg.options)
    held_out = None
    if cfg.eval_path:
        held_out = load_split(cfg.eval_path, cfg.eval_split, split_key="eval_split", **cfg.options)
        held_out = held_out.select(range(min(cfg.eval_size, len(held_out))))
    return dataset_task(train, held_out, cfg.prompt_column, cfg.dataset, cfg.system_prompt)
