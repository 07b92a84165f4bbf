"""The likelihood estimators, tested statistically on tiny models whose completions are short enough to
enumerate every mask: the Monte Carlo ELBO against the exact ELBO (z-tests), variance orderings (measured, and
computed exactly), shared noise, d1's one-step estimate and SPG's bounds against direct recomputations, and
trajectory replay against the sampler's own log-probabilities.

Models: a 12-token vocabulary (0 pad, 1 [MASK], 2 EOS, 3..11 ordinary tokens). `random_model` has its weights
redrawn at a larger scale than the default init (std 0.02 gives log-probs that move by ~0.06 nats from one
context to another, too little to tell a right context from a wrong one; std 0.3 moves them by ~1 nat).
`trained` is trained for ~1 s on a copy task, so that, as for a real dLLM, how much of the completion is
visible decides how well a token is predicted: the regime where timestep variance matters.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import replace

import pytest
import torch

import dllm_rl.models as M
from dllm_rl import estimators as E
from dllm_rl.batches import COMMIT, REMASK, SequenceBatch
from dllm_rl.config import EstimatorConfig, RolloutConfig
from dllm_rl.errors import ConfigError
from dllm_rl.models.base import traits
from dllm_rl.rollout import generate

VOCAB, FIRST = 12, 3  # ordinary tokens are FIRST..VOCAB-1
EPS_T = 1e-6  # the ELBO estimator clamps t to [1e-6, 1] (and 1 - t to >= 1e-6)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread, and the CPU is shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def build(tokenizer, attention="bidirectional", block_size=4, hidden=32, layers=2, seed=0, std=0.3):
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        cfg = M.TinyMDMConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            attention=attention,
            block_size=block_size,
            max_position_embeddings=64,
            mask_token_id=tokenizer.mask_token_id,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        model = M.TinyMDM(cfg)
    if std is not None:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=g) * std)
    return model.eval()


def make_batch(prompts, completions, completion_mask=None) -> SequenceBatch:
    """Left-padded prompts (lists of ids) and equal-length completions."""
    P = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), P, dtype=torch.long)
    pm = torch.zeros(len(prompts), P, dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, P - len(p) :] = torch.tensor(p)
        pm[i, P - len(p) :] = 1
    comp = torch.tensor(completions)
    cm = torch.ones_like(comp) if completion_mask is None else torch.tensor(completion_mask)
    return SequenceBatch(ids, pm, comp, cm)


def repeat(batch: SequenceBatch, D: int) -> SequenceBatch:
    """Each row D times (row-major: rows i*D .. i*D+D-1 are copies of row i)."""
    return SequenceBatch(
        *(
            x.repeat_interleave(D, 0)
            for x in (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
        )
    )


@torch.no_grad()
def direct_logprobs(model, batch, row: int, comp_masks: torch.Tensor, prompt_masks: torch.Tensor | None = None):
    """log p(completion token | view) written out from scratch, for one row and R views at once: [R, Lc] float64.

    The row's real prompt tokens (padding dropped) and its completion, with the view's positions replaced by
    [MASK]; one plain forward (bidirectional attention, positions 0..); logits at the completion positions with
    the [MASK] column *removed* (not set to -inf); log_softmax; the target's entry."""
    mask_id = model.config.mask_token_id
    real = batch.prompt_mask[row].bool()
    prompt = batch.prompt_ids[row][real]  # [p]
    R = comp_masks.shape[0]
    prompt = prompt.expand(R, -1).clone()
    if prompt_masks is not None:
        prompt[prompt_masks[:, real]] = mask_id
    comp = batch.completion_ids[row].expand(R, -1)
    noisy = torch.where(comp_masks, torch.full_like(comp, mask_id), comp)
    logits = model(input_ids=torch.cat([prompt, noisy], 1)).logits[:, prompt.shape[1] :].double()  # [R, Lc, V]
    keep = [v for v in range(logits.shape[-1]) if v != mask_id]
    target = comp - (comp > mask_id).long()  # index in the vocabulary without [MASK]
    return logits[..., keep].log_softmax(-1).gather(-1, target[..., None]).squeeze(-1)


def all_masks(L: int) -> torch.Tensor:
    """Every subset of L positions: [2^L, L] bool; row 0 is the empty mask, row 2^L - 1 the full one, and row
    (2^L - 1 - r) is the complement of row r."""
    return torch.tensor(list(itertools.product([False, True], repeat=L)))


def masked_sums(model, batch) -> torch.Tensor:
    """S[n, r] = sum over i in mask r of log p(x_i | x with mask r replaced by [MASK]), for every mask: [N, 2^Lc]."""
    masks = all_masks(batch.completion_ids.shape[1])
    return torch.stack(
        [(direct_logprobs(model, batch, n, masks) * masks).sum(-1) for n in range(batch.completion_ids.shape[0])]
    )


def elbo_weight(m: int, L: int) -> float:
    # With t ~ U(0, 1) and each position masked independently with probability t, a mask M with |M| = m has
    # probability t^m (1-t)^(L-m), and the estimator weighs it by 1/t. So
    #   ELBO(x) = E_t E_M [(1/t) sum_{i in M} log p(x_i | x_M)] = sum_M w(|M|) sum_{i in M} log p(x_i | x_M),
    #   w(m) = int_0^1 t^(m-1) (1-t)^(L-m) dt = B(m, L-m+1) = Gamma(m) Gamma(L-m+1) / Gamma(L+1)
    #        = (m-1)! (L-m)! / L!.
    # The empty mask (m = 0) contributes nothing. test_elbo_weight_formula checks this by quadrature, and that
    # every token's weights sum to 1: sum_{M containing i} w(|M|) = sum_m C(L-1, m-1) (m-1)!(L-m)!/L! = L/L.
    return math.factorial(m - 1) * math.factorial(L - m) / math.factorial(L)


def exact_elbo(S: torch.Tensor, L: int) -> torch.Tensor:
    k = all_masks(L).sum(-1).tolist()
    w = torch.tensor([0.0 if m == 0 else elbo_weight(m, L) for m in k], dtype=torch.float64)
    return (S * w).sum(-1)  # [N]


