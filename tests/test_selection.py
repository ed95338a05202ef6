"""The vectorised scoring and selection equal the plain reference on many random shapes."""

from __future__ import annotations

import random

import pytest
import torch

from chunkkv import selection as sel
from chunkkv.scoring import accumulated_attention_scores, pool_scores, window_attention_scores

import reference as ref


def _cases(n: int, seed: int):
    rng = random.Random(seed)
    for _ in range(n):
        length = rng.randint(2, 60)
        window = rng.randint(0, 20)
        kept = rng.randint(1, length + 5)  # may exceed the prompt: then everything is kept
        yield length, min(kept, length), window, rng.randint(1, 12), rng.choice([1, 2, 4])


def _select(fn, scores_rows, lengths, kept, **kw):
    """Run a batched selector on left-padded rows; return per-row sorted kept indices (row-relative)."""
    width = max(lengths)
    batch, heads = len(scores_rows), scores_rows[0].shape[0]
    padded = torch.zeros(batch, heads, width)
    for b, s in enumerate(scores_rows):
        padded[b, :, width - lengths[b]:] = s
    lengths_t = torch.tensor(lengths)
    kept_t = torch.tensor(kept)
    pad = width - lengths_t
    aligned = sel.align_rows(padded, pad)
    picks = fn(aligned, lengths_t, kept_t, **kw)
    index, valid = sel.finalize(picks, pad)
    rows = []
    for b in range(batch):
        per_head = []
        for h in range(index.shape[1]):
            idx = index[b, h][valid[b]] - int(pad[b])
            per_head.append(idx.tolist())
        rows.append(per_head)
    return rows, valid


@pytest.mark.parametrize("reduce", ["mean", "sum"])
def test_chunk_selection_matches_reference(reduce):
    for length, kept, window, chunk, heads in _cases(300, seed=1 if reduce == "mean" else 2):
        scores = torch.rand(heads, length)
        got, _ = _select(
            lambda s, l, k: sel.select_chunks(
                sel.prefix_scores(s, l, k, window), l, k, window, int(k.max()), chunk, reduce
            ),
            [scores], [length], [kept],
        )
        want = ref.chunkkv(scores.tolist(), length, kept, window, chunk, reduce)
        assert got[0] == [want], (length, kept, window, chunk, heads)
        assert len(want) == kept  # exact budget, window inside it


@pytest.mark.parametrize("pooling,kernel", [("none", 1), ("avg", 5), ("max", 7), ("max", 4)])
def test_pooled_selection_matches_reference(pooling, kernel):
    for length, kept, window, chunk, heads in _cases(150, seed=kernel):
        scores = torch.rand(heads, length)
        w = min(window, kept)
        prefix = length - w
        pooled = [ref.pool(row[:prefix], pooling, kernel) + [0.0] * w for row in scores.tolist()]
        got_chunks, _ = _select(
            lambda s, l, k: sel.select_chunks(
                sel.prefix_scores(s, l, k, window, pooling, kernel), l, k, window, int(k.max()), chunk
            ),
            [scores], [length], [kept],
        )
        assert got_chunks[0] == [ref.chunkkv(pooled, length, kept, window, chunk)]
        got_heads, _ = _select(
            lambda s, l, k: sel.select_tokens_per_head(
                sel.prefix_scores(s, l, k, window, pooling, kernel), l, k, window, int(k.max())
            ),
            [scores], [length], [kept],
        )
        assert got_heads[0] == ref.per_head(pooled, length, kept, window)


def test_per_head_selection_matches_reference_and_differs_across_heads():
    differs = 0
    for length, kept, window, _, heads in _cases(300, seed=3):
        scores = torch.rand(heads, length)
        got, _ = _select(
            lambda s, l, k: sel.select_tokens_per_head(sel.prefix_scores(s, l, k, window), l, k, window, int(k.max())),
            [scores], [length], [kept],
        )
        want = ref.per_head(scores.tolist(), length, kept, window)
        assert got[0] == want
        assert all(len(h) == kept for h in want)
        differs += heads > 1 and len({tuple(h) for h in want}) > 1
    assert differs > 50  # per-head selection really is per head


def test_streaming_matches_reference():
    for length, kept, _, n_sink, _ in _cases(200, seed=4):
        got, _ = _select(
            lambda s, l, k: sel.select_streaming(l, k, n_sink, int(k.max())), [torch.zeros(1, length)], [length], [kept]
        )
        assert got[0] == [ref.streaming(length, kept, n_sink)]


