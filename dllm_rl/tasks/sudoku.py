"""4x4 Sudoku from reasoning-gym's `mini_sudoku` generator.

Prompt: the grid as four lines of four characters, `_` for a blank (`12_4\n...`); target completion: the
solved grid in the same layout. Train and held-out puzzles come from disjoint sets of *solution grids*
(SPG re-split Sudoku by solution for the same reason: no leakage of a held-out solution through training).
Options (data.options): min_empty, max_empty (blanks per puzzle), eval_fraction, unique.
- unique: true (default; d1's and SPG's setting): reasoning-gym's puzzles, blanked only while the solution stays
  unique (so at most 12 blanks); `answer` is that solution.
- unique: false: the same solution grids with min_empty..max_empty cells blanked at random (up to 16), so a
  puzzle may have several solutions; the SFT target and `answer` are the grid it was cut from, one of them.
  The split is still by that grid, but another solution of a held-out puzzle can be a training grid.
  The `sudoku` reward accepts any valid grid that keeps the givens; `sudoku_cells` scores the blanks against
  the closest valid solution (on unique puzzles: d1's partial credit against the one solution). SFT on such
  data learns a mixture over solutions, which a sampler committing several cells per forward can mix into an
  invalid grid: the case where RL's mode-seeking adds what maximum likelihood cannot (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import random

import reasoning_gym

from ..config import DataConfig
from ..errors import ConfigError
from .base import Task, held_out, procedural_task, user_prompt

OPTIONS = {"min_empty": 8, "max_empty": 12, "eval_fraction": 0.2, "unique": True}


def grid_text(grid: list[list[int]]) -> str:
    return "\n".join("".join(str(v) if v else "_" for v in row) for row in grid)


def _rows(cfg: DataConfig, opts: dict, want_eval: bool, size: int, seed: int) -> list[dict]:
    # reasoning-gym items are generated lazily, item i from Random(seed + i): one long stream, cut at `size`
    lo, hi = opts["min_empty"], opts["max_empty"]
    if not 0 <= lo <= hi <= (12 if opts["unique"] else 16):
        raise ConfigError(
            f"data.options: sudoku needs 0 <= min_empty <= max_empty <= 12 with unique puzzles "
            f"(16 with unique: false); got min_empty={lo}, max_empty={hi}"
        )
    # with unique: false reasoning-gym still draws the solution grids (its blanks are then ignored)
    ds = reasoning_gym.create_dataset(
        "mini_sudoku", size=10**9, seed=seed, min_empty=min(lo, 12), max_empty=min(hi, 12)
    )
    rows = []
    for entry in ds:
        meta = entry["metadata"]
        solution = grid_text(meta["solution"])
        if held_out(solution, opts["eval_fraction"], "sudoku") != want_eval:
            continue
        if opts["unique"]:
            puzzle = grid_text(meta["puzzle"])
        else:
            rng = random.Random(f"{seed}-{len(rows)}-{want_eval}")
            blanks = set(rng.sample(range(16), rng.randint(lo, hi)))
            puzzle = grid_text(
                [[0 if 4 * r + c in blanks else v for c, v in enumerate(row)] for r, row in enumerate(meta["solution"])]
            )
        rows.append(
            {
                "prompt": user_prompt(puzzle, cfg.system_prompt),
                "completion": solution,
                "answer": solution,
                "puzzle": puzzle,
            }
        )
        if len(rows) == size:
            break
    return rows


def load(cfg: DataConfig) -> Task:
    return procedural_task("sudoku", cfg, OPTIONS, _rows)
