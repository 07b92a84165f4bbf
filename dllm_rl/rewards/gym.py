"""reasoning-gym's own verifiers as a reward (`data.task: reasoning_gym/NAME`, reward `reasoning_gym`).

Each row of a reasoning-gym task names its entry (`rg_task`, `rg_options`, `rg_seed`, `rg_size`, `rg_index`);
the reward regenerates that entry (reasoning-gym generates entry i of a seeded dataset deterministically, so
its task-specific metadata never passes through an Arrow column) and scores the completion with the task's
`score_answer(answer, entry)` in [0, 1]. The answer is the content of the last `<answer>...</answer>` in the
completion (reasoning_gym.utils.extract_answer). When the prompt asks for that tag (reasoning-gym's default system
prompt, this project's default for these tasks), a completion without it has no answer: the scorer gets None, as
in reasoning-gym's own evaluation (`score_answer(extract_answer(response), entry)`), which scores 0 (a few tasks,
e.g. countdown, puzzle24, fraction_simplification, give their 0.01 floor), and the completion's text is never
scored in its place (reasoning-gym's default scorer gives partial credit to any text that contains the answer).
When the prompt does not mention the tag (`data.system_prompt: ""` or one of the user's own), the whole stripped
completion is the answer. A scorer that raises (a few do on malformed answers, e.g. prime_factorization) scores 0.

>>> import json
>>> row = {"rg_task": ["chain_sum"], "rg_options": [json.dumps({})], "rg_seed": [0], "rg_size": [1], "rg_index": [0]}
>>> gym_entry("chain_sum", "{}", 0, 1, 0)["answer"]
'-14282'
>>> two = {k: v * 2 for k, v in row.items()}
>>> reasoning_gym_reward(["q"] * 2, ["so <answer>-14282</answer>", "<answer>7</answer>"], **two)
[1.0, 0.0]
>>> asks = [[{"role": "system", "content": "Answer in <answer>...</answer>."}, {"role": "user", "content": "q"}]]
>>> reasoning_gym_reward(asks * 2, ["-14282", "so it is -14282"], **two)  # the tag was asked for: no answer
[0.0, 0.0]
>>> reasoning_gym_reward(["q"] * 2, ["-14282", "7"], **two)  # a prompt that does not ask: the whole text
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


def tagged_answer(text: str) -> str | None:
    """The stripped content of the last `<answer>...</answer>` in `text`, or None when it has none (what the
    reward scores; reasoning_gym.utils.extract_answer)."""
    from reasoning_gym.utils import extract_answer

    return extract_answer(text, tag_name="answer")


def extracted_answer(text: str) -> str:
    """`tagged_answer(text)`, or the whole stripped text when it has no tag (the voting key of tasks/answers.py;
    the reward scores such a completion as having no answer)."""
    answer = tagged_answer(text)
    return text.strip() if answer is None else answer


def asks_for_tag(prompt) -> bool:
    """Whether a prompt (text or chat messages) asks for the answer in `<answer>...</answer>`."""
    texts = [m.get("content") or "" for m in prompt] if isinstance(prompt, list) else [str(prompt)]
    return any("<answer>" in t for t in texts)


def reasoning_gym_reward(prompts, completions, rg_task, rg_options, rg_seed, rg_size, rg_index, **kwargs):
    """The task's `score_answer(answer, entry)` for each completion, the answer as the module docstring says
    (the `<answer>` tag's content, None without one when the prompt asks for it); a scorer that raises: 0."""
    out = []
    rows = zip(prompts, completions, rg_task, rg_options, rg_seed, rg_size, rg_index)
    for p, c, name, opts, seed, size, index in rows:
        text = c[-1]["content"] if isinstance(c, list) else c
        answer = tagged_answer(text) if asks_for_tag(p) else extracted_answer(text)
        entry = gym_entry(name, opts, seed, size, index)
        try:
            score = float(gym_dataset(name, opts, int(seed), int(size)).score_answer(answer, entry))
        except Exception:  # a task's scorer that fails on a malformed answer: not solved
            score = 0.0
        out.append(score)
    return out
