"""The one recipe: prefill once, run what the scorers need, select for one or many methods.

Every entry point (``compress``, ``generate``, the eval tasks, ``demo``, ``inspect``, the recall and
perplexity tasks, the sweep and the studies) compresses through here:

* :func:`compress` — one method. When its scorer is ``inline`` (the observation window, H2O's
  accumulated attention) the prompt's own forward prunes each layer right after its attention
  (:mod:`chunkkv.inline`: one-shot, or in chunks of ``prefill_chunk`` tokens with bounded memory).
  Other scorers need the whole prefill first (surprisal, scoring passes): the prompt is captured
  and compressed from the capture.
* :func:`prefill` + :func:`compress_from_capture` — several methods: one capture sized for all of
  them (:mod:`chunkkv.capture`), each method's cache built from it, equal to its own ``compress``.

Selection is the same call in every path: the method's ``select`` on a
:class:`~chunkkv.scorers.LayerInputs` at each reuse-leader layer, followers taking the leader's
indices, then :func:`chunkkv.selection.finalize` and :meth:`~chunkkv.cache.PrunedLayer.prune`.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable, Sequence

import torch

from . import selection as sel
from .cache import ChunkKVCache
from .capture import PrefillCapture, capture_prefill, gather_evidence
from .chunk_scoring import RunningScores, run_in_chunks
from .context import CompressedContext, CompressionStats, mark_wrapper_layers
from .errors import ChunkKVError, PromptError
from .inline import prefill_inline
from .methods import FullKV, Method
from .plan import plan_layers
from .prompt import as_method, check_positions, check_prompt, check_window, row_lengths
from .prompting import instructions
from .scorers import LayerInputs

__all__ = ["compress", "compress_from_capture", "prefill"]


def _instructions(tokenizer, chat_template: bool | None, scoring_prompt: torch.Tensor | None) -> Callable | None:
    """``text -> ids`` for scoring-pass instructions: fixed ids when given, else the tokenizer's."""
    if scoring_prompt is not None:
        ids = torch.as_tensor(scoring_prompt).reshape(-1)
        return lambda _text: ids
    if tokenizer is not None:
        return instructions(tokenizer, chat_template)
    return None


@torch.inference_mode()
def prefill(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    methods: Sequence[Method | None] = (),
    *,
    tokenizer=None,
    chat_template: bool | None = None,
    scoring_prompt: torch.Tensor | None = None,
    window: int | None = None,
) -> PrefillCapture:
    """Prefill ``input_ids`` once, capturing what every one of ``methods`` needs (the largest window,
    H2O's accumulated scores, surprisal; scoring passes run on demand in
    :func:`compress_from_capture`). ``tokenizer`` / ``chat_template`` / ``scoring_prompt``: see
    :func:`compress`. ``window``: keep at least this many queries per layer (default: the methods')."""
    methods = [as_method(m) for m in methods]
    windows = [m.window for m in methods if m.uses_window_queries]
    return capture_prefill(
        model, input_ids, attention_mask, window=max(windows + [window or 1]),
        accumulated=any(m.needs_all_queries for m in methods),
        surprisal=any(m.scorer is not None and m.scorer.needs_surprisal for m in methods),
        instructions=_instructions(tokenizer, chat_template, scoring_prompt),
    )


