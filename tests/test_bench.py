"""The efficiency benchmark runs end to end on a tiny model and its numbers mean what they say.

Nothing here is a timed test: speeds are only checked for being positive and consistent; the
benchmark's own targets are reported by ``chunkkv bench``, not asserted.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import chunkkv
from chunkkv.bench import BenchConfig, MemoryMeter, expected_kv_bytes, kv_bytes_per_layer, random_llama, run_bench
from chunkkv.bench.measure import Stats
from chunkkv.bench.peers import find_kvpress_python, merge_rounds
from chunkkv.bench.report import PLOTS, write_outputs
from chunkkv.bench.runner import Bench, _fit_loglog
from chunkkv.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
CONTEXTS = [96, 160]


def _tiny():
    return random_llama("random-tiny", device=torch.get_default_device())


def _config(**over) -> BenchConfig:
    base = dict(
        contexts=CONTEXTS, batch_sizes=[1, 2], repeats=1, decode_steps=2, decode_warmup=1, e2e=[(160, 4)],
        scaling_contexts=[96, 192, 384], scaling_repeats=1, peers=False, threads=1,
    )
    base.update(over)
    return BenchConfig(**base)


PROGRESS: list = []  # the bench's progress bar(s) of the module run: total and steps taken


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory):
    from chunkkv.bench import runner

    class Recorded(runner._Progress):
        def __init__(self, total, enabled):
            super().__init__(total, enabled)
            PROGRESS.append(self)

    out = tmp_path_factory.mktemp("bench")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "_Progress", Recorded)
        result = run_bench(_tiny(), _config(), progress=False, model_label="random-tiny")
    paths = write_outputs(result, out)
    return result, paths


def test_progress_counter_ends_at_its_total(bench_run):
    assert [(p.steps, p.total) for p in PROGRESS] == [(PROGRESS[0].total, PROGRESS[0].total)]


def test_report_has_no_raw_lists_and_judges_only_targets_it_ran(bench_run):
    import re

    from chunkkv.bench.report import to_markdown

    result, _ = bench_run
    text = to_markdown(result)
    assert not re.search(r"\[[0-9.]+(, [0-9.]+)*\]", text), "a Python list leaked into the report"
    assert "log-log slope None" not in text
    share = next(t for t in result["targets"] if t["name"].startswith("compression step share"))
    assert share["met"] is None and "8192, not in this run" in share["note"]  # contexts 96, 160: not judged


def test_default_end_to_end_request_fits_the_contexts():
    from chunkkv.bench.cli import default_e2e

    assert default_e2e([1024], gpu=False) == (1024, 64)
    assert default_e2e([2048, 4096, 8192], gpu=False) == (4096, 64)
    assert default_e2e([2048, 32768], gpu=True) == (8192, 1024)


def test_plot_legends_list_only_drawn_lines(bench_run, tmp_path, monkeypatch):
    """With one context a dotted bound line is a single point: it gets a marker, so what the legend
    names is on the plot."""
    import copy

    import matplotlib.axes

    from chunkkv.bench.report import write_plots

    result = copy.deepcopy(bench_run[0])
    result["decode"] = [r for r in result["decode"] if r["context"] == CONTEXTS[0]]
    result["prefill"] = [r for r in result["prefill"] if r["context"] == CONTEXTS[0]]
    unseen = []
    original = matplotlib.axes.Axes.legend

    def legend(self, *args, **kwargs):
        for handle, label in zip(*self.get_legend_handles_labels()):
            xs = getattr(handle, "get_xdata", lambda: [0, 1])()
            if len(xs) < 2 and getattr(handle, "get_marker", lambda: "o")() in (None, "None", "", " "):
                unseen.append(label)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "legend", legend)
    write_plots(result, tmp_path)
    assert unseen == []


def test_outputs_are_well_formed(bench_run):
    _, paths = bench_run
    data = json.loads(paths["json"].read_text())
    assert set(data) >= {"meta", "prefill", "reuse", "decode", "e2e", "scaling", "peers", "targets"}
    assert data["meta"]["model_info"]["num_layers"] == 2
    assert data["meta"]["memory_method"] != "unavailable"
    configs = {r["config"] for r in data["prefill"]}
    assert configs >= {"full", "streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv",
                       "chunkkv_reuse2", "chunkkv_reuse3", "chunkkv_reuse4"}
    for r in data["prefill"]:
        assert r["prefill_s"]["median"] > 0 and r["prefill_s"]["min"] <= r["prefill_s"]["median"] <= r["prefill_s"]["max"]
        assert r["decode"]["ms_per_token"]["median"] > 0
        if r["config"] != "full":
            assert r["compress_ms"]["median"] > 0
            assert 0 < r["compress_share_of_prefill"] < 1
    assert sorted({(r["context"], r["reuse_depth"]) for r in data["reuse"]}) == [
        (c, d) for c in CONTEXTS for d in (1, 2, 3, 4)
    ]
    # ChunkKV with reuse: one layer of two scores
    assert {r["reuse_depth"]: r["scored_layers"] for r in data["reuse"] if r["context"] == 160} == {1: 2, 2: 1, 3: 1, 4: 1}
    # decode sweep: every context x batch x (full + fractions)
    keys = {(r["context"], r["batch"], r["config"]) for r in data["decode"]}
    for c in CONTEXTS:
        for b in (1, 2):
            assert {(c, b, n) for n in ("full", "chunkkv@0.5", "chunkkv@0.25", "chunkkv@0.1")} <= keys
    for r in data["decode"]:
        assert r["tokens_per_s"] == pytest.approx(r["batch"] * 1e3 / r["ms_per_token"]["median"], rel=1e-3)
    assert [r["config"] for r in data["e2e"]] == ["full", "snapkv", "chunkkv", "chunkkv_reuse2"]
    assert all(r["latency_s"]["median"] > 0 for r in data["e2e"])
    fit = data["scaling"]["methods"]["chunkkv"]
    assert [p["context"] for p in fit["points"]] == [96, 192, 384]
    assert fit["time_fit"]["loglog_slope"] is not None
    assert data["peers"]["status"].startswith("skipped")
    assert {t["name"] for t in data["targets"]} >= {
        "compression step share of prefill (chunkkv, reuse 1)", "compression time, reuse depth 2 / depth 1"
    }
    md = paths["markdown"].read_text()
    for heading in ("## Targets", "## Prefill", "## ChunkKV layer-wise index reuse", "## Decode",
                    "## End to end", "## Scaling", "## Peers", "## What compression at prefill saves"):
        assert heading in md
    assert "| context | config | prefill s |" in md
    for name in PLOTS:
        png = paths["json"].parent / name
        assert png.exists() and png.stat().st_size > 2000
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kv_bytes_are_the_tensor_sizes(bench_run):
    result, _ = bench_run
    info = result["meta"]["model_info"]
    layers, heads, dim, size = info["num_layers"], info["num_kv_heads"], info["head_dim"], info["element_size"]
    for r in result["prefill"]:
        n = r["context"]
        kept = n if r["config"] == "full" else r["stored_per_layer"][0]
        if r["config"] in ("full", "chunkkv", "snapkv", "h2o", "streamingllm") or r["config"].startswith("chunkkv_reuse"):
            assert r["stored_per_layer"] == [kept] * layers
            if r["config"] != "full":
                assert kept == int(0.1 * n)  # exact budget
        # per layer: batch x heads x stored x head_dim x 2 (K, V) x bytes
        assert r["kv_bytes_per_layer"] == [heads * s * dim * 2 * size for s in r["stored_per_layer"]]
        assert r["kv_bytes"] == sum(r["kv_bytes_per_layer"]) == r["kv_bytes_arithmetic"]
    for r in result["decode"]:
        assert r["kv_bytes"] == sum(r["batch"] * heads * s * dim * 2 * size for s in r["stored_per_layer"])


def test_kv_bytes_match_cache_tensors_directly():
    model = _tiny()
    ids = torch.randint(0, 512, (2, 200), generator=torch.Generator().manual_seed(3), device="cpu").to(torch.get_default_device())
    for method in (chunkkv.FullKV(), chunkkv.ChunkKV(keep_fraction=0.25), chunkkv.PyramidKV(keep_fraction=0.25)):
        cache = chunkkv.compress(model, ids, method=method).cache
        per_layer = kv_bytes_per_layer(cache)
        assert per_layer == [
            layer.keys.numel() * layer.keys.element_size() + layer.values.numel() * layer.values.element_size()
            for layer in cache.layers
        ]
        assert sum(per_layer) == cache.nbytes()
        assert per_layer == [expected_kv_bytes(2, 2, s, 16, 4) for s in cache.stored_lengths()]


def test_bound_cache_has_exactly_the_kept_length(bench_run):
    result, _ = bench_run
    bounded = [r for r in result["decode"] if "bound" in r]
    bounded += [r["decode"] | {"stored_per_layer": r["stored_per_layer"]} for r in result["prefill"] if "bound" in r.get("decode", {})]
    assert len(bounded) >= 2 * 2 * 3
    for r in bounded:
        kept = max(r["stored_per_layer"])
        assert r["bound"]["stored_per_layer"] == [kept] * len(r["stored_per_layer"])
        assert r["bound"]["ms_per_token"]["median"] > 0
        assert r["vs_bound"] == pytest.approx(r["ms_per_token"]["median"] / r["bound"]["ms_per_token"]["median"], rel=1e-3)
    # and directly: an uncompressed cache whose stored and logical lengths are both the kept length
    bench = Bench(_tiny(), _config(), progress=False)
    ctx = bench._bound(37, 2)
    assert ctx.cache.stored_lengths() == [37, 37]
    assert ctx.cache.get_seq_length() == 37
    assert ctx.input_ids.shape == (2, 37)
    assert all(layer.kept_index is None for layer in ctx.cache.layers)


def test_memory_meter_sees_an_allocation():
    meter = MemoryMeter(torch.device("cpu"))
    if not meter.available:
        pytest.skip("no /proc/self/status here")
    base = meter.current()
    meter.reset_peak()
    x = torch.ones(64 * 1024 * 1024 // 4, device="cpu")
    x += 1
    del x
    assert meter.peak() - base >= 60 * 1024 * 1024


def test_stats_and_fit():
    s = Stats.of([4.0, 1.0, 3.0, 2.0])
    assert (s.median, s.min, s.max, s.q1, s.q3, s.n) == (2.5, 1.0, 4.0, 1.75, 3.25, 4)
    assert s.samples == [4.0, 1.0, 3.0, 2.0]  # in run order
    xs = [1024, 2048, 4096, 8192]
    assert _fit_loglog(xs, [3 * x for x in xs])["loglog_slope"] == pytest.approx(1.0)
    assert _fit_loglog(xs, [x * x for x in xs])["loglog_slope"] == pytest.approx(2.0)
    assert _fit_loglog(xs, [5 + 2 * x for x in xs])["linear_r2"] == pytest.approx(1.0)


def test_peer_rounds_merge_to_medians_of_their_own_ratios():
    def row(ours, theirs, decode=None):
        r = {"context": 128, "ours": "chunkkv", "theirs": "ChunkKVPress", "kept_ours": 12,
             "compress_ms_ours": ours, "compress_ms_theirs": theirs, "compress_ratio": ours / theirs}
        return r if decode is None else {**r, "decode_ratio": decode}

    one = [row(1.0, 4.0, 1.1)]
    assert merge_rounds([one]) is one  # a single round is reported as it ran
    merged = merge_rounds([[row(1.0, 4.0, 1.1)], [row(3.0, 4.0)], [row(2.0, 10.0, 0.9)]])
    assert len(merged) == 1
    m = merged[0]
    assert m["rounds"] == 3 and m["kept_ours"] == 12
    assert m["compress_ratio_rounds"] == [0.25, 0.75, 0.2]
    assert m["compress_ratio"] == 0.25  # the median of the rounds' ratios, not ratio of medians (2 / 4 = 0.5)
    assert (m["compress_ms_ours"], m["compress_ms_theirs"]) == (2.0, 4.0)
    assert m["decode_ratio_rounds"] == [1.1, 0.9] and m["decode_ratio"] == 1.0  # only the rounds that decoded


def test_peer_rounds_must_be_a_positive_int():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="peer rounds must be an int >= 1"):
            _config(peer_rounds=bad).validate()


def test_missing_kvpress_environment_is_reported_and_the_run_goes_on(tmp_path):
    cfg = _config(contexts=[96], batch_sizes=[1], methods=["chunkkv"], reuse_depths=[1], decode_fractions=[0.5],
                  e2e=[], peers=True, kvpress_python=str(tmp_path / "no-such-python"))
    result = run_bench(_tiny(), cfg, progress=False)
    assert result["peers"]["status"] == "missing"
    assert "no-such-python" in result["peers"]["reason"]
    peer_target = next(t for t in result["targets"] if "kvpress" in t["name"])
    assert peer_target["met"] is None
    assert result["decode"]


def test_cli_writes_outputs(tmp_path, capsys):
    out = tmp_path / "cli"
    code = cli_main([
        "bench", "--model", "random-tiny", "--device", str(torch.get_default_device()), "--contexts", "96",
        "--batch-sizes", "1", "--methods", "chunkkv", "--reuse-depths", "1,2", "--repeats", "1",
        "--decode-steps", "1", "--decode-fractions", "0.5", "--e2e", "none", "--no-peers", "--no-progress",
        "--threads", "1", "--scaling-contexts", "96,128,256", "--out", str(out),
    ])
    assert code == 0
    assert "# chunkkv efficiency benchmark" in capsys.readouterr().out
    data = json.loads((out / "results.json").read_text())
    assert data["meta"]["threads"] == 1 and data["meta"]["model"] == "random-tiny"
    assert (out / "report.md").exists() and (out / "reuse_overhead.png").stat().st_size > 0


def test_cli_rejects_bad_lists(capsys):
    with pytest.raises(SystemExit):
        cli_main(["bench", "--contexts", "2k,lots"])
    assert "comma-separated integers" in capsys.readouterr().err


def test_peers_side_by_side_with_kvpress(tmp_path):
    python = find_kvpress_python()
    if python is None or torch.get_default_device().type != "cpu":
        if os.environ.get("CHUNKKV_REQUIRE_KVPRESS") == "1" and torch.get_default_device().type == "cpu":
            pytest.fail("kvpress environment missing; run tools/kvpress_env.sh")
        pytest.skip("kvpress environment not built (tools/kvpress_env.sh) or not on CPU")
    from chunkkv.bench import runner

    taken = []  # the progress bar: total and steps taken (the second round's timings are counted)

    class Recorded(runner._Progress):
        def __init__(self, total, enabled):
            super().__init__(total, enabled)
            taken.append(self)

    cfg = _config(contexts=[128], batch_sizes=[1], methods=["snapkv", "chunkkv"], reuse_depths=[1, 2],
                  decode_fractions=[0.1], e2e=[], peers=True, peer_rounds=2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "_Progress", Recorded)
        result = run_bench(_tiny(), cfg, progress=False)
    assert [(p.steps, p.total) for p in taken] == [(taken[0].total, taken[0].total)]
    peers = result["peers"]
    assert peers["status"] == "ok", peers
    assert peers["kvpress_version"] == "0.5.5" and peers["rounds"] == 2
    rows = {r["ours"]: r for r in peers["comparison"]}
    assert set(rows) == {"chunkkv", "chunkkv_reuse2", "chunkkv-kvpress", "snapkv", "snapkv-kvpress", "full"}
    for name in ("chunkkv", "chunkkv-kvpress", "snapkv"):
        r = rows[name]
        assert r["rounds"] == 2
        assert r["compress_ms_ours"] > 0 and r["compress_ms_theirs"] > 0
        # each round's ratio is that round's own times (ours timed again before kvpress's second process)
        for ours, theirs, ratio in zip(r["compress_ms_ours_rounds"], r["compress_ms_theirs_rounds"],
                                       r["compress_ratio_rounds"]):
            assert ratio == pytest.approx(ours / theirs, rel=1e-3)
        assert r["decode_ms_ours"] > 0 and r["decode_ms_theirs"] > 0
    assert len(rows["full"]["decode_ratio_rounds"]) == 2
    report = write_outputs(result, tmp_path)["markdown"].read_text()
    assert "2 rounds, alternated" in report
    lo, hi = min(rows["full"]["decode_ratio_rounds"]), max(rows["full"]["decode_ratio_rounds"])
    assert f"({lo:.3f}–{hi:.3f})" in report
    # same budget on the same input: kvpress keeps whole 20-token chunks, chunkkv the exact count
    assert rows["chunkkv-kvpress"]["kept_theirs"] == 20 and rows["chunkkv"]["kept_ours"] == 12
    case = next(c for c in peers["cases"] if c["press"] == "chunkkv")
    assert case["decode"]["cache_len_per_layer"] == case["kept_len_per_layer"]
    assert case["decode_no_press"]["cache_len_per_layer"] == [128, 128]


def test_prefill_memory_rows_bound_and_resume(tmp_path):
    from chunkkv.bench.prefill_memory import chunked_bound, report, run_prefill_memory

    model = random_llama("random-tiny")
    rows = run_prefill_memory(model, [256, 512], [32, 64], 48, tmp_path, quadratic_limit=256, log=lambda _: None)
    got = {(r["context"], r["mode"], r["chunk"]) for r in rows}
    assert got == {(256, "full", None), (256, "one-shot", None), (256, "chunked", 32), (256, "chunked", 64),
                   (512, "chunked", 32), (512, "chunked", 64)}  # full and one-shot stop at quadratic_limit
    for r in rows:  # the cache ends at the budget (full keeps everything); K/V are 2 layers x 2 heads x 16 x fp32
        kept = r["context"] if r["mode"] == "full" else 48
        assert r["kv_mib"] == round(2 * 2 * 2 * kept * 16 * 4 / 2**20, 1)
    bound = chunked_bound(model.config, 48, 64)
    assert bound["kv"] == 2 * 2 * 2 * (48 + 64) * 16 * 4 and bound["total"] > bound["kv"]
    again = run_prefill_memory(model, [256, 512], [32, 64], 48, tmp_path, quadratic_limit=256, log=lambda _: None)
    assert len(again) == len(rows)  # resumed: nothing measured twice
    assert "chunked C=64" in report(rows) and "x)" in report(rows)


def test_every_timing_comes_before_the_memory_meter(monkeypatch):
    """Timing and memory are measured apart: the meter (which fixes glibc's mmap threshold on CPU)
    is made once, after the last timed region, and every memory figure is still filled in."""
    from chunkkv.bench import runner

    events: list[str] = []

    class Meter(runner.MemoryMeter):
        def __init__(self, device):
            events.append("meter")
            super().__init__(device)

    real_now, real_compress = runner.now, runner.Bench._compress

    def now(device):
        events.append("timed")
        return real_now(device)

    def compress(self, ids, method, measure=False):
        events.append("timed" if measure else "untimed")
        return real_compress(self, ids, method, measure)

    monkeypatch.setattr(runner, "MemoryMeter", Meter)
    monkeypatch.setattr(runner, "now", now)
    monkeypatch.setattr(runner.Bench, "_compress", compress)
    result = run_bench(_tiny(), _config(contexts=[96], batch_sizes=[1, 2], e2e=[(96, 3)]), progress=False)
    assert events.count("meter") == 1
    first_meter = events.index("meter")
    assert "timed" in events[:first_meter] and "timed" not in events[first_meter:]
    meta = result["meta"]
    assert meta["timing_allocator"].startswith("glibc")  # what the timings ran under, in words
    assert "not measured" not in meta["memory_method"]
    for r in result["prefill"]:
        assert r["prefill_peak_bytes_above_weights"] >= 0 and "decode_bytes" in r["decode"]
        if r["config"] != "full":
            assert "prefill_peak_vs_full" in r
    for r in result["decode"]:
        assert r["decode_bytes"] == r["kv_bytes"] + r["decode_peak_extra_bytes"]
    for m in result["scaling"]["methods"].values():
        assert m["memory_fit"] and all("peak_extra_bytes" in p for p in m["points"])


def test_allocator_state_names_the_setting_timings_run_under():
    import subprocess
    import sys

    code = ("import torch; from chunkkv.bench.measure import MemoryMeter, allocator_state\n"
            "print(allocator_state()); m = MemoryMeter(torch.device('cpu')); print(m.fixed_mmap); print(allocator_state())")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    before, fixed, after = out.stdout.strip().splitlines()[-3:]
    assert before == "glibc default (dynamic mmap threshold)"
    if fixed == "True":  # glibc
        assert "fixed at 128 KiB by an earlier memory measurement" in after


def test_timings_only_run_makes_no_meter_and_still_reports(monkeypatch, tmp_path):
    from chunkkv.bench import runner
    from chunkkv.bench.report import to_markdown

    def refuse(device):
        raise AssertionError("no memory meter in a timings-only run")

    monkeypatch.setattr(runner, "MemoryMeter", refuse)
    result = run_bench(_tiny(), _config(contexts=[96], batch_sizes=[1], e2e=[], memory=False), progress=False)
    assert result["meta"]["memory_method"].startswith("not measured")
    assert all("prefill_peak_bytes_above_weights" not in r for r in result["prefill"])
    assert "## Scaling" in to_markdown(result)
    write_outputs(result, tmp_path)


def test_contexts_past_the_models_positions_are_refused_before_anything_runs():
    """A context that decoding would take past the model's positions (SmolLM2: 8192 tokens) is refused
    at once, naming the flags, instead of minutes in at that context's first decode step."""
    from chunkkv.errors import PromptError

    model = random_llama("random-tiny", max_positions=98)
    for over, named in (({"contexts": [96]}, "--contexts 96 plus 3 decode steps"),
                        ({"contexts": [90], "e2e": [(90, 10)]}, "--e2e 90:10")):
        cfg = _config(**{"e2e": [], **over})
        sections = []
        with pytest.raises(PromptError, match="at most 98 positions") as err:
            run_bench(model, cfg, progress=False, on_section=sections.append)
        assert not sections and named in str(err.value)
