"""``chunkkv bench``: the efficiency benchmark from the command line.

    chunkkv bench                                    # CPU defaults: random 100M Llama, 2k/4k/8k
    chunkkv bench --contexts 2048,8192,32768 --e2e 8192:1024 --dtype bfloat16   # on a GPU
    chunkkv bench --model /path/to/llama --contexts 4096 --no-peers

Writes ``results.json``, ``report.md`` and PNG plots to ``--out`` and prints the report.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ..cli_common import add_model_arguments, check_device, load_model, parse_method_names, token_count, token_counts
from ..errors import ChunkKVError
from ..outputs import OutputLock, check_output_dir
from .models import ALIASES, DEFAULT_METHODS, RANDOM_MODELS, is_random_model

if TYPE_CHECKING:  # torch and the runner are imported when the bench runs: --help stays fast
    import torch

    from .runner import BenchConfig


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _requests(text: str) -> list[tuple[int, int]]:
    if text.lower() in ("none", "off", ""):
        return []
    out = []
    for part in text.split(","):
        try:
            n_in, n_out = part.split(":")
            out.append((token_count(n_in), int(n_out)))
        except (ValueError, IndexError):
            raise argparse.ArgumentTypeError(f"--e2e takes IN:OUT pairs such as 8192:1024, got {part!r}") from None
    return out


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser, default="random-100m")
    parser.epilog = (f"--model may also be one of the random-weight models {', '.join(RANDOM_MODELS)} "
                     "(speed does not depend on the weights). Defaults marked CPU/GPU depend on --device.")
    g = parser.add_argument_group("what to measure")
    g.add_argument("--contexts", type=token_counts, help="prompt lengths (CPU: 2048,4096,8192; GPU: 2048,4096,8192,16384,32768)")
    g.add_argument("--batch-sizes", type=token_counts, help="decode batch sizes (CPU: 1,2; GPU: 1,4)")
    g.add_argument("--budget", type=float, default=0.1, help="share KEPT by every method in the comparison (0.1)")
    g.add_argument("--decode-fractions", type=_floats, default=[0.5, 0.25, 0.1],
                   help="kept shares for the decode sweep (0.5,0.25,0.1)")
    g.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"compared methods ({','.join(DEFAULT_METHODS)})")
    g.add_argument("--decode-method", default="chunkkv", help="method of the decode sweep (chunkkv)")
    g.add_argument("--reuse-depths", type=token_counts, default=[1, 2, 3, 4], help="ChunkKV reuse depths (1,2,3,4)")
    g.add_argument("--repeats", type=int, default=3, help="timed runs per configuration, after one untimed (3)")
    g.add_argument("--decode-steps", type=int, help="timed decode steps per cache (CPU 16, GPU 32)")
    g.add_argument("--decode-warmup", type=int, default=2, help="untimed decode steps first (2)")
    g.add_argument("--e2e", type=_requests, help="IN:OUT requests, comma-separated, or none (CPU 4096:64; GPU "
                   "8192:1024; IN at most the longest --contexts)")
    g.add_argument("--e2e-batch", type=int, default=1, help="batch size of the e2e requests (1)")
    g.add_argument("--e2e-repeats", type=int, help="timed e2e runs (default: --repeats)")
    g.add_argument("--scaling-contexts", type=token_counts, help="lengths for the scaling check (default: --contexts)")
    g.add_argument("--seed", type=int, default=0)
    m = parser.add_argument_group("prefill memory (chunked prefill, docs/memory.md)")
    m.add_argument("--prefill-memory", action="store_true",
                   help="only measure peak prefill memory: full, one-shot and chunked ChunkKV per context")
    m.add_argument("--prefill-chunks", type=token_counts, default=[512, 1024, 2048], help="C of chunked prefill (512,1024,2048)")
    m.add_argument("--kv", type=token_count, default=1024, help="tokens kept per layer (1024)")
    m.add_argument("--quadratic-limit", type=token_count, default=16384,
                   help="longest prompt for the full cache and one-shot ChunkKV (16k)")
    m.add_argument("--chunked-limit", type=token_count, default=None,
                   help="beyond this prompt length run only the middle C (default: every C everywhere)")
    p = parser.add_argument_group("peers (kvpress 0.5.5 in its own environment)")
    p.add_argument("--no-peers", action="store_true", help="do not run kvpress")
    p.add_argument("--peer-contexts", type=token_counts, help="contexts for kvpress (default: --contexts)")
    p.add_argument("--peer-rounds", type=int, default=1,
                   help="run kvpress this many times, alternated with our compared configurations timed again; "
                        "each ratio is the median of the rounds' (default 1)")
    p.add_argument("--kvpress-python", help="python of the kvpress env (default: $KVPRESS_PYTHON or .venv-kvpress)")
    o = parser.add_argument_group("run and output")
    o.add_argument("--threads", type=int, help="torch threads (CPU default 2)")
    o.add_argument("--no-memory", action="store_true",
                   help="skip the memory phase (timings only; it runs after every timed run and costs one more "
                        "prefill per configuration)")
    o.add_argument("--out", default="bench-results", help="output folder (bench-results)")
    o.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    o.add_argument("--no-progress", action="store_true", help="no progress bar")


def _log(msg: str) -> None:
    print(f"[chunkkv bench] {msg}", file=sys.stderr, flush=True)


def default_e2e(contexts: list[int], gpu: bool) -> tuple[int, int]:
    """The end-to-end request when ``--e2e`` is not given: 8192:1024 on a GPU, 4096:64 on a CPU, its
    input capped at the longest ``--contexts`` (a run asked for 1k contexts does not prefill 4k)."""
    n_in, n_out = (8192, 1024) if gpu else (4096, 64)
    return min(n_in, max(contexts)), n_out


def config_from_args(args: argparse.Namespace, device: torch.device) -> BenchConfig:
    from .runner import BenchConfig

    gpu = device.type == "cuda"
    contexts = args.contexts or ([2048, 4096, 8192, 16384, 32768] if gpu else [2048, 4096, 8192])
    return BenchConfig(
        contexts=contexts,
        batch_sizes=args.batch_sizes or ([1, 4] if gpu else [1, 2]),
        budget=args.budget,
        decode_fractions=args.decode_fractions,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        reuse_depths=args.reuse_depths,
        decode_method=args.decode_method,
        repeats=args.repeats,
        decode_steps=args.decode_steps if args.decode_steps is not None else (32 if gpu else 16),
        decode_warmup=args.decode_warmup,
        e2e=args.e2e if args.e2e is not None else [default_e2e(contexts, gpu)],
        e2e_batch=args.e2e_batch,
        e2e_repeats=args.e2e_repeats,  # checked in run()
        scaling_contexts=args.scaling_contexts,
        peers=not args.no_peers,
        peer_contexts=args.peer_contexts,
        kvpress_python=args.kvpress_python,
        peer_rounds=args.peer_rounds,
        threads=args.threads or (2 if not gpu else None),
        memory=not args.no_memory,
    )


def load(args: argparse.Namespace, max_positions: int):
    """``(model, label, folder or None)`` for ``--model``."""
    import torch

    from .models import random_llama

    if is_random_model(args.model):
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = args.dtype
        if dtype == "auto":
            dtype = "bfloat16" if torch.device(device).type == "cuda" else "float32"
        name = ALIASES.get(args.model, args.model)
        model = random_llama(name, dtype=getattr(torch, dtype), device=device, max_positions=max_positions,
                             attn_implementation=args.attn_implementation)
        return model, name, None
    model, _tokenizer = load_model(args)
    return model, args.model, args.model


def _check_counts(args: argparse.Namespace) -> None:
    for flag, value, low in (("--threads", args.threads, 1), ("--repeats", args.repeats, 1),
                             ("--decode-steps", args.decode_steps, 1), ("--decode-warmup", args.decode_warmup, 0),
                             ("--e2e-batch", args.e2e_batch, 1), ("--e2e-repeats", args.e2e_repeats, 1)):
        if value is not None and value < low:
            raise ChunkKVError(f"{flag} {value} must be >= {low}")
    for flag, values in (("--contexts", args.contexts), ("--scaling-contexts", args.scaling_contexts),
                         ("--peer-contexts", args.peer_contexts), ("--batch-sizes", args.batch_sizes)):
        if values is not None and (not values or min(values) < 1):
            raise ChunkKVError(f"{flag} needs positive numbers, got {values}")
    if args.e2e and any(n_in < 2 or n_out < 1 for n_in, n_out in args.e2e):
        raise ChunkKVError(f"--e2e requests need IN >= 2 and OUT >= 1, got {args.e2e}")


def run(args: argparse.Namespace) -> int:
    # Everything that can be checked without the model is checked before it loads: first without torch.
    _check_counts(args)
    if not args.prefill_memory:
        parse_method_names(args.methods)
        parse_method_names(args.decode_method, "--decode-method")
        if not 0 < args.budget <= 1:
            raise ChunkKVError(f"--budget {args.budget} is the share of the prompt KEPT, in (0, 1] (0.1 keeps 10 %)")
        check_output_dir(args.out)
    import torch

    from ..methods import make_method
    from .runner import run_bench

    check_device(args.device)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.prefill_memory:
        if args.threads:
            torch.set_num_threads(args.threads)
        elif device.type == "cpu":
            torch.set_num_threads(2)
        return _run_prefill_memory(args, device)
    cfg = config_from_args(args, device)
    try:
        cfg.validate()
    except ValueError as exc:
        raise ChunkKVError(str(exc)) from None
    for name in [*cfg.methods, cfg.decode_method]:  # unknown method names, before the model loads
        if name not in ("full", "none"):
            make_method(name, keep_fraction=cfg.budget)
    _say_short_contexts(cfg)
    out = check_output_dir(args.out)
    with OutputLock(out, what=f"--out {out}"):  # a second bench on this folder is refused here
        if args.threads:
            torch.set_num_threads(args.threads)
        elif device.type == "cpu":
            torch.set_num_threads(2)
        longest = max(cfg.contexts + [a + b for a, b in cfg.e2e] + (cfg.scaling_contexts or []))
        model, label, folder = load(args, max(65536, longest + 1024))
        threads = torch.get_num_threads()
        _log(f"{label} on {next(model.parameters()).device}, contexts {cfg.contexts}, batch sizes {cfg.batch_sizes}, "
             f"{threads} thread{'s' if threads != 1 else ''}")
        from .report import to_markdown, write_outputs

        partial = out / "results.partial.json"

        def save_partial(result: dict) -> None:
            partial.write_text(json.dumps(result, indent=1))

        try:
            result = run_bench(model, cfg, progress=not args.no_progress, model_label=label, model_dir=folder,
                               log=_log, on_section=save_partial)
        except BaseException:
            kept = f"; the sections it finished are in {partial}" if partial.exists() else ""
            print(f"INCOMPLETE: the bench stopped before its end{kept}; run the same command again to measure "
                  "everything (a bench starts over: its timings belong to one run)", flush=True)
            raise
        partial.unlink(missing_ok=True)

        paths = write_outputs(result, args.out, plots=not args.no_plots)
    print(to_markdown(result))
    _log("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def _say_short_contexts(cfg: BenchConfig) -> None:
    """Say on stdout, before the run, which methods a context too short for their window leaves out."""
    from .runner import prefill_entries

    entries = [e for e in prefill_entries(cfg, with_presets=cfg.peers) if e.compressed]
    for context in cfg.contexts:
        skipped = [e.name for e in entries if context <= e.method.window]
        if skipped:
            window = max(e.method.window for e in entries if e.name in skipped)
            print(f"note: --contexts {context} is not longer than the observation window ({window} tokens), so "
                  f"{', '.join(skipped)} cannot compress it: at that length only the full cache is measured")


def _run_prefill_memory(args: argparse.Namespace, device: torch.device) -> int:
    from pathlib import Path

    from ..cli_common import resolve_model
    from .prefill_memory import plot, prefill_memory_store, report, run_prefill_memory

    contexts = args.contexts or [8192, 16384, 32768, 65536]
    if not args.prefill_chunks or any(c < 1 for c in args.prefill_chunks) or args.kv < 1:
        raise ChunkKVError("--prefill-chunks and --kv must be positive token counts")
    import torch

    if not is_random_model(args.model):
        resolve_model(args)
    # the folder is checked, held and its settings compared before the model loads
    store = prefill_memory_store(args.out, model=ALIASES.get(args.model, args.model), dtype=args.dtype,
                                 device=device.type, kept=args.kv, seed=args.seed, threads=torch.get_num_threads())
    with store:
        model, label, _ = load(args, max(65536, max(contexts) + 1024))
        _log(f"prefill memory: {label}, contexts {contexts}, C {args.prefill_chunks}, KV {args.kv}, "
             f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}")
        rows = run_prefill_memory(
            model, contexts, args.prefill_chunks, args.kv, quadratic_limit=args.quadratic_limit,
            chunked_limit=args.chunked_limit, seed=args.seed, store=store, log=_log,
        )
        text = report(rows)
        out = Path(args.out)
        (out / "prefill_memory.md").write_text(text + "\n")
        if not args.no_plots and rows:
            plot(rows, out / "prefill_memory.png")
        print(text)
        return 1 if store.say_incomplete() else 0
