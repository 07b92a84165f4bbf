"""The autoregressive planner's own training and its part in GRPO.

- `PlannerSFTTrainer` (`algorithm: planner_sft`): supervised fine-tuning of the recipe's planner
  (`hybrid.planner`: a fresh tiny Llama on the character tokenizer, or any causal LM) on (task prompt ->
  oracle plan) pairs from tasks.plans, with TRL's SFTTrainer (prompt-completion data, loss on the
  completion only, EOS appended). The prompt is exactly what the planner sees at rollout (its system prompt
  and chat template: models.ar). Held-out plan accuracy (greedy plans that some solution agrees with,
  tasks.plans) is printed and written to metrics.jsonl. `final/` is what `hybrid.planner.path` loads.
- `PlannerPhase`: the planner inside GRPO (trainers/grpo.py): it writes the plans of the hybrid rollout
  (rollout/hybrid.py) and, when hybrid.planner.train, adds its policy-gradient term: the plan's exact token
  log-probs (a teacher-forced forward of the planner, models.ar) with the same group advantage as the
  executor's completion, so (plan, completion) is trained as one trajectory. The two terms are added, each
  normalised over its own tokens as grpo.loss_type normalises (per sequence or per batch of plan tokens), so
  they are weighted as two losses rather than as the gradient of the summed log-probability. The planner has
  its own parameter group (learning rate, LoRA) and is never the executor's reference. `NoPlanner` stands
  in when the recipe has no plan (plain rollouts, no extra term).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from ..algorithms import LossInputs
from ..checkpoint import replace_dir
from ..config import Recipe, save_recipe
from ..errors import ConfigError
from ..models.ar import ARPlanner, load_planner
from ..rollout import generate
from ..rollout.hybrid import hybrid_generate, plan_kind
from ..rundir import tidy, unlock
from ..runtime import set_threads
from ..tasks import load_task
from ..tasks.plans import PLANS, task_plans
from .common import HORIZON_FREE, hold_run_dir, saved_recipe


class PlannerSFTTrainer:
    """`PlannerSFTTrainer(recipe).train()`: SFT of hybrid.planner on the task's oracle plans (TRL SFTTrainer)."""

    def __init__(self, recipe: Recipe):
        self.recipe = r = recipe
        set_threads(r.train.num_threads)  # as Run does for the other trainers
        self.task = load_task(r.data)
        self.plans = task_plans(self.task.name)
        if self.plans.oracle is None:
            raise ConfigError(
                f"algorithm=planner_sft needs oracle plans, which data.task={self.task.name} has none of "
                f"(tasks.plans.PLANS: {sorted(PLANS)})"
            )
        self._lock(Path(r.train.output_dir))  # one run per directory, as Run (trainers/common.py) holds it
        try:
            self.ckpt = self._check_run_dir(Path(r.train.output_dir))  # what the directory allows, before a model
            self.planner = load_planner(r.hybrid.planner, seed=r.train.seed, trainable=True)
        except BaseException:
            self._release()
            raise

    def _lock(self, out: Path) -> None:
        """Hold the run directory's lock on the main process (trainers.common.hold_run_dir)."""
        from accelerate import PartialState

        state = PartialState()
        hold_run_dir(out, state.is_main_process, state.num_processes)

    def _release(self) -> None:
        """Let another run use the run directory."""
        unlock(self.recipe.train.output_dir)  # a no-op where this process holds no lock

    def dataset(self, rows):
        import datasets

        tok = self.planner.tokenizer
        return datasets.Dataset.from_list(
            [
                {"prompt": tok.decode(ids), "completion": self.plans.oracle(row)}
                for row, ids in zip(rows, self.planner.encode([row["prompt"] for row in rows]))
            ]
        )

    def plan_accuracy(self, rows) -> float:
        """Share of rows whose greedy plan is right (tasks.plans: some solution agrees with it)."""
        greedy = ARPlanner(
            self.planner.model, self.planner.tokenizer, replace(self.recipe.hybrid.planner, temperature=0.0)
        )
        right = 0
        for start in range(0, len(rows), 64):
            chunk = rows[start : start + 64]
            plan = greedy.sample([row["prompt"] for row in chunk], torch.Generator().manual_seed(0))
            right += sum(self.plans.correct(row, text) for row, text in zip(chunk, plan.texts))
        return right / max(len(rows), 1)

    def train(self) -> dict:
        try:
            return self._train()
        finally:
            self._release()

    def _train(self) -> dict:
        from trl import SFTConfig, SFTTrainer

        r, t, o = self.recipe, self.recipe.train, self.recipe.optim
        out = Path(t.output_dir)
        args = SFTConfig(
            output_dir=str(out),
            max_steps=t.max_steps,
            per_device_train_batch_size=t.batch_size // t.gradient_accumulation_steps,
            gradient_accumulation_steps=t.gradient_accumulation_steps,
            learning_rate=o.lr,
            weight_decay=o.weight_decay,
            adam_beta1=o.betas[0],
            adam_beta2=o.betas[1],
            adam_epsilon=o.eps,
            max_grad_norm=o.max_grad_norm,
            lr_scheduler_type=o.lr_scheduler,
            warmup_steps=o.warmup_steps,
            seed=t.seed,
            data_seed=t.seed,
            logging_steps=t.logging_steps,
            save_strategy="steps" if t.save_steps else "no",
            save_steps=t.save_steps or 500,
            save_total_limit=t.save_total_limit,
            report_to=t.report_to or "none",
            use_cpu=not torch.cuda.is_available(),
            completion_only_loss=True,
            max_length=None,
            disable_tqdm=False,
        )
        trainer = SFTTrainer(
            model=self.planner.model,
            args=args,
            train_dataset=self.dataset(self.task.train.to_list()),
            processing_class=self.planner.tokenizer,
        )
        ckpt = self.ckpt
        if ckpt == "finished":
            rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
            accuracy = [row["plan_accuracy"] for row in rows if "plan_accuracy" in row][-1]
            print(f"held-out plan accuracy {accuracy:.3f}, as recorded in {out} (the run is complete)")
            return {"plan_accuracy": accuracy, "final": str(out / "final")}
        out.mkdir(parents=True, exist_ok=True)
        _write_atomic(out / "recipe.yaml", lambda path: save_recipe(r, path))  # what a resume is checked against
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
        self.planner.model.eval()
        accuracy = self.plan_accuracy(self.task.eval.to_list())
        logged = [
            {"step": h.get("step", 0), **{k: v for k, v in h.items() if k != "step"}} for h in trainer.state.log_history
        ]  # TRL's training log (a resumed run's history included), then the held-out plan accuracy
        rows = logged + [{"step": t.max_steps, "plan_accuracy": accuracy}]
        _write_atomic(out / "metrics.jsonl", lambda path: path.write_text("".join(json.dumps(x) + "\n" for x in rows)))
        final, tmp = out / "final", out / "final.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        self.planner.save(tmp)
        save_recipe(r, tmp / "recipe.yaml")
        replace_dir(tmp, final)  # final/ is whole or absent, and written last: its presence marks a finished run
        n = len(self.task.eval)
        print(f"held-out plan accuracy {accuracy:.3f} over {n} {self.task.name} examples; planner in {final}")
        return {"plan_accuracy": accuracy, "final": str(final)}

    def _check_run_dir(self, out: Path):
        """The newest complete checkpoint to resume (HF's Trainer writes trainer_state.json last), None to start,
        or "finished"; refuses what Run refuses: a run directory under train.resume=false, another recipe
        (train.resume=force continues it), a checkpoint past train.max_steps."""
        t = self.recipe.train
        tidy(out)  # what a killed run left half-done: final.tmp, or final.old when final/ never arrived
        complete = [
            c for c in out.glob("checkpoint-*") if c.name[11:].isdigit() and (c / "trainer_state.json").is_file()
        ]
        ckpt = max(complete, key=lambda c: int(c.name[11:]), default=None)
        final = out / "final"
        if ckpt is None and not final.is_dir():
            return None
        if t.resume is False:
            raise ConfigError(
                f"train.output_dir {t.output_dir!r} already holds a run and train.resume is false: pick a new "
                f"train.output_dir (or delete that directory) to start afresh"
            )
        recorded = next((d for d in (out, final) if (d / "recipe.yaml").is_file()), None)
        if recorded is None and t.resume != "force":  # checkpoints of a run from before recipes were recorded
            raise ConfigError(
                f"train.output_dir {t.output_dir!r} holds planner checkpoints without a recorded recipe.yaml, so "
                f"this recipe cannot be checked against them: set train.resume=force to continue them, or pick a "
                f"new train.output_dir"
            )
        saved = saved_recipe(recorded, self.recipe) if recorded is not None else {}
        step = int(ckpt.name[11:]) if ckpt else t.max_steps
        if step > t.max_steps:
            raise ConfigError(
                f"train.output_dir {t.output_dir!r} holds {ckpt.name}, past train.max_steps={t.max_steps}: set "
                f"train.max_steps >= {step} to continue it, or pick a new train.output_dir"
            )
        done = (
            (saved_recipe(final, self.recipe, check=False).get("train") or {}).get("max_steps")
            if final.is_dir()
            else None
        )
        if done == t.max_steps == step and (out / "metrics.jsonl").is_file():
            return "finished"
        if ckpt is None:
            raise ConfigError(
                f"train.output_dir {t.output_dir!r} holds a finished run of {done} steps without a checkpoint to "
                f"continue it to train.max_steps={t.max_steps}: pick a new train.output_dir"
            )
        if (saved.get("train") or {}).get("max_steps") != t.max_steps and t.resume != "force":
            if self.recipe.optim.lr_scheduler not in HORIZON_FREE:
                raise ConfigError(
                    f"train.max_steps changed on resume and optim.lr_scheduler={self.recipe.optim.lr_scheduler} "
                    f"decays over it, so the resumed run would follow neither schedule: keep train.max_steps, or "
                    f"set train.resume=force to continue on the new horizon"
                )
        return ckpt


def _write_atomic(path: Path, write) -> None:
    """`write(tmp)` then rename onto `path`: a killed run leaves the old file or the new one, never half of one."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    tmp.replace(path)


# ------------------------------------------------------------------------------------------------ in GRPO


class NoPlanner:
    """No plan: the plain rollout, no planner term in the loss."""

    planner = None
    trains = False

    def decode(self, model, tokenizer, prompts, rows, cfg, generator, order_policy=None, edit_policy=None):
        return generate(
            model, tokenizer, prompts, cfg, generator=generator, order_policy=order_policy, edit_policy=edit_policy
        )

    def param_groups(self) -> list[dict]:
        return []

    def loss(self, mb, loss_fn, grpo_cfg, token_normalizer=None):
        return 0.0, {}

    def clip(self, max_norm: float) -> dict:
        return {}

    def checkpointed(self) -> tuple:
        return ()

    def save(self, directory) -> None:
        pass


class PlannerPhase(NoPlanner):
    """The planner in GRPO (module docstring)."""

    def __init__(self, recipe: Recipe, task_name: str, device=None):
        h = recipe.hybrid
        self.cfg, self.task_name, self.trains = h, task_name, h.planner.train
        needs_planner = h.plan == "real" or (h.plan in ("other_problem", "corrupted") and h.planner.path)
        load = dict(seed=recipe.train.seed, trainable=self.trains, device=device)  # beside the executor
        self.planner = load_planner(h.planner, **load) if needs_planner else None

    def decode(self, model, tokenizer, prompts, rows, cfg, generator, order_policy=None, edit_policy=None):
        """The hybrid rollout: plans (the planner's, for plan=real), placed in the executor's prompts."""
        if edit_policy is not None:
            raise ConfigError("hybrid.plan with rollout.edit: plans and edit heads do not combine yet; drop one")
        return hybrid_generate(
            model, tokenizer, prompts, rows, cfg, self.cfg, self.planner, self.task_name, generator, order_policy
        )

    def param_groups(self) -> list[dict]:
        if not self.trains:
            return []
        return [{"params": [p for p in self.planner.parameters() if p.requires_grad], "lr": self.cfg.planner.lr}]

    def loss(self, mb, loss_fn, grpo_cfg, token_normalizer=None):
        """(the planner's policy-gradient loss on micro-batch `mb`, stats): the recipe's loss over the plan
        tokens with each row's group advantage; old log-probs = the sampler's (exact); no KL term. Each row has
        its own sampled plan and the rows come in groups of grpo.num_generations per prompt (whole groups per
        micro-batch), the groups a group-wise loss such as wd1 weighs within; token_normalizer: dapo's over the
        optimizer step's plan tokens (GRPOTrainer._plan_token_normalizer). (0, {}) for a frozen planner."""
        if not self.trains:
            return 0.0, {}
        plan = mb.plan
        self.planner.model.train()
        lp = self.planner.logprobs(plan)  # [n, T] with gradient
        G = grpo_cfg.num_generations
        inputs = LossInputs(
            lp,
            plan.logprobs.to(lp.device),
            None,
            mb.advantages,
            plan.plan_mask.float(),
            G,
            token_normalizer=token_normalizer,
        )
        loss, stats = loss_fn(inputs, replace(grpo_cfg, beta=0.0))
        stats = {f"planner/{k}": v for k, v in stats.items()}
        stats["planner/logprob"] = float((lp.detach() * plan.plan_mask).sum(-1).mean())
        return loss, stats

    def clip(self, max_norm: float) -> dict:
        if not self.trains:
            return {}
        params = [p for p in self.planner.parameters() if p.requires_grad]
        return {"planner/grad_norm": float(torch.nn.utils.clip_grad_norm_(params, max_norm))}

    def checkpointed(self) -> tuple:
        return (self.planner.model,) if self.trains else ()

    def save(self, directory) -> None:
        if self.trains:
            self.planner.save(Path(directory) / "planner")


def planner_phase(recipe: Recipe, task_name: str, device=None):
    """NoPlanner, or the PlannerPhase of a recipe whose hybrid.plan is not none (its planner on `device`)."""
    plan_kind(recipe.hybrid.plan)  # a bad name lists the valid ones
    return NoPlanner() if recipe.hybrid.plan == "none" else PlannerPhase(recipe, task_name, device)
