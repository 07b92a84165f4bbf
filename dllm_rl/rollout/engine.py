"""The rollout engine: prompts -> completions + commit trace, decided on the device.

Semi-autoregressive blocks (LLaDA arXiv 2502.09992) decoded in lockstep across the batch. Each step forwards
the slice its cache plan asks for (cache_plans.CACHE_PLANS), draws a token for every position of the active
block in one pass over its logits (kernels.choose_tokens), asks the commit rule (commit.py) how many to commit
and the ordering rule (policy.orders) which, optionally takes back low-probability commits (remask.py), and
records everything in the trace. A row whose finished blocks contain EOS stops (its later blocks are filled
with EOS).

The step is `rollout.step.Workspace.step`: static shapes and no host synchronisation, over buffers allocated
once per batch shape, so the host only enqueues work. The host looks at the device once per block (which
rows are done: finished rows leave the working set, which shrinks to the next batch bucket), plus, for the
data-dependent commit rules (threshold, factor, prophet), whether the block is finished, read from pinned
memory two steps late on a GPU so the device never waits. `rollout.compile` picks how the step runs: eager;
with the model call compiled (default / reduce-overhead / max-autotune); or `graphs`, the whole step captured
once per batch bucket and step kind as a CUDA graph (rollout.graphs) and replayed for every block and every
rollout of the run, with the weights of the moment.

Randomness comes from the caller's generator through counter-based hashing (counter_rng.py): batch-invariant.
The decisions are those of the host-driven loop this replaced (rollout.eager_loop, the tests' oracle).
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Callable

import torch

from ..batches import Decoding, RolloutBatch, Trace
from ..config import RolloutConfig
from ..counter_rng import row_seeds
from ..errors import ConfigError, DllmRlError, lookup
from ..models.base import ModelTraits, traits, unwrap
from ..policy.orders import ORDERS
from .anyprocess import generate as any_process
from .commit import COMMIT_RULES
from .graphs import CompiledSteps, CudaGraphSteps, EagerSteps, batch_bucket
from .step import Workspace, step_kind
from .trace import trace_from_buffers

PROMPT_ALIGN = 64  # rollout.compile=graphs: prompts are left-padded to a multiple of this (fewer graph shapes)

OrderPolicy = Callable[..., torch.Tensor]  # (hidden [n, Lb, D], stats, offsets [1, Lb]) -> scores [n, Lb]


def decoding(cfg: RolloutConfig) -> Decoding:
    """What a rollout with these settings records about how it decided (Trace.decoding)."""
    return Decoding(
        cfg.temperature,
        cfg.order,
        cfg.order_temperature,
        cfg.block_length or cfg.max_completion_length,
        min_p=cfg.min_p,
        repetition_penalty=cfg.repetition_penalty,
    )


def encode_prompts(tokenizer, prompts) -> list[list[int]]:
    """Prompts as chat messages (chat template applied), text, or token ids -> lists of ids."""
    out = []
    for p in prompts:
        if torch.is_tensor(p):
            out.append(p.tolist())
        elif isinstance(p, (list, tuple)) and (not p or isinstance(p[0], int)):  # ids ([]: no tokens)
            out.append(list(p))
        elif isinstance(p, (list, tuple)):  # chat messages
            text = tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False)
            out.append(tokenizer(text, add_special_tokens=False).input_ids)
        else:
            out.append(tokenizer(str(p)).input_ids)
    return out


def decode_ids(tokenizer, prompts, tr: ModelTraits) -> list[list[int]]:
    """encode_prompts for a decode: at least one prompt, and each as long as the model's logits shift (a
    shifted model, Dream, predicts a token from the position before it: an empty prompt has none)."""
    ids = encode_prompts(tokenizer, prompts)
    if not ids:
        raise ConfigError("generate() got no prompts: pass a non-empty list of prompts")
    short = [i for i, p in enumerate(ids) if len(p) < tr.logits_shift]
    if short:
        raise ConfigError(
            f"prompt {short[0]} has {len(ids[short[0]])} tokens, but this model predicts each token from the position "
            f"before it and needs at least {tr.logits_shift}: give it text, a BOS token or the chat template"
        )
    return ids


def host_loop(cfg: RolloutConfig) -> bool:
    """Whether the settings need the host-driven loop (rollout.eager_loop): TRL's min_p and repetition_penalty,
    whose token choice reads each row's canvas, are not in the static step yet."""
    return cfg.min_p != 0 or cfg.repetition_penalty != 1.0


