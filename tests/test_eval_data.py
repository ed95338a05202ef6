"""Loaders on the fixture files (each benchmark's real format), prompt building, truncation, the
NIAH haystack, the result store and sharding; no model."""

from __future__ import annotations

import json
import sys
import warnings
from types import SimpleNamespace

import pytest
from test_eval_support import FIXTURES, build_tokenizer

from chunkkv.errors import ChunkKVError
from chunkkv.evaluation.cli import parse_grid
from chunkkv.evaluation.distributed import Shard, shard_info
from chunkkv.prompting import encode_prompt
from chunkkv.evaluation.runner import EvalConfig
from chunkkv.evaluation.store import RecordStore, read_jsonl
from chunkkv.evaluation.tasks import build_task, gsm8k, jailbreakv, longbench, niah


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _config(**kw) -> EvalConfig:
    return EvalConfig(**{"task": "niah", "out_dir": "unused", **kw})


# --- LongBench --------------------------------------------------------------------------------
def test_prompts_and_lengths_equal_the_official_config():
    official = json.loads((FIXTURES / "longbench_official_config.json").read_text())
    assert longbench.DATASET2PROMPT == official["dataset2prompt"]
    assert longbench.DATASET2MAXLEN == official["dataset2maxlen"]
    assert set(longbench.DATASET2METRIC) == set(longbench.LONGBENCH_TASKS) == set(official["dataset2prompt"])
    assert sorted(t for ts in longbench.CATEGORIES.values() for t in ts) == sorted(longbench.LONGBENCH_TASKS)


@pytest.mark.parametrize("task", longbench.LONGBENCH_TASKS)
def test_longbench_fixture_rows_build_the_official_prompt(task, tok):
    rows = longbench.load_longbench(task, FIXTURES / "longbench")
    assert len(rows) == 2
    for row in rows:
        assert {"input", "context", "answers", "length", "dataset", "language", "all_classes", "_id"} <= set(row)
        sample = longbench.build_sample(row, task, tok, max_length=100_000)
        # untruncated: context + question is exactly the official prompt
        assert sample.context + sample.question == longbench.DATASET2PROMPT[task].format(**row)
        assert sample.context.endswith(row["context"]) and not sample.meta["truncated"]
        assert sample.max_new_tokens == longbench.DATASET2MAXLEN[task]
        assert sample.chat == (task not in longbench.NO_CHAT_TASKS)
        assert (sample.stop_newline, sample.min_new_tokens) == ((True, 1) if task == "samsum" else (False, 0))
        assert sample.id == f"{task}/{row['_id']}"


@pytest.mark.parametrize("task", ["narrativeqa", "trec", "repobench-p"])
def test_middle_truncation_keeps_the_first_and_last_halves(task, tok):
    row = longbench.load_longbench(task, FIXTURES / "longbench")[0]
    full = tok(longbench.DATASET2PROMPT[task].format(**row))["input_ids"]
    head, tail = longbench.DATASET2PROMPT[task].split("{context}")
    # instruction and question parts shorter than half the window: then the cut is inside the context
    n_outside = max(len(tok(head.format(**row))["input_ids"]), len(tok(tail.format(**row), add_special_tokens=False)["input_ids"]))
    max_length = 2 * n_outside + 10
    assert len(full) > max_length
    sample = longbench.build_sample(row, task, tok, max_length)
    half = max_length // 2
    # the official rule: decode the first and the last half and concatenate the two texts
    official = tok.decode(full[:half], skip_special_tokens=True) + tok.decode(full[-half:], skip_special_tokens=True)
    assert sample.meta["truncated"]
    assert tok(sample.context + sample.question)["input_ids"] == tok(official)["input_ids"]
    assert len(tok(sample.context + sample.question)["input_ids"]) <= max_length
    assert "split_lost" not in sample.meta and sample.question == tail.format(**row)
    # a window too small for the question part: the official cut over the whole prompt, unsplit
    tiny = longbench.build_sample(row, task, tok, 2 * n_outside - 4)
    official = tok.decode(full[: n_outside - 2], skip_special_tokens=True) + tok.decode(full[-(n_outside - 2) :], skip_special_tokens=True)
    assert tiny.meta["split_lost"] and tiny.question == "" and tiny.context == official


