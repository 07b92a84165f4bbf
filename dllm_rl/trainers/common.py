"""What every trainer does the same way: set up a run, resume it, loop over steps, checkpoint, finish.

A trainer composes a `Run` (it does not inherit from one):

    run = Run(recipe, model, tokenizer, task)                        # accelerator, task, model, traits
    ... the trainer builds what is its own (rewards, reference, estimator) from run.model ...
    run.prepare(param_groups, updates)                               # optimizer, scheduler, prepare, resume
    run.loop("grpo", step_fn, evaluate)                              # progress, logging, eval, checkpoints

Resume (train.resume): true continues the newest complete checkpoint of train.output_dir when its recorded
recipe matches this one (keys that do not change what is trained, such as logging cadence, may differ);
"force" continues it whatever differs, the recipe's optim.* settings replacing the checkpoint's (its
optimizer moments and schedule step are kept); false starts fresh and refuses a directory that holds a run. A
finished run is never rewritten: asking for it again prints its recorded result (metrics.jsonl, final/ and the
checkpoints stay as they are; a final/ whose checkpoints were deleted counts as a finished run too). One run at a
time uses a run directory: the main process holds its lock (rundir.lock) from the start to final/.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import yaml
from tqdm.auto import tqdm
from transformers import get_scheduler

from ..checkpoint import load_checkpoint, save_checkpoint, save_final
from ..config import Recipe, RecipeLoader, recipe_to_dict
from ..errors import ConfigError
from ..metrics import MetricsLogger, window_mean
from ..models.base import peft_of, traits, unwrap
from ..models.load import load_model
from ..rundir import COMPLETE, is_complete, latest_checkpoint, lock, tidy, unlock
from ..runtime import make_accelerator, make_optimizer, set_threads
from ..tasks import load_task
from ..validate import learned_order_problem, validate_recipe

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

# schedulers whose learning rate does not depend on train.max_steps: a resumed run may change it freely
HORIZON_FREE = ("constant", "constant_with_warmup", "inverse_sqrt")

# the optimizer settings of a parameter group that train.resume=force takes from the recipe, not the checkpoint
RECIPE_OPTIM_KEYS = ("lr", "weight_decay", "betas", "eps", "momentum")

# algorithm -> check(recipe, checkpoint step) -> problem or None: what else a trainer refuses to resume, checked
# with the run directory (before anything in it changes); trainers register theirs (consensus: mid-round)
RESUME_CHECKS: dict = {}


def reference_model(recipe: Recipe, model, mode: str, key: str):
    """(frozen reference module or None, resolved mode) for a policy `model`: mode auto picks adapter_disabled for a
    LoRA (peft) model, whose base with the adapter disabled is the reference (None: no second copy exists), and
    frozen_copy otherwise. `key` names the recipe key in errors (grpo.reference, dpo.reference)."""
    is_peft = peft_of(model) is not None
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


def check_learned_order(recipe: Recipe, estimator, acc) -> None:
    """The rules of training a learned unmasking order (rollout.order=policy), GRPO's and DPO's alike."""
    if problem := learned_order_problem(recipe, acc.num_processes, estimator):
        raise ConfigError(problem)


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


def saved_recipe(recorded: Path, recipe: Recipe, check: bool = True) -> dict:
    """The resolved recipe that `recorded` (a checkpoint, final/, or a run directory) was written with; `check`:
    after checking that `recipe` may continue it (the same up to RESUMABLE_CHANGES, or train.resume=force)."""
    r = recipe.train
    if not (recorded / "recipe.yaml").is_file():
        raise ConfigError(
            f"train.output_dir {r.output_dir!r} holds {recorded.name}/ without its recipe.yaml, so this recipe "
            f"cannot be checked against it: pick a new train.output_dir"
        )
    try:
        saved = yaml.load((recorded / "recipe.yaml").read_text(), Loader=RecipeLoader) or {}
    except (yaml.YAMLError, ConfigError, UnicodeDecodeError) as e:
        raise ConfigError(
            f"{recorded / 'recipe.yaml'} cannot be read ({str(e).splitlines()[0]}), so this recipe cannot be "
            f"checked against that run: restore the file, or pick a new train.output_dir"
        ) from None
    if not isinstance(saved, dict):
        raise ConfigError(
            f"{recorded / 'recipe.yaml'} is not a recipe (a YAML mapping), so this recipe cannot be checked against "
            f"that run: restore the file, or pick a new train.output_dir"
        )
    current = recipe_to_dict(recipe)
    differ = recipe_differences(saved, current) if check else []
    if differ and r.resume != "force":
        was, now = _flat(saved), _flat(current)
        shown = ", ".join(f"{k} ({was.get(k)!r} -> {now.get(k)!r})" for k in differ[:6])
        raise ConfigError(
            f"train.output_dir {r.output_dir!r} holds a run with another recipe: {shown}"
            + (f" and {len(differ) - 6} more" if len(differ) > 6 else "")
            + ". Pick a new train.output_dir for a new run, or set train.resume=force to continue that run "
            "with these settings"
        )
    return saved


def recipe_differences(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two resolved recipes, ignoring RESUMABLE_CHANGES. A key one of
    them lacks (a recipe saved before the key existed) counts as its default."""
    a, b, default = _flat(saved), _flat(current), _flat(recipe_to_dict(Recipe()))
    keys = sorted(set(a) | set(b))
    return [
        k
        for k in keys
        if a.get(k, default.get(k)) != b.get(k, default.get(k))
        and not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)
    ]


