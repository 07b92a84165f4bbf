"""Preference data in TRL's format (tasks.preference): plain, conversational and implicit-prompt rows from local
json/jsonl/parquet files, tokenized for a diffusion LM's canvas; bad rows stop with the row and the fix."""

from __future__ import annotations

from pathlib import Path

import datasets
import pytest

from dllm_rl.config import DPOConfig
from dllm_rl.errors import ConfigError
from dllm_rl.rollout import encode_prompts
from dllm_rl.tasks.preference import collate_pairs, load_preferences, prepare_preferences, tokenize_preferences

DATA = Path(__file__).parents[1] / "data"


def tokenized(rows_or_path, tokenizer, canvas=32, **dpo):
    data = (
        load_preferences(str(rows_or_path))
        if isinstance(rows_or_path, Path)
        else datasets.Dataset.from_list(rows_or_path)
    )
    return tokenize_preferences(
        prepare_preferences(data, "test data"), tokenizer, canvas, DPOConfig(**dpo), "test data"
    )


def text(tokenizer, ids):
    return tokenizer.decode(ids, skip_special_tokens=False)


def test_plain_rows_tokenize_as_trl_with_eos_appended(tokenizer):
    pairs, cut = tokenized(DATA / "preferences_plain.jsonl", tokenizer)
    assert cut == 0 and [p.index for p in pairs] == [0, 1, 2]
    eos = tokenizer.eos_token_id
    p = pairs[1]
    assert p.prompt_ids == encode_prompts(tokenizer, ["The sky is"])[0]
    assert p.chosen_ids == tokenizer(" blue.").input_ids + [eos] and p.rejected_ids[-1] == eos
    assert text(tokenizer, p.rejected_ids[:-1]) == " green."


def test_implicit_conversational_prompt_is_extracted_and_templated(tokenizer):
    """No prompt column: TRL's extract_prompt takes the common message prefix; the prompt is then rendered with the
    chat template's generation prompt, exactly as the rollout engine renders prompts."""
    pairs, _ = tokenized(DATA / "preferences_implicit.jsonl", tokenizer)
    user = [{"role": "user", "content": "What color is the sky?"}]
    assert pairs[0].prompt_ids == encode_prompts(tokenizer, [user])[0]
    assert text(tokenizer, pairs[0].chosen_ids) == "It is blue." + tokenizer.eos_token
    assert text(tokenizer, pairs[1].rejected_ids) == "In the sea." + tokenizer.eos_token


def test_a_text_prompt_beside_conversations_that_hold_it_is_implicit(tokenizer):
    """argilla/ultrafeedback-binarized-preferences-cleaned's layout: a text prompt column, and chosen / rejected
    conversations that start with it as the user turn. As TRL's maybe_extract_prompt, the prompt is their common
    start, so the pair tokenizes as the implicit conversational file does."""
    rows = [
        {
            "prompt": "What color is the sky?",
            "chosen": [
                {"role": "user", "content": "What color is the sky?"},
                {"role": "assistant", "content": "It is blue."},
            ],
            "rejected": [
                {"role": "user", "content": "What color is the sky?"},
                {"role": "assistant", "content": "It is green."},
            ],
        }
    ]
    (p,), _ = tokenized(rows, tokenizer)
    (q, *_), _ = tokenized(DATA / "preferences_implicit.jsonl", tokenizer)
    assert p.prompt_ids == q.prompt_ids and p.chosen_ids == q.chosen_ids
    assert text(tokenizer, p.rejected_ids) == "It is green." + tokenizer.eos_token


def test_implicit_plain_prompt_keeps_the_space_with_the_completion(tokenizer):
    rows = [{"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: green"}]
    (p,), _ = tokenized(rows, tokenizer)
    assert text(tokenizer, p.prompt_ids) == "Q: sky? A:" and text(tokenizer, p.chosen_ids)[:5] == " blue"


def test_parquet_and_json_files_load(tokenizer, tmp_path):
    rows = datasets.load_dataset("json", data_files=str(DATA / "preferences_plain.jsonl"), split="train")
    rows.to_parquet(str(tmp_path / "p.parquet"))
    rows.to_json(str(tmp_path / "p.json"))
    want = tokenized(DATA / "preferences_plain.jsonl", tokenizer)[0]
    for name in ("p.parquet", "p.json"):
        assert tokenized(tmp_path / name, tokenizer)[0] == want


