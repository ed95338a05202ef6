"""Which layers' reconstruction attention keeps the answers: the dev-set study behind
``scoring="shallow_reconstruction"`` (issue 14).

For the dev documents of :mod:`.tune` (documents 50.., 8 dev needles, never the test or
held-out ones) it runs KVzip's reconstruction pass once per document on every layer and caches each
layer's per-KV-head scores (``--cache``); then, for each way of turning those into one score per
token, it counts how many needles' answer words survive ChunkKV's selection on sentence chunks
(the library's own ``select_chunks``; no decoding), beside the surprisal default.

Usage: python -m studies.question_agnostic shallow_dev --lengths 1024,2048,4096 \
           --out studies/question_agnostic/results/tuning_shallow.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from chunkkv import selection as sel
from chunkkv.budget import Budget
from chunkkv.capture import capture_prefill, layer_scores
from chunkkv.prompting import instructions
from chunkkv.scorers import REPEAT, ScoringPass
from chunkkv.scoring_pass import run_pass

from . import tune


def _rank(x: torch.Tensor) -> torch.Tensor:
    """Each value's rank in its row, in [0, 1] (1 = the largest)."""
    return x.argsort().argsort().float() / max(1, x.shape[-1] - 1)


def _q99(x: torch.Tensor, q: float = 0.99) -> torch.Tensor:
    """Over the row's ``q`` quantile, clamped at 1: one outlier token no longer sets the scale."""
    return (x / torch.quantile(x[1:], q).clamp(min=1e-12)).clamp(max=1.0)


