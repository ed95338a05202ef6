"""What a compressed cache kept, and how similar the kept sets of different layers are.

Pure functions over boolean kept masks (plus one reader of a :class:`ChunkKVCache`), shared by the
CLI (``demo``, ``inspect``), the quality sweep and the real-model harness. Masks are indexed by
prompt position; ``[L, H, T]`` = layers x KV heads x prompt tokens.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = [
    "context_kept_masks", "kept_masks", "stacked_kept_masks", "union_over_heads", "jaccard", "jaccard_matrix", "mean_head_jaccard",
    "adjacent_mean", "shares_heads",
]


def kept_masks(cache, prompt_len: int, row: int = 0) -> dict[int, torch.Tensor]:
    """``{layer: [Hkv, prompt_len] bool}``: the prompt tokens each full-attention layer kept (one row).

    Layers that were never pruned (method ``full``, or a budget at least the prompt length) kept
    every token. Positions are those of the row as stored: for a left-padded batch, index ``j`` is
    column ``j`` of the padded prompt (padding is never kept).
    """
    out = {}
    for i in cache.pruned_layers:
        layer = cache.layers[i]
        heads = layer.keys.shape[1] if getattr(layer, "keys", None) is not None else 1
        mask = torch.zeros(heads, prompt_len, dtype=torch.bool, device="cpu")
        if layer.kept_index is None:
            mask[:] = True
        else:
            index = layer.kept_index[row].to("cpu").expand(heads, -1).clone()
            if layer.valid is not None:
                valid = layer.valid[row, : index.shape[-1]].to("cpu")
                index = index[:, valid]
            mask.scatter_(-1, index, True)
        out[i] = mask
    return out


def context_kept_masks(ctx, row: int = 0) -> tuple[list[int], torch.Tensor]:
    """``(layers, masks [L, Hkv, T])`` from a :class:`~chunkkv.compress.CompressedContext`'s public
    :meth:`~chunkkv.compress.CompressedContext.kept_positions`: for each full-attention layer and KV
    head, which of the row's ``T`` prompt tokens (padding excluded) it kept."""
    layers = list(ctx.cache.pruned_layers)
    width = ctx.input_ids.shape[1]
    length = int(ctx.attention_mask[row, :width].sum())
    heads = max(ctx.cache.layers[i].keys.shape[1] for i in layers)
    masks = torch.zeros(len(layers), heads, length, dtype=torch.bool)
    for n, i in enumerate(layers):
        for h in range(heads):
            masks[n, h, ctx.kept_positions(i, row, head=h)] = True
    return layers, masks


def stacked_kept_masks(cache, prompt_len: int, row: int = 0) -> tuple[list[int], torch.Tensor]:
    """``(layers, masks [L, Hkv, T])``: :func:`kept_masks` stacked over the pruned layers, in order
    (a layer stored with one shared index row is expanded to every KV head)."""
    by_layer = kept_masks(cache, prompt_len, row)
    layers = sorted(by_layer)
    heads = max(m.shape[0] for m in by_layer.values())
    return layers, torch.stack([by_layer[i].expand(heads, -1) for i in layers])


def union_over_heads(masks: torch.Tensor) -> torch.Tensor:
    """``[L, H, T]`` -> ``[L, T]``: a token is kept by a layer when any of its KV heads kept it."""
    return masks.any(dim=1)


def jaccard(a: Iterable[int], b: Iterable[int]) -> float:
    """Jaccard similarity ``|a ∩ b| / |a ∪ b|`` of two index sets (1.0 for two empty sets)."""
    a, b = set(a), set(b)
    union = len(a | b)
    return 1.0 if union == 0 else len(a & b) / union


def jaccard_matrix(masks: torch.Tensor) -> torch.Tensor:
    """Pairwise Jaccard similarity of kept sets: ``masks [L, T]`` bool -> ``[L, L]`` float64.

    ``out[i, j] = |K_i ∩ K_j| / |K_i ∪ K_j|`` where ``K_i`` is the set of positions kept by layer
    ``i`` (two empty sets count as identical, 1.0). This is the paper's Figure 2 (layer-wise
    similarity of retained indices). For per-head methods pass the union over heads
    (:func:`union_over_heads`) or use :func:`mean_head_jaccard`.
    """
    if masks.dim() != 2:
        raise ValueError(f"masks must be [layers, tokens], got shape {tuple(masks.shape)}")
    m = masks.to(torch.float64)
    inter = m @ m.T
    counts = m.sum(-1)
    union = counts[:, None] + counts[None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def mean_head_jaccard(masks: torch.Tensor) -> torch.Tensor:
    """``masks [L, H, T]`` -> ``[L, L]``: Jaccard of head ``h`` of layer ``i`` with head ``h`` of layer
    ``j``, averaged over the heads."""
    if masks.dim() != 3:
        raise ValueError(f"masks must be [layers, heads, tokens], got shape {tuple(masks.shape)}")
    m = masks.to(torch.float64).transpose(0, 1)  # [H, L, T]
    inter = m @ m.transpose(1, 2)  # [H, L, L]
    counts = m.sum(-1)
    union = counts[:, :, None] + counts[:, None, :] - inter
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter)).mean(0)


def adjacent_mean(matrix: torch.Tensor) -> float:
    """Mean of ``matrix[i, i + 1]`` over adjacent layers (``[L, L]``, ``L >= 2``): the paper's Table 2 number."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] < 2:
        raise ValueError(f"need a square [L, L] matrix with L >= 2, got shape {tuple(matrix.shape)}")
    return float(torch.diagonal(matrix, offset=1).mean())


def shares_heads(masks: torch.Tensor) -> bool:
    """True when every KV head of every layer kept the same tokens (``[L, H, T]``)."""
    return bool((masks == masks[:, :1]).all())
