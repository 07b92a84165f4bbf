"""Preference pairs in TRL's format, loaded with `datasets` and tokenized for a diffusion LM's canvas.

Rows hold `prompt`, `chosen` and `rejected`, either plain text or conversational (lists of chat messages), or
only `chosen` and `rejected` with the prompt implicit in both (TRL's `extract_prompt` takes their longest common
prefix, as TRL 1.16's DPOTrainer does). A text `prompt` beside conversational `chosen` / `rejected` that contain
it (argilla/ultrafeedback-binarized-preferences-cleaned) is treated as implicit too, as TRL's maybe_extract_prompt
does. `dpo.dataset_name` is a hub name or a local .json / .jsonl / .parquet
file. Tokenization follows TRL's: the prompt with the chat template's generation prompt, prompt + completion in
full, the completion = what follows their common prefix (`trl.data_utils.common_prefix_length`).

Where a diffusion LM differs:
- every completion ends with the tokenizer's EOS (appended when missing, conversational data included): the
  model writes EOS to end its answer on a fixed canvas, and the canvas after it is EOS padding;
- a completion is scored on the canvas the model generates into (`rollout.max_completion_length` positions),
  so a longer one is cut there (keep_start) and the cut is reported;
- `dpo.max_length` bounds prompt + completion. keep_start cuts the completion's end and refuses a prompt that
  leaves no room (TRL drops such rows silently); keep_end cuts the prompt's start, once per pair so that chosen
  and rejected keep one prompt (TRL cuts each sequence separately); `dpo.max_prompt_length` keeps the prompt's
  last tokens;
- rows TRL would train on silently but that carry no preference (chosen identical to rejected, an empty
  completion) or lack a column are refused with the row and the fix.
A row's `tools` (a list, or its JSON text) and `chat_template_kwargs` columns reach the chat template, as in TRL.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import datasets
import torch

from ..batches import SequenceBatch
from ..errors import ConfigError

_LOCAL = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}


@dataclass
class PreferencePair:
    """One tokenized pair; completions end with EOS unless truncated, and are not padded."""

    index: int  # row of the dataset (the per-example noise seed derives from it)
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def load_preferences(name: str, split: str = "train") -> datasets.Dataset:
    """A preference dataset by hub name (and split) or local .json / .jsonl / .parquet file (one split, read whole:
    a dpo.dataset_train_split other than "train" would be ignored there and is refused)."""
    ext = os.path.splitext(name)[1].lower()
    if ext in _LOCAL:
        if split != "train":
            raise ConfigError(
                f"dpo.dataset_train_split={split!r}, but dpo.dataset_name {name!r} is a local file, which is one split "
                f"(read whole): drop dpo.dataset_train_split (or name a hub dataset that has that split)"
            )
        if not os.path.isfile(name):
            raise ConfigError(f"dpo.dataset_name: file {name!r} does not exist; give a local .jsonl or a hub dataset")
        try:
            return datasets.load_dataset(_LOCAL[ext], data_files=name, split="train")
        except Exception as e:  # a malformed file
            from .math_data import _first_line

            raise ConfigError(
                f"dpo.dataset_name: could not read {name!r} as {_LOCAL[ext]} ({type(e).__name__}: {_first_line(e)}); "
                f"fix the file (.jsonl: one JSON object per line)"
            ) from None
    try:
        return datasets.load_dataset(name, split=split)
    except Exception as e:  # hub unreachable, unknown dataset or split
        raise ConfigError(
            f"dpo.dataset_name: could not load {name!r} split {split!r} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}); give a local .json/.jsonl/.parquet file or fix dpo.dataset_train_split"
        ) from None


def _text(value) -> str:
    """The text of a completion: itself, or its messages' contents joined."""
    if isinstance(value, str):
        return value
    return "".join(str(m.get("content") or "") for m in value) if isinstance(value, list) else str(value)


