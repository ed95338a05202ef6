"""Bad input gets one clear error that says what is wrong and what to do."""

from __future__ import annotations

import pytest
import torch

import chunkkv
from chunkkv import Budget, ChunkKV, H2O, SnapKV, StreamingLLM, pyramid_budgets
from chunkkv.errors import BudgetError, ChunkKVError, PromptError, UnsupportedModelError

from models import tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", num_hidden_layers=2)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(keep_fraction=0.0), "share of prompt tokens KEPT"),
        (dict(keep_fraction=1.5), "share of prompt tokens KEPT"),
        (dict(remove_fraction=1.0), "REMOVED"),
        (dict(remove_fraction=-0.1), "REMOVED"),
        (dict(keep_tokens=0), "keeps nothing"),
        (dict(keep_tokens=2.5), "must be an int"),
        (dict(keep_tokens=10, keep_fraction=0.5), "budget given twice"),
        (dict(), "needs a budget"),
    ],
)
def test_budget_errors(kwargs, match):
    with pytest.raises(BudgetError, match=match):
        ChunkKV(**kwargs)


@pytest.mark.parametrize(
    "cls,kwargs,match",
    [
        (ChunkKV, dict(chunk_size=0), "chunk_size=0 must be a positive int"),
        (ChunkKV, dict(chunk_size=-3), "chunk_size=-3 must be a positive int"),
        (ChunkKV, dict(window=0), "window must be >= 1"),
        (ChunkKV, dict(pooling="median"), "pooling='median'"),
        (ChunkKV, dict(reuse_depth=0), "reuse_depth=0"),
        (SnapKV, dict(reuse_depth=2), "per KV head"),
        (H2O, dict(reuse_depth=2), "per KV head"),
        (StreamingLLM, dict(n_sink=-1), "n_sink"),
    ],
)
def test_method_parameter_errors(cls, kwargs, match):
    with pytest.raises(ChunkKVError, match=match):
        cls(keep_tokens=8, **kwargs)


def test_unknown_method_and_parameter():
    with pytest.raises(ChunkKVError, match="unknown method 'snapkvv'; choose one of"):
        chunkkv.make_method("snapkvv", keep_tokens=4)
    with pytest.raises(ChunkKVError, match="snapkv has no parameter chunk_size"):
        chunkkv.make_method("snapkv", keep_tokens=4, chunk_size=10)
    assert chunkkv.make_method("chunkkv", keep_fraction=0.1, reuse_depth=2) == ChunkKV(keep_fraction=0.1, reuse_depth=2)


def test_kvpress_preset_needs_remove_fraction():
    with pytest.raises(BudgetError, match="compression_ratio"):
        chunkkv.KVPressChunkKV(keep_fraction=0.1)


def test_prompt_errors(llama):
    method = ChunkKV(keep_tokens=8, window=4)
    with pytest.raises(PromptError, match="prompt is empty"):
        chunkkv.compress(llama, torch.zeros(1, 0, dtype=torch.long), method=method)
    with pytest.raises(PromptError, match="integer token ids"):
        chunkkv.compress(llama, torch.zeros(1, 5), method=method)
    with pytest.raises(PromptError, match="shape"):
        chunkkv.compress(llama, torch.ones(1, 5, dtype=torch.long), torch.ones(1, 6), method=method)
    with pytest.raises(PromptError, match="window=4 is not shorter than the prompt"):
        chunkkv.compress(llama, torch.ones(1, 4, dtype=torch.long), method=method)
    right_padded = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0]])
    with pytest.raises(PromptError, match="padding_side = 'left'"):
        chunkkv.compress(llama, torch.ones(1, 8, dtype=torch.long), right_padded, method=method)
    with pytest.raises(PromptError, match="row 1 of the batch has no real tokens"):
        chunkkv.compress(llama, torch.ones(2, 8, dtype=torch.long), torch.tensor([[1] * 8, [0] * 8]), method=method)


def test_short_prompt_keeps_everything(llama):
    ids = torch.arange(1, 21)[None]
    ctx = chunkkv.compress(llama, ids, method=ChunkKV(keep_tokens=64, window=4))
    assert ctx.cache.stored_lengths() == [20, 20]


def test_unsupported_models():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(UnsupportedModelError, match="no decoder layers with a `self_attn`"):
        chunkkv.compress(gpt2, torch.ones(1, 30, dtype=torch.long), method=ChunkKV(keep_tokens=8, window=4))
    with pytest.raises(UnsupportedModelError, match="no decoder layers"):
        chunkkv.attach(torch.nn.Linear(2, 2))


def test_unusable_attention_implementation():
    model = tiny_model("llama", num_hidden_layers=1)
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa'"):
        chunkkv.compress(model, torch.ones(1, 30, dtype=torch.long), method=ChunkKV(keep_tokens=8, window=4))


def test_all_sliding_window_model_has_nothing_to_compress():
    model = tiny_model("mistral", num_hidden_layers=1)
    model.config.sliding_window = 16
    with pytest.raises(UnsupportedModelError, match="sliding-window"):
        chunkkv.compress(model, torch.ones(1, 30, dtype=torch.long), method=ChunkKV(keep_tokens=8, window=4))


def test_sampling_errors():
    with pytest.raises(ChunkKVError, match="max_new_tokens"):
        chunkkv.Sampling(max_new_tokens=0)
    with pytest.raises(ChunkKVError, match="temperature"):
        chunkkv.Sampling(do_sample=True, temperature=0)


def test_budget_arithmetic():
    assert Budget(keep_tokens=128).kept(100) == 100
    assert Budget(keep_tokens=128).kept(1000) == 128
    assert Budget(keep_fraction=0.1).kept(157) == 15
    assert Budget(remove_fraction=0.9).kept(157) == 15
    assert Budget(keep_fraction=0.001).kept(50) == 1
    assert Budget(remove_fraction=0.0).is_full and Budget(keep_fraction=1.0).is_full
    assert not Budget(keep_tokens=10).is_full


def test_pyramid_budgets_average_exactly():
    for mean, window, n, layers in [(128, 32, 4000, 32), (40, 8, 157, 4), (100, 8, 120, 7), (5, 8, 100, 4), (60, 8, 61, 3)]:
        counts = pyramid_budgets(mean, window, n, layers)
        assert sum(counts) == mean * layers
        assert counts == sorted(counts, reverse=True)
        assert all(min(window, mean) <= c <= n for c in counts)


def test_detached_model_with_a_cache_that_needs_the_wrapper_fails_loudly():
    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(1, 200, (1, 60))
    ctx = chunkkv.compress(model, ids, method=chunkkv.PyramidKV(keep_tokens=20, window=4))
    chunkkv.detach(model)
    with pytest.raises(UnsupportedModelError, match="chunkkv.attach"):
        chunkkv.extend(model, ctx.fork(), torch.tensor([[5]]))
    chunkkv.attach(model)
    chunkkv.extend(model, ctx.fork(), torch.tensor([[5]]))  # fine once attached
    # a uniform cache is correct without the wrapper too, so it is not refused
    uniform = chunkkv.compress(model, ids, method=ChunkKV(keep_tokens=20, window=4))
    chunkkv.detach(model)
    chunkkv.extend(model, uniform.fork(), torch.tensor([[5]]))
