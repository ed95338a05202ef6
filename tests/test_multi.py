"""One prefill serves every method: compress_from_capture equals a separate compress() per method."""

from __future__ import annotations

import pytest
import torch

import chunkkv
from chunkkv import ChunkKV, FullKV, H2O, PyramidKV, SnapKV, StreamingLLM
from chunkkv.errors import ChunkKVError
from chunkkv.capture import capture_prefill
from chunkkv.pipeline import compress_from_capture

from models import VOCAB, tiny_model

METHODS = [
    FullKV(),
    StreamingLLM(keep_tokens=30),
    StreamingLLM(keep_fraction=0.3, reuse_depth=2),
    H2O(keep_fraction=0.25, window=4),
    SnapKV(keep_tokens=40, window=8),
    SnapKV(keep_tokens=40, window=5, pooling="avg", kernel=5),  # a shorter window than captured
    PyramidKV(keep_tokens=40, window=8),
    ChunkKV(keep_tokens=40, window=8, chunk_size=5),
    ChunkKV(keep_fraction=0.3, window=8, reuse_depth=2),
    ChunkKV(keep_fraction=0.2, window=8, chunk_size=3, reuse_depth=3),
    chunkkv.KVPressChunkKV(remove_fraction=0.7, window=8),
]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", num_hidden_layers=6)


def _batch(lengths, seed=0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, n in enumerate(lengths):
        ids[b, width - n:] = torch.randint(1, VOCAB, (n,), generator=g)
        mask[b, width - n:] = 1
    dev = torch.get_default_device()
    return ids.to(dev), mask.to(dev)


def _assert_same_context(got, want):
    assert torch.equal(got.next_logits, want.next_logits)
    assert got.cache.stored_lengths() == want.cache.stored_lengths()
    assert got.stats.kept == want.stats.kept
    assert got.stats.scored_layers == want.stats.scored_layers
    for i in want.cache.pruned_layers:
        a, b = got.cache.layers[i], want.cache.layers[i]
        assert (a.kept_index is None) == (b.kept_index is None), i
        if b.kept_index is not None:
            assert torch.equal(a.kept_index, b.kept_index), i
        assert (a.valid is None) == (b.valid is None) and (b.valid is None or torch.equal(a.valid, b.valid)), i
        assert a.needs_wrapper == b.needs_wrapper, i
        assert torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values), i


@pytest.mark.parametrize("lengths", [(120,), (100, 61, 83)], ids=["one row", "padded batch"])
def test_every_method_from_one_capture_equals_its_own_compress(llama, lengths):
    ids, mask = _batch(lengths)
    question = _batch((5,), seed=9)[0]
    capture = capture_prefill(llama, ids, mask, window=8, accumulated=True)
    full_before = [layer.keys.clone() for layer in capture.cache.layers]
    for method in METHODS:
        want = chunkkv.compress(llama, ids, mask, method=method)
        got = compress_from_capture(capture, method)
        _assert_same_context(got, want)
        logits_got = chunkkv.extend(llama, got.fork(), question)
        logits_want = chunkkv.extend(llama, want.fork(), question)
        assert torch.equal(logits_got, logits_want), method.describe()
        sampling = chunkkv.Sampling(max_new_tokens=6)
        assert torch.equal(chunkkv.continue_from(llama, got, question, sampling),
                           chunkkv.continue_from(llama, want, question, sampling)), method.describe()
    # decoding on the built contexts never touched the capture
    assert [layer.keys.shape[-2] for layer in capture.cache.layers] == [ids.shape[1]] * 6
    assert all(torch.equal(a, layer.keys) for a, layer in zip(full_before, capture.cache.layers))


def test_query_aware_generation_without_new_tokens(llama):
    ids, mask = _batch((90,), seed=3)
    capture = capture_prefill(llama, ids, mask, window=8)
    method = ChunkKV(keep_fraction=0.2, window=8, reuse_depth=2)
    sampling = chunkkv.Sampling(max_new_tokens=8)
    got = chunkkv.continue_from(llama, compress_from_capture(capture, method), None, sampling)
    want = chunkkv.continue_from(llama, chunkkv.compress(llama, ids, mask, method=method), None, sampling)
    assert torch.equal(got, want)


def test_unshared_scores_select_the_same_and_time_the_selection(llama):
    ids, mask = _batch((110,), seed=4)
    capture = capture_prefill(llama, ids, mask, window=8)
    method = ChunkKV(keep_fraction=0.2, window=8)
    shared = compress_from_capture(capture, method)
    alone = compress_from_capture(capture, method, share_scores=False)
    _assert_same_context(alone, shared)
    assert alone.stats.select_seconds > 0


