"""Compress once, save, load in a NEW process, ask several questions (issue 14 item 4).

    python -m studies.question_agnostic saved_demo [--length 2048] [--scoring default]

Process 1 (this one): builds a NIAH document with 4 needles (:mod:`.niah`), compresses it
question-agnostically with ChunkKV, saves it, and answers the 4 questions in memory. Process 2 (a
subprocess started with ``--load``): loads the model and the saved context, answers the same 4
questions. The answers must be identical token for token.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch

import chunkkv
from chunkkv.agnostic import agnostic_method
from chunkkv.persist import header_bytes
from chunkkv.pretrained import load_pretrained

from .. import ROOT
from .niah import NEEDLES, build_document, encode


def answers(model, tok, ctx, questions) -> list[str]:
    sampling = chunkkv.Sampling(max_new_tokens=24, eos_token_id=tok.eos_token_id)
    out = []
    for q in questions:
        tokens = chunkkv.continue_from(model, ctx.fork(), q, sampling)[0].tolist()
        if tok.eos_token_id in tokens:
            tokens = tokens[: tokens.index(tok.eos_token_id)]
        out.append(tok.decode(tokens, skip_special_tokens=True))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m studies.question_agnostic saved_demo")
    ap.add_argument("--length", type=int, default=2048)
    ap.add_argument("--doc", type=int, default=0)
    ap.add_argument("--scoring", default="default",
                    help="'default' = what question-agnostic chunkkv.generate runs (agnostic.agnostic_method), "
                         "or a scoring name (fixed chunks)")
    ap.add_argument("--keep-fraction", type=float, default=0.2)
    ap.add_argument("--path", default="/tmp/chunkkv_demo.ckv")
    ap.add_argument("--load", action="store_true", help="(the second process) load and answer")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    model, tok = load_pretrained("smollm2", dtype=torch.float32, device="cpu")
    document, _ = build_document(tok, args.length, args.doc)
    encoded = [encode(tok, document, n[1]) for n in NEEDLES]
    questions = [e[1] for e in encoded]
    if args.load:
        start = time.perf_counter()
        ctx = chunkkv.load_context(args.path, model)
        print(json.dumps({"load_s": time.perf_counter() - start, "answers": answers(model, tok, ctx, questions)}))
        return
    method = chunkkv.ChunkKV(keep_fraction=args.keep_fraction)
    method = agnostic_method(method, None if args.scoring == "default" else args.scoring, tokenizer=tok)
    ctx = chunkkv.compress(model, encoded[0][0], method=method, tokenizer=tok)  # tokenizes a pass's instruction
    size = ctx.save(args.path)
    kv = ctx.cache.nbytes()
    in_memory = answers(model, tok, ctx, questions)
    child = subprocess.run([sys.executable, "-m", "studies.question_agnostic.saved_demo", "--load", "--path", args.path,
                            "--length", str(args.length), "--doc", str(args.doc)],
                           capture_output=True, text=True, check=True, cwd=ROOT)
    loaded = json.loads(child.stdout.strip().splitlines()[-1])
    print(f"method {method.describe()}: {encoded[0][0].shape[1]} context tokens, prefill "
          f"{ctx.stats.prefill_seconds:.1f} s + scoring {ctx.stats.scoring_seconds:.1f} s")
    print(f"file {size:,} bytes = kept K/V {kv:,} + ids/mask {encoded[0][0].numel() * 16:,} + next logits "
          f"{ctx.next_logits.numel() * 4:,} + kept positions + header {header_bytes(args.path):,}")
    print(f"new process: loaded in {loaded['load_s']:.2f} s")
    for needle, a, b in zip(NEEDLES, in_memory, loaded["answers"]):
        print(f"Q: {needle[1]}\n  in memory: {a}\n  reloaded:  {b}\n  same: {a == b}, answer present: "
              f"{needle[2] in b.lower()}")
    assert in_memory == loaded["answers"], "a reloaded context answered differently"


if __name__ == "__main__":
    main()
