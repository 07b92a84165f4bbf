"""GRPO for diffusion LMs: one loop of named phases, every variant chosen by name from its dict.

    rollout -> reward -> advantage -> old/ref estimates -> inner updates -> log -> checkpoint

The likelihood estimator (estimators.ESTIMATORS: one_step = d1 arXiv 2504.12216, elbo with VRPO / coupled
options, block_elbo = SPG arXiv 2510.09541, trajectory = TraceRL arXiv 2509.06949), the advantage
(algorithms.ADVANTAGES) and the loss (algorithms.LOSSES: clipped GRPO family, wd1, spg) are recipe names.
Old, reference and current log-likelihoods of inner iteration i are all computed under the same explicit
noise i, drawn from the step's generator. Config names follow TRL's GRPOConfig where the meaning is the same.
The model decodes and is scored without gradient in eval mode, and is updated in training mode (where
transformers' gradient checkpointing and dropout act).

    dllm-rl train recipes/tiny/sudoku-tokens-grpo.yaml [grpo.beta=0.04 estimator.name=elbo ...]
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
from transformers import TrainerState

from ..algorithms import ADVANTAGES, LOSSES, LossInputs, scale, zero_std_groups
from ..batches import RolloutBatch
from ..config import Recipe, RewardSpec
from ..errors import ConfigError, DllmRlError, lookup
from ..estimators import build_estimator
from ..evaluate import evaluate_recipe
from ..metrics import reward_metrics, throughput_metrics
from ..models.base import unwrap
from ..models.load import load_model
from ..policy import ORDERS, edit_head_for, order_head_for
from ..rewards.plugins import build_rewards, compute_rewards, verifier_scores
from ..rollout import generate
from ..rollout.engine import check_config, decoding
from ..runtime import (
    EpochSampler,
    gather_rows,
    generation_model,
    micro_batch_rows,
    prepare_frozen,
    processes_with_non_finite,
    step_generator,
    zero_stage,
)
from .common import PhaseTimer, Run
from .plots import plot_curves


class GRPOTrainer:
    """`GRPOTrainer(recipe, reward_funcs=[fn, ...]).train()`; reward_funcs join the recipe's rewards."""

    def __init__(self, recipe: Recipe, reward_funcs=None, model=None, tokenizer=None, task=None):
        self.recipe = r = recipe
        self.run = run = Run(r, model, tokenizer, task)
        self.acc, self.task, self.tokenizer, self.traits = run.acc, run.task, run.tokenizer, run.traits
        self.estimator = build_estimator(r.estimator, self.traits)
        self._check(run.model)
        self.rewards = build_rewards(
            r.rewards or ([] if reward_funcs else [RewardSpec(self.task.reward)]), reward_funcs
        )
        self.loss_fn = lookup(LOSSES, r.grpo.loss_type, "grpo.loss_type")
        self.advantage_fn = lookup(ADVANTAGES, r.grpo.advantage, "grpo.advantage")
        self.ref, self.ref_mode = self._reference(run.model)
        self.order_policy = order_head_for(r.rollout.order, run.model, r.model.path, r.order_policy, r.train.seed)
        if self.order_policy is not None:
            self.order_policy.train()  # it decodes and is scored as it trains (its attention layer's one path)
        if self.order_policy is not None and not r.order_policy.train_model:
            run.model.requires_grad_(False)  # no model gradients are computed at all, not just not applied
        # any-process decoding (rollout.edit): the edit head, built and trained like the order head
        self.edit_policy = edit_head_for(r.rollout, run.model, r.model.path, r.edit_policy, r.train.seed)
        if self.edit_policy is not None and not r.edit_policy.train_model:
            run.model.requires_grad_(False)
        params = [{"params": [p for p in run.model.parameters() if p.requires_grad]}]
        if self.order_policy is not None:  # its own parameter group: a fresh head wants a larger step
            params.append({"params": list(self.order_policy.parameters()), "lr": r.order_policy.lr})
        if self.edit_policy is not None:
            params.append({"params": list(self.edit_policy.parameters()), "lr": r.edit_policy.lr})
        checkpointed = tuple(h for h in (self.order_policy, self.edit_policy) if h is not None)
        run.prepare(params, r.train.max_steps * r.grpo.num_iterations, checkpointed)
        self.model, self.optimizer, self.scheduler, self.log = run.model, run.optimizer, run.scheduler, run.log
        if self.ref is not None:
            self.ref = prepare_frozen(self.acc, self.ref)  # sharded like the policy under ZeRO-3
        self.sampler = EpochSampler(len(self.task.train), r.train.seed)
        self.start_step = run.start_step
        self._step_metrics: dict = defaultdict(list)

    # ------------------------------------------------------------------------------------------- setup

    def _check(self, model) -> None:
        """The cross-section rules of a GRPO recipe, before anything is trained."""
        r = self.recipe
        if r.grpo.num_generations < 2:
            raise ConfigError("grpo.num_generations must be >= 2: advantages are relative to the group")
        if r.train.batch_size % r.train.gradient_accumulation_steps:
            raise ConfigError(
                f"train.batch_size ({r.train.batch_size} prompts) must be divisible by "
                f"train.gradient_accumulation_steps ({r.train.gradient_accumulation_steps}): "
                f"micro-batches hold whole groups"
            )
        if r.grpo.filter_zero_std and self.acc.num_processes > 1:
            raise ConfigError(
                "grpo.filter_zero_std drops a different number of groups on each process, which "
                "then run different numbers of forwards (a hang under DeepSpeed); set it false or "
                "run one process"
            )
        if r.grpo.loss_type == "spg" and r.grpo.beta != 0:
            raise ConfigError("grpo.loss_type=spg has no KL term (as SPG); set grpo.beta=0")
        learned = lookup(ORDERS, r.rollout.order, "rollout.order").needs_hidden
        check_config(r.rollout, self.traits, model, prompt_len=1, has_policy=learned)
        if r.rollout.edit != "none" and (
            not self.estimator.replays_orders or self.acc.num_processes > 1 or r.train.deepspeed
        ):
            raise ConfigError(
                f"rollout.edit={r.rollout.edit} trains the edit head by the trajectory likelihood of its decisions: "
                f"set estimator.name=trajectory, and run one process without DeepSpeed for now"
            )
        if not r.order_policy.train_model and not learned:
            raise ConfigError(
                "order_policy.train_model=false trains only a learned unmasking order: set "
                "rollout.order=policy (or drop the key to train the model)"
            )
        if learned:
            if not self.estimator.replays_orders or r.rollout.order_temperature <= 0:
                raise ConfigError(
                    "rollout.order=policy trains the learned order by the Plackett-Luce log-prob of "
                    "sampled orders: set estimator.name=trajectory and rollout.order_temperature > 0 "
                    "(e.g. 0.1; eval.order_temperature=0 evaluates the greedy order)"
                )
            if self.acc.num_processes > 1 or r.train.deepspeed:
                raise ConfigError(
                    "rollout.order=policy runs on one process without DeepSpeed for now (the order "
                    "head is outside the prepared model); launch without deepspeed/accelerate "
                    "or pick another rollout.order"
                )
        for note in self.estimator.check(decoding(r.rollout)):
            self.acc.print(f"note: {note}")

    def _reference(self, model):
        """(reference module or None, mode): none when beta == 0; LoRA models reuse their base."""
        r = self.recipe.grpo
        mode = r.reference
        if r.beta == 0 or mode == "none":
            return None, "none"
        if self.recipe.rollout.order == "policy" and not self.recipe.order_policy.train_model:
            return None, "none"  # the model cannot move from its reference: the KL (same head) is 0
        if self.recipe.rollout.edit != "none" and not self.recipe.edit_policy.train_model:
            return None, "none"  # likewise with an edit head
        is_peft = hasattr(model, "disable_adapter")
        if mode == "auto":
            mode = "adapter_disabled" if is_peft else "frozen_copy"
        if mode == "adapter_disabled":
            if not is_peft:
                raise ConfigError("grpo.reference=adapter_disabled needs LoRA (model.lora.r > 0); use frozen_copy")
            return None, mode
        if any(hasattr(p, "ds_id") for p in model.parameters()):
            # ZeRO-3 loaded the policy already sharded (transformers' zero.Init), which a copy cannot follow:
            # load the recipe's model again (the same weights), sharded too; runtime.prepare_frozen finishes it
            ref = unwrap(load_model(self.recipe.model, seed=self.recipe.train.seed)[0])
        else:
            ref = copy.deepcopy(unwrap(model))
        return ref.eval().requires_grad_(False), mode

    # ------------------------------------------------------------------------------------------ phases

    def rollout(self, examples: list[dict], step: int):
        """B*G completions with their traces (RolloutBatch) and the prompts they answer."""
        G = self.recipe.grpo.num_generations
        prompts = [ex["prompt"] for ex in examples for _ in range(G)]
        if zero_stage(self.acc) == 3 and step == self.start_step:
            self.acc.print("ZeRO-3: the policy's parameters are gathered once per rollout phase, not per forward")
        # one generator for every rank: rollouts are batch-invariant (a completion depends on its prompt and the
        # generator only), so each rank decodes exactly the rows one process with the global batch would
        with torch.no_grad(), generation_model(self.acc, self.model) as model:
            batch = generate(
                model,
                self.tokenizer,
                prompts,
                self.recipe.rollout,
                generator=step_generator(self.recipe.train.seed, step, "rollout"),
                order_policy=self.order_policy,
                edit_policy=self.edit_policy,
            )
        return batch, prompts

    def reward(self, batch, prompts, examples, step: int):
        """(weighted rewards [N], per-function rewards [F, N], the task verifier's scores [N])."""
        G = self.recipe.grpo.num_generations
        columns = {k: [ex[k] for ex in examples for _ in range(G)] for k in examples[0]}
        ids = [row[m.bool()].tolist() for row, m in zip(batch.completion_ids.cpu(), batch.completion_mask.cpu())]
        state = TrainerState(global_step=step, max_steps=self.recipe.train.max_steps)
        rewards, per_fn = compute_rewards(
            self.rewards,
            prompts,
            batch.completions,
            ids,
            columns,
            state,
            log_metric=lambda name, value: self._step_metrics[name].append(value),
        )
        correct = verifier_scores(self.task.reward, self.rewards, per_fn, prompts, batch.completions, ids, columns)
        return rewards, per_fn, correct

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        g = self.recipe.grpo
        adv = self.advantage_fn(rewards, g.num_generations)
        return scale(adv, rewards, g.num_generations, g.scale_rewards)

    def draw_noise(self, batch, full, g: torch.Generator):
        """One inner iteration's noise, drawn for the global batch `full` (every rank's rows) and sliced to this
        rank's rows: what one process holding every rank's rows draws. Prompt masks keep their last columns
        (prompts are left-padded)."""
        noise = self.estimator.draw(full, g)
        if full is batch:
            return noise
        n, rank = len(batch), self.acc.process_index
        noise = noise.select(torch.arange(rank * n, (rank + 1) * n))
        if noise.prompt_masks is not None:
            noise = noise.with_prompt_length(batch.prompt_ids.shape[1])
        return noise

    def _estimate(self, model, batch, noise, grad: bool):
        with torch.set_grad_enabled(grad):
            return self.estimator.estimate(
                model, batch, noise.to(self.acc.device), order_policy=self.order_policy, edit_policy=self.edit_policy
            )

    def _ref_estimate(self, batch, noise):
        if self.ref_mode == "adapter_disabled":
            with self.acc.unwrap_model(self.model).disable_adapter():
                return self._estimate(self.model, batch, noise, grad=False).logps
        return self._estimate(self.ref, batch, noise, grad=False).logps

    def _micro_batches(self, n: int):
        return micro_batch_rows(n, self.recipe.grpo.num_generations, self.recipe.train.gradient_accumulation_steps)

    def _no_grad(self, fn, batch, noise):
        """fn(micro-batch, its noise) -> [n, Lc] over the batch in micro-batches, without gradient."""
        return torch.cat(
            [fn(batch.select(rows).to(self.acc.device), noise.select(rows)) for rows in self._micro_batches(len(batch))]
        )

    def estimates(self, batch, g: torch.Generator):
        """Per inner iteration: its noise, the old policy's estimate (None when mu = 1: the ratio is 1) and the
        reference's (None when beta = 0), all under that noise and without gradient."""
        r = self.recipe.grpo
        full = RolloutBatch.concat(self._gathered(batch)) if self.acc.num_processes > 1 else batch
        self.model.eval()
        out = []
        for _ in range(r.num_iterations):
            noise = self.draw_noise(batch, full, g)
            old = (
                None
                if r.num_iterations == 1
                else self._no_grad(lambda mb, nz: self._estimate(self.model, mb, nz, grad=False).logps, batch, noise)
            )
            ref = None if self.ref_mode == "none" else self._no_grad(self._ref_estimate, batch, noise)
            out.append((noise, old, ref))
        return out

    def _gathered(self, batch):
        from accelerate.utils import gather_object

        return gather_object([batch.to("cpu")])

    def loss(self, mb, noise, old=None, ref=None):
        """(loss, stats) of the GRPO objective on micro-batch `mb` (advantages set) under `noise`, with the
        policy's estimate under grad; old = None: the policy's own detached estimate (ratio 1, mu = 1)."""
        est = self._estimate(self.model, mb, noise, grad=True)
        inputs = LossInputs(
            est.logps,
            est.logps.detach() if old is None else old,
            ref,
            mb.advantages,
            _entries(est, mb),
            self.recipe.grpo.num_generations,
            est.upper,
        )
        return self.loss_fn(inputs, self.recipe.grpo)

    def _check_finite(self, loss, stats: dict):
        """Stop before a non-finite loss reaches the weights (the last checkpoint stays intact)."""
        if not (bad := processes_with_non_finite(self.acc, loss)):
            return
        e = self.recipe.estimator
        shown = ", ".join(f"{k}={v:.4g}" for k, v in stats.items() if isinstance(v, float))
        hint = (
            f" The {e.name} estimator weights masked tokens by 1/t (1/(1-t) too when coupled), which can overflow "
            f"the KL term near t=0 or 1: set estimator.t_min=1e-3 (now {e.t_min}) and, if coupled, "
            f"estimator.t_max=0.999 (now {e.t_max}), or lower grpo.beta / optim.lr."
            if e.name in ("elbo", "block_elbo")
            else " Lower optim.lr or grpo.beta, or check the rewards."
        )
        raise DllmRlError(
            f"GRPO: the loss is not finite on {bad} process(es) (here {loss.item()}; "
            f"{shown}); no update was applied and the last checkpoint is intact.{hint} Resume with the "
            f"same command after changing the recipe."
        )

    def update(self, batch, estimates) -> dict:
        """num_iterations passes over the batch, one optimizer step each (TRL's num_iterations)."""
        self.model.train()
        stats = defaultdict(list)
        max_norm = self.recipe.optim.max_grad_norm
        for noise, old, ref in estimates:
            for rows in self._micro_batches(len(batch)):
                mb = batch.select(rows).to(self.acc.device)
                with self.acc.accumulate(self.model):
                    loss, s = self.loss(
                        mb,
                        noise.select(rows),
                        None if old is None else old[rows.to(old.device)],
                        None if ref is None else ref[rows.to(ref.device)],
                    )
                    self._check_finite(loss, s)
                    self.acc.backward(loss)
                    if self.acc.sync_gradients and max_norm > 0:
                        if any(p.requires_grad for p in self.model.parameters()):
                            stats["grad_norm"].append(
                                float(self.acc.clip_grad_norm_(self.model.parameters(), max_norm))
                            )
                        if self.order_policy is not None:
                            stats["order_policy/grad_norm"].append(
                                float(torch.nn.utils.clip_grad_norm_(self.order_policy.parameters(), max_norm))
                            )
                        if self.edit_policy is not None:
                            stats["edit_policy/grad_norm"].append(
                                float(torch.nn.utils.clip_grad_norm_(self.edit_policy.parameters(), max_norm))
                            )
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                stats["loss"].append(loss.item())
                for k, v in s.items():
                    stats[k].append(v)
            self.scheduler.step()
        self.model.eval()
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def estimator_std(self, batch, g: torch.Generator, draws: int = 4) -> float:
        """Std of the sequence log-likelihood estimate across fresh noise draws (mean over sequences)."""
        mb = batch.select(self._micro_batches(len(batch))[0]).to(self.acc.device)
        seq = []
        for _ in range(draws):
            est = self._estimate(self.model, mb, self.estimator.draw(mb, g), grad=False)
            seq.append((est.logps * _entries(est, mb)).sum(-1))
        return torch.stack(seq).std(0).mean().item()

    # -------------------------------------------------------------------------------------------- loop

    def step(self, step: int) -> dict:
        r, timer = self.recipe, PhaseTimer()
        self._step_metrics.clear()
        rank, world = self.acc.process_index, self.acc.num_processes
        examples = [self.task.train[i] for i in self.sampler.indices(step, r.train.batch_size, rank, world)]
        g = step_generator(r.train.seed, step, "noise")  # the same on every rank: noise is drawn globally
        with timer("rollout"):
            batch, prompts = self.rollout(examples, step)  # RolloutBatch of B*G completions
        with timer("reward"):
            rewards, per_fn, correct = self.reward(batch, prompts, examples, step)
            everyone = gather_rows(self.acc, rewards)  # [world*B*G] the global batch's rewards, in rank order
            batch.rewards = rewards
            batch.advantages = self.advantages(everyone)[rank * len(rewards) : (rank + 1) * len(rewards)]
        committed = float(batch.stats.get("committed_tokens", 0))
        if r.grpo.filter_zero_std:  # groups whose rewards are all equal carry no signal
            batch = batch.select((~zero_std_groups(rewards, r.grpo.num_generations)).nonzero().squeeze(-1))
        with timer("estimate"):
            estimates = self.estimates(batch, g) if len(batch) else []
        with timer("update"):
            stats = self.update(batch, estimates) if len(batch) else {"skipped": 1.0}
        out = {
            **reward_metrics(
                everyone,
                [gather_rows(self.acc, v) for v in per_fn],
                [rw.name for rw in self.rewards],
                gather_rows(self.acc, correct),
                r.grpo.num_generations,
            ),
            **stats,
            **{k: sum(v) / len(v) for k, v in self._step_metrics.items()},
            **throughput_metrics(
                timer.seconds, committed, float(batch.completion_mask.sum()), len(batch), r.grpo.num_iterations
            ),
        }
        if len(batch) and (step + 1) % r.train.logging_steps == 0:
            out["estimator_std"] = self.estimator_std(batch, g)
        return out

    def evaluate(self) -> float:
        with generation_model(self.acc, self.model) as model:  # every rank decodes the held-out set on gathered weights
            return evaluate_recipe(
                model,
                self.tokenizer,
                self.task,
                self.recipe,
                order_policy=self.order_policy,
                edit_policy=self.edit_policy,
            )["accuracy"]

    def train(self) -> dict:
        run, out = self.run, self.recipe.train.output_dir
        before = run.recorded("eval_accuracy", step=0)
        if run.finished:
            after = run.recorded("eval_accuracy")
            self.acc.print(
                f"held-out accuracy: before {before:.3f} -> after {after:.3f} "
                f"({100 * (after - before):+.1f} points), as recorded in {out}"
            )
            return {"before": before, "after": after, "final": f"{out}/final"}
        if before is None:
            before = self.evaluate()
            self.log.log(0, {"eval_accuracy": before})
        self.model.eval()
        run.loop(
            "grpo",
            self.step,
            self.evaluate,
            postfix=lambda w: {
                "reward": f"{w['reward'][-1]:.3f}",
                **(
                    {"held_out": f"{run.recorded('eval_accuracy'):.3f}"}
                    if run.recorded("eval_accuracy") is not None
                    else {}
                ),
            },
            extra_state={"order_policy": self.order_policy, "edit_policy": self.edit_policy},
        )
        after = self.evaluate()
        self.log.log(self.recipe.train.max_steps, {"eval_accuracy": after})
        final = run.finish(order_policy=self.order_policy, edit_policy=self.edit_policy)
        if self.acc.is_main_process:
            plot_curves(self.log.history, [final / "reward_curve.png", f"{out}/reward_curve.png"])
        self.acc.print(
            f"held-out accuracy: before {before:.3f} -> after {after:.3f} "
            f"({100 * (after - before):+.1f} points); model and reward curve in {final}"
        )
        return {"before": before, "after": after, "final": str(final)}


def _entries(est, mb) -> torch.Tensor:
    """Which entries of an estimate count: its own mask (per-step estimates of any-process rollouts), else the
    completion's tokens."""
    return (est.mask if est.mask is not None else mb.completion_mask).float()
