#!/usr/bin/env python
"""Build the chunkkv testbed model (``models/chunkkv-testbed``) from scratch.

Two modes:

``construct`` (default; this is how the shipped model is made)
    Writes the retrieval circuit (shift heads, bigram-induction head, list-resume head,
    assignment-follow head) directly into the weights of a 2-layer Llama; a few seconds on CPU.
    Deterministic for a given ``--seed`` (the seed only picks the token codes).

``train``
    Gradient training on the suite's distribution (dense multi-needle episodes, length
    curriculum, loss on predictable tokens, multi-target loss for free-order answers). On the
    2-core CPU budget this did not get past the induction plateau (see docs/testbed.md), so it
    is kept for reproducing that finding and for anyone with a bigger budget.

Both modes save a standard Hugging Face folder (config.json, model.safetensors, tokenizer files,
generation_config.json) and, with ``--eval``, print the full-cache accuracy table.

Examples::

    python scripts/train_testbed.py --out models/chunkkv-testbed --seed 0 --eval
    python scripts/train_testbed.py --mode train --out /tmp/trained --seed 0 --max-minutes 45
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))  # run from a checkout without installing


def _evaluate(out: Path, lengths: list[int], n: dict[int, int], haystack: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chunkkv.testbed.evaluate import evaluate, format_table

    model = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa")
    tok = AutoTokenizer.from_pretrained(out)
    table = evaluate(model, tok, lengths=lengths, n=n, haystack=haystack, log=print)
    print(format_table(table))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("construct", "train"), default="construct")
    p.add_argument("--out", type=Path, default=ROOT / "models" / "chunkkv-testbed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 leaves a core free)")
    p.add_argument("--max-minutes", type=float, default=45.0, help="train mode: wall-clock cap")
    p.add_argument("--device", default="cpu", help="train mode: torch device")
    p.add_argument("--eval", action="store_true", help="print the full-cache accuracy table")
    p.add_argument("--eval-lengths", default="1024,2048,4096,8192")
    p.add_argument("--eval-n", default="1024:20,2048:20,4096:10,8192:5",
                   help="samples per task at each length, as length:n pairs")
    p.add_argument("--haystack", default="varied", choices=("varied", "repetitive"))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.mode == "construct":
        from chunkkv.testbed.construct import save_constructed

        save_constructed(args.out, seed=args.seed)
    else:
        from chunkkv.testbed.train import TrainConfig, train

        cfg = TrainConfig(seed=args.seed, threads=args.threads, device=args.device,
                          max_minutes=args.max_minutes)
        train(cfg, args.out)
    print(json.dumps({"mode": args.mode, "seed": args.seed, "out": str(args.out),
                      "seconds": round(time.time() - t0, 1)}))
    if args.eval:
        lengths = [int(x) for x in args.eval_lengths.split(",")]
        n = {int(k): int(v) for k, v in (x.split(":") for x in args.eval_n.split(","))}
        _evaluate(args.out, lengths, n, args.haystack)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
