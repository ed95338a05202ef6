"""``transformers serve`` with the ChunkKV hooks installed in its model process.

``transformers serve`` (5.25) loads each model in a process of its own (``multiprocessing`` spawn),
through a ``ModelLoader`` it pickles into that process. :class:`ChunkKVModelLoader` is that loader
plus the compression settings: in the model process it loads the model as the stock loader does,
then calls :func:`chunkkv.serving.enable` on it, before transformers builds its continuous-batching
manager (``CBGenerateRunner`` calls ``model.init_continuous_batching``). The server itself — FastAPI
app, ``/health``, ``/v1/chat/completions``, uvicorn, signal handling — is transformers' own.

Hook point: ``transformers.cli.serving.model_manager.ModelLoader``, replaced by the subclass for the
time ``Serve`` is built (it looks the name up when it starts).
"""

from __future__ import annotations

import logging
import signal
import sys
from dataclasses import asdict

from .engine import CompressionSettings
from .errors import ServingError

logger = logging.getLogger("chunkkv.serving")

try:  # the stock loader; absent without the serving extras (checked by run_server)
    from transformers.cli.serving.model_manager import ModelLoader as _StockLoader
except ImportError:  # pragma: no cover - reported by run_server
    _StockLoader = object  # type: ignore[misc,assignment]


def _log_to_stderr() -> None:
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s chunkkv: %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


class ChunkKVModelLoader(_StockLoader):  # type: ignore[misc,valid-type]
    """The stock ``ModelLoader`` plus :func:`chunkkv.serving.enable` on every model it loads.

    ``settings`` (None: no compression, the plain server) and ``threads`` are set by :func:`run_server`
    before ``Serve`` builds the loader; they are instance attributes, so they travel with the pickled
    loader into the model's process.
    """

    pending_settings: CompressionSettings | None = None
    pending_threads: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.settings = type(self).pending_settings
        self.threads = type(self).pending_threads

    def load_model_and_processor(self, model_id, on_progress=None):
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        model, processor = super().load_model_and_processor(model_id, on_progress=on_progress)
        _log_to_stderr()
        if self.settings is None:
            logger.info("no compression (--method full): every request keeps its whole KV cache")
            return model, processor
        from .install import enable

        enable(model, settings=self.settings, log_requests=True)
        s = self.settings
        logger.info("ChunkKV on: %s, page = chunk = %d tokens, window %d, one page set for all %d layers",
                    s.budget.describe(), s.page_size, s.window, model.config.num_hidden_layers)
        return model, processor


class Stopped(Exception):
    """The server stopped on SIGINT / SIGTERM (after uvicorn's graceful shutdown)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, frame) -> None:
    raise Stopped(signum)


def run_server(model_path: str, settings: CompressionSettings | None, *, page_size: int = 32, host: str = "127.0.0.1", port: int = 8000,
               num_blocks: int = 256, max_batch_tokens: int = 512, device: str = "cpu", threads: int | None = None,
               log_level: str = "info") -> None:
    """Run ``transformers serve model_path --continuous-batching`` with the hooks until SIGINT / SIGTERM.

    uvicorn shuts down gracefully on either signal and then raises it again once its own handlers are
    gone; the handlers installed here turn that into :class:`Stopped`, which this function returns on
    (the model's process exits with its parent, as transformers serve arranges)."""
    from .version import check_transformers

    check_transformers()
    try:
        from transformers.cli import serve as serve_cli
        from transformers.cli.serving import model_manager
        from transformers.utils.import_utils import is_serve_available
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ServingError(f"transformers serve is not available ({exc}); pip install 'chunkkv[serve]'") from None
    if not is_serve_available():
        raise ServingError("transformers serve needs fastapi, uvicorn, openai and pydantic: pip install 'chunkkv[serve]'")
    ChunkKVModelLoader.pending_settings = settings
    ChunkKVModelLoader.pending_threads = threads
    stock = model_manager.ModelLoader
    model_manager.ModelLoader = ChunkKVModelLoader
    previous = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        serve_cli.Serve(
            force_model=model_path, continuous_batching=True, device=device, dtype="auto",
            cb_num_blocks=num_blocks, cb_max_batch_tokens=max_batch_tokens,
            cb_block_size=page_size,
            host=host, port=port, log_level=log_level, model_timeout=-1,
        )
    except Stopped as stop:
        logger.info("stopped on %s", stop)
    except RuntimeError as exc:
        raise ServingError(f"the server stopped: {exc}") from None
    finally:
        model_manager.ModelLoader = stock
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def describe(settings: CompressionSettings | None) -> str:
    return "full KV (no compression)" if settings is None else ", ".join(f"{k}={v}" for k, v in asdict(settings).items()
                                                                        if v is not None)
