"""CPU proxies of what a decoding step costs on a GPU: kernel launches, host synchronisations, graph breaks.

A GPU decoding step at small batch is bound by the host: every kernel launch costs microseconds of Python
and driver time, and every host synchronisation (`.item()`, `bool(t)`, a boolean index, `.cpu()`) makes the
host wait for the device to drain, after which the device waits for the host. None of this can be timed
without a GPU, but all of it can be counted on CPU:

- `OpCounter`: every aten op that reaches the dispatcher below autograd (a `TorchDispatchMode`); `kernels`
  leaves out the ops that only make views or read metadata, which launch nothing on CUDA. On the H200 the
  count for today's engine landed within 2% of the profiler's cudaLaunchKernel count per step.
- `SyncCounter`: the ops that would block the host if the tensors lived on CUDA. Two layers are needed: at
  dispatch, `_local_scalar_dense` (`.item()`, `bool(t)`, `int(t)`, `if t:`), `nonzero` (also `x[bool_mask]`
  and `x[bool_mask] = v`), `masked_select`, `unique`, `repeat_interleave` of a tensor without
  `output_size`, `equal`, `bincount`; and at the Python level (a `TorchFunctionMode`), `.tolist()`, `.cpu()`,
  `.to("cpu")` and `.numpy()`, which reach no aten op when the tensor is already on CPU. `sites` says where
  each one happened (file:line of the first frame outside torch).
- `graph_breaks(fn, *args)`: `torch._dynamo.explain` of a function: how many graphs it compiles into and why
  it breaks (a decoding step must compile into one graph to be captured as one CUDA graph).

Host-to-device copies from pageable memory (`torch.tensor(list, device=...)`, `cpu_tensor.to("cuda")`) do
not synchronise but cannot be captured in a CUDA graph either; they are invisible here. On a GPU,
`torch.cuda.set_sync_debug_mode("error")` is the ground truth for synchronisation (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

NO_KERNEL = {  # aten ops that only make views or read metadata: no CUDA kernel
    "view",
    "_unsafe_view",
    "as_strided",
    "expand",
    "t",
    "transpose",
    "permute",
    "unsqueeze",
    "squeeze",
    "slice",
    "select",
    "alias",
    "detach",
    "split",
    "split_with_sizes",
    "unbind",
    "_reshape_alias",
    "lift_fresh",
    "empty",
    "empty_strided",
    "unflatten",
    "narrow",
    "diagonal",
    "view_as_real",
    "view_as_complex",
    "sym_size",
    "sym_stride",
    "sym_numel",
    "sym_storage_offset",
    "is_same_size",
    "_has_compatible_shallow_copy_type",
    "result_type",
}
ALWAYS_SYNC = {
    "_local_scalar_dense",
    "nonzero",
    "masked_select",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "is_nonzero",
    "equal",
    "allclose",
    "bincount",
    "histc",
}
D2H_METHODS = {"tolist", "cpu", "numpy"}


def _site() -> str:
    """file:line of the innermost frame outside torch and this module."""
    for frame in reversed(traceback.extract_stack()[:-2]):
        if "/torch/" not in frame.filename and not frame.filename.endswith("cost_proxies.py"):
            return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno}"
    return "?"


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as c: ...`; then `c.kernels` (ops that launch a kernel), `c.total`, `c.ops` (name -> n)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def kernels(self) -> int:
        return sum(n for name, n in self.ops.items() if name not in NO_KERNEL)


class _SyncDispatch(TorchDispatchMode):
    def __init__(self, owner: SyncCounter):
        super().__init__()
        self.owner = owner

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name, kwargs = func.overloadpacket.__name__, kwargs or {}
        hit = name in ALWAYS_SYNC
        if name == "repeat_interleave":  # a tensor of repeats: the output length is read on the host
            hit = (
                torch.is_tensor(args[0])
                and kwargs.get("output_size") is None
                and (len(args) == 1 or torch.is_tensor(args[1]))
            )
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_"):  # boolean indices: nonzero
            hit = any(t is not None and t.dtype in (torch.bool, torch.uint8) for t in args[1])
        if hit:
            self.owner.hit(name)
        return func(*args, **kwargs)


def _to_cpu(args, kwargs) -> bool:
    for a in [*args[1:], kwargs.get("device")]:
        if isinstance(a, (str, torch.device)) and torch.device(a).type == "cpu":
            return True
    return False


class SyncCounter(TorchFunctionMode):
    """`with SyncCounter() as s: ...`; then `s.total`, `s.hits` (op -> n) and `s.sites` ("op @ file:line" -> n)."""

    def __init__(self):
        super().__init__()
        self.hits: Counter[str] = Counter()
        self.sites: Counter[str] = Counter()
        self._dispatch = _SyncDispatch(self)

    def hit(self, name: str) -> None:
        self.hits[name] += 1
        self.sites[f"{name} @ {_site()}"] += 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in D2H_METHODS or (name == "to" and _to_cpu(args, kwargs)):
            self.hit(name)
        return func(*args, **kwargs)

    def __enter__(self):
        super().__enter__()
        self._dispatch.__enter__()
        return self

    def __exit__(self, *exc):
        self._dispatch.__exit__(*exc)
        return super().__exit__(*exc)

    @property
    def total(self) -> int:
        return sum(self.hits.values())


def graph_breaks(fn, *args, **kwargs) -> tuple[int, list[str]]:
    """(graph breaks, their reasons) of `fn(*args, **kwargs)` under TorchDynamo (the function runs once)."""
    import torch._dynamo

    torch._dynamo.reset()
    out = torch._dynamo.explain(fn)(*args, **kwargs)
    reasons = [f"{r.reason} @ {_frame(r)}" for r in out.break_reasons]
    torch._dynamo.reset()
    return out.graph_break_count, reasons


def _frame(reason) -> str:
    stack = getattr(reason, "user_stack", None) or []
    if not stack:
        return "?"
    f = stack[-1]
    return f"{f.filename.rsplit('/', 1)[-1]}:{f.lineno}"
