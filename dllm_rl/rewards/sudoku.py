"""4x4 Sudoku reward: 1.0 when the completion is a valid solution that keeps every given digit."""

from __future__ import annotations

import functools
import re

from ._text import completion_text


def parse_grid(text: str) -> list[int] | None:
    """The first 16 digits of `text` (any digit 0-9: a grid holding others is simply not a solution), or None if
    there are fewer.

    >>> parse_grid("1234\\n3412\\n2143\\n4321")[:5]
    [1, 2, 3, 4, 3]
    >>> parse_grid("12") is None
    True
    """
    digits = [int(c) for c in re.findall(r"[0-9]", text)]
    return digits[:16] if len(digits) >= 16 else None


def is_valid_solution(grid: list[int], puzzle: str) -> bool:
    """Rows, columns and 2x2 boxes hold 1-4 once each, and the puzzle's givens (its digits 1-4) are kept; any
    other character is a blank (`_`, or d1's `0`).

    >>> is_valid_solution([1,2,3,4, 3,4,1,2, 2,1,4,3, 4,3,2,1], "12__\\n____\\n____\\n___1")
    True
    >>> is_valid_solution([1,2,3,4, 3,4,1,2, 2,1,4,3, 4,3,1,2], "________________")
    False
    >>> is_valid_solution([1,2,3,4, 3,4,1,2, 2,1,4,3, 4,3,2,1], "1200\\n0000\\n0000\\n0001")  # d1 writes 0 for blanks
    True
    """
    cells = [c for c in puzzle if c not in "\n "]
    if len(grid) != 16 or len(cells) != 16:
        return False
    if any(c in "1234" and int(c) != g for c, g in zip(cells, grid)):
        return False
    groups = [[4 * r + c for c in range(4)] for r in range(4)]
    groups += [[4 * r + c for r in range(4)] for c in range(4)]
    groups += [[4 * (br + r) + bc + c for r in range(2) for c in range(2)] for br in (0, 2) for bc in (0, 2)]
    return all(sorted(grid[i] for i in g) == [1, 2, 3, 4] for g in groups)


@functools.lru_cache(maxsize=1)
def all_grids() -> tuple[tuple[int, ...], ...]:
    """The 288 valid 4x4 Sudoku grids, filled cell by cell (small enough to enumerate once)."""
    grids, grid = [], []

    def fill():
        i = len(grid)
        if i == 16:
            grids.append(tuple(grid))
            return
        r, c = divmod(i, 4)
        box = {4 * rr + cc for rr in range(r // 2 * 2, r // 2 * 2 + 2) for cc in range(c // 2 * 2, c // 2 * 2 + 2)}
        seen = {grid[j] for j in range(i) if j // 4 == r or j % 4 == c or j in box}
        for v in range(1, 5):
            if v not in seen:
                grid.append(v)
                fill()
                grid.pop()

    fill()
    return tuple(grids)


@functools.lru_cache(maxsize=65536)
def solutions(puzzle: str) -> tuple[tuple[int, ...], ...]:
    """Every valid grid that keeps the puzzle's givens.

    >>> len(solutions("1234\\n3412\\n2143\\n43__")), len(solutions("_" * 16))
    (1, 288)
    """
    return tuple(grid for grid in all_grids() if is_valid_solution(list(grid), puzzle))


def count_solutions(puzzle: str) -> int:
    """How many valid grids keep the puzzle's givens.

    >>> count_solutions("1234\\n3412\\n2143\\n43__"), count_solutions("_" * 16)
    (1, 288)
    """
    return len(solutions(puzzle))


def sudoku_reward(prompts, completions, puzzle, **kwargs) -> list[float]:
    """TRL-signature reward for the `sudoku` task (`puzzle` is a dataset column).

    >>> sudoku_reward(["p", "p"], ["1234\\n3412\\n2143\\n4321", "1111\\n1111\\n1111\\n1111"],
    ...               puzzle=["1___\\n____\\n____\\n____"] * 2)
    [1.0, 0.0]
    """
    out = []
    for completion, given in zip(completions, puzzle):
        grid = parse_grid(completion_text(completion))
        out.append(float(grid is not None and is_valid_solution(grid, given)))
    return out


def sudoku_cells_reward(prompts, completions, puzzle, **kwargs) -> list[float]:
    """Partial credit: the fraction of the puzzle's blank cells filled with the digit of the closest valid
    solution. With a unique solution (reasoning-gym's puzzles) that is how d1 and SPG score Sudoku; with several
    (data.options unique: false) any valid grid scores 1 and the others are scored against the solution they are
    nearest to, instead of against the one grid the puzzle was cut from.

    >>> sudoku_cells_reward(["p", "p"], ["1234\\n3412\\n2143\\n4321", "1234\\n3412\\n2143\\n4312"],
    ...                     puzzle=["1234\\n3412\\n2143\\n43__"] * 2)
    [1.0, 0.0]
    >>> sudoku_cells_reward(["p", "p"], ["1234\\n3412\\n2143\\n4321", "1234\\n3412\\n2143\\n4312"],
    ...                     puzzle=["1___\\n____\\n____\\n____"] * 2)   # 2 of 15 blanks off every solution
    [1.0, 0.8666666666666667]
    """
    out = []
    for completion, given in zip(completions, puzzle):
        grid = parse_grid(completion_text(completion)) or []
        blanks = [i for i, c in enumerate(c for c in given if c not in "\n ") if c not in "1234"]
        if not blanks:
            out.append(float(any(list(s) == grid for s in solutions(given))))
            continue
        hits = max((sum(1 for i in blanks if i < len(grid) and grid[i] == s[i]) for s in solutions(given)), default=0)
        out.append(hits / len(blanks))
    return out