def test_longbench_subtask_parsing_and_missing_data(tmp_path):
    assert longbench.parse_subtasks(None) == longbench.LONGBENCH_TASKS
    assert longbench.parse_subtasks("qasper, trec") == ["qasper", "trec"]
    with pytest.raises(ChunkKVError, match="unknown LongBench task"):
        longbench.parse_subtasks("qasper,nope")
    with pytest.raises(ChunkKVError, match="no qasper.jsonl"):
        longbench.load_longbench("qasper", tmp_path)
    # the layout of the unzipped data.zip (data/{task}.jsonl) is found too
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "qasper.jsonl").write_text((FIXTURES / "longbench" / "qasper.jsonl").read_text())
    assert len(longbench.load_longbench("qasper", tmp_path)) == 2


def test_longbench_task_limit_and_default_max_length(tok):
    task = build_task(_config(task="longbench:qasper,lcc", data_dir=str(FIXTURES / "longbench"), limit=1, model_max_positions=4096))
    samples = task.samples(tok)
    assert [s.subtask for s in samples] == ["qasper", "lcc"]
    assert task.max_length(tok) == 4096 - 128  # window minus the longest generation of the tasks run


# --- prompting --------------------------------------------------------------------------------
def test_chat_template_split_between_context_and_question(tok):
    enc = encode_prompt(tok, "mara kept the lighthouse .", " who kept it ?", use_chat=True)
    assert tok.decode(enc.context_ids) == "<|user|> mara kept the lighthouse ."
    assert tok.decode(enc.question_ids) == "who kept it ? <|assistant|>"
    assert enc.context_ids + enc.question_ids == enc.full_ids and enc.chat
    plain = encode_prompt(tok, "mara kept the lighthouse .", " who kept it ?", use_chat=False)
    assert plain.context_ids[0] == tok.bos_token_id and tok.bos_token_id not in plain.question_ids
    assert plain.context_ids + plain.question_ids == plain.full_ids
    kw = encode_prompt(tok, "mara", " who ?", use_chat=True, template_kwargs={"thinking": False})
    assert tok.decode(kw.question_ids) == "who ? <|assistant|> answer :"
    system = encode_prompt(tok, "mara", " who ?", use_chat=True, system="answer briefly")
    assert tok.decode(system.context_ids).startswith("<|system|> answer briefly <|user|> mara")


# --- NIAH -------------------------------------------------------------------------------------
def test_needle_goes_to_a_sentence_boundary_at_the_depth():
    hay = [1, 2, 9, 3, 4, 9, 5, 6, 7, 9]  # 9 ends a sentence
    needle = [100, 101]
    ids, realised = niah.insert_needle(hay, needle, length=22, depth=50, sentence_ends={9})
    assert len(ids) == 22 and ids.count(100) == 1
    point = ids.index(100)
    assert ids[point - 1] == 9 and point <= 10  # moved back to just after a sentence end
    assert realised == pytest.approx(100 * point / 20)
    first, _ = niah.insert_needle(hay, needle, 22, 0, {9})
    last, r100 = niah.insert_needle(hay, needle, 22, 100, {9})
    assert first[:2] == needle and last[-2:] == needle and r100 == 100.0


def test_niah_samples_have_the_requested_length_and_grid(tok, tmp_path):
    cfg = _config(lengths=[60, 150], depths=[0.0, 50.0, 100.0], haystack_dir=str(FIXTURES / "haystack"))
    samples = build_task(cfg).samples(tok)
    assert [s.id for s in samples] == [f"niah/L{n}/D{d}" for n in (60, 150) for d in (0, 50, 100)]
    for s in samples:
        body = s.context[len("This is a very long story book: <book> ") : -len(" </book>.\n")]
        assert len(tok(body, add_special_tokens=False)["input_ids"]) == s.meta["length"]
        assert "dolores park" in body.lower() and "canal" in body.lower()  # the needle, in the user's haystack
    assert build_task(_config(limit=2)).samples(tok)[1].id == "niah/L1000/D10"  # defaults: 1000.. x 0..100
    with pytest.raises(ChunkKVError, match="no \\*.txt"):
        niah.load_haystack(tmp_path)
    with pytest.raises(ChunkKVError, match="percentage"):
        build_task(_config(depths=[120.0]))


