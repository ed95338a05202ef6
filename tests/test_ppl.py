"""Perplexity under compression (``chunkkv eval --task ppl``): teacher forcing through a bounded cache."""

from __future__ import annotations

import math

import pytest
import torch

import chunkkv
from chunkkv.evaluation.perplexity import PplConfig, summarize, teacher_forced, to_markdown

from models import VOCAB, tiny_model


@pytest.fixture(scope="module")
def llama():
    return tiny_model("llama")


def _ids(length: int = 150, seed: int = 0) -> torch.Tensor:
    return torch.randint(1, VOCAB, (1, length), generator=torch.Generator().manual_seed(seed))


def test_teacher_forcing_equals_one_forward_and_budgets_bound_it(llama):
    ids = _ids()
    chunkkv.detach(llama)
    with torch.inference_mode():
        logits = llama(ids).logits[0, :-1].float()
    want = torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="none")
    full = teacher_forced(llama, ids, None, None, every=16)
    torch.testing.assert_close(full["nll"], want, atol=1e-4, rtol=1e-4)
    method = chunkkv.ChunkKV(keep_tokens=32, window=8)
    roomy = teacher_forced(llama, ids, method, 200, every=16)  # budget >= the text: nothing evicted
    assert torch.equal(roomy["nll"], full["nll"])
    bounded = teacher_forced(llama, ids, method, 32, every=16)
    assert max(b[3] for b in bounded["blocks"]) <= 32 + 16
    # identical until the cache first reaches N + K (1 + 16 j >= 48 after the third block), different after
    assert torch.equal(bounded["nll"][:48], full["nll"][:48])
    assert not torch.allclose(bounded["nll"][60:], full["nll"][60:])


def test_summary_and_table():
    def row(text, method, budget, nll):
        return {"text": text, "method": method, "budget": budget, "tokens": 4, "bucket": 2, "bucket_nll": nll,
                "at_1k": {"ms_per_token": 1.0, "kv_mib": 1.0, "stored": 10},
                "at_end": {"ms_per_token": 2.0, "kv_mib": 2.0, "stored": 10}}
    rows = [row(0, "full", None, [1.0, 2.0]), row(0, "chunkkv", 8, [1.0, 2.5]),
            row(1, "full", None, [1.0, 2.0]), row(1, "chunkkv", 8, [1.0, 2.3])]
    summary = summarize(rows)
    assert summary["full@None"]["ppl"] == round(math.exp(1.5), 3)
    assert summary["chunkkv@8"]["delta_nll"] == pytest.approx(0.2)
    table = to_markdown(summary, "tiny")
    assert "| chunkkv | " in table and "ΔNLL +0.200" in table


def test_bad_ppl_settings_are_refused():
    with pytest.raises(chunkkv.ChunkKVError, match="unknown method"):
        PplConfig(methods=["chunky"]).validate()
    with pytest.raises(chunkkv.ChunkKVError, match="budgets"):
        PplConfig(budgets=[0]).validate()
