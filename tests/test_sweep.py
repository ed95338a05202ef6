"""``chunkkv sweep`` (the study in ``studies/sweep``): a tiny end-to-end sweep on the shipped testbed, the
pure helpers, where its outputs go by default, and the one-line error of an installation without the studies."""

from __future__ import annotations

import json

import pytest
import torch

from chunkkv import cli as _cli
from chunkkv import cli_common as _common
from chunkkv.cli import main
from studies import ROOT
from studies import sweep

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(**over):
    base = dict(
        tasks=["niah_single"], methods=["full", "snapkv", "chunkkv"], lengths=[256], samples=1, fractions=[0.1],
        tokens=[64], chunk_sizes=[3, 10], reuse_depths=["1", "2", "3", "all"], sweep_fraction=0.1, chunk_size=10,
        reuse_depth=1, window="question", question_agnostic=False, extra_new_tokens=2, seed=0, haystack="varied",
        heatmap_lengths=[], heatmap_depths=[], heatmap_samples=0, heatmap_methods=[], heatmap_fraction=0.1,
    )
    base.update(over)
    return sweep.SweepConfig(**base)


def test_entries_share_runs_and_reuse_depths_collapse_to_all_layers():
    entries = sweep.build_entries(_config(), num_layers=2)
    specs = {e.spec for e in entries}
    reuse = [e for e in entries if e.group == "reuse"]
    # depths 2, 3 and "all" are one run on a 2-layer model; depth 1 is the budget grid's chunkkv 10 %
    assert len({e.spec for e in reuse}) == 2
    assert [e.label for e in reuse] == ["depth 1", "depth 2 (= all layers)", "depth 3 (= all layers)", "depth all"]
    base = next(e.spec for e in entries if e.group == "budget" and e.method == "chunkkv" and e.label == "10%")
    assert base == reuse[0].spec == next(e.spec for e in entries if e.label == "chunk 10")
    # full once; snapkv and chunkkv x 2 budgets; chunk 3; reuse all
    assert len(specs) == 1 + 2 + 2 + 1 + 1


def test_write_report_replaces_only_the_generated_block(tmp_path):
    path = tmp_path / "q.md"
    sweep.write_report(path, "first\n")
    text = path.read_text()
    assert sweep.BEGIN in text and "first" in text
    path.write_text("# Title\n\nprose before\n\n" + text[text.index(sweep.BEGIN):] + "\nprose after\n")
    sweep.write_report(path, "second\n")
    text = path.read_text()
    assert "prose before" in text and "prose after" in text and "second" in text and "first" not in text
    assert text.count(sweep.BEGIN) == 1 and text.count(sweep.END) == 1


def test_tiny_sweep_end_to_end(tmp_path, capsys):
    if not (_common.testbed_path() / "config.json").exists():
        pytest.skip("testbed model not shipped")
    out, report = tmp_path / "quality", tmp_path / "quality.md"
    argv = [
        "sweep", "--tasks", "niah_single,niah_multivalue", "--samples", "2", "--lengths", "384",
        "--methods", "full,snapkv,chunkkv", "--fractions", "0.25,0.1", "--tokens", "64",
        "--chunk-sizes", "5,10", "--reuse-depths", "1,2,all",
        "--heatmap-lengths", "256,384", "--heatmap-depths", "0,100", "--heatmap-samples", "1",
        "--out", str(out), "--report", str(report), "--threads", "1", "--no-progress",
    ]
    threads = torch.get_num_threads()
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "Accuracy by method and budget" in printed

    results = json.loads((out / "results.json").read_text())
    assert results["num_layers"] == 2
    rows = results["rows"]
    budget = [r for r in rows if r["group"] == "budget"]
    assert {(r["method"], r["label"]) for r in budget} == {
        ("full", "full"), *((m, b) for m in ("snapkv", "chunkkv") for b in ("25%", "10%", "64 tok"))}
    for r in rows:
        assert set(r["tasks"]) == {"niah_single", "niah_multivalue"}
        assert all(0 <= v <= 100 for v in r["tasks"].values())
        assert r["counts"] == {"niah_single": 2, "niah_multivalue": 2}
        assert r["average"] is not None
    full = next(r for r in budget if r["method"] == "full")
    assert full["tasks"] == {"niah_single": 100.0, "niah_multivalue": 100.0}  # the testbed solves both
    assert full["jaccard_union"] == 1.0 and full["kept_fraction"] == 1.0
    assert full["value_pos_kept"] == [1.0, 1.0, 1.0, 1.0]

    # one kept set per request: reuse depth = all layers gives identical layers
    reuse = {r["label"]: r for r in rows if r["group"] == "reuse"}
    assert reuse["depth all"]["jaccard_union"] == 1.0 and reuse["depth all"]["jaccard_head"] == 1.0
    assert reuse["depth 2 (= all layers)"]["spec"] == reuse["depth all"]["spec"]
    assert reuse["depth 1"]["jaccard_union"] < 1.0
    # per-head methods: union and per-head Jaccard are both reported; chunkkv's heads agree
    snap = next(r for r in budget if r["method"] == "snapkv" and r["label"] == "10%")
    assert 0 <= snap["jaccard_union"] <= 1 and 0 <= snap["jaccard_head"] <= 1
    chunk = next(r for r in budget if r["method"] == "chunkkv" and r["label"] == "10%")
    assert chunk["jaccard_union"] == chunk["jaccard_head"]
    assert abs(chunk["kept_fraction"] - 0.1) < 0.01

    assert [c["length"] for c in results["heatmap"] if c["method"] == "full"] == [256, 256, 384, 384]
    assert all(c["n"] == 1 for c in results["heatmap"])

    lines = (out / "records.jsonl").read_text().strip().splitlines()
    specs = {r["spec"] for r in rows}
    assert len(lines) == 2 * 2 * len(specs)  # each (sample, configuration) ran once
    assert all("score" in json.loads(line) for line in lines)

    for png in ("accuracy_vs_fraction_384.png", "niah_heatmap.png"):
        assert (out / png).read_bytes()[:8] == PNG_MAGIC

    md = report.read_text()
    assert md.count(sweep.BEGIN) == 1
    for heading in ("Accuracy by method and budget", "ChunkKV chunk size", "layer-wise index reuse",
                    "Jaccard similarity", "Needle values", "NIAH heatmap"):
        assert heading in md
    assert "| chunkkv | 10% |" in md

    # --merge: redo only the heatmap, keep the sweep rows
    argv = ["sweep", "--lengths", "", "--heatmap-lengths", "256", "--heatmap-depths", "50", "--heatmap-samples", "1",
            "--heatmap-methods", "full", "--merge", "--out", str(out), "--report", str(report), "--threads", "1",
            "--no-progress"]
    try:
        assert main(argv) == 0
    finally:
        torch.set_num_threads(threads)
    merged = json.loads((out / "results.json").read_text())
    assert merged["rows"] == rows
    assert merged["heatmap"] == [{"method": "full", "spec": "full", "length": 256, "depth": 50.0, "n": 1, "accuracy": 100.0}]
    assert len((out / "records.jsonl").read_text().strip().splitlines()) == len(lines)


