"""The memory planner (dllm_rl/plan.py) against exact byte counts and measured CPU peaks on the tiny model,
hand-computed LLaDA-8B / Dream-7B figures, and the `dllm-rl plan` command on every shipped recipe.

Only CPU measurements are possible here: a GPU run (torch.cuda.max_memory_allocated) is still needed to
check the activation / logits formulas at 8B scale."""

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import dllm_rl.models as M
from dllm_rl.config import LoraConfig, load_recipe, recipe_from_dict
from dllm_rl.errors import ConfigError
from dllm_rl.estimators import ESTIMATORS
from dllm_rl.memory import (
    NF4_BYTES,
    Linear,
    ModelShape,
    activation_bytes,
    format_plan,
    logits_bytes,
    plan_memory,
)
from dllm_rl.models.base import traits
from dllm_rl.models.load import load_model
from dllm_rl.runtime import make_optimizer
from dllm_rl.runtime import micro_batch_size as micro_batch

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "hidden_size": 128,
    "num_layers": 4,
    "num_heads": 4,
    "intermediate_size": 384,
    "max_position_embeddings": 128,
}
LLADA_PARAMS = 32 * (4 * 4096**2 + 3 * 4096 * 12288 + 2 * 4096) + 2 * 126464 * 4096 + 4096  # + final norm
LLADA_LINEARS = 32 * (4 * 4096**2 + 3 * 4096 * 12288)
LLADA_LORA_128 = 32 * 128 * (4 * (4096 + 4096) + 3 * (4096 + 12288))  # q k v o + gate up down


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machines: keep the measurements light
    yield
    torch.set_num_threads(threads)


def _recipe(**model):
    return recipe_from_dict(
        {
            "algorithm": "grpo",
            "model": {"tiny": TINY, **model},
            "rollout": {"max_completion_length": 60},
            "grpo": {"num_generations": 8},
            "train": {"batch_size": 2},
        }
    )


def _llada(deepspeed=None, **over):
    data = {
        "algorithm": "grpo",
        "model": {"path": "GSAI-ML/LLaDA-8B-Instruct", "dtype": "bfloat16"},
        "rollout": {"max_completion_length": 256, "block_length": 32, "steps": 128},
        "grpo": {"num_generations": 6, "beta": 0.04},
        "train": {
            "batch_size": 2,
            "gradient_accumulation_steps": 2,
            "deepspeed": deepspeed,
            "mixed_precision": "bf16",
        },
    }
    for key, value in over.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    return recipe_from_dict(data)


def _zero_json(tmp_path, stage, **extra):
    path = tmp_path / f"zero{stage}.json"
    path.write_text(json.dumps({"bf16": {"enabled": "auto"}, "zero_optimization": {"stage": stage, **extra}}))
    return str(path)


# ------------------------------------------------------------------------------- hand-computed 8B numbers


def test_llada_8b_full_finetune_hand_computed():
    plan = plan_memory(_llada(), gpus=1, prompt_length=200)
    assert LLADA_PARAMS == 8_015_581_184
    assert plan.get("weights") == LLADA_PARAMS * 2  # 16.03 GB in bf16
    assert round(plan.get("weights") / 1e9, 2) == 16.03
    assert plan.get("gradients") == LLADA_PARAMS * 2
    assert plan.get("optimizer") == LLADA_PARAMS * 4  # AdamW m, v in bf16 (plain torch, no master copy)
    assert plan.get("reference") == LLADA_PARAMS * 2  # beta > 0 without LoRA: a frozen copy
    n, Lc, V = 6, 256, 126464  # 2 prompts x 6 generations / 2 accumulation steps
    assert micro_batch(_llada()) == n
    logits_path = plan_memory(_llada(), gpus=1, prompt_length=200, fused_logprobs=False)
    assert logits_path.get("logits") == n * Lc * V * (2 + 8)  # 1.94 GB
    # the default: liger's fused linear cross-entropy (what the estimators run on a GPU): one chunk of 64 rows
    # (next power of two of 1536 / ceil(V / D) = 50), the input gradient, the loss, and the head's gradient
    assert plan.get("logits") == 64 * V * 2 + n * Lc * 4096 * 2 + 4 * n * Lc + 2 * V * 4096
    assert plan.get("kv_cache") == 0  # rollout.cache none
    cached = plan_memory(_llada(rollout__cache="dual"), gpus=1, prompt_length=200)
    assert cached.get("kv_cache") == 32 * 2 * 4096 * 2 * (200 + 256) * 12  # 0.5 MiB per token, 12 sequences
    assert "does NOT fit" in format_plan(plan)


