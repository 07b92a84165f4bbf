"""The hybrid rollout: an autoregressive planner writes a plan, a template places it in the diffusion
executor's prompt, and the executor decodes with the normal engine (`generate`).

"Think First, Diffuse Fast" (arXiv 2603.13243) prepends an AR model's plan to a diffusion LM's prompt;
whether that helps is disputed, and the analysis behind this module separates three axes: the damage of a
plan-shaped scaffold whatever its content (interface-format brittleness), how much the executor uses the
content (planner-content trust), and what fine-tuning does to the spread of samples (diversity; evaluated
by axes.py). So what goes in the prompt is one recipe value, `hybrid.plan` (PLAN_KINDS):

    none            the task's prompt unchanged (byte-identical to a plain rollout)
    content_free    the template with a content-free plan (hybrid.content_free, else the task's: tasks.plans)
    real            the planner's plan for this prompt (models.ar; sampled, with its token log-probs)
    oracle          the plan written from the row's reference solution (tasks.plans)
    other_problem   the plan (the planner's, else the oracle's) of another problem: row["other"] when the caller
                    sets it (axes.py: the next held-out example), else the next distinct prompt of the batch
    corrupted       the plan (the planner's, else the oracle's) in the same format with wrong content

`hybrid.template` (e.g. "Plan: {plan}\\n{question}") becomes the last user message; the reward and verifier
still see the original prompt (the caller keeps it: trainers/grpo.py, evaluate.py). The returned
RolloutBatch is the executor's (its prompt_ids are what it saw, its trace every decision) and carries the
plans in `batch.plan` (batches.PlanBatch: texts, the planner's tokens and exact log-probs, the executor's
prompts). A plan that leaves the executor no room for its completion (a planner sampling at temperature 1 may
write past its usual length) is cut to the longest prefix that fits the executor's context; its log-probs stay
those of what the planner sampled (the cut belongs to the environment), and `batch.stats["plans_cut"]` counts
the cut plans. Randomness: one draw from the caller's generator seeds the plans, the next the executor (plan=none
draws nothing for plans: the rollout is then exactly `generate`'s); both are counter-based, so the rollout
is batch-invariant.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ..batches import PlanBatch, RolloutBatch
from ..config import HybridConfig, RolloutConfig
from ..errors import ConfigError, lookup
from ..models.base import unwrap
from ..tasks.plans import TaskPlans, task_plans
from .engine import encode_prompts, generate


@dataclass
class PlanContext:
    """What a plan kind may read: the batch's prompts and dataset rows, the planner and the task's plans."""

    prompts: list
    rows: list[dict]
    planner: object | None  # models.ar.ARPlanner
    plans: TaskPlans
    cfg: HybridConfig
    generator: torch.Generator

    def planned(self, prompts) -> PlanBatch:
        return self.planner.sample(prompts, self.generator)

    def source_texts(self, rows, prompts) -> list[str]:
        """The plans a derived kind starts from: the planner's for `prompts`, else the oracle's for `rows`."""
        if self.planner is not None:
            return self.planned(prompts).texts
        if self.plans.oracle is None:
            raise ConfigError(
                f"hybrid.plan={self.cfg.plan} needs a planner (hybrid.planner.path) on a task without oracle plans"
            )
        return [self.plans.oracle(r) for r in rows]


def plans_from_texts(texts: list[str], kind: str) -> PlanBatch:
    """A PlanBatch of plans that were not sampled by the planner (nothing to train: plan_mask 0): what a plan
    kind of your own returns (examples/hybrid_planner.py)."""
    n = len(texts)
    empty = torch.zeros(n, 0, dtype=torch.long)
    return PlanBatch(empty, empty, empty, empty, torch.zeros(n, 0), list(texts), kind)


def with_next_problems(rows: list[dict]) -> list[dict]:
    """Each row with `other`: the row of the next distinct prompt of the list (cyclically; a prompt repeated
    stands for its first row), the problem whose plan an other_problem plan is. GRPO attaches it over the
    global batch before each process takes its share, so that processes plan as one process would."""
    prompts = [repr(r["prompt"]) for r in rows]
    keys = list(dict.fromkeys(prompts))  # distinct prompts, in order
    if len(keys) < 2:
        raise ConfigError("hybrid.plan=other_problem needs at least two distinct prompts in a batch")
    first = {k: i for i, k in reversed(list(enumerate(prompts)))}
    after = {k: rows[first[keys[(i + 1) % len(keys)]]] for i, k in enumerate(keys)}
    return [{**r, "other": after[p]} for r, p in zip(rows, prompts)]


def _other(ctx: PlanContext) -> tuple[list[dict], list]:
    """Rows and prompts of another problem for each row: the rows' own `other`, else the next distinct prompt
    of the batch (with_next_problems)."""
    if all("other" in r for r in ctx.rows):
        others = [r["other"] for r in ctx.rows]
    else:
        others = [r["other"] for r in with_next_problems([{**r, "prompt": p} for r, p in zip(ctx.rows, ctx.prompts)])]
    return others, [o["prompt"] for o in others]


def _content_free(ctx: PlanContext) -> PlanBatch:
    text = ctx.cfg.content_free if ctx.cfg.content_free is not None else ctx.plans.content_free
    return plans_from_texts([text] * len(ctx.prompts), "content_free")


def _real(ctx: PlanContext) -> PlanBatch:
    if ctx.planner is None:
        raise ConfigError("hybrid.plan=real needs a planner: set hybrid.planner.path (a causal LM)")
    return ctx.planned(ctx.prompts)


def _oracle(ctx: PlanContext) -> PlanBatch:
    if ctx.plans.oracle is None:
        raise ConfigError("hybrid.plan=oracle: this task has no oracle plans (tasks.plans.PLANS)")
    return plans_from_texts([ctx.plans.oracle(r) for r in ctx.rows], "oracle")


def _other_problem(ctx: PlanContext) -> PlanBatch:
    rows, prompts = _other(ctx)
    return plans_from_texts(ctx.source_texts(rows, prompts), "other_problem")


def _corrupted(ctx: PlanContext) -> PlanBatch:
    return plans_from_texts([ctx.plans.corrupt(t) for t in ctx.source_texts(ctx.rows, ctx.prompts)], "corrupted")


PLAN_KINDS: dict[str, Callable[[PlanContext], PlanBatch] | None] = {
    "none": None,
    "content_free": _content_free,
    "real": _real,
    "oracle": _oracle,
    "other_problem": _other_problem,
    "corrupted": _corrupted,
}


def plan_kind(name: str):
    """The plan kind's function (None for none); a bad name lists the valid ones."""
    return lookup(PLAN_KINDS, name, "hybrid.plan")


