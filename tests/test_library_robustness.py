"""Issue 13, library side: real sliding-window configs compress correctly (inside and past the
window), a compressed context answers the same way every time it is reused, and inputs that would
run something else than asked are refused."""

from __future__ import annotations

import numpy
import pytest
import torch

import chunkkv
from chunkkv import ChunkKV, PromptError, PyramidKV, SnapKV, StreamingLLM, UnsupportedModelError
from chunkkv.cache import PrunedLayer
from chunkkv.errors import BudgetError, ChunkKVError

from models import assert_decodes_like_truth, kept_masks, random_prompt, tiny_model, truth_logits

# The sliding_window values of the real configs (transformers 5.24 marks every layer of these
# models sliding as soon as the value is set).
PHI3_MINI_128K = 262144  # Phi-3-mini-128k-instruct, Phi-3.5-mini-instruct
MISTRAL_7B_V01 = 4096  # Mistral-7B-v0.1


def _check_against_truth(model, ids, question, method, past_window: bool = False):
    """Compress, extend with ``question``: logits equal the masked full forward, and stock
    generate gives the library loop's tokens."""
    prompt = ids.shape[1]
    ctx = chunkkv.compress(model, ids, method=method)
    pruned = ctx.cache.pruned_layers
    assert pruned == list(range(model.config.num_hidden_layers))  # every (sliding) layer compressed
    assert max(ctx.cache.stored_lengths()) < prompt
    return (ctx, *assert_decodes_like_truth(model, ctx, ids, question))


# --- bug 3: sliding-window configs ---------------------------------------------------------------
@pytest.mark.parametrize("family,window", [("phi3", PHI3_MINI_128K), ("mistral", MISTRAL_7B_V01)])
def test_real_sliding_window_configs_compress_while_the_prompt_fits(family, window):
    model = tiny_model(family, sliding_window=window)
    assert all(t == "sliding_attention" for t in chunkkv.ChunkKVCache(model.config).layer_types)
    ids, question = random_prompt(1, 90, 3), random_prompt(1, 4, 4)
    for method in (ChunkKV(keep_tokens=30, window=6, chunk_size=4), SnapKV(keep_tokens=30, window=6)):
        ctx, *_ = _check_against_truth(model, ids, question, method)
        assert all(ctx.cache.layers[i].sliding_window == window for i in ctx.cache.pruned_layers)
    # the full cache keeps the stock (bounded) sliding layers
    full = chunkkv.compress(model, ids)
    assert not full.cache.pruned_layers


def test_a_prompt_longer_than_the_real_window_is_refused_clearly():
    # Mistral-7B-v0.1 has 32768 positions: the prompt fits them, not the window
    model = tiny_model("mistral", num_hidden_layers=1, sliding_window=MISTRAL_7B_V01, max_position_embeddings=32768)
    ids = torch.ones(1, MISTRAL_7B_V01 + 1, dtype=torch.long)
    with pytest.raises(UnsupportedModelError, match=r"window 4096 tokens\) and the prompt \(4097 tokens\) is longer"):
        chunkkv.compress(model, ids, method=ChunkKV(keep_tokens=8, window=4))


@pytest.mark.parametrize("method", [
    ChunkKV(keep_tokens=20, window=6, chunk_size=4),
    SnapKV(keep_tokens=20, window=6),  # per KV head: the window mask is per head
    PyramidKV(keep_tokens=20, window=6),  # layers of different lengths
    StreamingLLM(keep_tokens=20),
], ids=["chunkkv", "snapkv", "pyramidkv", "streamingllm"])
def test_decoding_past_the_window_hides_keys_by_their_original_position(method):
    """Prompt 60 tokens in a 64-token window, then 24 more: the last queries must not see the kept
    prompt keys that fell out of the window (the stock mask would place them too late)."""
    model = tiny_model("mistral", sliding_window=64)
    ids, question = random_prompt(1, 60, 5), random_prompt(1, 24, 6)
    _ctx, got, full, kept = _check_against_truth(model, ids, question, method)
    # the window matters here: without it (same evictions) the logits differ
    model_no_window = tiny_model("mistral")  # same seed, same weights, no sliding window
    no_window = truth_logits(model_no_window, full, torch.ones_like(full), 60, kept)[:, 60:]
    assert (got[:, -1] - no_window[:, -1]).abs().max() > 1e-3


