"""The allocator's effect on a plain decode loop: glibc's default against the mmap threshold fixed at 128 KiB.

Each measurement is a fresh process (``--child``) that builds the model, then runs the stock
transformers loop of ``crosscheck.py`` (one forward of the prompt into a ``DynamicCache``, then one
forward per greedy token, chunkkv never attached): one untimed prefill + decode first, then one timed
prefill and ``--decode-steps`` timed steps after ``--decode-warmup`` untimed ones. With ``fixed``, the
process makes a :class:`~chunkkv.bench.measure.MemoryMeter` before the model, which fixes the threshold
as ``chunkkv bench`` did for its whole run before issue 27. The parent alternates the two settings
(default, fixed, default, fixed, ...) so that drifting load hits both alike.

    python studies/benchmarks/allocator_effect.py --context 2048 --threads 1 --pairs 2 \\
        --out studies/benchmarks/results/allocator-effect
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path


def child(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from chunkkv.bench.measure import MemoryMeter, allocator_state

    if args.child == "fixed":
        MemoryMeter(torch.device("cpu"))
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(__file__).parent))
    from crosscheck import plain_decode, plain_prefill  # noqa: E402

    from chunkkv.bench.models import random_llama

    model = random_llama(args.model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, args.context), generator=g)
    with torch.inference_mode():
        _, cache, token = plain_prefill(model, ids)  # untimed round
        plain_decode(model, cache, token, 2, 1)
        del cache
        seconds, cache, token = plain_prefill(model, ids)
        steps = plain_decode(model, cache, token, args.decode_steps, args.decode_warmup)
    print(json.dumps({"setting": args.child, "allocator": allocator_state(), "prefill_s": seconds,
                      "decode_ms": [x * 1e3 for x in steps]}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random-100m")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=2, help="fresh processes per setting, alternated (2)")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--decode-warmup", type=int, default=2)
    p.add_argument("--out", help="folder for allocator_effect.json and .md")
    p.add_argument("--child", choices=["default", "fixed"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    runs = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    for i in range(args.pairs):
        for setting in ("default", "fixed"):
            cmd = [sys.executable, __file__, "--child", setting, "--model", args.model, "--context", str(args.context),
                   "--threads", str(args.threads), "--decode-steps", str(args.decode_steps),
                   "--decode-warmup", str(args.decode_warmup)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
            run = json.loads(out)
            run["median_decode_ms"] = statistics.median(run["decode_ms"])
            runs.append(run)
            print(f"pair {i + 1} {setting:7s}: prefill {run['prefill_s']:.2f} s, decode "
                  f"{run['median_decode_ms']:.1f} ms/token ({run['allocator']})", file=sys.stderr, flush=True)
    load_after = [round(x, 2) for x in os.getloadavg()]
    lines = [
        "# The allocator's effect on a plain decode loop",
        "",
        f"{args.model}, {args.context}-token prompt, {args.threads} thread(s); stock transformers loop "
        f"(DynamicCache, chunkkv not attached); {args.pairs} fresh processes per setting, alternated; decode = "
        f"median of {args.decode_steps} steps after {args.decode_warmup} untimed. Load average before / after: "
        f"{load_before} / {load_after}.",
        "",
        "| allocator | prefill s (each process) | decode ms/token (each process) |",
        "|---|---|---|",
    ]
    for setting, label in (("default", "glibc default"), ("fixed", "mmap threshold fixed at 128 KiB")):
        rs = [r for r in runs if r["setting"] == setting]
        pre = ", ".join(f"{r['prefill_s']:.2f}" for r in rs)
        dec = ", ".join(f"{r['median_decode_ms']:.1f}" for r in rs)
        lines.append(f"| {label} | {pre} | {dec} |")
    d = statistics.median(r["median_decode_ms"] for r in runs if r["setting"] == "default")
    f = statistics.median(r["median_decode_ms"] for r in runs if r["setting"] == "fixed")
    pd = statistics.median(r["prefill_s"] for r in runs if r["setting"] == "default")
    pf = statistics.median(r["prefill_s"] for r in runs if r["setting"] == "fixed")
    lines += ["", f"Fixed / default (medians over processes): prefill {pf / pd:.3f}, decode {f / d:.3f}."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "allocator_effect.json").write_text(json.dumps(
            {"config": vars(args), "runs": runs, "load_before": load_before, "load_after": load_after,
             "started": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1))
        (out / "allocator_effect.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
