"""Outputs of the efficiency benchmark: targets, a markdown report, PNG plots, the JSON file."""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path
from typing import Any

from .measure import MiB

PLOTS = ("decode_ms_per_token.png", "reuse_overhead.png", "scaling.png", "memory.png")


# --- targets ------------------------------------------------------------------------------------
def _target(name: str, value, target: str, met: bool | None, note: str) -> dict[str, Any]:
    return {"name": name, "value": value, "target": target, "met": met, "note": note}


def evaluate_targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The issue's targets, measured on this run (``met`` None = not measured in this run)."""
    out = []
    prefill = result.get("prefill", [])
    contexts = sorted({r["context"] for r in prefill})
    # 1. compression step <= 3 % of prefill at 8k
    chunk = {r["context"]: r for r in prefill if r["config"] == "chunkkv"}
    if chunk:
        at = 8192 if 8192 in chunk else max(chunk)
        share = chunk[at]["compress_share_of_prefill"]
        out.append(_target(  # judged only where the aim is set: a run without 8k reports the value
            "compression step share of prefill (chunkkv, reuse 1)", share, "<= 0.03 at 8k",
            share <= 0.03 if at == 8192 else None,
            f"context {at}" + ("" if at == 8192 else " (the aim is at 8192, not in this run)"),
        ))
    # 2. reuse depth 2 roughly halves the scoring work
    reuse2 = [r for r in result.get("reuse", []) if r["reuse_depth"] == 2]
    if reuse2:
        r = max(reuse2, key=lambda x: x["context"])
        out.append(_target(
            "compression time, reuse depth 2 / depth 1", r["compress_vs_depth1"], "about 0.5 (<= 0.6)",
            r["compress_vs_depth1"] <= 0.6, f"context {r['context']}; scored layers {r['scored_layers']}",
        ))
    # 3. compressed decode within 10 % of the same-size bound
    bounded = [r for r in result.get("decode", []) if "vs_bound" in r and r.get("source") == "decode section"]
    bounded += [dict(r["decode"], config=r["config"], context=r["context"], batch=1)
                for r in prefill if "decode" in r and "vs_bound" in r["decode"]]
    if bounded:
        worst = max(bounded, key=lambda r: r["vs_bound"])
        med = statistics.median(r["vs_bound"] for r in bounded)
        out.append(_target(
            "compressed decode / same-size uncompressed decode (worst)", worst["vs_bound"], "<= 1.10",
            worst["vs_bound"] <= 1.10,
            f"worst: {worst['config']} at {worst['context']} batch {worst['batch']}; median over "
            f"{len(bounded)} runs {med:.3f}",
        ))
    # 4. compression step >= 3x faster than kvpress's ChunkKVPress
    peers = result.get("peers", {})
    if peers.get("status") == "ok":
        rows = [r for r in peers.get("comparison", []) if r["ours"] == "chunkkv" and r["theirs"] == "ChunkKVPress"]
        if rows:
            worst = min(rows, key=lambda r: r["compress_speedup"])
            preset = [r for r in peers["comparison"] if r["ours"] == "chunkkv-kvpress"]
            note = f"lowest at context {worst['context']}"
            if preset:
                note += "; same-semantics preset: " + ", ".join(
                    f"{r['compress_speedup']:.2f}x at {r['context']}" for r in preset)
            out.append(_target(
                "compression step speed-up over kvpress ChunkKVPress (lowest)", worst["compress_speedup"], ">= 3",
                worst["compress_speedup"] >= 3, note,
            ))
    else:
        out.append(_target("compression step speed-up over kvpress ChunkKVPress", None, ">= 3", None,
                           f"peers {peers.get('status', 'not run')}"))
    # 5. linear growth of the scoring in context length
    scaling = result.get("scaling", {}).get("methods", {}).get("chunkkv")
    if scaling and scaling["time_fit"]["loglog_slope"] is not None:
        ts = scaling["time_fit"]["loglog_slope"]
        ms = scaling.get("memory_fit", {}).get("loglog_slope")
        contexts_note = f"contexts {', '.join(str(p['context']) for p in scaling['points'])}"
        if "memory_fit" in scaling:
            worst_q = max(p["peak_extra_vs_quadratic"] for p in scaling["points"])
            met = ts is not None and ms is not None and ts <= 1.5 and ms <= 1.3
            note = f"peak extra memory is at most {worst_q:.2%} of one T x T fp32 matrix per query head; " + contexts_note
        else:
            met, note = None, "memory not measured in this run; " + contexts_note
        out.append(_target(
            "scoring growth in context length (log-log slope: time, memory)", [ts, ms],
            "time <= 1.5, memory <= 1.3 (1 = linear, 2 = quadratic)", met, note,
        ))
    # 6. what compression saves (statements checked on this run)
    if chunk and contexts:
        at = max(chunk)
        r = chunk[at]
        full_row = next((x for x in prefill if x["config"] == "full" and x["context"] == at), None)
        note = "each layer still attends over its full prompt: activations and one layer's full K/V remain"
        if full_row is not None and "prefill_peak_bytes_above_weights" in full_row:
            note += (f"; only the evicted K/V of layers already pruned is saved (full cache holds "
                     f"{full_row['kv_bytes'] / MiB:.0f} MiB of its {full_row['prefill_peak_bytes_above_weights'] / MiB:.0f} "
                     f"MiB prefill peak at {at})")
        out.append(_target(
            "prefill peak memory, chunkkv / full", r.get("prefill_peak_vs_full"),
            "no reduction beyond the other layers' K/V", None, note,
        ))
        dec = [d for d in result.get("decode", []) if d["context"] == at and d["batch"] == 1]
        full = next((d for d in dec if d["config"] == "full"), None)
        if full is not None:
            parts = [f"{d['config']}: KV {d['kv_bytes'] / full['kv_bytes']:.3f}x, step {1 / d['speedup_vs_full']:.3f}x"
                     for d in dec if d["config"] != "full" and d.get("speedup_vs_full")]
            out.append(_target("decode memory and step time vs full cache", None, "shrink with the kept share", None,
                               f"context {at}: " + "; ".join(parts)))
    return out


