"""4x4 Sudoku from reasoning-gym's `mini_sudoku` generator (unique-solution puzzles).

Prompt: the grid as four lines of four characters, `_` for a blank (`12_4\n...`); target completion: the
solved grid in the same layout. Train and held-out puzzles come from disjoint sets of *solution grids*
(SPG re-split Sudoku by solution for the same reason: no leakage of a held-out solution through training).
Options (data.options): min_empty, max_empty (blanks per puzzle, reasoning-gym's knobs), eval_fraction.
"""

from __future__ import annotations

import reasoning_gym

from ..config import DataConfig
from .base import Task, held_out, procedural_task, user_prompt

OPTIONS = {"min_empty": 8, "max_empty": 12, "eval_fraction": 0.2}


def grid_text(grid: list[list[int]]) -> str:
    return "\n".join("".join(str(v) if v else "_" for v in row) for row in grid)


def _rows(cfg: DataConfig, opts: dict, want_eval: bool, size: int, seed: int) -> list[dict]:
    # reasoning-gym items are generated lazily, item i from Random(seed + i): one long stream, cut at `size`
    ds = reasoning_gym.create_dataset("mini_sudoku", size=10**9, seed=seed,
                                      min_empty=opts["min_empty"], max_empty=opts["max_empty"])
    rows = []
    for entry in ds:
        meta = entry["metadata"]
        solution = grid_text(meta["solution"])
        if held_out(solution, opts["eval_fraction"], "sudoku") != want_eval:
            continue
        puzzle = grid_text(meta["puzzle"])
        rows.append({"prompt": user_prompt(puzzle, cfg.system_prompt), "completion": solution,
                     "answer": solution, "puzzle": puzzle})
        if len(rows) == size:
            break
    return rows


def load(cfg: DataConfig) -> Task:
    return procedural_task("sudoku", cfg, OPTIONS, _rows)
