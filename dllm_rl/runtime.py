"""Process setup: the accelerate/DeepSpeed engine, threads, ranks, and the per-step torch.Generator.

The step generator is the only source of randomness for a training step: it derives from the recipe seed
and the step (and a stream id) in one place, so a resumed run draws exactly what the uninterrupted run drew.

Several processes (torchrun, `deepspeed`, `accelerate launch`) split each step's global batch: rank r takes
rows [r*b, (r+1)*b) of the world*b examples one process would take, and the trainers draw noise for the
global batch and slice it, so N processes with batch b follow the run of one process with batch N*b.
ZeRO-3 helpers (TRL's unwrap_model_for_generation and prepare_deepspeed patterns) live here too.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os

import torch

from .config import Recipe
from .errors import ConfigError
from .validate import read_deepspeed_json

STREAMS = {"data": 0, "noise": 1, "rollout": 2, "eval": 3, "greedy": 4}


def step_generator(
    seed: int, step: int, stream: str = "noise", device: str | torch.device = "cpu", rank: int = 0
) -> torch.Generator:
    """A generator seeded from (seed, step, stream, rank) by hashing: independent across all four."""
    key = f"{seed}:{step}:{STREAMS[stream]}:{rank}".encode()
    g = torch.Generator(device=device)
    g.manual_seed(int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1))
    return g


def micro_batch_rows(n: int, group: int, accumulation: int) -> list[torch.Tensor]:
    """Row indices of the micro-batches of a step's n rows: `accumulation` parts of whole groups each."""
    per = max(n // group // accumulation * group, group)
    return [torch.arange(start, min(start + per, n)) for start in range(0, n, per)]


def micro_batch_size(recipe: Recipe) -> int:
    """Rows per forward/backward on one process: train.batch_size / gradient_accumulation_steps sequences for
    SFT (and consensus, which trains as SFT does), times grpo.num_generations completions (whole groups) for GRPO,
    times 2 (chosen and rejected) for DPO."""
    group = {"grpo": recipe.grpo.num_generations, "dpo": 2}.get(recipe.algorithm, 1)
    return len(micro_batch_rows(recipe.train.batch_size * group, group, recipe.train.gradient_accumulation_steps)[0])


def advance_schedule(scheduler, steps: int = 1) -> None:
    """Advance the learning-rate schedule by `steps` optimizer steps that had nothing to train (a step that kept
    no sample), so the schedule keeps its pace with train.max_steps; without torch's warning that a scheduler
    stepped before its optimizer, which is intended here."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", r"Detected call of `lr_scheduler\.step\(\)` before", UserWarning)
        for _ in range(steps):
            scheduler.step()


def make_optimizer(params, cfg) -> torch.optim.Optimizer:
    """optim.name: AdamW (the default, as TRL) or plain SGD. SGD's step is proportional to the gradient, which
    matters when the useful step is shorter than one Adam step (Adam moves every parameter by ~lr whatever
    its gradient; benchmarks/ascent.py measures how long a step can be before the reward falls)."""
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay)


def set_threads(n: int) -> None:
    if n > 0:
        torch.set_num_threads(n)


def make_accelerator(recipe: Recipe):
    """An accelerate.Accelerator for the recipe: mixed precision, trackers, and DeepSpeed when configured
    (its train_micro_batch_size_per_gpu is `micro_batch_size(recipe)`)."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    t = recipe.train
    kwargs: dict = {
        "mixed_precision": t.mixed_precision,
        "project_dir": t.output_dir,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
    }
    if trackers := check_trackers(t.report_to):
        kwargs["log_with"] = trackers
    handlers = []
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if "LOCAL_RANK" in os.environ and not torch.cuda.is_available():  # started by a launcher, no GPU
        # accelerate picks no backend on its own and would run each process alone (accelerate 1.16 on CPU):
        # DeepSpeed needs gloo named explicitly (cpu=True would drop DeepSpeed), plain data parallelism needs
        # cpu=True (DDP over gloo)
        if t.deepspeed:
            handlers.append(InitProcessGroupKwargs(backend="gloo"))
        else:
            kwargs["cpu"] = True
    if t.deepspeed:
        if "LOCAL_RANK" not in os.environ:  # else DeepSpeed falls back to MPI discovery and fails obscurely
            raise ConfigError(
                "train.deepspeed needs processes started by a launcher: `deepspeed --num_gpus N "
                "--module dllm_rl train RECIPE`, `torchrun --nproc_per_node N -m dllm_rl train "
                "RECIPE` or `accelerate launch --use_deepspeed --num_processes N -m dllm_rl train "
                "RECIPE`; for one plain process set train.deepspeed=null"
            )
        kwargs["deepspeed_plugin"] = deepspeed_plugin(recipe, micro_batch_size(recipe), world)
    return Accelerator(kwargs_handlers=handlers, **kwargs)


EXTRAS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # tracker -> the dllm-rl extra that installs it


def check_trackers(report_to: list[str]) -> list[str]:
    """train.report_to as accelerate's log_with, each tracker checked: accelerate drops a tracker whose package is
    missing without a word (accelerate.tracking.filter_trackers), so a run would log nothing where asked to."""
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, filter_trackers

    names = [n for n in report_to if n not in ("none", "None")]
    for name in names:
        if name != "all" and name not in LOGGER_TYPE_TO_CLASS:
            raise ConfigError(
                f"train.report_to: unknown tracker {name!r}; accelerate's trackers: {sorted(LOGGER_TYPE_TO_CLASS)}"
            )
    available = {str(getattr(t, "value", t)) for t in filter_trackers(names, logging_dir=".")}
    if missing := [n for n in names if n != "all" and n not in available]:
        hint = " ".join(f"dllm-rl[{EXTRAS[n]}]" if n in EXTRAS else n for n in missing)
        raise ConfigError(
            f"train.report_to: {missing} cannot start: not installed; pip install {hint} (or drop it from "
            f"train.report_to)"
        )
    return names


def deepspeed_plugin(recipe: Recipe, micro_batch_size: int, world: int):
    """accelerate's DeepSpeedPlugin for train.deepspeed, with the fields the recipe decides filled in.

    Our loop has no DataLoader for accelerate to read batch sizes from, so "auto" batch fields are filled here
    (train_batch_size = micro * accumulation * world) and a number that contradicts the recipe is an error.
    gradient_clipping comes from optim.max_grad_norm (accelerate would put 1.0); bf16/fp16 "auto" and the
    hidden-size buckets are left for accelerate. Under ZeRO-3, transformers loads model.path already sharded
    (zero.Init) once the accelerator exists; a model built from scratch is sharded by deepspeed.initialize.
    """
    from accelerate.utils import DeepSpeedPlugin

    t = recipe.train
    if not os.path.isfile(t.deepspeed):
        raise ConfigError(
            f"train.deepspeed: {t.deepspeed!r} does not exist; point it at a DeepSpeed JSON "
            f"such as recipes/deepspeed/zero2.json"
        )
    config = read_deepspeed_json(t.deepspeed)
    decided = {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": micro_batch_size * t.gradient_accumulation_steps * world,
        "gradient_clipping": recipe.optim.max_grad_norm,
    }
    for key, value in decided.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise ConfigError(
                f"{t.deepspeed}: {key} is {config[key]} but the recipe gives {value} "
                f"(train.batch_size, train.gradient_accumulation_steps, optim.max_grad_norm, {world} "
                f'processes); set it to "auto" in the JSON'
            )
    return DeepSpeedPlugin(hf_ds_config=config)


def zero_stage(accelerator) -> int | None:
    """The ZeRO stage the accelerator runs (None without DeepSpeed)."""
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    return None if plugin is None else plugin.zero_stage


@contextlib.contextmanager
def generation_model(accelerator, model):
    """The bare model to decode with: no DDP / DeepSpeed wrapper, whose forward may talk to other ranks.

    Under ZeRO-3 the sharded parameters are gathered once for the whole block, and ZeRO's per-module hooks are
    lifted meanwhile: left in place they release a module's parameters after each forward, so every
    denoising step would gather the whole model again (TRL's unwrap_model_for_generation does the same).
    """
    bare = accelerator.unwrap_model(model)
    if zero_stage(accelerator) != 3:
        yield bare
        return
    import deepspeed

    offload = getattr(model.optimizer, "parameter_offload", model.optimizer)
    # parameters the last backward left prefetched (in flight) would be skipped by the gather below and
    # fetched later outside any hook: release everything first so that one gather covers every parameter
    model.empty_partition_cache()
    with deepspeed.zero.GatheredParameters(list(model.parameters())):
        for p in bare.parameters():
            p.ds_active_sub_modules.clear()
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield bare
        finally:
            offload._register_deepspeed_module(offload.module)  # hooks back; it also drops the stale trace


def prepare_frozen(accelerator, module: torch.nn.Module):
    """A frozen model (the GRPO reference) placed like the policy: sharded under ZeRO-3, whole on every rank
    otherwise (cast by DeepSpeed's bf16/fp16 settings as the policy is). TRL's prepare_deepspeed, without
    the optimizer sections a model with no optimizer must not carry."""
    if zero_stage(accelerator) is None:
        return module.to(accelerator.device)
    import deepspeed

    config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)
    for key in ("optimizer", "scheduler"):
        config.pop(key, None)
    config["zero_optimization"].pop("offload_optimizer", None)
    if config["zero_optimization"]["stage"] != 3:
        config["zero_optimization"]["stage"] = 0
    engine, *_ = deepspeed.initialize(model=module, config=config)
    engine.eval()  # (DeepSpeedEngine.eval returns None)
    return engine


