"""A transformers ``Cache`` whose full-attention layers can hold a pruned prompt.

After pruning, a layer stores fewer tokens than the sequence it represents. Two lengths are
tracked apart, which is what keeps decoding correct:

* the **logical** length (prompt + generated tokens, padding included) drives positions:
  ``get_seq_length()`` returns it, so ``generate`` and the models give new tokens the positions
  that continue the original prompt, and kept keys keep their original rotation;
* the **stored** length drives masks: ``get_mask_sizes`` describes the stored keys as the last
  ``stored`` columns of the logical sequence, so a 2-D padding mask over logical positions lines
  up with new tokens exactly (and masks only left padding or filler slots among stored ones).

Layers may store different lengths (PyramidKV) and rows may keep different counts (filler slots,
``valid`` False). The attention wrapper in ``attention.py`` applies both; see there.
"""

from __future__ import annotations

import threading
import weakref

import torch
from transformers.cache_utils import (
    DYNAMIC_LAYER_TYPE_MAPPING,
    Cache,
    DynamicLayer,
    get_layer_types_and_kwargs,
)

from .errors import UnsupportedModelError
from .recompress import DecodeBudget

_last_update = threading.local()


def take_last_update() -> PrunedLayer | None:
    """The :class:`PrunedLayer` updated last on this thread, once (used by the attention wrapper)."""
    ref = getattr(_last_update, "ref", None)
    _last_update.ref = None
    return ref() if ref is not None else None


def _dense(states: torch.Tensor) -> bool:
    """Whether ``states`` fills its ``numel`` elements of storage exactly, in some order of its axes."""
    expected = 1
    for size, stride in sorted(((n, st) for n, st in zip(states.shape, states.stride()) if n != 1),
                               key=lambda pair: pair[1]):
        if stride != expected:
            return False
        expected *= size
    return states.numel() > 0


