"""Rollout speed and memory: every engine mode against the reference sampler, in the same run.

The reference is LLaDA's `generate` (arXiv 2502.09992) as published: one full forward of [prompt | canvas]
per step with logits for every position, k tokens committed per step (`--k`), no cache, greedy low-confidence
selection, batched over equal-length prompts. Each mode decodes the same prompts with the same model; the
table reports tokens/s (committed completion tokens per second), the speedup over the reference, and the
peak memory of the decoding call (CUDA: max_memory_allocated; CPU: peak RSS growth of a fresh subprocess).

    python benchmarks/rollout.py                       # CPU default: 8 layers, d=512, gen 256, block 32, batch 16
    python benchmarks/rollout.py --device cuda --llada-8b --batch 64 --k 2
    python benchmarks/rollout.py --device cuda --llada-8b --batch 1 --k 2 --modes "reference,exact block"

Results go to stdout as a markdown table (copy them into benchmarks/RESULTS.md with the command, date and
device).
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
import time

import torch

MODES = {  # name: (model attention, RolloutConfig overrides)
    "engine, no cache": ("bidirectional", {"cache": "none"}),
    "prefix cache": ("bidirectional", {"cache": "prefix"}),
    "dual cache": ("bidirectional", {"cache": "dual"}),
    "exact block cache (block-causal)": ("block_causal", {"cache": "block"}),
    "dual cache + threshold 0.9": ("bidirectional", {"cache": "dual", "commit": "threshold"}),
    # rollout.compile: torch.compile of the model call (warm-up excluded from the timing); on CUDA,
    # reduce-overhead also captures CUDA graphs, which is where batch-1 decoding loses most to launch overhead
    "exact block cache + torch.compile": ("block_causal", {"cache": "block", "compile": "default"}),
    "exact block cache + CUDA graphs": ("block_causal", {"cache": "block", "compile": "reduce-overhead"}),
}
CUDA_ONLY = {"exact block cache + CUDA graphs"}


def build_model(args, attention: str):
    from dllm_rl.models import TinyMDM, TinyMDMConfig
    from dllm_rl.models.llada import LLaDAConfig, LLaDAModelLM

    torch.manual_seed(0)
    if args.llada_8b:
        cfg = LLaDAConfig(attention=attention, block_size=args.block)
        with torch.device(args.device):
            return LLaDAModelLM(cfg).to(torch.bfloat16).eval()
    cfg = TinyMDMConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        max_position_embeddings=args.prompt + args.gen,
        attention=attention,
        block_size=args.block,
        mask_token_id=args.vocab - 1,
        eos_token_id=args.vocab - 2,
        pad_token_id=0,
    )
    return TinyMDM(cfg).to(args.device).eval()


class _Tok:
    """The few tokenizer fields the engine reads (random models have no real tokenizer)."""

    def __init__(self, mask_id: int):
        self.mask_token_id, self.pad_token_id, self.eos_token_id = mask_id, 0, None

    def decode(self, ids, skip_special_tokens=True):
        return ""


@torch.no_grad()
def reference(
    model, prompts: torch.Tensor, gen: int, block: int, k: int, mask_id: int, blocks: int | None = None
) -> int:
    """LLaDA's generate, batched over equal-length prompts (full forward, full logits every step); `blocks`:
    decode only the first ones (every step costs the same, so tokens/s over a few blocks is the whole decode's).
    Returns the tokens committed."""
    B, P = prompts.shape
    x = torch.cat([prompts, torch.full((B, gen), mask_id, device=prompts.device)], 1)
    blocks = gen // block if blocks is None else blocks
    for b in range(blocks):
        lo, hi = P + b * block, P + (b + 1) * block
        for _ in range(block // k):
            logits = model(x).logits.float()  # [B, L, V]
            logits[..., mask_id] = float("-inf")
            x0 = logits.argmax(-1)
            p = logits.softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
            conf = torch.full_like(p, float("-inf"))
            conf[:, lo:hi] = torch.where(x[:, lo:hi] == mask_id, p[:, lo:hi], conf[:, lo:hi])
            pick = conf.topk(k, dim=-1).indices
            x.scatter_(1, pick, x0.gather(1, pick))
    return B * blocks * block


def run_mode(args, name: str) -> dict:
    from dllm_rl.config import RolloutConfig
    from dllm_rl.rollout import generate

    attention, overrides = MODES.get(name, ("bidirectional", {}))
    model = build_model(args, attention)
    mask_id = model.config.mask_token_id
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, mask_id - 2, (args.batch, args.prompt), generator=g).to(args.device)
    cfg = RolloutConfig(
        max_completion_length=args.gen,
        steps=args.gen // args.k,
        block_length=args.block,
        stop_at_eos=False,
        **overrides,
    )
    tok = _Tok(mask_id)

    def once():
        if name == "reference (LLaDA generate)":
            return reference(model, prompts, args.gen, args.block, args.k, mask_id)
        out = generate(model, tok, [p.tolist() for p in prompts], cfg, torch.Generator().manual_seed(1))
        return int(out.stats["committed_tokens"])

    cuda = args.device == "cuda"
    if cuda or cfg.compile != "none":
        once()  # warm-up (kernels, allocator; compilation)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    tokens = once()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if cuda
        else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    )
    if not cuda and cfg.compile != "none":
        peak = float("nan")  # the warm-up already raised the process's peak RSS: not measurable this way
    return {"mode": name, "tokens": tokens, "seconds": seconds, "tok_s": tokens / seconds, "peak_mib": peak}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--gen", type=int, default=256)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--k", type=int, default=1, help="tokens committed per step (top_k modes)")
    p.add_argument("--llada-8b", action="store_true", help="an 8B LLaDA-shaped random model (bf16, GPU)")
    p.add_argument("--modes", default="all")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: run one mode in this process, print JSON
    args = p.parse_args()
    if args.one:
        print(json.dumps(run_mode(args, args.one)))
        return
    names = ["reference (LLaDA generate)"] + [n for n in MODES if args.device == "cuda" or n not in CUDA_ONLY]
    if args.modes != "all":
        names = [n for n in names if any(m in n for m in args.modes.split(","))]
        if not names or names[0] != "reference (LLaDA generate)":  # the speedups are ratios against it
            p.error(f"--modes {args.modes!r} must include 'reference' (the baseline every speedup is measured against)")
    rows = []
    for name in names:  # a fresh process per mode: peak memory is the mode's own
        cmd = [sys.executable, __file__, *sys.argv[1:], "--one", name]
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode:
            print(out.stderr, file=sys.stderr)
            raise SystemExit(f"mode {name!r} failed")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"{name}: {rows[-1]['tok_s']:.1f} tok/s", file=sys.stderr)
    base = rows[0]["tok_s"]
    shape = "LLaDA-8B shape" if args.llada_8b else f"{args.layers} layers, d={args.hidden}, vocab {args.vocab}"
    print(
        f"\n{shape}; batch {args.batch}, prompt {args.prompt}, gen {args.gen}, block {args.block}, "
        f"{args.k} token(s)/step, device {args.device}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads\n"
    )
    print("| mode | tokens/s | speedup vs reference | seconds | peak memory (MiB) |")
    print("|---|---|---|---|---|")
    for r in rows:
        peak = "-" if math.isnan(r["peak_mib"]) else f"{r['peak_mib']:.0f}"
        print(f"| {r['mode']} | {r['tok_s']:.1f} | {r['tok_s'] / base:.2f}x | {r['seconds']:.2f} | {peak} |")


if __name__ == "__main__":
    main()
