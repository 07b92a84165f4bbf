"""Masked-diffusion SFT / pretraining (LLaDA arXiv 2502.09992, section 2.3).

Each completion (padded with EOS to the canvas length, as LLaDA pads its SFT answers) is masked with
probability t ~ U(t_min, 1]; the loss is the cross-entropy on masked tokens weighted 1/t, divided by the
completion length; the prompt stays clean. This is `estimators.elbo` with one sample: the maths is not
repeated here.

    dllm-rl sft recipes/tiny/sudoku-sft.yaml [train.max_steps=400 ...]
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_final
from ..config import Recipe, recipe_to_dict
from ..errors import ConfigError, DllmRlError
from ..estimators import draw_elbo, score
from ..evaluate import evaluate_recipe
from ..metrics import MetricsLogger
from ..models.base import traits
from ..models.load import load_model
from ..rollout import encode_prompts
from ..runtime import (
    EpochSampler,
    generation_model,
    make_accelerator,
    make_optimizer,
    processes_with_non_finite,
    set_threads,
    step_generator,
)
from ..tasks import load_task
from ..types import SequenceBatch


def tokenize_pairs(dataset, tokenizer, length: int) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS padding to `length`) for each row with prompt/completion."""
    prompts = encode_prompts(tokenizer, dataset["prompt"])
    pairs = []
    for p, text in zip(prompts, dataset["completion"]):
        c = tokenizer(text, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
        if len(c) > length:
            raise ConfigError(f"a training completion has {len(c)} tokens (with EOS) but "
                              f"rollout.max_completion_length is {length}; raise it")
        pairs.append((p, c + [tokenizer.eos_token_id] * (length - len(c))))
    return pairs


def collate(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> SequenceBatch:
    P = max(len(p) for p, _ in pairs)
    prompt = torch.full((len(pairs), P), pad_id, dtype=torch.long)
    pmask = torch.zeros(len(pairs), P, dtype=torch.long)
    for i, (p, _) in enumerate(pairs):
        prompt[i, P - len(p):] = torch.tensor(p)
        pmask[i, P - len(p):] = 1
    comp = torch.tensor([c for _, c in pairs])
    return SequenceBatch(prompt, pmask, comp, torch.ones_like(comp))


class SFTTrainer:
    def __init__(self, recipe: Recipe, model=None, tokenizer=None, task=None):
        self.recipe = r = recipe
        set_threads(r.train.num_threads)
        self.acc = make_accelerator(r, micro_batch_size=r.train.batch_size // r.train.gradient_accumulation_steps)
        self.task = task or load_task(r.data)
        if model is None:
            model, tokenizer = load_model(r.model, seed=r.train.seed)
        self.tokenizer, self.traits = tokenizer, traits(model, tokenizer)
        self.pairs = tokenize_pairs(self.task.train, tokenizer, r.rollout.max_completion_length)
        self.sampler = EpochSampler(len(self.pairs), r.train.seed)
        if r.train.batch_size % r.train.gradient_accumulation_steps:
            raise ConfigError(f"train.batch_size ({r.train.batch_size}) must be divisible by "
                              f"train.gradient_accumulation_steps ({r.train.gradient_accumulation_steps})")
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = make_optimizer(params, r.optim)
        self.scheduler = get_scheduler(r.optim.lr_scheduler, optimizer, num_warmup_steps=r.optim.warmup_steps,
                                       num_training_steps=r.train.max_steps)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        self.acc.register_for_checkpointing(self.scheduler)
        self.start_step, history = 0, []
        ckpt = latest_checkpoint(r.train.output_dir) if r.train.resume else None
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.acc)
            self.start_step, history = state["step"], state.get("history", [])
            self.acc.print(f"resumed from {ckpt} at step {self.start_step}")
        self.log = MetricsLogger(self.acc, r.train.output_dir, history, config=recipe_to_dict(r))

    def loss(self, batch: SequenceBatch, noise) -> torch.Tensor:
        """The masked-diffusion ELBO loss of one micro-batch (mean over sequences)."""
        est = score(self.model, batch, noise.to(self.acc.device), self.traits)  # [n, Lc]
        return -(est.sum(-1) / batch.completion_ids.shape[1]).mean()

    def training_step(self, step: int) -> float:
        r = self.recipe.train
        rank, world = self.acc.process_index, self.acc.num_processes
        idx = self.sampler.indices(step, r.batch_size, rank, world)  # this rank's slice of the global batch
        # the step's noise is drawn for the whole (global) batch, so neither micro-batching nor the number of
        # processes changes it
        noise = draw_elbo((world * r.batch_size, self.recipe.rollout.max_completion_length),
                          step_generator(r.seed, step, "noise"), t_min=self.recipe.sft.t_min)
        noise = noise.select(torch.arange(rank * r.batch_size, (rank + 1) * r.batch_size))
        micro = r.batch_size // r.gradient_accumulation_steps
        total = 0.0
        for start in range(0, r.batch_size, micro):
            batch = collate([self.pairs[i] for i in idx[start:start + micro]], self.tokenizer.pad_token_id)
            batch = SequenceBatch(*(t.to(self.acc.device) for t in batch.__dict__.values()))
            with self.acc.accumulate(self.model):
                loss = self.loss(batch, noise.select(torch.arange(start, start + micro)))
                if bad := processes_with_non_finite(self.acc, loss):
                    raise DllmRlError(
                        f"SFT: the loss is not finite on {bad} process(es) at step {step + 1} (here {loss.item()}); "
                        f"no update was applied and the last checkpoint is intact. Lower optim.lr (now "
                        f"{self.recipe.optim.lr}) or raise sft.t_min (now {self.recipe.sft.t_min}; the loss weights "
                        f"masked tokens by 1/t), then resume with the same command.")
                self.acc.backward(loss)
                if self.acc.sync_gradients and self.recipe.optim.max_grad_norm > 0:
                    self.acc.clip_grad_norm_(self.model.parameters(), self.recipe.optim.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad()
            total += loss.item() / r.gradient_accumulation_steps
        self.scheduler.step()
        return total

    def evaluate(self, step: int) -> dict:
        with generation_model(self.acc, self.model) as model:  # ZeRO-3: parameters gathered once
            return evaluate_recipe(model, self.tokenizer, self.task, self.recipe)

    def _save(self, step: int) -> None:
        save_checkpoint(self.recipe.train.output_dir, step, self.acc, self.model, self.tokenizer, self.recipe,
                        {"history": self.log.history}, keep=self.recipe.train.save_total_limit)

    def train(self) -> dict:
        r = self.recipe.train
        # a context manager closes the bar on errors too, so the CLI's error line starts on a line of its own
        with tqdm(total=r.max_steps, initial=self.start_step, disable=not self.acc.is_main_process,
                  desc="sft") as bar:
            window, t0, result = [], time.perf_counter(), {}
            for step in range(self.start_step, r.max_steps):
                window.append(self.training_step(step))
                bar.update(1)
                bar.set_postfix(loss=f"{window[-1]:.3f}")
                done = step + 1
                if done % r.logging_steps == 0 or done == r.max_steps:
                    dt = time.perf_counter() - t0
                    self.log.log(done, {"loss": sum(window) / len(window), "lr": self.scheduler.get_last_lr()[0],
                                        "steps_per_s": len(window) / dt})
                    window, t0 = [], time.perf_counter()
                if (r.eval_steps and done % r.eval_steps == 0) or done == r.max_steps:
                    result = self.evaluate(done)
                    self.log.log(done, {"eval_accuracy": result["accuracy"]})
                if (r.save_steps and done % r.save_steps == 0) or done == r.max_steps:
                    self._save(done)
        result = result or self.evaluate(r.max_steps)  # resumed after the last step: score it again
        final = save_final(r.output_dir, self.acc, self.model, self.tokenizer, self.recipe)
        self.log.close()
        self.acc.print(f"held-out accuracy {result['accuracy']:.3f} over {result['n']} puzzles; model in {final}")
        return {"eval_accuracy": result["accuracy"], "final": str(final)}