def test_llada_8b_lora_4bit_zero2_hand_computed(tmp_path):
    recipe = _llada(
        _zero_json(tmp_path, 2),
        model__load_in_4bit=True,
        model__lora={"r": 128, "alpha": 64, "target_modules": ["all-linear"]},
    )
    one, eight = (plan_memory(recipe, gpus=g, prompt_length=200) for g in (1, 8))
    assert LLADA_LORA_128 == 335_544_320
    base = LLADA_LINEARS * NF4_BYTES + (LLADA_PARAMS - LLADA_LINEARS) * 2
    assert one.get("weights") == pytest.approx(base + LLADA_LORA_128 * 2)  # the bf16 engine casts the adapters
    assert one.get("reference") == 0  # the adapter-disabled base is the reference
    assert one.get("optimizer") == LLADA_LORA_128 * 12  # fp32 master + m + v
    assert eight.get("optimizer") == LLADA_LORA_128 * 12 / 8 and eight.get("gradients") == LLADA_LORA_128 * 2 / 8
    assert eight.get("weights") == one.get("weights")  # ZeRO-2 does not shard parameters
    assert eight.get("activations") == one.get("activations")  # per-process batch


def test_zero3_shards_weights_and_gathers_for_rollout(tmp_path):
    plan = plan_memory(_llada(_zero_json(tmp_path, 3)), gpus=8, prompt_length=200)
    assert plan.get("weights") == pytest.approx(LLADA_PARAMS * 2 / 8)
    assert plan.get("reference") == pytest.approx(LLADA_PARAMS * 2 / 8)
    assert plan.get("zero3_rollout") == pytest.approx(LLADA_PARAMS * 2 * 7 / 8)
    off = plan_memory(
        _llada(_zero_json(tmp_path, 3, offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})),
        gpus=8,
        prompt_length=200,
    )
    assert off.get("weights") == off.get("optimizer") == off.get("gradients") == 0


def test_zero1_shards_only_the_optimizer_and_zero2_offload_moves_it_to_the_cpu(tmp_path):
    P = LLADA_PARAMS
    one = plan_memory(_llada(_zero_json(tmp_path, 1)), gpus=8, prompt_length=200)
    assert one.get("weights") == P * 2 and one.get("gradients") == P * 2  # ZeRO-1 keeps whole gradients
    assert one.get("optimizer") == P * 12 / 8
    off = plan_memory(
        _llada(_zero_json(tmp_path, 2, offload_optimizer={"device": "cpu"}, offload_param={"device": "cpu"})),
        gpus=8,
        prompt_length=200,
    )
    assert off.get("optimizer") == off.get("gradients") == off.phase("step") == 0  # the step runs on the CPU
    assert off.get("weights") == P * 2  # offload_param is a ZeRO-3 option: ZeRO-2 keeps the weights


def test_zero_step_holds_an_fp32_copy_of_the_gradient_partition(tmp_path):
    """DeepSpeed's step (zero/stage_1_and_2.py) flattens the partition's bf16 gradients, casts them to fp32 and steps
    the client optimizer on the fp32 partition: 4 bytes + max(the flat bf16 copy 2, AdamW's temporary 4) per
    trained parameter of the partition; ZeRO-3 steps sub_group_size parameters at a time."""
    P = LLADA_PARAMS
    two = plan_memory(_llada(_zero_json(tmp_path, 2)), gpus=8, prompt_length=200)
    assert two.get("step_grad32") == P * 4 / 8 and two.get("step") == P * 4 / 8
    assert two.phase("step") == P
    sgd = plan_memory(_llada(_zero_json(tmp_path, 2), optim__name="sgd"), gpus=8, prompt_length=200)
    assert sgd.phase("step") == P * (4 + 2) / 8  # no optimizer temporary: the flat bf16 copy is the larger
    three = plan_memory(_llada(_zero_json(tmp_path, 3, sub_group_size=10**8)), gpus=8, prompt_length=200)
    assert three.phase("step") == 10**8 * 8
    assert plan_memory(_llada(), gpus=1, prompt_length=200).phase("step") == P * 2  # plain torch AdamW foreach


def test_fp32_zero2_clones_an_fp32_master_and_fp32_zero3_does_not(tmp_path):
    """stage_1_and_2 clones its partition to fp32 whatever the dtype; stage3 reuses an fp32 partition (and makes
    an fp32 copy of bf16 parameters that no bf16 engine casts)."""
    P = LLADA_PARAMS
    for stage, dtype, master in [(2, "float32", 4), (3, "float32", 0), (3, "bfloat16", 4)]:
        recipe = _llada(_zero_json(tmp_path, stage), model__dtype=dtype, train__mixed_precision="no")
        assert plan_memory(recipe, gpus=8, prompt_length=200).get("optimizer") == P * (master + 8) / 8


@pytest.mark.parametrize("momentum,states", [(0.0, 0), (0.9, 1)])
def test_sgd_keeps_a_momentum_buffer_or_nothing(tmp_path, momentum, states):
    P = LLADA_PARAMS
    plain = plan_memory(_llada(optim__name="sgd", optim__momentum=momentum), gpus=1, prompt_length=200)
    assert plain.get("optimizer") == P * 2 * states  # in the bf16 parameter dtype
    assert plain.phase("step") == 0  # no weight decay: SGD's foreach step is in place
    decayed = _llada(optim__name="sgd", optim__momentum=momentum, optim__weight_decay=0.1)
    assert plan_memory(decayed, gpus=1, prompt_length=200).phase("step") == P * 2  # the decayed gradient
    ds = plan_memory(_llada(_zero_json(tmp_path, 2), optim__name="sgd", optim__momentum=momentum), gpus=8)
    assert ds.get("optimizer") == P * (4 + 4 * states) / 8  # the fp32 master stays, states in fp32