def test_capture_refuses_what_it_cannot_serve(llama):
    ids, mask = _batch((60,), seed=5)
    capture = capture_prefill(llama, ids, mask, window=8)
    with pytest.raises(ChunkKVError, match="capture with window >= 16"):
        compress_from_capture(capture, SnapKV(keep_tokens=20, window=16))
    with pytest.raises(ChunkKVError, match="accumulated=True"):
        compress_from_capture(capture, H2O(keep_tokens=20, window=4))
    with pytest.raises(ChunkKVError, match="window"):
        capture_prefill(llama, ids, mask, window=0)
    with pytest.raises(chunkkv.errors.PromptError, match="not shorter than the prompt"):
        compress_from_capture(capture_prefill(llama, ids[:, :6], mask[:, :6], window=8), SnapKV(keep_tokens=3, window=8))


def test_stacked_contexts_decode_as_each_alone(llama):
    from chunkkv.context import stack_contexts

    ids, mask = _batch((100,), seed=6)
    question = _batch((4,), seed=7)[0]
    capture = capture_prefill(llama, ids, mask, window=8, accumulated=True)
    contexts = [compress_from_capture(capture, m) for m in METHODS]
    stacked = stack_contexts([c.fork() for c in contexts])
    assert stacked.input_ids.shape[0] == len(METHODS)
    sampling = chunkkv.Sampling(max_new_tokens=6)
    logits = chunkkv.extend(llama, stacked.fork(), question)
    tokens = chunkkv.continue_from(llama, stacked, question, sampling)
    for m, ctx in enumerate(contexts):
        alone = chunkkv.extend(llama, ctx.fork(), question)
        torch.testing.assert_close(logits[m], alone[0], atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens[m], chunkkv.continue_from(llama, ctx, question, sampling)[0]), METHODS[m].describe()
    with pytest.raises(ChunkKVError, match="same prompt"):
        stack_contexts([contexts[0], compress_from_capture(capture_prefill(llama, *_batch((100,), seed=8), window=8))])


def test_prefix_of_a_capture_equals_compressing_the_prefix(llama):
    from chunkkv.capture import capture_prefix

    ids, mask = _batch((110,), seed=11)
    question = ids[:, 96:]
    capture = capture_prefill(llama, ids, mask, window=14 + 8)
    prefix = capture_prefix(capture, 96)
    sampling = chunkkv.Sampling(max_new_tokens=5)
    for method in (ChunkKV(keep_fraction=0.2, window=8, reuse_depth=2), SnapKV(keep_tokens=30, window=8),
                   PyramidKV(keep_tokens=30, window=8), StreamingLLM(keep_tokens=20), FullKV()):
        want = chunkkv.compress(llama, ids[:, :96], mask[:, :96], method=method)
        got = compress_from_capture(prefix, method)
        for i in want.cache.pruned_layers:
            a, b = got.cache.layers[i], want.cache.layers[i]
            assert (a.kept_index is None and b.kept_index is None) or torch.equal(a.kept_index, b.kept_index)
            assert torch.equal(a.keys, b.keys)
        assert torch.equal(chunkkv.continue_from(llama, got, question, sampling),
                           chunkkv.continue_from(llama, want, question, sampling))
    with pytest.raises(ChunkKVError, match="capture with window > 14"):
        capture_prefix(capture_prefill(llama, ids, mask, window=8), 96)


@pytest.mark.parametrize("lengths", [(120,), (100, 61, 83)], ids=["one row", "padded batch"])
def test_decode_budget_from_a_capture_equals_compress(llama, lengths):
    # compress_every < window: the first re-selection still scores with prompt queries, so the
    # capture must seed each leader's decoding window exactly as compress() does.
    ids, mask = _batch(lengths, seed=12)
    capture = capture_prefill(llama, ids, mask, window=8, accumulated=True)
    sampling = chunkkv.Sampling(max_new_tokens=20)
    for method in [ChunkKV(keep_tokens=40, window=8, chunk_size=5, reuse_depth=2), SnapKV(keep_tokens=40, window=8),
                   H2O(keep_tokens=40, window=4), StreamingLLM(keep_tokens=40)]:
        want = chunkkv.continue_from(llama, chunkkv.compress(llama, ids, mask, method=method), None, sampling,
                                     decode_budget=36, compress_every=3)
        got = chunkkv.continue_from(llama, compress_from_capture(capture, method), None, sampling,
                                    decode_budget=36, compress_every=3)
        assert torch.equal(got, want), method.describe()
