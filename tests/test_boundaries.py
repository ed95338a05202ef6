"""Boundary-aware ChunkKV chunks: edges at sentence/clause ends, lengths bounded, exact budget."""

from __future__ import annotations

import pytest
import torch

import chunkkv
from chunkkv import selection as sel
from chunkkv.boundaries import boundary_token_ids
from chunkkv.errors import ChunkKVError
from chunkkv.capture import capture_prefill
from chunkkv.pipeline import compress_from_capture

from models import VOCAB, tiny_model


def _random_ends(batch, length, density, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, length, generator=g) < density


@pytest.mark.parametrize("chunk", [1, 3, 5, 10, 20])
@pytest.mark.parametrize("density", [0.0, 0.08, 0.3])
def test_segments_move_edges_to_the_nearest_boundary_within_a_quarter_chunk(chunk, density):
    length = 203
    is_end = _random_ends(2, length, density, seed=chunk)
    seg = sel.boundary_segments(is_end, chunk)
    assert seg.shape == (2, length) and seg.dtype == torch.long
    reach = chunk // 4
    for b in range(2):
        s = seg[b].tolist()
        assert s[0] == 0 and all(0 <= y - x <= 1 for x, y in zip(s, s[1:]))
        edges = [t for t in range(1, length) if s[t] != s[t - 1]]
        grid = [k * chunk for k in range(1, -(-length // chunk))]
        assert len(edges) == len(grid)
        for e, g in zip(edges, grid):
            near = [g + o for o in sorted(range(-reach, reach + 1), key=lambda o: (abs(o), o))
                    if 1 <= g + o <= length - 1 and is_end[b, g + o - 1]]
            assert e == (near[0] if near else g)
        sizes = [y - x for x, y in zip([0] + edges, edges + [length])]
        assert all(chunk / 2 <= n <= 1.5 * chunk for n in sizes[:-1])


def test_fixed_segments_rank_exactly_like_fixed_chunks():
    g = torch.Generator().manual_seed(0)
    scores = torch.rand(3, 2, 97, generator=g)
    scores[0, :, 80:] = float("-inf")
    scores[1, :, 60:] = float("-inf")
    for chunk in (1, 4, 10):
        segments = (torch.arange(97) // chunk).expand(3, 97)
        for reduce, peak in (("mean", 0.0), ("sum", 0.0), ("sqrt_mean", 0.0), ("sqrt_mean", 0.2), ("mean", 1.5)):
            got = sel.segment_priority(scores, segments, reduce, peak)
            want = sel.chunk_priority(scores, chunk, reduce, peak)
            assert torch.equal(torch.isfinite(got), torch.isfinite(want))
            # the same order of prefix tokens (the values may differ: chunk_priority leaves gaps)
            order = lambda p: torch.sort(p, dim=-1, descending=True, stable=True).indices  # noqa: E731
            assert torch.equal(order(got), order(want))


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama", num_hidden_layers=4)


BOUNDARIES = frozenset(range(1, 25))  # ~10 % of the random vocabulary ends a "sentence"


@pytest.mark.parametrize("budget", [dict(keep_fraction=0.1), dict(keep_tokens=37), dict(keep_fraction=0.3)])
def test_boundary_chunks_keep_the_exact_budget_in_whole_segments(llama, budget):
    ids = torch.randint(1, VOCAB, (1, 300), generator=torch.Generator().manual_seed(1))
    method = chunkkv.ChunkKV(window=8, chunk_size=10, boundary_ids=BOUNDARIES, **budget)
    ctx = chunkkv.compress(llama, ids, method=method)
    want = method.budget.kept(300)
    segments = sel.boundary_segments(torch.isin(ids, torch.tensor(sorted(BOUNDARIES))), 10)[0]
    fixed = chunkkv.compress(llama, ids, method=chunkkv.ChunkKV(window=8, chunk_size=10, **budget))
    differs = False
    for i in ctx.cache.pruned_layers:
        kept = ctx.kept_positions(i)
        assert kept.numel() == want
        prefix = kept[kept < 300 - 8]
        counts = torch.bincount(segments[prefix], minlength=int(segments.max()) + 1)
        sizes = torch.bincount(segments[: 300 - 8], minlength=int(segments.max()) + 1)  # prefix part of each
        partial = ((counts > 0) & (counts < sizes)).sum()
        assert partial <= 1  # whole segments, plus at most one topped-up segment
        differs |= not torch.equal(kept, fixed.kept_positions(i))
    assert differs  # the option changes what is kept


def test_boundary_chunks_from_a_capture_equal_compress_and_no_boundaries_is_fixed(llama):
    ids = torch.randint(1, VOCAB, (1, 150), generator=torch.Generator().manual_seed(2))
    method = chunkkv.ChunkKV(keep_fraction=0.2, window=8, chunk_size=5, boundary_ids=BOUNDARIES, reuse_depth=2)
    capture = capture_prefill(llama, ids, window=8)
    a, b = chunkkv.compress(llama, ids, method=method), compress_from_capture(capture, method)
    for i in a.cache.pruned_layers:
        assert torch.equal(a.cache.layers[i].kept_index, b.cache.layers[i].kept_index)
    none = chunkkv.ChunkKV(keep_fraction=0.2, window=8, chunk_size=5, boundary_ids=frozenset())
    fixed = chunkkv.ChunkKV(keep_fraction=0.2, window=8, chunk_size=5)
    for i in a.cache.pruned_layers:
        assert torch.equal(compress_from_capture(capture, none).cache.layers[i].kept_index,
                           compress_from_capture(capture, fixed).cache.layers[i].kept_index)


def test_boundary_ids_are_checked_and_described():
    with pytest.raises(ChunkKVError, match="boundary_ids must be token ids"):
        chunkkv.ChunkKV(keep_fraction=0.1, boundary_ids="abc")
    with pytest.raises(ChunkKVError, match="boundary_ids must be token ids"):
        chunkkv.ChunkKV(keep_fraction=0.1, boundary_ids={-1})
    assert "boundary_ids=3 ids" in chunkkv.ChunkKV(keep_fraction=0.1, boundary_ids=[5, 6, 7]).describe()


def test_boundary_token_ids_finds_punctuation_and_newlines():
    class Tok:
        all_special_ids = [0]
        vocab = ["<s>", "hello", ".", " world.", ",", "\n", "a:", "end.\"", "x", "?)"]

        def __len__(self):
            return len(self.vocab)

        def decode(self, ids):
            return "".join(self.vocab[i] for i in ids)

    assert boundary_token_ids(Tok()) == {2, 3, 4, 5, 6, 7, 9}
    assert boundary_token_ids(Tok(), clauses=False) == {2, 3, 5, 7, 9}

    class Counting(Tok):
        calls = 0

        def decode(self, ids):
            Counting.calls += 1
            return super().decode(ids)

    tok = Counting()
    first = boundary_token_ids(tok, clauses=False)
    scanned = Counting.calls
    assert boundary_token_ids(tok, clauses=False) is first and Counting.calls == scanned  # remembered
    assert boundary_token_ids(tok) == {2, 3, 4, 5, 6, 7, 9} and Counting.calls == 2 * scanned  # its own key


# --- one chunk per sentence ----------------------------------------------------------------------
def _sentence_reference(ends: list[bool], max_len: int) -> list[int]:
    ids, seg, run = [], -1, 0
    for t in range(len(ends)):
        if t == 0 or ends[t - 1] or run == max_len:
            seg, run = seg + 1, 0
        ids.append(seg)
        run += 1
    return ids


@pytest.mark.parametrize("max_len", [1, 3, 10, 30, 500])
@pytest.mark.parametrize("density", [0.0, 0.08, 0.3])
def test_sentence_segments_start_after_every_end_and_cut_long_sentences(max_len, density):
    is_end = _random_ends(3, 157, density, seed=max_len)
    seg = sel.sentence_segments(is_end, max_len)
    assert seg.dtype == torch.long
    for b in range(3):
        assert seg[b].tolist() == _sentence_reference(is_end[b].tolist(), max_len)


def test_sqrt_mean_prefers_many_telling_tokens_to_one_spike():
    spike = [0.0, 0.0, 0.0, 16.0]  # mean 4, mean sqrt 1
    even = [3.0, 3.0, 3.0, 3.0]  # mean 3, mean sqrt 1.73
    scores = torch.tensor([spike + even + [0.0] * 4])[:, None, :]
    first_chunk = lambda p: int(torch.argmax(p[0, 0]))  # noqa: E731  the best token's chunk
    assert first_chunk(sel.chunk_priority(scores, 4, "mean")) // 4 == 0
    assert first_chunk(sel.chunk_priority(scores, 4, "sqrt_mean")) // 4 == 1
    segments = (torch.arange(12) // 4)[None]
    assert first_chunk(sel.segment_priority(scores, segments, "sqrt_mean")) // 4 == 1
    with pytest.raises(ValueError, match="unknown chunk reduce"):
        sel.chunk_priority(scores, 4, "median")


def test_peak_weight_lifts_the_chunk_with_the_strongest_token():
    long_plain = [2.0] * 7 + [9.0]  # mean sqrt 1.61, peak sqrt 3
    short_even = [3.0] * 3 + [0.0] * 5  # a 3-token chunk (the rest is outside the prefix): mean sqrt 1.73
    scores = torch.tensor([long_plain + short_even])[:, None, :]
    scores[..., 11:] = float("-inf")
    segments = torch.tensor([[0] * 8 + [1] * 8])
    best = lambda p: int(torch.argmax(p[0, 0]))  # noqa: E731
    assert best(sel.segment_priority(scores, segments, "sqrt_mean")) >= 8  # the even chunk first
    assert best(sel.segment_priority(scores, segments, "sqrt_mean", 0.2)) < 8  # 1.61 + 0.6 > 1.73 + 0.35
    with pytest.raises(ChunkKVError, match="peak_weight=-0.1 must be a number >= 0"):
        chunkkv.ChunkKV(keep_fraction=0.1, peak_weight=-0.1)


SENTENCE = dict(segmentation="sentence", boundary_ids=BOUNDARIES, chunk_size=12)


@pytest.mark.parametrize("budget", [dict(keep_fraction=0.1), dict(keep_tokens=37), dict(keep_fraction=0.3)])
def test_sentence_chunks_keep_the_exact_budget_in_whole_sentences(llama, budget):
    ids = torch.randint(1, VOCAB, (1, 300), generator=torch.Generator().manual_seed(3))
    method = chunkkv.ChunkKV(window=8, chunk_reduce="sqrt_mean", **SENTENCE, **budget)
    ctx = chunkkv.compress(llama, ids, method=method)
    segments = sel.sentence_segments(torch.isin(ids, torch.tensor(sorted(BOUNDARIES))), 12)[0]
    aligned = chunkkv.compress(llama, ids, method=chunkkv.ChunkKV(window=8, chunk_size=12, boundary_ids=BOUNDARIES,
                                                                  chunk_reduce="sqrt_mean", **budget))
    differs = False
    for i in ctx.cache.pruned_layers:
        kept = ctx.kept_positions(i)
        assert kept.numel() == method.budget.kept(300)
        prefix = kept[kept < 300 - 8]
        counts = torch.bincount(segments[prefix], minlength=int(segments.max()) + 1)
        sizes = torch.bincount(segments[: 300 - 8], minlength=int(segments.max()) + 1)
        assert ((counts > 0) & (counts < sizes)).sum() <= 1  # whole sentences, plus one topped up
        differs |= not torch.equal(kept, aligned.kept_positions(i))
    assert differs  # not the aligned grid


def test_sentence_chunks_in_a_batch_keep_what_each_row_keeps_alone(llama):
    g = torch.Generator().manual_seed(4)
    rows = [torch.randint(1, VOCAB, (n,), generator=g) for n in (120, 77, 101)]
    ids = torch.zeros(3, 120, dtype=torch.long)
    mask = torch.zeros(3, 120, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, 120 - len(r):], mask[b, 120 - len(r):] = r, 1
    method = chunkkv.ChunkKV(keep_fraction=0.25, window=6, reuse_depth=2, **SENTENCE)
    ctx = chunkkv.compress(llama, ids, mask, method=method)
    for b, r in enumerate(rows):
        alone = chunkkv.compress(llama, r[None], method=method)
        for layer in alone.cache.pruned_layers:
            assert torch.equal(ctx.kept_positions(layer, b), alone.kept_positions(layer, 0))


def test_segmentation_is_checked_and_defaults_to_the_old_behaviour():
    with pytest.raises(ChunkKVError, match="segmentation='sentence' needs the boundary tokens"):
        chunkkv.ChunkKV(keep_fraction=0.1, segmentation="sentence")
    with pytest.raises(ChunkKVError, match="segmentation='aligned' needs the boundary tokens"):
        chunkkv.ChunkKV(keep_fraction=0.1, segmentation="aligned", boundary_ids=frozenset())  # not a silent grid
    with pytest.raises(ChunkKVError, match="segmentation='words' must be one of fixed, aligned, sentence"):
        chunkkv.ChunkKV(keep_fraction=0.1, segmentation="words", boundary_ids=BOUNDARIES)
    with pytest.raises(ChunkKVError, match="chunk_reduce='max' must be one of mean, sum, sqrt_mean"):
        chunkkv.ChunkKV(keep_fraction=0.1, chunk_reduce="max")
    assert chunkkv.ChunkKV(keep_fraction=0.1).chunking == "fixed"
    assert chunkkv.ChunkKV(keep_fraction=0.1, boundary_ids=BOUNDARIES).chunking == "aligned"
    assert "segmentation=sentence" in chunkkv.ChunkKV(keep_fraction=0.1, **SENTENCE).describe()
    with pytest.raises(ChunkKVError, match="segmentation, peak_weight would be ignored"):
        chunkkv.KVPressChunkKV(remove_fraction=0.5, **SENTENCE, peak_weight=0.2)
    with pytest.raises(ChunkKVError, match="chunk_reduce would be ignored"):
        chunkkv.KVPressChunkKV(remove_fraction=0.5, chunk_reduce="sum")
    # in chunks, the sentence ends of what each layer holds are read by the held slots' prompt positions
    ids = torch.randint(1, VOCAB, (1, 90))
    ctx = chunkkv.compress(tiny_model("llama", num_hidden_layers=2), ids,
                           method=chunkkv.ChunkKV(keep_tokens=30, window=4, **SENTENCE), prefill_chunk=32)
    assert ctx.cache.stored_lengths() == [30, 30]
