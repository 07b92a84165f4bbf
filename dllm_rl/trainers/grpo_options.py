"""TRL's GRPO options that act around the loss, each a small component the GRPO loop calls by phase.

Their semantics are TRL 1.16's (trl/trainer/grpo_config.py documents them, grpo_trainer.py and callbacks.py
implement them); where a diffusion LM changes the meaning it is said here.

- `Geometry` (steps_per_generation, generation_batch_size): one rollout feeds steps_per_generation micro-batches,
  i.e. steps_per_generation / gradient_accumulation_steps optimizer steps per pass (x num_iterations passes).
  Unlike TRL, a rollout's optimizer steps take whole prompt groups in order (TRL shuffles completions across
  the generation batch) and steps_per_generation must be a multiple of gradient_accumulation_steps.
- `truncated` (mask_truncated_completions): TRL calls a completion truncated when it does not end in EOS
  (it ran out of max_completion_length). A diffusion LM always fills its whole canvas, so here a completion is
  truncated when no EOS was committed anywhere inside the canvas: it never ended. Such completions get no loss
  (and do not count in dapo's token normaliser) but stay in their group's reward statistics, as in TRL.
- `EntropyProbe` (top_entropy_quantile): TRL keeps the policy loss on the tokens whose entropy is at or above
  the (1 - rho) quantile of every valid token's entropy on all processes (get_high_entropy_mask). Here a
  token's entropy is that of the model's predictive distribution at the position while it is masked, in the
  forwards the likelihood estimator makes (averaged over the views that mask it), read with a forward hook so
  that every estimator gets it without change.
- `ReferenceSync` (sync_ref_model, ref_model_mixup_alpha, ref_model_sync_steps): TRL's SyncRefModelCallback:
  after every ref_model_sync_steps-th optimizer step, ref <- alpha * policy + (1 - alpha) * ref, parameter by
  parameter (trl's own sync_target_model does it). Needs beta != 0 and a reference copy (not LoRA's disabled
  adapter), as TRL requires. The reference is checkpointed then, so a resumed run continues from it. DPO's
  dpo.sync_ref_model (TR-DPO) uses the same component, on the model copy and the reference order head.
- `CompletionsTable` (log_completions, num_completions_to_print, report_to): the latest rollout's prompts,
  completions, each reward, the advantage and the columns rewards added with log_extra, gathered from every
  process; at each log: TRL's console panel (print_prompt_completions_sample) and the parquet file
  output_dir/completions/completions_{step:05d}.parquet (columns step, prompt, completion, rewards, extras,
  advantage) when log_completions, and a table to every tracker of train.report_to.
- `disable_dropout`: TRL's disable_dropout_in_model on the policy and the reference (for ELBO estimators,
  dropout would add noise on top of the masks'), and on a hybrid planner (its plans are sampled without dropout
  and its loss then agrees with the sampler's log-probs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..models.base import unwrap


@dataclass(frozen=True)
class Geometry:
    """How a rollout is cut: `chunks` optimizer steps of `prompts_per_step` prompts per pass over it."""

    prompts_per_step: int  # train.batch_size, per process
    chunks: int  # optimizer steps per pass over one rollout

    @property
    def prompts_per_rollout(self) -> int:
        return self.prompts_per_step * self.chunks


def geometry(recipe, world: int) -> Geometry:
    """TRL's batch geometry (grpo_config.py __post_init__), in dllm-rl's units, checked."""
    t, g = recipe.train, recipe.grpo
    GA, G = t.gradient_accumulation_steps, g.num_generations
    spg, gbs = g.steps_per_generation, g.generation_batch_size
    if spg is not None and gbs is not None:
        raise ConfigError("grpo.steps_per_generation and grpo.generation_batch_size are exclusive (as in TRL): set one")
    per_micro = t.batch_size * G // GA  # completions per process and micro-batch (TRL's per_device_train_batch_size)
    if gbs is not None:
        if gbs % (per_micro * world):
            raise ConfigError(
                f"grpo.generation_batch_size ({gbs} completions) must be a multiple of the completions of one "
                f"micro-batch on all processes ({per_micro} x {world} processes)"
            )
        spg = gbs // (per_micro * world)
    spg = GA if spg is None else spg
    if spg <= 0 or spg % GA:
        raise ConfigError(
            f"grpo.steps_per_generation ({spg} micro-batches per rollout) must be a positive multiple of "
            f"train.gradient_accumulation_steps ({GA}): each rollout feeds whole optimizer steps"
        )
    return Geometry(t.batch_size, spg // GA)


def batch_note(recipe, geo: Geometry) -> str:
    """Batch sizes in both units, said once at the start (TRL counts completions, dllm-rl prompts)."""
    G, GA, B = recipe.grpo.num_generations, recipe.train.gradient_accumulation_steps, recipe.train.batch_size
    return (
        f"batch: train.batch_size={B} prompts x {G} generations = {B * G} completions per process and optimizer "
        f"step, in {GA} micro-batch(es) of {B * G // GA} (TRL's per_device_train_batch_size); each rollout of "
        f"{geo.prompts_per_rollout} prompts feeds {geo.chunks * recipe.grpo.num_iterations} optimizer step(s)"
    )


def truncated(completion_ids: torch.Tensor, eos_token_id: int | None) -> torch.Tensor:
    """[N] bool: no EOS anywhere in the completion canvas (the diffusion meaning of TRL's "truncated")."""
    if eos_token_id is None:
        return torch.zeros(completion_ids.shape[0], dtype=torch.bool, device=completion_ids.device)
    return ~(completion_ids == eos_token_id).any(-1)


def length_metrics(lengths: torch.Tensor, clipped: torch.Tensor) -> dict:
    """TRL's completion-length metrics over the global batch: `lengths` [N] tokens up to and including the first
    EOS, `clipped` [N] bool (never ended, `truncated`). Terminated lengths are those of the completions that
    ended; 0 when none did (TRL's edge case).

    >>> m = length_metrics(torch.tensor([3.0, 5.0, 8.0]), torch.tensor([False, False, True]))
    >>> m["completions/mean_length"], m["completions/max_length"], m["completions/mean_terminated_length"]
    (5.333333492279053, 8.0, 4.0)
    """
    lengths = lengths.float()
    ended = lengths[~clipped.bool()]
    ended = ended if len(ended) else torch.zeros(1)
    return {
        "completions/mean_length": lengths.mean().item(),
        "completions/min_length": lengths.min().item(),
        "completions/max_length": lengths.max().item(),
        "completions/mean_terminated_length": ended.mean().item(),
        "completions/min_terminated_length": ended.min().item(),
        "completions/max_terminated_length": ended.max().item(),
    }


def disable_dropout(*models) -> None:
    from trl.trainer.utils import disable_dropout_in_model

    for m in models:
        if m is not None:
            disable_dropout_in_model(m)


class EntropyProbe:
    """Records, while `recording()`, the entropy [N, Lc] of the model's distribution at every completion position
    that the forwards of one estimate mask (mean over those forwards; 0 where none masks it)."""

    def __init__(self, model, mask_token_id: int, logits_shift: int):
        self.mask_id, self.shift = mask_token_id, logits_shift
        self.active, self.total, self.count = False, None, None
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output) -> None:
        if not self.active or kwargs.get("logits_range") is None:
            return
        lo, hi = kwargs["logits_range"]
        ids = kwargs["input_ids"][:, lo + self.shift : hi + self.shift]  # [N, Lc] the tokens the logits predict
        logits = output.logits.detach().float()
        logits[..., self.mask_id] = float("-inf")  # [MASK] is never an output (the estimators' support)
        entropy = torch.special.entr(logits.softmax(-1)).sum(-1)  # [N, Lc]
        masked = (ids == self.mask_id).float()
        self.total = entropy * masked if self.total is None else self.total + entropy * masked
        self.count = masked if self.count is None else self.count + masked

    def recording(self):
        probe = self

        class _On:
            def __enter__(self):
                probe.active, probe.total, probe.count = True, None, None

            def __exit__(self, *exc):
                probe.active = False

        return _On()

    def entropies(self) -> torch.Tensor:
        return self.total / self.count.clamp(min=1)


