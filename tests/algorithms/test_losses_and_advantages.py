"""Advantages and policy losses (dllm_rl.algorithms) on hand-computed examples, the k3 KL estimator against the
exact KL of a small categorical (exactly and by Monte Carlo), and a policy-gradient sanity check on a tiny
model: one SGD step of each loss moves the estimator's log-likelihood of the rewarded completion up relative
to the penalised one, whichever estimator supplies the log-likelihoods."""

from __future__ import annotations

import copy
import math
import statistics

import pytest
import torch

import dllm_rl.models as M
from dllm_rl import estimators as E
from dllm_rl.algorithms import ADVANTAGES, LOSSES, LossInputs, kl_k3, scale, zero_std_groups
from dllm_rl.algorithms.advantages import EPS
from dllm_rl.config import EstimatorConfig, GRPOConfig, RolloutConfig
from dllm_rl.models.base import traits
from dllm_rl.rollout import generate

group_mean, leave_one_out = ADVANTAGES["group_mean"], ADVANTAGES["leave_one_out"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ advantages


def test_group_mean_and_leave_one_out_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 6.0])  # B = 2 groups of G = 4
    assert torch.allclose(group_mean(r, 4), torch.tensor([0.5, -0.5, -0.5, 0.5, -1.0, -1.0, -1.0, 3.0]))
    # leave-one-out baseline: mean of the other three; group 1: (2 - r) / 3, group 2: (12 - r) / 3
    others = torch.tensor([1 / 3, 2 / 3, 2 / 3, 1 / 3, 10 / 3, 10 / 3, 10 / 3, 2.0])
    assert torch.allclose(leave_one_out(r, 4), r - others)
    with pytest.raises(ValueError):
        leave_one_out(torch.tensor([1.0, 2.0]), 1)


@pytest.mark.parametrize("G", [2, 3, 5, 8])
def test_leave_one_out_is_rescaled_group_mean(G):
    # r_i - (S - r_i)/(G-1) = (G r_i - S)/(G-1) = G/(G-1) (r_i - S/G)
    r = torch.randn(4 * G, generator=torch.Generator().manual_seed(G), dtype=torch.float64)
    assert torch.allclose(leave_one_out(r, G), G / (G - 1) * group_mean(r, G))


def test_scaling_by_hand():
    r = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 6.0])
    adv = group_mean(r, 4)
    s1, s2 = statistics.stdev([1, 0, 0, 1]), statistics.stdev([2, 2, 2, 6])  # Bessel, as TRL
    expect = adv / torch.tensor([s1 + EPS] * 4 + [s2 + EPS] * 4)
    assert torch.allclose(scale(adv, r, 4, "group"), expect)
    assert torch.allclose(scale(adv, r, 4, "batch"), adv / (statistics.stdev(r.tolist()) + EPS))
    assert torch.equal(scale(adv, r, 4, "none"), adv)
    # a constant group gives zero advantages, not NaN
    assert torch.equal(scale(group_mean(torch.ones(4), 4), torch.ones(4), 4, "group"), torch.zeros(4))


def test_zero_std_groups_flags_exactly_the_constant_groups():
    r = torch.tensor([1, 1, 1, 0, 1, 0, 2, 2, 2, 0.5, 0.5, 0.5000001, -3, -3, -3])
    flags = zero_std_groups(r, 3)
    assert flags.tolist() == [True] * 3 + [False] * 3 + [True] * 3 + [False] * 3 + [True] * 3


# ---------------------------------------------------------------------------------------------------- losses


def cfg(**kw) -> GRPOConfig:
    return GRPOConfig(**{"beta": 0.0, "epsilon": 0.2, **kw})


UNEVEN = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]])  # 3, 1 and 2 tokens
ADV = torch.tensor([1.0, -2.0, 0.5])


@pytest.mark.parametrize(
    "loss_type,expected",
    [
        ("grpo", -(1 - 2 + 0.5) / 3),  # mean over each sequence's tokens, then over sequences
        ("bnpo", -(3 * 1 - 1 * 2 + 2 * 0.5) / 6),  # mean over all tokens
        ("dapo", -(3 * 1 - 1 * 2 + 2 * 0.5) / 6),
        ("dr_grpo", -(3 * 1 - 1 * 2 + 2 * 0.5) / (3 * 4)),  # sum / (N * Lc)
    ],
)
def test_clipped_at_ratio_one_by_hand(loss_type, expected):
    logps = torch.randn(3, 4, generator=torch.Generator().manual_seed(0), requires_grad=True)
    x = LossInputs(logps, logps.detach(), None, ADV, UNEVEN, group_size=3)
    loss, stats = LOSSES[loss_type](x, cfg(loss_type=loss_type))
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert stats["clip_fraction"] == 0
    loss.backward()
    n_tok = UNEVEN.sum(-1, keepdim=True).float()
    per_token = {
        "grpo": -ADV[:, None] / n_tok / 3,
        "bnpo": -ADV[:, None] / 6,
        "dapo": -ADV[:, None] / 6,
        "dr_grpo": -ADV[:, None] / 12,
    }[loss_type]
    assert torch.allclose(logps.grad, per_token * UNEVEN)  # gradient of -A * ratio, ratio = 1


