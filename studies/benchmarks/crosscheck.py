"""Cross-check of ``chunkkv bench``'s full-cache figures against plain transformers, same process.

The bench times a full-cache prefill (``compress(..., FullKV())`` through chunkkv's attention wrapper
and cache) and greedy decode steps over it (``extend``: one forward per token). This script times,
on the same model, the same prompt and in the same process, interleaved run by run:

* **bench**: exactly what the bench times (:class:`chunkkv.bench.runner.Bench`: ``_compress`` for the
  prefill, ``_decode`` for the median ms per decode step after its untimed warm-up steps);
* **plain**: a stock transformers loop on the model with chunkkv detached: one forward of the
  prompt into a ``DynamicCache`` (``logits_to_keep=1``), then one forward per greedy token;
* **generate**: stock ``model.generate`` (greedy, ``min_new_tokens`` = ``max_new_tokens``, chunkkv
  detached); its prefill is a 1-token generation, its decode ms/token
  ``(time(1 + N tokens) - time(1 token)) / N``;
* **step-paired decode**: one bench step (``Bench._step``, chunkkv attached), then one plain step
  (detached), alternated over two caches of the same prompt. Rounds are seconds apart, so on a shared
  machine the per-round medians drift with the load; pairs of adjacent steps do not. The median of the
  pair ratios is what the tolerance judges for decode.

Everything runs with the default allocator (the script refuses a process whose allocator an earlier
memory measurement fixed) and ``--threads`` torch threads. The bench's figures should agree with
the plain loop's within 5 % (``--tolerance``); ``generate`` adds its own per-token work (logits
processors, stopping criteria, one host sync per token), so it is reported, not judged.

    python studies/benchmarks/crosscheck.py --contexts 2048,4096 --threads 1 \\
        --out studies/benchmarks/results/crosscheck-cpu

``--fixed-threshold`` makes a :class:`~chunkkv.bench.measure.MemoryMeter` first, on purpose: the same
runs then take place under glibc's fixed mmap threshold, the setting the bench's timings ran under
before issue 27 (the allocator's effect, in fresh processes, is the difference between the two).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import torch  # noqa: E402

import chunkkv  # noqa: E402
from chunkkv.bench import BenchConfig  # noqa: E402
from chunkkv.bench.measure import allocator_state, now  # noqa: E402
from chunkkv.bench.models import is_random_model, random_llama  # noqa: E402
from chunkkv.bench.runner import Bench, device_name  # noqa: E402


def plain_prefill(model, ids):
    """A stock forward of the prompt into a fresh ``DynamicCache``: ``(seconds, cache, next token)``."""
    from transformers import DynamicCache

    device = ids.device
    t0 = now(device)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, cache=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    return now(device) - t0, cache, token


def plain_decode(model, cache, token, steps: int, warmup: int) -> list[float]:
    """Greedy steps of a stock forward per token over ``cache``: seconds of each timed step."""
    device = token.device
    times = []
    for i in range(warmup + steps):
        t0 = now(device)
        out = model(input_ids=token, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        elapsed = now(device) - t0
        if i >= warmup:
            times.append(elapsed)
    return times


def generate_seconds(model, ids, new_tokens: int) -> float:
    device = ids.device
    t0 = now(device)
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                   do_sample=False, eos_token_id=None, pad_token_id=0)
    return now(device) - t0


def load(name: str):
    if is_random_model(name):
        return random_llama(name), name
    model, _tokenizer = chunkkv.load_pretrained(name)
    return model.eval(), name


@torch.inference_mode()
def crosscheck(model, context: int, cfg: BenchConfig, repeats: int, log=print) -> dict:
    bench = Bench(model, cfg, progress=False)
    ids = bench.prompts.get(context, 1)
    steps, warmup = cfg.decode_steps, cfg.decode_warmup
    pre = {"bench": [], "plain": [], "generate": []}
    dec = {"bench": [], "plain": [], "generate": []}
    gen_total = []
    # one untimed round of everything first (kernels, allocator, lazy init)
    bench._advance(bench._compress(ids, chunkkv.FullKV()))
    chunkkv.detach(model)
    _, cache, token = plain_prefill(model, ids)
    plain_decode(model, cache, token, 1, 1)
    generate_seconds(model, ids, 2)
    del cache
    for r in range(repeats):
        # bench: exactly its own calls (compress attaches chunkkv's wrapper again)
        ctx = bench._compress(ids, chunkkv.FullKV(), measure=True)
        pre["bench"].append(ctx.stats.prefill_seconds)
        dec["bench"].extend(x / 1e3 for x in bench._decode(ctx, 1, with_bound=False)["ms_per_token"]["samples"])
        del ctx
        chunkkv.detach(model)
        seconds, cache, token = plain_prefill(model, ids)
        pre["plain"].append(seconds)
        dec["plain"].extend(plain_decode(model, cache, token, steps, warmup))
        del cache
        one = generate_seconds(model, ids, 1)
        many = generate_seconds(model, ids, 1 + steps)
        pre["generate"].append(one)
        gen_total.append(many)
        dec["generate"].append((many - one) / steps)
        log(f"  {context} round {r + 1}/{repeats}: prefill bench {pre['bench'][-1] * 1e3:.0f} / plain "
            f"{pre['plain'][-1] * 1e3:.0f} / generate {one * 1e3:.0f} ms")
    # step-paired decode: one bench step (its own ``_step``), then one plain step, alternated, so that
    # load drifting between rounds (seconds apart) hits both alike; the median of the paired ratios
    paired = []
    ctx = bench._compress(ids, chunkkv.FullKV())
    chunkkv.detach(model)
    _, cache, token = plain_prefill(model, ids)
    for i in range(warmup + repeats * steps):
        chunkkv.attach(model)
        ours = bench._step(ctx)
        chunkkv.detach(model)
        t0 = now(ids.device)
        out = model(input_ids=token, cache=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        theirs = now(ids.device) - t0
        if i >= warmup:
            paired.append((ours, theirs))
    del ctx, cache
    med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    ratios = sorted(a / b for a, b in paired)
    row = {
        "context": context,
        "prefill_ms": {k: round(med(v), 2) for k, v in pre.items()},
        "prefill_ms_samples": {k: [round(x * 1e3, 2) for x in v] for k, v in pre.items()},
        "decode_ms_per_token": {k: round(med(v), 3) for k, v in dec.items()},
        "decode_ms_samples": {k: [round(x * 1e3, 3) for x in v] for k, v in dec.items()},
        "generate_total_ms": [round(x * 1e3, 1) for x in gen_total],
        "decode_paired": {"bench_ms": round(med([a for a, _ in paired]), 3),
                          "plain_ms": round(med([b for _, b in paired]), 3),
                          "ratio_median": round(ratios[len(ratios) // 2], 4), "steps": len(paired)},
    }
    for what in ("prefill_ms", "decode_ms_per_token"):
        row[what + "_ratio"] = {k: round(row[what]["bench"] / row[what][k], 4) for k in ("plain", "generate")}
    return row


def to_markdown(result: dict) -> str:
    tol = result["tolerance"]
    lines = [
        "# Cross-check: the bench's full-cache figures against plain transformers",
        "",
        f"{result['model']} on {result['device_name']} ({result['threads']} thread"
        f"{'s' if result['threads'] != 1 else ''}), torch {result['torch']}, transformers {result['transformers']}; "
        f"allocator: {result['allocator']}. Medians of {result['repeats']} interleaved rounds (prefill) and of "
        f"{result['repeats']} x {result['decode_steps']} decode steps after {result['decode_warmup']} untimed per round "
        f"(generate: one difference of two calls per round). Ratio = bench / other. The step-paired decode column "
        f"alternates one bench step and one plain step over two caches of the same prompt ({result['repeats']} x "
        f"{result['decode_steps']} pairs, median of the pair ratios), which cancels load that drifts between rounds; "
        f"the bench agrees with the plain loop when its prefill ratio and its step-paired decode ratio are within "
        f"{tol:.0%}.",
        "",
        "| context | prefill ms: bench | plain | generate | bench / plain | bench / generate | "
        "decode ms/token: bench | plain | generate | bench / plain | bench / generate | "
        "decode, step-paired: bench / plain | within tolerance |",
        "|---" * 13 + "|",
    ]
    for r in result["rows"]:
        p, d = r["prefill_ms"], r["decode_ms_per_token"]
        ok = abs(r["prefill_ms_ratio"]["plain"] - 1) <= tol and abs(r["decode_paired"]["ratio_median"] - 1) <= tol
        lines.append(
            f"| {r['context']} | {p['bench']:.1f} | {p['plain']:.1f} | {p['generate']:.1f} | "
            f"{r['prefill_ms_ratio']['plain']:.3f} | {r['prefill_ms_ratio']['generate']:.3f} | "
            f"{d['bench']:.2f} | {d['plain']:.2f} | {d['generate']:.2f} | {r['decode_ms_per_token_ratio']['plain']:.3f} | "
            f"{r['decode_ms_per_token_ratio']['generate']:.3f} | {r['decode_paired']['ratio_median']:.3f} "
            f"({r['decode_paired']['bench_ms']:.2f} / {r['decode_paired']['plain_ms']:.2f}) | {'yes' if ok else '**no**'} |")
    lines += ["", f"Load average before / after: {result['load_before']} / {result['load_after']}."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="random-100m", help="random-100m (default), smollm2, a folder ...")
    p.add_argument("--contexts", default="2048", help="comma-separated prompt lengths (2048)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (5)")
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--decode-warmup", type=int, default=2)
    p.add_argument("--tolerance", type=float, default=0.05)
    p.add_argument("--out", help="folder for crosscheck.json and crosscheck.md")
    p.add_argument("--fixed-threshold", action="store_true",
                   help="fix glibc's mmap threshold first (a MemoryMeter), to time under the memory run's setting")
    args = p.parse_args(argv)
    if args.fixed_threshold:
        from chunkkv.bench.measure import MemoryMeter

        MemoryMeter(torch.device("cpu"))
    allocator = allocator_state()
    if "earlier memory measurement" in allocator and not args.fixed_threshold:
        raise SystemExit(f"refusing to time: {allocator}")
    torch.set_num_threads(args.threads)
    model, label = load(args.model)
    cfg = BenchConfig(contexts=[int(c) for c in args.contexts.split(",")], decode_steps=args.decode_steps,
                      decode_warmup=args.decode_warmup, peers=False, threads=args.threads)
    import transformers

    result = {
        "model": label, "device_name": device_name(next(model.parameters()).device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
        "python": platform.python_version(), "allocator": allocator, "repeats": args.repeats,
        "decode_steps": args.decode_steps, "decode_warmup": args.decode_warmup, "tolerance": args.tolerance,
        "load_before": [round(x, 2) for x in os.getloadavg()], "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "rows": [],
    }
    for context in cfg.contexts:
        result["rows"].append(crosscheck(model, context, cfg, args.repeats,
                                         log=lambda m: print(m, file=sys.stderr, flush=True)))
    result["load_after"] = [round(x, 2) for x in os.getloadavg()]
    text = to_markdown(result)
    print(text)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "crosscheck.json").write_text(json.dumps(result, indent=1))
        (out / "crosscheck.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
