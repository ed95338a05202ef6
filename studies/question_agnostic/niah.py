"""Question-agnostic NIAH on SmolLM2-135M-Instruct + the Paul Graham essays (issue 14).

Each document: essays cut to ``length`` tokens with 4 distinct needles inserted at 4 depths; the
document (chat-templated, up to its end) is prefilled ONCE (chunkkv.capture.capture_prefill), scored
once per question-agnostic scoring (window / probe / reconstruction, all layers), and every
method x budget is built from that capture; the 4 questions are then asked of each compressed
cache (question fed after compression). Beside them: the full cache, and query-aware ChunkKV
(document + question compressed together, once per question).

Resumable: one JSON line per (length, doc, config, question) in --out; rerun to continue.
Usage: python -m studies.question_agnostic niah [--out studies/question_agnostic/results/niah.jsonl]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch

import chunkkv
from chunkkv.agnostic import SENTENCE_CHUNKS, agnostic_method
from chunkkv.capture import capture_prefill, layer_scores
from chunkkv.haystack import paul_graham_text
from chunkkv.pipeline import compress_from_capture
from chunkkv.pretrained import load_pretrained
from chunkkv.prompting import instructions
from chunkkv.scorers import resolve_scorer

RESULTS = Path(__file__).resolve().parent / "results"

NEEDLES = [
    ("The secret ingredient in Grandma Rosa's famous soup is smoked paprika.",
     "What is the secret ingredient in Grandma Rosa's famous soup?", "smoked paprika"),
    ("The best thing to do in San Francisco is eat a sandwich and sit in Dolores Park on a sunny day.",
     "What is the best thing to do in San Francisco?", "dolores park"),
    ("The code name of the hidden research project was Silver Otter.",
     "What was the code name of the hidden research project?", "silver otter"),
    ("Maria's lucky number is 7421.", "What is Maria's lucky number?", "7421"),
]
#: Held-out needles (--needles holdout): never used to choose anything, run once on documents 100..
HOLDOUT_NEEDLES = [
    ("The ferry to Kestrel Island leaves every Tuesday at 6:40 in the morning.",
     "When does the ferry to Kestrel Island leave?", "6:40"),
    ("Dr. Okafor hid the spare laboratory key inside a hollow copy of Moby Dick.",
     "Where did Dr. Okafor hide the spare laboratory key?", "moby dick"),
    ("The winning lottery ticket was sold at a gas station in Tucson.",
     "Where was the winning lottery ticket sold?", "tucson"),
    ("Elena's favourite dessert is lemon meringue pie.", "What is Elena's favourite dessert?", "lemon meringue"),
]
DEPTHS = (0.12, 0.37, 0.62, 0.87)


def build_document(tok, length: int, doc: int) -> tuple[str, list[int]]:
    """Essay text of about ``length`` tokens with the 4 needles at shuffled depths (paragraph starts)."""
    rng = random.Random(1000 * length + doc)
    text = paul_graham_text(min_chars=length * 6, start=7 * doc + 3)
    ids = tok(text, add_special_tokens=False)["input_ids"]
    budget = length - sum(len(tok(n[0], add_special_tokens=False)["input_ids"]) + 2 for n in NEEDLES)
    text = tok.decode(ids[:budget])
    text = text[: text.rfind(".") + 1]
    order = list(range(4))
    rng.shuffle(order)
    sentences = text.split(". ")
    cuts = []
    for slot, needle in zip(order, range(4)):
        cuts.append((int(DEPTHS[slot] * len(sentences)), needle))
    for at, needle in sorted(cuts, reverse=True):
        sentences.insert(at, NEEDLES[needle][0].rstrip("."))
    return ". ".join(sentences), [DEPTHS[slot] for slot in order]


def locate(tok, ids: torch.Tensor, document: str) -> list[tuple[int, int]]:
    """Token span ``[lo, hi)`` of each needle sentence in the context ids (by decoding prefixes)."""
    text_ids = ids.tolist()
    full = tok.decode(text_ids)

    def index_at(char: int) -> int:  # first token whose decoded prefix passes ``char``
        lo, hi = 0, len(text_ids)
        while lo < hi:
            mid = (lo + hi) // 2
            if len(tok.decode(text_ids[: mid + 1])) <= char:
                lo = mid + 1
            else:
                hi = mid
        return lo

    spans = []
    for needle in NEEDLES:
        start = full.find(needle[0].rstrip("."))
        spans.append((index_at(start), index_at(start + len(needle[0]) - 1) + 1))
    return spans


def encode(tok, document: str, question: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(context ids ``[1, T]`` ending with the document, question ids ``[1, n]``) of one chat prompt."""
    marker = "\x00Q\x00"
    rendered = tok.apply_chat_template([{"role": "user", "content": document + marker}],
                                       add_generation_prompt=True, tokenize=False)
    head, tail = rendered.split(marker)
    tail = f"\n\nQuestion: {question} Answer in one short sentence." + tail
    ctx = tok(head, add_special_tokens=False, return_tensors="pt")["input_ids"]
    q = tok(tail, add_special_tokens=False, return_tensors="pt")["input_ids"]
    return ctx, q


