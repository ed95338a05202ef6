"""Trace one answer through a look-ahead chunked prefill (issue 24): on how many layers the answer's
tokens are held after each chunk's re-selection, at the end, and with one-shot compression.

    python -m studies.memory.trace_lookahead --task niah_paper --length 4096 --index 0 --keep-tokens 128 \
        --chunk 1024 --reserve 1.5

SmolLM2-135M-Instruct, the real_grid sample of that task, length and index (chat template, query-aware).
The per-chunk states are read by wrapping ``chunkkv.inline._look_ahead`` for this run only.
"""

from __future__ import annotations

import argparse

import torch

import chunkkv
from chunkkv import ChunkKV, inline, load_pretrained

from ..real_grid.tasks import context_split, make_samples, render


def _held(span: torch.Tensor, positions: torch.Tensor) -> float:
    return float(torch.isin(span, positions.reshape(-1)).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.memory.trace_lookahead", description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="niah_paper")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--keep-tokens", type=int, default=128)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--reserve", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_pretrained("smollm2", dtype=torch.float32, device="cpu")
    sample = make_samples(tok, args.task, args.length, args.index + 1, seed=0)[args.index]
    text = render(tok, sample.context, sample.question, sample.prefix)
    context_ids, question_ids = context_split(tok, sample)
    ids = torch.tensor([context_ids + question_ids])
    answer = next(a for a in sample.answers if a in sample.reference)
    a0 = text.index(sample.reference) + sample.reference.index(answer)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    span = torch.tensor([i for i, (s, e) in enumerate(offsets) if s < a0 + len(answer) and e > a0])
    print(f"{args.task} {args.length} #{args.index}: answer {answer!r} at tokens {span.tolist()} of {ids.shape[1]}")
    method = ChunkKV(keep_tokens=args.keep_tokens, window=32, chunk_size=10)
    original, trace = inline._look_ahead, []

    def traced(model, session, input_ids, attention_mask, position_ids, seen):
        original(model, session, input_ids, attention_mask, position_ids, seen)
        trace.append((seen, [_held(span, layer.slot_positions()[0]) for layer in session.cache.layers]))

    inline._look_ahead = traced
    try:
        chunked = chunkkv.compress(model, ids, method=method, prefill_chunk=args.chunk, reserve=args.reserve)
    finally:
        inline._look_ahead = original
    one_shot = chunkkv.compress(model, ids, method=method)
    rows = [(f"after {seen} tokens", held) for seen, held in trace]
    for name, ctx in (("chunked, end", chunked), ("one-shot", one_shot)):
        rows.append((name, [_held(span, ctx.kept_positions(layer)) for layer in ctx.cache.pruned_layers]))
    for name, held in rows:
        layers = "".join("#" if h == 1 else ("+" if h > 0 else ".") for h in held)
        print(f"{name:>22}: answer held whole on {sum(h == 1 for h in held):2d} of {len(held)} layers  {layers}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
