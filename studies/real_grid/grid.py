"""The real-model quality grid: every method x budget on :mod:`studies.real_grid.tasks`, one prefill per sample.

For each sample the prompt is prefilled once (:func:`chunkkv.capture.capture_prefill`); every
configuration's compressed cache is built from that capture (:func:`compress_from_capture`, equal
to its own ``compress``), and all query-aware configurations decode together as one batch
(:func:`stack_contexts`); the question-agnostic row is served from the same capture's context
prefix (:func:`capture_prefix`) and decodes as a second batch after the question is fed.

Records go to ``<out>/records.jsonl``, one line per (task, length, sample, configuration), appended
as each sample finishes, so a run can stop at any time and resume (finished samples are skipped);
runs with other settings append to the same file (merging is by key). Samples are visited in
rounds (sample 0 of every task and length, then sample 1, ...), so a run cut short still covers
every cell evenly.

``python -m studies.real_grid run --plan "1024:niah_paper,niah_nl:8:all"`` (see ``--help``; ``--out``
defaults to ``studies/real_grid/results``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from chunkkv.analysis import adjacent_mean, jaccard_matrix, mean_head_jaccard, stacked_kept_masks, union_over_heads
from chunkkv.boundaries import boundary_token_ids
from chunkkv.capture import capture_prefill, capture_prefix
from chunkkv.context import stack_contexts
from chunkkv.errors import ChunkKVError
from chunkkv.evaluation.store import read_jsonl
from chunkkv.generation import Sampling, continue_from
from chunkkv.methods import make_method
from chunkkv.agnostic import agnostic_method, keep_numbers_whole
from chunkkv.pipeline import compress, compress_from_capture
from chunkkv.prompting import instructions
from chunkkv.scorers import SHALLOW_DEPTH, SHALLOW_SINK, Combined, ReconstructionScorer, SurprisalScorer
from chunkkv.pretrained import load_pretrained

from .. import shown
from .tasks import REAL_TASKS, RealSample, context_split, make_samples, render, score_prediction

__all__ = ["GridSpec", "chunked_specs", "default_specs", "run_grid"]

#: Issue 24 item 5's candidate: the default (hybrid) with the shallow pass scoring only its last layer
#: (the quarter's last; the layers below it run the model's own fused attention).
HYBRID_LAST = Combined(((ReconstructionScorer(depth=SHALLOW_DEPTH, sink=SHALLOW_SINK, last_only=True), 1.0),
                        (SurprisalScorer(), 1.0)))

RESULTS = Path(__file__).resolve().parent / "results"

METHODS = ["streamingllm", "h2o", "snapkv", "pyramidkv", "chunkkv"]
FRACTIONS = [0.05, 0.1, 0.2, 0.3]
TOKENS = [64, 128, 256, 512]
MAX_NEW = {"niah_paper": 16, "niah_nl": 10, "niah_number": 10, "multikey": 6, "vt": 6, "icl": 4}


@dataclass(frozen=True)
class GridSpec:
    """One configuration: a method with a budget and its settings; ``agnostic`` = compress the
    context before the question is known; ``group`` names the table it belongs to."""

    group: str
    method: str
    keep_fraction: float | None = None
    keep_tokens: int | None = None
    chunk_size: int | None = None
    reuse_depth: int | None = None
    boundaries: bool = False
    agnostic: bool = False
    timed: bool = False  # scores computed for this spec alone, so select_seconds is its own cost
    prefill_chunk: int | None = None  # chunked prefill (own forward, not served from the capture)
    lookahead: bool = False  # chunked: each chunk scored by the prompt's last window fed early
    scoring: str | None = None  # a scoring name, or "default": the question-agnostic default
    numbers: bool = False  # ChunkKV never cuts a number written digit by digit (digit_ids)
    reserve: float | None = None  # chunked: early re-selections keep up to reserve x the budget
    # one-shot, the prompt's last token fed after the compression: the first answer token then comes
    # from the compressed cache, as in a chunked prefill, not from the full prefill's last position
    refed: bool = False
    # question-agnostic chunked, each copy pass over its mean on the chunk's own tokens: the library's scoring
    # since 8bac4cf; the key keeps these records apart from the chunked ones made before it
    ppm: bool = False
    # question-agnostic chunked, "hybrid" run as "hybrid_chunked" (its copy part at 0.3): the library's since
    # this key; keeps these records apart from the ppm ones made at full weight
    hybrid_chunked: bool = False

    @property
    def key(self) -> str:
        parts = [self.method]
        for name, value in (("f", self.keep_fraction), ("t", self.keep_tokens), ("c", self.chunk_size),
                            ("r", self.reuse_depth)):
            if value is not None:
                parts.append(f"{name}{value:g}")
        if self.boundaries:
            parts.append("bnd")
        if self.agnostic:
            parts.append("qa")
        if self.timed:
            parts.append("timed")
        if self.prefill_chunk is not None:
            parts.append(f"p{self.prefill_chunk}")
        if self.lookahead:
            # "la": records of the first look-ahead (each re-selection by its own pass's scores);
            # "lamax": the look-ahead whose kept slots carry their best score so far (the library's now)
            parts.append("lamax")
        if self.scoring is not None:
            parts.append(f"s{self.scoring}")
        if self.numbers:
            parts.append("num")
        if self.reserve is not None:
            parts.append(f"res{self.reserve:g}")
        if self.refed:
            parts.append("refed")
        if self.ppm:
            parts.append("ppm")
        if self.hybrid_chunked:
            parts.append("hc")
        return "/".join(parts)

    def build(self, window: int, boundary_ids: frozenset[int] | None, tokenizer=None):
        if self.method == "full":
            return make_method("full")
        params: dict[str, Any] = {"window": window}
        for name in ("keep_fraction", "keep_tokens", "chunk_size", "reuse_depth"):
            if getattr(self, name) is not None:
                params[name] = getattr(self, name)
        if self.boundaries:
            params["boundary_ids"] = boundary_ids
        method = make_method(self.method, **params)
        if self.numbers:
            method = keep_numbers_whole(method, tokenizer)
        if self.scoring == "default":  # what question-agnostic generate runs: hybrid, sentence chunks
            return agnostic_method(method, None, tokenizer)
        if self.scoring == "default-last":  # the same, the shallow pass scored at its last layer only
            return replace(agnostic_method(method, None, tokenizer), scoring=HYBRID_LAST)
        return method if self.scoring is None else agnostic_method(method, self.scoring)


def default_specs(num_layers: int, methods=METHODS, fractions=FRACTIONS, tokens=TOKENS,
                  chunk_sizes=(1, 3, 5, 10, 20, 30), reuse_depths=(1, 2, 3, 5, 10, 30),
                  boundary_fractions=(0.05, 0.1), agnostic_fraction: float | None = 0.1) -> list[GridSpec]:
    """The grid: full; every method at every budget (ChunkKV: chunk 10, no reuse); ChunkKV chunk
    sizes and reuse depths at 10 %; boundary-aware chunks; the question-agnostic row."""
    specs = [GridSpec("budget", "full")]
    for m in methods:
        extra = {"chunk_size": 10, "reuse_depth": 1} if m == "chunkkv" else {}
        specs += [GridSpec("budget", m, keep_fraction=f, **extra) for f in fractions]
        specs += [GridSpec("budget", m, keep_tokens=t, **extra) for t in tokens]
    specs += [GridSpec("chunk", "chunkkv", keep_fraction=0.1, chunk_size=c, reuse_depth=1, timed=True)
              for c in chunk_sizes]
    specs += [GridSpec("reuse", "chunkkv", keep_fraction=0.1, chunk_size=10, reuse_depth=min(d, num_layers),
                       timed=True) for d in reuse_depths if d != 1]
    specs += [GridSpec("boundary", "chunkkv", keep_fraction=f, chunk_size=10, reuse_depth=1, boundaries=True)
              for f in boundary_fractions]
    if agnostic_fraction is not None:
        specs += [GridSpec("agnostic", m, keep_fraction=agnostic_fraction, agnostic=True,
                           **({"chunk_size": 10, "reuse_depth": 1} if m == "chunkkv" else {}))
                  for m in methods if m != "h2o"]
    return list(dict.fromkeys(specs))


def chunked_specs(tokens=(128,), fractions=(0.1,), chunks=(512, 1024), lookahead=(512, 1024),
                  agnostic_fraction: float | None = 0.2, agnostic_chunks=()) -> list[GridSpec]:
    """The chunked-prefill grid (issues 11 and 24): full; ChunkKV one-shot and with chunked prefill of
    ``chunks`` tokens, each chunk scored by its own last queries, and of ``lookahead`` tokens, each
    chunk scored by the prompt's last window fed early, at every budget (chunk 10, no reuse); the
    question-agnostic default at ``agnostic_fraction``, one-shot and chunked."""
    budgets = [{"keep_tokens": t} for t in tokens] + [{"keep_fraction": f} for f in fractions]
    specs = [GridSpec("chunked", "full")]
    for b in budgets:
        specs.append(GridSpec("chunked", "chunkkv", chunk_size=10, reuse_depth=1, **b))
        specs += [GridSpec("chunked", "chunkkv", chunk_size=10, reuse_depth=1, prefill_chunk=c, **b) for c in chunks]
        specs += [GridSpec("chunked", "chunkkv", chunk_size=10, reuse_depth=1, prefill_chunk=c, lookahead=True, **b)
                  for c in lookahead]
    if agnostic_fraction is not None:
        specs.append(GridSpec("chunked", "chunkkv", keep_fraction=agnostic_fraction, agnostic=True, scoring="default"))
        specs += [GridSpec("chunked", "chunkkv", keep_fraction=agnostic_fraction, agnostic=True, scoring="default",
                           prefill_chunk=c) for c in agnostic_chunks]
    return specs


def number_specs() -> list[GridSpec]:
    """Issue 24 item 6: ChunkKV with and without whole numbers, query-aware at KV 128 and
    question-agnostic (the default) at 20 %."""
    return [GridSpec("numbers", "full"),
            GridSpec("numbers", "chunkkv", keep_tokens=128, chunk_size=10, reuse_depth=1),
            GridSpec("numbers", "chunkkv", keep_tokens=128, chunk_size=10, reuse_depth=1, numbers=True),
            GridSpec("numbers", "chunkkv", keep_fraction=0.2, agnostic=True, scoring="default"),
            GridSpec("numbers", "chunkkv", keep_fraction=0.2, agnostic=True, scoring="default", numbers=True)]


def _span_tokens(tokenizer, text: str, needle: str | None) -> list[int]:
    """Token positions of ``needle`` inside the rendered prompt ``text`` (empty if absent)."""
    if not needle or needle not in text:
        return []
    start = text.index(needle)
    end = start + len(needle)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < end and e > start]


def _kept_stats(ctx, prompt_len: int, spans: dict[str, list[int]], full_matrix: bool) -> dict[str, Any]:
    """Adjacent-layer Jaccard and how much of the needle/answer each layer kept."""
    _layers, masks = stacked_kept_masks(ctx.cache, prompt_len)  # [L, H, T]
    union = union_over_heads(masks)
    out: dict[str, Any] = {"kept_fraction": round(float(masks.float().mean()), 4)}
    if union.shape[0] > 1:
        ju = jaccard_matrix(union)
        out["jaccard_union"] = round(adjacent_mean(ju), 4)
        out["jaccard_head"] = round(adjacent_mean(mean_head_jaccard(masks)), 4)
        if full_matrix:
            out["jaccard_matrix"] = [[round(float(x), 3) for x in row] for row in ju]
    for name, span in spans.items():
        if span:
            per_layer = union[:, span].float().mean(-1)  # share of the span kept, per layer
            out[f"{name}_kept_mean"] = round(float(per_layer.mean()), 4)
            out[f"{name}_kept_min"] = round(float(per_layer.min()), 4)
            out[f"{name}_whole_layers"] = round(float((per_layer == 1).float().mean()), 4)
    return out


def run_sample(model, tokenizer, sample: RealSample, specs: list[GridSpec], *, window: int,
               boundary_ids: frozenset[int], h2o: bool, jaccard_keys: set[str]) -> list[dict[str, Any]]:
    """Every spec on one sample; returns one record per spec."""
    device = next(model.parameters()).device
    text = render(tokenizer, sample.context, sample.question, sample.prefix)
    context_ids, question_ids = context_split(tokenizer, sample)
    ids = torch.tensor([context_ids + question_ids], device=device)
    width = ids.shape[1]
    q_len = len(question_ids)
    spans = {"needle": _span_tokens(tokenizer, text, sample.reference)}
    answer = next((a for a in sample.answers if sample.reference and a in sample.reference), None)
    if answer and sample.reference in text:
        base = text.index(sample.reference)
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        a0 = base + sample.reference.index(answer)
        spans["answer"] = [i for i, (s, e) in enumerate(enc["offset_mapping"]) if s < a0 + len(answer) and e > a0]
    want_h2o = h2o and any(s.method == "h2o" and not s.agnostic for s in specs)
    t0 = time.perf_counter()
    # the question-agnostic scorers run on the context's prefix of this capture (surprisal cut from it,
    # scoring passes with the instruction asked through the chat template, as the prompt is rendered)
    capture = capture_prefill(model, ids, window=window + q_len, accumulated=want_h2o,
                              surprisal=any(s.scoring is not None for s in specs),
                              instructions=instructions(tokenizer, chat=True))
    capture_s = time.perf_counter() - t0
    prefix = capture_prefix(capture, len(context_ids)) if any(s.agnostic for s in specs) else None
    eos = tokenizer.eos_token_id
    sampling = Sampling(max_new_tokens=MAX_NEW.get(sample.task, 24), eos_token_id=eos, pad_token_id=eos)
    rows: dict[bool | str, list[tuple[GridSpec, Any, dict]]] = {False: [], True: [], "refed": []}
    for spec in specs:
        if spec.method == "h2o" and not want_h2o:
            continue
        method = spec.build(window, boundary_ids, tokenizer)
        if spec.refed:
            ctx = compress(model, ids[:, :-1], method=method)  # its own one-shot prefill, the last token held back
            prefill_s = None
        elif spec.prefill_chunk is not None:
            t2 = time.perf_counter()
            # a question-agnostic row compresses the context alone; the question is fed after it
            prompt = ids[:, :len(context_ids)] if spec.agnostic else ids
            ctx = compress(model, prompt, method=method, prefill_chunk=spec.prefill_chunk, lookahead=spec.lookahead,
                           reserve=spec.reserve or 1.0, tokenizer=tokenizer, chat_template=True)
            prefill_s = time.perf_counter() - t2
        else:
            ctx = compress_from_capture(prefix if spec.agnostic else capture, method, share_scores=not spec.timed)
            prefill_s = None
        info = _kept_stats(ctx, ctx.input_ids.shape[1], spans, spec.key in jaccard_keys)
        info["select_seconds"] = round(ctx.stats.select_seconds, 4)
        if ctx.stats.scoring_seconds:
            info["scoring_seconds"] = round(ctx.stats.scoring_seconds, 3)
        info["method_describe"] = ctx.method.describe()  # what ran (a chunked "hybrid" runs as "hybrid_chunked")
        if prefill_s is not None:
            info["prefill_seconds"] = round(prefill_s, 3)
        rows["refed" if spec.refed else spec.agnostic].append((spec, ctx, info))
    records = []
    decode_s = {}
    for group, batch in rows.items():
        if not batch:
            continue
        t1 = time.perf_counter()
        stacked = stack_contexts([ctx for _s, ctx, _i in batch])
        # what is fed after the compressed cache: the question (question-agnostic), the prompt's last token
        # (refed), or nothing (the prompt's own last logits give the first token)
        new = {True: torch.tensor([question_ids], device=device), "refed": ids[:, -1:]}.get(group)
        tokens = continue_from(model, stacked, new, sampling).tolist()
        for spec, _c, _i in batch:
            decode_s[spec.key] = time.perf_counter() - t1
        for (spec, _ctx, info), toks in zip(batch, tokens):
            if eos in toks:
                toks = toks[: toks.index(eos)]
            pred = tokenizer.decode(toks, skip_special_tokens=True)
            records.append({
                "task": sample.task, "length": sample.length, "index": sample.index, "spec": spec.key,
                "group": spec.group, "method": spec.method, "prompt_tokens": width, "question_tokens": q_len,
                "depth": sample.meta.get("depth"), "prediction": pred, **score_prediction(sample, pred), **info,
            })
    for r in records:
        r["capture_seconds"] = round(capture_s, 3)
        r["decode_seconds"] = round(decode_s.get(r["spec"], 0.0), 3)
    del capture, prefix, rows
    return records


def _load_done(path: Path) -> set[tuple]:
    # a torn last line from an interrupted run is not read: that sample is redone
    return {(r["task"], r["length"], r["index"], r["spec"]) for r in read_jsonl(path, key="spec")}


def is_headline(spec: GridSpec) -> bool:
    """The rows run at every length: full, KV 128 and 10 % of every method, fixed ChunkKV at 5 %
    (against boundary-aware chunks), boundary-aware chunks and the question-agnostic row."""
    if spec.group in ("boundary", "agnostic", "chunked", "numbers") or spec.method == "full":
        return True
    if spec.group != "budget":
        return False
    return spec.keep_tokens == 128 or spec.keep_fraction == 0.1 or (spec.method == "chunkkv" and spec.keep_fraction == 0.05)


@dataclass
class PlanItem:
    """What runs at one length: ``tasks``, ``samples`` per task, the whole grid or the headline rows."""

    length: int
    tasks: list[str]
    samples: int
    whole: bool


def parse_plan(text: str) -> list[PlanItem]:
    """``"1024:niah_paper,niah_nl:8:all;2048:niah_paper:4:headline"`` -> plan items."""
    items = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        try:
            length, tasks, n, kind = part.split(":")
            item = PlanItem(int(length), [t for t in tasks.split(",") if t], int(n), kind == "all")
        except ValueError:
            raise ChunkKVError(f"--plan item {part!r} must be LENGTH:TASK,TASK:SAMPLES:all|headline") from None
        bad = [t for t in item.tasks if t not in REAL_TASKS]
        if bad or kind not in ("all", "headline") or item.length < 64 or item.samples < 0:
            raise ChunkKVError(f"--plan item {part!r}: unknown task {', '.join(bad)} or bad length/samples/kind; "
                               f"tasks: {', '.join(REAL_TASKS)}")
        items.append(item)
    return items


def run_grid(model, tokenizer, out: Path, plan: list[PlanItem], specs: list[GridSpec], *, window: int = 32,
             h2o_lengths: set[int] | None = None, seed: int = 0, progress: bool = True,
             deadline: float | None = None) -> int:
    """Run the grid, appending to ``out/records.jsonl``; returns the number of samples run.

    ``plan``: per length, the tasks, samples per task and whether every spec or only the headline
    rows run. ``h2o_lengths``: lengths where H2O runs (its all-query scores cost more than the
    prefill; None = all). ``deadline``: a ``time.time()`` after which no new sample starts.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / "records.jsonl"
    done = _load_done(path)
    boundary_ids = boundary_token_ids(tokenizer)
    jaccard_keys = {s.key for s in specs if s.group == "budget" and s.keep_fraction == 0.1}
    order = [(r, item, t) for r in range(max((i.samples for i in plan), default=0)) for item in plan
             for t in item.tasks if r < item.samples]
    pool: dict[tuple[str, int], list[RealSample]] = {}
    ran = 0
    for r, item, t in order:
        if deadline is not None and time.time() > deadline:
            print("real_grid: deadline reached, stopping", file=sys.stderr)
            break
        L = item.length
        todo = [s for s in specs if (t, L, r, s.key) not in done and (item.whole or is_headline(s)) and not (
            s.method == "h2o" and h2o_lengths is not None and L not in h2o_lengths)]
        if not todo:
            continue
        if (t, L) not in pool:
            pool[(t, L)] = make_samples(tokenizer, t, L, item.samples, seed=seed)
        sample = pool[(t, L)][r]
        t0 = time.perf_counter()
        records = run_sample(model, tokenizer, sample, todo, window=window, boundary_ids=boundary_ids,
                             h2o=h2o_lengths is None or L in h2o_lengths, jaccard_keys=jaccard_keys)
        with path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(rec) + "\n" for rec in records))
        ran += 1
        if progress:
            full = next((x["score"] for x in records if x["spec"] == "full"), None)
            print(f"real_grid: {t} {L} #{r}: {len(records)} configs in {time.perf_counter() - t0:.0f} s (full {full})",
                  file=sys.stderr, flush=True)
    return ran


