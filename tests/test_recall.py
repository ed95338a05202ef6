"""The long-output task (``chunkkv eval --task recall``): samples, scoring and the decode-budget rows."""

from __future__ import annotations

import pytest
import torch

from chunkkv.errors import ChunkKVError
from chunkkv.evaluation.recall import RecallConfig, RecallSample, copied_tokens, make_recall_samples, run_sample, summarize

from models import VOCAB, tiny_model


class WordTokenizer:
    """Token ``i`` is the word ``w<i>``: enough for run_sample's decoding and ROUGE."""

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"w{i}" for i in ids)


def test_copied_tokens_counts_the_leading_match():
    assert copied_tokens([1, 2, 3, 9], [1, 2, 3, 4]) == 3
    assert copied_tokens([5, 2], [1, 2]) == 0
    assert copied_tokens([1, 2], [1, 2, 3]) == 2


def test_config_order_and_errors():
    config = RecallConfig(budgets=[64], methods=["chunkkv", "snapkv"])
    assert config.configs() == ["full", "chunkkv/64", "snapkv/64", "chunkkv/64/d64", "snapkv/64/d64"]
    with pytest.raises(ChunkKVError, match="budgets"):
        RecallConfig(budgets=[0]).validate()
    with pytest.raises(ChunkKVError, match="new_tokens"):
        RecallConfig(length=100, new_tokens=64).validate()
    with pytest.raises(ChunkKVError):
        RecallConfig(methods=["nope"]).validate()


def test_no_compression_rows_equal_the_full_cache_and_small_budgets_do_not():
    # A budget at least the prompt + answer compresses nothing, at prefill or while decoding, so
    # those rows must reproduce the full cache's output; a small decode budget must change it.
    model = tiny_model("llama", num_hidden_layers=4)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, VOCAB, (90,), generator=g).tolist()
    sample = RecallSample(0, 0.5, ids, "w1", ids[40:70], " ".join(f"w{i}" for i in ids[40:70]))
    big = 90 + 30
    config = RecallConfig(new_tokens=30, budgets=[big, 40], methods=["chunkkv", "snapkv", "streamingllm"], every=4)
    rows = {r["config"]: r for r in run_sample(model, WordTokenizer(), sample, config, config.configs())}
    assert rows["full"]["rougeL_full"] == 1.0
    for m in config.methods:
        for key in (f"{m}/{big}", f"{m}/{big}/d{big}"):
            assert rows[key]["output"] == rows["full"]["output"], key
            assert rows[key]["copied"] == rows["full"]["copied"]
    assert rows["chunkkv/40/d40"]["held_max"] == 44 and rows["chunkkv/40"]["held_max"] == 70
    assert any(rows[f"{m}/40/d40"]["output"] != rows["full"]["output"] for m in config.methods)
    summary = summarize(list(rows.values()))
    assert summary["full"]["n"] == 1 and summary["full"]["rougeL_full"][0] == 1.0


@pytest.mark.real_model
def test_samples_continue_a_sentence_of_their_own_context(smollm2):
    _model, tokenizer = smollm2
    config = RecallConfig(samples=3, length=600, new_tokens=40)
    for s in make_recall_samples(tokenizer, config):
        text = tokenizer.decode(s.ids)
        context, head = text.rsplit("\n\n", 1)
        assert head.strip() == s.head and len(s.head.split()) == config.head_words
        assert s.head + s.reference in context  # the reference is what follows the head in the context
        assert len(s.reference_ids) == config.new_tokens
        assert abs(len(s.ids) - config.length) < 30
        assert 0 < len(s.ids) - s.context_len < 25  # the head (and at most a boundary token) follows the context


def test_question_agnostic_rows_compress_the_context_alone():
    # with a budget that keeps the whole context, compressing before the head changes nothing
    model = tiny_model("llama", num_hidden_layers=4)
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(1, VOCAB, (90,), generator=g).tolist()
    sample = RecallSample(0, 0.5, ids, "w1", ids[40:60], " ".join(f"w{i}" for i in ids[40:60]), context_len=84)
    config = RecallConfig(new_tokens=20, budgets=[200, 40], methods=["chunkkv"], agnostic=["window", "surprisal"])
    rows = {r["config"]: r for r in run_sample(model, WordTokenizer(), sample, config, config.configs())}
    assert rows["chunkkv/200/qa-window"]["output"] == rows["full"]["output"]
    assert rows["chunkkv/200/qa-surprisal"]["output"] == rows["full"]["output"]
    assert rows["chunkkv/40/qa-window"]["output"] != rows["chunkkv/40/qa-surprisal"]["output"]
    with pytest.raises(ChunkKVError):
        RecallConfig(agnostic=["nope"]).validate()


class SentenceWordTokenizer(WordTokenizer):
    """Words ``w<i>`` whose ids below 25 end a sentence (``w3.``), as the preset's boundaries need."""

    all_special_ids: list[int] = []

    def __len__(self):
        return VOCAB

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(f"w{i}." if i < 25 else f"w{i}" for i in ids)

    def __call__(self, text, add_special_tokens=False, return_tensors=None):
        """Each word of the text becomes one id (the default's scoring prompt is encoded with it)."""
        return {"input_ids": torch.tensor([[30 + len(word) for word in text.split()]])}


def test_question_agnostic_default_rows_run_what_generate_runs():
    from chunkkv.agnostic import agnostic_method
    from chunkkv.evaluation.recall import _Config
    from chunkkv.methods import ChunkKV

    tok = SentenceWordTokenizer()
    method = _Config.parse("chunkkv/40/qa-default").method(tok)
    assert method == agnostic_method(ChunkKV(keep_tokens=40), tokenizer=tok) and method.chunking == "sentence"
    no_ends = type("NoEnds", (WordTokenizer,), {"__len__": lambda self: VOCAB})()
    assert _Config.parse("chunkkv/40/qa-default").method(no_ends).chunking == "fixed"  # no sentence ends
    model = tiny_model("llama", num_hidden_layers=4)
    ids = torch.randint(1, VOCAB, (90,), generator=torch.Generator().manual_seed(5)).tolist()
    sample = RecallSample(0, 0.5, ids, "w1", ids[40:60], " ".join(f"w{i}" for i in ids[40:60]), context_len=84)
    config = RecallConfig(new_tokens=20, budgets=[200, 40], methods=["chunkkv"], agnostic=["default"])
    config.validate()
    rows = {r["config"]: r for r in run_sample(model, tok, sample, config, config.configs())}
    assert rows["chunkkv/200/qa-default"]["output"] == rows["full"]["output"]  # nothing to drop
    assert rows["chunkkv/40/qa-default"]["held_max"] == 40 + 6 + 20
