"""Each estimator's expectation, computed exactly on tiny random models, against the model's exact log-likelihood.

The model's log-likelihood. A masked diffusion model defines a distribution through its sampler. Unmasking one
position at a time in a uniformly random order (rollout.order=random, steps = length, temperature 1), block by
block when there are blocks, it produces x with probability

    p(x) = prod_b  mean over the orders sigma of block b of  prod_k p(x_sigma_k | x_<b, x_sigma_<k),

the (block) any-order marginal (arXiv 2406.03736 shows the masked-diffusion ELBO is the expected log of one such
product). That is the quantity taken as "the model's log-likelihood" here, because it is the probability of a
rollout's output under the model's own sampler, and every bound below is of it; the first test checks it equals
the sum of the trajectory estimator's probabilities over the L! ways that sampler can produce x.

Everything is enumerated: orders (L! <= 24), masks (2^L), SPG's views (finitely many). Models are TinyMDMs with
a 6-token vocabulary (0 pad as an ordinary token, 1 [MASK], 2 EOS, 3..5) and weights redrawn at std 1, plus a
"consistent" model whose conditionals are those of one joint distribution.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from fractions import Fraction
from types import SimpleNamespace

import pytest
import torch

import dllm_rl.models as M
from dllm_rl import estimators as E
from dllm_rl.batches import COMMIT, SequenceBatch
from dllm_rl.config import EstimatorConfig, RolloutConfig
from dllm_rl.models.base import ModelTraits, traits
from dllm_rl.rollout import generate
from dllm_rl.rollout.engine import decoding
from dllm_rl.rollout.trace import TraceRecorder

V, MASK, EOS = 6, 1, 2
PROMPT = [3, 4, 5]
SEEDS = range(6)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_model(tokenizer, seed: int):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = M.TinyMDMConfig(
            vocab_size=V,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=32,
            mask_token_id=tokenizer.mask_token_id,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = M.TinyMDM(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g))
    return model


class JointModel(torch.nn.Module):
    """A "model" whose conditionals are exact conditionals of one random joint distribution over completions of
    length L: p(x_i = v | visible tokens) = sum of the joint over completions that agree with what is visible and
    have v at i. It follows the forward protocol the estimators call (logits for the requested range)."""

    def __init__(self, L: int, seed: int):
        super().__init__()
        self.L, self.P = L, len(PROMPT)
        self.tokens = [v for v in range(V) if v != MASK]
        g = torch.Generator().manual_seed(seed)
        self.joint = (torch.randn(len(self.tokens) ** L, generator=g, dtype=torch.float64) * 2).softmax(0)
        self.all = torch.tensor(list(itertools.product(self.tokens, repeat=L)))  # [T^L, L]

    def forward(self, input_ids, logits_range=None, **_):
        canvas = input_ids[:, self.P : self.P + self.L]  # [B, L]
        agree = ((canvas[:, None, :] == MASK) | (canvas[:, None, :] == self.all[None])).all(-1)  # [B, T^L]
        mass = agree.double() * self.joint  # [B, T^L]
        logits = torch.full((len(canvas), self.L, V), -math.inf, dtype=torch.float64)
        for i in range(self.L):
            for v in self.tokens:
                logits[:, i, v] = (mass * (self.all[:, i] == v)).sum(-1).log()
        full = torch.zeros(len(canvas), input_ids.shape[1], V, dtype=torch.float64)
        full[:, self.P : self.P + self.L] = logits
        lo, hi = logits_range if logits_range is not None else (0, input_ids.shape[1])
        return SimpleNamespace(logits=full[:, lo:hi].float())

    def log_prob(self, x) -> float:
        return self.joint[((self.all == torch.tensor(x)).all(-1))].log().item()


JOINT_TRAITS = ModelTraits(
    mask_token_id=MASK, attention="bidirectional", block_size=None, supports_cache=False, logits_shift=0
)


@dataclass
class Reference:
    """Exact quantities of one completion x (its first n positions scored, the rest always masked)."""

    logp: float  # log p(x) under the (block) any-order sampler
    elbo: float  # sum over blocks of the mean over orders of the log of the chain
    per_token: dict  # scored position -> its log-conditional in each order of its block
    one_step: float  # sum_i log p(x_i | every position masked)

    def eubo(self, beta: float) -> float:
        return sum(
            (torch.logsumexp(torch.tensor(v, dtype=torch.float64) * beta, 0).item() - math.log(len(v))) / beta
            for v in self.per_token.values()
        )


def reference(model, x: list[int], n: int, block: int) -> Reference:
    L = len(x)
    cache = {}

    def lp(masked: frozenset) -> torch.Tensor:  # log p(x_i | x with `masked` replaced by [MASK]) for every i
        if masked not in cache:
            canvas = [MASK if i in masked else t for i, t in enumerate(x)]
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([PROMPT + canvas])).logits[0, len(PROMPT) :].double()
            logits[:, MASK] = -math.inf
            cache[masked] = logits.log_softmax(-1).gather(-1, torch.tensor(x)[:, None]).squeeze(-1)
        return cache[masked]

    logp = elbo = 0.0
    per_token = {i: [] for i in range(n)}
    for b0 in range(0, n, block):
        chains = []
        for sigma in itertools.permutations(range(b0, min(b0 + block, n))):
            masked, chain = set(range(b0, L)), 0.0  # this block, later blocks and everything after EOS
            for i in sigma:
                c = lp(frozenset(masked))[i].item()
                per_token[i].append(c)
                chain += c
                masked.discard(i)
            chains.append(chain)
        chains = torch.tensor(chains, dtype=torch.float64)
        logp += (chains.logsumexp(0) - math.log(len(chains))).item()
        elbo += chains.mean().item()
    return Reference(logp, elbo, per_token, lp(frozenset(range(L)))[:n].sum().item())


def completions(seed: int, L: int, k: int = 3) -> list[list[int]]:
    g = torch.Generator().manual_seed(1000 + seed)
    tokens = torch.tensor([v for v in range(V) if v not in (MASK, EOS)])
    return [tokens[torch.randint(len(tokens), (L,), generator=g)].tolist() for _ in range(k)]


def one_row(x, n=None) -> SequenceBatch:
    n = len(x) if n is None else n
    return SequenceBatch(
        torch.tensor([PROMPT]),
        torch.ones(1, len(PROMPT), dtype=torch.long),
        torch.tensor([x]),
        torch.tensor([[1] * n + [0] * (len(x) - n)]),
    )


# ---------------------------------------------------------------------------------------- the likelihood


@pytest.mark.parametrize("block", [4, 2])
def test_log_likelihood_is_the_random_order_samplers_probability(tokenizer, block):
    """p(x) as defined above = the sum, over the 4! traces by which rollout.order=random (one token per step)
    produces x, of the trajectory estimator's probability of each trace (exact: test_trajectory_exact.py)."""
    model = random_model(tokenizer, 0)
    cfg = RolloutConfig(max_completion_length=4, steps=4, block_length=block, temperature=1.0, order="random")
    est = E.ESTIMATORS["trajectory"](EstimatorConfig(name="trajectory"), traits(model))
    blocks = [list(itertools.permutations(range(b, b + block))) for b in range(0, 4, block)]
    orders = [sum(map(list, combo), []) for combo in itertools.product(*blocks)]  # blocks left to right
    R = len(orders)
    for x in completions(0, 4):
        rec = TraceRecorder(R, 4, MASK, decoding(cfg))
        for r, sigma in enumerate(orders):
            rec.add(
                torch.full((4,), r), torch.arange(4), torch.tensor(sigma), torch.tensor([x[i] for i in sigma]), COMMIT
            )
        row = one_row(x)
        batch = SimpleNamespace(
            prompt_ids=row.prompt_ids.expand(R, -1),
            prompt_mask=row.prompt_mask.expand(R, -1),
            completion_ids=row.completion_ids.expand(R, -1),
            completion_mask=row.completion_mask.expand(R, -1),
            trace=rec.finish(torch.full((R,), 4)),
        )
        with torch.no_grad():
            out = est.estimate(model, batch, est.draw(batch))
        p = (out.logps.double() * out.mask).sum(-1).logsumexp(0).item()
        assert p == pytest.approx(reference(model, x, 4, block).logp, abs=1e-5)