def test_padded_batch_past_the_window_equals_each_row_alone():
    model = tiny_model("mistral", sliding_window=64)
    a, b = random_prompt(1, 60, 7), random_prompt(1, 50, 8)
    ids = torch.cat([a, torch.cat([torch.zeros(1, 10, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    method = ChunkKV(keep_tokens=20, window=6, chunk_size=4)
    question = random_prompt(1, 20, 9)
    sampling = chunkkv.Sampling(max_new_tokens=8)
    batch = chunkkv.continue_from(model, chunkkv.compress(model, ids, mask, method), question, sampling)
    for row, alone in enumerate((a, b)):
        want = chunkkv.continue_from(model, chunkkv.compress(model, alone, method=method), question, sampling)
        assert torch.equal(batch[row : row + 1], want)


def test_hybrid_model_with_a_prompt_longer_than_its_window_keeps_sliding_layers_stock():
    model = tiny_model("gemma3", sliding_window=32)  # layers: sliding, full, sliding, full
    ids, question = random_prompt(1, 90, 10), random_prompt(1, 4, 11)
    ctx = chunkkv.compress(model, ids, method=ChunkKV(keep_tokens=30, window=6, chunk_size=4))
    assert ctx.cache.pruned_layers == [1, 3]
    assert not any(isinstance(ctx.cache.layers[i], PrunedLayer) for i in (0, 2))
    kept = kept_masks(ctx.cache, 90)
    got = chunkkv.extend(model, ctx, question)
    full = torch.cat([ids, question], 1)
    want = truth_logits(model, full, torch.ones_like(full), 90, kept)[:, 90:]
    torch.testing.assert_close(got, want.to(got.dtype), atol=2e-5, rtol=1e-4)


# --- bug 5: a reused context answers the same way ----------------------------------------------------
@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_continue_from_twice_gives_the_same_answer(llama):
    ids, question = random_prompt(1, 120, 12), random_prompt(1, 5, 13)
    ctx = chunkkv.compress(llama, ids, method=ChunkKV(keep_fraction=0.3, window=8))
    sampling = chunkkv.Sampling(max_new_tokens=10)
    first = chunkkv.continue_from(llama, ctx, question, sampling)
    second = chunkkv.continue_from(llama, ctx, question, sampling)
    assert torch.equal(first, second)
    assert ctx.cache.get_seq_length() == 120 and ctx.attention_mask.shape[1] == 120  # the context is unchanged


def test_stock_generate_with_ctx_cache_twice_gives_the_same_answer(llama):
    ids, question = random_prompt(1, 120, 14), random_prompt(1, 5, 15)
    ctx = chunkkv.compress(llama, ids, method=ChunkKV(keep_fraction=0.3, window=8))
    full = torch.cat([ids, question], 1)
    first = llama.generate(full, cache=ctx.cache, max_new_tokens=10, do_sample=False)
    second = llama.generate(full, cache=ctx.cache, max_new_tokens=10, do_sample=False)  # the README's pattern
    assert torch.equal(first, second)
    assert torch.equal(first[:, 125:], chunkkv.continue_from(llama, ctx, question, chunkkv.Sampling(max_new_tokens=10)))


def test_extend_is_still_the_explicit_in_place_api(llama):
    ids, question = random_prompt(1, 120, 16), random_prompt(1, 5, 17)
    ctx = chunkkv.compress(llama, ids, method=ChunkKV(keep_fraction=0.3, window=8))
    chunkkv.extend(llama, ctx, question)
    assert ctx.cache.get_seq_length() == 125 and ctx.attention_mask.shape[1] == 125
    # continuing from the extended context = continuing with the question from the original
    fresh = chunkkv.compress(llama, ids, method=ChunkKV(keep_fraction=0.3, window=8))
    sampling = chunkkv.Sampling(max_new_tokens=6)
    assert torch.equal(chunkkv.continue_from(llama, ctx, None, sampling),
                       chunkkv.continue_from(llama, fresh, question, sampling))


# --- library inputs --------------------------------------------------------------------------------
def test_compress_takes_a_method_name_or_says_what_is_wrong(llama):
    ids = random_prompt(1, 40, 18)
    assert chunkkv.compress(llama, ids, method="full").cache.stored_lengths() == [40] * 4
    with pytest.raises(BudgetError, match="chunkkv needs a budget"):
        chunkkv.compress(llama, ids, method="chunkkv")
    with pytest.raises(ChunkKVError, match="unknown method 'chunky'"):
        chunkkv.compress(llama, ids, method="chunky")
    with pytest.raises(ChunkKVError, match="method must be a chunkkv method"):
        chunkkv.compress(llama, ids, method=0.1)


def test_budgets_reject_bools_and_accept_integer_like_numbers():
    for kwargs in (dict(keep_fraction=True), dict(remove_fraction=False), dict(keep_tokens=True), dict(keep_fraction="0.1")):
        with pytest.raises(BudgetError, match="must be"):
            ChunkKV(**kwargs)
    method = ChunkKV(keep_tokens=numpy.int64(10), window=numpy.int64(4))
    assert type(method.keep_tokens) is int and method.keep_tokens == 10 and type(method.window) is int
    assert method.budget.kept(30) == 10
    assert type(ChunkKV(keep_fraction=numpy.float32(0.25)).keep_fraction) is float


def test_attention_mask_values_other_than_zero_and_one_are_refused(llama):
    ids = random_prompt(1, 40, 19)
    for bad in (torch.full((1, 40), 2), torch.full((1, 40), 0.5)):
        with pytest.raises(PromptError, match="may only hold 0 .* and 1"):
            chunkkv.compress(llama, ids, bad, method=ChunkKV(keep_tokens=10, window=4))
    ok = torch.ones(1, 40, dtype=torch.bool)
    assert chunkkv.compress(llama, ids, ok, method=ChunkKV(keep_tokens=10, window=4)).cache.stored_lengths() == [10] * 4


def test_a_saved_sliding_window_context_reloads_and_continues_the_same(tmp_path):
    model = tiny_model("mistral", sliding_window=MISTRAL_7B_V01)
    ids, question = random_prompt(1, 90, 20), random_prompt(1, 4, 21)
    ctx = chunkkv.compress(model, ids, method=ChunkKV(keep_tokens=30, window=6, chunk_size=4))
    ctx.save(tmp_path / "ctx.safetensors")
    loaded = chunkkv.load_context(tmp_path / "ctx.safetensors", model)
    assert all(loaded.cache.layers[i].sliding_window == MISTRAL_7B_V01 for i in range(4))
    sampling = chunkkv.Sampling(max_new_tokens=6)
    assert torch.equal(chunkkv.continue_from(model, loaded, question, sampling),
                       chunkkv.continue_from(model, ctx, question, sampling))
