"""The trainer's rollout against the greedy benchmark decode at the same shape: tokens/s of sampled decoding
(temperature, top-p, a sampled Plackett-Luce order, the full trace) over greedy decoding's, for the engine's
static step and for the host-driven loop it replaced (rollout.eager_loop).

On the H200 (benchmarks/RESULTS.md, "GPU") a GRPO step's rollout (T 0.9, dual cache) ran at 733 tok/s against
1,068 for greedy decoding of the same shape: 69%. On a GPU the host-driven loop paid for sampling in host
synchronisations (the trace copied to the host every step, `int(k.max())` for a sampled order's draw, boolean
indexing of the masked positions); the static step has none (benchmarks/decode_proxies.py counts them), so
what is left is the sampler's arithmetic. This script times both on CPU, where synchronisations are nearly
free, so its ratios say what the arithmetic costs; each configuration is decoded `--repeats` times,
interleaved, and the median is reported.

    python benchmarks/sampled_rollout.py                 # 4 layers, d=512, vocab 4096, batch 16, gen 128
    python benchmarks/sampled_rollout.py --device cuda --llada-8b --batch 64 --gen 256
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dllm_rl.config import RolloutConfig
from dllm_rl.rollout import generate
from dllm_rl.rollout.eager_loop import generate_host_loop

DECODINGS = {
    "greedy": {},
    "trainer (T 0.9)": {"temperature": 0.9},
    "T 0.9, top_p 0.9": {"temperature": 0.9, "top_p": 0.9},
    "T 1, Plackett-Luce top_prob order 0.5": {"temperature": 1.0, "order": "top_prob", "order_temperature": 0.5},
}
ENGINES = {"static step": generate, "host loop (before)": generate_host_loop}


class _Tok:
    """The tokenizer fields the engine reads (a random model has no tokenizer)."""

    def __init__(self, mask_id: int):
        self.mask_token_id, self.pad_token_id, self.eos_token_id = mask_id, 0, None

    def decode(self, ids, skip_special_tokens=True):
        return ""


def build_model(args):
    from dllm_rl.models import TinyMDM, TinyMDMConfig
    from dllm_rl.models.llada import LLaDAConfig, LLaDAModelLM

    torch.manual_seed(0)
    if args.llada_8b:
        with torch.device(args.device):
            return LLaDAModelLM(LLaDAConfig()).to(torch.bfloat16).eval()
    cfg = TinyMDMConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden * 8 // 3,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        max_position_embeddings=args.prompt + args.gen,
        mask_token_id=args.vocab - 1,
        eos_token_id=args.vocab - 2,
        pad_token_id=0,
    )
    return TinyMDM(cfg).to(args.device).eval()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--llada-8b", action="store_true")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--gen", type=int, default=128)
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--cache", default="dual")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--engines", default=",".join(ENGINES))
    args = p.parse_args()
    model = build_model(args)
    mask_id = model.config.mask_token_id
    tok = _Tok(mask_id)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, mask_id - 2, (args.batch, args.prompt), generator=g).tolist()
    cuda = args.device == "cuda"
    engines = [e.strip() for e in args.engines.split(",")]
    runs = {(e, d): [] for e in engines for d in DECODINGS}
    for rep in range(args.repeats + 1):  # the first round warms up (allocator, kernels) and is not counted
        for (engine, decoding), times in runs.items():
            cfg = RolloutConfig(
                max_completion_length=args.gen,
                steps=args.gen // 2,
                block_length=args.block,
                cache=args.cache,
                stop_at_eos=False,
                **DECODINGS[decoding],
            )
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = ENGINES[engine](model, tok, prompts, cfg, torch.Generator().manual_seed(rep))
            if cuda:
                torch.cuda.synchronize()
            if rep:
                times.append(out.stats["committed_tokens"] / (time.perf_counter() - t0))
    print(
        f"{'LLaDA-8B shape' if args.llada_8b else f'tiny MDM {args.layers} layers d={args.hidden} V={args.vocab}'}, "
        f"batch {args.batch}, prompt {args.prompt}, gen {args.gen}, block {args.block}, 2 tokens/step, "
        f"cache {args.cache}, {args.device}; median of {args.repeats}\n"
    )
    print("| engine | decoding | tok/s | vs greedy (same engine) |")
    print("|---|---|---|---|")
    for engine in engines:
        greedy = statistics.median(runs[(engine, "greedy")])
        for decoding in DECODINGS:
            tps = statistics.median(runs[(engine, decoding)])
            print(f"| {engine} | {decoding} | {tps:,.1f} | {tps / greedy:.2f}x |")


if __name__ == "__main__":
    main()