def take_slots(states: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``states [B, H, T, d]`` at the slots ``index [B, 1 or H, S]`` -> ``[B, H, S, d]`` (contiguous).

    Whole ``d``-rows are copied; the result equals ``torch.gather`` with the index expanded over ``d``.
    Densely stored states (any order of the axes) take one ``index_select`` over their rows (4 heads x
    204 of 2048 rows of 64 floats: 37 us, 8192 rows: 70 us, one CPU thread); other views take advanced
    indexing (56 and 184 us; ``gather`` is 2-4x slower still).
    """
    batch, heads, _length, dim = states.shape
    strides = states.stride()
    if strides[3] == 1 and all(x % dim == 0 for x in strides[:3]) and _dense(states):
        # Whole rows of d floats, densely stored in any order of (B, H, T) (a prefill's keys are
        # [B, T, H, d] in memory): one index_select over the storage's rows, 2x faster again than
        # advanced indexing (19 against 44 us for 4 heads x 204 rows of 64 floats); the same rows.
        rows_of = states.as_strided((states.numel() // dim, dim), (dim, 1))
        b, h, t = (x // dim for x in strides[:3])
        base = (torch.arange(batch, device=states.device) * b)[:, None, None] + \
            (torch.arange(heads, device=states.device) * h)[None, :, None]
        flat = (index.expand(batch, heads, index.shape[-1]) * t + base).reshape(-1)
        return rows_of.index_select(0, flat).view(batch, heads, -1, dim)
    rows = torch.arange(batch, device=states.device)[:, None, None]
    cols = torch.arange(heads, device=states.device)[None, :, None]
    return states[rows, cols, index.expand(batch, heads, index.shape[-1])]


class PrunedLayer(DynamicLayer):
    """A full-attention cache layer that can be pruned once and then grows by appending.

    Attributes:
        keys, values: ``[B, Hkv, stored, d]``.
        logical_length: tokens the layer stands for (host int, no sync needed).
        valid: ``[B, stored]`` bool, False at filler slots; None when every slot is real.
        kept_index: ``[B, 1 or Hkv, kept]`` original positions kept at the last pruning (None if never
            pruned). Positions are columns of the padded logical sequence (prompt, then new tokens).
        bound: the decoding budget this layer follows (:class:`chunkkv.recompress.DecodeBudget`), or None.
        recent_queries: ``[B, Hq, <= window, d]`` the last queries seen while a budget is active.
    """

    def __init__(self, sliding_window: int | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        # Set on a sliding-window layer whose window held the whole prompt: it is pruned like a
        # full-attention layer, and once the sequence outgrows the window the attention wrapper
        # hides the keys whose *original* position fell out of it (see attention._window_keep).
        self.sliding_window = sliding_window
        self.logical_length = 0
        self.valid: torch.Tensor | None = None
        self.kept_index: torch.Tensor | None = None
        self.bound = None
        self.recent_queries: torch.Tensor | None = None
        # True when attending over this layer needs chunkkv's attention wrapper (filler slots, or
        # a stored length that differs from other layers'); set by compress().
        self.needs_wrapper = False

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        unseen = take_last_update()
        if unseen is not None and unseen.needs_wrapper:
            # The previous pruned layer was attended without the wrapper: its masks were wrong.
            raise UnsupportedModelError(
                "this model is not attached to chunkkv, but its compressed cache needs chunkkv's attention "
                "(PyramidKV layers or rows of different kept lengths); call chunkkv.attach(model) first"
            )
        keys, values = super().update(key_states, value_states)
        new = key_states.shape[-2]
        self.logical_length += new
        if self.valid is not None:
            self.valid = torch.cat([self.valid, self.valid.new_ones(self.valid.shape[0], new)], dim=-1)
        _last_update.ref = weakref.ref(self)
        return keys, values

    @property
    def stored_length(self) -> int:
        """Tokens actually stored."""
        return 0 if not self.is_initialized or self.keys.numel() == 0 else self.keys.shape[-2]

    def get_seq_length(self) -> int:
        return self.logical_length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        stored = self.stored_length
        return stored + query_length, self.logical_length - stored

    def slot_positions(self) -> torch.Tensor:
        """``[B, 1 or Hkv, stored]`` logical position of every stored slot (fillers point at 0).

        Slots kept at the last pruning hold ``kept_index``; slots appended since hold consecutive
        positions from the logical length at that pruning. Built on demand (no per-step cost).
        """
        batch, stored = self.keys.shape[0], self.stored_length
        device = self.keys.device
        if self.kept_index is None:
            start = self.logical_length - stored
            return torch.arange(start, start + stored, device=device).expand(batch, 1, stored)
        index = self.kept_index
        # Slots past the kept ones were appended since, at the last logical positions (this holds
        # for a context loaded from disk too: nothing else needs saving).
        appended = torch.arange(self.logical_length - (stored - index.shape[-1]), self.logical_length, device=device)
        if appended.numel() == 0:
            return index
        appended = appended.expand(batch, index.shape[1], -1)
        return torch.cat([index, appended], dim=-1)

    def prune(self, index: torch.Tensor, valid: torch.Tensor | None) -> None:
        """Keep only the slots ``index [B, 1 or Hkv, S]`` (sorted slot indices) of the stored tokens.

        ``valid [B, S]`` marks real slots (None = all real). The logical length is unchanged;
        ``kept_index`` becomes the kept slots' logical positions, so a layer pruned again (chunked
        prefill, a decoding budget) still reports original positions.
        """
        batch = self.keys.shape[0]
        positions = self.slot_positions()
        if positions.shape[1] != index.shape[1]:
            width = max(positions.shape[1], index.shape[1])
            positions = positions.expand(batch, width, -1)
            index = index.expand(batch, width, -1)
        self.keys = take_slots(self.keys, index)
        self.values = take_slots(self.values, index)
        self.valid = valid
        self.kept_index = torch.gather(positions, 2, index)

    def crop(self, tokens_to_remove: int) -> None:
        # transformers passes a negative count of tokens to drop from the end.
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove from the end")
        n = -tokens_to_remove
        if n == 0 or not self.is_initialized:
            return
        super().crop(tokens_to_remove)
        self.logical_length -= n
        if self.valid is not None:
            self.valid = self.valid[:, :-n]
        if self.kept_index is not None and self.kept_index.shape[-1] > self.stored_length:
            # The crop reached into the pruned slots: keep the positions of the slots left.
            self.kept_index = self.kept_index[..., : self.stored_length]

    def _select_batch(self, fn) -> None:
        if self.valid is not None:
            self.valid = fn(self.valid)
        if self.kept_index is not None:
            self.kept_index = fn(self.kept_index)
        if self.recent_queries is not None:
            self.recent_queries = fn(self.recent_queries)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._select_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._select_batch(lambda t: t[indices, ...])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._select_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def reset(self) -> None:
        super().reset()
        self.logical_length = 0
        self.valid = None
        self.kept_index = None
        self.bound = None
        self.recent_queries = None
        self.needs_wrapper = False


class ChunkKVCache(Cache):
    """A cache for one model: :class:`PrunedLayer` on full-attention layers, the stock dynamic
    layer elsewhere. With ``prompt_length``, sliding-window layers whose window is at least that
    long are :class:`PrunedLayer` too (pruned at prefill; their window is applied by original
    position when decoding outgrows it); shorter windows stay bounded stock layers, never pruned.

    Pass it to ``model(...)`` or ``model.generate(..., cache=cache)`` like any transformers cache.
    """

    def __init__(self, config, prompt_length: int | None = None) -> None:
        text_config = config.get_text_config(decoder=True)
        layer_types, layer_kwargs = get_layer_types_and_kwargs(text_config)
        layers = []
        for kind, kw in zip(layer_types, layer_kwargs):
            window = kw.get("sliding_window") if kind == "sliding_attention" else None
            if kind == "full_attention":
                layers.append(PrunedLayer())
            elif window and prompt_length is not None and prompt_length <= window:
                # The window holds the whole prompt, so the prompt's attention is full attention:
                # prune it too (transformers 5.24 marks every layer of Mistral / Phi-3 sliding
                # as soon as the config has a sliding_window, however long).
                layers.append(PrunedLayer(sliding_window=window))
            else:
                layers.append(DYNAMIC_LAYER_TYPE_MAPPING[kind](**kw))
        super().__init__(layers=layers)
        self.layer_types = list(layer_types)

    @property
    def pruned_layers(self) -> list[int]:
        """Indices of the layers that can be pruned (full attention)."""
        return [i for i, layer in enumerate(self.layers) if isinstance(layer, PrunedLayer)]

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[int, int]:
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if not isinstance(layer, PrunedLayer):
            return super().get_mask_sizes(query_length, layer_idx)
        # One mask serves every full-attention layer: size it for the longest, and let the
        # attention wrapper take the suffix each layer needs.
        stored = max(self.layers[i].stored_length for i in self.pruned_layers)
        return stored + query_length, layer.logical_length - stored

    def stored_lengths(self) -> list[int]:
        """Tokens stored per layer (what the memory holds)."""
        return [
            layer.stored_length if isinstance(layer, PrunedLayer) else (layer.keys.shape[-2] if layer.is_initialized else 0)
            for layer in self.layers
        ]

    def kept_counts(self) -> torch.Tensor:
        """``[num_pruned_layers, B]`` real (non-filler) tokens stored per pruned layer and row."""
        rows = []
        for i in self.pruned_layers:
            layer = self.layers[i]
            if layer.valid is None:
                rows.append(torch.full((layer.keys.shape[0],), layer.stored_length, device=layer.keys.device))
            else:
                rows.append(layer.valid.sum(-1))
        return torch.stack(rows)

    def layer_nbytes(self) -> list[int]:
        """Bytes held by each layer's stored keys and values."""
        out = []
        for layer in self.layers:
            total = 0
            if getattr(layer, "is_initialized", False) and layer.keys is not None:
                total += layer.keys.numel() * layer.keys.element_size()
                total += layer.values.numel() * layer.values.element_size()
            out.append(total)
        return out

    def nbytes(self) -> int:
        """Bytes held by stored keys and values (all layers)."""
        return sum(self.layer_nbytes())

    def nbytes_by_kind(self) -> dict[str, dict[str, int]]:
        """The memory report split by the config's layer types: ``{kind: {"layers", "compressed",
        "tokens", "bytes"}}`` with ``kind`` e.g. ``"full_attention"`` / ``"sliding_attention"``.

        ``layers``: layers of that kind; ``compressed``: how many of them were pruned (a
        sliding-window layer can be only when its window held the whole prompt); ``tokens``:
        stored token slots summed over those layers (filler slots included); ``bytes``: their keys
        and values. On Gemma 3 past its 512-token window the sliding layers stay stock and hold
        the last 511 tokens each, whatever the budget: this is where that shows.
        """
        report: dict[str, dict[str, int]] = {}
        for kind, layer, stored, size in zip(self.layer_types, self.layers, self.stored_lengths(), self.layer_nbytes()):
            entry = report.setdefault(kind, {"layers": 0, "compressed": 0, "tokens": 0, "bytes": 0})
            entry["layers"] += 1
            entry["compressed"] += isinstance(layer, PrunedLayer) and layer.kept_index is not None
            entry["tokens"] += stored
            entry["bytes"] += size
        return report

    def set_decode_budget(self, method, keep: int, every: int) -> None:
        """Bound every full-attention layer while decoding: see :class:`chunkkv.recompress.DecodeBudget`.

        The budget lives on the cache, so it also applies under stock ``model.generate(...,
        cache=cache)`` (the model must be attached: :func:`chunkkv.attach`).
        """
        policy = DecodeBudget.build(method, keep, every, self.pruned_layers)
        for i in self.pruned_layers:
            layer = self.layers[i]
            layer.bound = policy
            layer.needs_wrapper = True  # an unattached model would never re-select: refuse it

    def clear_decode_budget(self) -> None:
        """Stop re-selecting while decoding (what is stored stays)."""
        for i in self.pruned_layers:
            self.layers[i].bound = None
            self.layers[i].recent_queries = None

    @property
    def decode_budget(self) -> DecodeBudget | None:
        """The active :class:`chunkkv.recompress.DecodeBudget`, or None."""
        for i in self.pruned_layers:
            return self.layers[i].bound
        return None

    def fork(self) -> ChunkKVCache:
        """A copy that shares the current tensors; appending to it leaves this cache unchanged.

        Cheap (no tensor copy): cache layers grow by concatenation, which allocates new tensors.
        Used to answer several questions on one compressed context.
        """
        clone = object.__new__(type(self))
        clone.__dict__.update(self.__dict__)
        clone.layers = [_shallow_copy(layer) for layer in self.layers]
        return clone

    def restore_layer(self, idx: int, source: ChunkKVCache) -> None:
        """Point layer ``idx`` of this fork back at ``source``'s tensors, freeing what it appended."""
        self.layers[idx] = _shallow_copy(source.layers[idx])


def _shallow_copy(layer):
    copy = object.__new__(type(layer))
    copy.__dict__.update(layer.__dict__)
    return copy
