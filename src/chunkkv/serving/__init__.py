"""ChunkKV inside transformers' continuous batching (``generate_batch``, ``ContinuousBatchingManager``,
``transformers serve``): a chunk is a KV page, a request's dropped pages return to the pool right after
its prefill, and new tokens keep their original positions. See ``docs/serving.md``.

    import chunkkv, chunkkv.serving
    handle = chunkkv.serving.enable(model, chunkkv.ChunkKV(keep_fraction=0.2), page_size=32)
    out = model.generate_batch(prompts, generation_config=..., continuous_batching_config=...)
    handle.compressor.records["req_0"].kept_positions

Tested with transformers 5.25 only (:mod:`chunkkv.serving.version`).
"""

from .engine import CompressionRecord, CompressionSettings, PagedCompressor, TracePoint
from .errors import ServingError
from .install import ServingHandle, disable, enable
from .pages import PagePlan, plan_pages, select_pages
from .reference import dense_greedy
from .version import check_transformers

__all__ = [
    "CompressionRecord", "CompressionSettings", "PagePlan", "PagedCompressor", "ServingError", "ServingHandle",
    "TracePoint", "check_transformers", "dense_greedy", "disable", "enable", "plan_pages", "select_pages",
]
