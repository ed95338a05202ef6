"""Tune question-agnostic selection offline on a DEV set of needles and documents (issue 14).

The test set of :mod:`.niah` (its 4 needles, documents 0-11) is not used here: this study
builds its own documents (documents 50.., other essay passages) with 8 other needles (two sets of
4, alternating by document), computes each token's surprisal once (cached in --cache), and for
every candidate chunking / score transform and budget reports how often the whole needle sentence
and its answer words survive ChunkKV's selection (the library's own ``prefix_scores`` +
``select_chunks``). No decoding: it measures what is kept, in seconds.

Usage: python -m studies.question_agnostic tune --out studies/question_agnostic/results/tuning.md
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from chunkkv import selection as sel
from chunkkv.budget import Budget

from . import niah

DEV_NEEDLES = [
    ("The password for the old server room is 5839.", "What is the password for the old server room?", "5839"),
    ("Professor Alvarez keeps her spare key under the blue flowerpot.",
     "Where does Professor Alvarez keep her spare key?", "blue flowerpot"),
    ("The museum's rarest painting was bought in 1887 from a dealer in Lisbon.",
     "Where was the museum's rarest painting bought?", "lisbon"),
    ("Tom's favourite colour has always been turquoise.", "What is Tom's favourite colour?", "turquoise"),
]
DEV_NEEDLES_B = [
    ("The old lighthouse keeper named his dog Biscuit.", "What did the old lighthouse keeper name his dog?", "biscuit"),
    ("The meeting with the investors from Osaka was moved to the third floor of the library.",
     "Where was the meeting with the investors moved to?", "third floor"),
    ("Her grandfather's violin was made in Cremona in 1921.", "Where was her grandfather's violin made?", "cremona"),
    ("The lab's emergency phone number is 555-0193.", "What is the lab's emergency phone number?", "0193"),
]
DEV_OFFSET = 50  # documents 50.. : other essay passages than the test set's 0..3


def dev_documents(tok, model, lengths, docs, cache: Path):
    """[(length, doc, ids [1, T], surprisal [T], needle spans, answer spans)], cached."""
    if cache.exists():
        return torch.load(cache)
    saved = niah.NEEDLES
    out = []
    try:
        for length in lengths:
            for doc in range(DEV_OFFSET, DEV_OFFSET + docs):
                needles = DEV_NEEDLES if doc % 2 == 0 else DEV_NEEDLES_B
                niah.NEEDLES = needles
                document, _ = niah.build_document(tok, length, doc)
                ids, _ = niah.encode(tok, document, needles[0][1])
                with torch.inference_mode():
                    logits = model(input_ids=ids).logits[0].float()
                nll = torch.nn.functional.cross_entropy(logits[:-1], ids[0, 1:], reduction="none")
                surprisal = torch.cat([nll.max()[None], nll])
                spans = niah.locate(tok, ids[0], document)
                answers = []
                for (lo, hi), needle in zip(spans, needles):
                    # answer words: the shortest tail of the sentence span whose text holds the answer
                    a = hi - 1
                    while a > lo and needle[2] not in tok.decode(ids[0, a:hi].tolist()).lower():
                        a -= 1
                    answers.append((a, hi - 1))  # the final '.' excluded
                out.append((length, doc, ids, surprisal, spans, answers))
                print(f"dev doc {length}/{doc}: {ids.shape[1]} tokens", flush=True)
    finally:
        niah.NEEDLES = saved
    cache.parent.mkdir(parents=True, exist_ok=True)
    torch.save(out, cache)
    return out


def forward_max(s: torch.Tensor, width: int) -> torch.Tensor:
    """max over the token and the ``width - 1`` before it: a surprising token lifts what follows."""
    if width <= 1:
        return s
    padded = torch.nn.functional.pad(s, (width - 1, 0))
    return torch.nn.functional.max_pool1d(padded[:, None], width, stride=1)[:, 0]


def power(p: float):
    return lambda s: s.clamp(min=0) ** p


# name -> pooling kernel (max; 1 = none), chunks ("fixed" 10 / "sentence" with a cap), score transform,
# chunk reduce ("lenA" = sum / length^(A/100), between the sum and the mean)
VARIANTS = {
    "fixed 10, max pool 7 (surprisal default before)": dict(kernel=7),
    "fixed 10, max pool 15": dict(kernel=15),
    "fixed 10, forward max 8 + pool 7": dict(kernel=7, pre=lambda s: forward_max(s, 8)),
    "fixed 10, forward max 12, no pool": dict(kernel=1, pre=lambda s: forward_max(s, 12)),
    "sentence <=15, mean": dict(kernel=1, seg=15),
    "sentence <=30, mean": dict(kernel=1, seg=30),
    "sentence <=60, mean": dict(kernel=1, seg=60),
    "sentence <=30, mean, max pool 3": dict(kernel=3, seg=30),
    "sentence <=30, mean, max pool 7": dict(kernel=7, seg=30),
    "sentence <=30, sum": dict(kernel=1, seg=30, reduce="sum"),
    "sentence <=30, sum / len^0.9 of sqrt": dict(kernel=1, seg=30, pre=power(0.5), reduce="len90"),
    "sentence <=30, mean of s^0.25": dict(kernel=1, seg=30, pre=power(0.25)),
    "sentence <=30, mean of log(1+s)": dict(kernel=1, seg=30, pre=lambda s: s.log1p()),
    "sentence <=40, mean of sqrt": dict(kernel=1, seg=40, reduce="sqrt_mean"),
    "sentence <=30, mean of sqrt": dict(kernel=1, seg=30, reduce="sqrt_mean"),
    "sentence <=30, mean of sqrt + 0.1 x peak": dict(kernel=1, seg=30, reduce="sqrt_mean", peak=0.1),
    "sentence <=30, mean of sqrt + 0.2 x peak (chosen)": dict(kernel=1, seg=30, reduce="sqrt_mean", peak=0.2),
    "sentence <=30, mean of sqrt + 0.3 x peak": dict(kernel=1, seg=30, reduce="sqrt_mean", peak=0.3),
    "sentence <=30, mean of sqrt + 0.5 x peak": dict(kernel=1, seg=30, reduce="sqrt_mean", peak=0.5),
    "sentence <=30, mean of sqrt + 1.0 x peak": dict(kernel=1, seg=30, reduce="sqrt_mean", peak=1.0),
    "sentence <=30, mean of sqrt, max of ranks by mean and by peak": dict(kernel=1, seg=30, reduce="rankmix"),
    "clause <=30, mean of sqrt": dict(kernel=1, seg=30, reduce="sqrt_mean", clauses=True),
}


def kept_set(scores: torch.Tensor, budget: Budget, kernel: int, chunk: int, window: int = 32,
             segments: torch.Tensor | None = None, reduce: str = "mean", peak: float = 0.0) -> set[int]:
    T = scores.shape[-1]
    lengths = torch.tensor([T])
    kept = torch.tensor([budget.kept(T)])
    pre = sel.prefix_scores(scores[None, None], lengths, kept, window, "max" if kernel > 1 else None, kernel)
    if reduce.startswith("len"):  # rank tokens by their segment's sum / length^a, then by their own score
        a = int(reduce[3:]) / 100
        tok = torch.nan_to_num(pre[:, 0], neginf=0.0)
        total = torch.zeros(1, T).scatter_add_(1, segments[None], tok)
        count = torch.zeros(1, T).scatter_add_(1, segments[None], torch.isfinite(pre[:, 0]).float())
        seg_score = (total / count.clamp(min=1) ** a).gather(1, segments[None])
        pre = torch.where(torch.isfinite(pre), seg_score[:, None] + 1e-6 * pre.clamp(max=1e3), pre)
        reduce, segments, chunk = "sum", None, 1
    if reduce == "rankmix":  # a sentence ranks by the better of its rank by mean root and by peak root
        tok = torch.nan_to_num(pre[:, 0], neginf=0.0).clamp(min=0).sqrt()
        ok = torch.isfinite(pre[:, 0])
        total = torch.zeros(1, T).scatter_add_(1, segments[None], tok)
        count = torch.zeros(1, T).scatter_add_(1, segments[None], ok.float())
        top = torch.zeros(1, T).scatter_reduce_(1, segments[None], tok, "amax")
        mean = (total / count.clamp(min=1)).masked_fill(count == 0, -1.0)
        top = top.masked_fill(count == 0, -1.0)
        rank = lambda x: torch.empty(T).scatter_(0, x[0].argsort(descending=True, stable=True), torch.arange(T).float())  # noqa: E731
        seg_score = -torch.minimum(rank(mean), rank(top))[None].gather(1, segments[None])
        pre = torch.where(torch.isfinite(pre), seg_score[:, None] + 1e-6 * pre.clamp(max=1e3), pre)
        reduce, segments, chunk = "sum", None, 1
    picks = sel.select_chunks(pre, lengths, kept, window, int(kept[0]), chunk, reduce,
                              None if segments is None else segments[None], peak)
    return set(picks[0, 0].tolist())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m studies.question_agnostic tune")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--docs", type=int, default=8)
    ap.add_argument("--cache", default="/tmp/chunkkv-agnostic-dev8.pt")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="", help="write the table (markdown) here too")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from chunkkv.pretrained import load_pretrained

    model, tok = load_pretrained("smollm2", dtype=torch.float32, device="cpu")
    from chunkkv.boundaries import boundary_token_ids

    ends = torch.tensor(sorted(boundary_token_ids(tok, clauses=False)))
    clause_ends = torch.tensor(sorted(boundary_token_ids(tok, clauses=True)))
    data = dev_documents(tok, model, [int(x) for x in args.lengths.split(",")], args.docs, Path(args.cache))
    budgets = [Budget(keep_fraction=0.1), Budget(keep_fraction=0.2), Budget(keep_fraction=0.3), Budget(keep_tokens=128)]
    n_docs = len(data)
    lines = [f"Dev set: SmolLM2-135M-Instruct surprisal, {n_docs} essay documents ({args.lengths} tokens, documents "
             f"{DEV_OFFSET}..{DEV_OFFSET + args.docs - 1}), 4 needles each from two sets of 4 (none of them the test "
             f"set's), {4 * n_docs} needles. Cell: needles whose whole sentence / answer words ChunkKV keeps "
             "(window 32 kept too; no decoding).", "",
             "| variant | " + " | ".join(b.describe() for b in budgets) + " |", "|---|" + "---|" * len(budgets)]
    misses: dict[str, list[str]] = {}
    for name, v in VARIANTS.items():
        cells = []
        for budget in budgets:
            whole = ans = n = 0
            for length, doc, ids, s, spans, answers in data:
                scores = v.get("pre", lambda x: x)(s[None])[0]
                segs = None
                if "seg" in v:
                    is_end = torch.isin(ids[0], clause_ends if v.get("clauses") else ends)
                    segs = sel.sentence_segments(is_end[None], v["seg"])[0]
                keep = kept_set(scores, budget, v["kernel"], 10, segments=segs, reduce=v.get("reduce", "mean"),
                                peak=v.get("peak", 0.0))
                for i, ((lo, hi), (alo, ahi)) in enumerate(zip(spans, answers)):
                    n += 1
                    if budget.keep_fraction == 0.2 and not set(range(alo, ahi)) <= keep:
                        misses.setdefault(name, []).append(f"{length}/{doc}/n{i}")
                    whole += set(range(lo, hi)) <= keep
                    ans += set(range(alo, ahi)) <= keep
            cells.append(f"{whole} / {ans}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    lines += ["", f"(n = {4 * n_docs} per cell: sentence kept / answer kept)", ""]
    for name, m in misses.items():
        lines.append(f"- answer lost at 20 %, {name}: {' '.join(m)}")
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
