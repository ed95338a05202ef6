"""Bounded memory: chunked prefill and decoding under a budget equal the masked ground truth."""

from __future__ import annotations

import pytest
import torch

import chunkkv
from chunkkv import H2O, ChunkKV, ChunkKVError, PyramidKV, SnapKV, StreamingLLM

from models import EvictionLog, left_padded, timed_truth_logits, tiny_model
from models import random_prompt as _prompt


def _padded(lengths: tuple[int, ...], seed: int = 20) -> tuple[torch.Tensor, torch.Tensor]:
    return left_padded(lengths, seed)[1:]

METHODS = {
    "chunkkv": ChunkKV(keep_tokens=40, window=8, chunk_size=5),
    "chunkkv-reuse2": ChunkKV(keep_fraction=0.3, window=8, reuse_depth=2),
    "snapkv": SnapKV(keep_tokens=40, window=8),
    "pyramidkv": PyramidKV(keep_tokens=40, window=8),
    "h2o": H2O(keep_fraction=0.25, window=4),
    "streamingllm": StreamingLLM(keep_tokens=30),
}


def _kept_rows(layer, row: int, pad: int) -> torch.Tensor:
    """Row-relative kept positions of one row (fillers dropped), ``[H, kept]``."""
    index = layer.kept_index[row]
    if layer.valid is not None:
        index = index[:, layer.valid[row, : index.shape[-1]]]
    return index - pad


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


# --- chunked prefill -----------------------------------------------------------------------------


def test_look_ahead_scores_every_chunk_with_the_prompts_last_window(llama):
    """After each chunk but the last, the prompt's last ``window`` tokens are fed at their final
    positions on a fork (they never stay), and what they score is what the layers keep."""
    ids = _prompt(seed=3)  # 120 tokens: chunks of 20, 25, 25, 25, 25
    method = ChunkKV(keep_tokens=40, window=8, chunk_size=5, reuse_depth=2)
    calls = []
    hook = llama.model.register_forward_pre_hook(
        lambda m, a, k: calls.append((k["input_ids"].clone(), k["position_ids"].clone())), with_kwargs=True)
    try:
        ctx = chunkkv.compress(llama, ids, method=method, prefill_chunk=25)
    finally:
        hook.remove()
    assert [c[0].shape[1] for c in calls] == [20, 25, 8, 25, 8, 25, 8, 25]  # nothing to drop after the first
    for fed, positions in calls[2:-1:2]:
        assert torch.equal(fed, ids[:, -8:]) and torch.equal(positions[0], torch.arange(112, 120))
    assert ctx.cache.get_seq_length() == 120 and ctx.cache.stored_lengths() == [40] * 4
    assert ctx.stats.scored_layers == [0, 2]
    old = chunkkv.compress(llama, ids, method=method, prefill_chunk=25, lookahead=False)
    assert any(not torch.equal(ctx.kept_positions(i), old.kept_positions(i)) for i in ctx.cache.pruned_layers)


def test_look_ahead_holds_one_grown_layer_at_a_time(llama, monkeypatch):
    """The look-ahead's fork drops each layer's grown K/V once the layer has attended: while a layer
    attends, every other layer of the fork holds the held tensors, so the pass adds one layer's K/V
    to the peak, not the whole cache's."""
    from chunkkv import inline

    seen = []
    original = inline._Lookahead.on_attention

    def checked(self, module, layer, query, key, kwargs):
        idx = module.layer_idx
        grown = [j for j, (f, s) in enumerate(zip(self.fork.layers, self.source.layers)) if f.keys is not s.keys]
        seen.append((idx, grown))
        original(self, module, layer, query, key, kwargs)
        assert self.fork.layers[idx].keys is self.source.layers[idx].keys

    monkeypatch.setattr(inline._Lookahead, "on_attention", checked)
    ctx = chunkkv.compress(llama, _prompt(seed=3), method=ChunkKV(keep_tokens=40, window=8, chunk_size=5),
                           prefill_chunk=25)
    assert seen and all(grown == [idx] for idx, grown in seen)
    assert len(seen) == 3 * len(ctx.cache.pruned_layers)  # three look-ahead passes (after chunks 2, 3, 4)


