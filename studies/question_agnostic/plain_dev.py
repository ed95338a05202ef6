"""A dev set of plainly worded needles, for the sentence score of question-agnostic ChunkKV (issue 14).

The held-out needles showed the default losing a plain fact ("... sold at a gas station in
Tucson."): few of its words surprise the model or the copy heads. The dev needles of
:mod:`.tune` are mostly names and numbers. This set (8 new plain facts, documents 60..,
never the test or held-out needles or documents) judges ways of ranking sentence chunks on the
default's token scores (hybrid: surprisal / its max + shallow reconstruction / its max) by how
many needles' answer words ChunkKV keeps, without decoding; the original dev set is scored beside
it (its shallow scores recomputed at today's depth).

    python -m studies.question_agnostic plain_dev --out studies/question_agnostic/results/tuning_plain.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from chunkkv import selection as sel
from chunkkv.boundaries import boundary_token_ids
from chunkkv.budget import Budget
from chunkkv.capture import capture_prefill, layer_scores
from chunkkv.prompting import instructions

from . import niah, tune

PLAIN_A = [
    ("The spare tyre for the delivery van is kept behind the bakery.",
     "Where is the spare tyre for the delivery van kept?", "behind the bakery"),
    ("My neighbour's daughter started working as a nurse in Denver last year.",
     "Where does my neighbour's daughter work as a nurse?", "denver"),
    ("The school choir will sing at the town hall on Friday evening.", "Where will the school choir sing?",
     "town hall"),
    ("The missing cat was found sleeping in the garden shed.", "Where was the missing cat found?", "garden shed"),
]
PLAIN_B = [
    ("The new bus route goes past the hospital and ends at the harbour.", "Where does the new bus route end?",
     "harbour"),
    ("The book club decided to read a novel about a family farm in Iowa.",
     "Where is the family farm in the book club's novel?", "iowa"),
    ("The dentist's office closes early on Wednesdays in the summer.",
     "On which day does the dentist's office close early?", "wednesdays"),
    ("The office coffee machine was moved to the kitchen on the second floor.",
     "Where was the office coffee machine moved?", "kitchen"),
]
PLAIN_OFFSET = 60


def documents(tok, model, lengths: dict[int, int], plain: bool, cache: Path) -> list:
    """[(length, doc, ids, hybrid parts (surprisal, shallow), sentence segments, answer spans)], cached."""
    out = torch.load(cache) if cache.exists() else {}
    ends = torch.tensor(sorted(boundary_token_ids(tok, clauses=False)))
    saved = niah.NEEDLES
    try:
        for length, count in lengths.items():
            first = PLAIN_OFFSET if plain else tune.DEV_OFFSET
            for doc in range(first, first + count):
                if (length, doc) in out:
                    continue
                if plain:
                    needles = PLAIN_A if doc % 2 == 0 else PLAIN_B
                else:
                    needles = tune.DEV_NEEDLES if doc % 2 == 0 else tune.DEV_NEEDLES_B
                niah.NEEDLES = needles
                document, _ = niah.build_document(tok, length, doc)
                ids, _ = niah.encode(tok, document, needles[0][1])
                capture = capture_prefill(model, ids, torch.ones_like(ids), window=32, surprisal=True,
                                          instructions=instructions(tok))
                shallow = layer_scores(capture, "shallow_reconstruction", [0])[0][0, 0]  # one row for every layer
                spans = niah.locate(tok, ids[0], document)
                answers = []
                for (lo, hi), needle in zip(spans, needles):
                    a = hi - 1  # the shortest tail of the sentence whose text holds the answer
                    while a > lo and needle[2] not in tok.decode(ids[0, a:hi].tolist()).lower():
                        a -= 1
                    answers.append((a, hi - 1))
                segs = sel.sentence_segments(torch.isin(ids[0], ends)[None], 30)[0]
                out[(length, doc)] = (ids, capture.surprisal[0], shallow, segs, answers)
                torch.save(out, cache)
                print(f"{'plain' if plain else 'dev'} {length}/{doc}", flush=True)
    finally:
        niah.NEEDLES = saved
    return [(length, doc, *value) for (length, doc), value in sorted(out.items())]


def topk_mean(token: torch.Tensor, segs: torch.Tensor, k: int) -> torch.Tensor:
    """Each token's sentence score: the mean root of the sentence's ``k`` best tokens (then the token's own, a tie-break)."""
    n = int(segs.max()) + 1
    root = token.clamp(min=0).sqrt()
    order = torch.argsort(segs * 1e3 - root.clamp(max=999))  # by sentence, best token first
    seg_sorted = segs[order]
    start = torch.zeros(n, dtype=torch.long).scatter_reduce_(0, seg_sorted, torch.arange(len(segs)), "amin",
                                                            include_self=False)
    within = torch.arange(len(segs)) - start[seg_sorted]
    take = (within < k).float()
    total = torch.zeros(n).scatter_add_(0, seg_sorted, root[order] * take)
    count = torch.zeros(n).scatter_add_(0, seg_sorted, take)
    return (total / count.clamp(min=1))[segs] + 1e-6 * root


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m studies.question_agnostic plain_dev")
    ap.add_argument("--cache", default="/tmp/chunkkv-plain-dev.pt")
    ap.add_argument("--dev-cache", default="/tmp/chunkkv-dev-quarter.pt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from chunkkv.pretrained import load_pretrained

    model, tok = load_pretrained("smollm2", dtype=torch.float32, device="cpu")
    sets = {"plain": documents(tok, model, {1024: 8, 2048: 8, 4096: 4}, True, Path(args.cache)),
            "dev": documents(tok, model, {1024: 8, 2048: 8, 4096: 8}, False, Path(args.dev_cache))}
    budgets = [Budget(keep_fraction=0.1), Budget(keep_fraction=0.2), Budget(keep_fraction=0.3), Budget(keep_tokens=128)]
    norm = lambda x: x.clamp(min=0) / x[1:].clamp(min=0).amax().clamp(min=1e-12)  # noqa: E731
    hybrid = lambda s, c: norm(s) + norm(c)  # noqa: E731
    variants = {  # name -> (token scores, segments -> scores or None, chunk reduce, peak)
        "hybrid, sqrt_mean + 0.2 peak (shipped)": (hybrid, None, "sqrt_mean", 0.2),
        "hybrid, sqrt_mean, no peak": (hybrid, None, "sqrt_mean", 0.0),
        "hybrid, sqrt_mean + 0.5 peak": (hybrid, None, "sqrt_mean", 0.5),
        "hybrid, mean, no peak": (hybrid, None, "mean", 0.0),
        "hybrid, mean root of the sentence's best 3 tokens": (hybrid, 3, "mean", 0.0),
        "hybrid, mean root of the sentence's best 5 tokens": (hybrid, 5, "mean", 0.0),
        "hybrid, the larger of the two, sqrt_mean + 0.2 peak": (
            lambda s, c: torch.maximum(norm(s), norm(c)), None, "sqrt_mean", 0.2),
        "surprisal alone, sqrt_mean + 0.2 peak": (lambda s, c: norm(s), None, "sqrt_mean", 0.2),
        "shallow reconstruction alone, sqrt_mean + 0.2 peak": (lambda s, c: norm(c), None, "sqrt_mean", 0.2),
    }
    lines = ["Answer words ChunkKV keeps on sentence chunks (<= 30 tokens, window 32 kept, no decoding), SmolLM2-135M-"
             "Instruct, essays. plain: 8 plainly worded needles (studies.question_agnostic plain_dev), documents 60.. "
             "(1k x 8, 2k x 8, 4k x 4: 80 needles); dev: the dev needles of the tune study, documents 50.. "
             "(1k/2k/4k x 8: 96 needles); shallow reconstruction at today's depth.", "",
             "| sentence score | " + " | ".join(f"plain {b.describe()}" for b in budgets) + " | " +
             " | ".join(f"dev {b.describe()}" for b in budgets) + " |", "|---|" + "---|" * (2 * len(budgets))]
    for name, (score, top, reduce, peak) in variants.items():
        cells = []
        for docs in sets.values():
            for budget in budgets:
                kept = 0
                for _, _, ids, surprisal, shallow, segs, answers in docs:
                    token = score(surprisal, shallow)
                    if top:
                        token = topk_mean(token, segs, top)
                    keep = tune.kept_set(token, budget, 1, 10, segments=segs, reduce=reduce, peak=peak)
                    kept += sum(set(range(lo, hi)) <= keep for lo, hi in answers)
                cells.append(str(kept))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