def test_clipping_zeroes_the_gradient_only_on_the_clipped_side():
    c = cfg(epsilon=0.2, epsilon_high=0.28)
    # one token per sequence: (advantage, ratio, gradient expected?)
    cases = [
        (1.0, 1.35, False),
        (1.0, 1.2, True),
        (1.0, 0.7, True),
        (-1.0, 0.7, False),
        (-1.0, 0.9, True),
        (-1.0, 1.35, True),
    ]
    adv = torch.tensor([a for a, _, _ in cases])
    old = torch.zeros(len(cases), 1)
    logps = torch.tensor([[math.log(r)] for _, r, _ in cases], requires_grad=True)
    loss, stats = LOSSES["grpo"](LossInputs(logps, old, None, adv, torch.ones(len(cases), 1), 6), c)
    loss.backward()
    for (a, r, flows), g in zip(cases, logps.grad[:, 0].tolist()):
        assert (g != 0) == flows, (a, r, g)
        if flows:
            assert g == pytest.approx(-a * r / len(cases), rel=1e-5)
    assert stats["clip_fraction"] == pytest.approx(2 / 6)


def test_sequence_level_ratio_is_one_per_sequence():
    """GSPO: ratio = exp(mean over the sequence's tokens of (logp - old)); two sequences with the same mean
    log-ratio get the same loss whatever the spread, and every token of a sequence the same gradient."""
    c = cfg(importance_sampling_level="sequence", epsilon=0.5)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    old = torch.zeros(2, 4)
    logps = torch.tensor([[0.1, 0.2, 0.3, 9.0], [0.0, 0.2, 0.4, -9.0]], requires_grad=True)  # means 0.2, 0.2
    adv = torch.tensor([1.0, 1.0])
    loss, _ = LOSSES["grpo"](LossInputs(logps, old, None, adv, mask, 2), c)
    assert loss.item() == pytest.approx(-math.exp(0.2), rel=1e-6)
    loss.backward()
    expected = math.exp(0.2) / 3 / 2  # d/dlogp_t of -exp(mean) averaged over 2 sequences: -exp(0.2)/3/2
    assert torch.allclose(logps.grad, -expected * mask)
    token, _ = LOSSES["grpo"](LossInputs(logps.detach(), old, None, adv, mask, 2), cfg(epsilon=0.5))
    assert token.item() != pytest.approx(loss.item())  # token level differs here: the check is not vacuous


def test_kl_k3_properties_and_expectation():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1000, generator=g, dtype=torch.float64), torch.randn(1000, generator=g, dtype=torch.float64)
    assert (kl_k3(a, b) >= 0).all() and (kl_k3(a, b) > 0).all()
    assert torch.equal(kl_k3(a, a), torch.zeros(1000))
    # a small categorical: E_{x ~ pi}[k3(x)] = sum pi (ref/pi - log(ref/pi) - 1) = KL(pi || ref) exactly
    logpi = torch.randn(6, generator=g, dtype=torch.float64).log_softmax(-1)
    logref = torch.randn(6, generator=g, dtype=torch.float64).log_softmax(-1)
    kl = (logpi.exp() * (logpi - logref)).sum().item()
    assert (logpi.exp() * kl_k3(logpi, logref)).sum().item() == pytest.approx(kl, rel=1e-10)
    n = 200_000
    x = torch.multinomial(logpi.exp(), n, replacement=True, generator=g)
    k3 = kl_k3(logpi[x], logref[x])
    se = k3.std().item() / math.sqrt(n)
    print(f"KL exact {kl:.4f}, k3 Monte Carlo {k3.mean():.4f} +- {se:.4f}")
    assert abs(k3.mean().item() - kl) < 4 * se


def test_clipped_adds_beta_k3():
    logps = torch.tensor([[-1.0, -2.0], [-0.5, -0.1]])
    ref = torch.tensor([[-1.5, -2.0], [-0.2, -0.3]])
    mask = torch.tensor([[1, 1], [1, 0]])
    x = LossInputs(logps, logps, ref, torch.tensor([1.0, -1.0]), mask, 2)
    loss, stats = LOSSES["grpo"](x, cfg(beta=0.1))
    k3 = kl_k3(logps, ref)
    expected = ((-1 + 0.1 * k3[0]).sum() / 2 + (1 + 0.1 * k3[1, 0])) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert stats["kl"] == pytest.approx((k3[0].sum() + k3[1, 0]).item() / 3, rel=1e-6)


