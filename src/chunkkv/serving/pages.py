"""Page-granular ChunkKV: which of a request's KV pages survive its prefill. Pure functions, no engine.

In the engine a chunk *is* a page (``page_size`` consecutive tokens, cut from token 0), so dropping a
chunk frees a page. For a prompt of ``T`` tokens, pages ``0 .. n-1`` (``n = ceil(T / P)``; the last one
may be partial):

* the **tail** is every page that holds a token of the observation window (the last
  ``min(window, kept)`` tokens): always kept, and it holds the partial last page, so the request's
  stored tokens stay "whole pages, then one partial page" as the engine's index arithmetic needs;
* the **budget in pages** is ``keep = clamp(ceil(kept / P), tail_pages, n)``, ``kept`` being the
  token budget of :class:`chunkkv.budget.Budget` (``keep_fraction`` / ``keep_tokens`` /
  ``remove_fraction``): the fewest whole pages that hold the token budget, and never fewer than the tail;
* the other ``keep - tail_pages`` pages are the best whole **prefix** pages by ChunkKV's chunk score
  (:func:`chunkkv.selection.select_chunks` with ``chunk_size = P``: window scores, pooled, summed over
  heads, one mean per page), ties to the earlier page.

Every request therefore keeps exactly ``keep`` pages (``PagePlan.keep_pages``) and frees
``n - keep``; the stored tokens are ``T - (n - keep) * P``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import selection as sel
from ..budget import Budget


@dataclass(frozen=True)
class PagePlan:
    """How many pages a prompt of ``n_tokens`` keeps (all counts exact, host ints)."""

    n_tokens: int
    page_size: int
    n_pages: int  # pages the prompt fills (the last may be partial)
    tail_start: int  # first page holding a window token; pages >= tail_start are always kept
    keep_pages: int  # pages kept in total (tail included)

    @property
    def tail_pages(self) -> int:
        return self.n_pages - self.tail_start

    @property
    def prefix_pages_kept(self) -> int:
        return self.keep_pages - self.tail_pages

    @property
    def drop_pages(self) -> int:
        return self.n_pages - self.keep_pages

    @property
    def stored_tokens(self) -> int:
        """Tokens left in the request's pages after the drop."""
        return self.n_tokens - self.drop_pages * self.page_size

    @property
    def compresses(self) -> bool:
        return self.drop_pages > 0


def plan_pages(n_tokens: int, page_size: int, budget: Budget, window: int) -> PagePlan:
    """The page budget of one prompt (see the module docstring)."""
    if page_size < 1:
        raise ValueError(f"page_size must be >= 1, got {page_size}")
    if n_tokens < 1:
        return PagePlan(n_tokens, page_size, 0, 0, 0)
    n_pages = -(-n_tokens // page_size)
    kept = budget.kept(n_tokens)
    win = min(window, kept)
    tail_start = (n_tokens - win) // page_size if win > 0 else n_pages - 1
    tail_pages = n_pages - tail_start
    keep = min(n_pages, max(tail_pages, math.ceil(kept / page_size)))
    return PagePlan(n_tokens, page_size, n_pages, tail_start, keep)


def select_pages(
    scores: torch.Tensor,
    plan: PagePlan,
    pooling: str | None = "max",
    kernel: int = 7,
    reduce: str = "mean",
    peak_weight: float = 0.0,
) -> torch.Tensor:
    """Indices of the pages to keep, ascending, ``[plan.keep_pages]`` (long, on ``scores``' device).

    Args:
        scores: ``[Hkv, T]`` or ``[1, Hkv, T]`` raw token scores of one prompt (e.g. window attention
            summed over layers), ``T = plan.n_tokens``.
        plan: :func:`plan_pages` for this prompt.
        pooling, kernel, reduce, peak_weight: ChunkKV's scoring settings
            (:class:`chunkkv.methods.ChunkKV`'s ``pooling``, ``kernel``, ``chunk_reduce``, ``peak_weight``).

    No host sync: the caller decides when to bring the indices to the host.
    """
    if scores.dim() == 2:
        scores = scores[None]
    device = scores.device
    if plan.n_tokens != scores.shape[-1]:
        raise ValueError(f"scores cover {scores.shape[-1]} tokens, the plan {plan.n_tokens}")
    tail = torch.arange(plan.tail_start, plan.n_pages, device=device)
    if plan.prefix_pages_kept <= 0:
        return tail
    page = plan.page_size
    tail_tokens = plan.n_tokens - plan.tail_start * page  # the window, rounded out to whole pages
    kept_tokens = plan.prefix_pages_kept * page + tail_tokens
    lengths = torch.tensor([plan.n_tokens], device=device)
    kept = torch.tensor([kept_tokens], device=device)
    prefix = sel.prefix_scores(scores.float(), lengths, kept, tail_tokens, pooling, kernel)
    # The prefix is a whole number of pages, so the prefix budget (a whole number of pages) is spent
    # on whole chunks: the top chunks of select_chunks are exactly the top pages.
    picks = sel.select_chunks(prefix, lengths, kept, tail_tokens, kept_tokens, page, reduce,
                              peak_weight=peak_weight)[0, 0]
    chosen = torch.zeros(plan.n_pages, dtype=torch.bool, device=device)
    chosen[picks[picks >= 0] // page] = True
    chosen[plan.tail_start:] = True
    return torch.nonzero(chosen).flatten()


def kept_positions(pages: list[int], plan: PagePlan) -> list[int]:
    """The prompt positions held by the kept ``pages`` (host lists), in order."""
    out: list[int] = []
    for p in pages:
        out.extend(range(p * plan.page_size, min((p + 1) * plan.page_size, plan.n_tokens)))
    return out
