"""CPU proxies of the GPU cost of a denoising step: kernel launches, host synchronisations, graph breaks.

A GPU decoding step at small batch is bound by the host (benchmarks/RESULTS.md, "GPU"): what it costs there is
how many kernels it launches and how often the host waits for the device. Both are counted on CPU with
dllm_rl.cost_proxies, for the engine's static step (rollout.step) and for the host-driven loop it replaced
(rollout.eager_loop), on two models: the tiny MDM (4 layers) and a model with LLaDA-8B's depth and narrow
widths (32 layers, d=64), so the per-layer counts are an 8B model's. Decode: prompt 128, gen 64 (2 blocks of
32), 2 tokens per step, dual cache, batch 1 (the batch-1 shape of the H200 table).

Columns (per denoising step, whole `generate` calls divided by the steps they took):
- aten kernel ops: ops that launch a kernel on CUDA (views excluded); "fused" counts each of
  kernels.rms_norm / rotary / silu_mul as the one liger kernel the CUDA path launches (kernels.one_op_per_kernel);
- host syncs per step (whole decode, setup and trace included) and inside a block (the steps only);
- graph breaks of the step under TorchDynamo: the static step per step kind; the host loop over one block.

    python benchmarks/decode_proxies.py              # both models, greedy and sampled (~5 minutes)
    python benchmarks/decode_proxies.py --tiny       # the tiny model only, a short decode (a dry run)
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from dllm_rl import cost_proxies as cp
from dllm_rl.config import RolloutConfig
from dllm_rl.counter_rng import row_seeds
from dllm_rl.kernels import one_op_per_kernel
from dllm_rl.models import TinyMDM, TinyMDMConfig, build_char_tokenizer
from dllm_rl.models.base import traits
from dllm_rl.models.llada import LLaDAConfig, LLaDAModelLM
from dllm_rl.rollout import eager_loop as host
from dllm_rl.rollout import engine, generate
from dllm_rl.rollout.step import step_kind

DECODINGS = {
    "greedy": {},
    "sampled (T 1, top_p 0.9, Plackett-Luce top_prob order)": {
        "temperature": 1.0,
        "top_p": 0.9,
        "order": "top_prob",
        "order_temperature": 0.5,
    },
}


def build(name: str, tok):
    torch.manual_seed(0)
    common = dict(mask_token_id=tok.mask_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if name == "tiny":
        cfg = TinyMDMConfig(vocab_size=len(tok), max_position_embeddings=512, **common)
        return TinyMDM(cfg).eval()
    cfg = LLaDAConfig(
        d_model=64,
        n_heads=2,
        n_kv_heads=2,
        n_layers=32,
        mlp_hidden_size=128,
        vocab_size=len(tok),
        embedding_size=len(tok),
        max_sequence_length=512,
        **common,
    )
    return LLaDAModelLM(cfg).eval()


class _InsideBlocks:
    """Counts the syncs of a SyncCounter that happen inside `module._decode_block` (the steps of a block)."""

    def __init__(self, module, counter: cp.SyncCounter):
        self.module, self.counter, self.inside = module, counter, 0

    def __enter__(self):
        self.original = original = self.module._decode_block

        def wrapped(*args, **kwargs):
            before = self.counter.total
            try:
                return original(*args, **kwargs)
            finally:
                self.inside += self.counter.total - before

        self.module._decode_block = wrapped
        return self

    def __exit__(self, *exc):
        self.module._decode_block = self.original


def measure(fn, module, model, tok, prompt, cfg) -> dict:
    g = lambda: torch.Generator().manual_seed(0)
    with cp.SyncCounter() as s, _InsideBlocks(module, s) as blocks:
        out = fn(model, tok, prompt, cfg, generator=g())
    steps = out.stats["forwards"]
    with cp.OpCounter() as ops:
        fn(model, tok, prompt, cfg, generator=g())
    with one_op_per_kernel(), cp.OpCounter() as fused:
        fn(model, tok, prompt, cfg, generator=g())
    return {
        "steps": steps,
        "ops": ops.kernels / steps,
        "fused": fused.kernels / steps,
        "syncs": s.total / steps,
        "inside": blocks.inside,
        "sites": s.sites,
        "ids": out.completion_ids,
    }


def static_breaks(model, tok, prompt, cfg) -> tuple[int, list[str]]:
    """Graph breaks of the engine's step, summed over the step kinds of a decode."""
    tr = traits(model, tok)
    ws, _, _ = engine._workspace(model, tr, cfg, len(prompt), len(prompt[0]), None)
    ws.load(prompt, row_seeds(prompt, torch.Generator().manual_seed(0)), tok.pad_token_id)
    ws.start_block(0)
    total, reasons = 0, []
    with torch.no_grad():
        for first in (True, False):
            n, why = cp.graph_breaks(ws.step, step_kind(cfg, tr, ws.L, ws.P, 0, first))
            total, reasons = total + n, reasons + why
    return total, reasons


