"""Turn ChunkKV on for a model's continuous batching: ``generate_batch``, ``init_continuous_batching``,
``continuous_batching_context_manager`` and ``transformers serve`` all go through
``model.init_continuous_batching``, which :func:`enable` wraps on the model instance (no class or
module is changed, besides the attention tap of :mod:`chunkkv.serving.attention`).

The wrapper fixes the settings compressed requests need, whatever the caller's
``ContinuousBatchingConfig`` says:

* ``page_size`` = the compression's page size (a chunk is a page);
* ``allow_block_sharing=False``: a compressed request's pages hold a subset of its prompt, so they
  can never serve as another request's prefix (prefix sharing off);
* ``use_async_batching=False``: batch N+1 must be scheduled after batch N dropped its pages;
* ``use_cuda_graph=False`` and no compile: a replayed graph would skip the scoring tap.

and then wraps the manager's ``_create_batch_processor`` so every processor it builds gets a
:class:`~chunkkv.serving.engine.PagedCompressor`.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

from .attention import install_tap, tag_model, untag_model
from .engine import CompressionSettings, PagedCompressor
from .errors import ServingError
from .version import check_transformers

logger = logging.getLogger("chunkkv.serving")
HANDLE_ATTR = "_chunkkv_serving"


@dataclass
class ServingHandle:
    """What :func:`enable` installed on a model; ``compressors`` holds one per batch processor built."""

    settings: CompressionSettings
    trace: bool = False
    check_invariants: bool = False
    poison_freed: bool = False
    log_requests: bool = False
    compressors: list = field(default_factory=list)

    @property
    def compressor(self) -> PagedCompressor:
        """The most recent processor's compressor (records of compressed requests, trace)."""
        if not self.compressors:
            raise ServingError("no continuous-batching processor has been built yet")
        return self.compressors[-1]


def enable(model, method=None, page_size: int = 32, settings: CompressionSettings | None = None, *,
           score_from: float = 0.5,
           trace: bool = False, check_invariants: bool = False, poison_freed: bool = False,
           log_requests: bool = False) -> ServingHandle:
    """Compress every request of ``model``'s continuous batching with ``method`` (a :class:`chunkkv.ChunkKV`).

    Args:
        method: the budget and scoring settings (``keep_fraction`` / ``keep_tokens`` /
            ``remove_fraction``, ``window``, ``pooling``, ``kernel``, ``chunk_reduce``, ``peak_weight``);
            its ``chunk_size`` and ``reuse_depth`` do not apply: a chunk is a page and one page set
            serves every layer.
        page_size: tokens per page, the engine's and the chunk's.
        score_from: the share of the layers, from the bottom, left out of the scores (0.5: the deeper
            half scores; 0: every layer).
        settings: instead of ``method``/``page_size``, ready-made :class:`CompressionSettings`.
        trace: record pages in use after every step (``handle.compressor.timeline``).
        check_invariants, poison_freed: test aids (see :class:`PagedCompressor`).
        log_requests: one ``chunkkv.serving`` log line (INFO) per compressed request.

    Returns the :class:`ServingHandle` (also stored on the model). Calling it again replaces the settings.
    """
    check_transformers()
    if settings is None:
        if method is None:
            raise ServingError("enable() needs a method (chunkkv.ChunkKV(keep_fraction=...)) or settings")
        settings = CompressionSettings.from_method(method, page_size, score_from)
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager", "paged|eager"):
        raise ServingError(
            f"attention implementation {impl!r}: the scoring tap works with 'sdpa' and 'eager' (continuous "
            "batching's 'paged|eager'); load the model with attn_implementation='sdpa'")
    _check_layers(model)
    install_tap()
    handle = ServingHandle(settings, trace, check_invariants, poison_freed, log_requests)
    previous = getattr(model, HANDLE_ATTR, None)
    original_init = previous.original_init if previous is not None else model.init_continuous_batching
    handle.original_init = original_init  # type: ignore[attr-defined]
    handle.had_own_init = (previous.had_own_init if previous is not None  # type: ignore[attr-defined]
                           else "init_continuous_batching" in vars(model))

    def init_continuous_batching(generation_config=None, continuous_batching_config=None, workload_hints=None):
        gen = generation_config if generation_config is not None else model.generation_config
        if (getattr(gen, "num_return_sequences", None) or 1) > 1:
            raise ServingError("num_return_sequences > 1 forks a request's pages before its prefill ends; "
                               "compressed requests support one sequence each")
        config = _compressed_config(continuous_batching_config, settings.page_size)
        manager = original_init(generation_config=generation_config, continuous_batching_config=config,
                                workload_hints=workload_hints)
        _wrap_manager(manager, handle)
        return manager

    model.init_continuous_batching = init_continuous_batching
    setattr(model, HANDLE_ATTR, handle)
    return handle


def _check_layers(model) -> None:
    from transformers.generation.continuous_batching.cache import group_layers_by_attn_type

    config = model.config.get_text_config()
    try:
        groups = group_layers_by_attn_type(config)
    except ValueError as exc:
        raise ServingError(f"continuous batching cannot run this model: {exc}") from None
    if set(groups) != {"full_attention"} or getattr(config, "kv_lora_rank", None) is not None:
        kinds = ", ".join(sorted(groups)) + (" (MLA)" if getattr(config, "kv_lora_rank", None) is not None else "")
        raise ServingError(
            f"this model's layers are {kinds}; page dropping is implemented for models whose layers are all "
            "full attention (a sliding-window cache is indexed by stored length, which dropping would shift)")


def disable(model) -> None:
    """Undo :func:`enable` on ``model`` (managers already built keep their hooks)."""
    handle = getattr(model, HANDLE_ATTR, None)
    if handle is None:
        return
    if handle.had_own_init:
        model.init_continuous_batching = handle.original_init
    else:
        del model.init_continuous_batching  # back to the class's method
    untag_model(model)
    delattr(model, HANDLE_ATTR)


def _compressed_config(config, page_size: int):
    from transformers import ContinuousBatchingConfig

    config = copy.copy(config) if config is not None else ContinuousBatchingConfig()
    if config.page_size != page_size:
        logger.info("continuous batching page size set to %d (the chunk size)", page_size)
    config.page_size = page_size
    config.block_size = None
    config.allow_block_sharing = False
    config.use_async_batching = False
    config.use_cuda_graph = False
    config.auto_switch_to_flash = False  # the tap sees sdpa / eager only
    config.varlen_compile_config = None
    config.decode_compile_config = None
    config.default_compile_level = 0
    return config


def _wrap_manager(manager, handle: ServingHandle) -> None:
    if getattr(manager, "_chunkkv_wrapped", False):
        return
    original_create = manager._create_batch_processor

    def create_batch_processor():
        processor = original_create()
        if getattr(processor, "_chunkkv_compressor", None) is None:
            compressor = PagedCompressor(handle.settings, trace=handle.trace, check_invariants=handle.check_invariants,
                                         poison_freed=handle.poison_freed, log_requests=handle.log_requests)
            compressor.attach(processor)
            tag_model(manager.model, compressor.scorer)
            handle.compressors.append(compressor)
        return processor

    manager._create_batch_processor = create_batch_processor
    manager._chunkkv_wrapped = True
