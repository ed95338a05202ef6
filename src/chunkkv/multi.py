"""One prefill, many methods: capture a prompt's prefill once and compress it with every method.

Compression prunes each layer only after that layer's own attention over the whole prompt, so the
prefill's hidden states, and therefore every layer's keys, values and queries, are the same for
every method (and equal to a full-cache prefill). :func:`capture_prefill` runs that prefill once
and keeps what the methods need: each layer's full keys and values (the uncompressed cache), the
queries of the last ``window`` positions, and, on request, H2O's accumulated scores (which need
every query, so they are computed during the capture instead of storing all queries).
:func:`compress_from_capture` then builds the :class:`~chunkkv.compress.CompressedContext` that
``compress(model, ids, mask, method)`` would have built — same kept indices, same next-token
logits, same cache — by running the method's own ``select`` on the leader layers, reusing the
leaders' indices on the followers, and gathering. Raw window scores are computed once per layer
and window and shared by every method (SnapKV, PyramidKV and ChunkKV at any budget or chunk size).

Cost: the capture holds the full cache (the memory of a full-cache prefill) plus ``window``
queries per layer; every further method costs its selection and gather, not a prefill.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from . import selection as sel
from .attention import attach, compression_session
from .cache import ChunkKVCache, PrunedLayer
from .compress import (
    CompressedContext, CompressionStats, _check_prompt, _now, _row_lengths, check_window, mark_wrapper_layers,
    plan_layers,
)
from .errors import ChunkKVError, UnsupportedModelError
from .methods import FullKV, LayerInputs, Method
from .scoring import accumulated_attention_scores, first_token_surprisal

__all__ = ["PrefillCapture", "capture_prefill", "capture_prefix", "compress_from_capture", "stack_contexts"]


@dataclass
class PrefillCapture:
    """A full-cache prefill of one (batched) prompt, with what the methods need to select.

    Attributes:
        cache: the uncompressed :class:`ChunkKVCache` (``[B, Hkv, T, d]`` per layer); never modified.
        input_ids / attention_mask: ``[B, T]`` the prompt as given (left-padded).
        next_logits: ``[B, vocab]`` logits after the prompt (identical for every method).
        window: queries kept per layer (the largest observation window a method may use).
        queries: ``{layer: [B, Hq, window, d]}`` the last ``window`` query states of each layer.
        scaling / softcap: ``{layer: float | None}`` as the model's attention used them.
        memo: ``{layer: {key: [B, Hkv, T]}}`` raw scores shared by methods (see ``LayerInputs.memo``).
        surprisal: ``[B, T]`` each prompt token's negative log-likelihood given what precedes it
            (``capture_prefill(..., surprisal=True)``; padded coordinates, 0 on padding);
            ``surprisal_seconds`` the part of the prefill time spent computing it.
        prefill_seconds: wall time of the capture.
    """

    cache: ChunkKVCache
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    next_logits: torch.Tensor
    window: int
    lengths: list[int]
    queries: dict[int, torch.Tensor] = field(default_factory=dict)
    scaling: dict[int, float] = field(default_factory=dict)
    softcap: dict[int, float | None] = field(default_factory=dict)
    memo: dict[int, dict] = field(default_factory=dict)
    accumulated: bool = False
    surprisal: torch.Tensor | None = None
    surprisal_seconds: float = 0.0
    prefill_seconds: float = 0.0


class _Capture:
    """The attention wrapper's session during a capture: record, never prune."""

    def __init__(self, capture: PrefillCapture, key_valid: torch.Tensor | None) -> None:
        self.capture = capture
        self.key_valid = key_valid

    def on_attention(self, module, layer: PrunedLayer, query, key, kwargs) -> None:
        cap = self.capture
        idx = module.layer_idx
        if idx in cap.queries or layer is not cap.cache.layers[idx]:
            return
        # A contiguous copy of the window: the scores then see the same values compress() slices.
        cap.queries[idx] = query[:, :, -cap.window:].contiguous()
        cap.scaling[idx] = kwargs.get("scaling") or getattr(module, "scaling", key.shape[-1] ** -0.5)
        cap.softcap[idx] = kwargs.get("softcap")
        cap.memo[idx] = {}
        if cap.accumulated:
            cap.memo[idx][("accumulated",)] = accumulated_attention_scores(
                query, key, cap.scaling[idx], self.key_valid, cap.softcap[idx])


