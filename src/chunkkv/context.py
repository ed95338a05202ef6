"""The compressed context: a prompt run through the model with a compressed cache, ready to continue.

:class:`CompressedContext` is what :func:`chunkkv.compress` returns and :func:`chunkkv.load_context`
reads back; :func:`stack_contexts` puts several contexts of one prompt in one batch, so one decoding
loop serves every method.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .attention import attach
from .cache import ChunkKVCache, PrunedLayer
from .errors import ChunkKVError
from .methods import Method
from .persist import ContextFileError, read_context, write_context

__all__ = ["CompressedContext", "CompressionStats", "ContextFileError", "load_context", "mark_wrapper_layers",
           "stack_contexts"]


@dataclass
class CompressionStats:
    """What one compression did.

    Attributes:
        scored_layers: layers that ran scoring and selection (reuse followers are absent).
        kept: ``{layer: [kept tokens per row]}`` for pruned layers (host ints, exact).
        prompt_lengths: real prompt tokens per row.
        select_seconds: time spent scoring, selecting and gathering (only with ``measure=True``).
        prefill_seconds: wall time of the whole prefill forward pass.
        scoring_seconds: wall time of the question-agnostic scoring pass (``scoring`` other than
            ``"window"``; 0 otherwise), on top of the prefill.
    """

    scored_layers: list[int] = field(default_factory=list)
    kept: dict[int, list[int]] = field(default_factory=dict)
    prompt_lengths: list[int] = field(default_factory=list)
    select_seconds: float = 0.0
    prefill_seconds: float = 0.0
    scoring_seconds: float = 0.0

    @property
    def mean_kept_fraction(self) -> float:
        """Kept tokens over prompt tokens, averaged over pruned layers and rows (1.0 = nothing dropped)."""
        if not self.kept:
            return 1.0
        total = sum(sum(v) for v in self.kept.values())
        return total / (len(self.kept) * sum(self.prompt_lengths))


@dataclass(init=False)
class CompressedContext:
    """A prompt run through the model with a compressed cache, ready to continue.

    Reusing a context gives the same answers each time: :attr:`cache` hands out a fresh fork on
    every access and :func:`chunkkv.continue_from` works on a fork, so neither changes the context.
    :func:`chunkkv.extend` is the one API that grows the context in place.

    Attributes:
        cache: a fork of the compressed :class:`ChunkKVCache` (a new one per access, sharing the
            tensors); pass it to ``model.generate(..., cache=ctx.cache)`` together with
            ``input_ids`` + new tokens, or use :func:`chunkkv.generation.continue_from`.
        input_ids: ``[B, T]`` the prompt as given (left-padded).
        attention_mask: ``[B, T]`` its mask (ones when none was given); grows with :func:`extend`.
        next_logits: ``[B, vocab]`` logits for the token after the prompt (or the last extension).
        stats: :class:`CompressionStats`.
    """

    _cache: ChunkKVCache
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    next_logits: torch.Tensor
    method: Method
    stats: CompressionStats
    # A weak reference to the model that built the cache (``save`` fingerprints it).
    source: Callable[[], Any] | None = field(default=None, repr=False, compare=False)

    def __init__(self, cache: ChunkKVCache, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 next_logits: torch.Tensor, method: Method, stats: CompressionStats,
                 source: Callable[[], Any] | None = None) -> None:
        self._cache = cache
        self.input_ids, self.attention_mask, self.next_logits = input_ids, attention_mask, next_logits
        self.method, self.stats, self.source = method, stats, source

    @property
    def cache(self) -> ChunkKVCache:
        """A fork of the context's cache (new per access): generating with it leaves the context as it is."""
        return self._cache.fork()

    def kept_positions(self, layer: int, row: int = 0, head: int | None = None) -> torch.Tensor:
        """Sorted prompt positions that ``layer`` kept for ``row``: a 1-D ``LongTensor`` on the CPU.

        Positions count the row's own prompt tokens from 0 (left padding excluded, so for an unpadded
        prompt they index ``input_ids[row]`` directly). For per-head methods (SnapKV, PyramidKV, H2O)
        pass ``head`` (a KV head) or get the union over heads (``head=None``). A layer that was never
        pruned (full cache, or a budget at least the prompt) kept every position; a stock sliding-window
        layer (the window shorter than the prompt) holds the last positions inside its window. Tokens
        appended after compression (questions, answers) are not included.
        """
        cache_layers = self._cache.layers
        if not 0 <= layer < len(cache_layers):
            raise ValueError(f"layer {layer} is out of range: the model has layers 0-{len(cache_layers) - 1}")
        batch = self.attention_mask.shape[0]
        if not 0 <= row < batch:
            raise ValueError(f"row {row} is out of range: the batch has {batch} rows")
        width = self.input_ids.shape[1]  # the mask grows as tokens are appended; the prompt does not
        pad = int(width - self.attention_mask[row, :width].sum())
        cache_layer = cache_layers[layer]
        if not isinstance(cache_layer, PrunedLayer):  # a stock (sliding-window) layer: its last tokens
            stored = cache_layer.keys.shape[-2] if getattr(cache_layer, "is_initialized", False) else 0
            seen = getattr(cache_layer, "cumulative_length", stored)
            return torch.arange(max(seen - stored, pad), min(seen, width)) - pad
        index = cache_layer.kept_index
        if index is None:
            return torch.arange(width - pad)
        heads = index.shape[1]
        if head is not None and not 0 <= head < (cache_layer.keys.shape[1] if heads == 1 else heads):
            raise ValueError(f"head {head} is out of range: layer {layer} has {cache_layer.keys.shape[1]} KV heads")
        picked = index[row].to("cpu")
        if cache_layer.valid is not None:
            picked = picked[:, cache_layer.valid[row, : picked.shape[-1]].to("cpu")]
        if heads == 1:
            picked = picked[0]  # one index set serves every head
        else:
            picked = picked.flatten() if head is None else picked[head]
        picked = picked[picked < self.input_ids.shape[1]]  # under a decode budget new tokens are kept too
        return torch.unique(picked) - pad  # sorted; the union over heads when head is None

    def fork(self) -> CompressedContext:
        """A copy whose cache can be extended without changing this one (no tensor copies)."""
        return CompressedContext(
            self._cache.fork(), self.input_ids, self.attention_mask, self.next_logits, self.method, self.stats,
            self.source,
        )

    def save(self, path: str | os.PathLike, model: torch.nn.Module | None = None) -> int:
        """Write this context to a safetensors file; returns its size in bytes.

        Reload it with :func:`chunkkv.load_context` (same model, dtype and weights). ``model``
        defaults to the one that compressed it; another model is refused (the file would fit no
        model). A decode budget set on the context is saved with it and restored on loading. The
        file is written under a temporary name and renamed into place. See :mod:`chunkkv.persist`.
        """
        if model is None:
            model = self.source() if self.source is not None else None
        if model is None:
            raise ChunkKVError("this context does not know its model any more: call ctx.save(path, model=model)")
        return write_context(self, path, model)