def elbo_by_masks(model, x) -> float:
    """The ELBO in its masked-diffusion form, E_t E_M [(1/t) sum_{i in M} log p(x_i | x_M)], summed over every
    mask M with its weight int_0^1 t^(|M|-1) (1-t)^(L-|M|) dt = (|M|-1)! (L-|M|)! / L!."""
    L, total = len(x), 0.0
    for masked in itertools.product([False, True], repeat=L):
        m = sum(masked)
        if m == 0:
            continue
        canvas = [MASK if k else t for k, t in zip(masked, x)]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([PROMPT + canvas])).logits[0, len(PROMPT) :].double()
        logits[:, MASK] = -math.inf
        lp = logits.log_softmax(-1).gather(-1, torch.tensor(x)[:, None]).squeeze(-1)
        w = math.factorial(m - 1) * math.factorial(L - m) / math.factorial(L)
        total += w * lp[torch.tensor(masked)].sum().item()
    return total


def test_elbo_is_the_mean_log_chain_and_below_the_log_likelihood(tokenizer):
    """The two forms of the ELBO agree (masks x timesteps; orders), and ELBO <= log p(x), on 6 random models x 3
    completions of 4 tokens. The elbo estimator's Monte Carlo mean is checked against the masks form in
    test_estimators.py::test_elbo_is_unbiased (plain, stratified, coupled with and without the full view)."""
    gaps = []
    for seed in SEEDS:
        model = random_model(tokenizer, seed)
        for x in completions(seed, 4):
            ref = reference(model, x, 4, 4)
            assert elbo_by_masks(model, x) == pytest.approx(ref.elbo, abs=1e-9)
            assert ref.elbo <= ref.logp + 1e-9
            gaps.append(ref.logp - ref.elbo)
    print(f"log p(x) - ELBO(x): min {min(gaps):.3f}, max {max(gaps):.3f} nats")


