"""The DPO losses (algorithms.dpo) against values worked out by hand, TRL's metrics, and the config checks.

Two pairs, beta = 0.5, label_smoothing e = 0.1:
  A: policy chosen -10, rejected -12; reference -11, -11; 4 and 2 chosen/rejected tokens.
     delta = (-10 + 11) - (-12 + 11) = 2, beta * delta = 1; per token: 1/4 - (-1/2) = 0.75.
  B: policy chosen -20, rejected -15; reference -18, -16; 5 and 10 tokens.
     delta = (-20 + 18) - (-15 + 16) = -3, beta * delta = -1.5; per token: -2/5 - 1/10 = -0.5.
log sigmoid(z) = -log(1 + exp(-z)): log sigmoid(1) = -0.3132617, log sigmoid(-1.5) = -1.7014133,
log sigmoid(0.375) = -0.5231233, log sigmoid(-0.25) = -0.8259394.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from dllm_rl.algorithms import DPO_LOSSES, PreferenceInputs, dpo_loss, preference_metrics
from dllm_rl.algorithms.dpo import check
from dllm_rl.config import DPOConfig
from dllm_rl.errors import ConfigError

X = PreferenceInputs(
    chosen=torch.tensor([-10.0, -20.0]),
    rejected=torch.tensor([-12.0, -15.0]),
    ref_chosen=torch.tensor([-11.0, -18.0]),
    ref_rejected=torch.tensor([-11.0, -16.0]),
    chosen_tokens=torch.tensor([4.0, 5.0]),
    rejected_tokens=torch.tensor([2.0, 10.0]),
)

BY_HAND = {
    # -log sigmoid(beta delta)
    "sigmoid": [0.3132617, 1.7014133],
    # relu(1 - beta delta): relu(1 - 1) = 0, relu(1 + 1.5) = 2.5
    "hinge": [0.0, 2.5],
    # (delta per token - 1 / (2 beta))^2 = (0.75 - 1)^2 = 0.0625, (-0.5 - 1)^2 = 2.25
    "ipo": [0.0625, 2.25],
    # (-(1 - e) log sigmoid(z) + e log sigmoid(-z)) / (1 - 2e), z = beta delta; since log sigmoid(-z) =
    # log sigmoid(z) - z this is -log sigmoid(z) - e z / (1 - 2e): 0.3132617 - 0.125, 1.7014133 + 0.1875
    "robust": [0.1882617, 1.8889133],
    # -log sigmoid(beta * delta per token): -log sigmoid(0.375), -log sigmoid(-0.25)
    "sigmoid_norm": [0.5231233, 0.8259394],
    # -logpi_w / |w| (RPO's NLL term, no reference): 10 / 4, 20 / 5
    "sft": [2.5, 4.0],
}


def cfg(**kw):
    return SimpleNamespace(**{**{"beta": 0.5, "label_smoothing": 0.1, "loss_weights": None}, **kw})


@pytest.mark.parametrize("name", list(DPO_LOSSES))
def test_each_loss_equals_its_value_by_hand(name):
    got = dpo_loss(X, cfg(loss_type=name))
    torch.testing.assert_close(got, torch.tensor(BY_HAND[name]), rtol=0, atol=1e-6)


def test_robust_without_smoothing_is_sigmoid_and_losses_combine_with_weights():
    torch.testing.assert_close(
        dpo_loss(X, cfg(loss_type="robust", label_smoothing=0.0)), torch.tensor(BY_HAND["sigmoid"]), rtol=0, atol=1e-6
    )
    both = dpo_loss(X, cfg(loss_type=["sigmoid", "hinge"], loss_weights=[0.8, 0.2]))
    want = [0.8 * a + 0.2 * b for a, b in zip(BY_HAND["sigmoid"], BY_HAND["hinge"])]
    torch.testing.assert_close(both, torch.tensor(want), rtol=0, atol=1e-6)


def test_metrics_are_trls():
    m = {k: v.tolist() for k, v in preference_metrics(X, 0.5).items()}
    assert m["rewards/chosen"] == [0.5, -1.0]  # 0.5 * (-10 + 11), 0.5 * (-20 + 18)
    assert m["rewards/rejected"] == [-0.5, 0.5]  # 0.5 * (-12 + 11), 0.5 * (-15 + 16)
    assert m["rewards/margins"] == [1.0, -1.5]
    assert m["rewards/accuracies"] == [1.0, 0.0]
    assert m["logps/chosen"] == [-10.0, -20.0] and m["logps/rejected"] == [-12.0, -15.0]
    # strict: equal rewards are not "accurate", as in TRL
    tie = PreferenceInputs(*(torch.zeros(1) for _ in range(4)), torch.ones(1), torch.ones(1))
    assert preference_metrics(tie, 0.5)["rewards/accuracies"].item() == 0.0


def test_gradient_pushes_chosen_up_and_rejected_down():
    """Every preference loss raises the chosen and lowers the rejected estimate; sft (RPO's NLL term) raises the
    chosen one only."""
    chosen, rejected = torch.tensor([-10.0], requires_grad=True), torch.tensor([-12.0], requires_grad=True)
    x = PreferenceInputs(chosen, rejected, torch.tensor([-11.0]), torch.tensor([-11.0]), torch.ones(1), torch.ones(1))
    for name in DPO_LOSSES:
        chosen.grad = rejected.grad = None
        dpo_loss(x, cfg(loss_type=name, beta=0.1)).sum().backward()
        assert chosen.grad.item() < 0, name
        assert rejected.grad is None if name == "sft" else rejected.grad.item() > 0, name


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"loss_type": "sigmoid", "label_smoothing": 0.1}, "read only by loss_type robust"),
        ({"loss_type": "robust", "label_smoothing": 0.5}, r"\[0, 0.5\)"),
        ({"loss_type": "sigmod"}, "did you mean 'sigmoid'"),
        ({"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0]}, "one weight per loss type"),
        ({"beta": 0.0}, "dpo.beta must be > 0"),
    ],
)
def test_config_mistakes_name_the_key_and_the_fix(kw, match):
    with pytest.raises(ConfigError, match=match):
        check(DPOConfig(**kw))
    check(DPOConfig())  # the defaults are valid