def _as_dataset(data, where: str) -> datasets.Dataset:
    """A `datasets.Dataset` of the preference data: a Dataset as is; an IterableDataset (streaming, which TRL's
    DPOTrainer accepts) read into memory, as every row is checked and tokenized before training anyway; a list of
    row dicts through Dataset.from_list. A DatasetDict and other types are refused with the fix."""
    if isinstance(data, datasets.Dataset):
        return data
    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = list(data)
        pick = repr(splits[0]) if splits else "'train'"
        raise ConfigError(
            f"{where}: a DatasetDict with splits {splits}, not one split; pass one of them, e.g. "
            f"train_dataset=ds[{pick}] (load_dataset(name, split='train') returns the split itself)"
        )
    if isinstance(data, datasets.IterableDataset):
        # TRL's DPOTrainer accepts an IterableDataset; here its rows are materialised (they are all tokenized
        # before training, so an endless stream cannot be used: it never ends)
        data = list(data)
        if not data:
            raise ConfigError(f"{where}: the dataset has no rows")
        return datasets.Dataset.from_list(data)
    if isinstance(data, (list, tuple)) and all(isinstance(row, dict) for row in data):
        if not data:
            raise ConfigError(f"{where}: the dataset has no rows")
        try:
            return datasets.Dataset.from_list(list(data))
        except Exception as e:  # rows whose columns pyarrow cannot put in one table
            raise ConfigError(
                f"{where}: could not make a datasets.Dataset of the {len(data)} rows ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200] if str(e) else ''}); give every row the same columns with values of "
                f"one kind (text, or lists of chat messages)"
            ) from None
    raise ConfigError(
        f"{where}: got a {type(data).__module__}.{type(data).__name__}; give a datasets.Dataset (or an "
        f"IterableDataset, or a list of row dicts) with TRL's prompt/chosen/rejected columns"
    )


def prepare_preferences(dataset: datasets.Dataset, where: str) -> datasets.Dataset:
    """Columns checked, implicit prompts extracted (TRL's extract_prompt), and every row checked for a usable
    preference; `where` names the data in errors."""
    from trl.data_utils import extract_prompt

    dataset = _as_dataset(dataset, where)
    missing = [c for c in ("chosen", "rejected") if c not in dataset.column_names]
    if missing:
        raise ConfigError(
            f"{where}: preference data needs columns chosen and rejected (and optionally prompt); missing "
            f"{missing}, found {dataset.column_names}. Rename the columns to TRL's prompt/chosen/rejected"
        )
    if len(dataset) == 0:
        raise ConfigError(f"{where}: the dataset has no rows")
    given = "prompt" in dataset.column_names
    for i, row in enumerate(dataset):  # a null cell (a row without the column in a json file) would read as "None"
        for col in ("prompt", "chosen", "rejected") if given else ("chosen", "rejected"):
            if not isinstance(row[col], (str, list)):
                raise ConfigError(
                    f"{where}: row {i} has no {col} (got {row[col]!r}); give it text or a list of chat messages, "
                    f"or drop the row"
                )
        for side in ("chosen", "rejected"):  # before extract_prompt, which fails on an empty side
            if not _text(row[side]).strip():
                raise ConfigError(f"{where}: row {i} has an empty {side} completion; drop the row or fill it in")
        if isinstance(row["chosen"], list) != isinstance(row["rejected"], list):
            raise ConfigError(
                f"{where}: row {i} has one of chosen and rejected as chat messages and the other as text; make "
                f"both lists of messages or both strings"
            )
        if given and isinstance(row["prompt"], list) and not isinstance(row["chosen"], list):
            raise ConfigError(
                f"{where}: row {i} mixes a conversational prompt with plain-text completions; make all three lists "
                f"of messages or all three strings"
            )
    # implicit prompt, as TRL 1.16's DPOTrainer; and, as TRL's maybe_extract_prompt, a text prompt beside
    # conversations that hold it (as the user turn) is redundant: the prompt is their common start
    # (argilla/ultrafeedback-binarized-preferences-cleaned). A column holds one kind, so the first row tells.
    first = dataset[0]
    extract = not given or (isinstance(first["chosen"], list) and not isinstance(first["prompt"], list))
    if extract:
        dataset = dataset.map(extract_prompt)
    after = " (after the prompt TRL's extract_prompt split off as chosen and rejected's common start)" * extract
    for i, row in enumerate(dataset):
        if extract and isinstance(row["prompt"], list) and not row["prompt"]:
            raise ConfigError(
                f"{where}: row {i}: chosen and rejected share no first message, so there is no implicit prompt "
                f"(their common start); give the row a conversational prompt column or drop it"
            )
        for side in ("chosen", "rejected"):
            if not _text(row[side]).strip():
                raise ConfigError(f"{where}: row {i} has an empty {side} completion{after}; drop the row or fill it in")
        if row["chosen"] == row["rejected"]:
            raise ConfigError(
                f"{where}: row {i} has chosen identical to rejected, which carries no preference; drop the row "
                f"or fix the pair"
            )
    return dataset


def _template_kwargs(row) -> dict:
    """TRL's per-row arguments of the chat template: `tools` (a list or its JSON text) and `chat_template_kwargs`."""
    tools = row.get("tools")
    return {"tools": json.loads(tools) if isinstance(tools, str) else tools, **(row.get("chat_template_kwargs") or {})}


