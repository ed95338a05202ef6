"""Question-agnostic scoring (reconstruction / probe / surprisal): the scores, the cache, decoding, errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import chunkkv
from chunkkv import H2O, ChunkKV, ChunkKVError, PromptError, PyramidKV, SnapKV, StreamingLLM
from chunkkv.agnostic import SENTENCE_CHUNKS
from chunkkv.boundaries import boundary_token_ids
from chunkkv.capture import capture_prefill, layer_scores
from chunkkv.pipeline import compress_from_capture
from chunkkv.plan import leader_layers
from chunkkv.scorers import Evidence, ReconstructionScorer
from chunkkv.scoring import attend_and_score, max_attention_scores
from chunkkv.scoring_pass import auto_chunk
from chunkkv.scoring_pass import segments as _segments

from models import assert_decodes_like_truth, left_padded, tiny_model
from models import random_prompt as _prompt


def _left_padded(lengths, seed=20):
    return left_padded(lengths, seed)


def agnostic_scores(model, capture, scoring, layers, prompt=None, block=512, chunk="auto"):
    """``{layer: scores}`` of ``scoring`` on ``capture``, its scoring passes run afresh (not the
    capture's cached evidence), with ``prompt`` as every pass's instruction."""
    fresh = replace(capture, evidence=Evidence(surprisal=capture.surprisal), pass_seconds={},
                    instructions=None if prompt is None else (lambda _text: prompt))
    return layer_scores(fresh, scoring, layers, block=block, chunk=chunk)

PROMPT = torch.tensor([11, 12, 13, 14, 15])


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


# --- the pure scoring math ------------------------------------------------------------------------
def _reference(queries, keys, scaling, context_len, key_valid, query_valid, reduce):
    """Plain loops: full softmax per (row, query head, query), then max / sum over the group."""
    batch, n_q, q_len, _ = queries.shape
    n_kv, length = keys.shape[1], keys.shape[2]
    groups = n_q // n_kv
    out = torch.zeros(batch, n_kv, context_len, dtype=torch.float64)
    for b in range(batch):
        for h in range(n_q):
            for i in range(q_len):
                if query_valid is not None and not query_valid[b, i]:
                    continue
                own = length - q_len + i
                allowed = torch.arange(length) <= own
                if key_valid is not None:
                    allowed &= key_valid[b]
                logits = (queries[b, h, i].double() @ keys[b, h // groups].double().T) * scaling
                probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), -1)[:context_len]
                kv = h // groups
                out[b, kv] = torch.maximum(out[b, kv], probs) if reduce == "max" else out[b, kv] + probs
    return out


@pytest.mark.parametrize("reduce", ["max", "sum"])
def test_blocked_scores_equal_one_pass_and_a_plain_reference(reduce):
    g = torch.Generator().manual_seed(0)
    batch, n_q, n_kv, context, q_len, d = 2, 4, 2, 30, 11, 8
    keys = torch.randn(batch, n_kv, context + q_len, d, generator=g)
    queries = torch.randn(batch, n_q, q_len, d, generator=g)
    key_valid = torch.ones(batch, context + q_len, dtype=torch.bool)
    key_valid[1, :7] = False  # left padding of row 1
    key_valid[1, -2:] = False  # and right padding of its scoring tokens
    query_valid = key_valid[:, -q_len:]
    one = max_attention_scores(queries, keys, 0.3, context, key_valid, query_valid, reduce=reduce)
    want = _reference(queries, keys, 0.3, context, key_valid, query_valid, reduce)
    torch.testing.assert_close(one.double(), want, atol=1e-6, rtol=1e-5)
    for block in (1, 3, 5, 10):
        blocked = max_attention_scores(queries, keys, 0.3, context, key_valid, query_valid, reduce=reduce, block=block)
        torch.testing.assert_close(blocked, one, atol=1e-7, rtol=1e-6)
    assert bool((one[1, :, :7] == 0).all())  # padding never scores


def test_attend_and_score_gives_the_attention_output_and_the_same_scores():
    g = torch.Generator().manual_seed(1)
    batch, n_q, n_kv, context, q_len, d = 2, 6, 2, 25, 9, 8
    keys = torch.randn(batch, n_kv, context + q_len, d, generator=g)
    values = torch.randn(batch, n_kv, context + q_len, 5, generator=g)
    queries = torch.randn(batch, n_q, q_len, d, generator=g)
    key_valid = torch.ones(batch, context + q_len, dtype=torch.bool)
    key_valid[1, :4] = False
    key_valid[1, -3:] = False
    query_valid = key_valid[:, -q_len:]
    for reduce in ("max", "sum"):
        out, scores = attend_and_score(queries, keys, values, 0.4, context, key_valid, query_valid, reduce=reduce)
        want = max_attention_scores(queries, keys, 0.4, context, key_valid, query_valid, reduce=reduce)
        torch.testing.assert_close(scores, want, atol=1e-6, rtol=1e-5)
    causal = torch.ones(q_len, context + q_len, dtype=torch.bool).tril(context)
    allowed = causal[None, None] & key_valid[:, None, None, :]
    reference = torch.nn.functional.scaled_dot_product_attention(
        queries, keys.repeat_interleave(3, 1), values.repeat_interleave(3, 1), attn_mask=allowed, scale=0.4)
    real = query_valid[:, None, :, None].expand_as(out)  # padding queries' outputs are never used
    torch.testing.assert_close(out[real], reference[real], atol=1e-5, rtol=1e-5)


def test_masked_scores_equal_the_plain_scores_under_a_causal_mask_and_honour_a_window():
    from chunkkv.scoring import masked_attention_scores

    g = torch.Generator().manual_seed(2)
    batch, n_q, n_kv, context, q_len, d = 2, 4, 2, 20, 6, 8
    keys = torch.randn(batch, n_kv, context + q_len, d, generator=g)
    queries = torch.randn(batch, n_q, q_len, d, generator=g)
    key_valid = torch.ones(batch, context + q_len, dtype=torch.bool)
    key_valid[1, :5] = False
    causal = torch.ones(q_len, context + q_len, dtype=torch.bool).tril(context)
    mask = causal[None, None] & key_valid[:, None, None, :]
    for reduce in ("max", "sum"):
        want = max_attention_scores(queries, keys, 0.3, context, key_valid, reduce=reduce)
        torch.testing.assert_close(masked_attention_scores(queries, keys, 0.3, mask, context, reduce=reduce), want)
        additive = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        torch.testing.assert_close(masked_attention_scores(queries, keys, 0.3, additive, context, reduce=reduce), want)
        torch.testing.assert_close(masked_attention_scores(queries, keys, 0.3, mask, context, reduce=reduce, block=4),
                                   want)  # blocks of queries change nothing
    window = mask & (torch.arange(context + q_len)[None, :] > torch.arange(context, context + q_len)[:, None] - 8)
    scores = masked_attention_scores(queries, keys, 0.3, window, context)
    assert bool((scores[..., : context - 7] == 0).all()) and bool((scores[..., context - 7:] > 0).all())


def test_the_scoring_pass_equals_the_model_attention_path(llama, monkeypatch):
    """The scored layers' attention computed once (output and scores) changes nothing downstream:
    the same scores as running the model's own attention and scoring beside it."""
    from chunkkv.scoring_pass import _ScoringSession

    _, ids, mask = _left_padded((50, 37, 44))
    capture = capture_prefill(llama, ids, mask, window=8)
    once = agnostic_scores(llama, capture, "reconstruction", [0, 1, 2, 3], PROMPT, block=16)
    monkeypatch.setattr(_ScoringSession, "attend", lambda *a, **k: None)
    twice = agnostic_scores(llama, capture, "reconstruction", [0, 1, 2, 3], PROMPT, block=16)
    for layer in range(4):
        torch.testing.assert_close(once[layer], twice[layer], atol=1e-6, rtol=1e-5)


# --- on a model -----------------------------------------------------------------------------------
@pytest.mark.parametrize("scoring", ["reconstruction", "shallow_reconstruction", "probe"])
@pytest.mark.parametrize("chunk", [None, 20])
def test_scores_do_not_depend_on_the_block_size(llama, scoring, chunk):
    _, ids, mask = _left_padded((50, 37, 44))
    capture = capture_prefill(llama, ids, mask, window=8)
    one = agnostic_scores(llama, capture, scoring, [0, 1, 2, 3], PROMPT, block=10_000, chunk=chunk)
    before = [layer.keys.clone() for layer in capture.cache.layers]
    for block in ((1, 7) if scoring == "probe" else (7, 16)):  # (shallow: the early stop in every block)
        blocked = agnostic_scores(llama, capture, scoring, [0, 1, 2, 3], PROMPT, block=block, chunk=chunk)
        for layer in range(4):
            torch.testing.assert_close(blocked[layer], one[layer], atol=1e-6, rtol=1e-5)
    # the capture's cache never sees the scoring tokens
    assert all(torch.equal(layer.keys, b) for layer, b in zip(capture.cache.layers, before))
    assert capture.cache.stored_lengths() == [50] * 4


def test_reconstruction_segments_are_the_prompt_then_one_chunk_each():
    ids = torch.arange(13)[None].repeat(2, 1)
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, 10:] = 0  # row 1's context is shorter: right padding
    segments = _segments(ids, mask, 3, 4)
    assert [s[0][0].tolist() for s in segments] == [[0, 1, 2, 3, 4, 5, 6], [0, 1, 2, 7, 8, 9, 10], [0, 1, 2, 11, 12]]
    assert segments[2][1].tolist() == [[1] * 5, [1, 1, 1, 0, 0]] and segments[1][1][1].tolist() == [1] * 6 + [0]
    assert len(_segments(ids, mask, 3, 10)) == 1 and len(_segments(ids, mask, 3, None)) == 1