class WholeState:
    """A module as accelerate checkpoints it (register_for_checkpointing): its whole tensors. Under ZeRO-3 a
    module prepared by `prepare_frozen` keeps empty placeholders, so its own state_dict saves nothing and loading
    it restores nothing; this one gathers the parameters to save them, and writes them back through the same
    gather (every rank loads the same file: rank 0's values are kept). accelerate calls both on every rank."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def _gathered(self, **kw):
        params = [p for p in self.module.parameters() if hasattr(p, "ds_id")]
        if not params:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, **kw)

    def state_dict(self) -> dict:
        with self._gathered():
            return {k: v.detach().clone().cpu() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict) -> None:
        with self._gathered(modifier_rank=0):
            self.module.load_state_dict(state)


def gather_rows(accelerator, tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `tensor`, concatenated in rank order (the tensor itself with one process)."""
    if accelerator.num_processes == 1:
        return tensor
    return accelerator.gather(tensor.to(accelerator.device)).to(tensor.device)


def processes_with_non_finite(accelerator, loss: torch.Tensor) -> int:
    """How many processes hold a non-finite `loss`, decided together: one rank raising alone would leave the
    others waiting in the gradient all-reduce. Trainers call it before backward so that an inf/NaN step never
    reaches the weights (one such step silently turns every later checkpoint into garbage)."""
    bad = torch.tensor([0.0 if torch.isfinite(loss).all() else 1.0], device=loss.device)
    if accelerator.num_processes > 1:
        bad = accelerator.reduce(bad, reduction="sum")
    return int(bad.item())


def shutdown() -> None:
    """End the process group, if any, once every rank is done. Left to interpreter exit, gloo can abort
    with SIGABRT ("terminate called without an active exception"; seen with torch 2.13 on CPU)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class EpochSampler:
    """Example indices for step s: a fresh seeded permutation per epoch, so any step is reproducible; with
    shuffle=False (TRL's shuffle_dataset=False) the dataset's own order, epoch after epoch."""

    def __init__(self, n: int, seed: int, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self._perms = n, seed, shuffle, {}

    def indices(self, step: int, batch: int, rank: int = 0, world: int = 1) -> list[int]:
        """`batch` indices for `rank`: its slice of the world*batch indices one process would draw."""
        out = []
        start = step * batch * world + rank * batch
        for pos in range(start, start + batch):
            epoch = pos // self.n
            if epoch not in self._perms:
                g = step_generator(self.seed, epoch, "data")
                self._perms = {epoch: torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)}
            out.append(int(self._perms[epoch][pos % self.n]))
        return out
