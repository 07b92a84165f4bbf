"""TRL's GRPO options change what they claim, on a tiny random model (fast, CPU).

Semantics read in trl 1.16: trl/trainer/grpo_config.py (the options' documentation), trl/trainer/grpo_trainer.py
(`_generate_and_score_completions`: mask_truncated_completions zeroes the completion mask of completions that do
not end in EOS; `get_high_entropy_mask`; `_prepare_inputs`: a generation batch feeds steps_per_generation
micro-steps), trl/trainer/callbacks.py (SyncRefModelCallback: ref <- alpha * policy + (1 - alpha) * ref every
ref_model_sync_steps optimizer steps), trl/trainer/utils.py (disable_dropout_in_model,
print_prompt_completions_sample). The diffusion meaning of "truncated": no EOS inside the canvas.
"""

from __future__ import annotations

import copy

import datasets
import pandas as pd
import pytest
import torch

from dllm_rl.config import recipe_from_dict
from dllm_rl.errors import ConfigError
from dllm_rl.trainers.grpo import GRPOTrainer
from dllm_rl.trainers.grpo_options import truncated

PROMPTS = datasets.Dataset.from_list([{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(12)])


def length_reward(prompts, completions, **kw):
    return [len(c) / 8 for c in completions]


def trainer(
    tmp_path,
    model_factory,
    tokenizer,
    grpo=None,
    train=None,
    rollout=None,
    reward=length_reward,
    optim=None,
    estimator=None,
    **kw,
):
    data = {
        "algorithm": "grpo",
        "estimator": estimator or {},
        "rollout": {"max_completion_length": 8, "steps": 4, "temperature": 1.0, **(rollout or {})},
        "grpo": {"num_generations": 4, **(grpo or {})},
        "optim": {"lr": 1e-2, "lr_scheduler": "constant", **(optim or {})},
        "train": {
            "max_steps": 2,
            "batch_size": 2,
            "output_dir": str(tmp_path),
            "logging_steps": 1,
            "save_steps": 0,
            **(train or {}),
        },
    }
    model = kw.pop("model", None) or model_factory(hidden=32, seed=1)
    return GRPOTrainer(
        recipe_from_dict(data), reward_funcs=reward, model=model, tokenizer=tokenizer, train_dataset=PROMPTS, **kw
    )


def rollout_batch(tr, step=0):
    examples = [tr.task.train[i] for i in tr.sampler.indices(step, tr.geometry.prompts_per_rollout)]
    batch, prompts = tr.rollout(examples, step)
    rewards, _, _ = tr.reward(batch, prompts, examples, step)
    batch.rewards, batch.advantages = rewards, tr.advantages(rewards)
    return batch


def test_truncated_completions_get_no_loss(tmp_path, model_factory, tokenizer):
    """A completion with no EOS in its canvas counts for nothing in the loss (its tokens leave the mask, so its
    gradient is zero), but it stays in its group's reward statistics."""
    tr = trainer(tmp_path, model_factory, tokenizer, grpo={"mask_truncated_completions": True, "beta": 0.0})
    batch = rollout_batch(tr)
    cut = truncated(batch.completion_ids, tokenizer.eos_token_id)
    assert 0 < cut.sum() < len(cut)  # this random model ends some completions and not others
    assert cut.tolist() == [tokenizer.eos_token_id not in row for row in batch.completion_ids.tolist()]
    mask = tr.loss_mask(batch)
    assert (mask[cut] == 0).all() and torch.equal(mask[~cut], batch.completion_mask[~cut].float())
    noise = tr.estimator.draw(batch, torch.Generator().manual_seed(0))
    only_cut = cut.nonzero().squeeze(-1)
    tr.model.zero_grad()
    loss, _ = tr.loss(batch.select(only_cut), noise.select(only_cut))
    loss.backward()
    assert loss.item() == 0 and all(p.grad is None or not p.grad.any() for p in tr.model.parameters())
    tr.recipe.grpo.mask_truncated_completions = False
    loss, _ = tr.loss(batch.select(only_cut), noise.select(only_cut))
    assert loss.item() != 0  # the same rows do count without the option


def test_the_entropy_quantile_keeps_the_expected_tokens(tmp_path, model_factory, tokenizer):
    """rho = 0.25: the policy term keeps the valid tokens whose entropy (the model's distribution at the masked
    position, in the estimator's own forward) is at or above the 75% quantile of all valid tokens' entropies."""
    tr = trainer(tmp_path, model_factory, tokenizer, grpo={"top_entropy_quantile": 0.25})
    batch = rollout_batch(tr)
    noise = tr.estimator.draw(batch, torch.Generator().manual_seed(0))
    captured = {}
    real = tr.loss_fn
    tr.loss_fn = lambda x, cfg: (captured.update(x=x), real(x, cfg))[1]
    tr.loss(batch, noise)
    # the entropies, computed here from one_step's view directly: prompt tokens masked as the noise says, the
    # whole completion masked, [MASK] removed from the support
    mask_id = tr.traits.mask_token_id
    prompt = torch.where(noise.prompt_masks[0] & batch.prompt_mask.bool(), mask_id, batch.prompt_ids)
    ids = torch.cat([prompt, torch.where(noise.completion_masks[0], mask_id, batch.completion_ids)], 1)
    P = batch.prompt_ids.shape[1]
    with torch.no_grad():
        logits = tr.model(input_ids=ids, attention_mask=batch.attention_mask).logits[:, P:].float()
    logits[..., mask_id] = float("-inf")
    entropy = torch.special.entr(logits.softmax(-1)).sum(-1)
    valid = captured["x"].mask.bool()
    threshold = torch.quantile(entropy[valid], 0.75)
    expected = (entropy >= threshold) & valid
    assert torch.equal(captured["x"].entropy_mask, expected)
    assert 0.2 < expected.sum() / valid.sum() < 0.3


def test_the_reference_moves_by_the_mix_up_rule_every_tau_optimizer_steps(tmp_path, model_factory, tokenizer):
    tr = trainer(
        tmp_path,
        model_factory,
        tokenizer,
        grpo={"beta": 0.04, "sync_ref_model": True, "ref_model_mixup_alpha": 0.6, "ref_model_sync_steps": 2},
    )
    snapshot = lambda m: [p.detach().clone() for p in m.parameters()]
    ref0 = snapshot(tr.ref)
    tr.step(0)  # optimizer step 1: no sync
    assert all(torch.equal(a, b) for a, b in zip(ref0, snapshot(tr.ref)))
    policy1 = snapshot(tr.model)
    assert any(not torch.equal(a, b) for a, b in zip(ref0, policy1))  # the policy moved away from the reference
    tr.step(1)  # optimizer step 2: ref <- 0.6 policy + 0.4 ref
    for r0, pol, r1 in zip(ref0, snapshot(tr.model), snapshot(tr.ref)):
        torch.testing.assert_close(r1, 0.6 * pol + 0.4 * r0)
    with pytest.raises(ConfigError, match="needs a reference: set grpo.beta"):
        trainer(tmp_path / "b", model_factory, tokenizer, grpo={"sync_ref_model": True})


def test_a_rollout_feeds_steps_per_generation_micro_batches(tmp_path, model_factory, tokenizer):
    """steps_per_generation = 3 with 1 accumulation step: one rollout of 3 x batch_size prompts, then three
    optimizer steps, each on its own third of the groups; the ratio is no longer 1 after the first, so the old
    policy's log-likelihoods are computed. generation_batch_size says the same in completions."""
    tr = trainer(tmp_path, model_factory, tokenizer, grpo={"steps_per_generation": 3})
    rollouts, steps = [], []
    real_rollout, real_step = tr.rollout, tr.optimizer.step
    tr.rollout = lambda examples, step: (rollouts.append(len(examples)), real_rollout(examples, step))[1]
    real_loss = tr.loss
    tr.loss = lambda mb, *a: (steps.append(mb.prompt_ids.clone()), real_loss(mb, *a))[1]
    tr.optimizer.step = lambda *a, **k: (steps.append("step"), real_step(*a, **k))[1]
    tr.step(0)
    assert rollouts == [6] and steps.count("step") == 3 and tr.scheduler.last_epoch == 3
    parts = [s for s in steps if not isinstance(s, str)]
    assert len(parts) == 3 and all(len(p) == 8 for p in parts)  # 2 prompts x 4 generations per optimizer step
    seen = torch.cat(parts)
    assert len({tuple(r) for r in seen.tolist()}) == 6  # six different prompts, each in one optimizer step
    estimates = tr.estimates(rollout_batch(tr, 1), torch.Generator().manual_seed(0))
    assert estimates[0][1] is not None  # old log-likelihoods
    same = trainer(tmp_path / "g", model_factory, tokenizer, grpo={"generation_batch_size": 24})
    assert same.geometry == tr.geometry
    with pytest.raises(ConfigError, match="exclusive"):
        trainer(tmp_path / "x", model_factory, tokenizer, grpo={"generation_batch_size": 24, "steps_per_generation": 3})


def test_log_completions_prints_a_sample_and_writes_trls_parquet(tmp_path, model_factory, tokenizer, capsys):
    def judged(prompts, completions, answer, log_extra, **kw):
        log_extra("gold", list(answer))
        return [float(a in c) for c, a in zip(completions, answer)]

    tr = trainer(
        tmp_path,
        model_factory,
        tokenizer,
        reward=judged,
        train={"log_completions": True, "num_completions_to_print": 3},
    )
    capsys.readouterr()
    tr.step(0)
    out = capsys.readouterr().out
    assert "Step 1" in out and "Advantage" in out and "gold" in out
    frame = pd.read_parquet(tmp_path / "completions" / "completions_00001.parquet")
    assert list(frame.columns) == ["step", "prompt", "completion", "judged", "gold", "advantage"]
    assert len(frame) == 8 and set(frame["step"]) == {1}
    assert frame["gold"].tolist() == [str(2 * int(p.split("+")[0])) for p in frame["prompt"]]


def test_disable_dropout_sets_every_dropout_to_zero(tmp_path, model_factory, tokenizer):
    from peft import LoraConfig

    def dropouts(tr):
        return [m.p for m in tr.model.modules() if isinstance(m, torch.nn.Dropout)]

    lora = LoraConfig(r=4, lora_dropout=0.3, target_modules="all-linear")
    on = trainer(tmp_path, model_factory, tokenizer, grpo={"disable_dropout": True}, peft_config=lora)
    off = trainer(tmp_path / "off", model_factory, tokenizer, peft_config=copy.deepcopy(lora))
    assert dropouts(off) and set(dropouts(off)) == {0.3} and set(dropouts(on)) == {0}


def test_shuffle_dataset_false_takes_the_rows_in_order(tmp_path, model_factory, tokenizer):
    tr = trainer(tmp_path, model_factory, tokenizer, train={"shuffle_dataset": False})
    assert [tr.sampler.indices(s, 4) for s in range(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [0, 1, 2, 3]]
    shuffled = trainer(tmp_path / "s", model_factory, tokenizer)
    first = shuffled.sampler.indices(0, 12)
    assert sorted(first) == list(range(12)) and first != list(range(12))


@pytest.mark.parametrize("loss_type", ["dapo", "bnpo"])
def test_dapo_is_one_token_mean_over_the_accumulated_batch(tmp_path, model_factory, tokenizer, loss_type):
    """The same rollout trained in one micro-batch or in two (gradient accumulation): dapo's update is the same
    (one token mean over the optimizer step, as TRL's num_items_in_batch makes it); bnpo's (TRL's per-micro-batch
    token mean, which is what dllm-rl called dapo before) is not when the micro-batches hold different numbers
    of tokens."""
    after = {}
    for ga in (1, 2):
        tr = trainer(
            tmp_path / str(ga),
            model_factory,
            tokenizer,
            grpo={"loss_type": loss_type},
            train={"gradient_accumulation_steps": ga},
            model=model_factory(hidden=32, seed=1),
        )
        tr.recipe.optim.max_grad_norm = 0.0  # compare raw gradients, not clipped ones
        batch = rollout_batch(tr)
        tokens = [tr.loss_mask(batch.select(rows)).sum().item() for rows in tr._micro_batches_of(torch.arange(8))]
        tr.update(batch, tr.estimates(batch, torch.Generator().manual_seed(0)))
        after[ga] = [p.detach().clone() for p in tr.model.parameters()]
    assert ga == 2 and len(set(tokens)) == 2  # the two micro-batches hold different numbers of tokens
    same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(after[1], after[2]))
    assert same == (loss_type == "dapo")


def test_dapo_counts_the_tokens_the_trajectory_estimator_scores(tmp_path, model_factory, tokenizer):
    """The trajectory estimator scores every decision, EOS and what follows it too (Estimate.mask): dapo's
    normaliser counts those entries, not the completion up to its first EOS, so its loss is their token mean."""
    tr = trainer(
        tmp_path,
        model_factory,
        tokenizer,
        grpo={"loss_type": "dapo"},
        rollout={"order": "top_prob", "max_completion_length": 12, "steps": 12},
        estimator={"name": "trajectory"},
        model=model_factory(hidden=32, seed=1),
    )
    batch = rollout_batch(tr)
    noise = tr.estimator.draw(batch, torch.Generator().manual_seed(0))
    est = tr.estimator.estimate(tr.model, batch, noise)
    rows = torch.arange(len(batch))
    assert batch.completion_mask.sum() < est.mask.sum()  # some completions end before the canvas does
    assert torch.equal(tr.estimator.counted(batch, noise), est.mask)
    assert tr._token_normalizer(batch, rows, noise) == est.mask.sum().item()
