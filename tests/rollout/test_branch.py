"""Branch search around a greedy decode (rollout.branch) and the host loop's forced decisions it rests on: forcing a
decode's own decisions replays it exactly; a branch keeps the greedy prefix, changes one decision and records the
model's log-prob of it; the search by rounds finds, per prompt, the same nearest higher-scoring branch as trying
every candidate."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

from dllm_rl.batches import COMMIT
from dllm_rl.config import RolloutConfig
from dllm_rl.rollout.branch import branch_candidates, decode_branches, nearest_branches
from dllm_rl.rollout.eager_loop import generate_host_loop

PROMPTS = ["12+30=", "7*6=", "99-1=", "ab"]
CFG = RolloutConfig(max_completion_length=6, steps=6, temperature=0.0, order="top_prob", cache="none")


def commits(batch, row):
    ev = batch.trace.events
    ev = ev[(ev[:, 0] == row) & (ev[:, 4] == COMMIT)]
    return [tuple(e) for e in ev[:, 1:4].tolist()]  # (step, position, token)


def test_forcing_a_decodes_own_decisions_replays_it(tokenizer):
    model = make_model(tokenizer, seed=3)
    g = generate_host_loop(model, tokenizer, PROMPTS, CFG, torch.Generator().manual_seed(0))
    forced = [(r, s, p, t) for r in range(len(PROMPTS)) for s, p, t in commits(g, r)]
    again = generate_host_loop(
        model, tokenizer, PROMPTS, CFG, torch.Generator().manual_seed(0), forced=torch.tensor(forced)
    )
    assert again.completions == g.completions
    assert torch.equal(again.trace.events, g.trace.events)
    torch.testing.assert_close(again.trace.event_logprob, g.trace.event_logprob)


def test_a_branch_keeps_the_prefix_and_records_the_changed_decision(tokenizer):
    """Every candidate differs from its greedy decode at exactly its branch step (the same position, another
    token); the steps before are the greedy decode's; the recorded log-prob of the new token is the model's, the
    greedy token's minus the gap; candidates come by row, then nearest first."""
    model = make_model(tokenizer, seed=3)
    cand = branch_candidates(model, tokenizer, PROMPTS, CFG, alternatives=2)
    n_commits = sum(len(commits(cand.greedy, r)) for r in range(len(PROMPTS)))
    assert len(cand.source) == 2 * n_commits
    assert (cand.gap >= 0).all()
    for r in range(len(PROMPTS)):
        gaps = cand.gap[cand.source == r]
        assert torch.equal(gaps, gaps.sort().values)
    which = list(range(0, len(cand.source), 3))
    b = decode_branches(model, tokenizer, PROMPTS, CFG, cand, which)
    for i, c in enumerate(which):
        src, s = int(cand.source[c]), int(cand.step[c])
        greedy, branch = commits(cand.greedy, src), commits(b, i)
        assert branch[:s] == greedy[:s]
        assert branch[s] == (s, int(cand.position[c]), int(cand.token[c])) != greedy[s]
        ev = b.trace.events
        at = ((ev[:, 0] == i) & (ev[:, 1] == s) & (ev[:, 4] == COMMIT)).nonzero().item()
        gev = cand.greedy.trace.events
        g_at = ((gev[:, 0] == src) & (gev[:, 1] == s) & (gev[:, 4] == COMMIT)).nonzero().item()
        want = cand.greedy.trace.event_logprob[g_at] - cand.gap[c]
        assert b.trace.event_logprob[at].item() == pytest.approx(want.item(), abs=1e-5)


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_search_finds_the_nearest_higher_branch(tokenizer, sign):
    """Rounds over each prompt's candidates, nearest first, stop at the first branch scoring above the greedy
    decode: the same branch as scoring every candidate and taking the nearest higher one; where none is higher,
    the nearest lower one."""
    model = make_model(tokenizer, seed=3)
    score_text = lambda text: sign * float(text.count("1") + 2 * text.count("2") - text.count("3"))
    score = lambda rows, batch: [score_text(c) for c in batch.completions]
    cand = branch_candidates(model, tokenizer, PROMPTS, CFG, alternatives=2)
    every = decode_branches(model, tokenizer, PROMPTS, CFG, cand, list(range(len(cand.source))))
    s_all = torch.tensor(score(None, every))
    s_greedy = torch.tensor(score(None, cand.greedy))
    found = nearest_branches(model, tokenizer, PROMPTS, CFG, score, alternatives=2, rounds=100)
    assert torch.equal(found.greedy_reward, s_greedy)
    for r in range(len(PROMPTS)):
        mine = (cand.source == r).nonzero().squeeze(-1)  # nearest first
        up = [int(c) for c in mine if s_all[c] > s_greedy[r]]
        down = [int(c) for c in mine if s_all[c] < s_greedy[r]]
        best = up[0] if up else (down[0] if down else None)
        if best is None:
            assert found.branch_index[r] == -1
            continue
        assert found.branch_reward[r] == s_all[best] and found.gap[r] == cand.gap[best]
        assert found.branches.completions[found.branch_index[r]] == every.completions[best]
    assert found.decoded <= len(cand.source)
    assert (found.branch_index >= 0).any()


def test_branch_search_refuses_sampled_orders(tokenizer):
    model = make_model(tokenizer, seed=3)
    with pytest.raises(ValueError, match="state-only unmasking order"):
        branch_candidates(model, tokenizer, PROMPTS, RolloutConfig(**{**CFG.__dict__, "order": "random"}), 2)
