"""Which prompt tokens to keep: pure, vectorised tensor functions.

Conventions shared by every function here:

* Rows are left-padded to a common length ``T``; ``lengths[b]`` real tokens sit at the right end.
  Selection runs in **row-relative** coordinates (token 0 = the row's first real token), so chunk
  boundaries and windows are the same whether a row is run alone or inside a padded batch.
  :func:`align_rows` maps scores into those coordinates, :func:`finalize` maps picks back.
* ``kept[b]`` is the exact number of tokens row ``b`` keeps (already ``<= lengths[b]``);
  ``slots`` is ``max(kept)``, a host int that fixes the output shape. Rows keeping fewer than
  ``slots`` tokens get *filler* slots (index ``-1``), which :func:`finalize` sorts to the front
  and reports as invalid so attention masks them.
* The observation window (the last ``min(window, kept[b])`` tokens) is always kept and counted in
  the budget; the rest, the *prefix budget*, is spent on the prefix by score.

No function loops over tokens or chunks, calls ``.item()`` or otherwise syncs with the host.
"""

from __future__ import annotations

import torch

from .scoring import pool_scores

NEG_INF = float("-inf")


def align_rows(x: torch.Tensor, pad: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
    """Shift each left-padded row of ``x [B, ..., T]`` so its first real token is at index 0.

    ``pad[b]`` is the number of padding tokens on the left of row ``b``; vacated slots on the right
    are set to ``fill``.
    """
    length = x.shape[-1]
    pos = torch.arange(length, device=x.device)
    src = pos[None, :] + pad[:, None]  # [B, T]
    ok = src < length
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (length,)
    index = src.clamp(max=length - 1).view(shape).expand_as(x)
    return torch.gather(x, -1, index).masked_fill(~ok.view(shape), fill)


def window_sizes(kept: torch.Tensor, window: int) -> torch.Tensor:
    """Tokens of the observation window kept per row: ``min(window, kept)``."""
    return kept.clamp(max=window)


def prefix_scores(
    scores: torch.Tensor,
    lengths: torch.Tensor,
    kept: torch.Tensor,
    window: int,
    pooling: str | None = None,
    kernel: int = 1,
) -> torch.Tensor:
    """Restrict row-relative ``scores [B, H, T]`` to each row's prefix and pool them there.

    The prefix of row ``b`` is ``[0, lengths[b] - min(window, kept[b]))``. Scores outside it are
    zeroed before pooling (zero padding, as SnapKV does) and set to ``-inf`` after, so they are
    never picked.
    """
    prefix_len = lengths - window_sizes(kept, window)
    outside = (torch.arange(scores.shape[-1], device=scores.device)[None, :] >= prefix_len[:, None])[:, None, :]
    pooled = pool_scores(scores.masked_fill(outside, 0.0), pooling, kernel)
    return pooled.masked_fill(outside, NEG_INF)


def _window_picks(lengths: torch.Tensor, kept: torch.Tensor, window: int, width: int) -> torch.Tensor:
    """``[B, width]`` row-relative indices of each row's kept window, ``-1`` beyond it."""
    win = window_sizes(kept, window)
    slot = torch.arange(width, device=lengths.device)[None, :]
    picks = (lengths - win)[:, None] + slot
    return torch.where(slot < win[:, None], picks, -1)


def mask_to_indices(mask: torch.Tensor, width: int) -> torch.Tensor:
    """``[..., T]`` bool -> ``[..., width]`` the positions of the first ``width`` True entries of each
    row in ascending order, ``-1`` after them. One cumulative sum and one scatter: no sort over ``T``."""
    length = mask.shape[-1]
    slot = torch.cumsum(mask, dim=-1) - 1
    # everything not kept (or past `width`) lands in a spare column, dropped below
    slot = torch.where(mask & (slot < width), slot, width)
    out = torch.full(mask.shape[:-1] + (width + 1,), -1, dtype=torch.long, device=mask.device)
    positions = torch.arange(length, device=mask.device).expand(mask.shape)
    out.scatter_(-1, slot, positions)
    return out[..., :width]


def top_k_mask(priority: torch.Tensor, budget: torch.Tensor, width: int) -> torch.Tensor:
    """``[B, H, T]`` bool: the ``budget[b]`` largest entries of each row of ``priority``, equal values
    resolved to the earlier position (exactly the first ``budget[b]`` of a stable descending sort).

    ``width`` (host int) is ``max(budget)``. One ``topk`` finds each row's threshold (its
    ``budget``-th largest value); every entry above it is kept, and of the entries equal to it the
    earliest ones make up the count. ``O(T)`` per row, where a full sort costs ``O(T log T)``
    (2.1 ms against 0.4 ms for ``[1, 4, 8192]`` on one CPU thread).
    """
    top = torch.topk(priority, width, dim=-1, sorted=True).values  # [B, H, width]
    at = (budget - 1).clamp(min=0)[:, None, None].expand(-1, top.shape[1], 1)
    threshold = top.gather(-1, at)  # [B, H, 1]
    above = priority > threshold
    equal = priority == threshold
    need = budget[:, None, None] - above.sum(-1, keepdim=True)  # how many equal ones to take (>= 1)
    take = above | (equal & (torch.cumsum(equal, dim=-1) <= need))
    return take & (budget > 0)[:, None, None]


def _top_prefix(priority: torch.Tensor, budget: torch.Tensor, width: int) -> torch.Tensor:
    """Top-``budget[b]`` entries of ``priority [B, H, T]`` (``-inf`` = never), ``-1`` past the budget.

    Equal scores (common after max pooling) resolve to the earlier token, so the selection is
    deterministic and matches a plain reference implementation (a stable sort). The indices come
    in ascending position order (:func:`finalize` sorts them anyway).
    """
    if width == 0:
        return priority.new_empty(priority.shape[:-1] + (0,), dtype=torch.long)
    return mask_to_indices(top_k_mask(priority, budget, width), width)


def _assemble(
    prefix_priority: torch.Tensor, lengths: torch.Tensor, kept: torch.Tensor, window: int, slots: int
) -> torch.Tensor:
    """Exact-count selection: the prefix budget by priority, then the window."""
    win_width = min(window, slots)
    prefix_width = slots - win_width  # = max prefix budget over rows (see module docstring)
    budget = kept - window_sizes(kept, window)
    picks = _top_prefix(prefix_priority, budget, prefix_width)
    win = _window_picks(lengths, kept, window, win_width)
    win = win[:, None, :].expand(-1, picks.shape[1], -1)
    return torch.cat([picks, win], dim=-1)


def select_tokens_per_head(
    scores: torch.Tensor, lengths: torch.Tensor, kept: torch.Tensor, window: int, slots: int
) -> torch.Tensor:
    """SnapKV / H2O / PyramidKV selection: each KV head keeps its own top tokens.

    Args:
        scores: ``[B, Hkv, T]`` row-relative prefix scores (``-inf`` outside the prefix), e.g.
            from :func:`prefix_scores`.
        lengths, kept: ``[B]`` real and kept token counts.
        window: observation window size.
        slots: ``max(kept)`` as a host int.

    Returns:
        ``[B, Hkv, slots]`` row-relative indices, ``-1`` for fillers, unsorted.
    """
    return _assemble(scores, lengths, kept, window, slots)


def _chunk_token_scores(token: torch.Tensor, reduce: str) -> torch.Tensor:
    """Token scores as a chunk's mean / sum sees them: their square roots for ``"sqrt_mean"``."""
    if reduce == "sqrt_mean":
        return token.clamp(min=0).sqrt()
    if reduce not in ("mean", "sum"):
        raise ValueError(f"unknown chunk reduce {reduce!r}: use 'mean', 'sum' or 'sqrt_mean'")
    return token


def _rank_chunks(
    token: torch.Tensor, valid: torch.Tensor, chunk_size: int, reduce: str, peak_weight: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cut ``token [B, T]`` scores into chunks from index 0 and rank them (0 = best).

    Returns ``(chunk_rank [B, C], token_c [B, C, c], valid_c [B, C, c])``; chunks with no valid
    token rank last. Ties keep the earlier chunk first.
    """
    batch, length = token.shape
    n_chunks = -(-length // chunk_size)
    extra = n_chunks * chunk_size - length
    token_c = torch.nn.functional.pad(token, (0, extra)).view(batch, n_chunks, chunk_size)
    valid_c = torch.nn.functional.pad(valid, (0, extra)).view(batch, n_chunks, chunk_size)
    count = valid_c.sum(-1)
    seen = _chunk_token_scores(token_c, reduce)
    chunk_score = seen.sum(-1)
    if reduce != "sum":
        chunk_score = chunk_score / count.clamp(min=1)
    if peak_weight:
        chunk_score = chunk_score + peak_weight * seen.masked_fill(~valid_c, 0.0).amax(-1)
    chunk_score = chunk_score.masked_fill(count == 0, NEG_INF)
    return _ranks(chunk_score), token_c, valid_c


def _ranks(x: torch.Tensor) -> torch.Tensor:
    """Descending rank of each entry along the last dim (0 = largest; ties: earlier first)."""
    order = torch.sort(x, dim=-1, descending=True, stable=True).indices
    steps = torch.arange(x.shape[-1], device=x.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, steps)


def _head_sum(scores: torch.Tensor) -> torch.Tensor:
    """``[B, H, T] -> [B, T]``: scores summed over heads; ``-inf`` (excluded) tokens count 0."""
    return torch.nan_to_num(scores, neginf=0.0).sum(1)


def chunk_priority(
    scores: torch.Tensor, chunk_size: int, reduce: str = "mean", peak_weight: float = 0.0
) -> torch.Tensor:
    """Rank prefix tokens chunk by chunk (ChunkKV), shared by all heads of a layer.

    Args:
        scores: ``[B, H, T]`` row-relative prefix scores, ``-inf`` outside the prefix.
        chunk_size: tokens per chunk; chunks start at the row's token 0, the last may be partial.
        reduce: ``"mean"`` or ``"sum"`` of the head-summed token scores inside a chunk, or
            ``"sqrt_mean"``: the mean of their square roots (a chunk of many telling tokens
            outranks one with a single spike).
        peak_weight: adds this times the chunk's largest token score (square-rooted for
            ``"sqrt_mean"``) to its score, so a chunk holding one of the strongest tokens is not
            outranked by its length alone (0 = off; scores are taken as non-negative).

    Returns:
        ``[B, 1, T]`` priority (higher = kept first): whole chunks in order of chunk score, and
        inside a chunk its tokens by their own score, so taking the top ``k`` keeps the best
        ``k // chunk_size`` chunks whole and tops up with the best tokens of the next chunk.
        ``-inf`` outside the prefix.
    """
    batch, _, length = scores.shape
    in_prefix = torch.isfinite(scores[:, 0])  # [B, T]
    chunk_rank, token_c, valid_c = _rank_chunks(_head_sum(scores), in_prefix, chunk_size, reduce, peak_weight)
    inner_rank = _ranks(token_c.masked_fill(~valid_c, NEG_INF))
    rank = (chunk_rank[..., None] * chunk_size + inner_rank).view(batch, -1)[:, :length]
    priority = (-rank).to(torch.float32).masked_fill(~in_prefix, NEG_INF)
    return priority[:, None, :]


def boundary_segments(is_end: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Chunk ids ``[B, T]`` (long, non-decreasing from 0) for chunks whose edges sit at boundaries.

    The fixed grid's edges ``k * chunk_size`` each move to the nearest position ``p`` within
    ``chunk_size // 4`` tokens whose previous token ends a sentence or clause (``is_end[p - 1]``),
    and stay put when there is none. Moves of at most a quarter chunk keep every chunk but the
    last between ``chunk_size / 2`` and ``3 * chunk_size / 2`` tokens.

    Args:
        is_end: ``[B, T]`` bool, row-relative: True at tokens that end a sentence or clause.
        chunk_size: the nominal chunk length ``c``.
    """
    batch, length = is_end.shape
    device = is_end.device
    n_edges = max(0, -(-length // chunk_size) - 1)
    if n_edges == 0:
        return torch.zeros(batch, length, dtype=torch.long, device=device)
    reach = chunk_size // 4
    # offsets nearest first (0, -1, +1, -2, +2, ...): argmax over them finds the closest boundary
    steps = torch.arange(1, reach + 1, device=device)
    offsets = torch.cat([torch.zeros(1, dtype=torch.long, device=device), torch.stack([-steps, steps], 1).flatten()])
    grid = torch.arange(1, n_edges + 1, device=device) * chunk_size  # [K]
    cand = grid[:, None] + offsets[None, :]  # [K, O]: a chunk would start at cand
    inside = (cand >= 1) & (cand <= length - 1)
    prev = (cand - 1).clamp(0, length - 1).flatten()
    ok = is_end[:, prev].view(batch, *cand.shape) & inside  # [B, K, O]
    first = ok.to(torch.int8).argmax(-1)  # [B, K] the nearest boundary's offset slot
    edges = torch.where(ok.any(-1), cand[torch.arange(n_edges, device=device)[None, :], first], grid[None, :])
    positions = torch.arange(length, device=device).expand(batch, length).contiguous()
    return torch.searchsorted(edges.contiguous(), positions, right=True)


def sentence_segments(is_end: torch.Tensor, max_len: int) -> torch.Tensor:
    """Chunk ids ``[B, T]`` (long, non-decreasing from 0): one chunk per sentence.

    A chunk starts at token 0 and after every token that ends a sentence (``is_end [B, T]``, bool,
    row-relative); a sentence longer than ``max_len`` tokens is cut every ``max_len`` tokens.
    """
    batch, length = is_end.shape
    pos = torch.arange(length, device=is_end.device).expand(batch, length)
    starts = torch.cat([torch.ones_like(is_end[:, :1]), is_end[:, :-1]], dim=1)
    first = torch.cummax(torch.where(starts, pos, 0), dim=1).values  # start of each token's sentence
    new_chunk = starts | ((pos - first) % max_len == 0)
    return torch.cumsum(new_chunk.long(), dim=1) - 1


def fixed_segments(batch: int, length: int, chunk_size: int, device) -> torch.Tensor:
    """Chunk ids ``[B, T]`` of the paper's fixed chunks: ``t // chunk_size``."""
    return (torch.arange(length, device=device) // chunk_size).expand(batch, length)


def position_segments(positions: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Chunk ids ``[B, T]`` (consecutive from 0) of held slots whose row-relative prompt positions are
    ``positions [B, T]`` (non-decreasing): the paper's fixed chunks of the *prompt* (``p // chunk_size``),
    so tokens kept from one chunk stay one chunk however many were dropped around them."""
    grid = positions // chunk_size
    start = torch.ones_like(grid, dtype=torch.bool)
    start[:, 1:] = grid[:, 1:] != grid[:, :-1]
    return torch.cumsum(start.long(), dim=1) - 1


def glue_digits(segments: torch.Tensor, is_digit: torch.Tensor) -> torch.Tensor:
    """Chunk ids ``[B, T]`` with no chunk starting inside a run of digits.

    ``is_digit [B, T]`` (row-relative, bool) marks digit tokens; a chunk that would start at a
    digit right after another digit starts right after the run instead (the rest of the run joins
    the chunk before it), so a number written digit by digit is kept or dropped whole.
    """
    start = torch.ones_like(is_digit)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    inside = torch.zeros_like(is_digit)
    inside[:, 1:] = is_digit[:, 1:] & is_digit[:, :-1]
    run = torch.cumsum((~inside).long(), dim=1) - 1  # a digit run and the token before it share an id
    moved = torch.zeros(run.shape[0], run.shape[1] + 1, dtype=torch.long, device=run.device)
    moved.scatter_reduce_(1, run, (start & inside).long(), "amax")  # runs that held a chunk start
    after = ~inside & (run > 0) & moved.gather(1, (run - 1).clamp(min=0)).bool()  # the token after such a run
    return torch.cumsum(((start & ~inside) | after).long(), dim=1) - 1


def segment_priority(
    scores: torch.Tensor, segments: torch.Tensor, reduce: str = "mean", peak_weight: float = 0.0
) -> torch.Tensor:
    """:func:`chunk_priority` for chunks of any lengths given as chunk ids ``segments [B, T]``.

    Whole chunks rank by their score (``reduce`` and ``peak_weight`` over the head-summed token
    scores of their prefix tokens, as in :func:`chunk_priority`), tokens inside a chunk by their
    own score; returns ``[B, 1, T]``, ``-inf`` outside the prefix. With ``segments = t // c`` it
    equals :func:`chunk_priority` with chunk size ``c``.
    """
    batch, _, length = scores.shape
    in_prefix = torch.isfinite(scores[:, 0])
    token = _head_sum(scores)  # [B, T], 0 outside the prefix
    n_seg = length  # ids are < T
    seen = _chunk_token_scores(token, reduce)
    total = token.new_zeros(batch, n_seg).scatter_add_(1, segments, seen)
    count = token.new_zeros(batch, n_seg).scatter_add_(1, segments, in_prefix.to(token.dtype))
    if reduce != "sum":
        total = total / count.clamp(min=1)
    if peak_weight:
        peak = token.new_zeros(batch, n_seg).scatter_reduce_(1, segments, seen.masked_fill(~in_prefix, 0.0), "amax")
        total = total + peak_weight * peak
    chunk_rank = _ranks(total.masked_fill(count == 0, NEG_INF)).gather(1, segments)  # [B, T]
    # Order tokens by (chunk rank, own score descending, position): two stable sorts.
    own = token.masked_fill(~in_prefix, NEG_INF)
    by_score = torch.sort(own, dim=-1, descending=True, stable=True).indices
    by_chunk = torch.sort(chunk_rank.gather(1, by_score), dim=-1, stable=True).indices
    order = by_score.gather(1, by_chunk)
    steps = torch.arange(length, device=scores.device).expand(batch, length)
    rank = torch.empty_like(order).scatter_(1, order, steps)
    return (-rank).to(torch.float32).masked_fill(~in_prefix, NEG_INF)[:, None, :]


def select_chunks(
    scores: torch.Tensor,
    lengths: torch.Tensor,
    kept: torch.Tensor,
    window: int,
    slots: int,
    chunk_size: int,
    reduce: str = "mean",
    segments: torch.Tensor | None = None,
    peak_weight: float = 0.0,
) -> torch.Tensor:
    """ChunkKV selection: the best whole chunks of the prefix plus the window, one set per layer.

    Args and shapes as in :func:`select_tokens_per_head`; ``scores`` may have any number of heads
    (they are summed). ``segments [B, T]``: row-relative chunk ids for chunks of varying length
    (:func:`boundary_segments`, :func:`sentence_segments`); None cuts fixed chunks of
    ``chunk_size``. ``reduce`` / ``peak_weight``: the chunk score (:func:`chunk_priority`).
    Returns ``[B, 1, slots]`` row-relative indices, ``-1`` for fillers.
    """
    if segments is None:
        priority = chunk_priority(scores, chunk_size, reduce, peak_weight)
    else:
        priority = segment_priority(scores, segments, reduce, peak_weight)
    return _assemble(priority, lengths, kept, window, slots)


def select_chunks_kvpress(
    scores: torch.Tensor, lengths: torch.Tensor, kept_chunks: torch.Tensor, slots: int, chunk_size: int
) -> torch.Tensor:
    """kvpress 0.5.5 ``ChunkKVPress`` semantics, per row (kvpress itself uses row 0 for all rows).

    The whole row (window included) is cut into chunks from token 0; a chunk's score is the mean
    of its head-summed token scores; the top ``kept_chunks[b]`` chunks are kept whole, so the kept
    count is a multiple of ``chunk_size`` (or one less partial chunk) rather than exact, and the
    window is kept only because its tokens carry the highest scores.

    Args:
        scores: ``[B, H, T]`` row-relative scores over the whole row, ``-inf`` past ``lengths``.
        kept_chunks: ``[B]`` number of chunks to keep.
        slots: host int, ``max_b min(lengths[b], kept_chunks[b] * chunk_size)``.

    Returns:
        ``[B, 1, slots]`` row-relative indices, ``-1`` for fillers.
    """
    batch, _, length = scores.shape
    valid = torch.arange(length, device=scores.device)[None, :] < lengths[:, None]
    chunk_rank, _, valid_c = _rank_chunks(_head_sum(scores), valid, chunk_size, "mean")
    chosen = (chunk_rank < kept_chunks[:, None]) & valid_c.any(-1)
    token_ok = (chosen[..., None] & valid_c).view(batch, -1)[:, :length]
    # The chosen tokens in position order, -1 after them (at most `slots` per row).
    return mask_to_indices(token_ok, slots)[:, None, :]


def select_streaming(lengths: torch.Tensor, kept: torch.Tensor, n_sink: int, slots: int) -> torch.Tensor:
    """StreamingLLM: the first ``n_sink`` tokens plus the most recent ones, ``[B, 1, slots]``."""
    sink = kept.clamp(max=n_sink)
    recent = kept - sink
    slot = torch.arange(slots, device=lengths.device)[None, :]
    from_end = (lengths - recent)[:, None] + (slot - sink[:, None])
    picks = torch.where(slot < sink[:, None], slot, from_end)
    return torch.where(slot < kept[:, None], picks, -1)[:, None, :]


def finalize(picks: torch.Tensor, pad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn row-relative picks into sorted absolute indices and a validity mask.

    Args:
        picks: ``[B, H, S]`` row-relative indices, ``-1`` for fillers.
        pad: ``[B]`` left padding of each row.

    Returns:
        ``(index, valid)``: ``index [B, H, S]`` ascending absolute positions (fillers first, pointing
        at position 0), and ``valid [B, S]`` False at fillers (the filler count is the same for every
        head of a row).
    """
    absolute = torch.where(picks >= 0, picks + pad[:, None, None], -1)
    absolute = torch.sort(absolute, dim=-1).values
    valid = absolute[:, 0, :] >= 0
    return absolute.clamp(min=0), valid


def reuse_leaders(layers: list[int], depth: int) -> dict[int, int]:
    """Layer-wise index reuse schedule: each layer -> the layer whose indices it uses.

    ``layers`` are the compressible layers in depth order; they form contiguous groups of
    ``depth`` and every layer uses the indices chosen by the first layer of its group.
    ``depth=1`` turns reuse off; ``depth >= len(layers)`` shares one index set across the model.
    """
    if depth < 1:
        raise ValueError(f"reuse depth must be >= 1, got {depth}")
    return {layer: layers[(pos // depth) * depth] for pos, layer in enumerate(layers)}
