"""Issue 25 (C, D): ``chunkkv generate --save-context`` checks its path before the model loads, and
``--load-context`` validates and honours ``--decode-budget`` / ``--compress-every`` and restores a
decode budget saved with the context."""

from __future__ import annotations

import pytest

import chunkkv.commands.generate as generate_cmd
from chunkkv.cli import main

from test_cli import QUESTION_TEXT, save_tiny_model, write_context


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("saved-cli")
    return save_tiny_model(root / "model"), write_context(root / "doc.txt")


@pytest.fixture()
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the flags and paths were checked")

    monkeypatch.setattr(generate_cmd, "load", refuse)


def _common(model):
    return ["generate", "--model", str(model), "--device", "cpu", "--max-new-tokens", "24", "--separator", "",
            "--question", QUESTION_TEXT, "--question", " Answer:"]


def _one_line_error(capsys, code, fragment):
    out, err = capsys.readouterr()
    assert code == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chunkkv generate: error: ") and fragment in lines[0], err
    assert "Traceback" not in err


def _answers(text: str) -> list[str]:
    return [part.split("\n")[0] for part in text.split("\nA: ")[1:]]


@pytest.mark.parametrize("where,fragment", [
    ("under-a-file", "a-file is a file, not a folder"),
    ("a-folder", "is a folder; give a file name"),
    ("empty", "--save-context is empty: give a file name"),
    ("read-only", "cannot write in"),
])
def test_an_unwritable_save_context_is_refused_before_the_model_loads(files, tmp_path, capsys, no_model,
                                                                      read_only_folder, where, fragment):
    model, doc = files
    afile = tmp_path / "a-file"
    afile.write_text("x")
    target = {"under-a-file": str(afile / "ctx.ckv"), "a-folder": str(tmp_path), "empty": "",
              "read-only": str(read_only_folder / "ctx.ckv")}[where]
    _one_line_error(capsys, main([*_common(model), "--context-file", str(doc), "--save-context", target]), fragment)


def test_a_missing_folder_for_save_context_is_made_and_the_answers_printed(files, tmp_path, capsys):
    model, doc = files
    target = tmp_path / "new" / "folder" / "ctx.ckv"
    assert main([*_common(model), "--context-file", str(doc), "--save-context", str(target)]) == 0
    out = capsys.readouterr().out
    assert target.is_file() and f"saved the compressed context to {target}" in out and len(_answers(out)) == 2


@pytest.mark.parametrize("flags,fragment", [
    (["--decode-budget", "-3"], "--decode-budget -3 must be a positive number of tokens"),
    (["--decode-budget", "40", "--compress-every", "0"], "--compress-every 0 must be a positive number of tokens"),
    (["--compress-every", "8"], "--compress-every needs --decode-budget"),
    (["--prefill-chunk", "64"], "--prefill-chunk would be ignored: drop it"),
], ids=["negative-budget", "every-0", "every-alone", "prefill-chunk"])
def test_load_context_validates_the_bounds_before_loading(files, tmp_path, capsys, no_model, flags, fragment):
    model, _ = files
    _one_line_error(capsys, main([*_common(model), "--load-context", str(tmp_path / "ctx.ckv"), *flags]), fragment)


def test_load_context_honours_and_restores_the_decode_budget(files, tmp_path, capsys):
    model, doc = files
    bounded = ["--decode-budget", "40", "--compress-every", "8"]
    # in memory, with a decode budget: the reference answers
    assert main([*_common(model), "--context-file", str(doc), "--keep-fraction", "0.2", *bounded]) == 0
    want = _answers(capsys.readouterr().out)
    assert main([*_common(model), "--context-file", str(doc), "--keep-fraction", "0.2"]) == 0
    unbounded = _answers(capsys.readouterr().out)
    assert len(want) == 2 and want != unbounded  # the budget changes these answers, so the checks below mean something
    # saved without a budget, loaded with --decode-budget: the budget acts as it does in memory
    plain = tmp_path / "plain.ckv"
    assert main([*_common(model), "--context-file", str(doc), "--keep-fraction", "0.2", "--save-context", str(plain)]) == 0
    capsys.readouterr()
    assert main([*_common(model), "--load-context", str(plain), *bounded]) == 0
    out = capsys.readouterr().out
    assert "decode budget 40 tokens per layer, re-selecting every 8 (--decode-budget)" in out
    assert _answers(out) == want
    # saved with a budget: restored without any flag
    kept = tmp_path / "bounded.ckv"
    assert main([*_common(model), "--context-file", str(doc), "--keep-fraction", "0.2", *bounded,
                 "--save-context", str(kept)]) == 0
    assert _answers(capsys.readouterr().out) == want
    assert main([*_common(model), "--load-context", str(kept)]) == 0
    out = capsys.readouterr().out
    assert "decode budget 40 tokens per layer, re-selecting every 8 (saved with the context)" in out
    assert _answers(out) == want
    # a budget the saved method cannot keep is refused in one line
    _one_line_error(capsys, main([*_common(model), "--load-context", str(kept), "--decode-budget", "4"]),
                    "smaller than the observation window")
