"""Smoke tests on the real model (SmolLM2-135M-Instruct) and real text (the Paul Graham essays).

They check that the whole path works on a real 30-layer model — GGUF loading, chat template,
compression, decoding — and that the answer survives: the paper's needle at 2k tokens, answered
with the full cache and with ChunkKV at 10 %; and the README's quick start, run as written.
"""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

import chunkkv

pytestmark = pytest.mark.real_model
README = Path(__file__).resolve().parents[1] / "README.md"


def _needle_document(tokenizer, tokens: int, depth: float) -> str:
    from chunkkv.haystack import PAUL_GRAHAM_NEEDLE, paul_graham_text

    text = paul_graham_text(min_chars=6 * tokens)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    text = text[: enc["offset_mapping"][tokens - 1][1]]
    cut = text.rfind(". ", 0, int(len(text) * depth / 100)) + 2
    return text[:cut] + PAUL_GRAHAM_NEEDLE + " " + text[cut:]


@pytest.mark.parametrize("depth", [25.0, 60.0])
def test_needle_at_2k_with_full_cache_and_chunkkv_10pct(smollm2, depth):
    model, tokenizer = smollm2
    document = _needle_document(tokenizer, 2000, depth)
    question = "What is the best thing to do in San Francisco? Answer in one sentence."
    sampling = chunkkv.Sampling(max_new_tokens=32)
    answers = {}
    for name, method in (("full", None), ("chunkkv", chunkkv.ChunkKV(keep_fraction=0.1))):
        result = chunkkv.generate(model, tokenizer, document, question, method, query_aware=True, sampling=sampling)
        answers[name] = result.answers[0].texts[0]
        if method is not None:
            assert result.prompt_tokens[0] > 2000
            assert all(k == [result.prompt_tokens[0] // 10] for k in result.kept_tokens.values())
            assert len(result.kept_tokens) == 30
    for name, answer in answers.items():
        assert "sandwich" in answer and "Dolores Park" in answer, (name, answer)


def test_readme_quick_start_runs_as_written(smollm2):
    block = re.search(r"## Quick start.*?```python\n(.*?)```", README.read_text(), re.S).group(1)
    expected = re.search(r"prints\n\n```\n(.*?)```", README.read_text(), re.S).group(1).strip().splitlines()
    model, tokenizer = smollm2
    out = io.StringIO()
    original = chunkkv.load_pretrained
    chunkkv.load_pretrained = lambda *a, **k: (model, tokenizer)  # the block loads the same model; reuse it
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(block, "README.md", "exec"), {})
    finally:
        chunkkv.load_pretrained = original
    printed = out.getvalue().strip().splitlines()
    assert printed[0] == expected[0]  # the answer names the needle's secret
    assert "smoked paprika" in printed[0]
    assert printed[1] == expected[1]  # kept count and KV size, exactly as documented
