"""Held-out accuracy: decode the task's held-out prompts with the rollout engine and score them with the
task's verifier (a reward function; 1.0 = solved)."""

from __future__ import annotations

from dataclasses import replace

import torch

from .config import Recipe, RolloutConfig
from .rewards.plugins import Reward, compute_rewards, resolve_reward
from .rollout import generate


def evaluate(
    model,
    tokenizer,
    dataset,
    reward_name: str,
    rollout: RolloutConfig,
    seed: int = 0,
    num_samples: int = 1,
    batch_size: int | None = None,
    order_policy=None,
    edit_policy=None,
) -> dict:
    """Mean verifier score over `dataset` (rows with `prompt` + reward columns), num_samples per prompt.
    order_policy: the learned order head, for rollout.order=policy; edit_policy: the edit head, for rollout.edit."""
    verifier = [Reward(reward_name, resolve_reward(reward_name))]
    batch_size = batch_size or rollout.batch_size
    g = torch.Generator().manual_seed(seed)
    scores, examples, forwards, row_forwards = [], [], 0, []
    rows = dataset.to_list()
    for start in range(0, len(rows), batch_size):
        chunk = [r for r in rows[start : start + batch_size] for _ in range(num_samples)]
        prompts = [r["prompt"] for r in chunk]
        out = generate(
            model, tokenizer, prompts, rollout, generator=g, order_policy=order_policy, edit_policy=edit_policy
        )
        forwards += out.stats["forwards"]
        row_forwards += out.trace.num_steps.tolist()  # a row's steps are its forwards (batches.Trace)
        columns = {k: [r[k] for r in chunk] for k in chunk[0]}
        ids = [row[m.bool()].tolist() for row, m in zip(out.completion_ids.cpu(), out.completion_mask.cpu())]
        values, _ = compute_rewards(verifier, prompts, out.completions, ids, columns)
        scores += values.tolist()
        examples += list(zip(prompts, out.completions, values.tolist()))[: max(0, 4 - len(examples))]
    result = {
        "accuracy": sum(scores) / max(len(scores), 1),
        "n": len(scores),
        "examples": examples,
        "scores": scores,  # per sample, num_samples consecutive ones per prompt
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
    return result


def evaluate_recipe(model, tokenizer, task, recipe: Recipe, order_policy=None, edit_policy=None) -> dict:
    """Held-out accuracy as a recipe defines it: eval.size prompts, eval.num_samples each, decoded with the
    recipe's rollout section at eval.temperature (and eval.order_temperature, eval.edit_temperature when set)."""
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
        task.reward,
        rollout,
        seed=recipe.train.seed,
        num_samples=e.num_samples,
        order_policy=order_policy,
        edit_policy=edit_policy,
    )