def test_batched_rows_choose_their_own_tokens():
    """Left-padded rows of different lengths and budgets give each row its single-row answer."""
    rng = random.Random(5)
    for _ in range(40):
        rows = [rng.randint(3, 50) for _ in range(rng.randint(2, 4))]
        kept = [rng.randint(1, n) for n in rows]
        window, chunk, heads = rng.randint(0, 8), rng.randint(1, 8), 2
        scores = [torch.rand(heads, n) for n in rows]

        def chunks(s, l, k):
            return sel.select_chunks(sel.prefix_scores(s, l, k, window, "max", 3), l, k, window, int(k.max()), chunk)

        def tokens(s, l, k):
            return sel.select_tokens_per_head(sel.prefix_scores(s, l, k, window, "avg", 3), l, k, window, int(k.max()))

        for fn in (chunks, tokens):
            batched, valid = _select(fn, scores, rows, kept)
            for b in range(len(rows)):
                alone, _ = _select(fn, [scores[b]], [rows[b]], [kept[b]])
                assert batched[b] == alone[0]
                assert int(valid[b].sum()) == kept[b]  # fillers make up the rest, at the front
                assert bool(valid[b, -kept[b]:].all())


def test_kvpress_chunk_semantics():
    """Whole chunks from token 0 (window included), mean scores, the top ``kept_chunks`` kept."""
    torch.manual_seed(6)
    for length, chunk, n_keep in [(37, 5, 3), (40, 10, 2), (23, 7, 4), (9, 4, 3)]:
        scores = torch.rand(2, length)
        token = scores.sum(0).tolist()
        chunks = [list(range(s, min(s + chunk, length))) for s in range(0, length, chunk)]
        ranked = sorted(range(len(chunks)), key=lambda i: (-sum(token[j] for j in chunks[i]) / len(chunks[i]), i))
        want = sorted(j for i in ranked[:n_keep] for j in chunks[i])
        slots = min(length, n_keep * chunk)
        picks = sel.select_chunks_kvpress(scores[None], torch.tensor([length]), torch.tensor([n_keep]), slots, chunk)
        index, valid = sel.finalize(picks, torch.tensor([0]))
        assert index[0, 0][valid[0]].tolist() == want


@pytest.mark.parametrize("n_q,n_kv", [(2, 2), (4, 2), (4, 1)])
def test_window_scores_match_reference(n_q, n_kv):
    torch.manual_seed(n_q * 10 + n_kv)
    for length, win in [(7, 3), (20, 1), (16, 16), (33, 8)]:
        q = torch.randn(1, n_q, win, 8)
        k = torch.randn(1, n_kv, length, 8)
        got = window_attention_scores(q, k, scaling=8 ** -0.5)[0]
        want = ref.window_scores(q[0], k[0], 8 ** -0.5)
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_window_scores_ignore_left_padding():
    torch.manual_seed(7)
    q = torch.randn(1, 4, 5, 8)
    k = torch.randn(1, 2, 12, 8)
    padded_k = torch.cat([torch.randn(1, 2, 4, 8), k], dim=2)
    valid = torch.tensor([[False] * 4 + [True] * 12])
    got = window_attention_scores(q, padded_k, 0.3, key_valid=valid)
    torch.testing.assert_close(got[..., 4:], window_attention_scores(q, k, 0.3))
    assert torch.all(got[..., :4] == 0)


def test_accumulated_scores_are_window_scores_over_all_queries():
    torch.manual_seed(8)
    q = torch.randn(2, 4, 30, 8)
    k = torch.randn(2, 2, 30, 8)
    blocked = accumulated_attention_scores(q, k, 0.35, block_elements=4 * 30 * 7)  # several blocks
    whole = window_attention_scores(q, k, 0.35) * 30
    torch.testing.assert_close(blocked, whole, atol=1e-5, rtol=1e-5)


def test_pooling_matches_reference():
    torch.manual_seed(9)
    x = torch.rand(3, 2, 17)
    for kind in ("avg", "max"):
        for kernel in (1, 3, 4, 5, 7):
            got = pool_scores(x, kind, kernel)
            want = torch.tensor([[ref.pool(row, kind, kernel) for row in head] for head in x.tolist()])
            torch.testing.assert_close(got, want)


