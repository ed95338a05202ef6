"""``chunkkv sweep``: the quality sweep on the synthetic suite, one command.

What it runs (every number is a flag):

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

Each sample is generated once, tokenized once and prefilled once (:mod:`chunkkv.multi`: every
configuration's cache is built from that one capture, equal to its own ``compress``); each
(sample, method, budget) is compressed once (configurations shared by several sweeps, e.g. ChunkKV
chunk 10 / reuse 1 / 10 %, run once) and
decoded greedily with ``max_new_tokens`` = the gold completion's length + 2 (the shipped testbed
never emits EOS). Query-aware by default: the question ends the prompt and the observation window
is the question (``--window question``: the question's token count, per sample).

Outputs (written incrementally, so an interrupted run leaves usable partial results):
``<out>/results.json`` (configuration, aggregated rows, heatmap, runtime), ``<out>/records.jsonl``
(one line per sample and configuration), PNG plots, and the markdown tables, written into
``--report`` between ``<!-- sweep:begin -->`` and ``<!-- sweep:end -->`` (the rest of the file is
kept).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

from .errors import ChunkKVError

__all__ = ["Spec", "SweepConfig", "add_arguments", "run", "run_sweep", "render_markdown"]

ALL_METHODS = ["full", "streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv"]
BEGIN, END = "<!-- sweep:begin -->", "<!-- sweep:end -->"

EPILOG = """\
examples:
  chunkkv sweep                                   # the full sweep at 1k tokens on the testbed model
  chunkkv sweep --lengths 1024,2048 --samples 10  # two lengths, 10 samples per task and length
  chunkkv sweep --tasks niah_single,vt --methods full,snapkv,chunkkv --fractions 0.1 --tokens ''
  chunkkv sweep --window 16                       # a fixed observation window instead of the question
  chunkkv sweep --question-agnostic               # compress the context before the question is known
  chunkkv sweep --heatmap-lengths '' --out runs/q # no NIAH heatmap, results elsewhere

