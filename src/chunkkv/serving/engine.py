"""ChunkKV inside one continuous-batching processor: page drops after prefill, positions kept.

:class:`PagedCompressor` attaches to a ``ContinuousBatchProcessor`` (transformers 5.25) and changes
three things, all per request:

1. **Batch preparation** (wraps ``inputs_and_outputs.prepare_batch_tensors``): records where each
   request sits in the packed batch (:class:`~chunkkv.serving.window.Slot`), then shifts the position
   ids of compressed requests by the tokens they dropped, so new tokens keep their **original**
   RoPE positions while the engine indexes the cache by the stored length.
2. **Forward** (wraps ``_generation_step``): the attention tap scores the requests whose prefill
   ends in this batch (:class:`~chunkkv.serving.window.WindowScorer`).
3. **Right after that forward**, before the next batch is scheduled: each finishing request keeps
   :func:`~chunkkv.serving.pages.select_pages`' pages; its block table is cut to them (in order),
   the dropped pages go back to the pool, and its ``position_offset`` (the engine's cache length)
   becomes the stored length.

The engine keeps one block table per attention type, shared by all its layers, so a request keeps
**one page set for every layer**, chosen from window scores summed over the deeper layers
(``score_from=0.5``: the deeper half; early layers attend locally and, summed in, drown the pages
that matter — see ``docs/serving.md``).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .errors import ServingError
from .pages import PagePlan, kept_positions, plan_pages, select_pages
from .window import Slot, WindowScorer

FULL_ATTENTION = "full_attention"
logger = logging.getLogger("chunkkv.serving")
WARMUP_PREFIX = "__warmup_"


@dataclass(frozen=True)
class CompressionSettings:
    """What the engine hooks need from a :class:`chunkkv.methods.ChunkKV` (plain values: picklable).

    ``page_size`` is the engine's page size and ChunkKV's chunk size at once.
    """

    keep_tokens: int | None = None
    keep_fraction: float | None = None
    remove_fraction: float | None = None
    window: int = 32
    pooling: str = "max"
    kernel: int = 7
    chunk_reduce: str = "mean"
    peak_weight: float = 0.0
    page_size: int = 32
    score_from: float = 0.5  # scores come from the layers at depth >= this share (0 = every layer)

    def __post_init__(self) -> None:
        if not 0.0 <= float(self.score_from) < 1.0:
            raise ServingError(f"score_from={self.score_from!r} must be in [0, 1): the share of the layers, from the "
                               "bottom, that do not score (0.5 = the deeper half scores)")

    def first_scored_layer(self, num_layers: int) -> int:
        return min(num_layers - 1, int(self.score_from * num_layers))

    @classmethod
    def from_method(cls, method, page_size: int, score_from: float = 0.5) -> CompressionSettings:
        from ..methods import ChunkKV

        if not isinstance(method, ChunkKV) or type(method).name != "chunkkv":
            raise ServingError(
                f"the serving engine drops whole pages shared by all heads and layers, which is ChunkKV; "
                f"got {getattr(method, 'name', type(method).__name__)} (use chunkkv.ChunkKV)")
        if method.chunking != "fixed":
            raise ServingError(
                f"in the engine a chunk is a page of {page_size} tokens: segmentation={method.chunking!r} "
                "(boundary-aware chunks) cannot be used there")
        if method.scoring != "window":
            raise ServingError(
                f"scoring={method.scoring!r} needs extra passes the engine does not run; the engine scores "
                "with the prompt's last window queries (scoring='window')")
        if isinstance(page_size, bool) or not isinstance(page_size, int) or page_size < 4:
            raise ServingError(f"page_size={page_size!r} must be an int >= 4 (transformers' minimum page size)")
        return cls(method.keep_tokens, method.keep_fraction, method.remove_fraction, method.window,
                   method.pooling, method.kernel, method.chunk_reduce, float(method.peak_weight), page_size,
                   score_from)

    @property
    def keeps_everything(self) -> bool:
        """A budget that never drops a page (``keep_fraction=1``): the hooks only observe (baselines)."""
        return self.budget.is_full

    @property
    def budget(self):
        from ..budget import Budget

        return Budget(self.keep_tokens, self.keep_fraction, self.remove_fraction)

    def plan(self, n_tokens: int) -> PagePlan:
        return plan_pages(n_tokens, self.page_size, self.budget, self.window)


@dataclass
class CompressionRecord:
    """What one request's prefill kept (host values, for logs, tests and the dense reference)."""

    request_id: str
    prompt_tokens: int
    plan: PagePlan
    kept_pages: list[int]  # page indices of the prompt, ascending
    freed_blocks: list[int]  # pool block ids returned
    decoding_alongside: int = 0  # requests already decoding in the batch that ended this prefill

    @property
    def kept_positions(self) -> list[int]:
        return kept_positions(self.kept_pages, self.plan)