def test_chunked_reconstruction_keeps_positions_near_the_context(llama):
    """Each chunk starts again right after the context: positions never pass context + prompt + chunk,
    and each chunk sees the context but not the chunks before it (the scores differ from one pass)."""
    _, ids, mask = _left_padded((50, 37, 44))
    capture = capture_prefill(llama, ids, mask, window=8)

    def fed(chunk):  # (largest position, widest key mask) over the scoring forwards
        calls = []
        hook = llama.model.register_forward_pre_hook(
            lambda m, a, k: calls.append((int(k["position_ids"].max()), k["attention_mask"].shape[-1])),
            with_kwargs=True)
        try:
            scores = agnostic_scores(llama, capture, "reconstruction", [0, 3], PROMPT, block=8, chunk=chunk)
        finally:
            hook.remove()
        return scores, max(c[0] for c in calls), max(c[1] for c in calls), len(calls)

    chunked, position, keys, calls = fed(20)
    assert (position, keys, calls) == (50 + 5 + 20 - 1, 50 + 5 + 20, 4 + 4 + 2)  # chunks of 25, 25, 15 tokens, blocks of 8
    whole, position, keys, calls = fed(None)
    assert (position, keys, calls) == (50 + 55 - 1, 50 + 55, 7)
    # one chunk as long as the context is the unchunked pass
    one = agnostic_scores(llama, capture, "reconstruction", [0, 3], PROMPT, block=8, chunk=50)
    torch.testing.assert_close(one[3], whole[3])
    with pytest.raises(PromptError, match="chunk=0 must be an int >= 1, 'auto' or None"):
        agnostic_scores(llama, capture, "reconstruction", [0], PROMPT, chunk=0)


