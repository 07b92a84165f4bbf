"""Countdown reward: 1.0 when the completion is an arithmetic expression over the given numbers (each used
exactly once) that evaluates to the target. Evaluated with `ast`, never `eval`.

What counts follows reasoning-gym's own countdown scorer: + - * / (a leading or unary minus or plus included, as
in its reference solutions, e.g. `-3+(17+15)/(1*1)`) and parentheses over numbers written as decimal digits, each
given number used exactly once. Powers, other operators, decimals and other ways of writing an integer (`0x9`,
`1_0`) do not count.
"""

from __future__ import annotations

import ast
import operator
import re

from ._text import completion_text

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}
_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Constant, *_OPS, *_UNARY)
_CHARS = re.compile(r"[0-9+\-*/()\s]+")  # digits, the four operators, parentheses, spaces: nothing else
MAX_CHARS = 10_000  # longer text is refused unread (Python's parser already gives up on ~6,000 nested signs)


def parse_expression(expr: str) -> ast.Expression | None:
    """The syntax tree of an expression of + - * / (binary, or unary - and +) and parentheses over integers
    written in decimal digits, as the reward reads it; None for anything else (never raises).

    >>> ast.unparse(parse_expression(" -3+(17+15)/(1*1) "))
    '-3 + (17 + 15) / (1 * 1)'
    >>> [parse_expression(s) for s in ["2**3", "0x9", "12(18+8)", "1 2", "-" * 7000 + "1"]]
    [None, None, None, None, None]
    """
    expr = expr.strip()
    if len(expr) > MAX_CHARS or not _CHARS.fullmatch(expr):
        return None
    try:
        tree = ast.parse(expr, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):  # MemoryError: "too complex to parse"
        return None
    return tree if all(isinstance(node, _NODES) for node in ast.walk(tree)) else None


def _evaluate(node, used: list[int]) -> float:
    if isinstance(node, ast.Expression):
        return _evaluate(node.body, used)
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_evaluate(node.left, used), _evaluate(node.right, used))
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand, used))
    if isinstance(node, ast.Constant) and isinstance(node.value, int) and not isinstance(node.value, bool):
        used.append(node.value)
        return float(node.value)
    raise ValueError("only + - * / over integer literals are allowed")


def evaluate_expression(expr: str) -> tuple[float, list[int]] | None:
    """Value of an expression of + - * / (unary - and + included) and parentheses, and the integers it uses in
    order; None if malformed (parse_expression), too deep to evaluate, dividing by zero or overflowing a float.

    >>> evaluate_expression("(3 + 4) * 2"), evaluate_expression("-3+(17+15)/(1*1)")
    ((14.0, [3, 4, 2]), (29.0, [3, 17, 15, 1, 1]))
    >>> [evaluate_expression(s) for s in ["__import__('os')", "1/0", "1" + "0" * 400, "-" * 3000 + "1"]]
    [None, None, None, None]
    """
    tree = parse_expression(expr)
    if tree is None:
        return None
    try:
        used: list[int] = []
        return _evaluate(tree, used), used
    except (ValueError, ArithmeticError, RecursionError):  # ArithmeticError: 1/0, an integer too large for a float
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