@pytest.mark.parametrize("lookahead", [True, False])
def test_chunked_chunkkv_keeps_the_prompts_chunks_whole(llama, lookahead):
    """Re-selections cut the prompt's chunk grid by position, not the held slots' order, so what is
    kept at the end is mostly whole chunks (position // 5): partial ones come only from the top-ups of
    the re-selections (about 2 a layer here; cutting the held slots' order instead leaves about 8)."""
    partial = []
    for seed in range(4):
        ids = _prompt(1, 160, seed=seed)
        ctx = chunkkv.compress(llama, ids, method=ChunkKV(keep_tokens=43, window=8, chunk_size=5), prefill_chunk=20,
                               lookahead=lookahead)
        for layer in ctx.cache.pruned_layers:
            kept = ctx.kept_positions(layer)
            sizes = torch.bincount(kept[kept < 152] // 5)
            partial.append(int(((sizes > 0) & (sizes < 5)).sum()))
    assert sum(partial) / len(partial) <= 3, partial
    # a padded batch keeps, row by row, what each row keeps alone (positions are row-relative)
    rows, ids, mask = left_padded((100, 61, 83))
    method = ChunkKV(keep_tokens=33, window=8, chunk_size=5)
    ctx = chunkkv.compress(llama, ids, mask, method=method, prefill_chunk=20, lookahead=lookahead)
    for b, r in enumerate(rows):
        alone = chunkkv.compress(llama, r[None], method=method, prefill_chunk=20, lookahead=lookahead)
        for layer in alone.cache.pruned_layers:
            assert torch.equal(ctx.kept_positions(layer, b), alone.kept_positions(layer, 0)), (b, layer)


def test_reserve_holds_more_before_the_last_chunk_and_ends_at_the_budget(llama):
    """``reserve``: re-selections before the last chunk keep up to ceil(reserve x budget) tokens, the
    last cuts to the budget; a reserve that never drops anything early is one-shot exactly."""
    ids = _prompt(1, 160, seed=5)
    method = ChunkKV(keep_tokens=24, window=8, chunk_size=5)
    held = []
    hook = llama.model.register_forward_pre_hook(
        lambda m, a, k: held.append(k["cache"].stored_lengths()[0] if k.get("cache") is not None else None),
        with_kwargs=True)
    try:
        ctx = chunkkv.compress(llama, ids, method=method, prefill_chunk=40, reserve=1.5)
    finally:
        hook.remove()
    assert ctx.cache.stored_lengths() == [24] * len(ctx.cache.stored_lengths())
    # what layer 0 holds before each chunk's forward: 0, then 36 (= 1.5 x 24) after each early cut
    assert held[0::2] == [0, 36, 36, 36], held
    one_shot = chunkkv.compress(llama, ids, method=method)
    wide = chunkkv.compress(llama, ids, method=method, prefill_chunk=40, reserve=160 / 24)
    for layer in one_shot.cache.pruned_layers:
        assert torch.equal(wide.kept_positions(layer), one_shot.kept_positions(layer)), layer
    assert torch.allclose(wide.next_logits, one_shot.next_logits, atol=1e-5)


@pytest.mark.parametrize("prefill_chunk", [None, 20])
def test_numbers_are_kept_or_dropped_whole(llama, prefill_chunk):
    """With ``digit_ids`` no chunk edge falls inside a run of digit tokens, one-shot and chunked: a
    number is kept whole or dropped whole, but for the one top-up chunk a selection may cut (per
    re-selection). Without ``digit_ids`` the fixed grid splits numbers."""
    digits = frozenset(range(10, 20))
    split = {True: [], False: []}
    for seed in range(4):
        ids = _prompt(1, 160, seed=seed)
        g = torch.Generator().manual_seed(seed)
        # plant 12 numbers of 3-6 digit tokens across the prompt, astride the 5-token grid
        for start in torch.randperm(140, generator=g)[:12].tolist():
            n = int(torch.randint(3, 7, (1,), generator=g))
            ids[0, 4 + start: 4 + start + n] = torch.randint(10, 20, (n,), generator=g)
        is_digit = torch.isin(ids[0], torch.tensor(sorted(digits)))
        runs = torch.cumsum(torch.cat([torch.tensor([1]), (~(is_digit[1:] & is_digit[:-1])).long()]), 0)
        for glue in (True, False):
            method = ChunkKV(keep_tokens=43, window=8, chunk_size=5, digit_ids=digits if glue else None)
            ctx = chunkkv.compress(llama, ids, method=method, prefill_chunk=prefill_chunk)
            for layer in ctx.cache.pruned_layers:
                kept = torch.zeros(ids.shape[1], dtype=torch.bool)
                kept[ctx.kept_positions(layer)] = True
                # a digit run (with the token before it) is split when some of it is kept and some not
                part = torch.zeros(int(runs.max()) + 1).index_add_(0, runs[is_digit], kept[is_digit].float())
                size = torch.bincount(runs[is_digit], minlength=int(runs.max()) + 1).float()
                split[glue].append(int(((part > 0) & (part < size)).sum()))
    top_ups = 1 if prefill_chunk is None else 160 // prefill_chunk
    assert max(split[True]) <= top_ups, split[True]
    assert sum(split[False]) > sum(split[True]), split


@pytest.mark.parametrize("name", list(METHODS))
def test_one_chunk_is_exactly_one_shot(llama, name):
    method = METHODS[name]
    for ids, mask in [(_prompt(seed=1), None), _padded((100, 61, 83))]:
        one_shot = chunkkv.compress(llama, ids, mask, method=method)
        for chunk in (ids.shape[1], ids.shape[1] + 7):
            chunked = chunkkv.compress(llama, ids, mask, method=method, prefill_chunk=chunk)
            assert torch.equal(chunked.next_logits, one_shot.next_logits)
            assert chunked.stats.kept == one_shot.stats.kept
            assert chunked.stats.scored_layers == one_shot.stats.scored_layers
            for i in one_shot.cache.pruned_layers:
                a, b = one_shot.cache.layers[i], chunked.cache.layers[i]
                assert torch.equal(a.kept_index, b.kept_index) and torch.equal(a.keys, b.keys)
                assert (a.valid is None) == (b.valid is None)


@pytest.mark.parametrize("name", list(METHODS))
def test_chunked_prefill_equals_full_forward_masked_over_time(llama, name, monkeypatch):
    method = METHODS[name]
    ids, question = _prompt(seed=2), _prompt(1, 5, seed=3)
    log = EvictionLog(monkeypatch)
    ctx = chunkkv.compress(llama, ids, method=method, prefill_chunk=25)
    # exactly the one-shot budget at the end, never more than budget + chunk on the way
    one_shot = chunkkv.compress(llama, ids, method=method)
    assert ctx.cache.stored_lengths() == one_shot.cache.stored_lengths()
    budgets = one_shot.cache.stored_lengths()
    assert all(peak <= b + 25 for peak, b in zip(log.stored_peak(ctx._cache), budgets))
    assert max(log.stored_peak(ctx._cache)) > 25  # it really held kept + chunk
    for i in ctx.cache.pruned_layers:  # original prompt positions, window kept
        kept = ctx.cache.layers[i].kept_index
        assert int(kept.max()) == 119 and int(kept.min()) >= 0
    got = chunkkv.extend(llama, ctx, question)
    full = torch.cat([ids, question], 1)
    truth = timed_truth_logits(llama, full, torch.ones_like(full), log.evicted_after(ctx._cache, 125))
    torch.testing.assert_close(got, truth[:, 120:].to(got.dtype), atol=2e-5, rtol=1e-4)
    # the prompt's own last logits too: they were computed over a cache pruned chunk by chunk
    torch.testing.assert_close(ctx.next_logits, truth[:, 124].to(got.dtype), atol=2e-5, rtol=1e-4)
    # and chunking really changed something (else the comparison proves little); with the look-ahead the
    # first layer may keep one-shot's tokens (its keys and the window's queries do not depend on any pruning)
    assert name == "streamingllm" or any(
        not torch.equal(ctx.cache.layers[i].kept_index, one_shot.cache.layers[i].kept_index)
        for i in ctx.cache.pruned_layers)


@pytest.mark.parametrize("name", ["chunkkv-reuse2", "snapkv", "h2o"])
def test_chunked_batched_rows_equal_rows_run_alone(llama, name):
    method = METHODS[name].with_budget(keep_tokens=24) if name != "chunkkv-reuse2" else METHODS[name]
    lengths = (100, 61, 83)
    ids, mask = _padded(lengths)
    question = _prompt(1, 4, seed=30)
    ctx = chunkkv.compress(llama, ids, mask, method=method, prefill_chunk=16)
    logits = chunkkv.extend(llama, ctx, question)
    width = ids.shape[1]
    for b, n in enumerate(lengths):
        alone = chunkkv.compress(llama, ids[b:b + 1, width - n:], method=method, prefill_chunk=16)
        for i in alone.cache.pruned_layers:
            assert torch.equal(_kept_rows(ctx.cache.layers[i], b, width - n), alone.cache.layers[i].kept_index[0])
        torch.testing.assert_close(logits[b], chunkkv.extend(llama, alone, question)[0], atol=1e-4, rtol=1e-4)


def test_chunked_fraction_budget_is_exact_for_the_whole_prompt(llama):
    ids = _prompt(length=157, seed=10)
    for chunk in (10, 64):
        ctx = chunkkv.compress(llama, ids, method=ChunkKV(keep_fraction=0.1, window=8), prefill_chunk=chunk)
        assert ctx.cache.stored_lengths() == [15] * 4  # floor(0.1 * 157), not per chunk
        assert ctx.stats.kept == {i: [15] for i in range(4)}


def test_chunked_prefill_refuses_what_it_cannot_do(llama):
    ids = _prompt()
    with pytest.raises(ChunkKVError, match="kvpress semantics"):
        chunkkv.compress(llama, ids, method=chunkkv.KVPressChunkKV(remove_fraction=0.7), prefill_chunk=32)
    chunkkv.compress(llama, ids, method=chunkkv.KVPressChunkKV(remove_fraction=0.7), prefill_chunk=120)  # one chunk
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ChunkKVError, match="prefill_chunk"):
            chunkkv.compress(llama, ids, method=METHODS["chunkkv"], prefill_chunk=bad)
    # full cache in chunks: nothing dropped, same logits as one pass
    full = chunkkv.compress(llama, ids, prefill_chunk=32)
    assert full.cache.stored_lengths() == [120] * 4
    torch.testing.assert_close(full.next_logits, chunkkv.compress(llama, ids).next_logits, atol=1e-5, rtol=1e-5)


