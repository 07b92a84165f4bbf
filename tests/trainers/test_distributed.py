"""Data parallelism through real DeepSpeed engines (ZeRO-2 and ZeRO-3, not DDP): two CPU processes over gloo
follow the single-process run with the doubled batch, for SFT (under ZeRO-3 across a resume: a second launch
continues from the first one's checkpoint) and for GRPO (frozen reference, two inner iterations,
batch-scaled rewards). Under ZeRO-3 a rollout gathers the policy's parameters once, whatever its number of
forwards. Plain DDP (no train.deepspeed) is checked once too.

Why equality is expected: rank r takes rows [r*b, (r+1)*b) of the 2b examples one process takes
(runtime.EpochSampler); noise is drawn for the global batch and sliced; rollouts use one generator on every
rank and are batch-invariant; GRPO advantages come from the gathered rewards; DeepSpeed (or DDP) averages the
ranks' gradients, and every loss here is a mean over rows. What is left is the order of float reductions.

Each launch costs about 20-40 s warm on 2 cores (process start and imports dominate); the first DeepSpeed
launch on a machine JIT-builds the shm_comm op (45-110 s) into ~/.cache/torch_extensions.
"""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from dllm_rl.config import recipe_from_dict
from dllm_rl.errors import ConfigError
from dllm_rl.runtime import EpochSampler, deepspeed_plugin

ROOT = Path(__file__).resolve().parents[2]
ZERO = {stage: str(ROOT / f"recipes/deepspeed/zero{stage}.json") for stage in (2, 3)}
PER_RANK = 4  # SFT sequences per rank and step; GRPO uses PER_RANK // 2 prompts
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed (pip install -e '.[deepspeed]')"
)

SFT = {
    "algorithm": "sft",
    "model": {
        "tiny": {
            "hidden_size": 32,
            "num_layers": 2,
            "num_heads": 2,
            "intermediate_size": 64,
            "max_position_embeddings": 64,
        }
    },
    "data": {"task": "sudoku", "train_size": 256, "eval_size": 4},
    "rollout": {"max_completion_length": 20, "steps": 10},
    "optim": {"lr": 3e-3, "lr_scheduler": "constant"},
    "train": {"max_steps": 4, "logging_steps": 1, "eval_steps": 0, "save_steps": 2},
    "eval": {"size": 4},
}
GRPO = {
    "algorithm": "grpo",
    "model": {"path": str(ROOT / "checkpoints/tiny/sudoku-sft")},
    "data": {
        "task": "sudoku",
        "train_size": 64,
        "eval_size": 4,
        "seed": 1,
        "options": {"min_empty": 10, "max_empty": 12},
    },
    "rollout": {"max_completion_length": 20, "steps": 10, "temperature": 1.0},
    "grpo": {"num_generations": 4, "num_iterations": 2, "beta": 0.04, "scale_rewards": "batch"},
    "estimator": {"name": "one_step"},
    "rewards": [{"name": "sudoku_cells"}],
    "optim": {"lr": 1e-4, "lr_scheduler": "constant"},
    "train": {"max_steps": 2, "logging_steps": 1, "eval_steps": 0, "save_steps": 0},
    "eval": {"size": 4},
}

GRPO_KEYS = ["reward", "reward_std", "accuracy", "loss", "kl", "clip_fraction", "grad_norm"]
START = ROOT / "checkpoints/tiny/sudoku-sft/final/model.safetensors"

