"""Decoding after compression is correct: positions, masks, reuse, batches, stock generate."""

from __future__ import annotations

import pytest
import torch

import chunkkv
from chunkkv import ChunkKV, FullKV, H2O, PyramidKV, SnapKV, StreamingLLM

from models import VOCAB, assert_decodes_like_truth, kept_masks, tiny_model, truth_logits
from models import random_prompt as _prompt

METHODS = {
    "chunkkv": ChunkKV(keep_tokens=40, window=8, chunk_size=5),
    "chunkkv-reuse2": ChunkKV(keep_fraction=0.3, window=8, reuse_depth=2),
    "snapkv": SnapKV(keep_tokens=40, window=8),
    "pyramidkv": PyramidKV(keep_tokens=40, window=8),
    "h2o": H2O(keep_fraction=0.25, window=4),
    "streamingllm": StreamingLLM(keep_tokens=30),
    "kvpress": chunkkv.KVPressChunkKV(remove_fraction=0.7, window=8),
}


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def test_zero_compression_is_the_uncompressed_model(llama):
    ids, question = _prompt(), _prompt(1, 6, seed=1)
    chunkkv.detach(llama)
    with torch.inference_mode():
        want_logits = llama(torch.cat([ids, question], 1)).logits[:, -6:]
        want_tokens = llama.generate(torch.cat([ids, question], 1), max_new_tokens=10, do_sample=False)[:, 126:]
    for method in (FullKV(), ChunkKV(keep_fraction=1.0), SnapKV(keep_tokens=500), ChunkKV(remove_fraction=0.0)):
        ctx = chunkkv.compress(llama, ids, method=method)
        assert ctx.cache.stored_lengths() == [120] * 4
        logits = chunkkv.extend(llama, ctx.fork(), question)
        torch.testing.assert_close(logits, want_logits, rtol=0, atol=1e-6)
        tokens = chunkkv.continue_from(llama, ctx, question, chunkkv.Sampling(max_new_tokens=10))
        assert torch.equal(tokens, want_tokens)


@pytest.mark.parametrize("name", list(METHODS))
def test_logits_equal_full_forward_with_evicted_tokens_masked(llama, name):
    method = METHODS[name]
    ids, question = _prompt(), _prompt(1, 5, seed=2)
    ctx = chunkkv.compress(llama, ids, method=method)
    assert max(ctx.cache.stored_lengths()) < 120
    kept = kept_masks(ctx.cache, 120)
    got = chunkkv.extend(llama, ctx, question)
    full = torch.cat([ids, question], 1)
    want = truth_logits(llama, full, torch.ones_like(full), 120, kept)[:, 120:]
    torch.testing.assert_close(got, want.to(got.dtype), atol=2e-5, rtol=1e-4)
    # and the logits really depend on what was evicted
    no_eviction = truth_logits(llama, full, torch.ones_like(full), 120, {})[:, 120:]
    assert (got - no_eviction).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3"])
def test_families_decode_over_kept_tokens_only(family):
    model = tiny_model(family)
    ids, question = _prompt(length=90, seed=3), _prompt(1, 4, seed=4)
    ctx = chunkkv.compress(model, ids, method=ChunkKV(keep_tokens=30, window=6, chunk_size=4))
    pruned = ctx.cache.pruned_layers
    assert pruned and all(ctx.cache.layers[i].stored_length == 30 for i in pruned)
    assert_decodes_like_truth(model, ctx, ids, question)  # and stock generate gives the library loop's tokens


@pytest.mark.parametrize("name", ["chunkkv", "snapkv", "pyramidkv"])
def test_many_tokens_at_once_equal_one_by_one(llama, name):
    ids, new = _prompt(seed=5), _prompt(1, 6, seed=6)
    ctx = chunkkv.compress(llama, ids, method=METHODS[name])
    at_once = chunkkv.extend(llama, ctx.fork(), new)
    one_ctx = ctx.fork()
    one_by_one = torch.cat([chunkkv.extend(llama, one_ctx, new[:, i : i + 1]) for i in range(6)], dim=1)
    torch.testing.assert_close(at_once, one_by_one, atol=1e-5, rtol=1e-5)
    assert one_ctx.cache.get_seq_length() == 126  # logical length continues the prompt