def conditional(S_row: torch.Tensor, L: int, t: torch.Tensor, coupled: bool):
    """Mean and variance of one draw of the ELBO estimator given its timestep, at each t [T] (float64).

    One draw: f = (1/t) S(M), M ~ Bernoulli(t)^L; coupled: f = (S(M)/t + S(~M)/(1-t)) / 2."""
    masks = all_masks(L)
    k = masks.sum(-1).double()  # [R]
    p = t[:, None] ** k * (1 - t[:, None]) ** (L - k)  # [T, R] P(M | t)
    if coupled:
        f = 0.5 * (S_row / t[:, None] + S_row.flip(0) / (1 - t[:, None]).clamp(min=EPS_T))
    else:
        f = S_row / t[:, None]
    g = (p * f).sum(-1)
    return g, (p * f * f).sum(-1) - g * g


def exact_moments(
    S_row: torch.Tensor,
    L: int,
    num_samples=1,
    masks_per_timestep=1,
    stratified=False,
    coupled=False,
    t_min=0.0,
    t_max=1.0,
    **_,
) -> tuple[float, float]:
    """Exact mean and variance of the sequence estimate of `draw_elbo(**kw)` + `score`: enumeration over masks,
    quadrature over t (on a logit grid, which resolves the 1/t and 1/(1-t) ends).

    Var = (Var_t E[f|t] + E_t Var[f|t] / n_m) / n_t for i.i.d. timesteps, and, for stratified timesteps
    t_k = t_min + (t_max - t_min)(k + u)/n with one u, E_t Var[f|t] / n + Var_u[mean_k E[f | t_k(u)]]."""
    lo, hi = max(t_min, EPS_T), min(t_max, 1 - EPS_T)
    z = torch.linspace(math.log(lo / (1 - lo)), math.log(hi / (1 - hi)), 40001, dtype=torch.float64)
    t = torch.sigmoid(z)
    density = t * (1 - t) / (t_max - t_min)  # dt/dz times the uniform density
    g, v = conditional(S_row, L, t, coupled)
    mean = torch.trapezoid(g * density, z)
    var_g = torch.trapezoid(g * g * density, z) - mean**2
    mean_v = torch.trapezoid(v * density, z)
    n = num_samples
    if not stratified:
        return mean.item(), ((var_g + mean_v / masks_per_timestep) / n).item()
    u = (torch.arange(4000, dtype=torch.float64) + 0.5) / 4000
    tk = t_min + (t_max - t_min) * (torch.arange(n, dtype=torch.float64)[:, None] + u) / n  # [n, U]
    gk = conditional(S_row, L, tk.reshape(-1).clamp(min=EPS_T), coupled)[0].view(n, -1).mean(0)  # [U]
    return mean.item(), (mean_v / n + gk.var(unbiased=False)).item()


@torch.no_grad()
def mc_elbo(model, batch, D: int, seed: int, **kw) -> torch.Tensor:
    """D independent draws of the ELBO estimator's sequence estimate per row, in one forward per view: [N, D]."""
    N, Lc = batch.completion_ids.shape
    noise = E.draw_elbo((N * D, Lc), torch.Generator().manual_seed(seed), **kw)
    big = repeat(batch, D)
    return E.score(model, big, noise, traits(model)).double().sum(-1).view(N, D)


@pytest.fixture(scope="module")
def random_model(tokenizer):
    return build(tokenizer)


def copy_task(n: int, P: int, Lc: int, g: torch.Generator) -> SequenceBatch:
    c = torch.randint(FIRST, VOCAB, (n, 1), generator=g)
    return SequenceBatch(
        torch.randint(FIRST, VOCAB, (n, P), generator=g),
        torch.ones(n, P, dtype=torch.long),
        c.expand(n, Lc).clone(),
        torch.ones(n, Lc, dtype=torch.long),
    )