def _eval_recipe(**over):
    return _llada(rollout__cache="dual", **over)


def test_held_out_evaluation_is_planned_with_the_training_state():
    """The trainers decode the held-out set (evaluate_recipe) with weights, gradients and optimizer states on the
    GPU: rollout.batch_size prompts x eval.num_samples rows at once, capped by the held-out set."""
    plan = plan_memory(_eval_recipe(), gpus=1, prompt_length=200)
    C, rows = 200 + 256, 64  # rollout.batch_size 64 of data.eval_size 200, one sample each
    assert plan.get("eval_kv_cache") == 32 * 2 * 4096 * 2 * C * rows
    per_token = 2 * (3 * 12288 + 2 * 4096 + 2 * 4096 + 2 * 4096)
    assert plan.get("eval_forward") == rows * C * per_token + rows * 32 * 126464 * (2 + 8)
    assert plan.phase("eval") == plan.get("eval_kv_cache") + plan.get("eval_forward")
    capped = plan_memory(_eval_recipe(eval__size=20, eval__num_samples=2), gpus=1, prompt_length=200)
    assert capped.get("eval_kv_cache") == 32 * 2 * 4096 * 2 * C * 40  # 20 prompts x 2 samples
    big = plan_memory(_eval_recipe(rollout__batch_size=200, eval__num_samples=4), gpus=1, prompt_length=200)
    assert big.phase("eval") > big.phase("update") and big.total == big.phase("static") + big.phase("eval")


def test_zero3_gathers_the_weights_for_the_evaluation(tmp_path):
    plan = plan_memory(_eval_recipe(train__deepspeed=_zero_json(tmp_path, 3)), gpus=8, prompt_length=200)
    assert plan.get("zero3_eval") == pytest.approx(LLADA_PARAMS * 2 * 7 / 8)


def test_the_vrpo_recipe_header_states_its_plan(monkeypatch):
    """ultrafeedback-vrpo decodes nothing while training (offline pairs) but its evaluation decodes
    rollout.batch_size prompts of 1024-token canvases with a dual cache: the header's figures are the plan's."""
    monkeypatch.chdir(ROOT)
    path = ROOT / "recipes/llada-8b/ultrafeedback-vrpo.yaml"
    said = re.search(r"(\d+\.\d) GB per GPU.*?(\d+\.\d) GB with train.deepspeed=(\S+)\)", path.read_text(), re.S)
    two = plan_memory(load_recipe(path), gpus=8, prompt_length=512)
    three = plan_memory(load_recipe(path, [f"train.deepspeed={said.group(3)}"]), gpus=8, prompt_length=512)
    assert (f"{two.total / 1e9:.1f}", f"{three.total / 1e9:.1f}") == said.group(1, 2)
    assert two.phase("eval") > two.phase("update") and "fits on one 80 GB H100" in format_plan(two)


def test_consensus_plans_as_sft_with_a_voting_rollout(monkeypatch):
    monkeypatch.chdir(ROOT)
    recipe = load_recipe(ROOT / "recipes/tiny/sudoku-consensus.yaml")
    plan = plan_memory(recipe, gpus=1, prompt_length=44)
    text = format_plan(plan)
    assert "micro-batch 32 completions" in text  # train.batch_size 32 sequences, no accumulation
    assert "512 sequences x canvas 64" in text  # consensus.prompts_per_round 64 x consensus.samples 8
    assert plan.get("reference") == 0  # consensus.teacher current
    frozen = plan_memory(load_recipe(ROOT / "recipes/tiny/sudoku-consensus.yaml", ["consensus.teacher=initial"]))
    assert frozen.get("reference") == frozen.get("weights")  # the starting model again, float32
    sft = plan_memory(load_recipe(ROOT / "recipes/tiny/sudoku-sft.yaml"), gpus=1)
    assert sft.phase("rollout") == 0 and sft.phase("eval") > 0  # SFT decodes only to evaluate


def test_plan_refuses_planner_sft_and_plans_consensus_from_the_cli(capsys, monkeypatch):
    from dllm_rl.cli import main

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    capsys.readouterr()
    assert main(["plan", "recipes/tiny/sudoku-planner-sft.yaml"]) == 2
    err = capsys.readouterr().err
    assert "does not model algorithm=planner_sft" in err and "sft, grpo, dpo or consensus" in err
    assert "Traceback" not in err
    assert main(["plan", "recipes/tiny/sudoku-consensus.yaml", "--prompt-length", "44"]) == 0
    assert "512 sequences x canvas 64" in capsys.readouterr().out


def test_dream_7b_shape():
    recipe = recipe_from_dict(
        {"algorithm": "grpo", "model": {"path": "Dream-org/Dream-v0-Instruct-7B", "dtype": "bfloat16"}}
    )
    plan = plan_memory(recipe, gpus=1, prompt_length=100)
    layer = 3584 * 3584 * 2 + 2 * 3584 * 512 + 3584 + 2 * 512 + 3 * 3584 * 18944 + 2 * 3584  # GQA, qkv biases
    assert plan.get("weights") == 2 * (28 * layer + 2 * 152064 * 3584 + 3584)  # 7.616 B params