def _encode(tokenizer, prompt, completion=None, template_kwargs=None) -> list[int]:
    """Token ids of the prompt (with the generation prompt) or of prompt + completion, as the rollout encodes
    prompts (rollout.encode_prompts: the chat template rendered, then tokenized without special tokens)."""
    if isinstance(prompt, list):
        messages = list(prompt) + (list(completion) if completion is not None else [])
        text = tokenizer.apply_chat_template(
            messages, add_generation_prompt=completion is None, tokenize=False, **(template_kwargs or {})
        )
        return tokenizer(text, add_special_tokens=False).input_ids
    return tokenizer(str(prompt) + (str(completion) if completion is not None else "")).input_ids


def tokenize_preferences(dataset: datasets.Dataset, tokenizer, canvas: int, cfg, where: str):
    """(PreferencePair list, number of completions cut at the canvas) for a dataset prepare_preferences checked
    (its rows' prompt and completions are all text or all messages). cfg: the `dpo` section (max_length,
    max_prompt_length, truncation_mode)."""
    from trl.data_utils import common_prefix_length

    eos = tokenizer.eos_token_id
    pairs, cut = [], 0
    for i, row in enumerate(dataset):
        kw = _template_kwargs(row)
        prompt = _encode(tokenizer, row["prompt"], template_kwargs=kw)
        full = [_encode(tokenizer, row["prompt"], row[side], kw) for side in ("chosen", "rejected")]
        start = min(common_prefix_length(prompt, f) for f in full)
        prompt, completions = prompt[:start], []
        for side, ids in zip(("chosen", "rejected"), full):
            ids = ids[start:]
            if not ids:
                raise ConfigError(f"{where}: row {i}: the {side} completion has no tokens; drop the row or fill it in")
            completions.append(ids if ids[-1] == eos else ids + [eos])
        if cfg.max_prompt_length is not None:
            prompt = prompt[-cfg.max_prompt_length :]
        prompt, completions = _truncate(prompt, completions, cfg, where, i)
        if any(len(c) > canvas for c in completions):
            cut += 1
            completions = [c[:canvas] for c in completions]
        if completions[0] == completions[1]:
            raise ConfigError(
                f"{where}: row {i}: chosen and rejected are identical once tokenized and truncated (to "
                f"rollout.max_completion_length={canvas} or dpo.max_length={cfg.max_length}); raise the limit or "
                f"drop the row"
            )
        pairs.append(PreferencePair(i, prompt, completions[0], completions[1]))
    return pairs, cut


def _truncate(prompt: list[int], completions: list[list[int]], cfg, where: str, i: int):
    m = cfg.max_length
    if m is None:
        return prompt, completions
    if cfg.truncation_mode == "keep_start":
        if len(prompt) >= m:
            raise ConfigError(
                f"{where}: row {i}: the prompt has {len(prompt)} tokens, which leaves no room for a completion within "
                f"dpo.max_length={m}; raise dpo.max_length, set dpo.max_prompt_length, use "
                f"dpo.truncation_mode=keep_end, or drop the row"
            )
        return prompt, [c[: m - len(prompt)] for c in completions]
    keep = m - max(len(c) for c in completions)  # keep_end: one prompt cut for both sequences
    if keep < 0 or (keep == 0 and prompt):
        raise ConfigError(
            f"{where}: row {i}: a completion alone has {max(len(c) for c in completions)} tokens, which leaves no "
            f"room for its prompt within dpo.max_length={m}; raise dpo.max_length or drop the row"
        )
    return prompt[max(len(prompt) - keep, 0) :], completions


def collate_pairs(
    prompts: list[list[int]], chosen: list[list[int]], rejected: list[list[int]], canvas: int, pad_id: int, eos_id: int
) -> SequenceBatch:
    """The 2B rows [chosen; rejected] (TRL's layout): prompts left-padded, completions EOS-filled to the canvas
    (as the sampler fills a finished row), completion_mask 1 on each completion's own tokens (EOS included)."""
    rows = list(prompts) + list(prompts)
    completions = list(chosen) + list(rejected)
    P = max(len(p) for p in rows)
    prompt = torch.full((len(rows), P), pad_id, dtype=torch.long)
    pmask = torch.zeros(len(rows), P, dtype=torch.long)
    comp = torch.full((len(rows), canvas), eos_id, dtype=torch.long)
    cmask = torch.zeros(len(rows), canvas, dtype=torch.long)
    for i, (p, c) in enumerate(zip(rows, completions)):
        if p:
            prompt[i, P - len(p) :] = torch.tensor(p)
            pmask[i, P - len(p) :] = 1
        comp[i, : len(c)] = torch.tensor(c)
        cmask[i, : len(c)] = 1
    return SequenceBatch(prompt, pmask, comp, cmask)
