"""DiffusionGemma (transformers' DiffusionGemmaForBlockDiffusion) through the adapter: a forward that is a
function of its input and equals the transformers model's own on the same noise tokens, rollouts through the
engine (commit rules, trace replay, batch invariance), estimators with gradients, two GRPO steps, and loading.

Everything runs on a tiny random config (2 layers, 4 experts, canvas 16, a one-layer vision tower) with a
WordLevel tokenizer built offline; skipped when the installed transformers has no DiffusionGemma.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import datasets
import pytest
import torch
import transformers

if not hasattr(transformers, "DiffusionGemmaForBlockDiffusion"):
    pytest.skip(f"transformers {transformers.__version__} has no DiffusionGemma", allow_module_level=True)

from dllm_rl.config import EstimatorConfig, ModelConfig, RolloutConfig, recipe_from_dict
from dllm_rl.errors import ConfigError, DllmRlError
from dllm_rl.estimators import ESTIMATORS
from dllm_rl.models import DiffusionGemmaLM, HFDiffusionLM, traits
from dllm_rl.models.diffusion_gemma import noise_tokens
from dllm_rl.models.load import load_model, wrap_if_needed
from dllm_rl.rollout import generate
from dllm_rl.tasks.base import Task

V, CANVAS = 300, 16
SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>"]  # ids 0..3, as in Gemma's vocabulary
IMAGE = ["<boi>", "<eoi>", "<image>"]  # the config's image ids, the last three of the vocabulary
PROMPTS = ["w5 w6 w7", "w9", "w10 w11 w12 w13 w14 w15", "w40 w41"]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is several times faster than two on a shared box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def build_tokenizer():
    """A WordLevel tokenizer over the config's vocabulary: Gemma's special ids, words w4..w296, image tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"w{i}": i for i in range(len(SPECIALS), V - len(IMAGE))})
    vocab.update({t: V - len(IMAGE) + j for j, t in enumerate(IMAGE)})
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    t = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>"
    )
    t.add_special_tokens({"additional_special_tokens": IMAGE})
    assert len(t) == V
    return t


def build_raw(seed: int = 0):
    text = {
        "vocab_size": V,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 32,
        "max_position_embeddings": 512,
        "sliding_window": 64,
        "num_experts": 4,
        "top_k_experts": 2,
        "moe_intermediate_size": 64,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "layer_types": ["sliding_attention", "full_attention"],
    }
    vision = {
        "model_type": "gemma4_vision",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 8,
    }  # the default tower is 168M
    cfg = transformers.DiffusionGemmaConfig(
        text_config=text,
        vision_config=vision,
        canvas_length=CANVAS,
        boi_token_id=V - 3,
        eoi_token_id=V - 2,
        image_token_id=V - 1,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return transformers.DiffusionGemmaForBlockDiffusion(cfg).eval()


@pytest.fixture(scope="module")
def model():
    return DiffusionGemmaLM(build_raw())


@pytest.fixture(scope="module")
def saved(tmp_path_factory, model, tok):
    path = tmp_path_factory.mktemp("diffusion_gemma")
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def canvas_batch():
    """Two left-padded rows [prompt (5) | completion (6)] with committed tokens and sentinels."""
    S = V  # the sentinel
    ids = torch.tensor([[0, 0, 2, 7, 8, 40, S, S, 41, S, S], [2, 5, 6, 7, 9, S, 12, S, S, S, 1]])
    attn = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1], [1] * 11])
    return ids, attn


# --------------------------------------------------------------------------------------------- forward