# --- decoding under a budget ---------------------------------------------------------------------

DECODE = {
    "chunkkv": ChunkKV(keep_tokens=40, window=8, chunk_size=5),
    "chunkkv-reuse2": ChunkKV(keep_tokens=40, window=8, reuse_depth=2),
    "snapkv": SnapKV(keep_tokens=40, window=8),
    "pyramidkv": PyramidKV(keep_tokens=40, window=8),
    "h2o": H2O(keep_tokens=40, window=8),
    "streamingllm": StreamingLLM(keep_tokens=30),
}


@pytest.mark.parametrize("name", list(DECODE))
def test_decode_budget_equals_full_forward_masked_over_time(llama, name, monkeypatch):
    method = DECODE[name]
    ids, new = _prompt(length=60, seed=4), _prompt(1, 36, seed=5)
    log = EvictionLog(monkeypatch)
    ctx = chunkkv.compress(llama, ids, method=method)
    chunkkv.set_decode_budget(ctx, 32, 6)
    pieces, stored = [], []
    for lo, hi in [(0, 1), (1, 9), (9, 10), (10, 11), (11, 23)] + [(i, i + 1) for i in range(23, 36)]:
        pieces.append(chunkkv.extend(llama, ctx, new[:, lo:hi]))
        stored.append(max(ctx.cache.stored_lengths()))
    got = torch.cat(pieces, 1)
    assert ctx.cache.decode_budget.reselections >= 4
    assert max(stored[5:]) <= 32 + 6  # one-token steps never hold more than N + K
    full = torch.cat([ids, new], 1)
    truth = timed_truth_logits(llama, full, torch.ones_like(full), log.evicted_after(ctx._cache, 96))
    torch.testing.assert_close(got, truth[:, 60:].to(got.dtype), atol=3e-5, rtol=1e-4)
    for i in ctx.cache.pruned_layers:  # positions stay the original ones; the window is kept
        layer = ctx.cache.layers[i]
        positions = layer.slot_positions()
        assert int(positions.max()) == 95 and bool((positions[..., -8:] == torch.arange(88, 96)).all())


