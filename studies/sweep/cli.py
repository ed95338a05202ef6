"""The sweep's command line: ``chunkkv sweep`` (from a source checkout) and ``python -m studies.sweep``.

:func:`add_arguments` declares the flags, :func:`config_from_args` checks them (before any model
loads) into a :class:`~studies.sweep.engine.SweepConfig`, :func:`run` loads the model and runs
:func:`~studies.sweep.engine.run_sweep`. ``--out`` and ``--report`` default to this study's
``results/`` folder and ``README.md``, wherever the command is started from.
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

from chunkkv.errors import ChunkKVError

from .. import shown
from .engine import ALL_METHODS, SweepConfig, report_lock, run_sweep
from .report import render_markdown

__all__ = ["DEFAULT_OUT", "DEFAULT_REPORT", "EPILOG", "add_arguments", "config_from_args", "main", "run"]

STUDY = Path(__file__).resolve().parent
#: Where the tables of the study live: its results folder and the generated block of its README.
DEFAULT_OUT = STUDY / "results"
DEFAULT_REPORT = STUDY / "README.md"

EPILOG = """\
examples:
  chunkkv sweep                                   # the full sweep at 1k tokens on the testbed model
  chunkkv sweep --lengths 1024,2048 --samples 10  # two lengths, 10 samples per task and length
  chunkkv sweep --tasks niah_single,vt --methods full,snapkv,chunkkv --fractions 0.1 --tokens ''
  chunkkv sweep --window 16                       # a fixed observation window instead of the question
  chunkkv sweep --question-agnostic               # compress the context before the question is known
  chunkkv sweep --heatmap-lengths '' --out runs/q # no NIAH heatmap, results elsewhere