def test_unknown_model_is_refused():
    with pytest.raises(ConfigError, match="known hub id"):
        plan_memory(recipe_from_dict({"model": {"path": "someone/unknown-7b"}}))


# ----------------------------------------------------------------- activation formulas, hand-computed bytes

MADE_UP = ModelShape("made-up", 1000, 2, 8, 8, 4, 2, 16, 32, 64, False, [], None)  # l 2, D 8, Dq 8, Dkv 4, H 2, F 16
MADE_UP_TARGETS = [Linear("layers.0.q", 8, 8), Linear("layers.1.gate", 8, 16)]


def test_full_finetune_activations_hand_computed():
    """n 1, L 3, Lc 2, a 2. per_layer = 2 (4 + 2) 8 + 3 2 (8 + 4) + 4 2 + 4 2 16 = 96 + 72 + 8 + 128 = 304;
    tail = 3 (4 + 2) 8 + 2 8 2 = 176. Without checkpointing 3 (2 304) + 176; with it 3 (2 2 8 + 304) + 176
    (the checkpointed layer inputs l a D); block-causal adds the mask n L^2 a = 18."""
    args = (1, 3, 2, 2)
    assert activation_bytes(MADE_UP, *args, False, [], LoraConfig(), 2) == 2000
    assert activation_bytes(MADE_UP, *args, True, [], LoraConfig(), 2) == 1184
    block = dataclasses.replace(MADE_UP, block_causal=True)
    assert activation_bytes(block, *args, False, [], LoraConfig(), 2) == 2018


def test_lora_activations_hand_computed():
    """LoRA r 2 on two linears of fan_in 8. per_layer = 2 4 8 + 2 (2 8 + 2 4) + 4 2 + 3 2 16 = 64 + 48 + 8 + 96
    = 216 (3aF: gate, silu, up); tail = 3 4 8 = 96 (frozen norm and head)."""
    args = (MADE_UP, 1, 3, 2, 2)
    # fp32 adapters (t 4) on a bf16 input: lora_A's output r t = 8 and its cast input 4 8 = 32, per target
    lora = LoraConfig(r=2, dropout=0.0)
    assert activation_bytes(*args, False, MADE_UP_TARGETS, lora, 4) == 3 * (2 * 216 + 80) + 96 == 1632
    assert activation_bytes(*args, True, MADE_UP_TARGETS, lora, 4) == 3 * (2 * 2 * 8 + 216 + 80 / 2) + 96 == 960
    # autocast with dropout: r a = 4 and the input with its mask 8 (2 + 1) = 24, per target
    dropout = LoraConfig(r=2, dropout=0.1)
    assert activation_bytes(*args, False, MADE_UP_TARGETS, dropout, 4, True) == 3 * (2 * 216 + 56) + 96 == 1560
    # bf16 adapters, no dropout: r a = 4 per target, and lora_A saves the layer inputs (2 D + F) a l = 128
    assert activation_bytes(*args, False, MADE_UP_TARGETS, lora, 2) == 3 * (2 * 216 + 8 + 128) + 96 == 1800


# --------------------------------------------------------------------------- tiny model: exact and measured


