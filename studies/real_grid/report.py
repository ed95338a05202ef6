"""Tables and plots of the real-model grid (:mod:`studies.real_grid.grid`) for its README.

``python -m studies.real_grid report`` (defaults: ``--out studies/real_grid/results --report
studies/real_grid/README.md``) reads ``records.jsonl`` (and ``speedup.jsonl``), writes ``trails.json``
and the PNGs next to them, and rewrites the block between ``<!-- real:begin -->`` and
``<!-- real:end -->`` of the report (``--chunked``: the chunked-prefill grid's block,
``<!-- chunked:begin -->`` ... ``<!-- chunked:end -->``).
Every accuracy is given with its n and a 95 % Wilson interval.
"""

from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable

from chunkkv.evaluation.metrics import wilson_interval as wilson
from chunkkv.evaluation.store import read_jsonl

from .. import ROOT, shown

STUDY = Path(__file__).resolve().parent

BEGIN, END = "<!-- real:begin -->", "<!-- real:end -->"
METHODS = ["full", "streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv"]
PAPER_JACCARD = {"chunkkv": 57.7, "snapkv": 28.0}  # paper Table 2, Llama-3-8B, adjacent layers
THRESHOLD = 0.85


def cell(scores: list[float]) -> str:
    """``"62.5 (n=8, 30.6–86.3)"``: accuracy in percent with n and the Wilson interval."""
    n = len(scores)
    if n == 0:
        return "–"
    k = sum(scores)
    lo, hi = wilson(k, n)
    return f"{100 * k / n:.1f} (n={n}, {100 * lo:.0f}–{100 * hi:.0f})"


def load(path: Path) -> list[dict[str, Any]]:
    """The records, last one wins per (task, length, index, spec)."""
    out = {(r["task"], r["length"], r["index"], r["spec"]): r for r in read_jsonl(path, key="spec")}
    return list(out.values())


def _nominal(length: int) -> int:
    return min((512, 1024, 2048, 4096, 8192), key=lambda x: abs(x - length))


