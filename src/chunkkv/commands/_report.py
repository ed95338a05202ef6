"""The self-contained HTML report of ``chunkkv inspect`` (and ``chunkkv demo --html``).

One file, no network: the prompt's tokens as spans, the kept sets of every method and layer as
JSON ranges, a little inline JavaScript (layer slider, method selector, compare mode), per-layer
kept counts (table and SVG bars) and the layer x layer Jaccard heatmaps as inline SVG.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Sequence

import torch

from ..cli_common import Prompt, format_bytes
from ._runs import MethodRun

VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58", "#b5de2b", "#fde725"]


def ranges(mask: torch.Tensor) -> list[int]:
    """Positions where ``mask [T]`` is True as flat ``[start0, end0, start1, end1, ...]`` (end exclusive)."""
    m = mask.to(torch.int8)
    edges = torch.diff(torch.cat([m.new_zeros(1), m, m.new_zeros(1)]))
    starts = torch.nonzero(edges == 1).flatten()
    ends = torch.nonzero(edges == -1).flatten()
    return torch.stack([starts, ends], 1).flatten().tolist()


def _color(value: float) -> str:
    value = min(1.0, max(0.0, value))
    x = value * (len(VIRIDIS) - 1)
    i = min(int(x), len(VIRIDIS) - 2)
    t = x - i
    a, b = VIRIDIS[i], VIRIDIS[i + 1]
    rgb = [round(int(a[k:k + 2], 16) * (1 - t) + int(b[k:k + 2], 16) * t) for k in (1, 3, 5)]
    return "#" + "".join(f"{c:02x}" for c in rgb)


def svg_heatmap(matrix: torch.Tensor, labels: Sequence[int], title: str) -> str:
    """An inline SVG heatmap of a square matrix with values in [0, 1] (viridis, value in each cell if small)."""
    n = len(labels)
    cell = max(6, min(40, 400 // max(1, n)))
    left, top = 34, 26
    size = cell * n
    show_values = n <= 12
    step = 1 if n <= 16 else (2 if n <= 32 else 4)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="heatmap" width="{max(left + size + 60, 8 * len(title) + left)}" height="{top + size + 30}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="14" class="svgtitle">{html.escape(title)}</text>',
    ]
    for i in range(n):
        for j in range(n):
            v = float(matrix[i, j])
            x, y = left + j * cell, top + i * cell
            parts.append(
                f'<rect x="{x}" y="{y}" width="{cell}" height="{cell}" fill="{_color(v)}">'
                f"<title>layer {labels[i]} vs layer {labels[j]}: {v:.3f}</title></rect>"
            )
            if show_values:
                ink = "#000" if v > 0.6 else "#fff"
                parts.append(
                    f'<text x="{x + cell / 2}" y="{y + cell / 2 + 4}" text-anchor="middle" class="cellv" fill="{ink}">{v:.2f}</text>'
                )
    for i in range(0, n, step):
        parts.append(f'<text x="{left - 4}" y="{top + i * cell + cell / 2 + 4}" text-anchor="end" class="axis">{labels[i]}</text>')
        parts.append(f'<text x="{left + i * cell + cell / 2}" y="{top + size + 14}" text-anchor="middle" class="axis">{labels[i]}</text>')
    # color bar
    bx = left + size + 14
    for k in range(20):
        v = 1 - k / 19
        parts.append(f'<rect x="{bx}" y="{top + k * size / 20}" width="10" height="{size / 20 + 0.5}" fill="{_color(v)}"/>')
    parts.append(f'<text x="{bx + 14}" y="{top + 8}" class="axis">1</text>')
    parts.append(f'<text x="{bx + 14}" y="{top + size}" class="axis">0</text>')
    parts.append("</svg>")
    return "".join(parts)


def svg_bars(counts: Sequence[float], labels: Sequence[int], total: int, title: str) -> str:
    """Inline SVG bar chart of kept tokens per layer (bar height = share of the prompt)."""
    n = len(counts)
    width = max(4, min(28, 420 // max(1, n)))
    height, left, top = 90, 34, 20
    peak = max(max(counts, default=1), 1)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="bars" width="{max(left + width * n + 10, 8 * len(title) + left)}" height="{top + height + 22}" '
        f'role="img" aria-label="{html.escape(title)}">',
        f'<text x="{left}" y="12" class="svgtitle">{html.escape(title)}</text>',
        f'<line x1="{left}" y1="{top + height}" x2="{left + width * n}" y2="{top + height}" stroke="#888"/>',
        f'<text x="{left - 4}" y="{top + 8}" text-anchor="end" class="axis">{peak:.0f}</text>',
    ]
    step = 1 if n <= 16 else (2 if n <= 32 else 4)
    for i, c in enumerate(counts):
        h = height * c / peak
        x = left + i * width
        parts.append(
            f'<rect class="bar" data-li="{i}" x="{x + 1}" y="{top + height - h}" width="{width - 2}" height="{h}">'
            f"<title>layer {labels[i]}: {c:.1f} of {total} tokens ({100 * c / max(1, total):.1f} %)</title></rect>"
        )
        if i % step == 0:
            parts.append(f'<text x="{x + width / 2}" y="{top + height + 14}" text-anchor="middle" class="axis">{labels[i]}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _method_data(run: MethodRun) -> dict:
    union, every = run.union, run.all_heads
    return {
        "name": run.name,
        "description": run.description,
        "per_head": run.per_head,
        "kept": [ranges(union[i]) for i in range(union.shape[0])],
        "all": [ranges(every[i]) for i in range(every.shape[0])] if run.per_head else None,
        "counts": run.kept_counts(),
        "head_counts": [round(x, 2) for x in run.mean_head_counts()],
    }


CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:14px 22px;background:#20232a;color:#eee}
header h1{margin:0 0 4px 0;font-size:20px} header p{margin:2px 0;color:#bbb;font-size:13px}
section{padding:10px 22px}
h2{font-size:16px;margin:14px 0 6px 0}
#controls{position:sticky;top:0;background:#fff;border-bottom:1px solid #ddd;z-index:2;display:flex;flex-wrap:wrap;
 gap:14px;align-items:center;font-size:14px}
#controls label{display:flex;gap:6px;align-items:center}
#layer{width:260px}
.legend span{padding:1px 5px;border-radius:3px;margin-right:4px;font-size:12px}
#tokens{white-space:pre-wrap;font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:13px;
 line-height:1.7;background:#fff;border:1px solid #ddd;padding:12px;max-height:60vh;overflow:auto}
.t{color:#aaa}
.t.kept.all{background:#8fd18b;color:#000}
.t.kept.some{background:#fbe38e;color:#333}
.t.both{background:#8fd18b;color:#000}
.t.a-only{background:#9cc3ff;color:#000}
.t.b-only{background:#ffb38a;color:#000}
#tokens .t>i{font-style:normal;background:#fff;color:inherit}
#tokens .t.all+.t.all>i,#tokens .t.some+.t.some>i,#tokens .t.both+.t.both>i,#tokens .t.a-only+.t.a-only>i,
#tokens .t.b-only+.t.b-only>i{background:transparent}
.t[data-n]{text-decoration:underline 2px #c00;font-weight:bold}
.t[data-q]{font-style:italic}
.t[data-s]{font-size:10px;color:#777}
table{border-collapse:collapse;font-size:13px;background:#fff}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:right} th{background:#f0f0f0}
td.l,th.l{text-align:left}
tr.current td{background:#fff5c2}
.ok{color:#080;font-weight:bold} .bad{color:#b00;font-weight:bold}
.grid{display:flex;flex-wrap:wrap;gap:18px;align-items:flex-start}
.card{background:#fff;border:1px solid #ddd;padding:8px;border-radius:4px}
.card p{font-size:12px;color:#555;margin:4px 0;max-width:420px}
.svgtitle{font-size:12px;font-weight:bold;fill:#222} .axis{font-size:10px;fill:#444} .cellv{font-size:10px}
.bar{fill:#4a78c2} .bar.current{fill:#e07b00}
.note{font-size:12px;color:#555;max-width:900px}
"""

