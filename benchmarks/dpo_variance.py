"""How much does each variance reduction lower the noise of DPO's preference score on a diffusion LM?

The DPO loss reads s = beta * [(B_pi(y_w) - B_ref(y_w)) - (B_pi(y_l) - B_ref(y_l))], each B a likelihood estimate
under random noise. VRPO (arXiv 2505.19223) bounds the bias and variance of the loss and its gradient by the
variance of the estimated score, and claims each of its techniques lowers it. This script measures the standard
deviation of s over independent noise draws, per pair, at an equal budget of n forwards per estimate (per
completion and model), for:

    plain MC            elbo, 1 timestep with n masks, policy and reference drawn independently
    VRPO allocation     elbo, n timesteps with 1 mask each, independent
    + antithetic        the same, policy and reference under the same timesteps and masks (VRPO)
    + shared pair noise the same, chosen and rejected under the same noise too (dpo.pair_noise=shared)
    stratified          elbo, n stratified timesteps, antithetic
    coupled             elbo, n/2 complementary mask pairs (DiffuCoder), antithetic
    quadrature          n Gauss-Legendre nodes, one mask each, antithetic (and independent, for comparison)

all through the DPO trainer's own noise keys and scoring (trainers.dpo). "vs plain MC" is the geometric mean over
pairs of each pair's std ratio (the same pairs under every configuration), x/ its standard error factor. The policy
is the recipe's start after --train-steps DPO steps of the recipe (at the start the policy is the reference and,
under antithetic noise, s is exactly 0, which the script checks); the pairs are drawn as the recipe draws them (on-
policy: best vs worst of the model's own samples by the task's verifier). It also measures the quadrature
estimator's bias on these completions (L = rollout.max_completion_length canvas positions > 2n), for 3 nodes
(GDPO's) and the budget: against 10 nodes, exact for L <= 20, on the reference.

    python benchmarks/dpo_variance.py [--recipe recipes/tiny/sudoku-dpo.yaml] [--budget 4] [--pairs 8] [--draws 32]
    python benchmarks/dpo_variance.py --bias-only --pairs 48 --bias-masks 512      # the bias alone
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from dataclasses import replace

import torch

from dllm_rl.config import EstimatorConfig, load_recipe
from dllm_rl.estimators import Noise, build_estimator, gauss_legendre, score
from dllm_rl.trainers.dpo import DPOTrainer


def configurations(n: int) -> list[tuple[str, dict, dict]]:
    """(label, estimator section, dpo switches) at n forwards per estimate."""
    indep, anti = {"antithetic": False}, {"antithetic": True}
    rows = [
        (f"plain MC (elbo: 1 timestep x {n} masks), independent", {"name": "elbo", "masks_per_timestep": n}, indep),
        (f"VRPO allocation (elbo: {n} timesteps x 1 mask), independent", {"name": "elbo", "num_samples": n}, indep),
        ("+ antithetic policy/reference (VRPO)", {"name": "elbo", "num_samples": n}, anti),
        ("+ shared chosen/rejected noise", {"name": "elbo", "num_samples": n}, {**anti, "pair_noise": "shared"}),
        (
            f"stratified (elbo: {n} stratified timesteps), antithetic",
            {"name": "elbo", "num_samples": n, "stratified": True},
            anti,
        ),
    ]
    if n % 2 == 0:
        coupled = {"name": "elbo", "num_samples": n // 2, "coupled": True, "full_view": False}
        rows.append((f"coupled masks ({n // 2} complementary pairs), antithetic", coupled, anti))
    rows += [
        (
            f"quadrature ({n} Gauss-Legendre nodes x 1 mask), independent",
            {"name": "quadrature", "num_samples": n},
            indep,
        ),
        (f"quadrature ({n} nodes x 1 mask), antithetic", {"name": "quadrature", "num_samples": n}, anti),
    ]
    return rows


def pairs_of(trainer: DPOTrainer, want: int):
    """(batch [chosen; rejected], pair keys): `want` pairs drawn as the recipe draws them (on-policy: from fresh
    rollouts; offline: the dataset's first rows)."""
    if trainer.d.pairs == "offline":
        pairs = trainer.pairs[:want]
        return trainer.collate(pairs), [f"pair:{p.index}:0" for p in pairs]
    batches, keys, step = [], [], 10_000
    while sum(len(k) for k in keys) < want:
        batch, k, _, _ = trainer.on_policy_pairs(step)
        take = min(len(k), want - sum(len(x) for x in keys))
        if take:
            batches.append((batch, len(k), take))
            keys.append(k[:take])
        step += 1
    chosen = [b.select(torch.arange(t)) for b, n, t in batches]
    rejected = [b.select(n + torch.arange(t)) for b, n, t in batches]
    return type(chosen[0]).concat(chosen + rejected), [x for k in keys for x in k]


@torch.no_grad()
def scores(trainer: DPOTrainer, batch, keys: list[str], draws: int, policy, chunk: int = 16) -> torch.Tensor:
    """The preference score of every pair under `draws` independent noise draws: [P, R]."""
    P, out = len(keys), []
    for r in range(draws):
        s = torch.zeros(P)
        for lo in range(0, P, chunk):
            idx = torch.arange(lo, min(lo + chunk, P))
            mb = batch.select(torch.cat([idx, idx + P]))
            k = [keys[i] for i in idx.tolist()]
            pol = trainer.draw_noise(mb, trainer.noise_keys(k, "policy", f":bench{r}"))
            ref = trainer.draw_noise(mb, trainer.noise_keys(k, "reference", f":bench{r}"))
            p = trainer.sequence_scores(policy, mb, pol, grad=False).double().cpu()
            q = trainer.reference_scores(mb, ref).double().cpu()
            m = len(idx)
            s[idx] = (trainer.d.beta * ((p[:m] - q[:m]) - (p[m:] - q[m:]))).float()
        out.append(s)
    return torch.stack(out, 1)


@torch.no_grad()
def quadrature_bias(trainer: DPOTrainer, batch, nodes: list[int], masks: int) -> tuple[dict, float]:
    """({n: (mean bias of n-node quadrature vs 10 nodes, its standard error)}, mean |ELBO|) per completion of the
    batch, on the reference: each node's f(t) = E[(1/t) sum over masked scored tokens of log p] is estimated from
    `masks` Bernoulli(t) masks (one forward over masks x N rows per node). Every node thresholds the same uniforms
    (mask = u < t): each node's estimate stays unbiased, and the difference between the rules varies far less."""
    model = trainer.ref if trainer.ref is not None else trainer.model
    N, Lc = batch.completion_ids.shape
    big = batch.select(torch.arange(N).repeat(masks))  # [masks * N] rows, mask-major
    cmask = big.completion_mask.float()

    def node(t: float) -> torch.Tensor:  # [masks, N]
        g = torch.Generator().manual_seed(0)  # the same uniforms at every node
        mask = torch.rand(1, masks * N, Lc, generator=g) < t
        out = []
        for rows in torch.arange(masks * N).split(64 * N):  # 64 masks per forward: bounded memory
            part = big.select(rows)
            m = mask[:, rows]
            est = score(model, part, Noise(m, None, m.float() / t), trainer.traits)
            out.append((est * cmask[rows]).sum(-1).double())
        return torch.cat(out).view(masks, N)

    def rule(k: int) -> torch.Tensor:  # [masks, N] draws of sum_i w_i (1/t_i) sum over masked log p
        t, w = gauss_legendre(k)
        return sum(wi * node(ti) for ti, wi in zip(t.tolist(), w.tolist()))

    exact = rule(10)
    out = {}
    for n in nodes:
        diff = (rule(n) - exact).mean(1)  # [masks]: mean over completions; mask m thresholds the same uniforms
        out[n] = (diff.mean().item(), (diff.std() / math.sqrt(masks)).item())
    return out, exact.mean(0).abs().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipe", default="recipes/tiny/sudoku-dpo.yaml")
    ap.add_argument("--budget", type=int, default=4, help="forwards per estimate (per completion and model)")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--draws", type=int, default=32)
    ap.add_argument("--train-steps", type=int, default=10, help="DPO steps that move the policy off the reference")
    ap.add_argument("--bias-masks", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bias-only", action="store_true", help="only the quadrature bias (no training, no table)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    with tempfile.TemporaryDirectory() as out:
        r = load_recipe(args.recipe, [f"train.output_dir={out}", "train.resume=false", "dpo.score_std_draws=0"])
        trainer = DPOTrainer(r)
        batch, keys = pairs_of(trainer, args.pairs)
        if args.bias_only:
            print_bias(trainer, batch, args)
            print(f"\n{time.time() - t0:.0f} s")
            return
        base = trainer.estimator, trainer.d
        label, est, switches = configurations(args.budget)[2]  # VRPO: allocation + antithetic
        trainer.estimator = build_estimator(EstimatorConfig(**est), trainer.traits)
        trainer.d = replace(base[1], **switches)
        at_start = scores(trainer, batch, keys, 2, trainer.model)
        trainer.estimator, trainer.d = base
        for s in range(args.train_steps):  # (the first warmup steps have lr 0)
            trainer.step(s)
        print(f"recipe {args.recipe}: {len(keys)} pairs, {args.draws} draws, budget {args.budget} per estimate")
        print(f"at the start (policy = reference), {label}: max |score| {at_start.abs().max():.2e}")
        print(f"policy: the start after {args.train_steps} DPO steps of the recipe\n")
        print("| estimator and noise | std of beta*(dlogpi - dlogref), mean over pairs | vs plain MC | mean score |")
        print("|---|---|---|---|")
        first = None
        for label, est, switches in configurations(args.budget):
            trainer.estimator = build_estimator(EstimatorConfig(**est), trainer.traits)
            trainer.d = replace(base[1], **switches)
            s = scores(trainer, batch, keys, args.draws, trainer.model)
            std = s.std(1).double()  # [P] per pair
            first = std if first is None else first
            log_ratio = (std / first).log()  # paired: the same pairs under every configuration
            ratio, spread = log_ratio.mean().exp().item(), (log_ratio.std() / math.sqrt(len(std))).exp().item()
            print(
                f"| {label} | {std.mean().item():.4f} +- {std.std().item() / math.sqrt(len(std)):.4f} | "
                f"{ratio:.3f} (x/ {spread:.2f}) | {s.mean().item():+.4f} |"
            )
        trainer.estimator, trainer.d = base
        print_bias(trainer, batch, args)
    print(f"\n{time.time() - t0:.0f} s")


def print_bias(trainer: DPOTrainer, batch, args) -> None:
    bias, size = quadrature_bias(trainer, batch, sorted({3, args.budget}), args.bias_masks)
    for n, (b, se) in bias.items():
        print(
            f"quadrature bias, {n} nodes vs 10 (exact for L <= 20), L = {batch.completion_ids.shape[1]}, "
            f"{len(batch)} completions, {args.bias_masks} masks per node: {b:+.4f} +- {se:.4f} nats per sequence "
            f"(mean |ELBO| {size:.2f})"
        )


if __name__ == "__main__":
    main()
