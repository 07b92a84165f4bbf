"""DPO for diffusion LMs: one loop of named phases over preference pairs scored by a likelihood estimator.

    pairs (offline file, or on-policy: best vs worst of G samples) -> reference estimates -> update -> log

DPO (arXiv 2305.18290) with each log pi(y | x) replaced by an estimate under explicit noise (estimators.ESTIMATORS:
quadrature = GDPO's Gauss-Legendre ELBO arXiv 2510.08554, elbo = the Monte Carlo ELBO, one_step, block_elbo, and,
for on-policy pairs, trajectory). The losses and TRL's metrics are algorithms.dpo. Config names follow TRL 1.16's
DPOConfig; the estimate's knobs live in `estimator`.

VRPO (LLaDA 1.5, arXiv 2505.19223) is three recipe switches, each measurable alone (benchmarks/dpo_variance.py):
- allocation: a budget of n forwards per ELBO spent as n timesteps with one mask each
  (estimator.num_samples=n, estimator.masks_per_timestep=1, the elbo estimator's default allocation);
- antithetic sharing (dpo.antithetic, default true): the policy and the reference are scored under the same
  timesteps and masks for the same completion, so their difference, the DPO log-ratio, loses the noise they share;
- pair noise (dpo.pair_noise=shared, an ablation beyond VRPO, which shares noise only within a completion): chosen
  and rejected are scored under the same noise. Both are laid on the same canvas of rollout.max_completion_length
  positions, so "the same noise" is well defined whatever their lengths: the same timesteps (or quadrature nodes)
  and the same uniform per canvas position, hence the same masked positions; each completion is then summed over
  its own tokens.

Noise is seeded per example, deterministically: the generator of a row is a hash of (train.seed, the pair's key,
its role, the draw), where the key is the dataset row (offline) or (step, prompt slot) (on-policy) and the draw is
the epoch in which an offline pair is seen. With dpo.precompute_ref_log_probs the draw is always 0: the reference
is scored once per pair (cached in train.output_dir/ref_logps.pt with a fingerprint of everything the values
depend on: the pairs, the model section and its weights (weights_identity), precision, estimator and noise) and
the policy sees those very masks in every epoch, so the cached values equal the on-the-fly ones
(tests/trainers/test_dpo.py). Noise does not depend on the batch a pair lands in, the micro-batching or the
number of processes.

On-policy pairs can also train the learned unmasking order (rollout.order=policy, policy.OrderHead, as GRPO's main
job does): a pair's trajectory score then includes each step's Plackett-Luce order log-prob under the head, and
the reference is the head as the run started (with order_policy.train_model=false, also the unchanged model, so
the preference is between orders alone). dpo.pairs_per_prompt > 1 takes several disjoint pairs per prompt (the
i-th best against the i-th worst), so more of the G samples carry signal.

The reference is the adapter-disabled base under LoRA or a frozen copy of the starting model (trainers.common,
shared with GRPO). With dpo.sync_ref_model (TRL's TR-DPO, arXiv 2404.09656) it trails the policy: after
every ref_model_sync_steps-th optimizer step, ref <- alpha * policy + (1 - alpha) * ref (the model copy and the
reference order head alike), and it is checkpointed, so a resumed run continues from where it had moved. Dropout
is disabled in the policy (TRL's disable_dropout default), so that at the start the policy and the reference give
the same estimate under the same noise and the preference score is exactly 0 (not when model.path is a LoRA
checkpoint: its reference is the base the adapters were trained from, where the run starts from the adapters).

    dllm-rl train recipes/tiny/sudoku-dpo.yaml [dpo.beta=0.2 estimator.name=quadrature ...]
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch
from accelerate.utils import broadcast_object_list
from transformers import TrainerState

from ..algorithms.dpo import PreferenceInputs, check, dpo_loss, preference_metrics
from ..batches import RolloutBatch, SequenceBatch
from ..config import Recipe, RewardSpec, recipe_to_dict
from ..errors import ConfigError, DllmRlError
from ..estimators import Noise, build_estimator
from ..evaluate import evaluate_recipe
from ..metrics import throughput_metrics
from ..models.base import peft_of
from ..models.load import adapter_base_path, recipe_tokenizer
from ..policy import ORDERS, order_head_for
from ..rewards.plugins import build_rewards, compute_rewards, verifier_scores
from ..rollout import generate
from ..rollout.branch import nearest_branches
from ..rollout.engine import check_config, decoding
from ..runtime import (
    EpochSampler,
    WholeState,
    advance_schedule,
    generation_model,
    prepare_frozen,
    processes_with_non_finite,
    step_generator,
)
from ..tasks.preference import collate_pairs, load_preferences, prepare_preferences, tokenize_preferences
from .common import PhaseTimer, Run, check_learned_order, reference_model
from .grpo_options import ReferenceSync

CACHE_FILE = "ref_logps.pt"


def example_generator(seed: int, key: str) -> torch.Generator:
    """The generator of one row's noise: a hash of (seed, key), independent across keys."""
    digest = hashlib.sha256(f"dpo:{seed}:{key}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _row_view(batch, j: int):
    """Row j alone, its prompt without left padding (so a prompt mask is drawn for the prompt's own length)."""
    view = batch.select(torch.tensor([j]))
    p = int(view.prompt_mask.sum())
    P = view.prompt_ids.shape[1]
    return replace(view, prompt_ids=view.prompt_ids[:, P - p :], prompt_mask=view.prompt_mask[:, P - p :])


def concat_noise(parts: list[Noise], P: int) -> Noise:
    """Per-row noises [K_j, 1, ...] as one [K, N, ...]: views padded to the most (masks off, weight 0), prompt masks
    padded on the left to the batch's prompt length P."""
    K = max(n.num_views for n in parts)

    def views(t, fill):
        return torch.cat([t, torch.full((K - t.shape[0], *t.shape[1:]), fill, dtype=t.dtype)]) if t.shape[0] < K else t

    masks = torch.cat([views(n.completion_masks, False) for n in parts], 1)
    weights = torch.cat([views(n.weights, 0) for n in parts], 1)
    prompt = None
    if any(n.prompt_masks is not None for n in parts):
        prompt = torch.zeros(K, len(parts), P, dtype=torch.bool)
        for j, n in enumerate(parts):
            if n.prompt_masks is not None and n.prompt_masks.shape[2]:
                prompt[: n.num_views, j, P - n.prompt_masks.shape[2] :] = n.prompt_masks[:, 0]
    tokens = None
    if any(n.tokens is not None for n in parts):
        raise DllmRlError("concat_noise: per-row noise with view canvases (tokens) is not supported")
    return Noise(masks, prompt, weights, tokens)


def weights_identity(model, cfg, passed: bool) -> str:
    """What identifies the starting weights (hence the reference's): for a model passed in Python, or the tiny
    model built from the recipe, a hash of its parameters' bytes; for a local directory (a LoRA checkpoint's base
    too) the names, sizes and modification times of its files; for a hub id the commit transformers loaded."""
    from ..rundir import resolve_model_dir

    h = hashlib.sha256()
    if passed or cfg.path is None:
        for name, p in sorted(model.state_dict().items()):  # the bytes: sums and norms miss permuted entries
            h.update(f"{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()
    directory = Path(resolve_model_dir(cfg.path))
    dirs = [directory] if directory.is_dir() else []
    if (directory / "adapter_config.json").is_file():
        dirs += [Path(b)] if Path(b := resolve_model_dir(adapter_base_path(directory))).is_dir() else []
    for d in dirs:
        for f in sorted(d.iterdir()):
            if f.is_file():
                st = f.stat()
                h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    config = getattr(model, "config", None)
    h.update(str(getattr(config, "_commit_hash", None)).encode())  # a hub model's revision
    return h.hexdigest()


class DPOTrainer:
    """`DPOTrainer(recipe, train_dataset=None, reward_funcs=None).train()`: DPO of the recipe's model on offline
    pairs (dpo.dataset_name, or `train_dataset` in TRL's format) or on-policy pairs (dpo.pairs=on_policy, scored by
    the recipe's rewards, the task's verifier by default, plus reward_funcs)."""

    def __init__(self, recipe: Recipe, train_dataset=None, reward_funcs=None, model=None, tokenizer=None, task=None):
        from trl.trainer.utils import disable_dropout_in_model

        self.recipe = r = recipe
        self.d = d = r.dpo
        check(d)
        self._check_recipe(train_dataset)  # what the recipe alone decides, and the preference data, before a model
        where = "train_dataset" if train_dataset is not None else f"dpo.dataset_name {d.dataset_name!r}"
        self.canvas = r.rollout.max_completion_length
        data, self.pairs = None, None
        if d.pairs == "offline":
            data = (
                train_dataset if train_dataset is not None else load_preferences(d.dataset_name, d.dataset_train_split)
            )
            data = prepare_preferences(data, where)
            if tokenizer is not None or model is None:  # tokenized (and every row checked) before a model is built
                self._tokenize(data, tokenizer or recipe_tokenizer(r.model), where)
        self.run = run = Run(r, model, tokenizer, task)
        if d.precompute_ref_log_probs:  # what the cached reference estimates were computed from, before prepare
            self._weights = weights_identity(run.model, r.model, passed=model is not None)
        self.acc, self.task, self.tokenizer, self.traits = run.acc, run.task, run.tokenizer, run.traits
        self.estimator = build_estimator(r.estimator, self.traits)
        self._check(run.model)
        if d.disable_dropout:
            disable_dropout_in_model(run.model)
        # rollout.order=policy: the learned unmasking order (policy.OrderHead), trained by the preference between
        # the orders of chosen and rejected rollouts; its reference is the head as the run starts
        self.order_policy = order_head_for(r.rollout.order, run.model, r.model.path, r.order_policy, r.train.seed)
        self.ref_order_policy = None
        if self.order_policy is not None:
            self.order_policy.train()  # as in GRPO: it decodes and is scored in the mode it trains in
            self.ref_order_policy = copy.deepcopy(self.order_policy).requires_grad_(False)
            if not r.order_policy.train_model:
                run.model.requires_grad_(False)  # no model gradients are computed at all, not just not applied
        self.rewards = []
        if d.pairs == "offline":
            if self.pairs is None:  # a model passed in without its tokenizer: the run's
                self._tokenize(data, self.tokenizer, where)
            if self._cut:
                self.acc.print(
                    f"note: {self._cut} of {len(self.pairs)} pairs have a completion longer than the canvas "
                    f"(rollout.max_completion_length={self.canvas}); they are cut there (keep_start)"
                )
            self.sampler = EpochSampler(len(self.pairs), r.train.seed, shuffle=r.train.shuffle_dataset)
        else:
            self.pairs = []
            self.rewards = build_rewards(
                r.rewards or ([] if reward_funcs else [RewardSpec(self.task.reward)]), reward_funcs
            )
            self.sampler = EpochSampler(len(self.task.train), r.train.seed, shuffle=r.train.shuffle_dataset)
        if self.order_policy is not None and not r.order_policy.train_model:
            self.ref, self.ref_mode = None, "same_model"  # only the head moves: the model is its own reference
        else:
            self.ref, self.ref_mode = reference_model(r, run.model, d.reference, "dpo.reference")
        self.ref_sync = None
        if d.sync_ref_model:  # TR-DPO: the reference (model copy and head; the head alone when same_model) trails
            self.ref_sync = ReferenceSync(d, self.ref_mode, "dpo", movable=("frozen_copy", "same_model"))
        params = [{"params": [p for p in run.model.parameters() if p.requires_grad]}]
        checkpointed = ()
        if self.order_policy is not None:  # its own parameter group: a fresh head wants a larger step
            params.append({"params": list(self.order_policy.parameters()), "lr": r.order_policy.lr})
            checkpointed = (self.order_policy,)
        if self.ref_sync is not None:  # a reference that moves is state
            checkpointed += tuple(WholeState(m) for m in (self.ref, self.ref_order_policy) if m is not None)
        run.prepare(params, r.train.max_steps, checkpointed)
        self.model, self.optimizer, self.scheduler, self.log = run.model, run.optimizer, run.scheduler, run.log
        if self.ref is not None:
            self.ref = prepare_frozen(self.acc, self.ref)
        self.ref_cache = self.precompute() if d.precompute_ref_log_probs and not run.finished else None

    # ------------------------------------------------------------------------------------------- setup

    def _tokenize(self, data, tokenizer, where: str) -> None:
        self.pairs, self._cut = tokenize_preferences(data, tokenizer, self.canvas, self.d, where)

    def _check_recipe(self, train_dataset) -> None:
        """The cross-section rules of a DPO recipe that need no model, before one is built."""
        r, d = self.recipe, self.d
        k = r.train.gradient_accumulation_steps
        if d.pairs == "offline":
            if d.dataset_name is None and train_dataset is None:
                raise ConfigError(
                    "dpo.pairs=offline needs preference data: set dpo.dataset_name (a hub dataset or a local "
                    ".json/.jsonl/.parquet with prompt/chosen/rejected), pass train_dataset=, or set "
                    "dpo.pairs=on_policy to mine pairs from the model's own samples"
                )
            if r.train.batch_size % k:
                raise ConfigError(
                    f"train.batch_size ({r.train.batch_size} pairs) must be divisible by "
                    f"train.gradient_accumulation_steps ({k})"
                )
            if build_estimator(r.estimator, None).replays_orders:
                raise ConfigError(
                    f"estimator.name={r.estimator.name} replays a rollout's trace, which offline pairs do not have; "
                    f"use estimator.name=quadrature or elbo (or dpo.pairs=on_policy)"
                )
        else:
            if d.num_generations < 2:
                raise ConfigError("dpo.num_generations must be >= 2: a pair is the best and worst of the samples")
            if d.precompute_ref_log_probs:
                raise ConfigError(
                    "dpo.precompute_ref_log_probs needs a fixed dataset; on-policy pairs are new every step: set it "
                    "false or use dpo.pairs=offline"
                )

    def _check(self, model) -> None:
        """The cross-section rules of a DPO recipe that need the model or the processes, before anything is
        trained."""
        r, d = self.recipe, self.d
        if d.pairs != "offline":
            if self.acc.num_processes > 1:
                raise ConfigError(
                    f"dpo.pairs={d.pairs} keeps a different number of pairs on each process, which would then run "
                    "different numbers of forwards (a hang); run one process or use dpo.pairs=offline"
                )
        if d.pairs == "branch" and self.traits.attention != "bidirectional":
            raise ConfigError(
                "dpo.pairs=branch reads each greedy decision's state with one full forward, which needs a "
                "bidirectional model; this one is block-causal: use dpo.pairs=on_policy"
            )
        learned = ORDERS[r.rollout.order].needs_hidden
        if learned:  # offline pairs with estimator.name=trajectory were refused above
            check_learned_order(r, self.estimator, self.acc)
        check_config(r.rollout, self.traits, model, prompt_len=1, has_policy=learned)
        for note in self.estimator.check(decoding(r.rollout)):
            self.acc.print(f"note: {note}")

    # ------------------------------------------------------------------------------------------- noise

    def noise_keys(self, keys: list[str], role: str, draw: str = "") -> list[str]:
        """Noise keys of the rows [chosen; rejected] of pairs `keys` for `role` (policy or reference); `draw` tells
        extra draws (the logged score std) from the training noise."""
        ref = ":ref" if role == "reference" and not self.d.antithetic else ""
        rejected = "chosen" if self.d.pair_noise == "shared" else "rejected"
        return [f"{k}:chosen{ref}{draw}" for k in keys] + [f"{k}:{rejected}{ref}{draw}" for k in keys]

    def draw_noise(self, batch, keys: list[str]) -> Noise:
        """The noise of every row of `batch`, each drawn from its own key's generator (batch-invariant)."""
        if self.estimator.replays_orders:  # the trajectory estimator's views are the trace's: no randomness
            return self.estimator.draw(batch, None)
        seed = self.recipe.train.seed
        parts = [self.estimator.draw(_row_view(batch, j), example_generator(seed, k)) for j, k in enumerate(keys)]
        return concat_noise(parts, batch.prompt_ids.shape[1])

    # ----------------------------------------------------------------------------------------- scoring

    def counted(self, batch, noise) -> torch.Tensor:
        """[N, *] the entries a sequence estimate sums: those the estimator scores where it decides them (the
        trajectory estimator: every decision of the rollout, EOS padding included, so the estimate is the rollout's
        probability), else each completion's tokens up to its first EOS."""
        mask = self.estimator.counted(batch, noise)
        return batch.completion_mask if mask is None else mask

    def sequence_scores(self, model, batch, noise, grad: bool, order_policy=None) -> torch.Tensor:
        """Sequence estimates [N]: the estimator's per-token estimates summed over the entries it counts (times the
        completion length for block_elbo, whose estimates are at SPG's per-token scale: never length-normalised).
        With an order head (rollout.order=policy) the trajectory estimate includes each step's order log-prob."""
        with torch.set_grad_enabled(grad):  # every estimator takes order_policy (those without an order ignore it)
            est = self.estimator.estimate(model, batch, noise.to(self.acc.device), order_policy=order_policy)
            seq = (est.logps * self.counted(batch, noise).to(est.logps.device)).sum(-1)
            if self.estimator.per_token_mean:
                seq = seq * batch.completion_mask.sum(-1).clamp(min=1).to(seq.device)
            return seq

    def policy_scores(self, batch, noise, grad: bool) -> torch.Tensor:
        return self.sequence_scores(self.model, batch, noise, grad, self.order_policy)

    def reference_scores(self, batch, noise) -> torch.Tensor:
        """The reference's sequence estimates [N], without gradient (with the order head as the run started)."""
        head = self.ref_order_policy
        if self.ref_mode == "adapter_disabled":
            with peft_of(self.acc.unwrap_model(self.model)).disable_adapter():
                return self.sequence_scores(self.model, batch, noise, grad=False, order_policy=head)
        model = self.model if self.ref_mode == "same_model" else self.ref
        return self.sequence_scores(model, batch, noise, grad=False, order_policy=head)

    def _chunks(self, n: int) -> list[torch.Tensor]:
        """Pair indices of each micro-batch: train.gradient_accumulation_steps parts (some empty when n is small)."""
        return list(torch.arange(n).tensor_split(self.recipe.train.gradient_accumulation_steps))

    @staticmethod
    def _rows(pairs: torch.Tensor, n: int) -> torch.Tensor:
        return torch.cat([pairs, pairs + n])  # the chosen rows, then their rejected rows

    def _no_grad_scores(self, fn, batch, noise, n: int) -> torch.Tensor:
        out = torch.zeros(2 * n)
        for pairs in self._chunks(n):
            if len(pairs):
                rows = self._rows(pairs, n)
                out[rows] = fn(batch.select(rows).to(self.acc.device), noise.select(rows)).float().cpu()
        return out

    # ------------------------------------------------------------------------------------------ phases

    def collate(self, pairs) -> SequenceBatch:
        return collate_pairs(
            [p.prompt_ids for p in pairs],
            [p.chosen_ids for p in pairs],
            [p.rejected_ids for p in pairs],
            self.canvas,
            self.tokenizer.pad_token_id,
            self.tokenizer.eos_token_id,
        )

    def offline_pairs(self, step: int):
        """(batch of 2B rows [chosen; rejected], pair keys, cached reference scores or None, stats). A pair's key is
        its dataset row and the epoch it is seen in (always 0 with precomputed reference estimates)."""
        r = self.recipe.train
        rank, world = self.acc.process_index, self.acc.num_processes
        idx = self.sampler.indices(step, r.batch_size, rank, world)
        first = step * r.batch_size * world + rank * r.batch_size  # position of this rank's first pair in the stream
        epochs = [0 if self.d.precompute_ref_log_probs else (first + j) // len(self.pairs) for j in range(len(idx))]
        keys = [f"pair:{self.pairs[i].index}:{e}" for i, e in zip(idx, epochs)]
        cached = None
        if self.ref_cache is not None:
            cached = torch.cat([self.ref_cache["chosen"][idx], self.ref_cache["rejected"][idx]])
        return self.collate([self.pairs[i] for i in idx]), keys, cached, {}

    def on_policy_pairs(self, step: int):
        """G candidates per prompt, scored by the rewards: the best and the worst of each prompt whose rewards
        differ (ties dropped; among equal rewards the first candidate is taken), and with dpo.pairs_per_prompt = k
        also the i-th best against the i-th worst for i < k while the first scores higher (disjoint pairs). With
        dpo.greedy_candidate the first candidate is the prompt's greedy decode and the other G - 1 are sampled."""
        r, d = self.recipe, self.d
        G = d.num_generations
        examples = [self.task.train[i] for i in self.sampler.indices(step, r.train.batch_size)]
        prompts = [ex["prompt"] for ex in examples for _ in range(G)]
        with torch.no_grad(), generation_model(self.acc, self.model) as model:
            if d.greedy_candidate:
                batch = self.with_greedy(model, [ex["prompt"] for ex in examples], step)
            else:
                batch = generate(
                    model,
                    self.tokenizer,
                    prompts,
                    r.rollout,
                    generator=step_generator(r.train.seed, step, "rollout"),
                    order_policy=self.order_policy,
                )
        columns = {k: [ex[k] for ex in examples for _ in range(G)] for k in examples[0]}
        ids = [row[m.bool()].tolist() for row, m in zip(batch.completion_ids.cpu(), batch.completion_mask.cpu())]
        state = TrainerState(global_step=step, max_steps=r.train.max_steps)
        rewards, per_fn = compute_rewards(self.rewards, prompts, batch.completions, ids, columns, state)
        correct = verifier_scores(
            self.task.reward, self.rewards, per_fn, prompts, batch.completions, ids, columns, trainer_state=state
        )
        R = rewards.view(-1, G)  # [B, G]
        # rank i pairs the i-th best with the i-th worst (stable sorts: among equal rewards the first candidate)
        k = d.pairs_per_prompt
        down, up = R.argsort(dim=1, descending=True, stable=True)[:, :k], R.argsort(dim=1, stable=True)[:, :k]
        slot, rank = (R.gather(1, down) > R.gather(1, up)).nonzero(as_tuple=True)
        best, worst = slot * G + down[slot, rank], slot * G + up[slot, rank]
        by_chosen = best.argsort()  # pairs by prompt, then by the chosen candidate's index
        best, worst, slot, rank = best[by_chosen], worst[by_chosen], slot[by_chosen], rank[by_chosen]
        keys = [f"on_policy:{step}:{s}" + (f":{i}" if i else "") for s, i in zip(slot.tolist(), rank.tolist())]
        pairs = batch.select(torch.cat([best, worst]))
        usable = R.max(1).values > R.min(1).values
        stats = {
            "reward": rewards.mean().item(),
            "accuracy": correct.nanmean().item(),
            "pairs/usable_fraction": usable.float().mean().item(),
            "pairs/reward_margin": (R.view(-1)[best] - R.view(-1)[worst]).mean().item() if keys else 0.0,
            "committed": float(batch.stats.get("committed_tokens", 0)),
        }
        if d.pairs_per_prompt > 1:
            stats["pairs/per_prompt"] = len(keys) / len(examples)
        return pairs, keys, None, stats

    def branch_pairs(self, step: int):
        """Step-level pairs around the greedy decode (rollout.branch): per prompt, the greedy decode against its
        nearest branch (one decision changed to a next most likely token, then greedy again) that scores above it
        (the branch chosen), or else, with dpo.branch_anchors, the nearest that scores below it (the greedy decode
        chosen). The pair shares the decisions before the changed one, whose terms cancel from its trajectory
        score. Both are recorded as the sampler's trajectories (its decoding settings), as with_greedy does."""
        r, d = self.recipe, self.d
        examples = [self.task.train[i] for i in self.sampler.indices(step, r.train.batch_size)]
        prompts = [ex["prompt"] for ex in examples]
        columns = {k: [ex[k] for ex in examples] for k in examples[0]}
        state = TrainerState(global_step=step, max_steps=r.train.max_steps)
        verified = {}

        def score(rows: list[int], batch) -> torch.Tensor:
            ids = [row[m.bool()].tolist() for row, m in zip(batch.completion_ids.cpu(), batch.completion_mask.cpu())]
            cols = {k: [v[i] for i in rows] for k, v in columns.items()}
            p = [prompts[i] for i in rows]
            rewards, per_fn = compute_rewards(self.rewards, p, batch.completions, ids, cols, state)
            if "greedy" not in verified:  # the first call scores the greedy decodes
                verified["greedy"] = verifier_scores(
                    self.task.reward, self.rewards, per_fn, p, batch.completions, ids, cols, trainer_state=state
                )
            return rewards

        with torch.no_grad(), generation_model(self.acc, self.model) as model:
            found = nearest_branches(
                model,
                self.tokenizer,
                prompts,
                r.rollout,
                score,
                d.branch_alternatives,
                d.branch_rounds,
                self.order_policy,
            )
        up = found.branch_reward > found.greedy_reward
        use = up | ((found.branch_reward < found.greedy_reward) & d.branch_anchors)
        slots = use.nonzero().squeeze(-1).tolist()
        keys = [f"branch:{step}:{b}" for b in slots]
        sampler = decoding(r.rollout)
        stats = {
            "reward": found.greedy_reward.mean().item(),  # the greedy decode's, on the training prompts
            "accuracy": verified["greedy"].nanmean().item(),
            "pairs/usable_fraction": len(slots) / len(prompts),
            "pairs/improving_fraction": up.float().mean().item(),
            "pairs/branch_gap": found.gap[use].mean().item() if slots else 0.0,
            "pairs/branches_decoded": found.decoded / len(prompts),
            "committed": float(found.greedy.completion_mask.sum()),
        }
        if not slots:
            return None, keys, None, stats
        greedy = found.greedy.select(torch.tensor(slots))
        branch = found.branches.select(found.branch_index[slots])
        for b in (greedy, branch):
            b.trace = replace(b.trace, decoding=sampler)
        first = up[slots]  # the branch is the chosen where it scores higher
        i, n = torch.arange(len(slots)), len(slots)  # rows of [branches; greedy decodes]
        chosen, rejected = torch.where(first, i, n + i), torch.where(first, n + i, i)
        return RolloutBatch.concat([branch, greedy]).select(torch.cat([chosen, rejected])), keys, None, stats

    def with_greedy(self, model, prompts: list[str], step: int) -> RolloutBatch:
        """[B * G] candidates, G per prompt in order: the greedy decode (temperature 0, the rest of `rollout`: the
        held-out evaluation's decoding at eval.temperature=0), then G - 1 samples. The greedy decode's trace is
        recorded as the sampler's (its decoding settings), so an estimator scores it as what it is, one trajectory
        the training sampler can take (with a state-only order such as top_prob), not as a temperature-0 one."""
        r, G, B = self.recipe.rollout, self.d.num_generations, len(prompts)
        sampled = generate(
            model,
            self.tokenizer,
            [p for p in prompts for _ in range(G - 1)],
            r,
            generator=step_generator(self.recipe.train.seed, step, "rollout"),
        )
        greedy = generate(
            model,
            self.tokenizer,
            prompts,
            replace(r, temperature=0.0),
            generator=step_generator(self.recipe.train.seed, step, "greedy"),  # read only by random orders
        )
        greedy.trace = replace(greedy.trace, decoding=sampled.trace.decoding)
        both = RolloutBatch.concat([greedy, sampled])
        rows = [i for b in range(B) for i in (b, *range(B + b * (G - 1), B + (b + 1) * (G - 1)))]
        out = both.select(torch.tensor(rows))
        out.stats = {k: v + greedy.stats.get(k, 0) for k, v in sampled.stats.items() if isinstance(v, (int, float))}
        return out

    def loss(self, mb, noise, ref: torch.Tensor, n: int) -> tuple[torch.Tensor, dict]:
        """(loss to backward, per-pair metrics [m]) of one micro-batch of m pairs out of the step's n."""
        seq = self.policy_scores(mb, noise, grad=True)  # [2m]
        m = len(seq) // 2
        tokens = self.counted(mb, noise).sum(-1).float().to(seq.device)
        ref = ref.to(seq.device)
        x = PreferenceInputs(seq[:m], seq[m:], ref[:m], ref[m:], tokens[:m], tokens[m:])
        per_pair = dpo_loss(x, self.d)
        # accelerate divides by gradient_accumulation_steps; the step's loss is the mean over its n pairs
        scale = self.recipe.train.gradient_accumulation_steps / n
        return per_pair.sum() * scale, {"loss": per_pair.detach(), **preference_metrics(x, self.d.beta)}

    def update(self, batch, noise, ref: torch.Tensor, n: int, step: int = 0) -> dict:
        """One optimizer step (the run's step-th) over the n pairs, in train.gradient_accumulation_steps
        micro-batches; the step's metrics are means over its pairs. With dpo.sync_ref_model the reference then
        moves toward the policy when the step count calls for it."""
        self.model.train()
        stats, norms = defaultdict(list), []
        for pairs in self._chunks(n):
            with self.acc.accumulate(self.model):
                if len(pairs):
                    rows = self._rows(pairs, n)
                    loss, s = self.loss(batch.select(rows).to(self.acc.device), noise.select(rows), ref[rows], n)
                    if bad := processes_with_non_finite(self.acc, loss):
                        raise DllmRlError(
                            f"DPO: the loss is not finite on {bad} process(es) (here {loss.item()}); no update was "
                            f"applied and the last checkpoint is intact. The elbo estimator weighs masked tokens by "
                            f"1/t: set estimator.t_min=1e-3 or use estimator.name=quadrature, or lower optim.lr / "
                            f"dpo.beta; then resume with the same command"
                        )
                    self.acc.backward(loss)
                    for k, v in s.items():
                        stats[k].append(v)
                max_norm = self.recipe.optim.max_grad_norm
                if self.acc.sync_gradients and max_norm > 0:
                    if any(p.requires_grad for p in self.model.parameters()):
                        norms.append(float(self.acc.clip_grad_norm_(self.model.parameters(), max_norm)))
                    if self.order_policy is not None:  # clipped on its own, as GRPO does
                        head = torch.nn.utils.clip_grad_norm_(self.order_policy.parameters(), max_norm)
                        stats["order_policy/grad_norm"].append(torch.tensor([float(head)]))
                self.optimizer.step()
                self.optimizer.zero_grad()
        self.scheduler.step()
        if self.ref_sync is not None:
            # one optimizer step per trainer step: step + 1 of them so far, counted the same way after a resume
            pairs = (self.model, self.ref), (self.order_policy, self.ref_order_policy)
            self.ref_sync.after_optimizer_step(step + 1, *pairs)
        self.model.eval()
        out = {k: torch.cat(v).float().mean().item() for k, v in stats.items()}
        return {**out, **({"grad_norm": sum(norms) / len(norms)} if norms else {})}

    def score_std(self, batch, keys: list[str], step: int, pairs: int = 8) -> dict:
        """Std over dpo.score_std_draws fresh noise draws of the preference score beta * (d logpi - d logref) and of
        the policy's sequence estimate (GRPO's estimator_std), averaged over up to `pairs` pairs of the step."""
        n, R = len(keys), self.d.score_std_draws
        m = min(n, pairs)
        rows = self._rows(torch.arange(m), n)
        mb = batch.select(rows).to(self.acc.device)
        scores, seqs = [], []
        for r in range(R):
            draw = f":std{step}.{r}"
            pol = self.draw_noise(mb, self.noise_keys(keys[:m], "policy", draw))
            ref = self.draw_noise(mb, self.noise_keys(keys[:m], "reference", draw))
            p = self.policy_scores(mb, pol, grad=False).float().cpu()
            q = self.reference_scores(mb, ref).float().cpu()
            scores.append(self.d.beta * ((p[:m] - q[:m]) - (p[m:] - q[m:])))
            seqs.append(p)
        return {
            "score_std": torch.stack(scores).std(0).mean().item(),
            "estimator_std": torch.stack(seqs).std(0).mean().item(),
        }

    # ------------------------------------------------------------------------------------- precompute

    def _fingerprint(self) -> str:
        r = recipe_to_dict(self.recipe)
        what = {
            "pairs": hashlib.sha256(
                json.dumps([(p.index, p.prompt_ids, p.chosen_ids, p.rejected_ids) for p in self.pairs]).encode()
            ).hexdigest(),
            "model": r["model"],
            "weights": self._weights,
            "precision": self.recipe.train.mixed_precision,
            "estimator": r["estimator"],
            "seed": self.recipe.train.seed,
            "canvas": self.canvas,
            "noise": [self.d.antithetic, self.d.pair_noise, self.d.reference],
        }
        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()

    def precompute(self) -> dict:
        """The reference's estimate of every pair under its draw-0 noise, read from train.output_dir/ref_logps.pt
        when its fingerprint matches, else computed (every process scores a share) and written there."""
        path = Path(self.recipe.train.output_dir) / CACHE_FILE
        fingerprint = self._fingerprint()
        cached = torch.load(path) if path.is_file() else {}
        valid = [cached.get("fingerprint") == fingerprint]
        # the main process decides for all: a rank reading its own (unshared) output_dir must not skip the
        # computation the others then wait on in gather_object
        broadcast_object_list(valid, from_process=0)
        if valid[0]:
            if not cached:
                raise DllmRlError(f"{path} is missing on process {self.acc.process_index}: share train.output_dir")
            self.acc.print(f"reference estimates of {len(self.pairs)} pairs read from {path}")
            return cached
        n, world, rank = len(self.pairs), self.acc.num_processes, self.acc.process_index
        mine = list(range(rank, n, world)) or [n - 1]  # a rank without a pair of its own repeats the last one
        mine += mine[-1:] * (-(-n // world) - len(mine))  # equal counts on every rank (ZeRO-3 forwards together)
        per = max(1, self.recipe.train.batch_size // self.recipe.train.gradient_accumulation_steps)
        values = []
        for start in range(0, len(mine), per):
            idx = mine[start : start + per]
            batch = self.collate([self.pairs[i] for i in idx])
            noise = self.draw_noise(batch, self.noise_keys([f"pair:{self.pairs[i].index}:0" for i in idx], "reference"))
            scores = self.reference_scores(batch.to(self.acc.device), noise)
            values += [(i, float(c), float(rj)) for i, c, rj in zip(idx, scores[: len(idx)], scores[len(idx) :])]
        if world > 1:
            from accelerate.utils import gather_object

            values = gather_object(values)
        out = {"fingerprint": fingerprint, "chosen": torch.zeros(n), "rejected": torch.zeros(n)}
        for i, c, rj in values:
            out["chosen"][i], out["rejected"][i] = c, rj
        if self.acc.is_main_process:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(out, path.with_suffix(".tmp"))
            os.replace(path.with_suffix(".tmp"), path)
        self.acc.wait_for_everyone()
        self.acc.print(f"reference estimates of {n} pairs computed and cached in {path}")
        return out

    # -------------------------------------------------------------------------------------------- loop

    def step(self, step: int) -> dict:
        timer = PhaseTimer()
        with timer("rollout"):
            mine = {"offline": self.offline_pairs, "on_policy": self.on_policy_pairs, "branch": self.branch_pairs}
            batch, keys, cached, stats = mine[self.d.pairs](step)
        committed = stats.pop("committed", 0.0)
        n = len(keys)
        if n == 0:  # no usable pair: nothing to learn, but the learning-rate schedule keeps its pace with the steps
            advance_schedule(self.scheduler)
            return {**stats, "skipped": 1.0}
        self.model.eval()
        noise = self.draw_noise(batch, self.noise_keys(keys, "policy"))
        with timer("estimate"):
            if cached is not None:
                ref = cached
            else:
                ref_noise = noise if self.d.antithetic else self.draw_noise(batch, self.noise_keys(keys, "reference"))
                ref = self._no_grad_scores(self.reference_scores, batch, ref_noise, n)
        if self.d.score_std_draws > 1 and (step + 1) % self.recipe.train.logging_steps == 0:
            stats.update(self.score_std(batch, keys, step))  # the policy that computes this step's loss
        with timer("update"):
            stats.update(self.update(batch, noise, ref, n, step), skipped=0.0)  # its window mean: the share skipped
        tokens = float(self.counted(batch, noise).sum())  # what a scoring pass computes (trajectory: every decision)
        length = float(batch.completion_mask.sum()) / (2 * n)
        scored = 0 if cached is not None else 1  # the reference's pass (none when its scores were precomputed)
        out = {**stats, **throughput_metrics(timer.seconds, committed, tokens, length, scored, 1)}
        if self.d.pairs == "offline":
            out.pop("tokens_per_s/rollout")
        return out

    def evaluate(self) -> float:
        with generation_model(self.acc, self.model) as model:
            result = evaluate_recipe(model, self.tokenizer, self.task, self.recipe, order_policy=self.order_policy)
        return result["accuracy"]

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
            "dpo",
            self.step,
            self.evaluate,
            postfix=lambda w: {k: f"{w[k][-1]:.3f}" for k in ("loss", "rewards/margins") if w.get(k)},
            extra_state={"order_policy": self.order_policy},
        )
        after = self.evaluate()
        self.log.log(self.recipe.train.max_steps, {"eval_accuracy": after})
        final = run.finish(order_policy=self.order_policy)
        self.acc.print(
            f"held-out accuracy: before {before:.3f} -> after {after:.3f} "
            f"({100 * (after - before):+.1f} points); model in {final}"
        )
        return {"before": before, "after": after, "final": str(final)}