def high_entropy_mask(accelerator, entropies: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """[N, Lc] bool: valid tokens whose entropy is in the top `quantile` of all processes' valid tokens: TRL's own
    GRPOTrainer.get_high_entropy_mask (threshold = the (1 - quantile) quantile), called with our accelerator."""
    from types import SimpleNamespace

    from trl.trainer.grpo_trainer import GRPOTrainer as TRLTrainer

    return TRLTrainer.get_high_entropy_mask(SimpleNamespace(accelerator=accelerator), entropies, mask, 1 - quantile)


class ReferenceSync:
    """TRL's sync_ref_model: ref <- alpha * policy + (1 - alpha) * ref after every tau-th optimizer step. `section`
    names the recipe section in errors (grpo, dpo); `ref_mode` is the trainer's reference ("same_model": only the
    learned order head moves, so only its reference is synced)."""

    def __init__(self, cfg, ref_mode: str, section: str = "grpo", movable=("frozen_copy",)):
        self.alpha, self.every = cfg.ref_model_mixup_alpha, cfg.ref_model_sync_steps
        if cfg.beta == 0:
            raise ConfigError(
                f"{section}.sync_ref_model needs a reference: set {section}.beta != 0 (TRL refuses it too)"
            )
        if ref_mode not in movable:
            raise ConfigError(
                f"{section}.sync_ref_model needs a reference copy of the model ({section}.reference={ref_mode} has "
                f"none: with LoRA the reference is the base model, which TRL cannot sync either); set "
                f"{section}.reference=frozen_copy or drop sync_ref_model"
            )
        if not 0 <= self.alpha <= 1 or self.every <= 0:
            raise ConfigError(
                f"{section}.ref_model_mixup_alpha must be in [0, 1] and {section}.ref_model_sync_steps > 0"
            )

    def after_optimizer_step(self, count: int, *pairs) -> bool:
        """Mix each (policy, reference) pair's reference toward its policy when `count` (optimizer steps so far) is
        a multiple of tau; a pair whose reference is None (the policy is its own reference) is skipped."""
        if count % self.every:
            return False
        from trl.trainer.callbacks import SyncRefModelCallback

        with torch.no_grad():
            for policy, ref in pairs:
                if ref is not None:
                    SyncRefModelCallback.sync_target_model(unwrap(policy), unwrap(ref), self.alpha)
        return True


def gather_extra_columns(extra: dict[str, list], n: int, gather) -> dict[str, list]:
    """Every process's log_extra columns, as TRL 1.16 gathers them (grpo_trainer.py,
    `_generate_and_score_completions`): `gather` (a list -> every process's lists concatenated in rank order)
    first collects the union of the column names, then each column in sorted order, a process that did not log
    one giving `n` (its completions) Nones; so every process makes the same gather calls in the same order, even
    when a reward logged a column on some processes only.

    >>> other = iter([["b"], [None], [2]])  # what a second process adds to each gather call: it logged b only
    >>> gather_extra_columns({"a": [1]}, 1, lambda xs: [*xs, *next(other)])
    {'a': [1, None], 'b': [None, 2]}
    """
    names = sorted(set(gather(list(extra))))
    return {k: gather(list(extra.get(k, [None] * n))) for k in names}


class CompletionsTable:
    """The latest rollout's rows (every process's, gathered), written at each log."""

    def __init__(self, train_cfg, output_dir: str):
        self.cfg, self.dir = train_cfg, output_dir
        self.latest = None

    def record(self, step: int, prompts, completions, rewards: dict, advantages, extra: dict) -> None:
        """Lists of one value per completion (already gathered); rewards and extra map a name to a list."""
        self.latest = (step, list(prompts), list(completions), dict(rewards), list(advantages), dict(extra))

    def record_rollout(self, acc, step, prompts, texts, rewards, per_fn, advantages, extra: dict) -> None:
        """One rollout's rows from every process (collective: every rank calls it): rewards are the Reward
        objects and per_fn [F, n] their values on this rank, advantages [world * n] already global, extra the
        log_extra columns of this rank (gather_extra_columns: a column some ranks did not log is None there)."""
        from accelerate.utils import gather_object

        from ..rewards.plugins import as_completions
        from ..runtime import gather_rows

        gather = (lambda xs: list(xs)) if acc.num_processes == 1 else (lambda xs: gather_object(list(xs)))
        per_reward = {rw.name: gather_rows(acc, v).tolist() for rw, v in zip(rewards, per_fn)}
        self.record(
            step,
            gather(prompts),
            gather(as_completions(prompts, texts)),
            per_reward,
            advantages.tolist(),
            gather_extra_columns(extra, len(prompts), gather),
        )

    def table(self) -> tuple[list[str], list[list]]:
        """(columns, rows) as TRL's parquet file: step, prompt, completion, one per reward, the log_extra
        columns, advantage."""
        step, prompts, completions, rewards, advantages, extra = self.latest
        columns = ["step", "prompt", "completion", *rewards, *extra, "advantage"]
        values = [[step] * len(prompts), prompts, completions, *rewards.values(), *extra.values(), advantages]
        return columns, [list(row) for row in zip(*values)]

    def write(self, step: int, metrics_logger) -> None:
        if self.latest is None:
            return
        columns, rows = self.table()
        if self.cfg.log_completions:
            from trl.trainer.utils import print_prompt_completions_sample

            _, prompts, completions, rewards, advantages, extra = self.latest
            if metrics_logger.acc.is_main_process:
                from tqdm import tqdm

                with tqdm.external_write_mode():  # the panel goes above the progress bar, not through it
                    print_prompt_completions_sample(
                        prompts, completions, rewards, advantages, step, self.cfg.num_completions_to_print, extra
                    )
                self._parquet(step, columns, rows)
        metrics_logger.log_table("completions", columns, rows, step)

    def _parquet(self, step: int, columns, rows) -> None:
        from pathlib import Path

        import pandas as pd

        path = Path(self.dir) / "completions" / f"completions_{step:05d}.parquet"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame = pd.DataFrame(rows, columns=columns)
        for name in ("prompt", "completion"):  # chat messages are kept as JSON text (Arrow wants one type)
            frame[name] = [v if isinstance(v, str) else json.dumps(v) for v in frame[name]]
        frame.to_parquet(path)