def test_wd1_weights_by_hand():
    A = torch.tensor([1.0, 0.0, -1.0, 2.0, 2.0, 2.0])  # two groups of 3; the second is constant
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [0, 1], [1, 1]])
    logps = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss, _ = LOSSES["wd1"](LossInputs(logps, logps.detach(), None, A, mask, 3), cfg(loss_type="wd1"))
    seq = (logps.detach() * mask).sum(-1)
    e = [math.exp(1), 1.0, math.exp(-1)]
    w_pos = [v / sum(e) for v in e]  # softmax(A) within the group
    w_neg = w_pos[::-1]  # softmax(-A)
    expected = sum((w_neg[i] - w_pos[i]) * seq[i].item() for i in range(3)) / 2  # averaged over the 2 groups
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert torch.equal(logps.grad[3:], torch.zeros(3, 2))  # equal advantages: no signal
    assert (logps.grad[0] < 0).all() and (logps.grad[2] > 0).all()  # descent raises the best, lowers the worst
    flat, _ = LOSSES["wd1"](LossInputs(logps, logps, None, torch.full((6,), 0.7), mask, 3), cfg())
    assert flat.item() == 0


@pytest.mark.parametrize("bound", ["elbo", "eubo", "mix", "zero"])
def test_spg_bound_choice_by_hand(bound):
    lower = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5], [-3.0, 0.0, 0.0]])
    upper = torch.tensor([[-0.5, -1.0, 0.0], [-0.2, -0.2, -0.2], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    A = torch.tensor([1.0, -1.0, -2.0])
    x = LossInputs(lower, lower, None, A, mask, 3, upper=upper)
    loss, _ = LOSSES["spg"](x, cfg(loss_type="spg", spg_bound=bound, spg_mix_weight=0.25))
    lo, up = [-3.0, -1.5, -3.0], [-1.5, -0.6, -1.0]
    neg = {"elbo": lo, "eubo": up, "mix": [0.25 * u + 0.75 * v for u, v in zip(up, lo)], "zero": [0.0] * 3}[bound]
    chosen = [lo[0], neg[1], neg[2]]  # the lower bound for A > 0, the chosen bound for A < 0
    length = [2, 3, 1]
    expected = sum(-a * b * n for a, b, n in zip(A.tolist(), chosen, length)) / sum(length)
    assert loss.item() == pytest.approx(expected, rel=1e-6)


# ---------------------------------------------------------------------------------------- policy gradient


@pytest.fixture(scope="module")
def pg_setup(tokenizer):
    """A tiny random model (weights redrawn at std 0.3, so log-probs depend on context) and a group of two
    different completions of one prompt."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = M.TinyMDM(
            M.TinyMDMConfig(
                vocab_size=12,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=64,
                mask_token_id=tokenizer.mask_token_id,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        )
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    rollout = RolloutConfig(max_completion_length=8, steps=8, block_length=4, temperature=1.0, stop_at_eos=False)
    batch = generate(model, tokenizer, [[5, 7, 4], [5, 7, 4]], rollout, torch.Generator().manual_seed(0))
    kept = batch.completion_ids * batch.completion_mask  # the scored parts (up to the first EOS) must differ
    assert not torch.equal(kept[0], kept[1]) and batch.completion_mask.sum(-1).min() >= 4
    return model, batch, rollout


def sequence_ll(model, batch, noise, est):
    out = est.estimate(model, batch, noise)
    return out, (out.logps * batch.completion_mask).sum(-1)


@pytest.mark.parametrize(
    "estimator,loss_type",
    [
        ("one_step", "grpo"),
        ("elbo", "grpo"),
        ("trajectory", "grpo"),
        ("one_step", "dr_grpo"),
        ("one_step", "wd1"),
        ("block_elbo", "spg"),
    ],
)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_one_step_of_the_loss_moves_likelihoods_the_right_way(pg_setup, estimator, loss_type, sign):
    """Advantages (+1, -1) (and, mirrored, (-1, +1)): one SGD step on the loss, at ratio 1 and under a fixed
    noise, must raise LL(first) - LL(second) (lower it, mirrored). A sign error anywhere fails this."""
    base, batch, rollout = pg_setup
    model = copy.deepcopy(base).train()
    ecfg = EstimatorConfig(name=estimator, num_samples=4)
    est = E.ESTIMATORS[estimator](ecfg, traits(model))
    noise = est.draw(batch, torch.Generator().manual_seed(1))
    out, before = sequence_ll(model, batch, noise, est)
    adv = torch.tensor([sign, -sign])
    x = LossInputs(out.logps, out.logps.detach(), None, adv, batch.completion_mask, 2, upper=out.upper)
    loss, _ = LOSSES[loss_type](x, cfg(loss_type=loss_type, spg_bound="elbo"))
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=1e-4).step()
    with torch.no_grad():
        _, after = sequence_ll(model, batch, noise, est)
    gap_before, gap_after = (before[0] - before[1]).item(), (after[0] - after[1]).item()
    print(f"{estimator} {loss_type} sign {sign:+.0f}: LL gap {gap_before:.5f} -> {gap_after:.5f}")
    assert sign * (gap_after - gap_before) > 0
