"""Re-selecting what a layer holds: the step behind chunked prefill and decoding under a budget.

A pruned layer stores, per row, some *filler* slots (masked) followed by its real slots in
position order. That is exactly the layout of a left-padded prompt, so the method's own
``select`` (and the pure functions of :mod:`chunkkv.selection`) can choose among the held slots
with ``lengths`` = real slots and ``pad`` = filler slots: picks come back row-relative, and
:func:`chunkkv.selection.finalize` turns them into sorted slot indices for
:meth:`chunkkv.cache.PrunedLayer.prune`, which also carries each slot's original position.

* **Chunked prefill** (``compress(..., prefill_chunk=C)``): after each chunk's attention every
  prunable layer re-selects over ``kept + chunk``, scored by the chunk's queries.
* **Decoding with a budget** (:class:`DecodeBudget`, ``decode_budget=N, compress_every=K``): a
  layer that reaches ``N + K`` stored tokens re-selects ``N``, scored by its last ``window``
  queries (buffered in :attr:`PrunedLayer.recent_queries` while the budget is active).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import selection as sel
from .errors import BudgetError, ChunkKVError
from .methods import FullKV, Method, StreamingLLM
from .scorers import Evidence, LayerInputs
from .scoring import Workspace


def reselect(
    method: Method,
    queries: torch.Tensor | None,
    keys: torch.Tensor,
    scaling: float,
    softcap: float | None,
    real: torch.Tensor,
    kept: torch.Tensor,
    slots: int,
    key_valid: torch.Tensor | None,
    input_ids: torch.Tensor | None = None,
    layer: int = 0,
    memo: dict | None = None,
    keep_recent: int | None = None,
    evidence: Evidence | None = None,
    positions: torch.Tensor | None = None,
    workspace: Workspace | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose ``kept[b]`` of the held slots of one layer with ``method``'s own scoring.

    Args:
        queries: ``[B, Hq, q, d]`` the queries of the last ``q`` held slots (a chunk, the recent
            decoding window, or the whole prompt); None for methods that need none (StreamingLLM).
        keys: ``[B, Hkv, S, d]`` the held keys (fillers first in each row, then real slots).
        real: ``[B]`` real slots per row (the last ``real[b]`` slots of the row).
        kept: ``[B]`` slots to keep per row (``<= real``); ``slots``: ``max(kept)`` or more (host int).
        key_valid: ``[B, S]`` False at filler slots, or None when every slot is real.
        input_ids: ``[B, S]`` the token id of every held slot, when the slots are the prompt (one-shot
            prefill); None otherwise (methods that need tokens then refuse).
        layer: the model layer index (for scorers with per-layer evidence).
        memo: raw scores already computed for these slots (``LayerInputs.memo``), e.g. a look-ahead's.
        keep_recent: most recent slots always kept (None: the method's window).
        evidence: scores of the held slots computed outside the forward (a question-agnostic chunked prefill).
        positions: ``[B, S]`` each held slot's row-relative prompt position (ChunkKV cuts the prompt's
            chunk grid by them); None: the slots are the prompt.
        workspace: scratch buffers reused across the layers of one compression (:class:`chunkkv.scoring.Workspace`).

    Returns:
        ``(index, valid)`` as :func:`chunkkv.selection.finalize` gives them: ``index [B, 1 or Hkv, slots]``
        sorted slot indices, ``valid [B, slots]`` False at fillers.
    """
    pad = keys.shape[2] - real
    inputs = LayerInputs(
        queries=queries, keys=keys, scaling=scaling, softcap=softcap, key_valid=key_valid,
        lengths=real, pad=pad, kept=kept, slots=slots, layer=layer, memo=memo, input_ids=input_ids,
        keep_recent=keep_recent, evidence=evidence, positions=positions, workspace=workspace,
    )
    return sel.finalize(method.select(inputs), pad)


