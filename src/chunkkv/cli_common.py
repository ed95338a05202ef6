"""Flags and loaders shared by every command: method and budget options, model loading."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .errors import ChunkKVError
from .methods import METHODS, Method, make_method


def add_method_arguments(parser: argparse.ArgumentParser, default_method: str = "chunkkv") -> None:
    """``--method`` plus the budget and method settings (only those a method has are passed on)."""
    g = parser.add_argument_group("compression")
    g.add_argument("--method", default=default_method, help=f"one of {', '.join(METHODS)} (default: {default_method})")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--keep-fraction", type=float, help="share of the prompt KEPT per layer, e.g. 0.1")
    budget.add_argument("--keep-tokens", type=int, help="prompt tokens kept per layer, e.g. 128")
    budget.add_argument(
        "--remove-fraction", type=float, help="share REMOVED per layer (kvpress's compression_ratio), e.g. 0.9"
    )
    g.add_argument("--window", type=int, help="observation window (tokens); default: the method's")
    g.add_argument("--chunk-size", type=int, help="ChunkKV chunk size (default 10)")
    g.add_argument("--reuse-depth", help="layer-wise index reuse depth: 1 = off, 2 = paper, 'all'")
    g.add_argument("--pooling", choices=["none", "avg", "max"], help="score pooling (default: the method's)")
    g.add_argument("--kernel", type=int, help="pooling kernel size")
    g.add_argument("--n-sink", type=int, help="StreamingLLM sink tokens (default 4)")


def method_from_args(args: argparse.Namespace, num_layers: int | None = None) -> Method:
    """Build the method the flags describe; ``--reuse-depth all`` needs ``num_layers``."""
    params = {}
    for flag, name in [
        ("keep_fraction", "keep_fraction"), ("keep_tokens", "keep_tokens"), ("remove_fraction", "remove_fraction"),
        ("window", "window"), ("chunk_size", "chunk_size"), ("pooling", "pooling"), ("kernel", "kernel"),
        ("n_sink", "n_sink"),
    ]:
        value = getattr(args, flag, None)
        if value is not None:
            params[name] = value
    depth = getattr(args, "reuse_depth", None)
    if depth is not None:
        if str(depth).lower() == "all":
            params["reuse_depth"] = max(1, num_layers or 10_000)
        else:
            try:
                params["reuse_depth"] = int(depth)
            except ValueError:
                raise ChunkKVError(f"--reuse-depth {depth!r} must be an integer >= 1 or 'all'") from None
    if args.method in ("full", "none") and not any(k in params for k in ("keep_fraction", "keep_tokens", "remove_fraction")):
        return make_method("full")
    if not any(k in params for k in ("keep_fraction", "keep_tokens", "remove_fraction")):
        raise ChunkKVError(
            f"--method {args.method} needs a budget: --keep-fraction F (share kept), --keep-tokens N, "
            "or --remove-fraction R (share removed, kvpress's compression_ratio)"
        )
    return make_method(args.method, **params)


def add_model_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    g = parser.add_argument_group("model")
    g.add_argument("--model", default=default, required=default is None, help="local model folder or hub id")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device-map", default=None, help="e.g. 'auto' to spread a large model over GPUs")
    g.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])


def load_model(args: argparse.Namespace):
    """Load ``(model, tokenizer)`` from ``--model`` with clear errors for the common mistakes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = args.model
    path = Path(source)
    if path.exists():
        if not path.is_dir():
            raise ChunkKVError(f"--model {source} is a file; give the model folder (with config.json and weights)")
        if not (path / "config.json").exists():
            raise ChunkKVError(f"--model {source} has no config.json: is it a Hugging Face model folder?")
        weights = list(path.glob("*.safetensors")) + list(path.glob("*.bin")) + list(path.glob("*.safetensors.index.json"))
        if not weights:
            raise ChunkKVError(f"--model {source} has a config.json but no weights (*.safetensors or *.bin)")
    elif source.startswith((".", "/", "~")) or source.count("/") > 1 or Path(path.parts[0]).is_dir():
        # A hub id is "org/name"; a missing path under an existing local folder is a typo, not a hub id.
        raise ChunkKVError(f"--model {source}: no such folder")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    kwargs = dict(dtype=dtype, attn_implementation=args.attn_implementation)
    if args.device_map:
        kwargs["device_map"] = args.device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as exc:
        raise ChunkKVError(f"could not load --model {source}: {exc}") from None
    if not args.device_map:
        model = model.to(device)
    return model.eval(), tokenizer
