"""Token importance scores from attention (and one from likelihood): pure tensor functions, no model needed.

Shapes: ``B`` batch, ``Hq`` query heads, ``Hkv`` key/value heads (``Hq = G * Hkv`` for GQA),
``T`` prompt length (padded), ``w`` observation window, ``d`` head dim.

All scores are attention probabilities computed in float32 and averaged over the queries that
produced them and over the query heads of each KV group, so they come out per **KV head**.
Memory is O(w * T) per head for the window scores and O(block * T) for the accumulated (H2O)
scores: a ``T x T`` matrix is never materialised. :func:`token_surprisal` is the exception to
the attention rule: a token's negative log-likelihood, from the final hidden states.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class Workspace:
    """Scratch buffers that every layer of one compression reuses.

    The window logits of one layer (``[B, Hkv, G * w, T]`` float32: 6 MiB for a 2k prompt on a model
    with 12 query heads and a 64-token window) are the largest temporary of the compression step.
    Allocated fresh for every layer, each is new memory to the process: on CPU glibc hands such
    blocks out as fresh pages (its mmap threshold, or the trimmed top of the heap), and faulting them
    in cost more than the matmul that fills them (measured: 3.7 ms of CPU per layer with a reused
    buffer against 9.9 ms fresh, 3,040 page faults per call, at 2k). One :class:`Workspace` lives for
    one compression (a prefill's session) and is dropped with it, so it never outlives the call; it
    holds at most the largest buffer asked for, which is what one layer allocated before.

    The price is memory: the buffer stays allocated through the model's own forward between the
    layers, so a compressing prefill's peak grows by it (8k prompt, 100M model: +12 MiB for ChunkKV's
    32-token window, +24 MiB for the kvpress preset's 64; 3-7 % of the peak). It is used on CPU
    only: CUDA's caching allocator already reuses freed blocks without new pages.
    """

    def __init__(self) -> None:
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A contiguous ``shape`` tensor of ``dtype`` on ``device`` (uninitialised): the buffer ``name``,
        grown when it is too small. Valid until the next ``get`` of the same name."""
        key = (name, dtype, torch.device(device))
        numel = math.prod(shape)
        buf = self._buffers.get(key)
        if buf is None or buf.numel() < numel:
            self._buffers.pop(key, None)  # free the old one before allocating the larger
            buf = torch.empty(numel, dtype=dtype, device=device)
            self._buffers[key] = buf
        return buf[:numel].view(shape)


def _grouped_logits(
    queries: torch.Tensor, keys: torch.Tensor, scaling: float, softcap: float | None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """``[B, Hq, q, d] x [B, Hkv, T, d] -> [B, Hkv, G * q, T]`` float32 logits, as the model computes them.

    The query heads of a KV group are stacked along the query axis (row ``g * q + i`` is query
    ``i`` of head ``g`` of the group), so one batched matmul per KV head does the work without
    repeating keys. With a ``workspace`` the logits are written into its ``"logits"`` buffer.
    """
    batch, n_q_heads, q_len, dim = queries.shape
    n_kv_heads = keys.shape[1]
    q = queries.float().reshape(batch, n_kv_heads, (n_q_heads // n_kv_heads) * q_len, dim)
    # A power-of-two scale (head dim 64: 1/8) is exact on the queries, where it costs a pass over
    # q instead of one over the logits; any other scale multiplies the logits, as before.
    exact = math.frexp(scaling)[0] == 0.5
    if exact:
        q = q * scaling
    k = keys.float().transpose(-1, -2)
    if workspace is None or keys.device.type != "cpu":  # CUDA's caching allocator reuses blocks itself
        logits = torch.matmul(q, k)
    else:
        shape = (batch, n_kv_heads, q.shape[2], keys.shape[2])
        logits = torch.matmul(q, k, out=workspace.get("logits", shape, torch.float32, keys.device))
    if not exact:
        logits.mul_(scaling)
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _softmax(logits: torch.Tensor, key_valid: torch.Tensor | None, in_place: bool = False) -> torch.Tensor:
    """Softmax over keys with padding keys hidden (``logits`` is changed in place; with ``in_place``
    the probabilities overwrite it: equal to the out-of-place result bit for bit)."""
    if key_valid is not None:
        # finfo.min, not -inf: a padding query that sees only padding gets a finite row (then zeroed).
        logits.masked_fill_(~key_valid[:, None, None, :], torch.finfo(logits.dtype).min)
    if in_place:
        return torch._softmax(logits, -1, False, out=logits)
    return torch.softmax(logits, dim=-1)


def _reduce_queries(
    probs: torch.Tensor, query_valid: torch.Tensor | None, groups: int, reduce: str = "sum"
) -> torch.Tensor:
    """Zero the rows of padding queries, then sum (or max) over the stacked queries."""
    if query_valid is not None:
        probs = probs * query_valid.repeat(1, groups)[:, None, :, None]
    return probs.amax(dim=2) if reduce == "max" else probs.sum(dim=2)


def _finish(
    logits: torch.Tensor, key_valid: torch.Tensor | None, query_valid: torch.Tensor | None, groups: int,
    reduce: str = "sum", in_place: bool = False,
) -> torch.Tensor:
    """Softmax over keys, zero the rows of padding queries, sum (or max) over the stacked queries."""
    return _reduce_queries(_softmax(logits, key_valid, in_place), query_valid, groups, reduce)


def _mask_future(logits: torch.Tensor, first: int, q_len: int, groups: int) -> None:
    """In place: hide from each of ``q_len`` queries (query ``i`` at key position ``first + i``,
    stacked ``groups`` times as :func:`_grouped_logits` stacks them) the keys after it. Keys before
    ``first`` are seen by every query, so only the trailing slice is touched."""
    future = torch.ones(q_len, logits.shape[-1] - first, dtype=torch.bool, device=logits.device).triu(1)
    # the stacked rows split into (groups, q_len): one mask broadcast over the groups, not repeated
    tail = logits[..., first:]
    tail.view(*tail.shape[:-2], groups, q_len, tail.shape[-1]).masked_fill_(future, torch.finfo(logits.dtype).min)


def attend_and_score(
    queries: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    scaling: float,
    context_len: int,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    softcap: float | None = None,
    reduce: str = "max",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention of scoring queries that also scores the context: the probabilities are
    computed once and serve both, so a scoring pass does not run the model's attention as well.

    Args:
        queries: ``[B, Hq, q, d]``, the last ``q`` positions of ``keys``.
        keys / values: ``[B, Hkv, S, d]`` / ``[B, Hkv, S, dv]``, context first.
        scaling, softcap, context_len, key_valid, query_valid, reduce: as in :func:`max_attention_scores`.

    Returns:
        ``[B, Hq, q, dv]`` attention output in the queries' dtype, and ``[B, Hkv, context_len]``
        float32 scores (equal to :func:`max_attention_scores` for the same inputs).
    """
    batch, n_q_heads, q_len, _ = queries.shape
    groups = n_q_heads // keys.shape[1]
    logits = _grouped_logits(queries, keys, scaling, softcap)  # [B, Hkv, G*q, S]
    _mask_future(logits, keys.shape[2] - q_len, q_len, groups)
    probs = _softmax(logits, key_valid)
    del logits
    out = torch.matmul(probs, values.float())  # [B, Hkv, G*q, dv]: query heads stacked as in the logits
    scores = _reduce_queries(probs[..., :context_len], query_valid, groups, reduce)
    return out.reshape(batch, n_q_heads, q_len, -1).to(queries.dtype), scores


def _causal_block_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    softcap: float | None,
    key_valid: torch.Tensor | None,
    query_valid: torch.Tensor | None,
    block: int,
    reduce: str,
) -> torch.Tensor:
    """``[B, Hkv, S]``: causal attention each key receives from ``queries`` (the last ``q`` of the
    ``S`` key positions), ``block`` queries at a time, summed or maxed over the queries and the
    query heads of each KV group. ``query_valid``: ``[B, q]`` or None."""
    q_len, length = queries.shape[2], keys.shape[2]
    offset = length - q_len  # query i sits at key position offset + i
    groups = queries.shape[1] // keys.shape[1]
    total = keys.new_zeros(keys.shape[0], keys.shape[1], length, dtype=torch.float32)
    for start in range(0, q_len, block):  # blocks of queries, not tokens: bounds memory
        stop = min(q_len, start + block)
        logits = _grouped_logits(queries[:, :, start:stop], keys, scaling, softcap)  # [B, Hkv, G*b, S]
        _mask_future(logits, offset + start, stop - start, groups)
        valid = query_valid[:, start:stop] if query_valid is not None else None
        scores = _finish(logits, key_valid, valid, groups, reduce)
        total = torch.maximum(total, scores) if reduce == "max" else total + scores
    return total


def window_attention_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    softcap: float | None = None,
    workspace: Workspace | None = None,
) -> torch.Tensor:
    """Attention each key receives from the observation window (SnapKV / ChunkKV scores).

    Args:
        queries: ``[B, Hq, w, d]`` query states of the last ``w`` prompt positions (after RoPE
            and any q-norm, exactly as the model uses them).
        keys: ``[B, Hkv, T, d]`` key states of the whole prompt.
        scaling: the softmax scale the model uses (usually ``d ** -0.5``).
        key_valid: ``[B, T]`` bool, False at padding; None means no padding.
        softcap: logit soft-capping (Gemma 2), if the model uses it.
        workspace: a :class:`Workspace` whose buffer holds the logits and, in place, the
            probabilities (no fresh memory per call; the result is the same bit for bit).

    Returns:
        ``[B, Hkv, T]`` float32: softmax probabilities (causal inside the window) averaged over
        the ``w`` window queries and over the query heads of each KV group.
    """
    win = queries.shape[2]
    groups = queries.shape[1] // keys.shape[1]
    length = keys.shape[2]
    logits = _grouped_logits(queries, keys, scaling, softcap, workspace)  # [B, Hkv, G*w, T]
    _mask_future(logits, length - win, win, groups)  # every window query sees the whole prefix
    query_valid = key_valid[:, -win:] if key_valid is not None else None
    # the logits are this call's own (or the workspace's): the probabilities overwrite them
    probs = _softmax(logits, key_valid, in_place=True)
    return _sum_queries(probs, query_valid, groups) / (groups * win)


def _sum_queries(probs: torch.Tensor, query_valid: torch.Tensor | None, groups: int) -> torch.Tensor:
    """``[B, Hkv, R, T] -> [B, Hkv, T]``: the sum over the stacked queries, padding queries' rows left out,
    as one matrix-vector product per KV head (a row of weights, 0 at padding queries, times the
    probabilities). Equal to :func:`_reduce_queries` up to the order of the additions (a reduction over
    the middle axis reads the probabilities twice as slowly on CPU: 0.22 against 0.11 ms for 4 x 192 x
    2048), and it never writes a masked copy of them."""
    batch, _, rows, _ = probs.shape
    if query_valid is None:
        weights = probs.new_ones(1, 1, 1, rows)
    else:
        weights = query_valid.to(probs.dtype).repeat(1, groups)[:, None, None, :]  # [B, 1, 1, R]
    return torch.matmul(weights, probs)[:, :, 0, :]


def accumulated_attention_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    key_valid: torch.Tensor | None = None,
    softcap: float | None = None,
    block_elements: int = 1 << 24,
) -> torch.Tensor:
    """Attention each key receives from **every** prompt query (H2O's heavy-hitter score).

    Computed in query blocks sized so one block holds about ``block_elements`` float32 logits, so
    memory stays O(block * T) even for long prompts.

    Args:
        queries: ``[B, Hq, q, d]`` query states of the last ``q <= T`` key positions (all prompt
            queries at prefill, ``q = T``; a chunk's or the recent decoding queries otherwise).
        keys: ``[B, Hkv, T, d]``.
        scaling, key_valid, softcap: as in :func:`window_attention_scores`.

    Returns:
        ``[B, Hkv, T]`` float32: summed causal attention probabilities, averaged over each KV group.
    """
    batch, n_q_heads, q_len, _ = queries.shape
    length = keys.shape[2]
    groups = n_q_heads // keys.shape[1]
    block = max(1, min(q_len, block_elements // max(1, batch * n_q_heads * length)))
    query_valid = key_valid[:, length - q_len :] if key_valid is not None else None
    return _causal_block_scores(queries, keys, scaling, softcap, key_valid, query_valid, block, "sum") / groups


def pool_scores(scores: torch.Tensor, pooling: str | None, kernel: int) -> torch.Tensor:
    """Smooth scores along the sequence (last dim) with a same-length 1-D pooling.

    ``pooling`` is ``None``/``"none"``, ``"avg"`` (zero padding counted, as SnapKV/kvpress do) or
    ``"max"``. Scores outside the region of interest should be zeroed by the caller first.
    """
    if pooling in (None, "none") or kernel <= 1:
        return scores
    shape = scores.shape
    flat = scores.reshape(-1, 1, shape[-1])
    if pooling == "avg":
        pooled = F.avg_pool1d(flat, kernel_size=kernel, stride=1, padding=kernel // 2)
    elif pooling == "max":
        pooled = F.max_pool1d(flat, kernel_size=kernel, stride=1, padding=kernel // 2)
    else:
        raise ValueError(f"unknown pooling {pooling!r}: use 'none', 'avg' or 'max'")
    return pooled[..., : shape[-1]].reshape(shape)


def max_attention_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    context_len: int,
    key_valid: torch.Tensor | None = None,
    query_valid: torch.Tensor | None = None,
    softcap: float | None = None,
    reduce: str = "max",
    block: int | None = None,
) -> torch.Tensor:
    """Attention each context key receives from queries that come after it (question-agnostic scores).

    The queries are the **last** ``q`` positions of ``keys`` (a reconstruction or probe prompt fed
    after the context): each sees every key up to its own position. The softmax runs over all its
    keys, as the model normalises it; only the first ``context_len`` keys (the context) are scored.

    Args:
        queries: ``[B, Hq, q, d]`` query states of the scoring tokens (after RoPE / q-norm).
        keys: ``[B, Hkv, S, d]`` all keys they attend over (``S >= q``), context first.
        scaling, softcap: as the model's attention uses them.
        context_len: ``T``, the leading keys to score.
        key_valid: ``[B, S]`` bool, False at padding (None = none).
        query_valid: ``[B, q]`` bool, False at padding queries, which then count nothing (None = all real).
        reduce: ``"max"``: the largest probability over the queries and the query heads of each KV
            group (KVzip's reconstruction score); ``"sum"``: their sum (a window-style score).
        block: queries per block (None = all at once). Memory is O(G * block * S) per KV head; the
            result does not depend on the block size.

    Returns:
        ``[B, Hkv, T]`` float32.
    """
    if reduce not in ("max", "sum"):
        raise ValueError(f"unknown reduce {reduce!r}: use 'max' or 'sum'")
    q_len = queries.shape[2]
    block = q_len if block is None else max(1, block)
    return _causal_block_scores(queries, keys, scaling, softcap, key_valid, query_valid, block, reduce)[..., :context_len]


def masked_attention_scores(
    queries: torch.Tensor,
    keys: torch.Tensor,
    scaling: float,
    mask: torch.Tensor,
    context_len: int,
    query_valid: torch.Tensor | None = None,
    softcap: float | None = None,
    reduce: str = "max",
    block: int | None = None,
) -> torch.Tensor:
    """:func:`max_attention_scores` under the layer's own 4-D attention mask (a sliding window, say).

    Args:
        mask: ``[B, 1 or Hq, q or 1, S]``, bool (True = attend) or additive float, as the model's
            attention function received it.
        queries, keys, scaling, context_len, query_valid, softcap, reduce, block: as in
            :func:`max_attention_scores`.

    Returns:
        ``[B, Hkv, context_len]`` float32.
    """
    q_len = queries.shape[2]
    if block is not None and block < q_len:  # blocks of queries, not tokens: bounds memory
        total = None
        for lo in range(0, q_len, max(1, block)):
            hi = min(q_len, lo + max(1, block))
            part = masked_attention_scores(
                queries[:, :, lo:hi], keys, scaling, mask[:, :, lo:hi] if mask.shape[2] > 1 else mask, context_len,
                None if query_valid is None else query_valid[:, lo:hi], softcap, reduce)
            total = part if total is None else (torch.maximum(total, part) if reduce == "max" else total + part)
        return total
    batch, n_q_heads, q_len, _ = queries.shape
    n_kv = keys.shape[1]
    groups = n_q_heads // n_kv
    logits = _grouped_logits(queries, keys, scaling, softcap).view(batch, n_kv, groups, q_len, -1)
    mask = mask[..., -keys.shape[2]:]
    if mask.shape[1] != 1:
        mask = mask.view(batch, n_kv, groups, q_len, -1)
    else:
        mask = mask[:, :, None]
    if mask.dtype == torch.bool:
        logits = logits.masked_fill(~mask, torch.finfo(logits.dtype).min)
    else:
        logits = logits + mask.float()
    probs = torch.softmax(logits.view(batch, n_kv, groups * q_len, -1), dim=-1)
    return _reduce_queries(probs[..., :context_len], query_valid, groups, reduce)


def token_surprisal(
    hidden: torch.Tensor,
    head: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    softcap: float | None = None,
    block: int = 1024,
) -> torch.Tensor:
    """Each prompt token's negative log-likelihood given what precedes it: ``[B, T]``.

    Args:
        hidden: ``[B, T, D]`` the model's final (normed) hidden states of the prompt.
        head: the output projection (``model.get_output_embeddings()``).
        input_ids / attention_mask: ``[B, T]`` the left-padded prompt.
        softcap: the model's final logit soft-cap (Gemma 2), if any.
        block: positions per projection, so no ``[T, vocab]`` tensor is held.

    A row's first real token has nothing to be predicted from: it gets the row's largest value
    (it is the attention sink the window scorings keep too). Padding gets 0.
    """
    batch, width = input_ids.shape
    nll = hidden.new_zeros(batch, width, dtype=torch.float32)
    for start in range(0, width - 1, block):
        stop = min(width - 1, start + block)
        logits = head(hidden[:, start:stop]).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        target = input_ids[:, start + 1 : stop + 1]
        nll[:, start + 1 : stop + 1] = torch.logsumexp(logits, -1) - logits.gather(-1, target[..., None])[..., 0]
    return first_token_surprisal(nll, attention_mask)


def first_token_surprisal(nll: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` surprisal with padding set to 0 and each row's first real token (which nothing
    predicts) set to the largest value of the rest of its row; ``nll``'s own first-token values
    are ignored, so a prefix cut from a longer row gets its own maximum."""
    real = attention_mask.bool()
    first = real & ~torch.cat([real.new_zeros(real.shape[0], 1), real[:, :-1]], dim=1)
    rest = nll.masked_fill(~real | first, 0.0)
    return torch.where(first, rest.amax(-1, keepdim=True), rest)