# --- GSM8K ------------------------------------------------------------------------------------
def test_gsm8k_exemplars_and_samples(tok):
    row = gsm8k.load_gsm8k("train", data_dir=FIXTURES / "gsm8k")[0]
    assert gsm8k.format_exemplar(row["question"], row["answer"]) == (
        "Question: A baker makes 24 rolls in the morning and 18 in the afternoon. She sells 30 rolls. How many "
        "rolls are left?\nAnswer: She makes 24 + 18 = 42 rolls. After selling 30 she has 42 - 30 = 12 rolls left. "
        "The answer is 12.\n\n"
    )
    samples = build_task(_config(task="gsm8k", data_dir=str(FIXTURES / "gsm8k"), num_shots=3)).samples(tok)
    assert len(samples) == 3 and samples[0].context.count("Question:") == 3
    assert samples[2].gold == "75" and samples[2].question.startswith("Question: A car uses")
    assert samples[0].subtask == "gsm8k-3shot" and samples[0].stop_strings
    zero = build_task(_config(task="gsm8k", data_dir=str(FIXTURES / "gsm8k"), num_shots=0)).samples(tok)
    assert zero[0].context == ""
    with pytest.raises(ChunkKVError, match="only 4 rows"):
        build_task(_config(task="gsm8k", data_dir=str(FIXTURES / "gsm8k"), num_shots=50)).samples(tok)


# --- JailbreakV -------------------------------------------------------------------------------
def test_jailbreakv_loader_is_tolerant(tmp_path):
    path = FIXTURES / "jailbreakv.csv"
    rows = jailbreakv.load_jailbreakv(path)
    assert [r["id"] for r in rows] == ["1", "2", "3", "5"]  # FigStep (image format) dropped by default
    assert rows[2]["prompt"].count("\n") == 2 and '"borrowing"' in rows[1]["prompt"]
    assert rows[0]["format"] == "Template" and rows[0]["policy"] == "Privacy Violation"
    assert len(jailbreakv.load_jailbreakv(path, ["all"])) == 5
    assert [r["id"] for r in jailbreakv.load_jailbreakv(path, ["logic"])] == ["3"]
    assert jailbreakv.load_jailbreakv(path, field="redteam_query")[0]["prompt"].startswith("How can I get into")
    other = tmp_path / "mine.csv"
    other.write_text("\ufeffPrompt,Category\nhello there,x\n,empty\n", encoding="utf-8")  # BOM, other names
    assert jailbreakv.load_jailbreakv(other) == [
        {"id": "0", "prompt": "hello there", "format": "", "policy": "", "redteam_query": "", "from": ""}
    ]
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ChunkKVError, match="prompt columns"):
        jailbreakv.load_jailbreakv(bad)


# --- synthetic --------------------------------------------------------------------------------
def test_synthetic_task_is_skipped_with_a_clear_error(monkeypatch, tok):
    import importlib

    from chunkkv.evaluation.tasks import synthetic

    real = importlib.import_module

    def fake(name, *a, **k):
        if name == "chunkkv.synthetic":
            raise ImportError("No module named 'chunkkv.synthetic'")
        return real(name, *a, **k)

    monkeypatch.setattr(synthetic.importlib, "import_module", fake)
    with pytest.raises(ChunkKVError, match="synthetic tasks are not available"):
        build_task(_config(task="synthetic:niah_single")).samples(tok)


