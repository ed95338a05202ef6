"""Plain, loop-based reference implementations written straight from the papers.

They are slow and obvious on purpose: the vectorised code in ``chunkkv`` must agree with them.
One row at a time, no padding (row-relative coordinates).
"""

from __future__ import annotations

import math

import torch


def window_scores(queries: torch.Tensor, keys: torch.Tensor, scaling: float) -> torch.Tensor:
    """queries [Hq, w, d], keys [Hkv, T, d] -> [Hkv, T]: mean over window queries and group of
    causal softmax attention."""
    n_q, win, _ = queries.shape
    n_kv, length, _ = keys.shape
    group = n_q // n_kv
    out = torch.zeros(n_kv, length, dtype=torch.float64)
    for h in range(n_q):
        kv = h // group
        for i in range(win):
            pos = length - win + i
            logits = [float(queries[h, i].double() @ keys[kv, j].double()) * scaling for j in range(pos + 1)]
            top = max(logits)
            exps = [math.exp(x - top) for x in logits]
            total = sum(exps)
            for j, e in enumerate(exps):
                out[kv, j] += e / total / (win * group)
    return out


def pool(scores: list[float], kind: str, kernel: int) -> list[float]:
    """Same-length 1-D pooling with zero padding counted (avg) / ignored (max)."""
    if kind == "none" or kernel <= 1:
        return list(scores)
    half = kernel // 2
    n = len(scores)
    out = []
    for i in range(n):
        window = [scores[j] for j in range(i - half, i - half + kernel) if 0 <= j < n]
        out.append(sum(window) / kernel if kind == "avg" else max(window))
    return out


def keep_window(length: int, kept: int, window: int) -> list[int]:
    w = min(window, kept)
    return list(range(length - w, length))


def per_head(scores: list[list[float]], length: int, kept: int, window: int) -> list[list[int]]:
    """SnapKV/H2O: each head keeps its best prefix tokens plus the window (ties: earlier token)."""
    w = min(window, kept)
    prefix = length - w
    out = []
    for head in scores:
        ranked = sorted(range(prefix), key=lambda j: (-head[j], j))
        out.append(sorted(ranked[: kept - w] + keep_window(length, kept, window)))
    return out


def chunkkv(scores: list[list[float]], length: int, kept: int, window: int, chunk: int, reduce: str = "mean") -> list[int]:
    """ChunkKV (paper Algorithm 1 with an exact budget): rank prefix chunks by the head-summed score,
    keep whole chunks in rank order, top up with the best tokens of the next chunk, keep the window."""
    w = min(window, kept)
    prefix = length - w
    budget = kept - w
    token = [sum(head[j] for head in scores) for j in range(prefix)]
    chunks = [list(range(s, min(s + chunk, prefix))) for s in range(0, prefix, chunk)]

    def chunk_score(c: list[int]) -> float:
        total = sum(token[j] for j in c)
        return total / len(c) if reduce == "mean" else total

    ranked = sorted(range(len(chunks)), key=lambda i: (-chunk_score(chunks[i]), i))
    picked: list[int] = []
    for i in ranked:
        for j in sorted(chunks[i], key=lambda j: (-token[j], j)):
            if len(picked) < budget:
                picked.append(j)
    return sorted(picked + keep_window(length, kept, window))


def streaming(length: int, kept: int, n_sink: int) -> list[int]:
    sink = min(n_sink, kept)
    return sorted(list(range(sink)) + list(range(length - (kept - sink), length)))
