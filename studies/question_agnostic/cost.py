"""Scoring cost as a ratio to the prefill, from one run (issue 14): SmolLM2, 1 CPU thread (``--threads``).

    python -m studies.question_agnostic cost --lengths 1024,2048,4096

For each length: one NIAH document (:mod:`.niah`), then ``chunkkv.compress`` with
ChunkKV 20 % for each scoring, reuse depth 1 and 2; prints ``stats.prefill_seconds`` and
``stats.scoring_seconds`` (the scoring pass alone) and their ratio, and the plain window
compression's prefill as the baseline. Same process, same document, interleaved.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import chunkkv
from chunkkv.pretrained import load_pretrained
from chunkkv.scorers import SCORERS, Combined, ReconstructionScorer, SurprisalScorer

#: Scorers measured beside the registry's names.
VARIANTS = {
    "shallow_last": ReconstructionScorer(depth=0.25, sink=4, last_only=True),
    "hybrid_last": Combined(((ReconstructionScorer(depth=0.25, sink=4, last_only=True), 1.0), (SurprisalScorer(), 1.0))),
}

from .niah import NEEDLES, build_document, encode


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m studies.question_agnostic cost")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--out", default=None, help="also write the rows here (JSONL), e.g. results/cost_quarter.jsonl")
    ap.add_argument("--scorings", default="window,probe,reconstruction,shallow_reconstruction,surprisal")
    ap.add_argument("--depths", default="1,2", help="reuse depths")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, tok = load_pretrained("smollm2", dtype=torch.float32, device="cpu")
    rows = []
    for length in [int(x) for x in args.lengths.split(",")]:
        document, _ = build_document(tok, length, 0)
        ids = encode(tok, document, NEEDLES[0][1])[0]
        chunkkv.compress(model, ids[:, :256], method=chunkkv.ChunkKV(keep_fraction=0.2))  # warm-up
        for depth in [int(x) for x in args.depths.split(",")]:
            plain = None  # the window run's prefill (no surprisal projection), when "window" comes first
            for scoring in args.scorings.split(","):
                method = chunkkv.ChunkKV(keep_fraction=0.2, reuse_depth=depth,
                                         scoring=scoring if scoring in SCORERS else VARIANTS[scoring])
                ctx = chunkkv.compress(model, ids, method=method, tokenizer=tok)  # tokenizes its pass's instruction
                if scoring == "window":
                    plain = ctx.stats.prefill_seconds
                row = {"length": ids.shape[1], "reuse_depth": depth, "scoring": scoring,
                       "prefill_s": ctx.stats.prefill_seconds, "scoring_s": ctx.stats.scoring_seconds,
                       "ratio": ctx.stats.scoring_seconds / ctx.stats.prefill_seconds,
                       "scored_layers": len(ctx.stats.scored_layers)}
                if plain is not None:  # the scoring (surprisal's projection included) over a plain prefill
                    row["ratio_to_window_prefill"] = ctx.stats.scoring_seconds / plain
                rows.append(row)
                print(json.dumps(row), flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(json.dumps(r) for r in rows) + "\n")


if __name__ == "__main__":
    main()
