"""AR-order exact likelihood (JustGRPO, arXiv 2601.15165) against the trajectory estimator on the tiny tasks.

1. Exactness and cost on left-to-right rollouts of the shipped Sudoku checkpoint: the AR-order estimate, the
   trajectory estimate and the sampler's own log-probs agree; forwards and seconds per estimate. On a tiny
   block-causal model (random weights, the shipped model's shape) the two-stream AR-order scoring against one
   forward per token: the same numbers with block_size forwards instead of Lc.
2. GRPO from the same checkpoint, seed and data order for --steps steps: JustGRPO (left-to-right rollouts
   scored by ar_order, recipes/tiny/sudoku-ar-grpo.yaml) against the trajectory estimator on top_prob rollouts
   (the same recipe with rollout.order=top_prob, one block, estimator.name=trajectory); each final model is
   evaluated greedily under both decoding orders.

    python benchmarks/ar_order.py --steps 60          # 1.5-2 minutes per GRPO step and variant on a busy 2-core machine
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dllm_rl import estimators as E
from dllm_rl.config import EstimatorConfig, load_recipe
from dllm_rl.models import TinyMDM, TinyMDMConfig
from dllm_rl.models.base import traits
from dllm_rl.models.load import load_model
from dllm_rl.rollout import generate

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "recipes/tiny/sudoku-ar-grpo.yaml"
VARIANTS = {
    "ar_order, left-to-right rollouts (JustGRPO)": [],
    "trajectory, top_prob rollouts": [
        "rollout.order=top_prob",
        "rollout.block_length=null",
        "estimator.name=trajectory",
    ],
}
EVAL_ORDERS = {
    "left to right": ["rollout.order=left_to_right", "rollout.block_length=1"],
    "low_confidence": ["rollout.order=low_confidence", "rollout.block_length=null"],
}


def timed(*fns, repeats=3):
    """(outputs, best seconds) of each function, run alternately (a shared machine's load hits both alike)."""
    best, outs = [float("inf")] * len(fns), [None] * len(fns)
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            outs[i] = fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return outs, best


@torch.no_grad()
def exactness(n_prompts: int) -> list[tuple[str, str]]:
    recipe = load_recipe(RECIPE)
    model, tok = load_model(recipe.model, path=str(ROOT / recipe.model.path))
    from dllm_rl.tasks import load_task

    prompts = [r["prompt"] for r in load_task(recipe.data).eval.select(range(n_prompts))]
    batch = generate(model, tok, prompts, recipe.rollout, torch.Generator().manual_seed(0))
    tr = traits(model, tok)
    ar = E.ESTIMATORS["ar_order"](EstimatorConfig(name="ar_order"), tr)
    tj = E.ESTIMATORS["trajectory"](EstimatorConfig(name="trajectory"), tr)
    (a, t), (ta, tt) = timed(
        lambda: ar.estimate(model, batch, ar.draw(batch)).logps, lambda: tj.estimate(model, batch, tj.draw(batch)).logps
    )
    scored = batch.completion_mask.bool() & (batch.trace.commit_step >= 0)
    rows = [
        ("left-to-right rollouts scored", f"{len(batch)} x {batch.completion_ids.shape[1]} tokens, T=1"),
        ("max abs(ar_order - trajectory), per token", f"{(a - t).abs().max().item():.2e}"),
        (
            "max abs(ar_order - sampler log-prob), per token",
            f"{(a - batch.trace.token_logprob)[scored].abs().max():.2e}",
        ),
        ("forwards per estimate: ar_order / trajectory", f"{ar.draw(batch).num_views} / {tj.draw(batch).num_views}"),
        ("seconds per estimate: ar_order / trajectory", f"{ta:.3f} / {tt:.3f} (ratio {ta / tt:.2f})"),
    ]
    # block-causal: two-stream AR-order (block_size forwards) vs the same conditionals one token per forward
    cfg = model.config
    with torch.random.fork_rng():
        torch.manual_seed(0)
        bc = TinyMDM(
            TinyMDMConfig(**{**cfg.to_dict(), "attention": "block_causal", "block_size": 4, "architectures": None})
        ).eval()
    tb = traits(bc, tok)
    two = E.ESTIMATORS["ar_order"](EstimatorConfig(name="ar_order"), tb)
    noise = two.draw(batch)

    def per_token():
        out = torch.zeros(batch.completion_ids.shape)
        Lc = batch.completion_ids.shape[1]
        for i in range(Lc):
            masks = (torch.arange(Lc) >= i).expand(1, len(batch), Lc)
            w = torch.zeros(1, len(batch), Lc)
            w[0, :, i] = batch.completion_mask[:, i].float()
            out += E.score(bc, batch, E.Noise(masks, None, w), tb)
        return out

    (b2, b1), (t2, t1) = timed(lambda: two.estimate(bc, batch, noise).logps, per_token)
    rows += [
        ("block-causal (block 4): max abs(two-stream - one token per forward)", f"{(b2 - b1).abs().max().item():.2e}"),
        ("block-causal: forwards two-stream / per token", f"{noise.num_views} / {batch.completion_ids.shape[1]}"),
        ("block-causal: seconds two-stream / per token", f"{t2:.3f} / {t1:.3f} (ratio {t2 / t1:.2f})"),
    ]
    return rows


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "dllm_rl", *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
    )
    if proc.returncode:
        raise SystemExit(f"dllm-rl {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def accuracy(checkpoint: str, overrides: list[str]) -> float:
    out = cli("eval", str(RECIPE), "--checkpoint", checkpoint, *overrides).stdout
    return float(out.strip().splitlines()[-1].split()[1])


def train(name: str, overrides: list[str], steps: int, out: Path) -> dict:
    cli(
        "train",
        str(RECIPE),
        f"train.max_steps={steps}",
        f"train.output_dir={out}",
        "train.save_steps=0",
        f"train.eval_steps={steps}",
        f"train.logging_steps={max(1, steps // 10)}",
        "train.resume=false",
        *overrides,
    )
    logged = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    per_step = [sum(r[k] for k in r if k.startswith("seconds/")) for r in logged if "seconds/update" in r]
    row = {"name": name, "s_per_step": statistics.median(per_step), "reward": logged[-2].get("reward", float("nan"))}
    for label, ov in EVAL_ORDERS.items():
        row[label] = accuracy(str(out / "final"), ov)
    return row


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--prompts", type=int, default=32, help="rollouts for the exactness check")
    p.add_argument("--skip-training", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)  # tiny models: one thread is fastest on a shared machine
    print("| check | value |\n|---|---|")
    for k, v in exactness(a.prompts):
        print(f"| {k} | {v} |")
    if a.skip_training:
        return
    start = load_recipe(RECIPE).model.path
    before = {label: accuracy(str(ROOT / start), ov) for label, ov in EVAL_ORDERS.items()}
    work = Path(tempfile.mkdtemp(prefix="dllm-rl-ar-order-"))
    rows = [train(n, ov, a.steps, work / str(i)) for i, (n, ov) in enumerate(VARIANTS.items())]
    labels = list(EVAL_ORDERS)
    print(f"\n{a.steps} GRPO steps from {start}; held-out greedy accuracy (200 puzzles) decoded")
    print(f"\n| variant | {' | '.join(labels)} | seconds / step | train reward (last window) |")
    print("|---|" + "---|" * (len(labels) + 2))
    print(f"| start ({start}) | {' | '.join(f'{before[x]:.3f}' for x in labels)} | | |")
    for r in rows:
        accs = " | ".join(f"{r[x]:.3f}" for x in labels)
        print(f"| {r['name']} | {accs} | {r['s_per_step']:.2f} | {r['reward']:.3f} |")


if __name__ == "__main__":
    main()
