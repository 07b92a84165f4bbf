"""Countdown reward: 1.0 when the completion is an arithmetic expression over the given numbers (each used
exactly once) that evaluates to the target. Evaluated with `ast`, never `eval`."""

from __future__ import annotations

import ast
import operator
import re

from ._text import completion_text

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _evaluate(node, used: list[int]) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left, used), _evaluate(node.right, used))
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        used.append(node.value)
        return float(node.value)
    raise ValueError("only + - * / over integer literals are allowed")


def evaluate_expression(expr: str) -> tuple[float, list[int]] | None:
    """Value of an expression of + - * / and parentheses, and the integers it uses; None if malformed.

    >>> evaluate_expression("(3 + 4) * 2")
    (14.0, [3, 4, 2])
    >>> evaluate_expression("__import__('os')") is None
    True
    """
    try:
        used: list[int] = []
        return _evaluate(ast.parse(expr.strip(), mode="eval"), used), used
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError, TypeError):
        return None


def extract_expression(text: str) -> str:
    """The expression in a completion: inside <answer>...</answer> when present, else the first line.

    >>> extract_expression("<answer>3*4</answer>")
    '3*4'
    >>> extract_expression("9*2+3\\nmore")
    '9*2+3'
    """
    m = re.search(r"<answer>(.*?)</answer>", text, re.S)
    text = m.group(1) if m else text
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[0].split("=")[0].strip() if lines else ""


def countdown_reward(prompts, completions, numbers, target, **kwargs) -> list[float]:
    """TRL-signature reward for the `countdown` task.

    >>> countdown_reward(["p"] * 3, ["9*2+3", "9*2+3+3", "21"], numbers=[[9, 2, 3]] * 3, target=[21] * 3)
    [1.0, 0.0, 0.0]
    """
    out = []
    for completion, nums, tgt in zip(completions, numbers, target):
        result = evaluate_expression(extract_expression(completion_text(completion)))
        ok = result is not None and sorted(result[1]) == sorted(nums) and abs(result[0] - tgt) < 1e-6
        out.append(float(ok))
    return out
