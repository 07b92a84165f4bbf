"""The final answer of a completion, normalised for voting (majority vote, distinct answers; evaluate.py).

Two completions that give the same answer must map to the same key, and different answers to different keys, as
the task's verifier tells them apart (a vote scores the winning key by the verifier's score of one of its
completions: evalstats.vote); a completion without a readable answer maps to None (it abstains from a vote).
Sudoku: the 16 digits of the grid; countdown: the expression as the reward parses it, written without spaces
(else its text with runs of whitespace as one space); gsm8k / math: the final answer (rewards.math.final_answer) as
math-verify reads it (a number rounded to 6 decimals, as math-verify rounds a decimal), else its stripped text;
reasoning-gym tasks: the answer its reward scores (the last <answer> tag's content, else the whole text), stripped;
other tasks: the stripped text.
"""

from __future__ import annotations

import ast
import threading
from fractions import Fraction
from typing import Callable

from ..rewards._text import completion_text
from ..rewards.countdown import extract_expression, parse_expression
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
    """The expression as the reward parses it (rewards.countdown.parse_expression), written back without spaces
    (redundant parentheses go); text it does not parse keeps its tokens apart (`1 2+9`, which scores 0, is not
    `12+9`).

    >>> countdown_answer("9 * 2 + 3\\n"), countdown_answer("(9*2)+3"), countdown_answer("1 2+9"), countdown_answer("")
    ('9*2+3', '9*2+3', '1 2+9', None)
    """
    expr = extract_expression(text)
    tree = parse_expression(expr)
    try:
        return ast.unparse(tree).replace(" ", "") if tree is not None else " ".join(expr.split()) or None
    except RecursionError:  # a tree too deep to write back: its text, as for one that does not parse
        return " ".join(expr.split())


def _number_key(value: Fraction) -> str:
    """A number rounded to 6 decimals, written without trailing zeros (math-verify rounds a decimal to 6 places).

    >>> _number_key(Fraction(1, 2)), _number_key(Fraction(72)), _number_key(Fraction(-1, 3)), _number_key(Fraction(0))
    ('0.5', '72', '-0.333333', '0')
    """
    q = round(value * 10**6)
    whole, frac = divmod(abs(q), 10**6)
    return ("-" if q < 0 else "") + str(whole) + (f".{frac:06d}".rstrip("0") if frac else "")


def _math_key(answer: str) -> str | None:
    """The key of what math-verify parses from `answer` (parsed as rewards.math.answers_match parses it), or None
    when it parses nothing. An assignment `x = 3` is keyed as its value (math-verify compares it so with an answer
    that is not an equation) and a percentage `50%` as its number (as it compares one with an integer)."""
    import sympy
    from math_verify import parse

    s = answer.strip()
    if not s:
        return None
    main = threading.current_thread() is threading.main_thread()  # as answers_match: timeouts need the main thread
    try:
        parsed = parse(s if s.startswith("$") else f"${s}$", **({} if main else {"parsing_timeout": None}))
        value = next((v for v in parsed if not isinstance(v, str)), None)
        if isinstance(value, sympy.Eq) and isinstance(value.lhs, sympy.Symbol):
            value = value.rhs
        percent = sympy.UnevaluatedExpr(sympy.Rational(1, 100))
        if isinstance(value, sympy.Mul) and len(value.args) == 2 and value.args[1] == percent:
            value = value.args[0]
        if isinstance(value, sympy.Number) and value.is_finite:
            exact = sympy.Rational(value)  # a Float's exact binary value
            return _number_key(Fraction(int(exact.p), int(exact.q)))
        return None if value is None else str(value)
    except Exception:  # math-verify or sympy refusing the text: keyed by the text
        return None


def math_answer(text: str) -> str | None:
    """The final answer as math-verify reads it: numbers by value, other expressions by their parsed form; text it
    does not parse, stripped (answers_match compares such answers as stripped text).

    >>> [math_answer(t) for t in ["0.5", r"\\boxed{\\frac{1}{2}}", r"\\boxed{1,000}", "<answer>1 000</answer>", ""]]
    ['0.5', '0.5', '1000', '1*0', None]
    """
    answer = final_answer(text)
    return _math_key(answer) or answer.strip() or None


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