def test_auto_chunk_fills_the_trained_positions(llama, monkeypatch):
    from types import SimpleNamespace

    import chunkkv.scoring_pass

    eight_k = SimpleNamespace(max_position_embeddings=8192)
    assert auto_chunk(eight_k, 1000, 12) == 7180  # a 1k context is repeated in one pass
    assert auto_chunk(eight_k, 4105, 12) == 4075  # positions end at 8192
    assert auto_chunk(eight_k, 8000, 12) == 512  # never shorter than RECONSTRUCTION_CHUNK
    assert auto_chunk(SimpleNamespace(), 8000, 12) is None
    # on a model: "auto" is the chunk the model's length allows
    monkeypatch.setattr(chunkkv.scoring_pass, "RECONSTRUCTION_CHUNK", 8)
    monkeypatch.setattr(llama.config, "max_position_embeddings", 50 + 5 + 20)
    _, ids, mask = _left_padded((50, 37, 44))
    capture = capture_prefill(llama, ids, mask, window=8)
    positions = []
    hook = llama.model.register_forward_pre_hook(
        lambda m, a, k: positions.append(int(k["position_ids"].max())), with_kwargs=True)
    try:
        auto = agnostic_scores(llama, capture, "shallow_reconstruction", [0], PROMPT, block=16)
    finally:
        hook.remove()
    assert max(positions) == 50 + 5 + 20 - 1 and len(positions) == 2 + 2 + 1  # chunks of 20, 20, 10
    fixed = agnostic_scores(llama, capture, "shallow_reconstruction", [0], PROMPT, block=16, chunk=20)
    torch.testing.assert_close(auto[0], fixed[0])