def test_truncation(tokenizer):
    rows = [{"prompt": "abcdefgh", "chosen": "0123456789", "rejected": "xyz"}]
    (p,), _ = tokenized(rows, tokenizer, max_length=12)  # keep_start: the completion's end is cut
    assert len(p.prompt_ids) == 8 and p.chosen_ids == tokenizer("0123").input_ids
    (p,), _ = tokenized(rows, tokenizer, max_length=12, max_prompt_length=3)  # the prompt keeps its last tokens
    assert text(tokenizer, p.prompt_ids) == "fgh" and len(p.chosen_ids) == 9
    # keep_end: one cut of the prompt's start for both, so that prompt + the longer completion (10 + EOS) fit in 14
    (p,), _ = tokenized(rows, tokenizer, max_length=14, truncation_mode="keep_end")
    assert text(tokenizer, p.prompt_ids) == "fgh" and len(p.chosen_ids) == 11
    (p,), cut = tokenized(rows, tokenizer, canvas=6, max_length=None)  # the diffusion canvas: cut and counted
    assert cut == 1 and text(tokenizer, p.chosen_ids) == "012345" and p.rejected_ids[-1] == tokenizer.eos_token_id


def test_keep_end_fits_a_completion_of_max_length_tokens_when_there_is_no_prompt(tokenizer):
    (p,), _ = tokenized(
        [{"prompt": "", "chosen": "bcdefg", "rejected": "c"}], tokenizer, max_length=7, truncation_mode="keep_end"
    )
    assert p.prompt_ids == [] and text(tokenizer, p.chosen_ids) == "bcdefg" + tokenizer.eos_token


def test_a_rows_tools_and_chat_template_kwargs_reach_the_chat_template(tokenizer):
    """TRL renders each row with its `tools` (a list or its JSON text) and `chat_template_kwargs`."""
    import dllm_rl.models as M

    tok = M.build_char_tokenizer()
    tok.chat_template = (
        "{% if tools %}T{{ tools | length }}|{% endif %}{% if terse %}!{% endif %}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    user = [{"role": "user", "content": "q"}]
    rows = [
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
            "tools": None,
            "chat_template_kwargs": None,
        },
        {
            "prompt": user,
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
            "tools": '[{"name": "f"}, {"name": "g"}]',
            "chat_template_kwargs": {"terse": True},
        },
    ]
    pairs, _ = tokenized(rows, tok)
    assert [text(tok, p.prompt_ids) for p in pairs] == ["q", "T2|!q"]
    assert text(tok, pairs[1].chosen_ids) == "a" + tok.eos_token


def test_collate_lays_out_chosen_then_rejected_on_the_canvas(tokenizer):
    pairs, _ = tokenized(DATA / "preferences_plain.jsonl", tokenizer)
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    b = collate_pairs(
        [p.prompt_ids for p in pairs], [p.chosen_ids for p in pairs], [p.rejected_ids for p in pairs], 10, pad, eos
    )
    assert b.completion_ids.shape == (6, 10) and b.prompt_ids.shape[0] == 6
    for i, p in enumerate(pairs):
        for row, ids in ((i, p.chosen_ids), (i + 3, p.rejected_ids)):
            assert (
                b.completion_ids[row, : len(ids)].tolist() == ids and (b.completion_ids[row, len(ids) :] == eos).all()
            )
            assert b.completion_mask[row].sum() == len(ids)
            assert b.prompt_ids[row][b.prompt_mask[row].bool()].tolist() == p.prompt_ids


