"""SFT of an edit head (and optionally the model) on drafts that need remasks, deletes and inserts.

AP-MDM (arXiv 2510.06190) trains its remask / insert / delete heads with the model on transitions whose
operations are known. Here each step draws fresh drafts of the task's target completions (tasks.edit_drafts:
wrong tokens, spurious and missing masks, canvases of the wrong length, with the operations that fix them),
forwards the model once on each draft, and minimises
    - the model's cross-entropy at the draft's masks that stand for a target token (when
      edit_policy.train_model; the masked-diffusion loss on the drafts' canvases, of the completion's own
      length or not: a mask that stands for a target token is trained wherever it sits), plus
    - the negative log-likelihood of the labelled operations and insert counts under the head, each decision
      scored by policy.edits over its legal set given the labelled decisions before it (the distribution
      the rollout draws from, so SFT and GRPO train one policy, except that SFT lifts the per-step edit budget,
      rollout.edit_max_per_step: the labels fix a draft in one step where the head can),
each averaged over its positions (AP-MDM weights its terms 1:1). With edit_policy.train_model the head reads
the model's hidden states with gradient (AP-MDM's joint training); without, the model is frozen. As in SFT
(trainers/sft.py), a data.dataset needs a completion column, a training row whose prompt plus the canvas
(rollout.max_completion_length) passes the model's context (max_position_embeddings) is refused before training,
and without a held-out set or a verifier the run has no held-out evaluations.

    dllm-rl sft recipes/tiny/countdown-edit-sft.yaml
"""

from __future__ import annotations

import random
import time

import torch

from ..config import Recipe
from ..errors import ConfigError, DllmRlError
from ..estimators import token_logprobs
from ..evaluate import evaluate_recipe
from ..models.base import unwrap
from ..models.masks import padding_positions
from ..policy import edit_head_for
from ..policy.edit_head import features
from ..policy.edits import EditLimits, EditState, decision_logprobs, legal_sets
from ..runtime import EpochSampler, generation_model, processes_with_non_finite, step_generator
from ..tasks.edit_drafts import IGNORE, DraftRates, corrupt
from .common import Run
from .sft import check_eval_decoding, supervised_task, tokenize_pairs, train_unscored, unscored