def test_reconstruction_tokens_are_not_in_the_cache(llama):
    rows, ids, mask = _left_padded((100, 61, 83))
    for method in (ChunkKV(keep_tokens=30, window=6, scoring="reconstruction", reuse_depth=2),
                   SnapKV(keep_fraction=0.3, window=6, scoring="probe")):
        ctx = chunkkv.compress(llama, ids, mask, method=method, scoring_prompt=PROMPT, scoring_block=16)
        assert ctx.cache.get_seq_length() == 100  # logical length: the prompt only
        assert max(ctx.cache.stored_lengths()) <= 30
        assert ctx.attention_mask.shape == (3, 100)
        for layer in ctx.cache.pruned_layers:
            for row, r in enumerate(rows):
                per_head = method.name == "snapkv"
                kept = ctx.kept_positions(layer, row, head=1 if per_head else None)
                assert len(kept) == (int(0.3 * len(r)) if per_head else 30)
                assert int(kept.max()) < len(r) and int(kept.min()) >= 0
        assert ctx.stats.scoring_seconds > 0
    # reuse followers are not scored
    ctx = chunkkv.compress(llama, ids, mask, method=ChunkKV(keep_tokens=30, window=6, scoring="reconstruction",
                                                            reuse_depth=2), scoring_prompt=PROMPT)
    assert ctx.stats.scored_layers == [0, 2]
    assert torch.equal(ctx.cache.layers[1].kept_index, ctx.cache.layers[0].kept_index)


def test_shallow_depth_is_the_first_quarter_of_the_compressed_layers_rounded_up():
    def shallow_layers(n, compressed=None):
        return chunkkv.SCORERS["shallow_reconstruction"].scoring_pass.layers(compressed or list(range(n)), [])

    assert shallow_layers(30) == list(range(8)) and shallow_layers(32) == list(range(8))
    assert shallow_layers(28) == list(range(7)) and shallow_layers(4) == [0] and shallow_layers(1) == [0]
    # a model with sliding-window layers (Gemma 3): a quarter of the layers that are compressed
    assert shallow_layers(18, [5, 11, 17]) == [5]


def test_shallow_reconstruction_is_the_max_over_the_first_layers_and_stops_there(llama):
    half = ReconstructionScorer(depth=0.5, sink=4)  # two of the 4 layers: the max over layers counts
    _, ids, mask = _left_padded((50, 37, 44))
    capture = capture_prefill(llama, ids, mask, window=8)
    assert half.scoring_pass.layers(capture.cache.pruned_layers, []) == [0, 1]
    full = agnostic_scores(llama, capture, "reconstruction", [0, 1, 2, 3], PROMPT, block=16)
    want = torch.maximum(full[0], full[1]).amax(dim=1)  # the largest over those layers and their heads
    for row, pad in enumerate((0, 13, 6)):  # each row's first 4 real tokens: the row's largest score
        want[row, pad:pad + 4] = want[row].max()
    calls = []
    hooks = [layer.self_attn.register_forward_pre_hook(lambda m, a, i=i: calls.append(i))
             for i, layer in enumerate(llama.model.layers)]
    try:
        shallow = agnostic_scores(llama, capture, half, [0, 3], PROMPT, block=16)
    finally:
        for h in hooks:
            h.remove()
    assert sorted(shallow) == [0, 3]  # the requested layers, all with the one shared score
    for layer in (0, 3):
        assert shallow[layer].shape == full[0].shape
        torch.testing.assert_close(shallow[layer], want[:, None, :].expand_as(full[0]))
    # the forward stopped after the last scored layer in every block: layers 2 and 3 never ran
    assert set(calls) == {0, 1} and len(calls) == 2 * 4  # 4 blocks of 16 over 5 + 50 scoring tokens
    assert agnostic_scores(llama, capture, half, [], PROMPT) == {}


def test_hybrid_is_surprisal_plus_shallow_reconstruction_each_over_its_row_max(llama):
    _, ids, mask = _left_padded((50, 37, 44))
    capture = capture_prefill(llama, ids, mask, window=8, surprisal=True)
    copy = agnostic_scores(llama, capture, "shallow_reconstruction", [2], PROMPT)[2]
    hybrid = agnostic_scores(llama, capture, "hybrid", [0, 2], PROMPT)
    s = capture.surprisal[:, None, :]
    want = copy / copy.amax(-1, keepdim=True) + s / s.amax(-1, keepdim=True)
    for layer in (0, 2):
        torch.testing.assert_close(hybrid[layer], want)
    assert bool((hybrid[0][1, :, :13] == 0).all())  # padding scores nothing
    with pytest.raises(PromptError, match="scoring='hybrid' needs a capture made with"):
        agnostic_scores(llama, capture_prefill(llama, ids, mask, window=8), "hybrid", [0], PROMPT)


