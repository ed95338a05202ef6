"""Cost at length on Gemma 3 270M (CPU): KV bytes, peak memory, prefill time, the compression step's
share of it, and decode ms/token against a same-size bound, at 8k / 16k / 32k tokens.

Each (length, mode) runs in a fresh process (``cost --one LENGTH MODE``), so one mode's freed
memory or allocator state never shows in another's peak; the parent appends one JSON line per run
to ``results/cost.jsonl`` (resumable: finished rows are skipped) and writes the table into the
README's block between ``<!-- cost:begin -->`` and ``<!-- cost:end -->``. The prompt is the Paul
Graham essays (``<bos>`` + text, cut to the length). ``studies/long_context/cost_paused.sh`` runs it
with every other study job on the machine paused (``kill -STOP``, resumed on exit); each row
records whether that was so and the load average when it started. Modes:

- ``full``: the stock full cache, one forward (sdpa runs every sliding layer over the whole prompt);
- ``full-chunked``: the full cache prefilled ``C`` tokens at a time (the sliding layers then attend
  over ``C + 511`` keys);
- ``chunkkv``: one-shot ChunkKV at 10 % (chunk 10, window 32): each full-attention layer is pruned
  right after its own attention; ``compress(..., measure=True)`` gives the compression step's time;
- ``chunkkv-chunked`` / ``kv512-chunked``: ChunkKV at 10 % / KV 512 with chunked prefill ``C``
  (look-ahead scoring, the default);
- ``agnostic-chunked``: the question-agnostic default at 10 % (hybrid scoring, sentence chunks),
  chunked prefill ``C`` (its scores kept chunk by chunk).

Peak memory: :class:`chunkkv.bench.MemoryMeter` (CPU peak RSS, VmHWM reset) above what is live
after the model is loaded and warmed up. Decode: after the chunked modes (the full cache, ChunkKV
10 %, KV 512: the same caches as one-shot would leave, made faster), ``--warmup`` untimed then
``--steps`` timed greedy steps; the bound is a full cache of exactly the compressed cache's longest
layer (a prefill of that many tokens), its steps timed interleaved with the compressed cache's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .. import ROOT, shown
from ..real_grid.report import write_block

STUDY = Path(__file__).resolve().parent
MODES = ["full", "full-chunked", "chunkkv", "chunkkv-chunked", "kv512-chunked", "agnostic-chunked"]
DECODED = {"full-chunked", "chunkkv-chunked", "kv512-chunked"}
BEGIN, END = "<!-- cost:begin -->", "<!-- cost:end -->"


def _method(mode: str, tokenizer):
    from chunkkv.agnostic import agnostic_method
    from chunkkv.methods import make_method

    if mode.startswith("full"):
        return make_method("full")
    if mode.startswith("kv512"):
        return make_method("chunkkv", keep_tokens=512, chunk_size=10, window=32)
    method = make_method("chunkkv", keep_fraction=0.1, chunk_size=10, window=32)
    return agnostic_method(method, tokenizer=tokenizer) if mode.startswith("agnostic") else method


def measure_one(length: int, mode: str, chunk: int, steps: int, warmup: int, threads: int) -> dict[str, Any]:
    """One (length, mode) in this process: see the module docstring."""
    from chunkkv.bench import MemoryMeter
    from chunkkv.generation import extend
    from chunkkv.haystack import paul_graham_text
    from chunkkv.pipeline import compress
    from chunkkv.pretrained import load_pretrained

    torch.set_num_threads(threads)
    load = round(os.getloadavg()[0], 2)
    t0 = time.perf_counter()
    model, tok = load_pretrained("gemma3-270m", dtype=torch.float32, device="cpu")
    load_s = time.perf_counter() - t0
    ids = tok(paul_graham_text(min_chars=6 * length + 2000), return_tensors="pt")["input_ids"][:, :length]
    method = _method(mode, tok)
    prefill_chunk = chunk if mode.endswith("chunked") else None
    # warm-up: the same path on a short prompt (kernels, allocator)
    compress(model, ids[:, :1024], method=method, prefill_chunk=None if prefill_chunk is None else 512,
             tokenizer=tok, chat_template=False)
    meter = MemoryMeter(torch.device("cpu"))
    base = meter.current()
    meter.reset_peak()
    t1 = time.perf_counter()
    ctx = compress(model, ids, method=method, prefill_chunk=prefill_chunk, measure=True, tokenizer=tok,
                   chat_template=False)
    wall = time.perf_counter() - t1
    peak = meter.peak() - base
    kinds = ctx.cache.nbytes_by_kind()
    row: dict[str, Any] = {
        "length": length, "mode": mode, "chunk": prefill_chunk, "method": ctx.method.describe() if mode != "full" else "full",
        "threads": threads, "load_seconds": round(load_s, 1), "prefill_seconds": round(wall, 2),
        "compress_step_seconds": round(ctx.stats.select_seconds, 3),
        "scoring_seconds": round(ctx.stats.scoring_seconds or 0.0, 2),
        "peak_mib": round(peak / 2**20, 1), "kv_mib": round(ctx.cache.nbytes() / 2**20, 2),
        "kv_full_layers_mib": round(kinds.get("full_attention", {}).get("bytes", 0) / 2**20, 2),
        "kv_sliding_mib": round(kinds.get("sliding_attention", {}).get("bytes", 0) / 2**20, 2),
        "stored": ctx.cache.stored_lengths(), "meter": meter.method, "time": time.time(),
        "others_paused": os.environ.get("COST_OTHERS_PAUSED") == "1", "load_at_start": load,
    }
    if mode in DECODED:
        def step(c) -> float:
            s = time.perf_counter()
            extend(model, c, c.next_logits.argmax(-1)[:, None])
            return time.perf_counter() - s

        bound = None
        if mode != "full-chunked":
            kept = max(ctx.cache.stored_lengths())
            bound = compress(model, ids[:, :kept], method=_method("full", tok))
            row["bound_stored"] = bound.cache.stored_lengths()
            row["bound_kv_mib"] = round(bound.cache.nbytes() / 2**20, 2)
        for _ in range(warmup):
            step(ctx)
            if bound is not None:
                step(bound)
        ours, theirs = [], []
        for _ in range(steps):
            ours.append(step(ctx))
            if bound is not None:
                theirs.append(step(bound))
        ours.sort()
        row["decode_ms"] = round(1e3 * ours[len(ours) // 2], 2)
        if theirs:
            theirs.sort()
            row["bound_decode_ms"] = round(1e3 * theirs[len(theirs) // 2], 2)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    by = {(r["length"], r["mode"]): r for r in rows}
    lengths = sorted({r["length"] for r in rows})
    names = {"full": "full cache, one forward", "full-chunked": "full cache, chunked prefill",
             "chunkkv": "ChunkKV 10 %, one-shot", "chunkkv-chunked": "ChunkKV 10 %, chunked prefill",
             "kv512-chunked": "ChunkKV KV 512, chunked prefill",
             "agnostic-chunked": "question-agnostic default 10 %, chunked prefill"}
    threads = sorted({r["threads"] for r in rows})
    chunks = sorted({r["chunk"] for r in rows if r["chunk"]})
    lines = [f"Gemma 3 270M, float32, CPU ({', '.join(map(str, threads))} torch thread(s); the last column says whether "
             f"every other study job on the machine was paused), Paul Graham essays; chunked prefill C = {', '.join(map(str, chunks))}; one run per "
             "cell, each in a fresh process. KV = the cache after prefill (3 full-attention layers + 15 sliding "
             "layers); peak = peak RSS during the prefill above what was live before it (weights excluded). "
             "Compression step = scoring + selection + gather summed over the compressed layers (`measure=True`); "
             "for the question-agnostic default, + its scoring (surprisal, shallow reconstruction). Decode: median "
             "ms per token; bound = a full cache of the compressed cache's longest layer, timed interleaved.", "",
             "| tokens | configuration | KV MiB (full layers + sliding) | peak prefill MiB | prefill s | compression "
             "step (share of prefill) | decode ms/token | same-size bound ms/token | run |",
             "|---|---|---|---|---|---|---|---|---|"]
    for L in lengths:
        for mode in MODES:
            r = by.get((L, mode))
            if r is None:
                continue
            step = r["compress_step_seconds"] + (r["scoring_seconds"] if mode.startswith("agnostic") else 0.0)
            share = "–" if mode.startswith("full") else f"{step:.2f} s ({100 * step / r['prefill_seconds']:.1f} %)"
            bound = r.get("bound_decode_ms")
            run = (f"{r['threads']} thr, " + ("others paused" if r.get("others_paused")
                                              else f"under load (load avg {r.get('load_at_start')})"))
            bound_text = "–" if bound is None else f"{bound} (bound holds {max(r['bound_stored'])} tokens)"
            lines.append(
                f"| {L} | {names[mode]} | {r['kv_mib']:.1f} ({r['kv_full_layers_mib']:.1f} + {r['kv_sliding_mib']:.1f}) | "
                f"{r['peak_mib']:.0f} | {r['prefill_seconds']:.1f} | {share} | "
                f"{r.get('decode_ms', '–')} | {bound_text} | {run} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m studies.long_context cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", default="8192,16384,32704", help="prompt tokens (32704: 32k with room to decode)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"of {','.join(MODES)}")
    parser.add_argument("--chunk", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(STUDY / "results" / "cost.jsonl"))
    parser.add_argument("--report", default=str(STUDY / "README.md"), help="README whose cost block is rewritten ('' = none)")
    parser.add_argument("--one", nargs=2, metavar=("LENGTH", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(measure_one(int(args.one[0]), args.one[1], args.chunk, args.steps, args.warmup, args.threads)))
        return 0
    from chunkkv.evaluation.store import read_jsonl

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = read_jsonl(out, key="mode")
    done = {(r["length"], r["mode"]) for r in rows}
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
    for L in [int(x) for x in args.lengths.split(",") if x]:
        for mode in [m for m in args.modes.split(",") if m]:
            if (L, mode) in done:
                continue
            t0 = time.perf_counter()
            proc = subprocess.run([sys.executable, "-m", "studies.long_context", "cost", "--one", str(L), mode,
                                   "--chunk", str(args.chunk), "--steps", str(args.steps), "--warmup", str(args.warmup),
                                   "--threads", str(args.threads)], cwd=ROOT, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"cost: {L} {mode} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            print(f"cost: {L} {mode}: prefill {row['prefill_seconds']} s, peak {row['peak_mib']} MiB, KV {row['kv_mib']} MiB"
                  f" ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    body = table(rows)
    if args.report:
        write_block(Path(args.report), body, BEGIN, END)
    print(body)
    print(f"(records: {shown(out)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
