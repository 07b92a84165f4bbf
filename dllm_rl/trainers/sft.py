"""Masked-diffusion SFT / pretraining (LLaDA arXiv 2502.09992, section 2.3).

Each completion (padded with EOS to the canvas length, as LLaDA pads its SFT answers) is masked with
probability t ~ U(t_min, 1]; the loss is the cross-entropy on masked tokens weighted 1/t, divided by the
completion length; the prompt stays clean. This is `estimators.elbo` with one sample: the maths is not
repeated here. With hybrid.sft_plans the training prompts carry plans of those kinds in turn, the targets
unchanged (a prefix-robustness fine-tune: rollout.hybrid.scaffold_rows).

The training rows need a `completion` column (every built-in task has one; a `data.dataset` without one is
refused before any model is built). The held-out accuracy needs a held-out set and a verifier: a `data.dataset`
has no verifier, so such a run trains without held-out evaluations and its final line says so.

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
from ..models.base import unwrap
from ..rollout import encode_prompts
from ..rollout.hybrid import scaffold_dataset
from ..runtime import EpochSampler, generation_model, processes_with_non_finite, step_generator
from ..tasks import load_task
from ..tasks.base import Task
from ..validate import validate_recipe
from .common import Run, loss_postfix


def tokenize_pairs(
    dataset, tokenizer, length: int, max_pos: int | None = None, rendered: str = ""
) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, completion ids + EOS padding to `length`) for each row with prompt/completion. max_pos: the
    model's context (max_position_embeddings): a row is its prompt + a canvas of `length` tokens, and one past the
    context is refused (a rotary model would not raise: it would silently train past its context). `rendered`:
    how the prompts were rendered (hybrid.sft_plans), said in that error."""
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
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]), default=None)
    if max_pos and longest is not None and len(prompts[longest]) + length > max_pos:
        P, shown = len(prompts[longest]), dataset[longest]["prompt"]
        if isinstance(shown, list) and shown and isinstance(shown[-1], dict):  # chat messages: the last one
            shown = shown[-1].get("content", shown)
        raise ConfigError(
            f"training row {longest} has the longest prompt{rendered}, {P} tokens ({str(shown)[:60]!r}): with "
            f"rollout.max_completion_length {length} that is {P + length} positions, past the model's context of "
            f"{max_pos} (max_position_embeddings). Shorten the training prompts to at most {max_pos - length} "
            f"tokens, lower rollout.max_completion_length (not below the longest completion), or use a model with "
            f"a longer context"
        )
    return pairs


def supervised_task(recipe: Recipe, task: Task | None) -> Task | None:
    """The task of an SFT run, checked to have completions to learn: `task` when given; for a data.dataset, loaded
    here (after the checks Run makes first, so a bad path is still one line) so that a dataset without a
    completion column is refused before any model is built; otherwise None (Run loads the task: every built-in
    task has completions)."""
    where = "the training dataset"
    if task is None and recipe.data.dataset:
        validate_recipe(recipe, check_model=False)
        task, where = load_task(recipe.data), f"data.dataset {recipe.data.dataset!r}"
    columns = getattr(task.train, "column_names", None) if task is not None else None
    if columns is not None and "completion" not in columns:
        raise ConfigError(
            f"{where} has no 'completion' column (columns: {columns}), and SFT learns completions: add the target "
            f"text as a 'completion' column, or train on this dataset with algorithm=grpo and rewards"
        )
    return task


def check_eval_decoding(recipe: Recipe, run) -> None:
    """The held-out evaluation's decoding checked against the loaded model now: an SFT-family run decodes only
    when it evaluates, the last time after training, and a setting the model cannot decode with (a canvas past
    its context, an exact block cache on a bidirectional model, ...) would otherwise stop the finished run
    before its final/ is written."""
    if unscored(run.task) is not None:
        return
    from ..rollout.engine import check_config

    prompts = encode_prompts(run.tokenizer, [row["prompt"] for row in run.task.eval])
    check_config(recipe.rollout, run.traits, run.model, max(map(len, prompts), default=1), has_policy=False)


