"""The sweep's engine: configurations, one sample, aggregation, and the loop that writes the outputs.

What it runs (every number is a flag of :mod:`studies.sweep.cli`):

* **budget grid**: every method (full, streamingllm, h2o, snapkv, pyramidkv, chunkkv) x kept
  fractions {50, 25, 10, 5 %} and absolute budgets {64, 128, 256 tokens} x every task of
  :mod:`chunkkv.synthetic` (niah_single, niah_multikey, niah_multivalue, niah_multiquery, vt);
* **chunk sizes**: ChunkKV at the sweep budget (10 %) with chunk sizes {3, 5, 10, 20, 30};
* **reuse depths**: ChunkKV at the sweep budget with layer-wise index reuse {1, 2, 3, 4, all};
  a depth at least the number of layers is "all layers" (one kept set per request);
* **Jaccard**: for every compressed run, the Jaccard similarity of the kept indices of adjacent
  layers (union over KV heads, and the mean over heads of the per-head Jaccard);
* **needle values**: which tokens of the needle values each method kept on the last layer (by
  position inside the value), to see token-level fragmentation;
* **NIAH heatmap**: ``niah_single`` at lengths x depths for full, SnapKV and ChunkKV at 10 %.

Each sample is generated once, tokenized once and prefilled once (:func:`chunkkv.capture.capture_prefill`:
every configuration's cache is built from that one capture by :func:`chunkkv.pipeline.compress_from_capture`,
equal to its own ``compress``); each (sample, method, budget) is compressed once (configurations
shared by several tables, e.g. ChunkKV chunk 10 / reuse 1 / 10 %, run once) and decoded greedily
with ``max_new_tokens`` = the gold completion's length + 2 (the shipped testbed never emits EOS).
Query-aware by default: the question ends the prompt and the observation window is the question
(``--window question``: the question's token count, per sample).

Outputs (written incrementally, so an interrupted run leaves usable partial results):
``<out>/results.json`` (configuration, aggregated rows, heatmap, runtime), ``<out>/records.jsonl``
(one line per sample and configuration), PNG plots, and the markdown tables, written into
``--report`` between ``<!-- sweep:begin -->`` and ``<!-- sweep:end -->`` (:mod:`studies.sweep.report`).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .report import budget_label, mean, plot_accuracy, plot_heatmap, render_markdown, write_report

__all__ = ["ALL_METHODS", "Entry", "Spec", "SweepConfig", "aggregate", "build_entries", "report_lock", "run_sweep"]

ALL_METHODS = ["full", "streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv"]


# --- configurations -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Spec:
    """One compression configuration, independent of the sample (the window is set per sample).

    ``reuse_depth`` is the effective depth (``min(depth, num_layers)``), so depths that behave the
    same share one run.
    """

    method: str
    keep_fraction: float | None = None
    keep_tokens: int | None = None
    chunk_size: int | None = None
    reuse_depth: int | None = None

    @property
    def key(self) -> str:
        parts = [self.method]
        if self.keep_fraction is not None:
            parts.append(f"f{self.keep_fraction:g}")
        if self.keep_tokens is not None:
            parts.append(f"t{self.keep_tokens}")
        if self.chunk_size is not None:
            parts.append(f"c{self.chunk_size}")
        if self.reuse_depth is not None:
            parts.append(f"r{self.reuse_depth}")
        return "/".join(parts)

    def build(self, window: int):
        from chunkkv.methods import make_method

        if self.method == "full":
            return make_method("full")
        params: dict[str, Any] = {"window": window}
        if self.keep_fraction is not None:
            params["keep_fraction"] = self.keep_fraction
        if self.keep_tokens is not None:
            params["keep_tokens"] = self.keep_tokens
        if self.chunk_size is not None:
            params["chunk_size"] = self.chunk_size
        if self.reuse_depth is not None:
            params["reuse_depth"] = self.reuse_depth
        return make_method(self.method, **params)


@dataclass
class Entry:
    """A row of a sweep table: ``group`` (budget / chunk / reuse), its label, and the spec it runs."""

    group: str
    method: str
    label: str
    spec: Spec


@dataclass
class SweepConfig:
    tasks: list[str]
    methods: list[str]
    lengths: list[int]
    samples: int | dict[int, int]
    fractions: list[float]
    tokens: list[int]
    chunk_sizes: list[int]
    reuse_depths: list[str]
    sweep_fraction: float
    chunk_size: int
    reuse_depth: int
    window: str
    question_agnostic: bool
    extra_new_tokens: int
    seed: int
    haystack: str
    heatmap_lengths: list[int]
    heatmap_depths: list[float]
    heatmap_samples: int
    heatmap_methods: list[str]
    heatmap_fraction: float


def build_entries(cfg: SweepConfig, num_layers: int) -> list[Entry]:
    """Every table row of one length, in display order."""
    entries: list[Entry] = []
    base_chunk = cfg.chunk_size
    base_reuse = min(cfg.reuse_depth, num_layers)
    for m in cfg.methods:
        if m == "full":
            entries.append(Entry("budget", m, "full", Spec("full")))
            continue
        extra: dict[str, Any] = {}
        if m == "chunkkv":
            extra = {"chunk_size": base_chunk, "reuse_depth": base_reuse}
        for f in cfg.fractions:
            entries.append(Entry("budget", m, budget_label(f, None), Spec(m, keep_fraction=f, **extra)))
        for t in cfg.tokens:
            entries.append(Entry("budget", m, budget_label(None, t), Spec(m, keep_tokens=t, **extra)))
    for c in cfg.chunk_sizes:
        entries.append(Entry("chunk", "chunkkv", f"chunk {c}",
                             Spec("chunkkv", keep_fraction=cfg.sweep_fraction, chunk_size=c, reuse_depth=base_reuse)))
    for d in cfg.reuse_depths:
        eff = num_layers if d == "all" else min(int(d), num_layers)
        label = f"depth {d}" + (" (= all layers)" if d != "all" and eff == num_layers and eff > 1 else "")
        entries.append(Entry("reuse", "chunkkv", label,
                             Spec("chunkkv", keep_fraction=cfg.sweep_fraction, chunk_size=base_chunk, reuse_depth=eff)))
    return entries


# --- one sample ---------------------------------------------------------------------------------
@dataclass
class Prepared:
    """A sample tokenized once: the ids to compress, the ids fed after, the gold and value spans."""

    sample: Any
    ids: Any  # [1, T]
    question_ids: Any  # [1, q] or None (query-aware)
    question_len: int
    max_new_tokens: int
    value_spans: list[list[int]]  # token indices of each gold value in the compressed prompt


def _value_spans(tokenizer, text: str, context: str, answers: Sequence[str], task: str) -> list[list[int]]:
    """Token positions (in ``text``'s tokenization) of each gold value inside the context."""
    if task == "vt":  # the answers are variable names, which occur on two lines each
        return []
    from chunkkv.cli_common import tokenize_prompt

    prompt = tokenize_prompt(tokenizer, text)
    spans = []
    for gold in answers:
        m = re.search(r"(?<!\S)" + re.escape(gold) + r"(?!\S)", context)
        if m is None:
            continue
        spans.append(prompt.tokens_in(m.start(), m.end()))
    return spans


def prepare(tokenizer, sample, cfg: SweepConfig, device) -> Prepared:
    q_text = " " + sample.question
    q_ids = tokenizer(q_text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    if cfg.question_agnostic:
        text = sample.context
        question_ids = q_ids.to(device)
    else:
        text = sample.prompt
        question_ids = None
    ids = tokenizer(text, return_tensors="pt")["input_ids"].to(device)
    gold_len = len(tokenizer(sample.meta["target"], add_special_tokens=False)["input_ids"])
    spans = _value_spans(tokenizer, text, sample.context, sample.answers, sample.task)
    return Prepared(sample, ids, question_ids, q_ids.shape[1], gold_len + cfg.extra_new_tokens, spans)


def window_for(cfg: SweepConfig, prep: Prepared) -> int:
    return prep.question_len if cfg.window == "question" else int(cfg.window)


def capture_for(model, prep: Prepared, cfg: SweepConfig, specs: Sequence[Spec]):
    """One prefill of the sample that serves every spec (:func:`chunkkv.capture.capture_prefill`)."""
    from chunkkv.capture import capture_prefill

    return capture_prefill(model, prep.ids, window=window_for(cfg, prep),
                           accumulated=any(s.method == "h2o" for s in specs))


def run_one(model, tokenizer, prep: Prepared, spec: Spec, cfg: SweepConfig, capture=None) -> dict[str, Any]:
    """Compress once (from ``capture`` when given: equal to ``compress``, without the prefill),
    decode once; the record of one (sample, spec)."""
    from chunkkv.analysis import adjacent_mean, context_kept_masks, jaccard_matrix, mean_head_jaccard, union_over_heads
    from chunkkv.generation import Sampling, continue_from
    from chunkkv.pipeline import compress, compress_from_capture
    from chunkkv.synthetic import score_sample

    window = window_for(cfg, prep)
    method = spec.build(window)
    t0 = time.perf_counter()
    if capture is not None:
        ctx = compress_from_capture(capture, method)
    else:
        ctx = compress(model, prep.ids, method=method)
    layers, masks = context_kept_masks(ctx)  # [L, H, T]
    sampling = Sampling(max_new_tokens=prep.max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    tokens = continue_from(model, ctx, prep.question_ids, sampling)[0].tolist()
    seconds = time.perf_counter() - t0
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    score = float(score_sample(text, prep.sample.answers))

    rec: dict[str, Any] = {
        "score": score, "prediction": text, "seconds": round(seconds, 4), "window": window,
        "prompt_tokens": int(prep.ids.shape[1]),
        "kept_fraction": round(float(masks.float().mean()), 4),
    }
    if len(layers) > 1:
        rec["jaccard_union"] = adjacent_mean(jaccard_matrix(union_over_heads(masks)))
        rec["jaccard_head"] = adjacent_mean(mean_head_jaccard(masks))
    if prep.value_spans:
        last = masks[-1]  # [H, T], the last compressed layer
        union = last.any(0)
        width = max(len(s) for s in prep.value_spans)
        by_pos = [[] for _ in range(width)]
        whole_union = whole_head = 0
        for span in prep.value_spans:
            for j, t in enumerate(span):
                by_pos[j].append(float(union[t]))
            whole_union += int(bool(union[span].all()))
            whole_head += int(bool(last[:, span].all(-1).any()))
        n = len(prep.value_spans)
        after = [span[-1] + 1 for span in prep.value_spans if span[-1] + 1 < union.shape[0]]
        rec["value_pos_kept"] = [sum(v) / len(v) for v in by_pos]
        # the token after the value (the needle's "."): the testbed copies it to end an item
        rec["value_next_kept"] = sum(float(union[t]) for t in after) / len(after) if after else None
        rec["value_whole"] = whole_union / n
        rec["value_whole_one_head"] = whole_head / n
    del ctx
    return rec


# --- aggregation -------------------------------------------------------------------------------
def aggregate(entries: list[Entry], records: dict[tuple, dict], length: int, tasks: list[str]) -> list[dict[str, Any]]:
    """Rows of one length: per entry, accuracy per task (percent), average, Jaccard, value stats."""
    rows = []
    for e in entries:
        per_task, counts = {}, {}
        ju, jh, secs, kept, prompt = [], [], [], [], []
        vpos: list[list[float]] = []
        vwhole, vhead, vnext = [], [], []
        for task in tasks:
            recs = [r for (L, t, _i, k), r in records.items() if L == length and t == task and k == e.spec.key]
            if not recs:
                continue
            per_task[task] = 100 * mean([r["score"] for r in recs])
            counts[task] = len(recs)
            for r in recs:
                ju.append(r.get("jaccard_union"))
                jh.append(r.get("jaccard_head"))
                secs.append(r["seconds"])
                kept.append(r["kept_fraction"])
                prompt.append(r.get("prompt_tokens"))
                if "value_pos_kept" in r:
                    vpos.append(r["value_pos_kept"])
                    vwhole.append(r["value_whole"])
                    vhead.append(r["value_whole_one_head"])
                    vnext.append(r.get("value_next_kept"))
        if not per_task:
            continue
        width = max((len(v) for v in vpos), default=0)
        rows.append({
            "length": length, "group": e.group, "method": e.method, "label": e.label, "spec": e.spec.key,
            "params": {k: v for k, v in asdict(e.spec).items() if v is not None},
            "tasks": {t: round(v, 2) for t, v in per_task.items()},
            "counts": counts,
            "average": round(mean(list(per_task.values())), 2) if len(per_task) == len(tasks) else None,
            "jaccard_union": _round(mean(ju)), "jaccard_head": _round(mean(jh)),
            "kept_fraction": _round(mean(kept)),
            "prompt_tokens": _round(mean(prompt), 1),
            "value_pos_kept": [_round(mean([v[j] for v in vpos if j < len(v)])) for j in range(width)],
            "value_whole": _round(mean(vwhole)), "value_whole_one_head": _round(mean(vhead)),
            "value_next_kept": _round(mean(vnext)),
            "seconds_per_sample": _round(mean(secs)),
        })
    return rows


def _round(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


# --- the sweep ----------------------------------------------------------------------------------
def run_sweep(model, tokenizer, cfg: SweepConfig, out: Path, report: Path | None = None,
              model_name: str = "model", progress: bool = True, write_records: bool = True,
              merge: bool = False) -> dict[str, Any]:
    """Run the whole sweep and write its outputs; returns the results dict (also in results.json).

    ``merge=True`` keeps what an earlier run left in ``out/results.json``: its rows of lengths this
    run does not sweep, its heatmap unless this run makes one, and its runtimes; records are
    appended to ``records.jsonl``. ``out`` (and ``report``) are held for the run: a second sweep
    writing them is refused (:class:`chunkkv.outputs.OutputBusyError`).
    """
    from chunkkv.outputs import OutputLock

    out = Path(out)
    with contextlib.ExitStack() as held:
        held.enter_context(OutputLock(out, what=f"--out {out}"))
        if report is not None:
            held.enter_context(report_lock(Path(report)))
        return _run_sweep(model, tokenizer, cfg, out, report, model_name, progress, write_records, merge)


def _run_sweep(model, tokenizer, cfg: SweepConfig, out: Path, report: Path | None, model_name: str, progress: bool,
               write_records: bool, merge: bool) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from chunkkv.synthetic import generate_samples

    out.mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    num_layers = model.config.get_text_config(decoder=True).num_hidden_layers
    entries = build_entries(cfg, num_layers)
    specs = list(dict.fromkeys(e.spec for e in entries))
    results: dict[str, Any] = {
        "model": model_name, "model_name": Path(model_name).name, "num_layers": num_layers,
        "config": asdict(cfg), "rows": [], "heatmap": [], "runtime": {},
        "notes": {"reuse": f"reuse depths >= {num_layers} are all 'all layers' on this {num_layers}-layer model"},
    }
    old_rows: list[dict[str, Any]] = []
    if merge and (out / "results.json").exists():
        old = json.loads((out / "results.json").read_text(encoding="utf-8"))
        old_rows = [r for r in old.get("rows", []) if r["length"] not in cfg.lengths]
        if not (cfg.heatmap_lengths and cfg.heatmap_depths and cfg.heatmap_samples > 0 and cfg.heatmap_methods):
            results["heatmap"] = old.get("heatmap", [])
            results["config"].update({k: old["config"][k] for k in
                                      ("heatmap_lengths", "heatmap_depths", "heatmap_samples", "heatmap_methods",
                                       "heatmap_fraction") if k in old.get("config", {})})
        results["runtime"] = {k: v for k, v in old.get("runtime", {}).items() if k != "total"}
        results["merged"] = True
    records: dict[tuple, dict] = {}
    rec_path = out / "records.jsonl"
    if write_records and not merge:
        rec_path.write_text("", encoding="utf-8")

    def flush() -> None:
        new = [row for L in cfg.lengths for row in aggregate(entries, records, L, cfg.tasks)]
        results["rows"] = sorted(old_rows + new, key=lambda r: r["length"])
        if merge:  # the lengths and sample counts of everything in the file, not just this run's
            results["config"]["lengths"] = sorted({r["length"] for r in results["rows"]})
            results["config"]["samples"] = {
                str(L): max(max(r["counts"].values()) for r in results["rows"] if r["length"] == L)
                for L in results["config"]["lengths"]}
        (out / "results.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
        if report is not None:
            write_report(report, render_markdown(results))

    torch.manual_seed(cfg.seed)
    started = time.perf_counter()
    for length in cfg.lengths:
        t_len = time.perf_counter()
        n_samples = cfg.samples.get(length, max(cfg.samples.values())) if isinstance(cfg.samples, dict) else cfg.samples
        total = len(cfg.tasks) * n_samples * len(specs)
        bar = tqdm(total=total, desc=f"sweep {length} tok", unit="run", disable=not progress, file=sys.stderr,
                   dynamic_ncols=True)
        for task in cfg.tasks:
            samples = generate_samples(task, n_samples, length, seed=cfg.seed, tokenizer=tokenizer, haystack=cfg.haystack)
            lines = []
            for i, s in enumerate(samples):
                prep = prepare(tokenizer, s, cfg, device)
                capture = capture_for(model, prep, cfg, specs)  # one prefill for every spec
                for spec in specs:
                    bar.set_postfix_str(f"{task} #{i} {spec.key}", refresh=False)
                    rec = run_one(model, tokenizer, prep, spec, cfg, capture)
                    records[(length, task, i, spec.key)] = rec
                    lines.append(json.dumps({"length": length, "task": task, "index": i, "spec": spec.key, **rec}))
                    bar.update(1)
            if write_records:
                with rec_path.open("a", encoding="utf-8") as f:
                    f.write("\n".join(lines) + "\n")
            results["runtime"][f"sweep {length}"] = time.perf_counter() - t_len
            flush()
        bar.close()
        try:
            plot_accuracy(results, out)
        except Exception as exc:  # plotting must never lose the results
            print(f"chunkkv sweep: plot failed: {exc}", file=sys.stderr)

    if cfg.heatmap_lengths and cfg.heatmap_depths and cfg.heatmap_samples > 0 and cfg.heatmap_methods:
        t_hm = time.perf_counter()
        hspecs = [Spec("full") if m == "full" else
                  Spec(m, keep_fraction=cfg.heatmap_fraction,
                       **({"chunk_size": cfg.chunk_size, "reuse_depth": min(cfg.reuse_depth, num_layers)} if m == "chunkkv" else {}))
                  for m in cfg.heatmap_methods]
        total = len(cfg.heatmap_lengths) * len(cfg.heatmap_depths) * cfg.heatmap_samples * len(hspecs)
        bar = tqdm(total=total, desc="niah heatmap", unit="run", disable=not progress, file=sys.stderr, dynamic_ncols=True)
        for length in cfg.heatmap_lengths:
            for depth in cfg.heatmap_depths:
                samples = generate_samples("niah_single", cfg.heatmap_samples, length, seed=cfg.seed, tokenizer=tokenizer,
                                           depth=depth, haystack=cfg.haystack)
                scores: dict[str, list[float]] = {s.key: [] for s in hspecs}
                for s in samples:
                    prep = prepare(tokenizer, s, cfg, device)
                    capture = capture_for(model, prep, cfg, hspecs)
                    for spec in hspecs:
                        scores[spec.key].append(run_one(model, tokenizer, prep, spec, cfg, capture)["score"])
                        bar.update(1)
                for m, spec in zip(cfg.heatmap_methods, hspecs):
                    results["heatmap"].append({"method": m, "spec": spec.key, "length": length, "depth": depth,
                                               "n": len(scores[spec.key]), "accuracy": round(100 * mean(scores[spec.key]), 2)})
                results["runtime"]["heatmap"] = time.perf_counter() - t_hm
                flush()
        bar.close()
        try:
            plot_heatmap(results, out)
        except Exception as exc:
            print(f"chunkkv sweep: heatmap plot failed: {exc}", file=sys.stderr)
    if merge:
        results["runtime"]["total"] = sum(v for k, v in results["runtime"].items() if k != "total")
    else:
        results["runtime"]["total"] = time.perf_counter() - started
    flush()
    try:
        plot_accuracy(results, out)
    except Exception as exc:
        print(f"chunkkv sweep: plot failed: {exc}", file=sys.stderr)
    return results


def report_lock(report: Path):
    """The lock a sweep holds on its ``--report`` file (beside it), so two sweeps never write one report."""
    from chunkkv.outputs import OutputLock

    return OutputLock(report.parent, name=f".{report.name}.chunkkv-lock", what=f"--report {report}")
