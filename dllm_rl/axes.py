"""The three axes of a hybrid AR planner -> diffusion executor, measured on a task's held-out set
(`dllm-rl eval RECIPE --checkpoint C --hybrid-axes`).

1. Interface-format brittleness: greedy accuracy (the executor decodes greedily; a real plan is the planner's
   sample at its own hybrid.planner.temperature) with no scaffold against a content-free scaffold (the same
   template, a plan without content): format damage = acc(content_free) - acc(none).
2. Planner-content trust: accuracy with the planner's real plan, the oracle plan, a plan for another problem
   and a corrupted plan; content gain = acc(real) - acc(content_free) (and oracle - content_free); how often
   the answer agrees with the plan (follow rate; over-trust = following a corrupted plan); the planner's own
   plan accuracy.
3. Sampling-diversity preservation: at the rollout temperature (1 when the recipe decodes greedily), k samples
   per question without and with the plan: pass@k (unbiased, arXiv 2107.03374) for k = 1, 2, 4 .. k, maj@k,
   distinct answers and answer entropy per question.

Intervals (evalstats): Wilson for greedy accuracies; for differences between conditions a paired bootstrap
over questions (the same questions under both); for sampled means a bootstrap over questions. Plan kinds
that need what the recipe does not have are left out (real needs hybrid.planner.path; oracle needs a task
with oracle plans, tasks.plans). Before/after a fine-tune: run it on both checkpoints.
"""

from __future__ import annotations

from dataclasses import replace

from .config import Recipe
from .evalstats import (
    answer_entropy,
    bootstrap_mean,
    distinct_answers,
    maj_at_k,
    paired_difference,
    pass_at_k,
    per_question,
    wilson,
)
from .evaluate import evaluate
from .tasks.plans import task_plans

KINDS = ["none", "content_free", "real", "oracle", "other_problem", "corrupted"]


def _mean(xs) -> float:
    return sum(xs) / max(len(xs), 1)


def hybrid_axes(model, tokenizer, task, recipe: Recipe, samples: int = 8, order_policy=None, planner=None) -> dict:
    """The three axes (module docstring) as plain data: {"greedy": {kind: row}, "differences": [...],
    "diversity": {kind: row}, "n": questions, "samples": k, "task": name}; the planner's own accuracy, when
    there is a planner, is greedy["real"]["plan_accuracy"]."""
    from .models.ar import load_planner

    h = recipe.hybrid
    if planner is None and h.planner.path:
        planner = load_planner(h.planner, seed=recipe.train.seed, device=model.device)
    plans = task_plans(task.name)
    kinds = [k for k in KINDS if (k != "real" or planner is not None) and (k != "oracle" or plans.oracle)]
    data = task.eval.select(range(min(recipe.eval.size or len(task.eval), len(task.eval))))
    rows = data.to_list()

    def run(kind: str, temperature: float, n: int) -> dict:
        rollout = replace(recipe.rollout, temperature=temperature)
        return evaluate(
            model,
            tokenizer,
            data,
            task.reward,
            rollout,
            seed=recipe.train.seed,
            num_samples=n,
            order_policy=order_policy,
            task_name=task.name,
            hybrid=replace(h, plan=kind),
            planner=planner,
        )

    greedy, per_q = {}, {}
    for kind in kinds:
        out = run(kind, recipe.eval.temperature, 1)
        solved = [float(s >= 1.0) for s in out["scores"]]
        per_q[kind] = solved
        row = {"accuracy": _mean(solved), "ci": wilson(sum(solved), len(solved))}
        if plans.follows is not None and kind != "none":
            row["follows"] = _mean([plans.follows(p, c) for p, c in zip(out["plans"], out["completions"])])
        if kind == "real" and plans.correct is not None:
            row["plan_accuracy"] = _mean([plans.correct(r, p) for r, p in zip(rows, out["plans"])])
        greedy[kind] = row
    pairs = [("content_free", "none", "format damage")]
    pairs += [(k, "content_free", f"content: {k}") for k in ("real", "oracle", "other_problem", "corrupted")]
    pairs += [("real", "none", "real plan vs no scaffold")]
    differences = [
        (label, *paired_difference(per_q[a], per_q[b])) for a, b, label in pairs if a in per_q and b in per_q
    ]

    temperature = recipe.rollout.temperature if recipe.rollout.temperature > 0 else 1.0
    diversity = {}
    for kind in ["none", "real" if "real" in kinds else "oracle" if "oracle" in kinds else "content_free"]:
        out = run(kind, temperature, samples)
        answers, scores = per_question(out["answers"], samples), per_question(out["scores"], samples)
        correct = [[float(s >= 1.0) for s in q] for q in scores]
        row = {"temperature": temperature}
        k = 1
        while k <= samples:
            values = [pass_at_k(samples, int(sum(c)), k) for c in correct]
            row[f"pass@{k}"] = (_mean(values), bootstrap_mean(values))
            k *= 2
        votes = [maj_at_k(a, c, samples) for a, c in zip(answers, correct)]  # a vote counts if it solves, as pass@k
        row[f"maj@{samples}"] = (_mean(votes), bootstrap_mean(votes))
        row["distinct"] = _mean([distinct_answers(a) for a in answers])
        row["entropy"] = _mean([answer_entropy(a) for a in answers])
        diversity[kind] = row
    return {
        "greedy": greedy,
        "differences": differences,
        "diversity": diversity,
        "n": len(rows),
        "samples": samples,
        "task": task.name,
    }


def print_axes(result: dict) -> None:
    """The axes as markdown tables."""
    n, k = result["n"], result["samples"]
    print(f"### Axes 1-2: greedy accuracy under each plan ({result['task']}, {n} held-out questions; 95% Wilson)\n")
    print("| plan | accuracy | 95% CI | answer follows the plan | plan right |")
    print("|---|---|---|---|---|")
    for kind, row in result["greedy"].items():
        lo, hi = row["ci"]
        follows = f"{row['follows']:.3f}" if "follows" in row else ""
        right = f"{row['plan_accuracy']:.3f}" if "plan_accuracy" in row else ""
        print(f"| {kind} | {row['accuracy']:.3f} | [{lo:.3f}, {hi:.3f}] | {follows} | {right} |")
    print("\n| difference (paired over questions) | points | 95% CI (paired bootstrap) |\n|---|---|---|")
    for label, d, lo, hi in result["differences"]:
        print(f"| {label} | {100 * d:+.1f} | [{100 * lo:+.1f}, {100 * hi:+.1f}] |")
    print(f"\n### Axis 3: diversity, {k} samples per question (bootstrap 95% CI over questions)\n")
    for kind, row in result["diversity"].items():
        cols = [c for c in row if c.startswith(("pass@", "maj@"))]
        if kind == next(iter(result["diversity"])):
            print("| plan | T | " + " | ".join(cols) + " | distinct answers | answer entropy |")
            print("|---|---|" + "---|" * (len(cols) + 2))
        cells = [f"{row[c][0]:.3f} [{row[c][1][0]:.3f}, {row[c][1][1]:.3f}]" for c in cols]
        print(
            f"| {kind} | {row['temperature']:g} | "
            + " | ".join(cells)
            + f" | {row['distinct']:.2f} | {row['entropy']:.2f} |"
        )
