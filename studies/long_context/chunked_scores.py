"""Where the question-agnostic default loses facts in chunks on Gemma 3 at 32k (issue 24 item 4):
its two scores, one-shot against chunked, on one document of the long-context grid.

For the document (``length:index`` of :mod:`.tasks`) it compresses the context alone at 10 % with
the question-agnostic default, once from the one-shot capture (as the grid's ``chunkkv/f0.1/qa``
rows) and once by a chunked prefill of ``--chunk`` tokens (the ``.../p2048`` rows), and prints per
prefill chunk: the mean of each score over its row maximum (the default's normalisation), each
question's fact the same way, and how many of the fact's tokens each mode kept. Then every question
is answered on three caches: one-shot, chunked, and **forced**: the one-shot prefill's keys and
values pruned to exactly the positions the chunked run kept (chunked's selection, one-shot's states).

    python -m studies.long_context.chunked_scores 32768:0 --out studies/long_context/results/chunked_scores.txt
"""

from __future__ import annotations

import argparse

import torch

from chunkkv.methods import make_method
from chunkkv.pipeline import compress_from_capture
from chunkkv.plan import chunk_bounds
from chunkkv.pretrained import load_pretrained
from chunkkv.prompting import instructions

from .. import emit
from ..memory.agnostic_chunk_scores import chunked_rows, one_shot_rows
from ..memory.forced_selection import pruned_like
from .capture import capture_document
from .grid import Spec, _decode, _spans
from .tasks import MAX_NEW, make_document, score


def _rel(row: torch.Tensor, positions: list[int]) -> float:
    return float(row[positions].mean() / row.max())


def inspect(model, tokenizer, length: int, index: int, chunk: int) -> list[str]:
    doc = make_document(tokenizer, length, index, question_room=48 if length < 32768 else 256)  # as the grid
    ids = torch.tensor([doc.context_ids])
    width = ids.shape[1]
    spans = _spans(tokenizer, doc)
    method = Spec("chunkkv", keep_fraction=0.1, agnostic=True).build(tokenizer)
    asked = instructions(tokenizer, chat=False)

    capture = capture_document(model, doc.context_ids, chunk=1024, window=64, surprisal=True, instructions=asked)
    first, copy_one, surprisal_one = one_shot_rows(capture, method)
    one_shot = compress_from_capture(capture, method)
    kept_one = set(one_shot.kept_positions(first).tolist())
    full = compress_from_capture(capture, make_method("full"))
    del capture

    chunked, copy_chunked, surprisal_chunked = chunked_rows(model, ids, method, asked, chunk)
    kept_chunked = set(chunked.kept_positions(first).tolist())
    forced = pruned_like(full, chunked)

    bounds = chunk_bounds(width, chunk)
    lines = [f"Gemma 3 270M, {length} #{index}: {width} context tokens, chunks of {chunk}, question-agnostic default 10 %"]
    for name, one, ch in (("copy", copy_one, copy_chunked), ("surprisal", surprisal_one, surprisal_chunked)):
        for mode, row in (("one-shot", one), ("chunked", ch)):
            means = " ".join(f"{float(row[lo:hi].mean() / row.max()):.3f}" for lo, hi in zip(bounds, bounds[1:]))
            lines.append(f"  {name:9s} {mode:8s} chunk means {means}")
    for mode, kept in (("one-shot", kept_one), ("chunked", kept_chunked)):
        per = [sum(lo <= p < hi for p in kept) for lo, hi in zip(bounds, bounds[1:])]
        lines.append(f"  kept per chunk {mode:8s} {per}")
    for q in doc.questions:
        fact = spans.get(q.qid, {}).get("fact")
        if not fact:
            continue
        where = next(i for i, (lo, hi) in enumerate(zip(bounds, bounds[1:])) if lo <= fact[0] < hi)
        lines.append(
            f"  q{q.qid} {q.task} depth {q.depth:.2f} fact at {fact[0]} (chunk {where}, {len(fact)} tokens): "
            f"copy {_rel(copy_one, fact):.3f} / {_rel(copy_chunked, fact):.3f}, "
            f"surprisal {_rel(surprisal_one, fact):.3f} / {_rel(surprisal_chunked, fact):.3f} (one-shot / chunked); "
            f"kept {sum(p in kept_one for p in fact)} / {sum(p in kept_chunked for p in fact)}")
    for q in doc.questions:
        preds = [_decode(model, tokenizer, [c], q.question_ids, MAX_NEW[q.task])[0] for c in (one_shot, chunked, forced)]
        got = [score(q, p, length, index)["score"] for p in preds]
        lines.append(f"  q{q.qid} answers (one-shot / chunked / forced): {got[0]:.0f} / {got[1]:.0f} / {got[2]:.0f}  "
                     + " | ".join(repr(p[:40]) for p in preds))
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("documents", nargs="+", help="length:index, e.g. 32768:0")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also append the lines to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained("gemma3-270m", dtype=torch.float32, device="cpu")
    for spec in args.documents:
        length, index = (int(x) for x in spec.split(":"))
        emit(inspect(model, tokenizer, length, index, args.chunk), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
