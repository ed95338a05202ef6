"""What a method keeps on each layer of one request, decided on the host before the forward runs.

One planner serves a one-shot prefill and a chunked one: :func:`plan_prefill` gives one
:class:`LayerPlan` per forward chunk (a one-shot prefill is a single chunk, :func:`plan_layers`).
The final kept count is computed once from each row's whole prompt (``keep_fraction`` is a share of
the whole prompt), and a chunk keeps ``min(final, real tokens seen)``, so a chunked cache ends with
exactly the one-shot budget. Everything here is host-side integer arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import selection as sel
from .methods import Method


@dataclass
class LayerPlan:
    """What every pruned layer does after one forward chunk.

    Attributes:
        counts: ``{layer: [B] kept tokens}`` for every layer that drops something after the chunk.
        slots: ``{layer: max kept}`` (host int, the stored length after pruning).
        fillers: ``{layer: True}`` when some row keeps fewer than ``slots`` (filler slots needed).
        leaders: ``{layer: leader layer}`` the layer-wise reuse schedule over the planned layers.
        kept: ``{layer: [kept per row]}`` host ints.
        real: ``{layer: [B]}`` real slots the layer holds once the chunk is appended.
        key_valid: ``{layer: [B, S] bool or None}`` False at filler / padding slots of what it holds.
        last: True for the prompt's last chunk.
    """

    counts: dict[int, torch.Tensor]
    slots: dict[int, int]
    fillers: dict[int, bool]
    leaders: dict[int, int]
    kept: dict[int, list[int]]
    real: dict[int, torch.Tensor]
    key_valid: dict[int, torch.Tensor | None]
    last: bool = True

    def is_leader(self, layer: int) -> bool:
        return self.leaders.get(layer) == layer


def chunk_bounds(width: int, chunk: int | None) -> list[int]:
    """Chunk edges over the padded width, counted back from the end (the first chunk is the partial
    one), so every row of a left-padded batch sees the same row-relative edges as when run alone."""
    if chunk is None or chunk >= width:
        return [0, width]
    first = width - (-(-width // chunk) - 1) * chunk
    return [0] + list(range(first, width + 1, chunk))


def plan_prefill(
    method: Method, lengths: list[int], width: int, layers: list[int], device, bounds: list[int] | None = None,
    reserve: float = 1.0,
) -> list[LayerPlan]:
    """One :class:`LayerPlan` per chunk of ``bounds`` (default: one chunk, the whole prompt) for rows
    of ``lengths`` real tokens padded to ``width``, over the prunable ``layers`` (depth order).
    ``reserve``: the re-selections before the last chunk keep up to ``ceil(reserve * final)`` tokens
    (a token must rank that high to survive an early cut; the last chunk cuts to the final count)."""
    bounds = bounds or [0, width]
    final = method.kept_per_layer(lengths, len(layers))
    early = [[math.ceil(reserve * f) for f in row] for row in final]
    pads = [width - n for n in lengths]
    stored = {layer: 0 for layer in layers}
    held = {layer: [0] * len(lengths) for layer in layers}
    tensors: dict[tuple, torch.Tensor] = {}

    def tensor(values: list[int]) -> torch.Tensor:
        key = tuple(values)
        if key not in tensors:
            tensors[key] = torch.tensor(values, device=device)
        return tensors[key]

    plans = []
    for k in range(len(bounds) - 1):
        lo, hi = bounds[k], bounds[k + 1]
        chunk_real = [max(0, hi - max(lo, p)) for p in pads]
        plan = LayerPlan({}, {}, {}, {}, {}, {}, {}, last=k == len(bounds) - 2)
        for pos, layer in enumerate(layers):
            size = stored[layer] + hi - lo
            real = [h + c for h, c in zip(held[layer], chunk_real)]
            kept = [min(f, r) for f, r in zip((final if k == len(bounds) - 2 else early)[pos], real)]
            if all(k_ == size for k_ in kept):
                stored[layer], held[layer] = size, real  # nothing to drop on this layer yet
                continue
            plan.counts[layer] = tensor(kept)
            plan.kept[layer] = kept
            plan.slots[layer] = max(kept)
            plan.fillers[layer] = not method.exact_budget or any(k_ != plan.slots[layer] for k_ in kept)
            plan.real[layer] = tensor(real)
            if all(r == size for r in real):
                plan.key_valid[layer] = None
            else:
                plan.key_valid[layer] = torch.arange(size, device=device)[None, :] >= (size - plan.real[layer])[:, None]
            stored[layer], held[layer] = plan.slots[layer], kept
        plan.leaders = sel.reuse_leaders(list(plan.counts), method.reuse_depth) if plan.counts else {}
        plans.append(plan)
    return plans


def plan_layers(method: Method, lengths: list[int], width: int, layers: list[int], device) -> LayerPlan:
    """The plan of a one-shot prefill (see :func:`plan_prefill`)."""
    return plan_prefill(method, lengths, width, layers, device)[0]


def leader_layers(method: Method, lengths: list[int], width: int, layers: list[int], device) -> list[int]:
    """The layers whose scores ``method`` needs at a one-shot prefill (reuse followers are not scored)."""
    plan = plan_layers(method, lengths, width, layers, device)
    return sorted(layer for layer in plan.counts if plan.is_leader(layer))