def _surprisal_hook(model, capture: PrefillCapture, input_ids: torch.Tensor, attention_mask: torch.Tensor):
    """A forward hook on the decoder that turns its final hidden states into ``capture.surprisal``."""
    from .scoring import token_surprisal

    head = model.get_output_embeddings()
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if head is None or decoder is None or decoder is model:
        raise UnsupportedModelError(
            f"surprisal scores need the model's decoder and its output projection, which {type(model).__name__} does "
            "not expose (get_decoder / get_output_embeddings); use scoring='window' or 'reconstruction'"
        )
    softcap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)

    def hook(_module, _args, output):
        hidden = output[0] if isinstance(output, tuple) else output.last_hidden_state
        start = _now(hidden.device)
        capture.surprisal = token_surprisal(hidden, head, input_ids, attention_mask, softcap)
        capture.surprisal_seconds = _now(hidden.device) - start

    return hook


@torch.inference_mode()
def capture_prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    window: int,
    accumulated: bool = False,
    surprisal: bool = False,
) -> PrefillCapture:
    """Run the prompt once with the full cache and capture what every method needs.

    Args:
        input_ids: ``[B, T]`` (or ``[T]``) token ids, left-padded for batches.
        attention_mask: ``[B, T]`` 1 for real tokens (None = no padding).
        window: the largest observation window of the methods to build (queries kept per layer).
        accumulated: also compute H2O's accumulated attention scores (needs every query; costs one
            blocked pass over the prompt per layer, as H2O itself does).
        surprisal: also compute every prompt token's negative log-likelihood
            (:func:`chunkkv.scoring.token_surprisal` on the final hidden states, in blocks: the
            output projection over the prompt, no ``[T, vocab]`` tensor kept).
    """
    input_ids, attention_mask = _check_prompt(input_ids, attention_mask)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ChunkKVError(f"window={window!r} must be an int >= 1 (queries to keep per layer)")
    attach(model)
    lengths = _row_lengths(attention_mask)
    width = input_ids.shape[1]
    cache = ChunkKVCache(model.config)
    if len(cache.pruned_layers) != len(cache.layers):
        raise UnsupportedModelError("capture_prefill supports models whose every layer is full attention; use compress()")
    capture = PrefillCapture(cache, input_ids, attention_mask, None, min(window, width), lengths, accumulated=accumulated)
    key_valid = attention_mask.bool() if any(n != width for n in lengths) else None
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    start = time.perf_counter()
    hook = None
    if surprisal:
        hook = model.get_decoder().register_forward_hook(_surprisal_hook(model, capture, input_ids, attention_mask))
    try:
        with compression_session(_Capture(capture, key_valid)):
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, cache=cache,
                        use_cache=True, logits_to_keep=1)
    finally:
        if hook is not None:
            hook.remove()
    capture.prefill_seconds = time.perf_counter() - start
    capture.next_logits = out.logits[:, -1, :]
    missing = [i for i in cache.pruned_layers if i not in capture.queries]
    if missing:
        raise UnsupportedModelError(f"layers {missing} did not go through chunkkv's attention during the capture")
    return capture


