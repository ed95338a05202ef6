"""The floor of the like-for-like compression step (issue 27): the work every exact implementation
of kvpress's ``ChunkKVPress(SnapKVPress())`` must do, timed alone.

Per compressed layer, the SnapKV score needs every window query's softmax over every prompt key:
the ``[window x keys]`` logits of each query head and their softmax. Nothing else is timed: no
pooling, selection, gather, masks or Python glue. The shapes are the bench's random 100M Llama (12
layers, 12 query heads over 4 KV heads, head dim 64) at the bench's 2k prompt, with kvpress's window
of 64. The product runs as chunkkv runs it (the query heads of a KV group stacked, one batched
matmul per KV head, into a reused buffer) and as a plain ``torch.matmul`` over repeated keys; the
softmax in place.

    python studies/benchmarks/step_floor.py --threads 1 --repeats 20

It prints the median over the repeats of the 12 layers' sum, for the product, the softmax and both,
and the speed-up a step at that floor would have over the kvpress steps given with ``--kvpress-ms``
(default: the three alternated rounds of ``results/peers-2k-1thread-rounds3``).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--window", type=int, default=64)
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--kvpress-ms", default="129.7,112.0,154.0",
                        help="kvpress ChunkKVPress steps (ms, all layers) to compare with, comma-separated")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    groups = args.heads // args.kv_heads
    queries = [torch.randn(1, args.kv_heads, groups * args.window, args.dim, generator=g) for _ in range(args.layers)]
    keys = [torch.randn(1, args.kv_heads, args.context, args.dim, generator=g) for _ in range(args.layers)]
    buffer = torch.empty(1, args.kv_heads, groups * args.window, args.context)

    def grouped() -> tuple[float, float]:
        product = softmax = 0.0
        for q, k in zip(queries, keys):
            t0 = time.perf_counter()
            torch.matmul(q, k.transpose(-1, -2), out=buffer)
            t1 = time.perf_counter()
            torch._softmax(buffer, -1, False, out=buffer)
            t2 = time.perf_counter()
            product, softmax = product + t1 - t0, softmax + t2 - t1
        return product, softmax

    def repeated() -> tuple[float, float]:
        product = softmax = 0.0
        for q, k in zip(queries, keys):
            qh = q.reshape(1, args.heads, args.window, args.dim)
            t0 = time.perf_counter()
            logits = torch.matmul(qh, k.repeat_interleave(groups, dim=1).transpose(-1, -2))
            t1 = time.perf_counter()
            torch.softmax(logits, dim=-1)
            t2 = time.perf_counter()
            product, softmax = product + t1 - t0, softmax + t2 - t1
        return product, softmax

    kvpress = [float(x) for x in args.kvpress_ms.split(",")]
    print(f"{args.layers} layers, {args.heads} query / {args.kv_heads} KV heads, dim {args.dim}, window {args.window}, "
          f"{args.context} keys, {args.threads} thread(s), median of {args.repeats}")
    print("| product as | product ms | softmax ms | both ms | kvpress step / both (" + ", ".join(f"{k:g}" for k in kvpress) + " ms) |")
    print("|---|---|---|---|---|")
    for name, fn in (("grouped, reused buffer (chunkkv)", grouped), ("repeated keys, plain matmul", repeated)):
        fn()  # warm-up
        runs = [fn() for _ in range(args.repeats)]
        product = statistics.median(r[0] for r in runs) * 1e3
        softmax = statistics.median(r[1] for r in runs) * 1e3
        both = statistics.median(r[0] + r[1] for r in runs) * 1e3
        ratios = ", ".join(f"{k / both:.2f}x" for k in kvpress)
        print(f"| {name} | {product:.1f} | {softmax:.1f} | {both:.1f} | {ratios} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