JS = """
(function(){
const D = JSON.parse(document.getElementById('chunkkv-data').textContent);
window.CHUNKKV = D;
const spans = document.getElementById('tokens').children;
const msel = document.getElementById('method'), csel = document.getElementById('compare');
const slider = document.getElementById('layer');
function fill(rs, st, bit){ for(let k=0;k<rs.length;k+=2){ for(let i=rs[k];i<rs[k+1];i++) st[i]|=bit; } }
function render(){
  const li = +slider.value, m = D.methods[+msel.value];
  const cmp = csel.value === '' ? null : D.methods[+csel.value];
  const st = new Uint8Array(D.n);
  fill(m.kept[li], st, 1);
  if (cmp) fill(cmp.kept[li], st, 2); else fill(m.per_head ? m.all[li] : m.kept[li], st, 2);
  let kept = 0;
  for (let i=0;i<D.n;i++){
    const s = st[i]; let c;
    if (cmp) c = s===3 ? 't kept both' : s===1 ? 't kept a-only' : s===2 ? 't b-only' : 't dropped';
    else c = s===3 ? 't kept all' : s===1 ? 't kept some' : 't dropped';
    if (s & 1) kept++;
    if (spans[i].className !== c) spans[i].className = c;
  }
  document.getElementById('layer-label').textContent = 'layer ' + D.layers[li] + ' (' + (li+1) + ' of ' + D.layers.length + ')';
  let info = m.description + ': ' + kept + ' of ' + D.n + ' tokens kept on this layer (' + (100*kept/D.n).toFixed(1) + ' %)';
  if (m.per_head) info += ', mean per KV head ' + m.head_counts[li];
  if (cmp) info += ' | ' + cmp.description + ': ' + cmp.counts[li];
  document.getElementById('kept-label').textContent = info;
  document.getElementById('legend-single').style.display = cmp ? 'none' : '';
  document.getElementById('legend-compare').style.display = cmp ? '' : 'none';
  document.querySelectorAll('tr[data-li]').forEach(r => r.classList.toggle('current', +r.dataset.li === li));
  document.querySelectorAll('.bar').forEach(b => b.classList.toggle('current', +b.dataset.li === li));
  document.getElementById('tokens').dataset.layer = D.layers[li];
  document.getElementById('tokens').dataset.method = m.name;
}
slider.addEventListener('input', render);
slider.addEventListener('change', render);
msel.addEventListener('change', render);
csel.addEventListener('change', render);
document.addEventListener('keydown', e => {
  if (e.target === slider || e.target.tagName === 'SELECT') return;
  if (e.key === 'ArrowRight' || e.key === 'ArrowLeft') {
    slider.value = Math.max(0, Math.min(D.layers.length-1, +slider.value + (e.key === 'ArrowRight' ? 1 : -1)));
    render();
  }
});
render();
})();
"""


