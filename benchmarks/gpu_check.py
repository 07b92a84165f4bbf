"""One GPU check, one markdown report: the rollout table, a GRPO step of the 8B LoRA recipe, the kernels.

Run by benchmarks/gpu_check.sh on a machine with one CUDA GPU (about 6 minutes on an H200, within 8); the
8B-shaped model (LLaDA-8B's shape and vocabulary, random bf16 weights: no download) is built once and every
section reuses it. Sections:

1. Correctness on the device: no host synchronisation inside the engine's step
   (torch.cuda.set_sync_debug_mode("error") over one step of each kind), CUDA-graph decoding gives the eager
   engine's tokens, liger's fused RMSNorm / RoPE / SiLU gate against the torch reference in bf16.
2. Rollout, prompt 128, gen 256, block 32, 2 tokens per step, greedy (the H200 table's shape): LLaDA's
   generate (the reference, timed over 2 of 8 blocks) and the engine eager and with CUDA graphs
   (rollout.compile=graphs), dual cache and exact block cache (the same weights, block-causal attention),
   at batch 1 and 64; the trainer's sampled decoding (T 0.9) at batch 64 against greedy; capture seconds;
   where a batch-64 step's device time goes (matmuls, attention, fused kernels, copies, the rest).
3. One GRPO step (the real GRPOTrainer) of recipes/llada-8b/gsm8k-diffu-grpo.yaml on this model with LoRA
   r=128, as measured on the H200 (bf16 base, no DeepSpeed, dual cache, 8 prompts x 8, mu=2, micro-batch
   16, random rewards): seconds per phase and peak memory next to `dllm-rl plan`.
4. The kernels table of benchmarks/kernel_ops.py at LLaDA's vocabulary.

Section 4 runs before section 3 (the report prints them in that order): the GRPO step is the longest and the
likeliest to meet the time limit, and the kernels' figures should come back even then.

    python benchmarks/gpu_check.py            # on a CUDA machine
    python benchmarks/gpu_check.py --tiny     # a dry run of every section on CPU with a tiny model (seconds)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from dllm_rl.config import RolloutConfig, load_recipe  # noqa: E402
from dllm_rl.models.llada import LLaDAConfig, LLaDAModelLM  # noqa: E402
from dllm_rl.rollout import engine, generate  # noqa: E402

GiB = 2**30


class Tok:
    """The tokenizer fields the engine and trainer read (a random model has no tokenizer)."""

    def __init__(self, mask_id: int, eos_id: int, pad_id: int):
        self.mask_token_id, self.eos_token_id, self.pad_token_id = mask_id, eos_id, pad_id

    def decode(self, ids, skip_special_tokens=True):
        return ""


class Check:
    def __init__(self, args):
        self.tiny = args.tiny
        self.device = torch.device("cpu" if args.tiny else "cuda")
        self.cuda = self.device.type == "cuda"
        self.lines: list[str] = []
        self.t0 = time.perf_counter()

    def out(self, line: str = "") -> None:
        self.lines.append(line)
        print(line, flush=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        return torch.cuda.max_memory_allocated() / GiB if self.cuda else float("nan")

    # ------------------------------------------------------------------------------------------ the model

    def build(self):
        """LLaDA-8B's shape with random bf16 weights, built on the device without an fp32 copy."""
        t0 = time.perf_counter()
        if self.tiny:
            cfg = LLaDAConfig(d_model=64, n_heads=2, n_kv_heads=2, n_layers=2, mlp_hidden_size=128, vocab_size=512)
            cfg.embedding_size = 512
        else:
            cfg = LLaDAConfig()
        cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id = cfg.vocab_size - 128, cfg.vocab_size - 256, 0
        dtype = torch.float32 if self.tiny else torch.bfloat16
        saved = torch.get_default_dtype()
        torch.set_default_dtype(dtype)
        try:
            with torch.device("meta"):
                model = LLaDAModelLM(cfg)
        finally:
            torch.set_default_dtype(saved)
        model = model.to_empty(device=self.device)
        g = torch.Generator(self.device).manual_seed(0)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith("ln_f.weight"):
                    p.fill_(1.0)
                else:
                    p.normal_(0.0, 0.02, generator=g)
        self.model = model.eval()
        self.tok = Tok(cfg.mask_token_id, cfg.eos_token_id, cfg.pad_token_id)
        self.sync()
        self.out(
            f"model: LLaDA-8B shape, {sum(p.numel() for p in model.parameters()) / 1e9:.2f} B random "
            f"{str(dtype).removeprefix('torch.')} params, built in {time.perf_counter() - t0:.1f} s"
        )

    def attention(self, kind: str) -> None:
        c = self.model.config
        c.attention, c.block_size = kind, (32 if kind == "block_causal" else None)

    # ----------------------------------------------------------------------------------- 1. correctness

    def correctness(self, P: int, gen: int) -> None:
        from dllm_rl.counter_rng import row_seeds
        from dllm_rl.models.base import traits
        from dllm_rl.rollout.step import step_kind

        self.out("\n## 1. Correctness on the device\n")
        cfg = RolloutConfig(max_completion_length=gen, steps=gen // 2, block_length=32, cache="dual", stop_at_eos=False)
        prompts = self.prompts(2, P)
        tr = traits(self.model, self.tok)
        ws, _, _ = engine._workspace(self.model, tr, cfg, len(prompts), P, None)
        ws.load(prompts, row_seeds(prompts, torch.Generator().manual_seed(0)), 0)
        ws.start_block(0)
        kinds = [step_kind(cfg, tr, ws.L, ws.P, 0, first) for first in (True, False)]
        with torch.no_grad():
            for kind in kinds:  # warm-up (lazy initialisation may synchronise once)
                ws.step(kind)
            self.sync()
            verdict = "no synchronising call"
            if self.cuda:
                torch.cuda.set_sync_debug_mode("error")
            try:
                for kind in kinds:
                    ws.step(kind)
            except RuntimeError as e:
                verdict = f"FAILED: {str(e).splitlines()[0][:200]}"
            finally:
                if self.cuda:
                    torch.cuda.set_sync_debug_mode("default")
        self.out(f"- host syncs inside the step (set_sync_debug_mode error, dual cache, both kinds): {verdict}")
        for sampled in ({}, {"temperature": 0.9}):
            eager = generate(self.model, self.tok, prompts, replace(cfg, **sampled), torch.Generator().manual_seed(1))
            graphs = generate(
                self.model,
                self.tok,
                prompts,
                replace(cfg, compile="graphs", compile_backend="none" if self.tiny else "auto", **sampled),
                torch.Generator().manual_seed(1),
            )
            same = torch.equal(eager.completion_ids, graphs.completion_ids)
            steps = torch.equal(eager.trace.commit_step, graphs.trace.commit_step)
            lp = (eager.trace.token_logprob - graphs.trace.token_logprob).abs().max().item()
            self.out(
                f"- {'graphs' if self.cuda else 'bucketed'} vs eager, {'T 0.9' if sampled else 'greedy'}: "
                f"same tokens {same}, same commit steps {steps}, max |log-prob diff| {lp:.2e}"
            )
        engine._GRAPHS.clear()
        self.fused_ops()

    def fused_ops(self) -> None:
        from dllm_rl.kernels import fused

        c = self.model.config
        bf16 = dict(device=self.device, dtype=torch.bfloat16)
        x, w = torch.randn(64, c.d_model, **bf16), torch.randn(c.d_model, **bf16)
        q, k = (torch.randn(2, c.n_heads, 64, c.d_model // c.n_heads, **bf16) for _ in range(2))
        cos, sin = self.model.rotary(torch.arange(64, device=self.device).expand(2, 64), torch.float32)
        a, b = (torch.randn(64, c.mlp_hidden_size, **bf16) for _ in range(2))
        with torch.no_grad():
            rows = [
                ("rms_norm", fused.rms_norm(x, w, 1e-5), fused.rms_norm_reference(x, w, 1e-5)),
                (
                    "rotary q",
                    fused.rotary(q.clone(), k.clone(), cos, sin)[0],
                    fused.rotary_reference(q, k, cos, sin)[0],
                ),
                ("silu_mul", fused.silu_mul(a, b), fused.silu_mul_reference(a, b)),
            ]
        path = "liger" if self.cuda else "torch reference (CPU)"
        for name, got, want in rows:
            err = (got.float() - want.float()).abs().max().item()
            ulp = (want.float().abs().max().item() * 2**-7) or 1.0
            self.out(f"- {name} ({path}) vs torch, bf16: max |diff| {err:.3g} ({err / ulp:.2f} bf16 ulps of the max)")

    # -------------------------------------------------------------------------------------- 2. rollout

    def prompts(self, batch: int, P: int) -> list[list[int]]:
        g = torch.Generator().manual_seed(0)
        return torch.randint(1, self.tok.eos_token_id - 1, (batch, P), generator=g).tolist()

    def reference(self, prompts, gen: int, block: int, blocks: int) -> float:
        """tokens/s of LLaDA's generate (benchmarks/rollout.py: full forward and logits every step) over the first
        `blocks` blocks of the gen-token canvas (every step costs the same)."""
        from rollout import reference

        x = torch.tensor(prompts, device=self.device)
        self.sync()
        t0 = time.perf_counter()
        tokens = reference(self.model, x, gen, block, 2, self.tok.mask_token_id, blocks)
        self.sync()
        return tokens / (time.perf_counter() - t0)

    def decode(self, prompts, cfg) -> tuple[float, float, object]:
        """(tok/s, capture seconds, batch) of a timed decode after a warm-up decode (which captures graphs)."""
        warm = generate(self.model, self.tok, prompts, cfg, torch.Generator().manual_seed(0))
        self.sync()
        t0 = time.perf_counter()
        out = generate(self.model, self.tok, prompts, cfg, torch.Generator().manual_seed(0))
        self.sync()
        return out.stats["committed_tokens"] / (time.perf_counter() - t0), warm.stats.get("compile_seconds", 0.0), out

    def rollout(self, batches, P: int, gen: int) -> None:
        self.out(f"\n## 2. Rollout: prompt {P}, gen {gen}, block 32, 2 tokens/step, greedy unless noted\n")
        self.out("| batch | mode | tok/s | vs reference | capture s | peak GiB |")
        self.out("|---|---|---|---|---|---|")
        graphs = dict(compile="graphs", compile_backend="none" if self.tiny else "auto")
        modes = [
            ("engine eager, dual cache", "bidirectional", dict(cache="dual")),
            ("engine eager, exact block cache", "block_causal", dict(cache="block")),
            ("engine graphs, dual cache", "bidirectional", dict(cache="dual", **graphs)),
            ("engine graphs, exact block cache", "block_causal", dict(cache="block", **graphs)),
        ]
        for batch in batches:
            prompts = self.prompts(batch, P)
            self.attention("bidirectional")
            self.reset_peak()
            ref = self.reference(prompts, gen, 32, 2)
            self.out(
                f"| {batch} | reference (LLaDA generate, 2 of {gen // 32} blocks) | {ref:,.1f} | 1.00x | | "
                f"{self.peak_gib():.1f} |"
            )
            greedy_dual = {}
            for name, attention, extra in modes:
                self.attention(attention)
                self.reset_peak()
                cfg = RolloutConfig(
                    max_completion_length=gen, steps=gen // 2, block_length=32, stop_at_eos=False, **extra
                )
                tps, capture, out = self.decode(prompts, cfg)
                if extra["cache"] == "dual":
                    greedy_dual[extra.get("compile", "none")] = (tps, out)
                self.out(
                    f"| {batch} | {name} | {tps:,.1f} | {tps / ref:.2f}x | {capture:.1f} | {self.peak_gib():.1f} |"
                )
                engine._GRAPHS.clear()
            self.attention("bidirectional")
            if batch == max(batches):  # the trainer's sampled decoding against greedy, the same shape
                for mode, extra in (("none", {}), ("graphs", graphs)):
                    cfg = RolloutConfig(
                        max_completion_length=gen,
                        steps=gen // 2,
                        block_length=32,
                        cache="dual",
                        stop_at_eos=False,
                        temperature=0.9,
                        **extra,
                    )
                    tps, capture, _ = self.decode(prompts, cfg)
                    engine._GRAPHS.clear()
                    base = greedy_dual[mode][0]
                    self.out(
                        f"| {batch} | engine {'graphs' if mode == 'graphs' else 'eager'}, dual cache, T 0.9 "
                        f"(the trainer's) | {tps:,.1f} | {tps / ref:.2f}x ({tps / base:.2f}x greedy) | "
                        f"{capture:.1f} | |"
                    )

    def where_time_goes(self, batch: int, P: int, gen: int) -> None:
        """Device time of one dual-cache block step by kind of kernel (torch.profiler, eager step, 8 steps)."""
        from torch.profiler import ProfilerActivity, profile

        from dllm_rl.counter_rng import row_seeds
        from dllm_rl.models.base import traits
        from dllm_rl.rollout.step import step_kind

        self.attention("bidirectional")
        cfg = RolloutConfig(max_completion_length=gen, steps=gen // 2, block_length=32, cache="dual", stop_at_eos=False)
        prompts = self.prompts(batch, P)
        tr = traits(self.model, self.tok)
        ws, _, _ = engine._workspace(self.model, tr, cfg, batch, P, None)
        ws.load(prompts, row_seeds(prompts, torch.Generator().manual_seed(0)), 0)
        ws.start_block(0)
        kinds = [step_kind(cfg, tr, ws.L, ws.P, 0, first) for first in (True, False)]
        steps = 8
        with torch.no_grad():
            ws.step(kinds[0])
            ws.step(kinds[1])
            self.sync()
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            with profile(activities=activities) as prof:
                for _ in range(steps):
                    ws.step(kinds[1])
                self.sync()
        totals = dict.fromkeys(CATEGORIES, 0.0)
        attr = "self_device_time_total" if self.cuda else "self_cpu_time_total"
        for ev in prof.key_averages():
            us = getattr(ev, attr, 0.0)
            if us and (ev.key.startswith("aten::") != self.cuda):  # kernels on CUDA, aten ops on CPU
                totals[_category(ev.key)] += us
        total = sum(totals.values())
        self.out(
            f"\nwhere the time goes: one dual-cache block step at batch {batch}, eager, "
            f"{'device' if self.cuda else 'CPU'} time per step (torch.profiler, {steps} steps)\n"
        )
        self.out("| kernels | ms / step | share |")
        self.out("|---|---|---|")
        for name, us in totals.items():
            self.out(f"| {name} | {us / 1e3 / steps:.2f} | {us / max(total, 1e-9):.0%} |")
        engine._GRAPHS.clear()

    # ------------------------------------------------------------------------------------- 3. GRPO step

    def grpo_step(self, P: int) -> None:
        import datasets

        from dllm_rl.memory import plan_memory
        from dllm_rl.models.load import apply_lora
        from dllm_rl.tasks.base import Task
        from dllm_rl.trainers.grpo import GRPOTrainer

        self.out("\n## 3. One GRPO step: the 8B LoRA recipe's shape\n")
        self.attention("bidirectional")
        overrides = [
            "model.load_in_4bit=false",
            "rollout.cache=dual",
            "grpo.num_generations=8",
            "grpo.num_iterations=2",
            "train.batch_size=8",
            "train.gradient_accumulation_steps=4",
            "train.deepspeed=null",
            "train.max_steps=1",
            "train.eval_steps=0",
            "train.save_steps=0",
        ]
        if self.tiny:
            overrides += [
                "rollout.max_completion_length=32",
                "rollout.steps=16",
                "train.mixed_precision='no'",
                "model.lora.r=4",
                "model.dtype=float32",
            ]
        recipe = load_recipe(ROOT / "recipes/llada-8b/gsm8k-diffu-grpo.yaml", overrides)
        recipe = replace(recipe, rewards=[], train=replace(recipe.train, output_dir=tempfile.mkdtemp()))
        prompts = self.prompts(64, P)
        rows = [{"prompt": p, "answer": "0"} for p in prompts]
        task = Task("random", datasets.Dataset.from_list(rows), datasets.Dataset.from_list(rows[:8]), "math")
        coin = torch.Generator().manual_seed(0)
        rewards = lambda prompts, completions, **kw: torch.randint(0, 2, (len(completions),), generator=coin).tolist()
        model = apply_lora(self.model.train(), recipe.model)
        self.reset_peak()
        trainer = GRPOTrainer(recipe, reward_funcs=[rewards], model=model, tokenizer=self.tok, task=task)
        self.reset_peak()
        t0 = time.perf_counter()
        metrics = trainer.step(0)
        self.sync()
        total = time.perf_counter() - t0
        peak = self.peak_gib()
        self.out("| phase | seconds | tokens/s |")
        self.out("|---|---|---|")
        for phase in ("rollout", "reward", "estimate", "update"):
            tps = metrics.get(f"tokens_per_s/{phase}", "")
            self.out(
                f"| {phase} | {metrics.get(f'seconds/{phase}', 0.0):.2f} | {tps if tps == '' else f'{tps:,.0f}'} |"
            )
        self.out(f"| whole step | {total:.2f} | |")
        fused = plan_memory(recipe, gpus=1, prompt_length=P)
        logits = plan_memory(recipe, gpus=1, prompt_length=P, fused_logprobs=False)
        self.out(
            f"\npeak memory {peak:.1f} GiB; `dllm-rl plan` (1 GPU, prompt {P}): {fused.total / GiB:.1f} GiB with "
            f"the fused log-probs the estimators use on CUDA ({logits.total / GiB:.1f} GiB with the logits path)"
            + (f"; measured / planned {peak / (fused.total / GiB):.2f}" if self.cuda else "")
        )

    # ------------------------------------------------------------------------------------------ 4. kernels

    def kernels(self) -> None:
        import kernel_ops

        self.out("\n## 4. Kernels (benchmarks/kernel_ops.py)\n")
        buf = []
        with contextlib.redirect_stdout(_Lines(buf)):
            kernel_ops.main(["--cpu"] if self.tiny else [])
        for line in "".join(buf).splitlines():
            self.out(line)


CATEGORIES = (
    "matmuls (linear layers, LM head)",
    "attention",
    "Triton: liger RMSNorm / RoPE / SiLU gate, sampling",
    "KV-cache writes, gathers, copies",
    "other elementwise and reductions",
)


def _category(name: str) -> str:
    """The kind of a profiled CUDA kernel (or aten op, on CPU) by its name."""
    n = name.lower()
    if any(k in n for k in ("gemm", "cutlass", "nvjet", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm")):
        return CATEGORIES[0]
    if any(k in n for k in ("fmha", "flash", "attention", "efficient")):
        return CATEGORIES[1]
    if "::" not in n and not n.startswith(("memcpy", "memset")):  # Triton kernels carry their function's name
        return CATEGORIES[2]
    if any(k in n for k in ("index", "copy", "gather", "scatter", "cat")):
        return CATEGORIES[3]
    return CATEGORIES[4]


class _Lines:
    def __init__(self, buf):
        self.buf = buf

    def write(self, s):
        self.buf.append(s)

    def flush(self):
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="dry run on CPU with a tiny model")
    p.add_argument(
        "--skip", default="", help="sections to skip, comma-separated: correctness,rollout,profile,grpo,kernels"
    )
    args = p.parse_args()
    if not args.tiny and not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA device (or --tiny for a CPU dry run)")
    check = Check(args)
    skip = set(filter(None, args.skip.split(",")))
    device = "CPU (dry run, tiny model)" if args.tiny else torch.cuda.get_device_name()
    check.out(f"# GPU check: {device}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}\n")
    P, gen = (16, 64) if args.tiny else (128, 256)
    check.build()
    sections = [
        ("correctness", lambda: check.correctness(P, gen)),
        ("rollout", lambda: check.rollout((1, 4) if args.tiny else (1, 64), P, gen)),
        ("profile", lambda: check.where_time_goes(4 if args.tiny else 64, P, gen)),
        ("kernels", check.kernels),
        ("grpo", lambda: check.grpo_step(P)),
    ]
    for name, run in sections:
        if name in skip:
            continue
        t0 = time.perf_counter()
        try:
            run()
        except Exception as e:  # one failed section must not lose the others' figures
            check.out(f"\n{name} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        check.out(f"\n({name}: {time.perf_counter() - t0:.0f} s)")
    check.out(f"\ntotal {time.perf_counter() - check.t0:.0f} s")


if __name__ == "__main__":
    main()
