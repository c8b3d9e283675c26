"""The zoo's tokenizer: byte-level, one token per byte (id = byte value), EOS = 256.

It must survive `AutoTokenizer.from_pretrained(dir)` (what lm-eval and vLLM call) beside a
`model_type: qwen2` config, see build_tokenizer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOS = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map (what the ByteLevel pre-tokenizer emits)."""
    keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(keep)
    n = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(keep, map(chr, chars), strict=True))


def build_tokenizer() -> Tokenizer:
    """Byte-level BPE with no merges: every byte is one token (id = byte value), EOS = 256.

    transformers builds `Qwen2Tokenizer` for any folder whose config says model_type qwen2 and
    replaces the pre-tokenizer with Qwen2's regex split + ByteLevel and an NFC normalizer. We use
    that same pipeline here, and with no merges the regex split cannot change the tokens, so
    `AutoTokenizer.from_pretrained(dir)` (lm-eval, vLLM) encodes exactly like training does.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    vocab = {ch: b for b, ch in sorted(_bytes_to_unicode().items())}
    tok = Tokenizer(BPE(vocab=vocab, merges=[], continuing_subword_prefix="", fuse_unk=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(EOS, special=True, normalized=False)])
    return tok


def tokenizer_config(max_positions: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "Qwen2Tokenizer",
        "model_max_length": max_positions,
        "bos_token": None,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
