"""What every trainer does the same way: set up a run, resume it, loop over steps, checkpoint, finish.

A trainer composes a `Run` (it does not inherit from one):

    run = Run(recipe, model, tokenizer, task)                        # accelerator, task, model, traits
    ... the trainer builds what is its own (rewards, reference, estimator) from run.model ...
    run.prepare(param_groups, updates)                               # optimizer, scheduler, prepare, resume
    run.loop("grpo", step_fn, evaluate)                              # progress, logging, eval, checkpoints

Resume (train.resume): true continues the newest complete checkpoint of train.output_dir when its recorded
recipe matches this one (keys that do not change what is trained, such as logging cadence, may differ);
"force" continues it whatever differs; false starts fresh and refuses a directory that holds a run. A
finished run is never rewritten: asking for it again prints its recorded result.
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import yaml
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..checkpoint import load_checkpoint, save_checkpoint, save_final
from ..config import Recipe, recipe_to_dict
from ..errors import ConfigError
from ..metrics import MetricsLogger
from ..models.base import traits, unwrap
from ..models.load import load_model
from ..rundir import latest_checkpoint, tidy
from ..runtime import make_accelerator, make_optimizer, set_threads
from ..tasks import load_task

# recipe keys that may differ between a checkpoint and the run that resumes it: they change how a run is
# watched and stored, not what it trains
RESUMABLE_CHANGES = (
    "train.output_dir",
    "train.resume",
    "train.max_steps",
    "train.save_steps",
    "train.eval_steps",
    "train.logging_steps",
    "train.save_total_limit",
    "train.report_to",
    "train.num_threads",
    "eval.",
    "rollout.batch_size",
)


def reference_model(recipe: Recipe, model, mode: str, key: str):
    """(frozen reference module or None, resolved mode) for a policy `model`: mode auto picks adapter_disabled for a
    LoRA (peft) model, whose base with the adapter disabled is the reference (None: no second copy exists), and
    frozen_copy otherwise. `key` names the recipe key in errors (grpo.reference, dpo.reference)."""
    is_peft = hasattr(model, "disable_adapter")
    if mode == "auto":
        mode = "adapter_disabled" if is_peft else "frozen_copy"
    if mode == "adapter_disabled":
        if not is_peft:
            raise ConfigError(f"{key}=adapter_disabled needs LoRA (model.lora.r > 0); use frozen_copy")
        return None, mode
    if any(hasattr(p, "ds_id") for p in model.parameters()):
        # ZeRO-3 loaded the policy already sharded (transformers' zero.Init), which a copy cannot follow:
        # load the recipe's model again (the same weights), sharded too; runtime.prepare_frozen finishes it
        ref = unwrap(load_model(recipe.model, seed=recipe.train.seed)[0])
    else:
        ref = copy.deepcopy(unwrap(model))
    return ref.eval().requires_grad_(False), mode


class PhaseTimer:
    """Seconds per named phase of a step: `with timer("rollout"): ...`; `timer.seconds` maps name -> seconds."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and not (prefix == "" and k in ("kwargs", "options")):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def recipe_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two resolved recipes, ignoring RESUMABLE_CHANGES."""
    a, b = _flat(saved), _flat(current)
    keys = sorted(set(a) | set(b))
    return [
        k
        for k in keys
        if a.get(k) != b.get(k) and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)
    ]