def configs(quick: bool, boundary_ids: frozenset[int] = frozenset(), variants: bool = False,
            sentence_ids: frozenset[int] = frozenset(), tokenizer=None, kv256: bool = False):
    out = []
    budgets = [("f", 0.1), ("f", 0.2), ("f", 0.3), ("t", 128), ("t", 512)]
    if not quick or kv256:
        budgets.append(("t", 256))
    for kind, value in budgets:
        b = {"keep_fraction": value} if kind == "f" else {"keep_tokens": value}
        for scoring in ("window", "probe", "reconstruction", "surprisal"):
            out.append(("chunkkv", scoring, chunkkv.ChunkKV(scoring=scoring, **b)))
            if kind == "f" and value == 0.2:
                out.append(("snapkv", scoring, chunkkv.SnapKV(scoring=scoring, **b)))
        if boundary_ids:  # sentence-aligned chunks (chunkkv.boundaries) on the surprisal scores
            out.append(("chunkkv-bnd", "surprisal", chunkkv.ChunkKV(scoring="surprisal", boundary_ids=boundary_ids, **b)))
        if sentence_ids:  # one chunk per sentence, ranked by mean sqrt-surprisal (the first sentence-chunk setting)
            out.append(("chunkkv-sent", "surprisal", chunkkv.ChunkKV(
                scoring="surprisal", segmentation="sentence", boundary_ids=sentence_ids, chunk_size=30,
                chunk_reduce="sqrt_mean", kernel=1, **b)))
            # what question-agnostic generate runs today (agnostic.SENTENCE_CHUNKS: + the peak term)
            out.append(("chunkkv-default", "surprisal", agnostic_method(chunkkv.ChunkKV(**b), tokenizer=tokenizer)))
            # reconstruction through the first quarter of the layers (SHALLOW_DEPTH), one score for all, same chunks
            out.append(("chunkkv-shallow", "shallow_reconstruction", chunkkv.ChunkKV(
                scoring="shallow_reconstruction", boundary_ids=sentence_ids, **SENTENCE_CHUNKS, **b)))
            # surprisal + shallow reconstruction, each over its row maximum, same chunks
            out.append(("chunkkv-hybrid", "hybrid", chunkkv.ChunkKV(
                scoring="hybrid", boundary_ids=sentence_ids, **SENTENCE_CHUNKS, **b)))
            if kind == "f" and value == 0.2:  # SnapKV's per-head top tokens on the default's scores
                out.append(("snapkv-hybrid", "hybrid", chunkkv.SnapKV(scoring="hybrid", **b)))
            if kind == "f" and value == 0.2:  # the attention scorings on the same sentence chunks
                for scoring in ("reconstruction", "probe"):
                    out.append(("chunkkv-sentchunks", scoring, chunkkv.ChunkKV(
                        scoring=scoring, boundary_ids=sentence_ids, **SENTENCE_CHUNKS, **b)))
        if variants and kind == "f" and value == 0.2:  # --variants: surprisal with bigger chunks / wider pooling
            out.append(("chunkkv-c20", "surprisal", chunkkv.ChunkKV(scoring="surprisal", chunk_size=20, **b)))
            out.append(("chunkkv-k15", "surprisal", chunkkv.ChunkKV(scoring="surprisal", kernel=15, **b)))
    return out