@pytest.mark.parametrize("name", list(METHODS))
def test_stock_generate_matches_library_loop(llama, name):
    ids, question = _prompt(seed=7), _prompt(1, 5, seed=8)
    ctx = chunkkv.compress(llama, ids, method=METHODS[name])
    ours = chunkkv.continue_from(llama, ctx.fork(), question, chunkkv.Sampling(max_new_tokens=12))
    stock = llama.generate(torch.cat([ids, question], 1), cache=ctx.fork().cache, max_new_tokens=12, do_sample=False)
    assert torch.equal(ours, stock[:, 125:])


def test_reuse_followers_keep_the_leaders_indices_and_skip_scoring(llama):
    ids = _prompt(seed=9)
    for depth, leaders in [(1, [0, 1, 2, 3]), (2, [0, 2]), (3, [0, 3]), (4, [0])]:
        ctx = chunkkv.compress(llama, ids, method=ChunkKV(keep_tokens=40, window=8, reuse_depth=depth))
        assert ctx.stats.scored_layers == leaders
        for layer in range(4):
            leader = (layer // depth) * depth
            assert torch.equal(ctx.cache.layers[layer].kept_index, ctx.cache.layers[leader].kept_index)
    # without reuse, layers really do choose differently (otherwise the check above proves nothing)
    ctx = chunkkv.compress(llama, ids, method=ChunkKV(keep_tokens=40, window=8))
    assert not torch.equal(ctx.cache.layers[0].kept_index, ctx.cache.layers[1].kept_index)


def test_kept_lengths_are_exact(llama):
    ids = _prompt(length=157, seed=10)
    for method, want in [
        (ChunkKV(keep_tokens=40, window=8), 40),
        (ChunkKV(keep_fraction=0.1, window=8), 15),
        (SnapKV(remove_fraction=0.75, window=8), 39),
        (H2O(keep_tokens=33, window=8), 33),
        (StreamingLLM(keep_tokens=20), 20),
        (ChunkKV(keep_tokens=5, window=8), 5),  # budget smaller than the window
    ]:
        ctx = chunkkv.compress(llama, ids, method=method)
        assert ctx.cache.stored_lengths() == [want] * 4, method
        assert ctx.cache.kept_counts().tolist() == [[want]] * 4
    ctx = chunkkv.compress(llama, ids, method=PyramidKV(keep_tokens=40, window=8))
    lengths = ctx.cache.stored_lengths()
    assert sum(lengths) == 4 * 40 and lengths == sorted(lengths, reverse=True) and lengths[0] > lengths[-1]


@pytest.mark.parametrize(
    "method",
    [
        ChunkKV(keep_fraction=0.3, window=6, chunk_size=4),  # different kept counts per row: fillers
        ChunkKV(keep_tokens=30, window=6, reuse_depth=2),
        SnapKV(keep_tokens=30, window=6),
        PyramidKV(keep_fraction=0.4, window=6),
        H2O(keep_tokens=25, window=6),
        StreamingLLM(keep_fraction=0.3),
    ],
    ids=lambda m: m.describe(),
)
def test_batched_rows_equal_rows_run_alone(llama, method):
    rows = [_prompt(1, n, seed=20 + n)[0] for n in (100, 61, 83)]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, r in enumerate(rows):
        ids[b, width - len(r):] = r
        mask[b, width - len(r):] = 1
    question = _prompt(1, 4, seed=30)
    ctx = chunkkv.compress(llama, ids, mask, method=method)
    batched_logits = chunkkv.extend(llama, ctx.fork(), question)
    batched_tokens = chunkkv.continue_from(llama, ctx.fork(), question, chunkkv.Sampling(max_new_tokens=8))
    stock = llama.generate(
        torch.cat([ids, question.expand(3, -1)], 1), attention_mask=torch.cat([mask, torch.ones(3, 4, dtype=torch.long)], 1),
        cache=ctx.fork().cache, max_new_tokens=8, do_sample=False,
    )[:, width + 4:]
    assert torch.equal(stock, batched_tokens)
    for b, r in enumerate(rows):
        alone = chunkkv.compress(llama, r[None], method=method)
        for layer in alone.cache.pruned_layers:  # same tokens kept (in row coordinates)
            got = ctx.cache.layers[layer]
            pad = width - len(r)
            valid = got.valid[b, : got.kept_index.shape[-1]] if got.valid is not None else None
            kept_b = got.kept_index[b][:, valid] if valid is not None else got.kept_index[b]
            assert torch.equal(kept_b - pad, alone.cache.layers[layer].kept_index[0])
        logits = chunkkv.extend(llama, alone.fork(), question)
        torch.testing.assert_close(batched_logits[b], logits[0], atol=1e-4, rtol=1e-4)
        tokens = chunkkv.continue_from(llama, alone, question, chunkkv.Sampling(max_new_tokens=8))
        assert torch.equal(batched_tokens[b], tokens[0])


def test_padding_is_never_kept(llama):
    ids = torch.cat([torch.zeros(1, 40, dtype=torch.long), _prompt(1, 60, seed=40)], 1)
    mask = torch.cat([torch.zeros(1, 40, dtype=torch.long), torch.ones(1, 60, dtype=torch.long)], 1)
    ids2 = torch.cat([ids, _prompt(1, 100, seed=41)], 0)
    mask2 = torch.cat([mask, torch.ones(1, 100, dtype=torch.long)], 0)
    for method in (ChunkKV(keep_tokens=50, window=8), SnapKV(keep_tokens=50, window=8), H2O(keep_tokens=50, window=8)):
        ctx = chunkkv.compress(llama, ids2, mask2, method=method)
        layer = ctx.cache.layers[0]
        assert bool((layer.kept_index[0] >= 40).all())  # row 0 keeps 50 of its 60 real tokens


def test_generate_text_api_question_agnostic_and_query_aware(llama):
    from transformers import PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"w{i}": i for i in range(VOCAB - 2)}
    vocab.update({"<unk>": VOCAB - 2, "<eos>": VOCAB - 1})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<eos>")
    context = " ".join(f"w{(i * 7) % 250}" for i in range(150))
    result = chunkkv.generate(llama, tokenizer, context, [" w1 w2 w3", " w4 w5"], ChunkKV(keep_fraction=0.2, window=8),
                              scoring="window")  # the papers' scoring (the default is tested in test_agnostic.py)
    assert [a.question for a in result.answers] == [" w1 w2 w3", " w4 w5"]
    assert result.kept_tokens[0] == [30] and result.prompt_tokens == [150]
    # the question-agnostic answers equal compressing once and continuing by hand
    ids = tokenizer(context, return_tensors="pt")["input_ids"]
    ctx = chunkkv.compress(llama, ids, method=ChunkKV(keep_fraction=0.2, window=8))
    q = tokenizer(" w4 w5", add_special_tokens=False, return_tensors="pt")["input_ids"]
    tokens = chunkkv.continue_from(llama, ctx, q, chunkkv.Sampling(max_new_tokens=32))
    assert result.answers[1].token_ids[0] == tokens[0].tolist()
    aware = chunkkv.generate(llama, tokenizer, context, " w1 w2 w3", ChunkKV(keep_fraction=0.2, window=8), query_aware=True)
    assert aware.prompt_tokens == [153] and aware.kept_tokens[0] == [30]