def mark_wrapper_layers(cache: ChunkKVCache) -> None:
    """Flag the pruned layers whose attention needs chunkkv's wrapper (fillers, a stored length
    that differs from the longest layer's: one shared mask is sized for the longest, or a sliding
    window that decoding may outgrow: only the wrapper knows the kept keys' original positions)."""
    pruned = cache.pruned_layers
    longest = max((cache.layers[i].stored_length for i in pruned), default=0)
    for i in pruned:
        layer = cache.layers[i]
        layer.needs_wrapper = (
            layer.valid is not None or layer.stored_length != longest or layer.sliding_window is not None
        )


def stack_contexts(contexts: list[CompressedContext]) -> CompressedContext:
    """Several compressed contexts of the same one-row prompt as one batch (row ``m`` = context ``m``).

    Each layer's rows are left-filled with filler slots up to the longest row (``valid`` False, as
    for a batch whose rows keep different counts), so one decoding loop serves every method: the
    weights are read once per step for all of them. Row ``m`` decodes as ``contexts[m]`` alone up
    to floating-point summation order (the batched matmuls), as any batched decoding does.

    ``method`` and ``next_logits`` of the result are the first context's / all rows'; ``stats.kept``
    lists each context's kept count per layer.
    """
    if not contexts:
        raise ChunkKVError("stack_contexts needs at least one context")
    first = contexts[0]
    for ctx in contexts:
        if ctx.input_ids.shape[0] != 1:
            raise ChunkKVError("stack_contexts stacks one-row contexts; got a batch of " f"{ctx.input_ids.shape[0]}")
        if not torch.equal(ctx.input_ids, first.input_ids) or not torch.equal(ctx.attention_mask, first.attention_mask):
            raise ChunkKVError("stack_contexts needs contexts of the same prompt (same input_ids and attention_mask)")
    rows = len(contexts)
    cache = first.cache.fork()
    width = first.input_ids.shape[1]
    kept: dict[int, list[int]] = {}
    for i, target in enumerate(cache.layers):
        kinds = {type(ctx._cache.layers[i]) for ctx in contexts}
        if len(kinds) > 1:
            raise ChunkKVError(
                f"stack_contexts: layer {i} is compressible in some contexts and a stock layer in others (a "
                "sliding-window layer whose window holds the prompt, kept stock by method 'full'); stack the "
                "compressing methods only")
        if not isinstance(target, PrunedLayer):  # a stock layer: the same tokens in every context
            if getattr(target, "is_initialized", False):
                target.keys = torch.cat([ctx._cache.layers[i].keys for ctx in contexts])
                target.values = torch.cat([ctx._cache.layers[i].values for ctx in contexts])
            continue
        layers = [ctx.cache.layers[i] for ctx in contexts]
        heads = layers[0].keys.shape[1]
        slots = max(layer.stored_length for layer in layers)
        keys, values, index, valid = [], [], [], []
        for layer in layers:
            n = layer.stored_length
            fill = slots - n
            k = layer.keys
            keys.append(torch.cat([k.new_zeros(1, heads, fill, k.shape[-1]), k], dim=2))
            values.append(torch.cat([k.new_zeros(1, heads, fill, layer.values.shape[-1]), layer.values], dim=2))
            idx = (layer.kept_index if layer.kept_index is not None
                   else torch.arange(n, device=k.device)[None, None, :] + (layer.logical_length - n))
            index.append(torch.cat([idx.new_zeros(1, 1, fill).expand(1, idx.shape[1], fill), idx], -1).expand(1, heads, slots))
            ok = layer.valid if layer.valid is not None else torch.ones(1, n, dtype=torch.bool, device=k.device)
            valid.append(torch.cat([ok.new_zeros(1, fill), ok], dim=-1))
        target.keys, target.values = torch.cat(keys), torch.cat(values)
        target.kept_index = torch.cat(index)
        all_valid = torch.cat(valid)
        target.valid = None if bool(all_valid.all()) else all_valid
        # One decode window per row, or none (a budget set later then starts from decoded queries).
        recent = [layer.recent_queries for layer in layers]
        same = all(r is not None and r.shape == recent[0].shape for r in recent)
        target.recent_queries = torch.cat(recent) if same else None
        if all(ctx.stats.kept.get(i) for ctx in contexts):
            kept[i] = [ctx.stats.kept[i][0] for ctx in contexts]
    mark_wrapper_layers(cache)
    stats = CompressionStats(kept=kept, prompt_lengths=[first.stats.prompt_lengths[0]] * rows,
                             prefill_seconds=first.stats.prefill_seconds)
    return CompressedContext(cache, first.input_ids.expand(rows, width), first.attention_mask.expand(rows, width),
                             None if any(c.next_logits is None for c in contexts)
                             else torch.cat([ctx.next_logits for ctx in contexts]), first.method, stats)


def load_context(path: str | os.PathLike, model: torch.nn.Module) -> CompressedContext:
    """Load a context saved by :meth:`CompressedContext.save` for ``model`` (on the model's device).

    Continuing from it gives exactly the tokens and logits of continuing the context in memory.
    Raises :class:`ContextFileError` when the file is not a chunkkv context, is damaged, or was
    saved for another model, dtype or checkpoint.
    """
    saved = read_context(path, model)
    try:
        stats = CompressionStats(**saved.stats)
    except TypeError as exc:
        raise ContextFileError(f"{path}: the chunkkv metadata is malformed (stats: {exc})") from None
    attach(model)  # decoding over a pruned cache needs chunkkv's attention
    return CompressedContext(saved.cache, saved.input_ids, saved.attention_mask, saved.next_logits, saved.method,
                             stats, weakref.ref(model))