def reconstruction_scores(model, tok, data, lengths, cache: Path, shallow: int | None = None) -> dict:
    """{(length, doc): [layers, kv heads, T] float16} reconstruction scores, cached and resumable.
    ``shallow``: only the first that many layers (the pass stops after them)."""
    out = torch.load(cache) if cache.exists() else {}
    n_layers = model.config.num_hidden_layers
    layers = list(range(shallow or n_layers))
    for length, doc, ids, *_ in data:
        if length not in lengths or (length, doc) in out:
            continue
        t0 = time.perf_counter()
        capture = capture_prefill(model, ids, torch.ones_like(ids), window=1, instructions=instructions(tok))
        if shallow:  # per-layer scores of the first layers, the forward stopped after them
            spec = ScoringPass(REPEAT, repeat=True, depth=shallow / n_layers, reduce="max")
            scores = run_pass(model, capture, spec, layers, capture.instructions(REPEAT))
        else:
            scores = layer_scores(capture, "reconstruction", layers)  # the pass: every layer, per KV head
        out[(length, doc)] = torch.stack([scores[i][0] for i in layers]).half()
        torch.save(out, cache)
        print(f"{length}/{doc}: {time.perf_counter() - t0:.1f} s", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m studies.question_agnostic shallow_dev")
    ap.add_argument("--lengths", default="1024,2048")
    ap.add_argument("--cache", default="/tmp/chunkkv-dev8-recon.pt")
    ap.add_argument("--dev-cache", default="/tmp/chunkkv-agnostic-dev8.pt", help="the tune study's cache")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shallow", type=int, default=None,
                    help="score only the first N layers (the rows that need deeper ones are left out)")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from chunkkv.boundaries import boundary_token_ids
    from chunkkv.pretrained import load_pretrained

    model, tok = load_pretrained("smollm2", dtype=torch.float32, device="cpu")
    lengths = [int(x) for x in args.lengths.split(",")]
    data = tune.dev_documents(tok, model, [1024, 2048, 4096], 8, Path(args.dev_cache))
    recon = reconstruction_scores(model, tok, data, lengths, Path(args.cache), args.shallow)
    docs = [d for d in data if d[0] in lengths and (d[0], d[1]) in recon]
    ends = torch.tensor(sorted(boundary_token_ids(tok, clauses=False)))
    budgets = [Budget(keep_fraction=0.1), Budget(keep_fraction=0.2), Budget(keep_fraction=0.3), Budget(keep_tokens=128)]
    n_layers = model.config.num_hidden_layers
    half = n_layers // 2
    per_layer = lambda x: x.sum(1) / x.sum(1)[:, 1:].amax(-1, keepdim=True)  # noqa: E731  (head-summed, max-normalised)
    variants = {  # name -> (token scores from (surprisal [T], reconstruction [L, H, T]), chunk reduce, peak weight)
        "surprisal (the default)": (lambda s, r: s, "sqrt_mean", 0.2),
        f"reconstruction, mean over all {n_layers} layers of max-normalised head sums": (
            lambda s, r: per_layer(r).mean(0), "mean", 0.0),
        f"reconstruction, max over every head of all {n_layers} layers": (lambda s, r: r.amax((0, 1)), "mean", 0.0),
        **{f"reconstruction, one layer: {i}": ((lambda s, r, i=i: r[i].sum(0)), "mean", 0.0) for i in range(n_layers)},
        **{f"reconstruction, max over every head of layers < {k}": ((lambda s, r, k=k: r[:k].amax((0, 1))), "mean", 0.0)
           for k in (4, 6, 8, 10, 12, 15, 20)},
        f"max over every head of layers < {half}, sentence-chunk settings (sqrt_mean + 0.2 peak: chosen)": (
            lambda s, r: r[:half].amax((0, 1)), "sqrt_mean", 0.2),
        f"hybrid: surprisal / its max + max over every head of layers < {half} / its max (sentence-chunk settings)": (
            lambda s, r: s / s[1:].amax() + r[:half].amax((0, 1)) / r[:half].amax((0, 1))[1:].amax(), "sqrt_mean", 0.2),
        **{f"max over every head of layers < {k}, sentence-chunk settings": (
            (lambda s, r, k=k: r[:k].amax((0, 1))), "sqrt_mean", 0.2) for k in (6, 8, 10)},
        **{f"hybrid with layers < {k}": ((lambda s, r, k=k: s / s[1:].amax() + r[:k].amax((0, 1)) /
                                          r[:k].amax((0, 1))[1:].amax()), "sqrt_mean", 0.2) for k in (6, 8, 10)},
        **{f"hybrid (layers < 8) combined by {name}": (fn, "sqrt_mean", 0.2) for name, fn in {
            "rank (each score's percentile in its row), summed": lambda s, r: _rank(s) + _rank(r[:8].amax((0, 1))),
            "the larger of the two max-normalised": lambda s, r: torch.maximum(
                s / s[1:].amax(), r[:8].amax((0, 1)) / r[:8].amax((0, 1))[1:].amax()),
            "each over its row's 99th percentile, clamped at 1, summed": lambda s, r: _q99(s) + _q99(r[:8].amax((0, 1))),
            "each over its row's 95th percentile, clamped at 1, summed": lambda s, r: _q99(s, 0.95) + _q99(r[:8].amax((0, 1)), 0.95),
        }.items()},
        **{f"hybrid (layers < 8), chunks ranked by {reduce} + {peak} x peak": (
            (lambda s, r: s / s[1:].amax() + r[:8].amax((0, 1)) / r[:8].amax((0, 1))[1:].amax()), reduce, peak)
           for reduce in ("sqrt_mean", "mean") for peak in (0.0, 0.5, 1.0)},
        **{f"hybrid with layer {k - 1} only (the last of layers < {k})": ((lambda s, r, k=k: s / s[1:].amax() +
           r[k - 1].amax(0) / r[k - 1].amax(0)[1:].amax()), "sqrt_mean", 0.2) for k in (8,)},
        f"max over every head of the odd layers < {half}": (lambda s, r: r[1:half:2].amax((0, 1)), "mean", 0.0),
        f"max over every head of every third layer < {half}": (lambda s, r: r[0:half:3].amax((0, 1)), "mean", 0.0),
    }
    lines = [f"Dev set: SmolLM2-135M-Instruct, {len(docs)} essay documents ({args.lengths} tokens, documents "
             f"{tune.DEV_OFFSET}..), 4 dev needles each, {4 * len(docs)} needles. Cell: needles whose answer words "
             "ChunkKV keeps on sentence chunks <= 30 tokens (window 32 kept too; no decoding).", "",
             "| token score | " + " | ".join(b.describe() for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    depth = min(int(r.shape[0]) for r in recon.values()) if recon else 0
    for name, (score, reduce, peak) in variants.items():
        try:
            score(docs[0][3], recon[(docs[0][0], docs[0][1])].float())
        except IndexError:
            continue  # a row that needs layers the pass did not score (--shallow)
        if depth < n_layers and ("all" in name or any(f"< {k}" in name for k in (10, 12, 15, 20)) or
                                 any(f"one layer: {i}" == name.split(", ")[-1] for i in range(depth, n_layers))):
            continue
        cells = []
        for budget in budgets:
            kept = 0
            for length, doc, ids, s, spans, answers in docs:
                segs = sel.sentence_segments(torch.isin(ids[0], ends)[None], 30)[0]
                keep = tune.kept_set(score(s, recon[(length, doc)].float()), budget, 1, 10, segments=segs,
                                     reduce=reduce, peak=peak)
                kept += sum(set(range(lo, hi)) <= keep for lo, hi in answers)
            cells.append(str(kept))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