def test_one_step_is_the_one_step_samplers_log_probability_and_not_a_bound(tokenizer):
    """one_step (p_mask_prompt 0) is sum_i log p(x_i | all masked): exactly the log-probability of x under the
    sampler that commits the whole canvas in one step (steps=1; top_prob order: the draw order is fixed), i.e. the
    mean-field likelihood, checked against the trajectory estimator on such rollouts. It is the likelihood of a
    different sampler than p(x)'s, and no bound of it: on these random models it lies on both sides."""
    cfg = RolloutConfig(max_completion_length=4, steps=1, temperature=1.0, order="top_prob", stop_at_eos=False)
    above = below = 0
    for seed in SEEDS:
        model = random_model(tokenizer, seed)
        tr = traits(model)
        batch = generate(model, tokenizer, [PROMPT] * 6, cfg, torch.Generator().manual_seed(seed))
        traj = E.ESTIMATORS["trajectory"](EstimatorConfig(name="trajectory"), tr)
        one_step = E.ESTIMATORS["one_step"](EstimatorConfig(name="one_step", p_mask_prompt=0.0), tr)
        with torch.no_grad():
            a = one_step.estimate(model, batch, one_step.draw(batch, torch.Generator())).logps.sum(-1)
            t = traj.estimate(model, batch, traj.draw(batch))
        assert torch.allclose(a, (t.logps * t.mask).sum(-1), atol=1e-5)
        for x in completions(seed, 4):
            ref = reference(model, x, 4, 4)
            row = one_row(x)
            with torch.no_grad():
                value = one_step.estimate(model, row, one_step.draw(row, torch.Generator())).logps.sum().item()
            assert value == pytest.approx(ref.one_step, abs=1e-4)
            above += value > ref.logp
            below += value < ref.logp
    print(f"one_step above log p(x) for {above}, below for {below} of {above + below} completions")
    assert above > 0 and below > 0