def _mean(xs: Iterable[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _fmt(x: float | None, scale: float = 100.0, nd: int = 1) -> str:
    return "–" if x is None else f"{scale * x:.{nd}f}"


def summarise(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything the tables need, keyed by name."""
    for r in records:
        r["L"] = _nominal(r["length"])
    by = defaultdict(list)
    for r in records:
        by[(r["spec"], r["task"], r["L"])].append(r)
    tasks = sorted({r["task"] for r in records})
    lengths = sorted({r["L"] for r in records})
    full = {(t, L): [r["score"] for r in by[("full", t, L)]] for t in tasks for L in lengths}
    ok_tasks = [t for t in tasks if all(_mean(full[(t, L)]) is None or _mean(full[(t, L)]) >= THRESHOLD for L in lengths)
                and any(full[(t, L)] for L in lengths)]
    return {"by": by, "tasks": tasks, "lengths": lengths, "full": full, "ok_tasks": ok_tasks}


def pooled(s: dict, spec: str, lengths: list[int] | None = None, tasks: list[str] | None = None,
           field: str = "score") -> list[float]:
    tasks = s["ok_tasks"] if tasks is None else tasks
    lengths = s["lengths"] if lengths is None else lengths
    return [r[field] for t in tasks for L in lengths for r in s["by"][(spec, t, L)] if r.get(field) is not None]


def spec_key(method: str, fraction: float | None = None, tokens: int | None = None, **extra) -> str:
    if method == "full":
        return "full"
    parts = [method]
    if fraction is not None:
        parts.append(f"f{fraction:g}")
    if tokens is not None:
        parts.append(f"t{tokens:g}")
    if method == "chunkkv":
        parts += [f"c{extra.get('chunk', 10):g}", f"r{extra.get('reuse', 1):g}"]
    return "/".join(parts) + "".join(f"/{x}" for x in extra.get("suffix", []))


def markdown(s: dict, speed: list[dict[str, Any]], model: str,
             records: str = "studies/real_grid/results/records.jsonl") -> str:
    """The grid's tables; ``records`` names the raw records file in the text."""
    lines: list[str] = []
    L_all = s["lengths"]
    ok = s["ok_tasks"]
    add = lines.append
    add(f"Model **{model}** (fp32, CPU, sdpa), Paul Graham essays as the haystack, chat template with an answer "
        "prefix, greedy decoding, query-aware (the question ends the compressed prompt), observation window 32 "
        "tokens for every method. Accuracy = every required answer string in the generated text; intervals are "
        f"95 % Wilson. Raw records: `{records}` (one line per sample and configuration).")
    add("")
    add("### Full-cache accuracy per task and length (calibration)")
    add("")
    add("| task | " + " | ".join(f"{L} tok" for L in L_all) + " | mean prompt tokens | in averages |")
    add("|---|" + "---|" * (len(L_all) + 2))
    for t in s["tasks"]:
        cells = [cell(s["full"][(t, L)]) for L in L_all]
        toks = " / ".join(_fmt(_mean(r["prompt_tokens"] for r in s["by"][("full", t, L)]), 1, 0) for L in L_all)
        add(f"| {t} | " + " | ".join(cells) + f" | {toks} | {'yes' if t in ok else 'no (< 85 %)'} |")
    add("")
    add(f"Tasks in the averages below (full cache ≥ 85 % at every length run): {', '.join(ok) or 'none'}.")
    add("")
    add("### Headline: KV 128 and 10 % kept, every method (pooled over those tasks)")
    add("")
    add("| method | budget | " + " | ".join(f"{L} tok" for L in L_all) + " | all lengths | ROUGE-1 (needle tasks) |")
    add("|---|---|" + "---|" * (len(L_all) + 2))
    for m in METHODS:
        for label, key in (("KV 128", spec_key(m, tokens=128)), ("10 %", spec_key(m, fraction=0.1))):
            if m == "full":
                if label != "10 %":
                    continue
                label, key = "all", "full"
            cells = [cell(pooled(s, key, [L])) for L in L_all]
            rouge = _mean(pooled(s, key, field="rouge1"))
            add(f"| {m} | {label} | " + " | ".join(cells) + f" | {cell(pooled(s, key))} | {_fmt(rouge, 1, 3)} |")
    for m in ("streamingllm", "snapkv", "pyramidkv", "chunkkv"):
        key = spec_key(m, fraction=0.1, suffix=["qa"])
        cells = [cell(pooled(s, key, [L])) for L in L_all]
        rouge = _mean(pooled(s, key, field="rouge1"))
        add(f"| {m} | 10 %, question-agnostic | " + " | ".join(cells) + f" | {cell(pooled(s, key))} | {_fmt(rouge, 1, 3)} |")
    add("")
    add("Question-agnostic = the context (everything before the question) is compressed with its own last 32 "
        "tokens as the window, then the question and answer prefix are fed; today's scoring, no probe. H2O is "
        "not in that row (its all-query scores of the context alone were not captured).")
    add("")
    L0 = L_all[0]
    add(f"### Every budget at {L0} tokens (pooled over the tasks above)")
    add("")
    budgets = [("5 %", dict(fraction=0.05)), ("10 %", dict(fraction=0.1)), ("20 %", dict(fraction=0.2)),
               ("30 %", dict(fraction=0.3)), ("KV 64", dict(tokens=64)), ("KV 128", dict(tokens=128)),
               ("KV 256", dict(tokens=256)), ("KV 512", dict(tokens=512))]
    add("| method | " + " | ".join(b for b, _ in budgets) + " |")
    add("|---|" + "---|" * len(budgets))
    add("| full | " + " | ".join(cell(pooled(s, "full", [L0])) if i == 0 else "" for i in range(len(budgets))) + " |")
    for m in METHODS[1:]:
        add(f"| {m} | " + " | ".join(cell(pooled(s, spec_key(m, **b), [L0])) for _, b in budgets) + " |")
    add("")
    add(f"### ChunkKV chunk size at 10 % ({L0} tokens; time = scoring + selection + gather of all 30 layers, CPU, "
        "one thread shared with other jobs)")
    add("")
    add("| chunk size | accuracy | ROUGE-1 | answer tokens kept (mean over layers) | select time (ms) | adjacent Jaccard |")
    add("|---|---|---|---|---|---|")
    for c in (1, 3, 5, 10, 20, 30):
        key = spec_key("chunkkv", fraction=0.1, chunk=c, suffix=["timed"])
        add(f"| {c} | {cell(pooled(s, key, [L0]))} | {_fmt(_mean(pooled(s, key, [L0], field='rouge1')), 1, 3)} | "
            f"{_fmt(_mean(pooled(s, key, [L0], field='answer_kept_mean')))} % | "
            f"{_fmt(_mean(pooled(s, key, [L0], field='select_seconds')), 1000, 0)} | "
            f"{_fmt(_mean(pooled(s, key, [L0], field='jaccard_union')))} % |")
    add("")
    add(f"### ChunkKV layer-wise index reuse at 10 % ({L0} tokens)")
    add("")
    add("| reuse depth | accuracy | ROUGE-1 | select time (ms) | adjacent Jaccard |")
    add("|---|---|---|---|---|")
    for d in (1, 2, 3, 5, 10, 30):
        key = spec_key("chunkkv", fraction=0.1, reuse=d, suffix=["timed"])
        if d == 1:
            key = spec_key("chunkkv", fraction=0.1, chunk=10, suffix=["timed"])
        add(f"| {d} | {cell(pooled(s, key, [L0]))} | {_fmt(_mean(pooled(s, key, [L0], field='rouge1')), 1, 3)} | "
            f"{_fmt(_mean(pooled(s, key, [L0], field='select_seconds')), 1000, 0)} | "
            f"{_fmt(_mean(pooled(s, key, [L0], field='jaccard_union')))} % |")
    add("")
    add("### Adjacent-layer Jaccard of kept indices at 10 % (all tasks and lengths)")
    add("")
    add("| method | union over KV heads | per KV head (mean) | paper Table 2 (Llama-3-8B) |")
    add("|---|---|---|---|")
    for m in METHODS[1:]:
        key = spec_key(m, fraction=0.1)
        ju = _mean(pooled(s, key, tasks=s["tasks"], field="jaccard_union"))
        jh = _mean(pooled(s, key, tasks=s["tasks"], field="jaccard_head"))
        paper = PAPER_JACCARD.get(m)
        add(f"| {m} | {_fmt(ju)} % | {_fmt(jh)} % | {'–' if paper is None else f'{paper} %'} |")
    add("")
    add("### Boundary-aware chunks vs fixed chunks (ChunkKV, chunk 10, no reuse; all lengths)")
    add("")
    add("| budget | chunks | accuracy | ROUGE-1 | needle tokens kept | answer kept whole (share of layers) |")
    add("|---|---|---|---|---|---|")
    for f in (0.05, 0.1):
        for label, suffix in (("fixed", []), ("sentence/clause edges", ["bnd"])):
            key = spec_key("chunkkv", fraction=f, suffix=suffix)
            add(f"| {100 * f:g} % | {label} | {cell(pooled(s, key))} | {_fmt(_mean(pooled(s, key, field='rouge1')), 1, 3)} | "
                f"{_fmt(_mean(pooled(s, key, field='needle_kept_mean')))} % | "
                f"{_fmt(_mean(pooled(s, key, field='answer_whole_layers')))} % |")
    add("")
    if speed:
        add("### One prefill for every method: speed-up measured in one run")
        add("")
        add("| sample | configurations | separate `compress` + decode each (s) | one capture + build + one batched decode (s) | speed-up | same answers |")
        add("|---|---|---|---|---|---|")
        for row in speed:
            add(f"| {row['task']}, {row['length']} tok | {row['configs']} | {row['separate_seconds']} | "
                f"{row['one_prefill_seconds']} | {row['speedup']}× | {row['same_answers']}/{row['configs']} |")
        add("")
    return "\n".join(lines)


BUDGETS = [("5 %", dict(fraction=0.05)), ("10 %", dict(fraction=0.1)), ("20 %", dict(fraction=0.2)),
           ("30 %", dict(fraction=0.3)), ("KV 64", dict(tokens=64)), ("KV 128", dict(tokens=128)),
           ("KV 256", dict(tokens=256)), ("KV 512", dict(tokens=512))]


def trails(s: dict) -> list[dict[str, Any]]:
    """Samples (of the tasks in the averages) where ChunkKV failed and another method succeeded at
    the same budget, with the share of layers that kept the answer tokens (union over KV heads)."""
    out = []
    for label, kw in BUDGETS:
        a = spec_key("chunkkv", **kw)
        for other in ("snapkv", "pyramidkv", "h2o", "streamingllm"):
            b = spec_key(other, **kw)
            for t in s["ok_tasks"]:
                for L in s["lengths"]:
                    mine = {r["index"]: r for r in s["by"][(a, t, L)]}
                    theirs = {r["index"]: r for r in s["by"][(b, t, L)]}
                    for i in sorted(set(mine) & set(theirs)):
                        if mine[i]["score"] < theirs[i]["score"]:
                            out.append({"budget": label, "other": other, "task": t, "length": L, "index": i,
                                        "depth": mine[i].get("depth"), "chunkkv": mine[i]["prediction"].strip()[:50],
                                        "theirs": theirs[i]["prediction"].strip()[:50],
                                        "chunkkv_answer_layers": mine[i].get("answer_whole_layers"),
                                        "their_answer_layers": theirs[i].get("answer_whole_layers")})
    return out


def trails_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["### Where ChunkKV trails: every sample it failed and another method answered (same budget)", "",
             "| budget | task, length, sample (depth) | ChunkKV answered | other method answered | answer kept whole in … of the 30 layers (ChunkKV / other) |",
             "|---|---|---|---|---|"]
    for r in rows:
        depth = "" if r["depth"] is None else f" ({100 * r['depth']:.0f} %)"
        lines.append(f"| {r['budget']} | {r['task']}, {r['length']}, #{r['index']}{depth} | {r['chunkkv']!r} | "
                     f"{r['other']}: {r['theirs']!r} | {_fmt(r['chunkkv_answer_layers'])} % / {_fmt(r['their_answer_layers'])} % |")
    if not rows:
        lines.append("| – | none | | | |")
    return "\n".join(lines) + "\n"


def plots(s: dict, out: Path) -> list[str]:
    """accuracy_vs_budget.png, niah_heatmap.png, jaccard_heatmap.png; returns the names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    L0 = s["lengths"][0]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (name, values, kw) in zip(axes, (("kept fraction (%)", [5, 10, 20, 30], "fraction"),
                                             ("kept tokens per layer", [64, 128, 256, 512], "tokens"))):
        full = pooled(s, "full", [L0])
        if full:
            ax.axhline(100 * sum(full) / len(full), color="black", ls="--", label=f"full (n={len(full)})")
        for m in METHODS[1:]:
            ys, xs, errs = [], [], []
            for v in values:
                key = spec_key(m, **({"fraction": v / 100} if kw == "fraction" else {"tokens": v}))
                sc = pooled(s, key, [L0])
                if sc:
                    k, n = sum(sc), len(sc)
                    lo, hi = wilson(k, n)
                    xs.append(v)
                    ys.append(100 * k / n)
                    errs.append((100 * (k / n - lo), 100 * (hi - k / n)))
            if xs:
                ax.errorbar(xs, ys, yerr=list(zip(*errs)), marker="o", capsize=3, label=m, alpha=0.85)
        ax.set_xlabel(name)
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(-5, 105)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"SmolLM2-135M-Instruct, essays, {L0} tokens, tasks {', '.join(s['ok_tasks'])} (95 % Wilson bars)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "accuracy_vs_budget.png", dpi=110)
    plt.close(fig)
    written.append("accuracy_vs_budget.png")

    depths = [0.0, 0.25, 0.5, 0.75, 1.0]
    needle_tasks = [t for t in s["ok_tasks"] if t in ("niah_paper", "niah_nl", "multikey")]
    methods = [("full", "full")] + [(m, spec_key(m, fraction=0.1)) for m in METHODS[1:]]
    fig, axes = plt.subplots(1, len(methods), figsize=(3 * len(methods), 2.8), sharey=True)
    for ax, (m, key) in zip(axes, methods):
        grid = [[None] * len(s["lengths"]) for _ in depths]
        counts = [[0] * len(s["lengths"]) for _ in depths]
        for j, L in enumerate(s["lengths"]):
            for i, d in enumerate(depths):
                sc = [r["score"] for t in needle_tasks for r in s["by"][(key, t, L)] if r.get("depth") == d]
                if sc:
                    grid[i][j] = 100 * sum(sc) / len(sc)
                    counts[i][j] = len(sc)
        import numpy as np

        arr = np.array([[np.nan if v is None else v for v in row] for row in grid])
        ax.imshow(arr, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
        for i in range(len(depths)):
            for j in range(len(s["lengths"])):
                if counts[i][j]:
                    ax.text(j, i, f"{arr[i, j]:.0f}\nn={counts[i][j]}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(s["lengths"])), [str(L) for L in s["lengths"]])
        ax.set_yticks(range(len(depths)), [f"{int(100 * d)} %" for d in depths])
        ax.set_title(m + ("" if m == "full" else " 10 %"), fontsize=9)
        ax.set_xlabel("prompt tokens")
    axes[0].set_ylabel("needle depth")
    fig.suptitle(f"NIAH accuracy by depth and length ({', '.join(needle_tasks)}; SmolLM2-135M, essays)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "niah_heatmap.png", dpi=110)
    plt.close(fig)
    written.append("niah_heatmap.png")

    mats = {}
    for m in ("chunkkv", "snapkv", "pyramidkv", "h2o"):
        rows = [r["jaccard_matrix"] for t in s["tasks"] for L in s["lengths"]
                for r in s["by"][(spec_key(m, fraction=0.1), t, L)] if r.get("jaccard_matrix")]
        if rows:
            import numpy as np

            mats[m] = (np.mean(np.array(rows), axis=0), len(rows))
    if mats:
        fig, axes = plt.subplots(1, len(mats), figsize=(4 * len(mats), 3.6))
        axes = axes if len(mats) > 1 else [axes]
        for ax, (m, (mat, n)) in zip(axes, mats.items()):
            im = ax.imshow(mat, vmin=0, vmax=1, cmap="viridis")
            ax.set_title(f"{m} 10 % (n={n})", fontsize=9)
            ax.set_xlabel("layer")
            ax.set_ylabel("layer")
        fig.colorbar(im, ax=axes, shrink=0.8, label="Jaccard of kept indices (union over KV heads)")
        fig.suptitle("Layer x layer similarity of kept indices, SmolLM2-135M (30 layers), essays", fontsize=9)
        fig.savefig(out / "jaccard_heatmap.png", dpi=110)
        plt.close(fig)
        written.append("jaccard_heatmap.png")
    return written


CHUNKED_BEGIN, CHUNKED_END = "<!-- chunked:begin -->", "<!-- chunked:end -->"


def paired_difference(pairs: list[tuple[float, float]]) -> str:
    """``"-3.3 pts (-9.9 to +3.3); lost 4, gained 2 (of 60)"`` for (reference, other) 0/1 pairs: the
    difference in accuracy, other minus reference, with a 95 % normal interval on the paired
    differences, and the discordant counts."""
    n = len(pairs)
    if not n:
        return "–"
    diffs = [b - a for a, b in pairs]
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / max(1, n - 1)
    half = 1.96 * (var / n) ** 0.5
    lost, gained = sum(a > b for a, b in pairs), sum(b > a for a, b in pairs)
    return (f"{100 * mean:+.1f} pts ({100 * (mean - half):+.1f} to {100 * (mean + half):+.1f}); "
            f"lost {lost}, gained {gained} (of {n})")


LOOKAHEAD_NAMES = {
    "la": "look-ahead, first version (each cut by its own pass's scores)",
    "lamax": "look-ahead, best score carried",
    "lamax/res1.5": "look-ahead, best score carried, reserve 1.5",
    "la/res1.5": "look-ahead, first version, reserve 1.5",
    "lamax/tail": "look-ahead, best score carried, the question's window a chunk of its own",
    "lamax/shared": "look-ahead, best score carried, one kept set for every layer (all layers' scores)",
    "lamax/ov": "look-ahead, best score carried, C/2 a step, the last step held uncut (the same peak)",
}


AGNOSTIC_NAMES = {
    "osp": "copy passes at one-shot's positions",
    "ppm": "each copy pass over its chunk's mean (the library's from 8bac4cf)",
    "ppm/hc": "the same, run as hybrid_chunked: the copy part at 0.3 (the library's since ce56a16)",
}


def _paired_cells(index: dict, spec: str, base: str, lengths: list[int]) -> list[str]:
    """Paired differences of ``spec`` against ``base`` on the same samples: per length, then pooled."""
    cells = []
    for Ls in [[L] for L in lengths] + [lengths]:
        pairs = [(index[(base, t, L_, i)]["score"], r["score"]) for (sp, t, L_, i), r in index.items()
                 if sp == spec and _nominal(L_) in Ls and (base, t, L_, i) in index]
        cells.append(paired_difference(pairs))
    return cells


def chunked_markdown(records: list[dict[str, Any]], model: str) -> str:
    """The quality cost of chunked prefill (``python -m studies.real_grid run --grid chunked``; issues 11
    and 24): per task group, budget and length, one-shot against chunked prefill of ``C`` tokens scored
    by each chunk's own last queries (issue 11) and by the prompt's last window fed early (the
    look-ahead, issue 24), and the question-agnostic default one-shot and chunked; Wilson intervals,
    paired differences against one-shot on the same samples, and the prefill time ratios."""
    for r in records:
        r["L"] = _nominal(r["length"])
    lengths = sorted({r["L"] for r in records})
    groups = {"NIAH (niah_paper + niah_nl)": ["niah_paper", "niah_nl"], "multikey": ["multikey"],
              "all tasks": ["niah_paper", "niah_nl", "multikey"]}
    specs = {r["spec"] for r in records}
    chunks = sorted({int(s.split("/p", 1)[1].split("/")[0]) for s in specs if "/p" in s and "/qa" not in s},
                    reverse=True)
    budgets = [("KV 128", "chunkkv/t128/c10/r1"), ("10 %", "chunkkv/f0.1/c10/r1")]
    agnostic = [(f"{int(100 * f)} %", f"chunkkv/f{f:g}/qa/sdefault") for f in (0.1, 0.2)
                if f"chunkkv/f{f:g}/qa/sdefault" in specs]
    rows = [("full cache", "", "full")]
    for label, spec in budgets:
        rows.append((label, "one-shot", spec))
        if f"{spec}/refed" in specs:
            rows.append((label, "one-shot, first answer token from the compressed cache", f"{spec}/refed"))
        for c in chunks:
            if f"{spec}/p{c}" in specs:
                rows.append((label, f"C = {c}, chunk's own queries", f"{spec}/p{c}"))
            for variant in sorted(x for x in specs if x.startswith(f"{spec}/p{c}/la")):
                rows.append((label, f"C = {c}, " + LOOKAHEAD_NAMES.get(variant.split(f"/p{c}/", 1)[1], variant), variant))
    for label, spec in agnostic:
        rows.append((label, "question-agnostic default, one-shot", spec))
        if f"{spec}-last" in specs:
            rows.append((label, "question-agnostic default, shallow pass scored at its last layer, one-shot",
                         f"{spec}-last"))
        for c in chunks:
            chunked = spec.replace("/qa/", f"/qa/p{c}/")
            if chunked in specs:
                rows.append((label, f"question-agnostic default, C = {c}", chunked))
            for variant in sorted(x for x in specs if x.startswith(f"{chunked}/")):
                rows.append((label, f"question-agnostic default, C = {c}, "
                             + AGNOSTIC_NAMES.get(variant.split(f"{chunked}/", 1)[1], variant), variant))
    by = defaultdict(list)
    for r in records:
        by[(r["spec"], r["task"], r["L"])].append(r)
    head = "| budget | prefill | " + " | ".join(f"{L} tok" for L in lengths) + " | all |"
    rule = "|---|---|" + "---|" * (len(lengths) + 1)
    lines = [f"Model **{model}**, Paul Graham essays, chat template, greedy; accuracy % (n, 95 % Wilson interval). "
             "Query-aware rows: the question ends the compressed prompt; question-agnostic rows: the context is "
             "compressed alone, then the question is fed. Every row runs on the same samples where it ran at all.", ""]
    for name, tasks in groups.items():
        lines += [f"**{name}**", "", head, rule]
        for label, mode, spec in rows:
            cells = [cell([r["score"] for t in tasks for r in by[(spec, t, L)]]) for L in lengths]
            cells.append(cell([r["score"] for t in tasks for L in lengths for r in by[(spec, t, L)]]))
            lines.append(f"| {label} | {mode} | " + " | ".join(cells) + " |")
        lines.append("")
    index = {(r["spec"], r["task"], r["length"], r["index"]): r for r in records}
    lines += ["**Paired against one-shot** (same samples, all tasks): chunked minus one-shot accuracy with a 95 % "
              "interval on the paired differences, and the samples one-shot answered and chunked lost / the reverse.",
              "", "| budget | prefill | " + " | ".join(f"{L} tok" for L in lengths) + " | all |", rule]
    references = {spec: spec for _l, spec in budgets} | {spec: spec for _l, spec in agnostic}
    for label, mode, spec in rows:
        base = next((ref for ref in references if spec != ref and spec.startswith(ref.split("/qa")[0]) and
                     ("/qa" in spec) == ("/qa" in ref)), None)
        if base is None or spec in references:
            continue
        lines.append(f"| {label} | {mode} | " + " | ".join(_paired_cells(index, spec, base, lengths)) + " |")
    refed = [(label, f"{spec}/refed") for label, spec in budgets if f"{spec}/refed" in specs]
    if refed:
        lines += ["", "**Paired against one-shot with its first answer token from the compressed cache** (the "
                  "prompt's last token fed after the compression, as a chunked prefill must: its last chunk "
                  "attends over the kept tokens only).", "",
                  "| budget | prefill | " + " | ".join(f"{L} tok" for L in lengths) + " | all |", rule]
        for label, base in refed:
            for lab, mode, spec in rows:
                if lab != label or "/p" not in spec or "/qa" in spec:
                    continue
                lines.append(f"| {label} | {mode} | " + " | ".join(_paired_cells(index, spec, base, lengths)) + " |")
    lines += ["", "**Prefill time** (mean over samples of the ratio, same sample and process, 1 thread): chunked over "
              "the one-shot capture prefill, and the look-ahead over the chunk's own queries at the same C.", "",
              "| budget | C | " + " | ".join(f"{L} tok: chunked / one-shot" for L in lengths) + " | "
              + " | ".join(f"{L} tok: look-ahead / own" for L in lengths) + " |",
              "|---|---|" + "---|" * (2 * len(lengths))]

    def ratio(num_spec: str, den: str | None, L: int) -> str:
        values = []
        for t in ("niah_paper", "niah_nl", "multikey"):
            for r in by[(num_spec, t, L)]:
                d = r.get("capture_seconds") if den is None else index.get((den, t, r["length"], r["index"]), {}).get(
                    "prefill_seconds")
                if r.get("prefill_seconds") and d:
                    values.append(r["prefill_seconds"] / d)
        return f"{sum(values) / len(values):.2f} (n={len(values)})" if values else "–"

    for label, spec in budgets:
        for c in chunks:
            own, ahead = f"{spec}/p{c}", f"{spec}/p{c}/lamax"
            lines.append(f"| {label} | {c} | " + " | ".join(ratio(own, None, L) for L in lengths) + " | "
                         + " | ".join(ratio(ahead, own, L) for L in lengths) + " |")
    return "\n".join(lines)


NUMBERS_BEGIN, NUMBERS_END = "<!-- numbers:begin -->", "<!-- numbers:end -->"


def numbers_markdown(records: list[dict[str, Any]], model: str) -> str:
    """Issue 24 item 6 (``run --grid numbers``): needles whose answer is a number, ChunkKV with and
    without whole numbers (``digit_ids``), paired on the same samples; a wrong answer whose digits
    are part of the full cache's right answer is counted as a cut number."""
    index = {(r["length"], r["index"]): {} for r in records}
    for r in records:
        index[(r["length"], r["index"])][r["spec"]] = r
    rows = [("full cache", "full", None),
            ("query-aware KV 128", "chunkkv/t128/c10/r1", None),
            ("query-aware KV 128, numbers whole", "chunkkv/t128/c10/r1/num", "chunkkv/t128/c10/r1"),
            ("question-agnostic default 20 %", "chunkkv/f0.2/qa/sdefault", None),
            ("question-agnostic default 20 %, numbers whole", "chunkkv/f0.2/qa/sdefault/num", "chunkkv/f0.2/qa/sdefault")]
    lengths = sorted({r["length"] for r in records})
    lines = [f"Model **{model}**, Paul Graham essays, `niah_number` (a needle whose answer is a 4–7 digit "
             f"number), prompts of {', '.join(map(str, lengths))} tokens; right = the number whole in the "
             "answer. Accuracy % (n, 95 % Wilson interval); paired against the same row without whole numbers.", "",
             "| configuration | accuracy | paired vs without | wrong answers that are part of the number |",
             "|---|---|---|---|"]
    for name, spec, base in rows:
        got = [d[spec] for d in index.values() if spec in d]
        if not got:
            continue
        paired = "–"
        if base is not None:
            paired = paired_difference([(d[base]["score"], d[spec]["score"]) for d in index.values()
                                        if spec in d and base in d])
        cut = 0
        for d in index.values():
            full, r = d.get("full"), d.get(spec)
            if r is None or full is None or full["score"] != 1.0 or r["score"] == 1.0:
                continue
            answer = "".join(ch for ch in full["prediction"] if ch.isdigit())
            digits = "".join(ch for ch in r["prediction"].split("\n")[0] if ch.isdigit())
            cut += bool(digits) and digits != answer and digits in answer
        wrong = sum(r["score"] != 1.0 for r in got)
        lines.append(f"| {name} | {cell([r['score'] for r in got])} | {paired} | {cut} of {wrong} |")
    return "\n".join(lines)


def write_block(report: Path, body: str, begin: str = BEGIN, end: str = END) -> None:
    text = report.read_text(encoding="utf-8") if report.exists() else ""
    block = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = block + "\n\n" + text
    report.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.real_grid report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(STUDY / "results"),
                        help=f"the grid's records folder (default {shown(STUDY / 'results')})")
    parser.add_argument("--report", default=str(STUDY / "README.md"),
                        help=f"markdown file whose generated block is rewritten (default {shown(STUDY / 'README.md')}; "
                             "'' for none)")
    parser.add_argument("--model", default="SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized)")
    parser.add_argument("--chunked", action="store_true",
                        help="the chunked-prefill grid (run --grid chunked): its block in --report")
    parser.add_argument("--numbers", action="store_true",
                        help="the whole-numbers grid (run --grid numbers): its block in --report")
    args = parser.parse_args(argv)
    out = Path(args.out)
    records = load(out / "records.jsonl")
    if not records:
        print(f"real_grid report: error: no records in {out / 'records.jsonl'}")
        return 2
    # the issue-specific grids: one table each, in its own block of --report
    for wanted, make, begin, end in ((args.numbers, numbers_markdown, NUMBERS_BEGIN, NUMBERS_END),
                                     (args.chunked, chunked_markdown, CHUNKED_BEGIN, CHUNKED_END)):
        if wanted:
            body = make(records, args.model)
            if args.report:
                write_block(Path(args.report), body, begin, end)
            print(body)
            return 0
    speed = [json.loads(x) for x in (out / "speedup.jsonl").read_text().splitlines()] if (out / "speedup.jsonl").exists() else []
    s = summarise(records)
    body = markdown(s, speed, args.model, records=shown(out / "records.jsonl"))
    trail = trails(s)
    (out / "trails.json").write_text(json.dumps(trail, indent=1) + "\n", encoding="utf-8")
    body += "\n" + trails_markdown(trail)
    written = plots(s, out)
    # figures linked relative to the report (or to the repository root when there is none)
    base = Path(args.report).resolve().parent if args.report else ROOT
    body += "\n" + "".join(f"\n![{w}]({Path(os.path.relpath(out.resolve() / w, base)).as_posix()})\n" for w in written)
    if args.report:
        write_block(Path(args.report), body)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
