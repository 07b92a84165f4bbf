"""4x4 Sudoku from reasoning-gym's `mini_sudoku` generator.

Prompt: the grid as four lines of four characters, `_` for a blank (`12_4\n...`); target completion: the
solved grid in the same layout. Train and held-out puzzles come from disjoint sets of *solution grids*
(SPG re-split Sudoku by solution for the same reason: no leakage of a held-out solution through training).
Options (data.options): min_empty, max_empty (blanks per puzzle), eval_fraction (about that share of the 288 solution
grids is held out, picked by a hash of the grid: strictly between 0 and 1, and refused where it leaves either side
without a grid), unique.
- unique: true (default; d1's and SPG's setting): reasoning-gym's puzzles, blanked only while the solution stays
  unique (so at most 12 blanks); `answer` is that solution.
- unique: false: the same solution grids with min_empty..max_empty cells blanked at random (up to 16), so a
  puzzle may have several solutions; the SFT target and `answer` are the grid it was cut from, one of them.
  The split is still by that grid, but another solution of a held-out puzzle can be a training grid, so the
  same puzzle text can be cut from a training grid and from a held-out one: a held-out prompt can occur word for
  word among the training prompts (the grids, targets and `answer`s of the two sides stay disjoint).
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
from ..rewards.sudoku import all_grids
from .base import Task, check_eval_fraction, held_out, procedural_task, user_prompt

OPTIONS = {"min_empty": 8, "max_empty": 12, "eval_fraction": 0.2, "unique": True}


def grid_text(grid: list[list[int]]) -> str:
    return "\n".join("".join(str(v) if v else "_" for v in row) for row in grid)


def _grids_on_side(fraction: float, want_eval: bool) -> int:
    """How many of the 288 solution grids (reasoning-gym draws each alike) the split puts on one side."""
    grids = (grid_text([list(g[4 * r : 4 * r + 4]) for r in range(4)]) for g in all_grids())
    return sum(held_out(g, fraction, "sudoku") == want_eval for g in grids)


def _rows(cfg: DataConfig, opts: dict, want_eval: bool, size: int, seed: int) -> list[dict]:
    # reasoning-gym items are generated lazily, item i from Random(seed + i): one long stream, cut at `size`
    lo, hi = opts["min_empty"], opts["max_empty"]
    whole = all(isinstance(v, (int, float)) and not isinstance(v, bool) and float(v).is_integer() for v in (lo, hi))
    if not whole or isinstance(opts["unique"], str) or not 0 <= lo <= hi <= (12 if opts["unique"] else 16):
        raise ConfigError(
            f"data.options: sudoku needs whole numbers 0 <= min_empty <= max_empty <= 12 with unique puzzles "
            f"(16 with unique: false; unique is true or false, not a string); got min_empty={lo!r}, "
            f"max_empty={hi!r}, unique={opts['unique']!r}"
        )
    check_eval_fraction("sudoku", opts["eval_fraction"])
    side, fraction = ("held-out" if want_eval else "training"), opts["eval_fraction"]
    if not (grids := _grids_on_side(fraction, want_eval)):
        raise ConfigError(
            f"data.options.eval_fraction={fraction} leaves no 4x4 solution grid (of 288) on the {side} side; "
            f"{'raise' if want_eval else 'lower'} it (the default is {OPTIONS['eval_fraction']})"
        )
    budget = 2 * size * 288 // grids + 10_000  # draws: twice the expected number, and a margin
    # with unique: false reasoning-gym still draws the solution grids (its blanks are then ignored)
    ds = reasoning_gym.create_dataset(
        "mini_sudoku", size=10**9, seed=seed, min_empty=min(lo, 12), max_empty=min(hi, 12)
    )
    rows = []
    for i, entry in enumerate(ds):
        if i == budget:
            raise ConfigError(
                f"sudoku: {budget} draws gave {len(rows)} of {size} {side} puzzles ({grids} of the 288 grids are on "
                f"that side); {'raise' if want_eval else 'lower'} data.options.eval_fraction"
            )
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