@dataclass
class TracePoint:
    """The pool after one generation step."""

    time: float
    pages_in_use: int
    pages_total: int
    active: int
    waiting: int
    compressed_now: int
    decoding: int = 0  # active requests that have generated at least one token


@dataclass
class PagedCompressor:
    """The per-processor state of the integration (see the module docstring)."""

    settings: CompressionSettings
    trace: bool = False
    check_invariants: bool = False  # tests: block tables disjoint and sized to the stored length, each step
    poison_freed: bool = False  # tests: fill dropped pages with NaN, so any read of them shows
    log_requests: bool = False
    max_records: int = 4096

    records: OrderedDict = field(default_factory=OrderedDict)  # request id -> CompressionRecord
    timeline: list = field(default_factory=list)
    offsets: dict = field(default_factory=dict)  # request id -> tokens dropped (position shift)
    scorer: WindowScorer | None = None
    processor: object = None
    restarts: int = 0  # prefills started again from scratch (the engine's soft reset when pages ran out)
    _slots: list = field(default_factory=list)
    _decoding_in_batch: int = 0
    _observed: list = field(default_factory=list)  # (request id, prompt tokens) of observe-only prefills
    _started: set = field(default_factory=set)  # requests whose prefill started (for counting restarts)
    _t0: float = field(default_factory=time.perf_counter)

    # --- wiring ---------------------------------------------------------------------------------
    def attach(self, processor) -> None:
        cache = processor.cache
        if set(cache.cache_allocators) != {FULL_ATTENTION}:
            raise ServingError(
                f"the model's cache has {', '.join(sorted(cache.cache_allocators))} layers; page dropping is "
                "implemented for full-attention layers only (a sliding window is indexed by stored length)")
        if cache.use_prefix_sharing or cache.allow_block_sharing:
            raise ServingError("compressed requests cannot share prefix pages: build the manager with "
                               "allow_block_sharing=False (chunkkv.serving.enable does)")
        if processor.use_async_batching:
            raise ServingError("async batching prepares batch N+1 before batch N's pages are dropped; "
                               "use use_async_batching=False (chunkkv.serving.enable does)")
        if processor.model_runner.pad_inputs:
            raise ServingError("CUDA graphs / torch.compile replay the forward without the scoring tap; "
                               "turn them off (chunkkv.serving.enable does)")
        allocator = cache.cache_allocators[FULL_ATTENTION]
        if allocator.tokens_per_page != self.settings.page_size:
            raise ServingError(f"the engine's page size is {allocator.tokens_per_page}, the compression's "
                               f"{self.settings.page_size}: they must be equal (a chunk is a page)")
        self.processor = processor
        num_layers = len(allocator.layer_indices)
        self.scorer = WindowScorer(self.settings.window, self.settings.first_scored_layer(num_layers))
        io = processor.inputs_and_outputs
        original_prepare = io.prepare_batch_tensors
        original_step = processor._generation_step

        def prepare_batch_tensors(requests_in_batch, *args, **kwargs):
            slots = self._plan_batch(requests_in_batch)
            original_prepare(requests_in_batch, *args, **kwargs)
            self._shift_positions(io, requests_in_batch)
            self._slots = slots

        def generation_step(model):
            self.scorer.begin(self._slots)
            try:
                original_step(model)
            finally:
                scores = self.scorer.end()
            self._after_forward(scores)

        io.prepare_batch_tensors = prepare_batch_tensors
        processor._generation_step = generation_step
        processor._chunkkv_compressor = self

    # --- before the forward ---------------------------------------------------------------------
    def _plan_batch(self, requests_in_batch) -> list[Slot]:
        slots, q_start, k_start = [], 0, 0
        self._observed = []
        self._decoding_in_batch = sum(1 for fs in requests_in_batch if fs.state.generated_len() > 0)
        for fs in requests_in_batch:
            state = fs.state
            rid = state.request_id
            past, q_len = state.position_offset, fs.query_length
            if past == 0:  # a (re)started prefill: anything known about this id is stale (soft reset)
                if rid in self._started:
                    self.restarts += 1
                self._started.add(rid)
                self.offsets.pop(rid, None)
                self.records.pop(rid, None)
                if self.scorer is not None:
                    self.scorer.forget(rid)
            prefilling = rid not in self.offsets and rid not in self.records and state.generated_len() == 0
            ours = prefilling and not rid.startswith(WARMUP_PREFIX)
            if ours and fs.has_new_token and self.settings.keeps_everything:
                self._observed.append((rid, past + q_len))  # observe-only baseline: recorded, never scored
            ours = ours and not self.settings.keeps_everything
            final = ours and fs.has_new_token
            partial = ours and not fs.has_new_token
            slots.append(Slot(rid, q_start, q_len, k_start, past + q_len, final, partial))
            q_start += q_len
            k_start += past + q_len
        return slots

    def _shift_positions(self, io, requests_in_batch) -> None:
        q_start = 0
        for fs in requests_in_batch:
            shift = self.offsets.get(fs.state.request_id)
            if shift:
                io.position_ids[q_start : q_start + fs.query_length] += shift
            q_start += fs.query_length

    # --- after the forward ----------------------------------------------------------------------
    def _after_forward(self, scores: dict[str, torch.Tensor]) -> None:
        compressed = 0
        scheduler = self.processor.scheduler
        for rid, n_tokens in self._observed:
            plan = self.settings.plan(n_tokens)
            self._remember(CompressionRecord(rid, n_tokens, plan, list(range(plan.n_pages)), [], self._decoding_in_batch))
        for rid, token_scores in scores.items():
            state = scheduler.active_requests.get(rid)
            if state is None:  # cancelled meanwhile
                continue
            compressed += self._compress(state, token_scores)
        self._forget_finished()
        if self.check_invariants:
            self._check_invariants()
        if self.trace:
            self._trace(compressed)

    def _compress(self, state, token_scores: torch.Tensor) -> int:
        rid = state.request_id
        n_tokens = token_scores.shape[-1]
        plan = self.settings.plan(n_tokens)
        allocator = self.processor.cache.cache_allocators[FULL_ATTENTION]
        table = allocator.block_table.get(rid)
        if table is None or len(table) != plan.n_pages or state.position_offset != n_tokens:
            raise ServingError(
                f"request {rid}: the engine holds {None if table is None else len(table)} pages and "
                f"{state.position_offset} tokens after its prefill, expected {plan.n_pages} pages and "
                f"{n_tokens} tokens: the engine's bookkeeping is not what these hooks were written for")
        if not plan.compresses:
            self._remember(CompressionRecord(rid, n_tokens, plan, list(range(plan.n_pages)), [],
                                             self._decoding_in_batch))
            return 0
        s = self.settings
        pages = select_pages(token_scores, plan, s.pooling, s.kernel, s.chunk_reduce, s.peak_weight).tolist()
        keep = set(pages)
        dropped = [block for page, block in enumerate(table) if page not in keep]
        allocator.block_table[rid] = [table[page] for page in pages]
        freed = [block for block in dropped if allocator.ledger.release(block, no_cache=True)]
        if self.poison_freed and freed:
            index = torch.tensor(freed, dtype=torch.long, device=allocator._copy_view.device)
            allocator._copy_view.index_fill_(0, index, 255)  # all-ones bytes: NaN in every float format
        allocator.pool.free_blocks(allocator.index, freed)
        state.position_offset = plan.stored_tokens
        self.offsets[rid] = plan.n_tokens - plan.stored_tokens
        self._remember(CompressionRecord(rid, n_tokens, plan, pages, freed, self._decoding_in_batch))
        if self.log_requests:
            used, total = self.pages_in_use()
            logger.info("request %s: prompt %d tokens, kept %d of %d pages (%d tokens), freed %d; pool %d/%d pages in use",
                        rid, n_tokens, plan.keep_pages, plan.n_pages, plan.stored_tokens, len(freed), used, total)
        return 1

    def _remember(self, record: CompressionRecord) -> None:
        self.records[record.request_id] = record
        while len(self.records) > self.max_records:
            self.records.popitem(last=False)

    def _forget_finished(self) -> None:
        scheduler = self.processor.scheduler
        live = scheduler.active_requests.keys() | scheduler.waiting_requests.keys()
        for rid in [r for r in self.offsets if r not in live]:
            del self.offsets[rid]
        for rid in self.scorer.pending() - live:
            self.scorer.forget(rid)
        self._started &= live

    def _check_invariants(self) -> None:
        allocator = self.processor.cache.cache_allocators[FULL_ATTENTION]
        seen: dict[int, str] = {}
        for rid, table in allocator.block_table.items():
            for block in table:
                if block in seen:
                    raise AssertionError(f"block {block} is in the tables of {seen[block]} and {rid}")
                seen[block] = rid
            state = self.processor.scheduler.active_requests.get(rid)
            if state is not None:
                need = -(-state.position_offset // allocator.tokens_per_page)
                if len(table) < need:
                    raise AssertionError(f"{rid}: {len(table)} pages hold fewer than its {state.position_offset} tokens")

    def pages_in_use(self) -> tuple[int, int]:
        """``(pages held by requests, pages in the pool)`` of the full-attention allocator."""
        allocator = self.processor.cache.cache_allocators[FULL_ATTENTION]
        used = sum(len(t) for t in allocator.block_table.values())
        return used, allocator.num_blocks

    def _trace(self, compressed: int) -> None:
        used, total = self.pages_in_use()
        scheduler = self.processor.scheduler
        decoding = sum(1 for state in scheduler.active_requests.values() if state.generated_len() > 0)
        self.timeline.append(TracePoint(time.perf_counter() - self._t0, used, total, len(scheduler.active_requests),
                                        len(scheduler.waiting_requests), compressed, decoding))