def test_reconstruction_changes_what_is_kept(llama):
    ids = _prompt(seed=3)
    window = chunkkv.compress(llama, ids, method=ChunkKV(keep_tokens=40, window=8))
    recon = chunkkv.compress(llama, ids, method=ChunkKV(keep_tokens=40, window=8, scoring="reconstruction"),
                             scoring_prompt=PROMPT)
    assert not torch.equal(window.cache.layers[0].kept_index, recon.cache.layers[0].kept_index)
    # the next-token logits are the prefill's, whatever the scoring
    torch.testing.assert_close(recon.next_logits, window.next_logits, atol=1e-5, rtol=1e-5)


METHODS = {
    "chunkkv-recon": ChunkKV(keep_tokens=40, window=8, chunk_size=5, scoring="reconstruction"),
    "chunkkv-reuse-probe": ChunkKV(keep_fraction=0.3, window=8, reuse_depth=2, scoring="probe"),
    "snapkv-recon": SnapKV(keep_tokens=40, window=8, scoring="reconstruction"),
    "pyramidkv-recon": PyramidKV(keep_tokens=40, window=8, scoring="reconstruction"),
    "h2o-probe": H2O(keep_fraction=0.25, window=4, scoring="probe"),
    "kvpress-recon": chunkkv.KVPressChunkKV(remove_fraction=0.7, window=8, scoring="reconstruction"),
    "chunkkv-surprisal": ChunkKV(keep_tokens=40, window=8, chunk_size=5, scoring="surprisal"),
    "chunkkv-shallow-reuse": ChunkKV(keep_tokens=40, window=8, chunk_size=5, reuse_depth=2,
                                     scoring="shallow_reconstruction"),
    "snapkv-shallow": SnapKV(keep_fraction=0.3, window=8, scoring="shallow_reconstruction"),
    "chunkkv-sentences-hybrid": ChunkKV(keep_tokens=40, window=8, scoring="hybrid",
                                        boundary_ids=frozenset(range(1, 25)), **{**SENTENCE_CHUNKS, "chunk_size": 12}),
    "snapkv-surprisal": SnapKV(keep_fraction=0.3, window=8, scoring="surprisal"),
    "chunkkv-sentences-surprisal": ChunkKV(  # the question-agnostic default's settings, shorter sentences
        keep_tokens=40, window=8, scoring="surprisal", boundary_ids=frozenset(range(1, 25)),
        **{**SENTENCE_CHUNKS, "chunk_size": 12}),
}


@pytest.mark.parametrize("name", list(METHODS))
def test_decoding_equals_full_forward_with_evicted_tokens_masked(llama, name):
    ids, question = _prompt(seed=4), _prompt(1, 5, seed=5)
    ctx = chunkkv.compress(llama, ids, method=METHODS[name], scoring_prompt=PROMPT, scoring_block=32)
    assert max(ctx.cache.stored_lengths()) < 120 and ctx.cache.get_seq_length() == 120
    assert_decodes_like_truth(llama, ctx, ids, question, new_tokens=8)  # and stock generate agrees


@pytest.mark.parametrize("scoring", ["reconstruction", "shallow_reconstruction", "probe", "surprisal", "hybrid"])
def test_batched_rows_keep_what_they_keep_alone(llama, scoring):
    rows, ids, mask = _left_padded((100, 61, 83))
    method = ChunkKV(keep_fraction=0.3, window=6, chunk_size=4, scoring=scoring)
    ctx = chunkkv.compress(llama, ids, mask, method=method, scoring_prompt=PROMPT)
    question = _prompt(1, 4, seed=30)
    batched = chunkkv.extend(llama, ctx.fork(), question)
    for b, r in enumerate(rows):
        alone = chunkkv.compress(llama, r[None], method=method, scoring_prompt=PROMPT)
        for layer in alone.cache.pruned_layers:
            assert torch.equal(ctx.kept_positions(layer, b), alone.kept_positions(layer, 0))
        torch.testing.assert_close(batched[b], chunkkv.extend(llama, alone, question)[0], atol=1e-4, rtol=1e-4)


def test_saved_reconstruction_context_round_trips(llama, tmp_path):
    ctx = chunkkv.compress(llama, _prompt(seed=6), method=ChunkKV(keep_tokens=30, window=8, scoring="reconstruction"),
                           scoring_prompt=PROMPT)
    ctx.save(tmp_path / "c.ckv")
    loaded = chunkkv.load_context(tmp_path / "c.ckv", llama)
    assert loaded.method.scoring == "reconstruction" and loaded.stats.scoring_seconds == ctx.stats.scoring_seconds
    q = _prompt(1, 3, seed=7)
    assert torch.equal(chunkkv.extend(llama, loaded, q), chunkkv.extend(llama, ctx.fork(), q))


