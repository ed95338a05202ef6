"""Gemma 3 at 32k: is the chunked default's loss its selection or its states? (issue 24 item 4)

The question-agnostic default (10 %, sentence chunks) compresses each document once, and five
questions are asked of that cache (as in :mod:`.grid`). Three caches answer every question:

* **one-shot**: the default compressing the whole document's prefill (the grid's ``chunkkv/f0.1/qa``);
* **chunked**: the default in a chunked prefill of ``--chunk`` tokens (``chunkkv/f0.1/qa/p2048``),
  its own selection and keys and values computed over what was held;
* **forced**: the whole document's keys and values, pruned on every compressed layer to exactly the
  positions the chunked run kept (:func:`studies.memory.forced_selection.pruned_like`).

If *forced* answers as one-shot does, the chunked run chose well and lost in its states; if it answers
as *chunked* does, the loss is in what it kept. The SmolLM2 counterpart is
:mod:`studies.memory.forced_selection`; :mod:`.chunked_scores` runs the same three caches on one
document with its score profiles, and :mod:`.kept_diff` then asks which of the kept tokens matter.

    python -m studies.long_context.forced --docs 32768:0,1,3,5,7 --out studies/long_context/results/forced.jsonl
    python -m studies.long_context.forced --report studies/long_context/results/forced.jsonl

Records are appended per document (one line per question); a rerun skips the documents already there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from chunkkv.context import CompressedContext
from chunkkv.methods import make_method
from chunkkv.pipeline import compress, compress_from_capture
from chunkkv.pretrained import load_pretrained
from chunkkv.prompting import instructions

from ..memory.forced_selection import CACHES, common_arguments, pruned_like, three_caches
from .capture import capture_document
from .grid import CHUNKED_SPECS, WINDOW, Spec, _decode, _kept, _spans
from .tasks import MAX_NEW, make_document, score


def contexts(model, tokenizer, doc, chunk: int) -> tuple[CompressedContext, CompressedContext, CompressedContext]:
    """``(one_shot, chunked, full)`` for ``doc``: the default at 10 % on the whole prefill and in a
    chunked prefill of ``chunk`` tokens, and the whole prefill uncompressed (to be forced)."""
    chunk_spec = CHUNKED_SPECS[0] if chunk == CHUNKED_SPECS[0].prefill_chunk else Spec(
        "chunkkv", keep_fraction=0.1, agnostic=True, prefill_chunk=chunk)
    chunked = compress(model, torch.tensor([doc.context_ids]), method=chunk_spec.build(tokenizer),
                       prefill_chunk=chunk, tokenizer=tokenizer, chat_template=False)
    capture = capture_document(model, doc.context_ids, chunk=1024, window=2 * WINDOW, surprisal=True,
                               instructions=instructions(tokenizer, chat=False))
    one_shot = compress_from_capture(capture, Spec("chunkkv", keep_fraction=0.1, agnostic=True).build(tokenizer))
    return one_shot, chunked, compress_from_capture(capture, make_method("full"))


def run_document(model, tokenizer, length: int, index: int, chunk: int) -> list[dict]:
    doc = make_document(tokenizer, length, index, seed=0, question_room=48 if length < 32768 else 256)
    spans = _spans(tokenizer, doc)
    t0 = time.perf_counter()
    one_shot, chunked, full = contexts(model, tokenizer, doc, chunk)
    caches = {"one_shot": one_shot, "chunked": chunked, "forced": pruned_like(full, chunked)}
    del full
    records = []
    for q in doc.questions:
        preds = {name: _decode(model, tokenizer, [ctx], q.question_ids, MAX_NEW[q.task])[0]
                 for name, ctx in caches.items()}
        record = {"length": length, "doc": index, "qid": q.qid, "task": q.task, "chunk": chunk}
        for name, ctx in caches.items():
            kept = _kept(ctx, spans.get(q.qid, {}))
            record[name] = {"prediction": preds[name], "score": score(q, preds[name], length, index)["score"],
                            "fact_whole_layers": kept.get("fact_whole_layers")}
        records.append(record)
    for r in records:
        r["seconds"] = round(time.perf_counter() - t0, 1)
    return records


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    lines = []
    for length in sorted({r["length"] for r in rows}):
        group = [r for r in rows if r["length"] == length]
        docs = sorted({r["doc"] for r in group})
        lines.append(f"L = {length}, documents {', '.join(map(str, docs))}: n = {len(group)} questions")
        lines += three_caches(group, lambda name, g=group: "fact whole on "
                              f"{sum(r[name]['fact_whole_layers'] or 0 for r in g) / len(g):.2f} compressed layers")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--docs", default="32768:0,1", help="LENGTH:INDEX,INDEX;... the documents to run")
    parser.add_argument("--model", default="gemma3-270m")
    common_arguments(parser, 2048, "studies/long_context/results/forced.jsonl")
    args = parser.parse_args(argv)
    if args.report:
        print(report(Path(args.report)))
        return 0
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(args.model, dtype=torch.float32, device="cpu")
    out = Path(args.out)
    done = set()
    if out.exists():
        done = {(r["length"], r["doc"], r["chunk"]) for r in map(json.loads, out.open(encoding="utf-8"))}
    for item in filter(None, args.docs.split(";")):
        length, indices = item.split(":")
        for index in map(int, indices.split(",")):
            if (int(length), index, args.chunk) in done:
                continue
            records = run_document(model, tokenizer, int(length), index, args.chunk)
            with out.open("a", encoding="utf-8") as f:
                f.write("".join(json.dumps(r) + "\n" for r in records))
            print(f"{length} #{index}: " + "; ".join(
                f"q{r['qid']} " + " ".join(f"{k[0]}{r[k]['score']:.0f}" for k in CACHES) for r in records)
                  + f" ({records[0]['seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
