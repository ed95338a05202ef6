"""The long-context grid on Gemma 3 270M: every method x budget on documents of 4k-32k tokens.

Per document (:mod:`.tasks`: essays + seven facts, five questions) the runner

1. prefills the document once, in chunks (:func:`.capture.capture_document`), capturing what every
   method needs: the last queries, H2O's accumulated scores, each token's surprisal;
2. compresses the document alone with the question-agnostic default (hybrid scoring, sentence
   chunks: :func:`chunkkv.agnostic.agnostic_method`) at each agnostic budget, **once**, and answers
   all five questions on that cache (the question is fed after the compressed document);
3. for each question feeds it on a fork of the document's full cache (:func:`.capture.extend_capture`:
   the capture of document + question, as ``capture_prefill`` of the whole prompt would give) and
   builds every query-aware configuration from it (:func:`chunkkv.pipeline.compress_from_capture`);
   the compressed ones decode together as one batch (:func:`chunkkv.context.stack_contexts`), the
   full cache on its own (stacking would pad every row to the full length).

Records go to ``<out>/records.jsonl``, one line per (length, document, question, configuration),
appended as each document finishes; a rerun skips what is there (``--minutes``: no new document
after that long). Documents are visited in rounds (document 0 at every length of the plan, then 1,
...), so a run cut short still covers every length.

``python -m studies.long_context run --plan "4096:2;8192:2;16384:1"`` (``--help``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from chunkkv.agnostic import agnostic_method
from chunkkv.context import stack_contexts
from chunkkv.evaluation.store import read_jsonl
from chunkkv.generation import Sampling, continue_from
from chunkkv.methods import make_method
from chunkkv.pipeline import compress, compress_from_capture
from chunkkv.pretrained import load_pretrained
from chunkkv.prompting import instructions

from .. import shown
from .capture import capture_document, extend_capture
from .tasks import MAX_NEW, Document, make_document, score

__all__ = ["Spec", "SPECS", "run_document", "run_grid", "parse_plan"]

RESULTS = Path(__file__).resolve().parent / "results"
WINDOW = 32  # every method's observation window (the question and answer prefix, 20-30 tokens, and the text before)
METHODS = ["chunkkv", "snapkv", "pyramidkv", "h2o", "streamingllm"]


@dataclass(frozen=True)
class Spec:
    """One configuration. ``agnostic``: compressed before the question (the default's scoring)."""

    method: str
    keep_tokens: int | None = None
    keep_fraction: float | None = None
    reuse_depth: int | None = None
    agnostic: bool = False
    prefill_chunk: int | None = None  # agnostic only: the document compressed by a chunked prefill of C tokens

    @property
    def key(self) -> str:
        parts = [self.method]
        if self.keep_tokens is not None:
            parts.append(f"t{self.keep_tokens}")
        if self.keep_fraction is not None:
            parts.append(f"f{self.keep_fraction:g}")
        if self.reuse_depth is not None:
            parts.append(f"r{self.reuse_depth}")
        if self.agnostic:
            parts.append("qa")
        if self.prefill_chunk is not None:
            parts.append(f"p{self.prefill_chunk}")
        return "/".join(parts)

    def build(self, tokenizer):
        if self.method == "full":
            return make_method("full")
        params: dict[str, Any] = {"window": WINDOW}
        for name in ("keep_tokens", "keep_fraction", "reuse_depth"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        method = make_method(self.method, **params)
        return agnostic_method(method, tokenizer=tokenizer) if self.agnostic else method


SPECS = ([Spec("full")]
         + [Spec(m, **b) for m in METHODS for b in ({"keep_tokens": 128}, {"keep_tokens": 512}, {"keep_fraction": 0.1})]
         + [Spec("chunkkv", keep_tokens=128, reuse_depth=2), Spec("chunkkv", keep_fraction=0.1, reuse_depth=2)]
         + [Spec("chunkkv", keep_fraction=f, agnostic=True) for f in (0.1, 0.2)])
#: Issue 24 item 4: the question-agnostic default compressed by a chunked prefill (never the full cache).
CHUNKED_SPECS = [Spec("chunkkv", keep_fraction=0.1, agnostic=True, prefill_chunk=2048)]


def _spans(tokenizer, doc: Document) -> dict[int, dict[str, list[int]]]:
    """Per question: the token positions (in the document) of its fact and of its first answer word."""
    head = tokenizer.decode(doc.context_ids)
    enc = tokenizer(head, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    if enc["input_ids"] != doc.context_ids:
        return {}
    out = {}
    for q in doc.questions:
        if q.reference not in head:
            continue
        f0 = head.index(q.reference)
        a0 = f0 + q.reference.index(q.answers[0]) if q.answers[0] in q.reference else None

        def span(lo: int, hi: int) -> list[int]:
            return [i for i, (s, e) in enumerate(offsets) if s < hi and e > lo]

        out[q.qid] = {"fact": span(f0, f0 + len(q.reference))}
        if a0 is not None:
            out[q.qid]["answer"] = span(a0, a0 + len(q.answers[0]))
    return out


def _kept(ctx, spans: dict[str, list[int]]) -> dict[str, Any]:
    """KV bytes by layer kind, tokens kept per compressed layer, and how much of the fact / answer
    the compressed layers kept (union over KV heads)."""
    kinds = ctx.cache.nbytes_by_kind()
    pruned = ctx.cache.pruned_layers
    out: dict[str, Any] = {"kv_bytes": ctx.cache.nbytes(),
                           "kv_full_layers_bytes": kinds.get("full_attention", {}).get("bytes"),
                           "kv_sliding_bytes": kinds.get("sliding_attention", {}).get("bytes"),
                           "kept_tokens": [int(ctx.kept_positions(i).numel()) for i in pruned]}
    for name, span in spans.items():
        if span:
            shares = []
            for i in pruned:
                kept = set(ctx.kept_positions(i).tolist())
                shares.append(sum(p in kept for p in span) / len(span))
            out[f"{name}_kept_mean"] = round(sum(shares) / len(shares), 4)
            out[f"{name}_whole_layers"] = sum(s == 1.0 for s in shares)
    return out


def _decode(model, tokenizer, contexts: list, new: list[int] | None, max_new: int) -> list[str]:
    eos = tokenizer.eos_token_id
    sampling = Sampling(max_new_tokens=max_new, eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or 0)
    stacked = contexts[0] if len(contexts) == 1 else stack_contexts(contexts)
    tokens = continue_from(model, stacked, None if new is None else torch.tensor([new]), sampling).tolist()
    texts = []
    for toks in tokens:
        if eos in toks:
            toks = toks[: toks.index(eos)]
        texts.append(tokenizer.decode(toks, skip_special_tokens=True))
    return texts


def run_document(model, tokenizer, doc: Document, specs: list[Spec], *, chunk: int | None = 1024,
                 h2o: bool = True, todo_questions: set[int] | None = None) -> list[dict[str, Any]]:
    """Every spec on every question of one document (see the module docstring); one record each."""
    specs = [s for s in specs if h2o or s.method != "h2o"]
    aware = [s for s in specs if not s.agnostic and s.method != "full"]
    agnostic = [s for s in specs if s.agnostic]
    full = [s for s in specs if s.method == "full"]
    questions = [q for q in doc.questions if todo_questions is None or q.qid in todo_questions]
    spans = _spans(tokenizer, doc)
    t0 = time.perf_counter()
    captured = aware or full or any(s.prefill_chunk is None for s in agnostic)
    capture = None
    doc_info: dict[str, Any] = {"doc_tokens": len(doc.context_ids)}
    if captured:  # a grid of chunked-prefill rows alone never holds the full cache
        capture = capture_document(model, doc.context_ids, chunk=chunk, window=2 * WINDOW,
                                   accumulated=any(s.method == "h2o" for s in aware), surprisal=bool(agnostic),
                                   instructions=instructions(tokenizer, chat=False))
        doc_info.update({"prefill_seconds": round(capture.prefill_seconds, 2),
                         "surprisal_seconds": round(capture.surprisal_seconds, 2), "capture_chunk": chunk,
                         "capture_seconds": round(time.perf_counter() - t0, 2)})
    records: list[dict[str, Any]] = []

    def record(q, spec, pred, info):
        records.append({"length": doc.length, "doc": doc.index, "qid": q.qid, "task": q.task,
                        "depth": round(q.depth, 3), "spec": spec.key, "method": spec.method,
                        "agnostic": spec.agnostic, "prompt_tokens": len(doc.context_ids) + len(q.question_ids),
                        "prediction": pred, **score(q, pred, doc.length, doc.index), **info, **doc_info})

    # question-agnostic: the document compressed once per budget, every question asked of that cache
    built = []
    for spec in agnostic:
        t1 = time.perf_counter()
        if spec.prefill_chunk is None:
            ctx = compress_from_capture(capture, spec.build(tokenizer))
        else:
            ctx = compress(model, torch.tensor([doc.context_ids]), method=spec.build(tokenizer),
                           prefill_chunk=spec.prefill_chunk, tokenizer=tokenizer, chat_template=False)
        built.append((spec, ctx, {"select_seconds": round(ctx.stats.select_seconds, 3),
                                  "scoring_seconds": round(ctx.stats.scoring_seconds, 2),
                                  "compress_seconds": round(time.perf_counter() - t1, 2),
                                  "method_describe": ctx.method.describe()}))
    for q in questions:
        if built:
            t1 = time.perf_counter()
            preds = _decode(model, tokenizer, [c for _s, c, _i in built], q.question_ids, MAX_NEW[q.task])
            dt = round(time.perf_counter() - t1, 2)
            for (spec, ctx, info), pred in zip(built, preds):
                record(q, spec, pred, {**info, **_kept(ctx, spans.get(q.qid, {})), "decode_seconds": dt})
    del built
    for q in questions if aware or full else ():
        t1 = time.perf_counter()
        ext = extend_capture(model, capture, q.question_ids)
        extend_s = round(time.perf_counter() - t1, 2)
        rows = []
        for spec in aware:
            ctx = compress_from_capture(ext, spec.build(tokenizer))
            rows.append((spec, ctx, {"select_seconds": round(ctx.stats.select_seconds, 3),
                                     "method_describe": ctx.method.describe()}))
        groups = [rows] + [[(s, compress_from_capture(ext, s.build(tokenizer)), {})] for s in full]
        for group in groups:
            if not group:
                continue
            t1 = time.perf_counter()
            preds = _decode(model, tokenizer, [c for _s, c, _i in group], None, MAX_NEW[q.task])
            dt = round(time.perf_counter() - t1, 2)
            for (spec, ctx, info), pred in zip(group, preds):
                record(q, spec, pred, {**info, **_kept(ctx, spans.get(q.qid, {})), "decode_seconds": dt,
                                       "extend_seconds": extend_s})
        del ext, rows, groups
    pass_s = sum(v for v in capture.pass_seconds.values()) if capture is not None else 0.0
    for r in records:
        r["pass_seconds"] = round(pass_s, 2)
        r["doc_seconds"] = round(time.perf_counter() - t0, 1)
    return records


@dataclass
class PlanItem:
    length: int
    documents: int


def parse_plan(text: str) -> list[PlanItem]:
    """``"4096:12;8192:10"`` -> documents per length."""
    items = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        length, n = part.split(":")
        items.append(PlanItem(int(length), int(n)))
    return items


def run_grid(model, tokenizer, out: Path, plan: list[PlanItem], specs: list[Spec], *, chunk: int | None = 1024,
             h2o_lengths: set[int] | None = None, full_only: set[int] = frozenset(), seed: int = 0,
             deadline: float | None = None) -> int:
    """Run the plan (rounds over lengths), appending to ``out/records.jsonl``; returns documents run."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    done = {(r["length"], r["doc"], r["qid"], r["spec"]) for r in read_jsonl(path, key="spec")}
    ran = 0
    for r in range(max((p.documents for p in plan), default=0)):
        for item in plan:
            if r >= item.documents:
                continue
            if deadline is not None and time.time() > deadline:
                print("long_context: deadline reached, stopping", file=sys.stderr, flush=True)
                return ran
            L = item.length
            use = [s for s in specs if (L not in full_only or s.method == "full")
                   and (h2o_lengths is None or L in h2o_lengths or s.method != "h2o")]
            # at the model's last positions the document's length tolerance (0.5 %) plus the question and
            # the answer could pass 32,768: leave more room there
            doc = make_document(tokenizer, L, r, seed=seed, question_room=48 if L < 32768 else 256)
            missing = {(q.qid, s.key) for q in doc.questions for s in use} - {(qid, k) for (l2, d, qid, k) in done
                                                                               if l2 == L and d == r}
            if not missing:
                continue
            todo_specs = [s for s in use if any(k == s.key for _q, k in missing)]
            todo_q = {qid for qid, _k in missing}
            t0 = time.perf_counter()
            records = run_document(model, tokenizer, doc, todo_specs, chunk=chunk,
                                   h2o=h2o_lengths is None or L in h2o_lengths, todo_questions=todo_q)
            records = [x for x in records if (x["qid"], x["spec"]) in missing]
            with path.open("a", encoding="utf-8") as f:
                f.write("".join(json.dumps(x) + "\n" for x in records))
            done |= {(x["length"], x["doc"], x["qid"], x["spec"]) for x in records}
            ran += 1
            full = [x["score"] for x in records if x["spec"] == "full"]
            print(f"long_context: {L} doc {r}: {len(records)} records in {time.perf_counter() - t0:.0f} s "
                  f"(full {sum(full):g}/{len(full)}; prefill {records[0].get('prefill_seconds', '-') if records else '-'} s)",
                  file=sys.stderr, flush=True)
    return ran


DEFAULT_PLAN = "4096:2;8192:2;16384:1"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.long_context run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gemma3-270m")
    parser.add_argument("--out", default=str(RESULTS), help=f"records folder (default {shown(RESULTS)})")
    parser.add_argument("--plan", default=DEFAULT_PLAN, help=f"LENGTH:DOCUMENTS;... (default {DEFAULT_PLAN})")
    parser.add_argument("--h2o-lengths", default=None, help="lengths where H2O runs (default: all; '' = none)")
    parser.add_argument("--full-only", default="", help="lengths where only the full cache runs (calibration)")
    parser.add_argument("--chunk", type=int, default=1024, help="prefill chunk of the document's capture (0: one forward)")
    parser.add_argument("--minutes", type=float, default=None, help="start no new document after this many minutes")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--chunked-agnostic", action="store_true",
                        help="only the question-agnostic default compressed by a chunked prefill (C = 2048, issue 24)")
    parser.add_argument("--specs", default=None,
                        help="run only these configurations, by record key (e.g. 'full,chunkkv/f0.1/qa')")
    args = parser.parse_args(argv)
    specs = CHUNKED_SPECS if args.chunked_agnostic else SPECS
    if args.specs is not None:
        known = {s.key: s for s in SPECS + CHUNKED_SPECS}
        asked = [k.strip() for k in args.specs.split(",") if k.strip()]
        unknown = [k for k in asked if k not in known]
        if unknown:
            parser.error(f"unknown --specs {', '.join(unknown)}; known: {', '.join(known)}")
        specs = [known[k] for k in asked]
    plan = parse_plan(args.plan)
    h2o = None if args.h2o_lengths is None else {int(x) for x in args.h2o_lengths.split(",") if x}
    full_only = {int(x) for x in args.full_only.split(",") if x}
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, tokenizer = load_pretrained(args.model, dtype=torch.float32, device="cpu")
    print(f"long_context: loaded {args.model} in {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    deadline = time.time() + 60 * args.minutes if args.minutes else None
    run_grid(model, tokenizer, Path(args.out), plan, specs, chunk=args.chunk or None, h2o_lengths=h2o,
             full_only=full_only, deadline=deadline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
