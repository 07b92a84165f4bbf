"""Code generation: prompts plus the unit tests that the `code` reward runs in its sandbox (rewards/code.py).

DiffuCoder (arXiv 2506.20639) trains coupled-GRPO on a hard subset of AceCode-89K; any dataset with a prompt
column and a test column in one of the forms rewards/code.py reads (verification_info, test_cases,
input_output, test_list, tests, test; plus entry_point / fn_name) works. `data.path` is a hub name or a local
.json / .jsonl / .parquet / .csv file; there is no default dataset.

Columns (`data.options` overrides the guesses):
- prompt: `prompt_column`, else the first of prompt / question / problem / instruction. A string becomes one
  user message followed by `suffix` (ask for one ```python block, which `code_format` scores); a list of chat
  messages is used as it is.
- tests: every test column present is kept, so the reward receives it; rows where all of them are empty are
  dropped (they cannot be scored).
- solution (optional, the SFT target): `solution_column`, else solution / canonical_solution / completion /
  response; empty when there is none.

Held-out split: `data.eval_path` (split `data.eval_split`) when given; otherwise the last `eval_size` rows of
the training split, with training drawn from the rows before them, so the two never overlap.
"""

from __future__ import annotations

import datasets

from ..config import DataConfig
from ..errors import ConfigError
from ..rewards.code import TEST_COLUMNS
from .base import Task, user_prompt
from .math_data import load_split, split_tail

PROMPT_COLUMNS = ("prompt", "question", "problem", "instruction")
SOLUTION_COLUMNS = ("solution", "canonical_solution", "completion", "response")
TEST_EXTRAS = ("entry_point", "fn_name")
CODE_SUFFIX = "\nWrite the complete solution as a single Python code block (```python ... ```)."
OPTIONS = {"prompt_column": None, "solution_column": None, "suffix": CODE_SUFFIX}


def _pick(
    ds: datasets.Dataset, given: str | None, candidates: tuple[str, ...], what: str, path: str, required: bool
) -> str | None:
    if given is not None:
        if given not in ds.column_names:
            raise ConfigError(
                f"dataset {path!r} has no {what} column {given!r} (has {ds.column_names}); fix data.options"
            )
        return given
    found = next((c for c in candidates if c in ds.column_names), None)
    if found is None and required:
        raise ConfigError(
            f"dataset {path!r} has none of the {what} columns {list(candidates)} (has "
            f"{ds.column_names}); name it with data.options.{what}_column"
        )
    return found


def _rows(ds: datasets.Dataset, opts: dict, system: str | None, path: str) -> datasets.Dataset:
    """Task rows: prompt (chat messages), completion (reference solution or ''), the test columns."""
    prompt_col = _pick(ds, opts["prompt_column"], PROMPT_COLUMNS, "prompt", path, required=True)
    solution_col = _pick(ds, opts["solution_column"], SOLUTION_COLUMNS, "solution", path, required=False)
    tests = [c for c in TEST_COLUMNS if c in ds.column_names]
    if not tests:
        raise ConfigError(
            f"dataset {path!r} has no test column the code reward reads ({', '.join(TEST_COLUMNS)}); "
            f"has {ds.column_names}"
        )
    keep = tests + [c for c in TEST_EXTRAS if c in ds.column_names]
    ds = ds.filter(lambda row: any(row[c] not in (None, "", []) for c in tests))

    def convert(row):
        prompt = row[prompt_col]
        if isinstance(prompt, str):
            prompt = user_prompt(prompt + opts["suffix"], system)
        solution = row[solution_col] if solution_col else None
        return {"prompt": prompt, "completion": solution if isinstance(solution, str) else ""}

    return ds.map(convert, remove_columns=[c for c in ds.column_names if c not in keep])


def load_code(cfg: DataConfig) -> Task:
    if not cfg.path:
        raise ConfigError(
            "data.task=code needs data.path: a hub dataset or a local .jsonl with a prompt column and "
            f"a test column ({', '.join(TEST_COLUMNS)})"
        )
    unknown = set(cfg.options) - set(OPTIONS)
    if unknown:
        raise ConfigError(f"data.options: unknown code option(s) {sorted(unknown)}; valid: {sorted(OPTIONS)}")
    opts = {**OPTIONS, **cfg.options}
    source = load_split(cfg.path, cfg.split)
    if cfg.eval_path:
        held = load_split(cfg.eval_path, cfg.eval_split, split_key="eval_split")
        held = held.select(range(min(cfg.eval_size, len(held))))
        train = source.select(range(min(cfg.train_size, len(source))))
    else:
        train, held = split_tail(source, cfg.train_size, cfg.eval_size)
    return Task(
        "code",
        _rows(train, opts, cfg.system_prompt, cfg.path),
        _rows(held, opts, cfg.system_prompt, cfg.eval_path or cfg.path),
        "code",
    )
