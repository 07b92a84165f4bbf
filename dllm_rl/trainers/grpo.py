"""GRPO for diffusion LMs: one loop of named phases, every variant chosen by name from its dict.

    rollout -> reward -> advantage -> old/ref estimates -> inner updates -> log -> checkpoint

The likelihood estimator (estimators.ESTIMATORS: one_step = d1 arXiv 2504.12216, elbo with VRPO / coupled
options, block_elbo = SPG arXiv 2510.09541, trajectory = TraceRL arXiv 2509.06949), the advantage
(algorithms.ADVANTAGES) and the loss (algorithms.LOSSES: clipped GRPO family, wd1, spg) are recipe names.
Old, reference and current log-likelihoods of inner iteration i are all computed under the same explicit
noise i, drawn from the step's generator. Config names follow TRL's GRPOConfig where the meaning is the same.

    dllm-rl train recipes/tiny/sudoku-tokens-grpo.yaml [grpo.beta=0.04 estimator.name=elbo ...]
"""

from __future__ import annotations

import copy
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import TrainerState, get_scheduler

from ..algorithms import ADVANTAGES, LOSSES, LossInputs, scale, zero_std_groups
from ..checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_final
from ..config import Recipe, RewardSpec, recipe_to_dict
from ..errors import ConfigError, DllmRlError, lookup
from ..estimators import ESTIMATORS
from ..evaluate import evaluate_recipe
from ..metrics import MetricsLogger
from ..models.base import traits, unwrap
from ..models.load import load_model, resolve_model_dir
from ..policy import OrderHead, OrderHeadConfig
from ..policy.order_head import FILE as ORDER_POLICY_FILE
from ..rewarding import build_rewards, compute_rewards
from ..rollout import generate
from ..rollout.sampler import check_config
from ..rollout.trace import Trace
from ..runtime import (
    EpochSampler,
    gather_rows,
    generation_model,
    make_accelerator,
    make_optimizer,
    prepare_frozen,
    processes_with_non_finite,
    set_threads,
    step_generator,
    zero_stage,
)
from ..tasks import load_task
from ..types import RolloutBatch
from .plots import plot_curves


