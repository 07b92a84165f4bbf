"""What a LoRA checkpoint's base is rebuilt from (models/load.py _adapter_base), the tokenizer of a model built from
scratch, and the 4-bit settings."""

import json
from pathlib import Path

import pytest
import torch

from dllm_rl.config import LoraConfig, ModelConfig, TinyModelConfig, recipe_from_dict, save_recipe
from dllm_rl.errors import DllmRlError
from dllm_rl.models import load
from dllm_rl.models.load import four_bit_config, load_model, recipe_tokenizer

ROOT = Path(__file__).resolve().parents[2]
SFT = str(ROOT / "checkpoints/tiny/sudoku-sft")
TINY = {"hidden_size": 32, "num_layers": 2, "num_heads": 2, "intermediate_size": 64, "max_position_embeddings": 64}


def _base_weights(model):
    return {n: p for n, p in model.state_dict().items() if "lora_" not in n}


def _save_scratch_lora(directory: Path, seed: int = 7, recipe: bool = True):
    """A LoRA run on the tiny model built from scratch, saved as a run saves it (checkpoint.save_model_files:
    the adapter, the tokenizer, recipe.yaml), with lora_B moved so that the adapter matters."""
    r = recipe_from_dict({"model": {"tiny": TINY, "lora": {"r": 4}}, "train": {"seed": seed}})
    model, tok = load_model(r.model, seed=seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    if recipe:
        save_recipe(r, directory / "recipe.yaml")
    return model, tok


def _set_base(directory: Path, base):
    config = json.loads((directory / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (directory / "adapter_config.json").write_text(json.dumps(config))


def test_a_lora_on_a_model_built_from_scratch_reloads_onto_the_same_base(tmp_path):
    """The adapter records the seed its base was drawn from; the reload (here with another recipe's model section,
    as `dllm-rl eval --checkpoint` gives) rebuilds that base from recipe.yaml's model.tiny, not a seed-0 default."""
    model, tok = _save_scratch_lora(tmp_path)
    reloaded, tok2 = load_model(ModelConfig(), path=str(tmp_path))
    want, got = _base_weights(model), _base_weights(reloaded)
    assert sorted(want) == sorted(got) and all(torch.equal(want[n], got[n]) for n in want)
    ids = torch.tensor([tok("12_4\n_41_", add_special_tokens=False)["input_ids"] + [tok.mask_token_id] * 4])
    model.eval(), reloaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    assert len(tok2) == len(tok) and len(recipe_tokenizer(ModelConfig(path=str(tmp_path)))) == len(tok)


def test_a_scratch_lora_without_its_recipe_is_refused(tmp_path):
    _save_scratch_lora(tmp_path, recipe=False)
    with pytest.raises(DllmRlError, match=r"tiny model built from scratch .*seed=7.*restore .*recipe.yaml"):
        load_model(ModelConfig(), path=str(tmp_path))


@pytest.mark.parametrize("base", [None, ""])
def test_a_lora_checkpoint_that_names_no_base_is_refused_not_put_on_a_random_model(tmp_path, base):
    _save_scratch_lora(tmp_path)
    _set_base(tmp_path, base)
    for call in (
        lambda: load_model(ModelConfig(), path=str(tmp_path)),
        lambda: recipe_tokenizer(ModelConfig(path=str(tmp_path))),
    ):
        with pytest.raises(DllmRlError, match=rf"LoRA checkpoint {tmp_path} names no base model .*set that field"):
            call()


def test_a_lora_checkpoint_whose_base_is_gone_says_where_the_path_came_from(tmp_path):
    adapter = tmp_path / "adapter"
    _save_scratch_lora(adapter)
    gone = str(tmp_path / "moved-away")
    _set_base(adapter, gone)
    words = (
        rf"LoRA checkpoint {adapter} names base '{gone}' \(adapter_config.json base_model_name_or_path\), which "
        r"does not exist; restore it or edit that field"
    )
    with pytest.raises(DllmRlError, match=words):
        load_model(ModelConfig(), path=str(adapter))
    with pytest.raises(DllmRlError, match=words):
        recipe_tokenizer(ModelConfig(path=str(adapter)))


def test_a_model_built_from_scratch_loads_its_tokenizer_with_trust_remote_code(monkeypatch):
    seen = []
    real = load.load_tokenizer

    def recording(path, trust_remote_code=False, key="model.path"):
        seen.append(trust_remote_code)
        return real(path, trust_remote_code, key)

    monkeypatch.setattr(load, "load_tokenizer", recording)
    cfg = ModelConfig(trust_remote_code=True, tiny=TinyModelConfig(**TINY))
    load_model(cfg)
    recipe_tokenizer(cfg)
    assert seen == [True, True]


@pytest.mark.parametrize(
    "dtype, compute",
    [("bfloat16", torch.bfloat16), ("float16", torch.float16), ("float32", torch.bfloat16)],
)
def test_four_bit_computes_in_the_recipe_dtype(monkeypatch, dtype, compute):
    config = four_bit_config(dtype)
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4" and config.bnb_4bit_compute_dtype == compute
    asked = []

    class Stop:
        @staticmethod
        def from_pretrained(path, quantization_config=None, **kwargs):
            asked.append(quantization_config.bnb_4bit_compute_dtype)
            raise RuntimeError("stop before loading")

    monkeypatch.setattr(load, "_four_bit", lambda: None)  # the CUDA check: bitsandbytes is not loaded here
    monkeypatch.setattr(load, "model_class", lambda path, trust_remote_code: Stop)
    with pytest.raises(RuntimeError, match="stop before loading"):
        load_model(ModelConfig(path=SFT, dtype=dtype, load_in_4bit=True, lora=LoraConfig(r=4)))
    assert asked == [compute]
