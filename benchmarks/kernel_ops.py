"""Fused kernels vs their baselines, as ratios measured in the same run: token choice (Triton vs the torch
reference `kernels.sampling.choose_tokens`) and per-token log-probs with gradient (chunked torch and liger's
fused linear cross-entropy vs the naive `token_logprobs(lm_head(h))`).

    python benchmarks/kernel_ops.py            # CUDA if present (LLaDA-8B shapes), else small CPU shapes (< 1 min)
    python benchmarks/kernel_ops.py --cpu      # force CPU

Peak memory is the extra memory a call needs above its inputs (for log-probs with gradient, the gradients it
writes into h.grad and W.grad included: every variant writes the same ones): torch.cuda.max_memory_allocated on CUDA; on
CPU (Linux) the resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) with glibc's mmap
threshold pinned so that freed tensors go back to the OS. On CPU the Triton sampling kernel cannot run (the
Triton interpreter is a correctness tool, not a speed one), so its rows read n/a.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import time

import torch
import torch.nn.functional as F

from dllm_rl.estimators.base import token_logprobs
from dllm_rl.kernels import logprobs as LP
from dllm_rl.kernels import use_fast_path
from dllm_rl.kernels.sampling import choose_tokens as choose_reference

MiB = 2**20


class Meter:
    """Times a callable and measures the extra peak memory of one call on `device`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.libc = None
        if device.type == "cpu" and sys.platform.startswith("linux"):
            self.libc = ctypes.CDLL("libc.so.6")
            self.libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD: fixed, so large frees return to the OS

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def time_ms(self, fn, reps: int) -> float:
        fn()
        self.sync()
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)

    def peak_mib(self, fn) -> float | None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            base = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - base) / MiB
        if self.libc is None:
            return None
        self.libc.malloc_trim(0)
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS
        except OSError:
            return None
        base = _status_kib("VmRSS")
        fn()
        return (_status_kib("VmHWM") - base) / 1024


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def bench_sampling(meter: Meter, shapes, dtype, reps: int) -> list[dict]:
    rows = []
    fast = use_fast_path(torch.empty(0, device=meter.device))
    fused = None
    if fast:
        from dllm_rl.kernels.sampling import choose_tokens_triton as fused
    for n, V in shapes:
        g = torch.Generator(device=meter.device).manual_seed(0)
        logits = 3 * torch.randn(n, V, device=meter.device, generator=g).to(dtype)  # [n, V]
        u = torch.rand(n, device=meter.device, dtype=torch.float64, generator=g)  # [n]
        mask_id = V - 128
        for temperature in (0.0, 1.0):
            variants = [("reference", choose_reference), ("triton", fused)]
            base = None
            for name, fn in variants:
                row = {"op": f"choose_tokens T={temperature:g}", "shape": f"n={n} V={V} {_dt(dtype)}", "variant": name}
                if fn is None:
                    rows.append({**row, "note": "n/a: needs CUDA + triton"})
                    continue

                def call(fn=fn, logits=logits, u=u, temperature=temperature, mask_id=mask_id):
                    return fn(logits, u, temperature, mask_token_id=mask_id)

                ms = meter.time_ms(call, reps)
                row.update(ms=ms, tok_s=n / ms * 1e3, peak=meter.peak_mib(call))
                base = base or row
                rows.append(_ratios(row, base))
    return rows


def naive_logprobs(h, W, t, bias, mask_id, temperature):
    return token_logprobs(F.linear(h, W, bias) / temperature, t, mask_id)  # [n] as the estimators do today


def bench_logprobs(meter: Meter, shapes, dtype, reps: int) -> list[dict]:
    rows = []
    fast = use_fast_path(torch.empty(0, device=meter.device)) and LP.liger_usable()
    for n, D, V in shapes:
        g = torch.Generator(device=meter.device).manual_seed(0)
        h = torch.randn(n, D, device=meter.device, generator=g).to(dtype).requires_grad_()  # [n, D]
        W = (torch.randn(V, D, device=meter.device, generator=g) / D**0.5).to(dtype).requires_grad_()  # [V, D]
        t = torch.randint(0, V - 1, (n,), device=meter.device, generator=g)  # [n]
        mask_id = V - 1
        variants = [
            ("naive", naive_logprobs),
            ("chunked torch", LP.linear_token_logprobs_torch),
            ("liger", LP.linear_token_logprobs_liger if fast else None),
        ]
        base = None
        for name, fn in variants:
            row = {"op": "logprobs fwd+bwd", "shape": f"n={n} D={D} V={V} {_dt(dtype)}", "variant": name}
            if fn is None:
                rows.append({**row, "note": "n/a: needs CUDA + liger-kernel"})
                continue

            def call(fn=fn, h=h, W=W, t=t, mask_id=mask_id):
                h.grad = W.grad = None
                fn(h, W, t, None, mask_id, 0.9).sum().backward()

            ms = meter.time_ms(call, reps)
            h.grad = W.grad = None  # the baseline holds the inputs only: the gradients a call writes count as its own
            row.update(ms=ms, tok_s=n / ms * 1e3, peak=meter.peak_mib(call))
            base = base or row
            rows.append(_ratios(row, base))
    return rows


def _dt(dtype) -> str:
    return str(dtype).replace("torch.", "")


def _ratios(row: dict, base: dict) -> dict:
    row["speed"] = base["ms"] / row["ms"]
    if row["peak"] is not None and base["peak"]:
        row["mem"] = row["peak"] / base["peak"]
    return row


def table(rows: list[dict]) -> str:
    out = [
        "| op | shape | variant | ms | tokens/s | peak extra MiB | speed vs first | memory vs first |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        if "note" in r:
            out.append(f"| {r['op']} | {r['shape']} | {r['variant']} | {r['note']} | | | | |")
            continue
        peak = "n/a" if r["peak"] is None else f"{r['peak']:.1f}"
        mem = f"{r['mem']:.2f}x" if "mem" in r else "n/a"
        out.append(
            f"| {r['op']} | {r['shape']} | {r['variant']} | {r['ms']:.2f} | {r['tok_s']:,.0f} | {peak} "
            f"| {r['speed']:.2f}x | {mem} |"
        )
    return "\n".join(out)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="run on CPU even when CUDA is available")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda" if cuda else "cpu")
    meter = Meter(device)
    if cuda:  # LLaDA-8B: V = 126464, D = 4096; rollout rows = masked positions of a block, bf16 logits
        name = torch.cuda.get_device_name(device)
        samp = bench_sampling(meter, [(32, 126464), (2048, 126464)], torch.bfloat16, reps=20)
        lps = bench_logprobs(meter, [(8192, 4096, 126464)], torch.bfloat16, reps=5)
    else:
        name = f"CPU, {torch.get_num_threads()} threads"
        LP.CHUNK_BYTES = 16 * MiB  # 128 rows per chunk at V = 32000: several chunks at these small shapes
        samp = bench_sampling(meter, [(64, 32000), (512, 32000)], torch.float32, reps=5)
        lps = bench_logprobs(meter, [(1024, 128, 32000)], torch.float32, reps=3)
    print(
        f"device: {name}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}; "
        f"command: python benchmarks/kernel_ops.py {' '.join(argv or sys.argv[1:])}".rstrip()
    )
    print()
    print(table(samp + lps))


if __name__ == "__main__":
    main()