Outputs: <out>/results.json, <out>/records.jsonl, <out>/*.png and the tables in --report.
"""


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
        from .methods import make_method

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


def budget_label(fraction: float | None, tokens: int | None) -> str:
    if fraction is not None:
        return f"{100 * fraction:g}%"
    if tokens is not None:
        return f"{tokens} tok"
    return "full"


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
    from .cli_common import tokenize_prompt

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
    """One prefill of the sample that serves every spec (:mod:`chunkkv.multi`)."""
    from .capture import capture_prefill

    return capture_prefill(model, prep.ids, window=window_for(cfg, prep),
                           accumulated=any(s.method == "h2o" for s in specs))


def run_one(model, tokenizer, prep: Prepared, spec: Spec, cfg: SweepConfig, capture=None) -> dict[str, Any]:
    """Compress once (from ``capture`` when given: equal to ``compress``, without the prefill),
    decode once; the record of one (sample, spec)."""
    from .analysis import adjacent_mean, context_kept_masks, jaccard_matrix, mean_head_jaccard, union_over_heads
    from .pipeline import compress
    from .generation import Sampling, continue_from
    from .synthetic import score_sample

    window = window_for(cfg, prep)
    method = spec.build(window)
    t0 = time.perf_counter()
    if capture is not None:
        from .pipeline import compress_from_capture

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


# --- aggregation and outputs --------------------------------------------------------------------
def _mean(xs: Sequence[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


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
            per_task[task] = 100 * _mean([r["score"] for r in recs])
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
            "average": round(_mean(list(per_task.values())), 2) if len(per_task) == len(tasks) else None,
            "jaccard_union": _round(_mean(ju)), "jaccard_head": _round(_mean(jh)),
            "kept_fraction": _round(_mean(kept)),
            "prompt_tokens": _round(_mean(prompt), 1),
            "value_pos_kept": [_round(_mean([v[j] for v in vpos if j < len(v)])) for j in range(width)],
            "value_whole": _round(_mean(vwhole)), "value_whole_one_head": _round(_mean(vhead)),
            "value_next_kept": _round(_mean(vnext)),
            "seconds_per_sample": _round(_mean(secs)),
        })
    return rows


def _round(x: float | None, nd: int = 4) -> float | None:
    return None if x is None else round(x, nd)


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def _pct01(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def render_markdown(results: dict[str, Any]) -> str:
    """The tables of ``results.json`` as markdown."""
    cfg = results["config"]
    tasks = cfg["tasks"]
    lines = [
        f"Model `{results['model']}` ({results['num_layers']} layers); "
        f"{'question-agnostic' if cfg['question_agnostic'] else 'query-aware (the question ends the prompt)'}; "
        f"window = {'the question (its token count)' if cfg['window'] == 'question' else cfg['window'] + ' tokens'}; "
        f"greedy, max_new_tokens = gold completion + {cfg['extra_new_tokens']}; seed {cfg['seed']}; "
        f"{cfg['haystack']} haystack. Scores are percent (RULER string_match_all).",
        "",
    ]
    short = {"niah_single": "single", "niah_multikey": "multikey", "niah_multivalue": "multivalue",
             "niah_multiquery": "multiquery", "vt": "vt"}
    head = "| " + " | ".join(short.get(t, t) for t in tasks) + " | avg |"
    sep = "|---" * len(tasks) + "|---|"

    def cells(row):
        return " | ".join(_pct(row["tasks"].get(t)) for t in tasks) + f" | {_pct(row['average'])} |"

    for length in sorted({r["length"] for r in results["rows"]}):
        rows = [r for r in results["rows"] if r["length"] == length]
        n = max((max(r["counts"].values()) for r in rows), default=0)
        real = [r["prompt_tokens"] for r in rows if r.get("prompt_tokens") is not None]
        if real and abs(_mean(real) - length) > max(2.0, 0.05 * length):  # the prompts are not that long
            heading = f"### {length} tokens asked, prompts of {_mean(real):.0f} tokens on average ({n} samples per task)"
        else:
            heading = f"### {length} tokens ({n} samples per task)"
        lines += [heading, ""]
        budget = [r for r in rows if r["group"] == "budget"]
        if budget:
            lines += ["**Accuracy by method and budget** (kept fraction, or kept tokens per layer; the window is inside the budget)", "",
                      "| method | budget " + head + " Jaccard L↔L+1 (union / per-head) |", "|---|---" + sep + "---|"]
            for r in budget:
                lines.append(f"| {r['method']} | {r['label']} | " + cells(r)
                             + f" {_pct01(r['jaccard_union'])} / {_pct01(r['jaccard_head'])} |")
            lines.append("")
        chunk = [r for r in rows if r["group"] == "chunk"]
        if chunk:
            lines += [f"**ChunkKV chunk size** ({budget_label(cfg['sweep_fraction'], None)} kept)", "",
                      "| chunk size " + head, "|---" + sep]
            for r in chunk:
                lines.append(f"| {r['params'].get('chunk_size')} | " + cells(r))
            lines.append("")
        reuse = [r for r in rows if r["group"] == "reuse"]
        if reuse:
            lines += [f"**ChunkKV layer-wise index reuse** ({budget_label(cfg['sweep_fraction'], None)} kept, chunk {cfg['chunk_size']}; "
                      f"a depth ≥ {results['num_layers']} shares one kept set across all layers)", "",
                      "| reuse depth " + head + " Jaccard L↔L+1 |", "|---" + sep + "---|"]
            for r in reuse:
                lines.append(f"| {r['label']} | " + cells(r) + f" {_pct01(r['jaccard_union'])} |")
            lines.append("")
        jac = [r for r in budget if r["method"] != "full"]
        labels = list(dict.fromkeys(r["label"] for r in jac))
        if jac:
            lines += ["**Jaccard similarity of kept indices, adjacent layers** (percent, mean over samples; union over KV heads / mean of per-head Jaccard)", "",
                      "| method | " + " | ".join(labels) + " |", "|---" + "|---" * len(labels) + "|"]
            for m in dict.fromkeys(r["method"] for r in jac):
                by = {r["label"]: r for r in jac if r["method"] == m}
                lines.append(f"| {m} | " + " | ".join(
                    f"{_pct01(by[l]['jaccard_union'])} / {_pct01(by[l]['jaccard_head'])}" if l in by else "–" for l in labels) + " |")
            lines.append("")
        vrows = [r for r in budget if r["value_pos_kept"] and r["label"] == budget_label(cfg["sweep_fraction"], None) or
                 (r["method"] == "full" and r["value_pos_kept"])]
        if vrows:
            width = max(len(r["value_pos_kept"]) for r in vrows)
            lines += [f"**Needle values on the last layer at {budget_label(cfg['sweep_fraction'], None)}** (NIAH tasks; percent of "
                      "gold values whose i-th token was kept by some KV head; next = the token after the value, the needle's "
                      "'.'; whole = every value token kept by some head / by one head)", "",
                      "| method | " + " | ".join(f"token {j + 1}" for j in range(width)) + " | next | whole (union) | whole (one head) |",
                      "|---" + "|---" * (width + 3) + "|"]
            for r in vrows:
                lines.append(f"| {r['method']} | " + " | ".join(_pct01(v) for v in r["value_pos_kept"])
                             + f" | {_pct01(r.get('value_next_kept'))} | {_pct01(r['value_whole'])} | {_pct01(r['value_whole_one_head'])} |")
            lines.append("")
    hm = results.get("heatmap") or []
    if hm:
        lengths = sorted({c["length"] for c in hm})
        lines += [f"### NIAH heatmap (niah_single, {budget_label(cfg['heatmap_fraction'], None)} kept, "
                  f"{cfg['heatmap_samples']} samples per cell)", "",
                  "| method | depth % | " + " | ".join(str(L) for L in lengths) + " |", "|---|---" + "|---" * len(lengths) + "|"]
        for m in dict.fromkeys(c["method"] for c in hm):
            for d in sorted({c["depth"] for c in hm if c["method"] == m}):
                by = {c["length"]: c for c in hm if c["method"] == m and c["depth"] == d}
                lines.append(f"| {m} | {d:g} | " + " | ".join(_pct(by[L]["accuracy"]) if L in by else "–" for L in lengths) + " |")
        lines.append("")
    rt = results.get("runtime", {})
    if rt:
        lines += ["Runtime: " + ", ".join(f"{k} {v:.0f} s" for k, v in rt.items()) + "."]
    return "\n".join(lines).rstrip() + "\n"


def write_report(path: Path, markdown: str) -> None:
    """Put the generated tables between the markers of ``path`` (created if missing)."""
    block = f"{BEGIN}\n{markdown}{END}\n"
    if path.exists():
        text = path.read_text(encoding="utf-8")
        if BEGIN in text and END in text:
            head, rest = text.split(BEGIN, 1)
            tail = rest.split(END, 1)[1]
            path.write_text(head + block + tail.lstrip("\n"), encoding="utf-8")
            return
        path.write_text(text.rstrip("\n") + "\n\n" + block, encoding="utf-8")
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# Quality sweep on the synthetic suite\n\nGenerated by `chunkkv sweep`.\n\n" + block, encoding="utf-8")


def plot_accuracy(results: dict[str, Any], out: Path) -> list[Path]:
    """One PNG per length: accuracy vs kept fraction per method (average and every task)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    tasks = results["config"]["tasks"]
    for length in sorted({r["length"] for r in results["rows"]}):
        rows = [r for r in results["rows"] if r["length"] == length and r["group"] == "budget"]
        panels = ["average"] + tasks
        cols = 3
        rows_n = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.3 * rows_n), squeeze=False)
        full = next((r for r in rows if r["method"] == "full"), None)
        for ax, panel in zip(axes.flat, panels):
            for m in dict.fromkeys(r["method"] for r in rows):
                if m == "full":
                    continue
                pts = sorted((r["params"]["keep_fraction"], _panel_value(r, panel)) for r in rows
                             if r["method"] == m and "keep_fraction" in r["params"] and _panel_value(r, panel) is not None)
                if pts:
                    ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=m)
            if full is not None and _panel_value(full, panel) is not None:
                ax.axhline(_panel_value(full, panel), color="black", linestyle="--", linewidth=1, label="full")
            ax.set_xscale("log")
            ax.set_xlim(4, 120)
            ax.set_xticks([5, 10, 25, 50, 100])
            ax.set_xticklabels(["5", "10", "25", "50", "100"])
            ax.set_ylim(-3, 103)
            ax.set_title(panel)
            ax.set_xlabel("kept %")
            ax.set_ylabel("accuracy %")
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=len(labels), frameon=False)
        fig.suptitle(f"accuracy vs kept fraction, {length} tokens ({results['model_name']})")
        fig.tight_layout(rect=(0, 0.05, 1, 0.97))
        path = out / f"accuracy_vs_fraction_{length}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _panel_value(row, panel):
    return row["average"] if panel == "average" else row["tasks"].get(panel)


def plot_heatmap(results: dict[str, Any], out: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hm = results.get("heatmap") or []
    if not hm:
        return None
    methods = list(dict.fromkeys(c["method"] for c in hm))
    lengths = sorted({c["length"] for c in hm})
    depths = sorted({c["depth"] for c in hm})
    fig, axes = plt.subplots(1, len(methods), figsize=(3.2 * len(methods) + 1, 3.4), squeeze=False)
    im = None
    for ax, m in zip(axes[0], methods):
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for c in hm:
            if c["method"] == m:
                grid[depths.index(c["depth"])][lengths.index(c["length"])] = c["accuracy"]
        im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not math.isnan(grid[i][j]):
                    ax.text(j, i, f"{grid[i][j]:.0f}", ha="center", va="center", fontsize=8)
        ax.set_title(m)
        ax.set_xlabel("context length (tokens)")
        if ax is axes[0][0]:
            ax.set_ylabel("needle depth %")
    fig.colorbar(im, ax=axes[0].tolist(), label="accuracy %")
    frac = results["config"]["heatmap_fraction"]
    fig.suptitle(f"niah_single, {budget_label(frac, None)} kept ({results['model_name']})", y=1.03)
    path = out / "niah_heatmap.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


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
    from .outputs import OutputLock

    out = Path(out)
    with contextlib.ExitStack() as held:
        held.enter_context(OutputLock(out, what=f"--out {out}"))
        if report is not None:
            held.enter_context(_report_lock(Path(report)))
        return _run_sweep(model, tokenizer, cfg, out, report, model_name, progress, write_records, merge)


def _run_sweep(model, tokenizer, cfg: SweepConfig, out: Path, report: Path | None, model_name: str, progress: bool,
               write_records: bool, merge: bool) -> dict[str, Any]:
    import torch
    from tqdm import tqdm

    from .synthetic import generate_samples

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
                                               "n": len(scores[spec.key]), "accuracy": round(100 * _mean(scores[spec.key]), 2)})
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


# --- command line -------------------------------------------------------------------------------
def _list(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in str(text).split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from .cli_common import TESTBED, add_model_arguments, describe, set_help
    from .synthetic import TASKS

    describe(
        parser,
        "Quality sweep on the synthetic suite: methods x budgets x tasks, ChunkKV chunk sizes and reuse\n"
        "depths, Jaccard similarity of kept indices between adjacent layers, and a NIAH length x depth\n"
        "heatmap. Writes results.json, records.jsonl, PNG plots and markdown tables.",
        EPILOG,
    )
    add_model_arguments(parser, default=TESTBED)
    set_help(parser, "--model", "model folder or hub id (default: the shipped testbed, models/chunkkv-testbed)")
    g = parser.add_argument_group("sweep")
    g.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated tasks (default: all: {','.join(TASKS)})")
    g.add_argument("--methods", default=",".join(ALL_METHODS), help=f"methods of the budget grid (default {','.join(ALL_METHODS)})")
    g.add_argument("--lengths", default="1024", help="prompt lengths in tokens (default 1024)")
    g.add_argument("--samples", default="10",
                   help="samples per task and length: N, or per length LEN:N,LEN:N (default 10)")
    g.add_argument("--fractions", default="0.5,0.25,0.1,0.05", help="kept fractions (default 0.5,0.25,0.1,0.05)")
    g.add_argument("--tokens", default="64,128,256", help="absolute budgets, tokens kept per layer (default 64,128,256; '' for none)")
    g.add_argument("--chunk-sizes", default="3,5,10,20,30", help="ChunkKV chunk-size sweep ('' to skip; default 3,5,10,20,30)")
    g.add_argument("--reuse-depths", default="1,2,3,4,all", help="ChunkKV reuse-depth sweep ('' to skip; default 1,2,3,4,all)")
    g.add_argument("--sweep-fraction", type=float, default=0.1, help="kept fraction of the chunk-size and reuse sweeps (default 0.1)")
    g.add_argument("--chunk-size", type=int, default=10, help="ChunkKV chunk size elsewhere (default 10)")
    g.add_argument("--reuse-depth", default="1",
                   help="ChunkKV reuse depth elsewhere (default 1: on the 2-layer testbed any depth >= 2 makes the "
                        "positional layer 0 choose for layer 1)")
    g.add_argument("--window", default="question",
                   help="observation window: 'question' (default: the question's token count, per sample) or an int")
    g.add_argument("--question-agnostic", action="store_true",
                   help="compress the context alone, then feed the question (default: query-aware)")
    g.add_argument("--extra-new-tokens", type=int, default=2, help="max_new_tokens = gold completion length + this (default 2)")
    g.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    g.add_argument("--haystack", default="varied", choices=["varied", "repetitive"], help="haystack kind (default varied)")
    h = parser.add_argument_group("NIAH heatmap (niah_single)")
    h.add_argument("--heatmap-lengths", default="1024,2048,4096", help="lengths ('' to skip; default 1024,2048,4096)")
    h.add_argument("--heatmap-depths", default="0,25,50,75,100", help="depths in percent (default 0,25,50,75,100)")
    h.add_argument("--heatmap-samples", type=int, default=3, help="samples per cell (default 3)")
    h.add_argument("--heatmap-methods", default="full,snapkv,chunkkv", help="methods (default full,snapkv,chunkkv)")
    h.add_argument("--heatmap-fraction", type=float, default=0.1, help="kept fraction (default 0.1)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", default="docs/results/quality", help="output folder (default docs/results/quality)")
    o.add_argument("--report", default="docs/quality.md",
                   help="markdown file whose sweep block is (re)written (default docs/quality.md; '' for none)")
    o.add_argument("--no-records", action="store_true", help="do not write records.jsonl")
    o.add_argument("--merge", action="store_true",
                   help="keep an earlier run's results in --out (other lengths, its heatmap unless this run makes one); "
                        "e.g. --merge --lengths 4096 adds a length, --merge --lengths '' --heatmap-... redoes the heatmap")
    o.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    from .methods import METHODS
    from .synthetic import TASKS

    tasks = _list(args.tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ChunkKVError(f"--tasks: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(TASKS)}")
    methods = _list(args.methods)
    heat = _list(args.heatmap_methods)
    for m in methods + heat:
        if m not in METHODS:
            raise ChunkKVError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    try:
        fractions = _list(args.fractions, float)
        tokens = _list(args.tokens, int)
        lengths = _list(args.lengths, int)
        chunk_sizes = _list(args.chunk_sizes, int)
        heat_lengths = _list(args.heatmap_lengths, int)
        heat_depths = _list(args.heatmap_depths, float)
        reuse_depth = 10_000 if str(args.reuse_depth) == "all" else int(args.reuse_depth)
        if ":" in str(args.samples):
            samples: int | dict[int, int] = {int(a): int(b) for a, b in (x.split(":") for x in _list(args.samples))}
        else:
            samples = int(args.samples)
    except ValueError as exc:
        raise ChunkKVError(f"bad number in a list flag: {exc}") from None
    reuse = _list(args.reuse_depths)
    for d in reuse:
        if d != "all" and (not d.isdigit() or int(d) < 1):
            raise ChunkKVError(f"--reuse-depths: {d!r} must be an int >= 1 or 'all'")
    if any(not 0 < f <= 1 for f in fractions + [args.sweep_fraction, args.heatmap_fraction]):
        raise ChunkKVError("kept fractions must be in (0, 1]")
    counts = list(samples.values()) if isinstance(samples, dict) else [samples]
    if any(L <= 0 for L in lengths) or min(counts) < 1:
        raise ChunkKVError("--lengths needs positive lengths and --samples must be >= 1")
    if not lengths and not (heat_lengths and heat_depths):
        raise ChunkKVError("nothing to run: give --lengths or a heatmap (--heatmap-lengths, --heatmap-depths)")
    for flag, values, low in (("--heatmap-lengths", heat_lengths, 1), ("--tokens", tokens, 1), ("--chunk-sizes", chunk_sizes, 1),
                              ("--chunk-size", [args.chunk_size], 1), ("--heatmap-samples", [args.heatmap_samples], 0),
                              ("--extra-new-tokens", [args.extra_new_tokens], 0)):
        bad = [v for v in values if v < low]
        if bad:
            raise ChunkKVError(f"{flag} {bad[0]} must be >= {low}")
    if any(not 0 <= d <= 100 for d in heat_depths):
        raise ChunkKVError("--heatmap-depths are percents in 0..100")
    if reuse_depth < 1:
        raise ChunkKVError(f"--reuse-depth {reuse_depth} must be >= 1 or 'all'")
    if args.window != "question":
        try:
            if int(args.window) < 1:
                raise ValueError
        except ValueError:
            raise ChunkKVError(f"--window {args.window!r} must be 'question' or an int >= 1") from None
    return SweepConfig(
        tasks=tasks, methods=methods, lengths=lengths, samples=samples, fractions=fractions, tokens=tokens,
        chunk_sizes=chunk_sizes, reuse_depths=reuse, sweep_fraction=args.sweep_fraction, chunk_size=args.chunk_size,
        reuse_depth=reuse_depth, window=str(args.window), question_agnostic=args.question_agnostic,
        extra_new_tokens=args.extra_new_tokens, seed=args.seed, haystack=args.haystack,
        heatmap_lengths=heat_lengths, heatmap_depths=heat_depths, heatmap_samples=args.heatmap_samples,
        heatmap_methods=heat, heatmap_fraction=args.heatmap_fraction,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from .cli_common import check_device, load, resolve_model
    from .outputs import OutputLock, check_output_dir, check_output_file

    # Everything that can be checked without the model is checked before it loads.
    cfg = config_from_args(args)
    if args.threads is not None and args.threads < 1:
        raise ChunkKVError(f"--threads {args.threads} must be >= 1 (torch CPU threads)")
    check_device(args.device)
    out = check_output_dir(args.out)
    report = check_output_file(args.report, "--report") if args.report else None
    with contextlib.ExitStack() as held:  # a second sweep writing the same folder or report is refused here
        held.enter_context(OutputLock(out, what=f"--out {out}"))
        if report is not None:
            held.enter_context(_report_lock(report))
        torch.set_num_threads(args.threads)
        resolve_model(args)
        model, tokenizer = load(args)
        t0 = time.perf_counter()
        name = args.model
        try:
            name = str(Path(args.model).resolve().relative_to(Path.cwd()))
        except (ValueError, OSError):
            pass
        results = run_sweep(model, tokenizer, cfg, out, report, model_name=name,
                            progress=not args.no_progress, write_records=not args.no_records, merge=args.merge)
    print(render_markdown(results))
    print(f"results: {out / 'results.json'}" + (f"; tables: {report}" if report else "")
          + f"; {time.perf_counter() - t0:.0f} s")
    return 0


def _report_lock(report: Path):
    from .outputs import OutputLock

    return OutputLock(report.parent, name=f".{report.name}.chunkkv-lock", what=f"--report {report}")