def test_reuse_schedule():
    assert sel.reuse_leaders([0, 1, 2, 3, 4], 1) == {0: 0, 1: 1, 2: 2, 3: 3, 4: 4}
    assert sel.reuse_leaders([0, 1, 2, 3, 4], 2) == {0: 0, 1: 0, 2: 2, 3: 2, 4: 4}
    assert sel.reuse_leaders([1, 3, 5, 7], 3) == {1: 1, 3: 1, 5: 1, 7: 7}
    assert set(sel.reuse_leaders(list(range(6)), 99).values()) == {0}
    with pytest.raises(ValueError):
        sel.reuse_leaders([0, 1], 0)


def _glue_reference(segments, is_digit):
    """Plain loops: walk each row; a chunk start inside a digit run moves to the token after the run."""
    out = []
    for seg, dig in zip(segments.tolist(), is_digit.tolist()):
        ids, current, pending = [], -1, False
        for p, (s, d) in enumerate(zip(seg, dig)):
            start = p == 0 or s != seg[p - 1]
            inside = p > 0 and d and dig[p - 1]
            if start and inside:
                pending = True
            if (start and not inside) or (pending and not inside):
                current += 1
                pending = False
            ids.append(current)
        out.append(ids)
    return torch.tensor(out)


def test_glue_digits_never_starts_a_chunk_inside_a_number():
    g = torch.Generator().manual_seed(0)
    for length, chunk in ((40, 4), (57, 10), (33, 3)):
        is_digit = torch.rand(3, length, generator=g) < 0.4
        for segments in (sel.fixed_segments(3, length, chunk, "cpu"),
                         sel.sentence_segments(torch.rand(3, length, generator=g) < 0.15, chunk)):
            got = sel.glue_digits(segments, is_digit)
            assert torch.equal(got, _glue_reference(segments, is_digit))
            starts = torch.ones_like(is_digit)
            starts[:, 1:] = got[:, 1:] != got[:, :-1]
            assert not bool((starts[:, 1:] & is_digit[:, 1:] & is_digit[:, :-1]).any())  # never inside a run
    # a run that spans two edges: one chunk to its end, the next chunk starts right after it
    digits = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0]]).bool()
    assert sel.glue_digits(sel.fixed_segments(1, 12, 4, "cpu"), digits).tolist() == [[0] * 11 + [1]]


def test_chunkkv_keeps_a_number_whole():
    """A name (2) scores high and the number after it (digits at 3-6, scoring low) straddles a chunk
    edge: fixed chunks keep the name and the first digit only; with digit_ids the run joins the
    name's chunk and is kept whole."""
    from chunkkv import ChunkKV
    from chunkkv.scorers import LayerInputs

    ids = torch.full((1, 20), 9)
    ids[0, 3:7] = torch.tensor([1, 2, 3, 4])
    scores = torch.full((1, 1, 20), 0.01)
    scores[0, 0, 2], scores[0, 0, 9], scores[0, 0, 13] = 1.0, 0.5, 0.9
    for digits in (None, frozenset(range(10))):
        method = ChunkKV(keep_tokens=13, window=2, chunk_size=4, pooling="none", digit_ids=digits)
        inputs = LayerInputs(queries=torch.zeros(1, 1, 2, 2), keys=torch.zeros(1, 1, 20, 2), scaling=1.0, softcap=None,
                             key_valid=None, lengths=torch.tensor([20]), pad=torch.tensor([0]), kept=torch.tensor([13]),
                             slots=13, input_ids=ids, memo={("window", 2): scores})
        kept = set(method.select(inputs)[0, 0].tolist())
        assert {2, 18, 19} <= kept and len(kept) == 13
        assert {3, 4, 5, 6} <= kept if digits else not {4, 5, 6} <= kept