def check_bounded_method(method: Method | None, what: str) -> Method:
    """The method must choose tokens by itself with an exact budget to re-select while running."""
    if method is None or isinstance(method, FullKV):
        raise ChunkKVError(
            f"{what} needs a method that selects tokens (chunkkv, snapkv, pyramidkv, h2o, streamingllm), not 'full'; "
            "to keep the whole prompt and bound only the decoding, use e.g. ChunkKV(keep_fraction=1.0)"
        )
    if not method.exact_budget:
        raise ChunkKVError(
            f"{what} cannot be used with {method.name}: its chunks are cut over the whole prompt at once "
            "(kvpress semantics), so it cannot re-select a held cache; use 'chunkkv' or 'snapkv'"
        )
    return method


def _int_at_least(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BudgetError(f"{name}={value!r} must be an int >= {minimum}")
    return value


@dataclass
class DecodeBudget:
    """Bound every full-attention layer of a cache while it grows (decoding, teacher forcing).

    When a layer has ``keep + every`` tokens stored (after a forward appended to it, and after its
    attention), it keeps ``keep`` of them chosen by ``method`` over everything it holds: scored by
    its last ``window`` queries, the most recent ``window`` tokens always kept; ChunkKV keeps whole
    chunks (cut from the row's first held slot) and reuse followers take their leader's choice;
    SnapKV / PyramidKV / H2O choose per KV head (PyramidKV re-selects like SnapKV, with the same
    ``keep`` on every layer; H2O's score is the attention of the last ``window`` queries, not a
    running sum); StreamingLLM keeps its sinks and the most recent tokens. A layer therefore never
    stores more than ``keep + every`` tokens between forwards of one token (a forward of ``m`` tokens
    holds up to ``keep + every + m - 1`` during its attention), whatever the output length.
    Positions stay the original ones; each row keeps its own tokens.

    Set it with :meth:`chunkkv.ChunkKVCache.set_decode_budget` (or ``decode_budget=`` of
    :func:`chunkkv.continue_from` / :func:`chunkkv.generate`); it lives on the cache's layers, so
    stock ``model.generate(..., cache=cache)`` follows it on an attached model.
    """

    method: Method
    keep: int
    every: int
    leaders: dict[int, int]
    window: int
    # Host-side count of re-selections done by leader layers (for tests and reports).
    reselections: int = 0
    chosen: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = field(default_factory=dict, repr=False)

    @classmethod
    def build(cls, method: Method, keep: int, every: int, layers: list[int]) -> DecodeBudget:
        """Validate and make the policy for the prunable ``layers`` of a cache."""
        method = check_bounded_method(method, "decode_budget")
        keep = _int_at_least(keep, "decode_budget", 1)
        every = _int_at_least(every, "compress_every", 1)
        scores = not isinstance(method, StreamingLLM)  # StreamingLLM needs no queries
        if scores and keep < method.window:
            raise BudgetError(
                f"decode_budget={keep} is smaller than {method.name}'s observation window ({method.window}): "
                "the recent window is always kept, so give a budget of at least the window or lower `window`"
            )
        return cls(method, keep, every, sel.reuse_leaders(layers, method.reuse_depth), method.window if scores else 0)

    @property
    def limit(self) -> int:
        """Stored tokens at which a layer re-selects (``keep + every``)."""
        return self.keep + self.every

    def after_attention(self, module, layer, query: torch.Tensor, kwargs) -> None:
        """Called by the attention wrapper after a layer attended over its updated cache."""
        idx = module.layer_idx
        leader = self.leaders.get(idx, idx)
        if leader == idx and self.window > 0:
            recent = query if layer.recent_queries is None else torch.cat([layer.recent_queries, query], dim=2)
            layer.recent_queries = recent[:, :, -self.window :].clone()  # never pin a long forward's queries
        if layer.stored_length < self.limit:
            return
        if leader == idx:
            keys = layer.keys
            valid = layer.valid
            real = valid.sum(-1) if valid is not None else torch.full(
                (keys.shape[0],), keys.shape[2], device=keys.device, dtype=torch.long
            )
            index, new_valid = reselect(
                self.method, layer.recent_queries, keys,
                kwargs.get("scaling") or getattr(module, "scaling", keys.shape[-1] ** -0.5), kwargs.get("softcap"),
                real, real.clamp(max=self.keep), self.keep, valid, layer=idx,
            )
            # Without fillers before, every row holds >= keep + every real slots: none after either.
            self.chosen[idx] = (index, new_valid if valid is not None else None)
            self.reselections += 1
        layer.prune(*self.chosen[leader])