def test_forward_is_a_function_of_its_input_and_matches_transformers(model):
    ids, attn = canvas_batch()
    P, L = 5, ids.shape[1]
    assert traits(model).mask_token_id == V and not traits(model).supports_cache
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=attn, logits_range=(P, L)).logits
        b = model(input_ids=ids, attention_mask=attn, logits_range=(P, L)).logits
        assert torch.equal(a, b) and a.shape == (2, L - P, V + 1)
        assert torch.isneginf(a[..., V]).all() and torch.isfinite(a[..., :V]).all()

        # the transformers model called by hand on the same noise tokens
        pos = (attn.cumsum(-1) - 1).clamp(min=0)
        real = attn[:, :P].sum(-1, keepdim=True)
        dec_pos = real + torch.arange(CANVAS)
        noise = noise_tokens(ids, attn, pos, torch.cat([pos[:, :P], dec_pos], 1), V)
        canvas = torch.cat([ids[:, P:], torch.full((2, CANVAS - (L - P)), V)], 1)  # padded to the full canvas
        canvas = torch.where(canvas == V, noise[:, P:], canvas)
        direct = model.model(
            input_ids=ids[:, :P],
            attention_mask=attn[:, :P],
            position_ids=pos[:, :P],
            decoder_input_ids=canvas,
            decoder_position_ids=dec_pos,
            decoder_attention_mask=torch.cat([attn[:, :P], torch.ones(2, CANVAS, dtype=torch.long)], 1),
        ).logits
        assert torch.allclose(a[..., :V], direct[:, : L - P], atol=1e-6, rtol=0)

        # the noise ignores padding and the rest of the batch; it changes with the canvas (renoising)
        alone = model(input_ids=ids[:1, 2:], attention_mask=attn[:1, 2:], logits_range=(P - 2, L - 2)).logits
        assert torch.allclose(alone, a[:1], atol=1e-5, rtol=0)
        assert ((noise >= 0) & (noise < V)).all()
        moved = ids.clone()
        moved[0, 5] = 41  # another committed token
        other = noise_tokens(moved, attn, pos, torch.cat([pos[:, :P], dec_pos], 1), V)
        assert not torch.equal(other[0, P:], noise[0, P:]) and torch.equal(other[1], noise[1])
        # a key-padding 4-D mask is accepted and means the same
        four = (attn[:, None, None, :].bool() & attn[:, None, :, None].bool()) | torch.eye(L, dtype=torch.bool)
        assert torch.allclose(model(input_ids=ids, attention_mask=four, logits_range=(P, L)).logits, a, atol=1e-6)


def test_forward_refuses_what_it_cannot_do(model):
    ids, attn = canvas_batch()
    L = ids.shape[1]
    with torch.no_grad():
        with pytest.raises(DllmRlError, match="logits_range"):
            model(input_ids=ids, attention_mask=attn)
        with pytest.raises(DllmRlError, match="block_length"):
            model(input_ids=ids, attention_mask=attn, logits_range=(5, 8))
        with pytest.raises(DllmRlError, match="cache"):
            model(input_ids=ids, attention_mask=attn, logits_range=(5, L), kv_cache=object())
        long = torch.cat([ids, torch.full((2, CANVAS), V)], 1)
        with pytest.raises(DllmRlError, match="max_completion_length <= 16"):
            model(input_ids=long, logits_range=(5, long.shape[1]))
        causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None].expand(2, 1, L, L)
        with pytest.raises(DllmRlError, match="bidirectional"):
            model(input_ids=ids, attention_mask=causal, logits_range=(5, L))
    with pytest.raises(DllmRlError, match="DiffusionGemmaLM"):
        HFDiffusionLM(model.model)


# --------------------------------------------------------------------------------------------- rollouts


@pytest.mark.parametrize("commit", ["top_k", "threshold"])
def test_generate_replays_and_is_batch_invariant(model, tok, commit):
    cfg = RolloutConfig(max_completion_length=12, steps=6, temperature=1.0, commit=commit, threshold=0.05)
    out = generate(model, tok, PROMPTS, cfg, torch.Generator().manual_seed(0), record_states=True)
    ids = out.completion_ids
    assert ids.shape == (4, 12) and (ids != V).all() and (ids < V).all()
    trace = out.trace
    for row in range(len(PROMPTS)):  # the trace replays every intermediate canvas
        states = trace.replay(row)
        assert len(states) == len(out.stats["states"][row])
        assert all(torch.equal(s, r) for s, r in zip(states, out.stats["states"][row]))
    # the trajectory estimator re-scores each token from the state it was committed in: the sampler's log-probs
    est_cfg = EstimatorConfig(name="trajectory")
    est = ESTIMATORS["trajectory"](est_cfg, traits(model))
    with torch.no_grad():
        logps = est.estimate(model, out, est.draw(out)).logps
    scored = out.completion_mask.bool() & (trace.commit_step >= 0)
    assert scored.sum() >= 12
    assert torch.allclose(logps[scored], trace.token_logprob[scored], atol=1e-5, rtol=0)
    # batch invariance: a prompt decodes alike alone and among others
    alone = generate(model, tok, [PROMPTS[1]], cfg, torch.Generator().manual_seed(0))
    assert torch.equal(alone.completion_ids[0], ids[1]) and alone.completions[0] == out.completions[1]


