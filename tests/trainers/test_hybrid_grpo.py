"""GRPO with the planner in the loop (trainers/planner.py inside trainers/grpo.py), on the shipped tiny Sudoku
executor and a tiny planner built from the recipe: the reward sees the original prompt whatever the plan; the
joint objective's gradient reaches the executor and the planner, and only the unfrozen one when one is frozen."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dllm_rl.cli import main
from dllm_rl.config import recipe_from_dict
from dllm_rl.errors import ConfigError
from dllm_rl.trainers.grpo import GRPOTrainer

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "checkpoints" / "tiny" / "sudoku-sft"


def recipe(out, plan="real", train_planner=False, train_executor=True):
    return recipe_from_dict(
        {
            "algorithm": "grpo",
            "model": {"path": str(SFT)},
            "data": {"task": "sudoku", "train_size": 16, "eval_size": 4, "seed": 1},
            "rollout": {"max_completion_length": 20, "steps": 10, "temperature": 1.0, "order": "top_prob"},
            "grpo": {"num_generations": 4, "beta": 0.0},
            "estimator": {"name": "one_step"},
            "hybrid": {
                "plan": plan,
                "template": "{plan}\n{question}",
                "train_executor": train_executor,
                "planner": {
                    "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64},
                    "max_new_tokens": 8,
                    "train": train_planner,
                    "lr": 1e-3,
                },
            },
            "optim": {"lr": 1e-3, "lr_scheduler": "constant"},
            "train": {"max_steps": 2, "batch_size": 2, "output_dir": str(out), "eval_steps": 0, "save_steps": 0},
        }
    )


@pytest.fixture(autouse=True)
def _threads():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


SEEN = []


def record_prompts(prompts, completions, **kwargs):
    SEEN.append(list(prompts))
    return [float(len(c[0]["content"]) % 2) for c in completions]


def rollout_and_reward(trainer: GRPOTrainer):
    examples = [trainer.task.train[i] for i in trainer.sampler.indices(0, trainer.recipe.train.batch_size)]
    batch, prompts = trainer.rollout(examples, 0)
    trainer.reward(batch, prompts, examples, 0)
    return batch, examples


def test_the_scorer_sees_the_original_prompt_whatever_the_plan(tmp_path):
    seen = {}
    for plan in ("none", "content_free", "real"):
        SEEN.clear()
        trainer = GRPOTrainer(recipe(tmp_path / plan, plan=plan), reward_funcs=[record_prompts])
        batch, examples = rollout_and_reward(trainer)
        assert SEEN[0] == [ex["prompt"] for ex in examples for _ in range(4)]  # the reward got the originals
        seen[plan] = batch
    executor_prompt = lambda b: trainer.tokenizer.decode(b.prompt_ids[0][b.prompt_mask[0].bool()])
    assert executor_prompt(seen["none"]) != executor_prompt(seen["content_free"])  # the executor did not
    assert "____\n____\n____\n____\n" in executor_prompt(seen["content_free"])
    assert seen["none"].plan is None and seen["real"].plan.kind == "real"


def grads_after_one_loss(trainer: GRPOTrainer):
    """Backward of the trainer's own loss on its own hybrid rollout (advantages drawn so none is zero)."""
    batch, _ = rollout_and_reward(trainer)
    batch.advantages = torch.randn(len(batch), generator=torch.Generator().manual_seed(0))
    noise = trainer.estimator.draw(batch, torch.Generator().manual_seed(0))
    trainer.model.train()
    loss, stats = trainer.loss(batch, noise)
    loss.backward()
    norm = lambda params: sum(float(p.grad.abs().sum()) for p in params if p.grad is not None)
    return norm(trainer.model.parameters()), norm(trainer.planner.planner.parameters()), stats


@pytest.mark.parametrize(
    "train_planner,train_executor,executor_moves,planner_moves",
    [(True, True, True, True), (False, True, True, False), (True, False, False, True)],
)
def test_the_joint_gradient_reaches_the_unfrozen_models(
    tmp_path, train_planner, train_executor, executor_moves, planner_moves
):
    trainer = GRPOTrainer(
        recipe(tmp_path, train_planner=train_planner, train_executor=train_executor), reward_funcs=[record_prompts]
    )
    executor_grad, planner_grad, stats = grads_after_one_loss(trainer)
    assert (executor_grad > 0) == executor_moves and (planner_grad > 0) == planner_moves
    assert ("planner/logprob" in stats) == train_planner
    groups = trainer.optimizer.param_groups
    assert len([g for g in groups if g["params"]]) == train_planner + train_executor  # each its own group
    if train_planner:
        assert any(g["lr"] == 1e-3 and g["params"] for g in groups)


