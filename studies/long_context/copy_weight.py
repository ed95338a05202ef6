"""How much the copy part of the question-agnostic default should count in a chunked prefill (issue 24
item 4): a replay of the final selection on recorded chunk scores, for several weights.

For each Gemma 3 document (``length:index`` of :mod:`.tasks`) a chunked prefill (C = 2048) of the
context alone runs the default at 10 % exactly as before ``hybrid_chunked`` existed (copy and
surprisal at equal weight), and its final running scores per position are saved (``--rows``, one
``.pt`` a document; made once, reused). Then, for each weight ``w`` of the copy part, the default's
own selection (sentence chunks, the same budget) is replayed on those rows as if they were a whole
prompt's evidence, and the table counts the facts kept whole against the one-shot default's record
(``results/records.jsonl``, ``chunkkv/f0.1/qa``).

The replay is an approximation of a chunked run at weight ``w``: it ignores what earlier
re-selections evicted, and the running copy maximum depends a little on what was held. At ``w = 1``
it agrees with the recorded chunked run on 68 of the 70 facts of the 14 documents (8k: 8, 16k: 4,
32k: 2), whole or not. The weight it picks is checked by real chunked runs afterwards (README, "The
copy part down-weighted in chunks").

    python -m studies.long_context.copy_weight 8192:0 8192:1 16384:0 32768:0 --rows /tmp/rows \\
        --out studies/long_context/results/copy_weight.txt
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from chunkkv import selection as sel
from chunkkv.pretrained import load_pretrained
from chunkkv.prompting import instructions
from chunkkv.scorers import SCORERS, Combined, Evidence, LayerInputs, ReconstructionScorer, SurprisalScorer

from .. import emit
from ..memory.agnostic_chunk_scores import chunked_rows
from .grid import RESULTS, Spec, _spans
from .tasks import make_document

WEIGHTS = (1.0, 0.75, 0.5, 0.35, 0.3, 0.25, 0.0)


def record_rows(model, tokenizer, length: int, index: int, path: Path) -> dict:
    """The chunked default's final running scores of one document (equal weights, C = 2048)."""
    doc = make_document(tokenizer, length, index, question_room=48 if length < 32768 else 256)  # as the grid
    ids = torch.tensor([doc.context_ids])
    method = Spec("chunkkv", keep_fraction=0.1, agnostic=True).build(tokenizer)
    # equal weights, as before "hybrid_chunked": written (2, 2) so the run keeps them (compress turns the
    # registered "hybrid" into "hybrid_chunked"); doubling both weights ranks exactly as (1, 1)
    method = replace(method, scoring=Combined(((SCORERS["shallow_reconstruction"], 2.0), (SurprisalScorer(), 2.0))))
    ctx, copy, surprisal = chunked_rows(model, ids, method, instructions(tokenizer, chat=False), 2048)
    rows = {"ids": ids[0], "copy": copy, "surprisal": surprisal, "spans": _spans(tokenizer, doc),
            "kept": ctx.kept_positions(ctx.cache.pruned_layers[0])}
    torch.save(rows, path)
    return rows


def replay(method, rows: dict) -> set[int]:
    """Positions ``method`` keeps when ``rows`` are a whole prompt's evidence (one layer's choice)."""
    ids, width = rows["ids"], rows["ids"].shape[0]
    kept = method.kept_per_layer([width], 1)[0][0]
    passes = {leaf.scoring_pass: {-1: rows["copy"][None, None, :]}
              for leaf, _w in method.scorer.parts if isinstance(leaf, ReconstructionScorer)} \
        if isinstance(method.scorer, Combined) else {}
    inputs = LayerInputs(queries=None, keys=torch.zeros(1, 1, width, 1), scaling=1.0, softcap=None, key_valid=None,
                         lengths=torch.tensor([width]), pad=torch.tensor([0]), kept=torch.tensor([kept]),
                         slots=kept, layer=0, memo=None, input_ids=ids[None], keep_recent=None,
                         evidence=Evidence(surprisal=rows["surprisal"][None], passes=passes))
    index = sel.finalize(method.select(inputs), torch.tensor([0]))[0]
    return set(index[0, 0].tolist())


def one_shot_facts() -> dict[tuple[int, int, int], bool]:
    """``(length, document, question) -> fact kept whole`` by the one-shot default at 10 % (the grid's record)."""
    kept = {}
    for line in (RESULTS / "records.jsonl").open(encoding="utf-8"):
        r = json.loads(line)
        if r["spec"] == "chunkkv/f0.1/qa":
            kept[(r["length"], r["doc"], r["qid"])] = r["fact_kept_mean"] >= 1.0
    return kept


def weighted(base, w: float):
    copy = SCORERS["shallow_reconstruction"]
    return replace(base, scoring=Combined(((copy, w), (SurprisalScorer(), 1.0))) if w > 0 else "surprisal")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("documents", nargs="+", help="length:index, e.g. 16384:0")
    parser.add_argument("--rows", required=True, help="folder of the recorded rows (made when missing)")
    parser.add_argument("--weights", default=",".join(f"{w:g}" for w in WEIGHTS))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also append the lines to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained("gemma3-270m", dtype=torch.float32, device="cpu")
    one_shot = one_shot_facts()
    base = Spec("chunkkv", keep_fraction=0.1, agnostic=True).build(tokenizer)
    weights = [float(w) for w in args.weights.split(",")]
    folder = Path(args.rows)
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[tuple[int, float], list[int]] = {}
    lines = []
    for spec in args.documents:
        length, index = (int(x) for x in spec.split(":"))
        path = folder / f"rows_{length}_{index}.pt"
        start = time.perf_counter()
        made = not path.exists()
        rows = record_rows(model, tokenizer, length, index, path) if made else torch.load(path, weights_only=False)
        took = f"rows made in {time.perf_counter() - start:.0f} s" if made else "rows recorded before"
        facts = {q: v["fact"] for q, v in rows["spans"].items() if "fact" in v}
        recorded = set(rows["kept"].tolist())
        lines.append(f"{length} #{index} ({took}): facts kept whole, "
                     f"recorded chunked run " + " ".join(f"q{q}:{all(p in recorded for p in f):d}" for q, f in facts.items()))
        for w in weights:
            kept = replay(weighted(base, w), rows)
            whole = {q: all(p in kept for p in f) for q, f in facts.items()}
            lines.append(f"  w {w:<4g} " + " ".join(f"q{q}:{whole[q]:d}" for q in facts))
            c = counts.setdefault((length, w), [0, 0, 0, 0])
            for q, ok in whole.items():
                ref = one_shot.get((length, index, q), False)
                c[0] += ok
                c[1] += ref
                c[2] += ref and not ok
                c[3] += ok and not ref
    lines.append("facts kept whole by the replay, against the one-shot default's record (lost / gained):")
    for (length, w), c in sorted(counts.items()):
        lines.append(f"  {length} w {w:<4g}: {c[0]} kept, one-shot {c[1]}; lost {c[2]}, gained {c[3]}")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
