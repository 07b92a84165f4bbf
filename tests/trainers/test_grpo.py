"""The GRPO trainer end to end on the shipped tiny Sudoku checkpoint (a real TinyMDM, its tokenizer, reward
plugins called as TRL calls them): learning follows the reward and only the reward, a run killed mid-way
resumes onto the uninterrupted run's trajectory, and a finished run leaves what the README promises."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dllm_rl.config import load_recipe, recipe_from_dict
from dllm_rl.errors import ConfigError, DllmRlError
from dllm_rl.evaluate import evaluate_recipe
from dllm_rl.models.load import load_model
from dllm_rl.rewards import REWARDS
from dllm_rl.tasks import load_task
from dllm_rl.trainers.grpo import GRPOTrainer

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "checkpoints" / "tiny" / "sudoku-sft"


def recipe(out, **over):
    data = {
        "algorithm": "grpo",
        "model": {"path": str(SFT)},
        "data": {"task": "sudoku", "train_size": 64, "eval_size": 8, "seed": 1},
        "rollout": {"max_completion_length": 20, "steps": 20, "temperature": 1.0},
        "grpo": {"num_generations": 8, "beta": 0.0},
        "estimator": {"name": "one_step"},
        "rewards": [],
        "order_policy": {},
        "eval": {},
        "optim": {"lr": 1e-3, "lr_scheduler": "constant"},
        "train": {
            "max_steps": 8,
            "batch_size": 4,
            "output_dir": str(out),
            "logging_steps": 1,
            "eval_steps": 0,
            "save_steps": 0,
            "num_threads": 2,
        },
    }
    for key, value in over.items():
        section, name = key.split("__")
        data[section][name] = value
    return recipe_from_dict(data)


def _first_cells(completions) -> list[str]:
    return [(c[-1]["content"] if isinstance(c, list) else c)[:1] for c in completions]


def first_cell_is_1(prompts, completions, **kwargs):
    return [float(ch == "1") for ch in _first_cells(completions)]


def first_cell_is_not_1(prompts, completions, **kwargs):
    return [float(ch != "1") for ch in _first_cells(completions)]


def ones_rate(trainer: GRPOTrainer, steps: range) -> float:
    """Share of completions starting with '1' over rollouts of the given steps (the rollouts the trainer
    itself draws, with its own per-step generators)."""
    hits = n = 0
    for s in steps:
        examples = [trainer.task.train[i] for i in trainer.sampler.indices(s, trainer.recipe.train.batch_size)]
        with torch.no_grad():
            batch, _ = trainer.rollout(examples, s)
        hits += sum(ch == "1" for ch in _first_cells(batch.completions))
        n += len(batch.completions)
    return hits / n


@pytest.mark.parametrize(
    "estimator,steps,options",
    [
        ("one_step", 16, {}),
        ("trajectory", 8, {"estimator__merge_steps": 4}),
        ("trajectory", 8, {"rollout__steps": 5, "rollout__order": "top_prob", "rollout__order_temperature": 1.0}),
    ],
)
def test_the_policy_moves_toward_what_is_rewarded_and_away_from_what_is_not(tmp_path, estimator, steps, options):
    """A reward on one decision the model makes (the first cell of the grid): GRPO raises its frequency,
    the negated reward lowers it. Both runs see the same prompts and rollout seeds, so the reward is the
    only thing that differs. Before: 35% of 256 rollouts start with '1' (binomial sd 3 points); measured
    after (seed 0): one_step 80% / 0%, trajectory 100% / 0%, trajectory with a sampled order (4 cells per step,
    its Plackett-Luce log-prob in the likelihood, order temperature 1) 82% / 0%. At order temperature 0.3 the
    order term (scores / 0.3 in every step's Plackett-Luce log-prob) dominates these 8 steps and the first cell
    does not rise (36% -> 38% / 0%) once every decision is scored; it rose only while a row whose first cell was
    EOS had that one token scored, which then carried most of the update."""
    rates = {}
    for fn in (first_cell_is_1, first_cell_is_not_1):
        r = recipe(
            tmp_path / fn.__name__, estimator__name=estimator, train__batch_size=8, train__max_steps=steps, **options
        )
        tr = GRPOTrainer(r, reward_funcs=[fn])
        before = ones_rate(tr, range(100, 104))
        for step in range(steps):
            tr.step(step)
        rates[fn.__name__] = (before, ones_rate(tr, range(100, 104)))
    (b_up, a_up), (b_down, a_down) = rates["first_cell_is_1"], rates["first_cell_is_not_1"]
    assert b_up == b_down and 0.2 < b_up < 0.5, rates  # same model, same rollouts before training
    assert a_up > b_up + 0.3, rates
    assert a_down < b_down - 0.2, rates


def test_filter_zero_std_keeps_the_steps_and_the_schedule_of_the_rollout(tmp_path):
    """With grpo.steps_per_generation = 2 optimizer steps per rollout and one group of two left by the filter,
    the rollout still takes exactly 2 optimizer steps (one of them empty: no update, no grad norm), so the
    schedule advances by 2 as without the filter; a rollout the filter empties advances it by 2 too.
    gradient_accumulation_steps > 1 with the filter is refused (its micro-batches would weigh groups unevenly)."""
    one = lambda prompts, completions, **kw: [float(i == 0) for i in range(len(completions))]  # group 0 spreads
    flat = lambda prompts, completions, **kw: [1.0] * len(completions)
    over = dict(train__batch_size=2, grpo__num_generations=2, grpo__filter_zero_std=True, optim__lr_scheduler="linear")
    r = recipe(tmp_path, grpo__steps_per_generation=2, train__max_steps=4, **over)
    tr = GRPOTrainer(r, reward_funcs=[one])
    before = [p.detach().clone() for p in tr.model.parameters()]
    out = tr.step(0)
    assert out["skipped"] == 0.0 and not all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
    assert tr.scheduler.get_last_lr()[0] == pytest.approx(1e-3 * 6 / 8) and out["grad_norm"] > 0
    tr = GRPOTrainer(recipe(tmp_path / "flat", grpo__steps_per_generation=2, train__max_steps=4, **over), [flat])
    assert tr.step(0)["skipped"] == 1.0 and tr.scheduler.get_last_lr()[0] == pytest.approx(1e-3 * 6 / 8)
    with pytest.raises(ConfigError, match="set train.gradient_accumulation_steps=1"):
        GRPOTrainer(recipe(tmp_path / "ga", train__gradient_accumulation_steps=2, **over), reward_funcs=[one])


def test_the_trajectory_loss_counts_every_sampled_position(tmp_path):
    """The trajectory estimator scores every position the sampler committed, EOS and the tokens after it (one
    block: every position is sampled); the loss masks with what it scored (Estimate.mask), not with the
    batch's completion_mask, which stops at the first EOS. dr_grpo's sum / (N * Lc) shows the difference."""
    from dllm_rl.algorithms import LossInputs

    r = recipe(
        tmp_path,
        estimator__name="trajectory",
        grpo__loss_type="dr_grpo",
        grpo__num_generations=4,
        train__batch_size=1,
        rollout__max_completion_length=24,
        rollout__steps=12,
        rollout__order="top_prob",
    )
    tr = GRPOTrainer(r, reward_funcs=[first_cell_is_1])
    batch, _ = tr.rollout([tr.task.train[i] for i in tr.sampler.indices(0, 1)], 0)
    batch.advantages = torch.linspace(-1.0, 2.0, len(batch))
    noise = tr.estimator.draw(batch, torch.Generator().manual_seed(0))
    est = tr.estimator.estimate(tr.model, batch, noise)
    assert est.mask.all() and not batch.completion_mask.bool().all()  # EOS before the last position
    loss, _ = tr.loss(batch, noise)

    def expected(mask):
        x = LossInputs(est.logps, est.logps.detach(), None, batch.advantages, mask.float(), 4)
        return tr.loss_fn(x, r.grpo)[0]

    assert torch.allclose(loss, expected(est.mask)) and not torch.allclose(loss, expected(batch.completion_mask))


def test_the_trajectory_estimate_rate_counts_every_scored_position(tmp_path):
    """tokens_per_s/estimate counts what a scoring pass computes: for the trajectory estimator every committed
    position (24 per completion here), EOS padding included, not the completions up to their first EOS."""
    r = recipe(
        tmp_path,
        estimator__name="trajectory",
        grpo__num_generations=4,
        grpo__beta=0.04,  # one reference pass
        train__batch_size=1,
        rollout__max_completion_length=24,
        rollout__steps=12,
        rollout__order="top_prob",
    )
    out = GRPOTrainer(r, reward_funcs=[first_cell_is_1]).step(0)
    assert out["completion_length"] < 24  # EOS before the last position
    assert out["tokens_per_s/estimate"] * out["seconds/estimate"] == pytest.approx(4 * 24, rel=1e-6)


def first_cell_first_rate(trainer: GRPOTrainer, steps: range) -> float:
    """Share of rollouts (the trainer's own, at the given steps) that commit the first cell at the first step."""
    hits = n = 0
    for s in steps:
        examples = [trainer.task.train[i] for i in trainer.sampler.indices(s, trainer.recipe.train.batch_size)]
        batch, _ = trainer.rollout(examples, s)
        hits += int((batch.trace.commit_step[:, 0] == 0).sum())
        n += len(batch.completions)
    return hits / n


def test_the_learned_order_policy_learns_the_rewarded_order_with_the_model_frozen(tmp_path):
    """rollout.order=policy: a reward on the *order* only (1 when the first cell is committed at the first of
    5 steps) with order_policy.train_model=false: only the order head can move, and GRPO (trajectory likelihood
    with the head's Plackett-Luce log-probs) raises that order's frequency, while the negated reward lowers it.
    Measured (seed 0, 128 rollouts each): 16% before -> 78% / 2% after 8 steps. The model's weights do not
    change."""
    rates, seen = {}, {}

    def first_first(prompts, completions, **kwargs):
        return (seen["trace"].commit_step[:, 0] == 0).float().tolist()

    def first_not_first(prompts, completions, **kwargs):
        return (seen["trace"].commit_step[:, 0] != 0).float().tolist()

    for fn in (first_first, first_not_first):
        r = recipe(
            tmp_path / fn.__name__,
            estimator__name="trajectory",
            train__batch_size=4,
            train__max_steps=8,
            rollout__steps=5,
            rollout__order="policy",
            rollout__order_temperature=0.3,
            order_policy__lr=1e-2,
            order_policy__train_model=False,
            eval__order_temperature=0.0,
        )
        tr = GRPOTrainer(r, reward_funcs=[fn])
        rollout = tr.rollout

        def spy(examples, step, rollout=rollout):  # the reward reads the order off the rollout just drawn
            batch, prompts = rollout(examples, step)
            seen["trace"] = batch.trace
            return batch, prompts

        tr.rollout = spy
        weights = {k: v.clone() for k, v in tr.model.state_dict().items()}
        before = first_cell_first_rate(tr, range(100, 104))
        for step in range(8):
            out = tr.step(step)
        rates[fn.__name__] = (before, first_cell_first_rate(tr, range(100, 104)))
        assert all(torch.equal(weights[k], v) for k, v in tr.model.state_dict().items())
        assert out["learning_rate"] == 1e-2  # the head's: the frozen model's group trains nothing
    (b_up, a_up), (b_down, a_down) = rates["first_first"], rates["first_not_first"]
    assert b_up == b_down and 0.1 < b_up < 0.6, rates
    assert a_up > b_up + 0.3, rates
    assert a_down < b_down / 2, rates


def test_killed_run_resumes_on_the_same_trajectory_and_leaves_the_promised_outputs(tmp_path, capsys):
    """A reward that crashes in the fourth step (after the step-2 checkpoint and one unsaved step) stops the run
    the way a kill would; the relaunched trainer resumes from checkpoint-2 and ends with the uninterrupted run's
    metrics and weights."""
    crash = {"armed": True}

    def tripwire(prompts, completions, trainer_state, **kwargs):
        if crash["armed"] and trainer_state.global_step == 6:  # the fourth rollout: 3 x 2 optimizer steps done
            raise RuntimeError("simulated kill")
        return [0.0] * len(completions)

    over = {
        "train__max_steps": 4,
        "train__save_steps": 2,
        "train__eval_steps": 2,
        "grpo__beta": 0.04,
        "grpo__num_iterations": 2,
    }

    def make(out):  # reward_funcs replace the recipe's rewards (TRL): the real reward is passed with the tripwire
        return GRPOTrainer(recipe(out, **over), reward_funcs={"sudoku_cells": REWARDS["sudoku_cells"], "tw": tripwire})

    crash["armed"] = False
    straight = make(tmp_path / "straight").train()
    crash["armed"] = True
    with pytest.raises(DllmRlError, match="simulated kill"):
        make(tmp_path / "killed").train()
    assert (tmp_path / "killed" / "checkpoint-2").is_dir() and not (tmp_path / "killed" / "final").exists()
    crash["armed"] = False
    capsys.readouterr()
    resumed = make(tmp_path / "killed").train()
    out = capsys.readouterr().out
    assert "resumed from" in out and "checkpoint-2 at step 2" in out
    assert "held-out accuracy: before" in out and "-> after" in out

    def rows(run):
        return [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    a, b = rows("straight"), rows("killed")
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("reward", "loss", "kl", "eval_accuracy"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=1e-5), (ra["step"], key, ra[key], rb[key])
    assert straight["before"] == resumed["before"] and straight["after"] == resumed["after"]
    wa, wb = (
        load_file(Path(straight["final"]) / "model.safetensors"),
        load_file(Path(resumed["final"]) / "model.safetensors"),
    )
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=name)

    # what a finished run leaves: the reward curve beside the model, and the per-step metrics the issue lists
    assert (Path(resumed["final"]) / "reward_curve.png").stat().st_size > 1000
    logged = set().union(*(r.keys() for r in b))
    for key in (
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "accuracy",
        "kl",
        "clip_fraction",
        "estimator_std",
        "completion_length",
        "learning_rate",
        "rewards/sudoku_cells/mean",
        "rewards/sudoku_cells/std",
        "tokens_per_s/rollout",
        "tokens_per_s/estimate",
        "tokens_per_s/update",
        "grad_norm",
    ):
        assert key in logged, (key, sorted(logged))


def test_a_learned_order_policy_is_checkpointed_resumed_and_evaluated(tmp_path, capsys):
    """The order head trains with the model, is written into every checkpoint and final/ (atomically, beside
    the model files), comes back on resume (a 2-step run stopped after step 1 and relaunched ends with the
    uninterrupted run's head), a later recipe whose model.path is that final/ starts from it, and `dllm-rl eval`
    decodes with it; a checkpoint without one is a clear error."""
    from dllm_rl.cli import main
    from dllm_rl.policy import OrderHead

    def make(out, steps):
        r = recipe(
            out,
            estimator__name="trajectory",
            train__batch_size=2,
            train__max_steps=steps,
            train__save_steps=1,
            rollout__steps=5,
            rollout__order="policy",
            rollout__order_temperature=0.3,
            grpo__num_generations=4,
            order_policy__lr=1e-2,
            eval__order_temperature=0.0,
        )
        r.rewards = recipe_from_dict({"rewards": [{"name": "sudoku_cells"}]}).rewards
        return GRPOTrainer(r)

    straight = make(tmp_path / "straight", 2).train()
    make(tmp_path / "stopped", 1).train()
    resumed = make(tmp_path / "stopped", 2).train()
    assert "resumed from" in capsys.readouterr().out
    a, b = OrderHead.load(straight["final"]), OrderHead.load(resumed["final"])
    fresh = OrderHead(a.cfg)
    assert not torch.equal(a.out[1].weight, fresh.out[1].weight)  # it trained (a fresh head's last layer is 0)
    for (name, wa), wb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(wa, wb, rtol=0, atol=1e-6, msg=name)
    assert (tmp_path / "straight" / "checkpoint-2" / "order_policy.pt").is_file()
    later = make(tmp_path / "later", 1)  # a recipe whose model.path is a run's final/ continues its head
    later = GRPOTrainer(replace(later.recipe, model=replace(later.recipe.model, path=straight["final"])))
    for (name, wa), wb in zip(a.state_dict().items(), later.order_policy.state_dict().values()):
        torch.testing.assert_close(wa, wb, rtol=0, atol=0, msg=name)

    recipe_file = str(tmp_path / "straight" / "final" / "recipe.yaml")
    assert main(["eval", recipe_file, "--checkpoint", straight["final"]]) == 0
    assert "accuracy" in capsys.readouterr().out
    (Path(straight["final"]) / "order_policy.pt").unlink()
    assert main(["eval", recipe_file, "--checkpoint", straight["final"]]) == 2
    assert "order_policy.pt does not exist" in capsys.readouterr().err


def test_a_non_finite_loss_stops_the_run_before_it_reaches_the_weights(tmp_path):
    """An inf loss (seen for real: the coupled ELBO's 1/(1-t) weights overflowed the k3 KL in
    benchmarks/estimators.py) must not be applied: one such step made every later weight NaN while the run went on
    writing checkpoints. The trainer stops with an error naming the fix; weights and the last checkpoint stay finite."""
    poison = {"on": False}

    def tripwire(prompts, completions, trainer_state, **kwargs):
        poison["on"] = trainer_state.global_step >= 1  # the second step's loss becomes inf
        return [float(i % 2) for i in range(len(completions))]

    r = recipe(tmp_path, train__max_steps=3, train__save_steps=1, estimator__name="elbo")
    trainer = GRPOTrainer(r, reward_funcs=[tripwire])
    real = trainer.loss_fn

    def overflowing(inputs, cfg):  # the real loss, made inf from the second step on
        loss, stats = real(inputs, cfg)
        return (loss * float("inf") if poison["on"] else loss), stats

    trainer.loss_fn = overflowing
    with pytest.raises(DllmRlError, match="loss is not finite.*no update was applied.*estimator.t_min=1e-3"):
        trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    saved = load_file(tmp_path / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in saved.values()) and not (tmp_path / "checkpoint-2").exists()


def test_shipped_easy_checkpoint_has_the_parallel_decoding_headroom_its_recipe_trains_for():
    """recipes/tiny/sudoku-parallel-grpo.yaml rests on one measured fact about its start (README, "Shipped
    checkpoints"): checkpoints/tiny/sudoku-sft-easy solves most held-out puzzles one token per step (0.925) and
    far fewer four tokens per step (0.63), greedily. A changed checkpoint, recipe or sampler breaks it."""
    r = load_recipe(ROOT / "recipes" / "tiny" / "sudoku-parallel-grpo.yaml")
    assert r.rollout.steps == 5 and r.rollout.max_completion_length == 20 and r.rollout.order == "top_prob"
    model, tok = load_model(replace(r.model, path=str(ROOT / r.model.path)), seed=0)
    task = load_task(r.data)
    fast = evaluate_recipe(model, tok, task, r)["accuracy"]
    slow = evaluate_recipe(model, tok, task, replace(r, rollout=replace(r.rollout, steps=20)))["accuracy"]
    assert slow >= 0.88 and fast <= 0.70 and slow - fast >= 0.2, (slow, fast)  # measured 0.925 and 0.63


def test_main_job_start_mixes_solutions_under_the_fast_sampler():
    """The main job (recipes/tiny/sudoku-diffu-grpo.yaml) and token GRPO (sudoku-tokens-grpo.yaml) rest on
    measured facts about their start, checkpoints/tiny/sudoku-sft-multi (SFT on puzzles with several solutions):
    one cell per step it solves nearly every held-out puzzle greedily (0.985), four cells per forward in the
    top_prob order about half (0.495), while 8 samples at temperature 1 under that fast sampler solve 0.785 of
    them: the headroom GRPO turns into greedy solves. The main job's untrained order head decodes exactly like
    top_prob, so its "before" is the same 0.495. A changed checkpoint, task option, recipe or sampler breaks it."""
    from dllm_rl.policy import OrderHead, OrderHeadConfig

    r = load_recipe(ROOT / "recipes" / "tiny" / "sudoku-tokens-grpo.yaml")
    assert r.rollout.steps == 5 and r.rollout.order == "top_prob" and r.data.options["unique"] is False
    main = load_recipe(ROOT / "recipes" / "tiny" / "sudoku-diffu-grpo.yaml")
    assert main.rollout == replace(r.rollout, order="policy", order_temperature=main.rollout.order_temperature)
    assert main.data == r.data and main.model == r.model and main.eval.order_temperature == 0
    model, tok = load_model(replace(r.model, path=str(ROOT / r.model.path)), seed=0)
    task = load_task(r.data)
    fast = evaluate_recipe(model, tok, task, r)
    untrained = OrderHead(
        OrderHeadConfig(
            hidden_size=model.config.hidden_size,
            width=main.order_policy.width,
            heads=main.order_policy.heads,
            base=main.order_policy.base,
        )
    )
    assert evaluate_recipe(model, tok, task, main, order_policy=untrained)["scores"] == fast["scores"]
    assert fast["forwards_per_sample"] == fast["max_forwards_per_sample"] == 5  # each puzzle: 5 forwards
    fast = fast["accuracy"]
    slow = evaluate_recipe(model, tok, task, replace(r, rollout=replace(r.rollout, steps=20)))["accuracy"]
    sampled = evaluate_recipe(model, tok, task, replace(r, eval=replace(r.eval, num_samples=8, temperature=1.0)))
    assert slow >= 0.93 and fast <= 0.6 and sampled["pass@8"] - fast >= 0.2, (slow, fast, sampled["pass@8"])


def test_headroom_benchmark_tracks_each_puzzle():
    """benchmarks/headroom.py (RESULTS.md's won/lost figures) pairs each held-out puzzle's greedy result with its
    sampled solve rate. A checkpoint against itself wins and loses nothing and stays on the diagonal; its greedy
    rate is the recipe's own evaluation."""
    import subprocess
    import sys

    ckpt = str(ROOT / "checkpoints/tiny/sudoku-sft-multi")
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/headroom.py"),
            ckpt,
            ckpt,
            "--eval-size",
            "48",
            "--samples",
            "4",
            "--threads",
            "1",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Greedy: 0 puzzles won, 0 lost (net +0 of 48)" in out, out
    rows = [line for line in out.splitlines() if line.startswith("| ") and line[2] in "0(1"]
    matrix = [[int(c) for c in row.strip("|").split("|")[1:]] for row in rows[-6:]]
    assert sum(map(sum, matrix)) == 48 and all(matrix[i][j] == 0 for i in range(6) for j in range(6) if i != j), out
    r = load_recipe(ROOT / "recipes" / "tiny" / "sudoku-tokens-grpo.yaml")  # the script's default recipe
    r = replace(r, data=replace(r.data, eval_size=48))
    model, tok = load_model(replace(r.model, path=ckpt), seed=0)
    task = load_task(r.data)
    greedy = evaluate_recipe(model, tok, task, r)
    assert f"| {ckpt} | {greedy['accuracy']:.3f} |" in out, (greedy["accuracy"], out)
    # the script groups `scores` as num_samples consecutive samples per prompt, in prompt order
    triple = evaluate_recipe(model, tok, task, replace(r, eval=replace(r.eval, num_samples=3)))
    per_prompt = torch.tensor(triple["scores"]).view(48, 3)
    assert torch.equal(per_prompt, torch.tensor(greedy["scores"])[:, None].expand(48, 3))
    assert 0 < greedy["accuracy"] < 1
    # --split train scores the first training puzzles instead (did RL fit what it trained on?)
    out = subprocess.run(
        [
            sys.executable,
            str(ROOT / "benchmarks/headroom.py"),
            ckpt,
            "--eval-size",
            "48",
            "--samples",
            "2",
            "--threads",
            "1",
            "--split",
            "train",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    on_train = evaluate_recipe(model, tok, replace(task, eval=task.train.select(range(48))), r)["accuracy"]
    assert "48 training puzzles" in out and f"| {ckpt} | {on_train:.3f} |" in out, (on_train, out)


def test_rewards_see_trls_trainer_state_in_optimizer_steps(tmp_path):
    """TRL hands a reward its TrainerState, which counts optimizer steps; a rollout here feeds num_iterations x
    (steps_per_generation / gradient_accumulation_steps) of them, so a curriculum written for TRL switches at
    the same point; its epoch counts passes over the training prompts (64 here, 2 a rollout)."""
    seen = []

    def record(prompts, completions, trainer_state, **kwargs):
        seen.append((trainer_state.global_step, trainer_state.max_steps, trainer_state.epoch))
        return [0.0] * len(completions)

    r = recipe(tmp_path, train__max_steps=2, train__batch_size=2, grpo__num_iterations=2, grpo__num_generations=2)
    tr = GRPOTrainer(r, reward_funcs=[record])
    for step in range(2):
        tr.step(step)
    assert seen == [(0, 4, 0.0), (2, 4, 2 / 64)]


def test_filter_zero_std_skips_groups_without_signal_and_the_metrics_say_so(tmp_path):
    """TRL's filter_zero_std drops groups whose rewards are all equal: a step where every group is equal updates
    nothing (skipped 1, no update rate), one with spread updates (skipped 0), so the window mean of `skipped` is
    the share of skipped steps; completion_length and clipped_ratio describe every completion, filtered or not;
    the estimate phase reports a rate only for the scoring passes it ran (none at beta 0, one iteration)."""
    flat = lambda prompts, completions, **kw: [1.0] * len(completions)
    spread = lambda prompts, completions, **kw: [float(i % 2) for i in range(len(completions))]
    r = recipe(tmp_path, train__max_steps=2, train__batch_size=2, grpo__num_generations=2, grpo__filter_zero_std=True)
    before = [p.detach().clone() for p in GRPOTrainer(r, reward_funcs=[flat]).model.parameters()]
    tr = GRPOTrainer(r, reward_funcs=[flat])
    out = tr.step(0)
    assert out["skipped"] == 1.0 and "tokens_per_s/update" not in out and "tokens_per_s/estimate" not in out
    assert out["completion_length"] > 0 and all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
    # TRL's names for the same lengths (to the first EOS, included), over every completion; the terminated ones
    # over those that ended (an untrained model's canvas may hold no EOS: then TRL's 0)
    assert out["completions/mean_length"] == pytest.approx(out["completion_length"])
    assert out["completions/min_length"] <= out["completions/mean_length"] <= out["completions/max_length"] <= 20
    ended = out["completions/clipped_ratio"] < 1
    assert (out["completions/max_terminated_length"] > 0) == ended
    out = GRPOTrainer(r, reward_funcs=[spread]).step(0)
    assert out["skipped"] == 0.0 and out["tokens_per_s/update"] > 0 and "tokens_per_s/estimate" not in out
    two = recipe(tmp_path / "b", train__batch_size=2, grpo__num_generations=2, grpo__num_iterations=2, grpo__beta=0.04)
    out = GRPOTrainer(two, reward_funcs=[spread]).step(0)
    # 2 iterations x (old policy + reference) passes of the same tokens
    tokens = out["completion_length"] * 4
    assert out["tokens_per_s/estimate"] == pytest.approx(4 * tokens / out["seconds/estimate"], rel=1e-6)


def test_a_model_passed_in_python_is_not_held_to_model_tiny(tokenizer, tmp_path):
    """rollout.cache=block needs a block-causal model. The tiny model a recipe builds (model.path empty) is checked
    against model.tiny before it is built; a model passed to the trainer is the decoder's to check, not model.tiny's:
    a block-causal one trains under the exact block cache although model.tiny says bidirectional, and a
    bidirectional one is refused by the decoder."""
    from conftest import make_model

    flat = [lambda prompts, completions, **kw: [1.0] * len(prompts)]
    r = recipe(tmp_path / "run", grpo__num_generations=2, train__max_steps=1, train__batch_size=2)
    r = replace(r, model=replace(r.model, path=None), rollout=replace(r.rollout, cache="block", block_length=4))
    with pytest.raises(ConfigError, match="rollout.cache=block is exact only for block-causal models"):
        GRPOTrainer(r, reward_funcs=flat)
    model = make_model(tokenizer, attention="block_causal", block_size=4)
    GRPOTrainer(r, reward_funcs=flat, model=model, tokenizer=tokenizer).train()
    assert (tmp_path / "run" / "final").is_dir()
    r = replace(r, train=replace(r.train, output_dir=str(tmp_path / "bidirectional")))
    with pytest.raises(ConfigError, match=r"rollout.cache=block is exact only for block-causal models \(block diff"):
        GRPOTrainer(r, reward_funcs=flat, model=make_model(tokenizer), tokenizer=tokenizer).train()  # the decoder's
