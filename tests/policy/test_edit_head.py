"""The edit head and its decisions (policy.edit_head, policy.edits): the legal sets' conditionals form one
probability distribution over a step's decisions (exact enumeration), the sequential sampler draws from it
(chi-square), the limits hold, an untrained head keeps everything, and heads save, load and adapt to the native
LLaDA / Dream classes."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from dllm_rl.config import EditPolicyConfig, RolloutConfig
from dllm_rl.errors import ConfigError
from dllm_rl.policy import EditHead, EditHeadConfig, edit_head_for
from dllm_rl.policy.edit_head import FILE, features
from dllm_rl.policy.edits import DELETE_OP, KEEP, REMASK_OP, EditLimits, EditState, decision_logprobs, sample_edits

MASK = 1


def states():
    """Three rows of capacity 4: [a, MASK, b | pad], [MASK | pad x3], [a, b, c, d] (full)."""
    canvas = torch.tensor([[7, MASK, 8, 0], [MASK, 0, 0, 0], [7, 8, 9, 10]])
    length = torch.tensor([3, 1, 4])
    valid = torch.arange(4)[None, :] < length[:, None]
    is_mask = (canvas == MASK) & valid
    return EditState(is_mask, valid & ~is_mask, length)


def all_actions(L: int, K: int):
    for ops in itertools.product(range(3), repeat=L):
        for counts in itertools.product(range(K + 1), repeat=L + 1):
            yield torch.tensor(ops), torch.tensor(counts)


@pytest.mark.parametrize(
    "lim",
    [
        EditLimits(remask=True, delete=True, max_insert=2, max_length=4, max_per_step=2),
        EditLimits(remask=True, delete=True, max_insert=1, max_length=5, max_per_step=9),
        EditLimits(remask=True, delete=False, max_insert=0, max_length=4, max_per_step=1),
    ],
)
def test_decisions_are_one_distribution(lim):
    """Summed over every combination of ops and counts, exp(sum of the decisions' log-probs) is 1 per row:
    the sequential legal sets (budget, length bounds, deleted positions owning no gap) define a proper
    distribution, with no mass lost to limits. Every combination that gets mass respects the limits."""
    torch.manual_seed(0)
    st = states()
    n, L = st.is_mask.shape
    K = lim.max_insert
    op_logits, ins_logits = torch.randn(n, L, 3), torch.randn(n, L + 1, K + 1)
    actions = list(all_actions(L, K))
    ops = torch.stack([a for a, _ in actions])  # [A, L]
    counts = torch.stack([c for _, c in actions])  # [A, L+1]
    for r in range(n):
        A = len(actions)
        row = EditState(st.is_mask[r].expand(A, L), st.committed[r].expand(A, L), st.length[r].expand(A))
        a, b = decision_logprobs(
            op_logits[r].expand(A, L, 3), ins_logits[r].expand(A, L + 1, K + 1), row, ops, counts, lim, 1.0
        )
        lp = (a.sum(-1) + b.sum(-1)).double()
        assert math.isclose(lp.exp().sum().item(), 1.0, abs_tol=1e-6)
        live = lp > float("-inf")
        assert (ops[live][:, int(st.length[r]) :] == KEEP).all()
        edits = (ops[live] != KEEP).sum(-1) + (counts[live] > 0).sum(-1)
        assert (edits <= lim.max_per_step).all()
        new_len = st.length[r] - (ops[live] == DELETE_OP).sum(-1) + counts[live].sum(-1)
        assert (new_len >= lim.min_length).all() and (new_len <= lim.max_length).all()
        assert not (ops[live] == REMASK_OP)[:, st.is_mask[r]].any()  # masks are never remasked
        if not lim.delete:
            assert not (ops[live] == DELETE_OP).any()


def test_sampler_draws_the_scored_distribution():
    """sample_edits (a loop over positions) draws whole decision sets with the probabilities decision_logprobs
    (vectorised, what the estimator uses) gives them: chi-square over the sets of one row."""
    torch.manual_seed(1)
    lim = EditLimits(remask=True, delete=True, max_insert=2, max_length=4, max_per_step=2)
    st = states()
    r, draws = 0, 20000
    L = st.is_mask.shape[1]
    op_logits, ins_logits = torch.randn(1, L, 3).expand(draws, L, 3), torch.randn(1, L + 1, 3).expand(draws, L + 1, 3)
    row = EditState(st.is_mask[r].expand(draws, L), st.committed[r].expand(draws, L), st.length[r].expand(draws))
    g = torch.Generator().manual_seed(0)
    u_op, u_ins = torch.rand(draws, L, generator=g), torch.rand(draws, L + 1, generator=g)
    ops, counts = sample_edits(op_logits, ins_logits, row, lim, 1.0, u_op, u_ins)
    a, b = decision_logprobs(op_logits, ins_logits, row, ops, counts, lim, 1.0)
    lp = (a.sum(-1) + b.sum(-1)).double()
    assert torch.isfinite(lp).all()  # every draw is legal
    keys = [tuple(x) for x in torch.cat([ops, counts], 1).tolist()]
    prob = dict(zip(keys, lp.exp().tolist()))
    observed = {k: keys.count(k) for k in prob}
    keep = [k for k in prob if draws * prob[k] >= 5]
    chi2 = sum((observed[k] - draws * prob[k]) ** 2 / (draws * prob[k]) for k in keep)
    dof = len(keep) - 1
    assert dof >= 10
    assert chi2 < dof + 6 * math.sqrt(2 * dof) + 10, (chi2, dof)
    # temperature 0: the argmax of each conditional (gap 0 has room for one mask; position 0 holds a committed
    # token with budget left: all three ops legal)
    ops0, counts0 = sample_edits(op_logits[:1], ins_logits[:1], row_at(row, 1), lim, 0.0, u_op[:1], u_ins[:1])
    assert counts0[0, 0] == ins_logits[0, 0, :2].argmax() and ops0[0, 0] == op_logits[0, 0].argmax()
    a0, b0 = decision_logprobs(op_logits[:1], ins_logits[:1], row_at(row, 1), ops0, counts0, lim, 0.0)
    assert (a0 == 0).all() and (b0 == 0).all()


def row_at(st: EditState, n: int) -> EditState:
    return EditState(st.is_mask[:n], st.committed[:n], st.length[:n])


def test_untrained_head_keeps_everything():
    """The last layer starts at zero with KEEP and count 0 init_bias above the rest: argmax keeps, and the
    probability of editing is what the bias says, whatever the hidden states."""
    torch.manual_seed(0)
    head = EditHead(EditHeadConfig(hidden_size=16, width=8, heads=2, max_insert=2, init_bias=3.0))
    hidden, feats = torch.randn(2, 5, 16), torch.rand(2, 5, 5)
    valid = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
    op, ins = head(hidden, feats, valid)
    assert op.shape == (2, 5, 3) and ins.shape == (2, 6, 3)
    assert (op.argmax(-1) == KEEP).all() and (ins.argmax(-1) == 0).all()
    p_keep = op.softmax(-1)[..., 0]
    assert torch.allclose(p_keep, torch.full_like(p_keep, math.exp(3) / (math.exp(3) + 2)))


def test_features_read_the_model_view():
    logits = torch.randn(1, 3, 10)
    canvas = torch.tensor([[4, MASK, 0]])
    valid = torch.tensor([[True, True, False]])
    f = features(logits, canvas, valid, MASK)
    assert f.shape == (1, 3, 5)
    assert f[0, 0, 1] == 1 and f[0, 1, 0] == 1 and (f[0, 2] == 0).all()  # committed, mask, outside
    logp = logits.clone()
    logp[..., MASK] = float("-inf")
    assert torch.isclose(f[0, 0, 2], logp[0, 0].softmax(-1)[4])  # p(current token) at a committed position


def test_save_load_and_building(tmp_path, model_factory):
    model = model_factory()
    rollout = RolloutConfig(edit="any", edit_max_insert=3)
    assert edit_head_for(RolloutConfig(), model, None, EditPolicyConfig()) is None
    head = edit_head_for(rollout, model, None, EditPolicyConfig(width=16, heads=2), seed=3)
    assert head.cfg.max_insert == 3 and head.training
    again = edit_head_for(rollout, model, None, EditPolicyConfig(width=16, heads=2), seed=3)
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), again.state_dict().values()))
    assert (
        edit_head_for(RolloutConfig(edit="remask"), model, None, EditPolicyConfig(width=16, heads=2)).cfg.max_insert
        == 0
    )
    torch.nn.init.normal_(head.out[1].weight)
    model.save_pretrained(tmp_path)  # a checkpoint directory: the model's files, and the head beside them
    head.save(tmp_path)
    assert (tmp_path / FILE).is_file()
    loaded = edit_head_for(rollout, model, str(tmp_path), EditPolicyConfig())  # a saved head wins over a fresh one
    assert all(torch.equal(a, b) for a, b in zip(head.state_dict().values(), loaded.state_dict().values()))
    assert repr(loaded).startswith("EditHead(")
    (tmp_path / "final").mkdir()
    model.save_pretrained(tmp_path / "final")  # a model without a head, and no recipe section to build one
    with pytest.raises(ConfigError, match="edit_policy.pt does not exist"):
        edit_head_for(rollout, model, str(tmp_path / "final"))
    with pytest.raises(ConfigError, match="divisible"):
        EditHead(EditHeadConfig(hidden_size=8, width=10, heads=4))