def test_bad_flags_are_one_line_errors(capsys):
    assert main(["sweep", "--tasks", "nope", "--no-progress"]) == 2
    assert "unknown nope" in capsys.readouterr().err
    assert main(["sweep", "--reuse-depths", "0", "--no-progress"]) == 2
    assert main(["sweep", "--window", "wide", "--no-progress"]) == 2


def test_help_and_question_agnostic_mode(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sweep", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: chunkkv sweep") and "examples:" in out and "--question-agnostic" in out
    if not (_common.testbed_path() / "config.json").exists():
        pytest.skip("testbed model not shipped")
    threads = torch.get_num_threads()
    try:
        assert main(["sweep", "--tasks", "niah_single", "--samples", "1", "--lengths", "256", "--methods", "full,chunkkv",
                     "--fractions", "0.5", "--tokens", "", "--chunk-sizes", "", "--reuse-depths", "",
                     "--heatmap-lengths", "", "--question-agnostic", "--window", "8", "--out", str(tmp_path),
                     "--report", "", "--threads", "1", "--no-progress"]) == 0
    finally:
        torch.set_num_threads(threads)
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["question_agnostic"] is True
    assert {r["method"]: r["tasks"]["niah_single"] for r in results["rows"]}["full"] == 100.0
    assert all(json.loads(line)["window"] in (8,) for line in (tmp_path / "records.jsonl").read_text().splitlines())


def test_defaults_write_into_the_study_wherever_the_command_starts(tmp_path, monkeypatch):
    """``--out`` / ``--report`` default to studies/sweep/results and its README, resolved against the
    repository root, not the current folder; ``python -m studies.sweep`` takes the same flags."""
    import argparse

    from studies.sweep import cli as sweep_cli

    monkeypatch.chdir(tmp_path)
    parser = argparse.ArgumentParser()
    sweep_cli.add_arguments(parser)
    args = parser.parse_args([])
    assert args.out == str(ROOT / "studies" / "sweep" / "results")
    assert args.report == str(ROOT / "studies" / "sweep" / "README.md")
    assert (ROOT / "studies" / "sweep" / "results" / "results.json").exists()  # the shipped tables' data
    assert sweep.BEGIN in (ROOT / "studies" / "sweep" / "README.md").read_text()
    assert sweep_cli.main(["--tasks", "nope", "--no-progress"]) == 2


def test_the_command_finds_the_study_from_another_folder_and_explains_a_wheel(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the checkout: the study is found next to the source tree
    assert _cli.studies_root() == ROOT
    assert main(["sweep", "--tasks", "nope", "--no-progress"]) == 2
    assert "unknown nope" in capsys.readouterr().err
    # an installed wheel run outside a checkout: no studies/ anywhere -> one line, exit 2
    monkeypatch.setattr(_cli, "studies_root", lambda: None)
    assert main(["sweep", "--lengths", "256"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "study that runs from a source checkout" in err[0]
