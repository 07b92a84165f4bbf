"""GRPO's diagnostics read each estimator at its own scale: `estimator_std` is the spread of the sequence-level
likelihood estimate (block_elbo's per-token-scale estimates times the completion length, as DPO's sequence
scores), and the non-finite-loss hint names the 1/t timestep fix only for the estimator whose weights are 1/t."""

from pathlib import Path

import pytest
import torch

from dllm_rl.config import recipe_from_dict
from dllm_rl.errors import DllmRlError
from dllm_rl.trainers.grpo import GRPOTrainer

ROOT = Path(__file__).resolve().parents[2]
SFT = ROOT / "checkpoints" / "tiny" / "sudoku-sft"


def recipe(out, estimator: dict, **train):
    return recipe_from_dict(
        {
            "algorithm": "grpo",
            "model": {"path": str(SFT)},
            "data": {"task": "sudoku", "train_size": 16, "eval_size": 8, "seed": 1},
            "rollout": {"max_completion_length": 20, "steps": 20, "temperature": 1.0},
            "grpo": {"num_generations": 4, "beta": 0.0},
            "estimator": estimator,
            "rewards": [],
            "order_policy": {},
            "eval": {},
            "optim": {"lr": 1e-3, "lr_scheduler": "constant"},
            "train": {
                "max_steps": 2,
                "batch_size": 2,
                "output_dir": str(out),
                "logging_steps": 1,
                "eval_steps": 0,
                "save_steps": 0,
                "num_threads": 2,
                **train,
            },
        }
    )


def spread(prompts, completions, **kwargs):
    return [float(i % 2) for i in range(len(completions))]


def test_estimator_std_is_the_spread_of_the_sequence_value_for_block_elbo(tmp_path):
    """block_elbo's per-token estimates sum to ELBO / n (SPG's scale): estimator_std multiplies by the completion
    length n, so it is the std over noise draws of the sequence-level lower bound (what DPO's sequence scores and
    the README's "spread of the likelihood estimate" mean), not of ELBO / n."""
    tr = GRPOTrainer(recipe(tmp_path, {"name": "block_elbo", "num_samples": 2}), reward_funcs=[spread])
    assert tr.estimator.per_token_mean
    examples = [tr.task.train[i] for i in tr.sampler.indices(0, 2)]
    with torch.no_grad():
        batch, _ = tr.rollout(examples, 0)
    logged = tr.estimator_std(batch, torch.Generator().manual_seed(7))
    mb = batch.select(tr._micro_batches(len(batch))[0])
    n = mb.completion_mask.sum(-1).clamp(min=1)
    assert (n > 1).any()
    g = torch.Generator().manual_seed(7)
    values = []
    with torch.no_grad():
        for _ in range(4):
            est = tr.estimator.estimate(tr.model, mb, tr.estimator.draw(mb, g))
            values.append((est.logps * mb.completion_mask).sum(-1) * n)  # the sequence-level lower bound
    expected = torch.stack(values).std(0).mean().item()
    assert expected > 0 and logged == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "estimator,timestep_hint",
    [({"name": "elbo"}, True), ({"name": "block_elbo"}, False), ({"name": "quadrature"}, False)],
)
def test_the_non_finite_loss_hint_names_the_timestep_fix_only_for_the_elbo(tmp_path, estimator, timestep_hint):
    """Only the Monte Carlo ELBO weighs masked tokens by 1/t (unbounded near t = 0): its hint sets
    estimator.t_min=1e-3. block_elbo's weights n_b * s / m and quadrature's w_i / t_i are bounded: their hint is
    the general one."""
    tr = GRPOTrainer(recipe(tmp_path, estimator), reward_funcs=[spread])
    real = tr.loss_fn
    tr.loss_fn = lambda inputs, cfg: (lambda out: (out[0] * float("inf"), out[1]))(real(inputs, cfg))
    with pytest.raises(DllmRlError, match="loss is not finite") as err:
        tr.step(0)
    said = str(err.value)
    assert ("estimator.t_min=1e-3" in said and "1/t" in said) == timestep_hint
    assert ("Lower optim.lr or grpo.beta" in said) != timestep_hint