def test_decode_budget_at_least_the_total_is_no_compression(llama):
    ids, question = _prompt(seed=6), _prompt(1, 5, seed=7)
    method = ChunkKV(keep_tokens=40, window=8)
    ctx = chunkkv.compress(llama, ids, method=method)
    want = chunkkv.continue_from(llama, ctx.fork(), question, chunkkv.Sampling(max_new_tokens=20))
    got = chunkkv.continue_from(
        llama, ctx, question, chunkkv.Sampling(max_new_tokens=20), decode_budget=40 + 25, compress_every=1
    )
    assert torch.equal(got, want)
    work = ctx.fork()  # continue_from leaves ctx unbounded; a budget set on a context is shared by its forks
    chunkkv.set_decode_budget(work, 40 + 25, 1)
    assert torch.equal(chunkkv.continue_from(llama, work, question, chunkkv.Sampling(max_new_tokens=20)), want)
    assert work.cache.decode_budget.reselections == 0
    logits_want = chunkkv.extend(llama, ctx.fork(), question)
    bounded = ctx.fork()
    chunkkv.set_decode_budget(bounded, 45, 1)
    assert torch.equal(chunkkv.extend(llama, bounded, question), logits_want)


@pytest.mark.parametrize("name", ["chunkkv-reuse2", "snapkv", "h2o", "streamingllm"])
def test_stored_length_never_exceeds_budget_plus_every(llama, name):
    ctx = chunkkv.compress(llama, _prompt(seed=8), method=DECODE[name])
    chunkkv.set_decode_budget(ctx, 16 if name != "streamingllm" else 12, 5)
    limit = ctx.cache.decode_budget.limit
    for step in range(60):
        chunkkv.extend(llama, ctx, _prompt(1, 1, seed=100 + step))
        assert max(ctx.cache.stored_lengths()) <= limit
    assert ctx.cache.get_seq_length() == 180  # logical length keeps counting
    assert ctx.cache.decode_budget.reselections >= 60 // 5