def host_loop_breaks(model, tok, prompt, cfg) -> tuple[int, list[str]]:
    """Graph breaks of the host-driven loop over one block (its step is not a function of its own)."""
    one = RolloutConfig(**{**cfg.__dict__, "max_completion_length": cfg.block_length, "steps": cfg.block_length // 2})
    with torch.no_grad():
        return cp.graph_breaks(host.generate_host_loop.__wrapped__, model, tok, prompt, one)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the tiny model only, gen 32 (a quick dry run)")
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--gen", type=int, default=64)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--breaks", action="store_true", help="also trace the host loop for its graph breaks (slow)")
    args = p.parse_args()
    torch._logging.set_logs(dynamo=logging.ERROR)  # tracing the host loop hits dynamo's recompile limit: expected
    if args.tiny:
        args.gen = args.block = 32
    torch.set_num_threads(1)
    tok = build_char_tokenizer()
    prompt = [[5 + (i % 40) for i in range(args.prompt)]]
    print(f"prompt {args.prompt}, gen {args.gen}, block {args.block}, 2 tokens/step, dual cache, batch 1; CPU\n")
    print(
        "| model | decoding | engine | aten kernel ops / step | fused | host syncs / step | syncs inside blocks "
        "| graph breaks of the step | same tokens |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name in ("tiny",) if args.tiny else ("tiny", "LLaDA-8B depth (32 layers, d=64)"):
        model = build("tiny" if name == "tiny" else "llada", tok)
        for label, extra in DECODINGS.items():
            cfg = RolloutConfig(
                max_completion_length=args.gen,
                steps=args.gen // 2,
                block_length=args.block,
                cache="dual",
                stop_at_eos=False,
                **extra,
            )
            t0 = time.perf_counter()
            old = measure(host.generate_host_loop, host, model, tok, prompt, cfg)
            new = measure(generate, engine, model, tok, prompt, cfg)
            same = torch.equal(old["ids"], new["ids"])
            new_breaks, why = static_breaks(model, tok, prompt, cfg)
            old_breaks = "-"
            if args.breaks:
                n, _ = host_loop_breaks(model, tok, prompt, cfg)
                old_breaks = f"{n} in a block of {cfg.block_length // 2} steps"
            for engine_name, r, breaks in (
                ("host loop (before)", old, old_breaks),
                ("static step", new, f"{new_breaks} (2 step kinds)"),
            ):
                print(
                    f"| {name} | {label} | {engine_name} | {r['ops']:,.0f} | {r['fused']:,.0f} | {r['syncs']:.2f} "
                    f"| {r['inside']} over {r['steps']} steps | {breaks} | {'yes' if same else 'NO'} |"
                )
            for reason in why[:5]:
                print(f"  break: {reason}")
            print(f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
    print("\nHost-loop sync sites (last model, sampled):")
    for site, count in old["sites"].most_common(8):
        print(f"  {count:5d}  {site}")
    print("Static-step sync sites (whole decode: setup, one look per block, the trace at the end):")
    for site, count in new["sites"].most_common(8):
        print(f"  {count:5d}  {site}")


if __name__ == "__main__":
    main()