# Runs the CLI in each process and counts ZeRO's all-gathers (calls and gathered elements) during every
# rollout and every update of the GRPO trainer; writes them to OUT.rank<R>.json.
COUNTING_LAUNCH = """
import json, os, sys
from dllm_rl.trainers.grpo import GRPOTrainer

tally, phases = {"calls": 0, "numel": 0}, {"rollout": [], "update": []}


def counted(fn, numel):
    def call(*args, **kwargs):
        tally["calls"] += 1
        tally["numel"] += numel(*args, **kwargs)
        return fn(*args, **kwargs)
    return call


def install():
    import deepspeed.comm.comm as dc
    if getattr(dc.cdb, "_counted", False):
        return
    dc.cdb.all_gather_into_tensor = counted(dc.cdb.all_gather_into_tensor,
                                            lambda *a, **k: k.get("output_tensor", a[0] if a else None).numel())
    dc.cdb.all_gather = counted(dc.cdb.all_gather,
                                lambda *a, **k: sum(t.numel() for t in k.get("tensor_list", a[0] if a else [])))
    dc.cdb._counted = True


def phase(name, method):
    def run(self, *args):
        install()
        before = dict(tally)
        out = method(self, *args)
        row = {k: tally[k] - before[k] for k in tally}
        row["model_numel"] = sum(p.ds_numel for p in self.model.parameters())
        if name == "rollout":
            row["forwards"] = out[0].stats["forwards"]
        phases[name].append(row)
        return out
    return run


GRPOTrainer.rollout = phase("rollout", GRPOTrainer.rollout)
GRPOTrainer.update = phase("update", GRPOTrainer.update)
from dllm_rl.cli import main
code = main(sys.argv[2:])
with open(f"{sys.argv[1]}.rank{os.environ['RANK']}.json", "w") as f:
    json.dump(phases, f)
sys.exit(code)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(launcher: str, args: list[str], tmp_path: Path) -> str:
    """Start 2 processes with `launcher` (torchrun | deepspeed | accelerate) running `args`; return stdout."""
    port = str(free_port())
    prefix = {
        "torchrun": ["torch.distributed.run", "--nproc_per_node", "2", "--master_port", port],
        "deepspeed": ["deepspeed.launcher.runner", "--num_gpus", "2", "--master_port", port],
        "accelerate": [
            "accelerate.commands.launch",
            "--use_deepspeed",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            port,
        ],
    }[launcher]
    if args[0] == "-m" and launcher == "deepspeed":
        args = ["--module", *args[1:]]
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    out = subprocess.run(
        [sys.executable, "-m", *prefix, *args],
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, (out.stdout[-3000:], out.stderr[-6000:])
    return out.stdout + out.stderr


def write_recipe(tmp_path: Path, base: dict, name: str, **train) -> Path:
    data = json.loads(json.dumps(base))
    data["train"].update(train)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def metrics(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "eval_accuracy" not in r}


def single_process(base: dict, run_dir: Path, **train) -> None:
    """The reference: one plain process (no DeepSpeed) with the global batch, in this process."""
    from dllm_rl.trainers.grpo import GRPOTrainer
    from dllm_rl.trainers.sft import SFTTrainer

    data = json.loads(json.dumps(base))
    # one thread, as the launched processes have (OMP_NUM_THREADS=1): on 2 busy cores 2 threads ran 20x slower
    data["train"].update({"output_dir": str(run_dir), "num_threads": 1, **train})
    recipe = recipe_from_dict(data)
    threads = torch.get_num_threads()
    try:
        (SFTTrainer if recipe.algorithm == "sft" else GRPOTrainer)(recipe).train()
    finally:
        torch.set_num_threads(threads)


def assert_same_run(dist_dir: Path, ref_dir: Path, keys: list[str], atol: float, start: Path | None = None) -> float:
    """Metrics of every step and final weights agree (weights within `atol`); returns how far training moved
    the weights from `start`."""
    a, b = metrics(dist_dir), metrics(ref_dir)
    assert sorted(a) == sorted(b), (sorted(a), sorted(b))
    for step in a:
        for key in keys:
            # kl is a small difference of nearly equal log-probs: the ~1e-6 weight differences that reduction
            # order leaves after an update move it by up to ~1e-3 of itself; clip_fraction counts tokens, and a
            # token sitting on the clip boundary may fall either side
            rel = 2e-3 if key == "kl" else 1e-4
            tol = 1e-3 if key == "clip_fraction" else 1e-5
            assert a[step][key] == pytest.approx(b[step][key], rel=rel, abs=tol), (step, key, a, b)
    got, want = load_file(dist_dir / "final/model.safetensors"), load_file(ref_dir / "final/model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=atol, msg=name)
    if start is None:
        return float("nan")
    init = load_file(start)
    return max((want[n] - init[n]).abs().max().item() for n in want)


# ---------------------------------------------------------------------------------------------- fast parts


def test_ranks_split_the_global_batch():
    one = EpochSampler(50, seed=3)
    for step in range(8):  # crosses epoch boundaries (8 * 2 * 4 > 50)
        whole = one.indices(step, 8)
        parts = [EpochSampler(50, seed=3).indices(step, 4, rank, 2) for rank in range(2)]
        assert parts[0] + parts[1] == whole


@needs_deepspeed
def test_deepspeed_plugin_fills_what_the_recipe_decides(tmp_path):
    recipe = recipe_from_dict(
        {
            "optim": {"max_grad_norm": 0.5},
            "train": {"batch_size": 8, "gradient_accumulation_steps": 2, "deepspeed": ZERO[3]},
        }
    )
    cfg = deepspeed_plugin(recipe, micro_batch_size=4 * 8, world=2).deepspeed_config  # GRPO: 4 prompts x G=8
    assert (
        cfg["train_micro_batch_size_per_gpu"],
        cfg["gradient_accumulation_steps"],
        cfg["train_batch_size"],
        cfg["gradient_clipping"],
    ) == (32, 2, 128, 0.5)
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    fixed = tmp_path / "fixed.json"
    fixed.write_text(json.dumps({**json.loads(Path(ZERO[2]).read_text()), "gradient_accumulation_steps": 4}))
    recipe.train.deepspeed = str(fixed)
    with pytest.raises(ConfigError, match="gradient_accumulation_steps is 4 but the recipe gives 2"):
        deepspeed_plugin(recipe, micro_batch_size=4, world=2)


# ------------------------------------------------------------------------------------- two processes


def test_sft_ddp_matches_one_process(tmp_path):
    """torchrun without train.deepspeed: DDP over gloo (accelerate's MULTI_CPU), not two lone processes."""
    recipe = write_recipe(
        tmp_path, SFT, "sft", batch_size=PER_RANK, max_steps=2, save_steps=0, output_dir=str(tmp_path / "dist")
    )
    launch("torchrun", ["-m", "dllm_rl", "train", str(recipe)], tmp_path)
    single_process(SFT, tmp_path / "one", batch_size=2 * PER_RANK, max_steps=2, save_steps=0)
    assert_same_run(tmp_path / "dist", tmp_path / "one", ["loss"], atol=2e-6)


@needs_deepspeed
def test_sft_zero2_matches_one_process(tmp_path):
    """accelerate launch --use_deepspeed, ZeRO-2, gradient accumulation inside each rank."""
    recipe = write_recipe(
        tmp_path,
        SFT,
        "sft",
        batch_size=PER_RANK,
        gradient_accumulation_steps=2,
        deepspeed=ZERO[2],
        output_dir=str(tmp_path / "dist"),
    )
    launch("accelerate", ["-m", "dllm_rl", "train", str(recipe)], tmp_path)
    single_process(SFT, tmp_path / "one", batch_size=2 * PER_RANK)
    assert_same_run(tmp_path / "dist", tmp_path / "one", ["loss"], atol=2e-6)
    shards = set(os.listdir(tmp_path / "dist/checkpoint-4/accelerator_state/pytorch_model"))
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(2)} <= shards  # one per rank