def place(prompt, plan: str, template: str):
    """The executor's prompt: the prompt's last user message (or the text) rendered through the template, both
    fields in one pass (a plan or question that contains "{question}" is left as it is).

    >>> place([{"role": "user", "content": "1___"}], "4___", "Plan: {plan}\\n{question}")
    [{'role': 'user', 'content': 'Plan: 4___\\n1___'}]
    >>> place("What is 2+2?", "use {question} twice", "Plan: {plan} / {question}")
    'Plan: use {question} twice / What is 2+2?'
    """
    if "{plan}" not in template or "{question}" not in template:
        raise ConfigError(f"hybrid.template {template!r} must contain {{plan}} and {{question}}")
    render = lambda q: re.sub(r"\{(plan|question)\}", lambda m: plan if m.group(1) == "plan" else q, template)
    if isinstance(prompt, str):
        return render(prompt)
    users = [i for i, m in enumerate(prompt) if isinstance(m, dict) and m.get("role") == "user"]
    if not users:
        raise ConfigError(
            f"hybrid.plan places a plan in a prompt's text or its last user message; got {str(prompt)[:80]!r} "
            f"(token ids, or messages without a user turn): give prompts as text or chat messages with a user turn"
        )
    messages = [dict(m) for m in prompt]
    messages[users[-1]]["content"] = render(messages[users[-1]]["content"])
    return messages


