"""The same plain transformers loop in two Python environments: chunkkv's and kvpress's (its pinned
transformers), in fresh processes, alternated. Separates what the transformers version costs from what
``chunkkv bench`` adds when its full-cache decode is compared with kvpress's (issue 27).

Each child loads a saved model folder with stock transformers (no chunkkv), prefills the bench's
prompt into a ``DynamicCache`` once untimed and once timed, then times ``--decode-steps`` greedy
steps (one forward per token) after ``--decode-warmup`` untimed ones; the default allocator.

    python studies/benchmarks/env_decode.py --model-dir /tmp/m100 --pythons .venv/bin/python,.venv-kvpress/bin/python \\
        --context 2048 --threads 1 --pairs 2 --out studies/benchmarks/results/env-decode
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
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(args.threads)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    vocab = model.config.vocab_size
    low = min(100, max(0, vocab // 4))  # chunkkv.bench.runner.Prompts, seed 0
    g = torch.Generator().manual_seed(args.context)
    ids = torch.randint(low, vocab, (1, args.context), generator=g)

    def prefill():
        cache = DynamicCache(config=model.config)
        t0 = time.perf_counter()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        return time.perf_counter() - t0, cache, out.logits[:, -1].argmax(-1, keepdim=True)

    with torch.inference_mode():
        prefill()
        seconds, cache, token = prefill()
        steps = []
        for i in range(args.decode_warmup + args.decode_steps):
            t0 = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            if i >= args.decode_warmup:
                steps.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"python": sys.executable, "transformers": transformers.__version__, "torch": torch.__version__,
                      "prefill_s": seconds, "decode_ms": steps}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", required=True)
    p.add_argument("--pythons", default="", help="comma-separated interpreters, run alternately")
    p.add_argument("--context", type=int, default=2048)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--decode-warmup", type=int, default=2)
    p.add_argument("--out")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args)
        return 0
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    runs = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    for i in range(args.pairs):
        for python in args.pythons.split(","):
            cmd = [python, __file__, "--child", "--model-dir", args.model_dir, "--context", str(args.context),
                   "--threads", str(args.threads), "--decode-steps", str(args.decode_steps),
                   "--decode-warmup", str(args.decode_warmup)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout.strip().splitlines()[-1]
            run = json.loads(out)
            run["median_decode_ms"] = statistics.median(run["decode_ms"])
            run["python_arg"] = python
            runs.append(run)
            print(f"{i + 1} {python}: transformers {run['transformers']}, prefill {run['prefill_s']:.2f} s, decode "
                  f"{run['median_decode_ms']:.1f} ms/token", file=sys.stderr, flush=True)
    load_after = [round(x, 2) for x in os.getloadavg()]
    lines = ["| python | transformers | prefill s (each process) | decode ms/token (each process) |", "|---|---|---|---|"]
    for python in args.pythons.split(","):
        rs = [r for r in runs if r["python_arg"] == python]
        lines.append(f"| `{python}` | {rs[0]['transformers']} | {', '.join('%.2f' % r['prefill_s'] for r in rs)} | "
                     f"{', '.join('%.1f' % r['median_decode_ms'] for r in rs)} |")
    lines.append(f"\nLoad average before / after: {load_before} / {load_after}.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        Path(args.out, "env_decode.json").write_text(json.dumps({"config": vars(args), "runs": runs,
                                                                  "load": [load_before, load_after]}, indent=1))
        Path(args.out, "env_decode.md").write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