def test_one_step_with_prompt_masking_averages_over_prompt_masks(tokenizer):
    """With p_mask_prompt = p, one_step's expectation is the average of sum_i log p(x_i | all masked, prompt with
    mask B) over the prompt masks B (each prompt token masked with probability p): enumerated over the 2^3 masks
    and compared with the mean of 4000 draws (z-test with the exact standard error)."""
    model, p = random_model(tokenizer, 1), 0.4
    x = completions(1, 4)[0]
    values, probs = [], []
    for b in itertools.product([False, True], repeat=len(PROMPT)):
        prompt = [MASK if k else t for k, t in zip(b, PROMPT)]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + [MASK] * 4])).logits[0, len(PROMPT) :].double()
        logits[:, MASK] = -math.inf
        values.append(logits.log_softmax(-1).gather(-1, torch.tensor(x)[:, None]).sum().item())
        probs.append(p ** sum(b) * (1 - p) ** (len(b) - sum(b)))
    values, probs = torch.tensor(values, dtype=torch.float64), torch.tensor(probs, dtype=torch.float64)
    mean = (values * probs).sum().item()
    sd = math.sqrt((values**2 * probs).sum().item() - mean**2)
    D = 4000
    est = E.ESTIMATORS["one_step"](EstimatorConfig(name="one_step", p_mask_prompt=p), traits(model))
    row = one_row(x)
    big = SequenceBatch(
        *(t.expand(D, -1) for t in (row.prompt_ids, row.prompt_mask, row.completion_ids, row.completion_mask))
    )
    with torch.no_grad():
        draws = est.estimate(model, big, est.draw(big, torch.Generator().manual_seed(0))).logps.double().sum(-1)
    z = (draws.mean().item() - mean) / (sd / math.sqrt(D))
    print(f"one_step with p_mask_prompt {p}: exact {mean:.4f}, mean of {D} draws {draws.mean():.4f} (z = {z:+.2f})")
    assert abs(z) < 4 and sd > 0.1


# ------------------------------------------------------------------------------------------ SPG's bounds


def spg_views(n: int, L: int, block: int) -> list[tuple[Fraction, list[bool], list[float], int]]:
    """Every view SPG's block_random rule (min_t 0, max_t 1) can draw for a completion whose first n of L positions
    are scored: (probability, completion mask, weight n_b * s / m on block j's masked tokens, j)."""
    nb = (n - 1) // block + 1
    views = []
    for j in range(nb):
        s = min(block, n - j * block)
        for m in range(1, s + 1):
            for sub in itertools.combinations(range(j * block, j * block + s), m):
                mask = [i in sub or i >= (j + 1) * block or i >= n for i in range(L)]
                w = [nb * s / m if i in sub else 0.0 for i in range(L)]
                views.append((Fraction(1, nb * s * math.comb(s, m)), mask, w, j))
    assert sum(v[0] for v in views) == 1
    return views


def exact_block_bounds(model, tr, x, n, block, betas) -> tuple[float, dict]:
    """The block_elbo estimator's expectation: its estimate on the whole view distribution at once (each view
    repeated in proportion to its probability; the upper value is the log of a mean over views, so this is its
    many-view limit). Returns (n * lower, {beta: n * upper}) per sequence."""
    views = spg_views(n, len(x), block)
    lcd = math.lcm(*(v[0].denominator for v in views))
    reps = [int(v[0] * lcd) for v in views]
    masks = torch.tensor([v[1] for v, r in zip(views, reps) for _ in range(r)])[:, None]  # [K, 1, L]
    weights = torch.tensor([v[2] for v, r in zip(views, reps) for _ in range(r)])[:, None]
    noise = E.Noise(masks, torch.zeros(len(masks), 1, len(PROMPT), dtype=torch.bool), weights)
    row = one_row(x, n)
    uppers = {}
    for beta in betas:
        est = E.ESTIMATORS["block_elbo"](EstimatorConfig(name="block_elbo", eubo_beta=beta), tr)
        with torch.no_grad():
            out = est.estimate(model, row, noise)
        lower = n * (out.logps.double() * row.completion_mask).sum().item()
        uppers[beta] = n * (out.upper.double() * row.completion_mask).sum().item()
    return lower, uppers


LAYOUTS = {  # (scored length n, completion length L, SPG block length)
    "one block of 4": (4, 4, 4),
    "two blocks of 2": (4, 4, 2),
    "EOS at 3 of 4, blocks of 2": (3, 4, 2),
}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_block_elbo_bounds_sandwich_the_log_likelihood(tokenizer, layout):
    """block_elbo's exact expectations, at SPG's scale (/ n), on 6 random models x 3 completions:
    n * E[lower] = ELBO(x) <= log p(x), and n * upper -> EUBO(x) (the module docstring's formula, computed over
    orders), nondecreasing in beta and >= log p(x) once beta >= the block length."""
    n, L, block = LAYOUTS[layout]
    betas = (1.0, 1.5, float(block), float(block) + 1.5)
    for seed in SEEDS:
        model = random_model(tokenizer, seed)
        tr = traits(model)
        for x in completions(seed, L):
            if n < L:
                x = x[: n - 1] + [EOS] + x[n:]  # the first EOS ends the scored part
            ref = reference(model, x, n, block)
            lower, upper = exact_block_bounds(model, tr, x, n, block, betas)
            assert lower == pytest.approx(ref.elbo, abs=1e-4) and lower <= ref.logp + 1e-6
            for beta in betas:
                assert upper[beta] == pytest.approx(ref.eubo(beta), abs=1e-4)
            # nondecreasing up to float32 rounding: where the exact EUBO is flat in beta (it moved by 3e-8 over
            # beta 1-3.5 on one case here) the float32 sums at |n * upper| ~ 16 step by ~2e-6 either way
            assert all(upper[a] <= upper[b] + 1e-6 * max(1.0, abs(upper[b])) for a, b in zip(betas, betas[1:]))
            assert upper[float(block)] >= ref.logp - 1e-6, (seed, x, upper, ref.logp)