def unscored(task: Task) -> str | None:
    """Why the held-out accuracy of `task` cannot be measured (no held-out set, or no verifier to score it: a
    data.dataset has none), or None when it can."""
    if task.eval is None or len(task.eval) == 0:
        return "no held-out set (data.eval_path), so no held-out accuracy"
    if task.reward is None:
        return "no verifier to score the held-out set (a data.dataset has none), so no held-out accuracy"
    return None


def train_unscored(run: Run, name: str, step_fn, why: str, kept: str = "model", extra_state=None, **final_extra):
    """`Run.train_to_accuracy` for a task whose held-out accuracy cannot be measured (`why`, from `unscored`): the
    loop without evaluations, then final/; the report says why there is no accuracy and gives the last logged
    training loss. A finished run reports what it recorded."""
    out = run.recipe.train.output_dir
    last = lambda: "last training loss " + ("none logged" if (x := run.recorded("loss")) is None else f"{x:.4f}")
    if run.finished:
        run.acc.print(f"{why}; {last()}, as recorded in {out}")
        return {"eval_accuracy": None, "final": f"{out}/final"}
    run.loop(name, step_fn, None, loss_postfix, extra_state=extra_state)
    final = run.finish(**final_extra)
    run.acc.print(f"{why}; {last()}; {kept} in {final}")
    return {"eval_accuracy": None, "final": str(final)}


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

    uses_completions = True  # the task's completions are the targets (consensus: False, its targets are voted)

    def __init__(self, recipe: Recipe, model=None, tokenizer=None, task=None):
        self.recipe = r = recipe
        if r.train.batch_size % r.train.gradient_accumulation_steps:
            raise ConfigError(
                f"train.batch_size ({r.train.batch_size}) must be divisible by "
                f"train.gradient_accumulation_steps ({r.train.gradient_accumulation_steps})"
            )
        if self.uses_completions:
            task = supervised_task(r, task)
        self.run = run = Run(r, model, tokenizer, task)
        self.acc, self.task, self.tokenizer, self.traits = run.acc, run.task, run.tokenizer, run.traits
        check_eval_decoding(r, run)
        self.pairs = []
        if self.uses_completions:
            train, rendered = self.task.train, ""
            if r.hybrid.sft_plans:  # prefix robustness: prompts rendered with these plan kinds in turn, same targets
                train = scaffold_dataset(train, r.hybrid, self.task.name, r.train.seed)
                rendered = f" with its plan placed (hybrid.sft_plans {r.hybrid.sft_plans}, hybrid.template)"
            max_pos = getattr(unwrap(run.model).config, "max_position_embeddings", None)
            self.pairs = tokenize_pairs(train, self.tokenizer, r.rollout.max_completion_length, max_pos, rendered)
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

    def evaluate(self) -> dict | None:
        """Held-out accuracy (evaluate_recipe's dict), or None when the task cannot be scored (`unscored`)."""
        if unscored(self.task):
            return None
        with generation_model(self.acc, self.model) as model:  # ZeRO-3: parameters gathered once
            return evaluate_recipe(model, self.tokenizer, self.task, self.recipe)

    def train(self) -> dict:
        """The run; {"eval_accuracy": held-out accuracy, or None when the task cannot be scored, "final": path}."""
        if why := unscored(self.task):
            return train_unscored(self.run, "sft", self.training_step, why)
        return self.run.train_to_accuracy("sft", self.training_step, self.evaluate, "puzzles")


def sft_trainer(recipe: Recipe, **kwargs):
    """The trainer of the recipe's sft.objective: SFTTrainer (mdm) or EditSFTTrainer (edit)."""
    from .edit_sft import EditSFTTrainer

    return lookup({"mdm": SFTTrainer, "edit": EditSFTTrainer}, recipe.sft.objective, "sft.objective")(recipe, **kwargs)
