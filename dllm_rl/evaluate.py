"""Held-out accuracy: decode the task's held-out prompts with the rollout engine and score them with the
task's verifier (a reward function; a score of 1.0 = solved). The accuracy is the share of solved samples; a
verifier with partial credit (code: the share of tests passed) also gets its mean score, `mean_score`.

With several samples per prompt (eval.num_samples = n > 1) it also reports pass@n and majority-vote
accuracy maj@n (evalstats: the samples' answers vote, tasks.answers normalises them); eval.majority makes
maj@n the reported accuracy. With a hybrid recipe (hybrid.plan other than none) each prompt is decoded after
the planner's (or another kind of) plan is placed in it (rollout.hybrid); the verifier sees the original
prompt.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .config import HybridConfig, Recipe, RolloutConfig
from .errors import ConfigError
from .evalstats import maj_at_k, per_question
from .rewards.plugins import Reward, compute_rewards, resolve_reward
from .rollout import generate
from .rollout.hybrid import hybrid_generate
from .tasks.answers import answer_key


def with_other_problems(rows: list[dict]) -> list[dict]:
    """Each row with `other`: the next row of the list (cyclically), the problem whose plan an
    other_problem plan is (rollout.hybrid); fixed by the dataset, not by how it is batched."""
    return [{**r, "other": rows[(i + 1) % len(rows)]} for i, r in enumerate(rows)]


def evaluate(
    model,
    tokenizer,
    dataset,
    reward_name: str | list[Reward],
    rollout: RolloutConfig,
    seed: int = 0,
    num_samples: int = 1,
    batch_size: int | None = None,
    order_policy=None,
    task_name: str | None = None,
    hybrid: HybridConfig | None = None,
    planner=None,
    majority: bool = False,
    edit_policy=None,
    trainer_state=None,
) -> dict:
    """Held-out accuracy over `dataset` (rows with `prompt` + reward columns), num_samples per prompt: the share
    of samples the verifier solves (score >= 1.0), and `mean_score`, the mean score (higher where the verifier
    gives partial credit). reward_name: the verifier's name, or a list of Rewards whose weighted sum scores instead
    (a task without a verifier: nothing counts as solved, so accuracy and maj@n then average the weighted reward,
    the held-out reward GRPO reports). An empty `dataset` is refused (ConfigError). order_policy: the learned
    order head, for rollout.order=policy. hybrid / planner: decode with plans (rollout.hybrid) when hybrid.plan is
    not none. majority: accuracy = maj@num_samples. edit_policy: the edit head, for rollout.edit (any-process
    decoding; not with plans). trainer_state: what the rewards get as `trainer_state` (TRL passes its state in
    evaluation too; None outside training)."""
    verified = not isinstance(reward_name, list)  # scored by a verifier, whose 1.0 = solved
    verifier = [Reward(reward_name, resolve_reward(reward_name))] if verified else reward_name
    batch_size = batch_size or rollout.batch_size
    to_answer = answer_key(task_name or (reward_name if isinstance(reward_name, str) else ""))
    g = torch.Generator().manual_seed(seed)
    scores, answers, examples, forwards, completions, plans, row_forwards = [], [], [], 0, [], [], []
    rows = dataset.to_list()
    if not rows:
        raise ConfigError(
            "the held-out set is empty: there is nothing to decode and score; give it examples (data.eval_size, "
            "eval.size, or a non-empty data.eval_path / data.eval_split), or leave evaluation out"
        )
    planned = hybrid is not None and hybrid.plan != "none"
    if planned:
        rows = with_other_problems(rows)
    for start in range(0, len(rows), batch_size):
        chunk = [r for r in rows[start : start + batch_size] for _ in range(num_samples)]
        prompts = [r["prompt"] for r in chunk]
        if planned:
            if edit_policy is not None:
                raise ConfigError("hybrid.plan with rollout.edit: plans and edit heads do not combine yet; drop one")
            out = hybrid_generate(
                model, tokenizer, prompts, chunk, rollout, hybrid, planner, task_name or "", g, order_policy
            )
        else:
            out = generate(
                model, tokenizer, prompts, rollout, generator=g, order_policy=order_policy, edit_policy=edit_policy
            )
        forwards += out.stats["forwards"]
        row_forwards += out.trace.num_steps.tolist()  # a row's steps are its forwards (batches.Trace)
        columns = {k: [r[k] for r in chunk] for k in chunk[0] if k != "other"}
        ids = [row[m.bool()].tolist() for row, m in zip(out.completion_ids.cpu(), out.completion_mask.cpu())]
        values, _ = compute_rewards(verifier, prompts, out.completions, ids, columns, trainer_state)
        values = values.nan_to_num(nan=0.0)  # a completion the verifier cannot score is not solved
        scores += values.tolist()
        answers += [to_answer(c) for c in out.completions]
        completions += out.completions
        plans += out.plan.texts if planned else [""] * len(prompts)
        shown = out.plan.executor_prompts if planned else prompts
        examples += list(zip(shown, out.completions, values.tolist()))[: max(0, 4 - len(examples))]
    # what a sample counts for: solved or not (a verifier's score >= 1.0), or its weighted reward without a verifier
    credit = [float(s >= 1.0) for s in scores] if verified else scores
    result = {
        "accuracy": sum(credit) / len(credit),
        "mean_score": sum(scores) / len(scores),  # the accuracy unless a verifier gives partial credit
        "n": len(scores),
        "examples": examples,
        "scores": scores,  # each sample's score, num_samples consecutive ones per prompt
        "answers": answers,  # normalised final answers (tasks.answers), None when unreadable
        "completions": completions,
        "plans": plans,  # the plan placed in each sample's prompt ("" without one)
        "forwards": forwards,  # denoising forwards of the whole evaluation (batched)
        "forwards_per_sample": sum(row_forwards) / max(len(row_forwards), 1),  # mean forwards each row took
        "max_forwards_per_sample": max(row_forwards, default=0),
    }
    if num_samples > 1:
        # pass@n: share of prompts with at least one solved sample (score 1.0 = solved). A prompt no sample
        # solves gives GRPO with groups of n no solve signal, so with sampling, pass@n minus the greedy accuracy
        # roughly measures what sharpening the policy on its own samples can add (benchmarks/RESULTS.md)
        per_prompt = torch.tensor(scores).view(-1, num_samples)
        result[f"pass@{num_samples}"] = (per_prompt >= 1.0).any(-1).float().mean().item()
        votes = [
            maj_at_k(a, s, num_samples)
            for a, s in zip(per_question(answers, num_samples), per_question(credit, num_samples))
        ]
        result[f"maj@{num_samples}"] = sum(votes) / len(votes)
        if majority:
            result["accuracy"] = result[f"maj@{num_samples}"]
    return result


def evaluate_recipe(
    model,
    tokenizer,
    task,
    recipe: Recipe,
    order_policy=None,
    rewards=None,
    planner=None,
    edit_policy=None,
    trainer_state=None,
) -> dict:
    """Held-out accuracy as a recipe defines it: eval.size prompts, eval.num_samples each, decoded with the
    recipe's rollout section at eval.temperature (and eval.order_temperature, eval.edit_temperature when set),
    after the recipe's plan (hybrid.plan; `planner` for real plans) when it has one; eval.majority: majority-vote
    accuracy. A task without a verifier is scored by `rewards` (a list of Rewards: their weighted sum), which get
    `trainer_state` (the trainer's state during training)."""
    e = recipe.eval
    data = task.eval.select(range(min(e.size or len(task.eval), len(task.eval))))
    rollout = replace(recipe.rollout, temperature=e.temperature)
    if e.order_temperature is not None:
        rollout = replace(rollout, order_temperature=e.order_temperature)
    if e.edit_temperature is not None:
        rollout = replace(rollout, edit_temperature=e.edit_temperature)
    return evaluate(
        model,
        tokenizer,
        data,
        task.reward if task.reward is not None else rewards,
        rollout,
        seed=recipe.train.seed,
        num_samples=e.num_samples,
        order_policy=order_policy,
        task_name=task.name,
        hybrid=recipe.hybrid,
        planner=planner,
        majority=e.majority,
        edit_policy=edit_policy,
        trainer_state=trainer_state,
    )
