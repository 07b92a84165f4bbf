"""GRPO for diffusion LMs: one loop of named phases, every variant chosen by name from its dict.

    rollout -> reward -> advantage -> old/ref estimates -> inner updates -> log -> checkpoint

The likelihood estimator (estimators.ESTIMATORS: one_step = d1 arXiv 2504.12216, elbo with VRPO / coupled
options, block_elbo = SPG arXiv 2510.09541, trajectory = TraceRL arXiv 2509.06949), the advantage
(algorithms.ADVANTAGES) and the loss (algorithms.LOSSES: clipped GRPO family, wd1, spg) are recipe names.
Old, reference and current log-likelihoods of inner iteration i are all computed under the same explicit
noise i, drawn from the step's generator. Config names follow TRL's GRPOConfig where the meaning is the same.
The model decodes and is scored without gradient in eval mode, and is updated in training mode (where
transformers' gradient checkpointing and dropout act). With a hybrid recipe (hybrid.plan) the planner is one
more component (trainers/planner.py): it writes the rollout's plans and, when trained, adds its plan
log-probs to the objective with the same advantages.

    dllm-rl train recipes/tiny/sudoku-tokens-grpo.yaml [grpo.beta=0.04 estimator.name=elbo ...]
"""

from __future__ import annotations

import contextlib
import math
import shutil
from collections import defaultdict

import torch
from tqdm.auto import tqdm
from transformers import TrainerState

from ..algorithms import ADVANTAGES, LOSSES, LossInputs, scale, zero_std_groups
from ..batches import RolloutBatch
from ..config import Recipe, RewardSpec
from ..errors import ConfigError, DllmRlError, lookup
from ..estimators import build_estimator
from ..evaluate import evaluate_recipe
from ..metrics import call_weighted_means, reward_metrics, throughput_metrics
from ..models.base import peft_of
from ..policy import ORDERS, edit_head_for, order_head_for
from ..rewards.plugins import RewardLog, build_rewards, check_reward_weights, compute_rewards, verifier_scores
from ..rollout.engine import check_config, decoding
from ..rollout.hybrid import with_next_problems
from ..runtime import (
    EpochSampler,
    WholeState,
    advance_schedule,
    gather_rows,
    generation_model,
    micro_batch_rows,
    prepare_frozen,
    processes_with_non_finite,
    step_generator,
    zero_stage,
)
from .common import PhaseTimer, Run, check_learned_order, reference_model
from .grpo_options import (
    CompletionsTable,
    EntropyProbe,
    ReferenceSync,
    batch_note,
    disable_dropout,
    geometry,
    high_entropy_mask,
    length_metrics,
    truncated,
)
from .planner import planner_phase
from .plots import held_out_decoding, plot_curves
from .trl_inputs import trainer_inputs

_NO_REWARD = "no reward: name one in the recipe (rewards: [{name: ...}]) or pass reward_funcs="
_EDIT_NEEDS = (
    "rollout.edit trains the edit head by the trajectory likelihood of its decisions: set "
    "estimator.name=trajectory, and run one process without DeepSpeed for now"
)


