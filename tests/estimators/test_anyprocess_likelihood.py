"""The trajectory likelihood of any-process rollouts (estimators/anyprocess.py) is the probability with which
the sampler produced the trajectory: every decision counts (edits with their KEEPs and zero counts, the order,
the tokens), checked by enumerating every trajectory of a tiny case; and its gradients reach what each term
depends on."""

from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import replace

import pytest
import torch
from conftest import make_model

from dllm_rl.batches import COMMIT, DELETE, INSERT, REMASK, edit_canvas
from dllm_rl.config import EstimatorConfig, RolloutConfig
from dllm_rl.errors import ConfigError
from dllm_rl.estimators import build_estimator
from dllm_rl.models.base import traits
from dllm_rl.policy import EditHead, EditHeadConfig
from dllm_rl.policy.edit_head import features
from dllm_rl.policy.edits import DELETE_OP, KEEP, REMASK_OP, EditState, decision_logprobs, edit_limits
from dllm_rl.policy.orders import model_order_scores
from dllm_rl.rollout import generate
from dllm_rl.rollout.anyprocess import edit_decoding
from dllm_rl.rollout.engine import decoding

PROMPT = [3, 0, 3]  # token ids of a 4-token vocabulary: pad 0, mask 1, eos 2, bos 3


def tiny_case(tokenizer):
    model = make_model(tokenizer, hidden=16, layers=1, heads=2, vocab=4, seed=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(20)  # spread the token distributions
    head = EditHead(EditHeadConfig(hidden_size=16, width=8, heads=2, max_insert=1))
    torch.manual_seed(4)  # a head that remasks, deletes and inserts, each often enough to be sampled
    torch.nn.init.normal_(head.out[1].weight, std=1.0)
    with torch.no_grad():
        head.out[1].bias.copy_(torch.tensor([1.0, 0.0, 0.0, 1.5, 0.0]))  # KEEP, REMASK, DELETE | insert 0, 1
    cfg = RolloutConfig(
        max_completion_length=3,
        steps=2,
        temperature=1.0,
        order="top_prob",
        order_temperature=1.0,
        edit="any",
        edit_max_insert=1,
        edit_max_per_step=1,
        edit_initial_length=1,
        edit_extra_steps=1,
        edit_temperature=1.0,
    )
    return model, head, cfg


def enumerate_trajectories(model, head, cfg, mask_id: int) -> dict:
    """Every trajectory of one prompt with its probability, by depth-first search over the sampler's rules
    (written out again here: the edit decisions over their legal sets, the top_k commit count, the sampled
    Plackett-Luce order over the kept masks, the tokens, the stopping rule), keyed as `trajectory_key` keys a
    trace. Returns {key: log-prob} (float64)."""
    lim = edit_limits(edit_decoding(cfg, decoding(cfg)))
    T = cfg.steps + cfg.edit_extra_steps
    leaves = {}

    def forward(canvas):
        ids = torch.tensor([PROMPT + canvas])
        with torch.no_grad():
            out = model(ids, output_hidden_states=True)
        P = len(PROMPT)
        return out.logits[0, P:].double(), out.hidden_states[-1][:, P:]

    def visit(canvas, step, review, logp, key):
        has_mask = mask_id in canvas
        if not (has_mask or (review and step < T - 1 and cfg.edit_extra_steps > 0)):
            leaves[key] = leaves.get(key, float("-inf"))
            leaves[key] = float(torch.logaddexp(torch.tensor(leaves[key]), torch.tensor(logp)))
            return
        L = len(canvas)
        logits, hidden = forward(canvas)
        c = torch.tensor([canvas])
        valid = torch.ones(1, L, dtype=torch.bool)
        is_mask = c == mask_id
        state = EditState(is_mask, ~is_mask, torch.tensor([L]))
        if step < T - 1:
            with torch.no_grad():
                op_logits, ins_logits = head(hidden, features(logits[None].float(), c, valid, mask_id), valid)
            edits = []
            for ops in itertools.product(range(3), repeat=L):
                for counts in itertools.product(range(lim.max_insert + 1), repeat=L + 1):
                    o, n = torch.tensor([ops]), torch.tensor([counts])
                    a, b = decision_logprobs(op_logits, ins_logits, state, o, n, lim, cfg.edit_temperature)
                    lp = float(a.sum() + b.sum())
                    if lp > float("-inf"):
                        edits.append((ops, counts, lp))
        else:
            edits = [((KEEP,) * L, (0,) * (L + 1), 0.0)]
        token_logp = logits.clone()
        token_logp[:, mask_id] = float("-inf")
        token_logp = (token_logp / cfg.temperature).log_softmax(-1)
        scores = model_order_scores(logits[None].float(), mask_id, "top_prob")[0].double() / cfg.order_temperature
        for ops, counts, lp_e in edits:
            cand = [i for i in range(L) if canvas[i] == mask_id and ops[i] == KEEP]
            left = max(1, cfg.steps - step)
            k = -(-len(cand) // left)
            for chosen in itertools.permutations(cand, k):
                lp_o, rest = 0.0, list(cand)
                for i in chosen:  # Plackett-Luce: each pick among the candidates not yet picked
                    lp_o += float(scores[i] - torch.logsumexp(scores[rest], 0))
                    rest.remove(i)
                for toks in itertools.product(*[[t for t in range(4) if t != mask_id]] * k):
                    lp_t = sum(float(token_logp[i, t]) for i, t in zip(chosen, toks))
                    ev = [[0, 0, i, t, COMMIT] for i, t in zip(chosen, toks)]
                    ev += [[0, 0, i, mask_id, REMASK] for i in range(L) if ops[i] == REMASK_OP]
                    ev += [[0, 0, i, canvas[i], DELETE] for i in range(L) if ops[i] == DELETE_OP]
                    ev += [[0, 0, g - 1, n, INSERT] for g, n in enumerate(counts) if n]
                    new = edit_canvas(torch.tensor(canvas), torch.tensor(ev, dtype=torch.long).view(-1, 5), mask_id)
                    edited = any(op != KEEP for op in ops) or any(counts)
                    step_key = (tuple(zip(chosen, toks)), tuple(sorted((e[2], e[3], e[4]) for e in ev[k:])))
                    visit(new.tolist(), step + 1, edited or k > 0, logp + lp_e + lp_o + lp_t, key + (step_key,))

    visit([mask_id] * (cfg.edit_initial_length or cfg.max_completion_length), 0, False, 0.0, ())
    return leaves


def trajectory_key(trace, row: int) -> tuple:
    """A trace row's decisions per step: (fills in draw order, sorted edits), as enumerate_trajectories keys them."""
    ev = trace.events[trace.events[:, 0] == row]
    key = []
    for s in range(int(trace.num_steps[row])):
        e = ev[ev[:, 1] == s]
        fills = tuple((p, t) for _, _, p, t, k in e.tolist() if k == COMMIT)
        edits = tuple(sorted((p, t, k) for _, _, p, t, k in e.tolist() if k != COMMIT))
        key.append((fills, edits))
    return tuple(key)


def recorded_logprob(trace) -> torch.Tensor:
    """What the sampler recorded, per row: fills + order + edits."""
    fills = trace.events[:, 4] == COMMIT
    tok = torch.zeros(trace.num_steps.shape[0]).index_add(0, trace.events[fills, 0], trace.event_logprob[fills])
    return tok + trace.order_logprob.sum(-1) + trace.edit_logprob.sum(-1)


def test_every_trajectory_has_its_probability(tokenizer):
    """Tiny case (3 slots at most, one slot to start, inserts and deletes, one edit per step, a sampled order,
    a review step): the probabilities of all trajectories sum to 1; 3000 sampled rollouts occur as often as
    those probabilities say (chi-square); for each, the sampler's recorded log-prob, the enumeration's and the
    trajectory estimator's are the same number."""
    model, head, cfg = tiny_case(tokenizer)
    mask_id = tokenizer.mask_token_id
    leaves = enumerate_trajectories(model, head, cfg, mask_id)
    assert math.isclose(sum(math.exp(v) for v in leaves.values()), 1.0, abs_tol=1e-6)
    n = 3000
    out = generate(model, tokenizer, [PROMPT] * n, cfg, torch.Generator().manual_seed(0), edit_policy=head)
    t = out.trace
    kinds = Counter(t.events[:, 4].tolist())
    assert kinds[INSERT] and kinds[DELETE] and kinds[REMASK]  # the case exercises every operation
    keys = [trajectory_key(t, r) for r in range(n)]
    assert all(k in leaves for k in keys)
    rec = recorded_logprob(t)
    enum = torch.tensor([leaves[k] for k in keys], dtype=torch.float32)
    assert torch.allclose(rec, enum, atol=1e-4)
    est = build_estimator(EstimatorConfig(name="trajectory"), traits(model))
    with torch.no_grad():
        e = est.estimate(model, out, est.draw(out), edit_policy=head)
    assert torch.allclose((e.logps * e.mask).sum(-1), rec, atol=1e-4)
    counts = Counter(keys)
    expected = {k: n * math.exp(leaves[k]) for k in leaves}
    big = [k for k in leaves if expected[k] >= 5]
    chi2 = sum((counts.get(k, 0) - expected[k]) ** 2 / expected[k] for k in big)
    dof = len(big) - 1
    assert dof >= 20
    assert chi2 < dof + 6 * math.sqrt(2 * dof) + 10, (chi2, dof)


def edit_rollout(order: str, order_temperature: float, **settings) -> RolloutConfig:
    """A 12-slot any-process rollout (remask, insert, delete) at token temperature 0.9 (or settings') with this
    order."""
    return RolloutConfig(
        max_completion_length=12,
        temperature=settings.pop("temperature", 0.9),
        order=order,
        order_temperature=order_temperature,
        edit="any",
        edit_max_insert=2,
        **settings,
    )


@pytest.mark.parametrize("order_temperature", [0.0, 0.8])
def test_a_random_order_is_scored_as_the_uniform_draw_it_is(model_factory, tokenizer, order_temperature):
    """rollout.order=random fills in an order drawn uniformly, greedy over its uniform keys or sampled over them:
    each step's order term is log((n - k)! / n!) for k fills among n kept masks, in both cases (as the fill-only
    estimator counts it), so the estimate is the recorded fills and edits plus that term."""
    m = model_factory()
    torch.manual_seed(1)
    head = EditHead(EditHeadConfig(hidden_size=32, width=16, heads=2, max_insert=2, init_bias=0.5))
    cfg = edit_rollout(
        "random", order_temperature, steps=4, edit_initial_length=6, edit_extra_steps=2, edit_max_per_step=2
    )
    out = generate(
        m, tokenizer, ["hi", "a longer prompt", "x"], cfg, torch.Generator().manual_seed(0), edit_policy=head
    )
    t, mask_id = out.trace, tokenizer.mask_token_id
    est = build_estimator(EstimatorConfig(name="trajectory"), traits(m))
    with torch.no_grad():
        e = est.estimate(m, out, est.draw(out), edit_policy=head)
    want = t.edit_logprob.clone()
    for r in range(len(t.num_steps)):
        canvases = [torch.full((int(t.lengths[r, 0]),), mask_id)] + t.replay(r)
        ev = t.events[t.events[:, 0] == r]
        for step in range(int(t.num_steps[r])):
            e_s = ev[ev[:, 1] == step]
            fills = e_s[e_s[:, 4] == COMMIT]
            edited = set(e_s[(e_s[:, 4] == REMASK) | (e_s[:, 4] == DELETE), 2].tolist())
            n = sum(1 for i, tok in enumerate(canvases[step].tolist()) if tok == mask_id and i not in edited)
            k = len(fills)
            lp_fills = t.event_logprob[(t.events[:, 0] == r) & (t.events[:, 1] == step) & (t.events[:, 4] == COMMIT)]
            want[r, step] += lp_fills.sum() + math.lgamma(n - k + 1) - math.lgamma(n + 1)
    assert (want != t.edit_logprob).any()
    assert torch.allclose(e.logps * e.mask, want * e.mask, atol=1e-4)


@pytest.mark.parametrize(
    "order,order_temperature,temperature",
    [("top_prob", 0.0, 0.9), ("margin", 0.7, 0.9), ("policy", 0.5, 0.9), ("top_prob", 0.0, 0.0)],
)
def test_estimator_equals_the_recorded_logprobs(model_factory, tokenizer, order, order_temperature, temperature):
    """A batch of rows of different prompts and changing lengths (padded views): the estimate of each step is
    what the sampler recorded for it (fills + order + edits), KEEPs and taken-back fills included. Greedy tokens
    (temperature 0) are scored under the model's own distribution, which the top_k set here does not filter."""
    from dllm_rl.policy import OrderHead, OrderHeadConfig

    m = model_factory()
    torch.manual_seed(1)
    head = EditHead(EditHeadConfig(hidden_size=32, width=16, heads=2, max_insert=2, init_bias=0.5))
    torch.nn.init.normal_(head.out[1].weight, std=1.0)
    oh = OrderHead(OrderHeadConfig(hidden_size=32, width=16, heads=2))
    torch.nn.init.normal_(oh.out[1].weight)
    cfg = edit_rollout(
        order,
        order_temperature,
        steps=6,
        top_k=20,
        temperature=temperature,
        edit_initial_length=5,
        edit_extra_steps=3,
        edit_max_per_step=3,
    )
    prompts = ["hi", "a longer prompt here", [{"role": "user", "content": "12_4\n__3_"}], "x"]
    out = generate(m, tokenizer, prompts, cfg, torch.Generator().manual_seed(0), edit_policy=head, order_policy=oh)
    t = out.trace
    assert (t.events[:, 4] == DELETE).any() and (t.events[:, 4] == INSERT).any()
    est = build_estimator(EstimatorConfig(name="trajectory"), traits(m))
    with torch.no_grad():
        e = est.estimate(m, out, est.draw(out), edit_policy=head, order_policy=oh)
    fills = t.events[:, 4] == COMMIT
    per_step = (t.order_logprob + t.edit_logprob).index_put(
        (t.events[fills, 0], t.events[fills, 1]), t.event_logprob[fills], accumulate=True
    )
    assert e.logps.shape == e.mask.shape == per_step.shape
    assert torch.equal(e.mask.sum(-1), t.num_steps)
    assert torch.allclose(e.logps * e.mask, per_step, atol=1e-4)


def test_gradients_reach_what_each_term_depends_on(model_factory, tokenizer):
    """The fills' log-probs train the model; the edit decisions' train the edit head only (it reads the hidden
    states detached). Without the edit head an edited rollout cannot be scored; merge_steps must be 1."""
    m = model_factory().train()
    head = EditHead(EditHeadConfig(hidden_size=32, width=16, heads=2, max_insert=2, init_bias=0.5))
    torch.nn.init.normal_(head.out[1].weight, std=1.0)
    cfg = RolloutConfig(
        max_completion_length=8, steps=4, temperature=1.0, order="top_prob", edit="any", edit_max_insert=2
    )
    out = generate(m, tokenizer, ["hi", "there"], cfg, torch.Generator().manual_seed(0), edit_policy=head)
    est = build_estimator(EstimatorConfig(name="trajectory"), traits(m))
    noise = est.draw(out)
    total = (est.estimate(m, out, noise, edit_policy=head).logps).sum()
    fills_only = replace(out, trace=replace(out.trace, decoding=replace(out.trace.decoding, edit_temperature=0.0)))
    tokens = est.estimate(m, fills_only, noise, edit_policy=head).logps.sum()
    params = list(m.parameters())
    g_total = torch.autograd.grad(total, params + list(head.parameters()), allow_unused=True)
    g_tokens = torch.autograd.grad(tokens, params)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_total[: len(params)], g_tokens))
    assert g_tokens[0].abs().sum() > 0
    head_grads = dict(zip([n for n, _ in head.named_parameters()], g_total[len(params) :]))
    assert head_grads["out.1.weight"].abs().sum() > 0 and head_grads["hidden_in.1.weight"].abs().sum() > 0
    with pytest.raises(ConfigError, match="edit_policy="):
        est.estimate(m, out, noise)
    with pytest.raises(ConfigError, match="merge_steps=1"):
        build_estimator(EstimatorConfig(name="trajectory", merge_steps=2), traits(m)).draw(out)
