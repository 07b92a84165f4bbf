"""The built-in character tokenizer: a real `PreTrainedTokenizerFast`, built offline with `tokenizers`.

One token per printable ASCII character plus newline, and the special tokens a masked diffusion LM needs:
pad, mask, eos, bos and chat-role markers. The chat template renders `<|user|>...<|assistant|>`.
Saved with `save_pretrained`, it loads back with `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import string

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {
    "pad_token": "<|pad|>",
    "mask_token": "<|mask|>",
    "eos_token": "<|eos|>",
    "bos_token": "<|bos|>",
}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
CHARSET = "".join(c for c in string.printable if c not in "\t\r\x0b\x0c")  # 95 printable + "\n"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def build_char_tokenizer(charset: str = CHARSET) -> PreTrainedTokenizerFast:
    """Character-level tokenizer: special tokens take ids 0..6, then one id per character."""
    specials = list(SPECIAL_TOKENS.values()) + ROLE_TOKENS
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in charset:
        vocab.setdefault(ch, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=None))
    # every character is its own pre-token; decoding concatenates them back without separators
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        **SPECIAL_TOKENS,
        additional_special_tokens=ROLE_TOKENS,
        model_max_length=4096,
        padding_side="left",
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok
