"""model.gradient_checkpointing: true must recompute the checkpointed layers during an update, for GRPO and SFT,
with and without LoRA, and the gradient must still reach the trained weights.

transformers checkpoints a `GradientCheckpointingLayer` only while the model is in training mode, so what is
counted is the real thing: the forwards of layer 0's attention during one update against the model's own forwards
in that update. With checkpointing each model forward runs it twice (once forward, once recomputed in backward);
without it, once. (transformers checkpoints a layer's `forward`, so hooks on the layer itself stay outside the
checkpoint and fire once: the attention inside it is what is recomputed.)"""

from pathlib import Path

import pytest
import torch

from dllm_rl.config import recipe_from_dict
from dllm_rl.models.base import unwrap
from dllm_rl.trainers.grpo import GRPOTrainer
from dllm_rl.trainers.sft import SFTTrainer

ROOT = Path(__file__).resolve().parents[2]
SFT_CKPT = "checkpoints/tiny/sudoku-sft"


def _recipe(algorithm, out, checkpointing, lora):
    data = {
        "algorithm": algorithm,
        "model": {"gradient_checkpointing": checkpointing, "lora": {"r": 4 if lora else 0}},
        "data": {"task": "sudoku", "train_size": 32, "eval_size": 4},
        "rollout": {"max_completion_length": 20, "steps": 10},
        "optim": {"lr": 1e-3, "lr_scheduler": "constant"},
        "train": {
            "max_steps": 1,
            "batch_size": 4,
            "output_dir": str(out),
            "save_steps": 0,
            "eval_steps": 0,
            "logging_steps": 1,
            "num_threads": 1,
        },
    }
    if algorithm == "grpo":
        data["model"]["path"] = SFT_CKPT
        data["rollout"]["temperature"] = 1.0
        data["grpo"] = {"num_generations": 4}
    else:
        data["model"]["tiny"] = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64}
    return recipe_from_dict(data)


class Counter:
    """Forwards of the whole model and of its first layer's attention while `on`."""

    def __init__(self, model):
        self.on, self.model, self.layer = False, 0, 0
        base = unwrap(model)
        if hasattr(base, "get_base_model"):
            base = base.get_base_model()
        layers = base.layers
        base.register_forward_hook(lambda *a: self._add("model"))
        layers[0].self_attn.register_forward_hook(lambda *a: self._add("layer"))

    def _add(self, what):
        if self.on:
            setattr(self, what, getattr(self, what) + 1)


def count_ones(prompts, completions, **kwargs):
    """A reward that differs between samples of a group (so the update has a gradient to apply)."""
    return [float(c[-1]["content"].count("1")) for c in completions]


def _trained(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _moved(before, model):
    after = dict(model.named_parameters())
    return [n for n, p in before.items() if not torch.equal(p, after[n].detach())]


def _run_one_update(algorithm, tmp_path, checkpointing, lora):
    """(layer-0 attention forwards, model forwards, names of the trained weights that moved) over one update."""
    r = _recipe(algorithm, tmp_path / f"{algorithm}-{checkpointing}-{lora}", checkpointing, lora)
    if algorithm == "grpo":
        trainer = GRPOTrainer(r, reward_funcs=[count_ones])
        phase = "update"
    else:
        trainer = SFTTrainer(r)
        phase = "training_step"
    counter = Counter(trainer.model)
    real = getattr(trainer, phase)

    def counted(*args, **kwargs):
        counter.on = True
        try:
            return real(*args, **kwargs)
        finally:
            counter.on = False

    setattr(trainer, phase, counted)
    before = _trained(trainer.model)
    if algorithm == "grpo":
        trainer.step(0)
    else:
        trainer.training_step(0)
    return counter.layer, counter.model, _moved(before, trainer.model)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("algorithm", ["grpo", "sft"])
def test_checkpointed_layers_recompute_in_the_update(tmp_path, monkeypatch, algorithm, lora):
    monkeypatch.chdir(ROOT)
    layer, model, moved = _run_one_update(algorithm, tmp_path, checkpointing=True, lora=lora)
    assert model > 0 and layer == 2 * model, (layer, model)
    assert moved and (not lora or all("lora_" in n for n in moved)), moved
    if lora:
        assert any(".layers.0." in n for n in moved), moved  # the gradient crossed the checkpointed layer


@pytest.mark.parametrize("algorithm", ["grpo", "sft"])
def test_without_checkpointing_each_layer_runs_once(tmp_path, monkeypatch, algorithm):
    monkeypatch.chdir(ROOT)
    layer, model, moved = _run_one_update(algorithm, tmp_path, checkpointing=False, lora=False)
    assert model > 0 and layer == model, (layer, model)
    assert moved