def test_wd1_weighs_the_plans_within_their_groups(tmp_path):
    """grpo.loss_type=wd1 softmaxes the advantages over each prompt's group of num_generations rows: the planner's
    rows (one sampled plan each, grouped as the completions are) are weighed within the same groups, so its loss has
    a gradient (with groups of one every weight is 1 and the loss is 0)."""
    r = recipe(tmp_path, train_planner=True, train_executor=False)
    r.grpo.loss_type = "wd1"
    trainer = GRPOTrainer(r, reward_funcs=[record_prompts])
    _, planner_grad, stats = grads_after_one_loss(trainer)
    assert planner_grad > 0 and 0.25 <= stats["planner/wd1_weight_max"] < 1  # a softmax over 4 rows


def test_a_planner_with_nothing_to_learn_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="hybrid.plan=real"):
        GRPOTrainer(recipe(tmp_path, plan="content_free", train_planner=True), reward_funcs=[record_prompts])
    with pytest.raises(ConfigError, match="nothing to train"):
        GRPOTrainer(recipe(tmp_path, train_executor=False), reward_funcs=[record_prompts])
    greedy = recipe(tmp_path, train_planner=True)
    greedy.hybrid.planner.temperature = 0.0  # one plan per group: the advantages cancel on it
    with pytest.raises(ConfigError, match="greedy planner"):
        GRPOTrainer(greedy, reward_funcs=[record_prompts])
    stale = recipe(tmp_path, train_planner=True)
    stale.hybrid.planner.backend = "vllm"
    with pytest.raises(ConfigError, match="vLLM is for frozen planners"):
        GRPOTrainer(stale, reward_funcs=[record_prompts])


