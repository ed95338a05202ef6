"""Would a recency ramp on the chunked copy score help (issue 24 item 4)? A replay, like :mod:`.copy_weight`.

At 32k the one-shot default keeps the document's end heavily (856 of its 3,277 tokens from the last
2,048), because one-shot's copy score rises along the document (chunk means 0.18 at the start to
0.47-0.51 at the end on both 32k documents: ``results/chunked_scores_hc.txt``). In chunks each copy
pass is taken over its own chunk's mean, so that rise is gone and the kept tokens spread evenly.
The remaining 32k loss is in what else is kept, not the facts (every fact whole in the forced cache),
so the candidate was to give the chunked copy score one-shot's rise back: each position's copy score
times ``a + (1 - a) * position / length`` (over its mean, so the level stays), ``a = 1`` being today's.

This replays the default's final selection on the recorded chunked rows (``copy_weight --rows``) for
ramps ``a`` and copy weights ``w``, and counts the facts kept whole against the one-shot record, and
at 32k the kept tokens per 2,048-token chunk.

    python -m studies.long_context.recency_replay 8192:0 ... 32768:1 --rows /tmp/rows \\
        --out studies/long_context/results/recency_replay.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from chunkkv.pretrained import load_pretrained

from .. import emit
from .copy_weight import one_shot_facts, record_rows, replay, weighted
from .grid import Spec

RAMPS = (1.0, 0.6, 0.37)
WEIGHTS = (0.3, 0.5, 1.0)


def ramped(rows: dict, a: float) -> dict:
    """``rows`` with the copy score times a ramp from ``a`` at the start to 1 at the end, over its mean."""
    width = rows["ids"].shape[0]
    ramp = a + (1 - a) * torch.arange(width, dtype=torch.float32) / width
    return dict(rows, copy=rows["copy"] * ramp / ramp.mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("documents", nargs="+", help="length:index, e.g. 16384:0")
    parser.add_argument("--rows", required=True, help="folder of the recorded rows (made when missing)")
    parser.add_argument("--out", help="also append the lines to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = load_pretrained("gemma3-270m", dtype=torch.float32, device="cpu")
    one_shot = one_shot_facts()
    base = Spec("chunkkv", keep_fraction=0.1, agnostic=True).build(tokenizer)
    folder = Path(args.rows)
    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for spec in args.documents:
        length, index = (int(x) for x in spec.split(":"))
        path = folder / f"rows_{length}_{index}.pt"
        rows = torch.load(path, weights_only=False) if path.exists() else record_rows(model, tokenizer, length, index, path)
        docs.append((length, index, rows))
    lines = [f"documents: {', '.join(args.documents)}; facts kept whole (one-shot's count), lost / gained against it"]
    for a in RAMPS:
        for w in WEIGHTS:
            counts: dict[int, list[int]] = {}
            spread = []
            for length, index, rows in docs:
                kept = replay(weighted(base, w), ramped(rows, a))
                c = counts.setdefault(length, [0, 0, 0, 0])
                for q, v in rows["spans"].items():
                    if "fact" not in v:
                        continue
                    ok, ref = all(p in kept for p in v["fact"]), one_shot.get((length, index, q), False)
                    c[0], c[1], c[2], c[3] = c[0] + ok, c[1] + ref, c[2] + (ref and not ok), c[3] + (ok and not ref)
                if length == 32768:
                    spread.append(torch.bincount(torch.tensor(sorted(kept)) // 2048, minlength=16).tolist())
            lines.append(f"ramp a {a:<4g} copy weight {w:<3g}: " + "; ".join(
                f"{L}: {c[0]} ({c[1]}), lost {c[2]}, gained {c[3]}" for L, c in sorted(counts.items())))
            lines += [f"    32k kept per chunk {s}" for s in spread]
    emit(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
