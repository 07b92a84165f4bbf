"""Plans on the procedural tasks: what a plan is, the oracle plan of a row, a corrupted plan, whether a plan is
right, and a content-free plan of the same shape (the hybrid engine's raw material: rollout/hybrid.py).

A plan is a short hint, the first steps of a solution, in a form the tiny models can read:
- sudoku: two cells of the solution, written as a 4x4 grid in the puzzle's layout with only those cells
  filled (`__2_\\n____\\n4___\\n____`): the two blanks with the fewest candidates given the puzzle's givens
  (the cells a solver fills first; ties in reading order). Content-free: the empty grid. Corrupted: each
  hinted digit d becomes d % 4 + 1 (same cells, wrong values). Right: some valid grid that keeps the givens
  also keeps the hinted digits.
- countdown: the first operation of the reference expression in evaluation order, with its result
  (`9*2=18` for `9*2+3`). Content-free: `?`. Corrupted: the result plus one (`9*2=19`). Right: the operation
  uses two of the numbers, its result is correct, and the result with the remaining numbers can still reach
  the target.
Other tasks have no oracle plan; a plan from a planner still works, corrupted by shifting every digit by one.
"""

from __future__ import annotations

import ast
import itertools
import operator
import re
from dataclasses import dataclass
from typing import Callable

from ..rewards.countdown import evaluate_expression, extract_expression, parse_expression
from ..rewards.sudoku import parse_grid, solutions


@dataclass(frozen=True)
class TaskPlans:
    oracle: Callable[[dict], str] | None  # a row (with its reference columns) -> its plan
    corrupt: Callable[[str], str]  # a plan -> the same format with wrong content
    correct: Callable[[dict, str], bool] | None  # is the plan consistent with some solution of the row
    content_free: str  # a plan-shaped string without content
    follows: Callable[[str, str], bool] | None = None  # (plan, completion text) -> does the answer agree with it


def shift_digits(plan: str) -> str:
    """The generic corruption: every digit d becomes (d + 1) % 10.

    >>> shift_digits("3 apples, 19 pears")
    '4 apples, 20 pears'
    """
    return re.sub(r"\d", lambda m: str((int(m.group()) + 1) % 10), plan)


# ---------------------------------------------------------------------------------------------------- sudoku


def _cells(grid_text: str) -> list[str]:
    return [c for c in grid_text if c not in "\n "]