class GRPOTrainer:
    """`GRPOTrainer(recipe, reward_funcs=[fn, ...]).train()`; reward_funcs join the recipe's rewards."""

    def __init__(self, recipe: Recipe, reward_funcs=None, model=None, tokenizer=None, task=None):
        self.recipe = r = recipe
        set_threads(r.train.num_threads)
        micro = r.train.batch_size // r.train.gradient_accumulation_steps * r.grpo.num_generations  # completions
        self.acc = make_accelerator(r, micro_batch_size=micro)
        self.task = task or load_task(r.data)
        if model is None:
            model, tokenizer = load_model(r.model, seed=r.train.seed)
        self.tokenizer, self.traits = tokenizer, traits(model, tokenizer)
        self._check(model)
        self.rewards = build_rewards(r.rewards or ([] if reward_funcs else [RewardSpec(self.task.reward)]),
                                     reward_funcs)
        self.estimator = lookup(ESTIMATORS, r.estimator.name, "estimator.name")
        self.loss_fn = lookup(LOSSES, r.grpo.loss_type, "grpo.loss_type")
        self.advantage_fn = lookup(ADVANTAGES, r.grpo.advantage, "grpo.advantage")
        self.ref, self.ref_mode = self._reference(model)
        self.order_policy = self._order_policy(model)
        if self.order_policy is not None and not r.order_policy.train_model:
            model.requires_grad_(False)  # no model gradients are computed at all, not just not applied
        params = [p for p in model.parameters() if p.requires_grad]
        if self.order_policy is not None:  # its own parameter group: a fresh head wants a larger step
            params = [{"params": params},
                      {"params": list(self.order_policy.parameters()), "lr": r.order_policy.lr}]
        optimizer = make_optimizer(params, r.optim)
        updates = r.train.max_steps * r.grpo.num_iterations
        self.scheduler = get_scheduler(r.optim.lr_scheduler, optimizer, num_warmup_steps=r.optim.warmup_steps,
                                       num_training_steps=updates)
        self.model, self.optimizer = self.acc.prepare(model, optimizer)
        if self.ref is not None:
            self.ref = prepare_frozen(self.acc, self.ref)  # sharded like the policy under ZeRO-3
        self.acc.register_for_checkpointing(self.scheduler)
        if self.order_policy is not None:
            self.acc.register_for_checkpointing(self.order_policy)  # resumed with the optimizer and scheduler
        self.sampler = EpochSampler(len(self.task.train), r.train.seed)
        self.start_step, history = 0, []
        ckpt = latest_checkpoint(r.train.output_dir) if r.train.resume else None
        if ckpt is not None:
            state = load_checkpoint(ckpt, self.acc)
            self.start_step, history = state["step"], state.get("history", [])
            self.acc.print(f"resumed from {ckpt} at step {self.start_step}")
        self.log = MetricsLogger(self.acc, r.train.output_dir, history, config=recipe_to_dict(r))
        self._step_metrics: dict = {}
        self._said_gather = False

    # ------------------------------------------------------------------------------------------- setup

    def _check(self, model) -> None:
        r = self.recipe
        if r.grpo.num_generations < 2:
            raise ConfigError("grpo.num_generations must be >= 2: advantages are relative to the group")
        if r.train.batch_size % r.train.gradient_accumulation_steps:
            raise ConfigError(f"train.batch_size ({r.train.batch_size} prompts) must be divisible by "
                              f"train.gradient_accumulation_steps ({r.train.gradient_accumulation_steps}): "
                              f"micro-batches hold whole groups")
        if r.grpo.filter_zero_std and self.acc.num_processes > 1:
            raise ConfigError("grpo.filter_zero_std drops a different number of groups on each process, which "
                              "then run different numbers of forwards (a hang under DeepSpeed); set it false or "
                              "run one process")
        if r.grpo.loss_type == "spg" and r.grpo.beta != 0:
            raise ConfigError("grpo.loss_type=spg has no KL term (as SPG); set grpo.beta=0")
        check_config(r.rollout, self.traits, model, prompt_len=1, has_policy=r.rollout.order == "policy")
        if not r.order_policy.train_model and r.rollout.order != "policy":
            raise ConfigError("order_policy.train_model=false trains only a learned unmasking order: set "
                              "rollout.order=policy (or drop the key to train the model)")
        if r.rollout.order == "policy":
            if r.estimator.name != "trajectory" or r.rollout.order_temperature <= 0:
                raise ConfigError("rollout.order=policy trains the learned order by the Plackett-Luce log-prob of "
                                  "sampled orders: set estimator.name=trajectory and rollout.order_temperature > 0 "
                                  "(e.g. 0.1; eval.order_temperature=0 evaluates the greedy order)")
            if self.acc.num_processes > 1 or r.train.deepspeed:
                raise ConfigError("rollout.order=policy runs on one process without DeepSpeed for now (the order "
                                  "head is outside the prepared model); launch without deepspeed/accelerate "
                                  "or pick another rollout.order")
        if r.estimator.name == "trajectory" and r.rollout.order == "low_confidence" and r.rollout.temperature > 0:
            self.acc.print("note: estimator.name=trajectory with rollout.order=low_confidence and temperature > 0: "
                           "positions are picked by their sampled token, so the replayed likelihood is not the "
                           "rollout's probability and its gradient is not the policy gradient "
                           "(estimators/trajectory.py); rollout.order=top_prob decodes the same when greedy and "
                           "keeps it exact")

    def _order_policy(self, model):
        """The learned unmasking-order head (rollout.order=policy): the one saved beside model.path when there
        is one (continuing a run's final/), else a fresh head that decodes like order_policy.base."""
        if self.recipe.rollout.order != "policy":
            return None
        path, c = self.recipe.model.path, self.recipe.order_policy
        device = next(unwrap(model).parameters()).device
        path = resolve_model_dir(path) if path and Path(path).is_dir() else path
        if path and (Path(path) / ORDER_POLICY_FILE).is_file():
            self.acc.print(f"order policy: loaded from {Path(path) / ORDER_POLICY_FILE}")
            return OrderHead.load(path).to(device).train()
        cfg = OrderHeadConfig(hidden_size=unwrap(model).config.hidden_size, width=c.width, heads=c.heads,
                              base=c.base)
        with torch.random.fork_rng(devices=[]):  # the same initial head for the same train.seed
            torch.manual_seed(self.recipe.train.seed)
            return OrderHead(cfg).to(device)

    def _reference(self, model):
        """(reference module or None, mode): none when beta == 0; LoRA models reuse their base."""
        r = self.recipe.grpo
        mode = r.reference
        if r.beta == 0 or mode == "none":
            return None, "none"
        if self.recipe.rollout.order == "policy" and not self.recipe.order_policy.train_model:
            return None, "none"  # the model cannot move from its reference: the KL (same head) is 0
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

    def _generation_context(self):
        """The bare policy to decode with; ZeRO-3 shards parameters: they are gathered once for the whole
        rollout phase, not per forward (runtime.generation_model)."""
        if zero_stage(self.acc) == 3 and not self._said_gather:
            self.acc.print("ZeRO-3: the policy's parameters are gathered once per rollout phase, not per forward")
            self._said_gather = True
        return generation_model(self.acc, self.model)

    def rollout(self, examples: list[dict], step: int):
        G = self.recipe.grpo.num_generations
        prompts = [ex["prompt"] for ex in examples for _ in range(G)]
        # one generator for every rank: rollouts are batch-invariant (a completion depends on its prompt and the
        # generator only), so each rank decodes exactly the rows one process with the global batch would
        with torch.no_grad(), self._generation_context() as model:
            batch = generate(model, self.tokenizer, prompts, self.recipe.rollout,
                             generator=step_generator(self.recipe.train.seed, step, "rollout"),
                             order_policy=self.order_policy)
        return batch, prompts

    def reward(self, batch, prompts, examples, step: int):
        G = self.recipe.grpo.num_generations
        columns = {k: [ex[k] for ex in examples for _ in range(G)] for k in examples[0]}
        ids = [row[m.bool()].tolist() for row, m in zip(batch.completion_ids.cpu(), batch.completion_mask.cpu())]
        state = TrainerState(global_step=step, max_steps=self.recipe.train.max_steps)
        rewards, per_fn = compute_rewards(self.rewards, prompts, batch.completions, ids, columns, state,
                                          log_metric=lambda name, value: self._step_metrics.__setitem__(name, value))
        names = [rw.name for rw in self.rewards]
        if self.task.reward in names:
            correct = per_fn[names.index(self.task.reward)]
        else:
            from ..rewarding import Reward, resolve_reward

            verifier = [Reward(self.task.reward, resolve_reward(self.task.reward))]
            correct = compute_rewards(verifier, prompts, batch.completions, ids, columns)[0]
        return rewards, per_fn, correct

    def advantages(self, rewards: torch.Tensor) -> torch.Tensor:
        g = self.recipe.grpo
        adv = self.advantage_fn(rewards, g.num_generations)
        return scale(adv, rewards, g.num_generations, g.scale_rewards)

    def draw_noise(self, batch, full, g: torch.Generator):
        """One inner iteration's noise, drawn for the global batch `full` (gather_batch) and sliced to this
        rank's rows: what one process holding every rank's rows draws. Prompt masks keep their last columns
        (prompts are left-padded)."""
        r = self.recipe
        noise = self.estimator.draw(full, r.estimator, r.rollout, self.traits, g)
        if full is batch:
            return noise
        n, rank = len(batch.completions), self.acc.process_index
        noise = noise.select(torch.arange(rank * n, (rank + 1) * n))
        if noise.prompt_masks is not None:
            noise = replace(noise, prompt_masks=noise.prompt_masks[..., -batch.prompt_ids.shape[1]:])
        return noise

    def _estimate(self, model, batch, noise, grad: bool):
        extra = {} if self.order_policy is None else {"order_policy": self.order_policy}
        with torch.set_grad_enabled(grad):
            return self.estimator.estimate(model, batch, noise.to(self.acc.device), self.traits,
                                           self.recipe.estimator, self.recipe.rollout, **extra)

    def _ref_estimate(self, batch, noise):
        if self.ref_mode == "none":
            return None
        if self.ref_mode == "adapter_disabled":
            with self.acc.unwrap_model(self.model).disable_adapter():
                return self._estimate(self.model, batch, noise, grad=False).logps
        return self._estimate(self.ref, batch, noise, grad=False).logps

    def _micro_batches(self, n: int):
        G = self.recipe.grpo.num_generations
        per = n // G // self.recipe.train.gradient_accumulation_steps * G  # whole groups per micro-batch
        for start in range(0, n, max(per, G)):
            yield torch.arange(start, min(start + max(per, G), n))

    def loss(self, mb, noise, old=None, ref=None):
        """(loss, stats) of the GRPO objective on micro-batch `mb` (advantages set) under `noise`, with the
        policy's estimate under grad; old = None: the policy's own detached estimate (ratio 1, mu = 1)."""
        est = self._estimate(self.model, mb, noise, grad=True)
        inputs = LossInputs(est.logps, est.logps.detach() if old is None else old, ref, mb.advantages,
                            mb.completion_mask.float(), self.recipe.grpo.num_generations, est.upper)
        return self.loss_fn(inputs, self.recipe.grpo)

    def _check_finite(self, loss, stats: dict):
        """Stop before a non-finite loss reaches the weights (the last checkpoint stays intact)."""
        if not (bad := processes_with_non_finite(self.acc, loss)):
            return
        e = self.recipe.estimator
        shown = ", ".join(f"{k}={v:.4g}" for k, v in stats.items() if isinstance(v, float))
        hint = (f" The {e.name} estimator weights masked tokens by 1/t (1/(1-t) too when coupled), which can overflow "
                f"the KL term near t=0 or 1: set estimator.t_min=1e-3 (now {e.t_min}) and, if coupled, "
                f"estimator.t_max=0.999 (now {e.t_max}), or lower grpo.beta / optim.lr."
                if e.name in ("elbo", "block_elbo") else " Lower optim.lr or grpo.beta, or check the rewards.")
        raise DllmRlError(f"GRPO: the loss is not finite on {bad} process(es) (here {loss.item()}; "
                          f"{shown}); no update was applied and the last checkpoint is intact.{hint} Resume with the "
                          f"same command after changing the recipe.")

    def update(self, batch, noises, olds, refs) -> dict:
        """num_iterations passes over the batch, one optimizer step each (TRL's num_iterations)."""
        stats = defaultdict(list)
        for noise, old, ref in zip(noises, olds, refs):
            for rows in self._micro_batches(len(batch.completions)):
                mb = batch.select(rows).to(self.acc.device)
                with self.acc.accumulate(self.model):
                    loss, s = self.loss(mb, noise.select(rows), None if old is None else old[rows.to(old.device)],
                                        None if ref is None else ref[rows.to(ref.device)])
                    self._check_finite(loss, s)
                    self.acc.backward(loss)
                    if self.acc.sync_gradients and self.recipe.optim.max_grad_norm > 0:
                        if any(p.requires_grad for p in self.model.parameters()):
                            stats["grad_norm"].append(float(self.acc.clip_grad_norm_(
                                self.model.parameters(), self.recipe.optim.max_grad_norm)))
                        if self.order_policy is not None:
                            stats["order_policy/grad_norm"].append(float(torch.nn.utils.clip_grad_norm_(
                                self.order_policy.parameters(), self.recipe.optim.max_grad_norm)))
                    self.optimizer.step()
                    self.optimizer.zero_grad()
                stats["loss"].append(loss.item())
                for k, v in s.items():
                    stats[k].append(v)
            self.scheduler.step()
        return {k: sum(v) / len(v) for k, v in stats.items()}

    def estimator_std(self, batch, g: torch.Generator, draws: int = 4) -> float:
        """Std of the sequence log-likelihood estimate across fresh noise draws (mean over sequences)."""
        rows = next(self._micro_batches(len(batch.completions)))
        mb = batch.select(rows).to(self.acc.device)
        seq = []
        for _ in range(draws):
            noise = self.estimator.draw(mb, self.recipe.estimator, self.recipe.rollout, self.traits, g)
            est = self._estimate(self.model, mb, noise, grad=False)
            seq.append((est.logps * mb.completion_mask).sum(-1))
        return torch.stack(seq).std(0).mean().item()

    # -------------------------------------------------------------------------------------------- loop

    def step(self, step: int) -> dict:
        r, t = self.recipe, {}
        self._step_metrics = {}
        rank, world = self.acc.process_index, self.acc.num_processes
        examples = [self.task.train[i] for i in self.sampler.indices(step, r.train.batch_size, rank, world)]
        g = step_generator(r.train.seed, step, "noise")  # the same on every rank: noise is drawn globally

        t0 = time.perf_counter()
        batch, prompts = self.rollout(examples, step)  # RolloutBatch of B*G completions
        t["rollout"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        rewards, per_fn, correct = self.reward(batch, prompts, examples, step)
        everyone = gather_rows(self.acc, rewards)  # [world*B*G] the global batch's rewards, in rank order
        batch.rewards = rewards
        batch.advantages = self.advantages(everyone)[rank * len(rewards):(rank + 1) * len(rewards)]
        t["reward"] = time.perf_counter() - t0
        if r.grpo.filter_zero_std:
            keep = (~zero_std_groups(rewards, r.grpo.num_generations)).nonzero().squeeze(-1)
            batch = batch.select(keep) if len(keep) else None

        t0 = time.perf_counter()
        noises, olds, refs = [], [], []
        if batch is not None:
            full = gather_batch(self.acc, batch)
            for _ in range(r.grpo.num_iterations):
                noise = self.draw_noise(batch, full, g)
                noises.append(noise)
                need_old = r.grpo.num_iterations > 1
                olds.append(self._batched(self.model, batch, noise) if need_old else None)
                refs.append(self._batched_ref(batch, noise))
        t["estimate"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        stats = self.update(batch, noises, olds, refs) if batch is not None else {"skipped": 1.0}
        t["update"] = time.perf_counter() - t0

        tokens = float(batch.completion_mask.sum()) if batch is not None else 0.0
        correct, per_fn = gather_rows(self.acc, correct), [gather_rows(self.acc, v) for v in per_fn]
        out = {"reward": everyone.mean().item(), "reward_std": everyone.std().item(),
               # TRL's name: the share of groups whose rewards are all equal, i.e. that give no signal
               "frac_reward_zero_std": zero_std_groups(everyone, r.grpo.num_generations).float().mean().item(),
               "accuracy": correct.nanmean().item(), **stats, **self._step_metrics,
               "completion_length": tokens / max(len(batch.completions), 1) if batch is not None else 0.0}
        for rw, values in zip(self.rewards, per_fn):
            out[f"rewards/{rw.name}/mean"] = values.nanmean().item()
            out[f"rewards/{rw.name}/std"] = values[~values.isnan()].std().item() if (~values.isnan()).sum() > 1 \
                else 0.0
        committed = float(batch.stats.get("committed_tokens", 0)) if batch is not None else 0.0
        out["tokens_per_s/rollout"] = committed / max(t["rollout"], 1e-9)
        passes = max(1, r.grpo.num_iterations)
        out["tokens_per_s/estimate"] = tokens * passes / max(t["estimate"], 1e-9) if t["estimate"] > 1e-3 else 0.0
        out["tokens_per_s/update"] = tokens * passes / max(t["update"], 1e-9)
        out.update({f"seconds/{k}": v for k, v in t.items()})
        if batch is not None and (step + 1) % r.train.logging_steps == 0:
            out["estimator_std"] = self.estimator_std(batch, g)
        return out

    def _batched(self, model, batch, noise):
        """No-grad estimate over the batch in micro-batches: [N, Lc] on the device."""
        parts = [self._estimate(model, batch.select(rows).to(self.acc.device), noise.select(rows), grad=False).logps
                 for rows in self._micro_batches(len(batch.completions))]
        return torch.cat(parts)

    def _batched_ref(self, batch, noise):
        if self.ref_mode == "none":
            return None
        return torch.cat([self._ref_estimate(batch.select(rows).to(self.acc.device), noise.select(rows))
                          for rows in self._micro_batches(len(batch.completions))])

    def evaluate(self) -> float:
        with self._generation_context() as model:  # every rank decodes the held-out set on gathered weights
            return evaluate_recipe(model, self.tokenizer, self.task, self.recipe,
                                   order_policy=self.order_policy)["accuracy"]

    def train(self) -> dict:
        r = self.recipe.train
        history = self.log.history
        before = next((h["eval_accuracy"] for h in history if h["step"] == 0 and "eval_accuracy" in h), None)
        if before is None:
            before = self.evaluate()
            self.log.log(0, {"eval_accuracy": before})
        # a context manager closes the bar on errors too, so the CLI's error line starts on a line of its own
        with tqdm(total=r.max_steps, initial=self.start_step, disable=not self.acc.is_main_process,
                  desc="grpo") as bar:
            window = defaultdict(list)
            for step in range(self.start_step, r.max_steps):
                for k, v in self.step(step).items():
                    window[k].append(v)
                done = step + 1
                bar.update(1)
                bar.set_postfix(reward=f"{window['reward'][-1]:.3f}")
                if done % r.logging_steps == 0 or done == r.max_steps:
                    self.log.log(done, {k: sum(v) / len(v) for k, v in window.items()})
                    window = defaultdict(list)
                if (r.eval_steps and done % r.eval_steps == 0) and done != r.max_steps:
                    self.log.log(done, {"eval_accuracy": self.evaluate()})
                if (r.save_steps and done % r.save_steps == 0) or done == r.max_steps:
                    save_checkpoint(r.output_dir, done, self.acc, self.model, self.tokenizer, self.recipe,
                                    {"history": self.log.history}, keep=r.save_total_limit,
                                    order_policy=self.order_policy)
        after = self.evaluate()
        self.log.log(r.max_steps, {"eval_accuracy": after})
        final = save_final(r.output_dir, self.acc, self.model, self.tokenizer, self.recipe,
                           order_policy=self.order_policy)
        if self.acc.is_main_process:
            plot_curves(self.log.history, [final / "reward_curve.png", f"{r.output_dir}/reward_curve.png"])
        self.log.close()
        self.acc.print(f"held-out accuracy: before {before:.3f} -> after {after:.3f} "
                       f"({100 * (after - before):+.1f} points); model and reward curve in {final}")
        return {"before": before, "after": after, "final": str(final)}


def gather_batch(accelerator, batch: RolloutBatch) -> RolloutBatch:
    """Every rank's rollouts as one batch in rank order (the rows one process decoding all prompts holds), to
    draw noise for; prompts are re-padded on the left to the longest. The batch itself with one process."""
    if accelerator.num_processes == 1:
        return batch
    from accelerate.utils import gather_object

    parts = gather_object([batch.to("cpu")])
    P = max(b.prompt_ids.shape[1] for b in parts)
    S = max(b.trace.order_logprob.shape[1] for b in parts)
    first = torch.tensor([0] + [len(b.completions) for b in parts[:-1]]).cumsum(0)  # row offset of each rank

    def cat(get):
        return torch.cat([get(b) for b in parts])

    def left(t):  # pad [n, p] -> [n, P] on the left (values under prompt_mask 0 are never read)
        return torch.nn.functional.pad(t, (P - t.shape[1], 0))

    def right(t):  # pad [n, s] -> [n, S] on the right (steps a row never took)
        return torch.nn.functional.pad(t, (0, S - t.shape[1]))

    trace = Trace(cat(lambda b: b.trace.commit_step), cat(lambda b: b.trace.token_logprob),
                  cat(lambda b: right(b.trace.order_logprob)),
                  cat(lambda b: b.trace.num_steps),
                  torch.cat([b.trace.events + torch.tensor([int(o), 0, 0, 0, 0]) for b, o in zip(parts, first)]),
                  cat(lambda b: b.trace.event_logprob), batch.trace.mask_token_id)
    return RolloutBatch(cat(lambda b: left(b.prompt_ids)), cat(lambda b: left(b.prompt_mask)),
                        cat(lambda b: b.completion_ids), cat(lambda b: b.completion_mask),
                        [c for b in parts for c in b.completions], trace)