# --- markdown -------------------------------------------------------------------------------------
def _st(stats: dict | None, scale: float = 1.0, digits: int = 1) -> str:
    if not stats:
        return "–"
    return (f"{stats['median'] * scale:.{digits}f} "
            f"({stats['min'] * scale:.{digits}f}–{stats['max'] * scale:.{digits}f})")


def _count(n, noun: str) -> str:
    """``1 thread``, ``2 threads``."""
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _mib(n: int | None) -> str:
    return "–" if n is None else f"{n / MiB:.1f}"


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.2f} %"


def _x(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _ranged(row: dict, name: str, digits: int = 3) -> str:
    """A comparison cell: the value, and the range over the rounds when there were several."""
    spread = row.get(f"{name}_rounds")
    cell = _x(row.get(name), digits)
    if spread and len(spread) > 1:
        cell += f" ({min(spread):.{digits}f}–{max(spread):.{digits}f})"
    return cell


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return out


def to_markdown(result: dict[str, Any]) -> str:
    meta = result["meta"]
    info = meta["model_info"]
    cfg = meta["config"]
    lines = [
        "# chunkkv efficiency benchmark",
        "",
        f"Model **{meta['model']}** ({info['architecture']}, {info['params_millions']}M parameters, "
        f"{info['num_layers']} layers, {info['num_attention_heads']} query / {info['num_kv_heads']} KV heads, "
        f"head dim {info['head_dim']}, {info['dtype']}, {info['attn_implementation']}) on **{meta['device_name']}** "
        f"({meta['device']}, {_count(meta['threads'], 'thread')}). chunkkv {meta['chunkkv_version']}, torch "
        f"{meta['torch_version']}, transformers {meta['transformers_version']}. Budget for the method comparison: "
        f"keep {cfg['budget']:g} of the prompt. Timings: median (min–max) of {cfg['repeats']} runs after an untimed "
        f"one; decode: median (min–max) of {cfg['decode_steps']} steps after {cfg['decode_warmup']} untimed. "
        f"Every time was taken under the allocator {meta.get('timing_allocator', 'of this process (not recorded)')}; "
        f"memory in a separate phase after them: {meta['memory_method']}. Wall time {meta.get('wall_seconds', '?')} s.",
        "",
        "## Targets",
        "",
    ]
    rows = []
    for t in result.get("targets", []):
        mark = {True: "met", False: "**missed**", None: "info"}[t["met"]]
        value = t["value"]
        if isinstance(value, float):
            value = f"{value:.4g}"
        elif isinstance(value, (list, tuple)):
            value = ", ".join("–" if v is None else f"{v:.4g}" for v in value)
        rows.append([t["name"], value if value is not None else "–", t["target"], mark, t["note"]])
    lines += _table(["target", "value", "aim", "", "note"], rows)

    lines += ["", "## Prefill: time, compression step, memory (batch 1)", ""]
    rows = []
    for r in result["prefill"]:
        dec = r.get("decode", {})
        rows.append([
            r["context"], r["config"], _st(r["prefill_s"], 1, 3), _x(r["prefill_vs_full"]),
            _st(r["compress_ms"], 1, 1) if r.get("compress_ms") else "–", _pct(r.get("compress_share_of_prefill")),
            r["scored_layers"] if r["config"] != "full" else "–",
            _mib(r["kv_bytes"]), _mib(r.get("prefill_peak_bytes_above_weights")),
            _st(dec.get("ms_per_token"), 1, 2), _x(dec.get("vs_bound")),
        ])
    lines += _table(["context", "config", "prefill s", "vs full", "compression ms", "share", "scored layers",
                     "KV MiB kept", "prefill peak MiB", "decode ms/token", "vs bound"], rows)

    if result.get("reuse"):
        lines += ["", "## ChunkKV layer-wise index reuse: scoring work saved", ""]
        rows = [[r["context"], r["reuse_depth"], r["scored_layers"], _st(r["compress_ms"], 1, 1),
                 _x(r["compress_vs_depth1"]), _pct(r["compress_share_of_prefill"])] for r in result["reuse"]]
        lines += _table(["context", "reuse depth", "scored layers", "compression ms", "vs depth 1", "share of prefill"],
                        rows)

    lines += ["", "## Decode: ms per token, against the same-size bound", "",
              "*bound*: a full cache of exactly the kept length (a prompt of that length prefilled "
              "without compression), timed step by step interleaved with the compressed one.", ""]
    rows = []
    for r in result["decode"]:
        rows.append([
            r["context"], r["batch"], r["config"], max(r["stored_per_layer"]), _mib(r["kv_bytes"]),
            _st(r["ms_per_token"], 1, 2), f"{r['tokens_per_s']:.1f}", _x(r.get("speedup_vs_full"), 2),
            _st(r.get("bound", {}).get("ms_per_token"), 1, 2), _x(r.get("vs_bound")),
            _mib(r.get("decode_bytes")),
        ])
    lines += _table(["context", "batch", "cache", "stored tokens", "KV MiB", "ms/token", "tokens/s", "speed-up",
                     "bound ms/token", "vs bound", "decode MiB"], rows)

    if result.get("e2e"):
        lines += ["", "## End to end: N in / M out", ""]
        rows = [[f"{r['n_in']}:{r['n_out']}", r["batch"], r["config"], _st(r["latency_s"], 1, 2),
                 _x(r.get("latency_vs_full")), _st(r["prefill_s"], 1, 2), _st(r["decode_s"], 1, 2),
                 f"{r['output_tokens_per_s']:.1f}", _x(r["decode_tokens_per_s"], 1)] for r in result["e2e"]]
        lines += _table(["request", "batch", "config", "latency s", "vs full", "prefill s", "decode s",
                         "output tok/s", "decode tok/s"], rows)

    sc = result.get("scaling", {})
    if sc.get("methods"):
        lines += ["", "## Scaling of the compression step in context length", "",
                  f"{sc['what']}; peak extra memory above the inputs.", ""]
        rows = []
        for name, m in sc["methods"].items():
            for p in m["points"]:
                per_token = p.get("peak_extra_bytes_per_token")
                rows.append([name, p["context"], _st(p["compress_ms"], 1, 2), _mib(p.get("peak_extra_bytes")),
                             "–" if per_token is None else f"{per_token:.0f}", _mib(p["quadratic_buffer_bytes"])])
            memory_slope = m.get("memory_fit", {}).get("loglog_slope", "–")
            rows.append([name, "fit", f"slope {m['time_fit']['loglog_slope']}", f"slope {memory_slope}", "", ""])
        lines += _table(["method", "context", "ms (one layer)", "peak extra MiB", "bytes/token",
                         "a T×T fp32 matrix per q head, MiB"], rows)
        if sc.get("prefill_chunkkv"):
            p = sc["prefill_chunkkv"]
            points = ", ".join(f"{ms:.1f} ms at {c}" for c, ms in zip(p["contexts"], p["compress_ms"]))
            slope = p["time_fit"]["loglog_slope"]
            fit = f"log-log slope {slope}" if slope is not None else "one context, so no slope"
            lines += ["", f"In the prefill runs (all layers), ChunkKV's compression step: {points}; {fit}."]

    peers = result.get("peers", {})
    lines += ["", "## Peers: kvpress in the same run", ""]
    if peers.get("status") != "ok":
        lines.append(f"Not run: {peers.get('reason') or peers.get('status')}. "
                     + (f"stderr: `{' / '.join(peers.get('stderr_tail', [])[-3:])}`" if peers.get("stderr_tail") else ""))
    else:
        lines.append(f"kvpress {peers['kvpress_version']} (transformers {peers['transformers_version']}, torch "
                     f"{peers['torch_version']}, {peers['dtype']}, {_count(peers['num_threads'], 'thread')}, allocator "
                     f"{peers.get('allocator', 'not recorded')}), same weights and token ids, timed while this process "
                     "waits. Ratios are chunkkv / kvpress (below 1: chunkkv faster).")
        if peers.get("rounds", 1) > 1:
            lines.append(f"{peers['rounds']} rounds, alternated: before each kvpress process but the first, our "
                         "compared configurations were timed again. Each cell is the median over the rounds (ratios: "
                         "of the rounds' own ratios), the range (min–max) beside the ratios.")
        lines.append("")
        rows = [[r["context"], r["ours"], r["theirs"], _x(r.get("compress_ms_ours"), 2),
                 _x(r.get("compress_ms_theirs"), 2), _ranged(r, "compress_ratio"), _ranged(r, "compress_speedup", 2),
                 _ranged(r, "prefill_ratio"), _x(r.get("decode_ms_ours"), 2), _x(r.get("decode_ms_theirs"), 2),
                 _ranged(r, "decode_ratio")] for r in peers["comparison"]]
        lines += _table(["context", "chunkkv", "kvpress", "compress ms ours", "compress ms kvpress", "ratio",
                         "speed-up", "prefill ratio", "decode ms ours", "decode ms kvpress", "decode ratio"], rows)

    lines += [
        "", "## What compression at prefill saves, and what it does not", "",
        "Each layer attends over its whole prompt before it is pruned, so the prefill computes exactly what a "
        "full-cache prefill computes (plus the compression step) and its peak memory keeps the prefill "
        "activations and the full-length keys/values of the layer being computed. What prefill peak does lose "
        "is the evicted keys/values of the layers already pruned (column *prefill peak MiB*: full vs the "
        "others), so it falls by at most the full cache's KV share of that peak, never below a full-cache "
        "prefill's activations. What shrinks for good is everything after: the KV cache kept (*KV MiB kept*) "
        "and with it the memory of every decode step and its time, which follows the kept length (*vs bound*) "
        "once decoding is bound by the cache rather than by fixed per-step costs.",
        "",
    ]
    return "\n".join(lines)


# --- plots --------------------------------------------------------------------------------------
def write_plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    meta = result["meta"]
    title = f"{meta['model']} on {meta['device_name']} ({meta['model_info']['dtype']})"

    # 1. decode ms/token vs context
    batches = sorted({r["batch"] for r in result["decode"]})
    fig, axes = plt.subplots(1, 1 + len(batches), figsize=(5.5 * (1 + len(batches)), 4.2), squeeze=False)
    ax = axes[0][0]
    by_cfg: dict[str, list] = {}
    for r in result["prefill"]:
        if "decode" in r:
            by_cfg.setdefault(r["config"], []).append((r["context"], r["decode"]["ms_per_token"]["median"]))
    for name, pts in by_cfg.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name,
                linestyle="-" if name in ("full", "chunkkv") else "--")
    ax.set_title(f"methods at keep {meta['config']['budget']:g}, batch 1")
    for i, b in enumerate(batches, start=1):
        ax = axes[0][i]
        rows = [r for r in result["decode"] if r["batch"] == b]
        for name in dict.fromkeys(r["config"] for r in rows):
            pts = sorted((r["context"], r["ms_per_token"]["median"]) for r in rows if r["config"] == name)
            line = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
            bpts = sorted((r["context"], r["bound"]["ms_per_token"]["median"]) for r in rows
                          if r["config"] == name and "bound" in r)
            if bpts:  # a marker, so a single context is drawn too (the legend lists only what is drawn)
                ax.plot([p[0] for p in bpts], [p[1] for p in bpts], linestyle=":", marker="x",
                        color=line[0].get_color(), label=f"{name} bound")
        ax.set_title(f"kept share sweep, batch {b} (dotted: same-size bound)")
    for ax in axes[0]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel("ms per decode step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Decode step time vs context — {title}")
    fig.tight_layout()
    p = out_dir / "decode_ms_per_token.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    # 2. compression overhead vs reuse depth
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    reuse = result.get("reuse", [])
    for c in sorted({r["context"] for r in reuse}):
        pts = sorted((r["reuse_depth"], r["compress_ms"]["median"], r["compress_vs_depth1"],
                      r["compress_share_of_prefill"]) for r in reuse if r["context"] == c)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{c} tokens")
        axes[1].plot([p[0] for p in pts], [100 * p[3] for p in pts], marker="o", label=f"{c} tokens")
    depths = sorted({r["reuse_depth"] for r in reuse}) or [1]
    axes[0].set_ylabel("compression step, ms (all layers)")
    axes[1].set_ylabel("share of prefill, %")
    for ax in axes:
        ax.set_xlabel("reuse depth")
        ax.set_xticks(depths)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"ChunkKV compression overhead vs layer-wise reuse depth — {title}")
    fig.tight_layout()
    p = out_dir / "reuse_overhead.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    # 3. scaling
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, m in result.get("scaling", {}).get("methods", {}).items():
        xs = [pt["context"] for pt in m["points"]]
        axes[0].plot(xs, [pt["compress_ms"]["median"] for pt in m["points"]], marker="o",
                     label=f"{name} (slope {m['time_fit']['loglog_slope']})")
        if "memory_fit" in m:
            axes[1].plot(xs, [max(pt["peak_extra_bytes"], 1) / MiB for pt in m["points"]], marker="o",
                         label=f"{name} (slope {m['memory_fit']['loglog_slope']})")
        if name == "chunkkv" and xs:
            axes[1].plot(xs, [pt["quadratic_buffer_bytes"] / MiB for pt in m["points"]], linestyle=":", color="grey",
                         label="one T×T fp32 matrix per q head")
    axes[0].set_ylabel("ms, one layer")
    axes[1].set_ylabel("peak extra MiB, one layer")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"Compression step scaling (log-log; slope 1 = linear) — {title}")
    fig.tight_layout()
    p = out_dir / "scaling.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)

    # 4. memory: prefill peak (unchanged) vs decode memory (shrinks), batch 1
    fig, ax = plt.subplots(figsize=(7, 4.4))
    for name in ("full", "chunkkv"):
        pts = sorted((r["context"], r["prefill_peak_bytes_above_weights"]) for r in result["prefill"]
                     if r["config"] == name and "prefill_peak_bytes_above_weights" in r)
        if pts:
            ax.plot([p[0] for p in pts], [p[1] / MiB for p in pts], marker="s", linestyle="--",
                    label=f"prefill peak, {name}")
    rows = [r for r in result["decode"] if r["batch"] == 1]
    for name in dict.fromkeys(r["config"] for r in rows):
        pts = sorted((r["context"], r["decode_bytes"]) for r in rows if r["config"] == name and r.get("decode_bytes"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] / MiB for p in pts], marker="o", label=f"decode (KV + step), {name}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("MiB above the weights")
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)
    else:  # a timings-only run (memory phase off)
        ax.text(0.5, 0.5, "memory not measured in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_title(f"Memory, batch 1 — {title}", fontsize=9)
    fig.tight_layout()
    p = out_dir / "memory.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    paths.append(p)
    return paths


def write_outputs(result: dict[str, Any], out_dir: str | Path, plots: bool = True) -> dict[str, Path]:
    """Write ``results.json``, ``report.md`` and the PNG plots to ``out_dir``; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "results.json", "markdown": out / "report.md"}
    paths["json"].write_text(json.dumps(result, indent=1))
    paths["markdown"].write_text(to_markdown(result))
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            print("[chunkkv bench] matplotlib is not installed: no PNG plots (pip install matplotlib)", file=sys.stderr)
            return paths
        for p in write_plots(result, out):
            paths[p.stem] = p
    return paths
