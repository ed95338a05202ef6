"""Helpers shared by ``chunkkv demo``, ``generate`` and ``inspect``.

Everything a command needs beyond ``chunkkv.cli_common``: the shipped testbed's location, reading
the context, building several methods from one set of flags, the kept sets of a compressed cache,
the layer x layer Jaccard similarity of kept indices (pure functions), and small formatters.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import torch

from ..errors import ChunkKVError

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
    from ..generation import Sampling

    if args.top_k is not None and args.top_k < 1:
        raise ChunkKVError(f"--top-k {args.top_k} must be >= 1")
    eos = getattr(tokenizer, "eos_token_id", None) if tokenizer is not None else None
    return Sampling(
        max_new_tokens=args.max_new_tokens, do_sample=args.do_sample, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_token_id=eos,
    )


# --- model --------------------------------------------------------------------------------------
def testbed_path() -> Path:
    """Where the shipped testbed model lives: ``./models/chunkkv-testbed`` or the repository's copy."""
    here = Path.cwd() / TESTBED_DIR
    repo = Path(__file__).resolve().parents[3] / TESTBED_DIR
    for candidate in (here, repo):
        if (candidate / "config.json").exists():
            return candidate
    return repo


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
    """``(model, tokenizer)`` with a spinner; clear one-line errors come from ``cli_common.load_model``."""
    from transformers.utils import logging as hf_logging

    from ..cli_common import load_model

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # our spinner replaces transformers' per-shard bars
    try:
        with progress() as bar:
            bar.add_task(f"loading {args.model}", total=None)
            model, tokenizer = load_model(args)
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
    return model, tokenizer


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
    "reuse_depth": "reuse_depth",
}


def method_class(name: str):
    """The method class ``make_method`` would build for ``name`` (aliases allowed)."""
    from ..methods import METHODS, make_method

    key = name.lower().replace("_", "").replace(" ", "")
    aliases = {"streaming": "streamingllm", "fullkv": "full", "none": "full", "pyramid": "pyramidkv", "snap": "snapkv"}
    key = aliases.get(key, key)
    if key not in METHODS:
        make_method(name)  # raises the library's "unknown method ..." error
    return METHODS[key]


def parse_method_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ChunkKVError(f"--methods {text!r} names no method; e.g. --methods chunkkv,snapkv")
    return names


def methods_from_args(args: argparse.Namespace, names: Sequence[str], num_layers: int | None = None,
                      default_keep_fraction: float | None = 0.1) -> list:
    """One method per name with the shared budget and only the settings each method has.

    Without a budget flag every compressing method keeps ``default_keep_fraction`` (None: the
    budget is required). The kvpress presets take the budget as ``remove_fraction``; a
    ``--keep-fraction F`` is passed to them as ``remove_fraction = 1 - F``.
    """
    from ..cli_common import method_from_args

    methods = []
    for name in names:
        cls = method_class(name)
        ns = copy.copy(args)
        ns.method = cls.name
        known = {f.name for f in fields(cls)}
        for flag, fname in _SETTINGS.items():
            if fname not in known or (fname == "reuse_depth" and not cls.shared_across_heads):
                setattr(ns, flag, None)
        if all(getattr(ns, b, None) is None for b in _BUDGETS) and cls.name != "full" and default_keep_fraction is not None:
            ns.keep_fraction = default_keep_fraction
        for b in _BUDGETS:
            if not hasattr(ns, b):
                setattr(ns, b, None)
        if "remove_fraction" in known and cls.name.endswith("-kvpress") and ns.keep_fraction is not None:
            ns.remove_fraction, ns.keep_fraction = round(1.0 - float(ns.keep_fraction), 12), None
        methods.append(method_from_args(ns, num_layers))
    return methods


# --- what a compressed cache kept ---------------------------------------------------------------
def kept_masks(cache, prompt_len: int, row: int = 0) -> dict[int, torch.Tensor]:
    """``{layer: [Hkv, prompt_len] bool}``: the prompt tokens each full-attention layer kept (one row).

    Layers that were never pruned (method ``full``, or a budget at least the prompt length) kept
    every token. Positions are those of the prompt as given (no left padding in the commands).
    """
    out = {}
    for i in cache.pruned_layers:
        layer = cache.layers[i]
        heads = layer.keys.shape[1] if getattr(layer, "keys", None) is not None else 1
        mask = torch.zeros(heads, prompt_len, dtype=torch.bool, device="cpu")
        if layer.kept_index is None:
            mask[:] = True
        else:
            index = layer.kept_index[row].to("cpu").expand(heads, -1).clone()
            if layer.valid is not None:
                valid = layer.valid[row, : index.shape[-1]].to("cpu")
                index = index[:, valid]
            mask.scatter_(-1, index, True)
        out[i] = mask
    return out


def union_over_heads(masks: torch.Tensor) -> torch.Tensor:
    """``[L, H, T]`` -> ``[L, T]``: a token is kept by a layer when any of its KV heads kept it."""
    return masks.any(dim=1)


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """Jaccard similarity ``|a ∩ b| / |a ∪ b|`` of two index sets (1.0 for two empty sets)."""
    a, b = set(a), set(b)
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def jaccard_matrix(masks: torch.Tensor) -> torch.Tensor:
    """Pairwise Jaccard similarity of kept sets: ``masks [L, T]`` bool -> ``[L, L]`` float64.

    ``out[i, j] = |K_i ∩ K_j| / |K_i ∪ K_j|`` where ``K_i`` is the set of positions kept by layer
    ``i`` (two empty sets count as identical, 1.0). This is the paper's Figure 2 (layer-wise
    similarity of retained indices). For per-head methods pass the union over heads
    (:func:`union_over_heads`) or use :func:`mean_head_jaccard`.
    """
    if masks.dim() != 2:
        raise ValueError(f"masks must be [layers, tokens], got shape {tuple(masks.shape)}")
    m = masks.to(torch.float64)
    inter = m @ m.T
    counts = m.sum(-1)
    union = counts[:, None] + counts[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def mean_head_jaccard(masks: torch.Tensor) -> torch.Tensor:
    """``masks [L, H, T]`` -> ``[L, L]``: Jaccard of head ``h`` of layer ``i`` with head ``h`` of layer
    ``j``, averaged over the heads."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be [layers, heads, tokens], got shape {tuple(masks.shape)}")
    return torch.stack([jaccard_matrix(masks[:, h]) for h in range(masks.shape[1])]).mean(0)


def shares_heads(masks: torch.Tensor) -> bool:
    """True when every KV head of every layer kept the same tokens (``[L, H, T]``)."""
    return bool((masks == masks[:, :1]).all())


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
def progress() -> Iterator:
    """A transient rich progress display on stderr (silent when stderr is not a terminal)."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    bar = Progress(
        SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        console=Console(stderr=True), transient=True,
    )
    with bar:
        yield bar


class Timer:
    def __init__(self, device: torch.device | None = None) -> None:
        self.device = device
        self.seconds = 0.0

    def _sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def __enter__(self) -> Timer:
        self._sync()
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self._sync()
        self.seconds += time.perf_counter() - self._start
