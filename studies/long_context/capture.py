"""One prefill of a long document, in chunks, that serves every question and every method.

:func:`chunkkv.capture.capture_prefill` runs the prompt in one forward. On Gemma 3 at 16k–32k
tokens that is slow on a CPU: sdpa computes every sliding-window layer (15 of 18) over the whole
prompt and masks it, so all 18 layers cost ``T^2``. Run in chunks of ``C`` tokens, the stock
sliding layers hold their last 511 tokens and attend over ``C + 511`` keys, and only the 3
full-attention layers stay quadratic; the cache built is the same (the chunked full cache's logits
equal the one-shot ones to ~1e-5 on this model, and ``tests/test_long_context.py`` checks that the
methods select the same tokens from either capture).

:func:`capture_document` prefills a document this way and returns the
:class:`~chunkkv.capture.PrefillCapture` ``capture_prefill`` would return for it: the full cache,
the last ``window`` queries of every compressed layer, optionally H2O's accumulated scores (added
chunk by chunk: each chunk's queries over every key so far, which is the same sum) and each token's
surprisal (from the final hidden states of every chunk). The question-agnostic methods compress
from it directly (:func:`chunkkv.pipeline.compress_from_capture`).

:func:`extend_capture` feeds one question after it on a fork of the cache and returns the capture of
``document + question``: what the query-aware methods compress from. A causal model's keys, values
and queries of the document do not depend on what follows, so this is the capture of the whole
prompt without prefilling the document again; five questions of a document cost one prefill.
"""

from __future__ import annotations

import time
import weakref

import torch

from chunkkv.attention import attach, compression_session
from chunkkv.cache import ChunkKVCache
from chunkkv.capture import PrefillCapture
from chunkkv.plan import chunk_bounds
from chunkkv.scorers import Evidence
from chunkkv.scoring import accumulated_attention_scores, token_surprisal

__all__ = ["capture_document", "extend_capture"]


class _Recorder:
    """The attention wrapper's session: for each compressed layer keep the last ``window`` queries
    seen so far and add the chunk's queries' attention to the accumulated scores."""

    def __init__(self, capture: PrefillCapture) -> None:
        self.capture = capture

    def on_attention(self, module, layer, query, key, kwargs) -> None:
        cap = self.capture
        idx = module.layer_idx
        if layer is not cap.cache.layers[idx]:
            return
        scaling = kwargs.get("scaling") or getattr(module, "scaling", key.shape[-1] ** -0.5)
        cap.scaling[idx] = scaling
        cap.softcap[idx] = kwargs.get("softcap")
        recent = query[:, :, -cap.window:]
        held = cap.queries.get(idx)
        if recent.shape[2] < cap.window and held is not None:
            recent = torch.cat([held, recent], dim=2)[:, :, -cap.window:]
        cap.queries[idx] = recent.contiguous()
        memo = cap.memo.setdefault(idx, {})
        if cap.accumulated:
            scores = accumulated_attention_scores(query, key, scaling, None, cap.softcap[idx])  # [B, Hkv, seen]
            before = memo.get(("accumulated",))
            if before is not None:
                scores[..., : before.shape[-1]] += before
            memo[("accumulated",)] = scores


def _forward(model, capture: PrefillCapture, ids: torch.Tensor, start: int, chunk: int | None,
             hidden: list[torch.Tensor] | None) -> torch.Tensor:
    """Feed ``ids`` (positions ``start`` ...) in chunks into the capture's cache; returns the last logits."""
    width = ids.shape[1]
    hook = None
    if hidden is not None:
        hook = model.get_decoder().register_forward_hook(
            lambda _m, _a, out: hidden.append((out[0] if isinstance(out, tuple) else out.last_hidden_state).detach()))
    bounds = chunk_bounds(width, chunk)
    try:
        with compression_session(_Recorder(capture)):
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                out = model(input_ids=ids[:, lo:hi], attention_mask=torch.ones(1, start + hi, dtype=torch.long),
                            position_ids=torch.arange(start + lo, start + hi)[None], cache=capture.cache,
                            use_cache=True, logits_to_keep=1)
    finally:
        if hook is not None:
            hook.remove()
    return out.logits[:, -1, :]


@torch.inference_mode()
def capture_document(model, context_ids: list[int], *, chunk: int | None = 1024, window: int = 64,
                     accumulated: bool = False, surprisal: bool = False, instructions=None) -> PrefillCapture:
    """The capture of ``context_ids`` (one unpadded row), prefilled ``chunk`` tokens at a time (None:
    one forward). ``window``: queries kept per compressed layer (at least the methods' window);
    ``accumulated``: H2O's scores; ``surprisal``: every token's NLL (the hybrid default needs it);
    ``instructions``: ``text -> ids`` for scoring passes (:func:`chunkkv.prompting.instructions`)."""
    attach(model)
    ids = torch.tensor([context_ids])
    width = ids.shape[1]
    cache = ChunkKVCache(model.config, prompt_length=width)
    capture = PrefillCapture(cache, ids, torch.ones_like(ids), None, min(window, width), [width],
                             accumulated=accumulated, instructions=instructions, model=weakref.ref(model))
    hidden: list[torch.Tensor] | None = [] if surprisal else None
    start = time.perf_counter()
    capture.next_logits = _forward(model, capture, ids, 0, chunk, hidden)
    capture.prefill_seconds = time.perf_counter() - start
    if hidden is not None:
        t0 = time.perf_counter()
        softcap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)
        capture.evidence.surprisal = token_surprisal(torch.cat(hidden, dim=1), model.get_output_embeddings(), ids,
                                                     capture.attention_mask, softcap)
        capture.surprisal_seconds = time.perf_counter() - t0
    return capture


@torch.inference_mode()
def extend_capture(model, capture: PrefillCapture, question_ids: list[int]) -> PrefillCapture:
    """The capture of ``capture``'s prompt followed by ``question_ids``: the question is fed on a fork
    of the cache (``capture`` is left as it is and can serve more questions). Its queries are the
    last ``capture.window`` of the whole prompt, its H2O scores (if captured) those of every query;
    it has no surprisal and no scoring-pass evidence (query-aware methods need neither)."""
    n = capture.input_ids.shape[1]
    q = torch.tensor([question_ids])
    ids = torch.cat([capture.input_ids, q], dim=1)
    out = PrefillCapture(capture.cache.fork(), ids, torch.ones_like(ids), None, capture.window, [ids.shape[1]],
                         queries=dict(capture.queries), scaling=dict(capture.scaling), softcap=dict(capture.softcap),
                         memo={i: {k: v for k, v in m.items() if k == ("accumulated",)} for i, m in capture.memo.items()},
                         accumulated=capture.accumulated, evidence=Evidence(), instructions=capture.instructions,
                         model=weakref.ref(model))
    start = time.perf_counter()
    out.next_logits = _forward(model, out, q, n, None, None)
    out.prefill_seconds = time.perf_counter() - start
    return out