@needs_deepspeed
def test_sft_zero3_resumes_and_matches_one_process(tmp_path):
    """torchrun, ZeRO-3: a first launch stops at its step-2 checkpoint, a second launch resumes to step 4."""
    common = {"batch_size": PER_RANK, "deepspeed": ZERO[3], "output_dir": str(tmp_path / "dist")}
    launch(
        "torchrun", ["-m", "dllm_rl", "train", str(write_recipe(tmp_path, SFT, "a", max_steps=2, **common))], tmp_path
    )
    out = launch("torchrun", ["-m", "dllm_rl", "train", str(write_recipe(tmp_path, SFT, "b", **common))], tmp_path)
    assert "resumed from" in out and "checkpoint-2 at step 2" in out
    single_process(SFT, tmp_path / "one", batch_size=2 * PER_RANK)
    assert_same_run(tmp_path / "dist", tmp_path / "one", ["loss"], atol=2e-6)
    assert not list((tmp_path / "dist").glob("*.tmp")) and not list((tmp_path / "dist").glob("*.old"))


@needs_deepspeed
def test_grpo_zero2_matches_one_process(tmp_path):
    """The deepspeed launcher, ZeRO-2, frozen reference (beta > 0), two micro-batches per rank."""
    recipe = write_recipe(
        tmp_path,
        GRPO,
        "grpo",
        batch_size=PER_RANK // 2,
        gradient_accumulation_steps=2,
        deepspeed=ZERO[2],
        output_dir=str(tmp_path / "dist"),
    )
    launch("deepspeed", ["-m", "dllm_rl", "train", str(recipe)], tmp_path)
    single_process(GRPO, tmp_path / "one", batch_size=PER_RANK)
    moved = assert_same_run(tmp_path / "dist", tmp_path / "one", GRPO_KEYS, atol=1e-5, start=START)
    assert moved > 20 * 1e-5  # the tolerance is far below what training changed


