"""The final answer of a completion, normalised for voting (majority vote, distinct answers; evaluate.py).

Two completions that give the same answer must map to the same key; a completion without a readable answer
maps to None (it abstains from a vote). Sudoku: the 16 digits of the grid; countdown: the expression
without spaces; gsm8k / math: the final answer (rewards.math.final_answer) without spaces; reasoning-gym tasks: the
answer its reward scores (the last <answer> tag's content, else the whole text), stripped; other tasks: the
stripped text.
"""

from __future__ import annotations

from typing import Callable

from ..rewards._text import completion_text
from ..rewards.countdown import extract_expression
from ..rewards.math import final_answer
from ..rewards.sudoku import parse_grid


def sudoku_answer(text: str) -> str | None:
    """The grid's 16 digits.

    >>> sudoku_answer("1234\\n3412\\n2143\\n4321"), sudoku_answer("12")
    ('1234341221434321', None)
    """
    grid = parse_grid(text)
    return None if grid is None else "".join(map(str, grid))


def countdown_answer(text: str) -> str | None:
    """The expression without spaces.

    >>> countdown_answer("9 * 2 + 3\\n"), countdown_answer("")
    ('9*2+3', None)
    """
    return extract_expression(text).replace(" ", "") or None


def math_answer(text: str) -> str | None:
    answer = final_answer(text).replace(" ", "")
    return answer or None


def text_answer(text: str) -> str | None:
    return text.strip() or None


def gym_answer(text: str) -> str | None:
    from ..rewards.gym import extracted_answer

    return extracted_answer(text).strip() or None


ANSWERS: dict[str, Callable[[str], str | None]] = {
    "sudoku": sudoku_answer,
    "countdown": countdown_answer,
    "gsm8k": math_answer,
    "math": math_answer,
}


def answer_key(task: str) -> Callable:
    """completion (text or chat messages) -> its normalised answer or None, for task `task`."""
    fn = gym_answer if task.startswith("reasoning_gym/") else ANSWERS.get(task, text_answer)
    return lambda completion: fn(completion_text(completion))
