"""chunkkv: ChunkKV KV-cache compression (semantic chunks + layer-wise index reuse) for transformers.

Quick start::

    import chunkkv
    method = chunkkv.ChunkKV(keep_fraction=0.1, chunk_size=10, reuse_depth=2)
    ctx = chunkkv.compress(model, input_ids, method=method)      # compressed cache + next logits
    out = model.generate(torch.cat([input_ids, question_ids], 1), cache=ctx.cache, max_new_tokens=32)
"""

from .attention import attach, detach
from .budget import Budget, pyramid_budgets
from .cache import ChunkKVCache, PrunedLayer
from .compress import CompressedContext, CompressionStats, compress
from .errors import BudgetError, ChunkKVError, PromptError, UnsupportedModelError
from .generation import GenerationResult, Sampling, continue_from, extend, generate, set_decode_budget
from .persist import ContextFileError, load_context
from .recompress import DecodeBudget
from .pretrained import load_pretrained
from .methods import (
    H2O,
    METHODS,
    ChunkKV,
    FullKV,
    KVPressChunkKV,
    KVPressSnapKV,
    Method,
    PyramidKV,
    SnapKV,
    StreamingLLM,
    make_method,
)
from .multi import PrefillCapture, capture_prefill, compress_from_capture

__version__ = "0.1.0"

__all__ = [
    "H2O", "METHODS", "Budget", "BudgetError", "ChunkKV", "ChunkKVCache", "ChunkKVError", "CompressedContext",
    "CompressionStats", "FullKV", "GenerationResult", "KVPressChunkKV", "KVPressSnapKV", "Method", "PromptError",
    "PrefillCapture", "PrunedLayer", "PyramidKV", "Sampling", "SnapKV", "StreamingLLM", "UnsupportedModelError", "attach",
    "ContextFileError", "capture_prefill", "compress", "compress_from_capture", "continue_from", "load_context", "detach", "extend", "generate", "load_pretrained", "make_method", "pyramid_budgets",
    "DecodeBudget", "set_decode_budget",
]
