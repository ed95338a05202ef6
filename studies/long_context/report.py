"""Tables of the long-context grid (:mod:`studies.long_context.grid`) for its README.

``python -m studies.long_context report`` reads ``results/records.jsonl`` and rewrites the block
between ``<!-- long:begin -->`` and ``<!-- long:end -->`` of ``studies/long_context/README.md``
(``--report ''``: print only). Every accuracy is given with its n and a 95 % Wilson interval
(:func:`studies.real_grid.report.cell`); every compressed row with its paired counts against the
full cache on the same questions: ``-a/+b`` = a questions the full cache answered and this row
did not, b the reverse.
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any

from chunkkv.evaluation.store import read_jsonl

from .. import shown
from ..real_grid.report import cell, write_block
from .grid import CHUNKED_SPECS, SPECS
from .tasks import TASKS

STUDY = Path(__file__).resolve().parent
BEGIN, END = "<!-- long:begin -->", "<!-- long:end -->"
THRESHOLD = 0.85
LABEL = {"full": "full cache"}


def load(path: Path) -> list[dict[str, Any]]:
    """The records, last one wins per (length, document, question, spec)."""
    out = {(r["length"], r["doc"], r["qid"], r["spec"]): r for r in read_jsonl(path, key="spec")}
    return list(out.values())


def label(spec: str) -> tuple[str, str]:
    """``("chunkkv", "KV 128")`` etc. for a spec key."""
    parts = spec.split("/")
    method, rest = parts[0], parts[1:]
    budget = []
    for p in rest:
        if p.startswith("t"):
            budget.append(f"KV {p[1:]}")
        elif p.startswith("f"):
            budget.append(f"{100 * float(p[1:]):g} %")
        elif p.startswith("r"):
            budget.append(f"reuse {p[1:]}")
        elif p == "qa":
            budget.append("question-agnostic default")
        elif p.startswith("p"):
            budget.append(f"chunked prefill C = {p[1:]}")
    return method, ", ".join(budget) or "–"


class Grid:
    """The records indexed for the tables."""

    def __init__(self, records: list[dict[str, Any]]) -> None:
        self.records = records
        self.by: dict[tuple[str, str, int], dict[tuple[int, int], float]] = defaultdict(dict)
        for r in records:
            self.by[(r["spec"], r["task"], r["length"])][(r["doc"], r["qid"])] = r["score"]
        self.lengths = sorted({r["length"] for r in records})
        self.tasks = [t for t in TASKS if any(r["task"] == t for r in records)]
        self.specs = [s.key for s in SPECS + CHUNKED_SPECS if any(r["spec"] == s.key for r in records)]
        # calibration: a (task, length) cell enters the averages when the full cache is right >= 85 %
        self.kept_cells = set()
        for t in self.tasks:
            for L in self.lengths:
                full = list(self.by[("full", t, L)].values())
                if full and sum(full) / len(full) >= THRESHOLD:
                    self.kept_cells.add((t, L))

    def scores(self, spec: str, lengths=None, tasks=None, calibrated: bool = True) -> dict[tuple, float]:
        out = {}
        for t in tasks or self.tasks:
            for L in lengths or self.lengths:
                if calibrated and (t, L) not in self.kept_cells:
                    continue
                out.update({(t, L, *k): v for k, v in self.by[(spec, t, L)].items()})
        return out

    def paired(self, spec: str, **kw) -> str:
        mine, full = self.scores(spec, **kw), self.scores("full", **kw)
        both = set(mine) & set(full)
        if spec == "full" or not both:
            return ""
        lost = sum(full[k] > mine[k] for k in both)
        won = sum(mine[k] > full[k] for k in both)
        return f" −{lost}/+{won}"


def _mean(xs) -> float | None:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _paired_cell(g: Grid, spec: str, **where) -> str:
    """Accuracy of ``spec`` over the calibrated questions ``where`` selects, with its paired counts."""
    scores = g.scores(spec, **where)
    return cell(list(scores.values())) + g.paired(spec, **where) if scores else "–"


def markdown(g: Grid, records_path: str) -> str:
    lines: list[str] = []
    add = lines.append
    docs = {L: len({r["doc"] for r in g.records if r["length"] == L}) for L in g.lengths}
    add("Model **Gemma 3 270M (base; Q4_K_M GGUF dequantized to float32)**, CPU, sdpa; Paul Graham essays with "
        "seven facts per document and five completion-style questions (`…\\n\\nQuestion: …\\nAnswer: <answer "
        "prefix>`, no chat template), greedy decoding; observation window 32 tokens for every method. Right = "
        "every required answer string in the first generated line. Intervals: 95 % Wilson. Raw records: "
        f"`{records_path}`. Documents per length: " + ", ".join(f"{L}: {docs[L]}" for L in g.lengths) + ".")
    add("")
    add("### Calibration: the full cache per task and length")
    add("")
    add("| task | " + " | ".join(f"{L} tok" for L in g.lengths) + " |")
    add("|---|" + "---|" * len(g.lengths))
    for t in g.tasks:
        cells = []
        for L in g.lengths:
            sc = list(g.by[("full", t, L)].values())
            mark = "" if not sc else (" ✓" if (t, L) in g.kept_cells else " ✗")
            cells.append(cell(sc) + mark)
        add(f"| {t} | " + " | ".join(cells) + " |")
    add("")
    add("✓ = the full cache is right ≥ 85 % there: the (task, length) cell enters the pooled tables below; "
        "✗ = it does not (reported, left out of the averages).")
    add("")
    add("### Every method and budget, pooled over the calibrated tasks, per length")
    add("")
    add("Cell: accuracy % (n, 95 % interval) −a/+b: paired against the full cache on the same questions "
        "(a = the full cache right and this row wrong, b = the reverse).")
    add("")
    add("| method | budget | " + " | ".join(f"{L} tok" for L in g.lengths) + " | all lengths |")
    add("|---|---|" + "---|" * (len(g.lengths) + 1))
    for spec in g.specs:
        method, budget = label(spec)
        cells = [_paired_cell(g, spec, lengths=[L]) for L in g.lengths] + [_paired_cell(g, spec)]
        add(f"| {LABEL.get(method, method)} | {budget} | " + " | ".join(cells) + " |")
    add("")
    add("### Per task (all lengths pooled over calibrated cells)")
    add("")
    add("| method | budget | " + " | ".join(g.tasks) + " |")
    add("|---|---|" + "---|" * len(g.tasks))
    for spec in g.specs:
        method, budget = label(spec)
        cells = [_paired_cell(g, spec, tasks=[t]) for t in g.tasks]
        add(f"| {LABEL.get(method, method)} | {budget} | " + " | ".join(cells) + " |")
    add("")
    add("### By depth of the fact (all calibrated cells)")
    add("")
    depths = sorted({r["depth"] for r in g.records})
    pick = ["full", "chunkkv/t128", "snapkv/t128", "pyramidkv/t128", "h2o/t128", "streamingllm/t128", "chunkkv/f0.1",
            "snapkv/f0.1", "chunkkv/f0.1/qa", "chunkkv/f0.2/qa"]
    add("| method | budget | " + " | ".join(f"{100 * d:.0f} %" for d in depths) + " |")
    add("|---|---|" + "---|" * len(depths))
    depth_of = {(r["task"], r["length"], r["doc"], r["qid"]): r["depth"] for r in g.records}
    for spec in [s for s in pick if s in g.specs]:
        method, budget = label(spec)
        sc = g.scores(spec)
        cells = [cell([v for k, v in sc.items() if depth_of.get(k) == d]) for d in depths]
        add(f"| {LABEL.get(method, method)} | {budget} | " + " | ".join(cells) + " |")
    add("")
    add("### What the caches hold (mean per question; KV bytes in MiB: the 3 full-attention layers + the 15 sliding layers)")
    add("")
    add("| method | budget | " + " | ".join(f"{L} tok" for L in g.lengths) + " |")
    add("|---|---|" + "---|" * len(g.lengths))
    for spec in [s for s in ("full", "chunkkv/t128", "chunkkv/t512", "chunkkv/f0.1", "chunkkv/f0.1/qa", "chunkkv/f0.2/qa")
                 if s in g.specs]:
        method, budget = label(spec)
        cells = []
        for L in g.lengths:
            rs = [r for r in g.records if r["spec"] == spec and r["length"] == L]
            if not rs:
                cells.append("–")
                continue
            full_b = _mean(r["kv_full_layers_bytes"] for r in rs) / 2**20
            slide_b = _mean(r["kv_sliding_bytes"] for r in rs) / 2**20
            kept = _mean(r["kept_tokens"][0] for r in rs)
            cells.append(f"{full_b + slide_b:.1f} ({full_b:.1f} + {slide_b:.1f}; {kept:.0f} tok/layer)")
        add(f"| {LABEL.get(method, method)} | {budget} | " + " | ".join(cells) + " |")
    add("")
    add("### How much of the answer the compressed layers kept (mean over questions, all cells)")
    add("")
    add("Share of the three compressed layers (5, 11, 17) that kept the first answer word whole (union over the KV head), "
        "and accuracy when all three / not all three kept it.")
    add("")
    add("| method | budget | answer kept whole (layers of 3) | right when kept by all 3 | right otherwise |")
    add("|---|---|---|---|---|")
    for spec in [s for s in g.specs if s != "full"]:
        method, budget = label(spec)
        rs = [r for r in g.records if r["spec"] == spec and (r["task"], r["length"]) in g.kept_cells
              and r.get("answer_whole_layers") is not None]
        if not rs:
            continue
        whole = [r["score"] for r in rs if r["answer_whole_layers"] == 3]
        rest = [r["score"] for r in rs if r["answer_whole_layers"] < 3]
        add(f"| {method} | {budget} | {_mean(r['answer_whole_layers'] for r in rs):.2f} | {cell(whole)} | {cell(rest)} |")
    add("")
    add("### Time per document (mean seconds, CPU, one thread, shared machine)")
    add("")
    add("| length | documents | prefill (chunks of 1024) | surprisal | shallow reconstruction pass | question-agnostic "
        "compress (both budgets) | the whole document (5 questions x 19 rows) |")
    add("|---|---|---|---|---|---|---|")
    for L in g.lengths:
        per_doc = {}
        for r in g.records:
            if r["length"] == L and "prefill_seconds" in r:  # rows of the captured document (not chunked ones)
                per_doc[r["doc"]] = r
        rs = list(per_doc.values())
        agn = {}
        for r in g.records:
            if r["length"] == L and r.get("compress_seconds") is not None and "prefill_seconds" in r:
                agn[(r["doc"], r["spec"])] = r["compress_seconds"]
        comp = _mean([sum(v for (d, _s), v in agn.items() if d == doc) for doc in per_doc]) if agn else None
        add(f"| {L} | {len(rs)} | {_mean(r['prefill_seconds'] for r in rs):.0f} | "
            f"{_mean(r['surprisal_seconds'] for r in rs):.0f} | {_mean(r['pass_seconds'] for r in rs):.0f} | "
            f"{'–' if comp is None else f'{comp:.0f}'} | {_mean(r['doc_seconds'] for r in rs):.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.long_context report", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(STUDY / "results"), help=f"records folder (default {shown(STUDY / 'results')})")
    parser.add_argument("--report", default=str(STUDY / "README.md"),
                        help=f"markdown whose generated block is rewritten (default {shown(STUDY / 'README.md')}; '' = none)")
    args = parser.parse_args(argv)
    path = Path(args.out) / "records.jsonl"
    records = load(path)
    if not records:
        print(f"long_context report: error: no records in {path}")
        return 2
    body = markdown(Grid(records), shown(path))
    if args.report:
        write_block(Path(args.report), body, BEGIN, END)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
