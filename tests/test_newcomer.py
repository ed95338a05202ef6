"""What a new user trips over (issue 22): the progress display, the length warning on purpose,
--dtype float16 on a CPU, --load-context with method flags, how the full cache is named."""

from __future__ import annotations

import pytest

import chunkkv
from chunkkv.cli import main
from chunkkv.cli_common import progress, track
from chunkkv import cli_common


def test_progress_writes_nothing_into_a_log_or_a_pipe(capsys):
    with progress() as bar:
        task = bar.add_task("loading", total=None)
        bar.update(task, description="still loading")
    assert list(track([1, 2, 3], "work")) == [1, 2, 3]
    out, err = capsys.readouterr()
    assert out == "" and err == ""  # no bar, no blank line


def test_tokenizing_a_long_text_on_purpose_does_not_warn(monkeypatch):
    import transformers.tokenization_utils_base as base

    from chunkkv.prompting import long_text

    _, tok = chunkkv.load_pretrained(str(cli_common.testbed_path()), device="cpu")
    warned = []
    monkeypatch.setattr(base.logger, "warning", lambda msg, *a, **k: warned.append(str(msg)))
    text = " ".join(["the"] * (tok.model_max_length + 10))
    with long_text(tok):
        assert len(tok(text)["input_ids"]) > tok.model_max_length
    assert warned == []
    tok(text)  # a prompt that really is too long still warns
    assert any("longer than the specified maximum" in w for w in warned)


def test_float16_on_a_cpu_is_refused_before_loading(tmp_path, capsys):
    ctx = tmp_path / "c.txt"
    ctx.write_text("Some context.")
    assert main(["generate", "--model", "testbed", "--context-file", str(ctx), "--dtype", "float16",
                 "--device", "cpu"]) == 2
    assert "--dtype float16 on a CPU" in capsys.readouterr().err


def test_load_context_refuses_method_flags(tmp_path, capsys):
    for flags, named in ((["--method", "snapkv"], "--method"), (["--keep-tokens", "9", "--window", "4"],
                                                                "--keep-tokens, --window")):
        assert main(["generate", "--load-context", str(tmp_path / "x.ckv"), *flags]) == 2
        assert f"{named} would be ignored" in capsys.readouterr().err


def test_the_full_cache_is_called_full_and_not_compressed(tmp_path, capsys):
    assert chunkkv.FullKV().describe() == "full"
    ctx = tmp_path / "c.txt"
    ctx.write_text("the special code for ab is cd . " * 20)
    assert main(["generate", "--model", "testbed", "--context-file", str(ctx), "--method", "full",
                 "--max-new-tokens", "2", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "method full · the full cache, nothing compressed" in out
    assert "prefilled" in out and "compressed 1" not in out and "100% kept" not in out


@pytest.mark.parametrize("threads,word", [(1, "1 thread)"), (2, "2 threads)")])
def test_thread_counts_read_as_english(threads, word):
    from chunkkv.bench.report import _count

    assert _count(threads, "thread") + ")" == word