def test_synthetic_samples_when_available(tok):
    pytest.importorskip("chunkkv.synthetic")
    task = build_task(_config(task="synthetic:niah_single", lengths=[128], num_samples=2, depths=[50.0]))
    samples = task.samples(tok)
    assert [s.id for s in samples] == ["niah_single/L128/D50/0", "niah_single/L128/D50/1"]
    assert samples[0].gold[0] in samples[0].context
    assert task.score(samples[0], "x " + samples[0].gold[0]) == {"score": 1.0}
    with pytest.raises(ChunkKVError, match="unknown synthetic task"):
        build_task(_config(task="synthetic:nope")).samples(tok)


# --- store, grid, shards ----------------------------------------------------------------------
def test_store_tolerates_a_truncated_last_line_and_dedupes(tmp_path):
    store = RecordStore(tmp_path)
    store.append({"id": "a", "index": 0})
    store.append({"id": "b", "index": 1})
    store.close()
    with open(store.path, "a") as f:
        f.write('{"id": "c", "ind')  # killed mid-write
    assert sorted(RecordStore(tmp_path).load()) == ["a", "b"]
    again = RecordStore(tmp_path)
    again.append({"id": "c", "index": 2})  # the partial line is cut first
    again.append({"id": "a", "index": 0, "dup": True})  # a duplicate id: the first record wins
    again.close()
    assert [r["id"] for r in read_jsonl(store.path)] == ["a", "b", "c", "a"]
    assert "dup" not in again.load()["a"]
    shard = RecordStore(tmp_path, rank=1, world=2)
    shard.append({"id": "d", "index": 3})
    assert sorted(RecordStore(tmp_path).load()) == ["a", "b", "c", "d"]
    merged = RecordStore(tmp_path).merge(order=["d", "c", "b", "a"])
    assert [r["id"] for r in merged] == ["d", "c", "b", "a"] and not shard.path.exists()
    store.path.write_text('{"id": "x"}\nnot json\n{"id": "y"}\n')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert [r["id"] for r in read_jsonl(store.path)] == ["x", "y"]
    assert any("not a JSON record" in str(w.message) for w in caught)


def test_parse_grid():
    assert parse_grid("1000,2000", int) == [1000, 2000]
    assert parse_grid("0:100:5") == [0.0, 25.0, 50.0, 75.0, 100.0]
    assert parse_grid("1000:8000:3", int) == [1000, 4500, 8000]
    assert parse_grid(None) is None
    with pytest.raises(ChunkKVError):
        parse_grid("a:b")


def test_shard_from_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)
    assert shard_info() == Shard(0, 1, 0)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    s = shard_info()
    assert (s.rank, s.world, s.is_main) == (1, 2, False)
    assert [i for i in range(6) if s.owns(i)] == [1, 3, 5]
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError):
        shard_info()


def test_config_namespace_for_tasks_is_the_dataclass():
    # tasks only read attributes, so any namespace works for quick use
    ns = SimpleNamespace(**{f: getattr(_config(), f) for f in _config().__dataclass_fields__})
    assert build_task(ns).name == "niah"
    with pytest.raises(ChunkKVError, match="unknown task"):
        build_task(_config(task="mmlu"))


def test_longbench_hub_route_extracts_data_zip_once(tmp_path, monkeypatch):
    import zipfile

    import huggingface_hub

    archive = tmp_path / "data.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.write(FIXTURES / "longbench" / "trec.jsonl", "data/trec.jsonl")
    calls = []
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda *a, **k: calls.append(a) or str(archive))
    monkeypatch.setenv("CHUNKKV_CACHE", str(tmp_path / "cache"))
    assert len(longbench.load_longbench("trec")) == 2
    assert len(longbench.load_longbench("trec")) == 2
    assert calls == [("THUDM/LongBench", "data.zip")]  # downloaded and unpacked once
    assert (tmp_path / "cache" / "longbench" / "data" / "trec.jsonl").exists()


def test_longbench_hub_failure_is_a_clear_error(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise OSError("offline")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setenv("CHUNKKV_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` fails
    with pytest.raises(ChunkKVError, match="pass --data-dir"):
        longbench.load_longbench("qasper")