class EditSFTTrainer:
    """`EditSFTTrainer(recipe).train()` (sft.objective: edit): the recipe's edit head, trained on drafts."""

    def __init__(self, recipe: Recipe, model=None, tokenizer=None, task=None):
        self.recipe = r = recipe
        if r.rollout.edit == "none":
            raise ConfigError(
                "sft.objective=edit trains the edit head of rollout.edit: set rollout.edit=remask (fixed-length "
                "tasks) or any (inserts and deletes too)"
            )
        if r.train.gradient_accumulation_steps != 1 or r.train.deepspeed:
            raise ConfigError(
                "sft.objective=edit runs on one process without gradient accumulation or DeepSpeed for now; set "
                "train.gradient_accumulation_steps=1 and leave train.deepspeed empty"
            )
        task = supervised_task(r, task)
        self.run = run = Run(r, model, tokenizer, task)
        self.acc, self.task, self.tokenizer, self.traits = run.acc, run.task, run.tokenizer, run.traits
        if self.acc.num_processes > 1:
            raise ConfigError("sft.objective=edit runs on one process for now; launch without torchrun/deepspeed")
        check_eval_decoding(r, run)
        C = r.rollout.max_completion_length
        eos = self.tokenizer.eos_token_id
        # sft's tokenize_pairs refuses a completion past the canvas and a prompt + canvas past the model's context
        # (max_position_embeddings); the targets are its completions without the EOS padding (a draft's length is
        # its own)
        max_pos = getattr(unwrap(run.model).config, "max_position_embeddings", None)
        padded = tokenize_pairs(self.task.train, self.tokenizer, C, max_pos)
        targets = [self.tokenizer(t, add_special_tokens=False).input_ids + [eos] for t in self.task.train["completion"]]
        self.pairs = [(p, y) for (p, _), y in zip(padded, targets)]
        vocab = r.sft.edit_vocab
        self.vocab = (
            self.tokenizer(vocab, add_special_tokens=False).input_ids
            if vocab
            else sorted({t for _, y in self.pairs for t in y if t != eos})
        )
        s = r.sft
        self.rates = DraftRates(
            s.edit_substitute,
            s.edit_missing,
            s.edit_spurious,
            s.edit_wrong_length,
            remask_only=r.rollout.edit == "remask",
        )
        self.head = edit_head_for(r.rollout, run.model, r.model.path, r.edit_policy, r.train.seed)
        self.limits = EditLimits(
            remask=True,
            delete=r.rollout.edit == "any",
            # the counts the rollout draws (rollout.edit_max_insert; a loaded head may score more, never fewer)
            max_insert=min(self.head.cfg.max_insert, r.rollout.edit_max_insert) if r.rollout.edit == "any" else 0,
            max_length=C,
            max_per_step=10**6,  # the labels fix a draft in one step where the head can: no budget
        )
        if not r.edit_policy.train_model:
            run.model.requires_grad_(False)
        params = [{"params": [p for p in run.model.parameters() if p.requires_grad]}]
        params.append({"params": list(self.head.parameters()), "lr": r.edit_policy.lr})
        run.prepare(params, r.train.max_steps, checkpointed=(self.head,))
        self.model, self.optimizer, self.scheduler, self.log = run.model, run.optimizer, run.scheduler, run.log
        self.sampler = EpochSampler(len(self.pairs), r.train.seed, shuffle=r.train.shuffle_dataset)
        self.start_step = run.start_step

    def drafts(self, idx: list[int], step: int):
        """A batch of drafts for examples `idx`, drawn from the step's generator (a resumed run draws the same)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=step_generator(self.recipe.train.seed, step, "noise")))
        rng = random.Random(seed)
        K, C, mask_id = self.limits.max_insert, self.limits.max_length, self.traits.mask_token_id
        drafts = [corrupt(self.pairs[i][1], rng, self.rates, mask_id, self.vocab, K, C) for i in idx]
        prompts = [self.pairs[i][0] for i in idx]
        return collate_drafts(prompts, drafts, C, self.tokenizer.pad_token_id, mask_id)

    def loss(self, batch: dict) -> tuple[torch.Tensor, dict]:
        """(total loss, its parts) of one batch of drafts: see the module docstring."""
        b = {k: v.to(self.acc.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        P, C = b["prompt_len"], b["canvas"].shape[1]
        shift, mask_id = self.traits.logits_shift, self.traits.mask_token_id
        ids = torch.cat([b["prompt"], b["canvas"]], 1)
        attn = torch.cat([b["prompt_mask"], b["valid"].long()], 1)
        out = self.model(
            input_ids=ids,
            attention_mask=attn,
            position_ids=padding_positions(attn),
            logits_range=(P - shift, P + C - shift),
            output_hidden_states=True,
        )
        # the head reads the hidden states the slots' logits come from, as in decoding (rollout/anyprocess.py)
        logits, hidden = out.logits, out.hidden_states[-1][:, P - shift : P + C - shift]
        parts = {}
        total = torch.zeros((), device=logits.device)
        wanted = b["targets"] != IGNORE
        if self.recipe.edit_policy.train_model and wanted.any():
            lp = token_logprobs(logits[wanted], b["targets"][wanted], mask_id)
            parts["token_nll"] = -lp.mean()
            total = total + parts["token_nll"]
        is_mask = (b["canvas"] == mask_id) & b["valid"]
        state = EditState(is_mask, b["valid"] & ~is_mask, b["valid"].sum(-1))
        feats = features(logits.detach(), b["canvas"], b["valid"], mask_id)
        op_logits, ins_logits = self.head(hidden, feats, b["valid"], detach=not self.recipe.edit_policy.train_model)
        op_lp, ct_lp = decision_logprobs(op_logits, ins_logits, state, b["ops"], b["counts"], self.limits, 1.0)
        # averaged over the decisions that had a choice; a label the limits make illegal (an insert before the
        # deletion that makes room for it) is left out
        op_legal, ct_legal = legal_sets(state, b["ops"], b["counts"], self.limits)
        for name, lp, legal in (("op_nll", op_lp, op_legal), ("insert_nll", ct_lp, ct_legal)):
            chosen = (legal.sum(-1) > 1) & torch.isfinite(lp)
            if chosen.any():
                parts[name] = -lp[chosen].mean()
                total = total + parts[name]
        return total, {k: v.item() for k, v in parts.items()}

    def training_step(self, step: int) -> dict:
        t0 = time.perf_counter()  # the step alone: evaluations and checkpoints between steps are not in it
        r = self.recipe.train
        idx = self.sampler.indices(step, r.batch_size, 0, 1)
        self.model.train()
        loss, parts = self.loss(self.drafts(idx, step))
        if processes_with_non_finite(self.acc, loss):
            raise DllmRlError(
                f"edit SFT: the loss is not finite at step {step + 1} ({loss.item()}); no update was applied and "
                f"the last checkpoint is intact. Lower optim.lr or edit_policy.lr, then resume."
            )
        self.acc.backward(loss)
        if self.recipe.optim.max_grad_norm > 0:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, self.recipe.optim.max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad()
        self.scheduler.step()
        self.model.eval()
        dt = time.perf_counter() - t0
        return {"loss": loss.item(), **parts, "steps_per_s": 1 / max(dt, 1e-9)}

    def evaluate(self) -> dict | None:
        """Held-out accuracy decoded with the head (evaluate_recipe's dict), or None when the task cannot be scored
        (sft.unscored)."""
        if unscored(self.task):
            return None
        with generation_model(self.acc, self.model) as model:
            return evaluate_recipe(model, self.tokenizer, self.task, self.recipe, edit_policy=self.head)

    def train(self) -> dict:
        """The run; {"eval_accuracy": held-out accuracy, or None when the task cannot be scored, "final": path}."""
        if why := unscored(self.task):
            return train_unscored(
                self.run,
                "edit-sft",
                self.training_step,
                why,
                kept="model and head",
                extra_state={"edit_policy": self.head},
                edit_policy=self.head,
            )
        return self.run.train_to_accuracy(
            "edit-sft",
            self.training_step,
            self.evaluate,
            "examples",
            kept="model and head",
            extra_state={"edit_policy": self.head},
            edit_policy=self.head,
        )


def collate_drafts(prompts: list[list[int]], drafts, capacity: int, pad_id: int, mask_id: int) -> dict:
    """Drafts as tensors: prompts left-padded [n, P], canvases right-padded [n, capacity] (the rollout's layout),
    their labels, and which positions are real."""
    n, P = len(drafts), max(map(len, prompts))
    prompt = torch.full((n, P), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros(n, P, dtype=torch.long)
    canvas = torch.full((n, capacity), pad_id, dtype=torch.long)
    ops = torch.zeros(n, capacity, dtype=torch.long)
    counts = torch.zeros(n, capacity + 1, dtype=torch.long)
    targets = torch.full((n, capacity), IGNORE, dtype=torch.long)
    valid = torch.zeros(n, capacity, dtype=torch.bool)
    for i, (p, d) in enumerate(zip(prompts, drafts)):
        L = len(d.tokens)
        prompt[i, P - len(p) :] = torch.tensor(p)
        prompt_mask[i, P - len(p) :] = 1
        canvas[i, :L] = torch.tensor(d.tokens)
        ops[i, :L] = torch.tensor(d.ops)
        counts[i, : L + 1] = torch.tensor(d.counts)
        targets[i, :L] = torch.tensor(d.targets)
        valid[i, :L] = True
    return {
        "prompt": prompt,
        "prompt_mask": prompt_mask,
        "prompt_len": P,
        "canvas": canvas,
        "ops": ops,
        "counts": counts,
        "targets": targets,
        "valid": valid,
    }
