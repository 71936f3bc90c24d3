"""Small character-level tokenizers built locally (tests, synthetic tasks, the demo base model).

The result is an ordinary ``PreTrainedTokenizerFast`` with a chat template, saved and loaded with
``save_pretrained``/``from_pretrained`` like any hub tokenizer, so the pipeline needs no special case.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ["<|pad|>", "<|eos|>", "<|bos|>", "<|system|>", "<|user|>", "<|assistant|>"]
DEFAULT_CHARS = string.digits + string.ascii_letters + " +-*/=()[]{}<>.,:;?!'\"#_\\|^$%&@~\n"

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>' + m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ '<|eos|>' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def build_char_tokenizer(chars: str = DEFAULT_CHARS) -> PreTrainedTokenizerFast:
    """Build a character-level tokenizer over ``chars`` plus chat special tokens.

    Ids 0..5 are the special tokens (pad=0, eos=1), then one id per character. Unknown characters
    are dropped at encoding time rather than mapped to an UNK token.
    """
    chars = "".join(dict.fromkeys(chars))  # dedupe, keep order
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for c in chars:
        vocab.setdefault(c, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|pad|>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|eos|>",
        bos_token="<|bos|>",
        unk_token="<|pad|>",
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.padding_side = "left"
    return fast