def loss_postfix(window) -> dict:
    """The progress bar of an SFT-like run: the window's last finite training loss (a step that trained nothing,
    such as a consensus round whose vote kept no prompt, logs NaN), or nothing when the window has none."""
    losses = [v for v in window.get("loss", ()) if not math.isnan(v)]
    return {"loss": f"{losses[-1]:.3f}"} if losses else {}


class RecordedLog:
    """The metrics of a finished run, read only: what `Run.recorded` reads when nothing is trained."""

    def __init__(self, history: list[dict]):
        self.history = history

    def log(self, step: int, metrics: dict, echo: bool = True) -> None:
        raise RuntimeError("a finished run's metrics are not rewritten")

    def close(self) -> None:
        pass


def hold_run_dir(output_dir, is_main: bool, num_processes: int) -> None:
    """Take train.output_dir's lock (rundir.lock) on the main process, or refuse a directory another run is using,
    before anything in it changes; only the main process knows, and every process stops the same way."""
    problem = lock(output_dir) if is_main else None
    if num_processes > 1:
        from accelerate.utils import broadcast_object_list

        problem = broadcast_object_list([problem])[0]
    if problem:
        raise ConfigError(
            f"train.output_dir {str(output_dir)!r} is in use by another run ({problem}): wait for it to finish or "
            f"stop it, or pick a new train.output_dir"
        )


class Run:
    """One training run: accelerator, task, model, optimizer, scheduler, resume state, metrics log."""

    def __init__(self, recipe: Recipe, model=None, tokenizer=None, task=None):
        # every mistake validation knows stops here, before a model or a dataset is built
        self.recipe = r = validate_recipe(recipe, check_model=model is None, check_data=task is None)
        set_threads(r.train.num_threads)
        self.acc = make_accelerator(r)
        self._ckpt, self._final_done = self._check_run_dir()  # what the run directory allows, before any model
        self.task = task or load_task(r.data)
        if model is None:
            model, tokenizer = load_model(r.model, seed=r.train.seed)
        self.model, self.tokenizer, self.traits = model, tokenizer, traits(model, tokenizer)
        self.start_step, self.finished, self._window = 0, False, {}
        self.optimizer = self.scheduler = self.log = None

    def prepare(self, param_groups, num_training_steps: int, checkpointed=()) -> None:
        """Optimizer over `param_groups`, the recipe's scheduler, accelerate's prepare, then resume."""
        r = self.recipe
        optimizer = make_optimizer(param_groups, r.optim)
        wanted = [{k: g[k] for k in RECIPE_OPTIM_KEYS if k in g} for g in optimizer.param_groups]
        self.scheduler = get_scheduler(
            r.optim.lr_scheduler,
            optimizer,
            num_warmup_steps=r.optim.warmup_steps,
            num_training_steps=num_training_steps,
        )
        self.model, self.optimizer = self.acc.prepare(self.model, optimizer)
        for obj in (self.scheduler, *checkpointed):
            self.acc.register_for_checkpointing(obj)
        # what a checkpoint holds besides the model, recorded so a resume that would load it into other objects
        # stops with their names (accelerate matches custom_checkpoint_<i>.pkl by position only)
        self._layout = {
            "checkpointed": [type(obj).__name__ for obj in (self.scheduler, *checkpointed)],
            "param_groups": len(optimizer.param_groups),
        }
        try:
            history = self._resume()
            if self._ckpt is not None and r.train.resume == "force" and not self.finished:
                self._recipe_optim(wanted)
        except BaseException:
            self._release()
            raise
        if self.finished:  # a finished run is read, never rewritten
            self.log = RecordedLog(history)
            self._release()
        else:
            self.log = MetricsLogger(
                self.acc, r.train.output_dir, history, config=recipe_to_dict(r), start_step=self.start_step
            )

    def _recipe_optim(self, wanted: list[dict]) -> None:
        """train.resume=force: the recipe's optimizer settings (`wanted`: each group's, an order head's own lr
        included) over the checkpoint's, which load_state restored with the optimizer's moments; the schedule
        continues at its step from the recipe's base learning rates."""
        groups, sched = self.optimizer.param_groups, self.scheduler
        for i, (group, want) in enumerate(zip(groups, wanted)):
            was = group.get("initial_lr", group["lr"])
            group.update({k: v for k, v in want.items() if k != "lr"})
            group["initial_lr"] = want["lr"]
            if hasattr(sched, "base_lrs"):
                sched.base_lrs[i] = want["lr"]
            if not hasattr(sched, "lr_lambdas"):  # not a LambdaLR (reduce_lr_on_plateau): keep its reductions
                group["lr"] = group["lr"] * want["lr"] / was if was else want["lr"]
        if hasattr(sched, "lr_lambdas"):  # every other get_scheduler type: lr = base * factor(step)
            for group, base, factor in zip(groups, sched.base_lrs, sched.lr_lambdas):
                group["lr"] = base * factor(sched.last_epoch)
        sched._last_lr = [group["lr"] for group in groups]

    def _release(self) -> None:
        """Let another run use the run directory (the main process holds its lock)."""
        if self.acc.is_main_process:
            unlock(self.recipe.train.output_dir)

    def _check_run_dir(self) -> tuple[Path | None, bool]:
        """(newest complete checkpoint or None, whether final/ holds a run of train.max_steps steps) of the run
        directory, after checking that this recipe may continue what it holds: the same recipe (up to
        RESUMABLE_CHANGES, or train.resume=force), no checkpoint past train.max_steps, and no new train.max_steps
        under a scheduler that decays over it (the resumed run would follow neither schedule)."""
        # before tidy: a live run's checkpoint-<step>.tmp is not a leftover to remove
        hold_run_dir(self.recipe.train.output_dir, self.acc.is_main_process, self.acc.num_processes)
        try:
            return self._check_locked_run_dir()
        except BaseException:
            self._release()
            raise

    def _check_locked_run_dir(self) -> tuple[Path | None, bool]:
        r = self.recipe.train
        if self.acc.is_main_process:
            tidy(r.output_dir)
        self.acc.wait_for_everyone()
        foreign = sorted(
            p.name for p in Path(r.output_dir).glob("checkpoint-*") if p.is_dir() and not is_complete(p)
        )  # not written by a trainer (ours are renamed into place complete): a save would replace it
        if foreign:
            raise ConfigError(
                f"train.output_dir {r.output_dir!r} holds {foreign[0]} without the {COMPLETE} marker a trainer "
                f"writes last, so not a checkpoint of a run; move it out of the directory, or pick a new "
                f"train.output_dir"
            )
        ckpt = latest_checkpoint(r.output_dir)
        final = Path(r.output_dir) / "final"
        if ckpt is None and not final.is_dir():
            return None, False
        if r.resume is False:
            raise ConfigError(
                f"train.output_dir {r.output_dir!r} already holds a run and train.resume is false: "
                f"pick a new train.output_dir (or delete that directory) to start afresh"
            )
        saved = saved_recipe(ckpt if ckpt is not None else final, self.recipe)
        done = (saved.get("train") or {}).get("max_steps")
        if ckpt is None:  # a finished run whose checkpoints were deleted: its records stand, nothing continues
            if done != r.max_steps:
                raise ConfigError(
                    f"train.output_dir {r.output_dir!r} holds a finished run of {done} steps without a "
                    f"checkpoint to continue it to train.max_steps={r.max_steps}: pick a new train.output_dir"
                )
            return None, True
        step = json.loads((ckpt / "trainer_state.json").read_text())["step"]
        if step > r.max_steps:
            raise ConfigError(
                f"train.output_dir {r.output_dir!r} holds {ckpt.name}, past train.max_steps={r.max_steps}: set "
                f"train.max_steps >= {step} to continue it, or pick a new train.output_dir"
            )
        check = RESUME_CHECKS.get(self.recipe.algorithm)
        if step < r.max_steps and check is not None and (problem := check(self.recipe, step)):
            raise ConfigError(problem)
        sched = self.recipe.optim.lr_scheduler
        if done != r.max_steps and sched not in HORIZON_FREE and r.resume != "force":
            raise ConfigError(
                f"train.max_steps: {done} -> {r.max_steps} on resume, and optim.lr_scheduler={sched} decays over "
                f"train.max_steps, so the resumed run would follow neither schedule: keep train.max_steps={done}, "
                f"or set train.resume=force to continue on the new horizon"
            )
        # final/ is written once the loop reaches train.max_steps; its recipe says how many steps it holds
        final_done = final.is_dir() and (saved_recipe(final, self.recipe, check=False).get("train") or {}).get(
            "max_steps"
        )
        return ckpt, step == r.max_steps and final_done == r.max_steps

    def _resume(self) -> list[dict]:
        """The metrics history to continue; loads the checkpoint `_check_run_dir` chose."""
        r, ckpt = self.recipe.train, self._ckpt
        if ckpt is None and not self._final_done:
            return []
        final = Path(r.output_dir) / "final"
        if ckpt is None:
            self.start_step, self.finished = r.max_steps, True
            history = self._recorded_history([])
            self.acc.print(f"{final} is a finished run (the run is complete: nothing to train)")
            return history
        self._check_layout(ckpt)
        state = load_checkpoint(ckpt, self.acc)
        self.start_step = state["step"]
        self.finished = self._final_done
        self._window = state.get("window", {})
        self.acc.print(
            f"resumed from {ckpt} at step {self.start_step}"
            + (" (the run is complete: nothing to train)" if self.finished else "")
        )
        history = state.get("history", [])
        return self._recorded_history(history) if self.finished else history

    def _check_layout(self, ckpt: Path) -> None:
        """Refuse a checkpoint whose optimizer groups or checkpointed objects (scheduler, order or edit head,
        trained planner, synced reference) are not this run's: train.resume=force changed what is trained."""
        state = json.loads((ckpt / "trainer_state.json").read_text())
        now = self._layout
        was = {k: state[k] for k in now if k in state}
        if "checkpointed" not in was:  # a checkpoint from before the names were recorded: their number
            n = len(list((ckpt / "accelerator_state").glob("custom_checkpoint_*.pkl")))
            was["checkpointed"] = now["checkpointed"] if n == len(now["checkpointed"]) else f"{n} objects"
        differ = [k for k in was if was[k] != now[k]]
        if differ:
            shown = "; ".join(f"{k}: {was[k]} in {ckpt.name}, {now[k]} in this run" for k in differ)
            raise ConfigError(
                f"train.output_dir {self.recipe.train.output_dir!r}: {ckpt.name} holds the state of other objects "
                f"than this recipe trains ({shown}; an order or edit head, a trained planner or a synced reference "
                f"was added or removed, or optim.lr_scheduler changed its kind), so even train.resume=force cannot "
                f"continue it: restore those recipe keys, or pick a new train.output_dir"
            )

    def _recorded_history(self, history: list[dict]) -> list[dict]:
        """A finished run's metrics as metrics.jsonl records them (rows logged after its last checkpoint, such as
        the final held-out accuracy, included), else `history`; neither: a ConfigError (nothing to report)."""
        path = Path(self.recipe.train.output_dir) / "metrics.jsonl"
        try:
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        except (OSError, ValueError) as e:
            rows, why = [], "is missing" if isinstance(e, FileNotFoundError) else "cannot be read"
        else:
            why = "is empty"
        if not rows and not history:
            raise ConfigError(
                f"train.output_dir {self.recipe.train.output_dir!r} holds a finished run whose {path.name} {why}, "
                f"so its recorded result cannot be reported: restore {path}, or pick a new train.output_dir to "
                f"train again"
            )
        return rows if rows[: len(history)] == history else history

    def train_to_accuracy(
        self, name: str, step_fn, evaluate, unit: str, kept: str = "model", extra_state=None, **final_extra
    ) -> dict:
        """The whole run of a trainer scored by held-out accuracy (SFT, edit SFT): the loop with an evaluation
        every train.eval_steps and at the end, then final/. `evaluate() -> dict` with accuracy and n; a finished
        run reports what it recorded. `unit` names what was scored and `kept` what final/ holds, in the report."""
        r = self.recipe.train
        if self.finished:
            accuracy = self.recorded("eval_accuracy")
            self.acc.print(f"held-out accuracy {accuracy:.3f}, as recorded in {r.output_dir}")
            return {"eval_accuracy": accuracy, "final": f"{r.output_dir}/final"}
        result = {}

        def accuracy():
            result.update(evaluate())
            return result["accuracy"]

        self.loop(name, step_fn, accuracy, loss_postfix, eval_at_end=True, extra_state=extra_state)
        if not result:  # resumed after the last step, or no evaluation at the end: score it again
            result = evaluate()
        final = self.finish(**final_extra)
        examples = result["n"] // max(1, self.recipe.eval.num_samples)  # result["n"] counts samples
        self.acc.print(f"held-out accuracy {result['accuracy']:.3f} over {examples} {unit}; {kept} in {final}")
        return {"eval_accuracy": result["accuracy"], "final": str(final)}

    def loop(self, name: str, step_fn, evaluate, postfix, eval_at_end: bool = False, extra_state=None) -> None:
        """Steps start_step..max_steps: `step_fn(step) -> metrics`, averaged over logging windows; `evaluate()`
        -> held-out accuracy (or a dict of held-out metrics; evaluate None: no held-out set) every
        train.eval_steps (and at the last step when eval_at_end); a checkpoint every train.save_steps and at the
        end. `postfix(window) -> dict` is shown on the progress bar."""
        try:
            self._loop(name, step_fn, evaluate, postfix, eval_at_end, extra_state)
        except BaseException:  # a run that stopped does not keep its directory from the next
            self._release()
            raise

    def _loop(self, name: str, step_fn, evaluate, postfix, eval_at_end: bool, extra_state) -> None:
        r = self.recipe.train
        # a context manager closes the bar on errors too, so the CLI's error line starts on a line of its own
        with tqdm(total=r.max_steps, initial=self.start_step, disable=not self.acc.is_main_process, desc=name) as bar:
            # the steps since the last logged row: saved with a checkpoint, so a resumed run logs the same means
            self._window = window = defaultdict(list, {k: list(v) for k, v in self._window.items()})
            for step in range(self.start_step, r.max_steps):
                for k, v in step_fn(step).items():
                    window[k].append(v)
                done = step + 1
                bar.update(1)
                bar.set_postfix(postfix(window))
                if done % r.logging_steps == 0 or done == r.max_steps:
                    means = {k: window_mean(v) for k, v in window.items()}  # NaN skipped, as TRL's log()
                    self.log.log(done, {k: v for k, v in means.items() if v is not None})
                    window.clear()
                if evaluate is not None and (
                    r.eval_steps
                    and done % r.eval_steps == 0
                    and done != r.max_steps
                    or eval_at_end
                    and done == r.max_steps
                ):
                    result = evaluate()
                    self.log.log(done, result if isinstance(result, dict) else {"eval_accuracy": result})
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
            {"history": self.log.history, "window": dict(self._window), **self._layout},
            keep=self.recipe.train.save_total_limit,
            **extra,
        )

    def finish(self, **extra) -> Path:
        try:
            final = save_final(self.recipe.train.output_dir, self.acc, self.model, self.tokenizer, self.recipe, **extra)
            self.log.close()
        finally:
            self._release()
        return final

    def recorded(self, key: str, step: int | None = None):
        """The last logged value of `key` (at `step` when given), or None."""
        rows = [h for h in self.log.history if key in h and (step is None or h["step"] == step)]
        return rows[-1][key] if rows else None
