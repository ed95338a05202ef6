"""Prefill with compression: run the prompt once and prune every full-attention layer's cache.

By default compression happens once, at prefill, layer by layer: each layer attends over its
whole prompt (the output is exact), then keeps the selected tokens. Peak memory during prefill
therefore still includes one layer's full prompt keys and values (plus the activations of a normal
prefill). With ``prefill_chunk=C`` the prompt goes through in chunks and every layer re-selects
after each chunk (:mod:`chunkkv.recompress`), so prefill memory is bounded by budget + ``C``
tokens per layer and one chunk's activations (docs/memory.md).
"""

from __future__ import annotations

import contextlib
import os
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from . import selection as sel
from .attention import attach, attention_modules, compression_session
from .cache import ChunkKVCache, PrunedLayer
from .errors import ChunkKVError, PromptError, UnsupportedModelError
from .methods import FullKV, Method, StreamingLLM
from .recompress import check_bounded_method, reselect


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
        pruned (full cache, or a budget at least the prompt) kept every position. Tokens appended after
        compression (questions, answers) are not included.
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
        index = getattr(cache_layer, "kept_index", None)
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
        defaults to the one that compressed it. See :mod:`chunkkv.persist`.
        """
        from .persist import save_context

        if model is None:
            model = self.source() if self.source is not None else None
        if model is None:
            raise ChunkKVError("this context does not know its model any more: call ctx.save(path, model=model)")
        return save_context(self, path, model)


@dataclass
class _Step:
    """What every prunable layer does after one chunk's attention (host ints, built before the chunk).

    ``plan[layer]``: ``[B]`` kept counts of the layers that prune after this chunk; ``slots``: their
    maximum; ``fillers``: whether some row keeps fewer than ``slots``; ``real``: ``[B]`` real slots
    held after the chunk is appended; ``key_valid``: ``[B, S]`` False at filler/padding slots (None
    when all are real); ``leaders``: reuse schedule among the planned layers.
    """

    plan: dict[int, torch.Tensor]
    slots: dict[int, int]
    fillers: dict[int, bool]
    real: dict[int, torch.Tensor]
    key_valid: dict[int, torch.Tensor | None]
    leaders: dict[int, int]
    last: bool


@dataclass
class _Session:
    """Per-request state the attention wrapper needs during one compressing prefill."""

    method: Method
    cache: ChunkKVCache
    measure: bool
    stats: CompressionStats
    step: _Step | None = None
    # The prompt's token ids, for methods that look at tokens (boundary-aware ChunkKV); set only for a
    # one-shot prefill, where held slots are the prompt's positions.
    input_ids: torch.Tensor | None = None
    chosen: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)

    def on_attention(self, module, layer: PrunedLayer, query, key, kwargs) -> None:
        idx = module.layer_idx
        step = self.step
        if step is None or idx not in step.plan or layer is not self.cache.layers[idx]:
            return
        start = _now(key.device) if self.measure else 0.0
        leader = step.leaders[idx]
        if leader == idx:
            index, valid = reselect(
                self.method, query, key,
                kwargs.get("scaling") or getattr(module, "scaling", key.shape[-1] ** -0.5), kwargs.get("softcap"),
                step.real[idx], step.plan[idx], step.slots[idx], step.key_valid[idx], input_ids=self.input_ids,
            )
            self.chosen[idx] = (index, valid if step.fillers[idx] else None)
            if idx not in self.stats.scored_layers:
                self.stats.scored_layers.append(idx)
            if step.last and self.method.window > 0 and min(step.slots[idx], query.shape[2]) >= self.method.window:
                # Seed the decoding window (used only if a decode budget is set later).
                # A copy: a view would keep the whole prompt's query states alive with the context.
                layer.recent_queries = query[:, :, -self.method.window :].clone()
        layer.prune(*self.chosen[leader])
        if self.measure:
            self.stats.select_seconds += _now(key.device) - start


def _chunk_bounds(width: int, chunk: int | None) -> list[int]:
    """Chunk edges over the padded width, counted back from the end (the first chunk is the partial
    one), so every row of a left-padded batch sees the same row-relative edges as when run alone."""
    if chunk is None or chunk >= width:
        return [0, width]
    first = width - (-(-width // chunk) - 1) * chunk
    return [0] + list(range(first, width + 1, chunk))


def _plan_steps(
    method: Method, pruned: list[int], lengths: list[int], width: int, bounds: list[int], device
) -> list[_Step]:
    """Host-side plan of every chunk: kept counts ``min(final kept, real tokens seen)`` per layer and row.

    The final kept count is computed once from each row's whole prompt (``keep_fraction`` is a
    share of the whole prompt), so the cache ends with exactly the one-shot budget.
    """
    final = method.kept_per_layer(lengths, len(pruned))
    pads = [width - n for n in lengths]
    stored = {layer: 0 for layer in pruned}
    held = {layer: [0] * len(lengths) for layer in pruned}
    tensors: dict[tuple, torch.Tensor] = {}

    def tensor(values: list[int]) -> torch.Tensor:
        key = tuple(values)
        if key not in tensors:
            tensors[key] = torch.tensor(values, device=device)
        return tensors[key]

    steps = []
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        chunk_real = [max(0, hi - max(lo, p)) for p in pads]
        plan, slots, fillers, real_t, key_valid = {}, {}, {}, {}, {}
        for pos, layer in enumerate(pruned):
            size = stored[layer] + hi - lo
            real = [h + c for h, c in zip(held[layer], chunk_real)]
            kept = [min(f, r) for f, r in zip(final[pos], real)]
            if all(k_ == size for k_ in kept):
                stored[layer], held[layer] = size, real  # nothing to drop on this layer yet
                continue
            plan[layer] = tensor(kept)
            slots[layer] = max(kept)
            fillers[layer] = not method.exact_budget or any(k_ != slots[layer] for k_ in kept)
            real_t[layer] = tensor(real)
            if all(r == size for r in real):
                key_valid[layer] = None
            else:
                key_valid[layer] = torch.arange(size, device=device)[None, :] >= (size - real_t[layer])[:, None]
            stored[layer], held[layer] = slots[layer], kept
        steps.append(_Step(
            plan, slots, fillers, real_t, key_valid,
            sel.reuse_leaders(list(plan), method.reuse_depth) if plan else {}, last=k == len(bounds) - 2,
        ))
    return steps


def _now(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@dataclass
class LayerPlan:
    """What a method keeps on each pruned layer of one request (host-side, decided before prefill).

    Attributes:
        counts: ``{layer: [B] kept tokens}`` for every layer that drops something.
        slots: ``{layer: max kept}`` (host int, the stored length after pruning).
        fillers: ``{layer: True}`` when some row keeps fewer than ``slots`` (filler slots needed).
        leaders: ``{layer: leader layer}`` the layer-wise reuse schedule over the planned layers.
        kept: ``{layer: [kept per row]}`` host ints (for :class:`CompressionStats`).
    """

    counts: dict[int, torch.Tensor]
    slots: dict[int, int]
    fillers: dict[int, bool]
    leaders: dict[int, int]
    kept: dict[int, list[int]]


def plan_layers(method: Method, lengths: list[int], width: int, pruned: list[int], device) -> LayerPlan:
    """Kept counts, slots, filler flags and reuse leaders of ``method`` for rows of ``lengths`` real
    tokens padded to ``width``, over the pruned layers ``pruned`` (in depth order)."""
    per_layer = method.kept_per_layer(lengths, len(pruned))
    counts, slots, fillers, kept_host = {}, {}, {}, {}
    for pos, layer in enumerate(pruned):
        kept = per_layer[pos]
        if all(k == width for k in kept):
            continue  # nothing to drop on this layer
        counts[layer] = torch.tensor(kept, device=device)
        slots[layer] = max(kept)
        fillers[layer] = not method.exact_budget or any(k != slots[layer] for k in kept)
        kept_host[layer] = list(kept)
    leaders = sel.reuse_leaders(list(counts), method.reuse_depth) if counts else {}
    return LayerPlan(counts, slots, fillers, leaders, kept_host)


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


def check_window(method: Method, lengths: list[int]) -> None:
    """Raise :class:`PromptError` when a scoring method's window leaves no prefix in some row."""
    if isinstance(method, (FullKV, StreamingLLM)):
        return
    short = [(row, n) for row, n in enumerate(lengths) if n <= method.window]
    if short:
        row, n = short[0]
        raise PromptError(
            f"window={method.window} is not shorter than the prompt (row {row} has {n} tokens): the "
            "observation window must leave a prefix to score; lower `window` or use method 'full'"
        )