@pytest.mark.parametrize("name", ["chunkkv", "snapkv"])
def test_decode_budget_batched_rows_equal_rows_alone(llama, name):
    method = DECODE[name]
    lengths = (100, 61, 83)
    ids, mask = _padded(lengths)
    question = _prompt(1, 4, seed=31)
    sampling = chunkkv.Sampling(max_new_tokens=30)
    ctx = chunkkv.compress(llama, ids, mask, method=method)
    batched = chunkkv.continue_from(llama, ctx, question, sampling, decode_budget=32, compress_every=4)
    width = ids.shape[1]
    for b, n in enumerate(lengths):
        alone = chunkkv.compress(llama, ids[b:b + 1, width - n:], method=method)
        tokens = chunkkv.continue_from(llama, alone, question, sampling, decode_budget=32, compress_every=4)
        assert torch.equal(batched[b], tokens[0])
        for i in alone.cache.pruned_layers:
            assert torch.equal(_kept_rows(ctx.cache.layers[i], b, width - n), alone.cache.layers[i].kept_index[0])


def test_stock_generate_follows_the_budget_on_the_cache(llama):
    ids, question = _prompt(seed=9), _prompt(1, 5, seed=10)
    method = ChunkKV(keep_tokens=40, window=8, reuse_depth=2)
    ctx = chunkkv.compress(llama, ids, method=method)
    ours_ctx = ctx.fork()
    ours = chunkkv.continue_from(
        llama, ours_ctx, question, chunkkv.Sampling(max_new_tokens=40), decode_budget=24, compress_every=8
    )
    cache = ctx.fork().cache
    cache.set_decode_budget(method, 24, 8)
    stock = llama.generate(torch.cat([ids, question], 1), cache=cache, max_new_tokens=40, do_sample=False)[:, 125:]
    assert torch.equal(ours, stock)
    assert max(cache.stored_lengths()) <= 32 and cache.decode_budget.reselections > 0
    # without the budget the answer differs (so the budget really acted)
    free = chunkkv.continue_from(llama, ctx.fork(), question, chunkkv.Sampling(max_new_tokens=40))
    assert not torch.equal(free, ours)


