"""Any-process decoding (AP-MDM, arXiv 2510.06190) against fill-only decoding and fixed-rule remasking on the tiny
tasks, with the forwards each configuration spends: held-out greedy accuracy from `evaluate.evaluate_recipe` (the
task's verifier), and per held-out example the mean (and largest) number of model forwards its rollout took.

    python benchmarks/anyprocess.py                       # checkpoints where the recipes write them (outputs/...)
    python benchmarks/anyprocess.py --sudoku-edit DIR --sudoku-grpo DIR --countdown-edit DIR --countdown-grpo DIR
    python benchmarks/anyprocess.py --tasks sudoku --eval-size 400

Sudoku (recipes/tiny/sudoku-edit-sft.yaml's rollout: 20 tokens, top_prob order, 4 cells per forward, the main
job's setting): the shipped checkpoints/tiny/sudoku-sft-multi decoded fill-only (rollout.edit=none) and with the
fixed remasking rule (rollout.self_correction: committed cells whose probability fell below
rollout.correction_threshold are taken back), each in 5 forwards and in 7 (the same 20 cells spread over more
forwards); then its learned edit head after edit SFT (`--sudoku-edit`, the model unchanged) and after GRPO on that
head (`--sudoku-grpo`), with 0 or up to 2 review forwards beyond the 5 (rollout.edit_extra_steps), and in 7
planned forwards with edits on.

Countdown (recipes/tiny/countdown-edit-sft.yaml's rollout): an answer has 5-10 characters + EOS. Fill-only decoding
writes into a canvas of a length fixed in advance: the shipped checkpoints/tiny/countdown-sft pads a 12-slot canvas
with EOS; the edit-SFT model (trained with its head on canvases of the answer's own length) must be given a length
to fill, so it is decoded fill-only at several guesses, and any-process (rollout.edit=any) from a canvas of 8 slots
that its head grows and shrinks. Countdown rows also give the solve rate by the length of the reference answer.
`--sudoku-grpo` and `--countdown-grpo` take several run directories (one row each); rows whose checkpoint is
missing are skipped.

Prints markdown for benchmarks/RESULTS.md ("Any-process decoding").
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

from dllm_rl.config import load_recipe
from dllm_rl.evaluate import evaluate_recipe
from dllm_rl.models.load import load_model
from dllm_rl.policy import edit_head_for
from dllm_rl.rundir import resolve_model_dir
from dllm_rl.runtime import set_threads
from dllm_rl.tasks import load_task

ROOT = Path(__file__).resolve().parents[1]
SUDOKU_RECIPE = "recipes/tiny/sudoku-edit-sft.yaml"
COUNTDOWN_RECIPE = "recipes/tiny/countdown-edit-sft.yaml"
FILL = ["rollout.edit=none", "rollout.edit_extra_steps=0"]
FIXED = FILL + ["rollout.self_correction=true"]

# (configuration, checkpoint option, overrides of the task's recipe)
SUDOKU_ROWS = [
    ("fill-only, 5 steps", "sudoku_base", FILL),
    ("fill-only, 7 steps", "sudoku_base", FILL + ["rollout.steps=7"]),
    ("fixed-rule remasking, 5 steps", "sudoku_base", FIXED),
    ("fixed-rule remasking, 7 steps", "sudoku_base", FIXED + ["rollout.steps=7"]),
    ("edit head after edit SFT, 5 steps + 0 review", "sudoku_edit", ["rollout.edit_extra_steps=0"]),
    ("edit head after edit SFT, 5 steps + up to 2 review", "sudoku_edit", []),
    ("edit head after edit SFT, 7 steps + 0 review", "sudoku_edit", ["rollout.steps=7", "rollout.edit_extra_steps=0"]),
    ("edit head after edit SFT + GRPO, 5 steps + 0 review", "sudoku_grpo", ["rollout.edit_extra_steps=0"]),
    ("edit head after edit SFT + GRPO, 5 steps + up to 2 review", "sudoku_grpo", []),
    (
        "edit head after edit SFT + GRPO, 7 steps + 0 review",
        "sudoku_grpo",
        ["rollout.steps=7", "rollout.edit_extra_steps=0"],
    ),
]


def fill_canvas(length: int, steps: int | None = None) -> list[str]:
    """Fill-only decoding of a canvas of `length` slots in `steps` forwards (default: one token per forward)."""
    return FILL + [f"rollout.max_completion_length={length}", f"rollout.steps={steps or length}"]


COUNTDOWN_ROWS = [
    (
        "fill-only, 12-slot canvas padded with EOS (shipped sampler: low_confidence)",
        "countdown_base",
        fill_canvas(12) + ["rollout.order=low_confidence"],
    ),
    ("fill-only, 12-slot canvas padded with EOS", "countdown_base", fill_canvas(12)),
    ("fill-only, 12-slot canvas, 14 steps", "countdown_base", fill_canvas(12, 14)),
    ("fill-only, 8-slot canvas (a guessed length)", "countdown_base", fill_canvas(8)),
    ("fixed-rule remasking, 12-slot canvas", "countdown_base", fill_canvas(12) + ["rollout.self_correction=true"]),
    (
        "fixed-rule remasking, 12-slot canvas, 14 steps",
        "countdown_base",
        fill_canvas(12, 14) + ["rollout.self_correction=true"],
    ),
    *[
        (f"edit-SFT model fill-only, {n}-slot canvas (a guessed length)", "countdown_edit", fill_canvas(n))
        for n in (6, 8, 10, 12)
    ],
    ("any-process (remask/insert/delete) after edit SFT, from 8 slots", "countdown_edit", []),
    ("any-process after edit SFT + GRPO, from 8 slots", "countdown_grpo", []),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", choices=["sudoku", "countdown"], default=["sudoku", "countdown"])
    ap.add_argument("--sudoku-base", default="checkpoints/tiny/sudoku-sft-multi", help="fill-only model")
    ap.add_argument("--sudoku-edit", default="outputs/tiny-sudoku-edit-sft/final", help="edit SFT's output")
    ap.add_argument("--sudoku-grpo", nargs="*", default=["outputs/tiny-sudoku-edit-grpo/final"], help="GRPO runs")
    ap.add_argument("--countdown-base", default="checkpoints/tiny/countdown-sft", help="fill-only model")
    ap.add_argument("--countdown-edit", default="outputs/tiny-countdown-edit-sft/final", help="edit SFT's output")
    ap.add_argument("--countdown-grpo", nargs="*", default=["outputs/tiny-countdown-edit-grpo/final"], help="GRPO")
    ap.add_argument("--eval-size", type=int, default=200, help="held-out examples per task (the recipes' 200)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    set_threads(args.threads)

    print(
        "| task | configuration | checkpoint | forwards per example: mean (max) | held-out accuracy (n) | "
        "by answer length: 5-6 / 7 / 8-10 characters (n) | seconds |"
    )
    print("|---|---|---|---|---|---|---|")
    plan = {"sudoku": (SUDOKU_RECIPE, SUDOKU_ROWS), "countdown": (COUNTDOWN_RECIPE, COUNTDOWN_ROWS)}
    models, skipped = {}, []
    for name in args.tasks:
        recipe_path, rows = plan[name]
        size = [f"data.eval_size={args.eval_size}", f"eval.size={args.eval_size}"]
        task = load_task(load_recipe(ROOT / recipe_path, size).data)
        answer = [len(c) for c in task.eval["completion"]]
        for label, option, overrides in rows:
            given = getattr(args, option)
            for shown in [given] if isinstance(given, str) else given:
                path = str(ROOT / shown) if not Path(shown).is_absolute() and (ROOT / shown).exists() else shown
                if not Path(path).exists():
                    skipped.append(f"{name}: {label} (no checkpoint at {shown})")
                    continue
                recipe = load_recipe(ROOT / recipe_path, size + overrides)
                if path not in models:
                    models[path] = load_model(recipe.model, path=path)
                model, tok = models[path]
                head = edit_head_for(recipe.rollout, model, resolve_model_dir(path))
                t0 = time.perf_counter()
                res = evaluate_recipe(
                    model, tok, task, replace(recipe, model=replace(recipe.model, path=path)), edit_policy=head
                )
                print(
                    f"| {name} | {label} | `{shown}` | {res['forwards_per_sample']:.2f} "
                    f"({res['max_forwards_per_sample']}) | {res['accuracy']:.3f} ({res['n']}) | "
                    f"{by_length(res['scores'], answer)} | {time.perf_counter() - t0:.0f} |",
                    flush=True,
                )
    for line in skipped:
        print(f"\nskipped: {line}")


def by_length(scores: list[float], answer: list[int]) -> str:
    """Solve rates of the examples whose reference answer has 5-6, 7 and 8-10 characters (Countdown's lengths
    vary; Sudoku's grid has one length: "-")."""
    if len(set(answer)) == 1:
        return "-"
    cells = []
    for lo, hi in ((0, 6), (7, 7), (8, 99)):
        got = [s >= 1.0 for s, n in zip(scores, answer) if lo <= n <= hi]
        cells.append(f"{sum(got) / max(len(got), 1):.2f} ({len(got)})")
    return " / ".join(cells)


if __name__ == "__main__":
    main()
