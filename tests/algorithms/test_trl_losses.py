"""TRL 1.16's loss variants (cispo, sapo, the two-sided clip delta, dapo over the accumulated batch) and the entropy
mask, on hand-computed examples. Formulas read in trl 1.16, trl/trainer/grpo_trainer.py `_compute_loss`:
cispo -clamp(r, max=epsilon_high).detach() * A * logp; sapo -(sigmoid(tau (r - 1)) * 4 / tau) * A with tau by
the advantage's sign; delta caps the unclipped ratio; dapo divides by the accumulated batch's token count
(num_items_in_batch); the entropy mask multiplies the policy term before the KL term is added."""

from __future__ import annotations

import pytest
import torch

from dllm_rl.algorithms import LOSSES, LossInputs
from dllm_rl.config import GRPOConfig

MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]).float()  # 3, 1 and 2 tokens
ADV = torch.tensor([1.0, -2.0, 0.5])


def cfg(**kw):
    return GRPOConfig(**kw)


def inputs(shift=0.0, **kw):
    g = torch.Generator().manual_seed(0)
    old = torch.randn(3, 4, generator=g)
    logps = (old + shift).clone().requires_grad_(True)
    return LossInputs(logps, old, None, ADV, MASK, group_size=3, **kw), logps


@pytest.mark.parametrize("shift", [0.0, 0.3, -0.4])
def test_cispo_is_reinforce_weighted_by_the_ratio_clipped_from_above(shift):
    x, logps = inputs(shift)
    loss, stats = LOSSES["cispo"](x, cfg(loss_type="cispo", epsilon_high=1.2))
    loss.backward()
    weight = torch.full_like(logps, float(torch.tensor(shift).exp())).clamp(max=1.2)  # r = e^shift everywhere
    expected = -(weight * ADV[:, None]) * MASK / MASK.sum()  # no normaliser given: the micro-batch's tokens
    torch.testing.assert_close(logps.grad, expected)
    assert stats["cispo_clip_ratio"] == pytest.approx(
        float(shift > 0.19) * (3 + 2) / 6  # clipped where r > 1.2 and A > 0 (rows 0 and 2)
    )


def test_sapo_gate_value_and_gradient():
    x, logps = inputs(0.0)
    c = cfg(loss_type="sapo", sapo_temperature_pos=1.0, sapo_temperature_neg=1.05)
    loss, _ = LOSSES["sapo"](x, c)
    tau = torch.tensor([1.0, 1.05, 1.0])
    # r = 1: sigmoid(0) * 4 / tau = 2 / tau per token; grpo aggregation (mean over tokens, then sequences)
    assert loss.item() == pytest.approx(float((-(2 / tau) * ADV).mean()), abs=1e-6)
    loss.backward()
    # d/dlogp of -(4/tau) sigmoid(tau (r - 1)) A at r = 1 is -A (sigmoid'(0) = 1/4): GRPO's gradient at ratio 1
    n = MASK.sum(-1, keepdim=True)
    torch.testing.assert_close(logps.grad, -ADV[:, None] * MASK / n / 3)


def test_delta_caps_the_unclipped_ratio_for_negative_advantages():
    x, logps = inputs(1.0)  # r = e = 2.72 everywhere: above 1 + epsilon_high
    plain, _ = LOSSES["grpo"](x, cfg(loss_type="grpo"))
    capped, stats = LOSSES["grpo"](x, cfg(loss_type="grpo", delta=1.5))
    # A < 0 (row 1): -min(r A, clip(r) A) = -r A unclipped; delta makes it -min(1.5 A, 1.2 A) = -1.5 A
    per_row = lambda r1: torch.stack([-1.2 * ADV[0], -r1 * ADV[1], -1.2 * ADV[2]])  # positive A: the clip binds
    assert plain.item() == pytest.approx(float(per_row(torch.tensor(1.0).exp()).mean()), rel=1e-5)
    assert capped.item() == pytest.approx(float(per_row(torch.tensor(1.5)).mean()), rel=1e-5)


def test_dapo_normalises_over_the_accumulated_batch_bnpo_over_the_micro_batch():
    """Two micro-batches of one optimizer step with 3 and 1 tokens: accelerate divides each loss by the 2
    accumulation steps, so dapo's normaliser is (3 + 1) / 2 and the summed gradient is the token mean of all 4
    tokens; bnpo's per-micro-batch means weight the lone token three times as much."""
    logps = torch.zeros(2, 3, requires_grad=True)
    masks = [torch.tensor([[1.0, 1, 1]]), torch.tensor([[1.0, 0, 0]])]
    adv = [torch.tensor([1.0]), torch.tensor([1.0])]
    grads = {}
    for loss_type in ("dapo", "bnpo"):
        logps.grad = None
        for i in range(2):
            lp = logps[i : i + 1]
            x = LossInputs(lp, lp.detach(), None, adv[i], masks[i], 1, token_normalizer=4 / 2)
            loss, _ = LOSSES[loss_type](x, cfg(loss_type=loss_type))
            (loss / 2).backward()  # what accelerate's backward does with 2 accumulation steps
        grads[loss_type] = logps.grad.clone()
    torch.testing.assert_close(grads["dapo"], -torch.tensor([[1.0, 1, 1], [1, 0, 0]]) / 4)
    torch.testing.assert_close(grads["bnpo"], -torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1, 0, 0]]) / 2)


def test_the_entropy_mask_removes_the_policy_term_only():
    x, logps = inputs(0.0)
    keep = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0]]).bool()
    x.ref_logps = x.old_logps + 0.5
    masked = LossInputs(**{**x.__dict__, "entropy_mask": keep})
    c = cfg(loss_type="bnpo", beta=0.1)
    loss, stats = LOSSES["bnpo"](masked, c)
    loss.backward()
    kl_grad = 0.1 * (1 - torch.tensor(0.5).exp())  # d/dlogp of beta * k3 at logp = ref - 0.5
    expected = (-ADV[:, None] * keep.float() + kl_grad) * MASK / MASK.sum()
    torch.testing.assert_close(logps.grad, expected)


def test_bias_corrected_kl_is_k3_times_the_ratio():
    x, logps = inputs(0.3)
    x.ref_logps = x.old_logps - 0.2
    plain, a = LOSSES["bnpo"](x, cfg(loss_type="bnpo", beta=1.0))
    corrected, b = LOSSES["bnpo"](x, cfg(loss_type="bnpo", beta=1.0, use_bias_correction_kl=True))
    d = torch.tensor(-0.5)  # ref - logp
    k3 = d.exp() - d - 1
    r = torch.tensor(0.3).exp()
    assert b["kl"] == pytest.approx(float(k3 * r), rel=1e-5) and a["kl"] == pytest.approx(float(k3), rel=1e-5)
    assert (corrected - plain).item() == pytest.approx(float(k3 * (r - 1)), rel=1e-4)
