"""Consensus distillation: train one decode to give what a majority vote of many decodes gives.

Each round (consensus.steps_per_round optimizer steps): the teacher (consensus.teacher: the current model, or
the initial one for frozen votes) samples consensus.samples completions for each of consensus.prompts_per_round
fresh training prompts at consensus.temperature; their answers vote (tasks.answers; the most frequent readable
answer wins, a tie going to the answer sampled first, not evalstats.vote's mean over the tied answers); a prompt
whose winning answer has at least consensus.min_share of the samples (an unreadable sample votes for no answer
but counts in the share, so a prompt whose samples mostly cannot be read is dropped) is kept, and its targets
are up to consensus.max_paths *distinct* completions with that answer (consensus.target=greedy instead distils
the teacher's own greedy decode, no vote). Then masked-diffusion SFT (trainers/sft.py's loss) on those pairs.
No gold label is used for training; held-out accuracy (eval_steps) is the gold-labelled stop, and every
round logs the vote: kept share, mean winning share, distinct answers per prompt, pass@k of the samples and,
for monitoring only, how often the distilled answer is right (target_accuracy). A step of a round whose vote
kept no prompt trains nothing: it logs loss NaN (left out of the logged means) and skipped 1 (0 on a step that
trained, so the logged skipped is the share of skipped steps), and the learning-rate schedule still advances.

Resume: a round's targets are a function of the teacher's weights at the round's start and of the round's
number (its prompts and its sampling generator), so a checkpoint taken at a round boundary holds all a resumed
run needs to rebuild them exactly: validate_recipe requires train.save_steps to be a multiple of
consensus.steps_per_round, and a resume from a checkpoint mid-round (the last step of a run whose train.max_steps
is not such a multiple, continued to a longer one) is refused unless train.resume=force. The frozen teacher
(consensus.teacher=initial) is the recipe's starting model, loaded again on resume, never the resumed weights.

This follows LMSI (arXiv 2210.11610: keep the majority answer's sampled paths, fine-tune on them) with the
online votes that SRT (arXiv 2505.21444) and TTRL (arXiv 2504.16084) find necessary; the design errors that
make such distillation plateau (frozen votes, distilling the greedy decode, one collapsed target) are each one
recipe value away, so they can be measured (benchmarks/RESULTS.md, "Consensus distillation").
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from ..config import Recipe
from ..errors import ConfigError
from ..evalstats import distinct_answers, pass_at_k, vote
from ..models.base import unwrap
from ..models.load import load_model
from ..rewards.plugins import Reward, completion_id_lists, compute_rewards, resolve_reward
from ..rollout import encode_prompts, generate
from ..runtime import EpochSampler, advance_schedule, generation_model, step_generator
from ..tasks.answers import answer_key
from .common import RESUME_CHECKS
from .sft import SFTTrainer


def mid_round_problem(recipe: Recipe, step: int) -> str | None:
    """Why a checkpoint at `step` (before train.max_steps) cannot be continued: mid-way through a round (module
    docstring), unless train.resume=force. Run checks it with the run directory, before anything in it changes."""
    c, r = recipe.consensus, recipe.train
    if step % c.steps_per_round == 0 or r.resume == "force":
        return None
    return (
        f"train.output_dir {r.output_dir!r} holds a checkpoint at step {step}, mid-way through a round of "
        f"consensus.steps_per_round={c.steps_per_round} steps, whose targets cannot be rebuilt exactly; pick a new "
        f"train.output_dir, or set train.resume=force to continue with that round's targets voted by the resumed "
        f"model"
    )


RESUME_CHECKS["consensus"] = mid_round_problem


class RoundSampler:
    """A round's sampler over its own targets, indexed by the step within the round: the SFT step asks with the
    global step, which would start each round part-way through a shuffled pass (some targets never drawn, others
    twice)."""

    def __init__(self, sampler: EpochSampler, first_step: int):
        self.sampler, self.first_step = sampler, first_step

    def indices(self, step: int, batch: int, rank: int = 0, world: int = 1) -> list[int]:
        return self.sampler.indices(step - self.first_step, batch, rank, world)


class ConsensusTrainer(SFTTrainer):
    """`ConsensusTrainer(recipe).train()`: SFT whose pairs are rebuilt each round from the teacher's votes.

    It is an SFT run (the same loss, optimizer, checkpoints and held-out evaluation) whose training pairs are
    not the task's completions but the round's consensus targets; a resumed run starts at a round boundary
    (module docstring) and rebuilds that round's targets from the checkpoint, the very targets of a run never
    stopped.
    """

    uses_completions = False  # the targets are the votes' winners, never the task's completions

    def __init__(self, recipe: Recipe, model=None, tokenizer=None, task=None):
        if task is not None and task.reward is None:  # validate_recipe refuses a recipe's data.dataset the same way
            raise ConfigError(
                "algorithm=consensus votes with the task's verifier and this task has none; train it with "
                "algorithm=sft (its completions) or algorithm=grpo (rewards)"
            )
        c = recipe.consensus
        # the frozen teacher is the model the run starts from: copied before Run resumes a checkpoint into it
        initial = copy.deepcopy(model) if c.teacher == "initial" and model is not None else None
        super().__init__(recipe, model, tokenizer, task)  # Run refuses a mid-round checkpoint (mid_round_problem)
        r = self.recipe
        self.to_answer = answer_key(self.task.name)
        self.verifier = [Reward(self.task.reward, resolve_reward(self.task.reward))]
        self.prompts = EpochSampler(len(self.task.train), r.train.seed + 1, shuffle=r.train.shuffle_dataset)
        self.teacher = None
        if c.teacher == "initial" and not self.run.finished:
            if initial is None:  # the recipe's starting model: Run's model holds the resumed weights
                initial = load_model(r.model, seed=r.train.seed)[0]
            if getattr(unwrap(initial), "quantization_method", None) is None:  # 4-bit: placed when loaded, no .to
                initial = initial.to(self.acc.device)
            self.teacher = initial.eval().requires_grad_(False)
        self.round = None
        self.pairs = []  # never the task's reference completions: targets come from the votes only

    def _scores(self, rows, out, copies: int) -> list[float]:
        """The verifier's scores of the generated completions `out` (copies consecutive ones per row), called with
        their texts and token ids (TRL's completion_ids): monitoring only."""
        columns = {k: [row[k] for row in rows for _ in range(copies)] for k in rows[0]}
        prompts = [row["prompt"] for row in rows for _ in range(copies)]
        ids = completion_id_lists(out.completion_ids, out.completion_mask)
        return compute_rewards(self.verifier, prompts, out.completions, ids, columns)[0].tolist()

    def targets(self, r: int) -> tuple[list, dict]:
        """(pairs, vote statistics) of round r."""
        c, rec = self.recipe.consensus, self.recipe
        rows = [self.task.train[i] for i in self.prompts.indices(r, c.prompts_per_round)]
        prompts = [row["prompt"] for row in rows for _ in range(c.samples)]
        with torch.no_grad(), generation_model(self.acc, self.model) as model:
            teacher = self.teacher if self.teacher is not None else model
            sampling = replace(rec.rollout, temperature=c.temperature)
            out = generate(teacher, self.tokenizer, prompts, sampling, step_generator(rec.train.seed, r, "rollout"))
            greedy = greedy_out = None
            if c.target == "greedy":
                plain = replace(rec.rollout, temperature=0.0)
                gen = step_generator(rec.train.seed, r, "greedy")  # read only by random orders and rules
                greedy_out = generate(teacher, self.tokenizer, [row["prompt"] for row in rows], plain, gen)
                greedy = greedy_out.completions
        scores = self._scores(rows, out, c.samples)
        answers = [self.to_answer(t) for t in out.completions]
        pairs, shares, kept, right, distinct, passk = [], [], 0, 0, [], []
        greedy_right = self._scores(rows, greedy_out, 1) if greedy is not None else None
        for q, row in enumerate(rows):
            sl = slice(q * c.samples, (q + 1) * c.samples)
            a, s, texts = answers[sl], scores[sl], out.completions[sl]
            distinct.append(distinct_answers(a))
            passk.append(pass_at_k(c.samples, sum(x >= 1 for x in s), c.samples))
            readable = [x for x in a if x is not None]
            if greedy is not None:  # the teacher's own greedy decode, no vote
                chosen, ok = [greedy[q]], greedy_right[q] >= 1
            else:
                if not readable:
                    shares.append(0.0)
                    continue
                winner = max(dict.fromkeys(readable), key=readable.count)  # ties: the first seen
                shares.append(readable.count(winner) / c.samples)
                if shares[-1] < c.min_share:
                    continue
                chosen = list(dict.fromkeys(t for t, x in zip(texts, a) if x == winner))[: c.max_paths]
                ok = vote([winner], [s[a.index(winner)]]) >= 1
            kept += 1
            right += int(ok)
            pairs += [(row["prompt"], t) for t in chosen]
        stats = {
            "consensus/kept": kept / len(rows),
            "consensus/vote_share": sum(shares) / max(len(shares), 1),
            "consensus/target_accuracy": right / max(kept, 1),
            "consensus/targets_per_prompt": len(pairs) / max(kept, 1),
            "consensus/distinct_answers": sum(distinct) / len(distinct),
            f"consensus/pass@{c.samples}": sum(passk) / len(passk),
        }
        return pairs, stats

    def _tokenized(self, pairs) -> list:
        L, eos = self.recipe.rollout.max_completion_length, self.tokenizer.eos_token_id
        ids = encode_prompts(self.tokenizer, [p for p, _ in pairs])
        out = []
        for p, (_, text) in zip(ids, pairs):
            comp = (self.tokenizer(text, add_special_tokens=False).input_ids + [eos])[:L]
            out.append((p, comp + [eos] * (L - len(comp))))
        return out

    def training_step(self, step: int) -> dict:
        r = step // self.recipe.consensus.steps_per_round
        stats = {}
        if r != self.round:
            pairs, stats = self.targets(r)
            self.round = r
            self.pairs = self._tokenized(pairs)
            shuffle = self.recipe.train.shuffle_dataset
            sampler = EpochSampler(max(len(self.pairs), 1), self.recipe.train.seed + r, shuffle=shuffle)
            self.sampler = RoundSampler(sampler, r * self.recipe.consensus.steps_per_round)
        if not self.pairs:  # no prompt passed the vote this round: nothing to distil (no update), the schedule goes on
            advance_schedule(self.scheduler)
            lr = self.scheduler.get_last_lr()[0]
            return {"loss": float("nan"), "lr": lr, "skipped": 1.0, **stats}
        return {**super().training_step(step), "skipped": 0.0, **stats}
