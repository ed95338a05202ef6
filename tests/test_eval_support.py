"""Shared helpers of the evaluation tests: fixture paths, a word-level tokenizer over the fixtures'
words (with a small chat template), and a tiny random Llama saved like a real model folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "eval"
SPECIALS = ["<pad>", "<s>", "</s>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}<|system|> {{ m['content'] }} "
    "{% elif m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% else %}<|assistant|> {{ m['content'] }} </s> {% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>"
    "{% if thinking is defined and not thinking %} answer :{% endif %}{% endif %}"
)


def _strings(obj) -> list[str]:
    if isinstance(obj, str):
        return [obj]
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _strings(v)]
    return []


def _fixture_text() -> str:
    parts = []
    for path in sorted(FIXTURES.rglob("*")):
        text = path.read_text(encoding="utf-8") if path.suffix in (".jsonl", ".csv", ".txt", ".json") else ""
        if path.suffix == ".jsonl":
            parts += [s for line in text.splitlines() if line.strip() for s in _strings(json.loads(line))]
        elif path.suffix == ".json":
            parts += _strings(json.loads(text))
        else:
            parts.append(text)
    from chunkkv.evaluation.tasks import longbench, niah

    parts += list(longbench.DATASET2PROMPT.values())
    parts += [niah.FILLER, niah.DEFAULT_NEEDLE, niah.DEFAULT_QUESTION, niah.CONTEXT_TEMPLATE, niah.QUESTION_TEMPLATE]
    parts += ["Question: Answer: The answer is", "safe unsafe"]
    try:
        from chunkkv.synthetic import vocabulary_words

        parts.append(" ".join(vocabulary_words()))
    except ImportError:
        pass
    return "\n".join(parts)


def vocabulary() -> list[str]:
    words = re.findall(r"\w+|[^\w\s]+", _fixture_text().lower())
    extra = [str(i) for i in range(100)]
    return list(dict.fromkeys(extra + words))


def build_tokenizer(chat: bool = True):
    """A word-level ``PreTrainedTokenizerFast`` (lower-cased, BOS prepended) over the fixtures."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    for w in vocabulary():
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=SPECIALS[4:], model_max_length=4096,
    )
    if chat:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_model(path: Path, chat: bool = True, seed: int = 0) -> Path:
    """Save a 2-layer random Llama and the fixture tokenizer to ``path`` (a ``--model`` folder)."""
    from models import tiny_model

    tokenizer = build_tokenizer(chat)
    model = tiny_model("llama", seed=seed, vocab_size=len(tokenizer), num_hidden_layers=2)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def read_records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_fixture_tokenizer_round_trips_fixture_words():
    tok = build_tokenizer()
    ids = tok("Mara kept the lighthouse.", add_special_tokens=True)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "mara kept the lighthouse ."
    rendered = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert rendered == "<|user|> hi <|assistant|>"
