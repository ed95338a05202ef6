"""Issue 25 (I, J): the quiet surprises — settings that ran something else than asked without a word,
and the last tracebacks — are refused in one line or said on stdout."""

from __future__ import annotations

import pytest

import chunkkv
from chunkkv.cli import main
from chunkkv.errors import ChunkKVError, PromptError

from test_cli import QUESTION_TEXT, save_tiny_model, write_context


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("quiet")
    return save_tiny_model(root / "model"), write_context(root / "doc.txt")


@pytest.fixture(scope="module")
def loaded(files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(files[0]).eval(), AutoTokenizer.from_pretrained(files[0])


def test_an_empty_question_is_refused_in_every_mode(loaded, files):
    model, tok = loaded
    text = files[1].read_text()
    method = chunkkv.ChunkKV(keep_fraction=0.2, window=6)
    for query_aware in (False, True):
        for question in ("", "   "):
            with pytest.raises(PromptError, match="a question is empty"):
                chunkkv.generate(model, tok, text, [question], method, query_aware=query_aware, chat_template=False)


def test_a_misspelled_scoring_is_an_error_even_without_a_method(loaded, files):
    model, tok = loaded
    for method in (None, chunkkv.FullKV(), chunkkv.ChunkKV(keep_fraction=0.2)):
        with pytest.raises(ChunkKVError, match="scoring='hybrd' is not one of"):
            chunkkv.generate(model, tok, files[1].read_text(), ["q?"], method, scoring="hybrd", chat_template=False)
    from chunkkv.agnostic import agnostic_method

    with pytest.raises(ChunkKVError, match="scoring='hybrd' is not one of"):
        agnostic_method(None, "hybrd")


def test_a_bogus_synthetic_haystack_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    import chunkkv.evaluation.cli as eval_cli

    monkeypatch.setattr(eval_cli, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    code = main(["eval", "--model", "testbed", "--task", "synthetic", "--synthetic-haystack", "bogus", "--limit", "1",
                 "--no-progress", "--out", str(tmp_path / "syn")])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == ("chunkkv eval: error: --synthetic-haystack 'bogus' is not one of varied, "
                                         "repetitive"), err
    from chunkkv.synthetic import generate_samples

    with pytest.raises(ChunkKVError, match="haystack must be one of varied, repetitive"):
        generate_samples("niah_single", 1, 64, haystack="bogus")


def test_bench_says_which_contexts_are_too_short_to_compress(tmp_path, capsys, monkeypatch):
    import chunkkv.bench.cli as bench_cli

    def stop(*args, **kwargs):
        raise ChunkKVError("stopped before loading")

    monkeypatch.setattr(bench_cli, "load", stop)
    code = main(["bench", "--model", "random-tiny", "--contexts", "16,256", "--no-peers", "--out", str(tmp_path / "b")])
    out = capsys.readouterr().out
    assert code == 2
    assert "note: --contexts 16 is not longer than the observation window (32 tokens), so streamingllm, h2o" in out
    assert "chunkkv_reuse4 cannot compress it: at that length only the full cache is measured" in out
    assert "--contexts 256" not in out


def test_prefill_chunk_keeps_the_question_agnostic_default(files, capsys):
    """J: --prefill-chunk no longer drops the question-agnostic default: it runs chunk by chunk, and
    the method line says which scorer ran."""
    model, doc = files
    argv = ["generate", "--model", str(model), "--device", "cpu", "--context-file", str(doc), "--question",
            QUESTION_TEXT, "--max-new-tokens", "2", "--keep-fraction", "0.2", "--chat-template", "off"]
    capsys.readouterr()
    # in chunks ("hybrid" runs as "hybrid_chunked"), and one chunk holding the whole prompt
    for chunk, scoring in (("256", "scoring=hybrid_chunked,"), ("100000", "scoring=hybrid,")):
        assert main([*argv, "--prefill-chunk", chunk]) == 0
        out = capsys.readouterr().out
        assert scoring in out and "window scoring" not in out
