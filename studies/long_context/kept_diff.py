"""Where the chunked default's choice differs from one-shot's, and which difference costs the answer
(issue 24 item 4; Gemma 3, question-agnostic default at 10 %, one document).

The forced cache (:mod:`.forced`) showed that at 32k the chunked run loses some answers in its
selection, not its states: one-shot's keys and values pruned to the chunked run's positions lose
them too, although every fact is kept whole. This script compares the two kept sets layer by layer
(by region of the document) and answers every question on the whole prefill's keys and values
pruned to mixtures of the two: one region from one-shot's choice, the rest from the chunked run's.

    python -m studies.long_context.kept_diff --doc 32768:0 --out studies/long_context/results/kept_diff.txt
"""

from __future__ import annotations

import argparse
import time

import torch

from chunkkv.pretrained import load_pretrained

from .. import emit
from ..memory.forced_selection import pruned_to
from .forced import contexts
from .grid import CHUNKED_SPECS, _decode, _spans
from .tasks import MAX_NEW, make_document, score


def _mix(base: dict[int, torch.Tensor], other: dict[int, torch.Tensor], lo: int, hi: int) -> dict[int, torch.Tensor]:
    """``base``'s positions outside ``[lo, hi)`` and ``other``'s inside, per layer."""
    out = {}
    for i, b in base.items():
        o = other[i]
        out[i] = torch.cat([b[(b < lo) | (b >= hi)], o[(o >= lo) & (o < hi)]])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--doc", default="32768:0", help="LENGTH:INDEX")
    parser.add_argument("--regions", type=int, default=8, help="the document cut into this many equal regions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also write the report here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained("gemma3-270m", dtype=torch.float32, device="cpu")
    length, index = (int(x) for x in args.doc.split(":"))
    doc = make_document(tokenizer, length, index, seed=0, question_room=48 if length < 32768 else 256)
    spans = _spans(tokenizer, doc)
    t0 = time.perf_counter()
    one_shot, chunked, full = contexts(model, tokenizer, doc, CHUNKED_SPECS[0].prefill_chunk)
    layers = chunked.cache.pruned_layers
    kept_one = {i: one_shot.kept_positions(i) for i in layers}
    kept_chunked = {i: chunked.kept_positions(i) for i in layers}
    total = len(doc.context_ids)
    edges = [round(total * k / args.regions) for k in range(args.regions + 1)]
    facts = {q.qid: (min(spans[q.qid]["fact"]) if q.qid in spans else None) for q in doc.questions}
    lines = [f"Gemma 3 270M, document {length}:{index} ({total} tokens), the default at 10 %; chunked C = "
             f"{CHUNKED_SPECS[0].prefill_chunk}; compressed layers {layers}; facts asked start at "
             + ", ".join(f"q{k} {v}" for k, v in facts.items()), "",
             "kept per region (one-shot / chunked / both), per compressed layer:"]
    for i in layers:
        cells = []
        for lo, hi in zip(edges, edges[1:]):
            o = kept_one[i][(kept_one[i] >= lo) & (kept_one[i] < hi)]
            c = kept_chunked[i][(kept_chunked[i] >= lo) & (kept_chunked[i] < hi)]
            both = len(set(o.tolist()) & set(c.tolist()))
            cells.append(f"{len(o)}/{len(c)}/{both}")
        lines.append(f"  layer {i}: " + "  ".join(cells))
    variants = {"one-shot": kept_one, "chunked": kept_chunked}
    for lo, hi in zip(edges, edges[1:]):
        variants[f"chunked, [{lo}, {hi}) from one-shot"] = _mix(kept_chunked, kept_one, lo, hi)
    variants[f"chunked, last {total - edges[-3]} from one-shot"] = _mix(kept_chunked, kept_one, edges[-3], total)
    variants[f"one-shot, last {total - edges[-3]} from chunked"] = _mix(kept_one, kept_chunked, edges[-3], total)
    lines += ["", "answers on the whole prefill's keys and values pruned to each choice (1 = right):"]
    for name, kept in variants.items():
        ctx = pruned_to(full, {i: (v.sort().values.view(1, 1, -1), None) for i, v in kept.items()})
        size = sum(len(v) for v in kept.values()) / len(kept)
        got = []
        for q in doc.questions:
            pred = _decode(model, tokenizer, [ctx], q.question_ids, MAX_NEW[q.task])[0]
            got.append(f"q{q.qid} {score(q, pred, length, index)['score']:.0f} {pred.splitlines()[0][:28]!r}")
        lines.append(f"  {name} (mean {size:.0f} kept): " + "; ".join(got))
        del ctx
    lines.append(f"\n({time.perf_counter() - t0:.0f} s)")
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