@torch.inference_mode()
def ask_all(model, ctx, questions: list[torch.Tensor], max_new: int, eos: int, pad: int) -> list[list[int]]:
    """Greedy answers to every question on one compressed context, decoded as one batch: the
    context's cache is repeated per question (a fork: the context is unchanged) and the questions
    are left-padded inside the new block (masked), so positions continue each row's prompt."""
    n = len(questions)
    work = ctx.fork()
    cache = work.cache  # ctx.cache hands out a new fork per access: hold this one
    cache.batch_repeat_interleave(n)
    width = max(q.shape[1] for q in questions)
    ids = torch.full((n, width), pad, dtype=torch.long)
    qmask = torch.zeros(n, width, dtype=torch.long)
    for i, q in enumerate(questions):
        ids[i, width - q.shape[1]:] = q[0]
        qmask[i, width - q.shape[1]:] = 1
    mask = torch.cat([work.attention_mask.expand(n, -1), qmask], dim=1)
    base = work.attention_mask.sum(-1)
    positions = base[:, None] + (qmask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    last = positions[:, -1]
    answers = [[] for _ in range(n)]
    finished = torch.zeros(n, dtype=torch.bool)
    for step in range(max_new):
        token = out.logits[:, -1].argmax(-1)
        for i in range(n):
            if not finished[i]:
                if int(token[i]) == eos:
                    finished[i] = True
                else:
                    answers[i].append(int(token[i]))
        if bool(finished.all()) or step + 1 == max_new:
            break
        mask = torch.cat([mask, torch.ones(n, 1, dtype=torch.long)], dim=1)
        last = last + 1
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=last[:, None], cache=cache,
                    use_cache=True)
    return answers


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m studies.question_agnostic niah")
    ap.add_argument("--out", default=str(RESULTS / "niah.jsonl"), help="records (JSONL; default: results/niah.jsonl)")
    ap.add_argument("--lengths", default="1024,2048,4096")
    ap.add_argument("--docs", type=int, default=4)
    ap.add_argument("--docs-at", default="", help="cap docs per length, e.g. 4096:2")
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--kv256", action="store_true", help="also KV 256 with --quick (e.g. with --configs)")
    ap.add_argument("--variants", action="store_true", help="also surprisal with chunk 20 / pooling kernel 15 at 20 %%")
    ap.add_argument("--needles", choices=["test", "holdout"], default="test",
                    help="the 4 needles: the test set (default) or the held-out set (HOLDOUT_NEEDLES)")
    ap.add_argument("--configs", default="", help="comma list of config-name prefixes to run (default: all)")
    ap.add_argument("--first-doc", type=int, default=0, help="documents first-doc .. docs-1 (to extend a run)")
    ap.add_argument("--sentence", action="store_true", help="also ChunkKV with sentence chunks on sqrt-surprisal")
    ap.add_argument("--no-qa", action="store_true", help="skip query-aware ChunkKV (one prefill per question)")
    args = ap.parse_args(argv)
    if args.needles == "holdout":
        global NEEDLES
        NEEDLES = HOLDOUT_NEEDLES
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = set()
    if out.exists():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["length"], r["doc"], r["config"], r.get("q")))
    model, tok = load_pretrained("smollm2", dtype=torch.float32, device="cpu")
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(["rouge1"], use_stemmer=True)
    sampling = chunkkv.Sampling(max_new_tokens=args.max_new_tokens, eos_token_id=tok.eos_token_id)
    lengths = [int(x) for x in args.lengths.split(",")]
    from chunkkv.boundaries import boundary_token_ids

    grid = configs(args.quick, boundary_token_ids(tok), args.variants,
                   boundary_token_ids(tok, clauses=False) if args.sentence else frozenset(), tok, args.kv256)
    if args.configs:  # only the configs whose name starts with one of these (e.g. to add documents cheaply)
        wanted = tuple(args.configs.split(","))
        grid = [(m, s, meth) for m, s, meth in grid if f"{m}|{s}|{meth.budget.describe()}".startswith(wanted)]

    def write(rec):
        with out.open("a") as f:
            f.write(json.dumps(rec) + "\n")

    def ask(ctx, q_ids, needle):
        tokens = chunkkv.continue_from(model, ctx, q_ids, sampling)[0].tolist()
        if tok.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tok.eos_token_id)]
        text = tok.decode(tokens, skip_special_tokens=True)
        return text, needle[2] in text.lower(), rouge.score(needle[0], text)["rouge1"].fmeasure

    cap = {int(k): int(v) for k, v in (x.split(":") for x in args.docs_at.split(",") if x)}
    for doc in range(args.first_doc, args.docs):
        for length in lengths:
            if doc >= cap.get(length, args.docs):
                continue
            document, depths = build_document(tok, length, doc)
            encoded = [encode(tok, document, n[1]) for n in NEEDLES]
            ids = encoded[0][0]
            keys = [("full", None)] + [(f"{m}|{s}|{meth.budget.describe()}", None) for m, s, meth in grid]
            if all((length, doc, k, q) in done for k, _ in keys for q in range(4)) and (args.no_qa or
                    all((length, doc, "qa-chunkkv|window|20% kept", q) in done for q in range(4))):
                continue
            t0 = time.perf_counter()
            # the scoring passes' instructions are tokenized by the capture; each pass runs once per
            # document (chunkkv.capture.gather_evidence) and serves every config that needs it
            capture = capture_prefill(model, ids, window=32, surprisal=True, instructions=instructions(tok))
            prefill = time.perf_counter() - t0
            layers = list(range(model.config.num_hidden_layers))
            timing = {"length": length, "doc": doc, "config": "_timing", "q": None, "tokens": ids.shape[1],
                      "prefill_s": prefill, "surprisal_s": capture.surprisal_seconds}
            for scoring in ("probe", "reconstruction", "shallow_reconstruction", "hybrid"):
                wanted = [f"{m}|{s}|{meth.budget.describe()}" for m, s, meth in grid if s == scoring]
                if all((length, doc, k, q) in done for k in wanted for q in range(4)):
                    continue  # already answered in an earlier run: skip the (costly) scoring pass
                layer_scores(capture, scoring, layers)  # runs its pass now, unless an earlier scoring ran it
                # the pass time of this scoring (hybrid's pass is shallow reconstruction's: the same seconds)
                timing[f"{scoring}_s"] = sum(capture.pass_seconds.get(p, 0.0) for p in resolve_scorer(scoring).passes())
            if (length, doc, "_timing", None) not in done:
                write(timing)
            elif "reconstruction_s" not in timing:  # a resumed run: its surprisal cost on its own line
                write({**timing, "config": "_timing_surprisal"})
            print(json.dumps(timing), flush=True)
            needle_spans = locate(tok, ids[0], document)  # to see what was kept around each needle
            runs = [("full", chunkkv.FullKV())] + [(f"{m}|{s}|{meth.budget.describe()}", meth) for m, s, meth in grid]
            for key, method in runs:
                if all((length, doc, key, q) in done for q in range(4)):
                    continue
                ctx = compress_from_capture(capture, method)
                t0 = time.perf_counter()
                answers = ask_all(model, ctx, [e[1] for e in encoded], args.max_new_tokens, tok.eos_token_id,
                                  tok.pad_token_id if tok.pad_token_id is not None else 0)
                seconds = time.perf_counter() - t0
                kept = ctx.kept_positions(0, 0, head=0)
                for qi, needle in enumerate(NEEDLES):
                    text = tok.decode(answers[qi], skip_special_tokens=True)
                    lo, hi = needle_spans[qi]
                    kept_all = [set(ctx.kept_positions(layer, 0, head=0).tolist()) for layer in layers] \
                        if method is not None and not isinstance(method, chunkkv.FullKV) else None
                    cover = None if kept_all is None else sum(
                        len(k & set(range(lo, hi))) / max(1, hi - lo) for k in kept_all) / len(kept_all)
                    write({"length": length, "doc": doc, "config": key, "q": qi, "depth": depths[qi],
                           "present": needle[2] in text.lower(), "rouge1": rouge.score(needle[0], text)["rouge1"].fmeasure,
                           "answer": text, "tokens": ids.shape[1], "kept_layer0": len(kept),
                           "needle_kept": cover, "decode_s": seconds})
            key = "qa-chunkkv|window|20% kept"
            for qi, needle in enumerate(NEEDLES):
                if args.no_qa or (length, doc, key, qi) in done:
                    continue
                full_ids = torch.cat(encoded[qi], dim=1)
                ctx = chunkkv.compress(model, full_ids, method=chunkkv.ChunkKV(keep_fraction=0.2))
                text, present, r1 = ask(ctx, None, needle)
                write({"length": length, "doc": doc, "config": key, "q": qi, "depth": depths[qi], "present": present,
                       "rouge1": r1, "answer": text, "tokens": full_ids.shape[1]})
            print(f"done length {length} doc {doc}", flush=True)


if __name__ == "__main__":
    main()
