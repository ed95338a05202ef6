"""Nothing lost, nothing run other than asked (issue 13): one run per output folder (a second is
refused, a crashed one leaves nothing stuck), torn last records redone, incomplete runs said, and
every bad flag / output place refused in one line before the model loads."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_eval_support import FIXTURES, read_records, save_tiny_model

from chunkkv.cli import main
from chunkkv.outputs import LOCK_NAME, OutputBusyError, OutputLock

REPO = Path(__file__).resolve().parents[1]
METHOD = ["--method", "chunkkv", "--keep-fraction", "0.5", "--window", "4", "--chunk-size", "4"]
NIAH = ["--task", "niah", "--lengths", "60,90,120", "--depths", "0,25,50,75", "--max-new-tokens", "12"]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
for _name in ("RANK", "WORLD_SIZE", "MASTER_ADDR"):
    ENV.pop(_name, None)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("outputs-model") / "tiny-llama")


def _eval(model_dir, out, *extra) -> int:
    return main(["eval", "--model", str(model_dir), *METHOD, "--no-progress", "--out", str(out), *extra])


def _hold(folder: Path, name: str = LOCK_NAME) -> subprocess.Popen:
    """Another process holding the lock of ``folder`` until its stdin closes."""
    folder.mkdir(parents=True, exist_ok=True)
    # plain flock, as chunkkv takes it (no torch import: the test stays fast)
    code = ("import fcntl, os, sys; f = open(os.path.join(sys.argv[1], sys.argv[2]), 'a+'); "
            "fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB); f.write(f'pid {os.getpid()} test holder'); "
            "f.flush(); print('held', flush=True); sys.stdin.read()")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), name], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, env=ENV)
    assert proc.stdout.readline().strip() == "held"
    return proc


def _one_line_error(capsys, command: str, code: int, fragment: str) -> str:
    out, err = capsys.readouterr()
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"chunkkv {command}: error: "), err
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in out + err
    return lines[0]


# --- bug 1: two runs into one folder ------------------------------------------------------------
def test_second_eval_on_a_busy_folder_is_refused_and_nothing_is_lost(model_dir, tmp_path, capsys):
    out = tmp_path / "busy"
    cmd = [sys.executable, "-m", "chunkkv.cli", "eval", "--model", str(model_dir), *METHOD, "--no-progress",
           "--out", str(out), *NIAH]
    first = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        lock = out / LOCK_NAME
        while f"pid {first.pid} " not in (lock.read_text() if lock.exists() else ""):
            assert time.monotonic() < deadline and first.poll() is None, "the first run never took the folder"
            time.sleep(0.05)
        # the two ways of losing records: --overwrite, and a smaller --limit (whose merge
        # rewrote the file the first run was appending to)
        for extra in (["--overwrite"], ["--limit", "2"], []):
            line = _one_line_error(capsys, "eval", _eval(model_dir, out, *NIAH, *extra), "is in use by another run")
            assert f"pid {first.pid}" in line
        assert first.poll() is None  # refused while the first one was still running
    finally:
        log = first.communicate(timeout=300)[0]
    assert first.returncode == 0, log
    records = read_records(out / "predictions.jsonl")
    assert len(records) == 12 == len({r["id"] for r in records})
    assert json.loads((out / "metrics.json").read_text())["complete"]
    # the folder is free again: the same command resumes and redoes nothing
    assert _eval(model_dir, out, *NIAH) == 0
    assert read_records(out / "predictions.jsonl") == records


def test_a_killed_run_leaves_no_stuck_lock(model_dir, tmp_path):
    out = tmp_path / "killed"
    holder = _hold(out)
    with pytest.raises(OutputBusyError, match="in use by another run"):
        OutputLock(out).acquire()
    holder.kill()  # SIGKILL: no cleanup code runs
    holder.wait()
    assert (out / LOCK_NAME).exists()  # the file stays; the lock went with the process
    assert _eval(model_dir, out, "--task", "niah", "--lengths", "60", "--depths", "50", "--max-new-tokens", "3") == 0


def test_sweep_and_bench_refuse_a_busy_output_before_loading(tmp_path, capsys):
    out = tmp_path / "sweep"
    holder = _hold(out)
    try:
        code = main(["sweep", "--model", "/no/such/model", "--out", str(out), "--report", "", "--no-progress"])
        _one_line_error(capsys, "sweep", code, f"--out {out} is in use by another run")
    finally:
        holder.stdin.close()
        holder.wait()
    report = tmp_path / "docs" / "quality.md"
    report.parent.mkdir()
    holder = _hold(report.parent, f".{report.name}.chunkkv-lock")
    try:
        code = main(["sweep", "--model", "/no/such/model", "--out", str(tmp_path / "other"), "--report", str(report),
                     "--no-progress"])
        _one_line_error(capsys, "sweep", code, f"--report {report} is in use by another run")
    finally:
        holder.stdin.close()
        holder.wait()
    out = tmp_path / "bench"
    holder = _hold(out)
    try:
        code = main(["bench", "--model", "/no/such/model", "--out", str(out), "--contexts", "64", "--no-peers"])
        _one_line_error(capsys, "bench", code, f"--out {out} is in use by another run")
    finally:
        holder.stdin.close()
        holder.wait()


def test_lock_is_reentrant_in_one_process_and_sharded_ranks_share_the_folder(tmp_path):
    with OutputLock(tmp_path), OutputLock(tmp_path):  # the CLI takes it, then the library call
        pass
    rank0 = OutputLock(tmp_path, shared=True).acquire()

    def other(shared: bool) -> str:
        code = ("import fcntl, os, sys; f = open(os.path.join(sys.argv[1], '.chunkkv-lock'), 'a+')\n"
                "try:\n    fcntl.flock(f.fileno(), (fcntl.LOCK_SH if sys.argv[2] == '1' else fcntl.LOCK_EX) | fcntl.LOCK_NB)"
                "; print('held')\nexcept BlockingIOError:\n    print('refused')\n")
        res = subprocess.run([sys.executable, "-c", code, str(tmp_path), str(int(shared))], env=ENV,
                             capture_output=True, text=True)
        return res.stdout.strip() or res.stderr

    assert other(shared=True) == "held"  # another rank of the same sharded run
    assert other(shared=False) == "refused"  # a single-process run
    rank0.upgrade()
    rank0.release()


# --- bug 2: resume after a torn last record -----------------------------------------------------
def test_resume_redoes_an_unterminated_last_record(model_dir, tmp_path, capsys):
    out = tmp_path / "torn"
    args = ["--task", "niah", "--lengths", "60,90", "--depths", "0,100", "--max-new-tokens", "4"]
    assert _eval(model_dir, tmp_path / "reference", *args) == 0
    reference = read_records(tmp_path / "reference" / "predictions.jsonl")
    assert _eval(model_dir, out, *args, "--limit", "3") == 0  # killed after 3 samples …
    path = out / "predictions.jsonl"
    whole = path.read_text()
    path.write_text(whole[:-1])  # … with the 3rd record written but not its newline
    capsys.readouterr()
    assert _eval(model_dir, out, *args) == 0  # resume: sample 4 is written after cutting the torn line
    stdout = capsys.readouterr().out
    assert "over 4 samples" in stdout and "INCOMPLETE" not in stdout
    after = read_records(path)
    assert [r["id"] for r in after] == [r["id"] for r in reference]  # the 3rd was redone, not dropped
    assert [r["prediction"] for r in after] == [r["prediction"] for r in reference]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (metrics["samples"], metrics["complete"]) == (4, True)
    # torn in the middle of the line: redone as well
    text = path.read_text()
    path.write_text(text[: len(text) - 30])
    assert _eval(model_dir, out, *args) == 0
    assert [r["id"] for r in read_records(path)] == [r["id"] for r in reference]


def test_an_incomplete_run_says_so_and_exits_non_zero(model_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "partial"
    args = ["--task", "niah", "--lengths", "60,90", "--depths", "0,100", "--max-new-tokens", "3"]
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    assert _eval(model_dir, out, *args) == 0  # rank 1 answers its half and leaves
    capsys.readouterr()
    assert main(["eval", "--merge", "--out", str(out)]) == 1
    stdout = capsys.readouterr().out
    assert "INCOMPLETE: 2 of 4 samples" in stdout


# --- bug 4: --limit -------------------------------------------------------------------------------
@pytest.mark.parametrize("limit,fragment", [("-1", "--limit -1 must be a whole number >= 1"),
                                            ("0", "--limit 0 selects no samples, so nothing would run")])
def test_limit_below_one_is_refused(tmp_path, capsys, limit, fragment):
    code = _eval("/no/such/model", tmp_path / "limit", "--task", "niah", "--limit", limit)
    _one_line_error(capsys, "eval", code, fragment)
    assert not (tmp_path / "limit").exists()  # refused before anything was created


# --- the list of errors -------------------------------------------------------------------------------
def _places(tmp_path: Path) -> dict[str, str]:
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("x")
    binary = tmp_path / "data.bin"
    binary.write_bytes(bytes(range(256)) * 8)
    return {"file": str(a_file), "under": str(a_file / "sub"), "ro": "/proc/chunkkv-out", "bin": str(binary),
            "tmp": str(tmp_path)}


EVAL = ["eval", "--model", "/no/such/model", "--method", "chunkkv", "--keep-fraction", "0.1", "--no-progress"]
CLI_ERRORS = [
    # output places
    ([*EVAL, "--task", "niah", "--out", "{file}"], "--out {file} is a file; give a folder"),
    ([*EVAL, "--task", "niah", "--out", "{under}"], "is a file, so no folder can be created under it"),
    ([*EVAL, "--task", "niah", "--out", "{ro}"], "--out /proc/chunkkv-out: cannot create the folder"),
    (["sweep", "--model", "/no/such/model", "--out", "{file}", "--no-progress"], "--out {file} is a file"),
    (["sweep", "--model", "/no/such/model", "--out", "{tmp}/s", "--report", "{under}/q.md", "--no-progress"],
     "--report {under}/q.md: {file} is a file"),
    (["sweep", "--model", "/no/such/model", "--out", "{ro}", "--no-progress"], "cannot create the folder"),
    (["bench", "--model", "/no/such/model", "--out", "{file}", "--no-peers"], "--out {file} is a file"),
    (["bench", "--model", "/no/such/model", "--out", "{ro}", "--no-peers"], "cannot create the folder"),
    (["inspect", "--model", "/no/such/model", "--context-file", "{file}", "--out", "{under}/r.html"],
     "--out {under}/r.html: {file} is a file"),
    (["inspect", "--model", "/no/such/model", "--context-file", "{file}", "--out", "/proc/r.html"],
     "--out /proc/r.html: cannot write in /proc"),
    (["demo", "--model", "/no/such/model", "--html", "{under}/d.html"], "--html {under}/d.html: {file} is a file"),
    (["demo", "--model", "/no/such/model", "--html", "/proc/d.html"], "--html /proc/d.html: cannot write in /proc"),
    # numbers
    ([*EVAL, "--task", "niah", "--out", "{tmp}/e", "--lengths", "0"], "--lengths 0 is not a context length"),
    ([*EVAL, "--task", "niah", "--out", "{tmp}/e", "--lengths", "-5"], "--lengths -5 is not a context length"),
    ([*EVAL, "--task", "synthetic", "--out", "{tmp}/e", "--num-samples", "-1"], "--num-samples -1 must be >= 1"),
    (["sweep", "--model", "/no/such/model", "--out", "{tmp}/s", "--threads", "0"], "--threads 0 must be >= 1"),
    (["sweep", "--model", "/no/such/model", "--out", "{tmp}/s", "--threads", "-2"], "--threads -2 must be >= 1"),
    (["bench", "--model", "/no/such/model", "--out", "{tmp}/b", "--decode-steps", "0"], "--decode-steps 0 must be >= 1"),
    # data files and devices
    ([*EVAL, "--task", "gsm8k", "--out", "{tmp}/e", "--data-file", "{bin}"], "--data-file {bin} is not UTF-8 text"),
    ([*EVAL, "--task", "jailbreakv", "--out", "{tmp}/e", "--data-file", "{bin}"], "is not UTF-8 text"),
    ([*EVAL, "--task", "niah", "--out", "{tmp}/e", "--device", "tpu"], "--device 'tpu' is not a device torch knows"),
    ([*EVAL, "--task", "niah", "--out", "{tmp}/e", "--device", "cuda:99"], "--device cuda:99: "),
    (["bench", "--model", "/no/such/model", "--out", "{tmp}/b", "--device", "tpu"], "--device 'tpu' is not a device"),
    # budget and task before the model loads (the model path does not exist)
    (["eval", "--model", "/no/such/model", "--task", "niah", "--out", "{tmp}/e", "--chunk-size", "0"],
     "--chunk-size 0 must be an integer >= 1"),
    ([*EVAL, "--task", "nope", "--out", "{tmp}/e"], "unknown task 'nope'"),
    ([*EVAL[:4], "snapkv", "--keep-fraction", "3", "--task", "niah", "--out", "{tmp}/e"], "keep_fraction=3.0 is out of range"),
]


@pytest.mark.parametrize("argv,fragment", CLI_ERRORS, ids=[f"{a[0]} {i}" for i, (a, _f) in enumerate(CLI_ERRORS)])
def test_cli_errors_are_one_line_before_the_model_loads(tmp_path, capsys, monkeypatch, argv, fragment):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    places = _places(tmp_path)
    argv = [a.format(**places) for a in argv]
    _one_line_error(capsys, argv[0], main(argv), fragment.format(**places))


# --- no-op notices -----------------------------------------------------------------------------------
def test_settings_that_compress_nothing_are_said_on_stdout(model_dir, tmp_path, capsys):
    args = ["--task", "niah", "--lengths", "60", "--depths", "50", "--max-new-tokens", "2", "--no-progress"]
    code = main(["eval", "--model", str(model_dir), "--method", "full", "--keep-fraction", "0.1",
                 "--out", str(tmp_path / "full"), *args])
    stdout = capsys.readouterr().out
    assert code == 0 and "note: --method full keeps every token, so --keep-fraction has no effect" in stdout
    code = main(["eval", "--model", str(model_dir), "--method", "chunkkv", "--keep-fraction", "0.5", "--window", "200",
                 "--out", str(tmp_path / "window"), *args])
    stdout = capsys.readouterr().out
    assert code == 0
    assert "note: every context length (60) is at most the observation window (200 tokens)" in stdout
    assert "samples were kept whole" in stdout


def test_data_files_that_are_not_text_are_clear_errors_in_the_library(tmp_path):
    from chunkkv.errors import ChunkKVError
    from chunkkv.evaluation.tasks.gsm8k import load_gsm8k
    from chunkkv.evaluation.tasks.jailbreakv import load_jailbreakv

    binary = tmp_path / "data.bin"
    binary.write_bytes(b"\x00\xff\xfe" * 100)
    with pytest.raises(ChunkKVError, match="not UTF-8 text"):
        load_gsm8k("test", data_file=binary)
    with pytest.raises(ChunkKVError, match="not UTF-8 text|not a readable CSV"):
        load_jailbreakv(binary)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\nnot json\n')
    with pytest.raises(ChunkKVError, match="bad.jsonl:2: not a JSON line"):
        load_gsm8k("test", data_file=bad)
    assert FIXTURES.exists()


def test_sweep_heading_reports_the_real_prompt_length():
    from studies.sweep.report import render_markdown

    cfg = {"tasks": ["niah_single"], "question_agnostic": False, "window": "question", "extra_new_tokens": 2,
           "seed": 0, "haystack": "varied", "sweep_fraction": 0.1, "chunk_size": 10, "heatmap_fraction": 0.1}

    def row(length, prompt):
        return {"length": length, "group": "budget", "method": "full", "label": "full", "spec": "full", "params": {},
                "tasks": {"niah_single": 100.0}, "counts": {"niah_single": 3}, "average": 100.0,
                "jaccard_union": None, "jaccard_head": None, "value_pos_kept": [], "prompt_tokens": prompt}

    text = render_markdown({"model": "m", "num_layers": 2, "config": cfg, "rows": [row(10, 29.0), row(1024, 1020.0)]})
    assert "### 10 tokens asked, prompts of 29 tokens on average (3 samples per task)" in text
    assert "### 1024 tokens (3 samples per task)" in text
