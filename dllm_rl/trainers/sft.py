"""Masked-diffusion SFT / pretraining (LLaDA arXiv 2502.09992, section 2.3).

Each completion (padded with EOS to the canvas length, as LLaDA pads its SFT answers) is masked with
probability t ~ U(t_min, 1]; the loss is the cross-entropy on masked tokens weighted 1/t, divided by the
completion length; the prompt stays clean. This is `estimators.elbo` with one sample: the maths is not
repeated here. With hybrid.sft_plans the training prompts carry plans of those kinds in turn, the targets
unchanged (a prefix-robustness fine-tune: rollout.hybrid.scaffold_rows).

    dllm-rl sft recipes/tiny/sudoku-sft.yaml [train.max_steps=400 ...]
"""

from __future__ import annotations

import time

import torch

from ..batches import SequenceBatch
from ..config import Recipe
from ..errors import ConfigError, DllmRlError, lookup
from ..estimators import draw_elbo, score
from ..evaluate import evaluate_recipe
from ..rollout import encode_prompts
from ..rollout.hybrid import scaffold_dataset
from ..runtime import EpochSampler, generation_model, processes_with_non_finite, step_generator
from .common import Run


def tokenize_pairs(dataset, tokenizer, length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS padding to `length`) for each row with prompt/completion."""
    prompts = encode_prompts(tokenizer, dataset["prompt"])
    pairs = []
    for p, text in zip(prompts, dataset["completion"]):
        c = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        if len(c) > length:
            raise ConfigError(
                f"a training completion has {len(c)} tokens (with EOS) but "
                f"rollout.max_completion_length is {length}; raise it"
            )
        pairs.append((p, c + [tokenizer.eos_token_id] * (length - len(c))))
    return pairs


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> SequenceBatch:
    P = max(len(p) for p, _ in pairs)
    prompt = torch.full((len(pairs), P), pad_id, dtype=torch.long)
    pmask = torch.zeros(len(pairs), P, dtype=torch.long)
    for i, (p, _) in enumerate(pairs):
        prompt[i, P - len(p) :] = torch.tensor(p)
        pmask[i, P - len(p) :] = 1
    comp = torch.tensor([c for _, c in pairs])
    return SequenceBatch(prompt, pmask, comp, torch.ones_like(comp))


class SFTTrainer:
    """`SFTTrainer(recipe).train()`: masked-diffusion SFT of the recipe's model on its task's completions."""

    def __init__(self, recipe: Recipe, model=None, tokenizer=None, task=None):
        self.recipe = r = recipe
        if r.train.batch_size % r.train.gradient_accumulation_steps:
            raise ConfigError(
                f"train.batch_size ({r.train.batch_size}) must be divisible by "
                f"train.gradient_accumulation_steps ({r.train.gradient_accumulation_steps})"
            )
        self.run = run = Run(r, model, tokenizer, task)
        self.acc, self.task, self.tokenizer, self.traits = run.acc, run.task, run.tokenizer, run.traits
        train = self.task.train
        if r.hybrid.sft_plans:  # prefix robustness: prompts rendered with these plan kinds in turn, same targets
            train = scaffold_dataset(train, r.hybrid, self.task.name, r.train.seed)
        self.pairs = tokenize_pairs(train, self.tokenizer, r.rollout.max_completion_length)
        self.sampler = EpochSampler(len(self.pairs), r.train.seed, shuffle=r.train.shuffle_dataset)
        run.prepare([p for p in run.model.parameters() if p.requires_grad], r.train.max_steps)
        self.model, self.optimizer, self.scheduler, self.log = run.model, run.optimizer, run.scheduler, run.log
        self.start_step = run.start_step

    def loss(self, batch: SequenceBatch, noise) -> torch.Tensor:
        """The masked-diffusion ELBO loss of one micro-batch (mean over sequences)."""
        est = score(self.model, batch, noise.to(self.acc.device), self.traits)  # [n, Lc]
        return -(est.sum(-1) / batch.completion_ids.shape[1]).mean()

    def training_step(self, step: int) -> dict:
        t0 = time.perf_counter()  # the step alone: evaluations and checkpoints between steps are not in it
        r = self.recipe.train
        rank, world = self.acc.process_index, self.acc.num_processes
        idx = self.sampler.indices(step, r.batch_size, rank, world)  # this rank's slice of the global batch
        # the step's noise is drawn for the whole (global) batch, so neither micro-batching nor the number of
        # processes changes it
        noise = draw_elbo(
            (world * r.batch_size, self.recipe.rollout.max_completion_length),
            step_generator(r.seed, step, "noise"),
            t_min=self.recipe.sft.t_min,
        )
        noise = noise.select(torch.arange(rank * r.batch_size, (rank + 1) * r.batch_size))
        micro = r.batch_size // r.gradient_accumulation_steps
        total = 0.0
        self.model.train()
        for start in range(0, r.batch_size, micro):
            batch = collate([self.pairs[i] for i in idx[start : start + micro]], self.tokenizer.pad_token_id)
            batch = SequenceBatch(*(t.to(self.acc.device) for t in batch.__dict__.values()))
            with self.acc.accumulate(self.model):
                loss = self.loss(batch, noise.select(torch.arange(start, start + micro)))
                if bad := processes_with_non_finite(self.acc, loss):
                    raise DllmRlError(
                        f"SFT: the loss is not finite on {bad} process(es) at step {step + 1} (here {loss.item()}); "
                        f"no update was applied and the last checkpoint is intact. Lower optim.lr (now "
                        f"{self.recipe.optim.lr}) or raise sft.t_min (now {self.recipe.sft.t_min}; the loss weights "
                        f"masked tokens by 1/t), then resume with the same command."
                    )
                self.acc.backward(loss)
                if self.acc.sync_gradients and self.recipe.optim.max_grad_norm > 0:
                    self.acc.clip_grad_norm_(self.model.parameters(), self.recipe.optim.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            total += loss.item() / r.gradient_accumulation_steps
        self.scheduler.step()
        self.model.eval()
        dt = time.perf_counter() - t0
        return {"loss": total, "lr": self.scheduler.get_last_lr()[0], "steps_per_s": 1 / max(dt, 1e-9)}

    def evaluate(self) -> dict:
        with generation_model(self.acc, self.model) as model:  # ZeRO-3: parameters gathered once
            return evaluate_recipe(model, self.tokenizer, self.task, self.recipe)

    def train(self) -> dict:
        return self.run.train_to_accuracy("sft", self.training_step, self.evaluate, "puzzles")


def sft_trainer(recipe: Recipe, **kwargs):
    """The trainer of the recipe's sft.objective: SFTTrainer (mdm) or EditSFTTrainer (edit)."""
    from .edit_sft import EditSFTTrainer

    return lookup({"mdm": SFTTrainer, "edit": EditSFTTrainer}, recipe.sft.objective, "sft.objective")(recipe, **kwargs)
