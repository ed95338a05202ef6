"""``chunkkv eval`` end to end on a random-weight model saved like a real one (``--model DIR``):
one run per benchmark, resume, settings checks, a 2-process sharded run, ``--merge``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_eval_support import FIXTURES, read_records, save_tiny_model

import chunkkv
from chunkkv.cli import main
from chunkkv.evaluation import run_eval

REPO = Path(__file__).resolve().parents[1]
METHOD = ["--method", "chunkkv", "--keep-fraction", "0.5", "--window", "4", "--chunk-size", "4"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("eval-model") / "tiny-llama")


def _eval(model_dir, out, *extra, method=METHOD) -> int:
    return main(["eval", "--model", str(model_dir), *method, "--no-progress", "--out", str(out), *extra])


def _metrics(out: Path) -> dict:
    return json.loads((out / "metrics.json").read_text())


def _check_records(out: Path, n: int) -> list[dict]:
    records = read_records(out / "predictions.jsonl")
    assert len(records) == n and len({r["id"] for r in records}) == n
    for r in records:
        assert {"id", "prediction", "gold", "score", "scores", "kept_tokens", "prompt_tokens", "context_tokens"} <= set(r)
        assert 0 < r["kept_tokens"] <= r["context_tokens"] <= r["prompt_tokens"]
    assert (out / "summary.md").exists() and (out / "run.json").exists()
    return records


# --- one run per benchmark -----------------------------------------------------------------------
def test_niah(model_dir, tmp_path):
    out = tmp_path / "niah"
    assert _eval(model_dir, out, "--task", "niah", "--lengths", "60,120", "--depths", "0:100:3",
                 "--haystack-dir", str(FIXTURES / "haystack"), "--max-new-tokens", "6") == 0
    records = _check_records(out, 6)
    m = _metrics(out)
    assert m["complete"] and set(m["rouge1_grid"]) == {"60", "120"} and set(m["rouge1_grid"]["60"]) == {"0", "50", "100"}
    assert 0 <= m["rouge1"] <= 1 and 0 <= m["substring"] <= 1
    assert (out / "niah_heatmap_rouge1.png").read_bytes()[:4] == b"\x89PNG"
    assert all(r["chat"] for r in records)  # the tokenizer has a chat template: used by default
    # compression keeps half of the compressed context (question-agnostic: the context only)
    assert all(r["kept_tokens"] == r["context_tokens"] // 2 for r in records)


def test_prefill_chunk_says_and_records_the_scoring_run_in_chunks(model_dir, tmp_path, capsys):
    """Question-agnostic in chunks, "hybrid" runs as "hybrid_chunked": said before the run, kept in
    metrics.json and summary.md."""
    out = tmp_path / "chunked"
    assert _eval(model_dir, out, "--task", "niah", "--lengths", "120", "--depths", "0:100:2",
                 "--haystack-dir", str(FIXTURES / "haystack"), "--max-new-tokens", "2", "--prefill-chunk", "40") == 0
    assert "prompts longer than --prefill-chunk 40 run scoring=hybrid_chunked" in capsys.readouterr().out
    assert _metrics(out)["scoring_in_chunks"] == "hybrid_chunked"
    assert "ran scoring=hybrid_chunked" in (out / "summary.md").read_text()


def test_longbench_all_16_tasks(model_dir, tmp_path):
    out = tmp_path / "lb"
    assert _eval(model_dir, out, "--task", "longbench", "--data-dir", str(FIXTURES / "longbench"),
                 "--max-length", "160", "--max-new-tokens", "4") == 0
    records = _check_records(out, 32)
    m = _metrics(out)
    assert list(m["tasks"]) == chunkkv.evaluation.tasks.longbench.LONGBENCH_TASKS and m["complete"]
    assert set(m["categories"]) == {"single-doc QA", "multi-doc QA", "summarization", "few-shot", "synthetic", "code"}
    assert m["average"] == pytest.approx(sum(m["tasks"].values()) / 16, abs=0.01)
    no_chat = {"trec", "triviaqa", "samsum", "lcc", "repobench-p"}
    assert {r["subtask"] for r in records if not r["chat"]} == no_chat
    assert all(r["meta"]["truncated"] for r in records if r["subtask"] == "narrativeqa")
    assert max(r["prompt_tokens"] for r in records if not r["chat"]) <= 160 + 1  # + the split's junction


def test_gsm8k_many_shot(model_dir, tmp_path):
    out = tmp_path / "gsm"
    assert _eval(model_dir, out, "--task", "gsm8k", "--data-dir", str(FIXTURES / "gsm8k"), "--num-shots", "4",
                 "--max-new-tokens", "10", "--no-chat-template") == 0
    records = _check_records(out, 3)
    m = _metrics(out)
    assert m["num_shots"] == 4 and 0 <= m["accuracy"] <= 100 and [r["gold"] for r in records] == ["8", "42", "75"]
    assert not any(r["chat"] for r in records)
    # every sample compresses the same exemplars: same context length
    assert len({r["context_tokens"] for r in records}) == 1


def test_jailbreakv_keyword_rule_and_guard_model(model_dir, tmp_path):
    out = tmp_path / "jb"
    assert _eval(model_dir, out, "--task", "jailbreakv", "--data-file", str(FIXTURES / "jailbreakv.csv"),
                 "--max-new-tokens", "6") == 0
    records = _check_records(out, 4)
    m = _metrics(out)
    assert m["judge"] == "refusal-keywords" and set(m["by_format"]) == {"Template", "Persuade", "Logic"}
    assert m["safe_rate"] == pytest.approx(100 * sum(r["scores"]["safe"] for r in records) / 4)
    # prompts no longer than the observation window are kept whole (and counted), not an error
    short = tmp_path / "jb-short"
    assert _eval(model_dir, short, "--task", "jailbreakv", "--data-file", str(FIXTURES / "jailbreakv.csv"),
                 "--max-new-tokens", "2", method=["--method", "snapkv", "--keep-tokens", "8", "--window", "29"]) == 0
    whole = [r for r in read_records(short / "predictions.jsonl") if not r["compressed"]]
    assert whole and all(r["kept_tokens"] == r["context_tokens"] <= 29 for r in whole)
    assert _metrics(short)["uncompressed"] == len(whole) < 4
    guard = tmp_path / "jb-guard"
    assert _eval(model_dir, guard, "--task", "jailbreakv", "--data-file", str(FIXTURES / "jailbreakv.csv"),
                 "--max-new-tokens", "6", "--judge-model", str(model_dir), "--limit", "2") == 0
    g = _metrics(guard)
    # a random "guard" says neither safe nor unsafe: reported, and not counted as safe
    assert g["judge"] == "guard" and g["n"] == 2
    assert g["unparsed_verdicts"] + sum(r["meta"]["verdict"] is not None for r in read_records(guard / "predictions.jsonl")) == 2


def test_synthetic_suite(model_dir, tmp_path):
    pytest.importorskip("chunkkv.synthetic")
    out = tmp_path / "syn"
    assert _eval(model_dir, out, "--task", "synthetic:niah_single,vt", "--lengths", "96", "--num-samples", "2",
                 "--max-new-tokens", "6", "--no-chat-template") == 0
    _check_records(out, 4)
    m = _metrics(out)
    assert set(m["tasks"]) == {"niah_single", "vt"} and m["by_length"]["vt"].keys() == {"96"}


def test_query_aware_full_cache_and_python_api(model_dir, tmp_path):
    out = tmp_path / "qa"
    assert _eval(model_dir, out, "--task", "niah", "--lengths", "60", "--depths", "50", "--query-aware",
                 "--max-new-tokens", "4") == 0
    (r,) = read_records(out / "predictions.jsonl")
    assert r["context_tokens"] == r["prompt_tokens"]  # the question is compressed too
    full = tmp_path / "full"
    assert _eval(model_dir, full, "--task", "niah", "--lengths", "60", "--depths", "50", "--max-new-tokens", "4",
                 method=["--method", "full"]) == 0
    (f,) = read_records(full / "predictions.jsonl")
    assert f["kept_tokens"] == f["context_tokens"]
    # the Python API gives the same predictions as the command
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    metrics = run_eval(model, tok, task="niah", out_dir=str(tmp_path / "api"), lengths=[60], depths=[50.0],
                       max_new_tokens=4, progress=False, method=chunkkv.FullKV())
    (a,) = read_records(tmp_path / "api" / "predictions.jsonl")
    assert a["prediction"] == f["prediction"] and metrics["samples"] == 1


# --- resume ------------------------------------------------------------------------------------
def test_resume_never_loses_or_duplicates(model_dir, tmp_path):
    out = tmp_path / "resume"
    args = ["--task", "niah", "--lengths", "60,90", "--depths", "0,50,100", "--max-new-tokens", "4"]
    assert _eval(model_dir, out, *args, "--limit", "2") == 0
    first = read_records(out / "predictions.jsonl")
    assert [r["id"] for r in first] == ["niah/L60/D0", "niah/L60/D50"]
    assert _eval(model_dir, out, *args, "--limit", "4") == 0
    second = _check_records(out, 4)
    assert second[:2] == first  # finished samples were not redone
    assert _metrics(out)["samples"] == 4
    # a run killed while writing its last record: the partial line is tolerated, the sample redone
    path = out / "predictions.jsonl"
    text = path.read_text()
    path.write_text(text[: len(text) - 40])
    assert _eval(model_dir, out, *args, "--limit", "4") == 0
    redone = _check_records(out, 4)
    assert [r["id"] for r in redone] == [r["id"] for r in second] and redone[3]["prediction"] == second[3]["prediction"]
    # other settings in the same folder are refused; --overwrite starts over
    assert _eval(model_dir, out, *args, "--limit", "4", method=["--method", "snapkv", "--keep-fraction", "0.5", "--window", "4"]) == 2
    assert _eval(model_dir, out, *args, "--limit", "1", "--overwrite") == 0
    _check_records(out, 1)


# --- data parallel -----------------------------------------------------------------------------
def _launch(model_dir, out, rank, world, *args):
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "CHUNKKV_EVAL_POLL_SECONDS": "0.2",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO / "src")}
    env.pop("MASTER_ADDR", None)
    cmd = [sys.executable, "-m", "chunkkv.cli", "eval", "--model", str(model_dir), *METHOD, "--no-progress",
           "--out", str(out), *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_two_process_sharded_run_equals_one_process(model_dir, tmp_path, monkeypatch):
    """Rank 1 runs in a second process, rank 0 in this one (at the same time); rank 0 merges."""
    args = ["--task", "niah", "--lengths", "60,90,120", "--depths", "0,50,100", "--max-new-tokens", "5"]
    rank1 = _launch(model_dir, tmp_path / "sharded", 1, 2, *args)
    try:
        monkeypatch.delenv("MASTER_ADDR", raising=False)
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", "0")
        monkeypatch.setenv("CHUNKKV_EVAL_POLL_SECONDS", "0.2")
        assert _eval(model_dir, tmp_path / "sharded", *args) == 0  # returns once rank 1's shard is complete
    finally:
        log = rank1.communicate(timeout=120)[0]
    assert rank1.returncode == 0, log
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name)
    assert _eval(model_dir, tmp_path / "single", *args) == 0
    sharded = read_records(tmp_path / "sharded" / "predictions.jsonl")
    single = read_records(tmp_path / "single" / "predictions.jsonl")
    assert [(r["id"], r["prediction"], r["kept_tokens"]) for r in sharded] == [
        (r["id"], r["prediction"], r["kept_tokens"]) for r in single
    ]
    assert [r["rank"] for r in sharded] == [i % 2 for i in range(9)]
    assert sorted(p.name for p in (tmp_path / "sharded").glob("predictions*")) == ["predictions.jsonl"]
    for key in ("rouge1", "substring", "rouge1_grid"):
        assert _metrics(tmp_path / "sharded")[key] == _metrics(tmp_path / "single")[key]


def test_merge_mode_and_late_rank(model_dir, tmp_path, monkeypatch):
    out = tmp_path / "late"
    args = ["--task", "niah", "--lengths", "60,90", "--depths", "0,100", "--max-new-tokens", "3"]
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert _eval(model_dir, out, *args) == 0  # rank 1 answers its half and leaves
    assert not (out / "metrics.json").exists()
    assert len(read_records(out / "predictions.rank1-of-2.jsonl")) == 2
    assert main(["eval", "--merge", "--out", str(out)]) == 1  # merge what is there, no model needed; incomplete: exit 1
    partial = _metrics(out)
    assert (partial["samples"], partial["expected"], partial["complete"]) == (2, 4, False)
    monkeypatch.setenv("RANK", "0")
    assert _eval(model_dir, out, *args) == 0  # rank 0 does the rest and merges
    _check_records(out, 4)
    assert _metrics(out)["complete"]


def test_shared_context_is_compressed_once_with_the_same_answers(model_dir, tmp_path, monkeypatch):
    """GSM8K's exemplars are the same context for every question: compressed once and forked."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chunkkv.evaluation.runner import Generator

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    kw = dict(task="gsm8k", data_dir=str(FIXTURES / "gsm8k"), num_shots=4, max_new_tokens=8, progress=False,
              chat_template=False, method=chunkkv.ChunkKV(keep_fraction=0.3, window=4))
    calls = []
    real = chunkkv.evaluation.runner.compress
    monkeypatch.setattr(chunkkv.evaluation.runner, "compress", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_eval(model, tok, out_dir=str(tmp_path / "reuse"), **kw)
    assert len(calls) == 1

    def fresh(self, context_ids, keep, chat):
        return real(self.model, torch.tensor([context_ids]), method=self.method)

    monkeypatch.setattr(Generator, "_compressed", fresh)
    run_eval(model, tok, out_dir=str(tmp_path / "fresh"), **kw)
    reuse = [r["prediction"] for r in read_records(tmp_path / "reuse" / "predictions.jsonl")]
    assert reuse == [r["prediction"] for r in read_records(tmp_path / "fresh" / "predictions.jsonl")]


def test_several_methods_share_one_prefill_per_sample_with_the_same_results(model_dir, tmp_path, monkeypatch):
    """run_eval_many writes, per method, what run_eval writes alone; each prompt is prefilled once."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chunkkv.evaluation.runner import run_eval_many

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    methods = {"full": chunkkv.FullKV(), "chunkkv": chunkkv.ChunkKV(keep_fraction=0.3, window=4, chunk_size=4),
               "h2o": chunkkv.H2O(keep_fraction=0.3, window=6)}
    kw = dict(task="niah", lengths=[70], depths=[20.0, 80.0], max_new_tokens=4, progress=False)
    for query_aware in (False, True):
        config = chunkkv.evaluation.EvalConfig(out_dir=str(tmp_path / f"many{query_aware}"), query_aware=query_aware, **kw)
        captures = []
        real = chunkkv.evaluation.runner.prefill
        monkeypatch.setattr(chunkkv.evaluation.runner, "prefill",
                            lambda *a, **k: captures.append(1) or real(*a, **k))
        many = run_eval_many(model, tok, config, methods)
        monkeypatch.setattr(chunkkv.evaluation.runner, "prefill", real)
        assert len(captures) == 2  # two samples, one prefill each for the three methods
        for name, method in methods.items():
            alone = run_eval(model, tok, out_dir=str(tmp_path / f"alone{query_aware}{name}"), method=method,
                             query_aware=query_aware, **kw)
            got = read_records(tmp_path / f"many{query_aware}" / name / "predictions.jsonl")
            want = read_records(tmp_path / f"alone{query_aware}{name}" / "predictions.jsonl")
            assert [(r["id"], r["prediction"], r["kept_tokens"]) for r in got] == \
                [(r["id"], r["prediction"], r["kept_tokens"]) for r in want]
            assert many[name]["samples"] == alone["samples"] == 2
        # resumes: nothing left to do, no prefill
        captures.clear()
        monkeypatch.setattr(chunkkv.evaluation.runner, "prefill",
                            lambda *a, **k: captures.append(1) or real(*a, **k))
        run_eval_many(model, tok, config, methods)
        monkeypatch.setattr(chunkkv.evaluation.runner, "prefill", real)
        assert captures == []


def test_methods_flag_runs_every_method_into_its_folder(model_dir, tmp_path):
    out = tmp_path / "many"
    assert main(["eval", "--model", str(model_dir), "--methods", "full,snapkv,chunkkv", "--keep-fraction", "0.5",
                 "--window", "4", "--no-progress", "--out", str(out), "--task", "niah", "--lengths", "60",
                 "--depths", "50", "--max-new-tokens", "3"]) == 0
    for name in ("full", "snapkv", "chunkkv"):
        assert _metrics(out / name)["samples"] == 1
    assert _metrics(out / "chunkkv")["method"]["keep_fraction"] == 0.5
    assert main(["eval", "--model", str(model_dir), "--methods", "chunkkv,chunkkv", "--keep-fraction", "0.5",
                 "--no-progress", "--out", str(tmp_path / "x"), "--task", "niah", "--lengths", "60"]) == 2


@pytest.mark.parametrize("flag,value,message", [
    ("--ppl-budgets", "x", "--ppl-budgets: expected comma-separated integers"),
    ("--recall-budgets", "512,y", "--recall-budgets: expected comma-separated integers"),
])
def test_bad_budget_lists_are_usage_errors(tmp_path, capsys, flag, value, message):
    task = "ppl" if flag.startswith("--ppl") else "recall"
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--task", task, flag, value, "--out", str(tmp_path / "x")])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err
    assert main(["eval", "--task", "ppl", "--model", "testbed", "--ppl-methods", ",", "--out", str(tmp_path / "y")]) == 2
    assert "--ppl-methods ',' names no method" in capsys.readouterr().err


def test_settings_and_finished_runs_are_checked_before_the_model_loads(model_dir, tmp_path, monkeypatch, capsys):
    """A resumed folder with other settings is refused, and a finished run prints its result, without
    loading the model; the NIAH headline is the exact answer beside ROUGE-1."""
    from chunkkv.evaluation import cli as eval_cli

    out = tmp_path / "pre"
    args = ["--task", "niah", "--lengths", "60", "--depths", "0,100", "--max-new-tokens", "3"]
    assert _eval(model_dir, out, *args) == 0
    headline = [line for line in capsys.readouterr().out.splitlines() if line.startswith("niah [")]
    m = _metrics(out)
    assert headline == [f"niah [chunkkv keep_fraction=0.5]: answer found (exact) = {m['substring']}, "
                        f"ROUGE-1 = {m['rouge1']} over 2 samples"]

    def no_model(*a, **k):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(eval_cli, "load_model", no_model)
    assert _eval(model_dir, out, *args) == 0
    printed = capsys.readouterr().out
    assert "no model loaded" in printed and headline[0] in printed.splitlines()
    assert _eval(model_dir, out, *args, method=["--method", "snapkv", "--keep-fraction", "0.5", "--window", "4"]) == 2
    assert "other settings (method:" in capsys.readouterr().err
    with pytest.raises(AssertionError, match="the model was loaded"):  # another --limit: a run to do
        _eval(model_dir, out, *args, "--limit", "1")
    many = tmp_path / "many"
    flags = ["eval", "--model", str(model_dir), "--methods", "full,chunkkv", "--keep-fraction", "0.5", "--window", "4",
             "--no-progress", "--out", str(many), *args]
    monkeypatch.undo()
    assert main(flags) == 0
    monkeypatch.setattr(eval_cli, "load_model", no_model)
    capsys.readouterr()
    assert main(flags) == 0
    assert "no model loaded" in capsys.readouterr().out