def test_saved_sentence_chunk_context_round_trips(llama, tmp_path):
    method = METHODS["chunkkv-sentences-surprisal"]
    ctx = chunkkv.compress(llama, _prompt(seed=6), method=method)
    ctx.save(tmp_path / "c.ckv")  # boundary_ids is a set of ids: saved as a list, loaded as the same method
    loaded = chunkkv.load_context(tmp_path / "c.ckv", llama)
    assert loaded.method == method
    q = _prompt(1, 3, seed=7)
    assert torch.equal(chunkkv.extend(llama, loaded, q), chunkkv.extend(llama, ctx.fork(), q))


def test_leader_layers_follow_the_reuse_schedule():
    def leaders(method):
        return leader_layers(method, [120], 120, [0, 1, 2, 3], "cpu")

    assert leaders(ChunkKV(keep_tokens=30, window=8, reuse_depth=2)) == [0, 2]
    assert leaders(SnapKV(keep_tokens=30, window=8)) == [0, 1, 2, 3]
    assert leaders(ChunkKV(keep_tokens=500, window=8)) == []  # nothing to drop


def test_errors(llama):
    with pytest.raises(ChunkKVError, match="scoring='recon' is not one of window, reconstruction, "
                                           "shallow_reconstruction, probe, surprisal, hybrid"):
        ChunkKV(keep_tokens=10, scoring="recon")
    with pytest.raises(ChunkKVError, match="streamingllm does not score tokens"):
        StreamingLLM(keep_tokens=10, scoring="reconstruction")
    # a scoring pass never runs without its instruction (it would score something else than its name says)
    for scoring in ("probe", "reconstruction", "hybrid"):
        with pytest.raises(PromptError, match=f"scoring='{scoring}' feeds the instruction .* pass tokenizer="):
            chunkkv.compress(llama, _prompt(), method=ChunkKV(keep_tokens=30, window=8, scoring=scoring))
    with pytest.raises(PromptError, match="the scoring pass has no tokens"):
        chunkkv.compress(llama, _prompt(), method=ChunkKV(keep_tokens=30, window=8, scoring="probe"),
                         scoring_prompt=torch.tensor([], dtype=torch.long))
    with pytest.raises(PromptError, match="scoring_block=0 must be an int >= 1"):
        chunkkv.compress(llama, _prompt(), method=ChunkKV(keep_tokens=30, window=8, scoring="reconstruction"),
                         scoring_prompt=PROMPT, scoring_block=0)
    with pytest.raises(PromptError, match="window=8 is not shorter than the prompt"):
        chunkkv.compress(llama, _prompt(length=8), method=ChunkKV(keep_tokens=3, window=8, scoring="reconstruction"))
    # the selection from a capture runs the pass itself, and refuses without an instruction
    capture = capture_prefill(llama, _prompt(), window=8)
    with pytest.raises(PromptError, match="feeds the instruction"):
        compress_from_capture(capture, ChunkKV(keep_tokens=30, window=8, scoring="reconstruction"))
    broken = tiny_model("llama")
    broken.get_output_embeddings = lambda: None  # a model that hides its output projection
    with pytest.raises(chunkkv.UnsupportedModelError, match="output projection"):
        chunkkv.compress(broken, _prompt(), method=ChunkKV(keep_tokens=30, window=8, scoring="surprisal"))


def test_agnostic_scoring_on_a_model_with_sliding_window_layers():
    """Gemma 3's mix: the sliding layers (window shorter than the prompt) stay as they are, the full
    layers are scored (shallow: the first quarter of them) and compressed."""
    gemma = tiny_model("gemma3", sliding_window=16)
    ids = _prompt(length=60)
    for scoring in ("reconstruction", "shallow_reconstruction", "hybrid"):
        ctx = chunkkv.compress(gemma, ids, method=ChunkKV(keep_tokens=20, window=4, scoring=scoring),
                               scoring_prompt=PROMPT)
        assert ctx.cache.pruned_layers == [1, 3]
        assert [len(ctx.kept_positions(i)) for i in (1, 3)] == [20, 20]
        assert ctx.cache.stored_lengths()[0] <= 16  # a sliding layer holds its window
        assert torch.equal(ctx.kept_positions(0), torch.arange(60 - ctx.cache.stored_lengths()[0], 60))
    # a prompt inside the window: every layer is compressed, and the pass (prompt + 40 repeated
    # tokens) outgrows the 64-token window of the sliding layers, whose scores follow their mask
    gemma = tiny_model("gemma3", sliding_window=64)
    ctx = chunkkv.compress(gemma, _prompt(length=40), method=ChunkKV(keep_tokens=20, window=4, scoring="reconstruction"),
                           scoring_prompt=torch.arange(11, 41))
    assert ctx.cache.pruned_layers == [0, 1, 2, 3] and ctx.cache.stored_lengths() == [20] * 4


