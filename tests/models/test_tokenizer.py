from transformers import AutoTokenizer


def test_round_trip_and_special_tokens(tokenizer):
    text = "12_4\n3412\n(3+4)*2 = 14, ok!"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) == len(text) and tokenizer.decode(ids) == text
    for name in ("mask", "pad", "eos"):
        assert getattr(tokenizer, f"{name}_token_id") is not None
    assert len({tokenizer.mask_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id}) == 3
    assert tokenizer.decode(ids + [tokenizer.eos_token_id, tokenizer.pad_token_id], skip_special_tokens=True) == text


def test_chat_template(tokenizer):
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False
    )
    assert text == "<|user|>hi<|assistant|>"
    assert len(tokenizer(text, add_special_tokens=False).input_ids) == 4  # role markers are single tokens


def test_save_load(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Numbers: 3 4\nTarget: 12"
    assert loaded(text).input_ids == tokenizer(text).input_ids
    assert loaded.mask_token == "<|mask|>" and loaded.padding_side == "left"
    assert loaded.chat_template == tokenizer.chat_template