def test_engine_settings_it_cannot_honour(model, tok):
    base = RolloutConfig(max_completion_length=12, steps=6)
    with pytest.raises(ConfigError, match="rollout.cache=none"):
        generate(model, tok, PROMPTS[:1], replace(base, cache="prefix"))
    with pytest.raises(DllmRlError, match="block_length"):
        generate(model, tok, PROMPTS[:1], replace(base, block_length=6))
    with pytest.raises(DllmRlError, match="max_completion_length"):
        generate(model, tok, PROMPTS[:1], replace(base, max_completion_length=24, steps=6))


# ------------------------------------------------------------------------------------------- estimators


@pytest.mark.parametrize("name,sc", [("trajectory", "none"), ("one_step", "none"), ("one_step", "two_pass")])
def test_estimators_backpropagate(tok, name, sc):
    model = DiffusionGemmaLM(build_raw(), self_conditioning=sc).train()
    rollout = RolloutConfig(max_completion_length=8, steps=4, temperature=1.0)
    batch = generate(model, tok, PROMPTS[:2], rollout, torch.Generator().manual_seed(1))
    cfg = EstimatorConfig(name=name, p_mask_prompt=0.3)
    est = ESTIMATORS[name](cfg, traits(model))
    noise = est.draw(batch, torch.Generator().manual_seed(0))
    logps = est.estimate(model, batch, noise).logps
    assert torch.isfinite(logps).all() and (logps[batch.completion_mask.bool()] < 0).all()
    (logps * batch.completion_mask).sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    moves = lambda t: t.grad is not None and bool(t.grad.abs().sum() > 0)
    dec = model.model.model.decoder  # its weights are tied to the encoder's (the cache) and to the LM head
    for must in [
        dec.embed_tokens.weight,
        dec.layers[0].self_attn.q_proj.weight,
        dec.layers[1].experts.gate_up_proj,
        dec.layers[0].router.proj.weight,
    ]:
        assert moves(must)
    # without a signal the self-conditioning block learns nothing; with two passes it does
    assert moves(dec.self_conditioning.gate_proj.weight) == (sc == "two_pass")


# ---------------------------------------------------------------------------------------------- training


def test_two_grpo_steps_train_and_checkpoint(tmp_path, tok):
    model = DiffusionGemmaLM(build_raw(seed=3))
    rows = [{"prompt": p} for p in PROMPTS]
    task = Task("tiny", datasets.Dataset.from_list(rows), datasets.Dataset.from_list(rows[:2]), "xml_count")

    def even_tokens(prompts, completions, completion_ids, **kw):  # a trivial reward with spread in a group
        return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]

    recipe = recipe_from_dict(
        {
            "algorithm": "grpo",
            "rollout": {"max_completion_length": 8, "steps": 4, "temperature": 1.0},
            "grpo": {"num_generations": 2, "beta": 0.04},
            "optim": {"lr": 1e-3, "lr_scheduler": "constant"},
            "train": {
                "max_steps": 2,
                "batch_size": 2,
                "save_steps": 1,
                "logging_steps": 1,
                "eval_steps": 0,
                "output_dir": str(tmp_path / "run"),
            },
            "eval": {"size": 2},
        }
    )
    from dllm_rl.trainers.grpo import GRPOTrainer

    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = GRPOTrainer(recipe, reward_funcs=[even_tokens], model=model, tokenizer=tok, task=task).train()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    names = {id(p): n for n, p in model.named_parameters()}  # tied weights are listed once
    dec = model.model.model.decoder
    assert {names[id(dec.layers[0].self_attn.q_proj.weight)], names[id(dec.embed_tokens.weight)]} <= moved
    ckpt = tmp_path / "run" / "checkpoint-2"
    assert (ckpt / "config.json").is_file() and (ckpt / "model.safetensors").is_file()
    loaded, _ = load_model(ModelConfig(path=str(ckpt)))
    trained = dict(model.named_parameters())
    assert isinstance(loaded, DiffusionGemmaLM)
    assert all(torch.allclose(p, trained[n]) for n, p in loaded.named_parameters())
    assert result["final"].endswith("final")


# ----------------------------------------------------------------------------------------------- loading