class GRPOTrainer:
    """`GRPOTrainer(recipe, reward_funcs=[fn, ...]).train()`, or in TRL's form `GRPOTrainer(model, reward_funcs,
    args=trl.GRPOConfig(...), train_dataset=..., peft_config=...)` (trainers.trl_inputs). reward_funcs (one
    callable or a list) replace the recipe's rewards, as TRL's do."""

    def __init__(
        self,
        recipe: Recipe | None = None,
        reward_funcs=None,
        model=None,
        tokenizer=None,
        task=None,
        *,
        args=None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config=None,
    ):
        recipe, model, tokenizer, task = trainer_inputs(
            recipe, model, tokenizer, task, args, train_dataset, eval_dataset, processing_class, peft_config
        )
        self.recipe = r = recipe
        self._check_recipe(task, reward_funcs)
        self.run = run = Run(r, model, tokenizer, task)
        self.acc, self.task, self.tokenizer, self.traits = run.acc, run.task, run.tokenizer, run.traits
        self.estimator = build_estimator(r.estimator, self.traits)
        self._check(run.model)
        specs = r.rewards or ([RewardSpec(self.task.reward)] if self.task.reward else [])
        self.rewards = build_rewards(specs, reward_funcs, r.grpo.reward_weights)  # reward_funcs replace specs (TRL)
        if not self.rewards:
            raise ConfigError(_NO_REWARD)
        self.loss_fn = lookup(LOSSES, r.grpo.loss_type, "grpo.loss_type")
        self.advantage_fn = lookup(ADVANTAGES, r.grpo.advantage, "grpo.advantage")
        self.ref, self.ref_mode = self._reference(run.model)
        self.geometry = geometry(r, self.acc.num_processes)  # rollout -> optimizer steps (steps_per_generation)
        self.ref_sync = ReferenceSync(r.grpo, self.ref_mode) if r.grpo.sync_ref_model else None
        if r.grpo.disable_dropout:
            disable_dropout(run.model, self.ref)
        self.order_policy = order_head_for(r.rollout.order, run.model, r.model.path, r.order_policy, r.train.seed)
        if self.order_policy is not None:
            self.order_policy.train()  # it decodes and is scored as it trains (its attention layer's one path)
        if self.order_policy is not None and not r.order_policy.train_model or not r.hybrid.train_executor:
            run.model.requires_grad_(False)  # no model gradients are computed at all, not just not applied
        self.planner = planner_phase(r, self.task.name, self.acc.device)  # NoPlanner unless hybrid.plan is set
        if r.grpo.disable_dropout and self.planner.planner is not None:
            disable_dropout(self.planner.planner.model)
        # any-process decoding (rollout.edit): the edit head, built and trained like the order head
        self.edit_policy = edit_head_for(r.rollout, run.model, r.model.path, r.edit_policy, r.train.seed)
        if self.edit_policy is not None and not r.edit_policy.train_model:
            run.model.requires_grad_(False)
        params = [{"params": [p for p in run.model.parameters() if p.requires_grad]}]
        if self.order_policy is not None:  # its own parameter group: a fresh head wants a larger step
            params.append({"params": list(self.order_policy.parameters()), "lr": r.order_policy.lr})
        if self.edit_policy is not None:
            params.append({"params": list(self.edit_policy.parameters()), "lr": r.edit_policy.lr})
        params += self.planner.param_groups()
        heads = tuple(h for h in (self.order_policy, self.edit_policy) if h is not None)
        checkpointed = heads + self.planner.checkpointed()
        # a reference that moves is state (whole tensors: ZeRO-3 shards it below)
        checkpointed += (WholeState(self.ref),) if self.ref_sync is not None else ()
        run.prepare(params, r.train.max_steps * r.grpo.num_iterations * self.geometry.chunks, checkpointed)
        self.model, self.optimizer, self.scheduler, self.log = run.model, run.optimizer, run.scheduler, run.log
        if self.ref is not None:
            self.ref = prepare_frozen(self.acc, self.ref)  # sharded like the policy under ZeRO-3
        self.sampler = EpochSampler(len(self.task.train), r.train.seed, shuffle=r.train.shuffle_dataset)
        self.start_step = self.steps_done = run.start_step
        self.reward_log = RewardLog()  # what reward functions record through TRL's log_metric / log_extra
        self.completions = CompletionsTable(r.train, r.train.output_dir)
        self.entropy = None
        if r.grpo.top_entropy_quantile < 1:
            bare = self.acc.unwrap_model(self.model)
            self.entropy = EntropyProbe(bare, self.traits.mask_token_id, self.traits.logits_shift)
        self.acc.print(batch_note(r, self.geometry))

    # ------------------------------------------------------------------------------------------- setup

    def _check_recipe(self, task, reward_funcs) -> None:
        """The rules a GRPO recipe decides alone, before a model is built (_check repeats them with the model)."""
        r = self.recipe
        geometry(r, 1)  # the batch geometry's own rules; the process count is checked again after launch
        if r.rollout.edit != "none" and (not build_estimator(r.estimator, None).replays_orders or r.train.deepspeed):
            raise ConfigError(_EDIT_NEEDS)
        dataset_task = task is None and (r.data.dataset or r.data.task == "dataset")
        if dataset_task and not r.rewards and not reward_funcs:  # a dataset has no verifier of its own
            raise ConfigError(_NO_REWARD)
        if not reward_funcs and r.rewards:  # the recipe's rewards and their weights (build_rewards checks again)
            check_reward_weights(r.rewards, r.grpo.reward_weights)
        elif not reward_funcs and r.grpo.reward_weights is not None and len(r.grpo.reward_weights) != 1:
            raise ConfigError(  # no rewards listed: the task's own verifier is the one reward
                f"grpo.reward_weights has {len(r.grpo.reward_weights)} weights, but rewards is empty, so the run is "
                f"scored by the task's own verifier alone (one reward); give one weight, or list the rewards it weighs"
            )

    def _check(self, model) -> None:
        """The cross-section rules of a GRPO recipe, before anything is trained."""
        r = self.recipe  # the rules a recipe alone decides ran before any model was built (config._rules, validate)
        if r.grpo.filter_zero_std and self.acc.num_processes > 1:
            raise ConfigError(
                "grpo.filter_zero_std drops a different number of groups on each process, which "
                "then run different numbers of forwards (a hang under DeepSpeed); set it false or "
                "run one process"
            )
        learned = lookup(ORDERS, r.rollout.order, "rollout.order").needs_hidden
        check_config(r.rollout, self.traits, model, prompt_len=1, has_policy=learned)
        if r.rollout.edit != "none" and (
            not self.estimator.replays_orders or self.acc.num_processes > 1 or r.train.deepspeed
        ):
            raise ConfigError(_EDIT_NEEDS)
        if learned:
            check_learned_order(r, self.estimator, self.acc)
        h = r.hybrid
        if (h.planner.train or not h.train_executor) and (self.acc.num_processes > 1 or r.train.deepspeed):
            raise ConfigError(
                "training the planner (hybrid.planner.train) or freezing the executor runs on one process "
                "without DeepSpeed for now; launch without deepspeed/accelerate"
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
        return reference_model(self.recipe, model, mode, "grpo.reference")

    # ------------------------------------------------------------------------------------------ phases

    def rollout(self, examples: list[dict], step: int):
        """B*G completions with their traces (RolloutBatch) and the prompts they answer."""
        G = self.recipe.grpo.num_generations
        rows = [ex for ex in examples for _ in range(G)]
        prompts = [ex["prompt"] for ex in rows]
        if zero_stage(self.acc) == 3 and step == self.start_step:
            if self.acc.is_main_process:  # above the progress bar, not through it
                tqdm.write("ZeRO-3: the policy's parameters are gathered once per rollout phase, not per forward")
        # one generator for every rank: rollouts are batch-invariant (a completion depends on its prompt and the
        # generator only), so each rank decodes exactly the rows one process with the global batch would
        # the planner's phase decodes: the plain engine, or plans placed in the prompts first (rollout.hybrid); the
        # rewards below see the original prompts
        with torch.no_grad(), generation_model(self.acc, self.model) as model:
            batch = self.planner.decode(
                model,
                self.tokenizer,
                prompts,
                rows,
                self.recipe.rollout,
                generator=step_generator(self.recipe.train.seed, step, "rollout"),
                order_policy=self.order_policy,
                edit_policy=self.edit_policy,
            )
        return batch, prompts

    def trainer_state(self, steps: int) -> TrainerState:
        """The `trainer_state` rewards get after `steps` rollouts: TRL's counts optimizer steps, and each rollout
        feeds num_iterations x chunks of them; `epoch` is the passes over the training prompts so far (all
        processes together, as TRL counts them)."""
        r = self.recipe
        u = r.grpo.num_iterations * self.geometry.chunks
        per_pass = max(len(self.task.train), 1) / (r.train.batch_size * self.acc.num_processes)
        return TrainerState(
            global_step=steps * u,
            max_steps=r.train.max_steps * u,
            epoch=steps / per_pass,
            num_train_epochs=math.ceil(r.train.max_steps / per_pass),
        )

    def reward(self, batch, prompts, examples, step: int):
        """(weighted rewards [N], per-function rewards [F, N], the task verifier's scores [N])."""
        G = self.recipe.grpo.num_generations
        columns = {k: [ex[k] for ex in examples for _ in range(G)] for k in examples[0]}
        ids = [row[m.bool()].tolist() for row, m in zip(batch.completion_ids.cpu(), batch.completion_mask.cpu())]
        state = self.trainer_state(step)
        self.reward_log.clear()
        rewards, per_fn = compute_rewards(
            self.rewards,
            prompts,
            batch.completions,
            ids,
            columns,
            state,
            log_extra=self.reward_log.log_extra,
            log_metric=self.reward_log.log_metric,
        )
        correct = verifier_scores(
            self.task.reward, self.rewards, per_fn, prompts, batch.completions, ids, columns, trainer_state=state
        )
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
            with peft_of(self.acc.unwrap_model(self.model)).disable_adapter():
                return self._estimate(self.model, batch, noise, grad=False).logps
        return self._estimate(self.ref, batch, noise, grad=False).logps

    def _micro_batches(self, n: int):
        """A rollout's micro-batches for the no-grad passes (as many as its optimizer steps take)."""
        G, GA = self.recipe.grpo.num_generations, self.recipe.train.gradient_accumulation_steps
        return micro_batch_rows(n, G, GA * self.geometry.chunks)

    def _group_parts(self, rows: torch.Tensor, parts: int) -> list[torch.Tensor]:
        """`rows` (whole groups) in exactly `parts` parts of whole groups, as even as can be, some empty when there
        are fewer groups than parts (grpo.filter_zero_std): every pass then takes the same number of optimizer
        steps and every optimizer step the same number of micro-batches, which is what accelerate's accumulation
        counter and the learning-rate schedule count on."""
        G = self.recipe.grpo.num_generations
        groups = rows.view(-1, G) if len(rows) else rows.view(0, G)
        return [part.reshape(-1) for part in groups.tensor_split(parts)]

    def _optimizer_steps(self, n: int):
        """The rows of each optimizer step of one pass over a rollout of n rows (steps_per_generation / GA)."""
        return self._group_parts(torch.arange(n), self.geometry.chunks)

    def _micro_batches_of(self, rows: torch.Tensor):
        return self._group_parts(rows, self.recipe.train.gradient_accumulation_steps)

    def _no_grad(self, fn, batch, noise):
        """fn(micro-batch, its noise) -> [n, Lc] over the batch in micro-batches, without gradient."""
        return torch.cat(
            [fn(batch.select(rows).to(self.acc.device), noise.select(rows)) for rows in self._micro_batches(len(batch))]
        )

    def estimates(self, batch, g: torch.Generator):
        """Per inner iteration: its noise, the old policy's estimate (None when the rollout feeds one optimizer
        step: the ratio is 1) and the reference's (None when beta = 0), all under that noise, without gradient."""
        r = self.recipe.grpo
        full = RolloutBatch.concat(self._gathered(batch)) if self.acc.num_processes > 1 else batch
        self.model.eval()
        out = []
        for _ in range(r.num_iterations):
            noise = self.draw_noise(batch, full, g)
            old = (
                None
                if r.num_iterations == 1 and self.geometry.chunks == 1
                else self._no_grad(lambda mb, nz: self._estimate(self.model, mb, nz, grad=False).logps, batch, noise)
            )
            ref = None if self.ref_mode == "none" else self._no_grad(self._ref_estimate, batch, noise)
            out.append((noise, old, ref))
        return out

    def _gathered(self, batch):
        from accelerate.utils import gather_object

        return gather_object([batch.to("cpu")])

    def loss_mask(self, mb, scored=None) -> torch.Tensor:
        """[n, Lc] the tokens that count in the loss: the completion up to its first EOS, or the positions the
        estimator scored (`scored`: the trajectory estimator scores every decision, those after EOS too), and none
        of a completion that never ended when grpo.mask_truncated_completions (TRL's option; grpo_options.truncated)."""
        mask = (mb.completion_mask if scored is None else scored).float()
        if self.recipe.grpo.mask_truncated_completions:
            mask = mask * (~truncated(mb.completion_ids, self.tokenizer.eos_token_id)).float()[:, None]
        return mask

    def loss(self, mb, noise, old=None, ref=None, tokens=None, plan_tokens=None):
        """(loss, stats) of the GRPO objective on micro-batch `mb` (advantages set) under `noise`, with the
        policy's estimate under grad; old = None: the policy's own detached estimate (ratio 1, mu = 1).
        tokens: dapo's normaliser (the optimizer step's loss tokens on all processes / (processes x
        micro-batches)); plan_tokens: the same for a trained planner's plan tokens; top_entropy_quantile < 1 masks
        the policy term to the high-entropy tokens."""
        with self.entropy.recording() if self.entropy is not None else contextlib.nullcontext():
            est = self._estimate(self.model, mb, noise, grad=True)
        mask = self.loss_mask(mb, est.mask)
        high, stats = None, {}
        if self.entropy is not None:
            entropies = self.entropy.entropies()
            high = high_entropy_mask(self.acc, entropies, mask, self.recipe.grpo.top_entropy_quantile)
            stats["entropy"] = ((entropies * mask).sum() / mask.sum().clamp(min=1)).item()
        inputs = LossInputs(
            est.logps,
            est.logps.detach() if old is None else old,
            ref,
            mb.advantages,
            mask,
            self.recipe.grpo.num_generations,
            est.upper,
            entropy_mask=high,
            token_normalizer=tokens,
        )
        loss, loss_stats = self.loss_fn(inputs, self.recipe.grpo)
        # (0, {}) without a planner
        plan_loss, plan_stats = self.planner.loss(mb, self.loss_fn, self.recipe.grpo, plan_tokens)
        return loss + plan_loss, {**loss_stats, **stats, **plan_stats}

    def _token_normalizer(self, batch, rows, noise) -> float:
        """dapo over the accumulated batch (TRL): this optimizer step's loss tokens on every process, divided by
        processes x micro-batches (accelerate divides each micro-batch's loss by the accumulation steps and DDP
        averages the processes, so the step's gradient is the token mean over all of them). The tokens are those
        the loss sums: the estimator's own entries where it decides them (Estimator.counted)."""
        mb = batch.select(rows)
        tokens = self.loss_mask(mb, self.estimator.counted(mb, noise.select(rows))).sum().to(self.acc.device)
        if self.acc.num_processes > 1:
            tokens = self.acc.reduce(tokens, reduction="sum")
        return max(float(tokens), 1.0) / (self.acc.num_processes * self.recipe.train.gradient_accumulation_steps)

    def _plan_token_normalizer(self, batch, rows) -> float | None:
        """dapo's normaliser for a trained planner: this optimizer step's plan tokens on every process, divided as
        _token_normalizer divides (None without a trained planner)."""
        if not self.planner.trains:
            return None
        tokens = batch.plan.plan_mask[rows.to(batch.plan.plan_mask.device)].sum().float().to(self.acc.device)
        if self.acc.num_processes > 1:
            tokens = self.acc.reduce(tokens, reduction="sum")
        return max(float(tokens), 1.0) / (self.acc.num_processes * self.recipe.train.gradient_accumulation_steps)

    def _check_finite(self, loss, stats: dict):
        """Stop before a non-finite loss reaches the weights (the last checkpoint stays intact)."""
        if not (bad := processes_with_non_finite(self.acc, loss)):
            return
        e = self.recipe.estimator
        shown = ", ".join(f"{k}={v:.4g}" for k, v in stats.items() if isinstance(v, float))
        # only the Monte Carlo ELBO has unbounded weights (1/t); block_elbo's n_b * s / m and quadrature's
        # w_i / t_i are bounded, and neither reads the timestep range this way
        hint = (
            f" The {e.name} estimator weights masked tokens by 1/t (1/(1-t) too when coupled), which can overflow "
            f"the KL term near t=0 or 1: set estimator.t_min=1e-3 (now {e.t_min}) and, if coupled, "
            f"estimator.t_max=0.999 (now {e.t_max}), or lower grpo.beta / optim.lr."
            if e.name == "elbo"
            else " Lower optim.lr or grpo.beta, or check the rewards."
        )
        raise DllmRlError(
            f"GRPO: the loss is not finite on {bad} process(es) (here {loss.item()}; "
            f"{shown}); no update was applied and the last checkpoint is intact.{hint} Resume with the "
            f"same command after changing the recipe."
        )

    def update(self, batch, estimates, step: int = 0) -> dict:
        """num_iterations passes over the rollout (TRL's num_iterations); each pass takes the rollout's optimizer
        steps (steps_per_generation / gradient_accumulation_steps of them) over its micro-batches."""
        self.model.train()
        stats = defaultdict(list)
        for it, (noise, old, ref) in enumerate(estimates):
            for k, rows in enumerate(self._optimizer_steps(len(batch))):
                tokens = self._token_normalizer(batch, rows, noise), self._plan_token_normalizer(batch, rows)
                for mb_rows in self._micro_batches_of(rows):
                    self._micro_step(batch, mb_rows, noise, old, ref, tokens, stats, stepped=len(rows) > 0)
                self.scheduler.step()
                if self.ref_sync is not None:  # optimizer steps so far, counted the same way after a resume
                    done = (step * len(estimates) + it) * self.geometry.chunks + k + 1
                    self.ref_sync.after_optimizer_step(done, (self.model, self.ref))
        self.model.eval()
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def _micro_step(self, batch, rows, noise, old, ref, tokens, stats, stepped: bool = True) -> None:
        """One micro-batch's forward and backward, then, at the optimizer step's last, clipping and the step;
        tokens: dapo's normalisers (the model's, the planner's); `stepped`: the optimizer step has rows (an empty
        one, left by filter_zero_std, has no grad norm)."""
        max_norm = self.recipe.optim.max_grad_norm
        with self.acc.accumulate(self.model):
            loss = None
            if len(rows):  # an empty micro-batch (filter_zero_std kept few groups) still counts as one
                loss, s = self.loss(
                    batch.select(rows).to(self.acc.device),
                    noise.select(rows),
                    None if old is None else old[rows.to(old.device)],
                    None if ref is None else ref[rows.to(ref.device)],
                    *tokens,
                )
                self._check_finite(loss, s)
                self.acc.backward(loss)
            if self.acc.sync_gradients and max_norm > 0 and stepped:
                if any(p.requires_grad for p in self.model.parameters()):
                    stats["grad_norm"].append(float(self.acc.clip_grad_norm_(self.model.parameters(), max_norm)))
                if self.order_policy is not None:
                    stats["order_policy/grad_norm"].append(
                        float(torch.nn.utils.clip_grad_norm_(self.order_policy.parameters(), max_norm))
                    )
                if self.edit_policy is not None:
                    stats["edit_policy/grad_norm"].append(
                        float(torch.nn.utils.clip_grad_norm_(self.edit_policy.parameters(), max_norm))
                    )
                for k, v in self.planner.clip(max_norm).items():
                    stats[k].append(v)
            self.optimizer.step()
            self.optimizer.zero_grad()
        if loss is None:
            return
        stats["loss"].append(loss.item())
        for k, v in s.items():
            stats[k].append(v)

    def estimator_std(self, batch, g: torch.Generator, draws: int = 4) -> float:
        """Std of the sequence log-likelihood estimate across fresh noise draws (mean over sequences): the
        per-token estimates summed over the entries they count, times the completion length for an estimator at
        the per-token scale (block_elbo: Estimator.per_token_mean), as DPO's sequence scores."""
        mb = batch.select(self._micro_batches(len(batch))[0]).to(self.acc.device)
        seq = []
        for _ in range(draws):
            est = self._estimate(self.model, mb, self.estimator.draw(mb, g), grad=False)
            value = (est.logps * (mb.completion_mask if est.mask is None else est.mask)).sum(-1)
            if self.estimator.per_token_mean:
                value = value * mb.completion_mask.sum(-1).clamp(min=1).to(value.device)
            seq.append(value)
        return torch.stack(seq).std(0).mean().item()

    # -------------------------------------------------------------------------------------------- loop

    def examples(self, step: int) -> list[dict]:
        """This process's share of the step's training prompts. Under hybrid.plan=other_problem each carries its
        other problem, chosen over the global batch (with_next_problems): a process's share alone would pair
        its last prompt with its own first, not with the next process's, as one process would."""
        B, rank, world = self.geometry.prompts_per_rollout, self.acc.process_index, self.acc.num_processes
        if self.recipe.hybrid.plan != "other_problem" or world == 1:
            return [self.task.train[i] for i in self.sampler.indices(step, B, rank, world)]
        everyone = with_next_problems([self.task.train[i] for i in self.sampler.indices(step, B * world)])
        return everyone[rank * B : (rank + 1) * B]

    def step(self, step: int) -> dict:
        self.steps_done = step + 1  # what an evaluation after this step tells the rewards (trainer_state)
        r, timer = self.recipe, PhaseTimer()
        rank = self.acc.process_index
        examples = self.examples(step)
        g = step_generator(r.train.seed, step, "noise")  # the same on every rank: noise is drawn globally
        with timer("rollout"):
            batch, prompts = self.rollout(examples, step)  # RolloutBatch of B*G completions
        with timer("reward"):
            rewards, per_fn, correct = self.reward(batch, prompts, examples, step)
            everyone = gather_rows(self.acc, rewards)  # [world*B*G] the global batch's rewards, in rank order
            batch.rewards = rewards
            advantages = self.advantages(everyone)  # [world*B*G]
            batch.advantages = advantages[rank * len(rewards) : (rank + 1) * len(rewards)]
        if self._logs_at(step) and (r.train.log_completions or r.train.report_to):
            self.completions.record_rollout(
                self.acc,
                step + 1,
                prompts,
                batch.completions,
                self.rewards,
                per_fn,
                advantages,
                self.reward_log.extra(len(prompts)),
            )
        committed = float(batch.stats.get("committed_tokens", 0))
        cut = batch.stats.get("plans_cut")  # hybrid rollouts: plans cut to fit the executor's context
        clipped = truncated(batch.completion_ids, self.tokenizer.eos_token_id).float()  # before any filter
        own_lengths = batch.completion_mask.sum(-1).float()
        length = own_lengths.mean().item()  # of every completion, as clipped_ratio
        all_clipped = gather_rows(self.acc, clipped)  # one gather for clipped_ratio and the terminated lengths
        lengths = length_metrics(gather_rows(self.acc, own_lengths), all_clipped.bool())
        if r.grpo.filter_zero_std:  # groups whose rewards are all equal carry no signal
            batch = batch.select((~zero_std_groups(rewards, r.grpo.num_generations)).nonzero().squeeze(-1))
        with timer("estimate"):
            estimates = self.estimates(batch, g) if len(batch) else []
        with timer("update"):
            # skipped: 1 when filter_zero_std left nothing to learn from, else 0, so its window mean is the share
            if len(batch):
                stats = {**self.update(batch, estimates, step), "skipped": 0.0}
            else:  # nothing to learn from; the learning-rate schedule keeps its pace with the steps
                advance_schedule(self.scheduler, r.grpo.num_iterations * self.geometry.chunks)
                stats = {"skipped": 1.0}
        out = {
            **reward_metrics(
                everyone,
                [gather_rows(self.acc, v) for v in per_fn],
                [rw.name for rw in self.rewards],
                gather_rows(self.acc, correct),
                r.grpo.num_generations,
            ),
            **stats,
            **call_weighted_means(self.acc, self.reward_log.metrics()),
            "completions/clipped_ratio": all_clipped.mean().item(),  # TRL's: never ended
            **lengths,
            "learning_rate": self._learning_rate(),
            **({} if cut is None else {"plans/cut_fraction": cut / len(clipped)}),
            **throughput_metrics(
                timer.seconds,
                committed,
                self._scored_tokens(batch, estimates),
                length,
                sum(x is not None for _, old, ref in estimates for x in (old, ref)),  # the passes that ran
                r.grpo.num_iterations if len(batch) else 0,
            ),
        }
        if len(batch) and (step + 1) % r.train.logging_steps == 0:
            out["estimator_std"] = self.estimator_std(batch, g)
        if self._logs_at(step):
            self.completions.write(step + 1, self.log)
        return out

    def _learning_rate(self) -> float:
        """TRL's learning_rate after the step's updates: that of the first parameter group that trains (the
        model's, or the order / edit head's when the model is frozen, as in the main job)."""
        groups = self.optimizer.param_groups
        return next((g["lr"] for g in groups if g["params"]), groups[0]["lr"])

    def _scored_tokens(self, batch, estimates) -> float:
        """The entries one scoring pass computes (Estimator.counted under the first iteration's noise: every
        committed decision for the trajectory estimator, EOS padding included; else the completions up to EOS)."""
        scored = self.estimator.counted(batch, estimates[0][0]) if estimates else None
        return float((batch.completion_mask if scored is None else scored).sum())

    def _logs_at(self, step: int) -> bool:
        """Run.loop logs after this step (every train.logging_steps, and the last)."""
        t = self.recipe.train
        return (step + 1) % t.logging_steps == 0 or step + 1 == t.max_steps

    @property
    def eval_key(self) -> str:
        """The held-out metric: the task verifier's accuracy, or the run's rewards for a task without one."""
        return "eval_accuracy" if self.task.reward is not None else "eval_reward"

    def evaluate(self) -> dict | None:
        """{eval_key: held-out score}, or None when the task has no held-out set."""
        if self.task.eval is None or len(self.task.eval) == 0:
            return None
        with generation_model(self.acc, self.model) as model:  # every rank decodes the held-out set on gathered weights
            result = evaluate_recipe(
                model,
                self.tokenizer,
                self.task,
                self.recipe,
                order_policy=self.order_policy,
                rewards=self.rewards,
                planner=self.planner.planner,
                edit_policy=self.edit_policy,
                trainer_state=self.trainer_state(self.steps_done),
            )
        return {self.eval_key: result["accuracy"]}

    def _postfix(self, window) -> dict:
        """The progress bar: the last step's training reward beside the last held-out score."""
        held_out = self.run.recorded(self.eval_key)
        return {
            "reward": f"{window['reward'][-1]:.3f}",
            **({"held_out": f"{held_out:.3f}"} if held_out is not None else {}),
        }

    def _report(self, before, after, where: str) -> str:
        if before is None:
            last = self.run.recorded("reward")
            return f"no held-out set; last training reward {last}; model and reward curve in {where}"
        what = "accuracy" if self.task.reward is not None else "reward (weighted sum of the run's rewards)"
        return f"held-out {what}: before {before:.3f} -> after {after:.3f} ({100 * (after - before):+.1f} points)"

    def train(self) -> dict:
        run, out, key = self.run, self.recipe.train.output_dir, self.eval_key
        before = run.recorded(key, step=0)
        if run.finished:
            after = run.recorded(key)
            self.acc.print(f"{self._report(before, after, out)}, as recorded in {out}")
            return {"before": before, "after": after, "final": f"{out}/final"}
        if before is None and (held_out := self.evaluate()) is not None:
            before = held_out[key]
            self.log.log(0, held_out)
        self.model.eval()
        run.loop(
            "grpo",
            self.step,
            self.evaluate if before is not None else None,
            postfix=self._postfix,
            # a trained planner goes in each checkpoint too (checkpoint-N/planner), so `dllm-rl eval` of one plans
            # with the planner of that step (resume restores it from the accelerator state)
            extra_state={
                "order_policy": self.order_policy,
                "edit_policy": self.edit_policy,
                "write": (self.planner.save,),
            },
        )
        after = None
        if before is not None:
            after = self.evaluate()[key]
            self.log.log(self.recipe.train.max_steps, {key: after})
        title = f"GRPO on {self.task.name}"
        final = run.finish(
            order_policy=self.order_policy,
            edit_policy=self.edit_policy,
            write=(
                self.planner.save,
                lambda d: plot_curves(
                    self.log.history, [d / "reward_curve.png"], title, held_out_decoding(self.recipe.eval)
                ),
            ),
        )  # a trained planner (final/planner) and the curve go in before final/ is renamed into place
        if self.acc.is_main_process:
            shutil.copyfile(final / "reward_curve.png", f"{out}/reward_curve.png")
        report = self._report(before, after, str(final))
        self.acc.print(report if before is None else f"{report}; model and reward curve in {final}")
        return {"before": before, "after": after, "final": str(final)}