def test_top_k_mask_is_the_head_of_a_stable_descending_sort():
    """The O(T) top-k (a topk threshold, ties filled from the left) keeps exactly the tokens a stable
    descending sort puts first: many ties (small integer scores, -inf), per-row budgets, budget 0."""
    g = torch.Generator().manual_seed(31)
    for trial in range(300):
        batch, heads, length = 1 + trial % 3, 1 + trial % 4, 1 + (trial * 7) % 70
        scores = torch.randint(0, 1 + trial % 5, (batch, heads, length), generator=g).float()
        scores[torch.rand(batch, heads, length, generator=g) < 0.2] = float("-inf")
        budget = torch.randint(0, length + 1, (batch,), generator=g)
        width = int(budget.max())
        if width == 0:
            continue
        order = torch.sort(scores, dim=-1, descending=True, stable=True).indices
        want = torch.zeros_like(scores, dtype=torch.bool)
        for b in range(batch):
            want[b].scatter_(-1, order[b, :, : int(budget[b])], True)
        assert torch.equal(sel.top_k_mask(scores, budget, width), want), trial
        picks = sel._top_prefix(scores, budget, width)
        for b in range(batch):
            for h in range(heads):
                n = int(budget[b])
                assert picks[b, h, :n].tolist() == sorted(order[b, h, :n].tolist())  # ascending positions
                assert (picks[b, h, n:] == -1).all()


def test_mask_to_indices_keeps_the_first_width_positions():
    mask = torch.tensor([[True, False, True, True, False, True], [False] * 6, [True] * 6])
    assert sel.mask_to_indices(mask, 3).tolist() == [[0, 2, 3], [-1, -1, -1], [0, 1, 2]]
    assert sel.mask_to_indices(mask, 5).tolist() == [[0, 2, 3, 5, -1], [-1] * 5, [0, 1, 2, 3, 4]]


def test_take_slots_equals_gather():
    from chunkkv.cache import take_slots

    g = torch.Generator().manual_seed(32)
    states = torch.randn(2, 3, 17, 5, generator=g)
    for heads in (1, 3):
        index = torch.sort(torch.randint(0, 17, (2, heads, 6), generator=g), dim=-1).values
        want = torch.gather(states, 2, index[..., None].expand(2, 3, 6, 5))
        got = take_slots(states, index)
        assert torch.equal(got, want) and got.is_contiguous()


def test_window_scores_with_a_workspace_are_bit_equal():
    """A reused workspace (logits written into it, softmax in place) changes nothing, for every layer
    that reuses it, with padding, with a non-power-of-two scale and with soft-capping; the sum over the
    window queries (a matrix-vector product) equals the plain middle-axis sum up to rounding."""
    from chunkkv.scoring import Workspace, _mask_future, _reduce_queries, _sum_queries

    g = torch.Generator().manual_seed(33)
    ws = Workspace()
    for trial, (n_q, n_kv, win, length, scale, softcap) in enumerate(
            [(4, 2, 5, 40, 0.125, None), (6, 2, 7, 90, 0.3, None), (4, 1, 3, 25, 0.125, 30.0), (2, 2, 8, 64, 0.5, None)]):
        q = torch.randn(2, n_q, win, 16, generator=g) * 3
        k = torch.randn(2, n_kv, length, 16, generator=g)
        valid = torch.ones(2, length, dtype=torch.bool)
        valid[1, : trial + 3] = False
        for key_valid in (None, valid):
            got = window_attention_scores(q, k, scale, key_valid, softcap, workspace=ws)
            assert torch.equal(got, window_attention_scores(q, k, scale, key_valid, softcap))
            # and both equal the plain out-of-place computation the module had before
            groups = n_q // n_kv
            logits = torch.matmul(q.reshape(2, n_kv, groups * win, 16), k.transpose(-1, -2)).mul_(scale)
            if softcap is not None:
                logits = torch.tanh(logits / softcap) * softcap
            _mask_future(logits, length - win, win, groups)
            if key_valid is not None:
                logits.masked_fill_(~key_valid[:, None, None, :], torch.finfo(logits.dtype).min)
            query_valid = key_valid[:, -win:] if key_valid is not None else None
            probs = torch.softmax(logits, -1)
            plain = _sum_queries(probs, query_valid, groups) / (groups * win)
            assert torch.equal(got, plain), (trial, key_valid is None)
            # the sum over the queries as a matrix-vector product: the middle-axis sum up to rounding
            summed = _reduce_queries(probs, query_valid, groups) / (groups * win)
            torch.testing.assert_close(got, summed, rtol=1e-6, atol=1e-9)


def test_position_segments_follow_the_prompts_grid():
    positions = torch.tensor([[0, 1, 2, 10, 11, 12, 13, 27, 28, 31, 32, 33]])
    assert sel.position_segments(positions, 10).tolist() == [[0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 3, 3]]
    assert sel.position_segments(torch.arange(25)[None], 10).tolist() == [[0] * 10 + [1] * 10 + [2] * 5]