@needs_deepspeed
def test_grpo_zero3_gathers_once_per_rollout_and_matches_one_process(tmp_path):
    recipe = write_recipe(
        tmp_path, GRPO, "grpo", batch_size=PER_RANK // 2, deepspeed=ZERO[3], output_dir=str(tmp_path / "dist")
    )
    script = tmp_path / "counting_launch.py"
    script.write_text(COUNTING_LAUNCH)
    out = launch("torchrun", [str(script), str(tmp_path / "gathers"), "train", str(recipe)], tmp_path)
    assert out.count("gathered once per rollout phase") == 1  # said once, by rank 0
    single_process(GRPO, tmp_path / "one", batch_size=PER_RANK)
    moved = assert_same_run(tmp_path / "dist", tmp_path / "one", GRPO_KEYS, atol=1e-5, start=START)
    assert moved > 20 * 1e-5
    for rank in range(2):
        phases = json.loads((tmp_path / f"gathers.rank{rank}.json").read_text())
        assert len(phases["rollout"]) == GRPO["train"]["max_steps"]
        for row in phases["rollout"]:
            # one gather of the whole model (persistent small parameters stay whole; partitions are padded),
            # although the rollout ran `forwards` forwards: per-forward gathering would be forwards x the model
            assert row["forwards"] >= 5 and 0.95 <= row["numel"] / row["model_numel"] <= 1.05, row
        for row in phases["update"]:  # the counter does see ZeRO-3's per-module gathers in training
            assert row["numel"] > 2 * row["model_numel"], row


@needs_deepspeed
def test_lora_grpo_zero2_matches_one_process(tmp_path):
    """LoRA under ZeRO-2 with the adapter-disabled reference: the adapters start from train.seed on every rank
    (not from each process's global generator), so two processes follow one step for step."""
    base = json.loads(json.dumps(GRPO))
    base["model"]["lora"] = {"r": 8, "alpha": 16}
    base["optim"]["lr"] = 1e-3
    recipe = write_recipe(
        tmp_path, base, "lora", batch_size=PER_RANK, deepspeed=ZERO[2], output_dir=str(tmp_path / "d")
    )
    launch("deepspeed", ["-m", "dllm_rl", "train", str(recipe)], tmp_path)
    single_process(base, tmp_path / "one", batch_size=2 * PER_RANK)
    a, b = metrics(tmp_path / "d"), metrics(tmp_path / "one")
    for step in b:
        for key in ("loss", "kl", "reward"):
            assert a[step][key] == pytest.approx(b[step][key], rel=2e-3, abs=1e-5), (step, key)
    got, want = (load_file(d / "final/adapter_model.safetensors") for d in (tmp_path / "d", tmp_path / "one"))
    # Adam at lr 1e-3 turns the ~1e-7 gradient differences of reduction order into up to ~5e-5 on a coordinate
    # whose gradient is near 0; lora_B (0 at the start) moved 40x that, and a differently drawn lora_A is off by ~0.1
    assert sorted(got) == sorted(want) and max(want[n].abs().max() for n in want if "lora_B" in n) > 2e-3
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=1e-4, msg=name)


@needs_deepspeed
@pytest.mark.slow
def test_grpo_zero3_checkpoints_the_whole_moving_reference(tmp_path):
    """grpo.sync_ref_model under ZeRO-3: the reference is sharded like the policy (runtime.prepare_frozen), so
    its own state_dict holds each rank's empty placeholders; the checkpoint holds its whole tensors (gathered by
    runtime.WholeState), moved from the start by the sync, which a resumed run loads back."""
    base = json.loads(json.dumps(GRPO))
    base["grpo"] |= {"reference": "frozen_copy", "sync_ref_model": True}
    base["grpo"] |= {"ref_model_mixup_alpha": 0.5, "ref_model_sync_steps": 1}
    recipe = write_recipe(
        tmp_path,
        base,
        "grpo",
        batch_size=PER_RANK // 2,
        deepspeed=ZERO[3],
        save_steps=2,
        output_dir=str(tmp_path / "d"),
    )
    launch("torchrun", ["-m", "dllm_rl", "train", str(recipe)], tmp_path)
    states = [
        torch.load(p, weights_only=False) for p in (tmp_path / "d").glob("checkpoint-2/**/custom_checkpoint_*.pkl")
    ]
    ref = next(s for s in states if isinstance(s, dict) and any(k.endswith("embed_tokens.weight") for k in s))
    start = load_file(START)
    assert {k: tuple(v.shape) for k, v in ref.items() if k in start} == {k: tuple(v.shape) for k, v in start.items()}
    moved = max((ref[k].float() - start[k].float()).abs().max().item() for k in start)
    assert moved > 0  # the synced reference, not the start