def test_load_model_gives_the_adapter(saved, model, tok):
    loaded, tokenizer = load_model(ModelConfig(path=str(saved)))
    assert isinstance(loaded, DiffusionGemmaLM) and type(loaded.model).__name__ == "DiffusionGemmaForBlockDiffusion"
    assert traits(loaded, tokenizer).mask_token_id == V and tokenizer.pad_token_id == 0
    ids, attn = canvas_batch()
    with torch.no_grad():
        a = model(input_ids=ids, attention_mask=attn, logits_range=(5, ids.shape[1])).logits
        b = loaded(input_ids=ids, attention_mask=attn, logits_range=(5, ids.shape[1])).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0)
    raw = copy.deepcopy(model.model)
    assert isinstance(wrap_if_needed(raw), DiffusionGemmaLM) and wrap_if_needed(loaded) is loaded


def test_lora_through_load_model_round_trips(saved, tmp_path):
    from dllm_rl.config import LoraConfig

    lora, tok = load_model(ModelConfig(path=str(saved), lora=LoraConfig(r=4)))
    assert isinstance(lora, DiffusionGemmaLM) and type(lora.model).__name__ == "PeftModel"
    trainable = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in lora.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a non-trivial adapter, so that the round trip shows
    lora.save_pretrained(tmp_path / "adapter", state_dict=lora.state_dict())  # as checkpoint.save_model_files
    tok.save_pretrained(tmp_path / "adapter")
    back, _ = load_model(ModelConfig(path=str(tmp_path / "adapter")))
    assert isinstance(back, DiffusionGemmaLM) and type(back.model).__name__ == "PeftModel"
    ids, attn = canvas_batch()
    with torch.no_grad():
        a = lora(input_ids=ids, attention_mask=attn, logits_range=(5, ids.shape[1])).logits
        b = back(input_ids=ids, attention_mask=attn, logits_range=(5, ids.shape[1])).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_lora_reference_is_the_adapter_disabled_base_through_the_adapter(saved, tok):
    """peft wraps the transformers model inside DiffusionGemmaLM: the reference is still that model with its
    adapters off (no second copy), and GRPO's KL reads it so: 0 before the first update."""
    from dllm_rl.config import LoraConfig
    from dllm_rl.trainers.common import reference_model
    from dllm_rl.trainers.grpo import GRPOTrainer

    lora, _ = load_model(ModelConfig(path=str(saved), lora=LoraConfig(r=4)))
    recipe = recipe_from_dict({"algorithm": "grpo", "grpo": {"beta": 0.04}})
    assert reference_model(recipe, lora, "auto", "grpo.reference") == (None, "adapter_disabled")
    assert reference_model(recipe, lora, "adapter_disabled", "grpo.reference") == (None, "adapter_disabled")
    rows = [{"prompt": p} for p in PROMPTS]
    task = Task("tiny", datasets.Dataset.from_list(rows), None, "xml_count")
    recipe = recipe_from_dict(
        {
            "algorithm": "grpo",
            "rollout": {"max_completion_length": 8, "steps": 4, "temperature": 1.0},
            "grpo": {"num_generations": 2, "beta": 0.04},
            "train": {"max_steps": 1, "batch_size": 2, "save_steps": 0, "eval_steps": 0, "logging_steps": 1},
        }
    )
    recipe.train.output_dir = str(saved.parent / "lora-grpo")
    spread = lambda prompts, completions, completion_ids, **kw: [float(i % 2) for i in range(len(prompts))]
    trainer = GRPOTrainer(recipe, reward_funcs=[spread], model=lora, tokenizer=tok, task=task)
    assert trainer.ref is None and trainer.ref_mode == "adapter_disabled"
    assert trainer.step(0)["kl"] == 0.0  # the adapters start at B = 0: the policy is the reference


def test_plan_reads_the_text_model_of_the_composite_config(saved):
    from dllm_rl.memory import format_plan, plan_memory

    recipe = recipe_from_dict({"algorithm": "grpo", "model": {"path": str(saved)}})
    text = format_plan(plan_memory(recipe))
    assert "total per GPU" in text and str(saved) in text


def test_a_peft_config_keeps_the_adapters_settings(tok):
    """TRL's peft_config= on a wrapped model puts the adapters inside it and keeps its settings (here the
    two-pass self-conditioning); the adapters are the only trainable weights."""
    from peft import LoraConfig as PeftLora

    from dllm_rl.models.base import peft_of
    from dllm_rl.models.load import apply_peft_config

    model = DiffusionGemmaLM(build_raw(), self_conditioning="two_pass")
    out = apply_peft_config(model, PeftLora(r=4, target_modules="all-linear"), seed=0)
    assert out is model and out.self_conditioning == "two_pass" and peft_of(out) is out.model
    assert all("lora_" in n for n, p in out.named_parameters() if p.requires_grad)