def _candidates(cells: list[str], i: int) -> set[int]:
    r, c = divmod(i, 4)
    peers = {4 * r + k for k in range(4)} | {4 * k + c for k in range(4)}
    peers |= {4 * (r // 2 * 2 + a) + c // 2 * 2 + b for a in range(2) for b in range(2)}
    return {1, 2, 3, 4} - {int(cells[j]) for j in peers if cells[j].isdigit()}


def hint_grid(values: dict[int, int]) -> str:
    """A 4x4 grid text with only the given cells filled.

    >>> print(hint_grid({2: 2, 8: 4}))
    __2_
    ____
    4___
    ____
    """
    cells = [str(values[i]) if i in values else "_" for i in range(16)]
    return "\n".join("".join(cells[4 * r : 4 * r + 4]) for r in range(4))


def sudoku_oracle(row: dict, cells: int = 2) -> str:
    """The two most constrained blanks of the puzzle, filled from its reference solution (`answer`).

    >>> print(sudoku_oracle({"puzzle": "12__\\n34__\\n____\\n____", "answer": "1243\\n3421\\n2134\\n4312"}))
    __43
    ____
    ____
    ____
    """
    puzzle, solution = _cells(row["puzzle"]), _cells(row["answer"])
    blanks = [i for i, c in enumerate(puzzle) if not c.isdigit()]
    chosen = sorted(blanks, key=lambda i: (len(_candidates(puzzle, i)), i))[:cells]
    return hint_grid({i: int(solution[i]) for i in chosen})


def sudoku_corrupt(plan: str) -> str:
    """Each hinted digit d becomes d % 4 + 1.

    >>> sudoku_corrupt("__4_\\n____\\n2___\\n____")
    '__1_\\n____\\n3___\\n____'
    """
    return re.sub(r"[1-4]", lambda m: str(int(m.group()) % 4 + 1), plan)


def sudoku_correct(row: dict, plan: str) -> bool:
    """A well-formed hint grid with at least one digit that some valid solution of the puzzle agrees with.

    >>> row = {"puzzle": "12__\\n34__\\n____\\n____"}
    >>> sudoku_correct(row, "__4_\\n____\\n2___\\n____"), sudoku_correct(row, "__1_\\n____\\n3___\\n____")
    (True, False)
    """
    lines = plan.strip().split("\n")
    if len(lines) != 4 or any(not re.fullmatch(r"[1-4_]{4}", ln) for ln in lines):
        return False
    hints = {i: int(c) for i, c in enumerate("".join(lines)) if c.isdigit()}
    return bool(hints) and any(all(s[i] == v for i, v in hints.items()) for s in solutions(row["puzzle"]))


def sudoku_follows(plan: str, completion: str) -> bool:
    """The completion's grid has the plan's digits in the plan's cells.

    >>> sudoku_follows("__4_\\n____\\n____\\n____", "1243\\n3421\\n2134\\n4312")
    True
    """
    grid = parse_grid(completion)
    hints = {i: int(c) for i, c in enumerate(_cells(plan)) if c.isdigit()}
    return grid is not None and bool(hints) and all(i < 16 and grid[i] == v for i, v in hints.items())


# ------------------------------------------------------------------------------------------------- countdown

_SYMBOL = {ast.Add: "+", ast.Sub: "-", ast.Mult: "*", ast.Div: "/"}
_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul, "/": operator.truediv}


def _number(x: float) -> str:
    return str(int(x)) if abs(x - round(x)) < 1e-9 else f"{x:.4g}"


def countdown_oracle(row: dict) -> str:
    """The first operation of the reference expression, in evaluation order, with its result; a number under a
    unary minus (reasoning-gym writes references such as `-3-4+5`) is an operand with its sign.

    >>> countdown_oracle({"answer": "3+9*2"}), countdown_oracle({"answer": "(7-2)*4"})
    ('9*2=18', '7-2=5')
    >>> countdown_oracle({"answer": "-3-4+5"})
    '-3-4=-7'
    """

    def signed(node) -> int | None:
        value = _operand(node)
        if value is None:
            return None
        return value[1] * (-1) ** sum(sign == "USub" for sign in value[0])

    def first(node):
        if isinstance(node, ast.BinOp):
            for child in (node.left, node.right):
                found = first(child)
                if found is not None:
                    return found
            if signed(node.left) is not None and signed(node.right) is not None:
                return node
        return None

    op = first(ast.parse(row["answer"], mode="eval").body)
    a, b, sym = signed(op.left), signed(op.right), _SYMBOL[type(op.op)]
    return f"{a}{sym}{b}={_number(_APPLY[sym](a, b))}"


def countdown_corrupt(plan: str) -> str:
    """The result plus one.

    >>> countdown_corrupt("9*2=18")
    '9*2=19'
    """
    m = re.fullmatch(r"(.*=)\s*(-?\d+(?:\.\d+)?)\s*", plan)
    return f"{m.group(1)}{_number(float(m.group(2)) + 1)}" if m else shift_digits(plan)


def _reachable(values: list[float], target: float) -> bool:
    if len(values) == 1:
        return abs(values[0] - target) < 1e-6
    for i, j in itertools.permutations(range(len(values)), 2):
        rest = [v for k, v in enumerate(values) if k not in (i, j)]
        for f in _APPLY.values():
            try:
                if _reachable(rest + [f(values[i], values[j])], target):
                    return True
            except ZeroDivisionError:
                continue
    return False


def countdown_correct(row: dict, plan: str) -> bool:
    """The operation uses two of the numbers, its result is right, and the target stays reachable.

    >>> row = {"numbers": [9, 2, 3], "target": 21}
    >>> countdown_correct(row, "9*2=18"), countdown_correct(row, "9*2=19"), countdown_correct(row, "9+2=11")
    (True, False, False)
    """
    m = re.fullmatch(r"\s*(.+?)\s*=\s*(-?\d+(?:\.\d+)?)\s*", plan)
    parsed = evaluate_expression(m.group(1)) if m else None
    if parsed is None or len(parsed[1]) != 2 or abs(parsed[0] - float(m.group(2))) > 1e-6:
        return False
    rest = list(row["numbers"])
    for n in parsed[1]:
        if n not in rest:
            return False
        rest.remove(n)
    return _reachable([float(v) for v in rest] + [parsed[0]], float(row["target"]))


def countdown_follows(plan: str, completion: str) -> bool:
    """The completion's expression (as the reward reads it: rewards.countdown.extract_expression) performs the plan's
    operation: the plan's `a op b`, an operation on two numbers, is a subtree of the expression's syntax tree, with
    the operands in either order for + and *.

    >>> countdown_follows("9*2=18", "3+2*9"), countdown_follows("9*2=18", "9+2*3")
    (True, False)
    >>> countdown_follows("9+2=11", "3*9+2"), countdown_follows("9*2=18", "<answer>\\n9*2+3\\n</answer>")
    (False, True)
    """
    m = re.fullmatch(r"\s*(.+?)\s*=.*", plan, re.S)
    step = parse_expression(m.group(1)) if m else None
    op = step.body if step is not None else None
    if not isinstance(op, ast.BinOp) or None in (a := _operand(op.left), b := _operand(op.right)):
        return False  # not one operation on two numbers
    wanted = {(type(op.op), a, b)} | ({(type(op.op), b, a)} if isinstance(op.op, (ast.Add, ast.Mult)) else set())
    tree = parse_expression(extract_expression(completion))
    nodes = ast.walk(tree) if tree is not None else ()
    return any(isinstance(n, ast.BinOp) and (type(n.op), _operand(n.left), _operand(n.right)) in wanted for n in nodes)


def _operand(node) -> tuple | None:
    """A number operand (an integer under any unary signs) as (signs, value); None for a subexpression."""
    signs = []
    while isinstance(node, ast.UnaryOp):  # a loop, not recursion: a completion can nest thousands of signs
        signs.append(type(node.op).__name__)
        node = node.operand
    return (tuple(signs), node.value) if isinstance(node, ast.Constant) else None


PLANS = {
    "sudoku": TaskPlans(sudoku_oracle, sudoku_corrupt, sudoku_correct, hint_grid({}), sudoku_follows),
    "countdown": TaskPlans(countdown_oracle, countdown_corrupt, countdown_correct, "?", countdown_follows),
}
GENERIC = TaskPlans(None, shift_digits, None, "Think step by step.")


def task_plans(task: str) -> TaskPlans:
    """The plans of a task (GENERIC for tasks without an oracle plan)."""
    return PLANS.get(task, GENERIC)
