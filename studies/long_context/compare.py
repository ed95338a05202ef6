"""Two configurations of the long-context grid side by side, paired on the same questions, by length.

Each configuration is ``RECORDS:SPEC`` (a records file, or several joined by ``+``, and a spec key);
the questions both answered are compared. For issue 24 item 4, the question-agnostic default
one-shot against its chunked prefill (each chunk's copy pass over its chunk's mean):

    python -m studies.long_context.compare \\
        studies/long_context/results/records.jsonl:chunkkv/f0.1/qa \\
        studies/long_context/results/chunked-agnostic-scaled.jsonl:chunkkv/f0.1/qa/p2048
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from chunkkv.evaluation.metrics import wilson_interval

from ..real_grid.report import paired_difference


def _load(spec: str) -> dict[tuple[int, int, int], float]:
    paths, key = spec.split(":", 1)
    rows = (json.loads(line) for path in paths.split("+") for line in Path(path).open(encoding="utf-8"))
    return {(r["length"], r["doc"], r["qid"]): float(r["score"]) for r in rows if r["spec"] == key}


def table(reference: str, other: str) -> str:
    ref, oth = _load(reference), _load(other)
    both = sorted(set(ref) & set(oth))
    lines = [f"| length | n | {reference.split(':', 1)[1]} | {other.split(':', 1)[1]} | paired, the second minus the first |",
             "|---|---|---|---|---|"]
    for length in sorted({k[0] for k in both}) + [None]:
        keys = [k for k in both if length is None or k[0] == length]
        cells = []
        for scores in (ref, oth):
            hits = sum(scores[k] >= 1.0 for k in keys)
            lo, hi = wilson_interval(hits, len(keys))
            cells.append(f"{hits}/{len(keys)} = {100 * hits / len(keys):.1f} % ({100 * lo:.0f}–{100 * hi:.0f})")
        pairs = [(float(ref[k] >= 1.0), float(oth[k] >= 1.0)) for k in keys]
        lines.append(f"| {length or 'all'} | {len(keys)} | {cells[0]} | {cells[1]} | {paired_difference(pairs)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("reference", help="RECORDS:SPEC, e.g. studies/long_context/results/records.jsonl:chunkkv/f0.1/qa")
    parser.add_argument("other", help="RECORDS:SPEC of the configuration compared with it")
    args = parser.parse_args(argv)
    print(table(args.reference, args.other))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
