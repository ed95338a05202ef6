"""Window scores of the requests whose prefill ends in the current batch, summed over layers.

The engine packs every request of a batch into one row: queries ``[1, Hq, sum(q_i), d]`` and keys
``[1, Hkv, sum(k_i), d]`` (each request's cached keys followed by its new ones). The batch plan
(:class:`Slot`, host ints computed before the forward) says where each request sits, so for each
layer the scorer slices its window queries and its keys and calls
:func:`chunkkv.scoring.window_attention_scores`; scores are summed over layers, because the engine
has one block table per attention type: one kept set serves every layer. Only layers from
``first_layer`` up score (the deeper ones; see :class:`~chunkkv.serving.engine.CompressionSettings`).

A prefill the scheduler splits over several batches ends with a chunk that may be shorter than the
window: the last ``window`` queries of every earlier chunk are kept per layer (``[1, Hq, <=w, d]``)
and put in front of the final chunk's.

Per layer the work is one slice and one small attention per finishing request: no host sync, no
loop over tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..scoring import window_attention_scores


@dataclass(frozen=True)
class Slot:
    """Where one request sits in the packed batch, and what its chunk is."""

    request_id: str
    q_start: int
    q_len: int
    k_start: int
    k_len: int  # keys the request's queries see: its cached tokens plus this chunk
    final: bool  # this chunk ends the prompt: score it now
    partial: bool  # a non-final chunk of a split prefill: keep its last window queries


class WindowScorer:
    """Accumulates the window scores of finishing prefills over the layers of one forward pass."""

    def __init__(self, window: int, first_layer: int = 0) -> None:
        self.window = window
        self.first_layer = first_layer  # layers below it do not score (their split-prefill queries are not kept)
        self.slots: list[Slot] = []
        self._scores: dict[str, torch.Tensor] = {}
        self._query_tail: dict[str, dict[int, torch.Tensor]] = {}  # split prefills: layer -> last queries

    # --- one batch ------------------------------------------------------------------------------
    def begin(self, slots: list[Slot]) -> None:
        self.slots = [s for s in slots if s.final or s.partial]
        self._scores = {}

    def __call__(self, module, query: torch.Tensor, key: torch.Tensor, kwargs: dict) -> None:
        """The attention tap's observer: called once per layer with the packed query and key states."""
        layer = module.layer_idx
        if not self.slots or layer < self.first_layer:
            return
        scaling = kwargs.get("scaling")
        if scaling is None:
            scaling = getattr(module, "scaling", query.shape[-1] ** -0.5)
        softcap = kwargs.get("softcap")
        for slot in self.slots:
            queries = query[:, :, slot.q_start : slot.q_start + slot.q_len]
            tails = self._query_tail.get(slot.request_id)
            if tails is not None and layer in tails:
                queries = torch.cat([tails[layer], queries], dim=2)
            queries = queries[:, :, -self.window :]
            if slot.partial:
                self._query_tail.setdefault(slot.request_id, {})[layer] = queries.detach().clone()
                continue
            keys = key[:, :, slot.k_start : slot.k_start + slot.k_len]
            scores = window_attention_scores(queries, keys, scaling, softcap=softcap)  # [1, Hkv, T]
            acc = self._scores.get(slot.request_id)
            self._scores[slot.request_id] = scores if acc is None else acc + scores

    def end(self) -> dict[str, torch.Tensor]:
        """Scores ``[1, Hkv, T]`` (summed over layers) of every request whose prefill ended in this batch."""
        out = self._scores
        for slot in self.slots:
            if slot.final:
                self._query_tail.pop(slot.request_id, None)
        self.slots, self._scores = [], {}
        return out

    def forget(self, request_id: str) -> None:
        self._query_tail.pop(request_id, None)

    def pending(self) -> set[str]:
        """Requests with buffered queries (split prefills in progress)."""
        return set(self._query_tail)