@pytest.fixture(scope="module")
def trained(tokenizer):
    """Trained (150 Adam steps, ~1 s) on completions that repeat one token, independent of the prompt: a visible
    completion token gives the others away (log p ~ 0); a fully masked completion does not (log p ~ -log 9)."""
    model = build(tokenizer, layers=1, std=None).train()
    tr = traits(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(150):
        b = copy_task(64, 3, 5, g)
        loss = -E.score(model, b, E.draw_elbo((64, 5), g), tr).sum(-1).mean() / 5
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


RANDOM_BATCH = make_batch([[5, 7, 4], [9, 6]], [[3, 8, 5, 11, 4], [10, 10, 6, 3, 9]])
COPY_BATCH = make_batch([[5, 7, 4], [9, 6]], [[6] * 5, [10] * 5])


def model_and_batch(request, which):
    return (
        (request.getfixturevalue("random_model"), RANDOM_BATCH)
        if which == "random"
        else (request.getfixturevalue("trained"), COPY_BATCH)
    )


# ---------------------------------------------------------------------------------------------------- ELBO


def test_elbo_weight_formula():
    L = 5
    t = torch.linspace(0, 1, 200001, dtype=torch.float64)
    for m in range(1, L + 1):
        integral = torch.trapezoid(t ** (m - 1) * (1 - t) ** (L - m), t).item()
        assert integral == pytest.approx(elbo_weight(m, L), rel=1e-6)
    masks = all_masks(L)
    per_token = sum(elbo_weight(int(M.sum()), L) * M.double() for M in masks[1:])
    assert torch.allclose(per_token, torch.ones(L, dtype=torch.float64))


def test_enumeration_matches_view_logprobs(random_model):
    """The from-scratch log-probs used as ground truth agree with the library's view_logprobs (padding, RoPE
    positions and the removed [MASK] column included)."""
    masks = all_masks(5)
    big = repeat(RANDOM_BATCH, len(masks))
    with torch.no_grad():
        lib = E.view_logprobs(random_model, big, masks.repeat(2, 1), None, traits(random_model)).view(2, -1, 5)
    for n in range(2):
        assert torch.allclose(lib[n].double(), direct_logprobs(random_model, RANDOM_BATCH, n, masks), atol=1e-5)


SCHEMES = {
    "iid": {"num_samples": 2},
    "stratified": {"num_samples": 4, "stratified": True},
    "masks_per_timestep": {"num_samples": 2, "masks_per_timestep": 3},
    "coupled": {"num_samples": 1, "coupled": True, "full_view": False},
    "coupled_full_view": {"num_samples": 1, "coupled": True, "full_view": True},
    "diffucoder": {"num_samples": 1, "coupled": True, "t_min": 0.2, "t_max": 0.8, "full_view": True},
}


def truncated_weight(m: int, L: int, a: float, b: float) -> float:
    """(1/(b-a)) int_a^b t^(m-1) (1-t)^(L-m) dt, exactly (binomial expansion of (1-t)^(L-m)); = elbo_weight on
    [0, 1]."""
    total = sum(math.comb(L - m, j) * (-1) ** j * (b ** (m + j) - a ** (m + j)) / (m + j) for j in range(L - m + 1))
    return total / (b - a)


def expected_elbo_estimate(S_row, L, t_min=0.0, t_max=1.0, coupled=False, full_view=True, **_) -> float:
    """What elbo.py's docstring says the estimator's expectation is, by enumeration over masks: ELBO_[a,b]; coupled:
    (ELBO_[a,b] + ELBO_[1-b,1-a]) / 2; with the full view, plus one_step / 2 (S_row[-1]: the fully masked view)."""
    sizes = all_masks(L).sum(-1).tolist()

    def elbo(a, b):
        return sum(0.0 if m == 0 else truncated_weight(m, L, a, b) * S_row[r].item() for r, m in enumerate(sizes))

    if not coupled:
        return elbo(t_min, t_max)
    pair = (elbo(t_min, t_max) + elbo(1 - t_max, 1 - t_min)) / 2
    return pair + (S_row[-1].item() / 2 if full_view else 0.0)


@pytest.mark.parametrize("which", ["random", "trained"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_elbo_is_unbiased(request, which, scheme):
    """Mean of D draws of the Monte Carlo estimator vs its documented expectation by enumeration (elbo.py: the
    exact ELBO for t ~ U(0, 1); plus one_step / 2 with the coupled full view; DiffuCoder's U(0.2, 0.8) with the
    full view: the truncated ELBO plus one_step / 2): a z-test with the estimator's exact standard error (the
    sample one is unreliable here: with t ~ U(0, 1) the 1/t weight makes the estimate heavy-tailed)."""
    model, batch = model_and_batch(request, which)
    kw = SCHEMES[scheme]
    L, D = 5, 4000
    S = masked_sums(model, batch)
    exact = exact_elbo(S, L)
    est = mc_elbo(model, batch, D, seed=1, **kw)
    for n in range(2):
        expected = expected_elbo_estimate(S[n], L, **kw)
        if kw.get("t_min", 0.0) == 0.0 and kw.get("t_max", 1.0) == 1.0:
            one_step_half = S[n, -1].item() / 2 if kw.get("coupled") and kw.get("full_view", True) else 0.0
            assert expected == pytest.approx(exact[n].item() + one_step_half, abs=1e-9)
        mean, var = exact_moments(S[n], L, **kw)  # quadrature over t of the pair part; the full view is constant
        if kw.get("coupled") and kw.get("full_view", True):
            mean += S[n, -1].item() / 2
        assert mean == pytest.approx(expected, abs=1e-3)  # quadrature vs enumeration
        se = math.sqrt(var / D)
        z = (est[n].mean().item() - expected) / se
        print(
            f"{which} {scheme} row {n}: ELBO {exact[n]:.3f}, expected {expected:.3f}, MC {est[n].mean():.3f} "
            f"+- {se:.3f} (z = {z:+.2f}); sample var {est[n].var():.2f}, exact var {var:.2f}"
        )
        assert abs(z) < 4


def test_coupled_full_view_definition(random_model):
    """On a fixed noise (t fixed at 0.3): the pair view scores every token exactly once, weighted 1/t on the mask
    and 1/(1-t) on its complement; full_view=True is DiffuCoder's (one_step + pair) / 2 per token, and
    full_view=False drops the one-step half, leaving pair / 2 (the mean of two unbiased halves)."""
    batch, tr, t = RANDOM_BATCH, traits(random_model), 0.3
    N, Lc = batch.completion_ids.shape
    kw = {"num_samples": 1, "coupled": True, "t_min": t, "t_max": t}
    with_full = E.draw_elbo((N, Lc), torch.Generator().manual_seed(3), **kw, full_view=True)
    without = E.draw_elbo((N, Lc), torch.Generator().manual_seed(3), **kw, full_view=False)
    mask, comp = with_full.completion_masks[0], with_full.completion_masks[1]
    assert torch.equal(comp, ~mask) and with_full.completion_masks[2].all()
    assert without.num_views == 2 and torch.equal(without.completion_masks[0], mask)
    pair = torch.zeros(N, Lc, dtype=torch.float64)
    full = torch.zeros(N, Lc, dtype=torch.float64)
    for n in range(N):
        views = direct_logprobs(random_model, batch, n, torch.stack([mask[n], comp[n], torch.ones_like(mask[n])]))
        pair[n] = torch.where(mask[n], views[0] / t, views[1] / (1 - t))
        full[n] = views[2]
    with torch.no_grad():
        got_full = E.score(random_model, batch, with_full, tr).double()
        got = E.score(random_model, batch, without, tr).double()
    assert torch.allclose(got_full, 0.5 * pair + 0.5 * full, atol=1e-5)
    assert torch.allclose(got, 0.5 * pair, atol=1e-5)


# ------------------------------------------------------------------------------------------ variance ordering


def test_variance_orderings_measured(trained):
    """Same budget of forwards, variance of the sequence estimate measured over D draws (trained model):
    stratified < i.i.d. timesteps (4 forwards each); coupled pair < two i.i.d. draws (2 forwards each);
    VRPO's allocation n_t = n, n_m = 1 < n_t = 1, n_m = n (4 forwards each). Each measured variance also
    matches its exact value, so the sampling scheme is the one the theory describes.

    Measured ratios over 6 seeds x 2 trained models (D = 4000): stratified/iid <= 0.81 (exact ~0.76),
    coupled/iid <= 0.85 (exact ~0.79), n_m=1 / n_t=1 <= 0.52 (exact ~0.50); measured/exact within 6%."""
    batch, L, D = COPY_BATCH, 5, 4000
    S = masked_sums(trained, batch)
    schemes = {
        "iid4": {"num_samples": 4},
        "stratified4": {"num_samples": 4, "stratified": True},
        "n_t=1,n_m=4": {"num_samples": 1, "masks_per_timestep": 4},
        "iid2": {"num_samples": 2},
        "coupled": {"num_samples": 1, "coupled": True, "full_view": False},
    }
    measured = {k: mc_elbo(trained, batch, D, 10 + i, **kw).var(1) for i, (k, kw) in enumerate(schemes.items())}
    for n in range(2):
        exact = {k: exact_moments(S[n], L, **kw)[1] for k, kw in schemes.items()}
        for k in schemes:
            assert measured[k][n] / exact[k] == pytest.approx(1, abs=0.2), (k, measured[k][n], exact[k])
        for a, b, margin in [("stratified4", "iid4", 0.9), ("coupled", "iid2", 0.9), ("iid4", "n_t=1,n_m=4", 0.75)]:
            print(
                f"row {n} {a}/{b}: measured {measured[a][n]:.3f} / {measured[b][n]:.3f} = "
                f"{measured[a][n] / measured[b][n]:.3f}; exact {exact[a] / exact[b]:.3f}"
            )
            assert measured[a][n] < margin * measured[b][n]


@pytest.mark.parametrize("which", ["random", "trained"])
def test_variance_orderings_exact(request, which):
    """The same orderings, computed exactly. On the random model they hold by tiny margins (ratios 0.9995 for
    stratification, 0.998 for VRPO's allocation, 0.95 for coupling): its log-probs hardly depend on how much
    is masked, so almost all of the variance is mask noise at a given t (and the 1/t tail), which stratifying
    or reallocating timesteps does not touch. On the trained model: 0.75, 0.49 and 0.79."""
    model, batch = model_and_batch(request, which)
    S, L = masked_sums(model, batch), 5
    for n in range(2):

        def var(**kw):
            return exact_moments(S[n], L, **kw)[1]  # noqa: B023 (called within the iteration)

        iid4, strat4, nm4 = var(num_samples=4), var(num_samples=4, stratified=True), var(masks_per_timestep=4)
        iid2, coupled = var(num_samples=2), var(coupled=True)
        print(
            f"{which} row {n}: stratified/iid {strat4 / iid4:.4f}, coupled/iid {coupled / iid2:.4f}, "
            f"n_m=1 / n_t=1 {iid4 / nm4:.4f}"
        )
        assert strat4 < iid4 and coupled < iid2 and iid4 < nm4


@pytest.mark.parametrize("which", ["random", "trained"])
def test_shared_noise_cancels_in_differences(request, which):
    """VRPO's antithetic sampling: policy minus reference under the SAME noise varies far less than under
    independent noise (the reference is the policy with 2% relative weight noise, as after a few updates)."""
    model, batch = model_and_batch(request, which)
    ref = copy.deepcopy(model)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(1 + 0.02 * torch.randn(p.shape, generator=g))
    D = 4000
    policy = mc_elbo(model, batch, D, 1)
    shared, independent = policy - mc_elbo(ref, batch, D, 1), policy - mc_elbo(ref, batch, D, 2)
    ratio = shared.var(1) / independent.var(1)
    print(f"{which}: var(shared) / var(independent) = {ratio.tolist()}")
    assert (ratio < 0.05).all()


# ------------------------------------------------------------------------------------------------- one_step


def test_one_step_equals_direct_computation(random_model):
    batch, tr = RANDOM_BATCH, traits(random_model)
    cfg = EstimatorConfig(name="one_step", p_mask_prompt=0.5, num_samples=3)
    est = E.ESTIMATORS["one_step"](cfg, tr)
    noise = est.draw(batch, torch.Generator().manual_seed(0))
    assert noise.completion_masks.all() and noise.prompt_masks.any() and not noise.prompt_masks.all()
    with torch.no_grad():
        got = est.estimate(random_model, batch, noise).logps.double()
    for n in range(2):
        views = direct_logprobs(random_model, batch, n, noise.completion_masks[:, n], noise.prompt_masks[:, n])
        assert torch.allclose(got[n], views.mean(0), atol=1e-5)


def test_one_step_without_prompt_mask_is_deterministic(random_model):
    batch, tr = RANDOM_BATCH, traits(random_model)
    cfg = EstimatorConfig(name="one_step", p_mask_prompt=0.0)
    est = E.ESTIMATORS["one_step"](cfg, tr)
    with torch.no_grad():
        runs = [
            est.estimate(random_model, batch, est.draw(batch, torch.Generator().manual_seed(s))).logps for s in range(4)
        ]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    for n in range(2):
        direct = direct_logprobs(random_model, batch, n, torch.ones(1, 5, dtype=torch.bool))[0]
        assert torch.allclose(runs[0][n].double(), direct, atol=1e-5)


@pytest.mark.parametrize("p", [0.15, 0.5])
def test_one_step_prompt_mask_rate(p):
    noise = E.draw_one_step((4, 5), (4, 50), torch.Generator().manual_seed(0), p_mask_prompt=p, num_samples=100)
    n = noise.prompt_masks.numel()
    rate = noise.prompt_masks.float().mean().item()
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / n), rate
    assert torch.allclose(noise.weights.sum(0), torch.ones(4, 5))  # views averaged


# ----------------------------------------------------------------------------------------------- block_elbo

SPG_BATCH = make_batch(
    [[5, 7, 4], [9, 6], [4]],
    [[3, 8, 5, 11, 4, 9, 7, 6], [10, 10, 6, 3, 9, 2, 2, 2], [7, 5, 2, 2, 2, 2, 2, 2]],
    [[1] * 8, [1] * 6 + [0] * 2, [1] * 3 + [0] * 5],
)  # lengths 8, 6, 3 (EOS included)


@pytest.mark.parametrize("t_min,t_max", [(0.3, 0.8), (0.0, 1.0)])
def test_block_elbo_masks_follow_spg_rule(t_min, t_max):
    Lb, K = 4, 3000
    batch = SPG_BATCH
    cfg = EstimatorConfig(name="block_elbo", num_samples=K, t_min=t_min, t_max=t_max, p_mask_prompt=0.0)
    noise = E.ESTIMATORS["block_elbo"](replace(cfg, block_length=Lb), None).draw(
        batch, torch.Generator().manual_seed(0)
    )
    masks = noise.completion_masks  # [K, N, Lc]
    for n, length in enumerate(batch.completion_mask.sum(-1).tolist()):
        m = masks[:, n]
        n_blocks = (length - 1) // Lb + 1
        assert m[:, length:].all()  # after EOS: always masked
        real = m[:, :length]
        first = real.float().argmax(-1)  # first masked real position (every view masks at least one)
        assert real.any(-1).all()
        j = first // Lb  # the chosen block
        counts_j = torch.zeros(n_blocks)
        counts_c = {}
        for k in range(K):
            b = int(j[k])
            start, end = b * Lb, min(b * Lb + Lb, length)
            span = end - start
            assert not m[k, :start].any()  # earlier blocks clean
            assert m[k, start + Lb :].all()  # later blocks fully masked
            c = int(m[k, start:end].sum())
            lo = max(1, math.floor(t_min * span))
            hi = max(lo, math.floor(t_max * span))
            assert lo <= c <= hi, (n, k, c, lo, hi)
            counts_j[b] += 1
            counts_c.setdefault(span, {}).setdefault(c, 0)
            counts_c[span][c] += 1
        # the block is uniform over the blocks the completion reaches, the count uniform over [lo, hi]
        p = 1 / n_blocks
        assert ((counts_j / K - p).abs() < 4 * math.sqrt(p * (1 - p) / K) + 1e-9).all(), counts_j
        for span, hist in counts_c.items():
            lo, hi = max(1, math.floor(t_min * span)), max(1, math.floor(t_min * span), math.floor(t_max * span))
            total = sum(hist.values())
            assert set(hist) == set(range(lo, hi + 1)), hist
            q = 1 / (hi - lo + 1)
            for c in hist.values():
                assert abs(c / total - q) < 4 * math.sqrt(q * (1 - q) / total) + 1e-9, hist
    # the view scores the chosen block's masked tokens only, each with weight n_blocks * span / count
    for n, length in enumerate(batch.completion_mask.sum(-1).tolist()):
        m, w = masks[:, n], noise.weights[:, n]
        j = m[:, :length].float().argmax(-1) // Lb
        start = j * Lb
        span = torch.clamp(length - start, max=Lb)
        pos = torch.arange(m.shape[-1])
        in_block = (pos >= start[:, None]) & (pos < (start + span)[:, None])
        count = (m & in_block).sum(-1)
        n_blocks = (length - 1) // Lb + 1
        assert torch.allclose(w, (m & in_block).float() * (n_blocks * span / count)[:, None])
    # positions inside the chosen block are uniform given the count: row 0, block 0 chosen, count c -> each
    # of its 4 positions masked with frequency c / 4
    m0 = masks[:, 0]
    block0 = m0[:, :4].any(-1)
    count0 = m0[:, :4].sum(-1)
    for c in count0[block0].unique().tolist():
        sel = m0[block0 & (count0 == c), :4].float()
        q = c / 4
        assert ((sel.mean(0) - q).abs() < 4 * math.sqrt(q * (1 - q) / len(sel)) + 1e-9).all(), (c, sel.mean(0))


def spg_bounds_direct(model, batch, noise, beta, spg_code=False):
    """The bounds per sequence, recomputed from scratch (loops, from-scratch log-probs). spg_code: SPG's code's
    form (every masked real token, averaged alike; EUBO weight 1 / masked fraction), else block_elbo's (block j's
    masked tokens with w = n_blocks * span / count, divided by the length n)."""
    K = noise.num_views
    lower, upper = [], []
    for n in range(batch.completion_ids.shape[0]):
        C = batch.completion_mask[n].bool()
        lp = direct_logprobs(model, batch, n, noise.completion_masks[:, n], noise.prompt_masks[:, n])  # [K, Lc]
        if spg_code:
            masked = noise.completion_masks[:, n] & C  # [K, Lc]
            w = masked.double() * C.sum() / masked.sum(-1, keepdim=True)  # 1 / t_hat
            lo = sum(lp[k][masked[k]].mean() for k in range(K)) / K
        else:
            w = noise.weights[:, n].double()
            lo = sum((w[k] * lp[k]).sum() for k in range(K)) / K / C.sum()
        seen = (w > 0).any(0)
        terms = [
            torch.log(sum(w[k, i] * lp[k, i].exp() ** beta for k in range(K)) / K) / beta
            for i in range(len(C))
            if seen[i]
        ]
        lower.append(lo)
        upper.append(sum(terms) / len(terms))
    return torch.stack(lower), torch.stack(upper)


@pytest.mark.parametrize("beta", [1.0, 1.5])
@pytest.mark.parametrize("block_length", [4, 8])
def test_block_elbo_bounds_equal_their_formulas(random_model, beta, block_length):
    """The estimate against the module docstring's formulas written out; with one block (block_length 8 >= every
    length) they are also exactly SPG's code's formulas (mean log p over masked tokens; EUBO weight 1 / t_hat)."""
    batch, tr = SPG_BATCH, traits(random_model)
    cfg = EstimatorConfig(name="block_elbo", num_samples=3, t_min=0.2, t_max=0.9, p_mask_prompt=0.3, eubo_beta=beta)
    est = E.ESTIMATORS["block_elbo"](replace(cfg, block_length=block_length), tr)
    noise = est.draw(batch, torch.Generator().manual_seed(4))
    with torch.no_grad():
        out = est.estimate(random_model, batch, noise)
    mask = batch.completion_mask.double()
    got = (out.logps.double() * mask).sum(-1), (out.upper.double() * mask).sum(-1)
    for spg_code in [False] + ([True] if block_length == 8 else []):
        lower, upper = spg_bounds_direct(random_model, batch, noise, beta, spg_code)
        assert torch.allclose(got[0], lower, atol=1e-4) and torch.allclose(got[1], upper, atol=1e-4)


def test_block_elbo_upper_above_lower_on_average(random_model):
    """beta = 1, one block of 4 tokens, every view enumerated (15 masks, P(M) = 1/4 / C(4, |M|)).
    One view: upper - lower = -log(t_hat) >= 0 exactly. Two views: a token seen in one view only gets
    log(p / (2 t_hat)), below log p when t_hat > 1/2, so upper < lower can happen for a given pair; on average
    upper >= lower."""
    batch = make_batch([[5, 7, 4]], [[3, 8, 5, 11]])
    tr = traits(random_model)
    cfg = EstimatorConfig(name="block_elbo", eubo_beta=1.0)
    masks = all_masks(4)[1:]
    prob = torch.tensor([0.25 / math.comb(4, int(m.sum())) for m in masks], dtype=torch.float64)
    assert prob.sum().item() == pytest.approx(1)

    def bounds(views):  # views: [K, R, 4] -> per-row sequence bounds for R rows of the same sequence
        K, R = views.shape[:2]
        weights = views.float() * 4 / views.sum(-1, keepdim=True)  # one block: n_blocks * span / count = 1 / t_hat
        noise = E.Noise(views, torch.zeros(K, R, 3, dtype=torch.bool), weights)
        with torch.no_grad():
            out = E.ESTIMATORS["block_elbo"](cfg, tr).estimate(random_model, repeat(batch, R), noise)
        return out.logps.double().sum(-1), out.upper.double().sum(-1)

    lo1, up1 = bounds(masks[None])
    t_hat = masks.sum(-1).double() / 4
    assert torch.allclose(up1 - lo1, -t_hat.log(), atol=1e-5)
    i, j = torch.meshgrid(torch.arange(15), torch.arange(15), indexing="ij")
    lo2, up2 = bounds(torch.stack([masks[i.reshape(-1)], masks[j.reshape(-1)]]))
    w = (prob[i] * prob[j]).reshape(-1)
    gap = ((up2 - lo2) * w).sum().item()
    below = (w * (up2 < lo2)).sum().item()
    print(f"K=2: E[upper] - E[lower] = {gap:.4f} nats; P(upper < lower) = {below:.3f}")
    assert gap > 0


# ----------------------------------------------------------------------------------------------- trajectory

PROMPTS = [[5, 7, 4], [9, 6], [5, 7, 4], [9, 6], [8]]


def rollout_batch(model, tokenizer, cfg, seed=0):
    return generate(model, tokenizer, PROMPTS, cfg, torch.Generator().manual_seed(seed))


def trajectory(model, merge=1):
    return E.ESTIMATORS["trajectory"](EstimatorConfig(name="trajectory", merge_steps=merge), traits(model))


def trajectory_views(model, batch, merge=1):
    return trajectory(model, merge).draw(batch)


def decoded(batch, **changes):
    """The batch as if its rollout had been decoded with other settings (what the estimators read)."""
    return replace(batch, trace=replace(batch.trace, decoding=replace(batch.trace.decoding, **changes)))


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
@pytest.mark.parametrize("self_correction", [False, True])
def test_trajectory_replays_the_sampler_exactly(tokenizer, attention, self_correction):
    model = build(tokenizer, attention=attention, block_size=4)
    Lc, Lb = 12, 4
    rollout = RolloutConfig(
        max_completion_length=Lc,
        steps=12,
        block_length=Lb,
        temperature=0.8,
        self_correction=self_correction,
        correction_threshold=0.3,
    )
    batch = rollout_batch(model, tokenizer, rollout)
    trace = batch.trace
    if self_correction:
        assert (trace.events[:, 4] == REMASK).any()  # the replay has remasks to get right
    noise = trajectory_views(model, batch)
    with torch.no_grad():
        out = trajectory(model).estimate(model, batch, noise)
    est = out.logps
    # every commit the sampler made is scored from the state it was made in (EOS and the tokens after it too,
    # and a commit that self-correction later took back): per position, the sum of its commits' sampler log-probs
    ev = trace.events
    commits = ev[:, 4] == COMMIT
    at = ev[commits, 0] * Lc + ev[commits, 2]  # (row, position) of every commit
    N = len(PROMPTS)
    sampler = torch.zeros(N * Lc).index_add_(0, at, trace.event_logprob[commits]).view(N, Lc)
    n_commits = torch.zeros(N * Lc).index_add_(0, at, torch.ones(len(at))).view(N, Lc)
    scored = n_commits > 0
    assert (~batch.completion_mask.bool() & scored).any()  # tokens after the first EOS are among them
    assert torch.equal(out.mask, scored) and torch.equal(scored, trace.commit_step >= 0)
    assert torch.allclose(est, sampler, atol=1e-5, rtol=0)
    assert (est[~scored] == 0).all()
    if self_correction:
        assert n_commits.max() > 1  # some positions were committed twice, and both commits are scored
    else:  # one commit per position: its log-prob is the final token's
        assert torch.allclose(est[scored], trace.token_logprob[scored], atol=1e-5, rtol=0)
    assert torch.equal(noise.weights.sum(0), n_commits)  # each commit scored once, by its step's view
    # views = forwards
    K = noise.num_views
    if attention == "block_causal":  # packed: one forward per step of a block, not per step
        assert K == 12 // (Lc // Lb) and int(trace.num_steps.max()) == 12
    else:
        assert K == int(trace.num_steps.max()) == 12
    merged = trajectory_views(model, batch, merge=2)
    assert merged.num_views == math.ceil(K / 2)
    assert torch.equal(merged.weights.sum(0) > 0, scored)


@pytest.mark.parametrize(
    "order,order_temperature,exact",
    [
        ("top_prob", 0.0, True),
        ("margin", 0.0, True),
        ("low_confidence", 0.0, False),
        ("top_prob", 0.3, True),
        ("entropy", 1.0, True),
        ("random", 1.0, True),
    ],
)
def test_trajectory_likelihood_is_the_rollout_probability(tokenizer, order, order_temperature, exact):
    """The trajectory estimator's log-likelihood is the log-probability with which the sampler produced the
    rollout when the unmasking order is a function of the state (top_prob, margin, ...): 4000 rollouts of a
    2-token canvas, grouped by whole trajectory (which position first, both tokens), occur n * exp(loglik)
    times (chi-square), and the probabilities sum to 1. With a sampled order (order_temperature > 0) that
    holds only because the estimator adds the order's Plackett-Luce log-prob (without it these sum to ~2).
    With LLaDA's low_confidence order at temperature > 0 a position is committed *because* its sampled token
    came out probable, so these products are not the rollout's probability (they sum to ~2 here) and the
    estimator's gradient is not the policy gradient."""
    model = build(tokenizer, seed=0, std=1.0)
    rollout = RolloutConfig(
        max_completion_length=2,
        steps=2,
        temperature=1.0,
        order=order,
        stop_at_eos=False,
        order_temperature=order_temperature,
    )
    n = 4000
    batch = generate(model, tokenizer, [[5, 7, 4]] * n, rollout, torch.Generator().manual_seed(0))
    assert (batch.completion_mask.sum(-1) == 2).all()  # no EOS: both tokens are scored
    noise = trajectory_views(model, batch)
    with torch.no_grad():
        loglik = trajectory(model).estimate(model, batch, noise).logps.sum(-1)
    keys = [tuple(k) for k in torch.stack([batch.trace.commit_step[:, 0], *batch.completion_ids.T], 1).tolist()]
    prob = dict(zip(keys, loglik.exp().tolist()))  # one value per trajectory
    counts = {k: keys.count(k) for k in prob}
    expected = {k: n * q for k, q in prob.items()}
    keep = [k for k in prob if expected[k] >= 5]
    chi2 = sum((counts[k] - expected[k]) ** 2 / expected[k] for k in keep)
    dof = len(keep) - 1
    assert dof >= 5
    in_tail = chi2 > dof + 6 * math.sqrt(2 * dof) + 10
    total = sum(prob.values())
    if exact:
        assert not in_tail, (chi2, dof)
        assert 0.99 < total <= 1.0 + 1e-6  # the sampled trajectories carry (nearly) all the mass
    else:
        assert in_tail and total > 1.5, (chi2, total)


def test_trajectory_scores_a_sampled_order_with_gradient(tokenizer):
    """With rollout.order_temperature > 0 and a model-scored order, the trajectory estimate is the token
    log-probs plus each step's Plackett-Luce order log-prob recomputed from the model (equal to what the
    sampler recorded), and the order part carries gradient into the model: RL trains the order too."""
    model = build(tokenizer).train()
    rollout = RolloutConfig(
        max_completion_length=12,
        steps=6,
        block_length=6,
        temperature=0.8,
        order="top_prob",
        order_temperature=0.2,
        stop_at_eos=False,
    )
    batch = rollout_batch(model, tokenizer, rollout)
    assert (batch.trace.order_logprob < -0.1).any()  # orders really were sampled
    noise = trajectory_views(model, batch)
    est = trajectory(model)
    total = est.estimate(model, batch, noise).logps
    tokens = est.estimate(model, decoded(batch, order_temperature=0.0), noise).logps
    order = (total - tokens).sum(-1)
    assert torch.allclose(order.detach(), batch.trace.order_logprob.sum(-1), atol=1e-4, rtol=0)
    order.sum().backward()
    assert model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    with pytest.raises(ConfigError, match="merge_steps=1"):
        trajectory_views(model, batch, merge=2)
    with pytest.raises(ConfigError, match="rollout.order=top_prob"):
        trajectory_views(model, decoded(batch, order="low_confidence"))


def random_head(model, seed: int = 0):
    """An order head whose scores are not top_prob's (an untrained head reproduces top_prob), seeded: its
    initialisation does not depend on the global generator, which other tests and imports move."""
    from dllm_rl.policy import OrderHead, OrderHeadConfig

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = OrderHead(OrderHeadConfig(hidden_size=model.config.hidden_size, width=16, heads=2))
        torch.nn.init.normal_(head.out[1].weight, std=1.0)
    return head


def test_trajectory_scores_a_learned_order_with_gradient_into_the_head(tokenizer):
    """rollout.order=policy: the trajectory estimate adds each step's Plackett-Luce log-prob under the learned
    order head, recomputed from the replayed states block by block (equal to what the sampler recorded), and
    its gradient reaches the head but not the model through the order term (the head reads detached inputs)."""
    from dllm_rl.policy import OrderHead, OrderHeadConfig

    model = build(tokenizer).train()
    head = random_head(model)
    rollout = RolloutConfig(
        max_completion_length=12,
        steps=6,
        block_length=6,
        temperature=0.8,
        order="policy",
        order_temperature=0.5,
        stop_at_eos=False,
    )
    batch = generate(model, tokenizer, PROMPTS, rollout, torch.Generator().manual_seed(0), order_policy=head)
    assert (batch.trace.order_logprob < -0.1).any()
    noise = trajectory_views(model, batch)
    est = trajectory(model)
    total = est.estimate(model, batch, noise, order_policy=head).logps
    tokens = est.estimate(model, decoded(batch, order_temperature=0.0), noise).logps
    order = (total - tokens).sum(-1)
    # every step's order term, those of steps that committed only tokens after the first EOS included
    assert (batch.completion_mask == 0).any()
    assert torch.allclose(order.detach(), batch.trace.order_logprob.sum(-1), atol=1e-4, rtol=0)
    params = [p for p in model.parameters()]
    g_total = torch.autograd.grad(total.sum(), params + list(head.parameters()), allow_unused=True)
    g_tokens = torch.autograd.grad(tokens.sum(), params)
    assert head.out[1].weight.grad is None and g_total[len(params) + 0] is not None
    head_grads = dict(zip([n for n, _ in head.named_parameters()], g_total[len(params) :]))
    assert head_grads["out.1.weight"].abs().sum() > 0 and head_grads["hidden_in.1.weight"].abs().sum() > 0
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_total[: len(params)], g_tokens))
    # greedy order (order_temperature 0): the k best scores; an untrained head decodes exactly like top_prob
    fresh = OrderHead(OrderHeadConfig(hidden_size=model.config.hidden_size, width=16, heads=2))
    greedy = replace(rollout, temperature=0.0, order_temperature=0.0)
    a = generate(model, tokenizer, PROMPTS, greedy, torch.Generator().manual_seed(0), order_policy=fresh)
    b = generate(model, tokenizer, PROMPTS, replace(greedy, order="top_prob"), torch.Generator().manual_seed(0))
    assert torch.equal(a.trace.commit_step, b.trace.commit_step) and torch.equal(a.completion_ids, b.completion_ids)
    with pytest.raises(ConfigError, match="order_policy="):
        est.estimate(model, batch, noise)