def test_surprisal_is_each_tokens_negative_log_likelihood(llama):
    # against the model's own full logits, row by row (padding is 0, a row's first token its maximum)
    rows, ids, mask = _left_padded((50, 37, 44))
    capture = capture_prefill(llama, ids, mask, window=8, surprisal=True)
    assert capture.surprisal.shape == (3, 50) and capture.surprisal_seconds > 0
    for b, r in enumerate(rows):
        logits = llama(r[None]).logits[0].float()
        want = -torch.log_softmax(logits[:-1], -1).gather(-1, r[1:, None])[:, 0]
        got = capture.surprisal[b, 50 - len(r):]
        torch.testing.assert_close(got[1:], want, atol=1e-4, rtol=1e-4)
        assert got[0] == got.max() and bool((capture.surprisal[b, : 50 - len(r)] == 0).all())
    # the blocked projection equals one block
    from chunkkv.scoring import token_surprisal

    hidden = torch.randn(2, 9, 64)
    head = torch.nn.Linear(64, 50, bias=False)
    tokens = torch.randint(0, 50, (2, 9))
    ones = torch.ones(2, 9, dtype=torch.long)
    torch.testing.assert_close(token_surprisal(hidden, head, tokens, ones, block=2),
                               token_surprisal(hidden, head, tokens, ones), atol=1e-5, rtol=1e-5)
    # every layer and head gets the same scores, and ChunkKV keeps the most surprising chunks
    scores = agnostic_scores(llama, capture, "surprisal", [0, 3])
    assert torch.equal(scores[0], scores[3]) and scores[0].shape == (3, 2, 50)
    with pytest.raises(PromptError, match="surprisal=True"):
        agnostic_scores(llama, capture_prefill(llama, ids, mask, window=8), "surprisal", [0])


def test_surprisal_keeps_the_least_predictable_chunks(llama):
    ids = _prompt(seed=8)
    method = ChunkKV(keep_tokens=40, window=8, chunk_size=5, scoring="surprisal")
    ctx = chunkkv.compress(llama, ids, method=method)
    nll = capture_prefill(llama, ids, window=8, surprisal=True).surprisal[0, :112]  # the prefix before the window
    kept = ctx.kept_positions(0, 0)
    inside = torch.zeros(112, dtype=torch.bool)
    inside[kept[kept < 112]] = True
    assert int(inside.sum()) == 32 and nll[inside].mean() > nll[~inside].mean()
    assert all(torch.equal(ctx.kept_positions(layer, 0), kept) for layer in ctx.cache.pruned_layers)
    window = chunkkv.compress(llama, ids, method=ChunkKV(keep_tokens=40, window=8, chunk_size=5))
    assert not torch.equal(window.kept_positions(0, 0), kept)
    assert ctx.stats.scoring_seconds > 0