def _as_method(method: Method | str | None) -> Method:
    """``method`` itself, FullKV for None, or the method a name builds (``"full"``; others need a budget)."""
    if method is None:
        return FullKV()
    if isinstance(method, str):
        from .methods import make_method

        return make_method(method)  # unknown name or missing budget: a clear ChunkKVError
    if not isinstance(method, Method):
        raise ChunkKVError(
            f"method must be a chunkkv method such as chunkkv.ChunkKV(keep_fraction=0.1) or a name, "
            f"got {type(method).__name__}"
        )
    return method


def _check_prompt(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(input_ids, torch.Tensor):
        raise PromptError(f"input_ids must be a torch.Tensor of token ids, got {type(input_ids).__name__}")
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if input_ids.dim() != 2:
        raise PromptError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise PromptError("the prompt is empty: give at least one token to compress")
    if input_ids.dtype not in (torch.long, torch.int, torch.int32, torch.int64):
        raise PromptError(f"input_ids must hold integer token ids, got dtype {input_ids.dtype}")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    else:
        if attention_mask.dim() == 1:
            attention_mask = attention_mask[None]
        if attention_mask.shape != input_ids.shape:
            raise PromptError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}"
            )
        if not isinstance(attention_mask, torch.Tensor):
            raise PromptError(f"attention_mask must be a torch.Tensor, got {type(attention_mask).__name__}")
        if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise PromptError(
                "attention_mask may only hold 0 (left padding) and 1 (real token); it holds other values "
                "(chunkkv would count them as tokens and shift positions)"
            )
        attention_mask = attention_mask.to(device=input_ids.device, dtype=torch.long)
    return input_ids, attention_mask