def test_decode_budget_errors(llama):
    ctx = chunkkv.compress(llama, _prompt(seed=11))  # full cache: no method to select with
    with pytest.raises(ChunkKVError, match="needs a method that selects"):
        chunkkv.continue_from(llama, ctx, None, decode_budget=32)
    ctx = chunkkv.compress(llama, _prompt(seed=11), method=ChunkKV(keep_tokens=40, window=8))
    with pytest.raises(ChunkKVError, match="smaller than chunkkv's observation window"):
        chunkkv.set_decode_budget(ctx, 4, 4)
    for bad in (0, -1, 1.5):
        with pytest.raises(ChunkKVError, match="decode_budget|compress_every"):
            chunkkv.set_decode_budget(ctx, 32, bad)
    with pytest.raises(ChunkKVError, match="compress_every needs decode_budget"):
        chunkkv.continue_from(llama, ctx, None, compress_every=4)
    chunkkv.detach(llama)  # a bounded cache on a detached model is refused, not silently unbounded
    try:
        chunkkv.set_decode_budget(ctx, 32, 4)  # on the context itself: every ctx.cache fork follows it
        with pytest.raises(ChunkKVError, match="attach"):
            llama.generate(torch.cat([ctx.input_ids, _prompt(1, 2)], 1), cache=ctx.cache, max_new_tokens=3)
    finally:
        chunkkv.attach(llama)


@pytest.mark.parametrize("family", ["gemma3", "phi3", "qwen3"])
def test_families_chunked_prefill_and_decode_budget_equal_the_truth(family, monkeypatch):
    model = tiny_model(family)
    ids, q = _prompt(length=90, seed=12), _prompt(1, 4, seed=13)
    log = EvictionLog(monkeypatch)
    ctx = chunkkv.compress(model, ids, method=ChunkKV(keep_tokens=30, window=6, chunk_size=4), prefill_chunk=20)
    chunkkv.set_decode_budget(ctx, 24, 4)
    got = torch.cat([chunkkv.extend(model, ctx, q)] + [chunkkv.extend(model, ctx, q[:, i:i + 1]) for i in range(4)], 1)
    assert all(ctx.cache.layers[i].stored_length <= 28 for i in ctx.cache.pruned_layers)
    full = torch.cat([ids, q, q], 1)
    truth = timed_truth_logits(model, full, torch.ones_like(full), log.evicted_after(ctx._cache, 98))
    torch.testing.assert_close(got, truth[:, 90:].to(got.dtype), atol=2e-5, rtol=1e-4)


def test_the_decoding_window_does_not_pin_a_forwards_queries():
    # The buffered window must be a copy: a view would keep every layer's whole-prompt query states
    # alive with the context (at 8k tokens on the 100M model that was +190 MiB of peak memory).
    model = tiny_model("llama")
    ctx = chunkkv.compress(model, _prompt(length=120), method=ChunkKV(keep_tokens=40, window=8))

    def own_storage(q):
        return q.untyped_storage().nbytes() == q.numel() * q.element_size()

    windows = [ctx.cache.layers[i].recent_queries for i in ctx.cache.pruned_layers]
    assert all(q is not None and q.shape[2] == 8 and own_storage(q) for q in windows)
    chunkkv.set_decode_budget(ctx, 40, 4)
    chunkkv.extend(model, ctx, _prompt(length=30, seed=5))  # one 30-token forward re-selects
    windows = [ctx.cache.layers[i].recent_queries for i in ctx.cache.pruned_layers]
    assert all(q is not None and q.shape[2] == 8 and own_storage(q) for q in windows)


