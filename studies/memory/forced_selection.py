"""Is a chunked prefill's loss its selection or its states? (issue 24)

For each sample of the real-model grid (``task:length:index``, seed 0, the whole prompt: context and
question, query-aware), at one budget (``--keep-tokens``, default 128, or ``--keep-fraction``) and
chunk size (``--chunk``, default 1024), three caches answer:

* **one-shot**: ChunkKV compressing the full prefill (the grid's ``chunkkv/t128/c10/r1`` row at KV 128);
* **chunked**: the chunked prefill with the look-ahead (``.../p1024/lamax``): its own selection, and
  keys and values computed over what was held;
* **forced**: the one-shot prefill's keys and values (and its last logits), pruned on every layer to
  exactly the positions the chunked run kept.

If *forced* answers as one-shot does, the chunked run chose well and lost the answer in its states
(each chunk attends over what is held, not the whole prompt), which no selection can fix; if it
answers as *chunked* does, the loss is in the selection.

    python -m studies.memory.forced_selection --plan "4096:niah_paper,niah_nl,multikey:8" \\
        --out studies/memory/results/forced_selection.jsonl
    python -m studies.memory.forced_selection --report studies/memory/results/forced_selection.jsonl

Records are appended per sample; a rerun skips the samples already there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from chunkkv.capture import capture_prefill
from chunkkv.context import CompressedContext
from chunkkv.evaluation.metrics import wilson_interval
from chunkkv.generation import Sampling, continue_from
from chunkkv.methods import make_method
from chunkkv.pipeline import compress, compress_from_capture
from chunkkv.pretrained import load_pretrained
from chunkkv.prompting import instructions

from ..real_grid.grid import MAX_NEW, GridSpec, _span_tokens
from ..real_grid.report import paired_difference
from ..real_grid.tasks import context_split, make_samples, render, score_prediction

WINDOW = 32
CACHES = ("one_shot", "chunked", "forced")


def _needle_layers(ctx, needle: list[int]) -> float:
    """Share of the compressed layers that kept every needle token."""
    layers = ctx.cache.pruned_layers
    whole = [set(needle) <= set(ctx.kept_positions(i).tolist()) for i in layers]
    return round(sum(whole) / len(layers), 3)


def pruned_to(full: CompressedContext, kept: dict[int, tuple[torch.Tensor, torch.Tensor | None]]) -> CompressedContext:
    """``full`` (a whole-prompt cache) with each layer ``i`` of ``kept`` pruned to ``kept[i]`` =
    ``(index [B, 1 or Hkv, S], valid [B, S] or None)``: since a full cache's slots are the prompt
    positions, ``index`` is prompt positions. ``full`` itself is unchanged."""
    cache = full.cache  # a fork
    for i, (index, valid) in kept.items():
        if not hasattr(cache.layers[i], "prune"):
            # a full cache keeps the stock sliding layers; one-shot compresses those only when the
            # window holds the whole prompt, and then there is no whole-prompt layer here to prune
            raise ValueError(f"layer {i} of the full cache is a stock {type(cache.layers[i]).__name__}, which the "
                             "chosen run compressed; force only prompts longer than the sliding window")
        cache.layers[i].prune(index, valid)
    return CompressedContext(cache, full.input_ids, full.attention_mask, full.next_logits, full.method, full.stats,
                             full.source)


def pruned_like(full: CompressedContext, chosen: CompressedContext) -> CompressedContext:
    """``full`` pruned on every compressed layer to exactly the positions ``chosen`` kept:
    ``chosen``'s selection over ``full``'s keys, values and last logits."""
    held = chosen.cache  # a fork: ``chosen`` is unchanged
    return pruned_to(full, {i: (held.layers[i].kept_index, held.layers[i].valid) for i in held.pruned_layers})


def run_sample(model, tokenizer, task: str, length: int, index: int, budget: dict, chunk: int) -> dict:
    sample = make_samples(tokenizer, task, length, index + 1, seed=0)[index]
    context_ids, question_ids = context_split(tokenizer, sample)
    ids = torch.tensor([context_ids + question_ids])
    width = ids.shape[1]
    needle = _span_tokens(tokenizer, render(tokenizer, sample.context, sample.question, sample.prefix),
                          sample.reference)
    one_spec = GridSpec("chunked", "chunkkv", chunk_size=10, reuse_depth=1, **budget)
    chunk_spec = GridSpec("chunked", "chunkkv", chunk_size=10, reuse_depth=1, prefill_chunk=chunk, lookahead=True,
                          **budget)
    t0 = time.perf_counter()
    chunked = compress(model, ids, method=chunk_spec.build(WINDOW, None, tokenizer), prefill_chunk=chunk,
                       lookahead=True, tokenizer=tokenizer, chat_template=True)
    capture = capture_prefill(model, ids, window=WINDOW + len(question_ids), surprisal=False,
                              instructions=instructions(tokenizer, chat=True))
    one_shot = compress_from_capture(capture, one_spec.build(WINDOW, None, tokenizer))
    forced = pruned_like(compress_from_capture(capture, make_method("full")), chunked)
    eos = tokenizer.eos_token_id
    sampling = Sampling(max_new_tokens=MAX_NEW.get(task, 24), eos_token_id=eos, pad_token_id=eos)
    record = {"task": task, "length": length, "index": index, "budget": budget, "chunk": chunk,
              "prompt_tokens": width}
    for name, ctx in zip(CACHES, (one_shot, chunked, forced)):
        toks = continue_from(model, ctx, None, sampling)[0].tolist()
        if eos in toks:
            toks = toks[: toks.index(eos)]
        pred = tokenizer.decode(toks, skip_special_tokens=True)
        record[name] = {"prediction": pred, "score": score_prediction(sample, pred)["score"],
                        "needle_layers": _needle_layers(ctx, needle)}
    record["seconds"] = round(time.perf_counter() - t0, 1)
    return record


def three_caches(group: list[dict], note=None) -> list[str]:
    """Table lines for the records ``group``: each cache's answers (Wilson 95 %), then forced against
    one-shot and chunked, and chunked against one-shot (paired). ``note(name)``: text after a row."""
    n = len(group)
    lines = []
    for name in CACHES:
        hits = sum(r[name]["score"] >= 1.0 for r in group)
        lo, hi = wilson_interval(hits, n)
        lines.append(f"  {name:8s} {hits}/{n} = {100 * hits / n:.1f} % ({100 * lo:.0f}-{100 * hi:.0f})"
                     + (f"; {note(name)}" if note else ""))
    for ref, other in (("one_shot", "forced"), ("chunked", "forced"), ("one_shot", "chunked")):
        pairs = [(float(r[ref]["score"] >= 1.0), float(r[other]["score"] >= 1.0)) for r in group]
        lines.append(f"  {other} against {ref}: {paired_difference(pairs)}")
    return lines


def report(path: Path) -> str:
    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    lines = []

    def cell(r: dict, length: bool) -> str:
        return json.dumps(r["budget"], sort_keys=True) + f" C={r['chunk']}" + (f" L={r['length']}" if length else " all lengths")

    keys = sorted({cell(r, True) for r in rows} | {cell(r, False) for r in rows})
    for key in keys:
        group = [r for r in rows if key in (cell(r, True), cell(r, False))]
        lines.append(f"{key}: n = {len(group)}")
        lines += three_caches(group, lambda name, g=group: "needle whole on "
                              f"{sum(r[name]['needle_layers'] for r in g) / len(g):.2f} of the layers")
    return "\n".join(lines)


def common_arguments(parser: argparse.ArgumentParser, chunk: int, out: str) -> None:
    """The flags every forced-cache study shares: the chunk, threads, records file and ``--report``."""
    parser.add_argument("--chunk", type=int, default=chunk)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=out)
    parser.add_argument("--report", help="print the table of this records file and exit")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--plan", default="4096:niah_paper,niah_nl,multikey:8", help="LENGTH:TASKS:N;...")
    budgets = parser.add_mutually_exclusive_group()
    budgets.add_argument("--keep-tokens", type=int, help="the budget in tokens a layer (default 128)")
    budgets.add_argument("--keep-fraction", type=float, help="the budget as the share of the prompt kept")
    common_arguments(parser, 1024, "studies/memory/results/forced_selection.jsonl")
    args = parser.parse_args(argv)
    if args.report:
        print(report(Path(args.report)))
        return 0
    torch.set_num_threads(args.threads)
    model, tokenizer = load_pretrained("smollm2", dtype=torch.float32, device="cpu")
    out = Path(args.out)
    budget = ({"keep_fraction": args.keep_fraction} if args.keep_fraction is not None
              else {"keep_tokens": args.keep_tokens or 128})
    done = set()
    if out.exists():
        done = {(r["task"], r["length"], r["index"], json.dumps(r["budget"], sort_keys=True), r["chunk"])
                for r in map(json.loads, out.open(encoding="utf-8"))}
    for item in args.plan.split(";"):
        length, tasks, n = item.split(":")
        for index in range(int(n)):
            for task in tasks.split(","):
                key = (task, int(length), index, json.dumps(budget, sort_keys=True), args.chunk)
                if key in done:
                    continue
                record = run_sample(model, tokenizer, task, int(length), index, budget, args.chunk)
                with out.open("a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                print(f"{task} {length} #{index}: " + ", ".join(
                    f"{k} {record[k]['score']:.2f}" for k in ("one_shot", "chunked", "forced")) +
                      f" ({record['seconds']} s)", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
