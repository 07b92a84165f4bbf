import pytest
import torch
from transformers import AutoModel, AutoModelForMaskedLM

import dllm_rl  # noqa: F401  (Auto registration)
from dllm_rl.errors import DllmRlError
from dllm_rl.models import traits
from dllm_rl.models.load import resolve_model_dir
from dllm_rl.models.masks import block_ids, mask_from_block_ids


@pytest.mark.parametrize("attention", ["bidirectional", "block_causal"])
def test_forward_shapes(model_factory, attention):
    m = model_factory(attention=attention)
    x = torch.randint(10, 90, (3, 17))
    out = m(x, output_hidden_states=True)
    assert out.logits.shape == (3, 17, m.config.vocab_size)
    assert out.hidden_states[-1].shape == (3, 17, 32)
    assert m(x, logits_range=(5, 9)).logits.shape == (3, 4, m.config.vocab_size)


def test_block_causal_hides_later_blocks(model_factory):
    m = model_factory(attention="block_causal", block_size=4)
    P, Lc = 5, 12
    x = torch.randint(10, 90, (2, P + Lc))
    attn = torch.ones_like(x)
    bid = block_ids(attn, P, 4)
    mask = mask_from_block_ids(bid, bid, causal_blocks=True)
    base = m(x, attention_mask=mask).logits
    y = x.clone()
    y[:, P + 8 :] = torch.randint(10, 90, (2, 4))  # perturb the last block
    pert = m(y, attention_mask=mask).logits
    torch.testing.assert_close(base[:, : P + 8], pert[:, : P + 8], rtol=0, atol=0)
    assert not torch.allclose(base[:, P + 8 :], pert[:, P + 8 :])
    # bidirectional attention does see the change everywhere
    b = model_factory(attention="bidirectional")
    assert not torch.allclose(b(x).logits[:, :P], b(y).logits[:, :P])


def test_padding_is_invisible(model_factory):
    m = model_factory()
    x = torch.randint(10, 90, (1, 9))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    attn = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 9, dtype=torch.long)], 1)
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(
        m(padded, attention_mask=attn, position_ids=pos).logits[:, 3:], m(x).logits, rtol=1e-5, atol=1e-5
    )


def test_cache_equals_recompute(model_factory):
    """Block-causal cache: forwarding block by block with cached K/V equals one full forward."""
    m = model_factory(attention="block_causal", block_size=4)
    P, Lc = 6, 8
    x = torch.randint(10, 90, (2, P + Lc))
    bid = block_ids(torch.ones_like(x), P, 4)
    full = m(x, attention_mask=mask_from_block_ids(bid, bid, True)).logits
    cache = m.new_cache(2, P + Lc)
    pieces = []
    for lo, hi in [(0, P), (P, P + 4), (P + 4, P + 8)]:
        mask = mask_from_block_ids(bid[:, lo:hi], bid[:, :hi], True)
        pieces.append(m(x[:, lo:hi], attention_mask=mask, kv_cache=cache, cache_start=lo, kv_len=hi).logits)
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-5, atol=1e-5)


def test_save_load_round_trip_is_exact(model_factory, tokenizer, tmp_path):
    m = model_factory(attention="block_causal")
    m.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    x = torch.randint(10, 90, (2, 11))
    for cls in (AutoModel, AutoModelForMaskedLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert type(loaded) is type(m) and loaded.config.attention == "block_causal"
        assert torch.equal(loaded(x).logits, m(x).logits)
    assert traits(loaded, tokenizer).mask_token_id == tokenizer.mask_token_id


def test_model_without_mask_token_is_refused(model_factory):
    m = model_factory()
    m.config.mask_token_id = None
    with pytest.raises(DllmRlError, match="no mask token"):
        traits(m, None)


def test_not_a_model_directory(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(DllmRlError, match="is not a model directory"):
        resolve_model_dir(str(tmp_path))
    with pytest.raises(DllmRlError, match="does not exist"):
        resolve_model_dir(str(tmp_path / "missing" / "dir"))
    assert resolve_model_dir("GSAI-ML/LLaDA-8B-Instruct") == "GSAI-ML/LLaDA-8B-Instruct"