# --- question-agnostic scores kept chunk by chunk -------------------------------------------------
AGNOSTIC = {
    "hybrid": ChunkKV(keep_tokens=40, window=8, chunk_size=5, scoring="hybrid"),
    "surprisal-sentences": ChunkKV(keep_tokens=40, window=8, scoring="surprisal", boundary_ids=frozenset(range(1, 25)),
                                   segmentation="sentence", chunk_size=12, chunk_reduce="sqrt_mean", kernel=1),
    "snapkv-shallow": SnapKV(keep_tokens=40, window=8, scoring="shallow_reconstruction"),
}
INSTRUCTION = torch.tensor([11, 12, 13, 14, 15])


@pytest.mark.parametrize("name", list(AGNOSTIC))
def test_agnostic_chunked_prefill_equals_full_forward_masked_over_time(llama, name, monkeypatch):
    method = AGNOSTIC[name]
    ids, question = _prompt(seed=2), _prompt(1, 5, seed=3)
    log = EvictionLog(monkeypatch)
    ctx = chunkkv.compress(llama, ids, method=method, prefill_chunk=25, scoring_prompt=INSTRUCTION)
    one_shot = chunkkv.compress(llama, ids, method=method, scoring_prompt=INSTRUCTION)
    assert ctx.cache.stored_lengths() == one_shot.cache.stored_lengths() == [40] * 4
    assert all(peak <= 40 + 25 for peak in log.stored_peak(ctx._cache))
    assert ctx.cache.get_seq_length() == 120 and ctx.stats.scoring_seconds > 0
    for i in ctx.cache.pruned_layers:  # the final window is kept, positions are original
        kept = ctx.kept_positions(i)
        assert torch.equal(kept[-8:], torch.arange(112, 120)) and int(kept.min()) >= 0
    got = chunkkv.extend(llama, ctx, question)
    full = torch.cat([ids, question], 1)
    truth = timed_truth_logits(llama, full, torch.ones_like(full), log.evicted_after(ctx._cache, 125))
    torch.testing.assert_close(got, truth[:, 120:].to(got.dtype), atol=2e-5, rtol=1e-4)


def test_hybrid_runs_as_hybrid_chunked_in_chunks_and_the_context_says_so(llama):
    """In chunks the default's copy part counts CHUNKED_COPY_WEIGHT (one chunk's pass has little
    contrast): the context's method names ``hybrid_chunked`` and keeps what that scoring keeps when
    asked for by name; in one chunk ``hybrid`` stays; weights of one's own are kept as given."""
    from dataclasses import replace

    from chunkkv.scorers import CHUNKED_COPY_WEIGHT, SCORERS, Combined

    ids = _prompt(seed=2)
    method = AGNOSTIC["hybrid"]
    ctx = chunkkv.compress(llama, ids, method=method, prefill_chunk=25, scoring_prompt=INSTRUCTION)
    assert ctx.method.scoring == "hybrid_chunked" and "scoring=hybrid_chunked" in ctx.method.describe()
    assert [w for _s, w in SCORERS["hybrid_chunked"].parts] == [CHUNKED_COPY_WEIGHT, 1.0]
    named = chunkkv.compress(llama, ids, method=replace(method, scoring="hybrid_chunked"), prefill_chunk=25,
                             scoring_prompt=INSTRUCTION)
    for i in ctx.cache.pruned_layers:
        assert torch.equal(ctx.kept_positions(i), named.kept_positions(i))
    whole = chunkkv.compress(llama, ids, method=method, prefill_chunk=120, scoring_prompt=INSTRUCTION)
    assert whole.method.scoring == "hybrid"  # one chunk: the one-shot pass, equal weights
    (copy, _), (surprisal, _) = SCORERS["hybrid"].parts
    own = Combined(((copy, 2.0), (surprisal, 1.0)))
    mine = chunkkv.compress(llama, ids, method=replace(method, scoring=own), prefill_chunk=25,
                            scoring_prompt=INSTRUCTION)
    assert mine.method.scoring == own