def _row_lengths(attention_mask: torch.Tensor) -> list[int]:
    """Real tokens per row; checks the padding is on the left (one host sync per request)."""
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    width = mask.shape[-1]
    expected = torch.arange(width, device=mask.device)[None, :] >= (width - lengths)[:, None]
    lengths_host = lengths.tolist()
    if not torch.equal(mask, expected):
        raise PromptError(
            "the attention_mask is not left-padded: chunkkv needs each row's padding on the left "
            "(set tokenizer.padding_side = 'left')"
        )
    for row, n in enumerate(lengths_host):
        if n == 0:
            raise PromptError(f"row {row} of the batch has no real tokens (its attention_mask is all zeros)")
    return lengths_host


@torch.inference_mode()
def compress(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    method: Method | str | None = None,
    *,
    measure: bool = False,
    prefill_chunk: int | None = None,
    scoring_prompt: torch.Tensor | None = None,
    scoring_block: int = 512,
) -> CompressedContext:
    """Prefill ``input_ids`` with ``method`` and return the compressed cache and next-token logits.

    Args:
        model: a transformers decoder-only causal LM (sdpa or eager attention). It is attached to
            chunkkv's attention wrapper (see :func:`chunkkv.attention.attach`) if not already.
        input_ids: ``[B, T]`` or ``[T]`` token ids, left-padded for batches.
        attention_mask: ``[B, T]`` 1 for real tokens, 0 for left padding (None = no padding).
        method: a :mod:`chunkkv.methods` method (or a name: ``"full"``; a compressing method needs a
            budget, so build it with :func:`chunkkv.make_method`); None or :class:`FullKV` keeps everything.
        measure: time the selection step (syncs the device around each layer's selection; leave
            off outside benchmarks).
        prefill_chunk: run the prompt ``C`` tokens at a time (chunks counted back from the end, so
            the first may be shorter); after each chunk every prunable layer re-selects over what
            it holds plus the chunk, scored by the chunk's queries, so no layer ever holds more than
            its final budget + ``C`` tokens. The final kept count is the one-shot count for the
            whole prompt (``keep_fraction`` is a share of the whole prompt, known up front). None
            or ``C >= T``: one pass, exactly today's one-shot compression.
        scoring_prompt: ``[n]`` token ids of the instruction for ``method.scoring`` =
            ``"reconstruction"`` / ``"shallow_reconstruction"`` / ``"hybrid"`` / ``"probe"``
            (:func:`chunkkv.agnostic.scoring_prompt` builds them;
            ``"surprisal"`` needs none);
            ``scoring_block``: scoring tokens per forward pass. See :mod:`chunkkv.agnostic`.

    Each row chooses its own tokens. Rows shorter than their budget keep every token.
    """
    method = _as_method(method)
    if method.scoring != "window":
        # Scoring after the whole context's prefill: every layer needs its full cache first.
        from .agnostic import compress_agnostic

        if prefill_chunk is not None:
            raise PromptError(
                f"scoring={method.scoring!r} scores the context after its whole prefill, on the full cache, so it "
                "cannot be combined with prefill_chunk (which never holds the full cache); use scoring='window'"
            )
        input_ids, attention_mask = _check_prompt(input_ids, attention_mask)
        check_window(method, _row_lengths(attention_mask))
        return compress_agnostic(
            model, input_ids, attention_mask, method, scoring_prompt=scoring_prompt, scoring_block=scoring_block
        )
    input_ids, attention_mask = _check_prompt(input_ids, attention_mask)
    attach(model)
    lengths_host = _row_lengths(attention_mask)
    width = input_ids.shape[1]
    if prefill_chunk is not None and (
        isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1
    ):
        raise PromptError(f"prefill_chunk={prefill_chunk!r} must be a positive int (tokens per prefill chunk) or None")
    bounds = _chunk_bounds(width, prefill_chunk)
    if len(bounds) > 2 and not isinstance(method, FullKV):
        check_bounded_method(method, "prefill_chunk")
    check_window(method, lengths_host)
    # Sliding-window layers whose window holds the whole prompt are compressed too (FullKV keeps
    # the stock, bounded layers).
    cache = ChunkKVCache(model.config, prompt_length=None if isinstance(method, FullKV) else width)
    pruned = cache.pruned_layers
    if not pruned and not isinstance(method, FullKV):
        windows = sorted({w for w in (getattr(layer, "sliding_window", None) for layer in cache.layers) if w})
        raise UnsupportedModelError(
            f"every attention layer of this model is sliding-window (window {', '.join(map(str, windows)) or '?'} "
            f"tokens) and the prompt ({width} tokens) is longer than the window, so the cache is already "
            "bounded by the window and chunkkv has nothing to compress; give a prompt no longer than the "
            "window, or use method 'full'"
        )
    modules = {m.layer_idx for m in attention_modules(model)}
    missing = [i for i in pruned if i not in modules]
    if missing:
        raise UnsupportedModelError(f"layers {missing} have no self_attn module with a matching layer_idx")

    device = input_ids.device
    stats = CompressionStats(prompt_lengths=lengths_host)
    session = steps = None
    if not isinstance(method, FullKV):
        steps = _plan_steps(method, pruned, lengths_host, width, bounds, device)
        session = _Session(method=method, cache=cache, measure=measure, stats=stats,
                           input_ids=input_ids if len(bounds) == 2 else None)
        final = method.kept_per_layer(lengths_host, len(pruned))
        touched = {layer for step in steps for layer in step.plan}
        stats.kept = {layer: list(final[pos]) for pos, layer in enumerate(pruned) if layer in touched}

    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    start = _now(device)
    with compression_session(session) if session is not None else contextlib.nullcontext():
        for k in range(len(bounds) - 1):
            lo, hi = bounds[k], bounds[k + 1]
            if session is not None:
                session.step = steps[k]
            out = model(
                input_ids=input_ids[:, lo:hi],
                attention_mask=attention_mask[:, :hi],
                position_ids=position_ids[:, lo:hi],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
    stats.prefill_seconds = _now(device) - start
    stats.scored_layers.sort()
    mark_wrapper_layers(cache)
    return CompressedContext(
        cache, input_ids, attention_mask, out.logits[:, -1, :], method, stats, weakref.ref(model)
    )
