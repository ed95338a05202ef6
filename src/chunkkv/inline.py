"""Compression inside the prompt's own forward: each layer pruned right after its attention.

One-shot (one chunk): each layer attends over its whole prompt (the output is exact), then keeps the
selected tokens, so peak memory holds one layer's full prompt K/V, not every layer's.

In chunks (``prefill_chunk=C``): the prompt goes through ``C`` tokens at a time and every prunable
layer re-selects over what it holds plus the chunk (:mod:`chunkkv.recompress`), so no layer holds
more than its final budget (times ``reserve``) + ``C`` tokens. What scores each re-selection:

* **question-agnostic scores kept chunk by chunk** (surprisal, shallow reconstruction, hybrid:
  :mod:`chunkkv.chunk_scoring`): after each chunk's forward and its reconstruction pass, every
  layer re-selects over what it holds with the running per-token scores;

* **look-ahead** (``lookahead=True``, window scorers: SnapKV, PyramidKV, ChunkKV): the prompt's last
  ``window`` tokens — the question, when it ends the prompt — are fed early, after each chunk, on a
  fork of what the layers hold, at their final positions; their queries score every layer as they
  will at the end, and their keys are thrown away. The chunk's layers are pruned after that pass,
  not during the chunk's forward (every layer then holds budget + ``C`` at once, as the bound
  allows). So an early chunk is judged by the question, not by what the document finds salient.
  A kept slot carries the best look-ahead score it has had into every later re-selection, the last
  one included (a running max): the window's queries drift as the cache is cut, and a token the
  question attended to strongly early on should not lose its place to a weaker score later.
  ``reserve`` > 1 lets the re-selections before the last keep more than the budget;
* **the chunk's own last queries** (``lookahead=False``, and H2O's accumulated attention, and
  StreamingLLM, which needs no scores): each layer re-selects right after the chunk's attention.

The last chunk is always scored by its own last ``window`` queries: they are the prompt's last.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch

from .attention import attach, attention_modules, compression_session
from .cache import ChunkKVCache, PrunedLayer
from .capture import now
from .chunk_scoring import RunningScores
from .context import CompressedContext, CompressionStats, mark_wrapper_layers
from .errors import UnsupportedModelError
from .methods import FullKV, Method
from .plan import LayerPlan, chunk_bounds, plan_prefill
from .recompress import check_bounded_method, reselect
from .scorers import Evidence, WindowScorer
from .scoring import Workspace, window_attention_scores

__all__ = ["prefill_inline"]


def _scaling(module, key, kwargs) -> float:
    return kwargs.get("scaling") or getattr(module, "scaling", key.shape[-1] ** -0.5)


@dataclass
class _Session:
    """The attention wrapper's session during a compressing prefill: prune after each attention,
    unless the chunk is ``deferred`` (its layers are pruned after the look-ahead pass)."""

    method: Method
    cache: ChunkKVCache
    measure: bool
    stats: CompressionStats
    plan: LayerPlan | None = None
    deferred: bool = False
    # The prompt's token ids, for methods that look at tokens (boundary-aware ChunkKV): the held
    # slots' ids are read from it by their prompt positions.
    input_ids: torch.Tensor | None = None
    pads: torch.Tensor | None = None  # [B] each row's left padding in the prompt
    chosen: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict)
    # With the look-ahead: the best score each slot a leader layer kept has had so far, carried into
    # its next re-selection (the window's queries drift as the cache is cut; a token the question
    # once attended to strongly is not dropped for a weaker score under a later, cut context).
    carried: dict[int, torch.Tensor] = field(default_factory=dict)
    # Scratch buffers every layer's scoring reuses (the window logits): no fresh memory per layer.
    workspace: Workspace = field(default_factory=Workspace)

    def on_attention(self, module, layer: PrunedLayer, query, key, kwargs) -> None:
        idx = module.layer_idx
        plan = self.plan
        if plan is None or idx not in plan.counts or layer is not self.cache.layers[idx]:
            return
        if plan.last and plan.is_leader(idx) and 0 < self.method.window <= min(plan.slots[idx], query.shape[2]):
            # Seed the decoding window (used only if a decode budget is set later).
            # A copy: a view would keep the whole prompt's query states alive with the context.
            layer.recent_queries = query[:, :, -self.method.window :].clone()
        if self.deferred:
            return
        start = now(key.device) if self.measure else 0.0
        if plan.is_leader(idx):
            scaling, softcap, memo = _scaling(module, key, kwargs), kwargs.get("softcap"), None
            prev = self.carried.get(idx)
            if prev is not None:
                win = min(self.method.window, query.shape[2])
                scores = window_attention_scores(query[:, :, -win:], key, scaling, plan.key_valid[idx], softcap,
                                                 self.workspace)
                memo = {("window", win): _with_carried(scores, prev)}
            self.select(idx, layer, query, key, scaling, softcap, memo=memo)
        layer.prune(*self.chosen[plan.leaders[idx]])
        if self.measure:
            self.stats.select_seconds += now(key.device) - start

    def select(self, idx: int, layer: PrunedLayer, query, key, scaling: float, softcap, memo: dict | None = None,
               keep_recent: int | None = None, evidence: Evidence | None = None):
        plan = self.plan
        # what the layer holds, by prompt position: the token ids (for methods that read them) and (once
        # something was dropped) the row-relative positions that keep ChunkKV's chunks on the prompt's grid
        slots = layer.slot_positions()[:, 0, :]
        ids = None
        if self.input_ids is not None and self.method.needs_token_ids:
            ids = self.input_ids.gather(1, slots)
        positions = None if layer.kept_index is None else slots - self.pads[:, None]
        index, valid = reselect(
            self.method, query, key, scaling, softcap, plan.real[idx], plan.counts[idx], plan.slots[idx],
            plan.key_valid[idx], input_ids=ids, layer=idx, memo=memo, keep_recent=keep_recent, evidence=evidence,
            positions=positions, workspace=self.workspace,
        )
        self.chosen[idx] = (index, valid if plan.fillers[idx] else None)
        if idx not in self.stats.scored_layers:
            self.stats.scored_layers.append(idx)


class _Lookahead:
    """The session of a look-ahead pass: the window's queries score what each leader layer holds
    (window attention over the held slots and the window itself, as at the end of the prompt)."""

    def __init__(self, fork: ChunkKVCache, source: ChunkKVCache, plan: LayerPlan,
                 workspace: Workspace | None = None) -> None:
        self.fork, self.source = fork, source
        self.plan = plan
        self.workspace = workspace
        self.found: dict[int, tuple[torch.Tensor, torch.Tensor, float, float | None]] = {}

    def on_attention(self, module, layer: PrunedLayer, query, key, kwargs) -> None:
        idx = module.layer_idx
        if layer is not self.fork.layers[idx]:
            return
        if self.plan.is_leader(idx):
            held = key.shape[2] - query.shape[2]
            valid = self.plan.key_valid[idx]
            key_valid = None if valid is None else torch.cat([valid, valid.new_ones(valid.shape[0], query.shape[2])], 1)
            scaling, softcap = _scaling(module, key, kwargs), kwargs.get("softcap")
            scores = window_attention_scores(query, key, scaling, key_valid, softcap, self.workspace)[..., :held]
            self.found[idx] = (scores, query, scaling, softcap)
        # The pass is one forward whose keys are thrown away: once a layer has attended, its grown
        # copy (held + window) is dropped, so the pass adds one layer's K/V to the peak, not all of them.
        self.fork.restore_layer(idx, self.source)


def _with_carried(scores: torch.Tensor, carried: torch.Tensor) -> torch.Tensor:
    """``scores [B, H, S]`` with its first ``carried.shape[-1]`` slots (those held before the chunk)
    raised to the best score they carried."""
    held = carried.shape[-1]
    return torch.cat([torch.maximum(scores[..., :held], carried), scores[..., held:]], dim=-1)


def _uses_lookahead(method: Method) -> bool:
    return isinstance(method.scorer, WindowScorer)


@torch.inference_mode()
def prefill_inline(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    method: Method,
    lengths: list[int],
    *,
    prefill_chunk: int | None = None,
    lookahead: bool = True,
    reserve: float = 1.0,
    measure: bool = False,
    running: RunningScores | None = None,
) -> CompressedContext:
    """Prefill checked ``input_ids`` with ``method`` (see the module docstring): an inline scorer,
    or ``running`` question-agnostic scores kept chunk by chunk."""
    attach(model)
    width = input_ids.shape[1]
    bounds = chunk_bounds(width, prefill_chunk)
    if len(bounds) > 2 and not isinstance(method, FullKV):
        check_bounded_method(method, "prefill_chunk")
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
    stats = CompressionStats(prompt_lengths=lengths)
    session = plans = None
    if not isinstance(method, FullKV):
        plans = plan_prefill(method, lengths, width, pruned, device, bounds, reserve=reserve)
        session = _Session(method=method, cache=cache, measure=measure, stats=stats, input_ids=input_ids,
                           pads=width - torch.tensor(lengths, device=device))
        final = method.kept_per_layer(lengths, len(pruned))
        touched = {layer for plan in plans for layer in plan.counts}
        stats.kept = {layer: list(final[pos]) for pos, layer in enumerate(pruned) if layer in touched}
    ahead = session is not None and lookahead and len(bounds) > 2 and _uses_lookahead(method)

    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    start = now(device)
    with compression_session(session) if session is not None else contextlib.nullcontext(), \
            running.hook() if running is not None else contextlib.nullcontext():
        for k in range(len(bounds) - 1):
            lo, hi = bounds[k], bounds[k + 1]
            planned = session is not None and bool(plans[k].counts)
            if session is not None:
                session.plan = plans[k]
                session.deferred = planned and (running is not None or (ahead and not plans[k].last))
            if running is not None:
                running.expect(lo, hi)
            out = model(
                input_ids=input_ids[:, lo:hi],
                attention_mask=attention_mask[:, :hi],
                position_ids=position_ids[:, lo:hi],
                cache=cache,
                use_cache=True,
                logits_to_keep=1,
            )
            if running is not None:
                running.after_chunk(cache, lo, hi, position_ids)  # every chunk's tokens get their scores
                if planned:
                    _select_running(session, running, hi)
            elif planned and session.deferred:
                _look_ahead(model, session, input_ids, attention_mask, position_ids, hi)
    stats.prefill_seconds = now(device) - start
    if running is not None:
        stats.prefill_seconds -= running.seconds  # the scoring, counted apart as in one-shot
        stats.scoring_seconds = running.seconds
    stats.scored_layers.sort()
    mark_wrapper_layers(cache)
    return CompressedContext(
        cache, input_ids, attention_mask, out.logits[:, -1, :], method, stats, weakref.ref(model)
    )


def _select_running(session: _Session, running: RunningScores, seen: int) -> None:
    """Prune every planned layer with the running question-agnostic scores of what it holds."""
    plan, cache = session.plan, session.cache
    start = now(cache.layers[next(iter(plan.counts))].keys.device) if session.measure else 0.0
    for idx in plan.counts:  # depth order: a leader comes before its followers
        layer = cache.layers[idx]
        if plan.is_leader(idx):
            # before the last chunk the context's end is not its end yet: nothing is kept by force
            session.select(idx, layer, None, layer.keys, 1.0, None, evidence=running.evidence(layer, seen),
                           keep_recent=None if plan.last else 0)
        layer.prune(*session.chosen[plan.leaders[idx]])
    if session.measure:
        session.stats.select_seconds += now(layer.keys.device) - start


def _look_ahead(model, session: _Session, input_ids, attention_mask, position_ids, seen: int) -> None:
    """Feed the prompt's last ``window`` tokens on a fork of what the layers hold after ``seen``
    tokens, then prune every planned layer with the scores their queries give."""
    plan, cache = session.plan, session.cache
    win = session.method.window
    fork = cache.fork()
    scoring = _Lookahead(fork, cache, plan, session.workspace)
    mask = torch.cat([attention_mask[:, :seen], attention_mask[:, -win:]], dim=1)
    with compression_session(scoring):
        model(input_ids=input_ids[:, -win:], attention_mask=mask, position_ids=position_ids[:, -win:], cache=fork,
              use_cache=True, logits_to_keep=1)
    start = now(input_ids.device) if session.measure else 0.0
    for idx in plan.counts:  # depth order: a leader comes before its followers
        layer = cache.layers[idx]
        if plan.is_leader(idx):
            scores, query, scaling, softcap = scoring.found[idx]
            prev = session.carried.get(idx)
            if prev is not None:
                prev = _with_carried(torch.zeros_like(scores), prev)  # zeros for the chunk's new slots
                scores = torch.maximum(scores, prev)
            # the window is not held yet: the whole budget goes to what it scores, nothing is kept by force
            session.select(idx, layer, query, layer.keys, scaling, softcap, memo={("window", query.shape[2]): scores},
                           keep_recent=0)
            # carried on only for rows this pass cut: a row of a batch that keeps everything here
            # would have had no look-ahead run alone (zeros: no score yet)
            cut = (plan.counts[idx] < plan.real[idx])[:, None, None]
            carry = torch.where(cut, scores, prev if prev is not None else torch.zeros_like(scores))
            index = session.chosen[idx][0]
            session.carried[idx] = carry.gather(-1, index.expand(-1, carry.shape[1], -1))
        layer.prune(*session.chosen[plan.leaders[idx]])
    if session.measure:
        session.stats.select_seconds += now(input_ids.device) - start
