"""The cost of chunked prefill's scoring choices (issue 24): peak memory and prefill time of ChunkKV
chunked prefill with each chunk scored by its own last queries, with the look-ahead, and of the
question-agnostic default (hybrid) kept chunk by chunk, from 8k to 64k tokens.

Memory and time are measured apart, as the benchmarks are (studies/benchmarks/README.md): the memory
phase runs in its own process with :class:`chunkkv.bench.MemoryMeter` (peak RSS above what was live
before the prefill, glibc's mmap threshold fixed so repeated runs agree); the time phase runs in
another process with the default allocator, the modes interleaved per length, ``--repeats`` times.
Model: the 100M random Llama of ``chunkkv bench`` (12 layers, 12 query / 4 KV heads, head dim 64,
float32), random token ids, ChunkKV keeping ``--kv`` tokens per layer (chunk 10, window 32), one
thread. The bound beside the memory is ``chunkkv.bench.prefill_memory.chunked_bound``: every layer's
K/V at ``kv + C`` tokens plus one chunk's activations.

    python -m studies.memory.chunked_cost --contexts 8k,16k,32k,64k --chunk 1024 --kv 1024

Rows are appended to ``studies/memory/results/chunked-cost/{memory,time}.jsonl`` (resumable).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "chunked-cost"
MODES = ("own", "lookahead", "agnostic")
INSTRUCTION = torch.arange(5, 15)  # the random model has no tokenizer: ten fixed ids stand for the instruction


def _method(mode: str, kv: int):
    from chunkkv import ChunkKV

    return ChunkKV(keep_tokens=kv) if mode != "agnostic" else ChunkKV(keep_tokens=kv, scoring="hybrid")


def _run(model, ids, mode: str, kv: int, chunk: int):
    from chunkkv import compress

    return compress(model, ids, method=_method(mode, kv), prefill_chunk=chunk, lookahead=mode == "lookahead",
                    scoring_prompt=INSTRUCTION)


def phase(kind: str, contexts: list[int], chunk: int, kv: int, repeats: int, out: Path) -> None:
    """One process: every (context, mode) of ``kind`` ("memory" or "time"), appended to ``out``."""
    from chunkkv.bench import MemoryMeter, random_llama
    from chunkkv.bench.prefill_memory import chunked_bound
    from chunkkv.evaluation.store import read_jsonl

    torch.set_num_threads(1)
    model = random_llama("random-100m", max_positions=max(contexts) + 64)
    vocab = model.config.vocab_size
    path = out / f"{kind}.jsonl"
    done = {(r["context"], r["mode"], r.get("repeat", 0)) for r in read_jsonl(path, key="mode")}
    meter = MemoryMeter(torch.device("cpu")) if kind == "memory" else None
    # warm-up: every mode once on a short prompt, so one-time allocations (kernels' buffers, thread
    # pools) do not land in the first measured row's peak (they added 12-17 MiB to it)
    warm = torch.randint(1, vocab, (1, 2 * chunk), generator=torch.Generator().manual_seed(0))
    for mode in MODES:
        _run(model, warm, mode, kv, chunk)
    for context in contexts:
        ids = torch.randint(1, vocab, (1, context), generator=torch.Generator().manual_seed(context))
        for repeat in range(repeats if kind == "time" else 1):
            for mode in MODES:  # interleaved, so a drift in the machine's load hits every mode alike
                if (context, mode, repeat) in done:
                    continue
                row = {"context": context, "mode": mode, "chunk": chunk, "kv": kv, "repeat": repeat,
                       "threads": torch.get_num_threads()}
                if meter is not None:
                    base = meter.current()
                    meter.reset_peak()
                start = time.perf_counter()
                ctx = _run(model, ids, mode, kv, chunk)
                row["prefill_s"] = round(time.perf_counter() - start, 3)
                row["scoring_s"] = round(ctx.stats.scoring_seconds, 3)
                if meter is not None:
                    row["peak_mib"] = round((meter.peak() - base) / 2**20, 1)
                    row["bound_mib"] = round(chunked_bound(model.config, kv, chunk)["total"] / 2**20, 1)
                    row["meter"] = meter.method
                else:
                    row["allocator"] = "default (mmap threshold not fixed)"
                row["kv_mib"] = round(ctx.cache.nbytes() / 2**20, 1)
                del ctx
                with path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
                print(kind, json.dumps(row), flush=True)


def report(out: Path) -> str:
    from chunkkv.evaluation.store import read_jsonl

    memory = read_jsonl(out / "memory.jsonl", key="mode")
    timing = read_jsonl(out / "time.jsonl", key="mode")
    contexts = sorted({r["context"] for r in memory + timing})
    label = {"own": "chunk's own queries", "lookahead": "look-ahead", "agnostic": "question-agnostic default (hybrid)"}
    lines = ["| prompt | " + " | ".join(f"peak MiB: {label[m]}" for m in MODES) + " | bound MiB | "
             + " | ".join(f"time: {label[m]} / own" for m in MODES[1:]) + " |",
             "|---" * (len(MODES) + 2 + len(MODES) - 1) + "|"]
    for c in contexts:
        peaks = {r["mode"]: r for r in memory if r["context"] == c}
        cells = [f"{peaks[m]['peak_mib']}" if m in peaks else "–" for m in MODES]
        bound = next((r["bound_mib"] for r in peaks.values()), "–")
        ratios = []
        for m in MODES[1:]:
            pairs = [(r["prefill_s"], o["prefill_s"]) for r in timing for o in timing
                     if r["context"] == c == o["context"] and r["mode"] == m and o["mode"] == "own"
                     and r["repeat"] == o["repeat"]]
            ratios.append(f"{sum(a / b for a, b in pairs) / len(pairs):.2f} (n={len(pairs)})" if pairs else "–")
        lines.append(f"| {c // 1024}k | " + " | ".join(cells) + f" | {bound} | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m studies.memory.chunked_cost", description=__doc__.split("\n\n")[0])
    ap.add_argument("--contexts", default="8k,16k,32k,64k")
    ap.add_argument("--chunk", type=int, default=1024)
    ap.add_argument("--kv", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=2, help="time phase: runs per (context, mode)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--phase", choices=["memory", "time", "both", "report"], default="both")
    args = ap.parse_args(argv)
    contexts = [int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in args.contexts.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.phase in ("memory", "time"):
        phase(args.phase, contexts, args.chunk, args.kv, args.repeats, out)
        return 0
    if args.phase == "both":  # each phase in a fresh process: the memory meter's allocator setting stays there
        for kind in ("memory", "time"):
            subprocess.run([sys.executable, "-m", "studies.memory.chunked_cost", "--phase", kind, "--contexts",
                            args.contexts, "--chunk", str(args.chunk), "--kv", str(args.kv), "--repeats",
                            str(args.repeats), "--out", str(out)], check=True)
    print(report(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