def test_agnostic_chunked_surprisal_is_each_tokens_nll_given_what_is_held(llama):
    """Surprisal is causal: chunk by chunk it is each token's NLL given what the layers hold, so
    before anything is dropped it is the one-shot value (padded rows included)."""
    from chunkkv.capture import capture_prefill
    from chunkkv.chunk_scoring import RunningScores
    from chunkkv.inline import prefill_inline
    from chunkkv.scoring import first_token_surprisal

    _, ids, mask = left_padded((100, 61, 83))
    real = mask.bool()
    firsts = real & ~torch.cat([torch.zeros_like(real[:, :1]), real[:, :-1]], 1)  # their value is the row's max
    want = capture_prefill(llama, ids, mask, window=6, surprisal=True).surprisal.masked_fill(firsts, 0)
    for keep, exact in ((100, 100), (40, 48)):  # the first pruning comes after 48 tokens (chunks of 16)
        method = ChunkKV(keep_tokens=keep, window=6, scoring="surprisal")
        running = RunningScores(llama, method.scorer, ids, mask, None, [0, 1, 2, 3])
        prefill_inline(llama, ids, mask, method, [100, 61, 83], prefill_chunk=16, running=running)
        got = first_token_surprisal(running.nll, mask).masked_fill(firsts, 0)
        torch.testing.assert_close(got[:, :exact], want[:, :exact], atol=1e-4, rtol=1e-4)
        assert (keep == 100) == torch.allclose(got, want, atol=1e-4, rtol=1e-4)


def test_agnostic_chunked_copy_pass_is_taken_over_its_chunks_mean(llama):
    """Each chunk's copy pass is scaled to mean 1 over the chunk's own real tokens (padded rows
    included), so the last chunk, scored by its pass alone, averages exactly 1 in every row."""
    from chunkkv.chunk_scoring import RunningScores
    from chunkkv.inline import prefill_inline

    _, ids, mask = left_padded((100, 61, 83))
    method = ChunkKV(keep_tokens=40, window=6, scoring="shallow_reconstruction")
    running = RunningScores(llama, method.scorer, ids, mask, lambda _text: INSTRUCTION, [0, 1, 2, 3])
    prefill_inline(llama, ids, mask, method, [100, 61, 83], prefill_chunk=16, running=running)
    copy = next(iter(running.copy.values()))
    last = mask.clone()
    last[:, :-16] = 0  # the last chunk's real tokens
    mean = (copy * last).sum(-1) / last.sum(-1)
    torch.testing.assert_close(mean, torch.ones(3), atol=1e-5, rtol=1e-5)
    assert bool((copy[mask == 0] == 0).all())  # padding never scores


def test_agnostic_chunked_padded_batch_equals_rows_alone(llama):
    rows, ids, mask = left_padded((100, 61, 83))
    method = AGNOSTIC["hybrid"]
    ctx = chunkkv.compress(llama, ids, mask, method=method, prefill_chunk=20, scoring_prompt=INSTRUCTION)
    question = _prompt(1, 4, seed=30)
    batched = chunkkv.extend(llama, ctx.fork(), question)
    for b, r in enumerate(rows):
        alone = chunkkv.compress(llama, r[None], method=method, prefill_chunk=20, scoring_prompt=INSTRUCTION)
        for layer in alone.cache.pruned_layers:
            assert torch.equal(ctx.kept_positions(layer, b), alone.kept_positions(layer, 0)), (b, layer)
        torch.testing.assert_close(batched[b], chunkkv.extend(llama, alone, question)[0], atol=1e-4, rtol=1e-4)


def test_agnostic_chunked_prefill_refuses_what_needs_the_full_cache(llama):
    for scoring in ("reconstruction", "probe"):
        with pytest.raises(ChunkKVError, match=f"scoring='{scoring}' scores the whole context on the full cache"):
            chunkkv.compress(llama, _prompt(), method=ChunkKV(keep_tokens=40, window=8, scoring=scoring),
                             prefill_chunk=30, scoring_prompt=INSTRUCTION)
    with pytest.raises(ChunkKVError, match="feeds the instruction"):
        chunkkv.compress(llama, _prompt(), method=ChunkKV(keep_tokens=40, window=8, scoring="hybrid"), prefill_chunk=30)