def check_config(cfg: RolloutConfig, tr: ModelTraits, model, prompt_len: int, has_policy: bool) -> None:
    """Fail early, naming the recipe key and the fix."""
    Lc = cfg.max_completion_length
    Lb = cfg.block_length or Lc
    if Lc <= 0 or Lc % Lb:
        raise ConfigError(
            f"rollout.max_completion_length ({Lc}) is not divisible by rollout.block_length "
            f"({Lb}); choose a block length that divides it"
        )
    nb = Lc // Lb
    if cfg.steps < nb or cfg.steps % nb:
        raise ConfigError(
            f"rollout.steps ({cfg.steps}) must be a positive multiple of the number of blocks "
            f"({nb} = {Lc} / {Lb}); e.g. rollout.steps={nb * max(1, cfg.steps // nb)}"
        )
    lookup(COMMIT_RULES, cfg.commit, "rollout.commit")
    if lookup(ORDERS, cfg.order, "rollout.order").needs_hidden and not has_policy:
        raise ConfigError(
            "rollout.order=policy needs a learned policy: pass order_policy= to generate() "
            "(or use a trainer with policy enabled), or pick another rollout.order"
        )
    if cfg.temperature < 0 or not 0 < cfg.top_p <= 1 or cfg.top_k < 0 or not 0 <= cfg.min_p < 1:
        raise ConfigError(
            "rollout.temperature must be >= 0, rollout.top_p in (0, 1], rollout.top_k >= 0, rollout.min_p in [0, 1)"
        )
    if cfg.repetition_penalty <= 0:
        raise ConfigError(f"rollout.repetition_penalty must be > 0 (1 = off), got {cfg.repetition_penalty}")
    if cfg.compile == "graphs" and not tr.static_shapes:
        raise ConfigError(
            f"rollout.compile=graphs needs a native dllm_rl model (tensor cache positions); "
            f"{type(unwrap(model)).__name__} runs through its own forward: use rollout.compile=none"
        )
    if cfg.cache != "none" and not tr.supports_cache:
        raise ConfigError(
            f"{type(unwrap(model)).__name__} runs through its own forward and cannot use a KV "
            f"cache; set rollout.cache=none (or load a native dllm_rl model)"
        )
    if cfg.cache == "block":
        if tr.attention != "block_causal":
            raise ConfigError(
                "rollout.cache=block is exact only for block-causal models (block diffusion); "
                "this model attends bidirectionally: use rollout.cache=prefix or dual"
            )
        if Lb % tr.block_size:
            raise ConfigError(
                f"rollout.block_length ({Lb}) must be a multiple of the model's attention block "
                f"size ({tr.block_size}) for the exact block cache"
            )
    max_pos = getattr(unwrap(model).config, "max_position_embeddings", None)
    if max_pos and prompt_len + Lc > max_pos:
        raise DllmRlError(
            f"prompt ({prompt_len} tokens) + rollout.max_completion_length ({Lc}) exceeds the "
            f"model's context of {max_pos} positions; shorten the prompt or lower "
            f"rollout.max_completion_length"
        )


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts,
    cfg: RolloutConfig,
    generator: torch.Generator | None = None,
    order_policy: OrderPolicy | None = None,
    record_states: bool = False,
    edit_policy=None,
) -> RolloutBatch:
    """Decode a batch of prompts (chat messages, text, or ids) into completions with a full commit trace.

    Args:
        model: a diffusion LM following models.base's protocol (tiny, LLaDA, Dream, or the HF wrapper).
        tokenizer: its tokenizer (chat template, pad/eos/mask tokens).
        prompts: list of prompts of any lengths.
        cfg: the `rollout:` section of a recipe.
        generator: the only source of randomness (same prompt + same generator state = same completion; None: one
            draw from torch's global generator).
        order_policy: the learned unmasking policy (policy.OrderHead) for rules that need one (rollout.order=policy).
        record_states: also return every intermediate completion canvas (stats["states"]; for tests).
        edit_policy: the edit head (policy.EditHead) of any-process decoding (rollout.edit: remask | any).
    """
    if cfg.edit != "none":  # any-process decoding: remask / insert / delete decided by the edit head
        return any_process(model, tokenizer, prompts, cfg, generator, order_policy, record_states, edit_policy)
    if host_loop(cfg):
        from .eager_loop import generate_host_loop  # imports this module: at call time

        return generate_host_loop(model, tokenizer, prompts, cfg, generator, order_policy, record_states)
    tr = traits(model, tokenizer)
    ids = decode_ids(tokenizer, prompts, tr)
    P = max(len(p) for p in ids)
    check_config(cfg, tr, model, P, order_policy is not None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    ws, run, bucket = _workspace(model, tr, cfg, len(ids), P, order_policy)
    ws.load(ids, row_seeds(ids, generator), pad_id)
    stats = {"forwards": 0, "query_tokens": 0}
    states: list[list[torch.Tensor]] | None = [[] for _ in ids] if record_states else None
    eos = tokenizer.eos_token_id
    nb = ws.Lc // ws.Lb
    was_training = model.training
    model.eval()
    t0, captured = time.perf_counter(), run.seconds
    try:
        prev_bs = 0
        for b in range(nb):
            bs = ws.P + b * ws.Lb
            ws.start_block(b)
            _decode_block(ws, run, cfg, tr, bs, prev_bs, stats, states)
            if cfg.stop_at_eos and eos is not None:
                ws.stop_rows(eos)
                _record(ws, states, replace_last=True)
            prev_bs = bs
            if b + 1 < nb and not _next_rows(ws, bucket):
                break
    finally:
        model.train(was_training)
    stats["seconds"] = time.perf_counter() - t0
    stats["compile_seconds"] = run.seconds - captured  # graphs captured / steps compiled by this call
    return _finish(ws, ids, tokenizer, cfg, stats, states)


def _decode_block(ws: Workspace, run, cfg, tr, bs: int, prev_bs: int, stats: dict, states) -> None:
    """The steps of one block: a fixed count for top_k (no host look at all), else until the block is done."""
    kinds = [step_kind(cfg, tr, ws.L, bs, prev_bs, first) for first in (True, False)]
    if cfg.commit == "top_k":
        limit, pending = ws.spb, None  # top_k finishes every row's block in exactly its steps
    else:
        limit, pending = ws.S // (ws.Lc // ws.Lb), _Pending(ws.pending)
    for j in range(limit):
        kind = kinds[min(j, 1)]
        run(kind)
        stats["forwards"] += 1
        stats["query_tokens"] += ws.n * kind.length
        _record(ws, states)
        if pending is not None and not pending.after_step(j + 1):
            return


class _Pending:
    """Whether any row still has masked positions in the block, read by the host without stalling the device.

    On CUDA each step's flag is copied to pinned memory and read `lag` steps later: the device always has
    steps queued, and the steps enqueued after the block finished are exact no-ops (nothing is masked, so
    nothing is committed or counted). Elsewhere the flag is read at once."""

    def __init__(self, flag: torch.Tensor, lag: int = 2):
        self.flag, self.lag = flag, lag
        if flag.is_cuda:
            self.host = torch.zeros(lag + 1, dtype=torch.bool, pin_memory=True)
            self.events = [torch.cuda.Event() for _ in range(lag + 1)]

    def after_step(self, n: int) -> bool:
        if not self.flag.is_cuda:
            return bool(self.flag)
        i = n % (self.lag + 1)
        self.host[i].copy_(self.flag, non_blocking=True)
        self.events[i].record()
        if n <= self.lag:
            return True
        j = (n - self.lag) % (self.lag + 1)
        self.events[j].synchronize()  # the step `lag` steps back: the device has `lag` steps queued meanwhile
        return bool(self.host[j])


def _next_rows(ws: Workspace, bucket: Callable[[int], int]) -> bool:
    """The host's one look per block: False when every row is done; else rows that finished leave the
    working set when the live ones fit a smaller bucket (done rows fill it up)."""
    done = ws.done.tolist()
    live = [i for i, d in enumerate(done) if not d]
    if not live:
        return False
    n = bucket(len(live))
    if n < ws.n:
        ws.compact(live + [i for i, d in enumerate(done) if d][: n - len(live)], n)
    return True


def _record(ws: Workspace, states, replace_last: bool = False) -> None:
    """record_states: the completion canvas of each row that moved (debugging and tests only: reads the device)."""
    if states is None:
        return
    moved, rows, comp = ws.active.tolist(), ws.row_id.tolist(), ws.x[:, ws.P :].cpu()
    for i, (m, r) in enumerate(zip(moved, rows)):
        if m and r < len(states):
            if replace_last:
                states[r][-1] = comp[i].clone()
            else:
                states[r].append(comp[i].clone())


# ------------------------------------------------------------------------------------- how steps run

_COMPILED: dict[str, tuple[torch.nn.Module, torch.nn.Module]] = {}  # mode -> (model, its compiled wrapper)
_GRAPHS: dict[str, tuple] = {}  # "last" -> (key, model, workspace, runner): compile=graphs keeps one shape


def _compiled(model, mode: str):
    """The model call the step uses: the model itself, or (rollout.compile default / reduce-overhead /
    max-autotune) a torch.compile wrapper of it, reused while the same model decodes (one entry per mode: a
    wrapper holds its model, so a cache keyed by every model would keep them all alive). The wrapper shares
    the parameters, so training updates are seen, while training forwards stay eager. Dynamic shapes: the
    query length differs between step kinds and the working set shrinks as rows finish."""
    if mode in ("none", "graphs"):
        return model
    hit = _COMPILED.get(mode)
    if hit is None or hit[0] is not model:
        hit = _COMPILED[mode] = (model, torch.compile(model, mode=None if mode == "default" else mode, dynamic=True))
    return hit[1]


def _workspace(model, tr: ModelTraits, cfg: RolloutConfig, N: int, P: int, order_policy):
    """(workspace, step runner, batch bucket function) for a batch of N prompts of length <= P.

    Eager and model-compiled modes allocate a workspace per call, sized to the batch (the bucket of n live
    rows is n). compile=graphs keeps the last workspace and its graphs while the shape, the settings, the
    model and its parameters' storage stay the same (optimizer steps update parameters in place; anything
    that moves them, such as a ZeRO-3 gather or `model.to()`, means a new capture)."""
    if cfg.compile != "graphs":
        ws = Workspace(model, tr, cfg, N, P, order_policy, forward=_compiled(model, cfg.compile))
        if ws.cache is not None and cfg.compile != "none":
            ws.cache.mark_static()
        return ws, EagerSteps(ws), lambda n: n
    capacity, P = batch_bucket(N), -(-P // PROMPT_ALIGN) * PROMPT_ALIGN
    params = [*model.parameters(), *(order_policy.parameters() if hasattr(order_policy, "parameters") else ())]
    key = (capacity, P, repr(replace(cfg, batch_size=0)), id(order_policy), tuple(p.data_ptr() for p in params))
    hit = _GRAPHS.get("last")
    if hit is None or hit[0] != key or hit[1] is not model:
        _GRAPHS.pop("last", None)  # free the previous shape's buffers and graphs first
        ws = Workspace(model, tr, cfg, capacity, P, order_policy)
        cuda = ws.device.type == "cuda"
        if cuda:
            run = CudaGraphSteps(ws, cfg.compile_backend)
        elif cfg.compile_backend == "none":  # the replayed step's buckets and shapes, run eagerly (tests)
            run = EagerSteps(ws)
        else:
            run = CompiledSteps(ws, cfg.compile_backend)
        hit = _GRAPHS["last"] = (key, model, ws, run)
    return hit[2], hit[3], batch_bucket


def _finish(ws: Workspace, ids: list[list[int]], tokenizer, cfg, stats: dict, states) -> RolloutBatch:
    ws.save_rows()
    N, P = len(ids), max(len(p) for p in ids)
    trace = trace_from_buffers(
        ws.trace,
        ws.final_step[:N],
        ws.P,
        ws.Lc,
        ws.tr.mask_token_id,
        tokenizer.eos_token_id,
        decoding(cfg),
        remasks=cfg.self_correction,
    )
    x = ws.final[:N].clone()  # the workspace may be reused by the next rollout
    prompt_mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in ids], device=x.device)
    # prompts come back left-padded to the longest (compile=graphs pads further, to PROMPT_ALIGN)
    return finish_batch(x[:, ws.P - P : ws.P], prompt_mask, x[:, ws.P :], tokenizer, trace, stats, states)


def finish_batch(prompt_ids, prompt_mask, comp, tokenizer, trace: Trace, stats: dict, states) -> RolloutBatch:
    """The RolloutBatch of decoded canvases: completion masks (up to and including the first EOS) and texts."""
    eos = tokenizer.eos_token_id
    if eos is not None:
        is_eos = (comp == eos).long()
        completion_mask = ((is_eos.cumsum(-1) - is_eos) == 0).long()  # up to and including the first EOS
        text_mask = completion_mask.bool() & ~is_eos.bool()
    else:
        completion_mask = torch.ones_like(comp)
        text_mask = completion_mask.bool()
    texts = [
        tokenizer.decode(row[keep].tolist(), skip_special_tokens=True) for row, keep in zip(comp.cpu(), text_mask.cpu())
    ]
    stats["committed_tokens"] = int((trace.commit_step >= 0).sum())
    if states is not None:
        stats["states"] = states
    return RolloutBatch(
        prompt_ids=prompt_ids,
        prompt_mask=prompt_mask,
        completion_ids=comp,
        completion_mask=completion_mask,
        completions=texts,
        trace=trace,
        stats=stats,
    )
