"""chunkkv: ChunkKV KV-cache compression (semantic chunks + layer-wise index reuse) for transformers.

Quick start::

    import chunkkv
    method = chunkkv.ChunkKV(keep_fraction=0.1, chunk_size=10, reuse_depth=2)
    ctx = chunkkv.compress(model, input_ids, method=method)      # compressed cache + next logits
    out = model.generate(torch.cat([input_ids, question_ids], 1), cache=ctx.cache, max_new_tokens=32)

The public names are loaded on first use (PEP 562), so ``import chunkkv`` and the command line's
``--help`` do not pay for importing torch and transformers.
"""

from __future__ import annotations

from .lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "attach": "attention", "detach": "attention",
    "Budget": "budget", "pyramid_budgets": "budget",
    "ChunkKVCache": "cache", "PrunedLayer": "cache",
    "CompressedContext": "context", "CompressionStats": "context", "load_context": "context",
    "stack_contexts": "context",
    "compress": "pipeline", "compress_from_capture": "pipeline", "prefill": "pipeline",
    "PrefillCapture": "capture", "capture_prefill": "capture",
    "BudgetError": "errors", "ChunkKVError": "errors", "PromptError": "errors", "UnsupportedModelError": "errors",
    "GenerationResult": "generation", "Sampling": "generation", "continue_from": "generation", "extend": "generation",
    "generate": "generation", "set_decode_budget": "generation",
    "ContextFileError": "persist",
    "DecodeBudget": "recompress",
    "load_pretrained": "pretrained",
    "H2O": "methods", "METHODS": "methods", "ChunkKV": "methods", "FullKV": "methods", "KVPressChunkKV": "methods",
    "KVPressSnapKV": "methods", "Method": "methods", "PyramidKV": "methods", "SnapKV": "methods",
    "StreamingLLM": "methods", "make_method": "methods",
    "SCORERS": "scorers", "Scorer": "scorers",
    "Compressing": "scoped", "compressing": "scoped",
    "ChunkKVPipeline": "hf_pipeline", "register_pipeline": "hf_pipeline",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