def build_report(
    prompt: Prompt,
    runs: Sequence[MethodRun],
    *,
    title: str = "chunkkv inspect",
    subtitle: str = "",
    question_start: int | None = None,
    highlight: Sequence[int] = (),
    layer: int | None = None,
) -> str:
    """The report as one HTML string."""
    if not runs:
        raise ValueError("no method runs to report")
    layers = runs[0].layers
    n = len(prompt)
    esc = html.escape
    data = {"n": n, "layers": layers, "methods": [_method_data(r) for r in runs]}
    start_li = layers.index(layer) if layer in layers else len(layers) // 2
    marked = set(highlight)

    tokens = []
    for i, piece in enumerate(prompt.pieces):
        attrs = f' id="t{i}" class="t"'
        if i in marked:
            attrs += " data-n"
        if question_start is not None and i >= question_start:
            attrs += " data-q"
        if prompt.special[i]:
            attrs += " data-s"
        body = piece.lstrip(" \n\t")
        lead = piece[: len(piece) - len(body)]
        if not body:  # a token of whitespace only keeps its text inside the span
            lead, body = "", piece
        gap = f"<i>{esc(lead)}</i>" if lead else ""
        tokens.append(f"<span{attrs}>{gap}{esc(body)}</span>")

    options = "".join(f'<option value="{k}">{esc(r.description)}</option>' for k, r in enumerate(runs))
    compare = '<option value="">(none)</option>' + options

    answers = any(r.answer is not None for r in runs)
    verdicts = any(r.correct is not None for r in runs)
    summary = ["<table><tr><th class=l>method</th><th>kept / layer (mean)</th><th>KV memory</th><th>prefill</th>"
               + ("<th class=l>answer</th>" if answers else "") + ("<th>right?</th>" if verdicts else "") + "</tr>"]
    for r in runs:
        counts, per_head = r.kept_counts(), r.mean_head_counts()
        mean = sum(per_head) / len(per_head)
        kept = f"{mean:.0f} ({100 * mean / n:.1f} %)"
        if r.per_head:
            kept += f" per KV head, ∪ {sum(counts) / len(counts):.0f}"
        row = (f"<tr><td class=l>{esc(r.description)}</td><td>{kept}</td>"
               f"<td>{format_bytes(r.kept_bytes)} ({100 * r.kept_bytes / max(1, r.full_bytes):.0f} %)</td>"
               f"<td>{r.prefill_seconds:.2f} s</td>")
        if answers:
            row += f"<td class=l>{esc((r.answer or '').strip())}</td>"
        if verdicts:
            verdict = "" if r.correct is None else ('<span class=ok>✓ right</span>' if r.correct else '<span class=bad>✗ wrong</span>')
            row += f"<td>{verdict}</td>"
        summary.append(row + "</tr>")
    summary.append("</table>")

    head = "".join(
        f"<th>{esc(r.name)} kept" + (" (union · mean per head)" if r.per_head else "") + "</th>" for r in runs
    )
    budget_rows = []
    for li, layer_id in enumerate(layers):
        cells = []
        for r in runs:
            c = r.kept_counts()[li]
            cell = f"{c}"
            if r.per_head:
                cell += f" · {r.mean_head_counts()[li]:.1f}"
            cells.append(f"<td>{cell}</td>")
        budget_rows.append(f'<tr data-li="{li}"><td>{layer_id}</td>{"".join(cells)}</tr>')
    budget_table = f"<table><tr><th>layer</th>{head}</tr>{''.join(budget_rows)}</table>"
    bars = "".join(
        f'<div class="card">{svg_bars(r.mean_head_counts() if r.per_head else r.kept_counts(), layers, n, r.description + (" (mean per KV head)" if r.per_head else ""))}</div>'
        for r in runs
    )

    maps = []
    for r in runs:
        jac = r.jaccard()
        off = _off_diagonal_mean(jac)
        cards = [svg_heatmap(jac, layers, f"{r.description}" + (": union over KV heads" if r.per_head else ""))]
        text = f"mean off-diagonal Jaccard {off:.3f}"
        hj = r.head_jaccard()
        if hj is not None:
            cards.append(svg_heatmap(hj, layers, f"{r.description}: mean per-head Jaccard"))
            text += f" (union over heads); mean per-head Jaccard {_off_diagonal_mean(hj):.3f}"
        maps.append(f'<div class="card">{"".join(cards)}<p>{esc(text)}</p></div>')

    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{esc(title)}</title><style>{CSS}</style></head>