@pytest.mark.parametrize(
    "rows,kw,match",
    [
        ([{"prompt": "a", "answer": "b"}], {}, r"needs columns chosen and rejected.*missing \['chosen', 'rejected'\]"),
        (
            [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": "b"}],
            {},
            "row 1 has chosen identical to rejected.*drop the row",
        ),
        ([{"prompt": "a", "chosen": "", "rejected": "c"}], {}, "row 0 has an empty chosen completion"),
        (
            [
                {
                    "prompt": [{"role": "user", "content": "a"}],
                    "chosen": [{"role": "assistant", "content": ""}],
                    "rejected": [{"role": "assistant", "content": "c"}],
                }
            ],
            {},
            "row 0 has an empty chosen",
        ),
        (
            [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": None, "chosen": "b", "rejected": "c"}],
            {},
            r"row 1 has no prompt \(got None\)",  # a json row without the column: not the text "None"
        ),
        ([{"chosen": "yes ", "rejected": "no"}], {}, "row 0 has an empty chosen completion \\(after the prompt TRL's"),
        ([{"chosen": "", "rejected": "xyz"}], {}, "row 0 has an empty chosen completion; drop"),  # implicit prompt
        (
            [
                {
                    "chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b"}],
                    "rejected": [{"role": "user", "content": "yo"}, {"role": "assistant", "content": "c"}],
                }
            ],
            {},
            "row 0: chosen and rejected share no first message, so there is no implicit prompt",
        ),
        (
            [
                {
                    "prompt": [{"role": "user", "content": "a"}],
                    "chosen": [{"role": "assistant", "content": "b"}],
                    "rejected": "c",
                }
            ],
            {},
            "row 0 has one of chosen and rejected as chat messages and the other as text",
        ),
        (
            [{"prompt": [{"role": "user", "content": "a"}], "chosen": "b", "rejected": "c"}],
            {},
            "row 0 mixes a conversational prompt with plain-text completions",
        ),
        (
            [{"prompt": "a", "chosen": "bcdefg", "rejected": "c"}],
            {"max_length": 7, "truncation_mode": "keep_end"},
            "row 0: a completion alone has 7 tokens, which leaves no room for its prompt",
        ),
        (
            [{"prompt": "a" * 10, "chosen": "b", "rejected": "c"}],
            {"max_length": 8},
            "row 0: the prompt has 10 tokens.*dpo.max_length=8; raise dpo.max_length",
        ),
        (
            [{"prompt": "a", "chosen": "bx", "rejected": "by"}],
            {"max_length": 2},
            "identical once tokenized and truncated",
        ),
    ],
)
def test_bad_rows_name_the_row_and_the_fix(tokenizer, rows, kw, match):
    with pytest.raises(ConfigError, match=match):
        tokenized(rows, tokenizer, **kw)


def test_missing_file_and_unreachable_hub_name_the_key():
    with pytest.raises(ConfigError, match="dpo.dataset_name: file 'nope.jsonl' does not exist"):
        load_preferences("nope.jsonl")
    with pytest.raises(ConfigError, match="dpo.dataset_name: could not load 'no-such-org/no-such-data'"):
        load_preferences("no-such-org/no-such-data")


def test_a_local_file_refuses_a_split_it_would_ignore(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    assert len(load_preferences(str(path))) == 1
    with pytest.raises(ConfigError, match="dpo.dataset_train_split='test', but .* is a local file"):
        load_preferences(str(path), "test")


ROWS = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "d", "chosen": "e", "rejected": "f"}]


def test_a_dataset_dict_is_refused_with_the_split_to_pass():
    data = datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS)})
    with pytest.raises(
        ConfigError, match=r"a DatasetDict with splits \['train', 'test'\].*train_dataset=ds\['train'\]"
    ):
        prepare_preferences(data, "train_dataset")


@pytest.mark.parametrize(
    "make",
    [lambda rows: datasets.Dataset.from_list(rows).to_iterable_dataset(), list, tuple],
    ids=["IterableDataset", "list", "tuple"],
)
def test_an_iterable_dataset_or_a_list_of_rows_is_used_as_a_dataset(tokenizer, make):
    want = tokenize_preferences(
        prepare_preferences(datasets.Dataset.from_list(ROWS), "t"), tokenizer, 32, DPOConfig(), "t"
    )
    data = prepare_preferences(make(ROWS), "t")
    assert isinstance(data, datasets.Dataset) and data.to_list() == ROWS
    assert tokenize_preferences(data, tokenizer, 32, DPOConfig(), "t") == want


@pytest.mark.parametrize(
    "data, match",
    [
        ({"prompt": ["a"], "chosen": ["b"], "rejected": ["c"]}, "got a builtins.dict; give a datasets.Dataset"),
        (["a", "b"], "got a builtins.list; give a datasets.Dataset .*or a list of row dicts"),
        ("prefs.jsonl", "got a builtins.str; give a datasets.Dataset"),
        ([], "the dataset has no rows"),
        (datasets.Dataset.from_list(ROWS).to_iterable_dataset().take(0), "the dataset has no rows"),
        ([{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": 1, "chosen": [2], "rejected": "c"}], "could not"),
    ],
)
def test_other_preference_data_is_refused_naming_the_types(data, match):
    with pytest.raises(ConfigError, match=match):
        prepare_preferences(data, "train_dataset")