def measure_speedup(model, tokenizer, sample: RealSample, specs: list[GridSpec], window: int = 32) -> dict[str, Any]:
    """Wall time of separate ``compress`` + decode per spec vs one capture + stacked decode (same specs)."""
    boundary_ids = frozenset()
    context_ids, question_ids = context_split(tokenizer, sample)
    ids = torch.tensor([context_ids + question_ids], device=next(model.parameters()).device)
    eos = tokenizer.eos_token_id
    sampling = Sampling(max_new_tokens=MAX_NEW.get(sample.task, 24), eos_token_id=eos, pad_token_id=eos)
    t0 = time.perf_counter()
    separate = []
    for spec in specs:
        ctx = compress(model, ids, method=spec.build(window, boundary_ids))
        separate.append(continue_from(model, ctx, None, sampling)[0].tolist())
    t_separate = time.perf_counter() - t0
    t0 = time.perf_counter()
    capture = capture_prefill(model, ids, window=window, accumulated=any(s.method == "h2o" for s in specs))
    ctxs = [compress_from_capture(capture, s.build(window, boundary_ids)) for s in specs]
    t_build = time.perf_counter() - t0
    together = continue_from(model, stack_contexts(ctxs), None, sampling).tolist()
    t_one = time.perf_counter() - t0

    def cut(toks):
        return toks[: toks.index(eos)] if eos in toks else toks

    same = sum(cut(a) == cut(b) for a, b in zip(separate, together))
    return {"task": sample.task, "length": ids.shape[1], "configs": len(specs), "separate_seconds": round(t_separate, 2),
            "one_prefill_seconds": round(t_one, 2), "one_prefill_build_seconds": round(t_build, 2),
            "speedup": round(t_separate / t_one, 2), "same_answers": same}