def test_a_jointly_trained_planner_is_saved_inside_the_atomic_final(tmp_path, monkeypatch, capsys):
    """final/ holds the trained planner and the reward curve when it appears, and `dllm-rl eval` of the checkpoint
    plans with that planner; a failure while writing them leaves no final/ (the run is then not finished)."""
    import dllm_rl.trainers.planner as planner_module

    ok = recipe(tmp_path / "ok", train_planner=True, train_executor=False)
    ok.train.save_steps = 1
    trainer = GRPOTrainer(ok, reward_funcs=[record_prompts])
    final = Path(trainer.train()["final"])
    # each checkpoint holds its step's planner, so evaluating a checkpoint plans with the planner it was trained with
    first = tmp_path / "ok" / "checkpoint-1"
    assert (first / "planner" / "config.json").is_file() and (tmp_path / "ok" / "checkpoint-2" / "planner").is_dir()
    main(["eval", str(first / "recipe.yaml"), "--checkpoint", str(first)])
    assert f"planner: {first / 'planner'} (trained with this checkpoint)" in capsys.readouterr().out
    assert (final / "planner" / "config.json").is_file() and (final / "reward_curve.png").is_file()
    assert (tmp_path / "ok" / "reward_curve.png").read_bytes() == (final / "reward_curve.png").read_bytes()
    logged = [json.loads(x) for x in (tmp_path / "ok" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in logged if "reward" in row]
    assert steps and all(0 <= row["plans/cut_fraction"] <= 1 for row in steps)  # logged with every step's
    main(["eval", str(final / "recipe.yaml"), "--checkpoint", str(tmp_path / "ok")])  # plans by the trained planner
    assert f"planner: {final / 'planner'} (trained with this checkpoint)" in capsys.readouterr().out

    def broken_save(self, directory):
        raise OSError("disk full")

    monkeypatch.setattr(planner_module.PlannerPhase, "save", broken_save)
    trainer = GRPOTrainer(
        recipe(tmp_path / "bad", train_planner=True, train_executor=False), reward_funcs=[record_prompts]
    )
    with pytest.raises(OSError, match="disk full"):
        trainer.train()
    assert not (tmp_path / "bad" / "final").exists()


@pytest.mark.parametrize("disable", [True, False])
def test_disable_dropout_reaches_a_trained_planner(tmp_path, disable):
    """grpo.disable_dropout (TRL's) also zeroes a trained planner's dropout: its loss then scores each plan as the
    sampler did (log-probs equal, ratio 1); with dropout left on (p 0.5 here) the loss sees other log-probs."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from dllm_rl.models.tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, resid_pdrop=0.5, embd_pdrop=0.5)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "planner")
    tok.save_pretrained(tmp_path / "planner")
    r = recipe(tmp_path / "run", train_planner=True, train_executor=False)
    r.hybrid.planner.path, r.grpo.disable_dropout = str(tmp_path / "planner"), disable
    trainer = GRPOTrainer(r, reward_funcs=[record_prompts])
    batch, _ = rollout_and_reward(trainer)
    batch.advantages = torch.ones(len(batch))
    _, stats = trainer.planner.loss(batch, trainer.loss_fn, r.grpo)
    sampled = float((batch.plan.logprobs * batch.plan.plan_mask).sum(-1).mean())
    assert (abs(stats["planner/logprob"] - sampled) < 1e-4) == disable, (stats["planner/logprob"], sampled)


def test_the_planner_runs_beside_the_executor(tmp_path):
    """The planner is loaded onto the device it is given (GRPO: the accelerator's, where the executor and the
    advantages are), not left on the CPU; the meta device stands in for a GPU here."""
    from dllm_rl.trainers.planner import planner_phase

    phase = planner_phase(recipe(tmp_path, train_planner=True), "sudoku", torch.device("meta"))
    assert phase.planner.device.type == "meta"
    assert planner_phase(recipe(tmp_path), "sudoku").planner.device.type == "cpu"


def test_dapo_normalises_the_planner_over_the_optimizer_step(tmp_path):
    """grpo.loss_type=dapo divides by the optimizer step's tokens (TRL), the planner's plan tokens as the
    executor's: a step of two micro-batches moves the planner exactly as one micro-batch of the same rows
    (SGD at lr 1, no clipping: the update is the gradient); each micro-batch's own count moved it otherwise."""

    def planner_after_one_step(accumulation: int, out) -> list[torch.Tensor]:
        r = recipe(out, train_planner=True, train_executor=False)
        r.grpo.loss_type, r.train.gradient_accumulation_steps = "dapo", accumulation
        r.optim.name, r.optim.lr, r.optim.weight_decay, r.optim.max_grad_norm = "sgd", 1.0, 0.0, 0.0
        r.hybrid.planner.lr, r.hybrid.planner.max_new_tokens = 1.0, 16  # plans of different lengths
        trainer = GRPOTrainer(r, reward_funcs=[record_prompts])
        trainer.step(0)
        return [p.detach().clone() for p in trainer.planner.planner.parameters()]

    one, two = planner_after_one_step(1, tmp_path / "one"), planner_after_one_step(2, tmp_path / "two")
    start = [p.detach() for p in GRPOTrainer(recipe(tmp_path / "s", train_planner=True)).planner.planner.parameters()]
    assert any(not torch.equal(a, b) for a, b in zip(one, start))  # it moved
    for a, b in zip(one, two):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_other_problem_plans_pair_prompts_over_the_global_batch(tmp_path):
    """Under hybrid.plan=other_problem each prompt's other problem is the next distinct prompt of the *global*
    batch: on two processes the last prompt of rank 0 is paired with rank 1's first (not with its own first), and
    the shares together carry exactly the pairing one process with the global batch makes."""
    from types import SimpleNamespace

    from dllm_rl.rollout.hybrid import with_next_problems

    trainer = GRPOTrainer(recipe(tmp_path / "run", plan="other_problem"))
    B = trainer.geometry.prompts_per_rollout
    shares = []
    for rank in range(2):
        trainer.acc = SimpleNamespace(process_index=rank, num_processes=2)  # only what examples() reads
        shares.append(trainer.examples(3))
    everyone = [trainer.task.train[i] for i in trainer.sampler.indices(3, 2 * B)]
    assert [ex["prompt"] for ex in shares[0] + shares[1]] == [ex["prompt"] for ex in everyone]
    assert len({repr(ex["prompt"]) for ex in everyone}) == 2 * B  # distinct: the next prompt is the next row
    assert shares[0][-1]["other"]["prompt"] == shares[1][0]["prompt"]
    assert shares[1][-1]["other"]["prompt"] == shares[0][0]["prompt"]
    assert [ex["other"] for ex in shares[0] + shares[1]] == [ex["other"] for ex in with_next_problems(everyone)]
