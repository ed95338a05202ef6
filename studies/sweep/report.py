"""The sweep's tables and plots: markdown from ``results.json``, the report block, PNG figures.

:func:`render_markdown` turns the results of :func:`studies.sweep.engine.run_sweep` into the tables of
``studies/sweep/README.md``; :func:`write_report` puts them between ``<!-- sweep:begin -->`` and
``<!-- sweep:end -->`` of a markdown file (the text around them is kept); :func:`plot_accuracy` and
:func:`plot_heatmap` write the figures. Pure functions of the results dict (matplotlib for the plots).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

__all__ = ["BEGIN", "END", "budget_label", "plot_accuracy", "plot_heatmap", "render_markdown", "write_report"]

BEGIN, END = "<!-- sweep:begin -->", "<!-- sweep:end -->"


def budget_label(fraction: float | None, tokens: int | None) -> str:
    """A table label: ``"10%"`` for a kept fraction, ``"128 tok"`` for kept tokens, ``"full"`` for neither."""
    if fraction is not None:
        return f"{100 * fraction:g}%"
    if tokens is not None:
        return f"{tokens} tok"
    return "full"


def mean(xs: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None (None when there are none)."""
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


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
        if real and abs(mean(real) - length) > max(2.0, 0.05 * length):  # the prompts are not that long
            heading = f"### {length} tokens asked, prompts of {mean(real):.0f} tokens on average ({n} samples per task)"
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
    path.write_text("# Quality sweep on the synthetic suite\n\nGenerated by `chunkkv sweep` (`python -m studies.sweep`).\n\n" + block, encoding="utf-8")


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