Outputs: <out>/results.json, <out>/records.jsonl, <out>/*.png and the tables in --report (by default the
study's own: studies/sweep/results/ and the generated block of studies/sweep/README.md).
"""


def _list(text: str, cast=str) -> list:
    return [cast(x.strip()) for x in str(text).split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from chunkkv.cli_common import TESTBED, add_model_arguments, describe, set_help
    from chunkkv.synthetic import TASKS

    describe(
        parser,
        "Quality sweep on the synthetic suite: methods x budgets x tasks, ChunkKV chunk sizes and reuse\n"
        "depths, Jaccard similarity of kept indices between adjacent layers, and a NIAH length x depth\n"
        "heatmap. Writes results.json, records.jsonl, PNG plots and markdown tables.",
        EPILOG,
    )
    add_model_arguments(parser, default=TESTBED)
    set_help(parser, "--model", "model folder or hub id (default: the shipped testbed, models/chunkkv-testbed)")
    g = parser.add_argument_group("sweep")
    g.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated tasks (default: all: {','.join(TASKS)})")
    g.add_argument("--methods", default=",".join(ALL_METHODS), help=f"methods of the budget grid (default {','.join(ALL_METHODS)})")
    g.add_argument("--lengths", default="1024", help="prompt lengths in tokens (default 1024)")
    g.add_argument("--samples", default="10",
                   help="samples per task and length: N, or per length LEN:N,LEN:N (default 10)")
    g.add_argument("--fractions", default="0.5,0.25,0.1,0.05", help="kept fractions (default 0.5,0.25,0.1,0.05)")
    g.add_argument("--tokens", default="64,128,256", help="absolute budgets, tokens kept per layer (default 64,128,256; '' for none)")
    g.add_argument("--chunk-sizes", default="3,5,10,20,30", help="ChunkKV chunk-size sweep ('' to skip; default 3,5,10,20,30)")
    g.add_argument("--reuse-depths", default="1,2,3,4,all", help="ChunkKV reuse-depth sweep ('' to skip; default 1,2,3,4,all)")
    g.add_argument("--sweep-fraction", type=float, default=0.1, help="kept fraction of the chunk-size and reuse sweeps (default 0.1)")
    g.add_argument("--chunk-size", type=int, default=10, help="ChunkKV chunk size elsewhere (default 10)")
    g.add_argument("--reuse-depth", default="1",
                   help="ChunkKV reuse depth elsewhere (default 1: on the 2-layer testbed any depth >= 2 makes the "
                        "positional layer 0 choose for layer 1)")
    g.add_argument("--window", default="question",
                   help="observation window: 'question' (default: the question's token count, per sample) or an int")
    g.add_argument("--question-agnostic", action="store_true",
                   help="compress the context alone, then feed the question (default: query-aware)")
    g.add_argument("--extra-new-tokens", type=int, default=2, help="max_new_tokens = gold completion length + this (default 2)")
    g.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    g.add_argument("--haystack", default="varied", choices=["varied", "repetitive"], help="haystack kind (default varied)")
    h = parser.add_argument_group("NIAH heatmap (niah_single)")
    h.add_argument("--heatmap-lengths", default="1024,2048,4096", help="lengths ('' to skip; default 1024,2048,4096)")
    h.add_argument("--heatmap-depths", default="0,25,50,75,100", help="depths in percent (default 0,25,50,75,100)")
    h.add_argument("--heatmap-samples", type=int, default=3, help="samples per cell (default 3)")
    h.add_argument("--heatmap-methods", default="full,snapkv,chunkkv", help="methods (default full,snapkv,chunkkv)")
    h.add_argument("--heatmap-fraction", type=float, default=0.1, help="kept fraction (default 0.1)")
    o = parser.add_argument_group("output")
    o.add_argument("--out", default=str(DEFAULT_OUT), help=f"output folder (default {shown(DEFAULT_OUT)})")
    o.add_argument("--report", default=str(DEFAULT_REPORT),
                   help=f"markdown file whose sweep block is (re)written (default {shown(DEFAULT_REPORT)}; '' for none)")
    o.add_argument("--no-records", action="store_true", help="do not write records.jsonl")
    o.add_argument("--merge", action="store_true",
                   help="keep an earlier run's results in --out (other lengths, its heatmap unless this run makes one); "
                        "e.g. --merge --lengths 4096 adds a length, --merge --lengths '' --heatmap-... redoes the heatmap")
    o.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace) -> SweepConfig:
    from chunkkv.methods import METHODS
    from chunkkv.synthetic import TASKS

    tasks = _list(args.tasks)
    bad = [t for t in tasks if t not in TASKS]
    if bad or not tasks:
        raise ChunkKVError(f"--tasks: unknown {', '.join(bad) or '(none given)'}; choose from {', '.join(TASKS)}")
    methods = _list(args.methods)
    heat = _list(args.heatmap_methods)
    for m in methods + heat:
        if m not in METHODS:
            raise ChunkKVError(f"unknown method {m!r}; choose from {', '.join(ALL_METHODS)}")
    try:
        fractions = _list(args.fractions, float)
        tokens = _list(args.tokens, int)
        lengths = _list(args.lengths, int)
        chunk_sizes = _list(args.chunk_sizes, int)
        heat_lengths = _list(args.heatmap_lengths, int)
        heat_depths = _list(args.heatmap_depths, float)
        reuse_depth = 10_000 if str(args.reuse_depth) == "all" else int(args.reuse_depth)
        if ":" in str(args.samples):
            samples: int | dict[int, int] = {int(a): int(b) for a, b in (x.split(":") for x in _list(args.samples))}
        else:
            samples = int(args.samples)
    except ValueError as exc:
        raise ChunkKVError(f"bad number in a list flag: {exc}") from None
    reuse = _list(args.reuse_depths)
    for d in reuse:
        if d != "all" and (not d.isdigit() or int(d) < 1):
            raise ChunkKVError(f"--reuse-depths: {d!r} must be an int >= 1 or 'all'")
    if any(not 0 < f <= 1 for f in fractions + [args.sweep_fraction, args.heatmap_fraction]):
        raise ChunkKVError("kept fractions must be in (0, 1]")
    counts = list(samples.values()) if isinstance(samples, dict) else [samples]
    if any(L <= 0 for L in lengths) or min(counts) < 1:
        raise ChunkKVError("--lengths needs positive lengths and --samples must be >= 1")
    if not lengths and not (heat_lengths and heat_depths):
        raise ChunkKVError("nothing to run: give --lengths or a heatmap (--heatmap-lengths, --heatmap-depths)")
    for flag, values, low in (("--heatmap-lengths", heat_lengths, 1), ("--tokens", tokens, 1), ("--chunk-sizes", chunk_sizes, 1),
                              ("--chunk-size", [args.chunk_size], 1), ("--heatmap-samples", [args.heatmap_samples], 0),
                              ("--extra-new-tokens", [args.extra_new_tokens], 0)):
        bad = [v for v in values if v < low]
        if bad:
            raise ChunkKVError(f"{flag} {bad[0]} must be >= {low}")
    if any(not 0 <= d <= 100 for d in heat_depths):
        raise ChunkKVError("--heatmap-depths are percents in 0..100")
    if reuse_depth < 1:
        raise ChunkKVError(f"--reuse-depth {reuse_depth} must be >= 1 or 'all'")
    if args.window != "question":
        try:
            if int(args.window) < 1:
                raise ValueError
        except ValueError:
            raise ChunkKVError(f"--window {args.window!r} must be 'question' or an int >= 1") from None
    return SweepConfig(
        tasks=tasks, methods=methods, lengths=lengths, samples=samples, fractions=fractions, tokens=tokens,
        chunk_sizes=chunk_sizes, reuse_depths=reuse, sweep_fraction=args.sweep_fraction, chunk_size=args.chunk_size,
        reuse_depth=reuse_depth, window=str(args.window), question_agnostic=args.question_agnostic,
        extra_new_tokens=args.extra_new_tokens, seed=args.seed, haystack=args.haystack,
        heatmap_lengths=heat_lengths, heatmap_depths=heat_depths, heatmap_samples=args.heatmap_samples,
        heatmap_methods=heat, heatmap_fraction=args.heatmap_fraction,
    )


def run(args: argparse.Namespace) -> int:
    import torch

    from chunkkv.cli_common import check_device, load, resolve_model
    from chunkkv.outputs import OutputLock, check_output_dir, check_output_file

    # Everything that can be checked without the model is checked before it loads.
    cfg = config_from_args(args)
    if args.threads is not None and args.threads < 1:
        raise ChunkKVError(f"--threads {args.threads} must be >= 1 (torch CPU threads)")
    check_device(args.device)
    out = check_output_dir(args.out)
    report = check_output_file(args.report, "--report") if args.report else None
    with contextlib.ExitStack() as held:  # a second sweep writing the same folder or report is refused here
        held.enter_context(OutputLock(out, what=f"--out {out}"))
        if report is not None:
            held.enter_context(report_lock(report))
        torch.set_num_threads(args.threads)
        resolve_model(args)
        model, tokenizer = load(args)
        t0 = time.perf_counter()
        name = shown(Path(args.model)) if Path(args.model).exists() else args.model
        results = run_sweep(model, tokenizer, cfg, out, report, model_name=name,
                            progress=not args.no_progress, write_records=not args.no_records, merge=args.merge)
    print(render_markdown(results))
    print(f"results: {out / 'results.json'}" + (f"; tables: {report}" if report else "")
          + f"; {time.perf_counter() - t0:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m studies.sweep``: the same flags as ``chunkkv sweep``; one-line errors, exit 2."""
    import sys

    parser = argparse.ArgumentParser(prog="python -m studies.sweep")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ChunkKVError, FileNotFoundError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
