"""Issue 25 (F): a prompt longer than the model's positions is refused with a clear error (or, with
``chunkkv generate --truncate``, cut in the middle with a note) — never run silently."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import chunkkv
from chunkkv import ChunkKV, PromptError
from chunkkv.cli import main
from chunkkv.pipeline import prefill

from models import random_prompt, tiny_model


@pytest.fixture(scope="module")
def short_model():
    """A tiny Llama trained (so to speak) on 96 positions."""
    return tiny_model("llama", max_position_embeddings=96)


def test_position_limit_follows_rope_scaling():
    from chunkkv.prompt import position_limit

    plain = SimpleNamespace(max_position_embeddings=8192)
    assert position_limit(plain) == 8192
    assert position_limit(SimpleNamespace()) is None
    yarn = SimpleNamespace(max_position_embeddings=32768, rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768})
    assert position_limit(yarn) == 131072  # Qwen2.5 with YaRN
    llama3 = SimpleNamespace(max_position_embeddings=131072, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "original_max_position_embeddings": 8192})
    assert position_limit(llama3) == 131072
    assert position_limit(SimpleNamespace(max_position_embeddings=4096, rope_scaling={"type": "dynamic", "factor": 2})) is None
    gemma3 = SimpleNamespace(max_position_embeddings=32768, rope_parameters={
        "full_attention": {"rope_type": "linear", "factor": 8.0}, "sliding_attention": {"rope_type": "default"}})
    assert position_limit(gemma3) == 262144
    assert position_limit(SimpleNamespace(max_position_embeddings=2048, rope_parameters={"rope_type": "default"})) == 2048


def test_compress_and_prefill_refuse_a_prompt_past_the_positions(short_model):
    method = ChunkKV(keep_tokens=16, window=4)
    fits = chunkkv.compress(short_model, random_prompt(1, 96, 1), method=method)
    assert fits.cache.stored_lengths()[0] == 16
    long = random_prompt(1, 97, 1)
    for run in (lambda: chunkkv.compress(short_model, long, method=method),
                lambda: chunkkv.compress(short_model, long),  # the full cache too
                lambda: chunkkv.compress(short_model, long, method=method, prefill_chunk=32),
                lambda: chunkkv.compress(short_model, long, method=ChunkKV(keep_tokens=16, window=4, scoring="surprisal")),
                lambda: prefill(short_model, long, methods=[method])):
        with pytest.raises(PromptError, match="the prompt has 97 tokens, but the model was trained on at most 96 "
                                              r"positions \(max_position_embeddings\)"):
            run()
    # a left-padded row counts its own tokens: 96 real tokens fit whatever the padding
    ids = torch.cat([torch.zeros(1, 4, dtype=torch.long), random_prompt(1, 96, 2)], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 96, dtype=torch.long)], 1)
    chunkkv.compress(short_model, ids, mask, method=method)


def test_decoding_past_the_positions_is_refused_before_it_starts(short_model):
    ctx = chunkkv.compress(short_model, random_prompt(1, 80, 1), method=ChunkKV(keep_tokens=16, window=4))
    question = random_prompt(1, 6, 2)
    tokens = chunkkv.continue_from(short_model, ctx, question, chunkkv.Sampling(max_new_tokens=11))  # ends at 96
    assert tokens.shape[1] == 11
    with pytest.raises(PromptError, match="reach position 97, but the model was trained on at most 96 positions"):
        chunkkv.continue_from(short_model, ctx, question, chunkkv.Sampling(max_new_tokens=12))
    with pytest.raises(PromptError, match="at most 96 positions"):
        chunkkv.extend(short_model, ctx.fork(), random_prompt(1, 17, 3))


def _short_model_folder(path):
    from test_cli import save_tiny_model

    folder = save_tiny_model(path)
    config = (folder / "config.json").read_text().replace('"max_position_embeddings": 8192', '"max_position_embeddings": 128')
    (folder / "config.json").write_text(config)
    return folder


def test_generate_refuses_or_truncates_with_a_note(tmp_path, capsys):
    from test_cli import QUESTION_TEXT, write_context

    model = _short_model_folder(tmp_path / "model")
    doc = write_context(tmp_path / "doc.txt")  # about 2k tokens
    capsys.readouterr()
    argv = ["generate", "--model", str(model), "--device", "cpu", "--context-file", str(doc), "--question",
            QUESTION_TEXT, "--max-new-tokens", "4", "--keep-fraction", "0.5", "--chat-template", "off"]
    assert main(argv) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "but the model was trained on at most 128 positions" in lines[0], err
    assert "give --truncate" in lines[0] and "A:" not in out
    assert main([*argv, "--truncate"]) == 0
    out = capsys.readouterr().out
    assert "note: the prompt (" in out and "--truncate kept the first" in out and "\nA: " in out
    assert "compressed 115 prompt tokens" in out  # 128 - the question's 10 tokens - 3 more positions for the answer
    for mode in (["--query-aware"], []):  # the same cut keeps the question in query-aware mode
        assert main([*argv, "--truncate", *mode, "--max-new-tokens", "2"]) == 0
        assert "--truncate kept" in capsys.readouterr().out


def test_eval_refuses_lengths_past_the_positions_before_any_sample(tmp_path, capsys):
    model = _short_model_folder(tmp_path / "model")
    capsys.readouterr()
    code = main(["eval", "--model", str(model), "--task", "niah", "--lengths", "64,200", "--depths", "50",
                 "--max-new-tokens", "2", "--no-progress", "--out", str(tmp_path / "out")])
    assert code == 2
    err = capsys.readouterr().err
    assert "--lengths 200 is longer than the model's 128 positions" in err and "Traceback" not in err
    assert not (tmp_path / "out" / "predictions.jsonl").exists()