@torch.inference_mode()
def compress_from_capture(
    capture: PrefillCapture, method: Method | None = None, *, share_scores: bool = True, scoring_block: int = 512,
) -> CompressedContext:
    """The :class:`CompressedContext` ``compress(model, ids, mask, method)`` would return, built from a
    capture (the capture is left unchanged and can serve more methods). Scoring passes the method's
    scorer needs run here, once per capture.

    ``share_scores=False`` recomputes the raw window scores for this method alone, so
    ``stats.select_seconds`` is the method's own scoring + selection + gather time (H2O's
    accumulated scores always come from the capture).

    Raises :class:`ChunkKVError` when the capture lacks what ``method`` needs (a longer window, H2O
    without ``accumulated=True``, surprisal it did not compute).
    """
    method = as_method(method)
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
    key_valid = capture.key_valid
    stats = CompressionStats(prompt_lengths=list(capture.lengths), prefill_seconds=capture.prefill_seconds)
    if not isinstance(method, FullKV):
        plan = plan_layers(method, capture.lengths, width, cache.pruned_layers, device)
        leaders = [i for i in plan.counts if plan.is_leader(i)]
        if leaders and not method.inline:
            gather_evidence(capture, method.scorer, leaders, block=scoring_block)
        stats.kept.update(plan.kept)
        chosen: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        start = time.perf_counter()
        for idx in plan.counts:  # depth order: a leader comes before its followers
            leader = plan.leaders[idx]
            if leader == idx:
                memo = capture.memo[idx] if share_scores else {
                    k: v for k, v in capture.memo[idx].items() if k == ("accumulated",)}
                inputs = LayerInputs(
                    queries=capture.queries[idx], keys=capture.cache.layers[idx].keys, scaling=capture.scaling[idx],
                    softcap=capture.softcap[idx], key_valid=key_valid, lengths=lengths, pad=pad,
                    kept=plan.counts[idx], slots=plan.slots[idx], layer=idx, memo=memo, evidence=capture.evidence,
                    input_ids=capture.input_ids,
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
        stats.scoring_seconds = capture.scoring_seconds(method.scorer)
    return CompressedContext(cache, capture.input_ids, capture.attention_mask.clone(), capture.next_logits, method,
                             stats, capture.model)


@torch.inference_mode()
def compress(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    method: Method | str | None = None,
    *,
    measure: bool = False,
    prefill_chunk: int | None = None,
    lookahead: bool = True,
    reserve: float = 1.0,
    tokenizer=None,
    chat_template: bool | None = None,
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
            it holds plus the chunk, so no layer ever holds more than its final budget (times
            ``reserve``) + ``C`` tokens. The final kept count is the one-shot count for the
            whole prompt. None or ``C >= T``: one pass. Window scorers score each chunk with the look-ahead
            (below); surprisal, shallow reconstruction and hybrid are kept up to date chunk by chunk
            (:mod:`chunkkv.chunk_scoring`); the other scorers need the full cache and are refused.
        lookahead: in chunks, score each re-selection of a window scorer (SnapKV, PyramidKV, ChunkKV)
            with the prompt's last ``window`` tokens fed early (the question, when it ends the prompt),
            not with the chunk's own last queries (:mod:`chunkkv.inline`).
        reserve: in chunks, the re-selections before the last chunk keep up to ``reserve`` x the
            budget (a token must rank that high to survive an early cut); the last one keeps the
            budget. Peak K/V grows to ``reserve`` x budget + ``C`` tokens a layer.
        tokenizer: tokenizes the instruction of a scorer that runs a scoring pass
            (reconstruction, probe, hybrid); ``chat_template``: whether the prompt was rendered with
            the tokenizer's chat template (None: when it has one), so the instruction is asked the same
            way. ``scoring_prompt``: the instruction's token ids ``[n]`` instead (an empty tensor: none).
        scoring_block: scoring-pass tokens per forward (memory, not results).

    Each row chooses its own tokens. Rows shorter than their budget keep every token.
    """
    method = as_method(method)
    input_ids, attention_mask = check_prompt(input_ids, attention_mask)
    lengths_host = row_lengths(attention_mask)
    if prefill_chunk is not None and (
        isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk < 1
    ):
        raise PromptError(f"prefill_chunk={prefill_chunk!r} must be a positive int (tokens per prefill chunk) or None")
    if isinstance(reserve, bool) or not isinstance(reserve, (int, float)) or not reserve >= 1:
        raise PromptError(f"reserve={reserve!r} must be a number >= 1 (early re-selections of a chunked prefill "
                          "keep up to reserve x the budget; 1 = the budget)")
    check_window(method, lengths_host)
    check_positions(model.config, max(lengths_host))
    width = input_ids.shape[1]
    if not method.inline and prefill_chunk is not None and prefill_chunk < width:
        # Question-agnostic scores kept chunk by chunk (the full cache is never held); the context's
        # method says which scoring ran ("hybrid" runs as "hybrid_chunked").
        method = run_in_chunks(method)
        running = RunningScores(model, method.scorer, input_ids, attention_mask,
                                _instructions(tokenizer, chat_template, scoring_prompt),
                                ChunkKVCache(model.config, prompt_length=width).pruned_layers,
                                min(scoring_block, max(64, prefill_chunk // 4)))  # a bounded pass: blocks within a chunk
        return prefill_inline(model, input_ids, attention_mask, method, lengths_host, prefill_chunk=prefill_chunk,
                              measure=measure, running=running)
    if not method.inline:
        # The scores need the whole prefill first (surprisal, scoring passes on the full cache).
        capture = prefill(model, input_ids, attention_mask, [method], tokenizer=tokenizer,
                          chat_template=chat_template, scoring_prompt=scoring_prompt)
        ctx = compress_from_capture(capture, method, scoring_block=scoring_block)
        ctx.source = weakref.ref(model)
        return ctx
    return prefill_inline(model, input_ids, attention_mask, method, lengths_host, prefill_chunk=prefill_chunk,
                          lookahead=lookahead, reserve=reserve, measure=measure)