def make_plans(prompts, rows, cfg: HybridConfig, planner, task: str, generator) -> tuple[PlanBatch | None, list]:
    """(plans or None for plan=none, the executor's prompts). Draws once from `generator` unless plan=none."""
    fn = plan_kind(cfg.plan)
    if fn is None:
        return None, list(prompts)
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    ctx = PlanContext(list(prompts), list(rows), planner, task_plans(task), cfg, torch.Generator().manual_seed(seed))
    plans = fn(ctx)
    return plans, [place(p, t, cfg.template) for p, t in zip(prompts, plans.texts)]


def hybrid_generate(
    model,
    tokenizer,
    prompts,
    rows,
    rollout: RolloutConfig,
    cfg: HybridConfig,
    planner=None,
    task: str = "",
    generator: torch.Generator | None = None,
    order_policy=None,
) -> RolloutBatch:
    """Plan, place, decode (module docstring). rows: the dataset rows of the prompts (oracle, corrupted and
    other-problem plans read them). Returns the executor's RolloutBatch with `.plan` set (plan=none: an
    empty PlanBatch) and `.plan.executor_prompts` the prompts it decoded."""
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    plans, executor_prompts = make_plans(prompts, rows, cfg, planner, task, generator)
    cut = 0
    max_pos = getattr(unwrap(model).config, "max_position_embeddings", None)
    if plans is not None and max_pos:
        executor_prompts, cut = fit_plans(
            tokenizer, prompts, plans.texts, cfg.template, max_pos - rollout.max_completion_length
        )
    batch = generate(model, tokenizer, executor_prompts, rollout, generator=generator, order_policy=order_policy)
    batch.plan = plans if plans is not None else plans_from_texts([""] * len(prompts), "none")
    batch.plan.executor_prompts = executor_prompts
    batch.stats["plans_cut"] = cut
    return batch


def fit_plans(tokenizer, prompts, texts: list[str], template: str, room: int) -> tuple[list, int]:
    """(the executor's prompts with each plan cut to the longest prefix whose prompt fits in `room` tokens, how
    many were cut). A prompt too long even with an empty plan is left for the engine to refuse."""
    length = lambda p, t: len(encode_prompts(tokenizer, [place(p, t, template)])[0])
    out, cut = [], 0
    for prompt, text in zip(prompts, texts):
        if length(prompt, text) > room and length(prompt, "") <= room:
            lo, hi = 0, len(text)  # the longest prefix that fits: lo fits, hi does not
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (mid, hi) if length(prompt, text[:mid]) <= room else (lo, mid)
            text, cut = text[:lo], cut + 1
        out.append(place(prompt, text, template))
    return out, cut


def scaffold_rows(rows: list[dict], cfg: HybridConfig, task: str, planner=None, seed: int = 0) -> list[dict]:
    """Training rows whose prompts are rendered with the kinds of hybrid.sft_plans in turn (row i gets kind
    i mod k), the targets unchanged: the data of a prefix-robustness fine-tune. Kinds that need a planner
    (real; other_problem and corrupted when it is given) sample it with its own settings."""
    kinds = cfg.sft_plans
    out = [dict(r) for r in rows]
    g = torch.Generator().manual_seed(seed)
    for j, kind in enumerate(kinds):
        idx = list(range(j, len(rows), len(kinds)))
        if not idx or kind == "none":
            continue
        part = [rows[i] for i in idx]
        sub = HybridConfig(**{**cfg.__dict__, "plan": kind})
        for start in range(0, len(part), 256):
            chunk = part[start : start + 256]
            _, placed = make_plans([r["prompt"] for r in chunk], chunk, sub, planner, task, g)
            for i, p in zip(idx[start : start + 256], placed):
                out[i]["prompt"] = p
    return out


def scaffold_dataset(dataset, cfg: HybridConfig, task: str, seed: int = 0):
    """scaffold_rows over a datasets.Dataset (the planner of cfg.planner is loaded when one is named)."""
    import datasets

    from ..models.ar import load_planner

    needed = cfg.planner.path and any(k in ("real", "other_problem", "corrupted") for k in cfg.sft_plans)
    planner = load_planner(cfg.planner, seed=seed) if needed else None
    return datasets.Dataset.from_list(scaffold_rows(dataset.to_list(), cfg, task, planner, seed))