def test_rows_selected_out_of_order_replay_and_score_as_themselves(tokenizer):
    """A batch's rows taken in another order (one twice), as DPO's pairs take a rollout's best and worst samples:
    each selected row replays the canvases of the row it was and has its trajectory estimate, order term included
    (the learned head's replay reads each step's draws row by row from the events)."""
    model = build(tokenizer).eval()
    head = random_head(model)
    rollout = RolloutConfig(
        max_completion_length=12, steps=6, block_length=6, temperature=0.8, order="policy", order_temperature=0.5
    )
    batch = generate(model, tokenizer, PROMPTS, rollout, torch.Generator().manual_seed(0), order_policy=head)
    rows = torch.tensor([3, 0, 2, 0, 1])
    picked = batch.select(rows)
    for j, i in enumerate(rows.tolist()):
        assert all(torch.equal(a, b) for a, b in zip(picked.trace.replay(j), batch.trace.replay(i)))
        assert len(picked.trace.replay(j)) == len(batch.trace.replay(i))
    est = trajectory(model)
    with torch.no_grad():
        whole = est.estimate(model, batch, trajectory_views(model, batch), order_policy=head).logps
        some = est.estimate(model, picked, trajectory_views(model, picked), order_policy=head).logps
    torch.testing.assert_close(some, whole[rows], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------------ gradients


@pytest.mark.parametrize("name", list(E.ESTIMATORS))
def test_gradients_flow(tokenizer, name):
    model = build(tokenizer).train()
    rollout = RolloutConfig(max_completion_length=8, steps=8, block_length=4, temperature=1.0)
    batch = rollout_batch(model, tokenizer, rollout)
    cfg = EstimatorConfig(name=name, num_samples=2)
    est = E.ESTIMATORS[name](cfg, traits(model))
    noise = est.draw(batch, torch.Generator().manual_seed(0))
    out = est.estimate(model, batch, noise)
    mask = batch.completion_mask
    total = (out.logps * mask).sum() + ((out.upper * mask).sum() if out.upper is not None else 0)
    total.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["lm_head.weight"].abs().sum() > 0 and grads["layers.0.self_attn.q_proj.weight"].abs().sum() > 0


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_trajectory_replays_a_sampled_random_order_in_packed_and_merged_views(tokenizer, attention):
    """rollout.order=random sampled at order_temperature > 0 draws every order of a step's positions alike, so
    its order term is a constant read from the trace: the estimator accepts it on a block-causal model (packed
    views) and with merge_steps > 1. With merge_steps=1 the estimate is the sampler's recorded log-prob of each
    commit plus log(1/n) for a commit drawn from n masked positions of its block (4, 3, 2, 1 here); merged views
    carry the same order term."""
    model = build(tokenizer, attention=attention, block_size=4)
    Lc, Lb = 12, 4
    rollout = RolloutConfig(
        max_completion_length=Lc,
        steps=12,
        block_length=Lb,
        temperature=0.8,
        order="random",
        order_temperature=0.5,
        stop_at_eos=False,
    )
    batch = rollout_batch(model, tokenizer, rollout)
    trace = batch.trace
    assert (trace.commit_step >= 0).all() and (trace.num_steps == 12).all()  # one commit per step, every block
    with torch.no_grad():
        est = trajectory(model).estimate(model, batch, trajectory_views(model, batch)).logps
    ev = trace.events
    commits = ev[:, 4] == COMMIT
    at = ev[commits, 0] * Lc + ev[commits, 2]
    sampler = torch.zeros(len(PROMPTS) * Lc).index_add_(0, at, trace.event_logprob[commits]).view(-1, Lc)
    order = -(Lb - trace.commit_step % Lb).double().log()  # the block's 4th, 3rd, ... masked position drawn
    assert torch.allclose(est.double(), sampler.double() + order, atol=1e-5, rtol=0)
    fixed = decoded(batch, order="left_to_right", order_temperature=0.0)  # the same views without an order term
    with torch.no_grad():
        merged = trajectory(model, 2).estimate(model, batch, trajectory_views(model, batch, merge=2)).logps
        merged_tokens = trajectory(model, 2).estimate(model, fixed, trajectory_views(model, fixed, merge=2)).logps
    assert torch.allclose(
        (merged - merged_tokens).sum(-1).double(),
        torch.full((len(PROMPTS),), -3 * math.log(24.0), dtype=torch.float64),
        atol=1e-5,
    )
