"""reasoning-gym's own verifiers as a reward (`data.task: reasoning_gym/NAME`, reward `reasoning_gym`).

Each row of a reasoning-gym task names its entry (`rg_task`, `rg_options`, `rg_seed`, `rg_size`, `rg_index`);
the reward regenerates that entry (reasoning-gym generates entry i of a seeded dataset deterministically, so
its task-specific metadata never passes through an Arrow column) and scores the completion with the task's
`score_answer(answer, entry)` in [0, 1]. The answer is the content of the last `<answer>...</answer>` in the
completion (reasoning_gym.utils.extract_answer, the format its system prompt asks for), or the whole stripped
completion when it has none. A scorer that raises (a few do on malformed answers, e.g. prime_factorization)
scores 0.

>>> import json
>>> row = {"rg_task": ["chain_sum"], "rg_options": [json.dumps({})], "rg_seed": [0], "rg_size": [1], "rg_index": [0]}
>>> gym_entry("chain_sum", "{}", 0, 1, 0)["answer"]
'-14282'
>>> two = {k: v * 2 for k, v in row.items()}
>>> reasoning_gym_reward(["q"] * 2, ["so <answer>-14282</answer>", "<answer>7</answer>"], **two)
[1.0, 0.0]
"""

from __future__ import annotations

import functools
import json


@functools.lru_cache(maxsize=32)
def gym_dataset(name: str, options: str, seed: int, size: int):
    """The reasoning-gym dataset a row came from (options: a JSON object of its config fields)."""
    import reasoning_gym

    return reasoning_gym.create_dataset(name, size=size, seed=seed, **json.loads(options))


@functools.lru_cache(maxsize=4096)
def _entry(name: str, options: str, seed: int, size: int, index: int) -> dict:
    return gym_dataset(name, options, seed, size)[index]


def gym_entry(name: str, options: str, seed: int, size: int, index: int) -> dict:
    """Entry `index` of that dataset: {"question", "answer" (None when several answers are valid), "metadata"}."""
    return _entry(name, options, int(seed), int(size), int(index))


def extracted_answer(text: str) -> str:
    from reasoning_gym.utils import extract_answer

    answer = extract_answer(text, tag_name="answer")
    return text.strip() if answer is None else answer


def reasoning_gym_reward(prompts, completions, rg_task, rg_options, rg_seed, rg_size, rg_index, **kwargs):
    out = []
    for c, name, opts, seed, size, index in zip(completions, rg_task, rg_options, rg_seed, rg_size, rg_index):
        text = c[-1]["content"] if isinstance(c, list) else c
        entry = gym_entry(name, opts, seed, size, index)
        try:
            score = float(gym_dataset(name, opts, int(seed), int(size)).score_answer(extracted_answer(text), entry))
        except Exception:  # a task's scorer that fails on a malformed answer: not solved
            score = 0.0
        out.append(score)
    return out