<body>
<header><h1>{esc(title)}: what each method kept</h1>
<p>{esc(subtitle)}</p><p>{n} prompt tokens · {len(layers)} compressed layers · methods: {esc(", ".join(r.description for r in runs))}</p></header>
<section id="controls">
<label>method <select id="method">{options}</select></label>
<label>compare with <select id="compare">{compare}</select></label>
<label>layer <input type="range" id="layer" min="0" max="{len(layers) - 1}" step="1" value="{start_li}"></label>
<span id="layer-label"></span>
<span id="kept-label"></span>
<span class="legend" id="legend-single"><span class="t kept all">kept</span><span class="t kept some">kept by some KV heads</span><span class="t dropped">dropped</span></span>
<span class="legend" id="legend-compare" style="display:none"><span class="t both">kept by both</span><span class="t a-only">first method only</span><span class="t b-only">second method only</span></span>
</section>
<section><h2>Summary</h2>{"".join(summary)}
<p class="note">Kept / layer: prompt tokens in each layer's cache, averaged over layers (and KV heads; ∪: tokens kept by at
least one KV head, for per-head methods). Underlined bold tokens: the needle / highlighted span; italic: the question (the end of the prompt, part of the observation window).
KV memory: keys and values of every layer right after prefill, as a share of the full cache.</p></section>
<section><h2>The prompt, token by token</h2><div id="tokens">{"".join(tokens)}</div>
<p class="note">Use the slider (or the left/right arrow keys) to change layer. For methods that select tokens per KV head
(SnapKV, H2O, PyramidKV) a token counts as kept on a layer when at least one KV head kept it (the union over heads);
tokens kept by only some heads are shown in yellow.</p></section>
<section><h2>Per-layer budgets</h2><div class="grid">{bars}</div><br>{budget_table}</section>
<section><h2>Layer × layer similarity of kept indices (Jaccard)</h2>
<p class="note">Cell (i, j) is |K<sub>i</sub> ∩ K<sub>j</sub>| / |K<sub>i</sub> ∪ K<sub>j</sub>| for the sets of prompt positions kept by layers i and j
(the paper's Figure 2). For per-head methods the kept set of a layer is the union over its KV heads; the second map is the
Jaccard of head h of layer i with head h of layer j, averaged over heads. Layers that reuse indices (ChunkKV reuse_depth &gt; 1) show 1.0 blocks.</p>
<div class="grid">{"".join(maps)}</div></section>
<script type="application/json" id="chunkkv-data">{payload}</script>
<script>{JS}</script>
</body></html>
"""


def _off_diagonal_mean(m: torch.Tensor) -> float:
    n = m.shape[0]
    if n < 2:
        return 1.0
    return float((m.sum() - m.diagonal().sum()) / (n * n - n))


def write_report(path: str | Path, prompt: Prompt, runs: Sequence[MethodRun], **kwargs) -> Path:
    from ..errors import ChunkKVError

    path = Path(path)
    if path.is_dir():
        raise ChunkKVError(f"--out {path} is a folder; give a file name such as report.html")
    if not path.parent.exists():
        raise ChunkKVError(f"--out {path}: folder {path.parent} does not exist")
    path.write_text(build_report(prompt, runs, **kwargs), encoding="utf-8")
    return path