DEFAULT_PLAN = ("1024:niah_paper,niah_nl,multikey,icl,vt:6:all;"
                "2048:niah_paper,niah_nl,multikey:4:headline")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.real_grid run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--out", default=str(RESULTS), help=f"records folder (default {shown(RESULTS)})")
    parser.add_argument("--plan", default=DEFAULT_PLAN,
                        help=f"LENGTH:TASKS:SAMPLES:all|headline;... (default {DEFAULT_PLAN})")
    parser.add_argument("--h2o-lengths", default="1024,2048", help="lengths where H2O runs ('' = none)")
    parser.add_argument("--full-only", action="store_true", help="only the full cache (task calibration)")
    parser.add_argument("--grid", choices=["budgets", "chunked", "chunked-lookahead", "numbers", "reserve",
                                           "agnostic-last", "refed", "ppm", "hchunked"], default="budgets",
                        help="budgets: every method and budget (issue 10); chunked: ChunkKV one-shot vs chunked "
                             "prefill C=256/512/1024 at KV 128 and 10 %% (issue 11); issue 24: chunked-lookahead "
                             "(the look-ahead and the question-agnostic default in chunks), reserve, numbers "
                             "(whole numbers), refed (one-shot, first answer token from the compressed cache), "
                             "agnostic-last (the default with a last-layer-only shallow pass), ppm (the default one-shot "
                             "and chunked, each chunk's copy pass over its mean: the library's since 8bac4cf), hchunked (the same, "
                             "hybrid in chunks as hybrid_chunked: the library's now)")
    parser.add_argument("--lookahead-chunks", default="512,1024",
                        help="chunked-lookahead grid: look-ahead prefill chunk sizes ('' = none; default 512,1024)")
    parser.add_argument("--agnostic-chunks", default="1024",
                        help="chunked-lookahead grid: question-agnostic chunk sizes ('' = none; default 1024)")
    parser.add_argument("--speedup", type=int, default=0,
                        help="first measure the one-prefill speed-up on N samples (first task and length of the plan)")
    parser.add_argument("--minutes", type=float, default=None, help="start no new sample after this many minutes")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        plan = parse_plan(args.plan)
        h2o = {int(x) for x in args.h2o_lengths.split(",") if x}
        lookahead_chunks = tuple(int(x) for x in args.lookahead_chunks.split(",") if x)
        agnostic_chunks = tuple(int(x) for x in args.agnostic_chunks.split(",") if x)
    except ValueError as exc:
        print(f"real_grid: error: bad number in --h2o-lengths, --lookahead-chunks or --agnostic-chunks: {exc}",
              file=sys.stderr)
        return 2
    except ChunkKVError as exc:
        print(f"real_grid: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained(args.model, dtype=torch.float32, device="cpu")
    num_layers = model.config.num_hidden_layers
    if args.full_only:
        specs = [GridSpec("budget", "full")]
    elif args.grid == "chunked":
        specs = chunked_specs(agnostic_chunks=(1024,))
    elif args.grid == "chunked-lookahead":  # issue 24 without the chunk's-own-queries rows (issue 11's)
        specs = chunked_specs(chunks=(), lookahead=lookahead_chunks, agnostic_chunks=agnostic_chunks)
    elif args.grid == "numbers":
        specs = number_specs()
    elif args.grid == "reserve":  # issue 24: look-ahead with early re-selections kept at reserve x the budget
        specs = [s for s in chunked_specs(chunks=(), lookahead=(), agnostic_fraction=None)]
        specs += [GridSpec("chunked", "chunkkv", chunk_size=10, reuse_depth=1, prefill_chunk=c, lookahead=True,
                           reserve=r, **b) for r in (None, 1.5) for c in (1024,)
                  for b in ({"keep_tokens": 128}, {"keep_fraction": 0.1})]
    elif args.grid == "agnostic-last":  # issue 24 item 5: the default vs its last-layer-only shallow pass
        specs = [GridSpec("chunked", "full")] + [
            GridSpec("chunked", "chunkkv", keep_fraction=f, agnostic=True, scoring=s)
            for f in (0.2,) for s in ("default", "default-last")]
    elif args.grid == "refed":  # issue 24: one-shot with its first answer token from the compressed cache
        specs = [GridSpec("chunked", "full")] + [
            GridSpec("chunked", "chunkkv", chunk_size=10, reuse_depth=1, refed=True, **b)
            for b in ({"keep_tokens": 128}, {"keep_fraction": 0.1})]
    elif args.grid == "ppm":  # issue 24: the question-agnostic default one-shot and chunked, as the library runs it now
        specs = [GridSpec("chunked", "full"),
                 GridSpec("chunked", "chunkkv", keep_fraction=0.2, agnostic=True, scoring="default")] + [
            GridSpec("chunked", "chunkkv", keep_fraction=0.2, agnostic=True, scoring="default", prefill_chunk=c,
                     ppm=True) for c in agnostic_chunks]
    elif args.grid == "hchunked":  # issue 24: the same, the copy part down-weighted in chunks (the library's now)
        specs = [GridSpec("chunked", "full"),
                 GridSpec("chunked", "chunkkv", keep_fraction=0.2, agnostic=True, scoring="default")] + [
            GridSpec("chunked", "chunkkv", keep_fraction=0.2, agnostic=True, scoring="default", prefill_chunk=c,
                     ppm=True, hybrid_chunked=True) for c in agnostic_chunks]
    else:
        specs = default_specs(num_layers)
    out = Path(args.out)
    deadline = time.time() + 60 * args.minutes if args.minutes else None
    if args.speedup and plan:
        head = [s for s in default_specs(num_layers) if s.group == "budget" and
                (s.keep_fraction == 0.1 or s.method == "full")]
        for k in range(args.speedup):
            sample = make_samples(tokenizer, plan[0].tasks[0], plan[0].length, k + 1, seed=99)[k]
            row = measure_speedup(model, tokenizer, sample, head)
            print(json.dumps(row), flush=True)
            out.mkdir(parents=True, exist_ok=True)
            with (out / "speedup.jsonl").open("a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
    run_grid(model, tokenizer, out, plan, specs, h2o_lengths=h2o, deadline=deadline)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