# --- text API and CLI -----------------------------------------------------------------------------
def test_generate_and_cli_score_question_agnostically(capsys, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chunkkv.agnostic import scoring_prompt
    from chunkkv.cli import main
    from test_cli import QUESTION_TEXT, save_tiny_model, write_context

    folder = save_tiny_model(tmp_path / "model")
    doc = write_context(tmp_path / "doc.txt")
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    method = ChunkKV(keep_fraction=0.2)
    sampling = chunkkv.Sampling(max_new_tokens=5)
    result = chunkkv.generate(model, tok, doc.read_text(), [QUESTION_TEXT], method, sampling=sampling,
                              scoring="reconstruction")
    # equals compressing by hand with the reconstruction prompt, then asking
    ids = tok(doc.read_text(), return_tensors="pt")["input_ids"]
    ctx = chunkkv.compress(model, ids, method=ChunkKV(keep_fraction=0.2, scoring="reconstruction"),
                           scoring_prompt=scoring_prompt(tok, "reconstruction"))
    q = tok(QUESTION_TEXT, add_special_tokens=False, return_tensors="pt")["input_ids"]
    tokens = chunkkv.continue_from(model, ctx, q, sampling)
    assert result.answers[0].token_ids[0] == tokens[0].tolist()
    assert result.kept_tokens == ctx.stats.kept
    code = main(["generate", "--model", str(folder), "--device", "cpu", "--context-file", str(doc), "--question",
                 QUESTION_TEXT, "--separator", "", "--keep-fraction", "0.2", "--scoring", "probe",
                 "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert code == 0
    assert "chunkkv(20% kept, scoring=probe, whole numbers)" in out and "+ probe scoring" in out
    assert main(["generate", "--model", str(folder), "--context-file", str(doc), "--method", "streamingllm",
                 "--keep-fraction", "0.2", "--scoring", "probe"]) == 2
    assert "streamingllm does not score tokens" in capsys.readouterr().err
    # the question-agnostic default (no scoring given) is hybrid on sentence chunks: the same tokens as by hand
    result = chunkkv.generate(model, tok, doc.read_text(), [QUESTION_TEXT], method, sampling=sampling)
    by_hand = ChunkKV(keep_fraction=0.2, scoring="hybrid", boundary_ids=boundary_token_ids(tok, clauses=False),
                      **SENTENCE_CHUNKS)
    ctx = chunkkv.compress(model, ids, method=by_hand, scoring_prompt=scoring_prompt(tok, "hybrid"))
    assert result.answers[0].token_ids[0] == chunkkv.continue_from(model, ctx, q, sampling)[0].tolist()
    plain = chunkkv.compress(model, ids, method=ChunkKV(keep_fraction=0.2, scoring="hybrid"),
                             scoring_prompt=scoring_prompt(tok, "hybrid"))
    assert not torch.equal(plain.kept_positions(0, 0), ctx.kept_positions(0, 0))  # the preset changes the picks
    assert main(["generate", "--model", str(folder), "--device", "cpu", "--context-file", str(doc), "--question",
                 QUESTION_TEXT, "--separator", "", "--keep-fraction", "0.2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "scoring=hybrid" in out and "segmentation=sentence" in out
    # under a decode budget the answers still come (re-selection cuts fixed chunks of the same size)
    bounded = chunkkv.generate(model, tok, doc.read_text(), [QUESTION_TEXT], ChunkKV(keep_fraction=0.2, window=8),
                               sampling=sampling, decode_budget=12, compress_every=1)
    assert len(bounded.answers[0].token_ids[0]) == 5


class _SentenceTokenizer:
    all_special_ids = [0]
    vocab = ["<s>", "word", ".", ","]

    def __len__(self):
        return len(self.vocab)

    def decode(self, ids):
        return "".join(self.vocab[i] for i in ids)


def test_question_agnostic_default_and_bounded_memory(llama):
    from chunkkv.agnostic import AGNOSTIC_DEFAULT, agnostic_method

    method = ChunkKV(keep_fraction=0.2, window=8)
    assert AGNOSTIC_DEFAULT == "hybrid"
    assert agnostic_method(method).scoring == "hybrid"  # the measured default (docs/question-agnostic.md)
    assert agnostic_method(method, "window").scoring == "window"
    assert agnostic_method(StreamingLLM(keep_tokens=10)) == StreamingLLM(keep_tokens=10)
    # with a tokenizer, a ChunkKV left at the paper's chunking also gets sentence chunks
    tok = _SentenceTokenizer()
    preset = agnostic_method(method, tokenizer=tok)
    assert preset == replace(method, scoring="hybrid", boundary_ids=frozenset({2}), **SENTENCE_CHUNKS)
    assert agnostic_method(method, "surprisal", tokenizer=tok) == replace(method, scoring="surprisal")  # asked for
    assert agnostic_method(replace(method, chunk_size=20), tokenizer=tok).chunking == "fixed"  # the user's chunks
    assert agnostic_method(SnapKV(keep_tokens=10), tokenizer=tok) == SnapKV(keep_tokens=10, scoring="hybrid")
    assert agnostic_method(chunkkv.KVPressChunkKV(remove_fraction=0.5), tokenizer=tok).chunking == "fixed"
    with pytest.raises(PromptError, match="scoring='reconstruction' scores the whole context on the full cache"):
        chunkkv.compress(llama, _prompt(), method=ChunkKV(keep_tokens=40, window=8, scoring="reconstruction"),
                         prefill_chunk=32, scoring_prompt=PROMPT)
    # a reconstruction-scored context decodes under a decode budget (re-selection uses the window)
    ctx = chunkkv.compress(llama, _prompt(seed=8), method=ChunkKV(keep_tokens=40, window=8, scoring="reconstruction"),
                           scoring_prompt=PROMPT)
    chunkkv.generation.set_decode_budget(ctx, 40, 4)
    tokens = chunkkv.continue_from(llama, ctx, _prompt(1, 3, seed=9), chunkkv.Sampling(max_new_tokens=12))
    assert tokens.shape == (1, 12) and max(ctx.cache.stored_lengths()) <= 44