class Run:
    """One training run: accelerator, task, model, optimizer, scheduler, resume state, metrics log."""

    def __init__(self, recipe: Recipe, model=None, tokenizer=None, task=None):
        self.recipe = r = recipe
        set_threads(r.train.num_threads)
        self.acc = make_accelerator(r)
        self.task = task or load_task(r.data)
        if model is None:
            model, tokenizer = load_model(r.model, seed=r.train.seed)
        self.model, self.tokenizer, self.traits = model, tokenizer, traits(model, tokenizer)
        self.start_step, self.finished = 0, False
        self.optimizer = self.scheduler = self.log = None

    def prepare(self, param_groups, num_training_steps: int, checkpointed=()) -> None:
        """Optimizer over `param_groups`, the recipe's scheduler, accelerate's prepare, then resume."""
        r = self.recipe
        optimizer = make_optimizer(param_groups, r.optim)
        self.scheduler = get_scheduler(
            r.optim.lr_scheduler,
            optimizer,
            num_warmup_steps=r.optim.warmup_steps,
            num_training_steps=num_training_steps,
        )
        self.model, self.optimizer = self.acc.prepare(self.model, optimizer)
        for obj in (self.scheduler, *checkpointed):
            self.acc.register_for_checkpointing(obj)
        history = self._resume()
        self.log = MetricsLogger(self.acc, r.train.output_dir, history, config=recipe_to_dict(r))

    def _resume(self) -> list[dict]:
        r = self.recipe.train
        if self.acc.is_main_process:
            tidy(r.output_dir)
        self.acc.wait_for_everyone()
        ckpt = latest_checkpoint(r.output_dir)
        final = Path(r.output_dir) / "final"
        if r.resume is False:
            if ckpt is not None or final.is_dir():
                raise ConfigError(
                    f"train.output_dir {r.output_dir!r} already holds a run and train.resume is false: "
                    f"pick a new train.output_dir (or delete that directory) to start afresh"
                )
            return []
        if ckpt is None:
            return []
        saved = yaml.safe_load((ckpt / "recipe.yaml").read_text()) or {}
        differ = recipe_differences(saved, recipe_to_dict(self.recipe))
        if differ and r.resume != "force":
            shown = ", ".join(
                f"{k} ({_flat(saved).get(k)!r} -> {_flat(recipe_to_dict(self.recipe)).get(k)!r})" for k in differ[:6]
            ) + (" ..." if len(differ) > 6 else "")
            raise ConfigError(
                f"train.output_dir {r.output_dir!r} holds a run with another recipe: {shown}. Pick a "
                f"new train.output_dir for a new run, or set train.resume=force to continue that run "
                f"with these settings"
            )
        state = load_checkpoint(ckpt, self.acc)
        self.start_step = state["step"]
        self.finished = self.start_step >= r.max_steps and final.is_dir()
        self.acc.print(
            f"resumed from {ckpt} at step {self.start_step}"
            + (" (the run is complete: nothing to train)" if self.finished else "")
        )
        return state.get("history", [])

    def loop(self, name: str, step_fn, evaluate, postfix, eval_at_end: bool = False, extra_state=None) -> None:
        """Steps start_step..max_steps: `step_fn(step) -> metrics`, averaged over logging windows; `evaluate()`
        -> held-out accuracy every train.eval_steps (and at the last step when eval_at_end); a checkpoint
        every train.save_steps and at the end. `postfix(window) -> dict` is shown on the progress bar."""
        r = self.recipe.train
        # a context manager closes the bar on errors too, so the CLI's error line starts on a line of its own
        with tqdm(total=r.max_steps, initial=self.start_step, disable=not self.acc.is_main_process, desc=name) as bar:
            window = defaultdict(list)
            for step in range(self.start_step, r.max_steps):
                for k, v in step_fn(step).items():
                    window[k].append(v)
                done = step + 1
                bar.update(1)
                bar.set_postfix(postfix(window))
                if done % r.logging_steps == 0 or done == r.max_steps:
                    self.log.log(done, {k: sum(v) / len(v) for k, v in window.items()})
                    window = defaultdict(list)
                if (
                    r.eval_steps
                    and done % r.eval_steps == 0
                    and done != r.max_steps
                    or eval_at_end
                    and done == r.max_steps
                ):
                    self.log.log(done, {"eval_accuracy": evaluate()})
                if (r.save_steps and done % r.save_steps == 0) or done == r.max_steps:
                    self.save(done, **(extra_state or {}))

    def save(self, step: int, **extra) -> None:
        save_checkpoint(
            self.recipe.train.output_dir,
            step,
            self.acc,
            self.model,
            self.tokenizer,
            self.recipe,
            {"history": self.log.history},
            keep=self.recipe.train.save_total_limit,
            **extra,
        )

    def finish(self, **extra) -> Path:
        final = save_final(self.recipe.train.output_dir, self.acc, self.model, self.tokenizer, self.recipe, **extra)
        self.log.close()
        return final

    def recorded(self, key: str, step: int | None = None):
        """The last logged value of `key` (at `step` when given), or None."""
        rows = [h for h in self.log.history if key in h and (step is None or h["step"] == step)]
        return rows[-1][key] if rows else None
