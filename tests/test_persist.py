"""Saved and reloaded contexts continue exactly like the context in memory; bad files fail clearly."""

from __future__ import annotations

import struct

import pytest
import torch

import chunkkv
from chunkkv import ChunkKV, ContextFileError, PyramidKV, SnapKV
from chunkkv.persist import header_bytes

from models import left_padded, tiny_model
from models import random_prompt as _prompt


def _left_padded(lengths, seed=20):
    return left_padded(lengths, seed)[1:]


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _kv_bytes(ctx) -> int:
    return ctx.cache.nbytes()


CASES = {
    "chunkkv-reuse": (ChunkKV(keep_tokens=40, window=8, chunk_size=5, reuse_depth=2), None),
    "pyramidkv": (PyramidKV(keep_tokens=40, window=8), None),  # layers of different stored lengths
    "batch-left-padded": (ChunkKV(keep_fraction=0.3, window=6, chunk_size=4), (100, 61, 83)),  # filler slots
    "snapkv-batch": (SnapKV(keep_tokens=30, window=6), (90, 70)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_loaded_context_continues_exactly_like_memory(llama, tmp_path, case):
    method, lengths = CASES[case]
    if lengths is None:
        ids, mask = _prompt(), None
    else:
        ids, mask = _left_padded(lengths)
    ctx = chunkkv.compress(llama, ids, mask, method=method)
    if case == "pyramidkv":
        assert len(set(ctx.cache.stored_lengths())) > 1
    if case == "batch-left-padded":
        assert any(ctx.cache.layers[i].valid is not None for i in ctx.cache.pruned_layers)
    path = tmp_path / "ctx.safetensors"
    size = ctx.save(path)
    # the file is the kept K/V plus the prompt ids, mask, next logits and a header
    extra = ids.numel() * 8 * 2 + ctx.next_logits.numel() * 4
    # kept positions (int64) and filler masks (bool); reuse followers share their leader's, stored once
    unique = {}
    for i in ctx.cache.pruned_layers:
        for t in (ctx.cache.layers[i].kept_index, ctx.cache.layers[i].valid):
            if t is not None:
                unique[t.data_ptr()] = t.numel() * t.element_size()
    index_bytes = sum(unique.values())
    # the last window queries of each scoring layer (a decode budget set after loading scores with them)
    queries = [ctx.cache.layers[i].recent_queries for i in ctx.cache.pruned_layers]
    query_bytes = sum(q.numel() * q.element_size() for q in queries if q is not None)
    assert size == _kv_bytes(ctx) + extra + index_bytes + query_bytes + header_bytes(path)
    assert header_bytes(path) < 8192
    loaded = chunkkv.load_context(path, llama)
    assert loaded.cache.stored_lengths() == ctx.cache.stored_lengths()
    assert loaded.cache.get_seq_length() == ctx.cache.get_seq_length()
    assert loaded.method == ctx.method and loaded.stats.kept == ctx.stats.kept
    assert torch.equal(loaded.next_logits, ctx.next_logits)
    question = _prompt(1, 5, seed=3)
    want = chunkkv.extend(llama, ctx.fork(), question)
    got = chunkkv.extend(llama, loaded.fork(), question)
    assert torch.equal(got, want)
    sampling = chunkkv.Sampling(max_new_tokens=10)
    want_tokens = chunkkv.continue_from(llama, ctx.fork(), question, sampling)
    got_tokens = chunkkv.continue_from(llama, loaded, question, sampling)
    assert torch.equal(got_tokens, want_tokens)
    # stock generate on the loaded cache too
    batch = ids.shape[0]
    full_mask = torch.cat([ctx.attention_mask, torch.ones(batch, 5, dtype=torch.long)], 1)
    reloaded = chunkkv.load_context(path, llama)
    stock = llama.generate(
        torch.cat([ids, question.expand(batch, -1)], 1), attention_mask=full_mask, cache=reloaded.cache,
        max_new_tokens=10, do_sample=False,
    )[:, ids.shape[1] + 5:]
    assert torch.equal(stock, want_tokens)


def test_loading_in_a_fresh_model_object_of_the_same_checkpoint(llama, tmp_path):
    ctx = chunkkv.compress(llama, _prompt(seed=4), method=ChunkKV(keep_tokens=30, window=8))
    ctx.save(tmp_path / "c.safetensors")
    twin = tiny_model("llama")  # same seed: same weights, a new object that was never attached
    loaded = chunkkv.load_context(tmp_path / "c.safetensors", twin)
    q = _prompt(1, 4, seed=5)
    assert torch.equal(chunkkv.extend(twin, loaded, q), chunkkv.extend(llama, ctx.fork(), q))


@pytest.fixture()
def saved(llama, tmp_path):
    ctx = chunkkv.compress(llama, _prompt(seed=6), method=ChunkKV(keep_tokens=30, window=8))
    path = tmp_path / "ctx.safetensors"
    ctx.save(path)
    return path


def test_another_architecture_is_refused(saved):
    other = tiny_model("llama", num_hidden_layers=3)
    with pytest.raises(ContextFileError, match="saved for another model .*3 layers"):
        chunkkv.load_context(saved, other)
    other = tiny_model("qwen2")
    with pytest.raises(ContextFileError, match="saved for another model"):
        chunkkv.load_context(saved, other)


def test_another_dtype_is_refused(saved):
    other = tiny_model("llama").to(torch.bfloat16)
    with pytest.raises(ContextFileError, match="computed in float32 but the model runs in bfloat16"):
        chunkkv.load_context(saved, other)


def test_another_checkpoint_of_the_same_architecture_is_refused(saved):
    other = tiny_model("llama", seed=1)
    with pytest.raises(ContextFileError, match="same architecture but different weights"):
        chunkkv.load_context(saved, other)


def test_truncated_file_is_refused(saved, llama):
    data = saved.read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 20, 4):
        saved.write_bytes(data[:cut])
        with pytest.raises(ContextFileError, match="not a readable chunkkv context"):
            chunkkv.load_context(saved, llama)


def test_corrupted_tensor_bytes_are_refused(saved, llama):
    data = bytearray(saved.read_bytes())
    data[-50] ^= 0x40  # one bit inside the tensor data (the header is intact)
    saved.write_bytes(bytes(data))
    with pytest.raises(ContextFileError, match="corrupted: its tensors do not match the checksum"):
        chunkkv.load_context(saved, llama)


def test_corrupted_header_is_refused(saved, llama):
    data = bytearray(saved.read_bytes())
    data[12] = ord("#")  # inside the JSON header
    saved.write_bytes(bytes(data))
    with pytest.raises(ContextFileError, match="not a readable chunkkv context|corrupted|not valid JSON"):
        chunkkv.load_context(saved, llama)


def test_other_files_are_refused(tmp_path, llama):
    from safetensors.torch import save_file

    plain = tmp_path / "weights.safetensors"
    save_file({"x": torch.zeros(3)}, str(plain))
    with pytest.raises(ContextFileError, match="safetensors file but not a chunkkv context"):
        chunkkv.load_context(plain, llama)
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a cache at all")
    with pytest.raises(ContextFileError, match="not a readable chunkkv context"):
        chunkkv.load_context(text, llama)
    with pytest.raises(ContextFileError, match="no saved context at"):
        chunkkv.load_context(tmp_path / "missing.safetensors", llama)
    # a header claiming an impossible length
    bogus = tmp_path / "bogus.safetensors"
    bogus.write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(ContextFileError, match="not a readable chunkkv context"):
        chunkkv.load_context(bogus, llama)


# --- CLI: --save-context, then --load-context in another run -------------------------------------
def test_cli_save_then_load_answers_the_same(capsys, tmp_path):
    from chunkkv.cli import main
    from test_cli import QUESTION_TEXT, save_tiny_model, write_context

    tiny = save_tiny_model(tmp_path / "model")
    doc = write_context(tmp_path / "doc.txt")
    saved = tmp_path / "doc.ckv"
    common = ["--model", str(tiny), "--device", "cpu", "--max-new-tokens", "6", "--separator", ""]
    questions = ["--question", QUESTION_TEXT, "--question", " Answer:"]
    code = main(["generate", *common, "--context-file", str(doc), *questions, "--keep-fraction", "0.2",
                 "--save-context", str(saved)])
    first = capsys.readouterr()
    assert code == 0, first.err
    assert f"saved the compressed context to {saved}" in first.out
    code = main(["generate", *common, "--load-context", str(saved), *questions])
    second = capsys.readouterr()
    assert code == 0, second.err
    # the question-agnostic default (surprisal, sentence chunks) is what was saved and described
    assert "loaded from" in second.out and "chunkkv(20% kept, scoring=hybrid, kernel=1" in second.out
    assert "segmentation=sentence" in second.out
    answers = lambda text: [part.split("\n")[0] for part in text.split("\nA: ")[1:]]  # noqa: E731
    assert len(answers(first.out)) == 2 and answers(second.out) == answers(first.out)
    # a saved context used with another model, or a context file given twice: one line, exit 2
    other = save_tiny_model(tmp_path / "other", seed=1)
    capsys.readouterr()
    for argv, message in [
        (["generate", "--model", str(other), "--device", "cpu", "--load-context", str(saved)], "different weights"),
        (["generate", *common, "--load-context", str(saved), "--context-file", str(doc)], "either --context-file or"),
        (["generate", *common, "--load-context", str(tmp_path / "nope.ckv")], "no saved context at"),
        (["generate", *common, "--context-file", str(doc), "--keep-fraction", "0.2", "--query-aware",
          "--save-context", str(saved)], "cannot be combined with --query-aware"),
    ]:
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("chunkkv generate: error: ") and message in lines[0], lines


# --- issue 25: the header is checked, the decode budget kept, saving refuses what no model can load ---------
def _flip(data: bytes, byte: int, bit: int) -> bytes:
    flipped = bytearray(data)
    flipped[byte] ^= 1 << bit
    return bytes(flipped)


def _budgeted(llama):
    ctx = chunkkv.compress(llama, _prompt(seed=7), method=ChunkKV(keep_tokens=30, window=8, chunk_size=4, reuse_depth=2))
    chunkkv.set_decode_budget(ctx, 30, 8)
    return ctx


def test_a_flipped_bit_in_the_header_is_refused(llama, tmp_path):
    """B: every bit of every layer's logical_length, and of a sample of the whole header, gives the one
    file error (studies/robustness/header_bitflip.py flips every bit)."""
    import re

    path = tmp_path / "ctx.safetensors"
    _budgeted(llama).save(path)
    data = path.read_bytes()
    header = header_bytes(path)
    digits = [m.start(1) + i for m in re.finditer(rb'logical_length\\": (\d+)', data[:header])
              for i in range(len(m.group(1)))]
    assert len(digits) >= 4
    damaged = tmp_path / "damaged.safetensors"
    for byte in sorted(set(digits) | set(range(0, header, 17))):
        for bit in range(8):
            damaged.write_bytes(_flip(data, byte, bit))
            with pytest.raises(ContextFileError):
                chunkkv.load_context(damaged, llama)


def _rewrite(path, edit):
    """Rewrite a saved context's metadata with ``edit`` and *correct* checksums (a file made by hand)."""
    import hashlib
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["chunkkv"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(meta)
    raw = json.dumps(meta)
    save_file(tensors, str(path), metadata={"chunkkv": raw, "chunkkv_sha256": hashlib.sha256(raw.encode()).hexdigest()})


@pytest.mark.parametrize("edit,message", [
    (lambda m: m["layers"][0].update(logical_length="x"), "malformed"),
    (lambda m: m["layers"][0].update(logical_length=1), "malformed"),
    (lambda m: m.pop("layers"), "malformed"),
    (lambda m: m["stats"].update(bogus=1), "malformed"),
    (lambda m: m["method"].update(fields={"keep_tokens": -4}), "malformed"),
    (lambda m: m.update(version=1), "version 1"),  # a checksummed header of the first format: not what it wrote
], ids=["length-text", "length-short", "no-layers", "stats", "method", "version"])
def test_a_malformed_header_with_a_valid_checksum_is_the_file_error(saved, llama, edit, message):
    _rewrite(saved, edit)
    with pytest.raises(ContextFileError, match=message):
        chunkkv.load_context(saved, llama)


def test_a_file_of_the_first_format_still_loads_with_a_warning(llama):
    """Contexts saved before format 2 (header not checksummed) still load (issue 21) and continue
    exactly as a fresh compression; the warning says their header cannot be checked. The fixture was
    written by the first format's code (commit 3608753) for tests/models.py's tiny Llama."""
    from pathlib import Path

    path = Path(__file__).parent / "fixtures" / "context-v1.ckv"
    with pytest.warns(UserWarning, match="format 1, whose header carries no checksum"):
        loaded = chunkkv.load_context(path, llama)
    ids = _prompt(1, 120, seed=4)
    fresh = chunkkv.compress(llama, ids, method=ChunkKV(keep_tokens=40, window=8, chunk_size=5, reuse_depth=2))
    assert loaded.method == fresh.method
    q, sampling = _prompt(1, 5, seed=5), chunkkv.Sampling(max_new_tokens=6)
    got = chunkkv.continue_from(llama, loaded, q, sampling)
    assert got.tolist() == [[235, 154, 124, 124, 124, 222]]  # what the first format's code decoded
    assert torch.equal(got, chunkkv.continue_from(llama, fresh, q, sampling))
    # its tensors are still checked
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    broken = Path(__import__("tempfile").mkdtemp()) / "v1.ckv"
    broken.write_bytes(bytes(data))
    with pytest.warns(UserWarning), pytest.raises(ContextFileError, match="tensors do not match"):
        chunkkv.load_context(broken, llama)


def test_a_decode_budget_is_saved_and_restored(llama, tmp_path):
    """D: a context saved with a decode budget reloads with it and decodes exactly like the one in memory."""
    ctx = _budgeted(llama)
    ctx.save(tmp_path / "b.safetensors")
    loaded = chunkkv.load_context(tmp_path / "b.safetensors", llama)
    want, got = ctx.cache.decode_budget, loaded.cache.decode_budget
    assert got is not None and (got.keep, got.every, got.method) == (want.keep, want.every, want.method)
    a, b = ctx.fork(), loaded.fork()
    tokens = _prompt(1, 40, seed=8)
    for i in range(tokens.shape[1]):  # 40 tokens one at a time: several re-selections
        assert torch.equal(chunkkv.extend(llama, b, tokens[:, i:i + 1]), chunkkv.extend(llama, a, tokens[:, i:i + 1]))
    assert max(b.cache.stored_lengths()) <= 30 + 8 and a.cache.decode_budget.reselections > 0
    # without a budget none is restored; one set after loading decodes as the same one set in memory
    plain = chunkkv.compress(llama, _prompt(seed=7), method=ChunkKV(keep_tokens=30, window=8))
    plain.save(tmp_path / "p.safetensors")
    reloaded = chunkkv.load_context(tmp_path / "p.safetensors", llama)
    assert reloaded.cache.decode_budget is None
    a, b = plain.fork(), reloaded.fork()
    chunkkv.set_decode_budget(a, 30, 8)
    chunkkv.set_decode_budget(b, 30, 8)
    for i in range(tokens.shape[1]):
        assert torch.equal(chunkkv.extend(llama, b, tokens[:, i:i + 1]), chunkkv.extend(llama, a, tokens[:, i:i + 1]))


def test_saving_with_another_model_is_refused(llama, tmp_path):
    """J: ctx.save(path, model=<another model>) would write a file no model can load."""
    ctx = chunkkv.compress(llama, _prompt(seed=9), method=ChunkKV(keep_tokens=30, window=8))
    for other in (tiny_model("llama", num_hidden_layers=3), tiny_model("llama", seed=1), tiny_model("qwen2")):
        with pytest.raises(chunkkv.ChunkKVError, match="another model|the model given to save"):
            ctx.save(tmp_path / "x.safetensors", model=other)
    assert not (tmp_path / "x.safetensors").exists()
    ctx.save(tmp_path / "x.safetensors", model=tiny_model("llama"))  # the same checkpoint, another object: fine


def test_save_failures_are_the_file_error_and_leave_nothing(llama, tmp_path):
    """I: a folder or a missing folder as the path is a ContextFileError, not a raw SafetensorError."""
    ctx = chunkkv.compress(llama, _prompt(seed=9), method=ChunkKV(keep_tokens=30, window=8))
    for target in (tmp_path, tmp_path / "missing" / "x.safetensors"):
        with pytest.raises(ContextFileError, match="cannot write the context to"):
            ctx.save(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_saved_context_is_readable_like_any_new_file(llama, tmp_path):
    """J: safetensors writes 0600; a saved context gets the umask's mode (0644 here)."""
    import os

    old = os.umask(0o022)
    try:
        chunkkv.compress(llama, _prompt(seed=9), method=ChunkKV(keep_tokens=30, window=8)).save(tmp_path / "m.ckv")
    finally:
        os.umask(old)
    assert (tmp_path / "m.ckv").stat().st_mode & 0o777 == 0o644
