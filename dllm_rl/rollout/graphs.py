"""How the engine runs its denoising step (rollout.step.Workspace.step): eagerly, traced by torch.compile, or
captured as CUDA graphs.

At small batch a GPU decoding step is launch-bound: ~1,600 kernels per step of an 8B model, each costing the
host more than the device. A CUDA graph replays the kernels of a whole step in one launch. The step is a
function of the workspace's buffers only (static shapes per batch bucket and step kind, positions as data),
so one graph per (bucket, kind) is captured the first time it is needed and replayed for every block of
every rollout while the workspace lives (rollout.engine keeps it across rollouts of the same shape).
Parameters are read where they are: an optimizer step updates them in place and the next replay uses the new
weights.

Capture follows the CUDA-graphs recipe of torch.cuda.graph: two warm-up runs on a side stream (Triton JIT,
cuBLAS workspaces, the SDPA kernel choice happen there; the warm-ups' writes are undone from a snapshot), then
the capture, which records without running. All graphs share one memory pool: a step's intermediates die
inside the step, and its results are written into the workspace, so the graphs never read each other's pool
memory. The step may first be traced by torch.compile (rollout.compile_backend, e.g. inductor, which fuses
the elementwise chains of the sampler and the counter-based noise) with inductor's own CUDA graphs off (they
cannot nest inside an outer capture; Diffulex SJTU-DENG-Lab/Diffulex does the same).

Without CUDA, `CompiledSteps` traces the step with torch.compile(fullgraph=True): the check that it is one
graph (no break, no recompile across blocks), and with inductor a CPU speed-up.
"""

from __future__ import annotations

import time

import torch

from .step import StepKind, Workspace


def batch_bucket(n: int) -> int:
    """The working-set size for n live rows: the smallest of 1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, ...
    that holds them (at most a third of the rows are padding; few graphs)."""
    p = 1
    while p < n:
        if p >= 2 and p * 3 // 2 >= n:
            return p * 3 // 2
        p *= 2
    return p


class EagerSteps:
    """The step as Python runs it (the model call may itself be compiled: rollout.compile default and friends)."""

    seconds = 0.0  # capture / compile time

    def __init__(self, ws: Workspace):
        self.ws = ws

    def __call__(self, kind: StepKind) -> None:
        self.ws.step(kind)


def _compile(ws: Workspace, backend: str, cuda: bool):
    options = {"triton.cudagraphs": False} if backend == "inductor" and cuda else None
    return torch.compile(ws.step, fullgraph=True, dynamic=False, backend=backend, options=options)


class CompiledSteps:
    """torch.compile(fullgraph=True, dynamic=False) of the step: one graph per (working rows, kind); a graph
    break raises. `seconds`: compile time so far."""

    def __init__(self, ws: Workspace, backend: str = "auto"):
        self.ws = ws
        self.fn = _compile(ws, "inductor" if backend == "auto" else backend, cuda=False)
        self.seen: set = set()
        self.seconds = 0.0

    def __call__(self, kind: StepKind) -> None:
        key = (self.ws.n, kind)
        if key in self.seen:
            with torch._dynamo.config.patch(recompile_limit=256):
                self.fn(kind)
            return
        t0 = time.perf_counter()
        with torch._dynamo.config.patch(recompile_limit=256):
            self.fn(kind)
        self.seconds += time.perf_counter() - t0
        self.seen.add(key)


class CudaGraphSteps:
    """One CUDA graph per (working rows, kind), captured on first use; `seconds`: capture time so far."""

    def __init__(self, ws: Workspace, backend: str = "auto"):
        self.ws = ws
        self.step = ws.step if backend in ("auto", "none") else _compile(ws, backend, cuda=True)
        self.graphs: dict[tuple[int, StepKind], torch.cuda.CUDAGraph] = {}
        self.pool = torch.cuda.graph_pool_handle()
        self.seconds = 0.0

    def __call__(self, kind: StepKind) -> None:
        key = (self.ws.n, kind)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self.capture(kind)
        graph.replay()

    def capture(self, kind: StepKind) -> torch.cuda.CUDAGraph:
        t0 = time.perf_counter()
        saved = self.ws.snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.step(kind)
                self.ws.restore(saved)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):  # records the step's kernels without running them
            self.step(kind)
        torch.cuda.synchronize()
        self.seconds += time.perf_counter() - t0
        return graph
