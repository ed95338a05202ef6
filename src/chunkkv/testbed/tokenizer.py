"""The testbed's word-level tokenizer, built with the ``tokenizers`` library.

One token per word of the synthetic suite (template words, haystack words, key/value
syllables, punctuation), so a key is 2 tokens and a value 4 tokens. Text is lower-cased and
split on whitespace and punctuation; unknown words map to ``<unk>``. ``<s>`` is prepended to
every encoded text, ``</s>`` ends answers (the model emits it when done).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel

from chunkkv.synthetic import vocabulary_words

__all__ = ["SPECIAL_TOKENS", "build_tokenizer", "build_hf_tokenizer", "save_tokenizer"]

SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


def build_tokenizer() -> Tokenizer:
    """A ``tokenizers.Tokenizer`` over the suite's vocabulary (ids are fixed by word order)."""
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for w in vocabulary_words():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS_ID)]
    )
    # Words are re-joined with single spaces on decode.
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    return tok


def build_hf_tokenizer():
    """The same tokenizer wrapped as a ``transformers.PreTrainedTokenizerFast``."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        model_max_length=32768,
        padding_side="left",
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(path: str | Path) -> None:
    """Write the tokenizer files (``tokenizer.json`` + config) so ``AutoTokenizer`` loads them."""
    build_hf_tokenizer().save_pretrained(str(path))