def test_eubo_below_the_block_length_is_not_always_an_upper_bound(tokenizer):
    """The docstring's caveat, shown: for beta below the block length, a model whose conditionals are not those
    of one joint distribution can have EUBO(x) < log p(x); among these random models some do at beta = 1."""
    below = []
    for seed in SEEDS:
        model = random_model(tokenizer, seed)
        for x in completions(seed, 4):
            ref = reference(model, x, 4, 4)
            below.append(ref.eubo(1.0) < ref.logp)
    print(f"EUBO(beta = 1) < log p(x) for {sum(below)} of {len(below)} completions (one block of 4)")
    assert any(below)


def test_consistent_conditionals_make_the_elbo_exact_and_the_eubo_an_upper_bound_from_beta_1():
    """A model whose conditionals are those of one joint q: every order's chain is q(x), so p(x) = q(x) = exp ELBO,
    and EUBO(beta) >= log q(x) for every beta >= 1 (Jensen per token), through the estimator as well."""
    for seed in range(3):
        model = JointModel(4, seed)
        for x in completions(seed, 4):
            ref = reference(model, x, 4, 4)
            assert ref.logp == pytest.approx(model.log_prob(x), abs=1e-5)
            assert ref.elbo == pytest.approx(ref.logp, abs=1e-5)
            lower, upper = exact_block_bounds(model, JOINT_TRAITS, x, 4, 4, (1.0, 1.5))
            assert lower == pytest.approx(ref.logp, abs=1e-4)
            assert upper[1.0] >= ref.logp - 1e-5 and upper[1.5] >= upper[1.0] - 1e-6


def test_spg_code_weights_are_not_bounds_with_several_blocks(tokenizer):
    """Why block_elbo departs from SPG's code with several blocks (module docstring). SPG's code scores every masked
    token (the later, fully masked blocks' too), averages them alike for the lower value, and weights p^beta by
    1 / (masked fraction of the completion) for the upper one. Its exact expectations (over the same views) on
    these random models: n * lower is above log p(x) for some, n * upper below log p(x) for some even at beta =
    the block length (2). With one block the two definitions coincide (test_estimators.py)."""
    n, L, block, beta = 4, 4, 2, 2.0
    lower_above = upper_below = 0
    for seed in SEEDS:
        model = random_model(tokenizer, seed)
        for x in completions(seed, L):
            ref = reference(model, x, n, block)
            views = spg_views(n, L, block)
            masks = torch.tensor([v[1] for v in views])
            prob = torch.tensor([float(v[0]) for v in views], dtype=torch.float64)
            canvas = torch.where(masks, MASK, torch.tensor(x))
            with torch.no_grad():
                logits = model(input_ids=torch.cat([torch.tensor(PROMPT).expand(len(views), -1), canvas], 1)).logits
            logits = logits[:, len(PROMPT) :].double()
            logits[..., MASK] = -math.inf
            lp = logits.log_softmax(-1).gather(-1, torch.tensor(x).expand(len(views), -1)[..., None]).squeeze(-1)
            t_hat = masks.sum(-1, keepdim=True).double() / n
            lower = n * (prob * (lp * masks).sum(-1) / masks.sum(-1)).sum().item()
            inner = (prob[:, None] * (beta * lp).exp() * masks / t_hat).sum(0)
            upper = (inner.log() / beta).sum().item()
            lower_above += lower > ref.logp
            upper_below += upper < ref.logp
    print(f"SPG's code weights: n * lower > log p(x) for {lower_above}, n * upper < log p(x) for {upper_below} of 18")
    assert lower_above > 0 and upper_below > 0