@torch.inference_mode()
def compress_from_capture(
    capture: PrefillCapture, method: Method | None = None, *, share_scores: bool = True
) -> CompressedContext:
    """The :class:`CompressedContext` ``compress(model, ids, mask, method)`` would return, built from
    a capture without running the model (the capture is left unchanged and can serve more methods).

    ``share_scores=False`` recomputes the raw window scores for this method alone, so
    ``stats.select_seconds`` is the method's own scoring + selection + gather time (H2O's
    accumulated scores always come from the capture).

    Raises :class:`ChunkKVError` when the capture lacks what ``method`` needs (a longer window, or
    H2O without ``accumulated=True``).
    """
    method = method or FullKV()
    check_window(method, capture.lengths)
    if method.uses_window_queries and method.window > capture.window:
        raise ChunkKVError(
            f"{method.name} scores with window={method.window} but the capture kept {capture.window} queries; "
            f"capture with window >= {method.window}")
    if method.needs_all_queries and not capture.accumulated:
        raise ChunkKVError(f"{method.name} needs every prompt query: capture with accumulated=True")
    cache = capture.cache.fork()
    width = capture.input_ids.shape[1]
    device = capture.input_ids.device
    lengths = torch.tensor(capture.lengths, device=device)
    pad = width - lengths
    key_valid = capture.attention_mask.bool() if any(n != width for n in capture.lengths) else None
    stats = CompressionStats(prompt_lengths=list(capture.lengths), prefill_seconds=capture.prefill_seconds)
    if not isinstance(method, FullKV):
        plan = plan_layers(method, capture.lengths, width, cache.pruned_layers, device)
        stats.kept.update(plan.kept)
        chosen: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        start = time.perf_counter()
        for idx in plan.counts:  # depth order: a leader comes before its followers
            leader = plan.leaders[idx]
            if leader == idx:
                full = capture.cache.layers[idx]
                inputs = LayerInputs(
                    queries=capture.queries[idx], keys=full.keys, scaling=capture.scaling[idx],
                    softcap=capture.softcap[idx], key_valid=key_valid, lengths=lengths, pad=pad,
                    kept=plan.counts[idx], slots=plan.slots[idx], input_ids=capture.input_ids,
                    memo=capture.memo[idx] if share_scores else
                    {k: v for k, v in capture.memo[idx].items() if k == ("accumulated",)},
                )
                index, valid = sel.finalize(method.select(inputs), pad)
                chosen[idx] = (index, valid if plan.fillers[idx] else None)
                stats.scored_layers.append(idx)
            cache.layers[idx].prune(*chosen[leader])  # the fork's own layer: the capture keeps its tensors
            if leader == idx and 0 < method.window <= min(plan.slots[idx], capture.queries[idx].shape[2]):
                # Seed the decoding window as compress() does (used only if a decode budget is set later).
                cache.layers[idx].recent_queries = capture.queries[idx][:, :, -method.window:]
        mark_wrapper_layers(cache)
        stats.select_seconds = time.perf_counter() - start
    return CompressedContext(cache, capture.input_ids, capture.attention_mask.clone(), capture.next_logits, method, stats)


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
    for i in cache.pruned_layers:
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
        target = cache.layers[i]
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


def capture_prefix(capture: PrefillCapture, n: int) -> PrefillCapture:
    """The capture of the first ``n`` prompt tokens, cut from a capture of the whole prompt.

    A causal model's keys, values and queries of a prefix do not depend on what follows, so this
    is what ``capture_prefill`` of ``input_ids[:, :n]`` would hold — how the question-agnostic
    setting (compress the context, then feed the question) is served from a query-aware capture.
    It keeps the queries of positions ``[n - w, n)`` with ``w = capture.window - (T - n)``, so
    capture with ``window >= (T - n) + method window``. Unpadded prompts only; no H2O scores;
    the surprisal (if captured) is the prefix's;
    ``next_logits`` is None (feed new tokens with :func:`chunkkv.extend` before decoding).
    """
    width = capture.input_ids.shape[1]
    if any(n_real != width for n_real in capture.lengths):
        raise ChunkKVError("capture_prefix needs an unpadded prompt")
    if not 0 < n < width:
        raise ChunkKVError(f"prefix length {n} must be in [1, {width - 1}]")
    window = capture.window - (width - n)
    if window < 1:
        raise ChunkKVError(f"the capture kept {capture.window} queries, none inside the first {n} tokens; "
                           f"capture with window > {width - n}")
    cache = capture.cache.fork()
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, :n], layer.values[:, :, :n]
        layer.logical_length = n
    return PrefillCapture(
        cache, capture.input_ids[:, :n], capture.attention_mask[:, :n], None, window, [n],
        queries={i: q[:, :, q.shape[2] - (width - n) - window: q.shape[2] - (width - n)] for i, q in capture.queries.items()},
        scaling=dict(capture.scaling), softcap=dict(capture.softcap), memo={i: {} for i in capture.memo},
        surprisal=None if capture.surprisal is None else first_token_surprisal(
            capture.surprisal[:, :n], capture.attention_mask[:, :n]),
        prefill_seconds=capture.prefill_seconds,
    )