@pytest.mark.parametrize("dtype,r", [("float32", 0), ("float32", 8), ("bfloat16", 8), ("bfloat16", 0)])
def test_tiny_parameter_gradient_optimizer_bytes_exact(dtype, r):
    recipe = _recipe(dtype=dtype, lora={"r": r})
    plan = plan_memory(recipe, gpus=1)
    model, _ = load_model(recipe.model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    for p in trainable:
        p.grad = torch.ones_like(p)
    opt.step()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)
    assert plan.get("weights") == nbytes(model.parameters())
    assert plan.get("gradients") == nbytes(p.grad for p in trainable)
    states = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    assert plan.get("optimizer") == nbytes(states)
    assert plan.get("step") == nbytes(trainable)  # foreach AdamW: one state-sized temporary


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_tiny_sgd_state_bytes_exact(momentum):
    recipe = recipe_from_dict(
        {"algorithm": "grpo", "model": {"tiny": TINY}, "optim": {"name": "sgd", "momentum": momentum}}
    )
    plan = plan_memory(recipe, gpus=1)
    model, _ = load_model(recipe.model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(trainable, recipe.optim)
    for p in trainable:
        p.grad = torch.ones_like(p)
    opt.step()
    states = [v for s in opt.state.values() for v in s.values() if torch.is_tensor(v)]
    assert plan.get("optimizer") == sum(t.numel() * t.element_size() for t in states)
    assert ("SGD momentum" if momentum else "SGD (no state)") in format_plan(plan)


def _cpu_peak(fn) -> int:
    """Peak bytes allocated by torch on CPU while fn runs (profiler allocation events, in time order)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def _forward_backward(model, tok, n, P, Lc, estimator="one_step"):
    model.train()
    tr = traits(model, tok)
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    batch = SimpleNamespace(
        prompt_ids=torch.randint(4, V, (n, P), generator=g),
        prompt_mask=torch.ones(n, P, dtype=torch.long),
        completion_ids=torch.randint(4, V, (n, Lc), generator=g),
        completion_mask=torch.ones(n, Lc, dtype=torch.long),
    )
    est = ESTIMATORS[estimator](recipe_from_dict({}).estimator, tr)
    noise = est.draw(batch, g)

    def run():
        est.estimate(model, batch, noise).logps.sum().backward()

    run()  # warm-up (lazy allocations), then measure a clean pass
    model.zero_grad(set_to_none=True)
    return _cpu_peak(run)


@pytest.mark.parametrize("dtype,r,checkpointing", [("float32", 0, False), ("float32", 0, True), ("bfloat16", 8, False)])
def test_tiny_update_peak_matches_measurement(dtype, r, checkpointing, one_thread):
    recipe = _recipe(dtype=dtype, lora={"r": r}, gradient_checkpointing=checkpointing)
    plan = plan_memory(recipe, gpus=1, prompt_length=40, fused_logprobs=False)  # the CPU path: logits
    model, tok = load_model(recipe.model)
    measured = _forward_backward(model, tok, micro_batch(recipe), 40, 60)
    predicted = plan.get("activations") + plan.get("logits") + plan.get("gradients")
    assert 0.8 < predicted / measured < 1.5, (predicted, measured)


def test_tiny_lora_peak_under_autocast_matches_measurement(one_thread):
    """LoRA on a frozen float32 base under bf16 autocast (accelerate's mixed precision, the 8B GRPO step's
    setting): the frozen linears and norms save no inputs, lora_A saves autocast's bf16 copy of its input."""
    recipe = recipe_from_dict(
        {
            "algorithm": "grpo",
            "model": {"tiny": TINY, "lora": {"r": 16}},
            "rollout": {"max_completion_length": 60},
            "grpo": {"num_generations": 8},
            "train": {"batch_size": 2, "mixed_precision": "bf16"},
        }
    )
    plan = plan_memory(recipe, gpus=1, prompt_length=40, fused_logprobs=False)
    model, tok = load_model(recipe.model)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        measured = _forward_backward(model, tok, micro_batch(recipe), 40, 60)
    predicted = plan.get("activations") + plan.get("logits") + plan.get("gradients")
    assert 0.85 < predicted / measured < 1.15, (predicted, measured)


def test_plan_within_15_percent_of_the_measured_8b_grpo_step():
    """The one GPU measurement (an H200, 2026-12-04): a GRPOTrainer step on the LLaDA-8B shape, LoRA r=128
    (dropout 0.05) on a bf16 base, no DeepSpeed, mixed precision bf16, 64 completions x 256 (micro-batch 16),
    prompt 128, dual cache, one_step, the logits path, peaked at 72.6 GiB. The plan must land within 15%; the
    fused log-probs (the estimators' CUDA path) plan less."""
    recipe = load_recipe(
        ROOT / "recipes/llada-8b/gsm8k-diffu-grpo.yaml",
        [
            "model.load_in_4bit=false",
            "rollout.cache=dual",
            "grpo.num_generations=8",
            "grpo.num_iterations=2",
            "train.batch_size=8",
            "train.gradient_accumulation_steps=4",
            "train.deepspeed=null",
        ],
    )
    logits_path = plan_memory(recipe, gpus=1, prompt_length=128, fused_logprobs=False)
    assert abs(logits_path.total / 2**30 / 72.6 - 1) < 0.15, logits_path.total / 2**30
    fused = plan_memory(recipe, gpus=1, prompt_length=128)
    assert fused.get("logits") < logits_path.get("logits") / 4 and fused.total < logits_path.total


def test_graphs_keep_the_rollout_buffers():
    """rollout.compile=graphs keeps the last decode's KV cache and graph pool between calls: static memory, the
    larger of the training rollout's (12 rows here, with rollout.batch_size 4) and the evaluation's (64 rows)."""
    for batch, key in [(4, ""), (64, "eval_")]:
        eager, graphs = (
            plan_memory(_eval_recipe(rollout__batch_size=batch, rollout__compile=c), gpus=1, prompt_length=200)
            for c in ("none", "graphs")
        )
        kv = eager.get(f"{key}kv_cache")
        assert kv > 0 and graphs.get("kv_cache") == kv
        kept = (f"{key}kv_cache", "eval_forward" if key else "rollout_forward")
        assert graphs.phase("static") == eager.phase("static") + sum(eager.get(k) for k in kept)
        assert graphs.phase("rollout") == graphs.phase("eval") == 0


def test_a_rollout_that_feeds_several_optimizer_steps_decodes_all_its_prompts_at_once():
    """grpo.steps_per_generation = k x gradient accumulation: one generate call decodes k optimizer steps' prompts
    (the trainer's rollout of geometry().prompts_per_rollout prompts), and the rollout phase is planned so."""
    one = plan_memory(_llada(rollout__cache="dual"), gpus=1, prompt_length=200)
    four = plan_memory(_llada(rollout__cache="dual", grpo__steps_per_generation=8), gpus=1, prompt_length=200)
    assert four.get("kv_cache") == 4 * one.get("kv_cache")
    assert "48 sequences x canvas" in format_plan(four) and "12 sequences x canvas" in format_plan(one)


def test_configs_it_cannot_build_and_bad_deepspeed_files_are_errors_naming_the_fix(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llada", "block_type": "sequential"}))
    with pytest.raises(ConfigError, match="cannot plan model.path.*building its model from config.json failed"):
        plan_memory(recipe_from_dict({"algorithm": "grpo", "model": {"path": str(bad)}}))
    broken = tmp_path / "broken.json"
    broken.write_text('{"zero_optimization": {"stage": 2,}}')
    with pytest.raises(ConfigError, match="not a readable JSON file.*trailing commas"):
        plan_memory(_llada(deepspeed=str(broken)))
    (tmp_path / "nozero.json").write_text('{"bf16": {"enabled": true}}')
    with pytest.raises(ConfigError, match="no zero_optimization section"):
        plan_memory(_llada(deepspeed=str(tmp_path / "nozero.json")))


def test_logits_term_matches_measurement(one_thread):
    """A large vocabulary makes the [n, Lc, V] terms dominate the peak."""
    V, D, n, P, Lc = 16384, 32, 8, 8, 64
    cfg = M.TinyMDMConfig(
        vocab_size=V,
        hidden_size=D,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=128,
        mask_token_id=1,
        pad_token_id=0,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    for dtype, a in [(torch.float32, 4), (torch.bfloat16, 2)]:
        model = M.TinyMDM(cfg).to(dtype)
        measured = _forward_backward(model, None, n, P, Lc)
        shape = ModelShape(
            "tiny", sum(p.numel() for p in model.parameters()), 1, D, D, D, 2, 64, V, 128, False, [], None
        )
        predicted = (
            activation_bytes(shape, n, P + Lc, Lc, a, False, [], LoraConfig(), a)
            + logits_bytes(n, Lc, V, a, False, True, D)
            + shape.params * a
        )
        assert 0.8 < predicted / measured < 1.25, (dtype, predicted, measured)


# ------------------------------------------------------------------------------------ recipes and the CLI


BIG_RECIPES = sorted(
    p for d in ("llada-8b", "dream-7b", "diffucoder-7b") for p in (ROOT / "recipes" / d).glob("*.yaml")
)


def test_big_recipes_exist():
    names = {f"{p.parent.name}/{p.name}" for p in BIG_RECIPES}
    assert {
        "llada-8b/gsm8k-diffu-grpo.yaml",
        "llada-8b/math-diffu-grpo.yaml",
        "llada-8b/countdown-diffu-grpo.yaml",
        "llada-8b/sudoku-diffu-grpo.yaml",
        "llada-8b/gsm8k-coupled-grpo.yaml",
        "llada-8b/gsm8k-spg.yaml",
        "llada-8b/gsm8k-trajectory.yaml",
        "dream-7b/gsm8k-diffu-grpo.yaml",
        "diffucoder-7b/code-coupled-grpo.yaml",
    } <= names


@pytest.mark.parametrize("path", BIG_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_big_recipe_plans_and_fits_on_8_gpus(path, monkeypatch):
    monkeypatch.chdir(ROOT)  # train.deepspeed paths are relative to the repository
    recipe = load_recipe(path)
    assert recipe.model.path and recipe.train.deepspeed == "recipes/deepspeed/zero2.json"
    plan = plan_memory(recipe, gpus=8)
    assert "fits on one 80 GB H100" in format_plan(plan), format_plan(plan)


@pytest.mark.parametrize("path", BIG_RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_recipes_one_gpu_estimate_in_its_header_is_what_plan_computes(path, monkeypatch):
    """The header's "`dllm-rl plan` estimates N GB" (one GPU, no DeepSpeed) is the current plan, rounded."""
    monkeypatch.chdir(ROOT)
    said = re.search(r"`dllm-rl plan` estimates (\d+) GB", path.read_text())
    if said is None:
        pytest.skip("no one-GPU estimate in this recipe's header")
    plan = plan_memory(load_recipe(path, ["train.deepspeed=null"]), gpus=1)
    assert round(plan.total / 1e9) == int(said.group(1)), format_plan(plan)


def test_cli_plan_runs():
    command = [
        sys.executable,
        "-m",
        "dllm_rl",
        "plan",
        "recipes/llada-8b/gsm8k-diffu-grpo.yaml",
        "--gpus",
        "8",
        "--prompt-length",
        "200",
    ]
    out = subprocess.run(
        command,
        check=False,
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert "ESTIMATE" in out.stdout and "total per GPU" in out.stdout and "verdict:" in out.stdout
    assert "activations" in out.stdout and "AdamW states" in out.stdout


def test_ar_order_views_follow_the_completion_length_not_the_steps(monkeypatch):
    """ar_order scores one view per completion position (per merge_steps positions), whatever rollout.steps: a
    rollout of 128 steps over 256 positions is 256 forwards per estimate (128 with merge_steps=2); the trajectory
    estimator's views still follow the steps, and a custom estimator's views(steps) is called with the steps."""
    from dllm_rl import estimators
    from dllm_rl.estimators import Estimator

    info = lambda plan: dict(plan.info)["estimator"]
    plan = plan_memory(_llada(estimator__name="ar_order"), gpus=1, prompt_length=200)
    assert info(plan).startswith("ar_order: 256 view(s) per estimate")
    plan = plan_memory(_llada(estimator__name="ar_order", estimator__merge_steps=2), gpus=1, prompt_length=200)
    assert info(plan).startswith("ar_order: 128 view(s) per estimate")
    plan = plan_memory(_llada(estimator__name="trajectory"), gpus=1, prompt_length=200)
    assert info(plan).startswith("trajectory: 128 view(s) per estimate")
    custom = lambda cfg, tr: Estimator(None, None, views=lambda steps: steps + 1)
    monkeypatch.setitem(estimators.ESTIMATORS, "one_step", custom)
    assert info(plan_memory(_llada(), gpus=1, prompt_length=200)).startswith("one_step: 129 view(s) per estimate")


def test_dpo_decodes_as_many_rows_as_its_pairs_need():
    """The rows one generate call decodes while DPO trains: none for offline pairs, G per prompt on-policy, one per
    prompt for branch pairs (the greedy decodes, then one branch per prompt a round)."""
    from dllm_rl.config import load_recipe
    from dllm_rl.memory import rollout_rows

    path = str(Path(__file__).resolve().parents[1] / "recipes/tiny/countdown-dpo.yaml")
    assert rollout_rows(load_recipe(path, []), 1) == 32 * 8
    assert rollout_rows(load_recipe(path, ["dpo.pairs=branch"]), 1) == 32


# ----------------------------------------------------------------- frozen models, DPO micro-batches, LoRA copies


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def _head_recipe(algorithm="grpo", **over):
    data = {
        "algorithm": algorithm,
        "model": {"tiny": TINY},
        "rollout": {"max_completion_length": 60, "steps": 30, "order": "policy", "order_temperature": 0.1},
        "estimator": {"name": "trajectory"},
        "train": {"batch_size": 2},
        **({"grpo": {"num_generations": 8, "beta": 0.04}} if algorithm == "grpo" else {}),
    }
    for key, value in over.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    return recipe_from_dict(data)


@pytest.mark.parametrize(
    "over,head",
    [
        ({"order_policy__train_model": False}, "order"),
        ({"rollout__order": "top_prob", "rollout__edit": "remask", "edit_policy__train_model": False}, "edit"),
        ({"rollout__order": "top_prob", "hybrid__train_executor": False}, None),
    ],
    ids=["order_head", "edit_head", "hybrid_executor"],
)
def test_a_frozen_model_plans_no_model_gradients_states_or_saved_activations(over, head):
    """GRPO freezes the model (requires_grad_(False)) when only a head (or the hybrid planner) trains: the plan
    has the model's weights but no gradients, optimizer states or saved activations; the head's weights, gradients
    and AdamW states are the real head's; the reference is what GRPOTrainer._reference builds (none when the
    head trains alone: the KL is 0; a frozen copy for a frozen executor)."""
    from dllm_rl.policy.edit_head import edit_head_for
    from dllm_rl.policy.order_head import order_head_for
    from dllm_rl.trainers.grpo import GRPOTrainer

    recipe = _head_recipe(**over)
    plan = plan_memory(recipe, gpus=1, prompt_length=40, fused_logprobs=False)
    trained = plan_memory(_head_recipe(), gpus=1, prompt_length=40, fused_logprobs=False)
    model, _ = load_model(recipe.model)
    r = recipe
    heads = [
        order_head_for(r.rollout.order, model, None, r.order_policy, 0),
        edit_head_for(r.rollout, model, None, r.edit_policy, 0),
    ]
    heads = [h for h in heads if h is not None]
    assert len(heads) == (head is not None)
    model.requires_grad_(False)  # as the trainer does
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert not trainable
    assert plan.get("weights") == _nbytes(model.parameters())
    assert plan.get("gradients") == plan.get("optimizer") == plan.get("step") == 0
    params = [p for h in heads for p in h.parameters()]
    if params:
        opt = torch.optim.AdamW(params, lr=1e-3)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        states = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
        assert plan.get("heads") == _nbytes(params) + _nbytes(p.grad for p in params) + _nbytes(states)
    else:
        assert plan.get("heads") == 0
    ref, _ = GRPOTrainer._reference(SimpleNamespace(recipe=recipe), model)
    assert plan.get("reference") == (0 if ref is None else _nbytes(ref.parameters()))
    assert (ref is None) == (head is not None)
    # the model saves nothing for backward: only one layer's forward transient is planned
    n, L, s = micro_batch(recipe), 40 + 60, TINY
    D, F = s["hidden_size"], s["intermediate_size"]
    assert plan.get("activations") == n * L * 4 * (3 * F + 2 * D + 2 * D + 2 * D)
    assert plan.get("activations") < trained.get("activations") / 5


def test_a_frozen_model_saves_no_activations_for_backward(one_thread):
    """What the frozen plan leans on: with requires_grad_(False) the model's forward saves no tensor for a
    backward (only the head's input would be), while a trained one saves about what the plan says."""
    recipe = _recipe()
    model, tok = load_model(recipe.model)
    model.train()
    tr = traits(model, tok)
    g = torch.Generator().manual_seed(0)
    V = model.config.vocab_size
    n, P, Lc = 4, 40, 60
    batch = SimpleNamespace(
        prompt_ids=torch.randint(4, V, (n, P), generator=g),
        prompt_mask=torch.ones(n, P, dtype=torch.long),
        completion_ids=torch.randint(4, V, (n, Lc), generator=g),
        completion_mask=torch.ones(n, Lc, dtype=torch.long),
    )
    est = ESTIMATORS["one_step"](recipe_from_dict({}).estimator, tr)
    noise = est.draw(batch, g)

    def saved() -> int:
        seen = {}

        def pack(t):
            seen[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            est.estimate(model, batch, noise)
        return sum(seen.values())

    assert saved() > 0
    model.requires_grad_(False)
    assert saved() == 0


@pytest.mark.parametrize("k,accumulation", [(1, 1), (2, 1), (3, 1), (3, 4), (2, 8)])
def test_dpo_micro_batch_counts_pairs_per_prompt(k, accumulation):
    """On-policy DPO mines up to train.batch_size x dpo.pairs_per_prompt pairs a step and trainers.dpo._chunks
    splits them into train.gradient_accumulation_steps parts of 2 rows a pair: the plan's micro-batch is the
    largest part the trainer forms."""
    from dllm_rl.memory import micro_batch as planned_rows
    from dllm_rl.trainers.dpo import DPOTrainer

    recipe = load_recipe(
        ROOT / "recipes/tiny/sudoku-dpo.yaml",
        [
            "dpo.pairs=on_policy",
            "dpo.num_generations=8",
            f"dpo.pairs_per_prompt={k}",
            f"train.gradient_accumulation_steps={accumulation}",
        ],
    )
    B = recipe.train.batch_size
    pairs = B * k  # every prompt yields its k pairs (the most the step can hold)
    trainer = SimpleNamespace(recipe=recipe)
    real = max(len(DPOTrainer._rows(chunk, pairs)) for chunk in DPOTrainer._chunks(trainer, pairs))
    assert planned_rows(recipe) == real == 2 * -(-B * k // accumulation)
    plan = plan_memory(recipe, gpus=1, prompt_length=64)
    assert f"micro-batch {real} completions" in dict(plan.info)["update"]
    # branch pairs: at most one a prompt
    branch = load_recipe(ROOT / "recipes/tiny/sudoku-dpo.yaml", ["dpo.pairs=branch"])
    chunks = DPOTrainer._chunks(SimpleNamespace(recipe=branch), branch.train.batch_size)
    assert planned_rows(branch) == 2 * max(len(c) for c in chunks)


@pytest.mark.parametrize("algorithm", ["grpo", "dpo"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_lora_frozen_copy_reference_holds_the_adapters(algorithm, dtype):
    """reference=frozen_copy on a LoRA policy deep-copies peft's base model, whose linears still hold the injected
    fp32 lora_A / lora_B: the plan's reference is the copy's bytes, counted on the copy the trainer builds."""
    from dllm_rl.trainers.common import reference_model

    key = f"{algorithm}.reference"
    data = {
        "algorithm": algorithm,
        "model": {"tiny": TINY, "dtype": dtype, "lora": {"r": 8}},
        "rollout": {"max_completion_length": 60},
        "train": {"batch_size": 2},
        algorithm: {"reference": "frozen_copy", **({"beta": 0.04} if algorithm == "grpo" else {})},
    }
    if algorithm == "dpo":
        data["dpo"].update({"pairs": "on_policy", "num_generations": 4})
        data["estimator"] = {"name": "trajectory"}
    recipe = recipe_from_dict(data)
    plan = plan_memory(recipe, gpus=1, prompt_length=40)
    model, _ = load_model(recipe.model)
    ref, mode = reference_model(recipe, model, "frozen_copy", key)
    assert mode == "frozen_copy"
    assert any("lora_" in name for name, _ in ref.named_parameters())
    assert plan.get("reference") == _nbytes(ref.parameters()) == plan.get("weights")


def test_dpo_with_a_frozen_model_is_its_own_reference():
    """DPO with an order head that trains alone (order_policy.train_model=false) freezes the model and scores the
    reference with the same model (ref_mode same_model): no copy, no model gradients; the head and its reference
    copy (trainers.dpo: ref_order_policy) are planned."""
    over = {"dpo__pairs": "on_policy", "dpo__num_generations": 4}
    frozen = plan_memory(_head_recipe("dpo", order_policy__train_model=False, **over), gpus=1, prompt_length=40)
    trained = plan_memory(_head_recipe("dpo", **over), gpus=1, prompt_length=40)
    assert frozen.get("reference") == frozen.get("gradients") == frozen.get("optimizer") == 0
    assert trained.get("reference") == trained.get("weights") > 0 and trained.get("gradients") > 0
    assert frozen.get("heads") == trained.get("heads") > 0
