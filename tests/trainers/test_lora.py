"""LoRA GRPO on the tiny SFT checkpoint: the reference is the base with the adapter disabled (no second copy
of the weights), only adapter weights move, and the saved adapter reloads onto the base with identical
outputs."""

import json
from pathlib import Path

import torch

from dllm_rl.config import recipe_from_dict
from dllm_rl.models.load import load_model
from dllm_rl.trainers.grpo import GRPOTrainer

ROOT = Path(__file__).resolve().parents[2]
BASE = "checkpoints/tiny/sudoku-sft"  # relative, as a recipe names it: the adapter must still reload elsewhere


def _recipe(out_dir):
    return recipe_from_dict(
        {
            "algorithm": "grpo",
            "model": {"path": BASE, "lora": {"r": 8, "alpha": 16}},
            "data": {
                "task": "sudoku",
                "train_size": 64,
                "eval_size": 4,
                "options": {"min_empty": 8, "max_empty": 12},
            },
            "rollout": {"max_completion_length": 20, "steps": 10, "temperature": 1.0},
            "grpo": {"num_generations": 4, "num_iterations": 2, "beta": 0.04},
            "rewards": [{"name": "sudoku_cells"}],
            "optim": {"lr": 1e-3, "lr_scheduler": "constant"},
            "train": {
                "max_steps": 2,
                "batch_size": 4,
                "output_dir": str(out_dir),
                "save_steps": 0,
                "eval_steps": 0,
                "logging_steps": 10,
                "resume": False,
                "num_threads": 1,
            },
            "eval": {"size": 4},
        }
    )


def frozen_params(model):
    return [p for p in model.parameters() if not p.requires_grad]


def _ids(tokenizer):
    ids = tokenizer("12_4\n_41_\n4_2_\n21_3", add_special_tokens=False)["input_ids"]
    return torch.tensor([ids + [tokenizer.mask_token_id] * 8])


def test_lora_grpo_reference_update_and_reload(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    torch.manual_seed(0)
    trainer = GRPOTrainer(_recipe(tmp_path / "run"))
    model = trainer.model

    # reference = the base model with the adapter switched off: no frozen copy exists
    assert trainer.ref is None and trainer.ref_mode == "adapter_disabled"
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert all("lora_" not in n for n in frozen)
    assert all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}

    # ... and its log-probs are the base model's (loaded separately, without LoRA)
    base, _ = load_model(recipe_from_dict({"model": {"path": BASE}}).model)
    assert sum(p.numel() for p in frozen_params(model)) == sum(p.numel() for p in base.parameters())
    batch, _ = trainer.rollout([trainer.task.train[i] for i in range(2)], step=0)
    noise = trainer.estimator.draw(batch, torch.Generator().manual_seed(1))
    ref = trainer._no_grad(trainer._ref_estimate, batch, noise)
    expected = trainer._estimate(base, batch, noise, grad=False).logps
    torch.testing.assert_close(ref, expected)

    result = trainer.train()

    # only adapter weights moved (lora_B starts at zero: a run that moved nothing leaves it zero)
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert moved and all("lora_" in n for n in moved), moved
    assert any("lora_B" in n for n in moved)

    # the run saved an adapter, not a full model; it reloads onto the base from any working directory
    final = Path(result["final"])
    assert (final / "adapter_config.json").is_file() and not (final / "model.safetensors").exists()
    assert Path(json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    reloaded, tok2 = load_model(trainer.recipe.model, path=str(final))
    ids = _ids(tok2)
    model.eval()
    reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
        assert not torch.equal(base(input_ids=ids).logits, model(input_ids=ids).logits)  # the adapter matters


def test_lora_initialisation_follows_the_seed_not_the_global_generator(monkeypatch):
    """lora_A is random: it is drawn from the run's seed, so a rerun (or every process of a distributed run, whose
    global generators have been used differently) starts from the same adapters."""
    monkeypatch.chdir(ROOT)
    cfg = _recipe("unused").model

    def lora_a(global_seed, seed):
        torch.manual_seed(global_seed)
        model, _ = load_model(cfg, seed=seed)
        return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n])

    a = lora_a(global_seed=1, seed=0)
    assert torch.equal(a, lora_a(global_seed=2, seed=0)) and not torch.equal(a, lora_a(global_seed=1, seed=1))
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    load_model(cfg, seed=0)
    assert torch.equal(torch.rand(3), expected)  # the global generator is left as it was


def test_a_four_bit_model_is_not_cast_after_loading(monkeypatch):
    """transformers refuses to cast a bitsandbytes model to another dtype: load_model loads it in the recipe's
    dtype and leaves it. bitsandbytes needs a GPU, so the quantized load is stood in for by marking a real
    load as transformers' bitsandbytes quantizer marks it."""
    from transformers.utils.quantization_config import QuantizationMethod

    import dllm_rl.models.load as L

    monkeypatch.chdir(ROOT)
    real = L.model_class

    def marked(path, trust_remote_code):
        cls = real(path, trust_remote_code)

        class Marked:
            @staticmethod
            def from_pretrained(path, quantization_config=None, **kwargs):
                model = cls.from_pretrained(path, **kwargs)
                model.quantization_method = QuantizationMethod.BITS_AND_BYTES
                return model

        return Marked

    monkeypatch.setattr(L, "model_class", marked)
    monkeypatch.setattr(L, "_four_bit", lambda: None)
    cfg = recipe_from_dict({"model": {"path": BASE, "dtype": "bfloat16", "load_in_4bit": True}}).model
    model, _ = load_model(cfg)
    assert next(model.parameters()).dtype == torch.bfloat16  # loaded in its dtype (from_pretrained's dtype=)
