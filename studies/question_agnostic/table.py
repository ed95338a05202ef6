"""Tables for the study's README from the niah study's JSONL (Wilson 95 % intervals).

    python -m studies.question_agnostic table [studies/question_agnostic/results/niah.jsonl] > results/tables.md
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path

from chunkkv.evaluation.metrics import wilson_interval as wilson

RESULTS = Path(__file__).resolve().parent / "results"


def cell(records: list[dict]) -> str:
    n = len(records)
    if n == 0:
        return "–"
    k = sum(r["present"] for r in records)
    lo, hi = wilson(k, n)
    return f"{k}/{n} ({100 * k / n:.0f} %, {100 * lo:.0f}–{100 * hi:.0f})"


def extended(rows: list[dict], by_doc: dict, configs: list[str]) -> None:
    """The larger sample: every document, and the configs answered on all of them."""
    docs = sorted(by_doc)
    if len(docs) < 2:
        return
    keep = [c for c in configs if all((c, q) in by_doc[d] for d in docs for q in range(4))]
    lengths = sorted({d[0] for d in docs})
    counts = {length: sum(1 for d in docs if d[0] == length) for length in lengths}
    print(f"extended sample: every document ({counts}, 4 questions each), the configs run on all of them\n")
    print("| config | " + " | ".join(f"{length} tok" for length in lengths) + " | all | ROUGE-1 | needle kept |")
    print("|" + "---|" * (len(lengths) + 4))
    order = sorted(keep, key=lambda c: (c != "full", c.split("|")[0], c.split("|")[-1], c))
    for key in order:
        sel = [r for r in rows if r["config"] == key]
        kept = [r["needle_kept"] for r in sel if r.get("needle_kept") is not None]
        kept_s = f"{sum(kept) / len(kept):.2f}" if kept else "–"
        per = [cell([r for r in sel if r["length"] == length]) for length in lengths]
        rouge = sum(r["rouge1"] for r in sel) / len(sel)
        print(f"| {'full cache' if key == 'full' else key} | " + " | ".join(per) + f" | {cell(sel)} | {rouge:.3f} | {kept_s} |")
    full = {(r["length"], r["doc"], r["q"]): r["present"] for r in rows if r["config"] == "full"}
    print("\npaired with the full cache (same question): compressed wrong where the full cache is right / the reverse")
    for key in order[1:]:
        pairs = [(full[(r["length"], r["doc"], r["q"])], r["present"]) for r in rows if r["config"] == key]
        print(f"- {key}: {sum(f and not c for f, c in pairs)} / {sum(c and not f for f, c in pairs)}")
    print("\nby needle (question), every document:")
    for key in order:
        sel = [r for r in rows if r["config"] == key]
        print(f"- {key}: " + ", ".join(f"q{q}: {cell([r for r in sel if r['q'] == q])}" for q in range(4)))
    print()


def print_tables(path: str) -> None:
    """Print the markdown tables of one niah JSONL file."""
    rows, seen = [], set()
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            key = (r["length"], r["doc"], r["config"], r["q"])
            if key not in seen:  # a record written twice (two runs resumed at once) counts once
                seen.add(key)
                rows.append(r)
    long_rows = [r for r in rows if r["length"] > 4096 and not r["config"].startswith("_timing")]
    rows = [r for r in rows if r["length"] <= 4096]  # longer documents: a few configs only, their own table
    timing = [r for r in rows if r["config"] == "_timing"]
    surprisal_timing = [r for r in rows if r["config"] == "_timing_surprisal"]
    rows = [r for r in rows if not r["config"].startswith("_timing")]
    # only documents whose every config is complete, so each row of a table has the same samples
    by_doc = defaultdict(set)
    for r in rows:
        by_doc[(r["length"], r["doc"])].add((r["config"], r["q"]))
    configs = sorted({r["config"] for r in rows})
    required = [c for c in configs if not c.startswith("qa-")]  # query-aware is skipped at 4k (cost)
    full_docs = {d for d, got in by_doc.items() if all((c, q) in got for c in required for q in range(4))}
    extended(rows, by_doc, configs)
    if long_rows:
        print("longer documents (a few configs only):")
        for length in sorted({r["length"] for r in long_rows}):
            at = [r for r in long_rows if r["length"] == length]
            n_docs = len({r["doc"] for r in at})
            print(f"- {length} tokens, {n_docs} documents: " + "; ".join(
                f"{c} {cell([r for r in at if r['config'] == c])}" for c in sorted({r["config"] for r in at})))
        print()
    rows = [r for r in rows if (r["length"], r["doc"]) in full_docs]
    lengths = sorted({r["length"] for r in rows})
    docs = {length: sorted(d for (l, d) in full_docs if l == length) for length in lengths}
    print(f"complete documents per length: { {k: len(v) for k, v in docs.items()} } (4 questions each)\n")
    order = ["full", "qa-chunkkv|window|20% kept"]
    budgets = ["10% kept", "20% kept", "30% kept", "128 tokens", "256 tokens", "512 tokens"]
    for method in ("chunkkv", "chunkkv-bnd", "chunkkv-sent", "chunkkv-default", "chunkkv-sentchunks", "chunkkv-c20",
                   "chunkkv-k15", "snapkv"):
        for budget in budgets:
            for scoring in ("window", "probe", "reconstruction", "surprisal"):
                key = f"{method}|{scoring}|{budget}"
                if key in configs:
                    order.append(key)
    header = "| config | " + " | ".join(f"{length} tok" for length in lengths) + " | all | ROUGE-1 | needle kept |"
    print(header)
    print("|" + "---|" * (len(lengths) + 4))
    for key in order:
        sel = [r for r in rows if r["config"] == key]
        if not sel:
            continue
        per = [cell([r for r in sel if r["length"] == length]) for length in lengths]
        rouge = sum(r["rouge1"] for r in sel) / len(sel)
        kept = [r["needle_kept"] for r in sel if r.get("needle_kept") is not None]
        kept_s = f"{sum(kept) / len(kept):.2f}" if kept else "–"
        name = {"full": "full cache", "qa-chunkkv|window|20% kept": "query-aware ChunkKV 20 % (window)"}.get(key, key)
        print(f"| {name} | " + " | ".join(per) + f" | {cell(sel)} | {rouge:.3f} | {kept_s} |")
    print("\nby needle depth (all lengths):")
    for key in ["full", "chunkkv|window|20% kept", "chunkkv|probe|20% kept", "chunkkv|reconstruction|20% kept",
                "chunkkv|surprisal|20% kept", "chunkkv-bnd|surprisal|20% kept", "chunkkv-sent|surprisal|20% kept",
                "chunkkv-default|surprisal|20% kept"]:
        sel = [r for r in rows if r["config"] == key]
        depths = sorted({r["depth"] for r in sel})
        print(f"- {key}: " + ", ".join(f"depth {d}: {cell([r for r in sel if r['depth'] == d])}" for d in depths))
    print("\nby needle (question):")
    for key in ["full", "chunkkv|window|20% kept", "chunkkv|probe|20% kept", "chunkkv|reconstruction|20% kept",
                "chunkkv|surprisal|20% kept", "chunkkv-bnd|surprisal|20% kept", "chunkkv-sent|surprisal|20% kept",
                "chunkkv-default|surprisal|20% kept"]:
        sel = [r for r in rows if r["config"] == key]
        print(f"- {key}: " + ", ".join(f"q{q}: {cell([r for r in sel if r['q'] == q])}" for q in range(4)))
    print("\nscoring time / prefill time (same process, 1 thread, all 30 layers scored):")
    for t in [t for t in timing if "probe_s" in t and "reconstruction_s" in t]:
        print(f"- {t['length']} tok doc {t['doc']}: prefill {t['prefill_s']:.1f} s, probe {t['probe_s']:.1f} s "
              f"({t['probe_s'] / t['prefill_s']:.2f}x), reconstruction {t['reconstruction_s']:.1f} s "
              f"({t['reconstruction_s'] / t['prefill_s']:.2f}x)")
    for t in surprisal_timing + [t for t in timing if "surprisal_s" in t]:
        print(f"- {t['length']} tok doc {t['doc']} (surprisal run): prefill {t['prefill_s']:.1f} s incl. surprisal "
              f"{t['surprisal_s']:.2f} s ({t['surprisal_s'] / (t['prefill_s'] - t['surprisal_s']):.2f}x of the rest)")


def main(argv: list[str] | None = None) -> None:
    """``table [PATH]``: the tables of ``PATH`` (default ``results/niah.jsonl``) on stdout."""
    argv = list(sys.argv[1:] if argv is None else argv)
    print_tables(argv[0] if argv else str(RESULTS / "niah.jsonl"))


if __name__ == "__main__":
    main()
