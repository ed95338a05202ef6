"""Where the question-agnostic default loses the needle in chunks (issue 24): its two scores,
one-shot against chunked, on single samples of the real-model grid.

For each sample (``task:length:index`` of :mod:`studies.real_grid`, seed 0, the context alone, as a
question-agnostic row compresses it) it prints, per prefill chunk of ``--chunk`` tokens: the mean of
each score over the chunk and over the needle, each over its row maximum (the default's
normalisation), from the one-shot capture and from the chunked prefill's running scores; and how many
tokens each mode keeps per chunk, the needle's tokens among them.

    python -m studies.memory.agnostic_chunk_scores niah_paper:2048:11 multikey:4096:5 \\
        --out studies/memory/results/agnostic_chunk_scores.txt
"""

from __future__ import annotations

import argparse

import torch

from chunkkv.agnostic import agnostic_method
from chunkkv.cache import ChunkKVCache
from chunkkv.capture import capture_prefill, layer_scores
from chunkkv.chunk_scoring import RunningScores, run_in_chunks
from chunkkv.context import CompressedContext
from chunkkv.inline import prefill_inline
from chunkkv.methods import make_method
from chunkkv.pipeline import compress_from_capture
from chunkkv.plan import chunk_bounds
from chunkkv.pretrained import load_pretrained
from chunkkv.prompting import instructions
from chunkkv.scorers import SHALLOW_SINK, ReconstructionScorer, SurprisalScorer
from chunkkv.scoring import first_token_surprisal

from .. import emit
from ..real_grid.grid import _span_tokens
from ..real_grid.tasks import context_split, make_samples, render


def _per_chunk(row: torch.Tensor, bounds: list[int], needle: list[int]) -> str:
    """Chunk means and the needle's mean of ``row`` over its maximum (each chunk's first
    ``SHALLOW_SINK`` tokens left out: in the first chunk, the head the default keeps by force)."""
    top = row.max()
    means = [f"{float(row[lo + SHALLOW_SINK:hi].mean() / top):.3f}" for lo, hi in zip(bounds, bounds[1:])]
    return f"chunks {' '.join(means)} | needle {float(row[needle].mean() / top):.3f}" if needle else " ".join(means)


def _kept(positions: torch.Tensor, bounds: list[int], needle: list[int]) -> str:
    held = set(positions.tolist())
    per = [int(((positions >= lo) & (positions < hi)).sum()) for lo, hi in zip(bounds, bounds[1:])]
    return f"kept per chunk {per}, needle {sum(n in held for n in needle)}/{len(needle)}"


def one_shot_rows(capture, method) -> tuple[int, torch.Tensor, torch.Tensor]:
    """The question-agnostic default's two score rows on a one-shot capture of one unpadded prompt:
    ``(first compressed layer, copy [T], surprisal [T])`` (one row serves every layer)."""
    first = capture.cache.pruned_layers[0]
    parts = {type(p).__name__: p for p, _w in method.scorer.parts}
    copy = layer_scores(capture, parts[ReconstructionScorer.__name__], [first])[first][0, 0]
    surprisal = layer_scores(capture, parts[SurprisalScorer.__name__], [first])[first][0, 0]
    return first, copy, surprisal


def chunked_rows(model, ids: torch.Tensor, method, asked, chunk: int) -> tuple[CompressedContext, torch.Tensor,
                                                                                 torch.Tensor]:
    """The question-agnostic chunked prefill of one unpadded prompt as ``compress(..., prefill_chunk=chunk)``
    runs it, with the running scores it ends on: ``(context, copy [T], surprisal [T])``."""
    width = ids.shape[1]
    mask = torch.ones_like(ids)
    if width > chunk:  # as compress: "hybrid" runs as "hybrid_chunked"
        method = run_in_chunks(method)
    block = min(512, max(64, chunk // 4))  # compress's scoring block for this chunk size
    running = RunningScores(model, method.scorer, ids, mask, asked,
                            ChunkKVCache(model.config, prompt_length=width).pruned_layers, block)
    ctx = prefill_inline(model, ids, mask, method, [width], prefill_chunk=chunk, running=running)
    return ctx, next(iter(running.copy.values()))[0], first_token_surprisal(running.nll, mask)[0]


def inspect(model, tokenizer, task: str, length: int, index: int, chunk: int, fraction: float) -> list[str]:
    sample = make_samples(tokenizer, task, length, index + 1, seed=0)[index]
    context_ids, _ = context_split(tokenizer, sample)
    ids = torch.tensor([context_ids])
    width = ids.shape[1]
    text = render(tokenizer, sample.context, sample.question, sample.prefix)
    needle = [i for i in _span_tokens(tokenizer, text, sample.reference) if i < width]
    method = agnostic_method(make_method("chunkkv", keep_fraction=fraction), None, tokenizer)
    asked = instructions(tokenizer, chat=True)
    capture = capture_prefill(model, ids, window=method.window, surprisal=True, instructions=asked)
    first, copy_one, surprisal_one = one_shot_rows(capture, method)
    one_shot = compress_from_capture(capture, method).cache.layers[first].slot_positions()[0, 0]
    chunked, copy_chunked, surprisal_chunked = chunked_rows(model, ids, method, asked, chunk)
    bounds = chunk_bounds(width, chunk)
    return [
        f"{task} {length} #{index}: {width} context tokens, needle at {needle[0] if needle else '-'}, "
        f"chunks {bounds}, ChunkKV {fraction:.0%} question-agnostic default",
        f"  copy       one-shot {_per_chunk(copy_one, bounds, needle)}",
        f"  copy       chunked  {_per_chunk(copy_chunked, bounds, needle)}",
        f"  surprisal  one-shot {_per_chunk(surprisal_one, bounds, needle)}",
        f"  surprisal  chunked  {_per_chunk(surprisal_chunked, bounds, needle)}",
        f"  one-shot {_kept(one_shot, bounds, needle)}",
        f"  chunked  {_kept(chunked.cache.layers[first].slot_positions()[0, 0], bounds, needle)}",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("samples", nargs="+", help="task:length:index, e.g. niah_paper:2048:11")
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--fraction", type=float, default=0.2)
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", help="also append the lines to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(args.model, dtype=torch.float32, device="cpu")
    for spec in args.samples:
        task, length, index = spec.split(":")
        emit(inspect(model, tokenizer, task, int(length), int(index), args.chunk, args.fraction), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
